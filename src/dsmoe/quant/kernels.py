"""Weight-only int8 / int4 matrices and the CPU kernels that multiply by them.

Formats (one matrix W [N, K]: N outputs, K inputs; experts add a leading E):
  int8  symmetric, one scale per output row:   W ~ scale[n] * q[n, k],  q in [-127, 127]
  int4  asymmetric, one (scale, zero) per group of ``g`` inputs of a row:
        W ~ (q[n, k] - 8) * scale[n, k // g] + zero[n, k // g],  q in [0, 15]
        (``zero`` is the group's minimum plus 8 * scale: the form torch's int4 kernel takes)
        or symmetric (no zero, W ~ (q - 8) * scale, g = 32: llama.cpp's Q4_0 with the
        scale in bf16; a Q4_0 GGUF loads into it without requantizing; quantizing a float
        weight searches each group's scale, never worse than Q4_0's rule)
  Scales and zeros are bf16, the precision the kernels compute with.

Kernels (measured in ``benchmarks/quantized.py``; see its table):
  int8  for few rows (decoding) dsmoe's native kernel (``dsmoe.native``, csrc/rows_matmul.c:
        activations as per-row 16-bit fixed point, integer dot products), ~2x faster than
        ``torch._weight_int8pack_mm``, the fallback when it cannot be built. Neither has
        a backward (``finetune.qlora`` supplies one); a ctypes call would silently cut the
        graph, so rows that need a gradient go to torch's kernel, whose autograd error is
        loud. For more rows (prefill) the weight is converted to
        the activation dtype and run as a GEMM with the scale applied to the output
        columns: the row kernels fall behind a GEMM past ~12 rows.
  int4  for few rows (<= INT4_KERNEL_MAX_ROWS) dsmoe's native kernel (csrc/int4_matmul.c:
        activations rounded to int8 per block of 32 as llama.cpp's Q8_0 activations,
        u8 x s8 integer dot products on the unpacked nibbles, AVX512-VNNI where the CPU
        has it), reading the canonical layout below directly, so the weights are the
        checkpoint's tensors (used in place from the file) and convert back for free. For
        more rows the weight is dequantized (native code) for one GEMM; a stack of experts
        keeps the row kernel up to INT4_BLOCKS_MAX_ROWS rows per expert (one call for all).
        Without the native library: ``torch._weight_int4pack_mm_for_cpu`` on a weight
        repacked once by ``torch._convert_weight_to_int4pack_for_cpu`` (an opaque,
        CPU-specific layout that cannot be converted back cheaply), for any rows.
  NOTE: torch's kernels are fast only with bf16 activations (with fp32 they fall back to
  scalar code, ~10x slower), so rows are cast to bf16 for them and the result back.
  NOTE: ``_weight_int8pack_mm`` reads activations and weights with aligned vector loads and
  crashes (SIGSEGV) on pointers that are not 64-byte aligned, e.g. a row slice of a bf16
  batch or a tensor memory-mapped by safetensors; ``aligned`` copies such tensors.

On disk every format is canonical and layout-free (int4: two values per byte, even k in the
low nibble). ``unpack_int4`` recovers it from torch's packed layout by probing the packing
op with index patterns once per shape, so no assumption about that layout is hard-coded.

Shapes: N out features, K in features, G = K // g groups, M rows.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch
import torch.nn.functional as F

from dsmoe import native
from dsmoe.autograd import records_grad

INT4_GROUP_SIZES = (32, 64, 128, 256)  # what torch's int4 CPU kernel accepts
INT4_ROW_MULTIPLE = 16  # torch's int4 packing needs N % 16 == 0
# Rows at or below which the int8 kernel beats convert + GEMM: its cost grows ~linearly
# with the rows past 4 (a GEMV per row), the conversion is a fixed ~1.2 ms for a 2816 x 2048
# expert; they cross between 12 and 16 rows (benchmarks/quantized.py, kernels table).
INT8_KERNEL_MAX_ROWS = 12
# The same for the native int4 kernel against (native) dequantize to bf16 + bf16 GEMM: for a
# 2816 x 2048 expert they cross between 16 and 24 rows (CPU time, benchmarks/quantized.py).
INT4_KERNEL_MAX_ROWS = 16
# The same for a stack of experts in prefill, where one row-kernel call serves every expert
# with at most this many rows (MoE experts see few rows each: ~14 for a 128-token prompt of
# the 2B shape) and each expert above it is dequantized for a GEMM. Without a call and a
# thread barrier per expert the row kernel pays up to more rows: 3-layer 2B shape, 128-token
# prefill, one thread, CPU time, medians of 7 alternating: int4 g128 at limits 16 / 32 / 48
# / 64 ran +4.5% / +9% / +11.5% / +10% over per-expert calls; g32 symmetric +3% / +7% / +7%
# / +6%; int8 peaked at its own crossover (12: +5%, 24: -1%, 48: -11%). Once the int4 tiles
# loaded their group offsets once per tile, 96 beat 48 by 2-3% (g128 and g32; 128 and 256
# were no better), although alone a GEMM overtakes the row kernel at ~64 rows: in a forward
# each per-expert GEMM also pays its dequantized copy (3.9 MB, past L2) and its calls.
INT4_BLOCKS_MAX_ROWS = 96
INT8_BLOCKS_MAX_ROWS = INT8_KERNEL_MAX_ROWS
_KERNEL_DTYPE = torch.bfloat16


_ALIGNMENT = 64  # bytes: AVX-512 vector loads


def aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous and 64-byte aligned (copied only when it is not)."""
    if t.is_contiguous() and t.data_ptr() % _ALIGNMENT == 0:
        return t
    out = torch.empty(t.shape, dtype=t.dtype, device=t.device)  # the allocator aligns
    return out.copy_(t)


# --- int8 -------------------------------------------------------------------------------
def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [..., N, K] -> (q int8 [..., N, K], scale bf16 [..., N]); symmetric per row.

    The scale is rounded to bf16 *before* q is computed: the kernel multiplies by the bf16
    scale, so q is chosen for the scale actually used, and both kernel paths agree."""
    w = weight.detach().reshape(-1, weight.shape[-1])  # [rows, K]
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(w.shape[0], dtype=_KERNEL_DTYPE, device=w.device)
    # Rows in chunks: the float temporaries of a whole output matrix (102400 x 2048) would
    # be ~3x its fp32 size, beyond the matrix itself (the 16B model's load budget).
    step = max(1, (1 << 22) // max(1, w.shape[1]))
    for first in range(0, w.shape[0], step):
        rows = w[first:first + step].float()
        s = (rows.abs().amax(dim=-1).clamp(min=1e-12) / 127.0).to(_KERNEL_DTYPE)  # [rows]
        scale[first:first + step] = s
        q[first:first + step] = torch.round(rows / s.float().unsqueeze(-1)).clamp_(-127, 127)
    return q.reshape(weight.shape), scale.reshape(weight.shape[:-1])


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32
                    ) -> torch.Tensor:
    return (q.float() * scale.float().unsqueeze(-1)).to(dtype)


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ (scale * q).T -> [..., N] for q [N, K] int8 and scale [N] bf16."""
    rows = x.reshape(-1, x.shape[-1])  # [M, K]
    if rows.shape[0] <= INT8_KERNEL_MAX_ROWS:
        out = None
        if not records_grad(rows):  # the native kernel has no backward
            out = native.int8_rows_matmul(rows, q, scale)
        if out is None:
            out = torch._weight_int8pack_mm(aligned(rows.to(_KERNEL_DTYPE)), aligned(q), scale)
        out = out.to(x.dtype)
    else:
        out = chunked_linear(rows, q.shape[0], lambda n0, n1: (  # scale on the output
            F.linear(rows, q[n0:n1].to(x.dtype)) * scale[n0:n1].to(x.dtype)))
    return out.reshape(*x.shape[:-1], q.shape[0])


# Float weights a prefill GEMM materialises at once: the output rows are taken in chunks
# of at most this many elements (16 MB in bf16), so a 102,400-row lm_head or a dense
# layer's [10944, 2048] matrix never exists whole in float next to its quantized form
# (deepseek-moe-16b's peak RSS budget; a GEMM of 4096 x 2048 loses nothing to chunking).
GEMM_CHUNK_ELEMENTS = 8 * 2**20


def chunked_linear(rows: torch.Tensor, N: int,
                   columns: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
    """rows [M, K] @ W.T -> [M, N], where ``columns(n0, n1)`` computes the output columns
    [M, n1 - n0] from the float weight rows W[n0:n1], asked for in chunks of at most
    GEMM_CHUNK_ELEMENTS weights (one call when the whole matrix fits)."""
    K = rows.shape[-1]
    step = max(1, GEMM_CHUNK_ELEMENTS // max(K, 1))
    if step >= N:
        return columns(0, N)
    out = rows.new_empty(rows.shape[0], N)
    for n0 in range(0, N, step):
        n1 = min(N, n0 + step)
        out[:, n0:n1] = columns(n0, n1)
    return out


# --- int4 -------------------------------------------------------------------------------
def int4_group_size(in_features: int, out_features: int, preferred: int) -> int | None:
    """The largest kernel-supported group <= ``preferred`` dividing ``in_features``, or None
    when the int4 kernel cannot take this shape (the caller then keeps it in int8)."""
    if out_features % INT4_ROW_MULTIPLE:
        return None
    for g in sorted(INT4_GROUP_SIZES, reverse=True):
        if g <= preferred and in_features % g == 0:
            return g
    return None


def quantize_int4(weight: torch.Tensor, group_size: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W [..., N, K] -> (q uint8 [..., N, K/2] two values per byte, scale bf16 [..., N, G],
    zero bf16 [..., N, G]) with W ~ (q - 8) * scale + zero per group (min/max asymmetric).
    As for int8, q is computed against the bf16-rounded scale and zero the kernel uses."""
    *lead, N, K = weight.shape
    if K % group_size or K % 2:
        raise ValueError(f"int4: in_features={K} is not a multiple of group_size={group_size}")
    w = weight.detach().float().reshape(*lead, N, K // group_size, group_size)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)  # [..., N, G]
    scale = ((hi - lo) / 15.0).clamp(min=1e-12).to(_KERNEL_DTYPE)
    zero = (lo + 8.0 * scale.float()).to(_KERNEL_DTYPE)
    q = torch.round((w - zero.float().unsqueeze(-1)) / scale.float().unsqueeze(-1) + 8.0)
    q = q.clamp_(0, 15).to(torch.uint8).reshape(*lead, N, K)
    return pack_nibbles(q), scale, zero


# Candidate scales of the symmetric search, as multiples of Q4_0's: the extreme value maps
# to -(8 + 0.1 i) instead of -8 (the candidates llama.cpp's k-quant search tries).
_SYMMETRIC_STEPS = tuple(8.0 / (8.0 + 0.1 * i) for i in range(-9, 10))
# Rows per chunk of the search: its temporaries stay in L2 (~1.5x faster than 1024 rows).
_SEARCH_ROWS = 64


def quantize_int4_symmetric(weight: torch.Tensor, group_size: int
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """W [..., N, K] -> (q uint8 [..., N, K/2], scale bf16 [..., N, G]) with
    W ~ (q - 8) * scale (llama.cpp's Q4_0 form: the scale is signed so that the value of
    largest magnitude can take the 16th level).
    The scale of each group is searched: Q4_0's rule (extreme / -8) and 18 neighbours, each
    rounded to bf16 with q rounded against it, then a least-squares rescale of the best;
    the group keeps whichever has the smallest squared error. Q4_0's rule is one of the
    candidates, so no group comes out worse than it (at bf16 scale precision)."""
    *lead, N, K = weight.shape
    if K % group_size or K % 2:
        raise ValueError(f"int4: in_features={K} is not a multiple of group_size={group_size}")
    rows = weight.detach().reshape(-1, K // group_size, group_size)  # [R, G, g]
    parts = [_search_symmetric(rows[r:r + _SEARCH_ROWS].float())
             for r in range(0, rows.shape[0], _SEARCH_ROWS)]
    q = torch.cat([p[0] for p in parts]).reshape(*lead, N, K)
    scale = torch.cat([p[1] for p in parts]).reshape(*lead, N, K // group_size)
    return pack_nibbles(q), scale


def _symmetric_candidate(w: torch.Tensor, scale: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Groups w [R, G, g] at a candidate scale [R, G] -> (bf16 scale, q [R, G, g] as float
    values 0..15, squared error [R, G])."""
    scale = scale.to(_KERNEL_DTYPE)
    s = scale.float().unsqueeze(-1)
    safe = torch.where(s == 0, torch.ones_like(s), s)
    q = torch.round(w / safe + 8.0).clamp_(0, 15)
    err = ((q - 8.0) * s - w).square_().sum(-1)
    return scale, q, err


def _search_symmetric(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The best symmetric int4 of groups w [R, G, g] (fp32): (q uint8 [R, G, g], scale bf16
    [R, G]); see ``quantize_int4_symmetric``. Only scales and errors are kept per
    candidate; q follows from the winning scale."""
    extreme = w.gather(-1, w.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)  # [R, G]
    best_scale, _, best_err = _symmetric_candidate(w, extreme / -8.0)  # Q4_0's rule
    for step in _SYMMETRIC_STEPS:
        if step != 1.0:
            scale, _, err = _symmetric_candidate(w, extreme * (step / -8.0))
            best_scale = torch.where(err < best_err, scale, best_scale)
            best_err = torch.minimum(err, best_err)
    _, best_q, best_err = _symmetric_candidate(w, best_scale)
    centred = best_q - 8.0  # least squares for these q: argmin_s |(q - 8) s - w|^2
    refit = (centred * w).sum(-1) / centred.square().sum(-1).clamp(min=1.0)
    scale, q, err = _symmetric_candidate(w, refit)
    better = err < best_err
    return (torch.where(better.unsqueeze(-1), q, best_q).to(torch.uint8),
            torch.where(better, scale, best_scale))


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    values = unpack_nibbles(q).float()  # [..., N, K]
    *lead, N, K = values.shape
    G = scale.shape[-1]
    grouped = values.reshape(*lead, N, G, K // G)
    w = (grouped - 8.0) * scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1)
    return w.reshape(*lead, N, K).to(dtype)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 values 0..15 [..., K] -> [..., K/2] bytes (even index in the low nibble)."""
    return (q[..., 0::2] | (q[..., 1::2] << 4)).to(torch.uint8)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of ``pack_nibbles``: [..., K/2] bytes -> [..., K] values 0..15."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1], -1)


def kernel_pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Canonical nibbles [N, K/2] -> torch's CPU int4 kernel layout."""
    return torch._convert_weight_to_int4pack_for_cpu(unpack_nibbles(q).to(torch.int32), 1)


def kernel_unpack_int4(packed: torch.Tensor, out_features: int, in_features: int
                       ) -> torch.Tensor:
    """torch's CPU int4 layout -> canonical nibbles [N, K/2] (see ``_kernel_layout``)."""
    source = _kernel_layout(out_features, in_features)  # [N*K]: packed nibble j holds W[src[j]]
    nibbles = unpack_nibbles(packed.reshape(-1))  # [N*K] in packed order
    flat = torch.empty_like(nibbles)
    flat[source] = nibbles
    return pack_nibbles(flat.reshape(out_features, in_features))


@functools.lru_cache(maxsize=4)
def _kernel_layout(N: int, K: int) -> torch.Tensor:
    """For each nibble of the packed layout, the flat index n*K + k it came from.

    The packing op only moves 4-bit values around, so packing the base-16 digits of every
    element's own index reveals, digit by digit, where each element went."""
    index = torch.arange(N * K, dtype=torch.int64).reshape(N, K)
    source = torch.zeros(N * K, dtype=torch.int64)
    for digit in range(max(1, math.ceil(math.log2(N * K) / 4))):
        values = ((index >> (4 * digit)) & 0xF).to(torch.int32)
        packed = torch._convert_weight_to_int4pack_for_cpu(values, 1)
        source |= unpack_nibbles(packed.reshape(-1)).to(torch.int64) << (4 * digit)
    return source


def scales_and_zeros(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """[..., N, G] scale and zero -> the kernel's [..., G, N, 2] bf16 tensor."""
    return torch.stack([scale, zero], dim=-1).transpose(-3, -2).contiguous().to(_KERNEL_DTYPE)


def int4_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                zero: torch.Tensor | None, group_size: int) -> torch.Tensor:
    """x [..., K] @ W.T -> [..., N] for W in the canonical int4 layout (q [N, K/2], scale
    and zero [N, G]; zero None: symmetric). Few rows without a gradient: dsmoe's native
    kernel; otherwise (or without it) the weight dequantized for one GEMM."""
    rows = x.reshape(-1, x.shape[-1])  # [M, K]
    out = None
    if rows.shape[0] <= INT4_KERNEL_MAX_ROWS and not records_grad(rows):
        out = native.int4_blocks_matmul(rows, q.unsqueeze(0), scale.unsqueeze(0),
                                        None if zero is None else zero.unsqueeze(0),
                                        group_size, [(0, 0, rows.shape[0])])
    if out is None:  # the GEMM in the rows' dtype (a bf16 GEMM's bf16 output would round
        # an fp32 model's prefill; fp32 rows cross over later, ~48 rows, but are rarer on CPU)
        out = chunked_linear(rows, q.shape[0], lambda n0, n1: F.linear(rows, _int4_rows(
            q[n0:n1], scale[n0:n1], None if zero is None else zero[n0:n1], group_size,
            x.dtype)))
    return out.to(x.dtype).reshape(*x.shape[:-1], q.shape[0])


def _int4_rows(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
               group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """Canonical int4 rows [n, K/2] as float [n, K] (native dequantizer, else torch's)."""
    weight = native.int4_dequantize(q, scale, zero, group_size, dtype)
    if weight is None:
        weight = dequantize_int4(q, scale, torch.zeros_like(scale) if zero is None else zero,
                                 dtype)
    return weight


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scale_zero: torch.Tensor,
                group_size: int, out_features: int) -> torch.Tensor:
    """x [..., K] @ W.T -> [..., N] with W in torch's packed int4 layout."""
    rows = aligned(x.reshape(-1, x.shape[-1]).to(_KERNEL_DTYPE))  # [M, K]
    out = torch._weight_int4pack_mm_for_cpu(rows, aligned(packed), group_size, scale_zero)
    return out.to(x.dtype).reshape(*x.shape[:-1], out_features)
