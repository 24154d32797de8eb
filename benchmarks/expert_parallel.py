"""Benchmark: expert-parallel training steps on 1, 2 and 4 CPU processes (gloo), with and
without device-limited routing, and ``dsmoe plan``'s predicted traffic beside the measured.

Setup: the ``tiny`` preset (4 layers, 3 MoE layers, D=128, 16 experts of width 96, top-3,
one shared expert), fp32, a fixed global batch of ``--batch x --seq`` random tokens split
over the ranks (``data_shard``), EP size = process count, AdamW. One step = forward,
backward, gradient sync, clip, optimizer step, load all-reduce. Routing rows:
- ``top-3 of 16``: V1 greedy routing (expert-level balance loss);
- ``device-limited, M=1``: V2 device-limited routing, each token to one rank's experts.

Measured: median wall-clock step time over ``--steps`` steps after ``--warmup`` (each step
starts at a barrier, so a step takes as long as its slowest rank); tokens/s = global batch
tokens / step time. Bytes: what each rank sent to other ranks through the MoE all-to-alls
per step (``dsmoe.distributed.comm_bytes``), mean over ranks and steps; payload = hidden
states and their gradients, metadata = counts, expert ids and gate weights.
Predicted: ``dsmoe.plan.a2a_bytes_per_layer`` x MoE layers for the same tokens per rank,
which assumes exchangeable (uniform) routing. A freshly initialised router is close to
that; a trained one is not, so this checks the accounting, not a trained model's traffic.

NOTE: every process runs one intra-op thread (``--threads``): on a shared machine, extra
OpenMP threads per process slowed steps down several-fold. With fewer cores than processes
(4 processes on this 2-core machine) CPU tokens/s measure overhead, not scaling.

Usage:
  python benchmarks/expert_parallel.py            # 2048 tokens/step, 10 timed steps
  python benchmarks/expert_parallel.py --quick    # 512 tokens/step, 3 timed steps
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist

from _train_step import train_step
from dsmoe import distributed as ddist
from dsmoe import plan
from dsmoe.config import ModelConfig
from dsmoe.model import Transformer

ROUTINGS = {
    "greedy": dict(topk_method="greedy", aux_loss_alpha=0.01, seq_aux=False),
    "device_limited": dict(topk_method="device_limited", max_devices_per_token=1,
                           aux_loss_alpha=0.003, comm_balance_alpha=0.02, seq_aux=False),
}


def model_config(routing: str, nproc: int) -> ModelConfig:
    base = ModelConfig.preset("tiny")
    if nproc == 1 and routing == "device_limited":
        raise ValueError("device-limited routing needs more than one rank")
    return ddist.ep_model_config(base.replace(n_devices=nproc, **ROUTINGS[routing]), nproc)


def _worker(cfg: ModelConfig, batch: int, seq: int, steps: int, warmup: int) -> dict:
    rank, world = ddist.init_distributed()
    try:
        torch.manual_seed(0)
        model = ddist.parallelize(Transformer(cfg), world).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
        gen = torch.Generator().manual_seed(1)
        times, payload, metadata, reach = [], [], [], 0
        for step in range(warmup + steps):
            ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=gen)
            ids = ddist.data_shard(ids, rank, world)
            ddist.comm_bytes(model, reset=True)
            ddist.barrier()
            started = time.perf_counter()
            train_step(model, optimizer, ids)
            ddist.barrier()
            if step >= warmup:
                times.append(time.perf_counter() - started)
                sent = ddist.comm_bytes(model)
                payload.append(sent.get("payload", 0))
                metadata.append(sent.get("metadata", 0))
                for layer in ddist.ep_layers(model):
                    reach = max(reach, int(layer.dispatcher.last_ranks_per_token.max()))
        summary = torch.tensor([statistics.mean(payload), statistics.mean(metadata), reach],
                               dtype=torch.float64)
        if world > 1:
            dist.all_reduce(summary[:2])
            summary[:2] /= world
            dist.all_reduce(summary[2:], op=dist.ReduceOp.MAX)
        return {"step_s": statistics.median(times), "payload": float(summary[0]),
                "metadata": float(summary[1]), "max_ranks_per_token": int(summary[2])}
    finally:
        ddist.teardown()


def run_case(nproc: int, routing: str, args: argparse.Namespace) -> dict:
    cfg = model_config(routing, nproc)
    result = ddist.launch(_worker, nproc, cfg, args.batch, args.seq, args.steps, args.warmup,
                          threads=args.threads)[0]
    tokens = args.batch * args.seq
    predicted = plan.a2a_bytes_per_layer(cfg, tokens // nproc, nproc, bytes_per_elem=4)
    n_moe = len(cfg.moe_layer_indices)
    M = cfg.max_devices if cfg.topk_method == "device_limited" else None
    return {"nproc": nproc, "routing": f"device-limited, M={M}" if M else
            f"top-{cfg.num_experts_per_tok} of {cfg.n_routed_experts}",
            "tokens_per_s": tokens / result["step_s"], **result,
            "plan_payload": n_moe * predicted["payload"],
            "plan_metadata": n_moe * predicted["metadata"]}


def _kib(n: float) -> str:
    return f"{n / 1024:,.1f}"


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    base = next(r["tokens_per_s"] for r in rows if r["nproc"] == 1)
    lines = [
        f"Expert-parallel training steps, tiny preset, {args.batch * args.seq:,} tokens per "
        f"step (global), fp32, gloo on {os.cpu_count()} CPU core(s), {args.threads} thread(s) "
        "per process; bytes are per rank per step, sent to other ranks (forward + backward, "
        "3 MoE layers).",
        "",
        "| processes (= EP) | routing | tokens/s | vs 1 process | max ranks per token "
        "| payload KiB measured | payload KiB plan | measured / plan "
        "| metadata KiB measured | metadata KiB plan |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = f"{r['payload'] / r['plan_payload']:.3f}" if r["plan_payload"] else "-"
        lines.append(
            f"| {r['nproc']} | {r['routing']} | {r['tokens_per_s']:,.0f} | "
            f"{r['tokens_per_s'] / base:.2f}x | {r['max_ranks_per_token']} | "
            f"{_kib(r['payload'])} | {_kib(r['plan_payload'])} | {ratio} | "
            f"{_kib(r['metadata'])} | {_kib(r['plan_metadata'])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    parser.add_argument("--quick", action="store_true", help="4 x 128 tokens, 3 steps")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.steps, args.warmup = 4, 3, 1
    rows = []
    for nproc in args.procs:
        for routing in ROUTINGS:
            if nproc == 1 and routing == "device_limited":
                continue
            rows.append(run_case(nproc, routing, args))
            print(f"done: {nproc} process(es), {rows[-1]['routing']}", flush=True)
    print()
    print(markdown(rows, args))


if __name__ == "__main__":
    main()
