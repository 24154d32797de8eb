"""dsmoe: a reference-quality, fast implementation of the DeepSeekMoE architecture."""

from dsmoe.config import ModelConfig, MoEConfig
from dsmoe.model import KVCache, ModelOutput, Transformer
from dsmoe.moe import MixtureOfExperts, MoELayer, MoEOutput

__version__ = "0.1.0"
__all__ = ["KVCache", "MixtureOfExperts", "ModelConfig", "ModelOutput", "MoEConfig", "MoELayer",
           "MoEOutput", "Transformer", "__version__"]
