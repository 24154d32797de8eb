"""Self-attention: the registry of kinds (``ATTENTION``, keyed by
``config.attention_type``) and V1's multi-head / grouped-query attention with RoPE.

Each kind is a module ``(config, layer_idx)`` with ``forward(x, cos, sin, mask, cache)``
and a ``new_cache`` classmethod building the cache it decodes with; the model picks one by
the config and never asks which it got. "mha": ``Attention`` below (DeepSeek V1, Llama);
"mla": ``MultiHeadLatentAttention`` (DeepSeek-V2/V3, ``dsmoe.model.mla``).

forward(x):
  1. project to queries [B, H, S, d] and keys/values [B, Hkv, S, d] (optional biases)
  2. rotate queries and keys by their positions (RoPE)
  3. with a KV cache: append keys/values, attend over the cached prefix plus the new ones
  4. ``F.scaled_dot_product_attention`` (grouped-query heads share K/V through
     ``enable_gqa``, no repeated copies), then the output projection

Parameter names are HF's (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``), so checkpoints
load by name. ``attention_bias`` puts biases on all four projections, as DeepSeek V1 does.

Shapes: B batch, S new tokens, D hidden, H query heads, Hkv key/value heads, d head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsmoe.config import ModelConfig
from dsmoe.linear import Linear
from dsmoe.model.cache import KVCache
from dsmoe.model.mask import AttentionMask
from dsmoe.model.mla import MultiHeadLatentAttention
from dsmoe.model.rope import apply_rotary


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        D, d, bias = config.hidden_size, config.head_dim, config.attention_bias
        self.q_proj = Linear(D, self.num_heads * d, bias=bias)  # [H*d, D]
        self.k_proj = Linear(D, self.num_kv_heads * d, bias=bias)  # [Hkv*d, D]
        self.v_proj = Linear(D, self.num_kv_heads * d, bias=bias)  # [Hkv*d, D]
        self.o_proj = Linear(self.num_heads * d, D, bias=bias)  # [D, H*d]
        self.dropout = config.attention_dropout

    @classmethod
    def new_cache(cls, config: ModelConfig, batch_size: int, max_seq_len: int, *,
                  dtype: torch.dtype, device: torch.device | str | None) -> KVCache:
        return KVCache(config.num_hidden_layers, batch_size, config.num_key_value_heads,
                       max_seq_len, config.head_dim, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: AttentionMask, cache: KVCache | None = None) -> torch.Tensor:
        B, S, _ = x.shape  # [B, S, D]
        d = self.head_dim
        q = self.q_proj(x).view(B, S, self.num_heads, d).transpose(1, 2)  # [B, H, S, d]
        k = self.k_proj(x).view(B, S, self.num_kv_heads, d).transpose(1, 2)  # [B, Hkv, S, d]
        v = self.v_proj(x).view(B, S, self.num_kv_heads, d).transpose(1, 2)  # [B, Hkv, S, d]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # [B, Hkv, P + S, d]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask.mask, is_causal=mask.is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )  # [B, H, S, d]
        return self.o_proj(out.transpose(1, 2).reshape(B, S, self.num_heads * d))


ATTENTION: dict[str, type[nn.Module]] = {"mha": Attention, "mla": MultiHeadLatentAttention}


def attention_class(config: ModelConfig) -> type[nn.Module]:
    """The attention module class ``config`` asks for."""
    return ATTENTION[config.attention_type]
