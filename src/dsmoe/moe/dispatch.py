"""Token dispatch: sort (token, expert) assignments by expert, drop over capacity, combine.

One path serves training and inference:
- ``plan_dispatch`` sorts the flat assignments by expert (stable, so token order within an
  expert), and with a capacity keeps each expert's highest-priority assignments.
- ``dispatch_tokens`` gathers each sorted assignment's token row.
- ``combine`` is a weighted sum over each token's K slots, computed as one
  ``embedding_bag``: bag t holds the rows of token t's kept slots in slot order, weighted by
  their gate weights. It reads the experts' output rows where they are (no ``[T*K, D]``
  per-slot copy) and sums each token's slots in a fixed order, so results are
  deterministic on every device (a scatter-add with atomics would not be) and do not depend
  on where the rows sit in memory (see ``_Combine``).
- ``run_experts`` chains the three. The gather and the combine can address an experts' own
  work buffer (``grouped_gemm.GroupedGEMM``: the sorted rows plus zero padding on CPU), so no
  rows are copied between the sorted order and that buffer.

Shapes: T tokens, K picks per token, A = T*K assignments (A_kept after dropping), E, D.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dsmoe.autograd import records_grad
from dsmoe.moe.balance import expert_counts


@dataclass
class DispatchPlan:
    order: torch.Tensor  # [A_kept] flat assignment ids (t*K + k), grouped by expert
    token_idx: torch.Tensor  # [A_kept] token of each sorted row
    counts: torch.Tensor  # [E] rows per expert after dropping
    routed_counts: torch.Tensor  # [E] assignments per expert chosen by the router
    n_assignments: int  # A
    dropped: bool  # whether any assignment may be missing from ``order``


def expert_capacity(capacity_factor: float, n_tokens: int, top_k: int, n_experts: int) -> int:
    """ceil(capacity_factor * T * K / E): the most assignments one expert may take."""
    return max(1, math.ceil(capacity_factor * n_tokens * top_k / n_experts))


def plan_dispatch(topk_idx: torch.Tensor, n_experts: int, capacity: int | None = None,
                  priority: torch.Tensor | None = None) -> DispatchPlan:
    """Group assignments by expert (stable: token order within an expert).

    With ``capacity``, each expert keeps its ``capacity`` highest-``priority`` assignments
    (the affinity scores, [T, K]; ties: the earlier assignment) and the rest are dropped.
    """
    T, K = topk_idx.shape
    flat = topk_idx.reshape(-1)  # [A]
    routed = expert_counts(flat, n_experts)  # [E], no host sync (see expert_counts)
    if capacity is None or int(routed.max()) <= capacity:
        order = torch.argsort(flat, stable=True)
        return DispatchPlan(order, order // K, routed, routed, T * K, False)
    if priority is None:
        raise ValueError("dropping needs a priority (affinity) per assignment")
    by_priority = torch.argsort(priority.reshape(-1), descending=True, stable=True)
    order = by_priority[torch.argsort(flat[by_priority], stable=True)]  # expert, then priority
    starts = torch.cumsum(routed, 0) - routed  # [E]
    rank = torch.arange(order.numel(), device=order.device) - starts[flat[order]]
    order = order[rank < capacity]
    return DispatchPlan(order, order // K, routed.clamp(max=capacity), routed, T * K, True)


def dispatch_tokens(tokens: torch.Tensor, plan: DispatchPlan, rows: torch.Tensor | None = None,
                    n_rows: int | None = None) -> torch.Tensor:
    """The token row of every kept assignment, sorted by expert: [T, D] -> [A_kept, D].

    With ``rows`` ([A_kept]: the row of each sorted assignment in an experts' work buffer
    of ``n_rows`` rows, see ``GroupedGEMM``) the tokens land there directly and the other
    rows are zero -> [n_rows, D]. Either way one row gather; its backward sums each token's
    row gradients deterministically."""
    if rows is None:
        if not records_grad(tokens):
            return tokens.index_select(0, plan.token_idx)
        T = tokens.shape[0]
        slot_rows, offsets = _bags(plan, T, plan.n_assignments // T if T else 1)
        return _Gather.apply(tokens, plan.token_idx, slot_rows, offsets)
    T = tokens.shape[0]
    source = _row_tokens(plan, rows, n_rows, T)  # [P]; T = padding
    padded = torch.cat([tokens, tokens.new_zeros(1, tokens.shape[1])])  # [T + 1, D]
    return F.embedding(source, padded, padding_idx=T)  # [P, D]


class _Gather(torch.autograd.Function):
    """tokens [T, D] -> sorted rows [A_kept, D] by ``index_select``, whose own backward
    (``index_add_``) adds rows into tokens with atomics on CUDA: an order that changes from
    run to run, and a slow scatter (1.7 ms of a 16B layer's 18 ms step on an H200). Here the
    backward sums each token's row gradients as one ``embedding_bag`` in slot order, the
    same deterministic reduction ``combine`` uses forwards."""

    @staticmethod
    def forward(ctx, tokens: torch.Tensor, token_idx: torch.Tensor,  # noqa: ANN001
                slot_rows: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(slot_rows, offsets)
        return tokens.index_select(0, token_idx)  # [A_kept, D]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        slot_rows, offsets = ctx.saved_tensors
        return F.embedding_bag(slot_rows, grad.contiguous(), offsets, mode="sum"), None, None, None


def _bags(plan: DispatchPlan, T: int, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's kept slots as a bag of sorted rows: (row of every kept slot in (t, k)
    order [A_kept], first slot of each token's bag [T]); a token whose slots were all
    dropped has an empty bag."""
    order = plan.order  # [A_kept] slot of each sorted row
    if not plan.dropped:  # every slot kept: bag t is slots t*K .. t*K+K-1
        slot_rows = torch.empty_like(order)  # [A] sorted row of each slot
        slot_rows[order] = torch.arange(order.numel(), device=order.device)
        return slot_rows, torch.arange(0, T * K, K, device=order.device)
    slots, slot_rows = torch.sort(order)  # kept slots in (t, k) order, their rows
    per_token = torch.bincount(torch.div(slots, K, rounding_mode="floor"), minlength=T)
    return slot_rows, torch.cumsum(per_token, 0) - per_token


def _row_tokens(plan: DispatchPlan, rows: torch.Tensor, n_rows: int | None, T: int
                ) -> torch.Tensor:
    """Token of every work row; ``T`` for a padding row."""
    source = torch.full((n_rows,), T, dtype=plan.token_idx.dtype, device=rows.device)
    return source.index_copy_(0, rows, plan.token_idx)  # [P]


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products ``[N, D] x [N, D] -> [N]`` as one batched GEMM: accumulated in
    fp32 also for bf16 inputs, no ``[N, D]`` temporary, and one parallel region (on shared
    cores every region can cost a scheduler time slice; a blocked multiply-and-sum took
    300 ms here under load, this 17 ms)."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)  # [N]


class _Combine(torch.autograd.Function):
    """out[t] = sum of weight * row over bag t, as one ``embedding_bag``: rows in the
    experts' order (sorted or work buffer), bags in (t, k) slot order.

    NOTE: the backward is written out. ``embedding_bag``'s own gradient for
    ``per_sample_weights`` is one BLAS dot product per slot, whose rounding depends on the
    rows' memory alignment (measured: offsets of 1-3 floats change it), so the same numbers
    at another address would give other gate gradients. Here the gate gradient is a
    row-wise multiply and sum, and the row gradient ``weight * grad[token]`` is exact.
    A padding row (token ``T``) has weight 0 and gets a zero gradient.
    """

    @staticmethod
    def run(expert_out: torch.Tensor, row_weight: torch.Tensor, slot_rows: torch.Tensor,
            offsets: torch.Tensor) -> torch.Tensor:
        """The forward math, without autograd."""
        return F.embedding_bag(slot_rows, expert_out, offsets, mode="sum",
                               per_sample_weights=row_weight.index_select(0, slot_rows))

    @staticmethod
    def forward(ctx, expert_out: torch.Tensor, row_weight: torch.Tensor,  # noqa: ANN001
                slot_rows: torch.Tensor, offsets: torch.Tensor, row_token: torch.Tensor,
                padded: bool) -> torch.Tensor:
        ctx.save_for_backward(expert_out, row_weight, row_token)
        ctx.padded = padded
        return _Combine.run(expert_out, row_weight, slot_rows, offsets)  # [T, D]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        expert_out, row_weight, row_token = ctx.saved_tensors
        if ctx.padded:  # padding rows read a zero row: no NaN * 0 leaks into them
            grad = torch.cat([grad, grad.new_zeros(1, grad.shape[1])])  # [T + 1, D]
        grad_rows = grad.index_select(0, row_token)  # [R, D] upstream grad of each row
        grad_weight = _row_dot(grad_rows, expert_out) if ctx.needs_input_grad[1] else None
        grad_out = grad_rows.mul_(row_weight.unsqueeze(-1)) if ctx.needs_input_grad[0] else None
        return grad_out, grad_weight, None, None, None, None


def combine(expert_out: torch.Tensor, plan: DispatchPlan, topk_weight: torch.Tensor,
            rows: torch.Tensor | None = None) -> torch.Tensor:
    """sum_k weight[t, k] * out(t, k) over kept slots: expert_out [A_kept, D] -> [T, D].

    With ``rows`` (as in ``dispatch_tokens``), ``expert_out`` is the experts' work buffer
    [P, D] and sorted row j is its row ``rows[j]``; other rows are ignored. A token whose
    slots were all dropped gets zeros."""
    T, K = topk_weight.shape
    # [A_kept] gate weight of each sorted row
    row_weight = topk_weight.reshape(-1).to(expert_out.dtype).index_select(0, plan.order)
    slot_rows, offsets = _bags(plan, T, K)
    if not records_grad(expert_out, row_weight):
        if rows is not None:  # inference: skip the autograd Function's bookkeeping
            row_weight = row_weight.new_zeros(expert_out.shape[0]).index_copy_(0, rows, row_weight)
            slot_rows = rows.index_select(0, slot_rows)
        return _Combine.run(expert_out, row_weight, slot_rows, offsets)
    if rows is None:
        return _Combine.apply(expert_out, row_weight, slot_rows, offsets, plan.token_idx, False)
    P = expert_out.shape[0]
    work_weight = row_weight.new_zeros(P).index_copy(0, rows, row_weight)  # [P]
    return _Combine.apply(expert_out, work_weight, rows[slot_rows], offsets,
                          _row_tokens(plan, rows, P, T), True)


def run_experts(experts: nn.Module, tokens: torch.Tensor, plan: DispatchPlan,
                topk_weight: torch.Tensor) -> torch.Tensor:
    """dispatch -> experts -> combine: the routed output [T, D].

    ``experts`` follows the protocol of ``dsmoe.moe.experts.Experts``. Those whose
    ``gemm_plan(counts, n_rows)`` returns a ``GroupedGEMM`` (``SwiGLUExperts``,
    ``ReLUExperts``) get the tokens gathered straight into its work buffer and are combined
    from it: two ``[A, D]`` copies (and their gradients) fewer than going through sorted
    rows. The others (plan None) are called as
    ``experts(sorted rows [A_kept, D], counts [E]) -> [A_kept, D]``.
    """
    gemm = experts.gemm_plan(plan.counts, plan.order.numel())
    if gemm is None:
        expert_out = experts(dispatch_tokens(tokens, plan), plan.counts)  # [A_kept, D]
        return combine(expert_out, plan, topk_weight)
    work = dispatch_tokens(tokens, plan, gemm.index, gemm.rows)  # [P, D]
    return combine(experts(work, plan.counts, gemm=gemm), plan, topk_weight, gemm.index)
