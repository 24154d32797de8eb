"""The DeepSeekMoE language model: norm, RoPE, attention, KV cache, blocks, Transformer."""

from dsmoe.model.attention import Attention
from dsmoe.model.block import Block
from dsmoe.model.cache import KVCache, LatentCache
from dsmoe.model.mla import MultiHeadLatentAttention
from dsmoe.model.norm import RMSNorm
from dsmoe.model.rope import RotaryEmbedding
from dsmoe.model.transformer import ModelOutput, Transformer

__all__ = ["Attention", "Block", "KVCache", "LatentCache", "ModelOutput",
           "MultiHeadLatentAttention", "RMSNorm", "RotaryEmbedding", "Transformer"]
