"""Parity of dsmoe's Transformer with transformers' reference models (fp32, CPU).

- All layers dense: dsmoe == ``LlamaForCausalLM`` (same architecture as DeepSeek V1's dense
  path) for MHA, GQA, attention biases, linear and dynamic-NTK RoPE scaling (including a
  sequence longer than max_position_embeddings) and tied embeddings.
- MoE layers: dsmoe == a Llama whose MLPs at ``config.is_moe_layer(i)`` are transformers'
  ``DeepseekV2Moe`` with V1 routing (softmax scores, greedy top-k, scaling factor 1).
  V2's router ignores ``norm_topk_prob``; the True case wraps it to renormalise.

Weights: a random dsmoe model is written with ``save_pretrained``; dsmoe reads the directory
with ``from_pretrained`` and the reference gets the same file tensors through
``checkpoint.keys.moe_from_hf`` (the production expert-stacking map).
Tolerance: atol 1e-5, rtol 1e-4 on logits (different attention kernels and summation
orders). Routers get large weights so that no token sits near a top-k tie, where a 1e-7
difference could legitimately pick another expert.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from dsmoe import ModelConfig
from dsmoe.checkpoint import keys
from dsmoe.checkpoint.hf import weight_files
from dsmoe.model import Transformer

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV2Config, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe  # noqa: E402

ATOL, RTOL = 1e-5, 1e-4

DENSE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=4, n_routed_experts=None,
             n_shared_experts=None, num_experts_per_tok=None, max_position_embeddings=64,
             initializer_range=0.1, bos_token_id=None, eos_token_id=None,
             torch_dtype="float32")
MOE = dict(DENSE, num_hidden_layers=3, n_routed_experts=8, n_shared_experts=2,
           num_experts_per_tok=2, moe_intermediate_size=16, first_k_dense_replace=1)

DENSE_CASES = {
    "mha": {},
    "gqa_bias": dict(num_attention_heads=8, num_key_value_heads=2, attention_bias=True),
    "mqa_theta": dict(num_attention_heads=4, num_key_value_heads=1, rope_theta=500.0),
    "rope_linear": dict(rope_scaling={"type": "linear", "factor": 2.0}),
    "rope_dynamic": dict(rope_scaling={"type": "dynamic", "factor": 2.0},
                         max_position_embeddings=16),
    "tied": dict(tie_word_embeddings=True),
}
MOE_CASES = {
    "v1_greedy": {},
    "gqa_freq2": dict(num_hidden_layers=4, first_k_dense_replace=0, moe_layer_freq=2,
                      num_attention_heads=8, num_key_value_heads=2, n_shared_experts=1,
                      num_experts_per_tok=3),
    "rope_dynamic_tied": dict(rope_scaling={"type": "dynamic", "factor": 4.0},
                              max_position_embeddings=16, tie_word_embeddings=True),
    "norm_topk_prob": dict(norm_topk_prob=True, num_experts_per_tok=3),
}


def _random_model(cfg: ModelConfig, seed: int) -> Transformer:
    """Random weights everywhere, including norms, biases and (decisive) routers."""
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(std=0.1)
            elif name.endswith("mlp.gate.weight"):
                p.normal_(std=1.0)
    return model.eval()


def _llama_config(cfg: ModelConfig) -> LlamaConfig:
    rope = {"rope_type": "default", "rope_theta": float(cfg.rope_theta)}
    if cfg.rope_scaling:
        rope.update(rope_type=cfg.rope_scaling["type"], factor=float(cfg.rope_scaling["factor"]))
    llama = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
        hidden_act=cfg.hidden_act, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_word_embeddings,
        attention_bias=cfg.attention_bias, mlp_bias=False, rope_parameters=rope)
    llama._attn_implementation = "eager"  # an independent softmax path, not SDPA again
    return llama


class _RenormalizedRouter(nn.Module):
    """V2's router with DeepSeek V1's ``norm_topk_prob``: weights / (sum + 1e-20)."""

    def __init__(self, router: nn.Module) -> None:
        super().__init__()
        self.inner = router

    @property
    def weight(self) -> nn.Parameter:
        return self.inner.weight

    def forward(self, x: torch.Tensor):  # noqa: ANN201 - mirrors DeepseekV2TopkRouter
        logits, weights, idx = self.inner(x)
        return logits, weights / (weights.sum(dim=-1, keepdim=True) + 1e-20), idx


def _reference(cfg: ModelConfig, directory: Path) -> nn.Module:
    """Llama (+ DeepseekV2Moe at the MoE layers) holding the directory's weights."""
    ref = LlamaForCausalLM(_llama_config(cfg))
    if cfg.n_routed_experts is not None:
        moe_cfg = DeepseekV2Config(
            hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
            moe_intermediate_size=cfg.moe_intermediate_size, n_routed_experts=cfg.n_routed_experts,
            n_shared_experts=cfg.n_shared_experts, num_experts_per_tok=cfg.num_experts_per_tok,
            topk_method="greedy", routed_scaling_factor=1.0, norm_topk_prob=False,
            hidden_act=cfg.hidden_act)
        moe_cfg._experts_implementation = "eager"  # the plain per-expert loop
        for i in cfg.moe_layer_indices:
            moe = DeepseekV2Moe(moe_cfg)
            if cfg.norm_topk_prob:
                moe.gate = _RenormalizedRouter(moe.gate)
            ref.model.layers[i].mlp = moe
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(set(weight_files(directory).values())):
        tensors.update(load_file(file))
    state = keys.moe_from_hf(tensors, cfg.n_routed_experts)
    if cfg.norm_topk_prob:
        state = {k.replace("mlp.gate.weight", "mlp.gate.inner.weight"): v for k, v in state.items()}
    result = ref.load_state_dict(state, strict=False)
    allowed_missing = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    assert set(result.missing_keys) <= allowed_missing, result.missing_keys
    assert not result.unexpected_keys, result.unexpected_keys
    if cfg.tie_word_embeddings:
        assert ref.lm_head.weight is ref.model.embed_tokens.weight
    return ref.eval()


def _compare(cfg: ModelConfig, tmp_path: Path, seq_len: int = 12, seed: int = 0) -> None:
    _random_model(cfg, seed).save_pretrained(tmp_path / "model")
    ours = Transformer.from_pretrained(tmp_path / "model")
    ref = _reference(cfg, tmp_path / "model")
    ids = torch.randint(0, cfg.vocab_size, (2, seq_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(input_ids=ids).logits
        got = ours(ids).logits
    diff = (got - expected).abs()
    torch.testing.assert_close(
        got, expected, atol=ATOL, rtol=RTOL,
        msg=lambda m: f"{m}\nmax diff {diff.max():.3g}, mean diff {diff.mean():.3g}")


@pytest.mark.parametrize("case", sorted(DENSE_CASES))
def test_dense_model_matches_llama(case: str, tmp_path: Path) -> None:
    cfg = ModelConfig(**{**DENSE, **DENSE_CASES[case]})
    # dynamic NTK only changes anything past max_position_embeddings: go well beyond it
    seq_len = 40 if cfg.rope_scaling and cfg.rope_scaling["type"] == "dynamic" else 12
    _compare(cfg, tmp_path, seq_len)


@pytest.mark.parametrize("case", sorted(MOE_CASES))
def test_moe_model_matches_llama_with_deepseek_v2_moe(case: str, tmp_path: Path) -> None:
    cfg = ModelConfig(**{**MOE, **MOE_CASES[case]})
    assert cfg.moe_layer_indices, "the case must contain MoE layers"
    seq_len = 40 if cfg.rope_scaling else 12
    _compare(cfg, tmp_path, seq_len)


def test_dynamic_rope_changes_logits_past_max_positions(tmp_path: Path) -> None:
    """Guards the dynamic case above against being vacuous: past max_position_embeddings
    the scaled model differs from plain RoPE, below it they agree."""
    plain = ModelConfig(**{**DENSE, "max_position_embeddings": 16})
    dynamic = plain.replace(rope_scaling={"type": "dynamic", "factor": 2.0})
    a, b = _random_model(plain, 3), _random_model(dynamic, 3)
    short, long = torch.randint(0, 128, (1, 16)), torch.randint(0, 128, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(a(short).logits, b(short).logits, atol=0, rtol=0)
        assert (a(long).logits - b(long).logits).abs().max() > 1e-3
