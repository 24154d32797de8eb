"""dsmoe: a reference-quality, fast implementation of the DeepSeekMoE architecture.

The public names are imported on first use (PEP 562), so ``import dsmoe.cli`` and
``dsmoe --help`` do not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {  # public name -> module that defines it
    "ModelConfig": "dsmoe.config", "MoEConfig": "dsmoe.config",
    "KVCache": "dsmoe.model", "ModelOutput": "dsmoe.model", "Transformer": "dsmoe.model",
    "MixtureOfExperts": "dsmoe.moe", "MoELayer": "dsmoe.moe", "MoEOutput": "dsmoe.moe",
}
__all__ = sorted(_EXPORTS) + ["__version__"]

if TYPE_CHECKING:
    from dsmoe.config import ModelConfig, MoEConfig
    from dsmoe.model import KVCache, ModelOutput, Transformer
    from dsmoe.moe import MixtureOfExperts, MoELayer, MoEOutput


_EAGER_BEFORE = ("config", "model", "moe")  # subpackages ``import dsmoe`` used to load


def __getattr__(name: str) -> Any:
    if name in _EAGER_BEFORE:
        return importlib.import_module(f"dsmoe.{name}")
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dsmoe' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
