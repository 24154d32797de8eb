"""Balance losses of ``MoELayer`` against formulas written out independently here.

- expert loss: DeepSeek V1's ``MoEGate`` (token level and ``seq_aux``), with softmax scores;
  V3's sequence-wise loss uses sigmoid scores normalised per token.
- device and communication losses: the DeepSeek-V2 paper's formulas (f'_d, P'_d, f''_d).
- router z-loss: mean over tokens of logsumexp(logits)^2.
Each reference is written with explicit loops / one-hots, recomputes the scores from the
layer's own gate weight, and is differentiated by autograd, so both the values and the
gradients that reach ``gate.weight`` are checked (fp32, atol=1e-6, rtol=1e-5).

Shapes: B batch, S seq, T = B*S tokens, D hidden, E experts, K picks, Dv devices.
"""

from __future__ import annotations

import pytest
import torch

from conftest import assert_close, moe_config, randomize_
from dsmoe.moe import balance
from dsmoe.moe.layer import MoELayer

TOL = dict(atol=1e-6, rtol=1e-5)
B, S = 3, 10


def _scores(x: torch.Tensor, weight: torch.Tensor, scoring: str) -> torch.Tensor:
    logits = x.reshape(-1, x.shape[-1]) @ weight.T  # [T, E]
    return logits.softmax(-1) if scoring == "softmax" else logits.sigmoid()


def _counts_per_seq(topk_idx: torch.Tensor, E: int) -> torch.Tensor:
    """[B, S, K] -> [B, E] number of (token, slot) picks of each expert in each sequence."""
    return torch.nn.functional.one_hot(topk_idx, E).sum(dim=(1, 2)).float()


def ref_expert_loss(scores: torch.Tensor, topk_idx: torch.Tensor, E: int, K: int,
                    seq_aux: bool) -> torch.Tensor:
    """DeepSeek V1 MoEGate: token level sum_i (E count_i / (T K)) mean_t s_ti, or per
    sequence count_bi / (S K / E) times mean_s s_bsi, summed over i, mean over b."""
    Bn, Sn = topk_idx.shape[:2]
    scores = scores.view(Bn, Sn, E)
    counts = _counts_per_seq(topk_idx, E)  # [B, E]
    if seq_aux:
        per_seq = [sum((counts[b, i] / (Sn * K / E)) * scores[b, :, i].mean() for i in range(E))
                   for b in range(Bn)]
        return torch.stack(per_seq).mean()
    T = Bn * Sn
    total = counts.sum(0)  # [E]
    return sum(E * total[i] / (T * K) * scores.reshape(T, E)[:, i].mean() for i in range(E))


def ref_device_loss(scores: torch.Tensor, topk_idx: torch.Tensor, E: int, K: int,
                    n_dev: int) -> torch.Tensor:
    """V2 paper: sum_d f'_d P'_d, f'_d = mean of f_i over d's experts, P'_d = sum of P_i."""
    T = scores.shape[0]
    total = _counts_per_seq(topk_idx.view(1, T, K), E)[0]
    f = E * total / (K * T)
    P = scores.mean(0)
    per = E // n_dev
    return sum(f[d * per:(d + 1) * per].mean() * P[d * per:(d + 1) * per].sum()
               for d in range(n_dev))


def ref_comm_loss(scores: torch.Tensor, topk_idx: torch.Tensor, E: int, n_dev: int,
                  M: int) -> torch.Tensor:
    """V2 paper: sum_d f''_d P''_d, f''_d = Dv/(M T) * #tokens with an expert on d."""
    T = scores.shape[0]
    per = E // n_dev
    idx = topk_idx.reshape(T, -1)
    P = scores.mean(0)
    loss = scores.new_zeros(())
    for d in range(n_dev):
        on_d = ((idx >= d * per) & (idx < (d + 1) * per)).any(dim=1)  # [T]
        f2 = n_dev / (M * T) * on_d.sum()
        loss = loss + f2 * P[d * per:(d + 1) * per].sum()
    return loss


def _layer(**overrides) -> tuple[MoELayer, torch.Tensor]:
    cfg = moe_config(n_routed_experts=16, num_experts_per_tok=3, **overrides)
    layer = randomize_(MoELayer(cfg), std=0.3, seed=1).train()
    x = torch.randn(B, S, cfg.hidden_size)
    return layer, x


def _gate_grad(layer: MoELayer, loss: torch.Tensor) -> torch.Tensor:
    layer.zero_grad()
    loss.backward(retain_graph=True)
    return layer.gate.weight.grad.clone()


def _check(layer: MoELayer, name: str, out, ref_fn, what: str) -> None:
    """Value and gate-weight gradient of ``out.losses[name]`` against ``ref_fn(weight)``."""
    weight = layer.gate.weight.detach().clone().requires_grad_(True)
    expected = ref_fn(weight)
    assert_close(out.losses[name], expected, **TOL, what=f"{what}: value")
    expected.backward()
    grad = _gate_grad(layer, out.losses[name])
    assert grad.abs().sum() > 0, f"{what}: no gradient reaches gate.weight"
    assert_close(grad, weight.grad, **TOL, what=f"{what}: gradient wrt gate.weight")


@pytest.mark.parametrize("seq_aux", [False, True])
def test_expert_loss_matches_deepseek_v1_moegate(seq_aux: bool) -> None:
    alpha = 0.01
    layer, x = _layer(aux_loss_alpha=alpha, seq_aux=seq_aux)
    out = layer(x)
    idx = out.topk_idx.view(B, S, 3)
    # selection is plain top-k of the softmax scores (checked independently, as a set)
    scores = _scores(x, layer.gate.weight.detach(), "softmax")
    assert torch.equal(idx.reshape(-1, 3).sort(-1).values,
                       scores.topk(3, dim=-1).indices.sort(-1).values)
    _check(layer, "expert", out,
           lambda w: alpha * ref_expert_loss(_scores(x, w, "softmax"), idx, 16, 3, seq_aux),
           f"expert loss seq_aux={seq_aux}")
    assert_close(out.aux_loss, out.losses["expert"], atol=0, rtol=0, what="aux_loss = sum")


def test_seq_aux_differs_from_token_level_on_unbalanced_sequences() -> None:
    """seq_aux balances within each sequence: with sequences routed differently, the two
    levels must give different numbers (otherwise the test above could not tell them apart)."""
    probs = torch.rand(B, S, 16).softmax(-1)
    idx = torch.stack([torch.randperm(16)[:3] for _ in range(B * S)]).view(B, S, 3)
    idx[0] = torch.tensor([0, 1, 2])  # sequence 0 uses only experts 0..2
    token = balance.expert_balance_loss(probs, idx, 16, seq_level=False)
    seq = balance.expert_balance_loss(probs, idx, 16, seq_level=True)
    assert_close(token, ref_expert_loss(probs.reshape(-1, 16), idx, 16, 3, False), **TOL,
                 what="token level on hand-made routing")
    assert_close(seq, ref_expert_loss(probs.reshape(-1, 16), idx, 16, 3, True), **TOL,
                 what="sequence level on hand-made routing")
    assert abs(token.item() - seq.item()) > 1e-3


def test_perfect_balance_gives_expert_loss_one() -> None:
    """Uniform scores and every expert picked equally often: f_i = 1, P_i = 1/E, loss 1."""
    E, K, T = 8, 2, 16
    probs = torch.full((1, T, E), 1.0 / E)
    idx = torch.arange(T * K).remainder(E).view(1, T, K)
    for seq_level in (False, True):
        loss = balance.expert_balance_loss(probs, idx, E, seq_level)
        assert_close(loss, torch.tensor(1.0), atol=1e-6, rtol=0, what=f"seq={seq_level}")


def test_device_and_comm_losses_match_v2_paper() -> None:
    a2, a3, n_dev, M = 0.05, 0.02, 4, 2
    layer, x = _layer(topk_method="device_limited", n_devices=n_dev, max_devices_per_token=M,
                      device_balance_alpha=a2, comm_balance_alpha=a3)
    out = layer(x)
    assert set(out.losses) == {"device", "comm"}
    idx = out.topk_idx
    _check(layer, "device", out,
           lambda w: a2 * ref_device_loss(_scores(x, w, "softmax"), idx, 16, 3, n_dev),
           "device loss")
    _check(layer, "comm", out,
           lambda w: a3 * ref_comm_loss(_scores(x, w, "softmax"), idx, 16, n_dev, M),
           "communication loss")
    assert_close(out.aux_loss, out.losses["device"] + out.losses["comm"], atol=1e-9, rtol=0,
                 what="aux_loss is the sum of the terms")


def test_comm_loss_counts_tokens_not_slots() -> None:
    """A token with all K experts on one device sends to it once: f'' counts it once."""
    E, n_dev, M, T = 8, 4, 2, 4
    probs = torch.full((T, E), 1.0 / E)
    idx = torch.tensor([[0, 1], [0, 1], [2, 4], [6, 7]])  # devices {0}, {0}, {1, 2}, {3}
    loss = balance.comm_balance_loss(probs, idx, E, n_dev, M)
    # tokens per device: 2, 1, 1, 1; f'' = 4/(2*4) * that; P'' = 2/8 each
    expected = sum(4 / (2 * 4) * n * 0.25 for n in (2, 1, 1, 1))
    assert_close(loss, torch.tensor(expected), atol=1e-7, rtol=0, what="comm on hand routing")
    assert_close(loss, ref_comm_loss(probs, idx, E, n_dev, M), atol=1e-7, rtol=0,
                 what="comm reference on hand routing")


@pytest.mark.parametrize("seq_aux", [True, False])
def test_v3_sequence_wise_loss_uses_normalised_sigmoid_scores(seq_aux: bool) -> None:
    alpha = 1e-3
    layer, x = _layer(scoring_func="sigmoid", topk_method="noaux_tc", n_group=4, topk_group=2,
                      norm_topk_prob=True, aux_loss_alpha=alpha, seq_aux=seq_aux)
    with torch.no_grad():  # a bias that changes the selection: the loss counts picks made
        layer.gate.e_score_correction_bias.copy_(torch.linspace(-0.2, 0.2, 16))
    out = layer(x)
    idx = out.topk_idx.view(B, S, 3)

    def normalised(w: torch.Tensor) -> torch.Tensor:
        s = _scores(x, w, "sigmoid")
        return s / s.sum(dim=-1, keepdim=True)

    _check(layer, "expert", out,
           lambda w: alpha * ref_expert_loss(normalised(w), idx, 16, 3, seq_aux),
           f"V3 sequence-wise loss seq_aux={seq_aux}")
    raw = alpha * ref_expert_loss(_scores(x, layer.gate.weight.detach(), "sigmoid"), idx, 16,
                                  3, seq_aux)
    assert (out.losses["expert"] - raw).abs() > 1e-6, "raw sigmoid scores must not be used"


def test_z_loss() -> None:
    alpha = 1e-3
    layer, x = _layer(z_loss_alpha=alpha)
    out = layer(x)
    assert set(out.losses) == {"z"}

    def ref(w: torch.Tensor) -> torch.Tensor:
        logits = x.reshape(-1, x.shape[-1]) @ w.T
        lse = torch.stack([torch.log(torch.exp(row).sum()) for row in logits])
        return alpha * (lse ** 2).mean()

    _check(layer, "z", out, ref, "z-loss")


def test_all_losses_together_and_only_in_training() -> None:
    layer, x = _layer(aux_loss_alpha=0.01, seq_aux=True, n_devices=4, device_balance_alpha=0.02,
                      comm_balance_alpha=0.03, z_loss_alpha=1e-4)
    out = layer(x)
    assert set(out.losses) == {"expert", "device", "comm", "z"}
    assert_close(out.aux_loss, sum(out.losses.values()), atol=1e-9, rtol=0, what="aux sum")
    assert all(v.dtype == torch.float32 and v.dim() == 0 for v in out.losses.values())
    layer.zero_grad()
    out.aux_loss.backward()
    assert layer.gate.weight.grad.abs().sum() > 0, "losses must reach the gate"

    layer.eval()
    with torch.no_grad():
        evaluated = layer(x)
    assert evaluated.losses == {}
    assert evaluated.aux_loss.item() == 0.0
    assert_close(evaluated.hidden_states, out.hidden_states, atol=0, rtol=0,
                 what="losses do not change the outputs")


def test_losses_off_by_default_and_when_alpha_is_zero() -> None:
    layer, x = _layer(n_devices=4)  # devices, but no alphas
    out = layer(x)
    assert out.losses == {} and out.aux_loss.item() == 0.0


@pytest.mark.parametrize("shape", [(2, 0), (0, 5)])
def test_every_loss_of_an_empty_batch_is_zero(shape: tuple[int, int]) -> None:
    """No tokens (here, or on every rank: ``total`` sums zeros) is no imbalance: 0, never
    NaN (a mean over no tokens) or a ZeroDivisionError (f = count / T)."""
    B, S = shape
    E, K, n_dev = 8, 2, 4
    probs = torch.rand(B, S, E)
    idx = torch.zeros(B, S, K, dtype=torch.long)
    for total in (None, lambda counts: counts):
        losses = [balance.expert_balance_loss(probs, idx, E, seq_level=True, total=total),
                  balance.expert_balance_loss(probs, idx, E, seq_level=False, total=total),
                  balance.device_balance_loss(probs, idx, E, n_dev, total=total),
                  balance.comm_balance_loss(probs, idx, E, n_dev, 2, total=total),
                  balance.z_loss(torch.randn(B, S, E))]
        assert [float(loss) for loss in losses] == [0.0] * 5


def test_total_counts_frequencies_over_the_whole_batch() -> None:
    """Two halves of a batch, each with ``total`` summing both halves' counts: the mean of
    the halves' losses is the loss of the whole batch (P per half, f over both)."""
    gen = torch.Generator().manual_seed(3)
    E, K, n_dev = 8, 2, 4
    probs = torch.rand(2, 6, E, generator=gen).softmax(-1)
    idx = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(12)]).view(2, 6, K)
    halves = [(probs[i:i + 1], idx[i:i + 1]) for i in range(2)]
    for loss in (lambda p, i, t: balance.expert_balance_loss(p, i, E, False, t),
                 lambda p, i, t: balance.device_balance_loss(p, i, E, n_dev, t),
                 lambda p, i, t: balance.comm_balance_loss(p, i, E, n_dev, 2, t)):
        seen: list[torch.Tensor] = []  # each half's counts, as it hands them to ``total``
        for p, i in halves:
            loss(p, i, lambda c: seen.append(c.clone()) or c)
        summed = seen[0] + seen[1]  # what an all-reduce over the two halves returns
        parts = [loss(p, i, lambda c: summed.clone()) for p, i in halves]
        torch.testing.assert_close((parts[0] + parts[1]) / 2, loss(probs, idx, None),
                                   atol=1e-7, rtol=1e-6)


def test_expert_counts_with_keep_count_only_kept_tokens() -> None:
    """``keep`` (the finetuning loop's real-token mask) equals counting the kept rows alone."""
    expert_counts = balance.expert_counts
    gen = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 8, (2, 5, 3), generator=gen)  # [B, S, K]
    keep = torch.rand(2, 5, generator=gen) > 0.4  # [B, S]
    assert torch.equal(expert_counts(idx, 8, keep=keep), expert_counts(idx[keep], 8))
    assert torch.equal(expert_counts(idx, 8, keep=torch.ones(2, 5, dtype=torch.bool)),
                       expert_counts(idx, 8))
    assert int(expert_counts(idx, 8, keep=torch.zeros(2, 5, dtype=torch.bool)).sum()) == 0
