"""GGUF -> a dsmoe ``Transformer`` (and tokenizer), one layer at a time.

Steps of ``load_gguf``:
  1. parse and validate the file (metadata -> ModelConfig, tensors against it)
  2. build the model on the meta device (no memory, no random init)
  3. per layer: dequantise its tensors, undo llama.cpp's q/k row order, stack the experts
     (``checkpoint.keys.moe_from_hf``) and assign them (``load_state_dict(assign=True)``)
  4. ``materialize``: give the non-persistent buffers (RoPE frequencies, load counters)
     storage and values, tie embeddings if the file has no ``output.weight``
Peak memory: the model in the requested dtype plus one layer's float tensors.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from typing import Iterator

import torch
from torch import nn

from dsmoe.checkpoint import keys
from dsmoe.checkpoint.gguf.reader import GGUFFile
from dsmoe.checkpoint.hf import hf_shapes, native_name, resolve_dtype
from dsmoe.config import ModelConfig
from dsmoe.tokenizer import Tokenizer

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
# The float dtype a model gets when the caller asks for the file's own (dtype=None).
_FILE_DTYPES = {0: torch.float32, 1: torch.float16, 32: torch.bfloat16}


def load_gguf(path: str | os.PathLike, *, dtype: torch.dtype | str | None = torch.float32,
              device: torch.device | str = "cpu") -> nn.Module:
    """A ``Transformer`` with the weights of a llama.cpp "deepseek" GGUF, in eval mode.
    ``dtype=None``: the file's float type (F32/F16/BF16 files), else float32."""
    from dsmoe.model.transformer import Transformer

    f = GGUFFile(path)
    config = f.config()
    target = resolve_dtype(dtype) or _FILE_DTYPES.get(f.get("general.file_type", 0),
                                                      torch.float32)
    with torch.device("meta"):
        model = Transformer(config)
    _check_against_model(f, config, model)
    declared = {k: v.dtype for k, v in model.state_dict().items()}
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    for group in native_groups(f, config, torch.float32):
        for name in list(group):  # params to the target dtype; buffers keep theirs
            want = target if name in params else declared[name]
            group[name] = group[name].to(device=device, dtype=want)
        model.load_state_dict(group, strict=False, assign=True)
        del group
    return materialize(model, device)


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


def native_groups(f: GGUFFile, config: ModelConfig, dtype: torch.dtype
                  ) -> Iterator[dict[str, torch.Tensor]]:
    """The file's tensors under dsmoe's native names (experts stacked), one dict per layer
    (plus one for the embedding, final norm and output)."""
    specs = f.check_tensors(config)
    groups: dict[str, list] = defaultdict(list)
    for spec in specs:
        match = _LAYER.match(spec.hf_names[0])
        groups[match.group(0) if match else ""].append(spec)
    for group in groups.values():
        hf = {native_name(n): t for spec in group
              for n, t in f.hf_tensors(spec, dtype, copy_experts=False)}
        yield keys.moe_from_hf(hf, config.n_routed_experts)


def materialize(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Finish a model filled by assignment: buffers still on meta (non-persistent) get
    storage and values, embeddings are tied when the config says so; eval mode."""
    for module in model.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer.is_meta:
                setattr(module, name, torch.zeros(buffer.shape, dtype=buffer.dtype,
                                                  device=device))
    if getattr(model.config, "tie_word_embeddings", False) and isinstance(
            getattr(model.lm_head, "weight", None), nn.Parameter):
        model.tie_weights()
    model.init_buffers()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"checkpoint left tensors without values: {', '.join(left[:5])}")
    return model.eval()


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
