"""Quantized checkpoints: save, load, and quantize-while-loading from float checkpoints.

A quantized checkpoint is an HF-style directory:
  config.json        the model's HF config plus ``quantization_config``
                     ({"quant_method": "dsmoe", "bits", "group_size", "lm_head_bits", ...})
  model.safetensors  (or shards + model.safetensors.index.json) with dsmoe's native names:
                     float tensors as they are (``embed_tokens.weight``, norms, routers),
                     quantized matrices as ``<module>.qweight`` / ``.scale`` (/ ``.zero``),
                     e.g. ``layers.1.mlp.experts.gate_up_proj.qweight`` int8 [E, 2F, D]
  tokenizer files    when given
Experts stay stacked on disk, so loading is an assignment, never a restack.

Memory: loading builds the model on ``meta`` and assigns the tensors safetensors hands
over, which are views of a private memory map of the file. The writer lays every tensor out
on a 64-byte boundary (``save_aligned``), the alignment torch's int8 kernel needs, so int8
weights are used in place: they are file-backed pages (loaded on first use, evictable under
memory pressure, like llama.cpp's mmap), not a copy in anonymous memory. int4 weights are
repacked into torch's kernel layout matrix by matrix. No float copy of the weights ever
exists. ``load_model(path, quant=...)`` quantizes a float HF directory or GGUF layer by
layer the same way (peak: quantized model + one float layer). Writing goes through the one
model-directory writer (``checkpoint.directory``): the directory is replaced as a whole.

Shapes: E experts, F expert width, D hidden.
"""

from __future__ import annotations

import json
import os
import re
import struct
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from dsmoe.checkpoint import hf, keys
from dsmoe.checkpoint.directory import CONFIG_NAME, TOKENIZER_FILES, DirectoryWriter, config_json
from dsmoe.config import ModelConfig
from dsmoe.quant.convert import QuantConfig, quantize_model, quantized_modules, load_float_tensors

QUANT_KEY = "quantization_config"
_LAYER = re.compile(r"^layers\.(\d+)\.")
BITS_NAMES = {"int8": 8, "int4": 4, "8": 8, "4": 4}


# --- layout -------------------------------------------------------------------------------
def checkpoint_layout(model: nn.Module, dtype: torch.dtype | None = None
                      ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every tensor a quantized checkpoint of ``model`` holds, in
    model order. Float parameters get ``dtype`` (default: their own)."""
    matrices = quantized_modules(model)
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    layout: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    done: set[str] = set()
    for name, tensor in model.state_dict().items():
        owner = name.rpartition(".")[0]
        if owner in matrices:
            if owner not in done:
                for leaf, spec in matrices[owner].canonical_shapes().items():
                    layout[f"{owner}.{leaf}"] = spec
                done.add(owner)
            continue
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        want = dtype if (dtype is not None and name in params) else tensor.dtype
        layout[name] = (tuple(tensor.shape), want)
    return layout


def is_quantized_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory whose config.json carries a dsmoe quantization."""
    config = Path(path) / CONFIG_NAME
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and isinstance(data.get(QUANT_KEY), dict) \
        and data[QUANT_KEY].get("quant_method") == "dsmoe"


# --- writing ------------------------------------------------------------------------------
class QuantizedCheckpointWriter:
    """Write tensors as they come into size-capped shards, then config.json and the index;
    ``close`` swaps the directory into place (``checkpoint.directory.DirectoryWriter``).
    Use as a context manager."""

    def __init__(self, directory: str | os.PathLike, config: ModelConfig, qc: QuantConfig, *,
                 float_dtype: torch.dtype, max_shard_size: int = 2 * 2**30,
                 tokenizer_dir: str | os.PathLike | None = None) -> None:
        self.directory = Path(directory)
        _check_target(self.directory)
        self.config, self.qc, self.float_dtype = config, qc, float_dtype
        self.tokenizer_dir = tokenizer_dir
        self._writer = DirectoryWriter(self.directory, save=_save_aligned,
                                       max_shard_size=max_shard_size,
                                       metadata={"format": "pt", "dsmoe": "quantized"})

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self._writer.add(name, tensor)

    def close(self) -> None:
        config = config_json(self.config, torch_dtype=str(self.float_dtype).removeprefix(
            "torch."), **{QUANT_KEY: self.qc.to_dict()})
        tokenizer_files = [] if self.tokenizer_dir is None else [
            Path(self.tokenizer_dir) / f for f in TOKENIZER_FILES
            if (Path(self.tokenizer_dir) / f).is_file()]
        self._writer.finish(config, tokenizer_files)

    def abort(self) -> None:
        self._writer.abort()

    def __enter__(self) -> "QuantizedCheckpointWriter":
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        try:
            if exc_type is None:
                self.close()
        finally:
            self.abort()


def _save_aligned(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]
                  ) -> None:
    save_aligned(tensors, path, metadata=metadata)


_ALIGNMENT = 64
_ST_DTYPES = {torch.int8: "I8", torch.uint8: "U8", torch.bfloat16: "BF16", torch.float16: "F16",
              torch.float32: "F32", torch.int32: "I32", torch.int64: "I64"}


def save_aligned(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, *,
                 metadata: Mapping[str, str] | None = None) -> None:
    """A safetensors file whose tensors all start on a 64-byte boundary of the file.

    The format forbids gaps between tensors, so alignment comes from the header padding
    (spaces, which the format allows) and the order: tensors whose size is a multiple of
    64 bytes first (every weight and scale of real models), any others after them."""
    order = sorted(tensors, key=lambda n: (tensors[n].numel() * tensors[n].element_size())
                   % _ALIGNMENT != 0)
    header: dict[str, object] = {"__metadata__": dict(metadata or {})}
    offset = 0
    for name in order:
        t = tensors[name]
        if t.dtype not in _ST_DTYPES:
            raise ValueError(f"{name}: dtype {t.dtype} cannot be stored")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-(8 + len(text)) % _ALIGNMENT)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(text)))
        fh.write(text)
        for name in order:
            data = tensors[name].detach().to("cpu").contiguous()
            fh.write(memoryview(data.view(torch.uint8).reshape(-1).numpy()))


def save_quantized(model: nn.Module, directory: str | os.PathLike, *,
                   tokenizer_dir: str | os.PathLike | None = None,
                   max_shard_size: int = 2 * 2**30) -> None:
    """Write a model quantized by ``quantize_model`` as a quantized checkpoint directory."""
    qc = getattr(model, "quant_config", None)
    if not isinstance(qc, QuantConfig):
        raise ValueError("the model is not quantized: call dsmoe.quant.quantize_model first")
    matrices = quantized_modules(model)
    state = model.state_dict()
    float_dtype = model.embed_tokens.weight.dtype
    with QuantizedCheckpointWriter(directory, model.config, qc, float_dtype=float_dtype,
                                   max_shard_size=max_shard_size,
                                   tokenizer_dir=tokenizer_dir) as writer:
        for name in checkpoint_layout(model):  # float tensors first, in model order
            if name in state and name.rpartition(".")[0] not in matrices:
                writer.add(name, state[name])
        # quantized matrices one module at a time (int4 is unpacked per module)
        for owner, matrix in matrices.items():
            for leaf, tensor in matrix.quantized_state().items():
                writer.add(f"{owner}.{leaf}", tensor)


# --- loading ------------------------------------------------------------------------------
def read_quantized_config(directory: str | os.PathLike) -> tuple[ModelConfig, QuantConfig]:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {directory} is not a model directory")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get(QUANT_KEY), dict):
        raise ValueError(f"{path} has no {QUANT_KEY}: not a dsmoe quantized checkpoint")
    qc = QuantConfig.from_dict(data.pop(QUANT_KEY))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = ModelConfig.from_hf(data)
    return config, qc


def load_quantized(directory: str | os.PathLike, *, dtype: torch.dtype | str | None = None,
                   device: torch.device | str = "cpu") -> nn.Module:
    """A quantized ``Transformer`` from a quantized checkpoint directory, in eval mode.
    ``dtype``: the float parts (embedding, norms, router; default: as stored)."""
    from dsmoe.checkpoint.gguf.loader import materialize
    from dsmoe.model.transformer import Transformer

    directory = Path(directory)
    config, qc = read_quantized_config(directory)
    target = hf.resolve_dtype(dtype)
    with torch.device("meta"):
        model = Transformer(config)
    quantize_model(model, qc.bits, qc.group_size, lm_head_bits=qc.lm_head_bits)
    layout = checkpoint_layout(model)
    files = hf.weight_files(directory)
    stored = _stored_shapes(files)
    _check_layout(layout, stored, directory)

    matrices = quantized_modules(model)
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    parts: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    by_file: dict[Path, list[str]] = defaultdict(list)
    for name in layout:
        by_file[files[name]].append(name)
    for file, names in by_file.items():
        with _open(file) as handle:
            for name in names:
                tensor = _get(handle, file, name)
                owner, _, leaf = name.rpartition(".")
                if owner in matrices:
                    parts[owner][leaf] = tensor
                    if len(parts[owner]) == len(matrices[owner].canonical_shapes()):
                        matrices[owner].load_quantized_state(parts.pop(owner), device=device)
                    continue
                want = target if (target is not None and name in params) else tensor.dtype
                model.load_state_dict({name: tensor.to(device=device, dtype=want)},
                                      strict=False, assign=True)
    if parts:
        raise ValueError(f"{directory}: incomplete quantized tensors for {sorted(parts)[:5]}")
    return materialize(model, device)


def load_model(path: str | os.PathLike, *, dtype: torch.dtype | str | None = torch.float32,
               device: torch.device | str = "cpu", quant: str | int | QuantConfig | None = None,
               progress: Callable[[int, int], None] | None = None) -> nn.Module:
    """Load any model path dsmoe knows, optionally quantizing while loading.

    - a quantized checkpoint directory: loaded as is (``quant`` must be None or match)
    - ``quant`` None: ``Transformer.from_pretrained`` (HF directory or .gguf)
    - ``quant`` "int8"/"int4" (or 8/4, or a QuantConfig): an HF directory or GGUF is read
      one layer at a time and quantized on the fly; the float weights never coexist.
    ``progress(done, total)`` is called after each layer when quantizing while loading.
    """
    qc = _quant_config(quant)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model not found: {path}")
    if path.is_dir() and is_quantized_checkpoint(path):
        model = load_quantized(path, dtype=dtype, device=device)
        if qc is not None and (qc.bits, qc.group_size) != (model.quant_config.bits,
                                                           model.quant_config.group_size):
            raise ValueError(f"{path} is already quantized ({model.quant_config.bits}-bit); "
                             f"it cannot be re-quantized to {qc.bits}-bit")
        return model
    if qc is None:
        from dsmoe.model.transformer import Transformer

        return Transformer.from_pretrained(path, dtype=dtype, device=device)
    from dsmoe.checkpoint.gguf.loader import materialize
    from dsmoe.model.transformer import Transformer

    config, groups = _float_source(path)
    target = hf.resolve_dtype(dtype) or torch.float32
    with torch.device("meta"):
        model = Transformer(config)
    quantize_model(model, qc.bits, qc.group_size, lm_head_bits=qc.lm_head_bits)
    total = config.num_hidden_layers + 1  # the layers plus embedding / norm / lm_head
    for done, group in enumerate(groups, start=1):
        load_float_tensors(model, group, dtype=target, device=device)
        del group
        if progress is not None:
            progress(done, total)
    return materialize(model, device)


def quantize_checkpoint(source: str | os.PathLike, out: str | os.PathLike, *,
                        bits: int = 8, group_size: int = 128, lm_head_bits: int = 8,
                        dtype: torch.dtype | str = torch.bfloat16,
                        tokenizer_dir: str | os.PathLike | None = None,
                        progress: Callable[[int, int], None] | None = None) -> nn.Module:
    """Quantize a float checkpoint (HF directory or GGUF) into a quantized checkpoint
    directory, layer by layer; returns the quantized model."""
    qc = QuantConfig(bits=bits, group_size=group_size, lm_head_bits=lm_head_bits)
    _check_target(Path(out))  # fail before the (long) quantization, not after
    model = load_model(source, dtype=dtype, quant=qc, progress=progress)
    save_quantized(model, out, tokenizer_dir=tokenizer_dir)
    return model


# --- helpers ------------------------------------------------------------------------------
def _quant_config(quant: str | int | QuantConfig | None) -> QuantConfig | None:
    if quant is None or isinstance(quant, QuantConfig):
        return quant
    bits = BITS_NAMES.get(str(quant).lower())
    if bits is None:
        raise ValueError(f"unknown quantization {quant!r}; choose int8 or int4")
    return QuantConfig(bits=bits)


def _float_source(path: Path) -> tuple[ModelConfig, Iterator[dict[str, torch.Tensor]]]:
    """(config, float tensor groups under native names) of an HF directory or a GGUF."""
    if path.suffix.lower() == ".gguf":
        from dsmoe.checkpoint.gguf.loader import native_groups
        from dsmoe.checkpoint.gguf.reader import GGUFFile

        f = GGUFFile(path)
        config = f.config()
        return config, native_groups(f, config, torch.float32)
    config = hf.read_config(path)
    return config, _hf_native_groups(path, config)


def _hf_native_groups(directory: Path, config: ModelConfig) -> Iterator[dict[str, torch.Tensor]]:
    """An HF directory's tensors, one layer at a time, experts stacked (native names)."""
    files = hf.weight_files(directory)
    groups: dict[str, list[str]] = defaultdict(list)
    for name in files:
        native = hf.native_name(name)
        match = _LAYER.match(native)
        groups[match.group(0) if match else ""].append(name)
    handles: dict[Path, object] = {}
    try:
        for names in groups.values():
            tensors = {}
            for name in names:
                file = files[name]
                if file not in handles:
                    handles[file] = safe_open(file, framework="pt")
                tensors[hf.native_name(name)] = _get(handles[file], file, name)
            yield keys.moe_from_hf(tensors, config.n_routed_experts)
    finally:
        handles.clear()


def _stored_shapes(files: Mapping[str, Path]) -> dict[str, tuple[tuple[int, ...], str]]:
    out = {}
    for file in sorted(set(files.values())):
        with _open(file) as handle:
            for name in handle.keys():
                if files.get(name) == file:
                    piece = handle.get_slice(name)
                    out[name] = (tuple(piece.get_shape()), piece.get_dtype())
    return out


_SAFETENSORS_DTYPES = {torch.int8: "I8", torch.uint8: "U8", torch.bfloat16: "BF16",
                       torch.float16: "F16", torch.float32: "F32"}


def _check_layout(layout: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
                  stored: Mapping[str, tuple[tuple[int, ...], str]], directory: Path) -> None:
    missing = [n for n in layout if n not in stored]
    unexpected = [n for n in stored if n not in layout]
    quantized = {"I8", "U8"}
    mismatched = [f"{n} (expected {list(shape)}, found {list(stored[n][0])})"
                  for n, (shape, _) in layout.items() if n in stored and stored[n][0] != shape]
    bad_dtype = [f"{n} ({stored[n][1]}, expected {_SAFETENSORS_DTYPES.get(dt, dt)})"
                 for n, (_, dt) in layout.items() if n in stored and (
                     (_SAFETENSORS_DTYPES.get(dt) in quantized or stored[n][1] in quantized)
                     and stored[n][1] != _SAFETENSORS_DTYPES.get(dt))]
    problems = [f"{label}: {', '.join(items[:5])}" + (f" and {len(items) - 5} more"
                                                       if len(items) > 5 else "")
                for label, items in (("missing", missing), ("unexpected", unexpected),
                                     ("shape mismatch", mismatched), ("dtype", bad_dtype))
                if items]
    if problems:
        raise ValueError(f"{directory}: quantized checkpoint does not match its config: "
                         + "; ".join(problems))


class _open:
    """``safe_open`` with a clear error for truncated or corrupt files."""

    def __init__(self, file: Path) -> None:
        self.file = file

    def __enter__(self):  # noqa: ANN204 - safetensors' handle type is private
        try:
            self.handle = safe_open(self.file, framework="pt")
        except SafetensorError as exc:
            raise ValueError(f"{self.file}: cannot read safetensors file (truncated or "
                             f"corrupted?): {exc}") from exc
        return self.handle

    def __exit__(self, *exc: object) -> None:
        del self.handle


def _get(handle: object, file: Path, name: str) -> torch.Tensor:
    try:
        return handle.get_tensor(name)  # type: ignore[attr-defined]
    except SafetensorError as exc:
        raise ValueError(f"{file}: cannot read tensor {name} (truncated or corrupted file?): "
                         f"{exc}") from exc


def _check_target(directory: Path) -> None:
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} exists and is not a directory")
    if directory.is_dir() and any(directory.iterdir()) and not is_quantized_checkpoint(directory):
        raise ValueError(f"{directory} exists, is not empty and is not a dsmoe quantized "
                         "checkpoint; choose a new or empty directory")
