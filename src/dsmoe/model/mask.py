"""The attention mask: causal order plus padding, in the form SDPA runs fastest with.

Design choices:
- No padding and no cached prefix: no mask at all, SDPA's ``is_causal`` fast path.
  One new token without padding: no mask either (it may see every cached position).
- Otherwise a boolean mask ``[B or 1, 1, S, S_past + S]`` (True = may attend), built once
  per forward and shared by all layers.
- NOTE: a left-padding query position may have no visible key at all (every earlier key is
  padding). Such rows are opened to all keys so SDPA never sees an empty row (which can
  yield NaN); their outputs are never read, and no real token attends to padding.

Shapes: B batch, S new tokens, P cached (past) tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMask:
    mask: torch.Tensor | None  # [B or 1, 1, S, P + S] bool, True = may attend; None = no mask
    is_causal: bool  # pass is_causal=True to SDPA (only when mask is None and P == 0)


def build_attention_mask(padding_mask: torch.Tensor | None, new_tokens: int, past: int,
                         device: torch.device) -> AttentionMask:
    """``padding_mask [B, P + S]`` (1 = real token, 0 = padding), or None when there is none."""
    S, total = new_tokens, past + new_tokens
    if padding_mask is None:
        if past == 0:
            return AttentionMask(None, is_causal=S > 1)
        if S == 1:
            return AttentionMask(None, is_causal=False)
    query_pos = torch.arange(past, total, device=device).unsqueeze(-1)  # [S, 1]
    key_pos = torch.arange(total, device=device)  # [P + S]
    mask = (key_pos <= query_pos)[None, None]  # [1, 1, S, P + S]
    if padding_mask is not None:
        mask = mask & padding_mask.bool()[:, None, None, :]  # [B, 1, S, P + S]
        mask = mask | ~mask.any(dim=-1, keepdim=True)  # see NOTE: no empty rows
    return AttentionMask(mask, is_causal=False)
