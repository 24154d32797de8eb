"""Matplotlib figures shared by training reports and ``dsmoe analyze`` (headless, atomic)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from dsmoe.io import atomic_path  # noqa: E402


def save_figure(fig: plt.Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_expert_load(load: list[list[int]], path: Path, title: str) -> None:
    """Heatmap: MoE layer x expert, share of the layer's assignments (1/E = balanced)."""
    data = np.asarray(load, dtype=float)
    data = data / data.sum(axis=1, keepdims=True).clip(min=1)
    fig, ax = plt.subplots(figsize=(max(4, data.shape[1] * 0.3), 1 + data.shape[0] * 0.5))
    image = ax.imshow(data, aspect="auto", cmap="viridis")
    # One tick per row / column, labelled by its integer index: matplotlib's automatic ticks
    # would label half-rows (-0.5, 0.0, 0.5) on a two-layer map.
    ax.set_yticks(_integer_ticks(data.shape[0], 16))
    ax.set_xticks(_integer_ticks(data.shape[1], 32))
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="share of tokens")
    save_figure(fig, path)


def _integer_ticks(n: int, most: int) -> list[int]:
    """0 .. n-1, every k-th so that at most ``most`` ticks are shown."""
    return list(range(0, n, -(-n // most) if n > most else 1))


def plot_curves(curves: dict[str, tuple[list[float], list[float]]], path: Path, *, title: str,
                xlabel: str, ylabel: str, markers: str = "-") -> None:
    """One line per name: name -> (xs, ys)."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, (xs, ys) in curves.items():
        ax.plot(xs, ys, markers, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    save_figure(fig, path)
