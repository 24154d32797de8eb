"""QuantLinear: a drop-in for ``nn.Linear`` whose weight is int8 or int4 (``QuantMatrix``).

Activations keep their dtype; only the weight is quantized (the kernels see the rows
widened to fp32 and the result is rounded back once; a decode step does both inside one
native call, ``native.linear_decode``). The bias, when present, stays a float parameter.

Shapes: M rows, K in features, N out features.
"""

from __future__ import annotations

import torch
from torch import nn

from dsmoe import native
from dsmoe.autograd import records_grad
from dsmoe.quant.matrix import QuantMatrix


class QuantLinear(QuantMatrix):
    """y = x @ W.T (+ bias) with W [N, K] quantized; forward(x [..., K]) -> [..., N]."""

    def __init__(self, in_features: int, out_features: int, *, bits: int, group_size: int = 128,
                 symmetric: bool = False, bias: bool = False, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(out_features, in_features, bits=bits, group_size=group_size,
                         symmetric=symmetric, device=device)
        self.bias = (nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
                     if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, bits: int, group_size: int = 128,
                    symmetric: bool = False) -> "QuantLinear":
        """Quantise ``linear`` (on meta: an empty shell of the right shapes)."""
        weight = linear.weight
        out = cls(linear.in_features, linear.out_features, bits=bits, group_size=group_size,
                  symmetric=symmetric, bias=linear.bias is not None, device=weight.device, dtype=weight.dtype)
        if not weight.is_meta:
            out.set_float(weight)
            if linear.bias is not None:
                out.bias = nn.Parameter(linear.bias.detach().clone())
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._decode(x)
        if out is not None:
            return out
        out = self.matmul(x)  # [..., N]
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def _decode(self, x: torch.Tensor) -> torch.Tensor | None:
        """A gradient-free CPU product of a few rows in one native call that reads and
        writes x's dtype (``matmul`` casts to fp32 and back around the same kernel). A
        bias of x's dtype is added to the fp32 sums before the one rounding, as ``Linear``'s
        decode step and the whole-model step (``NativeDecoder``) add theirs."""
        rows = x.reshape(-1, x.shape[-1])  # [M, K]
        op, bias = self.decode_operand(), self.bias
        if (op is None or not 0 < rows.shape[0] <= self.kernel_max_rows
                or records_grad(rows, bias) or (bias is not None and bias.dtype != x.dtype)):
            return None
        out = native.linear_decode(rows.contiguous(), op, bias)
        return None if out is None else out.view(*x.shape[:-1], self.out_features)
