"""Routed experts as stacked ``[E, ...]`` weights, run as grouped matmuls.

Design choices:
- Inputs arrive sorted by expert with per-expert ``counts``; every expert's rows are one
  contiguous slice, so an expert is a plain GEMM on a view (no masks).
- Three kernels run those GEMMs (``GroupedGEMM``), all with the same numbers up to float
  rounding:
  * ``grouped_mm``: ``torch._grouped_mm``, one call for all experts, where the installed
    torch supports the device and dtype (probed once). The choice on accelerators.
  * ``batched``: the CPU default. CPU ``_grouped_mm`` is a serial loop of GEMMs, each split
    over all cores; a GEMM of ~200 rows splits badly (measured on 2 cores: ~60% of the
    per-core speed of one big GEMM, and every GEMM is a barrier, which hurts most when the
    cores are shared). Instead, runs of adjacent non-empty experts are cut into chunks,
    each chunk's rows are padded with zeros to its busiest expert, and each chunk is one
    ``bmm``, which gives whole experts to separate cores. The cut has the fewest padded rows
    among chunks of at least 2 x threads experts (at most 16); on the 16B layer with 2048
    tokens that pads ~6% of the rows and runs the expert GEMMs ~1.35x faster than the loop.
    Padded rows are zero in, so they add exactly zero to weight gradients, and they are
    ignored on the way out.
  * ``gather``: each row multiplies its own expert's weight matrix, gathered by index
    (``w[expert of row]``, one ``bmm``). It reads a matrix per row instead of per expert,
    so it is for decode-sized batches only; but nothing in it depends on the counts on the
    host, so a CUDA graph can replay it whatever the routing (``dsmoe.decode`` uses it
    where ``torch._grouped_mm`` is unavailable).
  * ``loop``: one GEMM per non-empty expert into slices of one buffer; the test oracle.
- The linear map has its own backward (``_ExpertLinear``): each expert's weight gradient is
  computed straight into the parameter's layout (``dy_e.T @ x_e``; output- or input-major).
  Autograd through ``x @ W.transpose`` would produce ``[E, in, out]`` and then copy it: a
  second, freshly allocated weight-sized tensor (2.2 GB of fp32 per step for the 16B layer).
  Nor does any kernel index ``weight[e]`` under autograd, whose backward materialises a
  zero ``[E, out, in]`` tensor per expert.
- ``SwiGLUExperts`` runs both GEMMs and the activation as one Function
  (``_SwiGLUExpertsFn``) that keeps one ``[P, F]`` activation and writes the gate and up
  gradients into one buffer: on CPU every freshly allocated buffer costs page faults.
- Rows live in a work buffer of ``P`` rows (the sorted rows, or those plus padding);
  ``GroupedGEMM.enter``/``leave`` convert, and ``dispatch.run_experts`` gathers tokens
  straight into it and combines from it, skipping both conversions.
- Weights keep HF's per-expert ``[out, in]`` orientation, so loading is a stack and the
  GEMMs read transposed views, never copies. SwiGLU's gate and up projections are fused into
  one ``gate_up_proj [E, 2F, D]`` for one GEMM instead of two.

Shapes: A rows (assignments, sorted by expert), P rows of the work buffer (A, or A plus
padding), D hidden, F expert width, E experts; ``in``/``out`` a linear map's features.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dsmoe import native
from dsmoe.autograd import records_grad
from dsmoe.linear import DECODE_MAX_ROWS
from dsmoe.mlp import ACTIVATIONS

KERNELS = ("batched", "gather", "grouped_mm", "loop")

Chunk = tuple[int, int, int, int]  # (first expert, end expert, rows per expert, first row)


# --- kernel choice ------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def grouped_mm_supported(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` gives the loop's results here, for the three layouts
    the experts use, with an empty group in the middle. Forward calls under no_grad only, so
    the answer does not depend on the grad mode of the first call."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        with torch.no_grad():
            gen = torch.Generator().manual_seed(0)
            a = torch.randn(16, 8, generator=gen).to(device_type, dtype)  # [A, in]
            w = torch.randn(3, 8, 8, generator=gen).to(device_type, dtype)  # [E, out, in]
            counts = torch.tensor([5, 0, 11], device=device_type)
            offs = torch.cumsum(counts, 0, dtype=torch.int32)
            got = [torch._grouped_mm(a, w.transpose(-2, -1), offs=offs),  # y = x W.T
                   torch._grouped_mm(a, w, offs=offs),  # dx = dy W
                   torch._grouped_mm(a.t(), a, offs=offs)]  # dW = dy.T x
            want = [_loop_mm(a, w.transpose(-2, -1), counts), _loop_mm(a, w, counts),
                    _loop_mm_weight(a, a, counts)]
            return all(torch.allclose(g.float(), e.float(), atol=1e-2, rtol=1e-2)
                       for g, e in zip(got, want))
    except (RuntimeError, NotImplementedError, TypeError):
        return False


@torch.compiler.assume_constant_result
def _grouped_mm_ok(device_type: str, dtype: torch.dtype) -> bool:
    """``grouped_mm_supported`` as a constant to ``torch.compile`` (which would otherwise
    trace into the probe, past its cache, and break the graph there)."""
    return grouped_mm_supported(device_type, dtype)


def default_kernel(device: torch.device, dtype: torch.dtype) -> str:
    """``batched`` on CPU (see the module docstring), else ``grouped_mm`` where it works."""
    if device.type != "cpu" and _grouped_mm_ok(device.type, dtype):
        return "grouped_mm"
    return "batched"


# --- the three kernels: y = x W[e].T, dx = dy W[e], dW[e] = dy.T x per expert ------------------
def _loop_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Row block e of ``x [A, k]`` times ``w[e] [k, n]`` -> [A, n], one GEMM per expert."""
    out = x.new_empty(x.shape[0], w.shape[-1])  # [A, n]
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n:
            torch.mm(x[start:start + n], w[e], out=out[start:start + n])
            start += n
    return out


# A CPU forward whose experts have at most this many rows each is a decode step (batch
# <= 8: a token picks an expert once); it runs expert by expert, the native kernels taking
# the experts with at most DECODE_MAX_ROWS rows.
DECODE_STEP_MAX_ROWS = 8


def expert_blocks(counts: list[int], first_rows: list[int] | None = None
                  ) -> list[native.Block]:
    """(expert, first row, rows) of every expert with rows: the block table of the native
    kernels. Rows are in sorted order (expert by expert) unless ``first_rows`` gives the
    first row of each expert."""
    if first_rows is None:
        first_rows = list(itertools.accumulate(counts[:-1], initial=0))
    return [(e, first_rows[e], n) for e, n in enumerate(counts) if n]


def _decode_mm(x: torch.Tensor, w: torch.Tensor, blocks: list[native.Block]
               ) -> torch.Tensor | None:
    """Work rows ``x [P, k]`` times ``w[e] [k, n]`` per ``(expert, first row, rows)`` block,
    by dsmoe's native kernels where a block has at most ``DECODE_MAX_ROWS`` rows and by
    ``torch.mm`` otherwise; rows outside every block (padding) get zeros. None when the
    native kernels cannot serve this product at all (autograd, dtypes, an input-major
    ``w``: ``w[e].T`` must be contiguous; see ``dsmoe.linear``)."""
    if records_grad(x, w):
        return None
    if (x.device.type != "cpu" or x.dtype != w.dtype
            or x.dtype not in native.FLOAT_WEIGHT_DTYPES or not w.mT.is_contiguous()
            or native.library() is None):
        return None
    small = [b for b in blocks if b[2] <= DECODE_MAX_ROWS]
    out = native.float_blocks_matmul(x, w.mT, small)  # fp32 [P, n], zeros outside
    if out is None:
        return None
    out = out.to(x.dtype)
    for e, start, n in blocks:
        if n > DECODE_MAX_ROWS:
            torch.mm(x[start:start + n], w[e], out=out[start:start + n])
    return out


def _loop_mm_weight(a: torch.Tensor, b: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``a_e.T @ b_e`` per row block: ``a [A, n]``, ``b [A, k]`` -> [E, n, k]; zeros for an
    expert without rows."""
    out = a.new_empty(counts.shape[0], a.shape[-1], b.shape[-1])  # [E, n, k]
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n:
            torch.mm(a[start:start + n].t(), b[start:start + n], out=out[e])
        else:
            out[e].zero_()
        start += n
    return out


def _fits_grouped_mm(*tensors: torch.Tensor) -> bool:
    """``_grouped_mm`` wants 16-byte aligned data and strides (other than unit strides).
    Under ``torch.compile`` there are no addresses to read; the compiler lays out what it
    passes to the kernel itself."""
    if torch.compiler.is_compiling():
        return True
    return all(t.data_ptr() % 16 == 0
               and all(s == 1 or (s * t.element_size()) % 16 == 0 for s in t.stride())
               for t in tensors)


def _grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    if not _fits_grouped_mm(x, w):
        return _loop_mm(x, w, counts)
    return torch._grouped_mm(x, w, offs=torch.cumsum(counts, 0, dtype=torch.int32))


def _grouped_mm_weight(a: torch.Tensor, b: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    if not _fits_grouped_mm(a, b) or (a.shape[-1] * b.shape[-1] * a.element_size()) % 16:
        return _loop_mm_weight(a, b, counts)
    return torch._grouped_mm(a.t(), b, offs=torch.cumsum(counts, 0, dtype=torch.int32))


def _row_experts(counts: torch.Tensor, n_rows: int) -> torch.Tensor:
    """The expert of every sorted row [A] (no host sync: the size is given)."""
    experts = torch.arange(counts.shape[0], device=counts.device)  # [E]
    return torch.repeat_interleave(experts, counts, output_size=n_rows)


def _gather_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Sorted rows ``x [A, k]`` times their own expert's ``w[e] [k, n]`` -> [A, n]."""
    w_rows = w.index_select(0, _row_experts(counts, x.shape[0]))  # [A, k, n]
    return torch.bmm(x.unsqueeze(1), w_rows).squeeze(1)


def _gather_mm_weight(a: torch.Tensor, b: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``a_e.T @ b_e`` per expert as a sum of per-row outer products -> [E, n, k]."""
    outer = a.unsqueeze(2) * b.unsqueeze(1)  # [A, n, k]
    out = a.new_zeros(counts.shape[0], a.shape[1], b.shape[1])  # [E, n, k]
    return out.index_add_(0, _row_experts(counts, a.shape[0]), outer)


def _batched_mm(x: torch.Tensor, w: torch.Tensor, chunks: tuple[Chunk, ...]) -> torch.Tensor:
    """Padded rows ``x [P, k]`` times ``w[e] [k, n]`` -> [P, n], one bmm per chunk (the
    chunks tile the P rows exactly)."""
    out = x.new_empty(x.shape[0], w.shape[-1])  # [P, n]
    for first, end, rows, start in chunks:
        stop = start + (end - first) * rows
        torch.bmm(x[start:stop].view(end - first, rows, -1), w[first:end],
                  out=out[start:stop].view(end - first, rows, -1))
    return out


def _batched_mm_weight(a: torch.Tensor, b: torch.Tensor, chunks: tuple[Chunk, ...],
                       n_experts: int) -> torch.Tensor:
    """``a_e.T @ b_e`` over padded rows -> [E, n, k]; zeros for experts in no chunk."""
    covered = sum(end - first for first, end, _, _ in chunks)
    alloc = a.new_empty if covered == n_experts else a.new_zeros
    out = alloc(n_experts, a.shape[-1], b.shape[-1])  # [E, n, k]
    for first, end, rows, start in chunks:
        stop = start + (end - first) * rows
        torch.bmm(a[start:stop].view(end - first, rows, -1).transpose(1, 2),
                  b[start:stop].view(end - first, rows, -1), out=out[first:end])
    return out


# kernels on the sorted rows themselves (no padding): name -> (mm, mm_weight)
_ROW_KERNELS = {"gather": (_gather_mm, _gather_mm_weight),
                "grouped_mm": (_grouped_mm, _grouped_mm_weight),
                "loop": (_loop_mm, _loop_mm_weight)}


def _chunk_experts(counts: list[int], min_experts: int, max_experts: int = 16
                   ) -> tuple[Chunk, ...]:
    """Split every run of adjacent non-empty experts into chunks of ``min_experts`` to
    ``max_experts`` experts (a shorter run is one chunk) with the fewest padded rows
    (dynamic programming; ties: fewer chunks). ``GroupedGEMM.plan`` asks for at least two
    experts per thread: each core gets whole experts, with some slack for uneven chunks
    (measured on 2 cores: chunks of >= 4 beat pairs, whose lower padding does not pay)."""
    chunks: list[Chunk] = []
    start, e, E = 0, 0, len(counts)
    while e < E:
        if counts[e] == 0:
            e += 1
            continue
        run_end = e
        while run_end < E and counts[run_end] > 0:
            run_end += 1
        run = counts[e:run_end]
        L = len(run)
        lo = min(min_experts, L)
        # best[i]: (padded rows, chunks) to cover run[:i]; cut[i]: where its last chunk starts
        best: list[tuple[int, int] | None] = [(0, 0)] + [None] * L
        cut = [0] * (L + 1)
        for i in range(lo, L + 1):
            widest, real = 0, 0
            for j in range(i - 1, max(-1, i - 1 - max_experts), -1):  # last chunk = run[j:i]
                widest, real = max(widest, run[j]), real + run[j]
                prev = best[j]
                if i - j < lo or prev is None:
                    continue
                cost = (prev[0] + (i - j) * widest - real, prev[1] + 1)
                if best[i] is None or cost < best[i]:
                    best[i], cut[i] = cost, j
        if best[L] is None:  # only when max_experts < min_experts: one chunk per expert
            bounds = [(j, j + 1) for j in range(L)]
        else:
            bounds, i = [], L
            while i > 0:
                bounds.append((cut[i], i))
                i = cut[i]
            bounds.reverse()
        for j, i in bounds:
            width = max(run[j:i])
            chunks.append((e + j, e + i, width, start))
            start += (i - j) * width
        e = run_end
    return tuple(chunks)


class _ExpertLinear(torch.autograd.Function):
    """Row block e of ``x`` times ``W[e].T`` (+ ``b[e]``), on any kernel, with the backward
    written out so that dW lands in W's own layout (see the module docstring)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,  # noqa: ANN001
                gemm: "GroupedGEMM") -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.gemm, ctx.has_bias = gemm, bias is not None
        return _ExpertLinear.run(x, weight, bias, gemm)

    @staticmethod
    def run(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            gemm: "GroupedGEMM") -> torch.Tensor:
        """The forward math, without autograd."""
        out = gemm.mm(x, weight.transpose(-2, -1))  # [P, out]
        if bias is not None:
            out += gemm.per_row(bias)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        x, weight = ctx.saved_tensors
        gemm: GroupedGEMM = ctx.gemm
        grad = grad.contiguous()  # [P, out]; _grouped_mm and .view reject expanded grads
        grad_x = gemm.mm(grad, weight) if ctx.needs_input_grad[0] else None  # [P, in]
        grad_w = gemm.mm_weight(grad, x, weight) if ctx.needs_input_grad[1] else None  # [E, out, in]
        grad_b = gemm.sum_rows(grad) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None


def _swiglu_backward(gu: torch.Tensor, grad_hidden: torch.Tensor) -> torch.Tensor:
    """d loss / d [gate, up] of hidden = silu(gate) * up, given ``gu [P, 2F]`` and
    ``grad_hidden [P, F]`` (consumed). Eagerly the two halves are written straight into one
    buffer; under ``torch.compile`` (which takes no ``out=`` views) as plain ops, which the
    compiler fuses the same way."""
    gate, up = gu.chunk(2, dim=-1)  # [P, F] views
    if torch.compiler.is_compiling():
        return torch.cat([torch.ops.aten.silu_backward(grad_hidden * up, gate),
                          F.silu(gate) * grad_hidden], dim=-1)
    grad_gu = torch.empty_like(gu)  # [P, 2F]
    grad_gate, grad_up = grad_gu.chunk(2, dim=-1)
    torch.ops.aten.silu.out(gate, out=grad_up)
    grad_up.mul_(grad_hidden)  # d/d up = grad_hidden * silu(gate)
    grad_hidden.mul_(up)  # d/d silu(gate)
    torch.ops.aten.silu_backward.grad_input(grad_hidden, gate, grad_input=grad_gate)
    return grad_gu


class _SwiGLUExpertsFn(torch.autograd.Function):
    """down(silu(gate x) * up x) per expert on work rows, with the backward written out.

    Against autograd through ``linear -> chunk -> silu * up -> linear`` this keeps one
    ``[P, F]`` activation instead of two (``silu(gate)`` is recomputed in backward, an
    elementwise pass) and writes the gate and up gradients straight into one ``[P, 2F]``
    buffer instead of separate buffers joined by a copy. Each freshly allocated buffer
    costs page faults as well as bandwidth, which on CPU is a measurable share of the step.
    """

    @staticmethod
    def run(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, gemm: "GroupedGEMM"
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The forward math, without autograd: (output [P, D], gate_up out [P, 2F], hidden)."""
        gu = gemm.mm(x, gate_up.transpose(-2, -1))  # [P, 2F]
        gate, up = gu.chunk(2, dim=-1)  # [P, F] views
        hidden = F.silu(gate).mul_(up)  # [P, F]
        return gemm.mm(hidden, down.transpose(-2, -1)), gu, hidden  # [P, D]

    @staticmethod
    def forward(ctx, x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,  # noqa: ANN001
                gemm: "GroupedGEMM") -> torch.Tensor:
        out, gu, hidden = _SwiGLUExpertsFn.run(x, gate_up, down, gemm)
        ctx.save_for_backward(x, gate_up, down)
        # NOTE: intermediates as attributes, not saved tensors, so that backward can free
        # them before it allocates the largest tensor, the [E, 2F, D] gradient.
        ctx.gemm, ctx.gu, ctx.hidden = gemm, gu, hidden
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        x, gate_up, down = ctx.saved_tensors
        gemm: GroupedGEMM = ctx.gemm
        gu, hidden = ctx.gu, ctx.hidden
        if gu is None:  # a second backward (retain_graph=True): recompute them
            _, gu, hidden = _SwiGLUExpertsFn.run(x, gate_up, down, gemm)
        ctx.gu = ctx.hidden = None
        grad = grad.contiguous()  # [P, D]
        grad_down = gemm.mm_weight(grad, hidden, down) if ctx.needs_input_grad[2] else None
        del hidden
        grad_hidden = gemm.mm(grad, down)  # [P, F]
        grad_gu = _swiglu_backward(gu, grad_hidden)  # [P, 2F]
        del grad_hidden, gu
        grad_gate_up = gemm.mm_weight(grad_gu, x, gate_up) if ctx.needs_input_grad[1] else None
        grad_x = gemm.mm(grad_gu, gate_up) if ctx.needs_input_grad[0] else None  # [P, D]
        return grad_x, grad_gate_up, grad_down, None


# --- the plan of one forward -----------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class GroupedGEMM:
    """How this batch's expert GEMMs run: the kernel, and for ``batched`` the chunks and the
    row of each (sorted) input row in the padded work buffer.

    ``enter`` moves sorted rows into the work buffer, ``linear`` maps work rows expert by
    expert, ``leave`` moves the rows back; all three are differentiable.
    """

    kernel: str
    counts: torch.Tensor  # [E] rows per expert
    chunks: tuple[Chunk, ...] = ()  # batched only
    rows: int = 0  # P: rows of the work buffer
    index: torch.Tensor | None = None  # [A] work-buffer row of each sorted row (batched only)
    # a CPU decode step (see DECODE_STEP_MAX_ROWS): each expert's block of work rows
    decode_blocks: list[native.Block] | None = None

    @classmethod
    def plan(cls, counts: torch.Tensor, n_rows: int, dtype: torch.dtype,
             kernel: str | None = None) -> "GroupedGEMM":
        """The plan for ``n_rows`` (A) sorted rows of ``dtype`` with ``counts [E]`` rows per
        expert (sum(counts) == A)."""
        device = counts.device
        kernel = kernel or default_kernel(device, dtype)
        if kernel not in KERNELS:
            raise ValueError(f"unknown expert GEMM kernel {kernel!r}; expected one of {KERNELS}")
        A = n_rows
        if kernel == "grouped_mm" and A == 0:
            kernel = "loop"  # nothing routed: the loop gives zero weight gradients, any torch
        if kernel in ("grouped_mm", "gather") or (kernel == "loop" and device.type != "cpu"):
            return cls(kernel, counts, rows=A)  # the decode path is for the CPU only
        counts_list = counts.tolist()
        decode = (device.type == "cpu" and bool(counts_list)
                  and max(counts_list) <= DECODE_STEP_MAX_ROWS)
        if kernel == "loop":
            return cls(kernel, counts, rows=A,
                       decode_blocks=expert_blocks(counts_list) if decode else None)
        chunks = _chunk_experts(counts_list, 2 * torch.get_num_threads())
        rows = sum((end - first) * width for first, end, width, _ in chunks)
        if rows == A:  # no padding needed: the work buffer is the input itself
            return cls(kernel, counts, chunks, rows,
                       decode_blocks=expert_blocks(counts_list) if decode else None)
        chunk_start = [0] * len(counts_list)  # padded row of each expert's first row
        for first, end, width, start in chunks:
            for e in range(first, end):
                chunk_start[e] = start + (e - first) * width
        expert = torch.repeat_interleave(torch.arange(len(counts_list), device=device),
                                         counts, output_size=A)  # [A]
        first_row = torch.cumsum(counts, 0) - counts  # [E] first sorted row of each expert
        index = (torch.tensor(chunk_start, device=device)[expert]
                 + torch.arange(A, device=device) - first_row[expert])  # [A]
        return cls(kernel, counts, chunks, rows, index,
                   expert_blocks(counts_list, chunk_start) if decode else None)

    def enter(self, x: torch.Tensor) -> torch.Tensor:  # [A, in] -> [P, in]
        if self.index is None:
            return x
        return x.new_zeros(self.rows, x.shape[1]).index_copy(0, self.index, x)

    def leave(self, y: torch.Tensor) -> torch.Tensor:  # [P, out] -> [A, out]
        return y if self.index is None else y.index_select(0, self.index)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
               ) -> torch.Tensor:
        """Work rows ``x [P, in]`` of expert e times ``weight[e].T`` (+ ``bias[e]``)."""
        if not records_grad(x, weight, bias):
            return _ExpertLinear.run(x, weight, bias, self)
        return _ExpertLinear.apply(x, weight, bias, self)  # [P, out]

    # kernels on the work buffer (no autograd; called by _ExpertLinear)
    def mm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.decode_blocks is not None:
            out = _decode_mm(x, w, self.decode_blocks)
            if out is not None:
                return out
        if self.kernel == "batched":
            return _batched_mm(x, w, self.chunks)
        return _ROW_KERNELS[self.kernel][0](x, w, self.counts)

    def mm_weight(self, a: torch.Tensor, b: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Per-expert ``a_e.T @ b_e`` -> [E, n, k], laid out as the weight ``like``:
        output-major (contiguous) or input-major (``like.mT`` contiguous, the layout
        ``Transformer.set_matmul_layout`` may choose), so that autograd stores it as the
        gradient without a copy. Input-major is computed as ``(b_e.T @ a_e).T``."""
        if not like.is_contiguous() and like.transpose(-2, -1).is_contiguous():
            return self.mm_weight(b, a, like.transpose(-2, -1)).transpose(-2, -1)
        if self.kernel == "batched":
            return _batched_mm_weight(a, b, self.chunks, self.counts.shape[0])
        return _ROW_KERNELS[self.kernel][1](a, b, self.counts)

    def per_row(self, values: torch.Tensor) -> torch.Tensor:
        """``values [E, n]`` repeated for every work row of each expert -> [P, n]."""
        if self.kernel != "batched":
            return values.repeat_interleave(self.counts, dim=0, output_size=self.rows)
        width = torch.zeros_like(self.counts)
        for first, end, rows, _ in self.chunks:
            width[first:end] = rows
        return values.repeat_interleave(width, dim=0, output_size=self.rows)

    def sum_rows(self, grad: torch.Tensor) -> torch.Tensor:
        """Per-expert sum of work rows ``grad [P, n]`` -> [E, n] (padded rows hold zeros)."""
        out = grad.new_zeros(self.counts.shape[0], grad.shape[1])  # [E, n]
        if self.kernel == "batched":
            for first, end, rows, start in self.chunks:
                stop = start + (end - first) * rows
                out[first:end] = grad[start:stop].view(end - first, rows, -1).sum(dim=1)
            return out
        for e, rows in enumerate(torch.split(grad, self.counts.tolist(), dim=0)):
            out[e] = rows.sum(dim=0)
        return out


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor,
                   bias: torch.Tensor | None = None, *, kernel: str | None = None,
                   use_grouped_mm: bool | None = None) -> torch.Tensor:
    """Row block e of sorted ``x [A, in]`` times ``weight[e].T`` (+ ``bias[e]``) for
    ``weight [E, out, in]``, ``bias [E, out]``; differentiable in x, weight and bias.

    ``counts [E]`` gives the rows of each expert, in order; sum(counts) == A. ``kernel``
    forces one of ``KERNELS``; ``use_grouped_mm`` True/False is shorthand for
    ``"grouped_mm"``/``"loop"``. One linear map on its own; ``SwiGLUExperts`` plans once
    and keeps both of its GEMMs in the work buffer.
    """
    if x.dim() != 2 or weight.dim() != 3 or x.shape[1] != weight.shape[2]:
        raise ValueError(f"grouped_linear expects x [A, in] and weight [E, out, in], got "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    if counts.shape != (weight.shape[0],):
        raise ValueError(f"grouped_linear: counts must have one entry per expert "
                         f"({weight.shape[0]}), got shape {tuple(counts.shape)}")
    if kernel is None and use_grouped_mm is not None:
        kernel = "grouped_mm" if use_grouped_mm else "loop"
    gemm = GroupedGEMM.plan(counts, x.shape[0], x.dtype, kernel)
    return gemm.leave(gemm.linear(gemm.enter(x), weight, bias))


# --- expert modules ---------------------------------------------------------------------------
def compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype the expert GEMMs run in: autocast's where autocast is on for the weight's
    device (as it is for ``nn.Linear``: fp32 master weights, bf16 products), else the
    weight's own. ``.to()`` of a weight already in that dtype is free."""
    device = weight.device.type
    if weight.is_floating_point() and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


class SwiGLUExperts(nn.Module):
    """E SwiGLU experts without bias (DeepSeek): down(act(gate x) * up x) per expert."""

    def __init__(self, n_experts: int, hidden_size: int, expert_size: int,
                 hidden_act: str = "silu", init_std: float = 0.02) -> None:
        super().__init__()
        self.num_experts, self.expert_size = n_experts, expert_size
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * expert_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(n_experts, hidden_size, expert_size))
        self.act = ACTIVATIONS[hidden_act]
        self.init_std = init_std
        self.kernel: str | None = None  # None: per device and dtype (see default_kernel)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.gate_up_proj, std=self.init_std)
        nn.init.normal_(self.down_proj, std=self.init_std)

    def forward(self, x: torch.Tensor, counts: torch.Tensor, gemm: GroupedGEMM | None = None
                ) -> torch.Tensor:
        """Sorted rows ``x [A, D]`` with ``counts [E]`` per expert -> [A, D]; or, given
        ``gemm`` (from ``gemm_plan``), rows of its work buffer ``x [P, D]`` -> [P, D]."""
        if gemm is None:
            gemm = self.gemm_plan(counts, x.shape[0])
            return gemm.leave(self._forward_rows(gemm.enter(x), gemm))
        return self._forward_rows(x, gemm)

    def gemm_plan(self, counts: torch.Tensor, n_rows: int) -> GroupedGEMM:
        """The GEMM plan for ``n_rows`` sorted rows, ``counts [E]`` per expert."""
        dtype = compute_dtype(self.gate_up_proj)
        return GroupedGEMM.plan(counts, n_rows, dtype, self.kernel)

    def _forward_rows(self, x: torch.Tensor, gemm: GroupedGEMM) -> torch.Tensor:  # [P, D]
        dtype = compute_dtype(self.gate_up_proj)
        x, gate_up, down = x.to(dtype), self.gate_up_proj.to(dtype), self.down_proj.to(dtype)
        if self.act is F.silu:
            if not records_grad(x, gate_up, down):
                return _SwiGLUExpertsFn.run(x, gate_up, down, gemm)[0]
            return _SwiGLUExpertsFn.apply(x, gate_up, down, gemm)
        gate, up = gemm.linear(x, gate_up).chunk(2, dim=-1)  # [P, F] x2
        return gemm.linear(self.act(gate) * up, down)  # [P, D]


class ReLUExperts(nn.Module):
    """E ReLU experts with biases: w2 relu(w1 x + b1) + b2 (the facade's expert)."""

    def __init__(self, n_experts: int, hidden_size: int, expert_size: int,
                 init_std: float = 0.02) -> None:
        super().__init__()
        self.num_experts, self.expert_size = n_experts, expert_size
        self.w1 = nn.Parameter(torch.empty(n_experts, expert_size, hidden_size))  # [E, F, D]
        self.b1 = nn.Parameter(torch.empty(n_experts, expert_size))  # [E, F]
        self.w2 = nn.Parameter(torch.empty(n_experts, hidden_size, expert_size))  # [E, D, F]
        self.b2 = nn.Parameter(torch.empty(n_experts, hidden_size))  # [E, D]
        self.init_std = init_std
        self.kernel: str | None = None  # None: per device and dtype (see default_kernel)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w1, std=self.init_std)
        nn.init.normal_(self.w2, std=self.init_std)
        nn.init.zeros_(self.b1)
        nn.init.zeros_(self.b2)

    def forward(self, x: torch.Tensor, counts: torch.Tensor, gemm: GroupedGEMM | None = None
                ) -> torch.Tensor:
        """As ``SwiGLUExperts.forward``. Padded work rows come out as w2 relu(b1) + b2,
        not zero; whoever reads the output ignores them."""
        if gemm is None:
            gemm = self.gemm_plan(counts, x.shape[0])
            return gemm.leave(self._forward_rows(gemm.enter(x), gemm))
        return self._forward_rows(x, gemm)

    def gemm_plan(self, counts: torch.Tensor, n_rows: int) -> GroupedGEMM:
        """The GEMM plan for ``n_rows`` sorted rows, ``counts [E]`` per expert."""
        return GroupedGEMM.plan(counts, n_rows, self.w1.dtype, self.kernel)

    def _forward_rows(self, x: torch.Tensor, gemm: GroupedGEMM) -> torch.Tensor:  # [P, D]
        hidden = F.relu(gemm.linear(x, self.w1, self.b1))  # [P, F]
        return gemm.linear(hidden, self.w2, self.b2)
