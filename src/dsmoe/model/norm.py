"""RMSNorm as DeepSeek V1 and Llama define it.

The mean square is taken in fp32 whatever the activations' dtype; the normalised values are
cast back to that dtype *before* the learned scale is applied (HF's order of operations, so
bf16 outputs match the reference modeling code bit for bit).

Shapes: D hidden size.
"""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """weight * x / sqrt(mean(x^2) + eps), no bias, no mean subtraction."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden_size))  # [D]
        self.eps = eps
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., D] -> [..., D]
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
