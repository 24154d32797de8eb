"""Bounds-check a GGUF header before anything trusts its counts.

``gguf.GGUFReader`` believes every count it reads: a 151-byte file claiming a metadata array
of 2**50 elements makes it loop (and append) 2**50 times, because reads past the end of the
memory map return empty arrays instead of failing. This walk runs first and holds every claimed
count against the bytes that are left -- each array element, key and tensor record takes at
least a fixed number of bytes -- so a lie fails in O(file size) with one line that names the
file and the key, and nothing is allocated in proportion to a claim.

Layout (GGUF v2/v3): magic, u32 version, u64 tensor count, u64 key/value count; per key: a
string (u64 length + bytes), u32 value type, the value (arrays: u32 element type, u64
count, elements); per tensor: name string, u32 dimension count, u64 dims, u32 type, u64 offset.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

# GGUF value type -> bytes per value, for the fixed-size ones.
_FIXED_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
_MIN_KV_BYTES = 8 + 4 + 1  # empty key, value type, a one-byte value
_MIN_TENSOR_BYTES = 8 + 4 + 4 + 8  # empty name, no dims, type, offset
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_NESTING = 8  # arrays of arrays: llama.cpp writes none; refuse deep recursion


class _Cursor:
    """Reads little- or big-endian integers from ``data``, refusing to read past its end."""

    def __init__(self, data: bytes, path: Path, order: str) -> None:
        self.data, self.path, self.order, self.pos = data, path, order, 0

    def left(self) -> int:
        return len(self.data) - self.pos

    def need(self, n: int, what: str) -> None:
        """``n`` more bytes must exist: claims larger than the file are refused here."""
        if n > self.left():
            raise ValueError(f"{self.path}: cannot parse GGUF (truncated or corrupt?): {what} "
                             f"needs {n} bytes at offset {self.pos}, the file has only "
                             f"{self.left()} left")

    def uint(self, size: int, what: str) -> int:
        self.need(size, what)
        fmt = self.order + {4: "I", 8: "Q"}[size]
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return value

    def skip(self, n: int, what: str) -> None:
        self.need(n, what)
        self.pos += n

    def string(self, what: str) -> bytes:
        n = self.uint(8, what)
        self.need(n, what)
        self.pos += n
        return self.data[self.pos - n:self.pos]


def check_header(path: Path) -> None:
    """Raise ValueError when a count or length in the header claims more than the file holds."""
    data = path.read_bytes() if path.stat().st_size < (1 << 20) else _mapped(path)
    version = struct.unpack_from("<I", data, 4)[0]
    order = ">" if version & 0xFFFF == 0 else "<"  # big-endian files: as gguf-py tells them
    version = struct.unpack_from(order + "I", data, 4)[0]
    if version not in (2, 3):
        raise ValueError(f"{path}: GGUF version {version} is not supported (dsmoe reads "
                         "versions 2 and 3)")
    cur = _Cursor(data, path, order)
    cur.pos = 8
    n_tensors = cur.uint(8, "the tensor count")
    n_kv = cur.uint(8, "the metadata count")
    cur.need(n_kv * _MIN_KV_BYTES, f"{n_kv} metadata entries")
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}").decode("utf-8", "replace")
        value_type = cur.uint(4, f"the type of metadata key {key!r}")
        _skip_value(cur, value_type, f"metadata key {key!r}", 0)
    cur.need(n_tensors * _MIN_TENSOR_BYTES, f"{n_tensors} tensor records")
    for i in range(n_tensors):
        name = cur.string(f"the name of tensor #{i}").decode("utf-8", "replace")
        n_dims = cur.uint(4, f"tensor {name!r}")
        if n_dims > _MAX_DIMS:
            raise ValueError(f"{path}: tensor {name!r} claims {n_dims} dimensions; GGUF tensors "
                             f"have at most {_MAX_DIMS} (corrupt file)")
        dims = [cur.uint(8, f"tensor {name!r}") for _ in range(n_dims)]
        if math.prod(dims) > 8 * len(data):  # no GGML type stores a weight in under a bit
            raise ValueError(f"{path}: tensor {name!r} claims dimensions {dims}, more elements "
                             f"than a {len(data)}-byte file can hold (corrupt file)")
        cur.skip(4 + 8, f"tensor {name!r}")


def _skip_value(cur: _Cursor, value_type: int, what: str, depth: int) -> None:
    if value_type in _FIXED_SIZE:
        cur.skip(_FIXED_SIZE[value_type], what)
    elif value_type == _STRING:
        cur.string(what)
    elif value_type == _ARRAY:
        item_type = cur.uint(4, what)
        count = cur.uint(8, what)
        if item_type in _FIXED_SIZE:
            cur.skip(count * _FIXED_SIZE[item_type], f"{what} ({count} elements)")
            return
        if item_type not in (_STRING, _ARRAY) or depth >= _MAX_NESTING:
            raise ValueError(f"{cur.path}: {what} is an array of unknown or too deeply nested "
                             f"type {item_type} (corrupt file)")
        cur.need(count * 8, f"{what} ({count} elements)")  # each element: >= a u64 length
        for _ in range(count):
            _skip_value(cur, item_type, what, depth + 1)
    else:
        raise ValueError(f"{cur.path}: {what} has unknown value type {value_type} "
                         "(corrupt file, or a newer GGUF version)")


def _mapped(path: Path):
    """A read-only memory map: headers of multi-GB files are read without loading them."""
    import mmap

    with open(path, "rb") as fh:
        return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
