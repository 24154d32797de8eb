"""report.md and its plots: the loss curves and the expert load of a finished run."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from dsmoe.io import atomic_write_text
from dsmoe.plots import plot_curves, plot_expert_load
from dsmoe.train.metrics import MetricsLog

if TYPE_CHECKING:
    from dsmoe.train.config import TrainConfig
    from dsmoe.train.loop import TrainResult


def plot_loss(records: list[dict], path: Path, title: str) -> None:
    curves = {"train": ([r["step"] for r in records], [r["train_loss"] for r in records])}
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if val:
        curves["validation"] = ([s for s, _ in val], [v for _, v in val])
    plot_curves(curves, path, title=title, xlabel="step", ylabel="cross-entropy (nats/token)")


def fmt(value: float | None, spec: str) -> str:
    """A number of the report, or "n/a" when the run has none (e.g. its log was deleted)."""
    return "n/a" if value is None else format(value, spec)


def write_report(out: Path, cfg: "TrainConfig", result: "TrainResult") -> None:
    records = MetricsLog(out / "metrics.jsonl").read()
    routing = "dense" if cfg.dense else cfg.routing
    lines = [f"# Training report: {out.name}", "",
             f"- preset `{cfg.preset}`, routing `{routing}`, {result.step} steps of "
             f"{cfg.batch_size}x{cfg.seq_len} tokens (grad accumulation {cfg.grad_accum})",
             f"- final train loss **{fmt(result.train_loss, '.4f')}**, validation loss "
             f"**{fmt(result.val_loss, '.4f')}** nats/token",
             f"- unigram entropy of the validation data: "
             f"{fmt(result.unigram_entropy, '.4f')} nats/token",
             f"- throughput: {fmt(result.tokens_per_s, '.0f')} tokens/s", ""]
    if records:
        plot_loss(records, out / "plots" / "loss.png", f"{cfg.preset} / {routing}")
        lines += ["![loss](plots/loss.png)", ""]
        last = records[-1]
        if last.get("expert_load"):
            plot_expert_load(last["expert_load"], out / "plots" / "expert_load.png",
                             f"expert load, steps up to {last['step']}")
            lines += [f"Expert load max/mean per MoE layer (last interval): "
                      + ", ".join(f"{v:.2f}" for v in last["load_max_mean_per_layer"]), "",
                      "![expert load](plots/expert_load.png)", ""]
    if result.samples:
        lines += ["## Samples", ""] + [f"```\n{s}\n```" for s in result.samples]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
