"""dsmoe: a reference-quality, fast implementation of the DeepSeekMoE architecture."""

from dsmoe.config import ModelConfig
from dsmoe.model import KVCache, ModelOutput, Transformer
from dsmoe.moe import MixtureOfExperts, MoELayer, MoEOutput

__version__ = "0.1.0"
__all__ = ["KVCache", "MixtureOfExperts", "ModelConfig", "ModelOutput", "MoELayer", "MoEOutput",
           "Transformer", "__version__"]
