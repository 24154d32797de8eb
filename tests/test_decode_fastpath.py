"""Decode-speed choices that must not change results.

- The grouped-GEMM probe is cached per process, so its answer must not depend on the grad
  mode of the first MoE forward (generation runs under ``inference_mode``).
- ``Transformer.set_matmul_layout`` changes strides only: the same parameters and values,
  the same logits (fp32, atol 1e-5: BLAS may sum in another order), the same greedy tokens,
  and bit-identical checkpoints.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dsmoe.checkpoint.hf import weight_files
from dsmoe.config import ModelConfig
from dsmoe.model import Transformer
from dsmoe.moe.grouped_gemm import grouped_mm_supported

ATOL, RTOL = 1e-5, 1e-4


PROBE = grouped_mm_supported  # cached per (device, dtype)


@pytest.fixture
def clean_probe():
    PROBE.cache_clear()
    yield
    PROBE.cache_clear()


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch without _grouped_mm")
@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
def test_grouped_mm_probe_ignores_the_callers_grad_mode(clean_probe, mode: str) -> None:
    with torch.enable_grad():
        expected = PROBE("cpu", torch.float32)
    PROBE.cache_clear()
    ctx = torch.inference_mode() if mode == "inference_mode" else torch.no_grad()
    with ctx:
        got = PROBE("cpu", torch.float32)
    assert expected, "torch._grouped_mm should work on CPU fp32 with torch >= 2.9"
    assert got == expected, f"probe under {mode} answered {got}, with grad {expected}"


def _model(**changes) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny").replace(
        vocab_size=97, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=3, moe_intermediate_size=32, intermediate_size=96,
        initializer_range=0.2, **changes)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for layer in model.moe_layers():
            layer.gate.weight.normal_(std=1.0)  # decisive routing: no near-ties
    return model


def _input_major(t: torch.Tensor) -> bool:
    return t.transpose(-2, -1).is_contiguous()


@pytest.mark.parametrize("tied", [False, True])
def test_input_major_layout_changes_strides_only(tied: bool) -> None:
    model = _model(tie_word_embeddings=tied)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
    greedy = model.generate(ids, max_new_tokens=6)

    assert model.set_matmul_layout("input_major") is model
    assert dict(model.named_parameters()) == params  # the same Parameter objects
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, before[name], atol=0, rtol=0, msg=name)
    moe = model.moe_layers()[0]
    assert _input_major(model.layers[0].self_attn.q_proj.weight)
    assert _input_major(moe.experts.gate_up_proj) and _input_major(moe.experts.down_proj)
    assert model.embed_tokens.weight.is_contiguous()  # lookup rows stay contiguous
    assert _input_major(model.lm_head.weight) != tied
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL,
                               msg=lambda m: f"input-major logits drift: {m}")
    assert torch.equal(model.generate(ids, max_new_tokens=6), greedy)

    model.set_matmul_layout("output_major")
    assert all(p.is_contiguous() for p in model.parameters())
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, before[name], atol=0, rtol=0, msg=name)


def test_input_major_layout_saves_the_same_checkpoint(tmp_path: Path) -> None:
    model = _model()
    model.save_pretrained(tmp_path / "plain")
    model.set_matmul_layout("input_major").save_pretrained(tmp_path / "input_major")
    for which in ("plain", "input_major"):
        files = sorted(set(weight_files(tmp_path / which).values()))
        assert len(files) == 1, files
    plain = load_file(sorted(set(weight_files(tmp_path / "plain").values()))[0])
    relaid = load_file(sorted(set(weight_files(tmp_path / "input_major").values()))[0])
    assert plain.keys() == relaid.keys()
    for name in plain:
        assert torch.equal(plain[name], relaid[name]), name


def test_input_major_layout_survives_a_training_step() -> None:
    """Gradients and an optimizer step work on transposed strides (SGD: Adam's m/sqrt(v)
    would amplify summation-order noise in near-zero gradients to full-size steps)."""
    ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(2))
    results = []
    for layout in ("output_major", "input_major"):
        model = _model().train().set_matmul_layout(layout)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        out = model(ids)
        loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1),
                                                 ids[:, 1:].flatten()) + out.aux_loss
        loss.backward()
        opt.step()
        results.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    for name, value in results[0].items():
        torch.testing.assert_close(results[1][name], value, atol=ATOL, rtol=RTOL, msg=name)


def test_unknown_layout_is_rejected() -> None:
    with pytest.raises(ValueError, match="layout must be one of"):
        _model().set_matmul_layout("column_major")
