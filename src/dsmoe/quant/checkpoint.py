"""Quantized checkpoints: save, load, and quantize-while-loading from float checkpoints.

A quantized checkpoint is an HF-style directory:
  config.json        the model's HF config plus ``quantization_config``
                     ({"quant_method": "dsmoe", "bits", "group_size", "lm_head_bits",
                     "symmetric" (int4 without zeros, from Q4_0 GGUFs; absent: false), ...})
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
used in place the same way (dsmoe's native int4 kernel reads the canonical layout; only
without it are they repacked into torch's kernel layout). No float copy of the weights ever
exists. ``load_model(path, quant=...)`` quantizes a float HF directory or GGUF layer by
layer the same way (peak: quantized model + one float layer). Writing goes through the one
model-directory writer (``checkpoint.directory``): the directory is replaced as a whole.

Shapes: E experts, F expert width, D hidden.
"""

from __future__ import annotations

import json
import os
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
from dsmoe.checkpoint.dtypes import SAFETENSORS_NAMES
from dsmoe.checkpoint.loading import Source, load_source
from dsmoe.config import ModelConfig
from dsmoe.io import read_json
from dsmoe.quant.convert import QuantConfig, quantized_modules
from dsmoe.quant.matrix import QuantMatrix

QUANT_KEY = "quantization_config"
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
        if _kernel_storage(matrices, name):
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


def _kernel_storage(matrices: Mapping[str, QuantMatrix], name: str) -> bool:
    """Whether state-dict entry ``name`` is a quantized matrix's kernel-layout storage (saved
    as its canonical tensors); a float parameter of one (a linear's bias) is saved as is."""
    owner, _, leaf = name.rpartition(".")
    return owner in matrices and not isinstance(getattr(matrices[owner], leaf, None),
                                                nn.Parameter)


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
        if t.dtype not in SAFETENSORS_NAMES:
            raise ValueError(f"{name}: dtype {t.dtype} cannot be stored")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": SAFETENSORS_NAMES[t.dtype], "shape": list(t.shape),
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
            if name in state and not _kernel_storage(matrices, name):
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
    data = read_json(path)
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
    source = quantized_source(directory)
    return load_source(source, dtype=dtype, device=device, quant=source.quant)


def quantized_source(directory: str | os.PathLike) -> Source:
    """A quantized directory as a ``checkpoint.loading`` source: its tensors are handed over
    as views of the files' memory maps and used in place (see the module docstring)."""
    directory = Path(directory)
    config, qc = read_quantized_config(directory)
    files = hf.weight_files(directory)
    stored = _stored_shapes(files)

    def groups(dtype: torch.dtype | None) -> Iterator[dict[str, torch.Tensor]]:
        by_group: dict[str, list[str]] = defaultdict(list)
        for name in stored:
            by_group[keys.layer_group(name)].append(name)
        handles: dict[Path, object] = {}
        for names in by_group.values():
            group = {}
            for name in names:
                file = files[name]
                if file not in handles:
                    handles[file] = _open(file)
                group[name] = _get(handles[file], file, name)
            yield group

    return Source(config, lambda model: _check_layout(checkpoint_layout(model), stored,
                                                      directory),
                  groups, None, quant=qc)


def load_model(path: str | os.PathLike, *, dtype: torch.dtype | str | None = torch.float32,
               device: torch.device | str = "cpu", quant: str | int | QuantConfig | None = None,
               progress: Callable[[int, int], None] | None = None) -> nn.Module:
    """Load any model path dsmoe knows, optionally quantizing while loading
    (``dsmoe.checkpoint.load``, which owns the format choice).

    - a quantized checkpoint directory: loaded as is (``quant`` must be None or match)
    - ``quant`` None: an HF directory or .gguf in float
    - ``quant`` "int8"/"int4" (or 8/4, or a QuantConfig): an HF directory or GGUF is read
      one layer at a time and quantized on the fly; the float weights never coexist.
    ``progress(done, total)`` is called after each layer.
    """
    from dsmoe.checkpoint import load

    return load(path, dtype=dtype, device=device, quant=quant, progress=progress)


def quantize_checkpoint(source: str | os.PathLike, out: str | os.PathLike, *,
                        bits: int = 8, group_size: int = 128, lm_head_bits: int = 8,
                        symmetric: bool = False, dtype: torch.dtype | str = torch.bfloat16,
                        tokenizer_dir: str | os.PathLike | None = None,
                        progress: Callable[[int, int], None] | None = None) -> nn.Module:
    """Quantize a float checkpoint (HF directory or GGUF) into a quantized checkpoint
    directory, layer by layer; returns the quantized model."""
    qc = QuantConfig(bits=bits, group_size=group_size, lm_head_bits=lm_head_bits,
                     symmetric=symmetric)
    _check_target(Path(out))  # fail before the (long) quantization, not after
    model = load_model(source, dtype=dtype, quant=qc, progress=progress)
    save_quantized(model, out, tokenizer_dir=tokenizer_dir)
    return model


# --- helpers ------------------------------------------------------------------------------
def quant_config(quant: str | int | QuantConfig | None) -> QuantConfig | None:
    """A QuantConfig from "int8"/"int4", 8/4 or a QuantConfig; None stays None."""
    if quant is None or isinstance(quant, QuantConfig):
        return quant
    bits = BITS_NAMES.get(str(quant).lower())
    if bits is None:
        raise ValueError(f"unknown quantization {quant!r}; choose int8 or int4")
    return QuantConfig(bits=bits)


def _stored_shapes(files: Mapping[str, Path]) -> dict[str, tuple[tuple[int, ...], str]]:
    out = {}
    for file in sorted(set(files.values())):
        with _open(file) as handle:
            for name in handle.keys():
                if files.get(name) == file:
                    piece = handle.get_slice(name)
                    out[name] = (tuple(piece.get_shape()), piece.get_dtype())
    return out



def _check_layout(layout: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
                  stored: Mapping[str, tuple[tuple[int, ...], str]], directory: Path) -> None:
    missing = [n for n in layout if n not in stored]
    unexpected = [n for n in stored if n not in layout]
    quantized = {"I8", "U8"}
    mismatched = [f"{n} (expected {list(shape)}, found {list(stored[n][0])})"
                  for n, (shape, _) in layout.items() if n in stored and stored[n][0] != shape]
    bad_dtype = [f"{n} ({stored[n][1]}, expected {SAFETENSORS_NAMES.get(dt, dt)})"
                 for n, (_, dt) in layout.items() if n in stored and (
                     (SAFETENSORS_NAMES.get(dt) in quantized or stored[n][1] in quantized)
                     and stored[n][1] != SAFETENSORS_NAMES.get(dt))]
    problems = [f"{label}: {', '.join(items[:5])}" + (f" and {len(items) - 5} more"
                                                       if len(items) > 5 else "")
                for label, items in (("missing", missing), ("unexpected", unexpected),
                                     ("shape mismatch", mismatched), ("dtype", bad_dtype))
                if items]
    if problems:
        raise ValueError(f"{directory}: quantized checkpoint does not match its config: "
                         + "; ".join(problems))


def _open(file: Path):  # noqa: ANN202 - safetensors' handle type is private
    """``safe_open`` with a clear error for truncated or corrupt files."""
    try:
        return safe_open(file, framework="pt")
    except SafetensorError as exc:
        raise ValueError(f"{file}: cannot read safetensors file (truncated or "
                         f"corrupted?): {exc}") from exc


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
