"""Training checkpoints: everything needed to continue a run bit for bit.

A checkpoint holds the model (router biases included: they are persistent buffers), the
optimizer and scheduler, every RNG state, the step (the data position: batches are a pure
function of (seed, step)), and both configs. Files are written atomically and only the
newest ``keep`` are kept, so a SIGKILL at any moment leaves the last good one intact.

Design choices:
- Nothing is unpickled: a checkpoint holds only tensors, numbers, strings, None and
  containers of them (the numpy RNG state is stored as a tensor, not an ndarray), so it
  loads with ``torch.load(weights_only=True)`` and no extra allowed globals. A crafted
  ``step_*.pt`` that asks for any other object is rejected before it can run.
- ``--resume`` with checkpoints on disk but none readable refuses: restarting from step 0
  would silently reset the run and its metrics history.
"""

from __future__ import annotations

import pickle
import random
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dsmoe.io import atomic_write

_NAME = re.compile(r"^step_(\d{8})\.pt$")
_REQUIRED = ("step", "rng", "interval", "optimizer", "scheduler")


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
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)),  # [624]
                   "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)}
    return {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(out: Path, step: int, payload: dict[str, Any], keep: int) -> Path:
    path = checkpoint_dir(out) / f"step_{step:08d}.pt"
    try:  # the temp file is removed on failure: a full disk leaves the last good one only
        atomic_write(path, lambda tmp: torch.save(payload, tmp))
    except (OSError, RuntimeError) as exc:  # torch's writer reports ENOSPC as RuntimeError
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else \
            (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
        raise ValueError(f"cannot write checkpoint {path} ({reason}); is the disk full? "
                         "The previous checkpoints are kept") from None
    for old in list_checkpoints(out)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def read_checkpoint(path: Path) -> dict[str, Any]:
    """One checkpoint file, loaded without running code; ``ValueError`` (one line, naming
    the file) when it is truncated, foreign or asks for objects a checkpoint never holds."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError,
            TypeError, AttributeError, KeyError, IndexError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"{path}: not a readable dsmoe checkpoint ({first})") from None
    missing = [k for k in _REQUIRED if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"{path}: not a dsmoe training checkpoint (no {', '.join(missing)})")
    if not isinstance(state["step"], int) or state["step"] < 0:
        raise ValueError(f"{path}: step must be a non-negative integer, got {state['step']!r}")
    return state


def load_latest(out: Path) -> dict[str, Any] | None:
    """The newest readable checkpoint (a corrupt newest one falls back to the one before);
    None when there is none; ``ValueError`` when there are some and none can be read."""
    found = list_checkpoints(out)
    for path in reversed(found):
        try:
            return read_checkpoint(path)
        except ValueError as exc:
            print(f"warning: skipping {exc}", file=sys.stderr)
    if found:
        raise ValueError(f"--resume: none of the {len(found)} checkpoint(s) in "
                         f"{checkpoint_dir(out)} can be read (see the warnings above); "
                         "refusing to restart the run from step 0")
    return None
