"""Rotary position embeddings (RoPE) with DeepSeek's scaling variants (V1's linear and
dynamic NTK, V2/V3's YaRN).

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
    yarn     YaRN (DeepSeek-V2/V3): frequencies whose wavelength fits in the pretraining
             context (``original_max_position_embeddings``) are kept, long ones divided by
             ``factor``, a linear ramp between (``beta_fast``/``beta_slow`` rotations).
- YaRN also rescales attention: cos/sin are multiplied by ``attention_factor`` (m(mscale) /
  m(mscale_all_dim), m(s) = 0.1 s ln(factor) + 1), and MLA multiplies its softmax scale by
  m(mscale_all_dim)^2 (``softmax_scale``), as DeepSeek's and transformers' code do. For the
  real configs (mscale == mscale_all_dim) only the softmax factor is not 1.
- Two rotation layouts: "rotate half" (V1, above) and "interleaved" pairs (2i, 2i+1),
  the layout of MLA's rope dimensions in V2/V3 checkpoints. The interleaved rotation
  writes its output in the half layout; queries and keys are rotated alike, so their
  dot products are those of the interleaved layout.
- NOTE (dynamic): L is the total length seen by attention (cached + new tokens), like
  DeepSeek V1's ``kv_seq_len``; it is recomputed on every forward instead of being cached,
  so the result depends only on the inputs. As in the reference code, keys already in a KV
  cache keep the rotation they were written with when L later crosses L0.
- ``inv_freq`` is a non-persistent buffer: it is not in checkpoints and is recomputed by
  ``reset_buffers()`` after meta-device materialisation.

Shapes: B batch, S sequence, d head dim.
"""

from __future__ import annotations

import math
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


def _yarn(dim: int, theta: float, scaling: Mapping[str, Any], seq_len: int,
          max_positions: int) -> torch.Tensor:
    factor = float(scaling["factor"])
    original = int(scaling["original_max_position_embeddings"])
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def dim_of(rotations: float) -> float:  # the dimension that turns `rotations` times
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(dim_of(beta_fast)), 0)
    high = min(math.ceil(dim_of(beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # the ramp needs a non-empty interval
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    kept = default_inv_freq(dim, theta)  # [d/2] high frequencies: extrapolated
    return kept / factor * ramp + kept * (1 - ramp)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature m = 0.1 * mscale * ln(factor) + 1 (1 for factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def attention_factor(rope_scaling: Mapping[str, Any] | None) -> float:
    """The factor YaRN puts on cos/sin (1 for every other variant)."""
    if scaling_type(rope_scaling) != "yarn":
        return 1.0
    if rope_scaling.get("attention_factor") is not None:
        return float(rope_scaling["attention_factor"])
    factor = float(rope_scaling["factor"])
    mscale, mscale_all = rope_scaling.get("mscale"), rope_scaling.get("mscale_all_dim")
    if mscale and mscale_all:
        return yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all)
    return yarn_mscale(factor)


def softmax_scale(head_dim: int, rope_scaling: Mapping[str, Any] | None) -> float:
    """MLA's softmax scale: 1/sqrt(head_dim), times m(mscale_all_dim)^2 under YaRN."""
    scale = head_dim ** -0.5
    if scaling_type(rope_scaling) == "yarn" and rope_scaling.get("mscale_all_dim"):
        scale *= yarn_mscale(float(rope_scaling["factor"]), rope_scaling["mscale_all_dim"]) ** 2
    return scale


ROPE_SCALING: dict[str, InvFreqFn] = {"default": _plain, "linear": _linear,
                                      "dynamic": _dynamic_ntk, "yarn": _yarn}
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


def apply_rotary_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                             ) -> torch.Tensor:
    """Rotate ``x [B, H, S, d]`` whose pairs are (2i, 2i+1); returns the rotated pairs in
    the half layout (first elements, then second elements)."""
    half = cos.shape[-1] // 2
    cos, sin = cos[..., :half].unsqueeze(1), sin[..., :half].unsqueeze(1)  # [B, 1, S, d/2]
    x1, x2 = x[..., 0::2], x[..., 1::2]  # [B, H, S, d/2] each
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


# Rotation layouts by name: MLA checkpoints may say ``rope_interleave: false`` (V3 configs).
ROTARY_LAYOUTS = {"half": apply_rotary, "interleaved": apply_rotary_interleaved}


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
        self.attention_factor = attention_factor(rope_scaling)
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
        if self.attention_factor != 1.0:
            f = self.attention_factor
            return (angles.cos() * f).to(dtype), (angles.sin() * f).to(dtype)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta}, scaling={self.kind}"
