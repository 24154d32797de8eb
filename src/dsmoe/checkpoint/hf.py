"""HF checkpoint directories: ``config.json`` + safetensors with DeepSeek's exact tensor names.

Layout (as ``deepseek-ai/deepseek-moe-16b-base`` ships it): ``config.json`` (model_type
"deepseek"), ``model.safetensors`` or shards ``model-0000i-of-0000n.safetensors`` with
``model.safetensors.index.json``, and optionally the tokenizer files. Tensor names are the
model's module names with a ``model.`` prefix (``lm_head.weight`` has none); routed experts
are stored per expert and stacked in memory by ``checkpoint.keys``.

Loading (``hf_source``, one of ``checkpoint.loading``'s sources): ``config.json`` and the
safetensors headers are read first and every tensor's name, shape and dtype checked against
the model built on the meta device, all problems reported before any data is read; then the
filler takes one group at a time (top-level tensors, then layer by layer), opened with
``safe_open`` (memory-mapped, ``get_tensor`` copies nothing) and the layer's experts stacked
with ``keys.moe_from_hf``; it copies each tensor into memory of its own, so the file pages
read for a group leave the process with it. Peak memory is the weights plus about one layer.

Saving converts and writes layer by layer, shard by shard, through
``checkpoint.directory.DirectoryWriter``, which replaces the directory as a whole.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Iterator, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from dsmoe.checkpoint import fp8, keys
from dsmoe.checkpoint.dtypes import DTYPES, FLOAT_STORED, dtype_name, resolve_dtype  # noqa: F401
from dsmoe.checkpoint.loading import Source, load_source
from dsmoe.checkpoint.directory import (CONFIG_NAME, INDEX_NAME, TOKENIZER_FILES,  # noqa: F401
                                       WEIGHTS_NAME, DirectoryWriter, config_json)
from dsmoe.config import DEEPSEEK_MODEL_TYPES, ModelConfig
from dsmoe.io import read_json


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a checkpoint, as its file header describes it."""

    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors' dtype name, e.g. "BF16"


# --- names ------------------------------------------------------------------------------
def hf_name(native: str) -> str:
    """``layers.0.mlp.gate.weight`` -> ``model.layers.0.mlp.gate.weight``."""
    return native if native.startswith("lm_head.") else f"model.{native}"


def native_name(hf: str) -> str:
    """The inverse of ``hf_name``; names outside both patterns come back unchanged."""
    return hf[len("model."):] if hf.startswith("model.") else hf


def _hf_groups(state_dict: Mapping[str, torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
    """HF-named tensors, one dict per run of consecutive keys of the same group (so a MoE
    layer's experts are split into per-expert tensors one layer at a time)."""
    run: dict[str, torch.Tensor] = {}
    current = None
    for name, tensor in state_dict.items():
        group = keys.layer_group(name)
        if run and group != current:
            yield {hf_name(k): v for k, v in keys.moe_to_hf(run).items()}
            run = {}
        current = group
        run[name] = tensor
    if run:
        yield {hf_name(k): v for k, v in keys.moe_to_hf(run).items()}


def _savable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's persistent tensors; a tied ``lm_head.weight`` is left out, as HF does."""
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def hf_shapes(model: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """HF name -> (shape, dtype) of every tensor a checkpoint of ``model`` holds, in order."""
    meta = {k: torch.empty(v.shape, dtype=v.dtype, device="meta")
            for k, v in _savable_state_dict(model).items()}
    return {name: (tuple(t.shape), t.dtype) for group in _hf_groups(meta)
            for name, t in group.items()}


# --- loading ----------------------------------------------------------------------------
def read_config(path: str | os.PathLike) -> ModelConfig:
    """``config.json`` of an HF DeepSeekMoE directory, or that file itself (model_type
    "deepseek", "deepseek_v2" or "deepseek_v3")."""
    path = Path(path)
    if path.is_dir():
        path = path / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {path.parent} is not an HF model "
                                    "directory")
    elif not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    data = read_json(path)
    model_type = data.get("model_type") if isinstance(data, dict) else None
    if model_type not in DEEPSEEK_MODEL_TYPES:
        raise ValueError(
            f"{path}: model_type {model_type!r} is not supported; dsmoe loads DeepSeekMoE "
            f"checkpoints with model_type {' / '.join(DEEPSEEK_MODEL_TYPES)}")
    return ModelConfig.from_hf(data)


def weight_files(directory: str | os.PathLike) -> dict[str, Path]:
    """Tensor name -> file, from ``model.safetensors`` or the shard index."""
    directory = Path(directory)
    single, index = directory / WEIGHTS_NAME, directory / INDEX_NAME
    if single.is_file():
        return {name: single for name in _headers(single)}
    if not index.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} or {INDEX_NAME} in {directory}")
    data = read_json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise ValueError(f"{index}: not a valid shard index (\"weight_map\" must map tensor "
                         "names to file names)")
    # A shard is a file of this directory: a path could make loading read any file.
    outside = sorted({f for f in weight_map.values() if f in ("", ".", "..")
                      or Path(f).name != f or "\\" in f})
    if outside:
        raise ValueError(f"{index}: shard file name {outside[0]!r} is not a file in "
                         f"{directory}; an index may only name files beside it")
    files = {name: directory / file for name, file in weight_map.items()}
    for file in sorted(set(files.values())):
        if not file.is_file():
            raise FileNotFoundError(f"shard {file.name} listed in {INDEX_NAME} is missing "
                                    f"from {directory}")
    return files


def _headers(file: Path) -> dict[str, StoredTensor]:
    """Names, shapes and dtypes of a safetensors file, without reading tensor data."""
    try:
        with safe_open(file, framework="pt") as handle:
            out = {}
            for name in handle.keys():
                piece = handle.get_slice(name)
                out[name] = StoredTensor(file, tuple(piece.get_shape()), piece.get_dtype())
            return out
    except SafetensorError as exc:
        raise ValueError(f"{file}: cannot read safetensors file (truncated or corrupted?): "
                         f"{exc}") from exc


def stored_tensors(directory: str | os.PathLike) -> dict[str, StoredTensor]:
    """Name -> (file, shape, dtype) of every tensor in the directory, from headers only."""
    files = weight_files(directory)
    stored: dict[str, StoredTensor] = {}
    for file in sorted(set(files.values())):
        for name, info in _headers(file).items():
            if name in files and files[name] != file:
                continue  # the index assigns it to another shard
            stored[name] = info
    listed_absent = [n for n in files if n not in stored]
    if listed_absent:
        raise ValueError(f"{INDEX_NAME} lists tensors that are not in their shard: "
                         f"{_few(listed_absent)}")
    return stored


def decoder_tensors(stored: Mapping[str, StoredTensor], config: ModelConfig
                    ) -> dict[str, StoredTensor]:
    """``stored`` without V3's multi-token-prediction layers, which dsmoe does not run."""
    kept, _ = keys.split_mtp(stored, config.num_hidden_layers, config.num_nextn_predict_layers)
    return {name: stored[name] for name in kept}


def _few(items: list[str], n: int = 5) -> str:
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def check_stored_tensors(expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
                         stored: Mapping[str, StoredTensor], *, tied: bool,
                         scaled: Collection[str] = ()) -> None:
    """Raise one ValueError naming missing, unexpected, misshapen and non-float tensors
    (FP8 ones are fine where ``scaled`` names them: they have a block scale)."""
    optional = {"lm_head.weight"} if tied else set()  # tied checkpoints may still carry it
    missing = [n for n in expected if n not in stored]
    unexpected = [n for n in stored if n not in expected and n not in optional]
    mismatched = [f"{n} (expected {list(expected[n][0])}, found {list(stored[n].shape)})"
                  for n in expected if n in stored and stored[n].shape != expected[n][0]]
    bad_dtype = [f"{n} ({stored[n].dtype})" for n in stored if stored[n].dtype not in FLOAT_STORED
                 and not (n in scaled and stored[n].dtype in fp8.FP8_DTYPES)]
    problems = [f"{label}: {_few(items)}" for label, items in (
        ("missing tensors", missing), ("unexpected tensors", unexpected),
        ("shape mismatch", mismatched), ("unsupported stored dtype", bad_dtype)) if items]
    if problems:
        raise ValueError("checkpoint does not match the config: " + "; ".join(problems))


def load_pretrained(path: str | os.PathLike, *, dtype: torch.dtype | str | None = torch.float32,
                    device: torch.device | str = "cpu",
                    model_cls: type[nn.Module] | None = None) -> nn.Module:
    """A model from an HF directory (``checkpoint.loading`` does the work); ``dtype=None``
    keeps the stored dtype. Returns it in eval mode."""
    return load_source(hf_source(path), dtype=dtype, device=device, model_cls=model_cls)


def hf_source(path: str | os.PathLike) -> Source:
    """An HF directory as a ``checkpoint.loading`` source: config and safetensors headers
    are read now, tensors group by group as memory-mapped views."""
    directory = Path(path)
    if not directory.exists():
        raise FileNotFoundError(f"{directory} does not exist")
    if not directory.is_dir():
        raise NotADirectoryError(f"{directory} is not a directory (expected an HF model "
                                 "directory with config.json and model.safetensors)")
    config = read_config(directory)
    config, stored, scales = _split_fp8(config, decoder_tensors(stored_tensors(directory), config))
    tied = config.tie_word_embeddings
    names = [n for n in stored if not (tied and n == "lm_head.weight")]

    def groups(dtype: torch.dtype | None) -> Iterator[dict[str, torch.Tensor]]:
        by_group: dict[str, list[str]] = defaultdict(list)
        for name in names:
            by_group[keys.layer_group(name)].append(name)
        for group in by_group.values():
            # FP8 weights dequantize straight to the model dtype. NOTE: no local keeps the
            # file views, so a group's mapping is released as soon as the filler is done
            # with it, not when the next group has been read.
            yield keys.moe_from_hf(_read_dequantized(group, stored, scales,
                                                     dtype or torch.float32),
                                   config.n_routed_experts)

    def check(model: nn.Module) -> None:
        check_stored_tensors(hf_shapes(model), stored, tied=tied,
                             scaled=scales.stored if scales else ())

    embed = stored.get("model.embed_tokens.weight")
    return Source(config, check, groups, FLOAT_STORED.get(embed.dtype) if embed else None,
                  owns_views=True)


@dataclass(frozen=True)
class _Scales:
    """An FP8 checkpoint's block scales: HF weight name -> its ``weight_scale_inv``."""

    stored: dict[str, StoredTensor]
    block: tuple[int, int]


def _split_fp8(config: ModelConfig, stored: dict[str, StoredTensor]
               ) -> tuple[ModelConfig, dict[str, StoredTensor], _Scales | None]:
    """For an FP8 checkpoint (``checkpoint.fp8``): the config without its
    ``quantization_config`` (the loaded model is not FP8), the tensors without their
    scales, and the scales; otherwise the inputs and None."""
    block = fp8.block_size(config.extra)
    if block is None:
        return config, stored, None
    weights, scale_of = fp8.split_scales(stored)
    extra = {k: v for k, v in config.extra.items() if k != "quantization_config"}
    return (config.replace(extra=extra), weights,
            _Scales({w: stored[s] for w, s in scale_of.items()}, block))


def _read_dequantized(names: list[str], stored: Mapping[str, StoredTensor],
                      scales: _Scales | None, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``_read_group``, with FP8 weights dequantized to ``dtype`` by their block scales."""
    if scales is None:
        return _read_group(names, stored)
    scaled = [n for n in names if n in scales.stored]
    scale_names = {n + fp8.SCALE_SUFFIX: scales.stored[n] for n in scaled}
    mapped = _read_group([*names, *scale_names], {**stored, **scale_names})
    fp8.apply_scales(mapped, {native_name(n): native_name(n) + fp8.SCALE_SUFFIX
                              for n in scaled}, scales.block, dtype)
    return mapped


def _read_group(names: list[str], stored: Mapping[str, StoredTensor]
                ) -> dict[str, torch.Tensor]:
    """Tensors of one group under native names, as views of the memory-mapped file(s).
    NOTE: the mapping lives as long as any view of it does; the caller copies what it keeps,
    so the file pages this group touched leave the process when the group is done."""
    out: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = defaultdict(list)
    for name in names:
        by_file[stored[name].file].append(name)
    for file, file_names in by_file.items():
        try:
            with safe_open(file, framework="pt") as handle:
                for name in file_names:
                    out[native_name(name)] = handle.get_tensor(name)
        except SafetensorError as exc:
            raise ValueError(f"{file}: cannot read its tensors (truncated or corrupted "
                             f"file?): {exc}") from exc
    return out


# --- saving -----------------------------------------------------------------------------
def plan_shards(sizes: Mapping[str, int], max_shard_size: int) -> list[list[str]]:
    """Split tensor names (in order) into shards of at most ``max_shard_size`` bytes; a
    tensor larger than that gets a shard of its own."""
    if max_shard_size < 1:
        raise ValueError(f"max_shard_size must be a positive number of bytes, got {max_shard_size}")
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if shards[-1] and used + size > max_shard_size:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def save_pretrained(model: nn.Module, directory: str | os.PathLike, *,
                    max_shard_size: int = 5 * 2**30,
                    tokenizer_dir: str | os.PathLike | None = None) -> None:
    """Write ``config.json``, the safetensors file(s) (+ index when sharded) and the
    tokenizer files found in ``tokenizer_dir``, converting layer by layer; the directory
    is replaced as a whole (see ``checkpoint.directory``)."""
    if any(type(m).__module__.startswith("dsmoe.quant") for m in model.modules()):
        raise ValueError("this model is quantized: save it with dsmoe.quant.save_quantized "
                         "(or `dsmoe quantize`), not as an HF checkpoint")
    tokenizer_files = _tokenizer_files(tokenizer_dir)
    config = config_json(model.config, torch_dtype=dtype_name(model.embed_tokens.weight.dtype))
    with DirectoryWriter(directory, save=_save_file, max_shard_size=max_shard_size) as writer:
        for group in _hf_groups(_savable_state_dict(model)):
            for name, tensor in group.items():
                writer.add(name, tensor)
        writer.finish(config, tokenizer_files)


def _save_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    save_file(tensors, str(path), metadata=metadata)


def _tokenizer_files(tokenizer_dir: str | os.PathLike | None) -> list[Path]:
    if tokenizer_dir is None:
        return []
    found = [Path(tokenizer_dir) / name for name in TOKENIZER_FILES
             if (Path(tokenizer_dir) / name).is_file()]
    if not found:
        raise FileNotFoundError(f"no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}) "
                                f"in {tokenizer_dir}")
    return found
