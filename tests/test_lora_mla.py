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
