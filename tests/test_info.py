"""Parameter counting (``dsmoe.params``) and the ``dsmoe info`` command (presets, HF
directories, config files and GGUF files).

The reference numbers come from the real checkpoint's tensors.json (names and shapes of
deepseek-moe-16b-base), never from constants typed into the test.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import gguf
import pytest
import torch

from conftest import reference_file
from dsmoe import ModelConfig
from dsmoe.checkpoint.gguf import write_model_gguf
from dsmoe.cli import main
from dsmoe.model import Transformer
from dsmoe.params import (WEIGHT_FORMATS, count_parameters, decode_step_bytes, weight_bytes,
                          weight_memory)


@pytest.fixture(scope="module")
def real() -> tuple[ModelConfig, dict[str, list[int]]]:
    config = ModelConfig.from_json_file(str(reference_file("deepseek-moe-16b-base", "config.json")))
    shapes = json.loads(reference_file("deepseek-moe-16b-base", "tensors.json").read_text())
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


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("dtype, fmt", [(torch.float32, "fp32"), (torch.bfloat16, "bf16")])
def test_decode_step_bytes_equal_the_built_model_tensors(dtype: torch.dtype, fmt: str,
                                                         tied: bool) -> None:
    """Every kind of weight a decode step reads, against the bytes of the model's own
    tensors: routed experts in proportion to the experts hit, the rest whole, and B rows of
    the embedding (whose matrix is the lm_head when tied)."""
    cfg = ModelConfig.preset("tiny").replace(tie_word_embeddings=tied)
    model = Transformer(cfg).to(dtype)
    by_kind: dict[str, int] = {}
    for name, p in model.named_parameters():  # a tied matrix once, as embed_tokens
        kind = _kind(name if name == "lm_head.weight" else f"model.{name}")
        by_kind[kind] = by_kind.get(kind, 0) + p.nbytes
    E, B, D = cfg.n_routed_experts, 5, cfg.hidden_size
    one_expert = [sum(p.nbytes for p in layer.experts.parameters()) // E
                  for layer in model.moe_layers()]
    hit = [1, E // 2, E]  # one per MoE layer of tiny
    step = decode_step_bytes(cfg, fmt, B, hit)
    assert step.routed_experts == sum(h * n for h, n in zip(hit, one_expert))
    for kind in ("attention", "norms", "dense_mlp", "routers", "shared_experts"):
        assert getattr(step, kind) == by_kind[kind], kind
    assert step.lm_head == by_kind["embedding" if tied else "lm_head"]
    assert step.embedding == B * D * dtype.itemsize
    every = decode_step_bytes(cfg, fmt, B, [E] * len(hit))
    untied_embedding = 0 if tied else by_kind["embedding"]
    assert every.total == sum(by_kind.values()) - untied_embedding + B * D * dtype.itemsize


def test_decode_step_bytes_reject_impossible_routing() -> None:
    cfg = ModelConfig.preset("tiny")
    with pytest.raises(ValueError, match="experts_hit has 2 entries for 3 MoE layers"):
        decode_step_bytes(cfg, "fp32", 1, [1, 1])
    with pytest.raises(ValueError, match=r"\[0, n_routed_experts=16\], got \[1, 17, 1\]"):
        decode_step_bytes(cfg, "fp32", 1, [1, 17, 1])
    with pytest.raises(ValueError, match="batch must be >= 1, got 0"):
        decode_step_bytes(cfg, "fp32", 0, [1, 1, 1])


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
    assert main(["info", str(tmp_path / "m")]) == 1  # a checkpoint that would not load fails
    assert "DOES NOT match the config" in capsys.readouterr().out


def test_info_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "no-such-model"]) == 2
    assert "neither an HF directory, a config.json file, a .gguf file nor a preset" in (
        capsys.readouterr().err)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert main(["info", str(tmp_path / "config.json")]) == 2
    assert "model_type 'llama' is not supported" in capsys.readouterr().err
    (tmp_path / "weights.bin").write_bytes(b"\0" * 8)
    assert main(["info", str(tmp_path / "weights.bin")]) == 2
    assert ".gguf files and presets" in capsys.readouterr().err


# --- GGUF files ---------------------------------------------------------------------------
def _gguf_config(**overrides) -> ModelConfig:  # noqa: ANN003
    """Rows of 32 or 64, so Q8_0 applies to every matrix the writer quantizes."""
    return ModelConfig.preset("tiny").replace(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
        moe_layer_freq=1, **overrides)


def _info_json(model: Path, capsys: pytest.CaptureFixture[str], status: int = 0) -> dict:
    assert main(["info", str(model), "--json"]) == status
    return json.loads(capsys.readouterr().out)


def _stored_types(path: Path) -> dict[str, int]:
    """Tensors per type, counted with the gguf package's own reader (the oracle)."""
    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(path).tensors:
        name = gguf.GGMLQuantizationType(int(t.tensor_type)).name
        counts[name] = counts.get(name, 0) + 1
    return counts


@pytest.mark.parametrize("quant", ["f32", "q8_0"])
def test_info_on_a_gguf_matches_the_hf_directory(tmp_path: Path, quant: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    model = Transformer(_gguf_config()).eval()
    model.save_pretrained(tmp_path / "hf")
    write_model_gguf(model, tmp_path / "m.gguf", quant=quant)
    from_hf = _info_json(tmp_path / "hf", capsys)
    from_gguf = _info_json(tmp_path / "m.gguf", capsys)

    for key in ("layers", "dense_layers", "moe_layers", "routed_experts", "shared_experts",
                "experts_per_token", "expert_width", "dense_width", "hidden_size",
                "attention_heads", "kv_heads", "vocab_size", "parameters",
                "weight_memory_bytes"):
        assert from_gguf[key] == from_hf[key], key
    assert from_gguf["parameters"]["total"] == count_parameters(model.config).total
    assert from_gguf["source"] == f"GGUF file {tmp_path / 'm.gguf'}"

    ckpt = from_gguf["checkpoint"]
    assert set(ckpt) == set(from_hf["checkpoint"]), "one JSON schema for both sources"
    assert ckpt["format"] == "gguf" and ckpt["files"] == 1
    assert ckpt["bytes"] == (tmp_path / "m.gguf").stat().st_size
    assert ckpt["parameters"] == from_hf["checkpoint"]["parameters"] == model.num_parameters()
    assert ckpt["matches_config"] and ckpt["problem"] is None
    types = _stored_types(tmp_path / "m.gguf")
    assert ckpt["tensor_types"] == types and ckpt["tensors"] == sum(types.values())
    assert ckpt["file_type"] == {"f32": "ALL_F32", "q8_0": "MOSTLY_Q8_0"}[quant]
    if quant == "q8_0":  # matrices quantized, norms and routers kept F32
        assert set(types) == {"Q8_0", "F32"}

    assert main(["info", str(tmp_path / "m.gguf")]) == 0
    out = capsys.readouterr().out
    assert "layers       3 (1 dense, 2 MoE)" in out
    assert "8 routed (top-2) + 1 shared per MoE layer" in out
    total = from_hf["parameters"]["total"]
    assert 1e3 <= total < 1e6 and f"{total / 1e3:.2f}K total" in out
    first, *rest = sorted(types.items(), key=lambda kv: (-kv[1], kv[0]))
    summary = ", ".join([f"{first[0]}: {first[1]} tensors"] + [f"{t}: {n}" for t, n in rest])
    assert f"({summary})" in out, out
    assert "matches the config" in out


def test_info_on_a_gguf_reads_no_tensor_data(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Describing a file must not dequantise (or even touch) a single tensor."""
    from dsmoe.checkpoint.gguf import reader

    write_model_gguf(Transformer(_gguf_config()).eval(), tmp_path / "m.gguf", quant="q8_0")

    def forbidden(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("dsmoe info read tensor data")

    monkeypatch.setattr(reader, "dequantize", forbidden)
    monkeypatch.setattr(reader.GGUFFile, "load", forbidden)
    assert _info_json(tmp_path / "m.gguf", capsys)["checkpoint"]["matches_config"]


def test_info_on_a_gguf_with_tied_embeddings_and_an_extension_less_name(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _gguf_config(tie_word_embeddings=True)
    write_model_gguf(Transformer(cfg).eval(), tmp_path / "model", quant="f32")  # magic, no suffix
    info = _info_json(tmp_path / "model", capsys)
    assert info["tie_word_embeddings"] and info["parameters"]["by_kind"]["lm_head"] == 0
    assert info["parameters"]["total"] == count_parameters(cfg).total
    assert info["checkpoint"]["parameters"] == count_parameters(cfg).total


def test_info_reports_a_gguf_whose_tensors_contradict_its_metadata(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Like a directory whose config does not match its weights: reported, exit status 1."""
    cfg = _gguf_config()
    write_model_gguf(Transformer(cfg).eval(), tmp_path / "m.gguf", quant="f32")
    data = (tmp_path / "m.gguf").read_bytes()
    key = b"deepseek.expert_feed_forward_length"
    at = data.index(key) + len(key)  # then the uint32 value type (4), then the value
    assert int.from_bytes(data[at + 4:at + 8], "little") == cfg.moe_intermediate_size
    patched = data[:at + 4] + (64).to_bytes(4, "little") + data[at + 8:]
    (tmp_path / "m.gguf").write_bytes(patched)
    assert main(["info", str(tmp_path / "m.gguf")]) == 1
    out = capsys.readouterr().out
    assert "width 64; routing" in out, "the config is the metadata's, as llama.cpp reads it"
    assert "DOES NOT match the config: metadata contradicts tensor shapes: " \
           "blk.1.ffn_gate_exps.weight is [8, 32, 64] in the file" in out
    info = _info_json(tmp_path / "m.gguf", capsys, status=1)
    assert info["checkpoint"]["parameters"] == count_parameters(cfg).total
    assert info["parameters"]["total"] == count_parameters(cfg.replace(
        moe_intermediate_size=64)).total
    assert not info["checkpoint"]["matches_config"]


def _one_error_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_info_gguf_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "m.gguf"
    write_model_gguf(Transformer(_gguf_config()).eval(), good, quant="q8_0")
    data = good.read_bytes()

    cut = tmp_path / "cut.gguf"  # the tensor data ends early
    cut.write_bytes(data[: len(data) - 1000])
    assert "truncated GGUF file: the tensor data ends early" in _one_error_line(
        ["info", str(cut)], capsys)
    cut.write_bytes(data[:12])  # inside the header
    assert "truncated GGUF file (12 bytes)" in _one_error_line(["info", str(cut)], capsys)
    cut.write_bytes(data[:200])  # inside the metadata
    assert "cannot parse GGUF (truncated or corrupt?)" in _one_error_line(
        ["info", str(cut)], capsys)

    other = tmp_path / "not.gguf"
    other.write_bytes(b"PK\3\4" + b"\0" * 100)
    assert "not a GGUF file" in _one_error_line(["info", str(other)], capsys)

    arch = tmp_path / "llama.gguf"
    writer = gguf.GGUFWriter(arch, "llama")
    writer.add_block_count(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert "GGUF architecture 'llama' is not supported" in _one_error_line(
        ["info", str(arch)], capsys)


def test_info_is_in_the_command_table(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "info" in capsys.readouterr().out
