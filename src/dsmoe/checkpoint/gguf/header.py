"""Parse a GGUF header (metadata and tensor records), bounds-checking every count first.

Why not ``gguf.GGUFReader``: it believes every count it reads (a 151-byte file claiming a
metadata array of 2**50 elements makes it loop and append 2**50 times, because reads past
the end of its memory map return empty arrays), and it builds numpy views per string, so a
102,400-token vocabulary took 30-55 s. This parser holds every claimed count against the
bytes that are left -- each array element, key and tensor record takes at least a fixed
number of bytes -- so a lie fails in O(file size) with one line that names the file and the
key, nothing is allocated in proportion to a claim, and a vocabulary parses in well under a
second (one ``struct`` read per string, numpy for arrays of numbers).

Values come out as ``GGUFReader``'s ``field.contents()`` gives them: int / float / bool / str,
lists of those for arrays. The header is read (not mapped) into a buffer that grows as the
parse needs it, so no page of the file stays counted in the process's RSS and a file
truncated meanwhile is an error, not a SIGBUS.

Layout (GGUF v2/v3): magic, u32 version, u64 tensor count, u64 key/value count; per key: a
string (u64 length + bytes), u32 value type, the value (arrays: u32 element type, u64
count, elements); per tensor: name string, u32 dimension count, u64 dims (``ne``, innermost
first), u32 GGML type, u64 offset into the data section, which starts at the next multiple
of ``general.alignment`` (default 32) after the records.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

# GGUF value type -> struct code of the fixed-size ones (numpy takes the same codes).
_FIXED = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
          12: "d"}
_STRING, _ARRAY = 8, 9
_MIN_KV_BYTES = 8 + 4 + 1  # empty key, value type, a one-byte value
_MIN_TENSOR_BYTES = 8 + 4 + 4 + 8  # empty name, no dims, type, offset
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_NESTING = 8  # arrays of arrays: llama.cpp writes none; refuse deep recursion
_DEFAULT_ALIGNMENT = 32  # GGUF_DEFAULT_ALIGNMENT
_FIRST_READ = 1 << 20  # a small model's whole header; larger ones grow the buffer


@dataclass(frozen=True)
class TensorInfo:
    """One tensor record: ``ne`` in GGUF order (innermost first), ``offset`` absolute."""

    name: str
    ne: tuple[int, ...]
    tensor_type: int  # a gguf.GGMLQuantizationType value
    offset: int  # first byte of the data in the file
    n_bytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """Torch order (outermost first)."""
        return tuple(reversed(self.ne))

    @property
    def n_elements(self) -> int:
        return math.prod(self.ne)


@dataclass(frozen=True)
class Header:
    fields: dict[str, Any]  # key -> value
    tensors: list[TensorInfo]  # file order
    data_start: int  # first byte of the data section
    little_endian: bool = True
    alignment: int = _DEFAULT_ALIGNMENT  # of every tensor's offset in the data section


class _Cursor:
    """Reads little- or big-endian values from the open file ``fh``, refusing to read past
    its end. The bytes come through a buffer that grows (at least doubling) as the parse
    needs them, not a memory map: a mapped file truncated while being parsed (the same path
    exported again, say) kills the process with SIGBUS instead of raising an error."""

    def __init__(self, fh: Any, path: Path) -> None:
        self.fh, self.path, self.order, self.pos = fh, path, "<", 0
        self.size = os.fstat(fh.fileno()).st_size  # claims are held against this
        self.data = bytearray(fh.read(min(self.size, _FIRST_READ)))

    def fail(self, what: str) -> ValueError:
        return ValueError(f"{self.path}: cannot parse GGUF (truncated or corrupt?): {what}")

    def left(self) -> int:
        return self.size - self.pos

    def need(self, n: int, what: str) -> None:
        """``n`` more bytes must exist: claims larger than the file are refused here."""
        if n > self.left():
            raise self.fail(f"{what} needs {n} bytes at offset {self.pos}, the file has only "
                            f"{self.left()} left")
        if self.pos + n > len(self.data):
            self._read_to(self.pos + n, what)

    def _read_to(self, end: int, what: str) -> None:
        """Buffer the file up to at least byte ``end``, which ``size`` said exists."""
        self.data += self.fh.read(min(self.size, max(end, 2 * len(self.data))) - len(self.data))
        if len(self.data) < end:
            raise self.fail(f"{what}: the file ends at byte {len(self.data)}, but had "
                            f"{self.size} bytes when it was opened (changed while being read?)")

    def scalar(self, code: str, what: str) -> Any:
        size = struct.calcsize(code)
        self.need(size, what)
        (value,) = struct.unpack_from(self.order + code, self.data, self.pos)
        self.pos += size
        return value

    def uint(self, size: int, what: str) -> int:
        return self.scalar({4: "I", 8: "Q"}[size], what)

    def raw_string(self, what: str) -> bytes:
        n = self.uint(8, what)
        self.need(n, what)
        self.pos += n
        return self.data[self.pos - n:self.pos]

    def string(self, what: str) -> str:
        raw = self.raw_string(what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.fail(f"{what} is not valid UTF-8 ({exc.reason} at byte {exc.start})"
                            ) from None

    def numbers(self, code: str, count: int, what: str) -> list:
        dtype = np.dtype(code).newbyteorder(self.order)
        self.need(count * dtype.itemsize, f"{what} ({count} elements)")
        values = np.frombuffer(self.data, dtype, count, self.pos).tolist()
        self.pos += count * dtype.itemsize
        return values


def read_header(path: Path) -> Header:
    """The metadata and tensor records of the GGUF at ``path``; ValueError (one line,
    naming the file and the key or tensor) when a count or length claims more than the
    file holds, or a value or type is unknown."""
    with open(path, "rb") as fh:
        return _parse(_Cursor(fh, path))


def _parse(cur: _Cursor) -> Header:
    path = cur.path
    cur.pos = 4
    version = cur.uint(4, "the version")
    if version & 0xFFFF == 0:  # big-endian files: as gguf-py tells them
        cur.order, cur.pos = ">", 4
        version = cur.uint(4, "the version")
    if version not in (2, 3):
        raise ValueError(f"{path}: GGUF version {version} is not supported (dsmoe reads "
                         "versions 2 and 3)")
    n_tensors = cur.uint(8, "the tensor count")
    n_kv = cur.uint(8, "the metadata count")
    cur.need(n_kv * _MIN_KV_BYTES, f"{n_kv} metadata entries")
    fields: dict[str, Any] = {}
    for i in range(n_kv):
        key = cur.raw_string(f"metadata key #{i}").decode("utf-8", "replace")
        if key in fields:  # which copy counts is a guess; llama.cpp refuses such files too
            raise cur.fail(f"metadata key {key!r} appears twice")
        value_type = cur.uint(4, f"the type of metadata key {key!r}")
        fields[key] = _value(cur, value_type, f"metadata key {key!r}", 0)
    cur.need(n_tensors * _MIN_TENSOR_BYTES, f"{n_tensors} tensor records")
    records = [_tensor_record(cur, i, cur.size) for i in range(n_tensors)]
    alignment = fields.get("general.alignment", _DEFAULT_ALIGNMENT)
    if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment <= 0 \
            or alignment & (alignment - 1):
        raise ValueError(f"{path}: metadata general.alignment = {alignment!r} must be a "
                         "positive power of two")
    start = -(-cur.pos // alignment) * alignment
    tensors = [TensorInfo(name, ne, kind, start + offset, n_bytes)
               for name, ne, kind, offset, n_bytes in records]
    return Header(fields, tensors, start, cur.order == "<", alignment)


def _value(cur: _Cursor, value_type: int, what: str, depth: int) -> Any:
    if value_type in _FIXED:
        return cur.scalar(_FIXED[value_type], what)
    if value_type == _STRING:
        return cur.string(what)
    if value_type != _ARRAY:
        raise ValueError(f"{cur.path}: {what} has unknown value type {value_type} "
                         "(corrupt file, or a newer GGUF version)")
    item_type = cur.uint(4, what)
    count = cur.uint(8, what)
    if item_type in _FIXED:
        return cur.numbers(_FIXED[item_type], count, what)
    if item_type not in (_STRING, _ARRAY) or depth >= _MAX_NESTING:
        raise ValueError(f"{cur.path}: {what} is an array of unknown or too deeply nested "
                         f"type {item_type} (corrupt file)")
    cur.need(count * 8, f"{what} ({count} elements)")  # each element: >= a u64 length
    if item_type == _STRING:
        return [cur.string(what) for _ in range(count)]
    return [_value(cur, _ARRAY, what, depth + 1) for _ in range(count)]


def _tensor_record(cur: _Cursor, i: int, file_size: int
                   ) -> tuple[str, tuple[int, ...], int, int, int]:
    """(name, ne, type, offset in the data section, bytes) of tensor record ``i``."""
    path = cur.path
    name = cur.raw_string(f"the name of tensor #{i}").decode("utf-8", "replace")
    n_dims = cur.uint(4, f"tensor {name!r}")
    if n_dims > _MAX_DIMS:
        raise ValueError(f"{path}: tensor {name!r} claims {n_dims} dimensions; GGUF tensors "
                         f"have at most {_MAX_DIMS} (corrupt file)")
    ne = tuple(cur.uint(8, f"tensor {name!r}") for _ in range(n_dims))
    if math.prod(ne) > 8 * file_size:  # no GGML type stores a weight in under a bit
        raise ValueError(f"{path}: tensor {name!r} claims dimensions {list(ne)}, more elements "
                         f"than a {file_size}-byte file can hold (corrupt file)")
    kind = cur.uint(4, f"tensor {name!r}")
    offset = cur.uint(8, f"tensor {name!r}")
    try:
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)]
    except (ValueError, KeyError):
        raise ValueError(f"{path}: tensor {name!r} has unknown GGML tensor type {kind}; the "
                         "file may come from a newer llama.cpp than the installed gguf "
                         "package") from None
    if n_dims and ne[0] % block:
        raise ValueError(f"{path}: tensor {name!r} has rows of {ne[0]} elements, not a "
                         f"multiple of its type's {block}-element block (corrupt file)")
    return name, ne, kind, offset, math.prod(ne) // block * type_size
