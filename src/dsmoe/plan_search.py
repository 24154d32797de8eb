"""``dsmoe plan --memory``: the cheapest layout whose per-device memory fits.

Candidates: every EP size that divides both the device count and the routed experts
(1 for a dense model), FSDP on and off, activation checkpointing on and off, CPU
offload on and off under FSDP (the only offload dsmoe has); flags the user gave (``--ep``,
``--fsdp``, ``--activation-checkpointing``, ``--cpu-offload``) are kept fixed. Host
memory is reported, not limited.

Cheapest first, in this order (each costs time, so the search turns on as little as fits):
0. layouts dsmoe's own commands run (``dsmoe_flags``) before those they cannot yet;
1. no offload: offload copies weights and gradients over PCIe every step and runs
   AdamW on the host;
2. no activation checkpointing: recomputation costs about a third more compute;
3. the fewest bytes each rank communicates per step (``Plan.step_communication_bytes``:
   DDP's all-reduce or FSDP's all-gathers and reduce-scatter, plus the all-to-all),
   which picks between DDP and FSDP and among EP sizes;
4. the least memory, as the tie-break.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dsmoe.config import ModelConfig
from dsmoe.plan import Plan, format_bytes, format_plan, make_plan

# SI units are powers of 1000; IEC units and bare letters (24G, as docker and java read
# them) powers of 1024.
SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*")


def parse_size(text: str) -> int:
    """Bytes in ``text``: 80GB (80e9), 80GiB (80 * 2**30), 24G (24 * 2**30), 512MiB."""
    match = _SIZE.fullmatch(text)
    unit = match and match.group(2).lower()
    if not match or unit not in SIZE_UNITS:
        raise ValueError(f"--memory {text!r} is not a size: write a number and a unit, e.g. "
                         "80GB (10^9 bytes), 80GiB or 80G (2^30 bytes), 512MiB")
    size = float(match.group(1)) * SIZE_UNITS[unit]
    if size < 1:
        raise ValueError(f"--memory {text!r} must be at least one byte")
    return int(size)


@dataclass(frozen=True)
class Search:
    memory: int  # bytes per device
    ranked: list[Plan]  # every candidate, cheapest first (fitting ones before the rest)

    @property
    def fitting(self) -> list[Plan]:
        return [p for p in self.ranked if p.device_bytes <= self.memory]


def ep_sizes(config: ModelConfig, devices: int) -> list[int]:
    E = config.n_routed_experts
    if E is None:
        return [1]
    return [ep for ep in range(1, devices + 1) if devices % ep == 0 and E % ep == 0]


def dsmoe_flags(plan: Plan) -> str | None:
    """The ``dsmoe train`` / ``dsmoe finetune`` flags that run ``plan``'s layout, or None
    where the command cannot: finetuning has no activation checkpointing, its ``--ep``
    needs ``--fsdp``, and LoRA is data parallel only."""
    layout, method = plan.layout, plan.method
    if method != "train" and (layout.activation_checkpointing
                              or (layout.ep > 1 and not layout.fsdp)):
        return None
    if method == "lora" and (layout.fsdp or layout.ep > 1):
        return None
    flags = {"train": "dsmoe train", "full": "dsmoe finetune --full",
             "lora": "dsmoe finetune"}[method] + f" --nproc {plan.devices}"
    # dsmoe train's --ep defaults to every rank, finetune's to 1: train always names it
    ep_flag = layout.ep > 1 or (method == "train" and plan.devices > 1)
    for on, flag in ((ep_flag, f"--ep {layout.ep}"), (layout.fsdp, "--fsdp"),
                     (layout.activation_checkpointing, "--activation-checkpointing"),
                     (layout.cpu_offload, "--offload-optimizer")):
        flags += f" {flag}" if on else ""
    return flags


def cost(plan: Plan) -> tuple:
    """The ranking of the module docstring."""
    return (dsmoe_flags(plan) is None, plan.layout.cpu_offload,
            plan.layout.activation_checkpointing, plan.step_communication_bytes,
            plan.device_bytes)


def search_layouts(config: ModelConfig, devices: int, memory: int, *, ep: int | None = None,
                   fsdp: bool = False, activation_checkpointing: bool = False,
                   cpu_offload: bool = False, **workload) -> Search:
    """Plan every candidate layout; ``workload`` = make_plan's other keywords."""
    candidates = [make_plan(config, devices, ep=e, fsdp=f, activation_checkpointing=a,
                            cpu_offload=o, **workload)
                  for e in ([ep] if ep else ep_sizes(config, devices))
                  for f in ([True] if fsdp else [False, True])
                  for a in ([True] if activation_checkpointing else [False, True])
                  for o in ([True] if cpu_offload else [False, True]) if f or not o]
    fits = [p for p in candidates if p.device_bytes <= memory]
    rest = [p for p in candidates if p.device_bytes > memory]
    rest.sort(key=lambda p: (p.device_bytes, cost(p)))  # the closest first
    return Search(memory, sorted(fits, key=cost) + rest)


def _size_label(memory: int) -> str:
    return f"{format_bytes(memory)} ({memory / 1e9:,.1f} GB)"


def format_search(search: Search, name: str, max_rows: int = 12) -> str:
    """The chosen layout's plan, then the runner-up table; ValueError when nothing fits."""
    if not search.fitting:
        closest = search.ranked[0]
        raise ValueError(
            f"no layout fits {_size_label(search.memory)} per device; the closest, "
            f"{closest.layout.label}, needs {_size_label(int(closest.device_bytes))} "
            f"(more devices, a shorter --seq-len or a smaller --micro-batch would help)")
    chosen = search.fitting[0]
    command = dsmoe_flags(chosen)
    lines = [f"Chosen layout for {_size_label(search.memory)} per device: "
             f"**{chosen.layout.label}** ({format_bytes(chosen.device_bytes)} per device): "
             + (f"`{command}`" if command else "no dsmoe command runs it yet"),
             "", format_plan(chosen, name), "",
             f"Layouts considered ({len(search.fitting)} of {len(search.ranked)} fit), "
             "cheapest first:", "",
             "| # | layout | weights + gradients + optimizer | activations | FSDP transient "
             "| per device | host | communication per step | fits | dsmoe runs it |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for i, p in enumerate(search.ranked[:max_rows], 1):
        m = p.memory
        state = m["parameters"] + m["gradients"] + m["optimizer"]
        lines.append(
            f"| {i} | {p.layout.label} | {format_bytes(state)} | "
            f"{format_bytes(m['activations'])} | {format_bytes(m['fsdp_transient'])} | "
            f"{format_bytes(p.device_bytes)} | {format_bytes(p.host_memory)} | "
            f"{format_bytes(p.step_communication_bytes)} | "
            f"{'yes' if p.device_bytes <= search.memory else 'no'} | "
            f"{'yes' if dsmoe_flags(p) else 'not yet'} |")
    if len(search.ranked) > max_rows:
        lines.append(f"\n({len(search.ranked) - max_rows} more layout(s) not shown)")
    return "\n".join(lines)
