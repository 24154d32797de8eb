"""Atomic file writes: a crash or SIGKILL leaves either the old file or the new one.

The temporary file is ``.NAME.<pid>.<random>.tmp`` beside ``NAME``; one that a killed
process left (its pid is gone) is removed the next time ``NAME`` is written. The result
gets the mode a plain ``open`` would give (0644 under umask 022), not the temporary
file's 0600.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it over ``path``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_temps(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp",
                               dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        fsync_file(tmp_path)
        os.chmod(tmp_path, umask_mode(0o666))
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp_path)`` and move the result into place atomically."""
    with atomic_path(path) as tmp:
        write(tmp)


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file's value; ValueError naming the file when it is not valid UTF-8 JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc


def umask_mode(mode: int) -> int:
    """``mode`` with the process umask applied, as ``open``/``mkdir`` would create it."""
    umask = os.umask(0o022)  # the only portable way to read it is to set it
    os.umask(umask)
    return mode & ~umask


def fsync_file(path: str | os.PathLike) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def fsync_directory(path: str | os.PathLike) -> None:
    """Persist renames in ``path`` (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _clean_stale_temps(target: Path) -> None:
    """Remove ``target``'s temporary files whose writer process no longer exists."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(\d+)\.[^.]+\.tmp$")
    for entry in os.scandir(target.parent):
        match = pattern.match(entry.name)
        if match and not pid_alive(int(match[1])) and entry.is_file(follow_symlinks=False):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (ours counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


class WriteError(RuntimeError):
    """A model file or directory could not be written for lack of space (or a read-only
    target); the message names the target, and nothing of the write is left behind."""


_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)
_SPACE_TEXT = ("No space left", "StorageFull", "code: 28")  # safetensors' Rust io::Error text


@contextlib.contextmanager
def disk_errors(target: str | os.PathLike, need_bytes: Callable[[], int]) -> Iterator[None]:
    """Turn disk full during a write into a ``WriteError`` naming ``target`` and the space
    needed; the caller's cleanup (temporary file or directory) still runs."""
    try:
        yield
    except Exception as exc:
        code = getattr(exc, "errno", None)
        if code not in _SPACE_ERRNOS and not any(t in str(exc) for t in _SPACE_TEXT):
            raise
        reason = os.strerror(code) if code in _SPACE_ERRNOS else os.strerror(errno.ENOSPC)
        target = Path(target)
        raise WriteError(f"cannot write {target}: {reason} (it needs {need_bytes() / 2**20:.1f}"
                         f" MiB or more in {target.parent}); nothing was changed") from None
