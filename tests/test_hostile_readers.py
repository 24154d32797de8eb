"""Hostile and malformed files given to dsmoe's readers: every claimed size is checked against
the file before anything is allocated, every value against its expected type, and each
problem ends in one ValueError naming the file and the key (never a traceback from inside a
parser, never unbounded memory)."""

from __future__ import annotations

import importlib.util
import json
import resource
import struct
import sys
from pathlib import Path

import gguf
import pytest
import torch
from test_gguf import make_model, write_llama_cpp_style

from dsmoe.checkpoint import hf
from dsmoe.checkpoint.gguf import GGUFFile, TokenizerData, load_gguf, load_tokenizer
from dsmoe.checkpoint.gguf.vocab import _pre_tokenizer
from dsmoe.cli import main
from dsmoe.model import Transformer
from dsmoe.tokenizer import Tokenizer

U8, U32, F32, STRING, ARRAY, U64 = 0, 4, 6, 8, 9, 10


def _string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def _kv(key: str, value_type: int, payload: bytes) -> bytes:
    return _string(key) + struct.pack("<I", value_type) + payload


def _raw_gguf(path: Path, *kvs: bytes, n_tensors: int = 0) -> Path:
    """A GGUF v3 header written byte by byte: counts may lie, which GGUFWriter never does."""
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, n_tensors, len(kvs)) + b"".join(kvs))
    return path


@pytest.fixture
def memory_cap():
    """Cap the address space at +2 GiB so a regression fails fast instead of eating the
    machine (the unfixed reader grew by 100-300 MB/s without bound)."""
    if sys.platform != "linux":
        pytest.skip("RLIMIT_AS is Linux-specific")
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as fh:
        used = int(fh.read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (used + (2 << 30), hard))
    yield
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


# --- memory bombs ----------------------------------------------------------------------------
@pytest.mark.parametrize("item_type, what", [(STRING, "strings"), (U8, "bytes"),
                                             (ARRAY, "nested arrays")])
def test_array_claiming_2_to_the_50_elements_is_refused(tmp_path: Path, memory_cap,
                                                        item_type: int, what: str) -> None:
    path = _raw_gguf(tmp_path / f"bomb_{what}.gguf",
                     _kv("general.architecture", STRING, _string("deepseek")),
                     _kv("tokenizer.ggml.tokens", ARRAY,
                         struct.pack("<IQ", item_type, 1 << 50) + b"\0" * 64))
    assert path.stat().st_size < 200
    with pytest.raises(ValueError, match=rf"{path}: cannot parse GGUF .*: metadata key "
                                         r"'tokenizer.ggml.tokens' \(1125899906842624 "
                                         r"elements\) needs .* bytes"):
        GGUFFile(path)
    assert main(["info", str(path)]) == 2


def test_counts_larger_than_the_file_are_refused(tmp_path: Path, memory_cap) -> None:
    kv_bomb = tmp_path / "kv.gguf"
    kv_bomb.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1 << 50))
    with pytest.raises(ValueError, match=f"{kv_bomb}: .*: 1125899906842624 metadata entries needs"):
        GGUFFile(kv_bomb)
    tensor_bomb = _raw_gguf(tmp_path / "tensors.gguf", n_tensors=1 << 40)
    with pytest.raises(ValueError, match="1099511627776 tensor records needs"):
        GGUFFile(tensor_bomb)
    long_key = tmp_path / "key.gguf"
    long_key.write_bytes(b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, 1 << 60) + b"k" * 40)
    with pytest.raises(ValueError, match="metadata key #0 needs 1152921504606846976 bytes"):
        GGUFFile(long_key)


def test_block_count_of_2_to_the_40_is_refused_before_building_anything(
        tmp_path: Path, memory_cap, capsys) -> None:
    path = tmp_path / "blocks.gguf"
    write_llama_cpp_style(path, make_model(), None)
    raw = bytearray(path.read_bytes())
    field = gguf.GGUFReader(path).get_field("deepseek.block_count")
    value_at = field.offset + sum(int(p.nbytes) for p in field.parts[:-1])
    # u32 -> u64 in place is impossible, so claim the largest u32 (4e9 layers)
    raw[value_at:value_at + 4] = struct.pack("<I", 0xFFFFFFFF)
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"metadata deepseek.block_count = 4294967295 but the "
                                         r"file has only \d+ tensors"):
        load_gguf(path)
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "block_count = 4294967295" in err


@pytest.mark.parametrize("key, value", [("expert_count", 1 << 31), ("embedding_length", 1 << 30),
                                        ("context_length", 1 << 31)])
def test_sizes_no_tensor_backs_are_refused(tmp_path: Path, memory_cap, key: str,
                                           value: int) -> None:
    path = tmp_path / f"{key}.gguf"
    write_llama_cpp_style(path, make_model(), None, overrides={key: value})
    with pytest.raises(ValueError, match=rf"{path}: metadata deepseek.{key} = {value} "):
        load_gguf(path)


def test_sizes_that_multiply_into_an_absurd_model_are_refused(tmp_path: Path,
                                                              memory_cap) -> None:
    path = tmp_path / "experts.gguf"  # 300 experts pass "<= the largest dimension" (320)
    write_llama_cpp_style(path, make_model(), None, overrides={"expert_count": 300})
    with pytest.raises(ValueError, match=r"the metadata describes a model of \d+ parameters, "
                                         r"but the file's tensors hold \d+"):
        load_gguf(path)


# --- wrong types -----------------------------------------------------------------------------
def _add_value(w: gguf.GGUFWriter, key: str, value: object) -> None:
    """Metadata typed by the Python value: str, list (array), float (f32) or int (i32)."""
    if isinstance(value, str):
        w.add_string(key, value)
    elif isinstance(value, list):
        w.add_array(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    else:
        w.add_int32(key, value)


def _with_metadata(path: Path, extra: dict[str, object], tok: Tokenizer | None = None) -> Path:
    """A valid llama.cpp-layout GGUF whose listed keys are (re)written with other types."""
    base = path.with_suffix(".base.gguf")
    write_llama_cpp_style(base, make_model(), tok)
    source = gguf.GGUFReader(base)
    w = gguf.GGUFWriter(str(path), "deepseek")
    for field in source.fields.values():
        if field.name.startswith(("GGUF.", "general.architecture")) or field.name in extra:
            continue
        value = field.contents()
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            w.add_array(field.name, value)
        else:
            w.add_key_value(field.name, value, kind)
    for key, value in extra.items():
        _add_value(w, key, value)
    for t in source.tensors:
        w.add_tensor(t.name, t.data, raw_shape=list(reversed(t.shape.tolist())),
                     raw_dtype=gguf.GGMLQuantizationType(int(t.tensor_type)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("extra, message", [
    ({"deepseek.attention.layer_norm_rms_epsilon": "tiny"},
     "metadata deepseek.attention.layer_norm_rms_epsilon = 'tiny' must be a number, not str"),
    ({"deepseek.block_count": "three"},
     "metadata deepseek.block_count = 'three' must be an integer, not str"),
    ({"deepseek.block_count": 2.5}, "metadata deepseek.block_count = 2.5 must be an integer"),
    ({"dsmoe.hf_config": [1, 2, 3]}, "metadata dsmoe.hf_config = .* must be a string, not list"),
    ({"dsmoe.hf_config": "{not json"}, "metadata dsmoe.hf_config = '{not json' is not valid JSON"),
    ({"dsmoe.hf_config": "[1, 2]"}, "metadata dsmoe.hf_config = '.1, 2.' must be a JSON object"),
    ({"deepseek.rope.scaling.type": ["linear"]},
     "metadata deepseek.rope.scaling.type = \\['linear'\\] must be a string"),
])
def test_metadata_of_the_wrong_type_names_file_and_key(tmp_path: Path, extra: dict,
                                                       message: str, capsys) -> None:
    path = _with_metadata(tmp_path / "typed.gguf", extra)
    with pytest.raises(ValueError, match=f"{path}: {message}"):
        load_gguf(path)
    assert main(["info", str(path)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {path}: ")


# --- hostile deepseek2 (MLA) headers ------------------------------------------------------------
def _mla_model():
    from test_gguf_mla import mla_model

    return mla_model("v3_yarn")


@pytest.mark.parametrize("overrides, drop, message", [
    ({"attention.kv_lora_rank": 16}, (),  # the latent width the tensors do not have
     r"metadata contradicts tensor shapes: blk\.0\.attn_kv_a_mqa\.weight is \[40, 64\] in the "
     r"file, the metadata \(attention\.kv_lora_rank, .*\) implies \[24, 64\]"),
    ({"attention.q_lora_rank": 48}, (), r"blk\.0\.attn_q_a\.weight is \[32, 64\] in the file, "
                                        r"the metadata \(attention\.q_lora_rank"),
    ({}, ("attention.kv_lora_rank",),
     "required metadata key 'deepseek2.attention.kv_lora_rank' is missing"),
    ({}, ("rope.dimension_count",),
     "required metadata key 'deepseek2.rope.dimension_count' is missing"),
    ({"attention.key_length_mla": 8}, (), r"metadata deepseek2\.attention\.key_length_mla = 8 "
                                          r"must exceed deepseek2\.rope\.dimension_count = 8"),
    ({"expert_count": 4096}, (), "metadata deepseek2.expert_count = 4096 is larger than any "
                                 "tensor dimension"),
    ({"expert_count": 300}, (), r"the metadata describes a model of \d+ parameters"),
    ({"expert_used_count": 9}, (), "the metadata describes an invalid model: .*"
                                   "num_experts_per_tok"),
    ({"expert_gating_func": 7}, (), "metadata deepseek2.expert_gating_func = 7 is not a gating "
                                    "function dsmoe knows"),
])
def test_hostile_deepseek2_headers_name_file_and_key(tmp_path: Path, overrides: dict,
                                                     drop: tuple, message: str, capsys) -> None:
    path = tmp_path / "mla.gguf"
    write_llama_cpp_style(path, _mla_model(), None, overrides=overrides, drop=drop)
    with pytest.raises(ValueError, match=f"{path}: .*{message}"):
        load_gguf(path)
    code = main(["info", str(path)])  # tensors against the metadata: reported, exit 1
    out, err = capsys.readouterr()
    if "blk" in message:
        assert code == 1 and "metadata contradicts tensor shapes" in out
    else:
        assert code == 2 and err.startswith(f"error: {path}: ") and err.count("\n") == 1, err


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train_bpe(["hello world 123, it's fine!"] * 20, vocab_size=280)


def _tokenizer_gguf(path: Path, meta: dict[str, object]) -> Path:
    """A GGUF with only tokenizer metadata (no tensors)."""
    w = gguf.GGUFWriter(str(path), "deepseek")
    for key, value in meta.items():
        _add_value(w, key, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    return path


def _tokenizer_meta(tok: Tokenizer, **changes: object) -> dict[str, object]:
    data = TokenizerData.from_tokenizer(tok, 320)
    meta = {"tokenizer.ggml.tokens": data.tokens, "tokenizer.ggml.token_type": data.token_types,
            "tokenizer.ggml.merges": data.merges, "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.bos_token_id": tok.bos_id, "tokenizer.ggml.eos_token_id": tok.eos_id}
    meta.update(changes)
    return meta


@pytest.mark.parametrize("changes, message", [
    ({"tokenizer.ggml.bos_token_id": 5000},
     "tokenizer.ggml.bos_token_id = 5000 is outside the vocabulary \\(320 tokens\\)"),
    ({"tokenizer.ggml.eos_token_id": -1}, "tokenizer.ggml.eos_token_id = -1 is outside"),
    ({"tokenizer.ggml.tokens": [1, 2, 3]}, "tokenizer.ggml.tokens must hold str values, found int"),
    ({"tokenizer.ggml.merges": "a b"}, "tokenizer.ggml.merges must be list, not str"),
    ({"tokenizer.ggml.pre": "qwen2"}, "tokenizer.ggml.pre 'qwen2' is not supported"),
])
def test_tokenizer_metadata_is_checked(tmp_path: Path, tok: Tokenizer, changes: dict,
                                       message: str) -> None:
    path = _tokenizer_gguf(tmp_path / "tok.gguf", _tokenizer_meta(tok, **changes))
    with pytest.raises(ValueError, match=f"{path}: {message}"):
        load_tokenizer(path)


def test_bos_id_outside_the_vocabulary_fails_the_model_config_too(tmp_path: Path) -> None:
    path = _with_metadata(tmp_path / "bos.gguf", {"tokenizer.ggml.bos_token_id": 1e6})
    with pytest.raises(ValueError, match="tokenizer.ggml.bos_token_id = 1000000.0 must be an "
                                         "integer"):
        load_gguf(path)


# --- pre-tokenizers (llama.cpp's rules) -----------------------------------------------------
def _pieces(name: str, text: str) -> list[str]:
    """The pre-tokenizer's pieces, mapped back from byte-level symbols to text."""
    from tokenizers import decoders

    to_text = decoders.ByteLevel()
    return [to_text.decode([piece]) for piece, _ in _pre_tokenizer(name).pre_tokenize_str(text)]


@pytest.mark.parametrize("name, text, expected", [
    # llama.cpp "default": punctuation runs, then GPT-2's rule, then digits in threes
    ("default", "Hello, world!!! 12345 $100", ["Hello", ",", " world", "!!!", " ", "123", "45",
                                                " ", "$", "100"]),
    ("default", "don't 1234567", ["don", "'", "t", " ", "123", "456", "7"]),
    ("default", "a+=b|c", ["a", "+=", "b", "|", "c"]),
    # GPT-2's rule keeps " 12345" whole and glues punctuation to a leading space
    ("gpt-2", "Hello, world!!! 12345 $100", ["Hello", ",", " world", "!!!", " 12345", " $",
                                              "100"]),
    # DeepSeek LLM: letter runs, then runs of ASCII punctuation *and letters* (its third regex
    # spans ':'-'~'), so a Greek word splits at its first ASCII letter; digits in one run
    ("deepseek-llm", "x_y \u03a9mega 12345 ok!", ["x", "_", "y", " \u03a9", "mega", " ", "12345",
                                                 " ok", "!"]),
    ("deepseek-coder", "ab 123", ["ab", " ", "1", "2", "3"]),
    # DeepSeek V3: digits in threes first, then a punctuation mark may lead a word
    ("deepseek-v3", "x=12345 _yo", ["x", "=", "123", "45", " _", "yo"]),
])
def test_pre_tokenizers_split_like_llama_cpp(name: str, text: str, expected: list[str]) -> None:
    assert _pieces(name, text) == expected


PRE_SAMPLES = ["Hello, world!!! 12345 $100", "don't 1234567", "a+=b|c", "x_y \u03a9mega 12 ok!",
               "\u65e5\u672c\u8a9e text 3.14159", "  spaces\n\ttabs  "]


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python is not installed")
@pytest.mark.parametrize("pre", ["default", "gpt-2", "deepseek-llm", "deepseek-coder",
                                 "deepseek-v3"])
def test_pre_tokenizers_tokenize_like_llama_cpp(tmp_path: Path, pre: str) -> None:
    """The same GGUF (no tokenizer.huggingface.json, so the pre name decides) tokenized by
    llama.cpp and by dsmoe."""
    import llama_cpp

    tok = Tokenizer.train_bpe(PRE_SAMPLES * 20, vocab_size=300)
    path = _with_metadata(tmp_path / f"{pre}.gguf", {"tokenizer.ggml.pre": pre}, tok)
    ours = load_tokenizer(path)
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    for text in PRE_SAMPLES:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == ours.encode(
            text, add_bos=False), text


def test_every_pre_tokenizer_compiles() -> None:
    from dsmoe.checkpoint.gguf.vocab import PRE_TOKENIZER_REGEXES

    for name in ("gpt-2", "gpt2", *PRE_TOKENIZER_REGEXES):
        assert "".join(_pieces(name, "ok, 1 ünï 日本")) == "ok, 1 ünï 日本", name


# --- HF shard index (names outside the directory: test_checkpoint_hf) -------------------
def test_shard_index_inside_the_directory_and_symlinked_shards_still_load(tmp_path: Path) -> None:
    model = make_model()
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    blob = tmp_path / "blobs" / "abc"  # the HF hub cache: snapshot files link to blobs/
    blob.parent.mkdir()
    (model_dir / hf.WEIGHTS_NAME).rename(blob)
    (model_dir / "w.safetensors").symlink_to(blob)
    names = list(hf.hf_shapes(model))
    (model_dir / hf.INDEX_NAME).write_text(json.dumps(
        {"weight_map": {name: "w.safetensors" for name in names}}))
    loaded = Transformer.from_pretrained(model_dir)
    ids = torch.randint(0, 320, (1, 5))
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_tensor_claiming_more_elements_than_the_file_holds(tmp_path: Path, memory_cap) -> None:
    record = _string("token_embd.weight") + struct.pack("<I", 2) + struct.pack(
        "<QQ", 1 << 40, 1 << 30) + struct.pack("<IQ", 0, 0)
    path = tmp_path / "dims.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 0) + record + b"\0" * 64)
    with pytest.raises(ValueError, match=r"tensor 'token_embd.weight' claims dimensions "
                                         r"\[1099511627776, 1073741824\]"):
        GGUFFile(path)


@pytest.mark.parametrize("changes, message", [
    ({"tokenizer.huggingface.json": "{not json"},
     "tokenizer.huggingface.json does not describe a valid tokenizer"),
    ({"tokenizer.ggml.merges": ["nosuch token"]},
     "tokenizer.ggml.tokens/tokenizer.ggml.merges does not describe a valid tokenizer"),
])
def test_tokenizer_contents_that_tokenizers_rejects(tmp_path: Path, tok: Tokenizer,
                                                    changes: dict, message: str) -> None:
    path = _tokenizer_gguf(tmp_path / "tok.gguf", _tokenizer_meta(tok, **changes))
    with pytest.raises(ValueError, match=f"{path}: {message}"):
        load_tokenizer(path)


def test_a_chat_template_file_that_is_not_utf8(tmp_path: Path, tok: Tokenizer) -> None:
    tok.save(tmp_path)
    (tmp_path / "chat_template.jinja").write_bytes(b"{{ bos_token }}\xff\xfe")
    with pytest.raises(ValueError, match="cannot read .*chat_template.jinja"):
        Tokenizer.from_file(tmp_path)
