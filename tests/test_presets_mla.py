"""The DeepSeek-V2 / V2-Lite / V3 presets and their parameter counts (``dsmoe info``), and
training the CPU-sized MLA presets ``tiny-v2`` / ``tiny-v3`` end to end."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import reference_file

from dsmoe import ModelConfig
from dsmoe.cli import main
from dsmoe.model import LatentCache, Transformer
from dsmoe.params import count_parameters, mtp_parameters
from dsmoe.train import loop
from dsmoe.train.config import TrainConfig


@pytest.mark.parametrize("preset, model", [("deepseek-v2-lite", "deepseek-v2-lite"),
                                           ("deepseek-v3", "deepseek-v3")])
def test_presets_equal_the_released_configs(preset: str, model: str) -> None:
    real = ModelConfig.from_hf(json.loads(reference_file(model, "config.json").read_text()),
                               warn_unknown=False)
    ours = ModelConfig.preset(preset)
    for f in dataclasses.fields(ours):
        if f.compare:
            assert getattr(ours, f.name) == getattr(real, f.name), f.name


def test_published_totals() -> None:
    """V2-Lite 15.7B total / 2.4B active (lm_head, no input embedding), V2 236B / 21B,
    V3 671B / 37B plus 14B in the MTP module (684.5B stored, "685B"). DeepSeek's active
    figures are truncated (V2-Lite 2.45B -> "2.4B", V3 37.55B -> "37B")."""
    lite = count_parameters(ModelConfig.preset("deepseek-v2-lite"))
    assert round(lite.total / 1e9, 1) == 15.7
    assert math.floor(lite.active_without_input_embedding / 1e8) == 24
    v2 = count_parameters(ModelConfig.preset("deepseek-v2"))
    assert round(v2.total / 1e9) == 236 and math.floor(v2.active / 1e9) == 21
    v3_cfg = ModelConfig.preset("deepseek-v3")
    v3 = count_parameters(v3_cfg)
    assert round(v3.total / 1e9) == 671 and math.floor(v3.active / 1e9) == 37
    assert 13.4e9 < mtp_parameters(v3_cfg) < 14e9
    assert round((v3.total + mtp_parameters(v3_cfg)) / 1e9, 1) == 684.5


@pytest.mark.parametrize("name", ["deepseek_v2", "deepseek_v3"])
@pytest.mark.parametrize("q_lora_rank, bias", [(None, False), (12, True)])
def test_counts_equal_transformers_tensor_shapes(name: str, q_lora_rank, bias: bool) -> None:
    """count_parameters is a sum over the tensors transformers' native model holds
    (buffers such as V3's correction bias aside)."""
    transformers = pytest.importorskip("transformers")
    cls = "DeepseekV2" if name == "deepseek_v2" else "DeepseekV3"
    hf_config = getattr(transformers, f"{cls}Config")(
        vocab_size=96, hidden_size=48, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
        n_shared_experts=2, num_experts_per_tok=2, n_group=2, topk_group=1, kv_lora_rank=16,
        q_lora_rank=q_lora_rank, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6,
        first_k_dense_replace=1, attention_bias=bias)
    model = getattr(transformers, f"{cls}ForCausalLM")(hf_config)
    stored = sum(p.numel() for p in model.parameters())
    assert count_parameters(ModelConfig.from_hf(hf_config.to_dict())).total == stored


@pytest.mark.parametrize("preset", ["tiny-v2", "tiny-v3"])
def test_tiny_mla_presets_build_and_count(preset: str) -> None:
    cfg = ModelConfig.preset(preset)
    model = Transformer(cfg)
    assert cfg.attention_type == "mla"
    assert model.num_parameters() == count_parameters(cfg).total
    assert model.num_parameters(active=True) == count_parameters(cfg).active
    assert isinstance(model.new_cache(1, 8), LatentCache)


def test_info_reports_mla_conventions_and_mtp(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "deepseek-v2-lite"]) == 0
    out = capsys.readouterr().out
    assert "MLA: full q_proj, kv_lora_rank 512" in out and "576 values per token" in out
    assert "2.45B without the input embedding" in out
    assert "2.66B active per token with embedding and lm_head" in out
    assert main(["info", "deepseek-v3"]) == 0
    out = capsys.readouterr().out
    assert "671.03B total" in out
    assert "MTP          + 13.46B in 1 multi-token-prediction layer(s)" in out


def test_info_on_a_v3_directory_sets_mtp_tensors_aside(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import load_file, save_file

    cfg = ModelConfig.preset("tiny-v3").replace(num_nextn_predict_layers=1, vocab_size=256)
    Transformer(cfg).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.4.eh_proj.weight"] = torch.zeros(128, 256)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    assert main(["info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "matches the config" in out
    assert f"1 multi-token-prediction tensors ({math.prod((128, 256)) / 1e3:.2f}K" in out
    Transformer.from_pretrained(tmp_path)  # and loading ignores it


@pytest.mark.parametrize("preset, routing", [("tiny-v2", "v2"), ("tiny-v3", "v3")])
def test_train_tiny_mla_preset(preset: str, routing: str, tmp_path: Path) -> None:
    corpus = tmp_path / "data"
    corpus.mkdir()
    (corpus / "a.py").write_text("".join(f"def f_{i}(x):\n    return x + {i}\n"
                                         for i in range(300)))
    cfg = TrainConfig(preset=preset, routing=routing, data=str(corpus), out=str(tmp_path / "run"),
                      cache_dir=str(tmp_path / "cache"), max_steps=4, batch_size=2, seq_len=32,
                      log_every=2, eval_every=4, eval_batches=1, checkpoint_every=4,
                      warmup_steps=1, samples=0, overrides=("num_hidden_layers=2",))
    result = loop.train(cfg, quiet=True)
    assert result.status == "finished"
    exported = Transformer.from_pretrained(tmp_path / "run" / "model")
    assert exported.config.model_type == ModelConfig.preset(preset).model_type
    assert exported.config.attention_type == "mla"


def test_plan_counts_mla_attention_in_its_expanded_widths() -> None:
    """Attention FLOPs and activations use MLA's per-head widths (qk 192, v 128 for V3),
    not hidden_size / heads (56 for V3)."""
    from dsmoe.plan import activation_bytes_per_token, forward_flops_per_token
    from dsmoe.params import attention_widths

    v3 = ModelConfig.preset("deepseek-v3")
    assert attention_widths(v3) == (128 * 192, 128 * 192, 128 * 128, 128 * 128)
    counts = count_parameters(v3)
    matmul = counts.active - counts.embedding - counts.norms
    S = 4096
    assert forward_flops_per_token(v3, S) == 2.0 * matmul + 2.0 * 61 * (128 * 320) * S
    mha = ModelConfig.preset("deepseek-moe-16b")
    q = 16 * 128
    assert forward_flops_per_token(mha, S) == pytest.approx(
        2.0 * (count_parameters(mha).active - count_parameters(mha).embedding
               - count_parameters(mha).norms) + 4.0 * 28 * q * S)
    assert activation_bytes_per_token(v3, "bf16") > activation_bytes_per_token(
        v3.replace(num_attention_heads=64, num_key_value_heads=64), "bf16")
    assert main(["plan", "--preset", "deepseek-v2-lite", "--devices", "8"]) == 0
