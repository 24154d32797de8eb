"""Named model sizes. ``tiny`` is the CPU-sized model every test and demo uses; the others
follow the DeepSeekMoE paper (2B, 145B) and the released deepseek-moe-16b config.
``tiny-v2`` / ``tiny-v3`` are ``tiny`` with Multi-head Latent Attention and V2's / V3's
routing; ``deepseek-v2-lite``, ``deepseek-v2`` and ``deepseek-v3`` are the released configs
(V3's FP8 ``quantization_config`` aside: it describes the stored weights, not the model)."""

from __future__ import annotations

from typing import Any

_DEEPSEEK_16B: dict[str, Any] = dict(
    vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
    num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=16,
    n_shared_experts=2, n_routed_experts=64, num_experts_per_tok=6, first_k_dense_replace=1,
    max_position_embeddings=4096, auto_map={
        "AutoConfig": "configuration_deepseek.DeepseekConfig",
        "AutoModel": "modeling_deepseek.DeepseekModel",
        "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM",
    },
    transformers_version="4.36.0",
)

# DeepSeek-V2 / V2-Lite / V3 ship the same YaRN extension (4K pretraining context x 40).
_YARN_40 = dict(type="yarn", factor=40, beta_fast=32, beta_slow=1,
                original_max_position_embeddings=4096)
_V2: dict[str, Any] = dict(
    model_type="deepseek_v2", vocab_size=102400)
_DEEPSEEK_V2_LITE: dict[str, Any] = dict(
    _V2, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
    num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16,
    n_shared_experts=2, n_routed_experts=64, num_experts_per_tok=6, first_k_dense_replace=1,
    q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
    v_head_dim=128, max_position_embeddings=163840,
    rope_scaling=dict(_YARN_40, mscale=0.707, mscale_all_dim=0.707),
)

# 4 layers of width 128; 16 fine-grained experts of width 96, 1 shared, top-3:
# active FFN width 4 x 96 = 384 = the dense first layer's width.
_TINY: dict[str, Any] = dict(
    vocab_size=4096, hidden_size=128, intermediate_size=384, moe_intermediate_size=96,
    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
    n_shared_experts=1, n_routed_experts=16, num_experts_per_tok=3,
    first_k_dense_replace=1, max_position_embeddings=256, bos_token_id=None,
    eos_token_id=None, torch_dtype="float32",
)
# MLA at tiny's width: a 64-wide latent (+ 16 rope dims) cached per token, 32 + 16 per head.
_TINY_MLA: dict[str, Any] = dict(kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
                                 v_head_dim=32)

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": _TINY,
    # tiny with MLA (V2-Lite's shape: full q_proj) and V2's group-limited routing.
    "tiny-v2": dict(
        _TINY, model_type="deepseek_v2", q_lora_rank=None, **_TINY_MLA,
        topk_method="group_limited_greedy", n_group=4, topk_group=2,
    ),
    # tiny with MLA (V3's shape: compressed queries) and V3's sigmoid + bias routing.
    "tiny-v3": dict(
        _TINY, model_type="deepseek_v3", q_lora_rank=96, **_TINY_MLA, scoring_func="sigmoid",
        topk_method="noaux_tc", n_group=4, topk_group=2, norm_topk_prob=True,
        routed_scaling_factor=2.5, bias_update_speed=1e-3,
    ),
    # Paper, Table 2: 9 layers, hidden 1280, 1 shared + 63 routed experts (0.25x FFN), top-7.
    "deepseek-moe-2b": dict(
        vocab_size=102400, hidden_size=1280, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=9, num_attention_heads=10, num_key_value_heads=10,
        n_shared_experts=1, n_routed_experts=63, num_experts_per_tok=7,
        first_k_dense_replace=0, max_position_embeddings=2048,
    ),
    "deepseek-moe-16b": _DEEPSEEK_16B,
    # Paper, Table 2: 62 layers, hidden 4096, 4 shared + 128 routed experts (0.125x FFN), top-12.
    "deepseek-moe-145b": dict(
        vocab_size=102400, hidden_size=4096, intermediate_size=22528, moe_intermediate_size=1408,
        num_hidden_layers=62, num_attention_heads=32, num_key_value_heads=32,
        n_shared_experts=4, n_routed_experts=128, num_experts_per_tok=12,
        first_k_dense_replace=1, max_position_embeddings=4096,
    ),
    # deepseek-ai/DeepSeek-V2-Lite: 15.7B total, 2.4B active.
    "deepseek-v2-lite": _DEEPSEEK_V2_LITE,
    # deepseek-ai/DeepSeek-V2: 236B total, 21B active.
    "deepseek-v2": dict(
        _V2, hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536,
        num_hidden_layers=60, num_attention_heads=128, num_key_value_heads=128,
        n_shared_experts=2, n_routed_experts=160, num_experts_per_tok=6,
        first_k_dense_replace=1, topk_method="group_limited_greedy", n_group=8, topk_group=3,
        routed_scaling_factor=16.0, aux_loss_alpha=0.003, q_lora_rank=1536,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        max_position_embeddings=163840,
        rope_scaling=dict(_YARN_40, mscale=0.707, mscale_all_dim=0.707),
    ),
    # deepseek-ai/DeepSeek-V3 (and R1): 671B total + 14B in the MTP module, 37B active.
    "deepseek-v3": dict(
        model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
        moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128,
        num_key_value_heads=128, n_shared_experts=1, n_routed_experts=256,
        num_experts_per_tok=8, first_k_dense_replace=3, scoring_func="sigmoid",
        topk_method="noaux_tc", n_group=8, topk_group=4, norm_topk_prob=True,
        routed_scaling_factor=2.5, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, num_nextn_predict_layers=1,
        max_position_embeddings=163840, bos_token_id=0, eos_token_id=1,
        rope_scaling=dict(_YARN_40, mscale=1.0, mscale_all_dim=1.0),
    ),
}
