"""Named model sizes. ``tiny`` is the CPU-sized model every test and demo uses; the others
follow the DeepSeekMoE paper (2B, 145B) and the released deepseek-moe-16b config."""

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

PRESETS: dict[str, dict[str, Any]] = {
    # 4 layers of width 128; 16 fine-grained experts of width 96, 1 shared, top-3:
    # active FFN width 4 x 96 = 384 = the dense first layer's width.
    "tiny": dict(
        vocab_size=4096, hidden_size=128, intermediate_size=384, moe_intermediate_size=96,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
        n_shared_experts=1, n_routed_experts=16, num_experts_per_tok=3,
        first_k_dense_replace=1, max_position_embeddings=256, bos_token_id=None,
        eos_token_id=None, torch_dtype="float32",
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
}
