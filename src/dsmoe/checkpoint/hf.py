"""HF checkpoint directories: ``config.json`` + safetensors with DeepSeek's exact tensor names.

Layout (as ``deepseek-ai/deepseek-moe-16b-base`` ships it): ``config.json`` (model_type
"deepseek"), ``model.safetensors`` or shards ``model-0000i-of-0000n.safetensors`` with
``model.safetensors.index.json``, and optionally the tokenizer files. Tensor names are the
model's module names with a ``model.`` prefix (``lm_head.weight`` has none); routed experts
are stored per expert and stacked in memory by ``checkpoint.keys``.

Loading, with peak memory close to the weights' size:
  1. read ``config.json`` and the safetensors headers only; check every tensor's name,
     shape and dtype against a model built on the meta device, reporting all problems
     before any data is read
  2. fill the model one group at a time (top-level tensors, then layer by layer): open
     the file(s) with ``safe_open`` (memory-mapped, ``get_tensor`` copies nothing), stack
     the layer's experts with ``keys.moe_from_hf``, cast or copy each tensor into memory
     of its own, assign it in place of the meta tensor (``load_state_dict(assign=True)``),
     then drop the mapping, so the file pages read for a group leave the process with it
  3. materialise the non-persistent buffers (RoPE frequencies, MoE load counters)
Peak memory is the weights plus about one layer in flight.

Saving converts and writes layer by layer, shard by shard, through
``checkpoint.directory.DirectoryWriter``, which replaces the directory as a whole.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Iterator, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from dsmoe.checkpoint import fp8, keys
from dsmoe.checkpoint.directory import (CONFIG_NAME, INDEX_NAME, TOKENIZER_FILES,  # noqa: F401
                                       WEIGHTS_NAME, DirectoryWriter, config_json)
from dsmoe.config import DEEPSEEK_MODEL_TYPES, ModelConfig


# Model dtypes a checkpoint can be loaded into; names users may spell them with.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "f32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "f16": torch.float16, "half": torch.float16,
}
# Floating-point dtypes a safetensors file may store (safetensors' names).
_FILE_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                "F64": torch.float64}

_LAYER = re.compile(r"^layers\.(\d+)\.")


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


def _group_of(native: str) -> str:
    """Tensors are converted and loaded per group: one per layer, one for the rest."""
    match = _LAYER.match(native)
    return match.group(0) if match else ""


def _hf_groups(state_dict: Mapping[str, torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
    """HF-named tensors, one dict per run of consecutive keys of the same group (so a MoE
    layer's experts are split into per-expert tensors one layer at a time)."""
    run: dict[str, torch.Tensor] = {}
    current = None
    for name, tensor in state_dict.items():
        group = _group_of(name)
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
def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A supported model dtype from a torch dtype or a name like "bf16"; None stays None."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        key = dtype.lower().removeprefix("torch.")
        if key in DTYPES:
            return DTYPES[key]
    elif dtype in DTYPES.values():
        return dtype
    raise ValueError(f"unsupported dtype {dtype!r}: load as float32, bfloat16 or float16")


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
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
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
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{index}: not a valid shard index ({exc!r})") from exc
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
    bad_dtype = [f"{n} ({stored[n].dtype})" for n in stored if stored[n].dtype not in _FILE_DTYPES
                 and not (n in scaled and stored[n].dtype in fp8.FP8_DTYPES)]
    problems = [f"{label}: {_few(items)}" for label, items in (
        ("missing tensors", missing), ("unexpected tensors", unexpected),
        ("shape mismatch", mismatched), ("unsupported stored dtype", bad_dtype)) if items]
    if problems:
        raise ValueError("checkpoint does not match the config: " + "; ".join(problems))


def load_pretrained(path: str | os.PathLike, *, dtype: torch.dtype | str | None = torch.float32,
                    device: torch.device | str = "cpu",
                    model_cls: type[nn.Module] | None = None) -> nn.Module:
    """Build the model on ``meta`` and fill it from the directory's safetensors (see the
    module docstring). ``dtype=None`` keeps the stored dtype. Returns it in eval mode."""
    from dsmoe.model.transformer import Transformer

    model_cls = model_cls or Transformer
    directory = Path(path)
    if not directory.exists():
        raise FileNotFoundError(f"{directory} does not exist")
    if not directory.is_dir():
        raise NotADirectoryError(f"{directory} is not a directory (expected an HF model "
                                 "directory with config.json and model.safetensors)")
    target_dtype = resolve_dtype(dtype)
    config = read_config(directory)
    config, stored, scales = _split_fp8(config, decoder_tensors(stored_tensors(directory), config))
    with torch.device("meta"):
        model = model_cls(config)
    expected = hf_shapes(model)
    check_stored_tensors(expected, stored, tied=config.tie_word_embeddings,
                         scaled=scales.stored if scales else ())
    if target_dtype is None:
        target_dtype = _FILE_DTYPES[stored["model.embed_tokens.weight"].dtype]

    declared = {k: v.dtype for k, v in model.state_dict().items()}
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    groups: dict[str, list[str]] = defaultdict(list)
    for name in expected:
        groups[_group_of(native_name(name))].append(name)
    for names in groups.values():
        mapped = _read_dequantized(names, stored, scales, target_dtype)  # file views
        file_storages = {t.untyped_storage().data_ptr() for t in mapped.values()}
        native = keys.moe_from_hf(mapped, config.n_routed_experts)
        del mapped
        for name in list(native):  # one tensor at a time: params to dtype, buffers kept
            want = target_dtype if name in params else declared[name]
            tensor = native[name].to(device=device, dtype=want)
            if tensor.untyped_storage().data_ptr() in file_storages:
                tensor = tensor.clone()  # own the memory, so the mapping can be released
            native[name] = tensor
        result = model.load_state_dict(native, strict=False, assign=True)
        if result.unexpected_keys:  # names were checked above: this is a bug
            raise RuntimeError(f"internal error: unexpected {result.unexpected_keys[:5]}")
        del native
    _materialize_buffers(model, device)
    model.tie_weights()
    model.init_buffers()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"internal error: tensors left on the meta device: {left[:5]}")
    return model.eval()


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


def _materialize_buffers(model: nn.Module, device: torch.device | str) -> None:
    """Give buffers still on ``meta`` (non-persistent ones) real storage; ``init_buffers``
    fills them."""
    for module in model.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer.is_meta:
                setattr(module, name, torch.zeros(buffer.shape, dtype=buffer.dtype,
                                                  device=device))


# --- saving -----------------------------------------------------------------------------
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


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
    tokenizer_files = _tokenizer_files(tokenizer_dir)
    config = config_json(model.config, torch_dtype=_dtype_name(model.embed_tokens.weight.dtype))
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
