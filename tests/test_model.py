"""Behaviour of the Transformer: structure, initialisation, outputs, KV cache, padding.

Parity with transformers' reference models is in test_model_parity.py.
Tolerances: fp32 comparisons of the same math run in a different order (full sequence vs
cached steps, padded vs unpadded) use atol 1e-5, rtol 1e-4.
"""

from __future__ import annotations

import pytest
import torch

from dsmoe import ModelConfig
from dsmoe.mlp import SwiGLUMLP
from dsmoe.model import KVCache, ModelOutput, RMSNorm, Transformer
from dsmoe.model.rope import RotaryEmbedding, apply_rotary, default_inv_freq
from dsmoe.moe.layer import MoELayer

ATOL, RTOL = 1e-5, 1e-4

TINY = ModelConfig.preset("tiny")
SMALL = TINY.replace(vocab_size=256, hidden_size=64, intermediate_size=128,
                     moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=2, n_routed_experts=8, num_experts_per_tok=2,
                     initializer_range=0.1)
V3 = SMALL.replace(scoring_func="sigmoid", topk_method="noaux_tc", n_group=2, topk_group=1,
                   norm_topk_prob=True, bias_update_speed=0.01)


def _model(cfg: ModelConfig = SMALL, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg).eval()


def _ids(cfg: ModelConfig, *shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def _close(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(
        got, expected, atol=ATOL, rtol=RTOL,
        msg=lambda m: f"{what}: {m}\nmax diff {(got - expected).abs().max():.3g}")


# --- structure -----------------------------------------------------------------------------
def test_layers_follow_config_dense_and_moe_pattern() -> None:
    cfg = SMALL.replace(num_hidden_layers=6, first_k_dense_replace=2, moe_layer_freq=2)
    model = Transformer(cfg)
    kinds = [type(block.mlp) for block in model.layers]
    assert kinds == [SwiGLUMLP, SwiGLUMLP, MoELayer, SwiGLUMLP, MoELayer, SwiGLUMLP]
    assert model.moe_layers() == [model.layers[2].mlp, model.layers[4].mlp]
    assert model.layers[0].mlp.gate_proj.weight.shape == (cfg.intermediate_size, cfg.hidden_size)
    dense = Transformer(SMALL.replace(n_routed_experts=None))
    assert dense.moe_layers() == []


def test_attention_projection_shapes_follow_gqa_and_bias() -> None:
    cfg = SMALL.replace(num_attention_heads=8, num_key_value_heads=2, attention_bias=True)
    attn = Transformer(cfg).layers[0].self_attn
    d = cfg.hidden_size // 8
    assert attn.q_proj.weight.shape == (8 * d, cfg.hidden_size)
    assert attn.k_proj.weight.shape == attn.v_proj.weight.shape == (2 * d, cfg.hidden_size)
    assert all(p.bias is not None for p in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj))


def test_tied_embeddings_share_one_tensor_and_count_once() -> None:
    untied, tied = Transformer(SMALL), Transformer(SMALL.replace(tie_word_embeddings=True))
    assert tied.lm_head.weight is tied.embed_tokens.weight
    assert untied.lm_head.weight is not untied.embed_tokens.weight
    embedding = SMALL.vocab_size * SMALL.hidden_size
    assert untied.num_parameters() - tied.num_parameters() == embedding


def test_num_parameters_active_excludes_unused_routed_experts() -> None:
    model = Transformer(SMALL)
    total = sum(p.numel() for p in model.parameters())
    per_expert = 3 * SMALL.hidden_size * SMALL.moe_intermediate_size
    unused = (SMALL.n_routed_experts - SMALL.num_experts_per_tok) * per_expert
    assert model.num_parameters() == total
    assert model.num_parameters(active=True) == total - len(model.moe_layers()) * unused


# --- initialisation ------------------------------------------------------------------------
def test_meta_build_then_init_weights_matches_direct_build() -> None:
    cfg = SMALL.replace(tie_word_embeddings=True)
    with torch.device("meta"):
        meta = Transformer(cfg)
    assert all(p.is_meta for p in meta.parameters())
    meta.to_empty(device="cpu")
    torch.manual_seed(5)
    meta.init_weights()
    direct = Transformer(cfg)
    torch.manual_seed(5)
    direct.init_weights()
    assert meta.lm_head.weight is meta.embed_tokens.weight, "init_weights re-ties"
    for (name, a), (_, b) in zip(meta.state_dict().items(), direct.state_dict().items()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=f"{name} differs")
    torch.testing.assert_close(meta.rotary.inv_freq, default_inv_freq(cfg.head_dim, cfg.rope_theta))
    ids = _ids(cfg, 1, 6)
    torch.testing.assert_close(meta.eval()(ids).logits, direct.eval()(ids).logits)


def test_init_weights_statistics() -> None:
    model = Transformer(SMALL.replace(vocab_size=4096, attention_bias=True))
    std = SMALL.initializer_range
    for weight in (model.embed_tokens.weight, model.layers[0].self_attn.q_proj.weight,
                   model.moe_layers()[0].experts.gate_up_proj, model.moe_layers()[0].gate.weight):
        assert abs(weight.std().item() - std) < 0.1 * std
    assert torch.equal(model.norm.weight, torch.ones_like(model.norm.weight))
    assert torch.count_nonzero(model.layers[0].self_attn.q_proj.bias) == 0


def test_inv_freq_stays_fp32_after_casting_the_model() -> None:
    model = Transformer(SMALL).to(torch.bfloat16)
    assert model.rotary.inv_freq.dtype == torch.float32
    assert model.embed_tokens.weight.dtype == torch.bfloat16


# --- forward outputs -----------------------------------------------------------------------
def test_forward_outputs_in_eval() -> None:
    model = _model()
    out = model(_ids(SMALL, 2, 7), return_routing=True)
    assert isinstance(out, ModelOutput)
    assert out.logits.shape == (2, 7, SMALL.vocab_size)
    assert out.aux_loss.dtype == torch.float32 and out.aux_loss.dim() == 0
    assert out.aux_loss.item() == 0.0 and out.losses == {}, "no balance losses in eval"
    assert len(out.routing) == len(model.moe_layers())
    assert out.routing[0].topk_idx.shape == (14, SMALL.num_experts_per_tok)
    assert model(_ids(SMALL, 2, 7)).routing is None


def test_training_losses_are_sums_over_moe_layers_and_differentiable() -> None:
    cfg = SMALL.replace(z_loss_alpha=0.01)
    model = _model(cfg).train()
    out = model(_ids(cfg, 2, 9), return_routing=True)
    expected = torch.stack([r.aux_loss for r in out.routing]).sum()
    torch.testing.assert_close(out.aux_loss, expected)
    for name in ("expert", "z"):
        torch.testing.assert_close(out.losses[name],
                                   torch.stack([r.losses[name] for r in out.routing]).sum())
    assert out.aux_loss.item() > 0
    (out.logits.square().mean() + out.aux_loss).backward()
    assert model.moe_layers()[0].gate.weight.grad.abs().sum() > 0


def test_logits_to_keep_returns_the_last_positions() -> None:
    model, ids = _model(), _ids(SMALL, 2, 6)
    _close(model(ids, logits_to_keep=1).logits, model(ids).logits[:, -1:], "last logits")


def test_position_ids_are_used_and_only_relative_positions_matter() -> None:
    model, ids = _model(), _ids(SMALL, 2, 6)
    expected = model(ids).logits
    positions = torch.arange(6).expand(2, 6)
    _close(model(ids, position_ids=positions).logits, expected, "explicit default positions")
    _close(model(ids, position_ids=positions + 3).logits, expected, "shifted (RoPE is relative)")
    spread = model(ids, position_ids=positions * 2).logits
    assert (spread - expected).abs().max() > 1e-3, "position_ids were ignored"


def test_bf16_forward_tracks_fp32() -> None:
    model, ids = _model(), _ids(SMALL, 2, 8)
    expected = model(ids).logits
    got = model.to(torch.bfloat16)(ids).logits
    assert got.dtype == torch.bfloat16
    # bf16 keeps ~3 significant digits per op; over 3 layers expect ~1% relative error
    relative = ((got.float() - expected).norm() / expected.norm()).item()
    assert relative < 2e-2, f"bf16 logits deviate by {relative:.3%} (norm-relative)"


# --- KV cache ------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [SMALL, SMALL.replace(num_key_value_heads=4, n_routed_experts=None)],
                         ids=["moe_gqa", "dense_mha"])
def test_cached_token_by_token_equals_one_call(cfg: ModelConfig) -> None:
    model, ids = _model(cfg), _ids(cfg, 2, 10)
    expected = model(ids).logits
    cache = model.new_cache(2, 16)
    assert isinstance(cache, KVCache)
    assert cache.keys.shape == (cfg.num_hidden_layers, 2, cfg.num_key_value_heads, 16, cfg.head_dim)
    steps = [model(ids[:, t:t + 1], cache=cache).logits for t in range(10)]
    assert cache.seq_len == 10
    _close(torch.cat(steps, dim=1), expected, "token by token")
    cache.reset()
    chunks = [model(ids[:, :4], cache=cache).logits, model(ids[:, 4:7], cache=cache).logits,
              model(ids[:, 7:], cache=cache).logits]
    _close(torch.cat(chunks, dim=1), expected, "prefill + chunks")


def test_left_padding_with_mask_matches_unpadded_runs() -> None:
    model = _model()
    prompts = [_ids(SMALL, 1, n, seed=n)[0] for n in (5, 9, 7)]
    width = max(len(p) for p in prompts)
    batch = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        batch[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    padded = model(batch, attention_mask=mask).logits
    assert torch.isfinite(padded).all(), "fully padded query rows must not produce NaN"
    for row, prompt in enumerate(prompts):
        alone = model(prompt[None]).logits[0]
        _close(padded[row, width - len(prompt):], alone, f"row {row} (full forward)")

    # prefill the padded batch into a cache, then decode two tokens per row
    new = _ids(SMALL, 3, 2, seed=99)
    cache = model.new_cache(3, width + 2)
    model(batch, attention_mask=mask, cache=cache)
    for t in range(2):
        mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], dim=1)
        step = model(new[:, t:t + 1], attention_mask=mask, cache=cache).logits
        for row, prompt in enumerate(prompts):
            alone = model(torch.cat([prompt, new[row, :t + 1]])[None]).logits[0, -1]
            _close(step[row, -1], alone, f"row {row}, decode step {t}")


def test_cache_overflow_and_mismatch_raise() -> None:
    model = _model()
    cache = model.new_cache(2, 4)
    model(_ids(SMALL, 2, 3), cache=cache)
    with pytest.raises(ValueError, match="KV cache is full.*max_seq_len=4"):
        model(_ids(SMALL, 2, 2), cache=cache)
    assert cache.seq_len == 3, "a refused call leaves the cache as it was"
    with pytest.raises(ValueError, match="cache was made for batch size 2"):
        model(_ids(SMALL, 3, 1), cache=cache)
    with pytest.raises(ValueError, match=r"attention_mask must have shape .*\[2, 4\]"):
        model(_ids(SMALL, 2, 1), cache=cache, attention_mask=torch.ones(2, 1))


@pytest.mark.parametrize("bad, pattern", [
    (torch.zeros(2, 3), "integer tensor"),
    (torch.zeros(3, dtype=torch.long), "integer tensor"),
    (torch.zeros(1, 0, dtype=torch.long), "empty"),
    (torch.tensor([[1, 9999]]), "outside .*vocab_size=256"),
])
def test_bad_input_ids_raise(bad: torch.Tensor, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        _model()(bad)


def test_bad_position_ids_raise() -> None:
    with pytest.raises(ValueError, match="position_ids must have shape"):
        _model()(_ids(SMALL, 2, 3), position_ids=torch.arange(4)[None])


# --- router biases ---------------------------------------------------------------------------
def test_update_router_biases_moves_v3_biases_and_is_a_noop_for_v1() -> None:
    v3 = _model(V3).train()
    v3(_ids(V3, 2, 16))
    loads = [layer.load_counts.float() for layer in v3.moe_layers()]
    assert all(load.sum() > 0 for load in loads)
    v3.update_router_biases()
    for layer, load in zip(v3.moe_layers(), loads):
        expected = V3.bias_update_speed * torch.sign(load.mean() - load)
        torch.testing.assert_close(layer.gate.e_score_correction_bias, expected)
        assert layer.load_counts.sum() == 0
    v1 = _model().train()
    v1(_ids(SMALL, 2, 16))
    before = {k: v.clone() for k, v in v1.state_dict().items()}
    v1.update_router_biases()
    for k, v in v1.state_dict().items():
        assert torch.equal(v, before[k]), k


# --- building blocks -----------------------------------------------------------------------
def test_rmsnorm_normalises_to_unit_rms_times_weight() -> None:
    norm = RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 16))
    x = torch.randn(3, 16) * 7
    y = norm(x)
    torch.testing.assert_close(y / norm.weight, x / x.pow(2).mean(-1, keepdim=True).sqrt(),
                               atol=1e-5, rtol=1e-5)


def test_rope_scores_depend_only_on_relative_position() -> None:
    """<R(m) q, R(n) k> is a function of m - n (and rotations keep norms)."""
    rope = RotaryEmbedding(16, 10000.0, 64)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(m: int, n: int) -> torch.Tensor:
        cos_m, sin_m = rope(torch.tensor([[m]]), 64, torch.float32)
        cos_n, sin_n = rope(torch.tensor([[n]]), 64, torch.float32)
        return (apply_rotary(q, cos_m, sin_m) * apply_rotary(k, cos_n, sin_n)).sum()

    torch.testing.assert_close(score(7, 3), score(24, 20), atol=1e-5, rtol=1e-5)
    cos, sin = rope(torch.tensor([[11]]), 64, torch.float32)
    torch.testing.assert_close(apply_rotary(q, cos, sin).norm(), q.norm())


def test_rope_linear_scaling_equals_dividing_positions() -> None:
    plain = RotaryEmbedding(16, 10000.0, 64)
    linear = RotaryEmbedding(16, 10000.0, 64, {"type": "linear", "factor": 4.0})
    cos_l, sin_l = linear(torch.tensor([[8, 20]]), 64, torch.float32)
    cos_p, sin_p = plain(torch.tensor([[2, 5]]), 64, torch.float32)
    torch.testing.assert_close(cos_l, cos_p)
    torch.testing.assert_close(sin_l, sin_p)


def test_rope_dynamic_ntk_rescales_the_base_past_max_positions() -> None:
    dim, theta, max_pos, factor, length = 16, 10000.0, 32, 2.0, 80
    rope = RotaryEmbedding(dim, theta, max_pos, {"type": "dynamic", "factor": factor})
    positions = torch.arange(length)[None]
    base = theta * (factor * length / max_pos - (factor - 1)) ** (dim / (dim - 2))
    expected = positions[..., None].float() * default_inv_freq(dim, base)
    cos, _ = rope(positions, length, torch.float32)
    torch.testing.assert_close(cos[..., : dim // 2], expected.cos())
    cos_short, _ = rope(positions[:, :max_pos], max_pos, torch.float32)
    plain, _ = RotaryEmbedding(dim, theta, max_pos)(positions[:, :max_pos], max_pos, torch.float32)
    torch.testing.assert_close(cos_short, plain, atol=0, rtol=0)
