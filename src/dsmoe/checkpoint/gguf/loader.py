"""GGUF -> a dsmoe ``Transformer`` (and tokenizer), one layer at a time.

``gguf_source`` is the GGUF adapter of ``checkpoint.loading`` (which builds the model on
meta, fills it and materializes it): it parses and validates the file (metadata ->
ModelConfig, tensors against it), and per layer dequantises the tensors, undoes llama.cpp's
q/k row order and stacks the experts (``checkpoint.keys.moe_from_hf``).
Peak memory: the model in the requested dtype plus one layer's float tensors.
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Iterator

import torch
from torch import nn

from dsmoe.checkpoint import keys
from dsmoe.checkpoint.dtypes import DTYPES
from dsmoe.checkpoint.gguf.names import TensorSpec
from dsmoe.checkpoint.gguf.reader import GGUFFile
from dsmoe.checkpoint.gguf.writer import QUANT_TYPES
from dsmoe.checkpoint.hf import hf_shapes, native_name
from dsmoe.checkpoint.loading import Source, load_source, materialize  # noqa: F401
from dsmoe.config import ModelConfig
from dsmoe.tokenizer import Tokenizer

# The float dtype a model gets when the caller asks for the file's own (dtype=None).
_FILE_DTYPES = {QUANT_TYPES[name][1]: DTYPES[name] for name in ("f32", "f16", "bf16")}


def load_gguf(path: str | os.PathLike, *, dtype: torch.dtype | str | None = torch.float32,
              device: torch.device | str = "cpu") -> nn.Module:
    """A ``Transformer`` with the weights of a llama.cpp "deepseek"/"deepseek2" GGUF, in eval mode.
    ``dtype=None``: the file's float type (F32/F16/BF16 files), else float32."""
    return load_source(gguf_source(path), dtype=dtype, device=device)


def gguf_source(path: str | os.PathLike) -> Source:
    """A GGUF as a ``checkpoint.loading`` source: metadata and tensor infos are parsed and
    validated now, tensors dequantized one layer at a time."""
    f = GGUFFile(path)
    config = f.config()
    file_type = _file_type(f)
    stored = _FILE_DTYPES.get(file_type, torch.float32)
    q4_0 = file_type == QUANT_TYPES["q4_0"][1]
    return Source(config, lambda model: _check_against_model(f, config, model),
                  lambda dtype: native_groups(f, config, dtype), stored,
                  int4_groups=(lambda dtype: native_groups(f, config, dtype, True))
                  if q4_0 else None)


def _file_type(f: GGUFFile) -> int:
    """general.file_type, a llama_ftype: only a hint of the tensors' types (an unknown one
    means float32), but a list or a string is a corrupt file, not a hint to ignore."""
    value = f.get("general.file_type", 0)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{f.path}: metadata general.file_type = {value!r} must be an "
                         f"integer (a llama.cpp file type), not {type(value).__name__}")
    return value


def load_gguf_model(path: str | os.PathLike, *, dtype: torch.dtype | str | None = torch.float32,
                    device: torch.device | str = "cpu") -> nn.Module:
    """Alias of ``load_gguf`` (the name ``Transformer.from_pretrained`` documents)."""
    return load_gguf(path, dtype=dtype, device=device)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer stored in a GGUF's ``tokenizer.*`` metadata."""
    f = GGUFFile(path)
    data = f.tokenizer_data()
    if data is None:
        raise ValueError(f"{f.path}: the file has no tokenizer (no tokenizer.ggml.tokens)")
    try:
        return data.to_tokenizer()
    except ValueError as exc:
        raise ValueError(f"{f.path}: {exc}") from exc


def native_groups(f: GGUFFile, config: ModelConfig, dtype: torch.dtype | None,
                  int4: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """The file's tensors under dsmoe's native names (experts stacked), one dict per layer
    (plus one for the embedding, final norm and output). ``int4``: Q4_0 weight matrices
    come as a symmetric int4 matrix's ``<module>.qweight`` / ``.scale`` (never as floats).
    Float tensors come in float32 (what quantizing on arrival and fp32 buffers want), but
    the embedding in the model's ``dtype``: it is a lookup table, cast to ``dtype``
    anyway, and the largest float tensor (102400 x 2048: 0.84 GB as float32)."""
    specs = f.check_tensors(config)
    groups: dict[str, list] = defaultdict(list)
    for spec in specs:
        groups[keys.layer_group(spec.hf_names[0])].append(spec)
    for group in groups.values():
        direct = [spec for spec in group if int4 and _int4_as_stored(f, spec)]
        hf = {native_name(n): t for spec in group if spec not in direct
              for n, t in f.hf_tensors(spec, dtype if dtype is not None and spec.gguf_name
                                       == "token_embd.weight" else torch.float32,
                                       copy_experts=False)}
        out = keys.moe_from_hf(hf, config.n_routed_experts)
        if direct:
            out.update(_int4_tensors(f, direct, config.n_routed_experts))
        yield out


def _int4_as_stored(f: GGUFFile, spec: TensorSpec) -> bool:
    """Whether ``spec`` loads straight into an int4 matrix: a Q4_0 weight matrix of a
    module ``quantize_model`` makes int4 (not the embedding or the output, whose bits are
    lm_head_bits) of a shape the int4 format takes with groups of 32. Not MLA's
    ``attn_k_b``/``attn_v_b``: kv_b_proj joins them per head with k transposed, which Q4_0
    blocks (groups along the other axis) cannot follow, so they arrive as floats."""
    from dsmoe.quant.kernels import int4_group_size

    if f.tensors[spec.gguf_name].tensor_type != QUANT_TYPES["q4_0"][0] or spec.keep_f32:
        return False
    if (spec.gguf_name in ("token_embd.weight", "output.weight") or len(spec.shape) < 2
            or spec.kv_b_part is not None):
        return False
    return int4_group_size(spec.shape[-1], spec.shape[-2], 32) == 32


def _int4_tensors(f: GGUFFile, specs: list[TensorSpec], n_experts: int
                  ) -> dict[str, torch.Tensor]:
    """``<module>.qweight`` and ``.scale`` of the Q4_0 ``specs``. Stacked experts are
    converted expert by expert straight into the final stacked buffers (the layout
    ``moe_from_hf`` gives float weights), so a layer never exists twice: at the 16B shape a
    transient copy of a layer's experts (~0.3 GB) would not fit the 10 GB budget."""
    out: dict[str, torch.Tensor] = {}
    for spec in specs:
        if not spec.stacked:
            name = native_name(spec.hf_names[0]).removesuffix(".weight")
            out[f"{name}.qweight"], out[f"{name}.scale"] = f.load_int4(spec)
            continue
        E, N, K = spec.shape
        if E != n_experts:  # check_tensors compared the shapes: this is a bug
            raise RuntimeError(f"internal error: {spec.gguf_name} stacks {E} experts")
        stacked, part, parts = keys.expert_slot(native_name(spec.hf_names[0]))
        q = out.setdefault(f"{stacked}.qweight",
                           torch.empty(E, parts * N, K // 2, dtype=torch.uint8))
        scale = out.setdefault(f"{stacked}.scale",
                               torch.empty(E, parts * N, K // 32, dtype=torch.bfloat16))
        rows = slice(part * N, (part + 1) * N)
        t = f.tensors[spec.gguf_name]
        for e in range(E):
            f.read_int4(t, q[e, rows], scale[e, rows], first_block=e * N * K // 32)
    return out


def _check_against_model(f: GGUFFile, config: ModelConfig, model: nn.Module) -> None:
    """The HF names the file provides must be exactly those the model expects."""
    provided = {n for spec in f.check_tensors(config) for n in spec.hf_names}
    expected = set(hf_shapes(model))
    if config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    if provided != expected:
        raise ValueError(f"{f.path}: internal name mismatch between the GGUF map and the "
                         f"model: missing {sorted(expected - provided)[:5]}, "
                         f"extra {sorted(provided - expected)[:5]}")
