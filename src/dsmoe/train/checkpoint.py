"""Training checkpoints: everything needed to continue a run bit for bit.

A checkpoint holds the model (router biases included: they are persistent buffers), the
optimizer and scheduler, every RNG state, the step (the data position: batches are a pure
function of (seed, step)), and both configs. Files are written atomically and only the
newest ``keep`` are kept, so a SIGKILL at any moment leaves the last good one intact.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dsmoe.io import atomic_write

_NAME = re.compile(r"^step_(\d{8})\.pt$")


def checkpoint_dir(out: Path) -> Path:
    return out / "checkpoints"


def list_checkpoints(out: Path) -> list[Path]:
    """Checkpoints in ``out``, oldest first."""
    folder = checkpoint_dir(out)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
            "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save_checkpoint(out: Path, step: int, payload: dict[str, Any], keep: int) -> Path:
    path = checkpoint_dir(out) / f"step_{step:08d}.pt"
    atomic_write(path, lambda tmp: torch.save(payload, tmp))
    for old in list_checkpoints(out)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_latest(out: Path) -> dict[str, Any] | None:
    """The newest readable checkpoint (a corrupt newest one falls back to the one before)."""
    for path in reversed(list_checkpoints(out)):
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except (RuntimeError, EOFError, OSError) as exc:  # pragma: no cover - rare
            print(f"warning: skipping unreadable checkpoint {path}: {exc}")
    return None
