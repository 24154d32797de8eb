"""Multi-head Latent Attention: the latent cache, absorbed decoding == expanded attention,
YaRN frequencies and scales, and the attention registry.

Tolerances: fp32, atol 1e-5 on logits (the absorbed form multiplies in another order).
"""

from __future__ import annotations

import pytest
import torch

from dsmoe import ModelConfig
from dsmoe.model import LatentCache, MultiHeadLatentAttention, Transformer
from dsmoe.model.attention import ATTENTION, Attention
from dsmoe.model.rope import RotaryEmbedding, softmax_scale

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}
MLA = dict(model_type="deepseek_v2", architectures=("DeepseekV2ForCausalLM",), vocab_size=96,
           hidden_size=48, intermediate_size=64, moe_intermediate_size=16,
           num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
           n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, q_lora_rank=None,
           kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6,
           first_k_dense_replace=1, max_position_embeddings=64, initializer_range=0.1,
           bos_token_id=None, eos_token_id=None, torch_dtype="float32")


def _model(seed: int = 0, **changes) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**{**MLA, **changes})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("mlp.gate.weight"):
                p.normal_(std=1.0)  # no near-ties between experts
    return model


def _assert_close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5) -> None:
    diff = (a - b).abs()
    assert diff.max() <= atol, f"max diff {diff.max():.3g}, mean {diff.mean():.3g}"


def test_registry_picks_attention_by_config() -> None:
    model = _model()
    assert set(ATTENTION) == {"mha", "mla"}
    assert all(isinstance(b.self_attn, MultiHeadLatentAttention) for b in model.layers)
    v1 = Transformer(ModelConfig.preset("tiny"))
    assert all(type(b.self_attn) is Attention for b in v1.layers)


@pytest.mark.parametrize("changes", [
    {}, dict(q_lora_rank=12), dict(rope_scaling=YARN),
    dict(model_type="deepseek_v3", architectures=("DeepseekV3ForCausalLM",), n_group=2,
         topk_group=1, scoring_func="sigmoid", topk_method="noaux_tc", q_lora_rank=12),
], ids=["v2lite", "q_lora", "yarn", "v3"])
def test_absorbed_decoding_equals_expanded_attention(changes: dict) -> None:
    """Prefill (expanded) + one token at a time (absorbed, against the latent cache) gives
    the logits of one uncached forward (expanded everywhere)."""
    model = _model(**changes)
    ids = torch.randint(0, 96, (2, 14))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(2, 20)
        steps = [model(ids[:, :5], cache=cache).logits]
        steps += [model(ids[:, i:i + 1], cache=cache).logits for i in range(5, 10)]
        steps.append(model(ids[:, 10:], cache=cache).logits)  # a chunk after a prefix
    _assert_close(torch.cat(steps, dim=1), full)


def test_absorbed_is_used_and_equals_expanded_on_the_module() -> None:
    """The two forms of one layer on the same cache, directly."""
    model = _model(q_lora_rank=12, rope_scaling=YARN)
    attn = model.layers[1].self_attn
    B, T = 2, 9
    cache = model.new_cache(B, T)
    x = torch.randn(B, T, 48)
    with torch.no_grad():
        model(torch.randint(0, 96, (B, T - 1)), cache=cache)  # fills positions 0..T-2
        pos = torch.full((B, 1), T - 1)
        cos, sin = model.rotary(pos, T, x.dtype)
        from dsmoe.model.mask import build_attention_mask
        mask = build_attention_mask(None, 1, T - 1, x.device)
        absorbed = attn(x[:, -1:], cos, sin, mask, cache)
        latent = cache.latents[1, :, :T]
        q = attn._queries(x[:, -1:]).view(B, 1, 4, -1).transpose(1, 2)
        q_nope, q_rope = q.split([8, 4], dim=-1)
        expanded = attn._expanded(q_nope, attn.rotate(q_rope, cos, sin), latent, mask)
    _assert_close(absorbed, expanded)


def test_latent_cache_holds_kv_lora_rank_plus_rope_dim_per_token_and_layer() -> None:
    model = _model()
    cache = model.new_cache(3, 10)
    assert isinstance(cache, LatentCache)
    assert tuple(cache.latents.shape) == (3, 3, 10, 16 + 4)
    v2_lite = ModelConfig.preset("deepseek-v2-lite") if _has_preset("deepseek-v2-lite") else None
    if v2_lite is not None:
        assert v2_lite.kv_lora_rank + v2_lite.qk_rope_head_dim == 576


def _has_preset(name: str) -> bool:
    from dsmoe.presets import PRESETS

    return name in PRESETS


def test_batched_left_padded_decoding_equals_one_by_one() -> None:
    model = _model(q_lora_rank=12, rope_scaling=YARN)
    prompts = [torch.randint(0, 96, (n,)) for n in (7, 3, 5)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):], mask[row, width - len(p):] = p, 1
    batched = model.generate(ids, max_new_tokens=12, attention_mask=mask)
    for row, p in enumerate(prompts):
        alone = model.generate(p[None], max_new_tokens=12)
        assert torch.equal(batched[row], alone[0]), f"row {row}"


def test_yarn_frequencies_and_scales_match_transformers() -> None:
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, yarn_apply_mscale

    for mscale, mscale_all in [(0.707, 0.707), (1.0, 0.8), (0, 0)]:
        scaling = dict(YARN, mscale=mscale, mscale_all_dim=mscale_all)
        params = {"rope_type": "yarn", "rope_theta": 10000.0,
                  **{k: v for k, v in scaling.items() if k != "type"}}
        cfg = transformers.DeepseekV3Config(hidden_size=48, num_attention_heads=4,
                                            qk_rope_head_dim=8, max_position_embeddings=64,
                                            rope_parameters=params)
        inv_freq, factor = ROPE_INIT_FUNCTIONS["yarn"](cfg)
        ours = RotaryEmbedding(8, 10000.0, 64, scaling)
        torch.testing.assert_close(ours.inv_freq, inv_freq)
        assert ours.attention_factor == pytest.approx(factor)
        assert softmax_scale(12, scaling) == pytest.approx(yarn_apply_mscale(params, 12 ** -0.5))


def test_gguf_maps_mla_to_llama_cpp_deepseek2_tensors() -> None:
    """MLA models are GGUF's "deepseek2" (tests/test_gguf_mla.py has the round trips)."""
    from dsmoe.checkpoint.gguf.names import tensor_specs

    names = {s.gguf_name for s in tensor_specs(ModelConfig(**MLA))}
    assert {"blk.0.attn_kv_a_mqa.weight", "blk.0.attn_k_b.weight", "blk.0.attn_v_b.weight"} <= names
    assert "blk.0.attn_k.weight" not in names


def test_quantized_mla_decodes_absorbed_with_the_dequantized_kv_b(monkeypatch) -> None:
    """A quantized kv_b_proj still decodes in the absorbed form (its dequantized weight),
    as close to decoding the same quantized model in the expanded form as that is to the
    uncached forward: the int8 kernels' few-row path rounds activations more coarsely than
    fp32, so fp32-ulp differences between the two forms surface at ~1e-4 in the logits
    (the forms themselves agree at 1e-5 in fp32, tested above)."""
    from dsmoe.quant import quantize_model

    model = _model(q_lora_rank=12)
    quantize_model(model, bits=8)  # (int4 groups of >= 32 inputs do not fit these widths)
    attn = model.layers[1].self_attn
    assert type(attn.kv_b_proj).__name__ == "QuantLinear"
    torch.testing.assert_close(attn._kv_b_weight(torch.float32),
                               attn.kv_b_proj.dequantize(torch.float32))
    ids = torch.randint(0, 96, (2, 12))

    def decode() -> torch.Tensor:
        with torch.no_grad():
            cache = model.new_cache(2, 12)
            steps = [model(ids[:, :6], cache=cache).logits]
            steps += [model(ids[:, i:i + 1], cache=cache).logits for i in range(6, 12)]
        return torch.cat(steps, dim=1)

    absorbed = decode()
    monkeypatch.setattr(MultiHeadLatentAttention, "_kv_b_weight", lambda self, dtype: None)
    _assert_close(absorbed, decode(), atol=1e-3)
