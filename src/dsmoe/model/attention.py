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

A CPU decode step with a ``KVCache`` (one new token per sequence, no gradients) runs
steps 2-4 in one native call (``dsmoe.native.attention_decode``): at one query, torch's
~25 small ops per layer (RoPE, the cache write, SDPA) cost more than their arithmetic.

Parameter names are HF's (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``), so checkpoints
load by name. ``attention_bias`` puts biases on all four projections, as DeepSeek V1 does.

Shapes: B batch, S new tokens, D hidden, H query heads, Hkv key/value heads, d head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsmoe import native
from dsmoe.autograd import records_grad
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
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # [B, S, H*d], [B, S, Hkv*d]
        if S == 1 and isinstance(cache, KVCache) and not records_grad(q, k, v):
            out = self._native_step(q, k, v, cos, sin, mask, cache)  # [B, 1, H*d], x's dtype
            if out is not None:
                return self.o_proj(out)
        q = q.view(B, S, self.num_heads, d).transpose(1, 2)  # [B, H, S, d]
        k = k.view(B, S, self.num_kv_heads, d).transpose(1, 2)  # [B, Hkv, S, d]
        v = v.view(B, S, self.num_kv_heads, d).transpose(1, 2)  # [B, Hkv, S, d]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # [B, Hkv, P + S, d]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask.mask, is_causal=mask.is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )  # [B, H, S, d]
        return self.o_proj(out.transpose(1, 2).reshape(B, S, self.num_heads * d))


    def _native_step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cos: torch.Tensor, sin: torch.Tensor, mask: AttentionMask,
                     cache: KVCache) -> torch.Tensor | None:
        """A CPU decode step's RoPE, cache write and attention in one native call (at one
        query per sequence these are ~25 small torch ops, SDPA the largest); None where
        it does not apply. The cache's fill level advances after all layers, as ever."""
        if self.dropout and self.training or cache.seq_len >= cache.max_seq_len:
            return None  # dropout, or a full cache whose error the torch path raises
        layer = self.layer_idx
        return native.attention_decode(q, k, v, cos, sin, cache.keys[layer],
                                       cache.values[layer], cache.seq_len, mask.mask,
                                       self.head_dim ** -0.5, same_dtype=True)


ATTENTION: dict[str, type[nn.Module]] = {"mha": Attention, "mla": MultiHeadLatentAttention}


def attention_class(config: ModelConfig) -> type[nn.Module]:
    """The attention module class ``config`` asks for."""
    return ATTENTION[config.attention_type]
