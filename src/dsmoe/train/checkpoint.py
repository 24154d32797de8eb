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
- A fully sharded run (``--fsdp``) writes a directory ``step_XXXXXXXX/`` instead: its
  model and optimizer tensors through torch.distributed.checkpoint (every rank its own
  shards, ``distributed.sharded_checkpoint``) and the rest in ``trainer.pt`` as above.
  All ranks write into ``.step_XXXXXXXX.tmp-dcp`` and rank 0 renames it into place when
  every rank is done, so a kill leaves no half-written checkpoint. Both kinds resume
  in any layout. DCP's ``.metadata`` is a pickle: only the run's own directories (inside
  its locked ``--out``) are ever read, through a reader that allows DCP's classes only.
"""

from __future__ import annotations

import pickle
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from dsmoe import distributed as ddist
from dsmoe.checkpoint.directory import swap_into_place
from dsmoe.io import atomic_write, fsync_directory

_NAME = re.compile(r"^step_(\d{8})(\.pt)?$")  # a file, or a sharded directory
_REQUIRED = ("step", "rng", "interval", "scheduler")
TRAINER = "trainer.pt"  # a sharded checkpoint's non-tensor part


def checkpoint_dir(out: Path) -> Path:
    return out / "checkpoints"


def list_checkpoints(out: Path) -> list[Path]:
    """Checkpoints in ``out``, oldest first."""
    folder = checkpoint_dir(out)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _NAME.match(p.name)
             and p.is_dir() != p.name.endswith(".pt")]
    return sorted(found, key=lambda p: (int(_NAME.match(p.name).group(1)), p.is_dir()))


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
    _prune(out, keep)
    return path


def _prune(out: Path, keep: int) -> None:
    for old in list_checkpoints(out)[:-keep]:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def save_sharded(out: Path, step: int, payload: dict[str, Any],
                 write_tensors: Callable[[Path], dict[str, Any]], keep: int) -> Path:
    """A sharded checkpoint (module docstring); a collective. ``write_tensors(dir)``
    writes this rank's shards into ``dir`` and returns what ``trainer.pt`` adds (e.g. the
    optimizer's parameter groups); rank 0 writes ``payload`` and moves it into place."""
    final = checkpoint_dir(out) / f"step_{step:08d}"
    tmp = final.with_name(f".{final.name}.tmp-dcp")
    main = ddist.is_main_process()
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    ddist.barrier()
    payload = {**payload, **write_tensors(tmp)}
    if main:
        try:
            torch.save(payload, tmp / TRAINER)
            fsync_directory(tmp)
            swap_into_place(tmp, final)
        except (OSError, RuntimeError) as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ValueError(f"cannot write checkpoint {final} ({exc}); is the disk full? "
                             "The previous checkpoints are kept") from None
        _prune(out, keep)
    ddist.barrier()
    return final


def read_checkpoint(path: Path) -> dict[str, Any]:
    """One checkpoint file, loaded without running code; ``ValueError`` (one line, naming
    the file) when it is truncated, foreign or asks for objects a checkpoint never holds.
    A sharded checkpoint's ``trainer.pt`` comes back with ``sharded``: its directory."""
    sharded = path.is_dir()
    try:
        state = torch.load(path / TRAINER if sharded else path, map_location="cpu",
                           weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError,
            TypeError, AttributeError, KeyError, IndexError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"{path}: not a readable dsmoe checkpoint ({first})") from None
    needed = _REQUIRED + (("param_groups",) if sharded else ("optimizer",))
    missing = [k for k in needed if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"{path}: not a dsmoe training checkpoint (no {', '.join(missing)})")
    if not isinstance(state["step"], int) or state["step"] < 0:
        raise ValueError(f"{path}: step must be a non-negative integer, got {state['step']!r}")
    if sharded:
        from dsmoe.distributed.sharded_checkpoint import SafeReader

        SafeReader(str(path)).read_metadata()  # ValueError naming it, never runs code
        state["sharded"] = str(path)
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


def unshard_checkpoint(state: dict[str, Any]) -> dict[str, Any]:
    """A sharded checkpoint in the form a whole one has (``model``: the single-process
    state dict, ``optimizer``: index-keyed, as ``full_optimizer_state``), for a run
    resumed without FSDP; every rank reads the whole tensors. Others are returned as is."""
    if "sharded" not in state:
        return state
    from dsmoe.distributed.sharded_checkpoint import read_full

    model, optimizer = read_full(Path(state["sharded"]), state["param_groups"])
    state = {k: v for k, v in state.items() if k not in ("sharded", "param_groups")}
    return {**state, "model": model, "optimizer": optimizer}
