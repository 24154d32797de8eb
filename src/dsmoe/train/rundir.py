"""A run directory (``--out`` of ``dsmoe train`` / ``dsmoe finetune``) while a run owns it.

Design choices:
- One live run per directory: an exclusive ``flock`` on ``DIR/.dsmoe.lock``, which the
  kernel drops when its process dies (even by SIGKILL), so a killed run never leaves a
  stale lock behind. The file holds the owner's pid, for the error a second run prints.
- Temp files are only ever written beside their target under a name that starts with
  "." and carries ".tmp" (``io.atomic_path``: ``.NAME.XXXX.tmp``; directory writers:
  ``.NAME.tmp-XXXX``). Once the lock is held no other run can be writing them, so any
  such name in the run's directories is a kill's leftover and is removed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
from pathlib import Path
from typing import Iterator

LOCK_NAME = ".dsmoe.lock"
_TEMP = re.compile(r"^\..+(\.tmp|\.tmp-.*)$")
# where a run writes through temp files
_SUBDIRS = ("", "checkpoints", "plots", "tokenizer", "model", "adapter")


def check_out(out: Path) -> None:
    """``--out`` must be a directory or not exist yet."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is an existing file, not a run directory; "
                         "choose another --out")


@contextlib.contextmanager
def locked(out: Path) -> Iterator[Path]:
    """Create ``out`` if needed, own it for the block (or fail naming the owner's pid),
    and clear the temp files a killed run left. A full disk inside the block becomes a
    one-line ``ValueError`` naming the file."""
    check_out(out)
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            owner = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise ValueError(f"{out} is in use by another dsmoe run (pid {owner}); wait for "
                             "it to finish or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        remove_stale_temp(out)
        try:
            yield out
        except OSError as exc:  # every write is atomic: a full disk leaves the old files
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise ValueError(f"no space left on the device writing {exc.filename or out}; "
                             "free some and continue with --resume (the last checkpoint "
                             "is kept)") from None
    finally:
        os.close(fd)  # closing drops the lock


def remove_stale_temp(out: Path) -> list[Path]:
    """Delete the temp files and directories a killed run left in ``out`` (call with the
    lock held); returns what was removed."""
    removed = []
    for sub in _SUBDIRS:
        folder = out / sub if sub else out
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if not _TEMP.match(entry.name):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed
