"""Reading GGUF files fast and lean: dsmoe's own header parser against gguf-py's on files
dsmoe and llama.cpp's converter write, hostile headers, and tensor data read (not mapped)
in chunks straight into the final buffers.

Shapes: E experts, F expert width, D hidden.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from test_gguf import make_model, tokenizer  # noqa: F401 - tokenizer is a fixture
from test_gguf_mla import _LLAMA_DIR, convert_with_llama_cpp, mla_model

from dsmoe.checkpoint.gguf import GGUFFile, reader, write_model_gguf
from dsmoe.checkpoint.gguf.header import read_header
from dsmoe.cli import main
from dsmoe.quant import load_model

STRING, ARRAY = 8, 9


def _same_as_gguf_py(path: Path) -> None:
    """Every metadata value and tensor record equals what gguf.GGUFReader reads."""
    ours = read_header(path)
    theirs = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in theirs.fields.items()
              if not name.startswith("GGUF.")}  # gguf-py's pseudo-fields (header counts)
    assert ours.fields.keys() == fields.keys()
    for key, value in fields.items():
        assert ours.fields[key] == value and type(ours.fields[key]) is type(value), key
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for mine, t in zip(ours.tensors, theirs.tensors):
        assert mine.ne == tuple(int(n) for n in t.shape), t.name
        assert (mine.tensor_type, mine.offset, mine.n_bytes) == (
            int(t.tensor_type), int(t.data_offset), int(t.n_bytes)), t.name



def _q4_0_as_int4(data: np.ndarray, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: a whole tensor's Q4_0 bytes [..., N, K] -> q uint8 [..., N, K/2] and scale
    bf16 [..., N, K/32] in one ``q4_0_into`` call (the reader converts chunk by chunk)."""
    *lead, N, K = shape
    blocks = torch.from_numpy(np.array(data).reshape(-1)).view(-1, 18)  # [n, 18]
    q = torch.empty(*lead, N, K // 2, dtype=torch.uint8)
    scale = torch.empty(*lead, N, K // 32, dtype=torch.bfloat16)
    reader.q4_0_into(blocks, q.view(-1, 16), scale.view(-1))
    return q, scale


def test_header_equals_gguf_py_on_a_dsmoe_file(tmp_path: Path, tokenizer) -> None:  # noqa: F811
    path = tmp_path / "m.gguf"
    write_model_gguf(make_model(), path, tokenizer, quant="q4_0")
    _same_as_gguf_py(path)
    assert len(read_header(path).fields["tokenizer.ggml.tokens"]) == 320


@pytest.mark.slow
@pytest.mark.skipif(not _LLAMA_DIR or not (Path(_LLAMA_DIR) / "convert_hf_to_gguf.py").is_file(),
                    reason="set DSMOE_LLAMA_CPP_DIR to a llama.cpp checkout to run its converter")
def test_header_equals_gguf_py_on_a_converter_file(tmp_path: Path, tokenizer) -> None:  # noqa: F811
    _same_as_gguf_py(convert_with_llama_cpp(tmp_path, mla_model("v2_lite"), tokenizer, "q8_0"))


def _mapped(path: Path) -> list[str]:
    """Lines of /proc/self/maps that map ``path``."""
    return [line for line in Path("/proc/self/maps").read_text().splitlines()
            if line.endswith(str(path))]


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/maps")
def test_loading_keeps_no_mapping_of_the_file(tmp_path: Path) -> None:
    """File pages of a memory map that were touched count in the process's RSS (RssFile):
    gguf-py's reader kept the whole file mapped, so a 9 GB model counted twice. The file
    is read into the process's own buffers instead, and nothing of it stays mapped."""
    path = tmp_path / "m.gguf"
    write_model_gguf(make_model(), path, quant="q4_0")
    f = GGUFFile(path)
    assert f.get("general.architecture") == "deepseek" and not _mapped(path)
    model = load_model(path, quant="int4")
    assert not _mapped(path)
    experts = model.layers[1].mlp.experts.gate_up_proj
    assert experts.qweight.untyped_storage().resizable()  # torch's memory, not a file view
    del f


def test_chunked_reads_equal_whole_tensor_reads(tmp_path: Path, monkeypatch) -> None:
    """Q8_0 / Q4_0 tensors are read and converted a few MB at a time; with chunks of a
    few blocks the result is still gguf-py's dequantization, and int4 the same blocks."""
    path = tmp_path / "m.gguf"
    write_model_gguf(make_model(), path, quant="q4_0")
    monkeypatch.setattr(reader, "_CHUNK_BYTES", 5 * 34)  # 5 blocks (Q8_0), 9 (Q4_0)
    f = GGUFFile(path)
    source = gguf.GGUFReader(path)
    for t in source.tensors:
        info = f.tensors[t.name]
        shape = tuple(reversed(info.ne))
        if t.tensor_type not in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0):
            continue
        expected = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type))
        assert torch.equal(f.read_float(info, shape, torch.float32), expected.reshape(shape))
        if t.tensor_type == gguf.GGMLQuantizationType.Q4_0:
            q, scale = _q4_0_as_int4(t.data, shape)
            mine_q, mine_scale = torch.empty_like(q), torch.empty_like(scale)
            f.read_int4(info, mine_q, mine_scale)
            assert torch.equal(mine_q, q) and torch.equal(mine_scale.view(torch.int16),
                                                          scale.view(torch.int16))


def test_int4_experts_land_in_their_stacked_slots(tmp_path: Path) -> None:
    """Each expert's gate rows, then its up rows, of gate_up_proj [E, 2F, D], converted
    into place from ffn_gate_exps / ffn_up_exps (the stacking moe_from_hf does)."""
    path = tmp_path / "m.gguf"
    write_model_gguf(make_model(), path, quant="q4_0")
    model = load_model(path, quant="int4")
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    experts = model.layers[1].mlp.experts
    E, F2, half = experts.gate_up_proj.qweight.shape
    for part, name in enumerate(("ffn_gate_exps", "ffn_up_exps")):
        t = tensors[f"blk.1.{name}.weight"]
        q, scale = _q4_0_as_int4(t.data, (E, F2 // 2, 2 * half))
        rows = slice(part * F2 // 2, (part + 1) * F2 // 2)
        assert torch.equal(experts.gate_up_proj.qweight[:, rows], q)
        assert torch.equal(experts.gate_up_proj.scale[:, rows].view(torch.int16),
                           scale.view(torch.int16))


def test_quantize_int8_in_row_chunks_equals_the_whole_matrix() -> None:
    from dsmoe.quant import kernels

    w = torch.randn(9, 1 << 20)  # 4 rows per chunk of 2^22 values: three chunks
    expected_scale = (w.abs().amax(dim=-1) / 127.0).to(torch.bfloat16)
    expected_q = torch.round(w / expected_scale.float().unsqueeze(-1)).clamp(-127, 127)
    q, scale = kernels.quantize_int8(w.reshape(3, 3, -1))
    assert q.shape == (3, 3, 1 << 20) and scale.shape == (3, 3)
    assert torch.equal(scale.reshape(-1).view(torch.int16), expected_scale.view(torch.int16))
    assert torch.equal(q.reshape(9, -1), expected_q.to(torch.int8))


# --- hostile headers -------------------------------------------------------------------------
def _kv(key: str, value_type: int, payload: bytes) -> bytes:
    raw = key.encode()
    return struct.pack("<Q", len(raw)) + raw + struct.pack("<I", value_type) + payload


def _tokens(*pieces: bytes, count: int | None = None) -> bytes:
    """tokenizer.ggml.tokens as an array of strings given as raw (length-prefixed) bytes."""
    return _kv("tokenizer.ggml.tokens", ARRAY, struct.pack(
        "<IQ", STRING, len(pieces) if count is None else count) + b"".join(pieces))


def _string(raw: bytes, claimed: int | None = None) -> bytes:
    return struct.pack("<Q", len(raw) if claimed is None else claimed) + raw


@pytest.mark.parametrize("kv, message", [
    (_tokens(_string(b"ok"), _string(b"cut", claimed=1 << 20)),
     r"metadata key 'tokenizer.ggml.tokens' needs 1048576 bytes"),
    (_tokens(_string(b"a"), count=1 << 40),
     r"metadata key 'tokenizer.ggml.tokens' \(1099511627776 elements\) needs"),
    (_tokens(_string(b"\xff\xfe")),
     r"metadata key 'tokenizer.ggml.tokens' is not valid UTF-8"),
    (_kv("general.alignment", 4, struct.pack("<I", 48)),
     r"metadata general.alignment = 48 must be a positive power of two"),
    (_kv("general.name", 13, b"\0" * 8), r"metadata key 'general.name' has unknown value type 13"),
])
def test_hostile_headers_fail_in_one_line(tmp_path: Path, capsys, kv: bytes,
                                          message: str) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + kv + b"\0" * 32)
    with pytest.raises(ValueError, match=rf"^{path}: .*{message}"):
        GGUFFile(path)
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err


def test_duplicate_tensor_names_are_refused(tmp_path: Path) -> None:
    record = _string(b"output_norm.weight") + struct.pack("<IQIQ", 1, 8, 0, 0)
    path = tmp_path / "twice.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 2, 0) + record * 2 + b"\0" * 64)
    with pytest.raises(ValueError, match="tensor output_norm.weight is listed twice"):
        GGUFFile(path)


def test_a_large_vocabulary_parses_in_well_under_a_second(tmp_path: Path) -> None:
    """102,400 tokens and as many merges (deepseek-moe's vocabulary size): gguf-py's reader
    took 30-55 s on a loaded machine; the bound here is loose for slow CI machines."""
    import time

    path = tmp_path / "vocab.gguf"
    w = gguf.GGUFWriter(str(path), "deepseek")
    w.add_token_list([f"tok{i}" for i in range(102400)])
    w.add_token_merges([f"t ok{i}" for i in range(102400)])
    w.add_token_types([1] * 102400)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    start = time.perf_counter()
    header = read_header(path)
    took = time.perf_counter() - start
    assert header.fields["tokenizer.ggml.tokens"][-1] == "tok102399"
    assert header.fields["tokenizer.ggml.token_type"] == [1] * 102400
    assert took < 5.0, f"parsing took {took:.1f} s"


def test_f32_file_of_the_other_byte_order_reads_the_same(tmp_path: Path) -> None:
    """gguf-py writes big-endian files too; float tensors read back byte-swapped."""
    model = make_model()
    little, big = tmp_path / "le.gguf", tmp_path / "be.gguf"
    write_model_gguf(model, little, quant="f32")
    source = gguf.GGUFReader(little)
    w = gguf.GGUFWriter(str(big), "deepseek", endianess=gguf.GGUFEndian.BIG)
    for field in source.fields.values():
        if field.name.startswith(("GGUF.", "general.architecture")):
            continue
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            w.add_array(field.name, field.contents())
        else:
            w.add_key_value(field.name, field.contents(), kind)
    for t in source.tensors:
        w.add_tensor(t.name, np.array(t.data),  # the writer swaps the bytes
                     raw_shape=list(reversed(t.shape.tolist())))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    a, b = GGUFFile(little), GGUFFile(big)
    assert not b.little_endian and a.fields == b.fields
    info = b.tensors["blk.1.ffn_down_exps.weight"]
    shape = tuple(reversed(info.ne))
    assert torch.equal(b.read_float(info, shape, torch.float32),
                       a.read_float(a.tensors[info.name], shape, torch.float32))
