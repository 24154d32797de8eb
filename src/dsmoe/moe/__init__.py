"""The DeepSeekMoE layer: router, balance losses, experts, dispatch."""

from dsmoe.moe.facade import MixtureOfExperts
from dsmoe.moe.layer import MoELayer, MoEOutput

__all__ = ["MixtureOfExperts", "MoELayer", "MoEOutput"]
