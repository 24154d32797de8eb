"""Token dispatch (``dsmoe.moe.dispatch``): sorting, capacity, gather and combine.

- ``plan_dispatch`` groups rows by expert, keeps token order within an expert (stable),
  and with a capacity keeps each expert's highest-priority assignments (ties: the earlier
  one), never more than the capacity; checked against a Python oracle.
- ``combine`` equals sum_k weight * out(t, k) written out, in values and in the gradients of
  the expert rows and the gate weights (fp32, 1e-6), when experts get no tokens, when
  slots are dropped (a token with every slot dropped gets zeros) and from a padded work
  buffer; its gate gradient does not depend on where the rows sit in memory.
- ``run_experts`` gives the same result through the experts' work buffer as through sorted
  rows and as a plain module; the whole ``MoELayer`` is bit-identical when run twice.

Shapes: T tokens, K picks, A = T*K assignments, E experts, D hidden.
"""

from __future__ import annotations

import pytest
import torch

from conftest import assert_close, moe_config, randomize_
from dsmoe.moe.dispatch import (
    DispatchPlan, combine, dispatch_tokens, expert_capacity, plan_dispatch, run_experts,
)
from dsmoe.moe.experts import Experts, SwiGLUExperts
from dsmoe.moe.layer import MoELayer

FP32 = dict(atol=1e-6, rtol=1e-6)


def _routing(T: int, K: int, E: int, used: int, seed: int) -> torch.Tensor:
    """[T, K] distinct experts per token, drawn from the first ``used`` of E experts."""
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(used, generator=gen)[:K] for _ in range(T)])


# --- plan_dispatch --------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
def test_plan_groups_by_expert_and_is_stable(seed: int) -> None:
    T, K, E = 13, 3, 8
    idx = _routing(T, K, E, used=5, seed=seed)  # experts 5..7 get nothing
    plan = plan_dispatch(idx, E)
    flat = idx.reshape(-1)
    assert not plan.dropped and plan.n_assignments == T * K
    assert torch.equal(plan.counts, torch.bincount(flat, minlength=E))
    assert torch.equal(plan.routed_counts, plan.counts)
    experts = flat[plan.order]
    assert torch.equal(experts, torch.sort(experts).values), "rows not grouped by expert"
    for e in range(E):  # stable: ascending assignment id (= token order) within an expert
        ids = plan.order[experts == e]
        assert torch.equal(ids, torch.sort(ids).values)
    assert torch.equal(plan.token_idx, plan.order // K)


def _capacity_oracle(idx: torch.Tensor, priority: torch.Tensor, capacity: int, E: int
                     ) -> list[list[int]]:
    """Per expert, the kept assignment ids in (priority desc, id asc) order."""
    flat, prio = idx.reshape(-1).tolist(), priority.reshape(-1).tolist()
    kept = []
    for e in range(E):
        ids = sorted((a for a, x in enumerate(flat) if x == e), key=lambda a: (-prio[a], a))
        kept.append(ids[:capacity])
    return kept


@pytest.mark.parametrize("capacity_factor", [0.25, 0.5, 1.0])
@pytest.mark.parametrize("seed", range(3))
def test_capacity_keeps_highest_priority_assignments(capacity_factor: float, seed: int
                                                     ) -> None:
    T, K, E = 16, 2, 4
    idx = _routing(T, K, E, used=E, seed=seed)
    idx[: T // 2, 0] = 0  # skew: expert 0 overflows
    idx[: T // 2, 1] = torch.where(idx[: T // 2, 1] == 0, 1, idx[: T // 2, 1])
    gen = torch.Generator().manual_seed(100 + seed)
    priority = torch.rand(T, K, generator=gen).round(decimals=1)  # with ties
    capacity = expert_capacity(capacity_factor, T, K, E)
    plan = plan_dispatch(idx, E, capacity, priority)

    expected = _capacity_oracle(idx, priority, capacity, E)
    assert plan.dropped
    assert (plan.counts <= capacity).all() and int(plan.counts.sum()) == plan.order.numel()
    assert torch.equal(plan.routed_counts, torch.bincount(idx.reshape(-1), minlength=E))
    start = 0
    for e in range(E):
        rows = plan.order[start:start + int(plan.counts[e])].tolist()
        assert rows == expected[e], f"expert {e}: kept {rows}, oracle {expected[e]}"
        start += int(plan.counts[e])


def test_capacity_without_priority_is_an_error() -> None:
    idx = torch.zeros(4, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="priority"):
        plan_dispatch(idx, 2, capacity=1)


# --- combine ----------------------------------------------------------------------------------
def _reference(expert_out: torch.Tensor, plan: DispatchPlan, weight: torch.Tensor
               ) -> torch.Tensor:
    """sum over kept slots of weight[t, k] * row, one token at a time."""
    T, K = weight.shape
    out = [expert_out.new_zeros(expert_out.shape[1]) for _ in range(T)]
    for row, slot in enumerate(plan.order.tolist()):
        t, k = divmod(slot, K)
        out[t] = out[t] + weight[t, k] * expert_out[row]
    return torch.stack(out)


def _drop_plan(idx: torch.Tensor, E: int) -> DispatchPlan:
    """Capacity 1: most slots dropped; with T > E * 1 some tokens lose every slot."""
    priority = torch.arange(idx.numel(), dtype=torch.float32).view(idx.shape)
    return plan_dispatch(idx, E, capacity=1, priority=priority)


@pytest.mark.parametrize("case", ["dropless, idle experts", "dropped slots"])
def test_combine_matches_reference(case: str) -> None:
    T, K, E, D = 9, 2, 6, 5
    idx = _routing(T, K, E, used=3, seed=1)  # experts 3..5 receive no tokens
    plan = plan_dispatch(idx, E) if case.startswith("dropless") else _drop_plan(idx, E)
    rows = torch.randn(plan.order.numel(), D)
    weight = torch.rand(T, K)
    upstream = torch.randn(T, D)

    r1, w1 = rows.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    out = combine(r1, plan, w1)
    (out * upstream).sum().backward()
    r2, w2 = rows.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    expected = _reference(r2, plan, w2)
    (expected * upstream).sum().backward()

    assert_close(out, expected, **FP32, what=f"{case}: output")
    assert_close(r1.grad, r2.grad, **FP32, what=f"{case}: grad of expert rows")
    assert_close(w1.grad, w2.grad, **FP32, what=f"{case}: grad of gate weights")
    if plan.dropped:
        kept_tokens = set((plan.order // K).tolist())
        lost = [t for t in range(T) if t not in kept_tokens]
        assert lost, "the case should drop every slot of some token"
        assert torch.count_nonzero(out[lost]) == 0


def test_combine_from_padded_work_rows() -> None:
    """Rows read from a work buffer (extra rows ignored) = the same rows sorted."""
    T, K, E, D = 7, 2, 4, 3
    plan = plan_dispatch(_routing(T, K, E, used=E, seed=2), E)
    A = plan.order.numel()
    sorted_rows = torch.randn(A, D)
    where = torch.randperm(A + 5)[:A]  # work row of each sorted row; 5 rows of garbage
    work = torch.full((A + 5, D), float("nan")).index_copy(0, where, sorted_rows)
    weight = torch.rand(T, K)
    w1, w2 = weight.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    work = work.requires_grad_(True)
    upstream = torch.randn(T, D)
    (combine(work, plan, w1, where) * upstream).sum().backward()
    rows = sorted_rows.clone().requires_grad_(True)
    expected = combine(rows, plan, w2)
    (expected * upstream).sum().backward()
    assert torch.equal(combine(work.detach(), plan, weight, where), expected.detach())
    assert_close(w1.grad, w2.grad, **FP32, what="gate grads from work rows")
    assert torch.equal(work.grad[where], rows.grad)
    unused = torch.ones(A + 5, dtype=torch.bool)
    unused[where] = False
    assert torch.count_nonzero(work.grad[unused]) == 0, "unused rows must get zero grads"


def test_combine_gate_gradient_ignores_memory_alignment() -> None:
    """The same rows at other float offsets give bit-identical gate gradients."""
    T, K, E, D = 32, 3, 8, 37
    plan = plan_dispatch(_routing(T, K, E, used=E, seed=3), E)
    rows = torch.randn(plan.order.numel(), D)
    weight, upstream = torch.rand(T, K), torch.randn(T, D)
    grads = []
    for shift in range(4):
        storage = torch.empty(rows.numel() + shift)
        shifted = storage[shift:].view_as(rows).copy_(rows).requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        (combine(shifted, plan, w) * upstream).sum().backward()
        grads.append(w.grad)
    for g in grads[1:]:
        assert torch.equal(g, grads[0])


# --- dispatch_tokens and run_experts ---------------------------------------------------------
def test_dispatch_into_work_rows() -> None:
    T, K, E, D = 6, 2, 4, 3
    plan = plan_dispatch(_routing(T, K, E, used=E, seed=4), E)
    tokens = torch.randn(T, D, requires_grad=True)
    where = torch.randperm(plan.order.numel() + 3)[:plan.order.numel()]
    work = dispatch_tokens(tokens, plan, where, plan.order.numel() + 3)
    assert torch.equal(work[where], tokens[plan.token_idx])
    padding = torch.ones(work.shape[0], dtype=torch.bool)
    padding[where] = False
    assert torch.count_nonzero(work[padding]) == 0
    upstream = torch.randn_like(work)
    (work * upstream).sum().backward()
    expected = torch.zeros(T, D).index_add_(0, plan.token_idx, upstream[where])
    assert_close(tokens.grad, expected, **FP32, what="gather gradient")


class _PlainExperts(Experts):
    """Wraps SwiGLUExperts without its work-buffer plan (the protocol's default, None):
    the sorted-rows path."""

    def __init__(self, inner: SwiGLUExperts) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return self.inner(x, counts)


def test_run_experts_work_rows_equal_sorted_rows() -> None:
    T, K, E, D = 20, 3, 8, 8
    experts = SwiGLUExperts(E, D, 4, init_std=0.5)
    experts.kernel = "batched"
    plan = plan_dispatch(_routing(T, K, E, used=6, seed=5), E)
    tokens, weight = torch.randn(T, D), torch.rand(T, K)
    assert experts.gemm_plan(plan.counts, plan.order.numel()).index is not None
    results = []
    for module in (experts, _PlainExperts(experts)):
        x, w = tokens.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        experts.zero_grad()
        out = run_experts(module, x, plan, w)
        out.pow(2).sum().backward()
        results.append((out, x.grad, w.grad, experts.gate_up_proj.grad.clone()))
    for label, a, b in zip(("output", "tokens grad", "gate grad", "weight grad"), *results):
        assert_close(a, b, **FP32, what=f"work rows vs sorted rows: {label}")


def test_layer_is_deterministic_and_train_equals_eval() -> None:
    cfg = moe_config(aux_loss_alpha=0.01, seq_aux=True)
    layer = randomize_(MoELayer(cfg), std=0.3)
    x = torch.randn(2, 9, cfg.hidden_size)
    runs = []
    for _ in range(2):
        layer.zero_grad()
        xg = x.clone().requires_grad_(True)
        out = layer.train()(xg)
        (out.hidden_states.pow(2).sum() + out.aux_loss).backward()
        runs.append([out.hidden_states, xg.grad] + [p.grad.clone() for p in layer.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b), "two identical steps differ"
    with torch.no_grad():
        assert torch.equal(layer.eval()(x).hidden_states, runs[0][0])


def test_empty_batch() -> None:
    cfg = moe_config()
    layer = MoELayer(cfg)
    x = torch.randn(0, cfg.hidden_size, requires_grad=True)
    out = layer(x)
    assert out.hidden_states.shape == (0, cfg.hidden_size)
    out.hidden_states.sum().backward()
    assert torch.count_nonzero(layer.experts.gate_up_proj.grad) == 0
