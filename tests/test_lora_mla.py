"""LoRA on Multi-head Latent Attention models (DeepSeek-V2/V3): which projections the
attention targets cover, merge == adapter, and adapters that save and reload exactly."""

from __future__ import annotations

import copy

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
