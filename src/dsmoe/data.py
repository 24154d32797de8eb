"""Training text: corpora, a deterministic train/val split, cached token streams, batches.

Design choices:
- Built-in corpus: the running interpreter's standard library ``.py`` files, which every
  machine with Python has, so the demo needs no download. ``site-packages``/``dist-packages``
  (third-party, differs per environment) and test suites (``test``, ``tests``, ``idle_test``:
  ~19 MB that would triple tokenization time) are skipped; CPython 3.11 leaves ~730 files,
  ~12 MB of text.
- Split by *document* (a file, or a .jsonl row) using a hash of its relative path: stable
  when files are added or removed, and no file is half in train and half in val. At least one
  document lands on each side; a lone document is cut at a line break near the end.
- A directory gives its files with a text extension and its extensionless files that are
  UTF-8 text (LICENSE, README); extensionless binaries and other extensions are skipped,
  counted by reason in ``Corpus.source``.
- Bad input fails in ``load_corpus``, before any tokenizer or model work: missing paths,
  no text, NUL bytes or invalid UTF-8 (naming file and offset), .jsonl rows without a
  "text" string (naming the line).
- Token streams are every document's ids (BOS first when the tokenizer adds it) followed by
  EOS, concatenated, stored as raw ``.bin`` files (uint16 when the vocabulary allows) and
  memory-mapped. The cache key hashes the corpus content and the tokenizer, so a changed
  corpus or tokenizer re-tokenizes and an unchanged one never does.
- ``BatchSampler.batch(step)`` draws from an RNG seeded by ``(seed, step)`` alone: resuming at
  step N needs no sampler state, and a killed run replays the same batches.

Shapes: B batch, S sequence length.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from dsmoe.tokenizer import Tokenizer

TEXT_EXTENSIONS = (".txt", ".md", ".rst", ".py", ".jsonl")  # searched for in directories
_SKIP_DIRS = frozenset({"__pycache__", "node_modules"})  # plus every hidden (".x") directory
_STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test"})
_CACHE_FORMAT = 1  # bump when the on-disk token stream layout changes
_TOKENIZE_CHUNK_CHARS = 1 << 20  # text per encode_batch call (progress granularity)
_BINCOUNT_CHUNK = 1 << 24  # tokens per np.bincount call (it copies its input to intp)


# ---------------------------------------------------------------------- finding text
def default_corpus_root() -> Path:
    """The running interpreter's standard library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def default_corpus_files() -> list[Path]:
    """The stdlib's ``.py`` files, sorted by relative path, without third-party packages and
    test suites (see the module docstring)."""
    root = default_corpus_root()
    files = []
    for path in _walk(root, skip=_SKIP_DIRS | _STDLIB_SKIP_DIRS):
        if path.suffix == ".py":
            files.append(path)
    return files


def find_text_files(path: str | os.PathLike) -> list[Path]:
    """``path`` itself if it is a file (any extension), else the files under the directory
    whose extension is in ``TEXT_EXTENSIONS`` or that have no extension and are text
    (LICENSE, README, COPYING), recursively, sorted, skipping hidden directories (``.git``,
    ``.venv``), ``__pycache__`` and ``node_modules``."""
    return scan_text_files(path)[0]


def scan_text_files(path: str | os.PathLike) -> tuple[list[Path], str]:
    """``find_text_files`` and a note on what a directory walk skipped and why ("" when
    nothing was): extensionless files that are not text, files with other extensions."""
    path = Path(path)
    if path.is_file():
        return [path], ""
    if not path.is_dir():
        raise ValueError(f"data path does not exist: {path}")
    files, not_text, other = [], {}, {}
    for p in _walk(path, skip=_SKIP_DIRS):
        suffix = p.suffix.lower()
        if suffix in TEXT_EXTENSIONS:
            files.append(p)
        elif suffix:
            other[suffix] = other.get(suffix, 0) + 1
        elif (reason := _why_not_text(p)) is None:
            files.append(p)
        else:
            not_text[reason] = not_text.get(reason, 0) + 1
    notes = []
    if not_text:
        notes.append(f"{sum(not_text.values())} file(s) without an extension that are not "
                     f"text ({', '.join(f'{n} {r}' for r, n in sorted(not_text.items()))})")
    if other:
        shown = ", ".join(sorted(other)[:5]) + (", ..." if len(other) > 5 else "")
        notes.append(f"{sum(other.values())} file(s) with other extensions ({shown})")
    return files, ("skipped " + " and ".join(notes)) if notes else ""


def _why_not_text(path: Path) -> str | None:
    """None for a UTF-8 text file; else why it is not (binary, not UTF-8, unreadable)."""
    try:
        data = path.read_bytes()
    except OSError:
        return "unreadable"
    if b"\0" in data:
        return "binary"
    try:
        data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return "not UTF-8"
    return None


def _walk(root: Path, *, skip: frozenset[str]) -> list[Path]:
    """Files under ``root`` in sorted relative-path order (symlinked dirs are not followed)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip and not d.startswith("."))
        out.extend(Path(dirpath) / f for f in sorted(filenames) if not f.startswith("."))
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


# ---------------------------------------------------------------------- reading text
def read_text_file(path: Path) -> str:
    """The file as text; ValueError for unreadable, binary (NUL byte) or non-UTF-8 files."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from exc
    nul = data.find(b"\0")
    if nul != -1:
        raise ValueError(f"{path} looks binary (NUL byte at offset {nul}); "
                         f"training data must be UTF-8 text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not valid UTF-8 (byte offset {exc.start}); "
                         f"training data must be UTF-8 text") from exc


def _jsonl_documents(path: Path, name: str) -> list[tuple[str, str]]:
    """(key, text) per non-blank row; the key is ``name:line``."""
    docs = []
    for lineno, line in enumerate(read_text_file(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from exc
        if not isinstance(row, dict) or "text" not in row:
            found = f"keys {sorted(row)}" if isinstance(row, dict) else type(row).__name__
            raise ValueError(f"{path}:{lineno}: row has no \"text\" field (found {found})")
        if not isinstance(row["text"], str):
            raise ValueError(f"{path}:{lineno}: \"text\" must be a string, "
                             f"got {type(row['text']).__name__}")
        if row["text"].strip():
            docs.append((f"{name}:{lineno}", row["text"]))
    return docs


def _documents(files: list[Path], root: Path) -> list[tuple[str, str]]:
    """(key, text) for every non-empty document; keys are paths relative to ``root``."""
    docs = []
    for path in files:
        name = path.relative_to(root).as_posix() if path != root else path.name
        if path.suffix.lower() == ".jsonl":
            docs.extend(_jsonl_documents(path, name))
        else:
            text = read_text_file(path)
            if text.strip():
                docs.append((name, text))
    return docs


# ---------------------------------------------------------------------- corpus + split
@dataclass(frozen=True)
class Corpus:
    """Documents for training and validation, and where they came from (for logs)."""

    train: list[str]
    val: list[str]
    source: str

    def fingerprint(self) -> str:
        """sha256 of the content and the split (lengths framed, so boundaries count)."""
        h = hashlib.sha256()
        for name, docs in (("train", self.train), ("val", self.val)):
            h.update(f"{name}:{len(docs)}\n".encode())
            for doc in docs:
                data = doc.encode("utf-8", "surrogatepass")
                h.update(f"{len(data)}\n".encode())
                h.update(data)
        return h.hexdigest()

    @property
    def n_chars(self) -> tuple[int, int]:
        """Characters in (train, val)."""
        return sum(map(len, self.train)), sum(map(len, self.val))


def load_corpus(path: str | os.PathLike | None, *, val_fraction: float = 0.02) -> Corpus:
    """Read and split a corpus: ``None`` for the built-in stdlib corpus, else a text file, a
    directory of text files, or a .jsonl file with a "text" field per row."""
    if not (isinstance(val_fraction, (int, float)) and 0.0 < val_fraction < 1.0):
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    if path is None:
        root = default_corpus_root()
        files = default_corpus_files()
        if not files:
            raise ValueError(f"built-in corpus: no .py files found in the standard library "
                             f"at {root}; pass a corpus with --data")
        label = f"Python {sysconfig.get_python_version()} standard library ({root})"
    else:
        root = Path(path)
        files, skipped = scan_text_files(root)
        if not files:
            raise ValueError(f"no text files ({', '.join(TEXT_EXTENSIONS)}, or text without "
                             f"an extension) found under {root}"
                             f"{f' ({skipped})' if skipped else ''}")
        label = f"{root} ({skipped})" if skipped else str(root)
    docs = _documents(files, root)
    if not docs:
        raise ValueError(f"{label} contains no text (all {len(files)} file(s) empty)")
    train, val = _split(docs, val_fraction)
    return Corpus(train=train, val=val,
                  source=f"{label}: {len(train)} train / {len(val)} val documents")


def _split(docs: list[tuple[str, str]], val_fraction: float) -> tuple[list[str], list[str]]:
    """Documents whose key hashes below ``val_fraction`` go to val (at least one each side);
    a single document is cut near ``1 - val_fraction`` of its length."""
    if len(docs) == 1:
        return _split_text(docs[0][1], val_fraction)
    scores = [_unit_hash(key) for key, _ in docs]
    is_val = [s < val_fraction for s in scores]
    if not any(is_val):
        is_val[min(range(len(docs)), key=scores.__getitem__)] = True
    if all(is_val):
        is_val[max(range(len(docs)), key=scores.__getitem__)] = False
    train = [text for (_, text), v in zip(docs, is_val) if not v]
    val = [text for (_, text), v in zip(docs, is_val) if v]
    return train, val


def _split_text(text: str, val_fraction: float) -> tuple[list[str], list[str]]:
    """Cut at the first line break after ``(1 - val_fraction) * len``, or exactly there."""
    if len(text) < 2:
        raise ValueError(f"a single document of {len(text)} character(s) cannot be split "
                         f"into train and validation text")
    cut = min(max(int(len(text) * (1.0 - val_fraction)), 1), len(text) - 1)
    newline = text.find("\n", cut)
    if newline != -1 and text[newline + 1:].strip():
        cut = newline + 1
    return [text[:cut]], [text[cut:]]


def _unit_hash(key: str) -> float:
    """A stable pseudo-random number in [0, 1) for ``key`` (unlike ``hash()``, not salted)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0**64


# ---------------------------------------------------------------------- token streams
@dataclass(frozen=True)
class TokenStreams:
    """Memory-mapped token streams: each document's ids then EOS, concatenated."""

    train: np.ndarray  # [N_train] uint16 (uint32 for vocabularies above 65535)
    val: np.ndarray  # [N_val]
    vocab_size: int
    directory: Path  # the cache entry holding train.bin, val.bin, meta.json
    from_cache: bool  # True when nothing was tokenized


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def tokenize_corpus(corpus: Corpus, tokenizer: Tokenizer, cache_dir: str | os.PathLike, *,
                    progress: bool = True) -> TokenStreams:
    """Token streams of ``corpus``, read from ``cache_dir`` when this corpus was already
    tokenized by this tokenizer, else tokenized (with a progress bar) and cached."""
    if tokenizer.eos_id is None:
        raise ValueError("the tokenizer has no eos_token; token streams need it to separate "
                         "documents")
    dtype = token_dtype(tokenizer.vocab_size)
    key = hashlib.sha256(json.dumps(
        [_CACHE_FORMAT, corpus.fingerprint(), tokenizer.fingerprint(), dtype.str]
    ).encode()).hexdigest()
    entry = Path(cache_dir) / f"tokens-{key[:20]}"
    meta_path = entry / "meta.json"
    meta = _read_meta(meta_path, key)
    from_cache = meta is not None
    if meta is None:
        entry.mkdir(parents=True, exist_ok=True)
        counts = _write_streams(corpus, tokenizer, entry, dtype, progress)
        meta = {"key": key, "dtype": dtype.str, "vocab_size": tokenizer.vocab_size,
                "n_train": counts["train"], "n_val": counts["val"],
                "n_train_docs": len(corpus.train), "n_val_docs": len(corpus.val)}
        _atomic_write_bytes(meta_path, (json.dumps(meta, indent=2) + "\n").encode())
    return TokenStreams(train=_open_stream(entry / "train.bin", dtype, meta["n_train"]),
                        val=_open_stream(entry / "val.bin", dtype, meta["n_val"]),
                        vocab_size=tokenizer.vocab_size, directory=entry,
                        from_cache=from_cache)


def _read_meta(meta_path: Path, key: str) -> dict | None:
    """The cache entry's metadata if it is complete and matches ``key``, else None."""
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("key") != key:
        return None
    try:
        itemsize = np.dtype(meta["dtype"]).itemsize
        for split in ("train", "val"):
            path = meta_path.parent / f"{split}.bin"
            if not path.is_file() or path.stat().st_size != int(meta[f"n_{split}"]) * itemsize:
                return None
    except (KeyError, TypeError, ValueError):  # hand-edited or foreign metadata: rebuild
        return None
    return meta


def _write_streams(corpus: Corpus, tokenizer: Tokenizer, entry: Path, dtype: np.dtype,
                   progress: bool) -> dict[str, int]:
    """Tokenize both splits chunk by chunk straight to disk; returns tokens per split."""
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeRemainingColumn)

    counts: dict[str, int] = {}
    console = Console(stderr=True)  # keep stdout clean for piping
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("chars"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True,
                  disable=not (progress and console.is_terminal)) as bar:
        for split, docs in (("train", corpus.train), ("val", corpus.val)):
            task = bar.add_task(f"tokenizing {split}", total=sum(map(len, docs)))
            fd, tmp = tempfile.mkstemp(dir=entry, prefix=f".{split}.", suffix=".tmp")
            try:
                n = 0
                with os.fdopen(fd, "wb") as f:
                    for chunk in _chunks(docs, _TOKENIZE_CHUNK_CHARS):
                        ids = np.concatenate([  # [tokens in chunk]
                            np.asarray(doc_ids + [tokenizer.eos_id], dtype=dtype)
                            for doc_ids in tokenizer.encode_batch(chunk)])
                        ids.tofile(f)
                        n += len(ids)
                        bar.advance(task, sum(map(len, chunk)))
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, entry / f"{split}.bin")
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            counts[split] = n
    return counts


def _chunks(docs: list[str], max_chars: int) -> Iterator[list[str]]:
    """Consecutive runs of documents of about ``max_chars`` characters (at least one doc)."""
    chunk: list[str] = []
    size = 0
    for doc in docs:
        chunk.append(doc)
        size += len(doc)
        if size >= max_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _open_stream(path: Path, dtype: np.dtype, n: int) -> np.ndarray:
    if n == 0:  # mmap cannot map an empty file
        return np.empty(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,))


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------- batches
class BatchSampler:
    """Random ``seq_len + 1`` token windows; ``batch(step)`` depends only on (seed, step)."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int) -> None:
        for name, value, low in (("batch_size", batch_size, 1), ("seq_len", seq_len, 1),
                                 ("seed", seed, 0)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be a 1-D stream, got shape {tuple(tokens.shape)}")
        if len(tokens) < seq_len + 1:
            raise ValueError(f"token stream has {len(tokens)} tokens, but one window of "
                             f"seq_len={seq_len} needs {seq_len + 1} (inputs + shifted "
                             f"targets); use more text or a shorter seq_len")
        self.tokens = tokens
        self.batch_size = int(batch_size)
        self.seq_len = int(seq_len)
        self.seed = int(seed)
        self._offsets = np.arange(self.seq_len + 1)  # [S+1]

    @property
    def n_starts(self) -> int:
        """How many distinct window starts the stream has."""
        return len(self.tokens) - self.seq_len

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs [B, S], targets [B, S]) int64; ``targets[:, t]`` is the token after
        ``inputs[:, t]`` in the stream. Window starts are uniform over the stream."""
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        rng = np.random.default_rng([self.seed, int(step)])
        starts = rng.integers(0, self.n_starts, size=self.batch_size)  # [B]
        return self._windows(starts)

    def eval_batches(self, n_batches: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``n_batches`` fixed batches whose ``n_batches * B`` windows start at evenly spaced
        positions spanning the whole stream (they overlap if the stream is short)."""
        if isinstance(n_batches, bool) or not isinstance(n_batches, int) or n_batches < 1:
            raise ValueError(f"n_batches must be an int >= 1, got {n_batches!r}")
        n_windows = n_batches * self.batch_size
        starts = np.linspace(0, self.n_starts - 1, n_windows).round().astype(np.int64)
        for i in range(n_batches):
            yield self._windows(starts[i * self.batch_size:(i + 1) * self.batch_size])

    def _windows(self, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        window = np.asarray(self.tokens[starts[:, None] + self._offsets], dtype=np.int64)
        window_t = torch.from_numpy(window)  # [B, S+1]
        return window_t[:, :-1], window_t[:, 1:]  # [B, S], [B, S]


# ---------------------------------------------------------------------- statistics
def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """Entropy (nats/token) of the stream's empirical unigram distribution: the loss of the
    best model that ignores context, the bar a language model must clearly beat."""
    if len(tokens) == 0:
        raise ValueError("unigram_entropy of an empty token stream is undefined")
    counts = np.zeros(vocab_size, dtype=np.int64)
    for i in range(0, len(tokens), _BINCOUNT_CHUNK):
        chunk = np.asarray(tokens[i:i + _BINCOUNT_CHUNK])
        if chunk.max() >= vocab_size:
            raise ValueError(f"token id {int(chunk.max())} >= vocab_size {vocab_size}")
        counts += np.bincount(chunk, minlength=vocab_size)
    p = counts[counts > 0] / len(tokens)
    return float(-(p * np.log(p)).sum())


__all__ = [
    "TEXT_EXTENSIONS", "BatchSampler", "Corpus", "TokenStreams", "default_corpus_files",
    "default_corpus_root", "find_text_files", "load_corpus", "read_text_file",
    "token_dtype", "tokenize_corpus", "unigram_entropy",
]
