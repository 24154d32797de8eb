"""Benchmark: per-rank training memory measured on gloo CPU processes beside ``dsmoe plan``.

Setup: the deepseek-moe-2b shape cut to 2 layers (``--layers``; D=1280, 63 routed experts
of width 768 + 1 shared, top-7, vocab 102,400: 653M parameters), fp32, AdamW, one
training step of ``--batch`` x ``--seq`` tokens per rank, for each layout: 1 process; EP 2
on 2; FSDP on 2; FSDP 2 x EP 2 on 4 (``--layouts``). FSDP layouts need dsmoe's FSDP engine
(``dsmoe.distributed.fsdp``); without it they are skipped with a note.

Measured on every rank after the step (``dsmoe.distributed.local_state_bytes``): the
bytes of the parameters, their gradients and the optimizer state (FSDP's DTensors by
their local shards), the largest rank reported; and, as a cross-check,
the peak RSS growth from before the model was built to after the step (``VmHWM``), which
also holds activations, the allocator's slack and FSDP's transient gathers.
Predicted: ``dsmoe.plan.make_plan`` for the same layout (parameters + gradients +
optimizer, fp32; the "plan + activations" column adds its activation and FSDP-transient
estimate for the RSS comparison).

NOTE: every layout of the 2-layer 2B shape holds ~10 GiB in all (EP and FSDP's gathers
more), so a layout is skipped when /proc/meminfo's MemAvailable is short of the plan's
estimate + 15%; and its 63 routed experts do not split over EP 2 (``--preset tiny`` runs
all four layouts in seconds).

Usage:
  python benchmarks/plan_memory.py                    # all layouts, 2 layers
  python benchmarks/plan_memory.py --layouts 1 ep2    # some of them
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _proc import status_kib, status_kib_of  # noqa: E402

from dsmoe import distributed as ddist  # noqa: E402
from dsmoe import plan  # noqa: E402
from dsmoe.config import ModelConfig  # noqa: E402
from dsmoe.model import Transformer  # noqa: E402

# name -> (processes, EP size, FSDP)
LAYOUTS = {"1": (1, 1, False), "ep2": (2, 2, False), "fsdp2": (2, 1, True),
           "fsdp2xep2": (4, 2, True)}
STATE = {"parameters": "params", "gradients": "grads", "optimizer": "optimizer"}


def model_config(preset: str, layers: int, ep: int) -> ModelConfig:
    cfg = ModelConfig.preset(preset).replace(num_hidden_layers=layers)
    return ddist.ep_model_config(cfg, ep)


def _sharded_model(cfg: ModelConfig, ep: int, fsdp: bool) -> Transformer:
    """The layout applied as training applies it (EP swap, then FSDP), to a model built on
    the meta device and materialized after the EP swap: no rank ever holds more than its
    EP share of the model (the values are random; memory is the point)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model = ddist.parallelize(model, ep, sync_weights=False)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, cfg.initializer_range)
        for b in model.buffers():
            b.zero_()
    model.init_buffers()
    return ddist.apply_fsdp(model, ep) if fsdp else model


def _first_to_go() -> None:
    """Should memory run out, the kernel's OOM killer takes this benchmark first, not
    whatever else shares the machine (raising one's own score needs no privilege)."""
    try:
        Path("/proc/self/oom_score_adj").write_text("1000")
    except OSError:
        pass


def _worker(cfg: ModelConfig, ep: int, fsdp: bool, batch: int, seq: int) -> dict:
    _first_to_go()
    rank, world = ddist.init_distributed()
    try:
        before = status_kib("VmRSS")
        torch.manual_seed(rank)
        model = _sharded_model(cfg, ep, fsdp).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
        ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1),
                            generator=torch.Generator().manual_seed(rank))
        logits = model(ids[:, :-1]).logits
        F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        ddist.sync_gradients(model)  # FSDP reduce-scattered in backward: the rest
        optimizer.step()
        state = ddist.local_state_bytes(model, optimizer)
        return {**{kind: state[key] for kind, key in STATE.items()},
                "rss_growth": (status_kib("VmHWM") - before) * 1024}
    finally:
        ddist.teardown()


def run_layout(name: str, args: argparse.Namespace) -> dict:
    nproc, ep, fsdp = LAYOUTS[name]
    if fsdp and importlib.util.find_spec("dsmoe.distributed.fsdp") is None:
        raise ImportError("dsmoe.distributed.fsdp (the FSDP engine) is not in this tree")
    cfg = model_config(args.preset, args.layers, ep)
    predicted = plan.make_plan(cfg, nproc, ep=ep, fsdp=fsdp, dtype="fp32", seq_len=args.seq,
                               micro_batch=args.batch)
    # + ~0.5 GiB per process (torch itself), + 15%: other programs' memory may grow meanwhile
    need = 1.15 * nproc * (predicted.device_bytes + 2**29)
    free = status_kib_of("/proc/meminfo", "MemAvailable") * 1024
    if need > free:
        raise MemoryError(f"needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB available")
    ranks = ddist.launch(_worker, nproc, cfg, ep, fsdp, args.batch, args.seq, threads=1)
    measured = max(ranks, key=lambda r: sum(r[k] for k in STATE))
    return {"name": name, "nproc": nproc, "ep": ep, "fsdp": fsdp, "measured": measured,
            "rss_growth": max(r["rss_growth"] for r in ranks),
            "plan": {k: predicted.memory[k] for k in STATE},
            "plan_all": predicted.device_bytes}


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"Per-rank training state after one step, {args.preset} shape with {args.layers} "
        f"layers, fp32, AdamW, {args.batch} x {args.seq} tokens per rank, gloo on CPU; MiB "
        "(the largest rank).",
        "",
        "| layout | processes | params measured / plan | grads measured / plan "
        "| optimizer measured / plan | state measured | state plan | measured / plan "
        "| peak RSS growth | plan + activations |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        m, p = r["measured"], r["plan"]
        label = f"EP {r['ep']}" + (", FSDP" if r["fsdp"] else "")
        state_m, state_p = sum(m[k] for k in STATE), sum(p[k] for k in STATE)
        lines.append(
            f"| {label} | {r['nproc']} | "
            + " | ".join(f"{_mib(m[k])} / {_mib(p[k])}" for k in STATE)
            + f" | {_mib(state_m)} | {_mib(state_p)} | **{state_m / state_p:.3f}** | "
            f"{_mib(r['rss_growth'])} | {_mib(r['plan_all'])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="deepseek-moe-2b")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1, help="sequences per rank")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--layouts", nargs="+", choices=sorted(LAYOUTS), default=list(LAYOUTS))
    args = parser.parse_args()
    rows = []
    for name in args.layouts:
        try:
            rows.append(run_layout(name, args))
        except (ImportError, MemoryError, ValueError) as exc:  # no engine, memory, EP split
            print(f"skipped {name}: {exc}", flush=True)
            continue
        print(f"done: {name}", flush=True)
    print()
    print(markdown(rows, args))


if __name__ == "__main__":
    main()
