"""Checkpoints: one ``load(path, ...)`` / ``save(model, directory, ...)`` for every format.

    load(path, dtype=, device=, quant=)   HF directory, quantized directory or .gguf
    save(model, directory, tokenizer_dir=) HF directory (quantized models: quantized one)

Modules: ``loading`` (the format choice, the one filler), ``hf`` / ``gguf`` / the quantized
directories of ``dsmoe.quant.checkpoint`` (one source each), ``directory`` (the one atomic
model-directory writer), ``keys`` (HF <-> dsmoe tensor names), ``dtypes`` (dtype names).
"""

from __future__ import annotations

from typing import Any


def load(path: Any, **kwargs: Any) -> Any:
    """``checkpoint.loading.load``: a model from any checkpoint path (see its docstring).
    Imported on call, so ``checkpoint.keys`` (which the MoE layer uses) stays light."""
    from dsmoe.checkpoint.loading import load as load_checkpoint

    return load_checkpoint(path, **kwargs)


def save(model: Any, directory: Any, **kwargs: Any) -> None:
    """``checkpoint.loading.save``: ``model`` as an HF (or quantized) model directory."""
    from dsmoe.checkpoint.loading import save as save_checkpoint

    save_checkpoint(model, directory, **kwargs)


__all__ = ["load", "save"]
