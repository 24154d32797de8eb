"""The one writer of model directories (HF float checkpoints and quantized ones).

A model directory is ``config.json``, ``model.safetensors`` or shards
``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``, and the tokenizer
files. ``DirectoryWriter`` takes tensors one at a time (so a model is converted and written
layer by layer), cuts them into shards of at most ``max_shard_size`` bytes, and at
``finish`` writes the index, ``config.json`` and the tokenizer files.

Design choices:
- Atomic as a whole: everything is written into ``.NAME.tmp-<pid>-<random>`` beside the
  target, fsynced, and swapped in with one ``renameat2(RENAME_EXCHANGE)`` (an existing
  target) or ``rename`` (a new or empty one). A kill at any point leaves the target holding
  either the old model or the new one, never a mix of the two (a new config with old
  weights no longer loads; new weights with an old tokenizer load and are silently wrong).
  Where the exchange is unavailable (not Linux, or a filesystem without it) the old
  directory is renamed aside first and the new one renamed in; a kill between those two
  renames leaves the old model at ``.NAME.old-<pid>-<random>``, which the next save puts
  back.
- Files dsmoe did not write survive: the old model's files (its config.json, the weight
  files its index lists or model.safetensors, its tokenizer files) are replaced as a
  whole; any other file in the target is hard-linked into the new directory before the
  swap (never copied, never deleted). A foreign file whose name the new model uses, a
  foreign subdirectory, or a config.json that is not a model's refuses the save with an
  error naming it, before anything is written.
- Leftovers of a killed save (temporary directories whose process is gone) are removed by
  the next save to the same target.
- ``config.json`` never holds ``"auto_map": null`` (``config_json``): it makes transformers'
  ``AutoConfig``/``AutoTokenizer`` raise ``TypeError`` (and llama.cpp's converter with
  them). Other nulls are values transformers reads (``"q_lora_rank": null``) and stay.
- Files get the modes a plain ``open``/``mkdir`` would (0644/0755 under umask 022), not the
  0600/0700 of temporary files; an existing target keeps its directory mode.
- Disk full (or any write error) removes the temporary directory and says how much space
  the save needed and where.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import os
import re
import secrets
import shutil
import stat
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch

from dsmoe.config import ModelConfig
from dsmoe.io import disk_errors, fsync_directory, fsync_file, pid_alive, umask_mode

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")
SHARD_NAME = "model-{index:05d}-of-{count:05d}.safetensors"
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[0-9a-f]+$")
_LEGACY_TEMP = re.compile(r"^\.(?P<name>.+)\.tmp-[A-Za-z0-9_]{8}$")  # mkdtemp's, before pids

SaveFn = Callable[[dict[str, torch.Tensor], Path, dict[str, str]], None]


class DirectoryWriter:
    """Stream tensors into shards of a new model directory; ``finish`` swaps it in.

    Use as a context manager: leaving the block with an exception removes everything
    written so far and leaves the target as it was."""

    def __init__(self, directory: str | os.PathLike, *, save: SaveFn,
                 max_shard_size: int, metadata: Mapping[str, str] | None = None) -> None:
        if max_shard_size < 1:
            raise ValueError(f"max_shard_size must be a positive number of bytes, got "
                             f"{max_shard_size}")
        self.directory = _resolve(Path(directory))
        _check_config(self.directory)
        self.foreign = foreign_files(self.directory, model_files(self.directory))
        self._save, self._metadata = save, dict(metadata or {"format": "pt"})
        self.max_shard_size = max_shard_size
        clean_leftovers(self.directory)
        self.directory.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = _new_temp(self.directory, "tmp")
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self._total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_size:
            self._flush()
        self._pending[name] = tensor.detach().to("cpu").contiguous()
        self._pending_bytes += size
        self._total += size

    def _flush(self) -> None:
        file = self.tmp / f"shard-{len(self._shards):05d}.safetensors"
        with disk_errors(self.directory, lambda: self._total):
            self._save(self._pending, file, self._metadata)
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def finish(self, config: Mapping[str, Any],
               tokenizer_files: Iterable[Path] = ()) -> None:
        """Write the index (when sharded), config.json and the tokenizer files, then swap
        the directory into place."""
        if self._pending or not self._shards:
            self._flush()
        count = len(self._shards)
        names = ([WEIGHTS_NAME] if count == 1 else
                 [SHARD_NAME.format(index=i + 1, count=count) for i in range(count)])
        for i, name in enumerate(names):
            os.replace(self.tmp / f"shard-{i:05d}.safetensors", self.tmp / name)
        with disk_errors(self.directory, lambda: self._total):
            if count > 1:
                weight_map = {t: names[i] for i, shard in enumerate(self._shards) for t in shard}
                self._write_json(INDEX_NAME, {"metadata": {"total_size": self._total},
                                              "weight_map": dict(sorted(weight_map.items()))})
            self._write_json(CONFIG_NAME, config)
            for source in tokenizer_files:
                shutil.copyfile(source, self.tmp / source.name)
        install(self.tmp, self.directory, self.foreign)

    def _write_json(self, name: str, data: Mapping[str, Any]) -> None:
        (self.tmp / name).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")

    def abort(self) -> None:
        _remove_tree(self.tmp)

    def __enter__(self) -> "DirectoryWriter":
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.abort()  # after finish the temporary path no longer exists


# Keys transformers reads as containers when present (``"AutoConfig" in config["auto_map"]``):
# a null there raises TypeError in AutoConfig/AutoTokenizer, while a missing key means none.
# Every other null is a value and is written as it is: V2-Lite's "q_lora_rank": null means
# no query compression, where a missing key means transformers' default of 1536.
_NO_NULL = ("auto_map",)


def config_json(config: ModelConfig, **extra: Any) -> dict[str, Any]:
    """``config.json`` of a model: its HF dict plus ``extra``, without nulls that
    transformers cannot read (``_NO_NULL``)."""
    data = {**config.to_hf(), **extra}
    return {k: v for k, v in data.items() if not (v is None and k in _NO_NULL)}


# --- what the target holds ------------------------------------------------------------------
def model_files(directory: Path) -> set[str]:
    """The files of the model in ``directory``: its config, weights, index and tokenizer.
    Empty when ``directory`` holds no model (no config.json)."""
    if not (directory / CONFIG_NAME).is_file():
        return set()
    files = {CONFIG_NAME, *(n for n in TOKENIZER_FILES if (directory / n).is_file())}
    if (directory / WEIGHTS_NAME).is_file():
        files.add(WEIGHTS_NAME)
    index = directory / INDEX_NAME
    if index.is_file():
        files.add(INDEX_NAME)
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files.update(f for f in weight_map.values()
                         if isinstance(f, str) and "/" not in f and (directory / f).is_file())
        except (OSError, ValueError, KeyError, TypeError):
            pass  # an unreadable index lists nothing: the shards count as foreign and stay
    return files


def foreign_files(directory: Path, owned: set[str]) -> list[str]:
    """Regular files in ``directory`` outside ``owned`` (they will survive the save).
    Refuses subdirectories, which a save cannot carry over."""
    if not directory.exists():
        return []
    if not directory.is_dir():
        raise NotADirectoryError(f"{directory} exists and is not a directory")
    foreign, refused = [], []
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        if entry.name in owned:
            continue
        if entry.is_file(follow_symlinks=False):
            foreign.append(entry.name)
        else:
            refused.append(entry.name)
    if refused:
        raise ValueError(f"{directory} holds {', '.join(refused[:5])}, which dsmoe did not "
                         "write and cannot keep when it replaces the directory; move it "
                         "away or choose another directory")
    return foreign


def _check_config(directory: Path) -> None:
    config = directory / CONFIG_NAME
    if config.exists() and not _is_model_config(config):
        raise ValueError(f"{directory} is not a model directory ({config} is not a model's "
                         "config.json); choose a new or empty directory")


def _is_model_config(path: Path) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and isinstance(data.get("model_type"), str)


def _check_collisions(foreign: list[str], new: list[str], directory: Path) -> None:
    clash = sorted(set(foreign) & set(new))
    if clash:
        raise ValueError(f"{directory}: {', '.join(clash[:5])} is not part of the model "
                         "there (not in its index), and the new model would replace it; move "
                         "it away or choose another directory")


# --- the swap -----------------------------------------------------------------------------
@contextlib.contextmanager
def replaced_directory(directory: str | os.PathLike, owned: Callable[[Path], set[str]]
                       ) -> Iterator[Path]:
    """Yield an empty temporary directory to fill; on success it replaces ``directory`` as
    a whole, keeping the files there that ``owned(directory)`` does not name."""
    directory = _resolve(Path(directory))
    foreign = foreign_files(directory, owned(directory))
    clean_leftovers(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temp(directory, "tmp")
    try:
        yield tmp
        install(tmp, directory, foreign)
    finally:
        _remove_tree(tmp)


def install(tmp: Path, directory: Path, foreign: list[str]) -> None:
    """Carry the foreign files over into the complete ``tmp`` and swap it in."""
    _check_collisions(foreign, os.listdir(tmp), directory)
    for name in foreign:  # hard links: the file itself never moves or changes
        try:
            os.link(directory / name, tmp / name)
        except OSError:  # a filesystem without hard links: a copy keeps it as well
            shutil.copy2(directory / name, tmp / name)
    _set_modes(tmp, directory, set(foreign))
    for name in os.listdir(tmp):
        if name not in foreign:
            fsync_file(tmp / name)
    fsync_directory(tmp)
    swap_into_place(tmp, directory)


def swap_into_place(tmp: Path, directory: Path) -> None:
    """Make the complete directory ``tmp`` appear at ``directory`` in one step."""
    try:
        os.rename(tmp, directory)  # a new target, or an empty directory
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    else:
        fsync_directory(directory.parent)
        return
    if _exchange(tmp, directory):
        fsync_directory(directory.parent)
        _remove_tree(tmp)  # now the old model
        return
    old = _new_temp(directory, "old", create=False)
    os.rename(directory, old)
    os.rename(tmp, directory)
    fsync_directory(directory.parent)
    _remove_tree(old)


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2``); False where unsupported."""
    libc_name = ctypes.util.find_library("c")
    try:
        renameat2 = ctypes.CDLL(libc_name, use_errno=True).renameat2
    except (OSError, AttributeError, TypeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint]
    at_cwd = -100
    if renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"cannot swap {a} into {b}: {os.strerror(err)}")


def clean_leftovers(directory: Path) -> None:
    """Remove what killed saves to ``directory`` left beside it; put back an old model a
    kill left aside (fallback swap only)."""
    parent = directory.parent
    if not parent.is_dir():
        return
    for entry in os.scandir(parent):
        match = _TEMP.match(entry.name)
        if match is None:
            if _LEGACY_TEMP.match(entry.name) and entry.name.startswith(f".{directory.name}."):
                _remove_tree(Path(entry.path))
            continue
        if match["name"] != directory.name or pid_alive(int(match["pid"])):
            continue
        if match["kind"] == "old" and not directory.exists():
            os.rename(entry.path, directory)
        else:
            _remove_tree(Path(entry.path))


def _new_temp(directory: Path, kind: str, *, create: bool = True) -> Path:
    path = directory.parent / f".{directory.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"
    if create:
        path.mkdir()
    return path


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _resolve(directory: Path) -> Path:
    """A symlinked target is replaced where it points, so the link itself stays."""
    return directory.resolve() if directory.is_symlink() else directory


def _set_modes(tmp: Path, directory: Path, keep: set[str]) -> None:
    """Plain-open modes for the new files; an existing target's directory mode is kept."""
    dir_mode = (stat.S_IMODE(directory.stat().st_mode) if directory.is_dir()
                else umask_mode(0o777))
    os.chmod(tmp, dir_mode)
    for name in os.listdir(tmp):
        if name not in keep:
            os.chmod(tmp / name, umask_mode(0o666))
