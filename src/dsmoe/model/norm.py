"""RMSNorm as DeepSeek V1 and Llama define it.

The mean square is taken in fp32 whatever the activations' dtype; the normalised values are
cast back to that dtype *before* the learned scale is applied (HF's order of operations, so
bf16 outputs match the reference modeling code bit for bit). A CPU decode step (at most
``DECODE_STEP_MAX_ROWS`` rows, no gradient) runs in one native call with the same
roundings, optionally fused with the residual add before it (``add_and_norm``).

Shapes: D hidden size.
"""

from __future__ import annotations

import torch
from torch import nn

from dsmoe import native
from dsmoe.autograd import records_grad
from dsmoe.linear import DECODE_STEP_MAX_ROWS


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
        fused = self._decode_step(x, None)
        if fused is not None:
            return fused[1]
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)

    def add_and_norm(self, x: torch.Tensor, delta: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, self(x + delta)): a block's residual add and the next norm, in one
        native call for a decode step."""
        fused = self._decode_step(x, delta)
        if fused is not None:
            return fused  # type: ignore[return-value]
        x = x + delta
        return x, self(x)

    def _decode_step(self, x: torch.Tensor, delta: torch.Tensor | None
                     ) -> tuple[torch.Tensor | None, torch.Tensor] | None:
        """A gradient-free CPU step of at most ``DECODE_STEP_MAX_ROWS`` rows in one native
        call (the same roundings as ``forward``; the mean square's sum in another order);
        None otherwise. At one token ``forward`` is 7 aten ops, more than its arithmetic."""
        D = x.shape[-1]
        if (x.device.type != "cpu" or not 0 < x.numel() <= DECODE_STEP_MAX_ROWS * D
                or records_grad(x, delta, self.weight)):
            return None
        rows = x.reshape(-1, D).contiguous()  # [T, D]
        if delta is not None:
            if delta.shape != x.shape:
                return None  # a broadcasting add: torch's
            delta = delta.reshape(-1, D).contiguous()
        fused = native.rmsnorm_decode(rows, self.weight, self.eps, delta)
        if fused is None:
            return None
        total, out = fused
        return (None if total is None else total.view(x.shape)), out.view(x.shape)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
