"""Data pipeline: corpus discovery and reading, deterministic split, bad-input errors,
cached token streams, resumable batch sampling, unigram entropy."""

from __future__ import annotations

import json
import math
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from dsmoe import data
from dsmoe.data import (BatchSampler, Corpus, default_corpus_files, find_text_files,
                        load_corpus, token_dtype, tokenize_corpus, unigram_entropy)
from dsmoe.tokenizer import Tokenizer

DOCS = {
    "a.txt": "The first document.\nIt has two lines.\n",
    "notes/b.md": "# Heading\n\nSome *markdown* with unicode: café 日本.\n",
    "src/c.py": "def f(x):\n    return x + 1\n",
    "src/deep/d.rst": "Title\n=====\n\nrestructured text\n",
}


def _write_tree(root: Path, files: dict[str, str | bytes]) -> Path:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    texts = list(DOCS.values()) * 5 + ["more text for merges: the quick brown fox\n"] * 5
    return Tokenizer.train_bpe(texts, vocab_size=320)


# ---------------------------------------------------------------------- built-in corpus
def test_default_corpus_is_stdlib_python_without_tests_or_site_packages() -> None:
    files = default_corpus_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    assert len(files) > 100
    assert all(f.suffix == ".py" and f.is_file() for f in files)
    rel = [f.relative_to(root) for f in files]
    assert rel == sorted(rel, key=lambda p: p.as_posix())
    skipped = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    assert not any(skipped & set(p.parts[:-1]) for p in rel)
    assert root / "os.py" in files


# ---------------------------------------------------------------------- inputs
def test_single_text_file_is_split_at_a_line_break(tmp_path: Path) -> None:
    text = "".join(f"line {i}: some text here\n" for i in range(200))
    (tmp_path / "one.txt").write_text(text)
    corpus = load_corpus(str(tmp_path / "one.txt"), val_fraction=0.05)
    assert len(corpus.train) == len(corpus.val) == 1
    assert corpus.train[0] + corpus.val[0] == text
    assert corpus.train[0].endswith("\n") and corpus.val[0].startswith("line ")
    assert 0.03 < len(corpus.val[0]) / len(text) < 0.07
    assert load_corpus(tmp_path / "one.txt", val_fraction=0.05) == corpus


def test_single_line_file_is_split_by_characters(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("abcdefghij" * 10)
    corpus = load_corpus(tmp_path / "x.txt", val_fraction=0.1)
    assert (corpus.train[0], corpus.val[0]) == ("abcdefghij" * 9, "abcdefghij")


def test_directory_is_read_recursively_by_extension(tmp_path: Path) -> None:
    root = _write_tree(tmp_path / "corpus", {
        **DOCS,
        "empty.txt": "   \n",  # whitespace only: skipped
        "image.png": b"\x89PNG\r\n\x1a\n\0\0",  # not a text extension: ignored
        "data.csv": "a,b\n1,2\n",  # not a text extension: ignored
        ".git/config.txt": "hidden dir: ignored",
        "__pycache__/x.txt": "ignored",
        "rows.jsonl": '{"text": "row one"}\n{"text": "row two"}\n',
    })
    found = [p.relative_to(root).as_posix() for p in find_text_files(root)]
    assert found == ["a.txt", "empty.txt", "notes/b.md", "rows.jsonl", "src/c.py",
                     "src/deep/d.rst"]
    corpus = load_corpus(str(root))
    assert sorted(corpus.train + corpus.val) == sorted([*DOCS.values(), "row one", "row two"])
    assert corpus.train and corpus.val
    assert str(root) in corpus.source


def test_jsonl_rows_are_documents(tmp_path: Path) -> None:
    rows = [{"text": f"document {i}\nwith lines", "id": i} for i in range(40)]
    lines = [json.dumps(r) for r in rows]
    lines.insert(7, "")  # blank lines are allowed
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    corpus = load_corpus(tmp_path / "d.jsonl", val_fraction=0.2)
    assert sorted(corpus.train + corpus.val) == sorted(r["text"] for r in rows)
    assert 1 <= len(corpus.val) < 40


def test_split_is_deterministic_and_stable_under_additions(tmp_path: Path) -> None:
    files = {f"f{i:03d}.txt": f"file number {i}\n" for i in range(200)}
    _write_tree(tmp_path / "c", files)
    first = load_corpus(tmp_path / "c", val_fraction=0.05)
    assert load_corpus(tmp_path / "c", val_fraction=0.05) == first
    assert 1 <= len(first.val) <= 25, f"~10 of 200 files expected in val, got {len(first.val)}"
    # A new file does not move any existing file between train and val.
    _write_tree(tmp_path / "c", {"zzz_new.txt": "a new file\n"})
    second = load_corpus(tmp_path / "c", val_fraction=0.05)
    assert set(first.val) <= set(second.val) and set(first.train) <= set(second.train)


def test_two_files_always_give_one_each(tmp_path: Path) -> None:
    _write_tree(tmp_path / "c", {"a.txt": "alpha\n", "b.txt": "beta\n"})
    for fraction in (0.001, 0.5, 0.999):
        corpus = load_corpus(tmp_path / "c", val_fraction=fraction)
        assert len(corpus.train) == len(corpus.val) == 1


# ---------------------------------------------------------------------- bad input
def test_bad_inputs_fail_with_clear_messages(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_corpus(tmp_path / "missing")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="no text files"):
        load_corpus(tmp_path / "empty_dir")
    _write_tree(tmp_path / "blank", {"a.txt": "", "b.md": "\n\n"})
    with pytest.raises(ValueError, match="contains no text"):
        load_corpus(tmp_path / "blank")
    (tmp_path / "zero.txt").write_text("")
    with pytest.raises(ValueError, match="contains no text"):
        load_corpus(tmp_path / "zero.txt")
    with pytest.raises(ValueError, match="val_fraction"):
        load_corpus(None, val_fraction=0.0)


def test_binary_and_non_utf8_files_are_rejected(tmp_path: Path) -> None:
    _write_tree(tmp_path / "bin", {"good.txt": "fine\n", "sub/bad.txt": b"ELF\0\x01\x02"})
    with pytest.raises(ValueError, match=r"bad\.txt looks binary \(NUL byte at offset 3\)"):
        load_corpus(tmp_path / "bin")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt is not valid UTF-8 \(byte offset 3\)"):
        load_corpus(tmp_path / "latin1.txt")


def test_jsonl_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n\n{"body": "no text here"}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:3: row has no \"text\" field"):
        load_corpus(path)
    path.write_text('{"text": "ok"}\n{"text": 5}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:2: \"text\" must be a string"):
        load_corpus(path)
    path.write_text('{"text": "ok"}\n{"text": "a",\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:2: invalid JSON"):
        load_corpus(path)


# ---------------------------------------------------------------------- token streams
def _corpus() -> Corpus:
    return Corpus(train=list(DOCS.values())[:3], val=list(DOCS.values())[3:], source="test")


def test_tokenize_layout_is_docs_joined_by_eos(tok: Tokenizer, tmp_path: Path) -> None:
    corpus = _corpus()
    streams = tokenize_corpus(corpus, tok, tmp_path, progress=False)
    expected_train = [i for doc in corpus.train for i in (*tok.encode(doc), tok.eos_id)]
    expected_val = [i for doc in corpus.val for i in (*tok.encode(doc), tok.eos_id)]
    assert streams.train.tolist() == expected_train
    assert streams.val.tolist() == expected_val
    assert streams.train.dtype == np.uint16 and isinstance(streams.train, np.memmap)
    assert streams.vocab_size == tok.vocab_size and not streams.from_cache
    assert tok.decode(streams.train) == "".join(corpus.train)


def test_tokenize_cache_hit_and_invalidation(tok: Tokenizer, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real_encode_batch = Tokenizer.encode_batch

    def counting_encode_batch(self: Tokenizer, texts: list[str], **kw) -> list[list[int]]:
        calls.append(len(texts))
        return real_encode_batch(self, texts, **kw)

    monkeypatch.setattr(Tokenizer, "encode_batch", counting_encode_batch)
    corpus = _corpus()
    first = tokenize_corpus(corpus, tok, tmp_path, progress=False)
    n_calls = len(calls)
    assert n_calls >= 2, "train and val are tokenized"

    again = tokenize_corpus(corpus, tok, tmp_path, progress=False)
    assert len(calls) == n_calls, "a cache hit must not tokenize"
    assert again.from_cache and again.directory == first.directory
    np.testing.assert_array_equal(again.train, first.train)

    other_tok = Tokenizer.train_bpe(list(DOCS.values()) * 3, vocab_size=280)
    changed = tokenize_corpus(corpus, other_tok, tmp_path, progress=False)
    assert len(calls) > n_calls and not changed.from_cache
    assert changed.directory != first.directory

    edited = Corpus(train=corpus.train, val=[corpus.val[0] + "!"], source="test")
    assert not tokenize_corpus(edited, tok, tmp_path, progress=False).from_cache

    # A damaged cache entry (truncated file) is rebuilt, not trusted.
    expected = np.array(first.train)  # a copy: the memmap shares the file damaged below
    entry = first.directory
    del first, again
    (entry / "train.bin").write_bytes((entry / "train.bin").read_bytes()[:-2])
    rebuilt = tokenize_corpus(corpus, tok, tmp_path, progress=False)
    assert not rebuilt.from_cache and rebuilt.directory == entry
    np.testing.assert_array_equal(rebuilt.train, expected)
    assert [p.name for p in entry.iterdir() if p.name.endswith(".tmp")] == []


def test_token_dtype_widens_for_large_vocabularies() -> None:
    assert token_dtype(4096) == np.uint16 and token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32 and token_dtype(102400) == np.uint32


# ---------------------------------------------------------------------- batches
def _stream(n: int) -> np.ndarray:
    return (np.arange(n) % 50000).astype(np.uint16)  # token value = position


def test_batch_is_a_function_of_seed_and_step() -> None:
    tokens = _stream(10_000)
    a, b = BatchSampler(tokens, 4, 32, seed=1), BatchSampler(tokens, 4, 32, seed=1)
    for step in (0, 5, 123456):
        xa, ya = a.batch(step)
        xb, yb = b.batch(step)
        assert torch.equal(xa, xb) and torch.equal(ya, yb), f"step {step} not reproducible"
    assert torch.equal(a.batch(7)[0], a.batch(7)[0]), "no hidden state between calls"
    assert not torch.equal(a.batch(0)[0], a.batch(1)[0])
    assert not torch.equal(a.batch(0)[0], BatchSampler(tokens, 4, 32, seed=2).batch(0)[0])


def test_targets_are_inputs_shifted_by_one() -> None:
    tokens = _stream(5_000)
    x, y = BatchSampler(tokens, 8, 64, seed=0).batch(3)
    assert x.shape == y.shape == (8, 64) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    # Each row is a contiguous window of the stream (token value = position here).
    starts = x[:, :1]
    assert torch.equal(x, starts + torch.arange(64)) and torch.equal(y, x + 1)
    assert int(y.max()) <= len(tokens) - 1


def test_eval_batches_cover_the_stream_evenly() -> None:
    tokens = _stream(1_001)
    sampler = BatchSampler(tokens, 2, 100, seed=0)
    batches = list(sampler.eval_batches(5))
    assert len(batches) == 5
    starts = torch.cat([x[:, 0] for x, _ in batches]).tolist()
    assert starts[0] == 0 and starts[-1] == len(tokens) - 101, "first and last windows"
    gaps = np.diff(starts)
    assert gaps.max() - gaps.min() <= 1, f"evenly spaced starts, got {starts}"
    again = list(sampler.eval_batches(5))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
               for a, b in zip(batches, again))


def test_short_stream_and_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match=r"has 64 tokens.*seq_len=64 needs 65"):
        BatchSampler(_stream(64), 2, 64, seed=0)
    BatchSampler(_stream(65), 2, 64, seed=0).batch(0)  # exactly one window is enough
    with pytest.raises(ValueError, match="batch_size"):
        BatchSampler(_stream(100), 0, 8, seed=0)
    with pytest.raises(ValueError, match="seed"):
        BatchSampler(_stream(100), 1, 8, seed=-1)
    with pytest.raises(ValueError, match="step"):
        BatchSampler(_stream(100), 1, 8, seed=0).batch(-1)


# ---------------------------------------------------------------------- entropy
def test_unigram_entropy_known_distributions() -> None:
    assert unigram_entropy(np.array([0, 0, 1, 1], dtype=np.uint16), 4) == pytest.approx(
        math.log(2), abs=1e-12)
    assert unigram_entropy(np.arange(8, dtype=np.uint16), 8) == pytest.approx(
        math.log(8), abs=1e-12)
    skewed = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert unigram_entropy(np.array([3, 3, 3, 1], dtype=np.uint32), 10) == pytest.approx(
        skewed, abs=1e-12)
    assert unigram_entropy(np.zeros(100, dtype=np.uint16), 5) == 0.0
    with pytest.raises(ValueError, match="empty"):
        unigram_entropy(np.array([], dtype=np.uint16), 4)
    with pytest.raises(ValueError, match="token id 4 >= vocab_size 4"):
        unigram_entropy(np.array([0, 4], dtype=np.uint16), 4)


def test_unigram_entropy_chunks_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 300, size=10_000).astype(np.uint16)
    whole = unigram_entropy(tokens, 300)
    monkeypatch.setattr(data, "_BINCOUNT_CHUNK", 999)  # 11 uneven chunks
    assert unigram_entropy(tokens, 300) == pytest.approx(whole, rel=1e-12)
    p = np.bincount(tokens, minlength=300) / len(tokens)
    reference = float(-(p[p > 0] * np.log(p[p > 0])).sum())
    assert whole == pytest.approx(reference, rel=1e-12)


def test_directory_includes_extensionless_text_and_says_what_it_skipped(tmp_path: Path) -> None:
    root = _write_tree(tmp_path / "corpus", {
        "a.txt": "alpha text\n",
        "LICENSE": "Permission is hereby granted\n",
        "docs/README": "read me first\n",
        "blob": b"\x7fELF\0\0\1",  # binary: skipped
        "latin": "caf\xe9\n".encode("latin-1"),  # not UTF-8: skipped
        "image.png": b"\x89PNG\r\n\x1a\n\0\0",
    })
    found = [p.relative_to(root).as_posix() for p in find_text_files(root)]
    assert found == ["LICENSE", "a.txt", "docs/README"]
    corpus = load_corpus(str(root))
    assert sorted(corpus.train + corpus.val) == sorted(
        ["alpha text\n", "Permission is hereby granted\n", "read me first\n"])
    assert ("skipped 2 file(s) without an extension that are not text (1 binary, "
            "1 not UTF-8) and 1 file(s) with other extensions (.png)") in corpus.source
