"""report.md and its plots: the loss curves and the expert load of a finished run."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dsmoe.io import atomic_path, atomic_write_text  # noqa: E402
from dsmoe.train.metrics import MetricsLog  # noqa: E402

if TYPE_CHECKING:
    from dsmoe.train.config import TrainConfig
    from dsmoe.train.loop import TrainResult


def plot_loss(records: list[dict], path: Path, title: str) -> None:
    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [r["train_loss"] for r in records], label="train")
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_expert_load(load: list[list[int]], path: Path, title: str) -> None:
    """Heatmap: MoE layer x expert, share of the layer's assignments (1/E = balanced)."""
    import numpy as np

    data = np.asarray(load, dtype=float)
    data = data / data.sum(axis=1, keepdims=True).clip(min=1)
    fig, ax = plt.subplots(figsize=(max(4, data.shape[1] * 0.3), 1 + data.shape[0] * 0.5))
    image = ax.imshow(data, aspect="auto", cmap="viridis")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="share of tokens")
    _save(fig, path)


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def write_report(out: Path, cfg: "TrainConfig", result: "TrainResult") -> None:
    records = MetricsLog(out / "metrics.jsonl").read()
    routing = "dense" if cfg.dense else cfg.routing
    lines = [f"# Training report: {out.name}", "",
             f"- preset `{cfg.preset}`, routing `{routing}`, {result.step} steps of "
             f"{cfg.batch_size}x{cfg.seq_len} tokens (grad accumulation {cfg.grad_accum})",
             f"- final train loss **{result.train_loss:.4f}**, validation loss "
             f"**{result.val_loss:.4f}** nats/token",
             f"- unigram entropy of the validation data: {result.unigram_entropy:.4f} nats/token",
             f"- throughput: {result.tokens_per_s:.0f} tokens/s", ""]
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
