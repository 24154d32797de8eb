"""Tokenizer: BPE training, exact round trips, DeepSeek special tokens and chat format,
save/load, streaming decode, and interoperability with transformers' AutoTokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tokenizers
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, models, pre_tokenizers

from conftest import reference_file
from dsmoe.tokenizer import (BOS_TOKEN, DEEPSEEK_CHAT_TEMPLATE, EOS_TOKEN, StreamDecoder,
                             Tokenizer)

TRAIN_TEXT = [
    "def add(a, b):\n    \"\"\"Return a + b.\"\"\"\n    return a + b\n",
    "class Stack:\n\tdef __init__(self):\n\t\tself.items = []\n\n\tdef push(self, x):\n"
    "\t\tself.items.append(x)\n",
    "Unicode: café, naïve, Straße, 日本語のテキスト, Ελληνικά, emoji 🎉🚀 and more.\r\n",
    "   leading spaces, trailing spaces   \n\n\n  indented\tand tabbed\n",
    "for i in range(10):\n    if i % 2 == 0:\n        print(f'{i} is even')\n",
] * 20

ROUND_TRIP = [
    "",
    "hello world",
    "def f(x):\n    return x ** 2  # square\n",
    "\t\ttabs\tand   spaces   \n\n\r\n  ",
    "déjà vu, Ωμέγα, 中文字符, 🦀🐍 — “quotes” …",
    "unseen bytes: \x00\x01\x7f \u200b zero-width, \U0001f9ea test tube",
    "trailing space ",
    " leading space",
]

# The bos/eos/pad entries of deepseek-moe-16b-base's tokenizer_config.json, verbatim.
DEEPSEEK_CONFIG = {
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": {"__type": "AddedToken", "content": "<｜begin▁of▁sentence｜>",
                  "lstrip": False, "normalized": True, "rstrip": False, "single_word": False},
    "clean_up_tokenization_spaces": False,
    "eos_token": {"__type": "AddedToken", "content": "<｜end▁of▁sentence｜>",
                  "lstrip": False, "normalized": True, "rstrip": False, "single_word": False},
    "legacy": True,
    "model_max_length": 16384,
    "pad_token": {"__type": "AddedToken", "content": "<｜end▁of▁sentence｜>",
                  "lstrip": False, "normalized": True, "rstrip": False, "single_word": False},
    "sp_model_kwargs": {},
    "unk_token": None,
    "tokenizer_class": "LlamaTokenizerFast",
}

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Who are you?"},
    {"role": "assistant", "content": "A model."},
    {"role": "user", "content": "Sure?"},
]
CHAT_EXPECTED = (BOS_TOKEN + "You are terse.\n\nUser: Who are you?\n\nAssistant: A model."
                 + EOS_TOKEN + "User: Sure?\n\nAssistant:")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train_bpe(TRAIN_TEXT, vocab_size=512)


@pytest.fixture(scope="module")
def ascii_tok() -> Tokenizer:
    """Trained on ASCII only: every non-ASCII character is split into byte tokens."""
    return Tokenizer.train_bpe(["plain ascii text, code = 1\n" * 10], vocab_size=300)


def _no_template(tokenizer: Tokenizer) -> Tokenizer:
    tokenizer = Tokenizer(tokenizer._tok, dict(tokenizer._config))
    tokenizer.chat_template = None
    return tokenizer


# ---------------------------------------------------------------------- training
def test_train_bpe_facts(tok: Tokenizer) -> None:
    assert tok.vocab_size <= 512
    assert tok.bos_id == tok.token_to_id(BOS_TOKEN) and tok.bos_id is not None
    assert tok.eos_id == tok.token_to_id(EOS_TOKEN) and tok.eos_id is not None
    assert tok.pad_id == tok.eos_id, "DeepSeek pads with EOS"
    assert tok.add_bos is True


def test_train_bpe_reaches_requested_vocab_when_text_allows() -> None:
    texts = [" ".join(f"word{i} token{i * 7} x{i % 13}" for i in range(2000))]
    assert Tokenizer.train_bpe(texts, vocab_size=1024).vocab_size == 1024


def test_train_bpe_is_deterministic() -> None:
    a = Tokenizer.train_bpe(TRAIN_TEXT, vocab_size=400)
    b = Tokenizer.train_bpe(iter(TRAIN_TEXT), vocab_size=400)
    assert a.to_json() == b.to_json()
    assert a.fingerprint() == b.fingerprint()


def test_train_bpe_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train_bpe(TRAIN_TEXT, vocab_size=100)
    with pytest.raises(ValueError, match="no text"):
        Tokenizer.train_bpe([], vocab_size=300)
    with pytest.raises(ValueError, match="expects strings"):
        Tokenizer.train_bpe([b"bytes"], vocab_size=300)  # type: ignore[list-item]


# ---------------------------------------------------------------------- encode / decode
@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip_exact(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert ids[:1] == [tok.bos_id]
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(text, add_bos=False)) == text
    assert all(0 <= i < tok.vocab_size for i in ids)


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=80))
def test_round_trip_any_unicode(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text


def test_bos_switch_and_batch(tok: Tokenizer) -> None:
    text = "x = 'café'"
    with_bos, without = tok.encode(text, add_bos=True), tok.encode(text, add_bos=False)
    assert with_bos == [tok.bos_id, *without]
    assert tok.encode_batch(ROUND_TRIP) == [tok.encode(t) for t in ROUND_TRIP]
    assert tok.encode_batch(ROUND_TRIP, add_bos=False) == [tok.encode(t, add_bos=False)
                                                            for t in ROUND_TRIP]


def test_learned_merges_compress_training_text(tok: Tokenizer) -> None:
    text = TRAIN_TEXT[0]
    assert len(tok.encode(text, add_bos=False)) < len(text.encode("utf-8")) / 2


def test_decode_accepts_arrays_and_rejects_bad_ids(tok: Tokenizer) -> None:
    ids = tok.encode("tensor input")
    assert tok.decode(torch.tensor(ids)) == tok.decode(np.array(ids)) == "tensor input"
    assert BOS_TOKEN in tok.decode(ids, skip_special_tokens=False)
    # Padded embedding rows beyond the vocabulary decode to nothing (HF behaviour).
    assert tok.decode([*ids, tok.vocab_size, tok.vocab_size + 100]) == "tensor input"
    with pytest.raises(ValueError, match=">= 0"):
        tok.decode([-1])
    with pytest.raises(ValueError, match="1-D"):
        tok.decode([[1, 2]])


# ---------------------------------------------------------------------- save / load
def test_save_then_from_file_gives_identical_ids(tok: Tokenizer, tmp_path: Path) -> None:
    tok.save(tmp_path / "tk")
    assert sorted(p.name for p in (tmp_path / "tk").iterdir()) == [
        "tokenizer.json", "tokenizer_config.json"], "no temp files may be left behind"
    for source in (tmp_path / "tk", tmp_path / "tk" / "tokenizer.json"):
        loaded = Tokenizer.from_file(source)
        assert (loaded.vocab_size, loaded.bos_id, loaded.eos_id, loaded.pad_id,
                loaded.add_bos) == (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id,
                                    tok.add_bos)
        assert loaded.encode_batch(ROUND_TRIP) == tok.encode_batch(ROUND_TRIP)
        assert loaded.fingerprint() == tok.fingerprint()
    # Saving the loaded tokenizer reproduces the files byte for byte.
    Tokenizer.from_file(tmp_path / "tk").save(tmp_path / "again")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "tk" / name).read_bytes() == (tmp_path / "again" / name).read_bytes()


def _handmade_deepseek_dir(directory: Path, config: dict | None) -> dict[str, int]:
    """A tokenizer.json built directly with `tokenizers`, DeepSeek's specials at the end of
    the vocabulary as in the real model (ids 100000/100001 there)."""
    vocab = {tok: i for i, tok in enumerate(["a", "b", "c", "ab", "abc", "Ġ"])}
    raw = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b"), ("ab", "c")]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.add_special_tokens([AddedToken(BOS_TOKEN, special=True),
                            AddedToken(EOS_TOKEN, special=True)])
    directory.mkdir()
    raw.save(str(directory / "tokenizer.json"))
    if config is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False))
    return {"bos": raw.token_to_id(BOS_TOKEN), "eos": raw.token_to_id(EOS_TOKEN),
            "abc": vocab["abc"]}


def test_deepseek_tokenizer_config_sets_special_ids(tmp_path: Path) -> None:
    ids = _handmade_deepseek_dir(tmp_path / "ds", DEEPSEEK_CONFIG)
    assert (ids["bos"], ids["eos"]) == (6, 7)
    tk = Tokenizer.from_file(tmp_path / "ds")
    assert (tk.bos_id, tk.eos_id, tk.pad_id) == (ids["bos"], ids["eos"], ids["eos"])
    assert tk.add_bos is True and tk.vocab_size == 8
    assert tk.encode("abc") == [ids["bos"], ids["abc"]]
    # Special token text is parsed only when asked (trusted text); user text keeps it text.
    assert tk.encode(f"abc{EOS_TOKEN}", add_bos=False, parse_special=True) == [ids["abc"],
                                                                            ids["eos"]]
    assert ids["eos"] not in tk.encode(f"abc{EOS_TOKEN}", add_bos=False)
    # Unused config keys survive a save, and the AddedToken dicts are kept as they were.
    tk.save(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())
    assert saved["model_max_length"] == 16384 and saved["bos_token"] == DEEPSEEK_CONFIG["bos_token"]


def test_config_matches_the_real_tokenizer_config() -> None:
    ref = reference_file("deepseek-moe-16b-base", "tokenizer_config.json")
    assert json.loads(ref.read_text()) == DEEPSEEK_CONFIG


def test_bare_tokenizer_json_infers_deepseek_specials(tok: Tokenizer, tmp_path: Path) -> None:
    tok.save(tmp_path / "d")
    (tmp_path / "d" / "tokenizer_config.json").unlink()
    bare = Tokenizer.from_file(tmp_path / "d" / "tokenizer.json")
    assert (bare.bos_id, bare.eos_id, bare.pad_id) == (tok.bos_id, tok.eos_id, tok.eos_id)
    assert bare.add_bos is True, "the BOS-prepending post-processor says add BOS"
    ids = _handmade_deepseek_dir(tmp_path / "nopost", None)  # no post-processor
    handmade = Tokenizer.from_file(tmp_path / "nopost")
    assert (handmade.bos_id, handmade.eos_id, handmade.add_bos) == (ids["bos"], ids["eos"], False)


def test_from_file_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_file(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Tokenizer.from_file(tmp_path / "empty")
    (tmp_path / "garbage.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid HF tokenizer.json"):
        Tokenizer.from_file(tmp_path / "garbage.json")
    _handmade_deepseek_dir(tmp_path / "badtok", {"bos_token": "<nope>"})
    with pytest.raises(ValueError, match="bos_token '<nope>'.*not in the tokenizer's vocab"):
        Tokenizer.from_file(tmp_path / "badtok")
    _handmade_deepseek_dir(tmp_path / "badjson", None)
    (tmp_path / "badjson" / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(ValueError, match="cannot parse"):
        Tokenizer.from_file(tmp_path / "badjson")


# ---------------------------------------------------------------------- chat format
def test_chat_template_exact_deepseek_format(tok: Tokenizer) -> None:
    builtin = _no_template(tok)
    assert tok.chat_template == DEEPSEEK_CHAT_TEMPLATE  # rendered with jinja2
    for tokenizer in (tok, builtin):
        assert tokenizer.apply_chat_template(CHAT) == CHAT_EXPECTED
        assert tokenizer.apply_chat_template(CHAT[:3], add_generation_prompt=False) == (
            BOS_TOKEN + "You are terse.\n\nUser: Who are you?\n\nAssistant: A model."
            + EOS_TOKEN)
        assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == (
            BOS_TOKEN + "User: hi\n\nAssistant:")


def test_encode_chat_has_one_bos(tok: Tokenizer) -> None:
    ids = tok.encode_chat(CHAT)
    assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id
    assert ids.count(tok.eos_id) == 1
    assert tok.decode(ids, skip_special_tokens=False) == CHAT_EXPECTED


def test_chat_rejects_malformed_messages(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="'role' and 'content'"):
        tok.apply_chat_template([{"content": "no role"}])
    with pytest.raises(ValueError, match="role 'tool'"):
        _no_template(tok).apply_chat_template([{"role": "tool", "content": "x"}])


def test_transformers_autotokenizer_agrees(tok: Tokenizer, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path / "tk")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tk"))
    for text in ROUND_TRIP:
        assert hf(text)["input_ids"] == tok.encode(text), text
    assert hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == (
        CHAT_EXPECTED)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (
        tok.bos_id, tok.eos_id, tok.pad_id)


# ---------------------------------------------------------------------- streaming
MULTIBYTE = "naïve café → 日本語 🎉🚀 Ωμέγα! done.\n"


def _stream(decoder: StreamDecoder, ids: list[int]) -> list[str]:
    return [decoder.push(i) for i in ids] + [decoder.flush()]


def test_stream_decoder_reassembles_split_characters(ascii_tok: Tokenizer) -> None:
    assert len(ascii_tok.encode("🎉", add_bos=False)) == 4, "precondition: one token per byte"
    ids = ascii_tok.encode(MULTIBYTE)
    pieces = _stream(ascii_tok.stream_decoder(), ids)
    assert "".join(pieces) == ascii_tok.decode(ids) == MULTIBYTE
    assert not any("\ufffd" in p for p in pieces), "never print half a character"
    assert pieces.count("") > 5, "bytes of multi-byte characters must be held back"
    assert "🎉" in pieces, "a 4-byte character is released whole once complete"


def test_stream_decoder_on_trained_tokenizer(tok: Tokenizer) -> None:
    ids = tok.encode(MULTIBYTE + TRAIN_TEXT[1]) + [tok.eos_id]
    for skip in (True, False):
        pieces = _stream(tok.stream_decoder(skip_special_tokens=skip), ids)
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip)


def test_stream_decoder_flushes_incomplete_tail(ascii_tok: Tokenizer) -> None:
    ids = ascii_tok.encode("ok 🎉", add_bos=False)[:-2]  # cut the emoji's last two bytes
    decoder = ascii_tok.stream_decoder()
    pushed = "".join(decoder.push(i) for i in ids)
    assert pushed == "ok "
    tail = decoder.flush()
    assert pushed + tail == ascii_tok.decode(ids) and tail.endswith("\ufffd")
    assert decoder.flush() == "", "flush releases each piece once"
