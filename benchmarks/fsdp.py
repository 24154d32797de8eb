"""Benchmark: training-step throughput and per-rank state of the FSDP2 x EP layouts (gloo, CPU).

Layouts (N processes, EP size E): one process; ``FSDP 2`` (N=2, E=1: everything sharded
over 2 ranks); ``EP 2`` (N=2, E=2, no FSDP: experts split, the rest replicated);
``EP 2 + FSDP`` (N=2, E=2: the non-expert weights sharded too); ``2x2`` (N=4, E=2, FSDP:
each expert block sharded over the 2 ranks that hold it).

Setup: the ``tiny`` preset with ``n_devices=2`` (the same model in every layout), fp32,
AdamW, a fixed global batch of ``--batch x --seq`` random tokens split over the ranks.
One step = forward, backward, gradient reduction, clip, optimizer step, load all-reduce.
Measured: median step time over ``--steps`` steps after ``--warmup`` (each starts at a
barrier); tokens/s = global tokens / step time, shown as a ratio to one process; per-rank
bytes of parameters + gradients + optimizer state (``dsmoe.distributed.local_state_bytes``,
the largest rank), as a ratio to one process.

NOTE: one intra-op thread per process. On a machine with fewer cores than processes the
tokens/s ratios measure communication overhead, not scaling.

Usage:
  python benchmarks/fsdp.py            # 16 x 128 tokens per step, 5 timed steps
  python benchmarks/fsdp.py --quick    # 4 x 128 tokens, 2 timed steps
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from _train_step import train_step
from dsmoe import distributed as ddist
from dsmoe.config import ModelConfig
from dsmoe.model import Transformer

LAYOUTS = (("1 process", 1, 1, False), ("FSDP 2", 2, 1, True), ("EP 2", 2, 2, False),
           ("EP 2 + FSDP", 2, 2, True), ("2x2 (EP 2 x FSDP 2)", 4, 2, True))


def _worker(cfg: ModelConfig, ep: int, fsdp: bool, args: argparse.Namespace) -> dict:
    rank, world = ddist.init_distributed()
    try:
        torch.manual_seed(0)
        model = ddist.parallelize(Transformer(cfg), ep).train()
        if fsdp:
            model = ddist.apply_fsdp(model, ep)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
        gen = torch.Generator().manual_seed(1)
        times = []
        for step in range(args.warmup + args.steps):
            ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=gen)
            ddist.barrier()
            started = time.perf_counter()
            train_step(model, optimizer, ddist.data_shard(ids, rank, world), keep_grads=True)
            ddist.barrier()
            if step >= args.warmup:
                times.append(time.perf_counter() - started)
        return {"step_s": statistics.median(times),
                "bytes": ddist.local_state_bytes(model, optimizer)["total"]}
    finally:
        ddist.teardown()


def run(args: argparse.Namespace) -> list[dict]:
    cfg = ModelConfig.preset("tiny").replace(n_devices=2)
    rows = []
    for name, nproc, ep, fsdp in LAYOUTS:
        ranks = ddist.launch(_worker, nproc, cfg, ep, fsdp, args, threads=args.threads)
        rows.append({"layout": name, "nproc": nproc, "ep": ep, "fsdp": fsdp,
                     "tokens_per_s": args.batch * args.seq / ranks[0]["step_s"],
                     "bytes": max(r["bytes"] for r in ranks)})
        print(f"done: {name}", flush=True)
    return rows


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    base = rows[0]
    lines = [f"Training steps by layout, tiny preset, {args.batch * args.seq:,} tokens per "
             f"step (global), fp32, gloo on {os.cpu_count()} CPU core(s), {args.threads} "
             "thread(s) per process; state = parameters + gradients + AdamW moments of the "
             "largest rank.", "",
             "| layout | processes | EP | FSDP | tokens/s | vs 1 process | state per rank "
             "MiB | vs 1 process |", "|---|---:|---:|---|---:|---:|---:|---:|"]
    return "\n".join(lines + [_row(r, base) for r in rows])


def _row(r: dict, base: dict) -> str:
    return (f"| {r['layout']} | {r['nproc']} | {r['ep']} | {'yes' if r['fsdp'] else 'no'} | "
            f"{r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f}x | "
            f"{r['bytes'] / 2**20:,.2f} | {r['bytes'] / base['bytes']:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag, default, what in (("--batch", 16, "rows per step (global)"),
                                ("--seq", 128, "tokens per row"),
                                ("--steps", 5, "timed steps"), ("--warmup", 2, "untimed steps"),
                                ("--threads", 1, "intra-op threads per process")):
        parser.add_argument(flag, type=int, default=default, help=what)
    parser.add_argument("--quick", action="store_true", help="4 x 128 tokens, 2 timed steps")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.steps, args.warmup = 4, 2, 1
    print(markdown(run(args), args))


if __name__ == "__main__":
    main()
