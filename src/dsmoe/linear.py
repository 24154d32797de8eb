"""Linear: ``nn.Linear`` whose decode-sized products run dsmoe's native kernels.

A decode step multiplies each weight matrix by one row per sequence: the time goes into
streaming the weights from memory, and on CPU torch's bf16 matrix-vector product reads
them at about half the speed the native kernel does (``dsmoe.native``; measured in
benchmarks/generate.py). ``decode_linear`` takes such products, when they are
gradient-free, on CPU, with at most ``DECODE_MAX_ROWS`` rows (fp32:
``FP32_DECODE_MAX_ROWS``) and an output-major fp32 or bf16 weight; everything else
(training, prefill, GPUs, ``set_matmul_layout``'s input-major weights) goes to ``F.linear``
unchanged.

Numerics: fp32 products summed in fp32 (bf16 weights and activations are widened
exactly), rounded once to the activation dtype: for fp32 the same result as ``F.linear``
up to summation order, for bf16 at least as accurate.

Shapes: M rows, K in features, N out features.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from dsmoe import native
from dsmoe.autograd import records_grad

# Rows up to which the native kernels beat torch's on weights that stream from memory
# (one core, expert- and lm_head-sized matrices not in cache: at 1-2 rows ~2x for bf16 and
# 1.4-2x for fp32, at 4 rows 1.05-1.35x and 1.3-2x; at 8 torch's blocked GEMMs are ~1.3-2x
# faster, the kernels' activation rows no longer fitting in L1 beside the weight row).
DECODE_MAX_ROWS = 4
# fp32 products (weights and rows) go native up to 8 rows: on whole batch-8 decode steps
# (one process, alternating both limits, 3-layer 2B shape, quiet machine) that was 1.46x
# faster on two threads and 1.10x on one, whatever the single-matrix timings above say; bf16
# at 8 rows went 0.75x, so bf16 stays at DECODE_MAX_ROWS.
FP32_DECODE_MAX_ROWS = 8
# A CPU forward of at most this many rows (batch <= 8, one new token each) is a decode
# step: the experts run expert by expert (dsmoe.moe.grouped_gemm), the native kernels taking
# the experts with at most DECODE_MAX_ROWS rows; norms and shared experts take one native
# call each.
DECODE_STEP_MAX_ROWS = 8


def _native_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 out_dtype: torch.dtype) -> torch.Tensor | None:
    """``x [..., K] @ weight.T (+ bias)`` -> [..., N] in ``out_dtype`` by the native kernel
    (which reads and writes the activations in their dtype) if this product is a
    gradient-free step of 1 to ``DECODE_MAX_ROWS`` (fp32: ``FP32_DECODE_MAX_ROWS``) rows it
    can take; else None."""
    if records_grad(x, weight):
        return None  # a ctypes call would cut the autograd graph
    rows = x.reshape(-1, x.shape[-1])  # [M, K]
    fp32 = rows.dtype == weight.dtype == torch.float32
    if (not 0 < rows.shape[0] <= (FP32_DECODE_MAX_ROWS if fp32 else DECODE_MAX_ROWS)
            or rows.dtype not in native.FLOAT_WEIGHT_DTYPES):
        return None
    out = native.linear_decode(rows.contiguous(), native.Operand(weight), bias, out_dtype)
    return None if out is None else out.view(*x.shape[:-1], weight.shape[0])


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
                  ) -> torch.Tensor | None:
    """``x [..., K] @ weight.T (+ bias)`` by the native kernel, or None when this product is
    not a decode step it serves (see the module docstring)."""
    if x.dtype != weight.dtype or (bias is not None and bias.dtype != x.dtype):
        return None
    return _native_rows(x, weight, bias, x.dtype)


def fp32_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` computed in fp32 whatever the dtypes (the router's logits): the
    native kernel widens a bf16 weight exactly as ``weight.float()`` would, without the
    per-call copy of the weight that casting costs in a decode step."""
    out = _native_rows(x, weight, None, torch.float32)
    if out is not None:
        return out
    device = x.device.type
    with (torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device)
          else contextlib.nullcontext()):  # autocast would run it in bf16
        return F.linear(x.float(), weight.float())


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, names and checkpoints) with native decode steps."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = decode_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias) if out is None else out

    def decode_operand(self) -> native.Operand | None:
        """The weight as the native decode ops take it (``SwiGLUMLP``'s one-call decode
        step), or None where this layer must run itself: a bias, a weight that needs its
        gradient, or ``set_matmul_layout``'s input-major storage."""
        weight = self.weight
        if self.bias is not None or records_grad(weight) or not weight.is_contiguous():
            return None
        return native.Operand(weight)
