"""One decoder layer: x + Attention(RMSNorm x), then x + FFN(RMSNorm x).

The attention is the kind the config names (MHA for V1, MLA for V2/V3; ``model.attention``).
The FFN is a dense SwiGLU MLP (``intermediate_size``) where ``config.is_moe_layer(i)`` is
false (the first ``first_k_dense_replace`` layers, and off-``moe_layer_freq`` layers), and a
``MoELayer`` otherwise. Names follow HF: ``input_layernorm``, ``self_attn``,
``post_attention_layernorm``, ``mlp``.

Shapes: B batch, S sequence, D hidden.
"""

from __future__ import annotations

import torch
from torch import nn

from dsmoe.config import ModelConfig
from dsmoe.mlp import SwiGLUMLP
from dsmoe.model.attention import attention_class
from dsmoe.model.cache import KVCache, LatentCache
from dsmoe.model.mask import AttentionMask
from dsmoe.model.norm import RMSNorm
from dsmoe.moe.layer import MoELayer, MoEOutput


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        D = config.hidden_size
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(D, config.rms_norm_eps)
        self.self_attn = attention_class(config)(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(D, config.rms_norm_eps)
        self.mlp: nn.Module
        if config.is_moe_layer(layer_idx):
            self.mlp = MoELayer(config.moe)
        else:
            self.mlp = SwiGLUMLP(D, config.intermediate_size, config.hidden_act,
                                 config.initializer_range)

    @property
    def is_moe(self) -> bool:
        return isinstance(self.mlp, MoELayer)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: AttentionMask, cache: KVCache | LatentCache | None = None
                ) -> tuple[torch.Tensor, MoEOutput | None]:
        """x [B, S, D] -> ([B, S, D], the MoE layer's output or None for a dense FFN)."""
        attn = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        x, h = self.post_attention_layernorm.add_and_norm(x, attn)  # x + attn, its norm
        if self.is_moe:
            routed = self.mlp(h)
            return x + routed.hidden_states, routed
        return x + self.mlp(h), None
