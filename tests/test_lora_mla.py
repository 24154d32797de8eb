"""LoRA on Multi-head Latent Attention models (DeepSeek-V2/V3): which projections the
attention targets cover, merge == adapter, and adapters that save and reload exactly."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from dsmoe import ModelConfig
from dsmoe.finetune.adapter import load_adapter, save_adapter
from dsmoe.finetune.lora import (TARGETS, LoRALinear, LoRASettings, apply_lora,
                                 lora_parameters, merge_lora)
from dsmoe.model import Transformer


def _model(preset: str) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig.preset(preset).replace(vocab_size=96, num_hidden_layers=2,
                                             initializer_range=0.05)
    return Transformer(cfg).eval()


def _randomize_adapters(model: Transformer) -> None:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lora_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


@pytest.mark.parametrize("preset, queries", [("tiny-v2", ["q_proj"]),
                                             ("tiny-v3", ["q_a_proj", "q_b_proj"])])
def test_attention_targets_cover_the_mla_projections(preset: str, queries: list[str]) -> None:
    model = _model(preset)
    wrapped = apply_lora(model, LoRASettings(r=4, alpha=8.0, targets=("q", "k", "v", "o")))
    expected = {f"layers.1.self_attn.{name}" for name in
                [*queries, "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]}
    assert expected <= set(wrapped), sorted(wrapped)
    attn = model.layers[1].self_attn
    assert isinstance(attn.kv_b_proj, LoRALinear)


@pytest.mark.parametrize("preset", ["tiny-v2", "tiny-v3"])
def test_mla_adapter_merges_saves_and_reloads(preset: str, tmp_path) -> None:
    base = _model(preset)
    model = copy.deepcopy(base)
    apply_lora(model, LoRASettings(r=4, alpha=8.0, targets=TARGETS))
    _randomize_adapters(model)
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        adapted = model(ids).logits
        # decoding with a LoRA-wrapped kv_b_proj takes the expanded path: same logits
        cache = model.new_cache(2, 10)
        steps = [model(ids[:, :6], cache=cache).logits]
        steps += [model(ids[:, i:i + 1], cache=cache).logits for i in range(6, 10)]
    torch.testing.assert_close(torch.cat(steps, dim=1), adapted, atol=1e-5, rtol=1e-5)
    assert (adapted - base(ids).logits).abs().max() > 1e-3, "the adapter does something"
    save_adapter(model, tmp_path, base_model="tiny")
    reloaded = copy.deepcopy(base)
    load_adapter(reloaded, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, adapted, atol=0, rtol=0)
        merge_lora(model)
        torch.testing.assert_close(model(ids).logits, adapted, atol=1e-5, rtol=1e-5)


def test_peft_on_transformers_deepseek_v2_reads_the_mla_adapter(tmp_path) -> None:
    """An attention adapter dsmoe trains on a V2 checkpoint (q_a/q_b, kv_a, kv_b, o) loads
    with PEFT onto transformers' native DeepseekV2ForCausalLM, every tensor read, and gives
    dsmoe's adapted logits."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    from dsmoe.finetune.adapter import ADAPTER_WEIGHTS

    hf_config = transformers.DeepseekV2Config(
        vocab_size=96, hidden_size=48, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
        n_shared_experts=1, num_experts_per_tok=2, q_lora_rank=12, kv_lora_rank=16,
        qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6, first_k_dense_replace=1)
    torch.manual_seed(4)
    ref = transformers.DeepseekV2ForCausalLM(hf_config).eval()
    ref.save_pretrained(tmp_path / "base")
    ours = Transformer.from_pretrained(tmp_path / "base")
    apply_lora(ours, LoRASettings(r=4, alpha=8.0, targets=("q", "k", "v", "o")))
    _randomize_adapters(ours)
    save_adapter(ours, tmp_path / "adapter", base_model="base")
    peft_model = peft.PeftModel.from_pretrained(ref, str(tmp_path / "adapter")).eval()
    loaded = {k.replace(".default", "") for k in peft_model.state_dict() if "lora_" in k}
    saved = set(load_file(tmp_path / "adapter" / ADAPTER_WEIGHTS))
    assert saved == loaded, sorted(saved ^ loaded)[:4]
    assert any("kv_b_proj" in k for k in saved) and any("q_a_proj" in k for k in saved)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, peft_model(ids).logits, atol=1e-5,
                                   rtol=1e-4)


def test_targets_inferred_from_mla_adapter_names() -> None:
    from dsmoe.finetune.adapter import infer_targets, target_modules_regex

    p = "base_model.model.model.layers.0.self_attn"
    names = [f"{p}.{m}.lora_A.weight" for m in ("q_a_proj", "kv_a_proj_with_mqa", "kv_b_proj")]
    assert infer_targets(names) == ("q", "k", "v")
    import re

    regex = target_modules_regex(("q", "k", "v", "o"))
    for module in ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"):
        assert re.fullmatch(regex, f"model.layers.3.self_attn.{module}"), module


# --- routed experts and routers through PEFT's target_parameters --------------------------
def _native_base(family: str, tmp_path):
    """transformers' native V2 / V3 model (decisive routers, a V3 correction bias), saved,
    and the same checkpoint loaded in dsmoe."""
    transformers = pytest.importorskip("transformers")
    kwargs = dict(vocab_size=96, hidden_size=48, intermediate_size=64, moe_intermediate_size=16,
                  num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                  n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, kv_lora_rank=16,
                  qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6, first_k_dense_replace=1)
    if family == "DeepseekV3":
        kwargs.update(q_lora_rank=12, n_group=4, topk_group=2, norm_topk_prob=True,
                      routed_scaling_factor=2.5)
    else:
        kwargs.update(q_lora_rank=None)
    torch.manual_seed(4)
    ref = getattr(transformers, f"{family}ForCausalLM")(
        getattr(transformers, f"{family}Config")(**kwargs)).eval()
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for name, t in [*ref.named_parameters(), *ref.named_buffers()]:
            if name.endswith("mlp.gate.weight"):
                t.copy_(torch.randn(t.shape, generator=gen))
            elif name.endswith("e_score_correction_bias"):
                t.copy_(torch.randn(t.shape, generator=gen) * 0.1)
    ref.save_pretrained(tmp_path / "base")
    return ref, Transformer.from_pretrained(tmp_path / "base")


@pytest.mark.parametrize("family, targets", [
    ("DeepseekV2", ("q", "k", "v", "o", "gate", "up", "down", "router", "shared")),
    ("DeepseekV3", ("q", "k", "v", "o", "gate", "up", "down", "router", "shared")),
    ("DeepseekV2", ("up", "down")),
    ("DeepseekV3", ("gate", "router")),
])
def test_peft_target_parameters_read_expert_and_router_adapters(family, targets,
                                                                 tmp_path) -> None:
    """An adapter on the routed experts (and routers) of a V2/V3 model loads with
    ``PeftModel.from_pretrained`` onto transformers' native class through
    target_parameters: every tensor read, no warning about missing, unexpected or ignored
    keys or patterns, and the logits equal dsmoe's adapter-applied ones (fp32)."""
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file

    from dsmoe.finetune.adapter import ADAPTER_WEIGHTS

    ref, ours = _native_base(family, tmp_path)
    apply_lora(ours, LoRASettings(r=4, alpha=8.0, targets=targets))
    _randomize_adapters(ours)
    save_adapter(ours, tmp_path / "adapter", base_model="base")
    saved = set(load_file(tmp_path / "adapter" / ADAPTER_WEIGHTS))
    assert any(".mlp.experts.lora_A" in k or ".mlp.experts.base_layer.lora_A" in k
               for k in saved), sorted(saved)
    assert not any(".mlp.experts.0." in k for k in saved), "stacked, not per expert"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = peft.PeftModel.from_pretrained(ref, str(tmp_path / "adapter")).eval()
    complaints = [str(w.message) for w in caught if any(
        word in str(w.message).lower() for word in ("key", "ignored", "match", "missing"))]
    assert not complaints, complaints
    loaded = {k.replace(".default", "") for k in peft_model.state_dict() if "lora_" in k}
    assert saved == loaded, sorted(saved ^ loaded)[:4]
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        theirs, mine = peft_model(ids).logits, ours(ids).logits
    diff = (mine - theirs).abs()
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-4,
                               msg=f"max diff {diff.max():.3g}, mean {diff.mean():.3g}")
    with peft_model.disable_adapter(), torch.no_grad():
        base = peft_model(ids).logits
    assert (theirs - base).abs().max() > 1e-3, "the adapter does something under PEFT"


def test_feed_forward_lora_with_dropout_is_refused_where_peft_needs_target_parameters(
        tmp_path) -> None:
    model = _model("tiny-v2")
    apply_lora(model, LoRASettings(r=4, alpha=8.0, dropout=0.1, targets=("q", "up")))
    with pytest.raises(ValueError, match=r"lora dropout 0.1 .*deepseek_v2.*lora_dropout=0"):
        save_adapter(model, tmp_path / "a", base_model="tiny")
    attention_only = _model("tiny-v2")  # no target_parameters: dropout is fine
    apply_lora(attention_only, LoRASettings(r=4, alpha=8.0, dropout=0.1, targets=("q", "o")))
    save_adapter(attention_only, tmp_path / "b", base_model="tiny")


def test_finetune_sets_an_unset_dropout_to_zero_and_refuses_an_explicit_one() -> None:
    from dsmoe.finetune.config import FinetuneConfig
    from dsmoe.finetune.loop import dropout_for_peft

    model = _model("tiny-v3")
    cfg = FinetuneConfig(model="m", data="d")  # default dropout 0.05, default targets
    assert dropout_for_peft(cfg, model, frozenset(), quiet=True).lora_dropout == 0.0
    assert dropout_for_peft(cfg, model, None, quiet=True).lora_dropout == 0.0
    explicit = FinetuneConfig(model="m", data="d", lora_dropout=0.1)
    with pytest.raises(ValueError, match="--lora-dropout 0"):
        dropout_for_peft(explicit, model, frozenset({"lora_dropout"}), quiet=True)
    with pytest.raises(ValueError, match="--lora-dropout 0"):
        dropout_for_peft(explicit, model, None, quiet=True)
    v1 = Transformer(ModelConfig.preset("tiny").replace(num_hidden_layers=2)).eval()
    assert dropout_for_peft(explicit, v1, frozenset({"lora_dropout"}), True).lora_dropout == 0.1


def test_stacked_adapter_dsmoe_cannot_hold_is_refused(tmp_path) -> None:
    """PEFT may train gate and up of gate_up_proj jointly; dsmoe keeps them apart and
    says so instead of dropping the cross terms."""
    from safetensors.torch import load_file, save_file

    from dsmoe.finetune.adapter import ADAPTER_WEIGHTS

    model = _model("tiny-v2")
    apply_lora(model, LoRASettings(r=4, alpha=8.0, targets=("gate", "up")))
    _randomize_adapters(model)
    save_adapter(model, tmp_path, base_model="tiny")
    tensors = load_file(tmp_path / ADAPTER_WEIGHTS)
    key = "base_model.model.model.layers.1.mlp.experts.lora_B.weight"
    tensors[key][0, -1] = 1.0  # gate row, a rank of the up half
    save_file(tensors, tmp_path / ADAPTER_WEIGHTS)
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.experts\.lora_B\.weight: non-zero"):
        load_adapter(_model("tiny-v2"), tmp_path)


def test_per_expert_v2_adapters_written_before_the_stacked_layout_still_load(
        tmp_path, monkeypatch) -> None:
    from dsmoe.finetune import adapter

    model = _model("tiny-v2")
    apply_lora(model, LoRASettings(r=4, alpha=8.0, targets=TARGETS))
    _randomize_adapters(model)
    monkeypatch.setattr(adapter, "peft_layout", lambda config, settings: adapter.PeftLayout())
    save_adapter(model, tmp_path, base_model="tiny")
    monkeypatch.undo()
    assert "target_parameters" not in (tmp_path / adapter.ADAPTER_CONFIG).read_text()
    reloaded = _model("tiny-v2")
    load_adapter(reloaded, tmp_path)
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_peft_trained_gate_up_adapter_of_one_rank_is_refused_in_one_line(tmp_path) -> None:
    """A PEFT adapter on gate_up_proj of rank r (gate and up sharing A) has no dsmoe form."""
    import json

    from safetensors.torch import save_file

    model = _model("tiny-v2")
    E, F2, D = model.layers[1].mlp.experts.gate_up_proj.shape
    save_file({f"base_model.model.model.layers.1.mlp.experts.lora_{ab}.weight": t
               for ab, t in (("A", torch.zeros(E * 4, D)), ("B", torch.zeros(F2, 4 * E)))},
              tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": [],
         "target_parameters": ["mlp.experts.gate_up_proj"]}))
    with pytest.raises(ValueError, match=r"adapter_config.json: r 4 does not hold"):
        load_adapter(model, tmp_path)
