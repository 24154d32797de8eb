"""Property tests (hypothesis) of MoELayer's routing and dispatch over random small configs.

Each example draws a routing variant, sizes (T <= 64, D <= 32, E <= 16) and a seed; tensors
come from a ``torch.Generator`` seeded by the example, and the hypothesis profile in
conftest is derandomised, so CI sees the same examples every run.

The dropping test compares against an oracle written here: per-token loops over the
per-expert HF weights, keeping each expert's ``ceil(capacity_factor * T * K / E)``
highest-affinity assignments (ties: earlier token first).

Shapes: T tokens, D hidden, E experts, K picks, F expert width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import assert_close, moe_config, randomize_
from dsmoe.config import ModelConfig
from dsmoe.moe.grouped_gemm import DECODE_STEP_MAX_ROWS
from dsmoe.moe.layer import MoELayer

FP32_TOL = dict(atol=1e-5, rtol=1e-5)


@dataclass(frozen=True)
class Case:
    cfg: ModelConfig
    tokens: int
    seed: int


@st.composite
def cases(draw, methods: tuple[str, ...] = ("greedy", "group_limited_greedy",
                                            "device_limited", "noaux_tc"), **fixed) -> Case:
    """A valid random MoE config of one of ``methods`` plus a token count and a seed."""
    method = draw(st.sampled_from(methods))
    E = draw(st.sampled_from([4, 8, 16]))
    D = draw(st.sampled_from([8, 16, 32]))
    kw: dict = dict(hidden_size=D, num_attention_heads=2, num_key_value_heads=2,
                    moe_intermediate_size=draw(st.sampled_from([4, 8, 16])),
                    n_routed_experts=E, topk_method=method,
                    n_shared_experts=draw(st.sampled_from([0, 1, 2])),
                    routed_scaling_factor=draw(st.sampled_from([1.0, 2.5])),
                    norm_topk_prob=draw(st.booleans()))
    if method == "greedy":
        K = draw(st.integers(1, min(E, 4)))
        kw["scoring_func"] = draw(st.sampled_from(["softmax", "sigmoid"]))
    elif method in ("group_limited_greedy", "noaux_tc"):
        min_size = 2 if method == "noaux_tc" else 1
        G = draw(st.sampled_from([g for g in (1, 2, 4, 8) if E % g == 0 and E // g >= min_size]))
        keep = draw(st.integers(1, G))
        K = draw(st.integers(1, min(4, keep * (E // G))))
        kw.update(n_group=G, topk_group=keep)
        kw["scoring_func"] = "sigmoid" if method == "noaux_tc" else "softmax"
    else:  # device_limited
        Dv = draw(st.sampled_from([d for d in (1, 2, 4) if E % d == 0]))
        M = draw(st.integers(1, Dv))
        K = draw(st.integers(1, min(4, M * (E // Dv))))
        kw.update(n_devices=Dv, max_devices_per_token=M)
    kw["num_experts_per_tok"] = K
    kw.update(fixed)
    cfg = moe_config(**kw)
    return Case(cfg, draw(st.integers(1, 64)), draw(st.integers(0, 2**31 - 1)))


def _build(case: Case, bias_scale: float = 0.05) -> tuple[MoELayer, torch.Tensor]:
    layer = randomize_(MoELayer(case.cfg), std=0.3, seed=case.seed)
    gen = torch.Generator().manual_seed(case.seed + 1)
    if layer.gate.e_score_correction_bias is not None:
        with torch.no_grad():
            layer.gate.e_score_correction_bias.copy_(
                torch.randn(case.cfg.n_routed_experts, generator=gen) * bias_scale)
    x = torch.randn(case.tokens, case.cfg.hidden_size, generator=gen)  # [T, D]
    return layer, x


def _member(idx: torch.Tensor, E: int) -> torch.Tensor:
    return torch.zeros(idx.shape[0], E, dtype=torch.bool).scatter_(1, idx, True)  # [T, E]


# --- selection --------------------------------------------------------------------------
@given(cases())
def test_every_token_gets_exactly_k_distinct_experts(case: Case) -> None:
    layer, x = _build(case)
    out = layer(x)
    K, E = case.cfg.num_experts_per_tok, case.cfg.n_routed_experts
    assert out.topk_idx.shape == (case.tokens, K)
    assert out.topk_idx.dtype == torch.long
    assert ((out.topk_idx >= 0) & (out.topk_idx < E)).all()
    assert (_member(out.topk_idx, E).sum(-1) == K).all(), "duplicate experts for a token"
    assert torch.equal(out.expert_counts, torch.bincount(out.topk_idx.flatten(), minlength=E))


@given(cases(methods=("device_limited",)))
def test_device_limited_routing_spans_at_most_m_devices(case: Case) -> None:
    layer, x = _build(case)
    idx = layer(x).topk_idx
    per_device = case.cfg.n_routed_experts // case.cfg.n_devices
    devices = _member(idx // per_device, case.cfg.n_devices)  # [T, Dv]
    assert (devices.sum(-1) <= case.cfg.max_devices).all()


@given(cases(methods=("group_limited_greedy", "noaux_tc")))
def test_group_limited_routing_spans_at_most_topk_group_groups(case: Case) -> None:
    layer, x = _build(case, bias_scale=0.5)  # large V3 biases: negative corrected scores
    idx = layer(x).topk_idx
    groups = _member(idx // case.cfg.group_size, case.cfg.n_group)  # [T, G]
    assert (groups.sum(-1) <= case.cfg.topk_group).all()


@given(cases(norm_topk_prob=True))
def test_renormalised_weights_sum_to_routed_scaling_factor(case: Case) -> None:
    layer, x = _build(case)
    w = layer(x).topk_weight
    if case.cfg.num_experts_per_tok > 1:
        expected = torch.full((case.tokens,), case.cfg.routed_scaling_factor)
        assert_close(w.sum(-1), expected, atol=1e-5, rtol=1e-5, what="weights sum")
    assert (w > 0).all()


# --- dispatch and combine ------------------------------------------------------------------
def _expert_oracle(layer: MoELayer, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert ``e`` on rows x [N, D], from its HF per-expert weights (SwiGLU, SiLU)."""
    sd = layer.hf_state_dict()
    gate, up = sd[f"experts.{e}.gate_proj.weight"], sd[f"experts.{e}.up_proj.weight"]
    return (F.silu(x @ gate.T) * (x @ up.T)) @ sd[f"experts.{e}.down_proj.weight"].T


def _dropping_oracle(layer: MoELayer, x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor,
                     score: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Output [T, D] and kept mask [T, K] with per-expert capacity, highest affinity first."""
    T, K = idx.shape
    kept = torch.zeros(T, K, dtype=torch.bool)
    for e in range(layer.config.n_routed_experts):
        slots = [(t, k) for t in range(T) for k in range(K) if idx[t, k] == e]
        slots.sort(key=lambda tk: -score[tk].item())  # stable: earlier token wins ties
        for t, k in slots[:capacity]:
            kept[t, k] = True
    out = torch.zeros_like(x)
    for t in range(T):
        for k in range(K):
            if kept[t, k]:
                e = int(idx[t, k])
                out[t] += weight[t, k] * _expert_oracle(layer, e, x[t:t + 1])[0]
    if layer.shared_experts is not None:
        out = out + layer.shared_experts(x)
    return out, kept


@settings(max_examples=12)
@given(cases(methods=("greedy", "device_limited", "noaux_tc"), drop_tokens=True,
             n_shared_experts=1),
       st.sampled_from([0.25, 0.5, 1.0, 1.3]))
def test_capacity_dropping_matches_oracle(case: Case, capacity_factor: float) -> None:
    cfg = case.cfg.replace(capacity_factor=capacity_factor)
    layer, x = _build(Case(cfg, case.tokens, case.seed))
    with torch.no_grad():  # skew the router so that some experts overflow
        layer.gate.weight[0] += 2.0 * x.mean(0)
    seen: list[torch.Tensor] = []
    layer.experts.register_forward_hook(lambda m, args, out: seen.append(args[1].clone()))
    layer.train()
    with torch.no_grad():
        out = layer(x)
    T, K, E = case.tokens, cfg.num_experts_per_tok, cfg.n_routed_experts
    capacity = math.ceil(capacity_factor * T * K / E)
    kept_per_expert = seen[-1]
    assert (kept_per_expert <= capacity).all(), (kept_per_expert, capacity)
    assert torch.equal(kept_per_expert, out.expert_counts.clamp(max=capacity))
    expected, kept = _dropping_oracle(layer, x, out.topk_idx, out.topk_weight,
                                      layer.gate(x).topk_score, capacity)
    assert_close(out.dropped_fraction, torch.tensor(1.0 - kept.float().mean().item()),
                 atol=1e-6, rtol=0, what="dropped fraction")
    assert_close(out.hidden_states, expected, **FP32_TOL, what="output with dropping")
    fully_dropped = ~kept.any(-1)
    if fully_dropped.any():  # exactly the shared output: the routed part is an exact zero
        shared = layer.shared_experts(x)
        assert torch.equal(out.hidden_states[fully_dropped], shared[fully_dropped])


def test_fully_dropped_tokens_get_exactly_the_shared_output() -> None:
    """A deterministic case of the property above: all tokens want expert 0 first."""
    cfg = moe_config(n_routed_experts=4, num_experts_per_tok=1, drop_tokens=True,
                     capacity_factor=1.0)
    layer = randomize_(MoELayer(cfg), std=0.3)
    x = torch.randn(16, 32)
    with torch.no_grad():
        layer.gate.weight.zero_()
        layer.gate.weight[0] = 5.0 * x.mean(0) / x.mean(0).norm() ** 2
        x = x + x.mean(0)  # make every token align with expert 0
    out = layer.train()(x)
    assert (out.topk_idx[:, 0] == 0).all(), "setup: every token routed to expert 0"
    capacity = math.ceil(1.0 * 16 * 1 / 4)
    assert_close(out.dropped_fraction, torch.tensor(1 - capacity / 16), atol=1e-6, rtol=0,
                 what="12 of 16 assignments dropped")
    shared = layer.shared_experts(x)
    dropped_rows = (out.hidden_states - shared).abs().sum(-1) == 0
    assert int(dropped_rows.sum()) == 16 - capacity
    kept_scores = layer.gate(x).topk_score[~dropped_rows, 0]
    assert kept_scores.min() >= layer.gate(x).topk_score[dropped_rows, 0].max(), \
        "the highest-affinity assignments are the ones kept"


@settings(max_examples=10)
@given(cases(drop_tokens=True), st.sampled_from([0.25, 0.5]))
def test_no_dropping_in_eval(case: Case, capacity_factor: float) -> None:
    cfg = case.cfg.replace(capacity_factor=capacity_factor)
    layer, x = _build(Case(cfg, case.tokens, case.seed))
    dropless = MoELayer(cfg.replace(drop_tokens=False))
    dropless.load_state_dict(layer.state_dict())
    layer.eval()
    dropless.eval()
    with torch.no_grad():
        out, ref = layer(x), dropless(x)
    assert out.dropped_fraction.item() == 0.0
    assert torch.equal(out.hidden_states, ref.hidden_states)


@settings(max_examples=10)
@given(cases())
def test_outputs_do_not_depend_on_the_rest_of_the_batch(case: Case) -> None:
    layer, x = _build(case)
    layer.eval()
    with torch.no_grad():
        batch = layer(x).hidden_states
        rows = torch.cat([layer(x[t:t + 1]).hidden_states for t in range(case.tokens)])
        reversed_batch = layer(x.flip(0)).hidden_states.flip(0)
    assert_close(batch, rows, **FP32_TOL, what="batch vs one token at a time")
    assert_close(batch, reversed_batch, **FP32_TOL, what="batch vs reversed batch")


@given(cases())
def test_train_and_eval_outputs_identical_when_dropless(case: Case) -> None:
    layer, x = _build(case)
    train = layer.train()(x).hidden_states
    with torch.no_grad():
        evaluated = layer.eval()(x).hidden_states
    if case.tokens <= DECODE_STEP_MAX_ROWS:  # a CPU decode step: eval runs native kernels
        assert_close(evaluated, train, atol=1e-6, rtol=1e-6, what="decode step vs train")
    else:
        assert torch.equal(train, evaluated), "same dispatch path in train and eval"


@settings(max_examples=10)
@given(cases())
def test_gradients_reach_gate_and_every_used_expert(case: Case) -> None:
    layer, x = _build(case)
    x.requires_grad_(True)
    out = layer(x)
    out.hidden_states.pow(2).sum().backward()
    assert layer.gate.weight.grad is not None
    assert layer.gate.weight.grad.abs().sum() > 0, "gate weights get no gradient"
    assert x.grad.abs().sum() > 0
    grads = {k: g for k, g in _hf_grads(layer).items() if k.startswith("experts.")}
    used = set(out.topk_idx.flatten().tolist())
    for e in range(case.cfg.n_routed_experts):
        g = grads[f"experts.{e}.down_proj.weight"]
        assert (g.abs().sum() > 0) == (e in used), f"expert {e}: used={e in used}"


def _hf_grads(layer: MoELayer) -> dict[str, torch.Tensor]:
    from dsmoe.checkpoint import keys

    return keys.moe_to_hf({n: p.grad if p.grad is not None else torch.zeros_like(p)
                           for n, p in layer.named_parameters()})


@settings(max_examples=10)
@given(cases())
def test_3d_and_2d_inputs_agree(case: Case) -> None:
    layer, x = _build(case)
    if case.tokens % 2:
        x = x[:-1]
    if x.shape[0] == 0:
        return
    with torch.no_grad():
        flat = layer.eval()(x).hidden_states
        batched = layer(x.view(2, -1, x.shape[-1])).hidden_states
    assert batched.shape == (2, x.shape[0] // 2, x.shape[-1])
    assert_close(batched.reshape_as(flat), flat, **FP32_TOL, what="[B, S, D] vs [T, D]")


# --- the two expert GEMM paths ------------------------------------------------------------
@settings(max_examples=12)
@given(st.lists(st.integers(0, 9), min_size=1, max_size=8).filter(lambda c: sum(c) > 0),
       st.sampled_from([8, 16]),
       st.sampled_from([4, 12]), st.booleans(), st.integers(0, 2**31 - 1))
def test_grouped_mm_and_expert_loop_agree(counts: list[int], d_in: int, d_out: int,
                                          with_bias: bool, seed: int) -> None:
    """``torch._grouped_mm`` and the per-expert loop must give the same values and gradients,
    including experts that receive no rows (which path runs depends on torch and device)."""
    from dsmoe.moe.grouped_gemm import grouped_linear

    if not hasattr(torch, "_grouped_mm"):
        return
    gen = torch.Generator().manual_seed(seed)
    E, A = len(counts), sum(counts)
    counts_t = torch.tensor(counts)
    x = torch.randn(A, d_in, generator=gen)  # [A, in] sorted by expert
    w = torch.randn(E, d_out, d_in, generator=gen)  # [E, out, in]
    b = torch.randn(E, d_out, generator=gen) if with_bias else None
    upstream = torch.randn(A, d_out, generator=gen)
    results = []
    for grouped in (True, False):
        leaves = [t.clone().requires_grad_(True) for t in (x, w) + ((b,) if with_bias else ())]
        out = grouped_linear(leaves[0], leaves[1], counts_t, leaves[2] if with_bias else None,
                             use_grouped_mm=grouped)
        (out * upstream).sum().backward()
        results.append((out, [t.grad for t in leaves]))
    (out_g, grads_g), (out_l, grads_l) = results
    starts = [sum(counts[:e]) for e in range(E)]
    expected = torch.cat([x[s:s + n] @ w[e].T + (b[e] if with_bias else 0)
                          for e, (s, n) in enumerate(zip(starts, counts))])
    assert_close(out_l, expected, **FP32_TOL, what="loop vs explicit per-expert GEMMs")
    assert_close(out_g, out_l, **FP32_TOL, what="grouped_mm vs loop: output")
    for name, g_g, g_l in zip(("x", "weight", "bias"), grads_g, grads_l):
        assert_close(g_g, g_l, **FP32_TOL, what=f"grouped_mm vs loop: grad of {name}")
