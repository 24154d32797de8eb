"""One checkpoint loader: the format choice, one adapter per format, one filler.

``load(path, dtype=, device=, quant=)`` is what ``Transformer.from_pretrained``,
``dsmoe.quant.load_model`` and every command call. Its steps:
  1. ``open_source``: the format choice. ``*.gguf`` -> llama.cpp GGUF; a directory whose
     config.json has a dsmoe ``quantization_config`` -> quantized directory; any other
     directory -> HF safetensors. Each source gives the ``ModelConfig``, a check of its
     tensors against a model built on the meta device (all problems named before any data
     is read), and its tensors as groups under dsmoe's names (experts stacked), one group
     per layer plus one for the embedding, final norm and output.
  2. build the model on ``meta``; quantize its matrices (still on meta) when the source is
     quantized or ``quant`` asks for it (int4 from a Q4_0 GGUF: symmetric, groups of 32,
     its Q4_0 matrices taken as stored)
  3. ``fill``: per group, float tensors are cast (parameters to ``dtype``, buffers keep
     their declared dtype) and assigned (``load_state_dict(assign=True)``); quantized
     matrices take their stored tensors as they are, or quantize float weights on arrival
  4. ``materialize``: non-persistent buffers (RoPE, load counters) get storage and values,
     embeddings are tied when the config says so; eval mode
Peak memory: the loaded model plus one layer's tensors in flight.

Memory maps: an HF source's tensors are views of the memory-mapped files; their float
tensors are copied into memory of their own (``owns_views``) so the file pages a group
touched leave the process with it. A quantized directory's tensors are used in place
(int8 weights stay file-backed pages, see ``quant.checkpoint``).

Shapes: E experts.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from dsmoe.config import ModelConfig

Groups = Iterator[dict[str, torch.Tensor]]


@dataclass
class Source:
    """A checkpoint as the filler sees it (see the module docstring)."""

    config: ModelConfig
    check: Callable[[nn.Module], None]  # names/shapes vs the meta model, before any read
    groups: Callable[[torch.dtype | None], Groups]  # (model dtype) -> native-named groups
    stored_dtype: torch.dtype | None  # the float dtype for dtype=None (None: per tensor)
    quant: object | None = None  # the stored QuantConfig of a quantized directory
    owns_views: bool = False  # copy float tensors out of the file mapping
    # a Q4_0 GGUF: groups whose Q4_0 matrices come as symmetric int4 (group 32) tensors
    int4_groups: Callable[[torch.dtype | None], Groups] | None = None


def open_source(path: str | os.PathLike) -> Source:
    """The format choice (step 1)."""
    path = Path(path)
    if path.suffix.lower() == ".gguf":
        from dsmoe.checkpoint.gguf.loader import gguf_source

        return gguf_source(path)
    from dsmoe.quant.checkpoint import is_quantized_checkpoint, quantized_source

    if path.is_dir() and is_quantized_checkpoint(path):
        return quantized_source(path)
    from dsmoe.checkpoint.hf import hf_source

    return hf_source(path)


def load(path: str | os.PathLike, *, dtype: torch.dtype | str | None = torch.float32,
         device: torch.device | str = "cpu", quant: object = None,
         progress: Callable[[int, int], None] | None = None,
         model_cls: type[nn.Module] | None = None) -> nn.Module:
    """A model from any checkpoint dsmoe reads, in eval mode. ``dtype=None`` keeps the
    stored float dtype. ``quant`` ("int8"/"int4", 8/4 or a QuantConfig) quantizes a float
    checkpoint layer by layer while loading (its float weights never coexist); a quantized
    directory loads as it is (``quant`` must then be None or match it). ``progress(done,
    total)`` is called after each group."""
    from dsmoe.quant.checkpoint import quant_config

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model not found: {path} does not exist")
    qc = quant_config(quant)
    source = open_source(path)
    if source.quant is not None and qc is not None and (qc.bits, qc.group_size) != (
            source.quant.bits, source.quant.group_size):
        raise ValueError(f"{path} is already quantized ({source.quant.bits}-bit); it cannot "
                         f"be re-quantized to {qc.bits}-bit")
    if qc is not None and qc.bits == 4 and source.int4_groups is not None:
        # int4 from Q4_0 blocks as they are stored (no float detour, no requantizing)
        qc = replace(qc, group_size=32, symmetric=True)
        source = replace(source, groups=source.int4_groups)
    return load_source(source, dtype=dtype, device=device, quant=source.quant or qc,
                       progress=progress, model_cls=model_cls)


def load_source(source: Source, *, dtype: torch.dtype | str | None, device: torch.device | str,
                quant: object = None, progress: Callable[[int, int], None] | None = None,
                model_cls: type[nn.Module] | None = None) -> nn.Module:
    """Steps 2-4 for an opened source."""
    from dsmoe.checkpoint.dtypes import resolve_dtype
    from dsmoe.quant.convert import quantize_model

    target = resolve_dtype(dtype)
    if target is None:
        target = source.stored_dtype
        if target is None and quant is not None and source.quant is None:
            target = torch.float32  # quantizing a float checkpoint: float parts in fp32
    model = meta_model(source.config, model_cls)
    if source.quant is None:
        source.check(model)  # a float checkpoint is checked against the float model
    if quant is not None:
        quantize_model(model, quant.bits, quant.group_size, lm_head_bits=quant.lm_head_bits,
                       symmetric=quant.symmetric)
    if source.quant is not None:
        source.check(model)
    fill(model, source.groups(target), dtype=target, device=device, owns_views=source.owns_views,
         progress=progress, total=source.config.num_hidden_layers + 1)
    return materialize(model, device)


def meta_model(config: ModelConfig, model_cls: type[nn.Module] | None = None) -> nn.Module:
    """``model_cls(config)`` (default ``Transformer``) on the meta device, shapes only,
    without running its random initialisation (see ``_NoMetaInit``)."""
    from dsmoe.model.transformer import Transformer

    with torch.device("meta"), _NoMetaInit():
        return (model_cls or Transformer)(config)


class _NoMetaInit(TorchFunctionMode):
    """Random initialisation of meta tensors (modules' ``reset_parameters``) skipped: it
    gives no values, and torch runs it through Python meta kernels that import
    torch._dynamo and sympy (~70 MB of RSS for the rest of the process, ~2 s)."""

    _INIT = {"normal_", "uniform_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_",
             "xavier_uniform_", "xavier_normal_"}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001,ANN204
        kwargs = kwargs or {}
        tensor = args[0] if args else kwargs.get("tensor")  # torch.nn.init passes keywords
        if getattr(func, "__name__", None) in self._INIT and isinstance(
                tensor, torch.Tensor) and tensor.is_meta:
            return tensor
        return func(*args, **kwargs)


def fill(model: nn.Module, groups: Groups, *, dtype: torch.dtype | None,
         device: torch.device | str, owns_views: bool = False,
         progress: Callable[[int, int], None] | None = None, total: int = 0) -> None:
    """Assign each group's tensors to the meta-built ``model`` (step 3). ``dtype``: the
    parameters' dtype (None: as stored); buffers keep their declared dtype."""
    from dsmoe.quant.convert import quantized_modules

    target = _Target(model, quantized_modules(model), dtype, device, owns_views)
    parts: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    done = 0
    # NOTE: not enumerate(), whose reused result tuple keeps the previous group (and its
    # file mapping) alive while the next one is read; ``del group`` drops the last reference.
    for group in groups:
        target.fill_group(group, parts)
        del group
        done += 1
        if progress is not None:
            progress(done, max(total, done))
    if parts:
        raise ValueError(f"incomplete quantized tensors for {sorted(parts)[:5]}")


@dataclass
class _Target:
    """What ``fill`` needs of the model, computed once."""

    model: nn.Module
    matrices: dict  # name -> QuantMatrix (empty for a float model)
    dtype: torch.dtype | None
    device: torch.device | str
    owns_views: bool

    def __post_init__(self) -> None:
        self.declared = {k: v.dtype for k, v in self.model.state_dict().items()}
        self.params = {n for n, _ in self.model.named_parameters(remove_duplicate=False)}

    def fill_group(self, group: dict[str, torch.Tensor],
                   parts: dict[str, dict[str, torch.Tensor]]) -> None:
        """One group; its locals (views of the file) die when it returns."""
        plain: dict[str, torch.Tensor] = {}
        for name, tensor in group.items():
            owner, _, leaf = name.rpartition(".")
            matrix = self.matrices.get(name) or (self.matrices.get(owner) if leaf == "weight"
                                                 else None)
            if owner in self.matrices and leaf in self.matrices[owner].canonical_shapes():
                parts[owner][leaf] = tensor  # stored quantized: used as it is
                if len(parts[owner]) == len(self.matrices[owner].canonical_shapes()):
                    self.matrices[owner].load_quantized_state(parts.pop(owner),
                                                              device=self.device)
            elif matrix is not None:
                matrix.set_float(tensor.to(self.device))  # quantized on arrival
            elif name in self.declared:
                want = (self.dtype if self.dtype is not None else tensor.dtype) \
                    if name in self.params else self.declared[name]
                plain[name] = _own(tensor, want, self.device, self.owns_views)
            else:
                raise ValueError(f"tensor {name} does not belong to the model")
        result = self.model.load_state_dict(plain, strict=False, assign=True)
        if result.unexpected_keys:  # names were checked by the source: this is a bug
            raise RuntimeError(f"internal error: unexpected {result.unexpected_keys[:5]}")


def _own(tensor: torch.Tensor, dtype: torch.dtype, device: torch.device | str,
         owns_views: bool) -> torch.Tensor:
    """``tensor`` in ``dtype`` on ``device``; copied out of its file mapping if asked."""
    out = tensor.to(device=device, dtype=dtype)
    # A file view's storage is memory torch does not own (not resizable); a tensor the
    # source built (stacked experts) or ``to`` converted is torch's already.
    if owns_views and not out.untyped_storage().resizable():
        out = out.clone()  # own the memory, so the mapping can be released
    return out


def materialize(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Finish a model filled by assignment (step 4); eval mode."""
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


def save(model: nn.Module, directory: str | os.PathLike, *,
         tokenizer_dir: str | os.PathLike | None = None,
         max_shard_size: int | None = None) -> None:
    """Write ``model`` as a model directory: a quantized model as a quantized checkpoint,
    any other as an HF checkpoint (both through ``checkpoint.directory``)."""
    from dsmoe.quant.convert import QuantConfig

    shard = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    if isinstance(getattr(model, "quant_config", None), QuantConfig):
        from dsmoe.quant.checkpoint import save_quantized

        save_quantized(model, directory, tokenizer_dir=tokenizer_dir, **shard)
    else:
        from dsmoe.checkpoint.hf import save_pretrained

        save_pretrained(model, directory, tokenizer_dir=tokenizer_dir, **shard)
