"""Grouped GEMMs: row block e of a sorted matrix times expert e's weight, for every expert.

Inputs arrive sorted by expert with per-expert ``counts``; every expert's rows are one
contiguous slice, so an expert is a plain GEMM on a view (no masks). A ``GroupedGEMM`` is
the plan of one batch: which kernel runs it and, for kernels that pad, where each row lives
in the work buffer. Kernels are small classes behind one registry (``KERNELS``), all with
the same numbers up to float rounding:
  * ``grouped_mm``: ``torch._grouped_mm``, one call for all experts, where the installed
    torch supports the device and dtype (probed once). The choice on accelerators; needs
    16-byte aligned data and strides, else that call runs as the loop.
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
- On CPU a decode step (every expert with at most ``DECODE_STEP_MAX_ROWS`` rows) runs the
  loop and batched kernels' products on dsmoe's native kernels, all experts in one call.
- The linear map has its own backward (``_ExpertLinear``): each expert's weight gradient is
  computed straight into the parameter's layout (``dy_e.T @ x_e``; output- or input-major).
  Autograd through ``x @ W.transpose`` would produce ``[E, in, out]`` and then copy it: a
  second, freshly allocated weight-sized tensor (2.2 GB of fp32 per step for the 16B layer).
  Nor does any kernel index ``weight[e]`` under autograd, whose backward materialises a
  zero ``[E, out, in]`` tensor per expert.
- Rows live in a work buffer of ``P`` rows (the sorted rows, or those plus padding);
  ``GroupedGEMM.enter``/``leave`` convert, and ``dispatch`` gathers tokens straight into it
  and combines from it, skipping both conversions.

Shapes: A rows (assignments, sorted by expert), P rows of the work buffer (A, or A plus
padding), E experts; ``in``/``out`` (``k``/``n``) a linear map's features.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from dsmoe import native
from dsmoe.autograd import records_grad
from dsmoe.linear import DECODE_MAX_ROWS, DECODE_STEP_MAX_ROWS

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


def _grouped_mm_ok(device_type: str, dtype: torch.dtype) -> bool:
    """``grouped_mm_supported`` as a constant to ``torch.compile`` (which would otherwise
    trace into the probe, past its cache, and break the graph there)."""
    return grouped_mm_supported(device_type, dtype)


# What ``torch.compiler.assume_constant_result`` does (torch 2.x sets this one attribute;
# tests/test_imports.py checks it still does), without importing torch._dynamo and sympy:
# ~70 MB of RSS and ~2 s for every process that imports the model, CPU ones included,
# which never get here (the 16B int4 model has ~0.4 GB of its 10 GB budget to spare).
_grouped_mm_ok._dynamo_marked_constant = True  # type: ignore[attr-defined]


def default_kernel(device: torch.device, dtype: torch.dtype) -> str:
    """``batched`` on CPU (see the module docstring), else ``grouped_mm`` where it works."""
    if device.type != "cpu" and _grouped_mm_ok(device.type, dtype):
        return "grouped_mm"
    return "batched"


# --- the products ---------------------------------------------------------------------------
def _loop_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Row block e of ``x [A, k]`` times ``w[e] [k, n]`` -> [A, n], one GEMM per expert."""
    out = x.new_empty(x.shape[0], w.shape[-1])  # [A, n]
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n:
            torch.mm(x[start:start + n], w[e], out=out[start:start + n])
            start += n
    return out



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




# --- the kernels: y = x W[e] and dW[e] = a_e.T b_e per expert, on work rows ---------------------
class Kernel:
    """One way to run a plan's per-expert products. This base keeps rows in sorted order
    (the work buffer is the input); ``mm``/``mm_weight`` are the kernel's own."""

    name: ClassVar[str]
    cpu_decode: ClassVar[bool] = False  # whether CPU decode steps go to the native kernels

    @classmethod
    def plan(cls, counts: torch.Tensor, n_rows: int) -> "GroupedGEMM":
        blocks = None
        if cls.cpu_decode and counts.device.type == "cpu":
            counts_list = counts.tolist()
            if counts_list and max(counts_list) <= DECODE_STEP_MAX_ROWS:
                blocks = expert_blocks(counts_list)
        return GroupedGEMM(cls.name, counts, rows=n_rows, decode_blocks=blocks)

    # the kernel's products on sorted rows: (x [A, k], w [E, k, n], counts) -> [A, n] and
    # (a [A, n], b [A, k], counts) -> [E, n, k]
    rows_mm: ClassVar[Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]]
    rows_mm_weight: ClassVar[Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]]

    @classmethod
    def mm(cls, plan: "GroupedGEMM", x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return cls.rows_mm(x, w, plan.counts)

    @classmethod
    def mm_weight(cls, plan: "GroupedGEMM", a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return cls.rows_mm_weight(a, b, plan.counts)

    @staticmethod
    def per_row(plan: "GroupedGEMM", values: torch.Tensor) -> torch.Tensor:
        return values.repeat_interleave(plan.counts, dim=0, output_size=plan.rows)

    @staticmethod
    def sum_rows(plan: "GroupedGEMM", grad: torch.Tensor) -> torch.Tensor:
        out = grad.new_zeros(plan.counts.shape[0], grad.shape[1])  # [E, n]
        for e, rows in enumerate(torch.split(grad, plan.counts.tolist(), dim=0)):
            out[e] = rows.sum(dim=0)
        return out


KERNELS: dict[str, type[Kernel]] = {}


def register(cls: type[Kernel]) -> type[Kernel]:
    KERNELS[cls.name] = cls
    return cls


@register
class LoopKernel(Kernel):
    name, cpu_decode = "loop", True
    rows_mm, rows_mm_weight = _loop_mm, _loop_mm_weight


@register
class GroupedMMKernel(Kernel):
    name = "grouped_mm"
    rows_mm, rows_mm_weight = _grouped_mm, _grouped_mm_weight

    @classmethod
    def plan(cls, counts: torch.Tensor, n_rows: int) -> "GroupedGEMM":
        if n_rows == 0:  # nothing routed: the loop gives zero weight gradients, any torch
            return LoopKernel.plan(counts, n_rows)
        return super().plan(counts, n_rows)


@register
class GatherKernel(Kernel):
    name = "gather"
    rows_mm, rows_mm_weight = _gather_mm, _gather_mm_weight


@register
class BatchedKernel(Kernel):
    """Chunks of adjacent experts, each one ``bmm`` over rows padded to its busiest expert
    (see the module docstring); the plan maps sorted rows to padded work rows."""

    name, cpu_decode = "batched", True

    @classmethod
    def plan(cls, counts: torch.Tensor, n_rows: int) -> "GroupedGEMM":
        device, A = counts.device, n_rows
        counts_list = counts.tolist()
        decode = (device.type == "cpu" and bool(counts_list)
                  and max(counts_list) <= DECODE_STEP_MAX_ROWS)
        chunks = _chunk_experts(counts_list, 2 * torch.get_num_threads())
        rows = sum((end - first) * width for first, end, width, _ in chunks)
        if rows == A:  # no padding needed: the work buffer is the input itself
            return GroupedGEMM(cls.name, counts, chunks, rows,
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
        return GroupedGEMM(cls.name, counts, chunks, rows, index,
                           expert_blocks(counts_list, chunk_start) if decode else None)

    @staticmethod
    def mm(plan: "GroupedGEMM", x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return _batched_mm(x, w, plan.chunks)

    @staticmethod
    def mm_weight(plan: "GroupedGEMM", a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return _batched_mm_weight(a, b, plan.chunks, plan.counts.shape[0])

    @staticmethod
    def per_row(plan: "GroupedGEMM", values: torch.Tensor) -> torch.Tensor:
        width = torch.zeros_like(plan.counts)
        for first, end, rows, _ in plan.chunks:
            width[first:end] = rows
        return values.repeat_interleave(width, dim=0, output_size=plan.rows)

    @staticmethod
    def sum_rows(plan: "GroupedGEMM", grad: torch.Tensor) -> torch.Tensor:
        out = grad.new_zeros(plan.counts.shape[0], grad.shape[1])  # [E, n]
        for first, end, rows, start in plan.chunks:
            stop = start + (end - first) * rows
            out[first:end] = grad[start:stop].view(end - first, rows, -1).sum(dim=1)
        return out


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


# --- the plan of one forward -----------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class GroupedGEMM:
    """How this batch's expert GEMMs run: the kernel (a name in ``KERNELS``), and for
    ``batched`` the chunks and the row of each (sorted) input row in the padded work buffer.

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
        kernel = kernel or default_kernel(counts.device, dtype)
        if kernel not in KERNELS:
            raise ValueError(f"unknown expert GEMM kernel {kernel!r}; expected one of "
                             f"{sorted(KERNELS)}")
        return KERNELS[kernel].plan(counts, n_rows)

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

    # kernels on the work buffer (no autograd; called by the experts' Functions)
    def mm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Work rows ``x [P, k]`` of expert e times ``w[e] [k, n]`` -> [P, n]."""
        if self.decode_blocks is not None:
            out = _decode_mm(x, w, self.decode_blocks)
            if out is not None:
                return out
        return KERNELS[self.kernel].mm(self, x, w)

    def mm_weight(self, a: torch.Tensor, b: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Per-expert ``a_e.T @ b_e`` -> [E, n, k], laid out as the weight ``like``:
        output-major (contiguous) or input-major (``like.mT`` contiguous, the layout
        ``Transformer.set_matmul_layout`` may choose), so that autograd stores it as the
        gradient without a copy. Input-major is computed as ``(b_e.T @ a_e).T``."""
        if not like.is_contiguous() and like.transpose(-2, -1).is_contiguous():
            return self.mm_weight(b, a, like.transpose(-2, -1)).transpose(-2, -1)
        return KERNELS[self.kernel].mm_weight(self, a, b)

    def per_row(self, values: torch.Tensor) -> torch.Tensor:
        """``values [E, n]`` repeated for every work row of each expert -> [P, n]."""
        return KERNELS[self.kernel].per_row(self, values)

    def sum_rows(self, grad: torch.Tensor) -> torch.Tensor:
        """Per-expert sum of work rows ``grad [P, n]`` -> [E, n] (padded rows hold zeros)."""
        return KERNELS[self.kernel].sum_rows(self, grad)


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
