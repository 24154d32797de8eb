"""MixtureOfExperts, the papers'-notation facade: outputs = x + sum of shared experts + sum of
gate * routed experts (ReLU experts with biases), device-limited softmax routing, and the
expert/device/communication losses, all recomputed here from the module's own weights with
per-token loops (fp32, atol=rtol=1e-5).

Shapes: B batch, S seq, T tokens, D hidden (d_model), E routed experts (N_r), F d_expert.
"""

from __future__ import annotations

import pytest
import torch

from conftest import assert_close
from dsmoe.config import MoEConfig
from dsmoe.moe.facade import MixtureOfExperts
from test_balance import ref_comm_loss, ref_device_loss, ref_expert_loss

TOL = dict(atol=1e-5, rtol=1e-5)


def _randomized(moe: MixtureOfExperts, seed: int = 0) -> MixtureOfExperts:
    """Random weights *and biases* (the default init zeroes biases, which would hide them)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in moe.named_parameters():
            std = 0.5 if "gate" in name else 0.2
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return moe


def _route(scores: torch.Tensor, K: int, n_dev: int, M: int) -> list[list[int]]:
    """Per token: the M devices with the highest best-expert score, then top-K inside."""
    E = scores.shape[1]
    per = E // n_dev
    picks = []
    for s in scores.tolist():
        best = [max(s[d * per:(d + 1) * per]) for d in range(n_dev)]
        devices = sorted(range(n_dev), key=lambda d: -best[d])[:M]
        allowed = [e for d in devices for e in range(d * per, (d + 1) * per)]
        picks.append(sorted(allowed, key=lambda e: -s[e])[:K])
    return picks


def _reference(moe: MixtureOfExperts, x: torch.Tensor, K: int, n_shared: int, n_dev: int,
               M: int) -> tuple[torch.Tensor, list[list[int]], torch.Tensor]:
    layer = moe.moe
    tokens = x.reshape(-1, x.shape[-1])  # [T, D]
    scores = (tokens @ layer.gate.weight.T).softmax(-1)  # [T, E]
    picks = _route(scores, K, n_dev, M)
    ex = layer.experts
    sh = layer.shared_experts
    width = sh.w1.weight.shape[0] // n_shared
    out = tokens.clone()  # the residual
    for t, x_t in enumerate(tokens):
        for i in range(n_shared):  # N_s shared experts, each a slice of the wide MLP
            rows = slice(i * width, (i + 1) * width)
            h = torch.relu(sh.w1.weight[rows] @ x_t + sh.w1.bias[rows])
            out[t] = out[t] + sh.w2.weight[:, rows] @ h
        out[t] = out[t] + sh.w2.bias  # the shared output biases, summed into one
        for e in picks[t]:
            h = torch.relu(ex.w1[e] @ x_t + ex.b1[e])
            out[t] = out[t] + scores[t, e] * (ex.w2[e] @ h + ex.b2[e])
    return out.view_as(x), picks, scores


@pytest.mark.parametrize("K,N_s,N_r,D,M", [(2, 2, 8, 4, 3), (3, 1, 16, 4, 1), (2, 1, 8, 1, None)])
def test_outputs_and_losses_match_the_formulas(K: int, N_s: int, N_r: int, D: int,
                                               M: int | None) -> None:
    a1, a2, a3 = 0.01, 0.02, 0.03
    moe = _randomized(MixtureOfExperts(d_model=16, d_expert=12, K=K, N_s=N_s, N_r=N_r,
                                       alpha1=a1, alpha2=a2, alpha3=a3, D=D, M=M))
    x = torch.randn(2, 7, 16)
    result = moe(x)
    assert isinstance(result, tuple) and len(result) == 4
    outputs, expert_loss, device_loss, commu_loss = result
    expected, picks, scores = _reference(moe, x, K, N_s, D, M or D)
    assert outputs.shape == x.shape
    assert_close(outputs, expected, **TOL, what="outputs = x + shared + routed")
    idx = torch.tensor(picks)  # [T, K]
    assert_close(expert_loss, a1 * ref_expert_loss(scores, idx.view(1, -1, K), N_r, K, False),
                 **TOL, what="expert loss (token level)")
    if D > 1:
        assert_close(device_loss, a2 * ref_device_loss(scores, idx, N_r, K, D), **TOL,
                     what="device loss")
        assert_close(commu_loss, a3 * ref_comm_loss(scores, idx, N_r, D, M or D), **TOL,
                     what="communication loss")
    else:  # one device: nothing to balance across devices
        assert device_loss.item() == 0.0 and commu_loss.item() == 0.0


def test_m_limits_the_devices_each_token_uses() -> None:
    moe = _randomized(MixtureOfExperts(d_model=16, d_expert=8, K=4, N_s=1, N_r=16, D=4, M=2),
                      seed=3)
    x = torch.randn(64, 16)
    moe.eval()
    out = moe.moe(x)
    devices = out.topk_idx // 4  # [T, K]
    used = torch.zeros(64, 4, dtype=torch.bool).scatter_(1, devices, True).sum(-1)
    assert (used <= 2).all()
    assert (used == 2).any(), "with K=4 over 4-expert devices, some tokens use both devices"
    unlimited = MixtureOfExperts(d_model=16, d_expert=8, K=4, N_s=1, N_r=16, D=4)
    unlimited.load_state_dict(moe.state_dict())
    free = unlimited.eval().moe(x).topk_idx // 4
    assert (torch.zeros(64, 4, dtype=torch.bool).scatter_(1, free, True).sum(-1) > 2).any(), \
        "without M some tokens spread over more than 2 devices (so M=2 really limits)"


def test_losses_are_zero_in_eval_and_train_backward_reaches_the_gate() -> None:
    moe = _randomized(MixtureOfExperts(d_model=16, d_expert=8, K=2, N_s=1, N_r=8, D=2, M=1))
    x = torch.randn(3, 5, 16, requires_grad=True)
    outputs, l1, l2, l3 = moe(x)
    assert all(v.dim() == 0 and v.item() > 0 for v in (l1, l2, l3))
    (l1 + l2 + l3).backward(retain_graph=True)
    assert moe.moe.gate.weight.grad.abs().sum() > 0, "losses must reach the gate"
    moe.zero_grad()
    outputs.pow(2).sum().backward()
    assert moe.moe.gate.weight.grad.abs().sum() > 0, "outputs must reach the gate"
    assert moe.moe.experts.b2.grad.abs().sum() > 0, "expert biases are trained"
    moe.eval()
    with torch.no_grad():
        evaluated = moe(x)
    assert [v.item() for v in evaluated[1:]] == [0.0, 0.0, 0.0]
    assert_close(evaluated[0], outputs, atol=0, rtol=0, what="train and eval outputs")


def test_paper_signature_and_residual() -> None:
    moe = MixtureOfExperts(d_model=64, d_expert=32, K=2, N_s=2, N_r=8, alpha1=0.01,
                           alpha2=0.01, alpha3=0.01, D=4, M=3)
    assert moe.config.n_devices == 4 and moe.config.max_devices == 3
    assert moe.config.hidden_act == "relu" and moe.config.norm_topk_prob is False
    with torch.no_grad():  # zero experts: the block is the identity (residual only)
        for p in moe.parameters():
            p.zero_()
    x = torch.randn(2, 3, 64)
    assert torch.equal(moe(x)[0], x)


@pytest.mark.parametrize("kwargs,key", [
    (dict(K=9, N_r=8), "num_experts_per_tok"),
    (dict(N_r=8, D=3), "n_devices"),
    (dict(N_r=8, D=4, M=5), "max_devices_per_token"),
    (dict(N_r=8, D=4, M=1, K=3), "max_devices_per_token"),  # 1 device of 2 cannot hold 3
    (dict(alpha1=-1.0), "aux_loss_alpha"),
])
def test_bad_arguments_raise(kwargs: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        MixtureOfExperts(d_model=16, d_expert=8, **kwargs)


@pytest.mark.parametrize("d_model", [6, 10, 15, 1])
def test_any_width_works(d_model: int) -> None:
    """The facade is described by a MoEConfig alone: no attention heads or vocabulary to
    invent, so odd widths (which RoPE heads could not take) work too."""
    moe = MixtureOfExperts(d_model=d_model, d_expert=4, K=2, N_s=1, N_r=4)
    assert isinstance(moe.config, MoEConfig)
    out = moe(torch.randn(2, 3, d_model))[0]
    assert out.shape == (2, 3, d_model) and torch.isfinite(out).all()
