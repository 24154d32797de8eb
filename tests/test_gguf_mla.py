"""GGUF for MLA models (DeepSeek-V2 / V2-Lite / V3): llama.cpp's "deepseek2" architecture.

dsmoe's own round trip is exact at F32; a file laid out the way llama.cpp's converter lays
it out (kv_b_proj split per head, or kept whole as older converters did) loads to the same
weights; the real convert_hf_to_gguf.py (with DSMOE_LLAMA_CPP_DIR) and llama.cpp itself
(with llama-cpp-python) agree with dsmoe; the CLI commands accept such files.
"""

from __future__ import annotations

import importlib.util
import io
import os
import subprocess
import sys
import warnings
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import assert_close
from test_gguf import SAMPLES, TEXTS, hf_state, kl, make_model, write_llama_cpp_style

from dsmoe.checkpoint.gguf import (GGUFFile, llama_cpp_problems, load_gguf, read_gguf,
                                   write_model_gguf)
from dsmoe.cli import main
from dsmoe.config import ModelConfig
from dsmoe.tokenizer import Tokenizer

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}
# Rows of 32 wherever llama.cpp's q8_0 needs them (D, Q, C, n); r and v smaller.
BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
            n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
            kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=8, v_head_dim=16,
            first_k_dense_replace=1, max_position_embeddings=64, bos_token_id=None,
            eos_token_id=None, aux_loss_alpha=0.0, seq_aux=False, torch_dtype="float32",
            rms_norm_eps=1e-6)
V2 = dict(BASE, model_type="deepseek_v2", architectures=("DeepseekV2ForCausalLM",),
          q_lora_rank=None, topk_method="greedy")
V3 = dict(BASE, model_type="deepseek_v3", architectures=("DeepseekV3ForCausalLM",),
          q_lora_rank=32, scoring_func="sigmoid", topk_method="noaux_tc", n_group=4,
          topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5)
CASES = {
    "v2_lite": V2,
    "v2_qlora_scaled_dense0_tied": dict(V2, q_lora_rank=32, routed_scaling_factor=2.0,
                                        first_k_dense_replace=0, tie_word_embeddings=True),
    "v3_yarn": dict(V3, rope_scaling=YARN),
    "v3_no_qlora_dense2_yarn_mscale1": dict(
        V3, q_lora_rank=None, num_hidden_layers=4, first_k_dense_replace=2,
        rope_scaling=dict(YARN, mscale=1.0, mscale_all_dim=1.0)),
}
# RoPE in halves (transformers' rope_interleave=false): written in llama.cpp's pair order.
HALVES = {"v3_rope_halves": dict(V3, rope_scaling=YARN, extra={"rope_interleave": False}),
          "v2_lite_rope_halves": dict(V2, extra={"rope_interleave": False})}


def expected_state(model) -> dict[str, torch.Tensor]:
    """The HF tensors a GGUF holds: a tied lm_head is the embedding, not a tensor of its own."""
    state = hf_state(model)
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def mla_model(case: str, std: float = 0.15):
    model = make_model(ModelConfig(**{**CASES, **HALVES}[case]), std=std)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # V3: a correction bias that changes which experts are picked
        for layer in model.moe_layers():
            if getattr(layer.gate, "e_score_correction_bias", None) is not None:
                layer.gate.e_score_correction_bias.copy_(torch.randn(8, generator=gen) * 0.1)
    return model


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train_bpe(TEXTS, vocab_size=300)


# --- dsmoe <-> dsmoe --------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_f32_round_trip_is_exact(tmp_path: Path, case: str) -> None:
    model = mla_model(case)
    path = tmp_path / "m.gguf"
    write_model_gguf(model, path, quant="f32")
    f = GGUFFile(path)
    assert f.get("general.architecture") == "deepseek2"
    assert "blk.0.attn_k_b.weight" in f.tensors and "blk.0.attn_kv_b.weight" not in f.tensors
    config, state, _ = read_gguf(path)
    assert config == model.config
    expected = expected_state(model)
    assert state.keys() == expected.keys()
    for name in expected:
        assert torch.equal(state[name], expected[name]), name
    ids = torch.randint(0, 320, (2, 24))  # past YaRN's original 16 positions
    assert torch.equal(load_gguf(path)(ids).logits, model(ids).logits)


# Measured KL (nats) / top-1: v2_lite bf16 1.9e-4 / 1.0, q8_0 8.4e-4 / 0.96; v3_yarn q8_0
# 2.4e-2 / 0.90-0.96: V3's group-limited sigmoid routing with a correction bias flips a token's
# experts on small weight changes, which the softmax V2 router absorbs.
@pytest.mark.parametrize("case, quant, max_kl, min_top1", [("v2_lite", "bf16", 1e-3, 0.95),
                                                          ("v2_lite", "q8_0", 3e-3, 0.9),
                                                          ("v3_yarn", "q8_0", 6e-2, 0.8)])
def test_quantized_round_trip_within_tolerance(tmp_path: Path, case: str, quant: str,
                                               max_kl: float, min_top1: float) -> None:
    model = mla_model(case)
    path = tmp_path / f"m-{quant}.gguf"
    write_model_gguf(model, path, quant=quant)
    types = {t.name: gguf.GGMLQuantizationType(int(t.tensor_type))
             for t in GGUFFile(path).tensors.values()}
    assert types["blk.1.attn_kv_a_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert types["blk.1.ffn_gate_inp.weight"] == gguf.GGMLQuantizationType.F32
    wanted = gguf.GGMLQuantizationType[quant.upper()]
    assert types["blk.1.attn_k_b.weight"] == types["blk.1.attn_v_b.weight"] == wanted
    ids = torch.randint(0, 320, (4, 24))
    ref, out = model(ids).logits, load_gguf(path)(ids).logits
    agree = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert kl(ref, out) <= max_kl, f"{case} {quant}: KL {kl(ref, out):.2e}"
    assert agree >= min_top1, f"{case} {quant}: top-1 agreement {agree:.3f}"


@pytest.mark.parametrize("case", ["v2_lite", "v2_lite_rope_halves"])
def test_q4_0_gguf_loads_as_int4_with_hf_rows(tmp_path: Path, case: str) -> None:
    """An MLA Q4_0 GGUF loads with quant="int4": the Q4_0 matrices are taken as stored, and
    kv_b_proj, which llama.cpp splits into attn_k_b and attn_v_b per head (k transposed),
    is joined from floats, as quantizing the dequantized model would give."""
    from dsmoe.quant import QuantMatrix, load_model, quantize_model

    path = tmp_path / "m.gguf"
    write_model_gguf(mla_model(case), path, quant="q4_0")
    floats = load_model(path)  # the Q4_0 values dequantized
    int4 = load_model(path, quant="int4")
    reference = dict(floats.named_parameters())
    stored = 0
    for name, module in int4.named_modules():
        if isinstance(module, QuantMatrix) and module.symmetric and "kv_b_proj" not in name:
            weight = reference.get(f"{name}.weight", reference.get(name))  # linear / experts
            torch.testing.assert_close(module.dequantize(), weight, rtol=2**-7, atol=1e-7,
                                       msg=name)
            stored += 1
    assert stored > 0
    # the same as quantizing the dequantized model (Q4_0's values are their own best int4)
    expected = quantize_model(floats, 4, 32, symmetric=True)
    ids = torch.randint(0, 320, (2, 12))
    with torch.no_grad():
        want, got = expected(ids).logits, int4(ids).logits
    assert torch.equal(got, want)


@pytest.mark.parametrize("case", HALVES)
def test_rope_halves_are_written_in_llama_cpp_pair_order(tmp_path: Path, case: str) -> None:
    """q's and kv_a's rope rows are reordered, so the file holds a pair-order model with the
    same logits (llama.cpp runs it too: test_llama_cpp_logits_match_dsmoe)."""
    model = mla_model(case)
    path = tmp_path / "halves.gguf"
    write_model_gguf(model, path, quant="f32")
    loaded = load_gguf(path)
    assert loaded.config == model.config and loaded.config.extra["rope_interleave"] is True
    ids = torch.randint(0, 320, (2, 24))
    assert_close(loaded(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5,
                 what=f"a rope-in-halves model written in pair order ({case})")
    attn = "self_attn.q_b_proj.weight" if model.config.q_lora_rank else "self_attn.q_proj.weight"
    ours, theirs = hf_state(model)[f"model.layers.0.{attn}"], hf_state(loaded)[
        f"model.layers.0.{attn}"]
    assert torch.equal(ours[:32], theirs[:32]) and not torch.equal(ours[32:40], theirs[32:40])


def test_mtp_layer_is_skipped_on_export_with_a_warning(tmp_path: Path, tokenizer) -> None:
    """A V3 checkpoint's multi-token-prediction layer (layer L) is left out of the GGUF, as
    llama.cpp's converter does; the file's config says it has none."""
    from safetensors.torch import load_file, save_file

    model = mla_model("v3_yarn")
    cfg = model.config.replace(num_nextn_predict_layers=1)
    model.config = cfg
    model.save_pretrained(tmp_path / "hf")
    tokenizer.save(tmp_path / "hf")
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    tensors["model.layers.3.eh_proj.weight"] = torch.zeros(64, 128)
    tensors["model.layers.3.enorm.weight"] = torch.ones(64)
    save_file(tensors, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "v3.gguf"
    with pytest.warns(UserWarning, match=r"multi-token-prediction layer \(2 tensors of layer 3"
                                         r"\) is not exported"):
        assert main(["export", str(tmp_path / "hf"), "--format", "gguf", "--out", str(out),
                     "--quant", "f32"]) == 0
    loaded = load_gguf(out)
    assert loaded.config == cfg.replace(num_nextn_predict_layers=0,  # ids: the tokenizer's
                                        bos_token_id=tokenizer.bos_id,
                                        eos_token_id=tokenizer.eos_id)
    ids = torch.randint(0, 320, (2, 20))
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_llama_cpp_problems_of_mla_settings() -> None:
    ok = ModelConfig(**CASES["v3_yarn"])
    assert llama_cpp_problems(ok) == []
    assert llama_cpp_problems(ModelConfig(**V2)) == []
    grouped_v2 = ModelConfig(**dict(V2, topk_method="group_limited_greedy", n_group=4,
                                    topk_group=2))
    assert any("top-2 sum" in p for p in llama_cpp_problems(grouped_v2))
    mscale = ModelConfig(**dict(V3, rope_scaling=dict(YARN, mscale=1.0, mscale_all_dim=0.8)))
    assert llama_cpp_problems(mscale) == ["yarn mscale != mscale_all_dim (llama.cpp assumes "
                                          "they are equal)"]
    assert any("device_limited" in p for p in llama_cpp_problems(ModelConfig(**dict(
        V2, topk_method="device_limited", n_devices=2, max_devices_per_token=1))))


def test_attention_bias_cannot_be_written(tmp_path: Path) -> None:
    model = make_model(ModelConfig(**dict(V2, attention_bias=True)))
    with pytest.raises(ValueError, match="attention_bias=true: llama.cpp's \"deepseek2\" .* "
                                         "has no attention biases"):
        write_model_gguf(model, tmp_path / "x.gguf", quant="f32")
    assert not list(tmp_path.iterdir())


# --- llama.cpp's converter layout, written independently ------------------------------------
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kv_b", ["split", "whole"])
def test_llama_cpp_layout_file_loads_to_the_same_weights(tmp_path: Path, tokenizer, case: str,
                                                         kv_b: str) -> None:
    model = mla_model(case)
    path = tmp_path / "converted.gguf"
    write_llama_cpp_style(path, model, tokenizer, kv_b=kv_b)
    config, state, _ = read_gguf(path)
    c = model.config
    for key in ("model_type", "architectures", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
                "qk_rope_head_dim", "v_head_dim", "scoring_func", "topk_method", "norm_topk_prob",
                "routed_scaling_factor", "first_k_dense_replace", "tie_word_embeddings",
                "num_key_value_heads", "rope_scaling"):
        assert getattr(config, key) == getattr(c, key), key
    if c.topk_method == "noaux_tc":
        assert (config.n_group, config.topk_group) == (c.n_group, c.topk_group)
    expected = expected_state(model)
    assert state.keys() == expected.keys()
    for name in expected:
        assert torch.equal(state[name], expected[name]), name
    ids = torch.randint(0, 320, (2, 24))
    assert_close(load_gguf(path)(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5,
                 what=f"logits from a llama.cpp-layout deepseek2 GGUF ({case}, {kv_b})")


# --- the real converter -------------------------------------------------------------------
_LLAMA_DIR = os.environ.get("DSMOE_LLAMA_CPP_DIR")
# The test tokenizer is no published model, so the converter cannot recognise its
# pre-tokenizer by hash; everything else runs as shipped (vendored gguf-py first, only here).
_RUN_CONVERTER = """
import runpy, sys
llama = sys.argv[1]
sys.path[:0] = [llama + "/gguf-py", llama]
import conversion.base
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv = [llama + "/convert_hf_to_gguf.py"] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def convert_with_llama_cpp(tmp_path: Path, model, tokenizer: Tokenizer, outtype: str) -> Path:
    """``model`` saved as an HF directory and converted by convert_hf_to_gguf.py."""
    model.save_pretrained(tmp_path / "hf")
    tokenizer.save(tmp_path / "hf")
    out = tmp_path / "converted.gguf"
    proc = subprocess.run([sys.executable, "-c", _RUN_CONVERTER, _LLAMA_DIR, str(tmp_path / "hf"),
                           "--outfile", str(out), "--outtype", outtype],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.skipif(not _LLAMA_DIR or not (Path(_LLAMA_DIR) / "convert_hf_to_gguf.py").is_file(),
                    reason="set DSMOE_LLAMA_CPP_DIR to a llama.cpp checkout to run its converter")
@pytest.mark.parametrize("case", ["v2_lite", "v3_yarn", "v2_qlora_scaled_dense0_tied"])
def test_llama_cpp_converter_output_loads_in_dsmoe(tmp_path: Path, tokenizer, case: str) -> None:
    model = mla_model(case)
    out = convert_with_llama_cpp(tmp_path, model, tokenizer, "f32")
    assert "blk.0.attn_k_b.weight" in GGUFFile(out).tensors
    loaded = load_gguf(out)
    assert loaded.config.model_type == model.config.model_type
    ids = torch.randint(0, 320, (2, 24))
    assert_close(loaded(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5,
                 what=f"dsmoe on convert_hf_to_gguf.py's output ({case})")


# --- llama.cpp itself ------------------------------------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python is not installed")
@pytest.mark.parametrize("case", [*CASES, *HALVES])
@pytest.mark.parametrize("quant", ["f32", "q8_0"])
def test_llama_cpp_logits_match_dsmoe(tmp_path: Path, tokenizer, case: str, quant: str) -> None:
    """llama.cpp runs dsmoe's deepseek2 file (absorbed MLA over its latent cache) with
    dsmoe's logits at every position, past YaRN's original context (logits span about +-4).
    Its cache is kept in f32 here: with its default f16 cache the f32 difference is 2e-3.
    Measured: f32 max |diff| 4e-6; q8_0 mean |diff| 1e-2 - 7e-2 with 80-100 % top-1 agreement
    (llama.cpp's Q8_0 matmuls also quantize the activations to 8 bits, and on random weights
    that flips V3's sigmoid/bias/group routing for some tokens)."""
    import llama_cpp

    model = mla_model(case, std=0.1)
    path = tmp_path / f"m-{quant}.gguf"
    write_model_gguf(model, path, tokenizer, quant=quant)
    f32_cache = dict(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False,
                          n_threads=1, **f32_cache)
    ids = tokenizer.encode("def add(a, b):\n    return a + b\nThe quick brown fox")[:30]
    assert len(ids) > 16
    llm.eval(ids)
    theirs = torch.tensor(np.array(llm.scores[: len(ids)]), dtype=torch.float32)
    ours = load_gguf(path)(torch.tensor([ids])).logits[0]
    if quant == "f32":
        assert_close(theirs, ours, atol=1e-4, rtol=0, what=f"llama.cpp vs dsmoe ({case})")
        assert torch.equal(theirs.argmax(-1), ours.argmax(-1))
        return
    mean = (theirs - ours).abs().mean().item()
    agree = (theirs.argmax(-1) == ours.argmax(-1)).float().mean().item()
    assert mean <= 0.1 and agree >= 0.75, f"{case} q8_0: mean |diff| {mean:.3f}, top-1 {agree:.2f}"


# --- the command line --------------------------------------------------------------------------
def test_cli_commands_accept_a_deepseek2_gguf(tmp_path: Path, tokenizer, capsys,
                                              monkeypatch) -> None:
    model = mla_model("v3_yarn")
    model.save_pretrained(tmp_path / "hf")
    tokenizer.save(tmp_path / "hf")
    path = tmp_path / "v3.gguf"
    assert main(["export", str(tmp_path / "hf"), "--format", "gguf", "--out", str(path),
                 "--quant", "f32"]) == 0
    assert main(["info", str(path)]) == 0
    info = capsys.readouterr().out
    assert "matches the config" in info
    assert main(["generate", str(path), "--prompt", SAMPLES[0], "--max-new-tokens", "4",
                 "--temperature", "0"]) == 0
    ids = tokenizer.encode(SAMPLES[0])
    expected = model.generate(torch.tensor([ids]), max_new_tokens=4, temperature=0.0)[0]
    assert capsys.readouterr().out.rstrip("\n").endswith(tokenizer.decode(expected.tolist())
                                                         .rstrip("\n"))
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello world\n/exit\n"))
    assert main(["chat", str(path), "--max-new-tokens", "3"]) == 0
    chat = capsys.readouterr()
    assert chat.out.count("Assistant:") == 1 and "Traceback" not in chat.err
    assert main(["quantize", str(path), "--bits", "8", "--out", str(tmp_path / "q8")]) == 0
    from dsmoe.model import Transformer

    q8 = Transformer.from_pretrained(tmp_path / "q8")  # the same MLA model, weights in int8
    assert q8.config.replace(torch_dtype=None) == load_gguf(path).config.replace(torch_dtype=None)
    assert torch.isfinite(q8(torch.randint(0, 320, (1, 12))).logits).all()
    assert main(["export", str(path), "--format", "hf", "--out", str(tmp_path / "back")]) == 0
    back = ModelConfig.from_json_file(str(tmp_path / "back" / "config.json"))
    assert back.architectures == ("DeepseekV3ForCausalLM",)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["export", str(tmp_path / "back"), "--format", "gguf", "--out",
                     str(tmp_path / "again.gguf"), "--quant", "f32"]) == 0
    ids_t = torch.randint(0, 320, (1, 20))
    assert torch.equal(load_gguf(tmp_path / "again.gguf")(ids_t).logits, model(ids_t).logits)
