"""Backward through frozen int8/int4 weights: what QLoRA-style finetuning needs.

torch's weight-only int kernels (``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``)
have no derivative, so a LoRA adapter below a quantized layer would get no gradient. The
weights are frozen, so only the input gradient is needed: grad_x = grad_y @ W. ``QuantMatmul``
runs the forward with the quantized kernel (exactly what inference runs) and the backward
with the weight dequantized for that one matrix, on the fly and dropped right after, so the
float copy of a weight never outlives one backward call.

``quant_linear`` / ``quant_grouped_linear`` are the differentiable versions of
``QuantLinear.forward`` / the per-expert loop of ``QuantSwiGLUExperts``; ``TrainableQuant``
wraps the quantized modules that carry no adapter (e.g. ``lm_head``; see
``lora.make_quant_trainable``), so gradients reach the adapters of earlier layers.

Shapes: M rows, K in features, N out features, E experts, A rows sorted by expert.
"""

from __future__ import annotations

import torch
from torch import nn

from dsmoe.autograd import records_grad
from dsmoe.quant.linear import QuantLinear
from dsmoe.quant.matrix import QuantMatrix


def dequantized(matrix: QuantMatrix, index: int | None, dtype: torch.dtype) -> torch.Tensor:
    """The float weight [N, K] of ``matrix`` (matrix ``index`` of a stack)."""
    return matrix.dequantize(dtype, index)


class QuantMatmul(torch.autograd.Function):
    """y = x @ W.T with W quantized (and frozen): gradient for x only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, matrix: QuantMatrix, index: int | None  # noqa: ANN001
                ) -> torch.Tensor:
        ctx.matrix, ctx.index = matrix, index
        return matrix.matmul(x, index)  # [..., N]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205 - autograd's signature
        weight = dequantized(ctx.matrix, ctx.index, grad.dtype)  # [N, K], freed on return
        return grad @ weight, None, None


def quant_matmul(matrix: QuantMatrix, x: torch.Tensor, index: int | None = None) -> torch.Tensor:
    """``matrix.matmul(x, index)`` with a gradient for ``x`` when it needs one."""
    if records_grad(x):
        return QuantMatmul.apply(x, matrix, index)
    return matrix.matmul(x, index)


def quant_linear(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` (x [..., K] -> [..., N]), differentiable in ``x``."""
    out = quant_matmul(layer, x)
    return out if layer.bias is None else out + layer.bias.to(out.dtype)


def quant_grouped_linear(matrix: QuantMatrix, x: torch.Tensor, counts: torch.Tensor
                         ) -> torch.Tensor:
    """Row block e of ``x [A, K]`` times expert e's quantized weight -> [A, N]: one kernel
    call per expert with rows (there is no grouped int kernel on CPU)."""
    pieces = [quant_matmul(matrix, rows, e)
              for e, rows in enumerate(torch.split(x, counts.tolist(), dim=0)) if rows.shape[0]]
    return torch.cat(pieces) if pieces else x.new_zeros(0, matrix.out_features)


class TrainableQuant(nn.Module):
    """A quantized linear layer without adapter that passes gradients to its input."""

    def __init__(self, base_layer: QuantLinear) -> None:
        super().__init__()
        self.base_layer = base_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quant_linear(self.base_layer, x)
