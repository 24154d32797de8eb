"""Router: scoring, the selection rules of each DeepSeek generation on hand-made scores,
gate weights (bias-free, renormalised, scaled), fp32 routing under bf16, the V3 bias buffer.

Shapes: T tokens, D hidden, E experts, K picks, G groups.
"""

from __future__ import annotations

import pytest
import torch

from conftest import assert_close, moe_config
from dsmoe.moe.router import Router, select_greedy, select_group_limited


def _picked(idx: torch.Tensor, E: int) -> torch.Tensor:
    """[T, K] ids -> [T, E] bool membership."""
    return torch.zeros(idx.shape[0], E, dtype=torch.bool).scatter_(1, idx, True)


def _router(**overrides) -> Router:
    return Router(moe_config(**overrides))


# --- selection rules on hand-made scores ---------------------------------------------------
def test_greedy_is_top_k() -> None:
    scores = torch.tensor([[0.1, 0.5, 0.2, 0.9, 0.3, 0.0]])
    assert set(select_greedy(scores, 3)[0].tolist()) == {3, 1, 4}


def test_group_ranking_by_best_expert_vs_by_two_best() -> None:
    """Group 0 = {0.9, 0.0}, group 1 = {0.6, 0.5}, group 2 = {0.1, 0.1}. By best expert (V2)
    group 0 wins; by the sum of the two best (V3) group 1 wins (1.1 > 0.9)."""
    scores = torch.tensor([[0.9, 0.0, 0.6, 0.5, 0.1, 0.1]])
    v2 = select_group_limited(scores, 2, n_groups=3, keep_groups=1, group_rank="max")
    v3 = select_group_limited(scores, 2, n_groups=3, keep_groups=1, group_rank="top2")
    assert set(v2[0].tolist()) == {0, 1}, "V2 keeps group 0 and must pick inside it"
    assert set(v3[0].tolist()) == {2, 3}
    # with two groups kept, the best experts of the kept groups win
    both = select_group_limited(scores, 3, n_groups=3, keep_groups=2, group_rank="max")
    assert set(both[0].tolist()) == {0, 2, 3}


def test_group_limited_picks_inside_kept_groups_even_below_zero() -> None:
    """Masked experts must lose to kept experts even when kept scores are negative (V3's
    bias-corrected scores can be): dsmoe masks with -inf."""
    scores = torch.tensor([[-0.5, -0.4, 0.3, -2.0]])  # groups {0,1}, {2,3}
    idx = select_group_limited(scores, 2, n_groups=2, keep_groups=1, group_rank="top2")
    # group sums: -0.9 vs -1.7 -> group 0 kept, both its experts picked despite being < 0
    assert set(idx[0].tolist()) == {0, 1}


def test_device_limited_routing_uses_devices_as_groups() -> None:
    r = _router(n_routed_experts=8, num_experts_per_tok=3, topk_method="device_limited",
                n_devices=4, max_devices_per_token=2)
    scores = torch.tensor([[0.30, 0.01, 0.25, 0.24, 0.02, 0.01, 0.28, 0.27]])
    idx = r.select(scores)
    # device best scores: d0 .30, d1 .25, d2 .02, d3 .28 -> devices 0 and 3 -> {0, 6, 7}
    assert set(idx[0].tolist()) == {0, 6, 7}


# --- gate weights --------------------------------------------------------------------------
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_weights_are_the_scores_of_the_chosen_experts(scoring: str) -> None:
    r = _router(scoring_func=scoring, routed_scaling_factor=1.7)
    x = torch.randn(20, 32)
    out = r(x)
    logits = x @ r.weight.detach().T
    scores = logits.softmax(-1) if scoring == "softmax" else logits.sigmoid()
    assert_close(out.logits, logits, atol=1e-6, rtol=1e-5, what="logits")
    assert_close(out.scores, scores, atol=1e-6, rtol=1e-5, what="scores")
    assert_close(out.topk_score, scores.gather(1, out.topk_idx), atol=1e-6, rtol=1e-5,
                 what="topk scores")
    assert_close(out.topk_weight, 1.7 * out.topk_score, atol=1e-6, rtol=1e-5,
                 what="weights = scaling * scores without renormalisation")


@pytest.mark.parametrize("scoring,scale", [("softmax", 1.0), ("sigmoid", 2.5)])
def test_renormalised_weights_sum_to_the_scaling_factor(scoring: str, scale: float) -> None:
    r = _router(scoring_func=scoring, norm_topk_prob=True, num_experts_per_tok=3,
                routed_scaling_factor=scale)
    out = r(torch.randn(20, 32))
    assert_close(out.topk_weight.sum(-1), torch.full((20,), scale), atol=1e-6, rtol=1e-6,
                 what="renormalised weights")
    ratio = out.topk_weight / out.topk_score
    assert_close(ratio, ratio[:, :1].expand_as(ratio), atol=1e-5, rtol=1e-5,
                 what="renormalisation keeps the ratios of the scores")


def test_top1_is_not_renormalised() -> None:
    """DeepSeek's MoEGate renormalises only when top_k > 1 (a top-1 weight would be 1)."""
    r = _router(norm_topk_prob=True, num_experts_per_tok=1)
    out = r(torch.randn(10, 32))
    assert_close(out.topk_weight, out.topk_score, atol=0, rtol=0, what="top-1 weights")
    assert (out.topk_weight < 1).all()


def test_bias_changes_selection_but_not_weights() -> None:
    r = _router(scoring_func="sigmoid", topk_method="noaux_tc", n_group=4, topk_group=2,
                norm_topk_prob=False)
    x = torch.randn(30, 32)
    before = r(x)
    with torch.no_grad():
        r.e_score_correction_bias.copy_(torch.tensor([0., 0., 0., 0., 0., 0., 0.5, 0.5]))
    after = r(x)
    assert not torch.equal(before.topk_idx.sort(-1).values, after.topk_idx.sort(-1).values)
    assert _picked(after.topk_idx, 8)[:, 6:].all(), "boosted experts 6 and 7 always picked"
    assert_close(after.scores, before.scores, atol=0, rtol=0, what="scores ignore the bias")
    assert_close(after.topk_weight, after.scores.gather(1, after.topk_idx), atol=0, rtol=0,
                 what="weights are the un-biased scores of the selected experts")


def test_routing_math_is_fp32_for_bf16_inputs() -> None:
    r = _router(scoring_func="sigmoid", topk_method="noaux_tc", n_group=4, topk_group=2)
    x = torch.randn(16, 32)
    reference = r(x)
    r.to(torch.bfloat16)
    out = r(x.bfloat16())
    assert r.weight.dtype == torch.bfloat16
    for name in ("logits", "scores", "topk_weight", "topk_score"):
        assert getattr(out, name).dtype == torch.float32, name
    expected = x.bfloat16().float() @ r.weight.float().T  # fp32 GEMM of the bf16 values
    assert_close(out.logits, expected, atol=1e-5, rtol=1e-5, what="fp32 logits")
    assert_close(out.logits, reference.logits, atol=0.2, rtol=0.1, what="close to fp32 model")


@pytest.mark.parametrize("cast", ["to_bf16", "half", "double", "to_dtype_device"])
def test_bias_buffer_stays_fp32(cast: str) -> None:
    r = _router(scoring_func="sigmoid", topk_method="noaux_tc", n_group=4, topk_group=2)
    with torch.no_grad():
        r.e_score_correction_bias.copy_(torch.tensor([1e-4, -3e-4, 0.1, 0, 0, 0, 0, 1 + 1e-6]))
    before = r.e_score_correction_bias.clone()
    {"to_bf16": lambda: r.to(torch.bfloat16), "half": r.half, "double": r.double,
     "to_dtype_device": lambda: r.to("cpu", torch.bfloat16)}[cast]()
    assert r.e_score_correction_bias.dtype == torch.float32
    assert torch.equal(r.e_score_correction_bias, before), "no rounding through bf16"
    assert "e_score_correction_bias" in r.state_dict()


def test_bias_is_fp32_after_meta_init_and_to_empty() -> None:
    with torch.device("meta"):
        r = _router(scoring_func="sigmoid", topk_method="noaux_tc", n_group=4, topk_group=2)
    r.to(torch.bfloat16)
    r.to_empty(device="cpu")
    assert r.e_score_correction_bias.dtype == torch.float32
    assert r.e_score_correction_bias.device.type == "cpu"


def test_update_bias_moves_towards_balance() -> None:
    r = _router(scoring_func="sigmoid", topk_method="noaux_tc", n_group=4, topk_group=2)
    load = torch.tensor([10., 2., 6., 6., 6., 6., 6., 6.])  # mean 6
    error = r.update_bias(load, speed=0.01)
    assert_close(error, 6.0 - load, atol=0, rtol=0, what="load error")
    assert_close(r.e_score_correction_bias,
                 torch.tensor([-0.01, 0.01, 0, 0, 0, 0, 0, 0]), atol=0, rtol=0,
                 what="bias moves by speed x sign(error)")


def test_update_bias_needs_a_v3_router() -> None:
    with pytest.raises(RuntimeError, match="noaux_tc"):
        _router().update_bias(torch.ones(8), speed=0.01)
