"""MoELayer as a module: V3 aux-loss-free bias balancing, expert-load bookkeeping, dtypes,
HF state-dict round trips and their error messages, and bad input.

Shapes: B batch, S seq, T tokens, D hidden, E experts, K picks, F expert width.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from conftest import assert_close, moe_config, randomize_, reference_file
from dsmoe.config import ModelConfig
from dsmoe.moe.layer import MoELayer


def _v3_config(**overrides) -> ModelConfig:
    kw = dict(n_routed_experts=16, num_experts_per_tok=2, scoring_func="sigmoid",
              topk_method="noaux_tc", n_group=4, topk_group=2, norm_topk_prob=True,
              routed_scaling_factor=2.5, bias_update_speed=0.002)
    return moe_config(**{**kw, **overrides})


# --- V3 aux-loss-free bias balancing -----------------------------------------------------
def _skewed_stream(layer: MoELayer, steps: int, tokens: int, seed: int):
    """Batches of random tokens sharing a direction ``u`` that experts 0..2 are tuned to."""
    D = layer.config.hidden_size
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(D, generator=gen)
    u = u / u.norm()
    with torch.no_grad():
        layer.gate.weight[:3] += 1.5 * u
    for _ in range(steps):
        yield torch.randn(tokens, D, generator=gen) + 2.0 * u


def _imbalance(counts: torch.Tensor) -> float:
    counts = counts.float()
    return (counts.max() / counts.mean()).item()


def test_v3_bias_update_balances_a_skewed_router() -> None:
    """Load is measured over a sliding window of 40 batches (40 x 128 tokens x K=2 / 16
    experts = 640 assignments per expert when balanced, so sampling noise is ~4%)."""
    layer = MoELayer(_v3_config(bias_update_speed=0.004)).train()
    window: list[torch.Tensor] = []
    history: list[float] = []
    with torch.no_grad():
        for x in _skewed_stream(layer, steps=250, tokens=128, seed=0):
            counts = layer(x).expert_counts
            layer.update_bias()  # "after the optimizer step"
            window = (window + [counts])[-40:]
            history.append(_imbalance(torch.stack(window).sum(0)))
    assert history[0] > 2.5, f"setup: the router must start skewed, got {history[0]:.2f}"
    settled = next((i for i, r in enumerate(history) if i >= 40 and r < 1.2), None)
    assert settled is not None, f"max/mean load stayed >= 1.2: last {history[-1]:.2f}"
    recent = history[-40:]
    assert sum(recent) / len(recent) < 1.15, "balance must hold once reached"
    assert history[-1] < 1.2, f"final max/mean load {history[-1]:.2f}"
    bias = layer.gate.e_score_correction_bias
    assert bias[:3].max() < bias[3:].min(), "the favoured experts must end with lower bias"


def test_bias_steers_selection_not_gate_weights() -> None:
    layer = randomize_(MoELayer(_v3_config()), std=0.3)
    x = torch.randn(40, 32)
    with torch.no_grad():
        layer.gate.e_score_correction_bias.copy_(torch.linspace(-0.3, 0.3, 16))
        out = layer(x)
    scores = (x @ layer.gate.weight.T).sigmoid()  # un-biased affinities [T, E]
    chosen = scores.gather(1, out.topk_idx)
    expected = 2.5 * chosen / chosen.sum(-1, keepdim=True)
    assert_close(out.topk_weight, expected, atol=1e-6, rtol=1e-6,
                 what="weights from the un-biased scores of the selected experts")
    unbiased = MoELayer(_v3_config())
    unbiased.load_state_dict({**layer.state_dict(),
                              "gate.e_score_correction_bias": torch.zeros(16)})
    with torch.no_grad():
        plain = unbiased(x)
    assert not torch.equal(plain.topk_idx.sort(-1).values, out.topk_idx.sort(-1).values), \
        "this bias must change some selections"


def test_load_counts_accumulate_in_training_and_reset_on_update() -> None:
    layer = MoELayer(_v3_config()).train()
    total = torch.zeros(16, dtype=torch.long)
    with torch.no_grad():
        for _ in range(3):
            total += layer(torch.randn(2, 8, 32)).expert_counts
    assert torch.equal(layer.load_counts.long(), total)
    assert int(total.sum()) == 3 * 16 * 2
    error = layer.update_bias()
    assert_close(error, total.float().mean() - total.float(), atol=0, rtol=0, what="error")
    assert layer.load_counts.sum() == 0


def test_eval_does_not_touch_load_counts_or_bias() -> None:
    layer = MoELayer(_v3_config()).eval()
    bias = layer.gate.e_score_correction_bias.clone()
    with torch.no_grad():
        layer(torch.randn(4, 8, 32))
    assert layer.load_counts.sum() == 0
    assert torch.equal(layer.gate.e_score_correction_bias, bias)


def test_update_bias_with_external_load_uses_it() -> None:
    layer = MoELayer(_v3_config(bias_update_speed=0.01))
    load = torch.arange(16, dtype=torch.float32)  # e.g. all-reduced over ranks
    layer.update_bias(load)
    expected = 0.01 * torch.sign(load.mean() - load)
    assert_close(layer.gate.e_score_correction_bias, expected, atol=0, rtol=0, what="bias")


def test_bias_and_load_counts_stay_fp32_exact_under_bf16() -> None:
    """Balancing state must not round: a bf16 counter cannot count past 256 exactly."""
    layer = MoELayer(_v3_config(n_routed_experts=4, num_experts_per_tok=2, n_group=2,
                                topk_group=1))
    with torch.no_grad():
        # none of these is a bf16 value, so a cast to bf16 would show
        layer.gate.e_score_correction_bias.copy_(torch.tensor([1e-3, 2e-4, -3e-3, 1e-4]))
    bias = layer.gate.e_score_correction_bias.clone()
    layer.to(torch.bfloat16).train()
    assert layer.gate.weight.dtype == torch.bfloat16
    assert layer.gate.e_score_correction_bias.dtype == torch.float32
    assert torch.equal(layer.gate.e_score_correction_bias, bias)
    total = torch.zeros(4, dtype=torch.long)
    with torch.no_grad():
        for step in range(16):
            total += layer(torch.randn(64, 32, dtype=torch.bfloat16)).expert_counts
            assert torch.equal(layer.load_counts.double(), total.double()), \
                f"step {step}: counts rounded: {layer.load_counts.tolist()} vs {total.tolist()}"
    assert int(total.max()) > 300, "setup: counts beyond bf16's exact integers"
    error = layer.update_bias()
    assert error.dtype == torch.float32


def test_bias_round_trips_through_hf_state_dict() -> None:
    layer = MoELayer(_v3_config())
    with torch.no_grad():
        layer.gate.e_score_correction_bias.copy_(torch.randn(16) * 0.01)
    sd = layer.hf_state_dict()
    assert "gate.e_score_correction_bias" in sd
    assert sd["gate.e_score_correction_bias"].dtype == torch.float32
    other = MoELayer(_v3_config())
    other.load_hf_state_dict(sd)
    assert torch.equal(other.gate.e_score_correction_bias, layer.gate.e_score_correction_bias)
    assert "load_counts" not in layer.state_dict(), "per-step counters are not checkpointed"


def test_loading_a_bf16_checkpoint_keeps_the_bias_fp32() -> None:
    source = MoELayer(_v3_config())
    with torch.no_grad():
        source.gate.e_score_correction_bias.copy_(torch.linspace(-0.5, 0.5, 16))
    sd = {k: v.bfloat16() for k, v in source.hf_state_dict().items()}
    for assign in (False, True):
        layer = MoELayer(_v3_config())
        layer.load_hf_state_dict(sd, assign=assign)
        bias = layer.gate.e_score_correction_bias
        assert bias.dtype == torch.float32, f"assign={assign}"
        assert torch.equal(bias, sd["gate.e_score_correction_bias"].float())


# --- HF state dict -----------------------------------------------------------------------
def _expected_hf_keys(E: int, shared: bool, bias: bool) -> set[str]:
    names = {"gate.weight"} | {f"experts.{e}.{p}_proj.weight" for e in range(E)
                               for p in ("gate", "up", "down")}
    if shared:
        names |= {f"shared_experts.{p}_proj.weight" for p in ("gate", "up", "down")}
    if bias:
        names.add("gate.e_score_correction_bias")
    return names


@pytest.mark.parametrize("v3,n_shared", [(False, 1), (False, 0), (True, 2)])
def test_hf_state_dict_names_shapes_and_bit_exact_round_trip(v3: bool, n_shared: int) -> None:
    cfg = (_v3_config if v3 else moe_config)(n_shared_experts=n_shared)
    E, D, F = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    layer = randomize_(MoELayer(cfg), std=0.3, seed=2)
    sd = layer.hf_state_dict()
    assert set(sd) == _expected_hf_keys(E, n_shared > 0, v3)
    assert sd["gate.weight"].shape == (E, D)
    for e in range(E):
        assert sd[f"experts.{e}.gate_proj.weight"].shape == (F, D)
        assert sd[f"experts.{e}.up_proj.weight"].shape == (F, D)
        assert sd[f"experts.{e}.down_proj.weight"].shape == (D, F)
        assert sd[f"experts.{e}.gate_proj.weight"].is_contiguous()
    if n_shared:
        assert sd["shared_experts.gate_proj.weight"].shape == (F * n_shared, D)
    assert not torch.equal(sd["experts.0.gate_proj.weight"], sd["experts.0.up_proj.weight"])

    other = MoELayer(cfg)
    other.load_hf_state_dict(sd)
    for name, tensor in layer.state_dict().items():
        assert torch.equal(other.state_dict()[name], tensor), name
    again = other.hf_state_dict()
    assert all(torch.equal(again[k], sd[k]) for k in sd)
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        assert torch.equal(other(x).hidden_states, layer(x).hidden_states)


def test_hf_state_dict_is_a_copy() -> None:
    layer = MoELayer(moe_config())
    sd = layer.hf_state_dict()
    before = layer.hf_state_dict()["experts.1.up_proj.weight"].clone()
    sd["experts.1.up_proj.weight"].add_(1.0)
    assert torch.equal(layer.hf_state_dict()["experts.1.up_proj.weight"], before)


def test_hf_names_and_shapes_match_the_real_16b_checkpoint() -> None:
    real = json.loads(reference_file("deepseek-moe-16b-base", "tensors.json").read_text())
    prefix = "model.layers.1.mlp."
    expected = {k[len(prefix):]: tuple(v) for k, v in real.items() if k.startswith(prefix)}
    with torch.device("meta"):
        layer = MoELayer(ModelConfig.preset("deepseek-moe-16b"))
    got = {k: tuple(v.shape) for k, v in layer.hf_state_dict().items()}
    assert got == expected


def _sd_and_layer(v3: bool = False) -> tuple[MoELayer, dict[str, torch.Tensor]]:
    cfg = _v3_config() if v3 else moe_config()
    return MoELayer(cfg), randomize_(MoELayer(cfg), seed=5).hf_state_dict()


@pytest.mark.parametrize("key", ["experts.3.up_proj.weight", "gate.weight",
                                 "shared_experts.down_proj.weight", "experts.0.down_proj.weight"])
def test_missing_tensor_is_named(key: str) -> None:
    layer, sd = _sd_and_layer()
    del sd[key]
    with pytest.raises(ValueError, match=re.escape(key)):
        layer.load_hf_state_dict(sd)


def test_missing_v3_bias_is_named() -> None:
    layer, sd = _sd_and_layer(v3=True)
    del sd["gate.e_score_correction_bias"]
    with pytest.raises(ValueError, match="gate.e_score_correction_bias"):
        layer.load_hf_state_dict(sd)


@pytest.mark.parametrize("key", ["gate.extra_weight", "experts.8.gate_proj.weight",
                                 "shared_experts.bias"])
def test_unexpected_tensor_is_named(key: str) -> None:
    layer, sd = _sd_and_layer()
    sd[key] = torch.zeros(16, 32)
    with pytest.raises(ValueError, match=re.escape(key)):
        layer.load_hf_state_dict(sd)


@pytest.mark.parametrize("key,shape", [
    ("gate.weight", (8, 31)),
    ("experts.2.gate_proj.weight", (17, 32)),  # one expert wrong in its first dim
    ("experts.5.up_proj.weight", (16, 33)),  # one expert wrong in its second dim
    ("experts.7.down_proj.weight", (16, 32)),  # transposed
    ("shared_experts.up_proj.weight", (32, 16)),
])
def test_misshapen_tensor_is_named(key: str, shape: tuple[int, ...]) -> None:
    layer, sd = _sd_and_layer()
    sd[key] = torch.zeros(shape)
    with pytest.raises(ValueError, match=re.escape(key)) as info:
        layer.load_hf_state_dict(sd)
    assert "shape" in str(info.value)


def test_every_expert_misshapen_names_hf_keys() -> None:
    layer, sd = _sd_and_layer()
    for e in range(8):
        sd[f"experts.{e}.down_proj.weight"] = torch.zeros(32, 15)
    with pytest.raises(ValueError, match=r"experts\.\d\.down_proj\.weight.*shape|shape.*"
                                         r"experts\.\d\.down_proj\.weight"):
        layer.load_hf_state_dict(sd)


def test_failed_load_leaves_the_layer_unchanged() -> None:
    layer, sd = _sd_and_layer()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    del sd["experts.6.gate_proj.weight"]
    with pytest.raises(ValueError):
        layer.load_hf_state_dict(sd)
    assert all(torch.equal(layer.state_dict()[k], v) for k, v in before.items())


# --- bad input -----------------------------------------------------------------------------
def test_wrong_hidden_size_is_rejected() -> None:
    layer = MoELayer(moe_config())
    with pytest.raises(ValueError, match=r"32.*shape \(2, 4, 31\)"):
        layer(torch.randn(2, 4, 31))
    with pytest.raises(ValueError, match="shape"):
        layer(torch.randn(32))
    with pytest.raises(ValueError, match="shape"):
        layer(torch.randn(1, 2, 3, 32))


def test_integer_or_bool_input_is_rejected() -> None:
    layer = MoELayer(moe_config())
    for dtype in (torch.long, torch.int32, torch.bool):
        with pytest.raises(ValueError, match=f"floating-point.*{str(dtype).split('.')[-1]}"):
            layer(torch.ones(2, 3, 32, dtype=dtype))
    with pytest.raises(TypeError, match="tensor"):
        layer([[0.0] * 32])


def test_nan_is_caught_only_when_asked() -> None:
    layer = MoELayer(moe_config())
    x = torch.randn(2, 3, 32)
    x[1, 2, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        layer(x, check_finite=True)
    x[1, 2, 5] = float("inf")
    with pytest.raises(ValueError, match="inf"):
        layer(x, check_finite=True)
    out = layer(x)  # unchecked: no error, and the bad token does not poison the others
    assert torch.isfinite(out.hidden_states[0]).all()


def test_dense_config_is_rejected() -> None:
    with pytest.raises(ValueError, match="n_routed_experts"):
        MoELayer(moe_config(n_routed_experts=None, num_experts_per_tok=None))


def test_empty_batch() -> None:
    layer = MoELayer(moe_config(drop_tokens=True, aux_loss_alpha=0.01))
    out = layer(torch.randn(0, 32))
    assert out.hidden_states.shape == (0, 32)
    assert out.expert_counts.sum() == 0
