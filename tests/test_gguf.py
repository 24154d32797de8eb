"""GGUF: dsmoe <-> llama.cpp's "deepseek" files. Exact F32 round trips, stated tolerances for
F16/BF16/Q8_0/Q4_0, a file written independently in llama.cpp's layout (q/k rows permuted
as llama.cpp's converter does), the tokenizer from metadata, and the error messages."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, moe_config, randomize_

from dsmoe.checkpoint.gguf import (GGUFFile, TokenizerData, load_gguf, load_tokenizer, read_gguf,
                                   write_gguf, write_model_gguf)
from dsmoe.checkpoint.gguf.names import from_llama_rope_rows, to_llama_rope_rows
from dsmoe.checkpoint.gguf.reader import _BLOCK_BYTES, dequantize_blocks
from dsmoe.checkpoint.gguf.writer import ModelAsHF
from dsmoe.model import Transformer
from dsmoe.model.rope import RotaryEmbedding, apply_rotary
from dsmoe.tokenizer import Tokenizer

TEXTS = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog.\n",
         "Unicode: café, naïve, 日本語, emoji 🎉 and numbers 12345.\n"] * 30
SAMPLES = ["hello world", "def f(x):\n    return x ** 2\n", "café 日本 🎉 42", " lead", ""]


def gguf_config(**overrides):
    """Rows of 32 (or 64) everywhere, so Q8_0/Q4_0 apply to every matrix."""
    base = dict(vocab_size=320, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                first_k_dense_replace=1, max_position_embeddings=64, bos_token_id=None,
                eos_token_id=None)
    base.update(overrides)
    return moe_config(**base)


def make_model(config=None, std=0.15):
    model = Transformer(config or gguf_config()).eval()
    randomize_(model, std=std)
    with torch.no_grad():  # norms near 1, as in trained models
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train_bpe(TEXTS, vocab_size=300)


def hf_state(model) -> dict[str, torch.Tensor]:
    view = ModelAsHF(model.state_dict())
    return {name: view[name].clone() for name in view}


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """Mean KL(p || q) over positions, in nats."""
    return F.kl_div(q_logits.log_softmax(-1), p_logits.log_softmax(-1), log_target=True,
                    reduction="none").sum(-1).mean().item()


# --- round trips ------------------------------------------------------------------------
def test_f32_round_trip_is_exact(tmp_path: Path) -> None:
    model = make_model()
    path = tmp_path / "m.gguf"
    write_model_gguf(model, path, quant="f32")
    config, state, tok = read_gguf(path)
    assert config == model.config
    assert tok is None
    expected = hf_state(model)
    assert state.keys() == expected.keys()
    for name in expected:
        assert torch.equal(state[name], expected[name]), name
    ids = torch.randint(0, 320, (2, 9))
    loaded = load_gguf(path)
    assert torch.equal(loaded(ids).logits, model(ids).logits)


# Weight tolerances, relative to the largest |w| of each 32-element block: F16 and BF16
# round to half an ulp (2^-11, 2^-8); Q8_0 to half a step of max|w| / 127, Q4_0 to one step
# of max|w| / 8 (its clamped end), both plus the f16 rounding of the block scale (2^-11).
@pytest.mark.parametrize("quant, weight_rtol, max_kl, min_top1", [
    ("f16", 2 ** -11, 1e-5, 1.0),
    ("bf16", 2 ** -8, 1e-3, 0.95),
    ("q8_0", 1 / 254 + 2 ** -11, 2e-3, 0.9),
    ("q4_0", 1 / 8 + 2 ** -11, 0.25, 0.4),  # random weights: flat, noisy top-1
])
def test_quantized_round_trip_within_tolerance(tmp_path: Path, quant: str, weight_rtol: float,
                                               max_kl: float, min_top1: float) -> None:
    model = make_model()
    path = tmp_path / f"m-{quant}.gguf"
    write_model_gguf(model, path, quant=quant)
    _, state, _ = read_gguf(path)
    for name, w in hf_state(model).items():
        if w.dim() == 1 or name.endswith("mlp.gate.weight"):  # kept F32
            assert torch.equal(state[name], w), name
            continue
        # bound per 32-element block: rtol x the block's largest |w| (one bf16/f16 ulp of
        # it for the float types)
        blocks = w.reshape(-1, 32).abs().amax(-1, keepdim=True)
        err = (state[name] - w).reshape(-1, 32).abs()
        bound = blocks * weight_rtol + 1e-7
        if quant == "q4_0" and name in ("model.embed_tokens.weight", "lm_head.weight"):
            bound = blocks * (1 / 254 + 2 ** -11) + 1e-7  # written as Q8_0
        assert bool((err <= bound).all()), f"{name}: max err {err.max():.3e}"
    ids = torch.randint(0, 320, (4, 16))
    ref = model(ids).logits
    out = load_gguf(path)(ids).logits
    agree = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert kl(ref, out) <= max_kl, f"{quant}: KL {kl(ref, out):.2e}"
    assert agree >= min_top1, f"{quant}: top-1 agreement {agree:.3f}"


def test_dsmoe_metadata_round_trips_settings_llama_cpp_lacks(tmp_path: Path) -> None:
    """V3 routing (sigmoid, noaux_tc + correction bias), moe_layer_freq=2 and dynamic RoPE
    have no llama.cpp keys; dsmoe.hf_config carries them (with a warning for llama.cpp)."""
    config = gguf_config(num_hidden_layers=4, moe_layer_freq=2, scoring_func="sigmoid",
                         topk_method="noaux_tc", n_group=2, topk_group=1, norm_topk_prob=True,
                         routed_scaling_factor=2.5,
                         rope_scaling={"type": "dynamic", "factor": 2.0}, attention_bias=True)
    model = make_model(config)
    with torch.no_grad():
        for layer in model.moe_layers():
            layer.gate.e_score_correction_bias.copy_(torch.randn(8) * 0.1)
    path = tmp_path / "v3.gguf"
    with pytest.warns(UserWarning, match="llama.cpp will run this model differently"):
        write_model_gguf(model, path, quant="f32")
    loaded = load_gguf(path)
    assert loaded.config == config
    ids = torch.randint(0, 320, (2, 80))  # past max_position_embeddings: dynamic NTK active
    assert torch.equal(loaded(ids).logits, model(ids).logits)


# --- llama.cpp's layout, written independently ----------------------------------------
def _llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter (LlamaModel.permute): rows of each head (2, d/2) -> (d/2, 2)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


def write_llama_cpp_style(path: Path, model, tok: Tokenizer | None, *, arch: str | None = None,
                          overrides: dict | None = None,
                          raw: dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]] | None = None,
                          kv_b: str = "split", drop: tuple[str, ...] = ()) -> None:
    """A GGUF as llama.cpp's convert_hf_to_gguf.py lays out DeepseekForCausalLM ("deepseek")
    or DeepseekV2/V3ForCausalLM ("deepseek2", MLA: kv_b_proj split per head, or kept whole
    with ``kv_b="whole"`` as older converters did), built here with gguf.GGUFWriter and
    hand-written names: no dsmoe.hf_config, no HF tokenizer JSON. ``drop``: metadata keys
    (without the architecture prefix) left out."""
    c = model.config
    mla = c.kv_lora_rank is not None
    arch = arch or ("deepseek2" if mla else "deepseek")
    sd = hf_state(model)
    w = gguf.GGUFWriter(str(path), arch)
    kv = {"context_length": c.max_position_embeddings, "embedding_length": c.hidden_size,
          "feed_forward_length": c.intermediate_size, "block_count": c.num_hidden_layers,
          "attention.head_count": c.num_attention_heads,
          "attention.head_count_kv": c.num_key_value_heads,
          "rope.dimension_count": c.head_dim, "leading_dense_block_count":
          c.first_k_dense_replace, "vocab_size": c.vocab_size,
          "expert_feed_forward_length": c.moe_intermediate_size,
          "expert_count": c.n_routed_experts, "expert_used_count": c.num_experts_per_tok,
          "expert_shared_count": c.n_shared_experts}
    if mla:
        kv.update(_deepseek2_keys(c, kv_b))
    kv.update(overrides or {})
    for key, value in kv.items():
        if key not in drop:
            w.add_uint32(f"{arch}.{key}", value)
    w.add_float32(f"{arch}.rope.freq_base", float(c.rope_theta))
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", float(c.rms_norm_eps))
    w.add_float32(f"{arch}.expert_weights_scale", float(c.routed_scaling_factor) if mla else 1.0)
    if mla and c.norm_topk_prob:
        w.add_bool(f"{arch}.expert_weights_norm", True)
    scaling = c.rope_scaling or {}
    if mla and scaling.get("type") == "yarn":
        w.add_string(f"{arch}.rope.scaling.type", "yarn")
        w.add_float32(f"{arch}.rope.scaling.factor", float(scaling["factor"]))
        w.add_uint32(f"{arch}.rope.scaling.original_context_length",
                     scaling["original_max_position_embeddings"])
        for beta in ("beta_fast", "beta_slow"):
            if beta in scaling:
                w.add_float32(f"{arch}.rope.scaling.yarn_{beta}", float(scaling[beta]))
        w.add_float32(f"{arch}.rope.scaling.yarn_log_multiplier", 0.1 * scaling["mscale_all_dim"])
    else:
        w.add_string(f"{arch}.rope.scaling.type", "none")
    if tok is not None:
        data = TokenizerData.from_tokenizer(tok, c.vocab_size)
        w.add_string("tokenizer.ggml.model", "gpt2")
        w.add_string("tokenizer.ggml.pre", "gpt-2")
        w.add_array("tokenizer.ggml.tokens", data.tokens)
        w.add_array("tokenizer.ggml.token_type", data.token_types)
        w.add_array("tokenizer.ggml.merges", data.merges)
        w.add_uint32("tokenizer.ggml.bos_token_id", tok.bos_id)
        w.add_uint32("tokenizer.ggml.eos_token_id", tok.eos_id)
        w.add_bool("tokenizer.ggml.add_bos_token", True)

    def add(name: str, value: torch.Tensor) -> None:
        if name in (raw or {}):  # pre-quantised blocks (uint8), e.g. k-quants
            blocks, qtype = raw[name]
            w.add_tensor(name, blocks, raw_dtype=qtype)
        else:
            w.add_tensor(name, value.float().contiguous().numpy())

    add("token_embd.weight", sd["model.embed_tokens.weight"])
    add("output_norm.weight", sd["model.norm.weight"])
    if "lm_head.weight" in sd and not c.tie_word_embeddings:
        add("output.weight", sd["lm_head.weight"])
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        add(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        for name, value in (_mla_tensors(c, sd, p, kv_b) if mla else _mha_tensors(c, sd, p)):
            add(f"blk.{i}.{name}.weight", value)
        add(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        if i < c.first_k_dense_replace:
            for proj in ("gate", "down", "up"):
                add(f"blk.{i}.ffn_{proj}.weight", sd[p + f"mlp.{proj}_proj.weight"])
            continue
        add(f"blk.{i}.ffn_gate_inp.weight", sd[p + "mlp.gate.weight"])
        if p + "mlp.gate.e_score_correction_bias" in sd:
            add(f"blk.{i}.exp_probs_b.bias", sd[p + "mlp.gate.e_score_correction_bias"])
        for proj in ("gate", "down", "up"):
            add(f"blk.{i}.ffn_{proj}_exps.weight", torch.stack(
                [sd[p + f"mlp.experts.{e}.{proj}_proj.weight"] for e in range(c.n_routed_experts)]))
        for proj in ("gate", "down", "up"):
            add(f"blk.{i}.ffn_{proj}_shexp.weight", sd[p + f"mlp.shared_experts.{proj}_proj.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _deepseek2_keys(c, kv_b: str) -> dict:
    """DeepseekV2Model.set_gguf_parameters: MQA over the latent, per-head sizes as _mla."""
    C, n, r, v = c.kv_lora_rank, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
    keys = {"attention.head_count_kv": 1, "rope.dimension_count": r, "attention.kv_lora_rank": C,
            "expert_gating_func": {"softmax": 1, "sigmoid": 2}[c.scoring_func],
            "expert_group_count": c.n_group, "expert_group_used_count": c.topk_group}
    if kv_b == "split":
        keys.update({"attention.key_length": C + r, "attention.value_length": C,
                     "attention.key_length_mla": n + r, "attention.value_length_mla": v})
    else:  # before the split: plain per-head sizes
        keys.update({"attention.key_length": n + r, "attention.value_length": v})
    if c.q_lora_rank is not None:
        keys["attention.q_lora_rank"] = c.q_lora_rank
    return keys


def _mha_tensors(c, sd: dict, p: str) -> list[tuple[str, torch.Tensor]]:
    H, Hkv = c.num_attention_heads, c.num_key_value_heads
    a = p + "self_attn."
    return [("attn_q", torch.from_numpy(_llama_permute(sd[a + "q_proj.weight"].numpy(), H))),
            ("attn_k", torch.from_numpy(_llama_permute(sd[a + "k_proj.weight"].numpy(), Hkv))),
            ("attn_v", sd[a + "v_proj.weight"]), ("attn_output", sd[a + "o_proj.weight"])]


def _mla_tensors(c, sd: dict, p: str, kv_b: str) -> list[tuple[str, torch.Tensor]]:
    """MLA as DeepseekV2Model.modify_tensors writes it: no rope permutation (the checkpoint's
    rope dims are already interleaved pairs); kv_b_proj viewed [H, n+v, C] and split into
    k_b (transposed to [H, C, n]) and v_b [H, v, C]."""
    a = p + "self_attn."
    if c.q_lora_rank is None:
        out = [("attn_q", sd[a + "q_proj.weight"])]
    else:
        out = [("attn_q_a", sd[a + "q_a_proj.weight"]),
               ("attn_q_a_norm", sd[a + "q_a_layernorm.weight"]),
               ("attn_q_b", sd[a + "q_b_proj.weight"])]
    out += [("attn_kv_a_mqa", sd[a + "kv_a_proj_with_mqa.weight"]),
            ("attn_kv_a_norm", sd[a + "kv_a_layernorm.weight"])]
    whole = sd[a + "kv_b_proj.weight"]
    if kv_b == "split":
        per_head = whole.view(c.num_attention_heads, -1, c.kv_lora_rank)
        k_b, v_b = per_head.split([c.qk_nope_head_dim, c.v_head_dim], dim=1)
        out += [("attn_k_b", k_b.transpose(1, 2)), ("attn_v_b", v_b)]
    else:
        out.append(("attn_kv_b", whole))
    return out + [("attn_output", sd[a + "o_proj.weight"])]


def test_llama_cpp_layout_file_loads_to_the_same_weights(tmp_path: Path, tokenizer) -> None:
    model = make_model()
    path = tmp_path / "llama.gguf"
    write_llama_cpp_style(path, model, tokenizer)
    config, state, _ = read_gguf(path)
    assert (config.norm_topk_prob, config.scoring_func, config.routed_scaling_factor) == \
        (False, "softmax", 1.0)
    assert (config.bos_token_id, config.eos_token_id) == (tokenizer.bos_id, tokenizer.eos_id)
    # training-only settings (balance losses) are not in llama.cpp's metadata: defaults
    assert config.replace(bos_token_id=None, eos_token_id=None, aux_loss_alpha=0.0,
                          seq_aux=False) == model.config
    expected = hf_state(model)
    assert state.keys() == expected.keys()
    for name in expected:
        assert torch.equal(state[name], expected[name]), name
    ids = torch.randint(0, 320, (2, 12))
    assert_close(load_gguf(path)(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5,
                 what="logits from a llama.cpp-layout GGUF")


def test_k_quant_tensors_are_dequantised(tmp_path: Path) -> None:
    """Q4_K / Q6_K (llama.cpp's k-quants; the gguf package can only dequantise them): random
    blocks with small f16 scales stored in a llama.cpp-layout file load as their values."""
    config = gguf_config(hidden_size=256, intermediate_size=256, moe_intermediate_size=256,
                         num_attention_heads=4, num_key_value_heads=4, vocab_size=64)
    model = make_model(config)
    rng = np.random.default_rng(0)
    raw: dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]] = {}
    for qtype, name in ((gguf.GGMLQuantizationType.Q4_K, "blk.1.ffn_gate_exps.weight"),
                        (gguf.GGMLQuantizationType.Q6_K, "blk.1.ffn_down_exps.weight")):
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        blocks = rng.integers(0, 256, size=(8 * 256 * 256 // block, size), dtype=np.uint8)
        scale = np.array([0.001], dtype=np.float16).view(np.uint8)
        if qtype == gguf.GGMLQuantizationType.Q4_K:
            blocks[:, 0:2] = scale  # d
            blocks[:, 2:4] = scale  # dmin
        else:
            blocks[:, -2:] = scale  # d is the last field of a Q6_K block
        raw[name] = (blocks.reshape(8, 256, -1), qtype)
    path = tmp_path / "k.gguf"
    write_llama_cpp_style(path, model, None, raw=raw)
    assert GGUFFile(path).tensors["blk.1.ffn_down_exps.weight"].tensor_type == \
        gguf.GGMLQuantizationType.Q6_K
    _, state, _ = read_gguf(path)
    for (blocks, qtype), proj in zip(raw.values(), ("gate", "down")):
        expected = torch.from_numpy(gguf.quants.dequantize(blocks, qtype))  # [8, 256, 256]
        assert expected.abs().max() > 0
        for e in range(8):
            assert torch.equal(state[f"model.layers.1.mlp.experts.{e}.{proj}_proj.weight"],
                               expected[e]), (proj, e)


def test_own_q8_0_q4_0_dequantisation_matches_the_gguf_package() -> None:
    x = (torch.randn(8, 96) * torch.logspace(-3, 1, 8).unsqueeze(1)).numpy()
    for qtype in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0):
        raw = gguf.quants.quantize(x, qtype)
        ref = gguf.quants.dequantize(raw, qtype)
        blocks = torch.from_numpy(raw.reshape(-1)).view(-1, _BLOCK_BYTES[qtype])
        assert torch.equal(dequantize_blocks(blocks, qtype).reshape(8, 96), torch.from_numpy(ref))


# --- RoPE row order -----------------------------------------------------------------------
def test_rope_permutation_turns_rotate_half_into_llama_cpp_pairs() -> None:
    """HF rotates (i, i + d/2); llama.cpp rotates (2i, 2i + 1). With q rows permuted the
    llama.cpp rotation of the permuted projection is the permuted HF result."""
    H, d, D, S = 3, 8, 16, 5
    w = torch.randn(H * d, D)
    x = torch.randn(S, D)
    assert torch.equal(from_llama_rope_rows(to_llama_rope_rows(w, H), H), w)
    rope = RotaryEmbedding(d, 10000.0, 64)
    cos, sin = rope(torch.arange(S).unsqueeze(0), S, torch.float32)  # [1, S, d]
    q_hf = (x @ w.T).view(S, H, d).transpose(0, 1).unsqueeze(0)  # [1, H, S, d]
    rotated_hf = apply_rotary(q_hf, cos, sin)
    q_ll = (x @ to_llama_rope_rows(w, H).T).view(S, H, d)  # [S, H, d]
    pairs = q_ll.view(S, H, d // 2, 2)
    theta = 10000.0 ** (-torch.arange(0, d, 2).float() / d)
    angle = torch.arange(S).float()[:, None, None] * theta  # [S, 1, d/2]
    a, b = pairs[..., 0], pairs[..., 1]
    rotated_ll = torch.stack([a * angle.cos() - b * angle.sin(),
                              a * angle.sin() + b * angle.cos()], -1).view(S, H, d)
    expected = to_llama_rope_rows(rotated_hf[0].permute(0, 2, 1).reshape(H * d, S), H)
    assert_close(rotated_ll.reshape(S, H * d).T, expected, atol=1e-5, rtol=1e-5,
                 what="llama.cpp rotation of permuted rows")


# --- tokenizer ----------------------------------------------------------------------------
def test_tokenizer_from_llama_cpp_metadata_encodes_like_the_original(tmp_path: Path,
                                                                      tokenizer) -> None:
    path = tmp_path / "tok.gguf"
    write_llama_cpp_style(path, make_model(), tokenizer)
    assert GGUFFile(path).get("tokenizer.huggingface.json", None) is None
    rebuilt = load_tokenizer(path)
    for text in SAMPLES + TEXTS[:3]:
        assert rebuilt.encode(text) == tokenizer.encode(text), text
        assert rebuilt.decode(rebuilt.encode(text)) == text
    assert (rebuilt.bos_id, rebuilt.eos_id, rebuilt.add_bos) == \
        (tokenizer.bos_id, tokenizer.eos_id, True)
    special = tokenizer.bos_token + "hi" + tokenizer.eos_token
    assert rebuilt.encode(special, add_bos=False) == tokenizer.encode(special, add_bos=False)


def test_dsmoe_written_tokenizer_is_exact_and_padded_for_llama_cpp(tmp_path: Path,
                                                                    tokenizer) -> None:
    model = make_model()
    path = tmp_path / "t.gguf"
    write_model_gguf(model, path, tokenizer, quant="f32")
    f = GGUFFile(path)
    tokens = f.get("tokenizer.ggml.tokens")
    assert len(tokens) == model.config.vocab_size  # llama.cpp sizes the embedding from it
    assert tokens[-1] == f"[PAD{model.config.vocab_size - 1}]"
    assert f.get("tokenizer.ggml.token_type")[-1] == gguf.TokenType.UNUSED
    assert f.get("tokenizer.ggml.pre") == "gpt-2"
    rebuilt = load_tokenizer(path)
    assert rebuilt.to_json() == tokenizer.to_json()
    assert rebuilt.chat_template == tokenizer.chat_template
    for text in SAMPLES:
        assert rebuilt.encode(text) == tokenizer.encode(text)


# --- errors ---------------------------------------------------------------------------------
def test_not_a_gguf_file(tmp_path: Path) -> None:
    path = tmp_path / "x.gguf"
    path.write_bytes(b"PK\x03\x04 not gguf at all" * 4)
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_gguf(path)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_gguf(tmp_path / "missing.gguf")


def test_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    write_model_gguf(make_model(), path, quant="f16")
    data = path.read_bytes()
    for cut in (len(data) - 1000, 200):
        short = tmp_path / f"short{cut}.gguf"
        short.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="truncated"):
            read_gguf(short)


def test_unsupported_architecture(tmp_path: Path) -> None:
    path = tmp_path / "llama.gguf"
    write_llama_cpp_style(path, make_model(), None, arch="deepseek32")
    with pytest.raises(ValueError, match="architecture 'deepseek32' is not supported; dsmoe "
                                         "reads llama.cpp's 'deepseek' .* and 'deepseek2'"):
        load_gguf(path)


def test_unknown_tensor_type(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    write_model_gguf(make_model(), path, quant="f32")
    info = next(t.field for t in gguf.GGUFReader(path).tensors  # gguf-py: the oracle
                if t.name == "output_norm.weight")  # its type id is the part before the offset
    type_offset = info.offset + sum(int(p.nbytes) for p in info.parts[:4])
    raw = bytearray(path.read_bytes())
    assert int.from_bytes(raw[type_offset:type_offset + 4], "little") == 0  # F32
    raw[type_offset:type_offset + 4] = (250).to_bytes(4, "little")
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="unknown GGML tensor type"):
        load_gguf(path)


def test_metadata_contradicting_tensor_shapes(tmp_path: Path) -> None:
    path = tmp_path / "bad.gguf"
    write_llama_cpp_style(path, make_model(), None, overrides={"expert_count": 6})
    with pytest.raises(ValueError, match=r"metadata contradicts tensor shapes: "
                                         r"blk\.1\.ffn_gate_inp\.weight is \[8, 64\].*expert_count"):
        load_gguf(path)
    path2 = tmp_path / "bad2.gguf"
    write_llama_cpp_style(path2, make_model(), None, overrides={"leading_dense_block_count": 0})
    with pytest.raises(ValueError, match="missing tensors: blk.0.ffn_gate_inp.weight"):
        read_gguf(path2)


def test_write_errors(tmp_path: Path) -> None:
    model = make_model()
    with pytest.raises(ValueError, match="unknown GGUF quant type 'q5_k'"):
        write_model_gguf(model, tmp_path / "x.gguf", quant="q5_k")
    state = hf_state(model)
    del state["model.layers.1.mlp.experts.3.up_proj.weight"]
    with pytest.raises(ValueError, match="missing: model.layers.1.mlp.experts.3.up_proj"):
        write_gguf(tmp_path / "x.gguf", model.config, state)
    assert not list(tmp_path.iterdir())  # nothing half-written left behind


# --- llama.cpp itself -------------------------------------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python is not installed")
@pytest.mark.parametrize("quant, atol", [("f32", 3e-3), ("q8_0", 8e-2)])
def test_llama_cpp_logits_match_dsmoe(tmp_path: Path, tokenizer, quant: str, atol: float) -> None:
    """llama.cpp runs the exported file and tokenizes like dsmoe; its logits at every position
    equal dsmoe's on the same GGUF (logits span about +-3). Measured max |diff|: f32 1.0e-3
    (llama.cpp keeps its KV cache in f16), q8_0 4.4e-2 (llama.cpp's Q8_0 matmuls also
    quantize the activations to 8 bits)."""
    import llama_cpp

    model = make_model(gguf_config(vocab_size=384), std=0.1)
    path = tmp_path / f"m-{quant}.gguf"
    write_model_gguf(model, path, tokenizer, quant=quant)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False,
                          n_threads=1)
    for text in SAMPLES[:4]:
        assert llm.tokenize(text.encode(), add_bos=True) == tokenizer.encode(text), text
    ids = tokenizer.encode("def add(a, b):\n    return")
    llm.eval(ids)
    theirs = torch.tensor(np.array(llm.scores[: len(ids)]), dtype=torch.float32)
    ours = load_gguf(path)(torch.tensor([ids])).logits[0]
    assert_close(theirs, ours, atol=atol, rtol=0, what=f"llama.cpp vs dsmoe logits ({quant})")
    assert torch.equal(theirs.argmax(-1), ours.argmax(-1))


# --- the export command ---------------------------------------------------------------------
def test_export_command_round_trips_hf_gguf_hf(tmp_path: Path, tokenizer, capsys) -> None:
    from dsmoe.cli import main

    model = make_model()
    model.save_pretrained(tmp_path / "hf")
    tokenizer.save(tmp_path / "hf")
    out = tmp_path / "m.gguf"
    assert main(["export", str(tmp_path / "hf"), "--format", "gguf", "--out", str(out),
                 "--quant", "f32"]) == 0
    ids = torch.randint(0, 320, (2, 8))
    assert torch.equal(load_gguf(out)(ids).logits, model(ids).logits)
    assert load_tokenizer(out).encode(SAMPLES[1]) == tokenizer.encode(SAMPLES[1])
    assert main(["export", str(out), "--format", "hf", "--out", str(tmp_path / "back")]) == 0
    back = Transformer.from_pretrained(tmp_path / "back")
    assert torch.equal(back(ids).logits, model(ids).logits)
    assert Tokenizer.from_file(tmp_path / "back").encode(SAMPLES[2]) == \
        tokenizer.encode(SAMPLES[2])
    capsys.readouterr()
    assert main(["export", str(tmp_path / "hf"), "--format", "gguf", "--out",
                 str(tmp_path / "x.bin")]) == 2
    assert capsys.readouterr().err.strip() == \
        f"error: --out {tmp_path / 'x.bin'}: a GGUF file name must end in .gguf"
