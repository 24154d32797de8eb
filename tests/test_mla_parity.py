"""Parity of dsmoe with transformers' native ``DeepseekV2ForCausalLM`` and
``DeepseekV3ForCausalLM`` on random tiny configs, through real checkpoint directories in
both directions:

- transformers ``save_pretrained`` -> dsmoe ``Transformer.from_pretrained``
- dsmoe ``save_pretrained`` -> transformers ``from_pretrained``

Cases cover q_lora_rank null and set, YaRN (mscale == mscale_all_dim as V2-Lite ships it,
and different) and no scaling, first_k_dense_replace 0/1/3, V2 greedy and group-limited
routing, V3 noaux_tc with a non-zero correction bias, routed_scaling_factor != 1, tied and
untied embeddings, and V3's half-layout rope (``rope_interleave: false``).
Logits: fp32, atol 1e-5 (rtol 1e-4, different kernels and summation orders); greedy
generation of 32 tokens with each side's cache must be identical. Routers get large
weights so no token sits at a near-tie between experts.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from dsmoe import ModelConfig
from dsmoe.model import Transformer

transformers = pytest.importorskip("transformers")

ATOL, RTOL = 1e-5, 1e-4
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}
BASE = dict(vocab_size=96, hidden_size=48, intermediate_size=64, moe_intermediate_size=16,
            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
            n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
            kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6,
            first_k_dense_replace=1, max_position_embeddings=64, initializer_range=0.1,
            bos_token_id=None, eos_token_id=None, pad_token_id=None, norm_topk_prob=False,
            routed_scaling_factor=1.0, tie_word_embeddings=False)
V2 = dict(BASE, model_type="deepseek_v2", architectures=["DeepseekV2ForCausalLM"],
          q_lora_rank=None, topk_method="greedy")
V3 = dict(BASE, model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"],
          q_lora_rank=12, n_group=4, topk_group=2, norm_topk_prob=True,
          routed_scaling_factor=2.5, num_nextn_predict_layers=0)
CASES = {
    "v2_lite_shape": V2,
    "v2_qlora_yarn_group_limited": dict(V2, q_lora_rank=12, rope_scaling=YARN,
                                        topk_method="group_limited_greedy", n_group=4,
                                        topk_group=2, routed_scaling_factor=2.0,
                                        first_k_dense_replace=0),
    "v2_dense3_tied": dict(V2, num_hidden_layers=4, first_k_dense_replace=3,
                           tie_word_embeddings=True),
    "v3_yarn_mscale": dict(V3, rope_scaling=dict(YARN, mscale=1.0, mscale_all_dim=0.8)),
    "v3_no_qlora_dense0_tied": dict(V3, q_lora_rank=None, first_k_dense_replace=0,
                                    tie_word_embeddings=True),
    "v3_rope_half_layout": dict(V3, rope_interleave=False),
}
CLASSES = {"deepseek_v2": "DeepseekV2", "deepseek_v3": "DeepseekV3"}


def _hf_classes(hf: dict):
    name = CLASSES[hf["model_type"]]
    return getattr(transformers, f"{name}Config"), getattr(transformers, f"{name}ForCausalLM")


def _randomize(named_tensors, seed: int) -> None:
    """Norm scales around 1, decisive routers, a V3 correction bias that changes choices."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in named_tensors:
            if name.endswith("norm.weight"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith("mlp.gate.weight"):
                t.copy_(torch.randn(t.shape, generator=g))
            elif name.endswith("e_score_correction_bias"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)


def _reference(hf: dict, seed: int):
    config_cls, model_cls = _hf_classes(hf)
    torch.manual_seed(seed)
    kwargs = copy.deepcopy({k: v for k, v in hf.items() if k != "architectures"})
    ref = model_cls(config_cls(**kwargs))  # (transformers edits rope dicts in place)
    _randomize([*ref.named_parameters(), *ref.named_buffers()], seed)
    return ref.eval()


def _check_logits(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    diff = (ours - theirs).abs()
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=RTOL,
                               msg=f"max diff {diff.max():.3g}, mean {diff.mean():.3g}")


def _check_generation(ours: Transformer, ref, ids: torch.Tensor) -> None:
    new = ours.generate(ids, max_new_tokens=32, temperature=0.0)
    expected = ref.generate(ids, max_new_tokens=32, do_sample=False, min_new_tokens=32,
                            pad_token_id=0)[:, ids.shape[1]:]
    assert torch.equal(new, expected), f"dsmoe {new.tolist()} != transformers {expected.tolist()}"


@pytest.mark.parametrize("case", CASES)
def test_transformers_checkpoint_loads_in_dsmoe(case: str, tmp_path) -> None:
    hf = CASES[case]
    ref = _reference(hf, seed=1)
    ref.save_pretrained(tmp_path)
    ours = Transformer.from_pretrained(tmp_path)
    ids = torch.randint(0, hf["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _check_logits(ours(ids).logits, ref(ids).logits)
    _check_generation(ours, ref, ids[:1])


@pytest.mark.parametrize("case", CASES)
def test_dsmoe_checkpoint_loads_in_transformers(case: str, tmp_path) -> None:
    hf = CASES[case]
    torch.manual_seed(3)
    ours = Transformer(ModelConfig.from_hf(hf))
    _randomize([*ours.named_parameters(), *ours.named_buffers()], seed=3)
    ours.eval().save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written.get("q_lora_rank", "absent") == hf["q_lora_rank"], \
        "config.json must spell out q_lora_rank (null too): transformers reads none as 1536"
    _, model_cls = _hf_classes(hf)
    ref = model_cls.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, hf["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        _check_logits(ours(ids).logits, ref(ids).logits)
    _check_generation(ours, ref, ids[1:])


def _add_tensors(directory, extra: dict) -> None:
    from safetensors.torch import load_file, save_file

    file = directory / "model.safetensors"
    tensors = load_file(file)
    tensors.update(extra)
    save_file(tensors, file, metadata={"format": "pt"})


def test_v3_multi_token_prediction_layer_is_set_aside(tmp_path) -> None:
    """V3 stores its MTP module as layer num_hidden_layers: loading ignores it (the logits
    are the decoder's), while a tensor of any later layer is still reported."""
    hf = dict(V3, num_nextn_predict_layers=1)
    ref = _reference(hf, seed=5)
    ref.save_pretrained(tmp_path)
    L, D = hf["num_hidden_layers"], hf["hidden_size"]
    _add_tensors(tmp_path, {f"model.layers.{L}.eh_proj.weight": torch.randn(D, 2 * D),
                            f"model.layers.{L}.enorm.weight": torch.ones(D),
                            f"model.layers.{L}.self_attn.kv_b_proj.weight": torch.randn(4, 4)})
    ours = Transformer.from_pretrained(tmp_path)
    ids = torch.randint(0, hf["vocab_size"], (1, 7))
    with torch.no_grad():
        _check_logits(ours(ids).logits, ref(ids).logits)
    _add_tensors(tmp_path, {f"model.layers.{L + 1}.enorm.weight": torch.ones(D)})
    with pytest.raises(ValueError, match=rf"unexpected tensors: model\.layers\.{L + 1}\.enorm"):
        Transformer.from_pretrained(tmp_path)
