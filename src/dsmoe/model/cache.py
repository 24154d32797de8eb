"""A preallocated key/value cache for incremental decoding.

Design choices:
- One tensor each for keys and values, ``[L, B, Hkv, S_max, d]``, allocated once: decoding
  writes in place and attention reads a view of the filled prefix, so a step costs no
  allocation and no re-computation of earlier tokens.
- The cache stores keys after RoPE, so cached positions are never rotated again.
- ``seq_len`` (how much is filled) is advanced by the model once per forward, after all
  layers wrote their new entries at the same offset.
- Padding is not the cache's business: the caller passes the full ``attention_mask``
  (past + new tokens) to every forward.

Shapes: L layers, B batch, Hkv key/value heads, S_max capacity, S new tokens, d head dim.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer for up to ``max_seq_len`` positions."""

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, max_seq_len: int,
                 head_dim: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        if batch_size < 1 or max_seq_len < 1:
            raise ValueError(f"KVCache needs batch_size >= 1 and max_seq_len >= 1, "
                             f"got {batch_size} and {max_seq_len}")
        shape = (num_layers, batch_size, num_kv_heads, max_seq_len, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)  # [L, B, Hkv, S_max, d]
        self.values = torch.zeros(shape, dtype=dtype, device=device)  # [L, B, Hkv, S_max, d]
        self.seq_len = 0  # positions filled so far

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    @property
    def max_seq_len(self) -> int:
        return self.keys.shape[3]

    @property
    def num_layers(self) -> int:
        return self.keys.shape[0]

    def check_room(self, new_tokens: int) -> None:
        """Raise a ValueError if ``new_tokens`` more positions do not fit."""
        if self.seq_len + new_tokens > self.max_seq_len:
            raise ValueError(
                f"KV cache is full: {self.seq_len} cached + {new_tokens} new tokens exceed "
                f"max_seq_len={self.max_seq_len}; create it with a larger max_seq_len")

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k, v [B, Hkv, S, d]`` at the current offset; return the filled prefix
        ``[B, Hkv, seq_len + S, d]`` (views into the cache) for attention."""
        start, end = self.seq_len, self.seq_len + k.shape[2]
        self.keys[layer_idx, :, :, start:end] = k
        self.values[layer_idx, :, :, start:end] = v
        return self.keys[layer_idx, :, :, :end], self.values[layer_idx, :, :, :end]

    def advance(self, new_tokens: int) -> None:
        """Mark ``new_tokens`` more positions as filled (the model calls this)."""
        self.check_room(new_tokens)
        self.seq_len += new_tokens

    def reset(self) -> None:
        """Forget the cached positions (the memory is kept for reuse)."""
        self.seq_len = 0

    def __repr__(self) -> str:
        L, B, H, S, d = self.keys.shape
        return (f"KVCache(layers={L}, batch={B}, kv_heads={H}, filled={self.seq_len}/{S}, "
                f"head_dim={d}, dtype={self.keys.dtype})")
