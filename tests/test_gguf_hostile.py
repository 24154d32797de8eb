"""Hostile GGUF files the header parser alone cannot refuse: duplicate metadata keys,
tensor records whose offsets, types or dimensions do not describe the data section's
layout, and a file that changes between parsing its header and reading its tensors. Each
must fail with one line naming the file and the key or tensor, never load garbage.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from test_gguf import make_model

from dsmoe.checkpoint.gguf import GGUFFile, write_model_gguf
from dsmoe.cli import main


def _assert_one_line_error(path: Path, capsys, message: str) -> None:
    with pytest.raises(ValueError, match=rf"^{path}: .*{message}"):
        GGUFFile(path)
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err


def test_a_metadata_key_given_twice_is_refused(tmp_path: Path, capsys) -> None:
    """Which of two values counts would be a guess (llama.cpp refuses such files too)."""
    path = tmp_path / "twice.gguf"
    w = gguf.GGUFWriter(str(path), "deepseek")
    w.add_block_count(3)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    data = path.read_bytes()
    count = struct.unpack_from("<Q", data, 16)[0]
    key = b"deepseek.block_count"
    entry = struct.pack("<Q", len(key)) + key + struct.pack("<II", 4, 1)  # block_count = 1
    path.write_bytes(data[:16] + struct.pack("<Q", count + 1) + data[24:] + entry)
    _assert_one_line_error(path, capsys, "metadata key 'deepseek.block_count' appears twice")


def _two_tensors(path: Path) -> bytes:
    """An F32 ``a`` [64] and ``b`` [32]: b's data starts 256 bytes into the data section."""
    w = gguf.GGUFWriter(str(path), "deepseek")
    w.add_tensor("a", np.ones(64, np.float32))
    w.add_tensor("b", np.full(32, 2.0, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def _record_field(data: bytes, name: bytes, field: str) -> int:
    """Where the one-dimensional tensor record ``name``'s type or offset is stored."""
    start = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name) + 4 + 8
    return start if field == "type" else start + 4


@pytest.mark.parametrize("name, field, value, message", [
    (b"b", "offset", 0, "tensor b starts at byte \\d+, but the tensors before it end at"),
    (b"b", "offset", 257, "tensor b starts at byte"),  # misaligned (and overlapping nothing)
    (b"b", "offset", 288, "tensor b starts at byte"),  # aligned, but a gap before it
    (b"a", "type", int(gguf.GGMLQuantizationType.F16), "tensor b starts at byte"),
    (b"a", "type", int(gguf.GGMLQuantizationType.Q8_0), "tensor b starts at byte"),
])
def test_tensor_records_must_describe_the_data_layout(tmp_path: Path, capsys, name: bytes,
                                                      field: str, value: int,
                                                      message: str) -> None:
    """Overlapping, misaligned or gapped offsets, or a type changed so that the data no
    longer ends where the next tensor starts, all read some other tensor's bytes as this
    one's; llama.cpp refuses them (gguf.cpp: "tensor ... has offset ..., expected ...")."""
    path = tmp_path / "layout.gguf"
    data = bytearray(_two_tensors(path))
    at = _record_field(bytes(data), name, field)
    data[at:at + (8 if field == "offset" else 4)] = struct.pack(
        "<Q" if field == "offset" else "<I", value)
    path.write_bytes(bytes(data))
    _assert_one_line_error(path, capsys, message)


def test_the_unchanged_layout_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "layout.gguf"
    _two_tensors(path)
    f = GGUFFile(path)
    b = f.tensors["b"]
    assert torch.equal(f.read_float(b, b.shape, torch.float32), torch.full((32,), 2.0))


def _replace(path: Path) -> None:
    """Another file of the same size under the same name (a re-export, say)."""
    other = path.with_suffix(".new")
    other.write_bytes(path.read_bytes()[:-64] + b"\x7f" * 64)
    os.replace(other, path)


@pytest.mark.parametrize("change", [_replace, lambda path: os.truncate(path, 4096)],
                         ids=["replaced", "truncated"])
def test_a_file_changed_after_its_header_was_read_is_refused(tmp_path: Path, change) -> None:
    """The header's offsets describe the old file: reading the new one as if they did would
    load garbage silently (a same-size replacement) or fail without naming the tensor."""
    path = tmp_path / "m.gguf"
    write_model_gguf(make_model(), path, quant="q4_0")
    f = GGUFFile(path)
    t = f.tensors["blk.1.ffn_gate_exps.weight"]  # Q4_0, read into int4 or dequantized
    change(path)
    message = (rf"^{path}: the file changed since its header was read "
               rf"\(before reading tensor {t.name}\)")
    with pytest.raises(ValueError, match=message):
        f.read_float(t, t.shape, torch.float32)
    *lead, N, K = t.shape
    with pytest.raises(ValueError, match=message):
        f.read_int4(t, torch.empty(*lead, N, K // 2, dtype=torch.uint8),
                    torch.empty(*lead, N, K // 32, dtype=torch.bfloat16))


_TRUNCATE_WHILE_PARSING = """
import os, sys
from pathlib import Path
from dsmoe.checkpoint.gguf import header

path = Path(sys.argv[1])
parse_value = header._value

def truncating(cur, value_type, what, depth):
    if depth == 0 and "tokens" in what:  # past the first buffered MiB, before the rest
        os.truncate(path, 4096)
    return parse_value(cur, value_type, what, depth)

header._value = truncating
try:
    header.read_header(path)
except ValueError as exc:
    print(exc)
"""


def test_a_file_truncated_while_its_header_is_parsed_is_an_error(tmp_path: Path) -> None:
    """A header of 2.4 MB (a large vocabulary) cut short mid-parse, as when the same path
    is exported again: parsing through a memory map died with SIGBUS (in a subprocess
    here, so that the suite survives it)."""
    import subprocess
    import sys

    path = tmp_path / "vocab.gguf"
    w = gguf.GGUFWriter(str(path), "deepseek")
    w.add_token_list([f"token{i:06d}" for i in range(150_000)])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    assert path.stat().st_size > 2 << 20
    done = subprocess.run([sys.executable, "-c", _TRUNCATE_WHILE_PARSING, str(path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"died with {done.returncode}: {done.stderr[-500:]}"
    assert done.stdout.startswith(f"{path}: cannot parse GGUF")
    assert "metadata key 'tokenizer.ggml.tokens'" in done.stdout
    assert "changed while being read?" in done.stdout


@pytest.mark.parametrize("as_int4", [False, True], ids=["dequantized", "int4"])
def test_a_file_shrinking_between_chunks_of_a_tensor_names_it(tmp_path: Path, monkeypatch,
                                                              as_int4: bool) -> None:
    """Past the check at open, the file can still shrink between two chunk reads."""
    from dsmoe.checkpoint.gguf import reader

    path = tmp_path / "m.gguf"
    write_model_gguf(make_model(), path, quant="q4_0")
    f = GGUFFile(path)
    t = f.tensors["blk.1.ffn_gate_exps.weight"]  # Q4_0 [E, F, D]
    monkeypatch.setattr(reader, "_CHUNK_BYTES", 18 * 4)  # four blocks per read
    convert = reader.q4_0_into if as_int4 else reader.dequantize_blocks

    def shrink_then(*args):  # after the first chunk: cut the file inside this tensor
        os.truncate(path, t.offset + 18 * 6)
        return convert(*args)

    monkeypatch.setattr(reader, "q4_0_into" if as_int4 else "dequantize_blocks", shrink_then)
    message = (rf"^{path}: truncated GGUF file: the data of tensor {t.name} ends at byte "
               rf"{t.offset + 18 * 6}")
    *lead, N, K = t.shape
    with pytest.raises(ValueError, match=message):
        if as_int4:
            f.read_int4(t, torch.empty(*lead, N, K // 2, dtype=torch.uint8),
                        torch.empty(*lead, N, K // 32, dtype=torch.bfloat16))
        else:
            f.read_float(t, t.shape, torch.float32)


@pytest.mark.parametrize("value", [[2], "q4_0"], ids=["list", "string"])
def test_a_file_type_that_is_not_an_integer_is_refused(tmp_path: Path, value) -> None:
    """general.file_type picks the stored dtype and the int4 fast path; a list made a
    TypeError traceback (unhashable), a string was silently read as float32."""
    from test_hostile_readers import _with_metadata

    from dsmoe.quant import load_model

    path = _with_metadata(tmp_path / "typed.gguf", {"general.file_type": value})
    message = rf"^{path}: metadata general.file_type = .* must be an integer"
    with pytest.raises(ValueError, match=message):
        load_model(path)
    with pytest.raises(ValueError, match=message):
        load_model(path, quant="int4")
