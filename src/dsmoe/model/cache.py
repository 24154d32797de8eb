"""Preallocated caches for incremental decoding: per-head keys and values (``KVCache``,
multi-head attention) or one latent vector per token (``LatentCache``, MLA).

Design choices:
- MHA: one tensor each for keys and values, ``[L, B, Hkv, S_max, d]``, allocated once: decoding
  writes in place and attention reads a view of the filled prefix, so a step costs no
  allocation and no re-computation of earlier tokens.
- The cache stores keys after RoPE, so cached positions are never rotated again.
- ``seq_len`` (how much is filled) is advanced by the model once per forward, after all
  layers wrote their new entries at the same offset.
- Padding is not the cache's business: the caller passes the full ``attention_mask``
  (past + new tokens) to every forward.
- MLA: ``[L, B, S_max, C + r]``, the normalised KV latent (C = kv_lora_rank) and the rotated
  rope key shared by all heads (r = qk_rope_head_dim): 576 values per token and layer for
  V2-Lite and V3 instead of 16 x (192 + 128) = 5,120 for V2-Lite's expanded K and V.
  Decoding reads it in place as a single-head key (all C + r) and value (the first C).
- Both share the bookkeeping (``_Cache``): which positions are filled, room checks.

Shapes: L layers, B batch, Hkv key/value heads, S_max capacity, S new tokens, d head dim,
C kv_lora_rank, r qk_rope_head_dim.
"""

from __future__ import annotations

import torch


def _check_sizes(kind: str, batch_size: int, max_seq_len: int) -> None:
    if batch_size < 1 or max_seq_len < 1:
        raise ValueError(f"{kind} needs batch_size >= 1 and max_seq_len >= 1, "
                         f"got {batch_size} and {max_seq_len}")


class _Cache:
    """What is filled and what fits: ``num_layers``, ``batch_size``, ``max_seq_len``."""

    num_layers: int
    batch_size: int
    max_seq_len: int
    seq_len: int

    def check_room(self, new_tokens: int) -> None:
        """Raise a ValueError if ``new_tokens`` more positions do not fit."""
        if self.seq_len + new_tokens > self.max_seq_len:
            raise ValueError(
                f"KV cache is full: {self.seq_len} cached + {new_tokens} new tokens exceed "
                f"max_seq_len={self.max_seq_len}; create it with a larger max_seq_len")

    def advance(self, new_tokens: int) -> None:
        """Mark ``new_tokens`` more positions as filled (the model calls this)."""
        self.check_room(new_tokens)
        self.seq_len += new_tokens

    def reset(self) -> None:
        """Forget the cached positions (the memory is kept for reuse)."""
        self.seq_len = 0


class KVCache(_Cache):
    """Keys and values of every layer for up to ``max_seq_len`` positions."""

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, max_seq_len: int,
                 head_dim: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        _check_sizes("KVCache", batch_size, max_seq_len)
        shape = (num_layers, batch_size, num_kv_heads, max_seq_len, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)  # [L, B, Hkv, S_max, d]
        self.values = torch.zeros(shape, dtype=dtype, device=device)  # [L, B, Hkv, S_max, d]
        self.num_layers, self.batch_size, self.max_seq_len = num_layers, batch_size, max_seq_len
        self.seq_len = 0  # positions filled so far

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k, v [B, Hkv, S, d]`` at the current offset; return the filled prefix
        ``[B, Hkv, seq_len + S, d]`` (views into the cache) for attention."""
        start, end = self.seq_len, self.seq_len + k.shape[2]
        self.keys[layer_idx, :, :, start:end] = k
        self.values[layer_idx, :, :, start:end] = v
        return self.keys[layer_idx, :, :, :end], self.values[layer_idx, :, :, :end]

    def __repr__(self) -> str:
        L, B, H, S, d = self.keys.shape
        return (f"KVCache(layers={L}, batch={B}, kv_heads={H}, filled={self.seq_len}/{S}, "
                f"head_dim={d}, dtype={self.keys.dtype})")


class LatentCache(_Cache):
    """MLA's per-token latent ``[c_kv | k_rope]`` of every layer (see the module docstring)."""

    def __init__(self, num_layers: int, batch_size: int, max_seq_len: int, width: int, *,
                 dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        _check_sizes("LatentCache", batch_size, max_seq_len)
        shape = (num_layers, batch_size, max_seq_len, width)
        self.latents = torch.zeros(shape, dtype=dtype, device=device)  # [L, B, S_max, C + r]
        self.num_layers, self.batch_size, self.max_seq_len = num_layers, batch_size, max_seq_len
        self.seq_len = 0

    def update(self, layer_idx: int, latent: torch.Tensor) -> torch.Tensor:
        """Write ``latent [B, S, C + r]`` at the current offset; return the filled prefix
        ``[B, seq_len + S, C + r]`` (a view into the cache)."""
        start, end = self.seq_len, self.seq_len + latent.shape[1]
        self.latents[layer_idx, :, start:end] = latent
        return self.latents[layer_idx, :, :end]

    def __repr__(self) -> str:
        L, B, S, W = self.latents.shape
        return (f"LatentCache(layers={L}, batch={B}, filled={self.seq_len}/{S}, width={W}, "
                f"dtype={self.latents.dtype})")
