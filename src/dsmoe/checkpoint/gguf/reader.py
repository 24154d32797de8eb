"""Reading GGUF files: validation, metadata, and tensors dequantised one at a time.

Design choices:
- The header is parsed by ``header.read_header`` (bounded, fast); tensor data is read (and
  dequantised) only when a tensor is asked for, one at a time, in chunks of a few MB
  straight into the output (a Q4_0 matrix into the final int4 buffers, an expert's rows
  into its slot of the stacked matrix), so peak memory is the output plus one chunk.
- Reads, not a memory map: pages of a mapped file that were touched stay counted in the
  process's RSS (RssFile) until unmapped; for a 9 GB model that doubled the peak.
- Every problem is a ``ValueError`` that names the file and the fix: not GGUF, truncated,
  unknown tensor type, unsupported architecture, metadata contradicting tensor shapes,
  missing or unexpected tensors.
- Q8_0 and Q4_0 (the formats ``dsmoe export`` writes) dequantise with torch; other types
  (Q4_K, Q6_K, ...) go through ``gguf.quants.dequantize``.

Shapes: torch order throughout (GGUF's ``ne`` lists dimensions innermost first).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import gguf
import numpy as np
import torch

from dsmoe.checkpoint.gguf import metadata
from dsmoe.checkpoint.gguf.header import Header, TensorInfo, read_header
from dsmoe.checkpoint.gguf.names import (TensorSpec, from_llama_rope_rows, join_kv_b,
                                         rope_tail_rows, tensor_specs)
from dsmoe.checkpoint.gguf.vocab import TokenizerData
from dsmoe.config import ModelConfig

Q = gguf.GGMLQuantizationType
_MISSING = object()
_FLOAT_TYPES = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}
_BLOCK_BYTES = {Q.Q8_0: 34, Q.Q4_0: 18}  # 32 values per block
# Bytes per read: large enough to stream at disk speed, small next to any layer.
_CHUNK_BYTES = 4 << 20
_HEADER_BYTES = 24  # magic, version, tensor count, kv count
# Which metadata keys fix the shape of each kind of tensor (for error messages).
_SHAPE_KEYS = {
    "token_embd": "vocab_size, embedding_length", "output": "vocab_size, embedding_length",
    "attn_q": "attention.head_count, embedding_length (MLA: key_length_mla)",
    "attn_k": "attention.head_count_kv, embedding_length",
    "attn_v": "attention.head_count_kv, embedding_length",
    "attn_output": "attention.head_count, embedding_length (MLA: value_length_mla)",
    "attn_q_a": "attention.q_lora_rank, embedding_length",
    "attn_q_a_norm": "attention.q_lora_rank",
    "attn_q_b": "attention.head_count, key_length_mla, attention.q_lora_rank",
    "attn_kv_a_mqa": "attention.kv_lora_rank, rope.dimension_count, embedding_length",
    "attn_kv_a_norm": "attention.kv_lora_rank",
    "attn_k_b": "attention.head_count, attention.kv_lora_rank, key_length_mla, "
                "rope.dimension_count",
    "attn_v_b": "attention.head_count, value_length_mla, attention.kv_lora_rank",
    "attn_kv_b": "attention.head_count, key_length, value_length, attention.kv_lora_rank",
    "ffn_gate_inp": "expert_count, embedding_length", "exp_probs_b": "expert_count",
    "exps": "expert_count, expert_feed_forward_length, embedding_length",
    "shexp": "expert_shared_count, expert_feed_forward_length, embedding_length",
    "dense": "feed_forward_length, leading_dense_block_count, embedding_length",
}



def _hf_rows(spec: TensorSpec, rows: torch.Tensor) -> torch.Tensor:
    """A tensor's rows (weights, or an int4 matrix's nibbles and scales, row for row) with
    llama.cpp's q/k row order undone: per-head pairs (MHA) or MLA's rope tail."""
    if spec.rope_heads is not None:
        rows = from_llama_rope_rows(rows, spec.rope_heads)
    if spec.rope_tail is not None:
        rows = rope_tail_rows(rows, spec.rope_tail, to_llama=False)
    return rows

class GGUFFile:
    """A validated GGUF file (read, not mapped): ``get(key)`` metadata, ``tensors`` by name."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {self.path}")
        size = self.path.stat().st_size
        with open(self.path, "rb") as fh:
            magic = fh.read(4)
        if magic != b"GGUF":
            raise ValueError(f"{self.path}: not a GGUF file (starts with {magic!r}, "
                             "expected b'GGUF')")
        if size < _HEADER_BYTES:
            raise ValueError(f"{self.path}: truncated GGUF file ({size} bytes)")
        with open(self.path, "rb") as fh:
            self._identity = _identity(os.fstat(fh.fileno()))
        header = read_header(self.path)
        self.fields: dict[str, Any] = header.fields
        self.tensors = _index_tensors(self.path, header, size)
        self.little_endian = header.little_endian

    def get(self, key: str, default: Any = _MISSING) -> Any:
        """A metadata value (str, number, bool or list); ``default`` when absent."""
        value = self.fields.get(key, _MISSING)
        if value is _MISSING:
            if default is _MISSING:
                raise ValueError(f"{self.path}: required metadata key {key!r} is missing")
            return default
        return value

    def config(self) -> ModelConfig:
        shapes = {name: t.ne for name, t in self.tensors.items()}
        return metadata.read_config(self.get, shapes, str(self.path))

    def tokenizer_data(self) -> TokenizerData | None:
        try:
            return TokenizerData.read(self.get)
        except ValueError as exc:
            raise ValueError(f"{self.path}: {exc}") from exc

    def check_tensors(self, config: ModelConfig) -> list[TensorSpec]:
        """The file's tensors against what the metadata implies; one ValueError lists all
        missing, unexpected and misshapen tensors. Returns the specs in file order."""
        # llama.cpp's converter splits MLA's kv_b per head; older files keep it whole
        whole = any(name.endswith(".attn_kv_b.weight") for name in self.tensors)
        specs = tensor_specs(config, kv_b="whole" if whole else "split")
        expected = {s.gguf_name: s for s in specs}
        found = {name: t.shape for name, t in self.tensors.items()}
        optional = {"rope_freqs.weight"}  # llama3-style RoPE factors: unused by DeepSeek V1
        missing = [n for n in expected if n not in found]
        unexpected = [n for n in found if n not in expected and n not in optional]
        mismatched = [f"{n} is {list(found[n])} in the file, the metadata "
                      f"({_shape_keys(n)}) implies {list(expected[n].shape)}"
                      for n in expected if n in found and found[n] != expected[n].shape]
        problems = []
        if mismatched:
            problems.append("metadata contradicts tensor shapes: " + _few(mismatched, 3))
        if missing:
            problems.append("missing tensors: " + _few(missing))
        if unexpected:
            problems.append("unexpected tensors: " + _few(unexpected))
        if problems:
            raise ValueError(f"{self.path}: " + "; ".join(problems))
        return specs

    def load(self, spec: TensorSpec, dtype: torch.dtype) -> torch.Tensor:
        """One tensor in torch order and ``dtype``, with llama.cpp's q/k row order undone.
        Always a fresh tensor of the process's own memory (the file is read, not mapped)."""
        return _hf_rows(spec, self.read_float(self.tensors[spec.gguf_name], spec.shape, dtype))

    def load_int4(self, spec: TensorSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """A Q4_0 tensor as dsmoe's symmetric int4 (``q4_0_into``), rows in HF order."""
        *lead, N, K = spec.shape
        q = torch.empty(*lead, N, K // 2, dtype=torch.uint8)
        scale = torch.empty(*lead, N, K // 32, dtype=torch.bfloat16)
        self.read_int4(self.tensors[spec.gguf_name], q, scale)
        return _hf_rows(spec, q), _hf_rows(spec, scale)

    def read_int4(self, t: TensorInfo, q: torch.Tensor, scale: torch.Tensor,
                  first_block: int = 0) -> None:
        """The Q4_0 blocks of ``t`` from ``first_block`` on, converted into the caller's
        contiguous ``q`` (uint8, 16 bytes per block) and ``scale`` (bf16, one per block),
        e.g. one expert's rows of a stacked matrix. Read in chunks: nothing but the final
        buffers grows with the tensor."""
        if Q(t.tensor_type) != Q.Q4_0:
            raise ValueError(f"{self.path}: {t.name} is {Q(t.tensor_type).name}, not Q4_0")
        self._check_little_endian(t)
        q_blocks, scales = q.view(-1, 16), scale.view(-1)  # [n, 16], [n]
        with self._open(t) as fh:
            for first, raw in self._chunks(fh, t, first_block, scales.numel()):
                rows = slice(first, first + raw.shape[0])
                q4_0_into(raw, q_blocks[rows], scales[rows])

    def read_float(self, t: TensorInfo, shape: tuple[int, ...], dtype: torch.dtype
                   ) -> torch.Tensor:
        """Tensor ``t`` as a fresh ``dtype`` tensor of ``shape``. Q8_0 / Q4_0 are
        dequantized chunk by chunk into the output (no full-size float temporaries)."""
        qtype = Q(t.tensor_type)
        if qtype in _FLOAT_TYPES:
            stored = torch.empty(shape, dtype=_FLOAT_TYPES[qtype])
            with self._open(t) as fh:
                _read_into(fh, stored.reshape(-1).view(torch.uint8), t.offset, self.path,
                           t.name)
            if not self.little_endian:  # gguf-py reads such files; so does dsmoe
                bits = stored.view({4: torch.int32, 2: torch.int16}[stored.element_size()])
                stored = torch.from_numpy(bits.numpy().byteswap()).view(stored.dtype)
            return stored.to(dtype)
        self._check_little_endian(t)
        if qtype in _BLOCK_BYTES:
            out = torch.empty(shape, dtype=dtype)
            flat = out.view(-1, 32)  # [n blocks, 32]
            with self._open(t) as fh:
                for first, raw in self._chunks(fh, t, 0, flat.shape[0]):
                    flat[first:first + raw.shape[0]] = dequantize_blocks(raw, qtype)
            return out
        raw = torch.empty(t.n_bytes, dtype=torch.uint8)
        with self._open(t) as fh:
            _read_into(fh, raw, t.offset, self.path, t.name)
        data = raw.numpy().reshape(*shape[:-1], -1)  # [..., bytes per row], as gguf-py wants
        return dequantize(data, qtype, shape, f"{self.path}: {t.name}").to(dtype)

    def _open(self, t: TensorInfo):  # noqa: ANN202 - a raw file object
        """The file, unbuffered, if it is still the one whose header was parsed: a file
        rewritten or replaced since (same name, other bytes) would otherwise be read as if
        its tensors were where the old header put them, and load garbage silently."""
        fh = open(self.path, "rb", buffering=0)
        if _identity(os.fstat(fh.fileno())) != self._identity:
            fh.close()
            raise ValueError(f"{self.path}: the file changed since its header was read "
                             f"(before reading tensor {t.name}): load it again")
        return fh

    def _chunks(self, fh, t: TensorInfo, first_block: int, n_blocks: int
                ) -> Iterator[tuple[int, torch.Tensor]]:
        """(index of the first block, raw blocks uint8 [n, block bytes]) over blocks
        [first_block, first_block + n_blocks) of ``t``, through one reused buffer."""
        size = _BLOCK_BYTES[Q(t.tensor_type)]
        if (first_block + n_blocks) * size > t.n_bytes:
            raise ValueError(f"internal error: blocks up to {first_block + n_blocks} of "
                             f"{t.name}, which has {t.n_bytes // size}")
        per_chunk = max(1, _CHUNK_BYTES // size)
        buffer = torch.empty(min(per_chunk, n_blocks), size, dtype=torch.uint8)
        for done in range(0, n_blocks, per_chunk):
            raw = buffer[:min(per_chunk, n_blocks - done)]
            _read_into(fh, raw.view(-1), t.offset + (first_block + done) * size, self.path,
                       t.name)
            yield done, raw

    def _check_little_endian(self, t: TensorInfo) -> None:
        if not self.little_endian:
            raise ValueError(f"{self.path}: {t.name}: {Q(t.tensor_type).name} data of a "
                             "big-endian GGUF is not supported (only float tensors are)")

    def hf_tensors(self, spec: TensorSpec, dtype: torch.dtype, *, copy_experts: bool = True
                   ) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, tensor) pairs of one GGUF tensor: stacked experts come out per expert
        (views of one buffer unless ``copy_experts``); MLA's per-head ``attn_k_b`` and
        ``attn_v_b`` come out as one kv_b_proj, with the first."""
        if spec.kv_b_part == "v":
            return
        value = self.load(spec, dtype)
        if spec.partner is not None:
            value = join_kv_b(value, self.load(spec.partner, dtype))
        if not spec.stacked:
            yield spec.hf_names[0], value
            return
        for name, piece in zip(spec.hf_names, value.unbind(0)):
            yield name, piece.clone() if copy_experts else piece


def _identity(st: os.stat_result) -> tuple[int, ...]:
    """What changes when a file is rewritten, replaced or truncated."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _index_tensors(path: Path, header: Header, size: int) -> dict[str, TensorInfo]:
    """The tensor records by name, laid out as llama.cpp requires: each tensor's data
    right after the previous one's (padded to the alignment), inside the file. Overlapping,
    misaligned or reordered offsets, and a record whose type or dimensions were changed
    (its data no longer ends where the next tensor starts), are refused here: read as
    claimed, they would load garbage silently."""
    tensors: dict[str, TensorInfo] = {}
    expected = header.data_start  # where the next tensor's data must start
    for t in header.tensors:
        if t.name in tensors:
            raise ValueError(f"{path}: tensor {t.name} is listed twice (corrupt file)")
        if t.offset != expected:
            raise ValueError(f"{path}: tensor {t.name} starts at byte {t.offset}, but the "
                             f"tensors before it end at byte {expected} (GGUF tensors lie back "
                             f"to back, each aligned to {header.alignment} bytes): corrupt file")
        if t.offset + t.n_bytes > size:
            raise ValueError(f"{path}: truncated GGUF file: the tensor data ends early "
                             f"(tensor {t.name} ends at byte {t.offset + t.n_bytes}, the "
                             f"file has {size} bytes)")
        expected += -(-t.n_bytes // header.alignment) * header.alignment
        tensors[t.name] = t
    return tensors


def _read_into(fh, out: torch.Tensor, offset: int, path: Path, name: str) -> None:
    """Fill the contiguous uint8 ``out`` with tensor ``name``'s bytes from ``offset`` on. A read
    into the process's own memory, not a memory map: the page cache it goes through is
    not counted in this process's RSS, and nothing of the file stays resident in it."""
    view = memoryview(out.numpy()).cast("B")
    fh.seek(offset)
    done = 0
    while done < len(view):
        got = fh.readinto(view[done:])
        if not got:
            raise ValueError(f"{path}: truncated GGUF file: the data of tensor {name} ends "
                             f"at byte {offset + done} (did the file shrink while being read?)")
        done += got


def dequantize_blocks(raw: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> torch.Tensor:
    """Q8_0 / Q4_0 blocks uint8 [n, block bytes] -> float32 [n, 32]."""
    if qtype == Q.Q8_0:  # blocks of 32: f16 scale d, 32 x int8 q; x = d * q
        d = raw[:, :2].contiguous().view(torch.float16).float()  # [n, 1]
        return d * raw[:, 2:].contiguous().view(torch.int8).float()
    # Q4_0: blocks of 32: f16 d, 16 bytes; low nibbles are values 0..15, high 16..31
    d = raw[:, :2].contiguous().view(torch.float16).float()  # [n, 1]
    packed = raw[:, 2:].to(torch.int16)  # [n, 16]
    return d * (torch.cat([packed & 0x0F, packed >> 4], dim=1).float() - 8.0)


def dequantize(data: np.ndarray, qtype: gguf.GGMLQuantizationType, shape: tuple[int, ...],
               what: str) -> torch.Tensor:
    """GGUF data (bytes [..., bytes per row]) of a type dsmoe does not read itself (Q4_K,
    Q6_K, ...; ``read_float`` reads the float types and Q8_0 / Q4_0) -> float32 ``shape``,
    through gguf-py."""
    try:
        values = gguf.quants.dequantize(np.asarray(data), qtype)
    except NotImplementedError as exc:
        raise ValueError(f"{what}: tensor type {qtype.name} cannot be dequantised by the "
                         "installed gguf package") from exc
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape)


def q4_0_into(blocks: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> None:
    """Q4_0 blocks uint8 [n, 18] -> dsmoe's symmetric int4 in the caller's contiguous
    ``q`` uint8 [n, 16] (the same 4-bit values, canonical nibble order) and ``scale`` bf16
    [n] (the fp16 block scales rounded to bf16: a relative change of at most 2^-9, far
    below the 4-bit step)."""
    from dsmoe import native
    from dsmoe.quant.kernels import pack_nibbles

    if native.q4_0_to_int4(blocks, out=(q, scale)) is None:  # no C compiler: torch ops
        values = torch.cat([blocks[:, 2:] & 0x0F, blocks[:, 2:] >> 4], dim=1)  # [n, 32]
        q.copy_(pack_nibbles(values))
        scale.copy_(blocks[:, :2].contiguous().view(torch.float16).view(-1))


def read_gguf(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32
              ) -> tuple[ModelConfig, dict[str, torch.Tensor], TokenizerData | None]:
    """(config, state dict with HF DeepSeek names, tokenizer facts or None) of a "deepseek"
    or "deepseek2" GGUF. Tensors are dequantised to ``dtype``; q/k rows are back in HF order."""
    f = GGUFFile(path)
    config = f.config()
    specs = f.check_tensors(config)
    state: dict[str, torch.Tensor] = {}
    for spec in specs:
        state.update(f.hf_tensors(spec, dtype))
    return config, state, f.tokenizer_data()


def _shape_keys(name: str) -> str:
    parts = name.split(".")
    base = parts[2] if parts[0] == "blk" and len(parts) > 2 else parts[0]
    if base.endswith(("_exps", "_shexp")):
        base = base.rsplit("_", 1)[1]
    elif base in ("ffn_gate", "ffn_up", "ffn_down"):
        base = "dense"
    return _SHAPE_KEYS.get(base, "embedding_length")


def _few(items: list[str], n: int = 5) -> str:
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more
