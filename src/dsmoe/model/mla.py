"""Multi-head Latent Attention (MLA), the attention of DeepSeek-V2 / V2-Lite / V3.

Design choices:
- Keys and values come from one low-rank latent per token: ``kv_a_proj_with_mqa`` maps the
  hidden state to ``c_kv`` (C = kv_lora_rank, RMS-normalised by ``kv_a_layernorm``) plus a
  rope key ``k_rope`` (r = qk_rope_head_dim) shared by all heads; ``kv_b_proj`` expands
  ``c_kv`` into every head's position-free key part (n = qk_nope_head_dim) and value (v).
- Queries: a full ``q_proj`` when ``q_lora_rank`` is null (V2-Lite), else the low-rank
  ``q_a_proj -> q_a_layernorm -> q_b_proj`` (V2, V3). Each head's query is [nope | rope].
- Decoupled RoPE rotates only the r rope dimensions (interleaved pairs, as checkpoints
  store them; ``rope_interleave: false`` picks the half layout). YaRN's softmax correction
  m(mscale_all_dim)^2 is folded into the softmax scale (``rope.softmax_scale``).
- Two equal ways to attend:
    expanded  (training, prefill) expand every cached latent into per-head K [n + r] and
              V [v], then SDPA: the cheapest for many queries.
    absorbed  (decoding: new tokens after a cached prefix) the DeepSeek-V2 paper's
              inference form. q_nope is multiplied into the latent space by W_UK (the key
              half of kv_b_proj), so scores are [q_nope W_UK | q_rope] . [c_kv | k_rope]
              against the cache itself, one shared "head" of width C + r; the weighted
              latents go through W_UV (the value half) per head before o_proj. Nothing per
              head is ever materialised for the cached tokens.
  A CPU decode step (one new token per sequence, no gradients) runs the absorbed form after
  the two projections as one native call (``native.mla_decode``: the latent norm, both
  rotations, the cache write, the attention and W_UV): torch's ~270 small ops per layer,
  its SDPA copying the latent cache once per head, cost ~3x the call at V2-Lite's shape.
  The absorbed form reads kv_b_proj's weight: a plain Linear's, or a quantized module's
  ``dequantize()`` (duck-typed: model/ imports nothing above it; [H*(n+v), C] per step is
  cheap beside expanding every cached token). A LoRA-wrapped kv_b_proj adds to its output,
  which only the expanded form honours: decoding then expands the cache.
- The cache (``LatentCache``) holds [c_kv | k_rope] after the norm and the rotation.
- Parameter names are HF's DeepSeek-V2/V3 names, so checkpoints load by name.

Shapes: B batch, S new tokens, T keys (cached + new), D hidden, H heads, C kv_lora_rank,
r qk_rope_head_dim, n qk_nope_head_dim, v v_head_dim, Q q_lora_rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsmoe import native
from dsmoe.autograd import records_grad
from dsmoe.config import ModelConfig
from dsmoe.linear import Linear
from dsmoe.model.cache import LatentCache
from dsmoe.model.mask import AttentionMask
from dsmoe.model.norm import RMSNorm
from dsmoe.model.rope import ROTARY_LAYOUTS, softmax_scale

# DeepSeek's and transformers' code build the two latent norms with this eps, not
# rms_norm_eps (the same value in every released config).
_LATENT_NORM_EPS = 1e-6


class MultiHeadLatentAttention(nn.Module):
    """forward(x, cos, sin, mask, cache):
      1. queries [B, H, S, n + r]; latent [c_kv | k_rope] [B, S, C + r] (normed, rotated)
      2. with a cache: append the latent; after a cached prefix, attend absorbed (step 3b)
      3a. expanded: K, V of all T latents by kv_b_proj; SDPA; o_proj
      3b. absorbed: SDPA of [q_nope W_UK | q_rope] against the latents; W_UV; o_proj
          (a CPU decode step: steps 1-3b after the projections in one native call)
    """

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        D, H, bias = config.hidden_size, config.num_attention_heads, config.attention_bias
        self.num_heads = H
        self.nope_dim, self.rope_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.v_dim, self.kv_rank = config.v_head_dim, config.kv_lora_rank
        qk = self.nope_dim + self.rope_dim
        if config.q_lora_rank is None:
            self.q_proj = Linear(D, H * qk, bias=False)  # [H*(n+r), D]
        else:
            Q = config.q_lora_rank
            self.q_a_proj = Linear(D, Q, bias=bias)  # [Q, D]
            self.q_a_layernorm = RMSNorm(Q, _LATENT_NORM_EPS)
            self.q_b_proj = Linear(Q, H * qk, bias=False)  # [H*(n+r), Q]
        self.kv_a_proj_with_mqa = Linear(D, self.kv_rank + self.rope_dim, bias=bias)  # [C+r, D]
        self.kv_a_layernorm = RMSNorm(self.kv_rank, _LATENT_NORM_EPS)
        self.kv_b_proj = Linear(self.kv_rank, H * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = Linear(H * self.v_dim, D, bias=bias)  # [D, H*v]
        self.scale = softmax_scale(qk, config.rope_scaling)
        interleaved = config.extra.get("rope_interleave", True)
        self.rotate = ROTARY_LAYOUTS["interleaved" if interleaved else "half"]
        self.dropout = config.attention_dropout

    @classmethod
    def new_cache(cls, config: ModelConfig, batch_size: int, max_seq_len: int, *,
                  dtype: torch.dtype, device: torch.device | str | None) -> LatentCache:
        return LatentCache(config.num_hidden_layers, batch_size, max_seq_len,
                           config.kv_lora_rank + config.qk_rope_head_dim, dtype=dtype,
                           device=device)

    def _queries(self, x: torch.Tensor) -> torch.Tensor:  # [B, S, D] -> [B, S, H*(n+r)]
        if hasattr(self, "q_proj"):
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: AttentionMask, cache: LatentCache | None = None) -> torch.Tensor:
        B, S, _ = x.shape  # [B, S, D]
        q = self._queries(x)  # [B, S, H*(n+r)]
        kv = self.kv_a_proj_with_mqa(x)  # [B, S, C+r]
        if (S == 1 and isinstance(cache, LatentCache) and cache.seq_len > 0
                and not records_grad(q, kv)):  # (decode.py's static step: its own writer)
            out = self._native_step(q, kv, cos, sin, mask, cache)  # [B, 1, H*v]
            if out is not None:
                return self.o_proj(out)
        q = q.view(B, S, self.num_heads, -1).transpose(1, 2)  # [B, H, S, n+r]
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        q_rope = self.rotate(q_rope, cos, sin)  # [B, H, S, r]
        c_kv, k_rope = kv.split([self.kv_rank, self.rope_dim], dim=-1)
        k_rope = self.rotate(k_rope.unsqueeze(1), cos, sin).squeeze(1)  # [B, S, r]
        latent = torch.cat((self.kv_a_layernorm(c_kv), k_rope), dim=-1)  # [B, S, C+r]
        if cache is not None:
            past = cache.seq_len
            latent = cache.update(self.layer_idx, latent)  # [B, T, C+r]
            w_kv_b = self._kv_b_weight(x.dtype) if past > 0 else None
            if w_kv_b is not None:
                return self._absorbed(q_nope, q_rope, latent, mask, w_kv_b)
        return self._expanded(q_nope, q_rope, latent, mask)

    def _native_step(self, q: torch.Tensor, kv: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor, mask: AttentionMask, cache: LatentCache
                     ) -> torch.Tensor | None:
        """A CPU decode step's latent norm, RoPE, cache write and absorbed attention in one
        native call (torch: ~270 small ops per layer, its SDPA copying the latent cache per
        head); None where it does not apply. The cache's fill level advances after all
        layers, as ever."""
        if cache.seq_len >= cache.max_seq_len:
            return None  # a full cache, whose error the torch path raises
        w_kv_b = self._kv_b_weight(q.dtype)  # None: a LoRA-wrapped kv_b_proj
        if w_kv_b is None or records_grad(w_kv_b, self.kv_a_layernorm.weight):
            return None
        shape = native.MLAShape(self.num_heads, self.nope_dim, self.rope_dim, self.v_dim,
                                self.kv_rank)
        return native.mla_decode(
            q, kv, self.kv_a_layernorm.weight, self.kv_a_layernorm.eps, cos, sin,
            self.rotate is ROTARY_LAYOUTS["interleaved"], cache.latents[self.layer_idx],
            cache.seq_len, mask.mask, w_kv_b, self.scale, shape)

    def _kv_b_weight(self, dtype: torch.dtype) -> torch.Tensor | None:
        """kv_b_proj's weight [H*(n+v), C] for the absorbed form, or None (see the module
        docstring)."""
        module = self.kv_b_proj
        if isinstance(module, nn.Linear):
            return module.weight
        dequantize = getattr(module, "dequantize", None)
        return dequantize(dtype) if callable(dequantize) else None

    def _expanded(self, q_nope: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor,
                  mask: AttentionMask) -> torch.Tensor:
        B, H, S, _ = q_nope.shape
        T = latent.shape[1]
        c_kv, k_rope = latent.split([self.kv_rank, self.rope_dim], dim=-1)  # [B, T, C], [B, T, r]
        kv = self.kv_b_proj(c_kv).view(B, T, H, -1).transpose(1, 2)  # [B, H, T, n+v]
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat((k_nope, k_rope.unsqueeze(1).expand(B, H, T, self.rope_dim)), dim=-1)
        q = torch.cat((q_nope, q_rope), dim=-1)  # [B, H, S, n+r]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask.mask, is_causal=mask.is_causal, scale=self.scale,
            dropout_p=self.dropout if self.training else 0.0)  # [B, H, S, v]
        return self.o_proj(out.transpose(1, 2).reshape(B, S, H * self.v_dim))

    def _absorbed(self, q_nope: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor,
                  mask: AttentionMask, w_kv_b: torch.Tensor) -> torch.Tensor:
        B, H, S, _ = q_nope.shape
        w = w_kv_b.view(H, self.nope_dim + self.v_dim, self.kv_rank)  # [H, n+v, C]
        w_uk, w_uv = w.split([self.nope_dim, self.v_dim], dim=1)  # [H, n, C], [H, v, C]
        q_latent = torch.einsum("bhsn,hnc->bhsc", q_nope, w_uk)  # [B, H, S, C]
        q = torch.cat((q_latent, q_rope), dim=-1)  # [B, H, S, C+r]
        keys = latent.unsqueeze(1)  # [B, 1, T, C+r]: one key "head" shared by all H
        values = keys[..., :self.kv_rank]  # [B, 1, T, C]
        out = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask.mask, is_causal=mask.is_causal, scale=self.scale,
            enable_gqa=True)  # [B, H, S, C]
        out = torch.einsum("bhsc,hvc->bshv", out, w_uv)  # [B, S, H, v]
        return self.o_proj(out.reshape(B, S, H * self.v_dim))

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, kv_lora_rank={self.kv_rank}, nope={self.nope_dim}, "
                f"rope={self.rope_dim}, v={self.v_dim}, scale={self.scale:.6g}")
