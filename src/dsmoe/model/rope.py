"""Rotary position embeddings (RoPE) with DeepSeek V1's scaling variants.

Design choices:
- Layout is "rotate half": dimension i pairs with i + d/2 (not interleaved), the layout
  HF DeepSeek/Llama checkpoints were trained with, so q/k projections load unchanged.
- Frequencies: inv_freq[i] = 1 / theta^(2i/d). Angles are computed in fp32 and cos/sin are
  cast to the activations' dtype at the end, as the reference code does.
- ``rope_scaling`` variants are small functions in a registry (no branches in forward):
    default  plain RoPE
    linear   positions divided by ``factor`` (implemented as inv_freq / factor)
    dynamic  NTK-aware: once the sequence is longer than max_position_embeddings (L0),
             the base grows to theta * (factor * L / L0 - (factor - 1)) ** (d / (d - 2))
             for the current length L; at L <= L0 it is plain RoPE.
- NOTE (dynamic): L is the total length seen by attention (cached + new tokens), like
  DeepSeek V1's ``kv_seq_len``; it is recomputed on every forward instead of being cached,
  so the result depends only on the inputs. As in the reference code, keys already in a KV
  cache keep the rotation they were written with when L later crosses L0.
- ``inv_freq`` is a non-persistent buffer: it is not in checkpoints and is recomputed by
  ``reset_buffers()`` after meta-device materialisation.

Shapes: B batch, S sequence, d head dim.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import nn

InvFreqFn = Callable[[int, float, Mapping[str, Any], int, int], torch.Tensor]


def default_inv_freq(dim: int, theta: float, device: torch.device | str | None = None
                     ) -> torch.Tensor:
    """1 / theta^(2i/d) for i < d/2, in fp32."""
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    return 1.0 / (theta ** exponents)  # [d/2]


def _plain(dim: int, theta: float, scaling: Mapping[str, Any], seq_len: int,
           max_positions: int) -> torch.Tensor:
    return default_inv_freq(dim, theta)


def _linear(dim: int, theta: float, scaling: Mapping[str, Any], seq_len: int,
            max_positions: int) -> torch.Tensor:
    return default_inv_freq(dim, theta) / float(scaling["factor"])


def _dynamic_ntk(dim: int, theta: float, scaling: Mapping[str, Any], seq_len: int,
                 max_positions: int) -> torch.Tensor:
    if seq_len <= max_positions:
        return default_inv_freq(dim, theta)
    factor = float(scaling["factor"])
    base = theta * ((factor * seq_len / max_positions) - (factor - 1)) ** (dim / (dim - 2))
    return default_inv_freq(dim, base)


ROPE_SCALING: dict[str, InvFreqFn] = {"default": _plain, "linear": _linear,
                                      "dynamic": _dynamic_ntk}
# Variants whose frequencies depend on the sequence length (recomputed per forward).
_LENGTH_DEPENDENT = frozenset({"dynamic"})


def scaling_type(rope_scaling: Mapping[str, Any] | None) -> str:
    """The registry name for a config's ``rope_scaling`` (``type`` or HF's ``rope_type``)."""
    if not rope_scaling:
        return "default"
    kind = rope_scaling.get("type", rope_scaling.get("rope_type", "default"))
    if kind not in ROPE_SCALING:
        raise ValueError(f"rope_scaling type {kind!r} is not supported; "
                         f"choose one of {sorted(ROPE_SCALING)}")
    return kind


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] over the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, H, S, d]`` by the angles of ``cos/sin [B, S, d]``."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, S, d]
    return x * cos + rotate_half(x) * sin


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given positions; ``forward(position_ids, seq_len, dtype)``."""

    def __init__(self, head_dim: int, theta: float, max_position_embeddings: int,
                 rope_scaling: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.head_dim, self.theta = head_dim, float(theta)
        self.max_position_embeddings = max_position_embeddings
        self.scaling = dict(rope_scaling or {})
        self.kind = scaling_type(rope_scaling)
        self.inv_freq_fn = ROPE_SCALING[self.kind]
        # Frequencies for sequences up to max_position_embeddings; not checkpointed.
        self.register_buffer("inv_freq", torch.empty(head_dim // 2), persistent=False)
        self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """(Re)compute ``inv_freq``: after ``to_empty`` from the meta device, or at init."""
        if self.inv_freq.is_meta:
            return
        self.inv_freq = self._inv_freq(self.max_position_embeddings).to(self.inv_freq.device)

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - torch's signature
        # NOTE: model.to(bf16) would round the frequencies (and positions * inv_freq with
        # them); recompute them in fp32 on the new device instead.
        result = super()._apply(fn, recurse)
        self.reset_buffers()
        return result

    def _inv_freq(self, seq_len: int) -> torch.Tensor:
        return self.inv_freq_fn(self.head_dim, self.theta, self.scaling, seq_len,
                                self.max_position_embeddings)

    def forward(self, position_ids: torch.Tensor, seq_len: int, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, S]; seq_len = cached + new tokens. Returns cos, sin [B, S, d]."""
        inv_freq = self.inv_freq
        if self.kind in _LENGTH_DEPENDENT and seq_len > self.max_position_embeddings:
            inv_freq = self._inv_freq(seq_len).to(position_ids.device)
        freqs = position_ids.float().unsqueeze(-1) * inv_freq  # [B, S, d/2]
        angles = torch.cat((freqs, freqs), dim=-1)  # [B, S, d]
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta}, scaling={self.kind}"
