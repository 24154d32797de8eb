"""Capacity planning for data + expert parallel training: memory per rank, FLOPs per token
and all-to-all traffic, from a ModelConfig alone (nothing is built or allocated).

Models (stated so the numbers can be checked and argued with):
- Memory per rank (parameters, gradients, AdamW state, activations, FSDP's transient
  gathers) for a layout of expert parallelism, FSDP, activation checkpointing and CPU
  offload, for training, full or LoRA finetuning: ``dsmoe.plan_memory``. Parameters
  come from ``dsmoe.params.count_parameters``.
- Activations are for one micro-batch (``micro_batch`` sequences of ``seq_len`` per
  rank; by default all the rank's tokens of a step, no gradient accumulation).
- FLOPs per token, forward: 2 x the active matmul parameters (all active parameters but
  the embedding and norms) + 2 x L x (q + o) x S for attention scores and values (S the
  sequence length, causal masking not discounted, as in PaLM's 6N + 12 L H Q T).
  Training = 3 x forward.
- All-to-all bytes, per rank and MoE layer: a token goes once to every *other* rank that
  owns one of its experts (DeepSeek's dispatch), and its partial result comes back; the
  backward pass repeats both. payload = 4 x T_rank x r x D x bytes, r = expected other
  ranks per token. Under uniform (exchangeable) routing each rank is needed with
  p = 1 - C(E - E/ep, K) / C(E, K), r = (ep - 1) p. With device-limited routing (M) the
  expectation is estimated by running the router's own selection on i.i.d. scores
  (20,000 samples, fixed seed; standard error < 0.5%). Metadata: per (token, rank) row
  K fp32 gate weights + K expert ids (+ K affinities when dropping), forward and back,
  plus the (ep - 1)(E/ep + 2) int64 counts per layer.
- Gradient all-reduce (ring): 2 (W - 1)/W x replicated gradient bytes over all W ranks,
  2 (R - 1)/R x expert gradient bytes over the R = W/ep replicas of each expert block;
  FSDP's all-gathers and reduce-scatter instead (``dsmoe.plan_memory``).

Shapes: E experts, K picks, D hidden, F expert width, I dense width, V vocab, L layers.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

from dsmoe.config import ModelConfig, check_expert_split
from dsmoe.params import attention_widths, count_parameters
from dsmoe.plan_memory import (DTYPE_BYTES, Layout, Split, activation_bytes_per_token,
                               memory_per_rank, sync_bytes, training_state)

MONTE_CARLO_SAMPLES = 20_000


# --- routing statistics --------------------------------------------------------------------------
def remote_rank_probability(n_experts: int, top_k: int, ep: int) -> float:
    """P(a given rank owns at least one of a token's K experts), uniform routing:
    1 - C(E - E/ep, K) / C(E, K)."""
    per_rank = n_experts // ep
    return 1.0 - math.comb(n_experts - per_rank, top_k) / math.comb(n_experts, top_k)


@functools.lru_cache(maxsize=None)
def ranks_per_token(n_experts: int, top_k: int, ep: int, max_devices: int | None = None,
                    samples: int = MONTE_CARLO_SAMPLES, seed: int = 0) -> float:
    """Expected number of distinct ranks (the token's own included) a token's K experts
    live on, for exchangeable expert scores; with ``max_devices`` M, after DeepSeek-V2's
    device-limited selection (the router's own ``select_group_limited``)."""
    if max_devices is None or max_devices >= min(ep, top_k):
        # M >= K cannot bind: the K best experts lie on at most K devices, each of whose
        # best score beats every device holding none of them.
        return ep * remote_rank_probability(n_experts, top_k, ep)
    import torch  # here, not at the top: ``dsmoe plan --help`` should not load it

    from dsmoe.moe.router import select_group_limited

    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(samples, n_experts, generator=gen, dtype=torch.float64)  # [T, E]
    picks = select_group_limited(scores, top_k, ep, max_devices, "max")  # [T, K]
    owners = torch.zeros(samples, ep, dtype=torch.bool)
    owners.scatter_(1, picks // (n_experts // ep), True)
    return float(owners.sum(dim=1).double().mean())


def a2a_bytes_per_layer(config: ModelConfig, tokens_per_rank: int, ep: int, *,
                        bytes_per_elem: int, training: bool = True) -> dict[str, float]:
    """Expected bytes one rank sends to other ranks in one MoE layer for one micro-batch
    (module docstring); device-limited routing is taken from the config."""
    E, K, D = config.n_routed_experts, config.num_experts_per_tok, config.hidden_size
    if E is None or ep == 1:
        return {"payload": 0.0, "metadata": 0.0, "ranks_per_token": 1.0,
                "remote_ranks_per_token": 0.0}
    M = config.max_devices if config.topk_method == "device_limited" else None
    reach = ranks_per_token(E, K, ep, M)
    remote = reach * (ep - 1) / ep  # exchangeable ranks: the home rank is one of ep
    rows = tokens_per_rank * remote
    passes = 2 if training else 1  # forward, and the backward's reverse exchanges
    meta_width = K * (3 if training and config.drop_tokens else 2)
    return {
        "payload": passes * 2 * rows * D * bytes_per_elem,
        "metadata": passes * rows * meta_width * 4 + (ep - 1) * (E // ep + 2) * 8,
        "ranks_per_token": reach,
        "remote_ranks_per_token": remote,
    }


# --- the plan ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class RoutingTraffic:
    label: str
    max_devices: int | None
    ranks_per_token: float  # distinct ranks per token, own included
    fraction_per_remote_rank: float  # share of a rank's tokens each other rank receives
    payload_bytes: float  # per step per rank, all MoE layers, forward + backward
    metadata_bytes: float


@dataclass(frozen=True)
class Plan:
    config: ModelConfig
    devices: int
    ep: int
    dtype: str
    tokens_per_step: int
    seq_len: int
    total_params: int
    active_params: int
    replicated_params: float  # per rank: all but the routed experts (sharded under FSDP)
    expert_params_per_rank: float
    memory: dict[str, float]  # bytes per device: parameters, gradients, optimizer,
    #                           activations, fsdp_transient
    flops_forward_per_token: float
    traffic: list[RoutingTraffic] = field(default_factory=list)
    allreduce_bytes: float = 0.0  # weight + gradient collectives per step per rank
    layout: Layout = Layout()
    method: str = "train"  # train | full | lora (METHODS)
    micro_batch_tokens: int = 0  # per rank per forward: what activations are sized for
    host_memory: float = 0.0  # bytes per rank off the device (--cpu-offload)
    sync: dict[str, float] = field(default_factory=dict)  # allreduce_bytes by collective
    trainable_params_per_rank: float = 0.0

    @property
    def replicas(self) -> int:
        return self.devices // self.ep

    @property
    def tokens_per_rank(self) -> int:
        return self.tokens_per_step // self.devices

    @property
    def device_bytes(self) -> float:
        return sum(self.memory.values())

    @property
    def step_communication_bytes(self) -> float:
        """Per rank per step: weight/gradient collectives + the all-to-all of unrestricted
        top-K routing (layouts compare on the same routing)."""
        a2a = self.traffic[0].payload_bytes + self.traffic[0].metadata_bytes \
            if self.traffic else 0.0
        return self.allreduce_bytes + a2a


def validate(config: ModelConfig, devices: int, ep: int, max_devices: int | None,
             tokens_per_step: int, dtype: str) -> None:
    """The same set-up errors training would raise, before any arithmetic."""
    if devices < 1:
        raise ValueError(f"--devices must be >= 1, got {devices}")
    if ep < 1 or devices % ep:
        raise ValueError(f"--devices {devices} is not divisible by --ep {ep}: ranks form "
                         f"ep x replicas groups; pick an --ep that divides {devices}")
    E, K = config.n_routed_experts, config.num_experts_per_tok
    if E is None and ep > 1:
        raise ValueError(f"--ep {ep} needs routed experts; this preset is dense")
    if E is not None:
        check_expert_split(E, ep)
    if max_devices is not None:
        if not 1 <= max_devices <= ep:
            raise ValueError(f"--max-devices-per-token M={max_devices} must lie in "
                             f"[1, --ep {ep}]: a token can reach at most {ep} ranks")
        if E is not None and max_devices * (E // ep) < K:
            raise ValueError(f"--max-devices-per-token M={max_devices}: {max_devices} "
                             f"ranks of {E // ep} experts cannot hold top-{K}; raise M")
    if tokens_per_step < devices or tokens_per_step % devices:
        raise ValueError(f"--tokens-per-step {tokens_per_step} must be a positive multiple "
                         f"of --devices {devices} (each rank takes an equal share)")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}")


def forward_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    counts = count_parameters(config)
    matmul = counts.active - counts.embedding - counts.norms
    q, _, _, o = attention_widths(config)  # scores q.k over q's width, then values (o)
    return 2.0 * matmul + 2.0 * config.num_hidden_layers * (q + o) * seq_len


def make_plan(config: ModelConfig, devices: int, *, ep: int | None = None,
              max_devices: int | None = None, tokens_per_step: int | None = None,
              dtype: str = "bf16", seq_len: int | None = None, fsdp: bool = False,
              activation_checkpointing: bool = False, cpu_offload: bool = False,
              micro_batch: int | None = None, method: str = "train", lora_r: int = 8,
              lora_targets: tuple[str, ...] | None = None) -> Plan:
    """Plan training (``method`` "train"), full (``"full"``) or LoRA (``"lora"``, rank
    ``lora_r`` on ``lora_targets``, default finetune's) finetuning of ``config`` on
    ``devices`` ranks (EP ``ep``, default all of them) in the given layout."""
    for flag, value in (("--devices", devices), ("--ep", ep), ("--seq-len", seq_len),
                        ("--tokens-per-step", tokens_per_step), ("--micro-batch", micro_batch),
                        ("--lora-r", lora_r)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):  # 0 must not mean "the default"
            raise ValueError(f"{flag} must be a positive integer, got {value!r}")
    E = config.n_routed_experts
    ep = (devices if E is not None and E % devices == 0 else 1) if ep is None else ep
    seq_len = seq_len or config.max_position_embeddings
    tokens_per_step = tokens_per_step or devices * seq_len * (micro_batch or 1)
    validate(config, devices, ep, max_devices, tokens_per_step, dtype)
    micro_tokens = _micro_batch_tokens(tokens_per_step // devices, seq_len, micro_batch)
    if cpu_offload and not fsdp:
        raise ValueError("--cpu-offload needs --fsdp: dsmoe offloads through FSDP2's "
                         "CPUOffloadPolicy (dsmoe train --fsdp --offload-optimizer)")
    if method == "lora" and lora_targets is None:
        from dsmoe.finetune.lora import DEFAULT_TARGETS  # here: it loads torch

        lora_targets = DEFAULT_TARGETS
    layout = Layout(ep, fsdp, activation_checkpointing, cpu_offload)
    state = training_state(config, dtype, method, lora_r, tuple(lora_targets or ()))
    memory, host = memory_per_rank(state, devices, layout)
    lora = (lora_r, tuple(lora_targets)) if state.lora else None
    memory["activations"] = micro_tokens * activation_bytes_per_token(
        config, dtype, activation_checkpointing=activation_checkpointing, lora=lora)
    counts = count_parameters(config)
    sync = sync_bytes(state, devices, layout)
    traffic = _traffic(config, ep, max_devices, tokens_per_step // devices, DTYPE_BYTES[dtype])
    return Plan(config, devices, ep, dtype, tokens_per_step, seq_len, counts.total,
                counts.active, Split(counts.total - counts.routed_experts).per_rank(
                    devices, layout), Split(0, counts.routed_experts).per_rank(devices, layout),
                memory,
                forward_flops_per_token(config, seq_len), traffic, sum(sync.values()),
                layout, method, micro_tokens, host, sync,
                state.trainable.per_rank(devices, layout))


def _micro_batch_tokens(tokens_per_rank: int, seq_len: int, micro_batch: int | None) -> int:
    """Tokens one forward pass holds activations for; the step accumulates the rest."""
    if micro_batch is None:
        return tokens_per_rank
    tokens = micro_batch * seq_len
    if tokens_per_rank % tokens:
        raise ValueError(f"--micro-batch {micro_batch} x --seq-len {seq_len} = {tokens:,} "
                         f"tokens must divide the {tokens_per_rank:,} tokens per rank per step "
                         "(the step accumulates whole micro-batches)")
    return tokens


def _traffic(config: ModelConfig, ep: int, max_devices: int | None, tokens_per_rank: int,
             b: int) -> list[RoutingTraffic]:
    """Rows: unrestricted routing, then device-limited with the given M, or every M that
    can hold top-K and limits anything (M < ep)."""
    E, K = config.n_routed_experts, config.num_experts_per_tok
    if E is None or ep == 1:
        return []
    n_moe = len(config.moe_layer_indices)
    base = config.replace(topk_method="greedy", n_devices=ep, max_devices_per_token=None)
    # M >= K cannot bind (K experts span at most K ranks); M * E/ep < K cannot hold top-K.
    limits = [max_devices] if max_devices is not None else [
        m for m in range(1, min(ep, K)) if m * (E // ep) >= K]
    rows = []
    for M in [None] + [m for m in limits if m < ep]:
        cfg = base if M is None else base.replace(topk_method="device_limited",
                                                  max_devices_per_token=M)
        per_layer = a2a_bytes_per_layer(cfg, tokens_per_rank, ep, bytes_per_elem=b)
        label = f"top-{K} of {E}" if M is None else f"device-limited, M={M}"
        rows.append(RoutingTraffic(label, M, per_layer["ranks_per_token"],
                                   per_layer["ranks_per_token"] / ep,
                                   n_moe * per_layer["payload"], n_moe * per_layer["metadata"]))
    return rows


# --- presentation --------------------------------------------------------------------------------
def format_bytes(n: float) -> str:
    """Binary units: 512 B, 3.0 KiB, 1.25 GiB."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n:,.0f} B"


def format_count(n: float, unit: str = "") -> str:
    """Decimal prefixes: 2.83B, 1.2M, 512 (parameters); 6.18 G (FLOPs with unit)."""
    prefixes = (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)) if unit else (
        ("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3))
    for prefix, scale in prefixes:
        if n >= scale:
            return f"{n / scale:,.2f}{' ' if unit else ''}{prefix}{unit}"
    return f"{n:,.0f}{' ' + unit if unit else ''}"


METHOD_NAMES = {"train": "training", "full": "full finetuning", "lora": "LoRA finetuning"}


def _memory_rows(plan: Plan) -> list[str]:
    """The per-device memory table (markdown rows)."""
    m, layout = plan.memory, plan.layout
    lora = plan.method == "lora"
    weights = f"{plan.dtype}, frozen + fp32 adapters" if lora else plan.dtype
    optimizer = "AdamW m, v fp32" + (" + fp32 master" if plan.dtype != "fp32" and not lora
                                     else "")
    recompute = "activation checkpointing" if layout.activation_checkpointing \
        else "no recomputation"
    where = ", on the host" if layout.cpu_offload else ""
    rows = [
        "| memory per device | bytes |",
        "|---|---:|",
        f"| parameters ({weights}{where}) | {format_bytes(m['parameters'])} |",
        f"| gradients ({'fp32 adapters' if lora else plan.dtype}{where}) | "
        f"{format_bytes(m['gradients'])} |",
        f"| optimizer ({optimizer}{where}) | {format_bytes(m['optimizer'])} |",
        f"| activations ({plan.micro_batch_tokens:,} tokens, {recompute}) | "
        f"{format_bytes(m['activations'])} |",
    ]
    if layout.fsdp:
        rows.append(f"| FSDP all-gathered weights + unsharded gradients (largest unit) | "
                    f"{format_bytes(m['fsdp_transient'])} |")
    rows.append(f"| **total** | **{format_bytes(plan.device_bytes)}** |")
    if layout.cpu_offload:
        rows.append(f"| host memory (sharded weights, gradients, optimizer state) | "
                    f"{format_bytes(plan.host_memory)} |")
    return rows


def format_plan(plan: Plan, name: str = "") -> str:
    """A markdown report of ``plan``."""
    c = plan.config
    n_moe = len(c.moe_layer_indices)
    E = c.n_routed_experts or 0
    flops = plan.flops_forward_per_token
    extras = "".join(f", {part}" for part in plan.layout.label.split(", ")[2:])
    split = "non-expert (FSDP shard) +" if plan.layout.fsdp else "replicated +"
    lines = [
        f"## {name or 'model'} {METHOD_NAMES[plan.method]} on {plan.devices} device(s): "
        f"EP {plan.ep} x {plan.replicas} {'FSDP shard' if plan.layout.fsdp else 'replica'}(s), "
        f"{plan.dtype}{extras}",
        "",
        f"- parameters: {format_count(plan.total_params)} total, "
        f"{format_count(plan.active_params)} active per token; per rank "
        f"{format_count(plan.replicated_params)} {split} "
        f"{format_count(plan.expert_params_per_rank)} routed experts "
        f"({E // plan.ep} of {E} per MoE layer per EP rank"
        f"{', sharded over ' + str(plan.replicas) + ' rank(s)' if plan.layout.fsdp else ''})"
        + (f"; {format_count(plan.trainable_params_per_rank)} trainable adapter parameters "
           "per rank" if plan.method == "lora" else ""),
        f"- tokens per step: {plan.tokens_per_step:,} ({plan.tokens_per_rank:,} per rank), "
        f"sequence length {plan.seq_len:,}",
        f"- FLOPs per token: {format_count(flops, 'FLOP')} forward, "
        f"{format_count(3 * flops, 'FLOP')} training; per step per rank "
        f"{format_count(3 * flops * plan.tokens_per_rank, 'FLOP')}",
        "",
        *_memory_rows(plan),
    ]
    if plan.traffic:
        lines += [
            "",
            f"All-to-all per step per rank ({n_moe} MoE layers, forward + backward; "
            "expected under uniform routing):",
            "",
            "| routing | ranks per token | share of tokens each other rank receives "
            "| payload | metadata |",
            "|---|---:|---:|---:|---:|",
        ]
        for row in plan.traffic:
            lines.append(f"| {row.label} | {row.ranks_per_token:.2f} | "
                         f"{row.fraction_per_remote_rank:.3f} | "
                         f"{format_bytes(row.payload_bytes)} | "
                         f"{format_bytes(row.metadata_bytes)} |")
    if plan.layout.fsdp:
        lines += ["", "FSDP per step per rank: " + ", ".join(
            f"{kind} {format_bytes(n)}" for kind, n in plan.sync.items())]
    else:
        lines += ["", "Gradient all-reduce per step per rank (ring): "
                  f"{format_bytes(plan.allreduce_bytes)}"]
    return "\n".join(lines)
