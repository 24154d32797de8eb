"""ModelConfig: HF round trips (DeepSeek V1 16B, transformers' V2 and V3 dicts), unknown
keys, validation messages, ``override`` parsing, presets, immutability."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest

from conftest import moe_config, reference_file
from dsmoe.config import ModelConfig, MoEConfig
from dsmoe.presets import PRESETS

@pytest.fixture(scope="module")
def hf_16b() -> dict:
    return json.loads(reference_file("deepseek-moe-16b-base", "config.json").read_text())


# --- round trips ------------------------------------------------------------------------
def test_real_16b_config_round_trips_exactly(hf_16b: dict) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the real config has no unknown keys
        cfg = ModelConfig.from_hf(hf_16b)
    out = cfg.to_hf()
    assert out == hf_16b
    assert list(json.loads(json.dumps(out))) == sorted(hf_16b)  # JSON-serialisable, same keys
    assert cfg.n_routed_experts == 64 and cfg.num_experts_per_tok == 6
    assert cfg.topk_method == "greedy" and cfg.scoring_func == "softmax"
    assert cfg.moe_layer_indices == tuple(range(1, 28))


def test_preset_16b_is_the_real_config(hf_16b: dict) -> None:
    assert ModelConfig.preset("deepseek-moe-16b").to_hf() == hf_16b
    assert ModelConfig.preset("deepseek-moe-16b") == ModelConfig.from_hf(hf_16b)


def test_to_hf_writes_nondefault_routing_keys_and_reads_them_back(hf_16b: dict) -> None:
    cfg = ModelConfig.from_hf(hf_16b).replace(
        topk_method="device_limited", n_devices=8, max_devices_per_token=3,
        comm_balance_alpha=0.02, drop_tokens=True, capacity_factor=1.25)
    out = cfg.to_hf()
    for key in ("topk_method", "n_devices", "max_devices_per_token", "comm_balance_alpha",
                "drop_tokens", "capacity_factor"):
        assert out[key] == getattr(cfg, key), key
    assert "bias_update_speed" not in out, "default routing keys stay out of a V1 dict"
    assert ModelConfig.from_hf(out) == cfg
    assert ModelConfig.from_hf(out).to_hf() == out


def test_deepseek_v2_transformers_dict() -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.DeepseekV2Config(
        hidden_size=64, num_attention_heads=4, n_routed_experts=16, num_experts_per_tok=3,
        n_group=4, topk_group=2, topk_method="group_limited_greedy",
        routed_scaling_factor=2.0, moe_intermediate_size=32, n_shared_experts=2,
    ).to_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # MLA / generic keys are known: no warning
        cfg = ModelConfig.from_hf(hf)
    assert (cfg.model_type, cfg.scoring_func, cfg.topk_method) == (
        "deepseek_v2", "softmax", "group_limited_greedy")
    assert (cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group) == (
        16, 3, 4, 2)
    assert cfg.routed_scaling_factor == 2.0 and cfg.norm_topk_prob is False
    assert (cfg.moe_intermediate_size, cfg.n_shared_experts) == (32, 2)
    for key in ("kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "v_head_dim",
                "qk_nope_head_dim"):
        assert getattr(cfg, key) == hf[key], f"MLA key {key} must be read"
        assert cfg.to_hf()[key] == hf[key], f"MLA key {key} must be written back"
    assert cfg.attention_type == "mla"
    assert cfg.unknown_keys == ()
    assert cfg.to_hf()["kv_lora_rank"] == hf["kv_lora_rank"]


def test_deepseek_v2_dict_without_groups_means_one_group() -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.DeepseekV2Config(hidden_size=64, num_attention_heads=4,
                                       n_routed_experts=8, num_experts_per_tok=2).to_dict()
    assert hf["n_group"] is None and hf["topk_group"] is None
    cfg = ModelConfig.from_hf(hf)
    assert (cfg.topk_method, cfg.n_group, cfg.topk_group) == ("greedy", 1, 1)


@pytest.mark.parametrize("norm", [True, False])
def test_deepseek_v3_transformers_dict(norm: bool) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.DeepseekV3Config(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=32,
        num_experts_per_tok=4, n_group=8, topk_group=3, routed_scaling_factor=2.5,
        norm_topk_prob=norm,
    ).to_dict()
    assert "topk_method" not in hf and "scoring_func" not in hf  # V3 implies them
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = ModelConfig.from_hf(hf)
    assert (cfg.scoring_func, cfg.topk_method) == ("sigmoid", "noaux_tc")
    assert (cfg.n_group, cfg.topk_group, cfg.num_experts_per_tok) == (8, 3, 4)
    assert cfg.routed_scaling_factor == 2.5 and cfg.norm_topk_prob is norm
    assert cfg.uses_bias_balancing
    for key in ("kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "num_nextn_predict_layers"):
        assert getattr(cfg, key) == hf[key], f"V3 key {key} must be read"
    assert "rope_interleave" in cfg.extra
    assert cfg.unknown_keys == ()
    assert cfg.rope_theta == hf["rope_parameters"]["rope_theta"]


def test_yarn_rope_of_real_v2_v3_checkpoints_is_accepted(hf_16b: dict) -> None:
    """DeepSeek-V2/V3 checkpoints ship YaRN rope scaling; from_hf must take their dicts and
    keep every YaRN parameter, whether spelled as ``rope_scaling`` (the checkpoints'
    config.json) or as ``rope_parameters`` (transformers 5's ``to_dict``)."""
    yarn = {"type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
            "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096}
    hf = dict(hf_16b, model_type="deepseek_v3", n_group=8, topk_group=4,
              rope_scaling=yarn, scoring_func="sigmoid", topk_method="noaux_tc")
    cfg = ModelConfig.from_hf(hf)
    assert cfg.rope_scaling == yarn
    assert cfg.to_hf()["rope_scaling"] == yarn
    transformers = pytest.importorskip("transformers")
    params = {"rope_type": "yarn", "rope_theta": 5e4, **{k: v for k, v in yarn.items()
                                                          if k != "type"}}
    hf = transformers.DeepseekV3Config(hidden_size=64, num_attention_heads=4,
                                       num_key_value_heads=4, rope_parameters=params).to_dict()
    cfg = ModelConfig.from_hf(hf)
    assert cfg.rope_scaling == yarn and cfg.rope_theta == 5e4


# --- unknown keys -----------------------------------------------------------------------
def test_unknown_keys_are_kept_reported_and_written_back(hf_16b: dict) -> None:
    hf = dict(hf_16b, my_custom_flag=True, another_one={"a": [1, 2]})
    with pytest.warns(UserWarning, match="my_custom_flag") as record:
        cfg = ModelConfig.from_hf(hf)
    assert "another_one" in str(record[0].message)
    assert cfg.extra["my_custom_flag"] is True
    assert set(cfg.unknown_keys) == {"my_custom_flag", "another_one"}
    assert cfg.to_hf() == hf
    assert cfg.to_hf()["another_one"] is not hf["another_one"], "to_hf must copy, not alias"


def test_from_hf_rejects_other_architectures_and_non_dicts(hf_16b: dict) -> None:
    with pytest.raises(ValueError, match="model_type"):
        ModelConfig.from_hf(dict(hf_16b, model_type="llama"))
    with pytest.raises(ValueError, match="dict"):
        ModelConfig.from_hf([("hidden_size", 1)])


def test_from_hf_does_not_mutate_its_input(hf_16b: dict) -> None:
    before = json.dumps(hf_16b, sort_keys=True)
    ModelConfig.from_hf(hf_16b).to_hf()["auto_map"]["AutoModel"] = "changed"
    assert json.dumps(hf_16b, sort_keys=True) == before


# --- validation -------------------------------------------------------------------------
BASE = dict(n_routed_experts=16, num_experts_per_tok=4)


@pytest.mark.parametrize("overrides,key", [
    (dict(num_experts_per_tok=17), "num_experts_per_tok"),
    (dict(n_devices=3), "n_devices"),
    (dict(n_devices=4, max_devices_per_token=5), "max_devices_per_token"),
    (dict(n_devices=4, max_devices_per_token=0), "max_devices_per_token"),
    (dict(topk_method="device_limited", n_devices=8, max_devices_per_token=1),
     "max_devices_per_token"),  # 1 device of 2 experts cannot hold top-4
    (dict(n_group=3), "n_group"),
    (dict(n_group=4, topk_group=5), "topk_group"),
    (dict(topk_method="group_limited_greedy", n_group=8, topk_group=1), "topk_group"),
    (dict(topk_method="noaux_tc", scoring_func="sigmoid", n_group=16, topk_group=8),
     "n_group"),  # V3 ranks groups by their two best experts
    (dict(bias_update_speed=0.001), "bias_update_speed"),
    (dict(scoring_func="tanh"), "scoring_func"),
    (dict(topk_method="best"), "topk_method"),
    (dict(rope_scaling={"type": "exotic", "factor": 2.0}), "rope_scaling"),
    (dict(rope_scaling={"type": "linear", "factor": 0.5}), "rope_scaling"),
    (dict(rope_scaling="linear"), "rope_scaling"),
    (dict(capacity_factor=0.0), "capacity_factor"),
    (dict(routed_scaling_factor=-1.0), "routed_scaling_factor"),
    (dict(aux_loss_alpha=-0.1), "aux_loss_alpha"),
    (dict(z_loss_alpha=float("nan")), "z_loss_alpha"),
    (dict(hidden_size=100, num_attention_heads=3), "num_attention_heads"),
    (dict(n_routed_experts=0), "n_routed_experts"),
    (dict(n_shared_experts=-1), "n_shared_experts"),
    (dict(hidden_act="swish"), "hidden_act"),
])
def test_contradictions_raise_naming_the_key(overrides: dict, key: str) -> None:
    with pytest.raises(ValueError, match=rf"\b{key}=") as info:
        moe_config(**{**BASE, **overrides})
    message = str(info.value)
    assert "invalid config" in message and len(message) > len(key) + 20, message


def test_valid_routing_configs_construct() -> None:
    moe_config(**BASE, topk_method="device_limited", n_devices=4, max_devices_per_token=2)
    moe_config(**BASE, topk_method="group_limited_greedy", n_group=4, topk_group=1)
    cfg = moe_config(**BASE, topk_method="noaux_tc", scoring_func="sigmoid", n_group=8,
                     topk_group=2, bias_update_speed=0.001)
    assert cfg.group_size == 2 and cfg.uses_bias_balancing
    assert moe_config(**BASE, n_devices=4).max_devices == 4  # M defaults to D


def test_replace_validates_and_rejects_unknown_names() -> None:
    cfg = moe_config(**BASE)
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        cfg.replace(num_experts_per_tok=99)
    with pytest.raises(ValueError, match="did you mean n_routed_experts"):
        cfg.replace(n_routed_expert=8)
    assert cfg.replace(num_experts_per_tok=2).num_experts_per_tok == 2
    assert cfg.num_experts_per_tok == 4


# --- override (the CLI's --set) ---------------------------------------------------------
def test_override_parses_values_by_type() -> None:
    cfg = moe_config(**BASE).override([
        "topk_method=device_limited", "n_devices=4", "max_devices_per_token = 2",
        "drop_tokens=true", "capacity_factor=2", "rope_scaling={\"type\": \"linear\", "
        "\"factor\": 2.0}", "seq_aux=False", "pad_token_id=none",
    ])
    assert cfg.topk_method == "device_limited"
    assert cfg.n_devices == 4 and isinstance(cfg.n_devices, int)
    assert cfg.max_devices_per_token == 2
    assert cfg.drop_tokens is True and cfg.seq_aux is False
    assert cfg.capacity_factor == 2.0 and isinstance(cfg.capacity_factor, float)
    assert cfg.rope_scaling == {"type": "linear", "factor": 2.0}
    assert cfg.pad_token_id is None
    assert moe_config(**BASE).override({"num_experts_per_tok": "2"}).num_experts_per_tok == 2


def test_override_rejects_unknown_keys_with_a_suggestion() -> None:
    with pytest.raises(ValueError, match=r"unknown config key 'num_experts_per_token'.*"
                                         r"did you mean num_experts_per_tok"):
        moe_config(**BASE).override(["num_experts_per_token=2"])
    with pytest.raises(ValueError, match="key=value"):
        moe_config(**BASE).override(["drop_tokens"])
    with pytest.raises(ValueError, match="num_experts_per_tok="):
        moe_config(**BASE).override(["num_experts_per_tok=40"])


# --- presets and immutability --------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_constructs_and_round_trips(name: str) -> None:
    cfg = ModelConfig.preset(name)
    assert cfg.n_routed_experts and cfg.num_experts_per_tok <= cfg.n_routed_experts
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ModelConfig.from_hf(cfg.to_hf()) == cfg


def test_paper_presets_have_the_paper_sizes() -> None:
    two = ModelConfig.preset("deepseek-moe-2b")
    assert (two.n_shared_experts, two.n_routed_experts, two.num_experts_per_tok) == (1, 63, 7)
    big = ModelConfig.preset("deepseek-moe-145b")
    assert (big.n_shared_experts, big.n_routed_experts, big.num_experts_per_tok) == (4, 128, 12)
    assert (big.hidden_size, big.num_hidden_layers) == (4096, 62)
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        ModelConfig.preset("huge")


def test_config_is_frozen() -> None:
    cfg = ModelConfig.preset("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.hidden_size = 64  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.topk_method = "noaux_tc"  # type: ignore[misc]


# --- MoEConfig: the part one MoE layer needs ------------------------------------------------
def test_model_config_exposes_its_moe_part() -> None:
    cfg = moe_config(topk_method="noaux_tc", scoring_func="sigmoid", n_group=4, topk_group=2,
                     bias_update_speed=0.01, z_loss_alpha=0.1)
    moe = cfg.moe
    assert isinstance(moe, MoEConfig) and cfg.moe is moe  # built once
    for f in dataclasses.fields(MoEConfig):
        assert getattr(moe, f.name) == getattr(cfg, f.name), f.name
    assert (moe.group_size, moe.max_devices, moe.uses_bias_balancing) == (2, 1, True)
    assert not hasattr(moe, "num_attention_heads") and not hasattr(moe, "vocab_size")
    assert moe_config(n_routed_experts=None, n_shared_experts=None,
                      num_experts_per_tok=None).moe is None  # dense: no MoE layer
    # one declaration of the keys: same defaults on both sides
    assert MoEConfig() == ModelConfig().moe


def test_moe_config_is_frozen_and_validated() -> None:
    moe = ModelConfig.preset("tiny").moe
    with pytest.raises(dataclasses.FrozenInstanceError):
        moe.n_routed_experts = 4  # type: ignore[misc]
    with pytest.raises(ValueError, match=r"num_experts_per_tok=9: top-k cannot exceed"):
        moe.replace(n_routed_experts=8, num_experts_per_tok=9)
    with pytest.raises(ValueError, match="n_routed_experts=None"):
        MoEConfig(n_routed_experts=None)
    with pytest.raises(ValueError, match=r"unknown config key 'num_attention_heads'"):
        moe.replace(num_attention_heads=4)
    with pytest.raises(ValueError, match=r"scoring_func='tanh'"):
        MoEConfig(scoring_func="tanh")


def test_moe_config_from_hf_reads_only_the_moe_keys(hf_16b: dict) -> None:
    assert MoEConfig.from_hf(hf_16b) == ModelConfig.from_hf(hf_16b).moe
    # attention that does not fit together is not this config's business
    broken = dict(hf_16b, num_attention_heads=7, num_key_value_heads=3, vocab_size=-1)
    with pytest.raises(ValueError):
        ModelConfig.from_hf(broken)
    assert MoEConfig.from_hf(broken) == ModelConfig.from_hf(hf_16b).moe
    v3_dict = {k: v for k, v in hf_16b.items() if k != "scoring_func"}
    v3 = MoEConfig.from_hf(dict(v3_dict, model_type="deepseek_v3", n_group=8, topk_group=4))
    assert (v3.scoring_func, v3.topk_method, v3.seq_aux) == ("sigmoid", "noaux_tc", True)
    with pytest.raises(ValueError, match="model_type 'llama'"):
        MoEConfig.from_hf(dict(hf_16b, model_type="llama"))
