"""records_grad: whether autograd records an op on these tensors.

Why one helper: several fast paths must step aside exactly when a gradient has to flow,
and all must agree on when that is: the experts' and the combine's autograd Functions skip
their Python bookkeeping in inference (a noticeable share of a one-token step), and dsmoe's
native kernels are ctypes calls, which would silently cut the graph.
"""

from __future__ import annotations

import torch


def records_grad(*tensors: torch.Tensor | None) -> bool:
    """True when grad mode is on and any of ``tensors`` (None ignored) requires grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
