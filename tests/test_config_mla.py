"""ModelConfig for DeepSeek-V2 / V3 (Multi-head Latent Attention): the real configs read
and written back unchanged, transformers' dicts, and one-line errors for bad MLA keys.

The released config.json files come from ``conftest.reference_file``.
"""

from __future__ import annotations

import json
import warnings

import pytest
from conftest import reference_file

from dsmoe import ModelConfig


def _real(name: str) -> dict:
    return json.loads(reference_file(name, "config.json").read_text())


@pytest.mark.parametrize("name", ["deepseek-v2-lite", "deepseek-v3"])
def test_real_v2_v3_configs_round_trip(name: str) -> None:
    hf = _real(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every key is known
        cfg = ModelConfig.from_hf(hf)
    assert cfg.attention_type == "mla"
    assert cfg.rope_head_dim == 64 and cfg.kv_lora_rank == 512
    assert cfg.q_lora_rank == hf["q_lora_rank"]
    back = cfg.to_hf()
    for key, value in hf.items():
        assert back[key] == value, f"{key}: {back[key]!r} != {value!r}"
    assert ModelConfig.from_hf(back) == cfg


def test_v3_defaults_and_mtp_layers() -> None:
    cfg = ModelConfig.from_hf(_real("deepseek-v3"))
    assert (cfg.scoring_func, cfg.topk_method, cfg.n_group, cfg.topk_group) == (
        "sigmoid", "noaux_tc", 8, 4)
    assert cfg.num_nextn_predict_layers == 1 and cfg.routed_scaling_factor == 2.5
    assert cfg.first_k_dense_replace == 3 and cfg.moe_layer_indices[0] == 3


def test_missing_mla_keys_get_transformers_defaults() -> None:
    transformers = pytest.importorskip("transformers")
    hf = {"model_type": "deepseek_v2", "hidden_size": 64, "num_attention_heads": 4,
          "num_key_value_heads": 4}
    cfg = ModelConfig.from_hf(hf)
    ref = transformers.DeepseekV2Config(**hf)
    for key in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                "v_head_dim"):
        assert getattr(cfg, key) == getattr(ref, key), key


def test_to_hf_of_a_v2_config_spells_out_q_lora_rank_null() -> None:
    """transformers' V2 default is q_lora_rank=1536: a V2-Lite written without the key
    would grow a q_a_proj when transformers reads it back."""
    cfg = ModelConfig.from_hf(_real("deepseek-v2-lite")).replace(hf_keys=())
    out = cfg.to_hf()
    assert "q_lora_rank" in out and out["q_lora_rank"] is None
    for key in ("kv_lora_rank", "qk_nope_head_dim", "v_head_dim", "n_group", "topk_method",
                "routed_scaling_factor"):
        assert key in out, key


@pytest.mark.parametrize("change, key", [
    (dict(kv_lora_rank=0), "kv_lora_rank"),
    (dict(qk_rope_head_dim=63), "qk_rope_head_dim"),
    (dict(qk_nope_head_dim=None), "qk_nope_head_dim"),
    (dict(v_head_dim=-1), "v_head_dim"),
    (dict(q_lora_rank=0), "q_lora_rank"),
    (dict(num_key_value_heads=1), "num_key_value_heads"),
    (dict(model_type="deepseek"), "model_type"),
    (dict(kv_lora_rank=None), "kv_lora_rank"),
    (dict(num_nextn_predict_layers=-1), "num_nextn_predict_layers"),
    (dict(rope_scaling={"type": "yarn", "factor": 4}), "rope_scaling"),
    (dict(rope_scaling={"type": "yarn", "factor": 4, "original_max_position_embeddings": 64,
                        "mscale": -1}), "rope_scaling"),
])
def test_bad_mla_keys_are_named(change: dict, key: str) -> None:
    cfg = ModelConfig.from_hf(_real("deepseek-v2-lite"))
    with pytest.raises(ValueError, match=f"invalid config: {key}="):
        cfg.replace(**change)


def test_mla_heads_need_not_divide_hidden_size() -> None:
    """MLA's head sizes are their own keys; hidden_size / heads is never used."""
    cfg = ModelConfig.from_hf(_real("deepseek-v2-lite")).replace(hidden_size=2050)
    assert cfg.attention_type == "mla"


@pytest.mark.parametrize("model_type, cls", [("deepseek", "DeepseekForCausalLM"),
                                             ("deepseek_v2", "DeepseekV2ForCausalLM"),
                                             ("deepseek_v3", "DeepseekV3ForCausalLM")])
def test_architectures_default_to_the_model_types_class(model_type: str, cls: str) -> None:
    """A config built without "architectures" names its own family's class, so a V2/V3
    model is never saved under V1's (transformers' pipelines and hubs read this key)."""
    hf = {"model_type": model_type, "hidden_size": 64, "num_attention_heads": 4,
          "num_key_value_heads": 4}
    assert ModelConfig.from_hf(hf).architectures == (cls,)
    assert ModelConfig.from_hf(hf).to_hf()["architectures"] == [cls]
    explicit = ModelConfig.from_hf(dict(hf, architectures=["MyForCausalLM"]))
    assert explicit.architectures == ("MyForCausalLM",)
