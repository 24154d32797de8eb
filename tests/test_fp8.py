"""FP8 block-quantized checkpoints (DeepSeek-V3's published form) load dequantized.

The test writes a tiny one the way DeepSeek's are: every linear weight but the embedding,
lm_head and routers as float8 e4m3 with a ``weight_scale_inv`` per block, and
``quantization_config`` in config.json. A block size of 32 x 48 leaves partial blocks at
the edges of most matrices (DeepSeek: 128 x 128).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsmoe import ModelConfig
from dsmoe.model import Transformer

BLOCK = (32, 48)
E4M3 = torch.float8_e4m3fn


def _quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [O, I] -> (fp8 [O, I], scale_inv [ceil(O/32), ceil(I/48)]) with w ~ fp8 * scale."""
    bo, bi = BLOCK
    O, I = w.shape
    padded = torch.zeros(-(-O // bo) * bo, -(-I // bi) * bi)
    padded[:O, :I] = w.abs()
    amax = padded.view(padded.shape[0] // bo, bo, padded.shape[1] // bi, bi).amax(dim=(1, 3))
    scale = (amax / 448.0).clamp(min=1e-12)  # [O/bo, I/bi]
    full = scale.repeat_interleave(bo, 0).repeat_interleave(bi, 1)[:O, :I]
    return (w / full).to(E4M3), scale


def _reference(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    bo, bi = BLOCK
    O, I = q.shape
    return q.float() * scale.repeat_interleave(bo, 0).repeat_interleave(bi, 1)[:O, :I]


def _is_quantized(name: str, t: torch.Tensor) -> bool:
    return t.dim() == 2 and not name.endswith(("embed_tokens.weight", "lm_head.weight",
                                               "mlp.gate.weight"))


@pytest.fixture
def fp8_dir(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A tiny V3 directory in FP8, and the dequantized value of every quantized weight."""
    cfg = ModelConfig.preset("tiny-v3").replace(vocab_size=256, num_hidden_layers=2)
    torch.manual_seed(0)
    Transformer(cfg).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    expected = {}
    for name in [n for n, t in tensors.items() if _is_quantized(n, t)]:
        q, scale = _quantize(tensors[name])
        tensors[name], tensors[name + "_scale_inv"] = q, scale
        expected[name] = _reference(q, scale)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3",
                                     "quant_method": "fp8", "weight_block_size": list(BLOCK)}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path, expected


def _hf_view(model: Transformer) -> dict[str, torch.Tensor]:
    from dsmoe.checkpoint.hf import _hf_groups, _savable_state_dict

    return {k: v for group in _hf_groups(_savable_state_dict(model)) for k, v in group.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_weights_are_dequantized_block_by_block(fp8_dir, dtype: torch.dtype) -> None:
    directory, expected = fp8_dir
    model = Transformer.from_pretrained(directory, dtype=dtype)
    loaded = _hf_view(model)
    assert any("experts.0.gate_proj" in n for n in expected), "experts are quantized too"
    for name, value in expected.items():
        assert loaded[name].dtype == dtype
        assert torch.equal(loaded[name], value.to(dtype)), name
    assert "quantization_config" not in model.config.extra, "the loaded model is not FP8"
    model(torch.randint(0, 256, (1, 5)))


def test_saving_an_fp8_loaded_model_writes_plain_weights(fp8_dir, tmp_path: Path) -> None:
    directory, expected = fp8_dir
    Transformer.from_pretrained(directory).save_pretrained(tmp_path / "out")
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
    again = load_file(tmp_path / "out" / "model.safetensors")
    assert not any(n.endswith("_scale_inv") for n in again)
    name = next(iter(expected))
    assert torch.equal(again[name], expected[name])


def test_fp8_weight_without_its_scale_is_named(fp8_dir) -> None:
    directory, expected = fp8_dir
    tensors = load_file(directory / "model.safetensors")
    name = next(iter(expected))
    del tensors[name + "_scale_inv"]
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"unsupported stored dtype: {name} \(F8_E4M3\)"):
        Transformer.from_pretrained(directory)


def test_fp8_scale_of_the_wrong_shape_is_named(fp8_dir) -> None:
    directory, expected = fp8_dir
    tensors = load_file(directory / "model.safetensors")
    name = next(iter(expected))
    tensors[name + "_scale_inv"] = torch.ones(1, 1)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    native = name.removeprefix("model.")
    with pytest.raises(ValueError, match=rf"{native}: scale_inv of a \[\d+, \d+\] weight has "
                                         r"shape \[1, 1\]"):
        Transformer.from_pretrained(directory)


def test_info_counts_an_fp8_directory_without_its_scales(fp8_dir, capsys) -> None:
    from dsmoe.cli import main

    directory, _ = fp8_dir
    assert main(["info", str(directory)]) == 0
    out = capsys.readouterr().out
    assert "F8_E4M3" in out and "matches the config" in out
