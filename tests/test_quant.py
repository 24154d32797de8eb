"""Weight-only int8/int4 quantization: formats and kernels against float references, module
swapping (same MoE dispatch), accuracy of a small trained model (top-1 agreement, KL,
perplexity), quantized checkpoints, and quantizing while loading HF directories and GGUFs."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
import torch.nn.functional as F
from conftest import assert_close, moe_config
from torch import nn

from dsmoe.checkpoint.gguf import write_model_gguf
from dsmoe.model import Transformer
from dsmoe.moe.experts import SwiGLUExperts
from dsmoe.moe.layer import MoELayer
from dsmoe.quant import (QuantLinear, QuantSwiGLUExperts, checkpoint_layout, load_model,
                         load_quantized, quantize_model, save_quantized)
from dsmoe.quant import kernels
from dsmoe.quant.matrix import QuantMatrix

V = 256


def small_config(**overrides):
    """Rows of 32/64 so int4 groups of 32 apply everywhere (D=64, F=32, E=8, K=2)."""
    base = dict(vocab_size=V, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                first_k_dense_replace=1, max_position_embeddings=128, bos_token_id=None,
                eos_token_id=None)
    base.update(overrides)
    return moe_config(**base)


def affine_sequences(n: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """A small learnable language: x[t+1] = (a * x[t] + 1) mod V, a per sequence from 4."""
    a = torch.tensor([3, 5, 7, 11])[torch.randint(0, 4, (n, 1), generator=generator)]
    seq = [torch.randint(0, V, (n, 1), generator=generator)]
    for _ in range(length - 1):
        seq.append((seq[-1] * a + 1) % V)
    return torch.cat(seq, dim=1)


@pytest.fixture(scope="module")
def trained() -> Transformer:
    """The small config trained for 150 AdamW steps (~5 s) to confident predictions: random
    weights give near-uniform logits, where top-1 agreement measures nothing."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = Transformer(small_config())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        ids = affine_sequences(16, 33, gen)
        loss = F.cross_entropy(model(ids[:, :-1]).logits.reshape(-1, V), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def mean_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    return F.kl_div(q_logits.log_softmax(-1), p_logits.log_softmax(-1), log_target=True,
                    reduction="none").sum(-1).mean().item()


# --- formats and kernels -------------------------------------------------------------------
def test_int8_error_is_half_a_step_and_both_kernel_paths_agree() -> None:
    w = torch.randn(96, 64) * torch.logspace(-2, 0, 96).unsqueeze(1)
    q, scale = kernels.quantize_int8(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.bfloat16
    deq = kernels.dequantize_int8(q, scale)
    # half a step, plus the row max clamped after rounding the scale to bf16 (2^-8 relative)
    bound = scale.float().unsqueeze(1) * (0.5 + 127 * 2 ** -8) + 1e-12
    assert bool(((deq - w).abs() <= bound).all())
    for rows in (1, kernels.INT8_KERNEL_MAX_ROWS, kernels.INT8_KERNEL_MAX_ROWS + 1, 40):
        x = torch.randn(rows, 64)
        ref = x @ deq.T
        # the int8 kernel sees bf16 activations: relative error ~2^-8 of |x| |w| sums
        assert_close(kernels.int8_linear(x, q, scale), ref, atol=2e-2, rtol=1e-2,
                     what=f"int8 matmul, {rows} rows")


@pytest.mark.parametrize("group", [32, 128])
def test_int4_error_bound_and_kernel(group: int) -> None:
    w = torch.randn(48, 256)
    q, scale, zero = kernels.quantize_int4(w, group)
    assert q.shape == (48, 128) and scale.shape == (48, 256 // group)
    deq = kernels.dequantize_int4(q, scale, zero)
    # half a step of (max - min) / 15 per group, plus bf16 rounding of scale and zero
    step = scale.float().repeat_interleave(group, dim=1)
    bound = step * 0.5 + (w.abs().amax() * 2 ** -8) + 1e-6
    assert bool(((deq - w).abs() <= bound).all())
    packed = kernels.kernel_pack_int4(q)
    sz = kernels.scales_and_zeros(scale, zero)
    x = torch.randn(5, 256)
    assert_close(kernels.int4_linear(x, packed, sz, group, 48), x @ deq.T, atol=5e-2, rtol=1e-2,
                 what="int4 kernel vs dequantised matmul")


@pytest.mark.parametrize("shape", [(16, 64), (48, 256), (128, 96), (2816 // 16, 128)])
def test_int4_kernel_layout_unpacks_exactly(shape: tuple[int, int]) -> None:
    q = torch.randint(0, 256, (shape[0], shape[1] // 2), dtype=torch.uint8)
    packed = kernels.kernel_pack_int4(q)
    assert torch.equal(kernels.kernel_unpack_int4(packed, *shape), q)


def test_kernels_accept_unaligned_views() -> None:
    """Row slices of a bf16 batch and 8-byte aligned buffers (safetensors' memory maps) used
    to crash torch's int8 kernel (SIGSEGV); ``kernels.aligned`` copies them first."""
    q, scale = kernels.quantize_int8(torch.randn(64, 32))
    q_buffer = torch.zeros(64 * 32 + 8, dtype=torch.int8)
    q_view = q_buffer[8:].view(64, 32).copy_(q)
    x = torch.randn(9, 32, dtype=torch.bfloat16)
    rows = x[1:6]  # 64 bytes per row: starts 64 bytes in, so try an odd offset as well
    odd = torch.randn(5 * 32 + 3, dtype=torch.bfloat16)[3:].view(5, 32)
    ref = rows.float() @ kernels.dequantize_int8(q, scale).T
    assert_close(kernels.int8_linear(rows, q_view, scale).float(), ref, atol=5e-2, rtol=2e-2,
                 what="int8 kernel on unaligned views")
    assert kernels.int8_linear(odd, q_view, scale).shape == (5, 64)


def test_int4_falls_back_to_int8_where_the_kernel_cannot_go() -> None:
    assert QuantMatrix(24, 64, bits=4).bits == 8  # N not a multiple of 16
    assert QuantMatrix(32, 48, bits=4).bits == 8  # no group of >= 32 divides K
    m = QuantMatrix(32, 96, bits=4, group_size=128)
    assert (m.bits, m.group_size) == (4, 32)  # largest supported group dividing K


# --- modules -------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [8, 4])
def test_quant_linear_matches_its_dequantised_weight(bits: int) -> None:
    linear = nn.Linear(64, 48, bias=True)
    ql = QuantLinear.from_linear(linear, bits=bits, group_size=32)
    x = torch.randn(3, 7, 64)
    ref = F.linear(x, ql.dequantize(), linear.bias)
    assert_close(ql(x), ref, atol=3e-2, rtol=1e-2, what=f"QuantLinear int{bits}")
    with torch.device("meta"):
        shell = QuantLinear.from_linear(nn.Linear(64, 48, bias=True), bits=bits, group_size=32)
    assert shell.qweight.is_meta
    shell.set_float(linear.weight)
    assert torch.equal(shell.qweight, ql.qweight)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("cast", [torch.float32, torch.float16, torch.float64])
def test_dtype_casts_keep_the_quantized_format(bits: int, cast: torch.dtype) -> None:
    """``model.to(dtype)`` casts float buffers; the scales and zeros are the format (bf16,
    what the kernels read), so they keep it: before, int8 raised and int4 computed wrong
    sums after ``.float()``. The bias is a parameter and does follow the cast."""
    ql = QuantLinear.from_linear(nn.Linear(64, 48, bias=True), bits=bits, group_size=32)
    formats = {n: b.dtype for n, b in ql.named_buffers()}
    x = torch.randn(3, 64)
    before = ql(x)
    ql.to(cast)
    assert {n: b.dtype for n, b in ql.named_buffers()} == formats
    assert ql.bias.dtype == cast
    tol = 1e-2 if cast == torch.float16 else 2e-3  # fp16 rounds outputs of size ~1 to 1e-3
    assert_close(ql(x.to(cast)).float(), before, atol=tol, rtol=tol, what=f"int{bits} {cast}")


@pytest.mark.parametrize("bits", [8, 4])
def test_quant_experts_keep_the_dispatch_contract(bits: int) -> None:
    """Same (x_sorted, counts) contract, empty experts included, equal to float experts
    holding the dequantised weights; and inside MoELayer the routing is untouched."""
    experts = SwiGLUExperts(8, 64, 32, init_std=0.1)
    qe = QuantSwiGLUExperts.from_experts(experts, bits=bits, group_size=32)
    reference = SwiGLUExperts(8, 64, 32)
    with torch.no_grad():
        reference.gate_up_proj.copy_(qe.gate_up_proj.dequantize())
        reference.down_proj.copy_(qe.down_proj.dequantize())
    counts = torch.tensor([3, 0, 5, 1, 0, 0, 7, 2])
    x = torch.randn(int(counts.sum()), 64)
    # int4's native kernel rounds activations to int8 per block of 32 (as llama.cpp's
    # Q4_0 x Q8_0 does): up to 1/254 of a block's largest value per element
    atol = 2e-3 if bits == 8 else 3e-2
    assert_close(qe(x, counts), reference(x, counts), atol=atol, rtol=2e-2,
                 what=f"int{bits} experts vs float experts with the same weights")

    layer = MoELayer(small_config()).eval()
    quantized = copy.deepcopy(layer)
    quantized.experts = QuantSwiGLUExperts.from_experts(layer.experts, bits=bits, group_size=32)
    with torch.no_grad():
        layer.experts.gate_up_proj.copy_(quantized.experts.gate_up_proj.dequantize())
        layer.experts.down_proj.copy_(quantized.experts.down_proj.dequantize())
    h = torch.randn(2, 6, 64)
    out_q, out_f = quantized(h), layer(h)
    assert torch.equal(out_q.topk_idx, out_f.topk_idx)
    assert torch.equal(out_q.expert_counts, out_f.expert_counts)
    assert_close(out_q.hidden_states, out_f.hidden_states, atol=atol, rtol=2e-2,
                 what="MoELayer with quantized experts")


def test_quantize_model_swaps_the_right_modules() -> None:
    model = Transformer(small_config())
    quantize_model(model, bits=4, group_size=32)
    kinds = {name: type(m).__name__ for name, m in model.named_modules()}
    assert not any(isinstance(m, (nn.Linear, SwiGLUExperts)) for m in model.modules())
    assert kinds["layers.1.mlp.experts"] == "QuantSwiGLUExperts"
    assert kinds["layers.1.mlp.gate"] == "Router"  # routing stays in float
    assert model.lm_head.bits == 8 and model.layers[0].self_attn.q_proj.bits == 4
    assert model.embed_tokens.weight.dtype == torch.float32

    tied = Transformer(small_config(tie_word_embeddings=True))
    quantize_model(tied, bits=8)
    assert isinstance(tied.lm_head, nn.Linear)  # tied: quantizing would add a copy
    assert tied.lm_head.weight is tied.embed_tokens.weight
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        quantize_model(Transformer(small_config()), bits=3)


# --- accuracy on a trained model ----------------------------------------------------------------
# Measured on this model: int8 KL 3e-5, top-1 1.000, perplexity +0.00%; int4 g=32 KL 3e-3,
# top-1 0.997, perplexity +0.5%; int4 g=128 KL 4e-3, top-1 1.000, perplexity -0.1%. The
# bounds (the issue's: perplexity +1% for int8, +5% for int4) leave room for other CPUs.
@pytest.mark.parametrize("bits, group, max_kl, min_top1, max_ppl_rise", [
    (8, 128, 5e-4, 0.99, 0.01),
    (4, 32, 2e-2, 0.97, 0.05),
    (4, 128, 3e-2, 0.95, 0.05),
])
def test_quantized_model_stays_close_to_float(trained: Transformer, bits: int, group: int,
                                              max_kl: float, min_top1: float,
                                              max_ppl_rise: float) -> None:
    ids = affine_sequences(8, 49, torch.Generator().manual_seed(1))  # held-out sequences
    quantized = quantize_model(copy.deepcopy(trained), bits, group)
    with torch.no_grad():
        ref, out = trained(ids[:, :-1]).logits, quantized(ids[:, :-1]).logits
    top1 = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    ppl = [F.cross_entropy(lg.reshape(-1, V), ids[:, 1:].reshape(-1)).exp().item()
           for lg in (ref, out)]
    assert mean_kl(ref, out) <= max_kl, f"int{bits}/g{group}: KL {mean_kl(ref, out):.2e}"
    assert top1 >= min_top1, f"int{bits}/g{group}: top-1 agreement {top1:.3f}"
    assert ppl[1] / ppl[0] - 1 <= max_ppl_rise, f"perplexity {ppl[0]:.4f} -> {ppl[1]:.4f}"


def test_incremental_decoding_matches_a_full_forward(trained: Transformer) -> None:
    """Decoding runs one row per step (the int8 kernel path), a full forward many rows (the
    convert-and-GEMM path): both must give the same logits up to bf16 activation rounding."""
    model = quantize_model(copy.deepcopy(trained), 8)
    ids = affine_sequences(1, 24, torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(1, 24)
        steps = [model(ids[:, :4], cache=cache).logits]
        for t in range(4, 24):
            steps.append(model(ids[:, t:t + 1], cache=cache).logits)
    assert_close(torch.cat(steps, dim=1), full, atol=5e-2, rtol=2e-2,
                 what="cached decoding vs full forward (int8)")
    assert torch.equal(torch.cat(steps, 1).argmax(-1), full.argmax(-1))


# --- checkpoints ------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_checkpoint_round_trip(tmp_path: Path, trained: Transformer, bits: int) -> None:
    model = quantize_model(copy.deepcopy(trained), bits, 32)
    save_quantized(model, tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"]["bits"] == bits
    loaded = load_quantized(tmp_path / "q")
    ids = torch.randint(0, V, (2, 10))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    # nothing in float but the embedding, norms and routers
    floats = {n for n, p in loaded.named_parameters() if p.is_floating_point()}
    assert all(n.endswith(("embed_tokens.weight", "norm.weight", "layernorm.weight",
                           "gate.weight")) for n in floats), floats
    stored = {n: s for n, s in checkpoint_layout(loaded).items()}
    assert stored["layers.1.mlp.experts.gate_up_proj.qweight"][0] == \
        ((8, 64, 64) if bits == 8 else (8, 64, 32))
    if bits == 8 and Path("/proc/self/maps").is_file():
        # int8 weights are used in place from the file's memory map (64-byte aligned), not
        # copied into anonymous memory
        weight = loaded.layers[1].mlp.experts.gate_up_proj.qweight
        maps = [line.split() for line in Path("/proc/self/maps").read_text().splitlines()
                if line.endswith("model.safetensors")]
        spans = [tuple(int(x, 16) for x in m[0].split("-")) for m in maps]
        assert any(lo <= weight.data_ptr() < hi for lo, hi in spans), "int8 weight was copied"


def test_quantized_checkpoint_errors(tmp_path: Path, trained: Transformer) -> None:
    model = quantize_model(copy.deepcopy(trained), 8)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty and is not a dsmoe quantized checkpoint"):
        save_quantized(model, tmp_path / "busy")
    with pytest.raises(ValueError, match="not quantized"):
        save_quantized(copy.deepcopy(trained), tmp_path / "plain")
    save_quantized(model, tmp_path / "q")
    from safetensors.torch import load_file, save_file
    weights = load_file(tmp_path / "q" / "model.safetensors")
    weights["layers.0.self_attn.q_proj.qweight"] = weights["layers.0.self_attn.q_proj.qweight"][:8]
    del weights["layers.1.mlp.experts.down_proj.scale"]
    save_file(weights, tmp_path / "q" / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing: layers\.1\.mlp\.experts\.down_proj\.scale.*"
                                         r"shape mismatch: layers\.0\.self_attn\.q_proj\.qweight"):
        load_quantized(tmp_path / "q")
    (tmp_path / "q" / "model.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(ValueError, match="truncated or corrupted"):
        load_quantized(tmp_path / "q")
    with pytest.raises(ValueError, match="unknown quantization 'int3'"):
        load_model(tmp_path / "q", quant="int3")


@pytest.mark.parametrize("source", ["hf", "gguf"])
def test_quantize_while_loading_equals_quantizing_after(tmp_path: Path, trained: Transformer,
                                                        source: str) -> None:
    if source == "hf":
        path = tmp_path / "hf"
        trained.save_pretrained(path)
    else:
        path = tmp_path / "m.gguf"
        write_model_gguf(trained, path, quant="f32")
    streamed = load_model(path, quant="int4")
    after = quantize_model(copy.deepcopy(trained), 4)
    ids = torch.randint(0, V, (2, 10))
    with torch.no_grad():
        assert torch.equal(streamed(ids).logits, after(ids).logits)


def test_quantize_command(tmp_path: Path, trained: Transformer, capsys) -> None:
    from dsmoe.cli import main
    from dsmoe.tokenizer import Tokenizer

    trained.save_pretrained(tmp_path / "hf")
    Tokenizer.train_bpe(["some text to train on\n"] * 5, vocab_size=270).save(tmp_path / "hf")
    assert main(["quantize", str(tmp_path / "hf"), "--bits", "4", "--group-size", "32",
                 "--out", str(tmp_path / "q4"), "--dtype", "float32"]) == 0
    assert "int4" in capsys.readouterr().out
    assert (tmp_path / "q4" / "tokenizer.json").is_file()
    loaded = load_quantized(tmp_path / "q4")
    expected = quantize_model(copy.deepcopy(trained), 4, 32)
    ids = torch.randint(0, V, (2, 10))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected(ids).logits)
    # --symmetric: Q4_0's form (no zeros) with searched scales, the same as quantize_model's
    assert main(["quantize", str(tmp_path / "hf"), "--bits", "4", "--group-size", "32",
                 "--symmetric", "--out", str(tmp_path / "q4s"), "--dtype", "float32"]) == 0
    symmetric = load_quantized(tmp_path / "q4s")
    assert symmetric.quant_config.symmetric
    expected = quantize_model(copy.deepcopy(trained), 4, 32, symmetric=True)
    with torch.no_grad():
        assert torch.equal(symmetric(ids).logits, expected(ids).logits)
    capsys.readouterr()
    assert main(["quantize", str(tmp_path / "hf"), "--bits", "8", "--symmetric", "--out",
                 str(tmp_path / "q8s")]) == 2
    assert "--symmetric applies to --bits 4 only" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    assert main(["quantize", str(tmp_path / "hf"), "--bits", "8", "--out",
                 str(tmp_path / "busy")]) == 2
    assert "not empty and is not a dsmoe quantized checkpoint" in capsys.readouterr().err


def test_int4_from_a_q4_0_gguf_takes_the_blocks_as_stored(tmp_path: Path, trained: Transformer,
                                                          monkeypatch) -> None:
    """A Q4_0 GGUF loads as symmetric int4 with groups of 32 holding the file's 4-bit values:
    no Q4_0 tensor is dequantized on the way, the weights equal llama.cpp's up to the bf16
    rounding of the block scales, and the result saves and reloads as a dsmoe checkpoint."""
    from dsmoe.checkpoint.gguf import reader

    path = tmp_path / "m.gguf"
    write_model_gguf(trained, path, quant="q4_0")
    floats = load_model(path)  # what llama.cpp computes with (dequantized Q4_0)
    for name in ("dequantize", "dequantize_blocks"):  # whole tensors, chunks of blocks
        def no_q4_0(data, qtype, *rest, real=getattr(reader, name)):
            assert qtype != reader.Q.Q4_0, "a Q4_0 tensor was dequantized"
            return real(data, qtype, *rest)

        monkeypatch.setattr(reader, name, no_q4_0)
    model = load_model(path, quant="int4")
    qc = model.quant_config
    assert (qc.bits, qc.group_size, qc.symmetric) == (4, 32, True)
    experts = model.layers[1].mlp.experts.gate_up_proj
    assert experts.symmetric and experts.group_size == 32 and not hasattr(experts, "zero")
    reference = floats.layers[1].mlp.experts.gate_up_proj.detach()
    assert_close(experts.dequantize(), reference, atol=1e-7,
                 rtol=2 ** -8, what="int4 from Q4_0 vs the Q4_0 values")
    q_proj = model.layers[0].self_attn.q_proj  # llama.cpp's q/k row order undone
    assert_close(q_proj.dequantize(), floats.layers[0].self_attn.q_proj.weight.detach(),
                 atol=1e-7, rtol=2 ** -8, what="q_proj from Q4_0")
    ids = torch.randint(0, V, (2, 10))
    with torch.no_grad():
        out = model(ids).logits
        assert mean_kl(floats(ids).logits, out) < 1e-2
        save_quantized(model, tmp_path / "q")
        assert torch.equal(load_quantized(tmp_path / "q")(ids).logits, out)


def _group_errors(w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Squared error per group of 32 of symmetric int4 (q, scale) against w [N, K]."""
    deq = kernels.dequantize_int4(q, scale, torch.zeros_like(scale))
    return (deq - w).square().reshape(w.shape[0], -1, 32).sum(-1)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(1e-4, 1e3), st.booleans())
def test_symmetric_int4_search_is_never_worse_than_q4_0s_rule(seed: int, magnitude: float,
                                                               heavy_tail: bool) -> None:
    """Each group's searched scale gives a squared error no larger than Q4_0's rule (the
    extreme value at -8 steps) at the same bf16 scale precision, for any weights."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 128, generator=g) * magnitude
    if heavy_tail:  # a few outliers per row, where clipping them pays
        w = w * torch.rand(8, 128, generator=g).pow(-1.5).clamp(max=50)
    w[0, :32] = 0.0  # an all-zero group
    q, scale = kernels.quantize_int4_symmetric(w, 32)
    groups = w.reshape(8, 4, 32)
    extreme = groups.gather(-1, groups.abs().argmax(-1, keepdim=True)).squeeze(-1)
    rule = (extreme / -8.0).to(torch.bfloat16)
    safe = torch.where(rule == 0, torch.ones_like(rule), rule).float()
    q_rule = torch.round(groups / safe.unsqueeze(-1) + 8.0).clamp(0, 15).reshape(8, 128)
    ours = _group_errors(w, q, scale)
    theirs = _group_errors(w, kernels.pack_nibbles(q_rule.to(torch.uint8)), rule)
    assert bool((ours <= theirs).all())


def test_symmetric_int4_beats_llama_cpps_q4_0() -> None:
    """Against llama.cpp's own Q4_0 (gguf-py's quantizer, fp16 scales) on Gaussian rows of
    many magnitudes, the searched scales lose ~11% less squared error in total; a group
    can lose more only through bf16's coarser scale (within 1%)."""
    import gguf as gguf_py

    w = torch.randn(64, 512) * torch.logspace(-3, 0, 64).unsqueeze(1)
    q, scale = kernels.quantize_int4_symmetric(w, 32)
    Q4_0 = gguf_py.GGMLQuantizationType.Q4_0
    ref = torch.from_numpy(gguf_py.quants.dequantize(gguf_py.quants.quantize(w.numpy(), Q4_0),
                                                     Q4_0)).reshape(w.shape)
    ours = _group_errors(w, q, scale)
    theirs = (ref - w).square().reshape(64, -1, 32).sum(-1)
    assert ours.sum() < 0.95 * theirs.sum()
    assert bool((ours <= theirs * 1.01).all())


def test_q4_0_blocks_convert_the_same_natively_and_in_torch(monkeypatch) -> None:
    """The native Q4_0 repacking (one pass over the bytes) equals the torch one, for block
    scales of every kind fp16 has (normal, subnormal, zero, negative)."""
    from dsmoe import native
    from dsmoe.checkpoint.gguf.reader import q4_0_into

    n = 4 * 64
    d = torch.cat([torch.randn(n // 4), torch.randn(n // 4) * 1e-6,  # subnormal in fp16
                   torch.zeros(n // 4), -torch.rand(n // 4) * 60000]).to(torch.float16)
    blocks = torch.randint(0, 256, (n, 18), dtype=torch.uint8)
    blocks[:, :2] = d.view(torch.uint8).reshape(n, 2)

    def convert() -> tuple[torch.Tensor, torch.Tensor]:
        q, scale = torch.empty(n, 16, dtype=torch.uint8), torch.empty(n, dtype=torch.bfloat16)
        q4_0_into(blocks, q, scale)
        return q, scale

    ours = convert()
    monkeypatch.setattr(native, "q4_0_to_int4", lambda blocks, out=None: None)
    theirs = convert()
    assert torch.equal(ours[0], theirs[0])
    assert torch.equal(ours[1].view(torch.int16), theirs[1].view(torch.int16))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_gemm_materialises_the_float_weight_in_chunks(monkeypatch, bits: int,
                                                              dtype: torch.dtype) -> None:
    """Past the row kernels, a quantized matrix is dequantized for a GEMM a chunk of output
    rows at a time (a 16B model's lm_head or dense layer never exists whole in float), with
    the same result as one GEMM over the whole matrix."""
    torch.manual_seed(0)
    linear = nn.Linear(128, 200, bias=False)
    q = QuantLinear.from_linear(linear, bits=bits, group_size=32)
    x = torch.randn(3, 24, 128).to(dtype)  # 72 rows: past both kernels' row limits
    whole = q(x)
    asked: list[int] = []
    real = kernels.chunked_linear

    def spy(rows, N, columns):
        return real(rows, N, lambda n0, n1: asked.append(n1 - n0) or columns(n0, n1))

    monkeypatch.setattr(kernels, "chunked_linear", spy)
    monkeypatch.setattr(kernels, "GEMM_CHUNK_ELEMENTS", 64 * 128)
    chunked = q(x)
    assert asked == [64, 64, 64, 8]
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(chunked, whole, rtol=tol, atol=tol)
