"""V1 vs V2 vs V3 routing vs the dense equivalent: the demo's training run, equal steps.

Trains the ``tiny`` preset on the built-in corpus (Python's standard library) once per
variant with identical data, steps and seed, then plots the loss curves into one PNG and
prints a table: final train/validation loss, expert load max/mean, dropped fraction and
tokens/s. Runs go two at a time, one thread each (2-core machine).

    python benchmarks/routing_comparison.py [--steps 300] [--out runs/routing] [--png docs/routing_comparison.png]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dsmoe.plots import plot_curves

VARIANTS = {"v1": ["--routing", "v1"], "v2": ["--routing", "v2"], "v3": ["--routing", "v3"],
            "dense": ["--dense"]}


def run_variant(name: str, args: argparse.Namespace) -> list[dict]:
    out = Path(args.out) / name
    command = [sys.executable, "-m", "dsmoe", "train", "--out", str(out), "--resume", "--quiet",
               "--max-steps", str(args.steps), "--log-every", str(args.log_every),
               "--eval-every", str(args.eval_every), *VARIANTS[name]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command, check=True, env=env)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--out", default="runs/routing")
    parser.add_argument("--png", default="docs/routing_comparison.png")
    parser.add_argument("--parallel", type=int, default=2)
    args = parser.parse_args()
    # Warm the tokenizer and token caches once so parallel runs do not race to build them.
    run_variant("v1", argparse.Namespace(**{**vars(args), "steps": 1,
                                            "out": str(Path(args.out) / "_warm")}))
    with ThreadPoolExecutor(args.parallel) as pool:
        records = dict(zip(VARIANTS, pool.map(lambda n: run_variant(n, args), VARIANTS)))
    curves = {}
    for name, recs in records.items():
        val = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
        curves[f"{name} train"] = ([r["step"] for r in recs], [r["train_loss"] for r in recs])
        curves[f"{name} val"] = ([s for s, _ in val], [v for _, v in val])
    plot_curves(curves, Path(args.png), title=f"tiny preset, {args.steps} steps",
                xlabel="step", ylabel="cross-entropy (nats/token)")
    print("| variant | train loss | val loss | load max/mean | dropped | tokens/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, recs in records.items():
        last = recs[-1]
        val = next(r["val_loss"] for r in reversed(recs) if "val_loss" in r)
        mean_tps = sum(r["tokens_per_s"] for r in recs) / len(recs)
        load = f"{last['load_max_mean']:.2f}" if last.get("expert_load") else "-"
        print(f"| {name} | {last['train_loss']:.3f} | {val:.3f} | {load} | "
              f"{last['dropped_fraction']:.1%} | {mean_tps:,.0f} |")
    print(f"\nloss curves: {args.png}")


if __name__ == "__main__":
    main()
