"""Reading GGUF files: validation, metadata, and tensors dequantised one at a time.

Design choices:
- ``gguf.GGUFReader`` memory-maps the file; tensor data is read (and dequantised) only when
  a tensor is asked for, one at a time, so peak memory is the output plus one tensor.
- Every problem is a ``ValueError`` that names the file and the fix: not GGUF, truncated,
  unknown tensor type, unsupported architecture, metadata contradicting tensor shapes,
  missing or unexpected tensors.
- Q8_0 and Q4_0 (the formats ``dsmoe export`` writes) dequantise with torch; other types
  (Q4_K, Q6_K, ...) go through ``gguf.quants.dequantize``.

Shapes: torch order throughout (GGUF's ``ne`` lists dimensions innermost first).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Iterator

import gguf
import numpy as np
import torch

from dsmoe.checkpoint.gguf import metadata
from dsmoe.checkpoint.gguf.header import check_header
from dsmoe.checkpoint.gguf.names import (TensorSpec, from_llama_rope_rows, join_kv_b,
                                         rope_tail_rows, tensor_specs)
from dsmoe.checkpoint.gguf.vocab import TokenizerData
from dsmoe.config import ModelConfig

Q = gguf.GGMLQuantizationType
_MISSING = object()
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


class GGUFFile:
    """A validated, memory-mapped GGUF file: ``get(key)`` metadata, ``tensors`` by name."""

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
        check_header(self.path)  # before GGUFReader, which believes every count it reads
        try:
            self.reader = gguf.GGUFReader(self.path)
        except ValueError as exc:
            if "GGMLQuantizationType" in str(exc):
                raise ValueError(f"{self.path}: unknown GGML tensor type ({exc}); the file may "
                                 "come from a newer llama.cpp than the installed gguf package"
                                 ) from exc
            if "cannot reshape" in str(exc):  # gguf maps each tensor: the data ends early
                raise ValueError(f"{self.path}: truncated GGUF file: the tensor data ends "
                                 f"early (the file has {size} bytes)") from exc
            raise ValueError(f"{self.path}: cannot parse GGUF (truncated or corrupt?): {exc}"
                             ) from exc
        except (IndexError, OverflowError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{self.path}: cannot parse GGUF (truncated or corrupt?): "
                             f"{type(exc).__name__}: {exc}") from exc
        self.tensors: dict[str, Any] = {t.name: t for t in self.reader.tensors}
        for t in self.reader.tensors:
            end = int(t.data_offset) + int(t.n_bytes)
            if end > size:
                raise ValueError(f"{self.path}: truncated GGUF file: tensor {t.name} ends at "
                                 f"byte {end}, the file has {size} bytes")

    def get(self, key: str, default: Any = _MISSING) -> Any:
        """A metadata value (str, number, bool or list); ``default`` when absent."""
        field = self.reader.get_field(key)
        if field is None:
            if default is _MISSING:
                raise ValueError(f"{self.path}: required metadata key {key!r} is missing")
            return default
        return field.contents()

    def config(self) -> ModelConfig:
        shapes = {name: tuple(int(n) for n in t.shape.tolist()) for name, t in self.tensors.items()}
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
        found = {name: tuple(int(n) for n in reversed(t.shape.tolist()))
                 for name, t in self.tensors.items()}
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
        Always a fresh tensor (never a view of the read-only memory map)."""
        t = self.tensors[spec.gguf_name]
        out = dequantize(t.data, Q(t.tensor_type), spec.shape, f"{self.path}: {spec.gguf_name}")
        out = out.to(dtype)
        if spec.rope_heads is not None:
            out = from_llama_rope_rows(out, spec.rope_heads)
        if spec.rope_tail is not None:
            out = rope_tail_rows(out, spec.rope_tail, to_llama=False)
        return out

    def load_int4(self, spec: TensorSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """A Q4_0 tensor as dsmoe's symmetric int4 (``q4_0_as_int4``), rows in HF order."""
        t = self.tensors[spec.gguf_name]
        if Q(t.tensor_type) != Q.Q4_0:
            raise ValueError(f"{self.path}: {spec.gguf_name} is {Q(t.tensor_type).name}, "
                             "not Q4_0")
        q, scale = q4_0_as_int4(t.data, spec.shape)
        if spec.rope_heads is not None:
            q, scale = (from_llama_rope_rows(v, spec.rope_heads) for v in (q, scale))
        return q, scale

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


def dequantize(data: np.ndarray, qtype: gguf.GGMLQuantizationType, shape: tuple[int, ...],
               what: str) -> torch.Tensor:
    """GGUF tensor data (as ``GGUFReader`` maps it) -> a torch tensor of ``shape``
    (float32, or the stored float type for F16/BF16)."""
    with warnings.catch_warnings():  # torch warns that the memory map is read-only
        warnings.simplefilter("ignore", UserWarning)
        if qtype == Q.F32:
            return torch.from_numpy(np.ascontiguousarray(data)).reshape(shape).clone()
        if qtype == Q.F16:
            return torch.from_numpy(np.ascontiguousarray(data)).reshape(shape).clone()
        raw = torch.from_numpy(np.ascontiguousarray(data).reshape(-1))  # uint8 bytes
        if qtype == Q.BF16:
            return raw.view(torch.bfloat16).reshape(shape).clone()
        if qtype == Q.Q8_0:  # blocks of 32: f16 scale d, 32 x int8 q; x = d * q
            blocks = raw.view(-1, 34)
            d = blocks[:, :2].contiguous().view(torch.float16).float()  # [n, 1]
            q = blocks[:, 2:].contiguous().view(torch.int8).float()  # [n, 32]
            return (d * q).reshape(shape)
        if qtype == Q.Q4_0:  # blocks of 32: f16 d, 16 bytes; low nibbles 0..15, high 16..31
            blocks = raw.view(-1, 18)
            d = blocks[:, :2].contiguous().view(torch.float16).float()  # [n, 1]
            packed = blocks[:, 2:].to(torch.int16)  # [n, 16]
            q = torch.cat([packed & 0x0F, packed >> 4], dim=1).float() - 8.0  # [n, 32]
            return (d * q).reshape(shape)
    try:
        values = gguf.quants.dequantize(np.asarray(data), qtype)
    except NotImplementedError as exc:
        raise ValueError(f"{what}: tensor type {qtype.name} cannot be dequantised by the "
                         "installed gguf package") from exc
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape)


def q4_0_as_int4(data: np.ndarray, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0 data of a tensor ``shape`` [..., N, K] -> dsmoe's symmetric int4 without
    dequantizing: q uint8 [..., N, K/2] (the same 4-bit values, in the canonical nibble
    order) and scale bf16 [..., N, K/32] (the fp16 block scales rounded to bf16: a relative
    change of at most 2^-9, far below the 4-bit step)."""
    from dsmoe import native
    from dsmoe.quant.kernels import pack_nibbles

    with warnings.catch_warnings():  # torch warns that the memory map is read-only
        warnings.simplefilter("ignore", UserWarning)
        blocks = torch.from_numpy(np.ascontiguousarray(data).reshape(-1)).view(-1, 18)
    *lead, N, K = shape
    converted = native.q4_0_to_int4(blocks)
    if converted is None:  # no C compiler: the same in torch ops
        d = blocks[:, :2].contiguous().view(torch.float16)  # [n, 1]
        values = torch.cat([blocks[:, 2:] & 0x0F, blocks[:, 2:] >> 4], dim=1)  # [n, 32]
        converted = pack_nibbles(values), d.to(torch.bfloat16)
    q, scale = converted
    return q.reshape(*lead, N, K // 2), scale.reshape(*lead, N, K // 32)


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
