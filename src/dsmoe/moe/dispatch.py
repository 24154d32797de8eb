"""Token dispatch: sort (token, expert) assignments by expert, drop over capacity, combine.

One path serves training and inference. The combine gathers each assignment's output
back to its (token, slot) position and reduces over the K slots, instead of a scatter-add:
a fixed-order reduction, so results are deterministic on every device.

Shapes: T tokens, K picks per token, A = T*K assignments (A_kept after dropping), E, D.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class DispatchPlan:
    order: torch.Tensor  # [A_kept] flat assignment ids (t*K + k), grouped by expert
    token_idx: torch.Tensor  # [A_kept] token of each sorted row
    counts: torch.Tensor  # [E] rows per expert after dropping
    routed_counts: torch.Tensor  # [E] assignments per expert chosen by the router
    n_assignments: int  # A
    dropped: bool  # whether any assignment was dropped


def expert_capacity(capacity_factor: float, n_tokens: int, top_k: int, n_experts: int) -> int:
    """ceil(capacity_factor * T * K / E): the most assignments one expert may take."""
    return max(1, math.ceil(capacity_factor * n_tokens * top_k / n_experts))


def plan_dispatch(topk_idx: torch.Tensor, n_experts: int, capacity: int | None = None,
                  priority: torch.Tensor | None = None) -> DispatchPlan:
    """Group assignments by expert (stable: token order within an expert).

    With ``capacity``, each expert keeps its ``capacity`` highest-``priority`` assignments
    (the affinity scores, [T, K]) and the rest are dropped.
    """
    T, K = topk_idx.shape
    flat = topk_idx.reshape(-1)  # [A]
    routed = torch.bincount(flat, minlength=n_experts)  # [E]
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


def combine(expert_out: torch.Tensor, plan: DispatchPlan, topk_weight: torch.Tensor
            ) -> torch.Tensor:
    """sum_k weight[t, k] * out(t, k): expert_out [A_kept, D] sorted rows -> [T, D]."""
    T, K = topk_weight.shape
    D = expert_out.shape[-1]
    if plan.dropped:
        per_slot = expert_out.new_zeros(plan.n_assignments, D)
    else:
        per_slot = expert_out.new_empty(plan.n_assignments, D)
    per_slot = per_slot.index_copy(0, plan.order, expert_out)  # [A, D] in (t, k) order
    return torch.bmm(topk_weight.unsqueeze(1), per_slot.view(T, K, D)).squeeze(1)  # [T, D]
