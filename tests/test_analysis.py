"""Expert analysis: the redundancy experiment really disables experts, and restores them."""

from __future__ import annotations

import json

import pytest
import torch

from dsmoe.analysis import analyze, disabled_shared_experts, disabled_top_experts, windows
from dsmoe.config import ModelConfig
from dsmoe.model import Transformer


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny").replace(vocab_size=64, hidden_size=32, num_attention_heads=2,
                                             num_key_value_heads=2, num_hidden_layers=3,
                                             moe_intermediate_size=16, intermediate_size=64)
    return Transformer(cfg).eval()


def test_disabled_top_experts_excludes_each_tokens_best_experts(model: Transformer) -> None:
    ids = torch.randint(0, 64, (2, 24))
    E = model.config.n_routed_experts
    n_off = round(0.25 * E)
    with torch.no_grad():
        before = model(ids, return_routing=True).routing
        with disabled_top_experts(model, 0.25):
            during = model(ids, return_routing=True).routing
        after = model(ids, return_routing=True).routing
    for b, d, a in zip(before, during, after):
        # (each layer's own logits: earlier layers' changes alter later layers' inputs)
        best = d.router_logits.topk(n_off, dim=-1).indices  # softmax is monotone in logits
        assert not (d.topk_idx.unsqueeze(-1) == best.unsqueeze(1)).any()
        assert torch.equal(a.topk_idx, b.topk_idx)  # restored on exit


def test_disabled_shared_experts_changes_output_and_restores(model: Transformer) -> None:
    ids = torch.randint(0, 64, (1, 16))
    with torch.no_grad():
        base = model(ids).logits
        with disabled_shared_experts(model):
            assert all(layer.shared_experts is None for layer in model.moe_layers())
            off = model(ids).logits
        again = model(ids).logits
    assert not torch.allclose(base, off)
    torch.testing.assert_close(again, base, atol=0, rtol=0)


def test_analyze_reports_consistent_numbers(model: Transformer, tmp_path) -> None:
    from dsmoe.analysis import write_outputs

    data = windows(list(torch.randint(0, 64, (600,)).tolist()), 32, 512)
    result = analyze(model, data, decode=lambda ids: f"<{ids[0]}>", fractions=(0.0, 0.25))
    K = model.config.num_experts_per_tok
    assert len(result.expert_load) == len(model.moe_layers())
    assert all(sum(load) == result.n_tokens * K for load in result.expert_load)
    assert result.redundancy["0.0000"] == pytest.approx(result.base_loss, abs=1e-6)
    assert result.shared_disabled_loss is not None
    write_outputs(result, tmp_path)
    for name in ("analysis.json", "expert_load.png", "redundancy.png", "report.md"):
        assert (tmp_path / name).exists(), name
    assert json.loads((tmp_path / "analysis.json").read_text())["n_tokens"] == result.n_tokens


def test_windows_needs_enough_tokens() -> None:
    with pytest.raises(ValueError, match="at least"):
        windows([1, 2, 3], seq_len=8, max_tokens=100)
