"""Quantized checkpoints through the model's own entry points: from_pretrained, save guard,
and the CLI's --quant."""

from __future__ import annotations

import pytest
import torch

from dsmoe.config import ModelConfig
from dsmoe.model import Transformer
from dsmoe.quant import quantize_model
from dsmoe.quant.checkpoint import save_quantized


@pytest.fixture()
def tiny() -> Transformer:
    cfg = ModelConfig.preset("tiny").replace(vocab_size=128, hidden_size=64, num_attention_heads=2,
                                             num_key_value_heads=2, num_hidden_layers=2,
                                             moe_intermediate_size=64, intermediate_size=128)
    return Transformer(cfg).eval()


def test_from_pretrained_recognises_a_quantized_directory(tiny: Transformer, tmp_path) -> None:
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        reference = tiny(ids).logits
    quantize_model(tiny, bits=8)
    save_quantized(tiny, tmp_path / "q8")
    loaded = Transformer.from_pretrained(tmp_path / "q8")
    with torch.no_grad():
        got = loaded(ids).logits.float()
    assert any(type(m).__module__.startswith("dsmoe.quant") for m in loaded.modules())
    assert (got.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.9
    torch.testing.assert_close(got, reference, atol=0.05, rtol=0.05)
    with pytest.raises(ValueError, match="quantized"):
        loaded.save_pretrained(tmp_path / "hf")
