"""Parameter counting (``dsmoe.params``) and the ``dsmoe info`` command.

The reference numbers come from the real checkpoint's tensors.json (names and shapes of
deepseek-moe-16b-base), never from constants typed into the test.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from dsmoe import ModelConfig
from dsmoe.cli import main
from dsmoe.model import Transformer
from dsmoe.params import WEIGHT_FORMATS, count_parameters, weight_bytes, weight_memory

REFERENCE = Path("/work/shared/reference/deepseek-moe-16b-base")
if not REFERENCE.is_dir():
    REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "deepseek-moe-16b-base"


@pytest.fixture(scope="module")
def real() -> tuple[ModelConfig, dict[str, list[int]]]:
    config = ModelConfig.from_json_file(str(REFERENCE / "config.json"))
    shapes = json.loads((REFERENCE / "tensors.json").read_text())
    return config, shapes


def _kind(name: str) -> str:
    """Classify a real tensor name the way ParameterCount splits parameters."""
    if name == "model.embed_tokens.weight":
        return "embedding"
    if name == "lm_head.weight":
        return "lm_head"
    if ".self_attn." in name:
        return "attention"
    if name.endswith("norm.weight"):
        return "norms"
    if ".mlp.experts." in name:
        return "routed_experts"
    if ".mlp.shared_experts." in name:
        return "shared_experts"
    if name.endswith(".mlp.gate.weight"):
        return "routers"
    assert re.search(r"\.mlp\.(gate|up|down)_proj\.weight$", name), name
    return "dense_mlp"


def test_16b_counts_equal_the_real_tensor_shapes(real) -> None:  # noqa: ANN001
    config, shapes = real
    by_kind: dict[str, int] = {}
    for name, shape in shapes.items():
        by_kind[_kind(name)] = by_kind.get(_kind(name), 0) + math.prod(shape)
    counts = count_parameters(config)
    for kind, n in by_kind.items():
        assert getattr(counts, kind) == n, kind
    assert counts.total == sum(by_kind.values())
    assert round(counts.total / 1e9, 1) == 16.4  # the paper's 16.4B


def test_16b_active_parameters(real) -> None:  # noqa: ANN001
    config, shapes = real
    counts = count_parameters(config)
    one_expert = sum(math.prod(s) for n, s in shapes.items() if ".mlp.experts.0." in n
                     and n.startswith("model.layers.1."))
    E, K = config.n_routed_experts, config.num_experts_per_tok
    unused = len(config.moe_layer_indices) * (E - K) * one_expert
    assert counts.active == counts.total - unused
    assert round(counts.active / 1e9, 1) == 2.8  # the paper's 2.8B activated
    assert counts.active_non_embedding == counts.active - 2 * config.vocab_size * config.hidden_size


@pytest.mark.parametrize("overrides", [
    {},
    dict(tie_word_embeddings=True, attention_bias=True),
    dict(num_key_value_heads=2, moe_layer_freq=2, first_k_dense_replace=0, n_shared_experts=None),
    dict(n_routed_experts=None, n_shared_experts=None, num_experts_per_tok=None),
    dict(scoring_func="sigmoid", topk_method="noaux_tc", n_group=4, topk_group=2),
])
def test_counts_match_the_built_model(overrides: dict) -> None:
    cfg = ModelConfig.preset("tiny").replace(**overrides)
    with torch.device("meta"):
        model = Transformer(cfg)
    counts = count_parameters(cfg)
    assert counts.total == model.num_parameters()
    assert counts.active == model.num_parameters(active=True)


def test_16b_counts_match_a_meta_built_model(real) -> None:  # noqa: ANN001
    config, _ = real
    with torch.device("meta"):
        model = Transformer(config)
    assert count_parameters(config).total == model.num_parameters()
    assert count_parameters(config).active == model.num_parameters(active=True)


def test_weight_memory_scales_with_bits() -> None:
    cfg = ModelConfig.preset("tiny")
    total = count_parameters(cfg).total
    memory = weight_memory(cfg)
    assert memory == {fmt: total * bits // 8 for fmt, bits in WEIGHT_FORMATS.items()}
    assert weight_bytes(3, "int4") == 2, "half bytes round up"
    with pytest.raises(ValueError, match="unknown weight format 'int3'"):
        weight_bytes(10, "int3")


# --- the command --------------------------------------------------------------------------
def test_info_preset_text(capsys: pytest.CaptureFixture[str], real) -> None:  # noqa: ANN001
    config, shapes = real
    assert main(["info", "deepseek-moe-16b"]) == 0
    out = capsys.readouterr().out
    total = sum(math.prod(s) for s in shapes.values())
    counts = count_parameters(config)
    assert f"{total / 1e9:.2f}B total" in out
    assert f"{counts.active / 1e9:.2f}B active per token" in out
    assert "28 (1 dense, 27 MoE)" in out
    assert "64 routed (top-6) + 2 shared per MoE layer" in out
    assert "embedding and lm_head included" in out, "the active convention is stated"
    for fmt, bits in WEIGHT_FORMATS.items():
        assert f"{fmt} {total * bits / 8 / 2**30:.2f} GiB" in out


def test_info_on_a_saved_directory_and_config_file(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    cfg = ModelConfig.preset("tiny").replace(vocab_size=256, num_hidden_layers=2)
    Transformer(cfg).save_pretrained(tmp_path / "m", max_shard_size=300_000)
    assert main(["info", str(tmp_path / "m"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    total = count_parameters(cfg).total
    assert info["parameters"]["total"] == total
    assert info["checkpoint"]["parameters"] == total and info["checkpoint"]["matches_config"]
    assert info["checkpoint"]["files"] > 1 and info["checkpoint"]["dtypes"] == ["F32"]
    assert info["moe_layers"] == 1 and info["experts_per_token"] == cfg.num_experts_per_tok

    assert main(["info", str(tmp_path / "m" / "config.json")]) == 0
    assert "layers       2 (1 dense, 1 MoE)" in capsys.readouterr().out


def test_info_reports_a_checkpoint_that_does_not_match(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    cfg = ModelConfig.preset("tiny").replace(vocab_size=256, num_hidden_layers=2)
    Transformer(cfg).save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    assert main(["info", str(tmp_path / "m")]) == 0
    assert "DOES NOT match the config" in capsys.readouterr().out


def test_info_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "no-such-model"]) == 2
    assert "neither an HF directory, a config.json file nor a preset" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert main(["info", str(tmp_path / "config.json")]) == 2
    assert "model_type 'llama' is not supported" in capsys.readouterr().err
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert main(["info", str(tmp_path / "m.gguf")]) == 2
    assert "error:" in capsys.readouterr().err


def test_info_is_in_the_command_table(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "info" in capsys.readouterr().out
