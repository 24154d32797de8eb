"""Writing llama.cpp "deepseek" / "deepseek2" GGUF files from HF-named weights or a model.

Design choices:
- Streaming: all tensor infos are declared first (their sizes follow from shape and type),
  then tensors are converted and written one at a time, so memory holds one tensor (one
  layer's stacked experts at most) beyond the source weights.
- Atomic (``dsmoe.io.atomic_path``): the file is written next to the target and moved into
  place with ``os.replace``, with a plain file's mode; disk full leaves nothing behind.
- Tensor types follow llama.cpp's converter: norms, biases and the router stay F32; the rest
  take the requested type; a row length that is not a multiple of the 32-element block
  falls back to F16. For ``q4_0`` the embedding and output matrices are written as Q8_0
  (llama.cpp's q4_0 presets also keep ``output`` at higher precision).
- V3's multi-token-prediction layer (``num_nextn_predict_layers``, stored as layer L of an
  HF checkpoint) is skipped with a warning: dsmoe does not run it and llama.cpp's converter
  leaves it out too.
- Quantisation uses ``gguf.quants`` (the reference implementation of llama.cpp's formats);
  BF16 and F16 are plain casts.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Callable, Iterator, Mapping

import gguf
import numpy as np
import torch
from torch import nn

from dsmoe.checkpoint import keys
from dsmoe.checkpoint.gguf import metadata
from dsmoe.checkpoint.gguf.names import (TensorSpec, kv_b_half, rope_tail_rows, tensor_specs,
                                         to_llama_rope_rows)
from dsmoe.checkpoint.gguf.vocab import TokenizerData
from dsmoe.config import ModelConfig
from dsmoe.io import atomic_path, disk_errors
from dsmoe.tokenizer import Tokenizer

Q = gguf.GGMLQuantizationType
QUANT_TYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (Q.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}
_BLOCK = 32  # Q8_0 / Q4_0 block length
_HF_EXPERT = re.compile(r"^model\.(?P<prefix>layers\.\d+\.mlp\.)experts\.(?P<e>\d+)\."
                        r"(?P<proj>gate|up|down)_proj\.weight$")


def tensor_type(spec: TensorSpec, quant: str) -> gguf.GGMLQuantizationType:
    """The GGML type ``spec`` is stored in for the ``quant`` preset."""
    wanted = QUANT_TYPES[quant][0]
    if spec.keep_f32 or len(spec.shape) == 1:
        return Q.F32
    if wanted in (Q.Q8_0, Q.Q4_0):
        if spec.shape[-1] % _BLOCK:
            return Q.F16
        if wanted == Q.Q4_0 and spec.gguf_name in ("token_embd.weight", "output.weight"):
            return Q.Q8_0
    return wanted


def encode(tensor: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """A float tensor -> the bytes (or float array) GGUF stores for ``qtype``."""
    if qtype == Q.F32:
        return tensor.detach().to(torch.float32).contiguous().numpy()
    if qtype == Q.F16:
        return tensor.detach().to(torch.float16).contiguous().numpy()
    if qtype == Q.BF16:
        bits = tensor.detach().to(torch.bfloat16).contiguous().view(torch.int16).numpy()
        return bits.view(np.uint8)
    return gguf.quants.quantize(tensor.detach().to(torch.float32).contiguous().numpy(), qtype)


def write_gguf(path: str | os.PathLike, config: ModelConfig,
               hf_state_dict: Mapping[str, torch.Tensor],
               tokenizer: Tokenizer | TokenizerData | None = None, *, quant: str = "f16",
               name: str = "dsmoe", progress: Callable[[int, int], None] | None = None) -> None:
    """Write ``hf_state_dict`` (HF DeepSeek names, per-expert tensors) as a llama.cpp
    "deepseek" (V1) or "deepseek2" (MLA) GGUF with tensors of type ``quant`` (f32, f16,
    bf16, q8_0, q4_0).
    ``hf_state_dict`` may be lazy (``HFDirectoryState``): each tensor is read when written.
    ``progress(done, total)`` is called after each GGUF tensor."""
    if quant not in QUANT_TYPES:
        raise ValueError(f"unknown GGUF quant type {quant!r}; choose one of "
                         f"{', '.join(QUANT_TYPES)}")
    problems = metadata.llama_cpp_problems(config)
    if problems:
        warnings.warn("llama.cpp will run this model differently from dsmoe: "
                      + "; ".join(problems), stacklevel=2)
    _check_sources(tensor_specs(config), hf_state_dict, config)
    write_gguf_tensors(path, config, lambda spec, qtype: encode(
        _gguf_tensor(spec, hf_state_dict), qtype), tokenizer, quant=quant, name=name,
        progress=progress)


def write_gguf_tensors(path: str | os.PathLike, config: ModelConfig,
                       tensor_data: Callable[[TensorSpec, gguf.GGMLQuantizationType],
                                             np.ndarray],
                       tokenizer: Tokenizer | TokenizerData | None = None, *,
                       quant: str = "f16", name: str = "dsmoe",
                       progress: Callable[[int, int], None] | None = None) -> None:
    """``write_gguf``'s file, each tensor's stored data made by ``tensor_data(spec, type)``
    (a float array for F32/F16, else the uint8 bytes, [..., bytes per row]) when it is
    written: e.g. random Q4_0 blocks of a benchmark model whose floats would not fit."""
    if quant not in QUANT_TYPES:
        raise ValueError(f"unknown GGUF quant type {quant!r}; choose one of "
                         f"{', '.join(QUANT_TYPES)}")
    specs = tensor_specs(config)
    if isinstance(tokenizer, Tokenizer):
        tokenizer = TokenizerData.from_tokenizer(tokenizer, config.vocab_size)
    elif tokenizer is not None and len(tokenizer.tokens) != config.vocab_size:
        raise ValueError(f"the tokenizer lists {len(tokenizer.tokens)} tokens but vocab_size is "
                         f"{config.vocab_size}; llama.cpp needs them equal")

    types = [tensor_type(s, quant) for s in specs]
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory; a GGUF is written as a file")
    with atomic_path(path) as tmp, disk_errors(path, lambda: _file_size(specs, types)):
        writer = gguf.GGUFWriter(tmp, metadata.architecture(config).name)
        try:
            metadata.write_metadata(writer, config, file_type=QUANT_TYPES[quant][1], name=name)
            if tokenizer is not None:
                tokenizer.write(writer)
            for spec, qtype in zip(specs, types):
                _declare(writer, spec, qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for done, (spec, qtype) in enumerate(zip(specs, types), start=1):
                writer.write_tensor_data(tensor_data(spec, qtype))
                if progress is not None:
                    progress(done, len(specs))
        finally:
            writer.close()


def _file_size(specs: list[TensorSpec], types: list[gguf.GGMLQuantizationType]) -> int:
    """Bytes of tensor data the file holds (what a disk-full message says it needs)."""
    size = 0
    for spec, qtype in zip(specs, types):
        block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
        size += int(np.prod(spec.shape)) // block * nbytes
    return size


def write_model_gguf(model: nn.Module, path: str | os.PathLike,
                     tokenizer: Tokenizer | TokenizerData | None = None, *,
                     quant: str = "f16", name: str = "dsmoe",
                     progress: Callable[[int, int], None] | None = None) -> None:
    """``write_gguf`` for a dsmoe ``Transformer``: its stacked experts are read as views,
    never split into per-expert copies."""
    write_gguf(path, model.config, ModelAsHF(model.state_dict()), tokenizer, quant=quant,
               name=name, progress=progress)


class HFDirectoryState(Mapping[str, torch.Tensor]):
    """The tensors of an HF safetensors directory, read one at a time on access, so a GGUF
    can be written from a checkpoint larger than memory."""

    def __init__(self, directory: str | os.PathLike) -> None:
        from dsmoe.checkpoint.hf import weight_files

        self._files = weight_files(directory)
        self._handles: dict[Path, object] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        file = self._files[name]
        if file not in self._handles:
            self._handles[file] = safe_open(file, framework="pt")
        return self._handles[file].get_tensor(name)  # type: ignore[attr-defined]

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


class ModelAsHF(Mapping[str, torch.Tensor]):
    """A dsmoe state dict seen under HF names (``model.`` prefix, per-expert tensors as views
    of the stacked ``gate_up_proj [E, 2F, D]`` / ``down_proj [E, D, F]``)."""

    def __init__(self, native: Mapping[str, torch.Tensor]) -> None:
        self._native = native
        self._names: list[str] = []
        for key, value in native.items():
            if key.endswith("experts.gate_up_proj"):
                prefix = key[: -len("experts.gate_up_proj")]
                self._names += [f"model.{prefix}experts.{e}.{p}_proj.weight"
                                for e in range(value.shape[0]) for p in ("gate", "up")]
            elif key.endswith("experts.down_proj"):
                prefix = key[: -len("experts.down_proj")]
                self._names += [f"model.{prefix}experts.{e}.down_proj.weight"
                                for e in range(value.shape[0])]
            else:
                self._names.append(key if key.startswith("lm_head.") else f"model.{key}")

    def __getitem__(self, name: str) -> torch.Tensor:
        match = _HF_EXPERT.match(name)
        if match is None:
            native = name if name.startswith("lm_head.") else name.removeprefix("model.")
            return self._native[native]
        prefix, e, proj = match["prefix"], int(match["e"]), match["proj"]
        if proj == "down":
            return self._native[f"{prefix}experts.down_proj"][e]
        gate_up = self._native[f"{prefix}experts.gate_up_proj"][e]  # [2F, D]
        half = gate_up.shape[0] // 2
        return gate_up[:half] if proj == "gate" else gate_up[half:]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _check_sources(specs: list[TensorSpec], state: Mapping[str, torch.Tensor],
                   config: ModelConfig) -> None:
    needed = {n: s for s in specs for n in s.hf_names}
    optional = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = [n for n in needed if n not in state]
    others, mtp = keys.split_mtp([n for n in state if n not in needed and n not in optional],
                                 config.num_hidden_layers, config.num_nextn_predict_layers)
    if mtp:
        warnings.warn(f"the multi-token-prediction layer ({len(mtp)} tensors of layer "
                      f"{config.num_hidden_layers}) is not exported: dsmoe does not run it and "
                      "llama.cpp's deepseek2 files leave it out", stacklevel=3)
    unexpected = others
    per_tensor = {n: s.source_shape for n, s in needed.items()}
    mismatched = [f"{n} (expected {list(per_tensor[n])}, got {list(state[n].shape)})"
                  for n in needed if n in state and tuple(state[n].shape) != per_tensor[n]]
    problems = [f"{label}: {', '.join(items[:5])}" + (f" and {len(items) - 5} more"
                                                       if len(items) > 5 else "")
                for label, items in (("missing", missing), ("unexpected", unexpected),
                                     ("shape mismatch", mismatched)) if items]
    if problems:
        raise ValueError("state dict does not match the config: " + "; ".join(problems))


def _declare(writer: gguf.GGUFWriter, spec: TensorSpec, qtype: gguf.GGMLQuantizationType) -> None:
    if qtype in (Q.F32, Q.F16):
        dtype = np.dtype(np.float32 if qtype == Q.F32 else np.float16)
        nbytes = int(np.prod(spec.shape)) * dtype.itemsize
        writer.add_tensor_info(spec.gguf_name, spec.shape, dtype, nbytes)
    else:
        byte_shape = gguf.quants.quant_shape_to_byte_shape(spec.shape, qtype)
        writer.add_tensor_info(spec.gguf_name, byte_shape, np.dtype(np.uint8),
                               int(np.prod(byte_shape)), raw_dtype=qtype)


def _gguf_tensor(spec: TensorSpec, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The tensor GGUF stores for ``spec``: experts stacked, q/k rows in llama.cpp order,
    MLA's kv_b_proj split per head."""
    if spec.stacked:
        value = torch.stack([state[n].detach() for n in spec.hf_names])
    else:
        value = state[spec.hf_names[0]].detach()
    if spec.kv_b_part is not None:
        value = kv_b_half(value, spec)
    if spec.rope_heads is not None:
        value = to_llama_rope_rows(value, spec.rope_heads)
    if spec.rope_tail is not None:
        value = rope_tail_rows(value, spec.rope_tail, to_llama=True)
    return value
