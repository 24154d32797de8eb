"""The whole-model native decode step (``NativeDecoder``) of MLA models: DeepSeek-V2-Lite
(full q_proj), V2 (q_lora, group-limited routing, YaRN) and V3 (q_lora, sigmoid + bias,
noaux_tc, the half rope layout).

It must give the per-module CPU decode path's logits (``EagerDecoder``, whose MLA modules
make their projections and then one ``native.mla_decode`` call): the step calls the same
kernels in the same order, so here the logits are identical; the stated tolerances (fp32
1e-5; bf16 and quantized 2e-2 of the largest logit) are those of the MHA step's tests, for
machines whose kernels sum in other orders. Batches are left-padded (rows differ in
positions and masked slots); the first layer is dense.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, needs_native, spy_native
from test_native_step import KINDS, PROMPTS, _decode, _tolerance

from dsmoe.config import ModelConfig
from dsmoe.decode import EagerDecoder, NativeDecoder, make_decoder, native_unsupported_reason
from dsmoe.finetune.lora import LoRASettings, apply_lora
from dsmoe.generate import left_pad
from dsmoe.model import Transformer
from dsmoe.quant.convert import quantize_model
from dsmoe.quant.linear import QuantLinear

pytestmark = needs_native

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}
SHAPE = dict(vocab_size=97, hidden_size=64, num_hidden_layers=3, moe_intermediate_size=32,
             intermediate_size=96, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
             v_head_dim=16, max_position_embeddings=64, initializer_range=0.2)
CONFIGS = {
    "v2-lite": ("tiny-v2", dict(topk_method="greedy", n_group=1, topk_group=1)),
    "v2": ("tiny-v2", dict(q_lora_rank=48, rope_scaling=YARN, routed_scaling_factor=2.0,
                           attention_bias=True)),
    "v3": ("tiny-v3", dict(q_lora_rank=48, rope_scaling=YARN,
                           extra={"rope_interleave": False})),
}


def _model(kind: str, variant: str) -> Transformer:
    preset, overrides = CONFIGS[variant]
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset(preset).replace(**SHAPE, **overrides)).eval()
    for name, p in model.named_parameters():
        if name.endswith(".bias"):  # zero-initialised: give them values that matter
            p.data.normal_(std=0.2)
    for block in model.layers[model.config.first_k_dense_replace:]:
        bias = block.mlp.gate.e_score_correction_bias
        if bias is not None:  # V3's selection bias: values that change the picks
            bias.normal_(std=0.3)
    if kind != "fp32":
        model = model.to(torch.bfloat16)
    if kind.startswith("int"):  # kv_b_proj too: the plan dequantizes it once
        quantize_model(model, bits=int(kind[3]), group_size=32, lm_head_bits=int(kind[3]),
                       symmetric=kind.endswith("sym"))
    return model


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("variant", list(CONFIGS))
@pytest.mark.parametrize("kind", KINDS)
def test_mla_native_step_matches_the_module_path(kind: str, variant: str, batch: int) -> None:
    model = _model(kind, variant)
    assert native_unsupported_reason(model, batch) is None
    prompts, steps = PROMPTS[batch], 5
    P = len(prompts[0])
    want, tokens = _decode(EagerDecoder(model, batch, P + steps), prompts, None, steps)
    got, _ = _decode(NativeDecoder(model, batch, P + steps), prompts, tokens, steps)
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close(g, w, atol=_tolerance(kind, w), rtol=0,
                     what=f"{variant} {kind} batch {batch} step {i}")
        assert torch.equal(g.argmax(-1), w.argmax(-1)), f"{variant} {kind} step {i}: greedy"


@pytest.mark.parametrize(("kind", "variant"), [("bf16", "v3"), ("int8", "v2")])
def test_mla_native_step_at_eight_rows(kind: str, variant: str) -> None:
    """The step's largest batch, rows of seven prompt lengths (up to 6 left-padded slots)."""
    model = _model(kind, variant)
    prompts = [[5, 17, 42, 8, 3, 11, 2], [9], [60, 61], [1, 2, 3], [7] * 7, [30, 31, 32, 33],
               [70, 71, 72, 73, 74], [4, 5, 6, 7, 8, 9]]
    want, tokens = _decode(EagerDecoder(model, 8, 12), prompts, None, 5)
    got, _ = _decode(NativeDecoder(model, 8, 12), prompts, tokens, 5)
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close(g, w, atol=_tolerance(kind, w), rtol=0, what=f"{variant} {kind} step {i}")


@pytest.mark.parametrize("variant", ["v2-lite", "v3"])
def test_each_mla_step_is_one_native_call(variant: str, monkeypatch) -> None:
    """make_decoder picks the native step for MLA models; a step calls nothing else native
    (no per-module mla_decode) and never dequantizes kv_b_proj again."""
    model = _model("int4", variant)
    steps = spy_native(monkeypatch, "decode_step", lambda *args: [1])
    per_module = [spy_native(monkeypatch, name, lambda *args: [name])
                  for name in ("linear_decode", "rmsnorm_decode", "mla_decode",
                               "router_decode", "experts_decode", "swiglu_decode")]
    dequantized = []
    original = QuantLinear.dequantize
    monkeypatch.setattr(QuantLinear, "dequantize",
                        lambda self, *a, **k: dequantized.append(1) or original(self, *a, **k))
    decoder = make_decoder(model, 3, 9)
    assert isinstance(decoder, NativeDecoder)
    ids, mask = left_pad(PROMPTS[3], 0)
    with torch.inference_mode():
        logits = decoder.prefill(ids, (mask.cumsum(1) - 1).clamp_min(0), mask)
        before, built = [len(seen) for seen in per_module], len(dequantized)
        for _ in range(4):
            logits = decoder.step(logits.argmax(dim=-1))
    assert len(steps) == 4
    assert [len(seen) for seen in per_module] == before
    assert len(dequantized) == built


def test_a_reused_decoder_sees_new_weights_loaded_in_place() -> None:
    """The plan holds a quantized kv_b_proj dequantized; ``load_state_dict`` writes new
    weights into the same storage, so the decoder must notice by the tensors' versions
    (their addresses do not move) and rebuild before its next prefill."""
    model, other = _model("int8", "v2-lite"), _model("int8", "v2-lite")
    for block in other.layers:
        block.self_attn.kv_b_proj.scale.mul_(1.7)
    prompts, steps = PROMPTS[1], 3
    decoder = NativeDecoder(model, 1, len(prompts[0]) + steps)
    _decode(decoder, prompts, None, steps)
    model.load_state_dict(other.state_dict())
    want, tokens = _decode(EagerDecoder(model, 1, len(prompts[0]) + steps), prompts, None, steps)
    got, _ = _decode(decoder, prompts, tokens, steps)
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close(g, w, atol=_tolerance("int8", w), rtol=0, what=f"step {i} after the load")


def test_the_yes_or_no_check_dequantizes_nothing(monkeypatch) -> None:
    """``native_unsupported_reason`` builds the plan without a cache only to find refusals:
    dequantizing every layer's kv_b_proj there (V3: ~2 GB in bf16) would be thrown away."""
    model = _model("int4", "v3")
    calls = []
    original = QuantLinear.dequantize
    monkeypatch.setattr(QuantLinear, "dequantize",
                        lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    assert native_unsupported_reason(model, 1) is None and calls == []


def test_lora_kv_b_proj_is_refused_by_name() -> None:
    """A LoRA adapter adds to kv_b_proj's output, which the absorbed form cannot honour."""
    model = _model("fp32", "v2-lite")
    apply_lora(model, LoRASettings(r=4, alpha=8.0, targets=("v",)))
    reason = native_unsupported_reason(model.eval(), 1)
    assert reason is not None and "layers.0.self_attn.kv_b_proj is a LoRALinear" in reason
    assert not isinstance(make_decoder(model, 1, 9), NativeDecoder)


def test_mla_refusals_name_the_module() -> None:
    model = _model("bf16", "v2")
    model.layers[1].self_attn.kv_b_proj.float()  # the module path would take torch's ops
    assert "layers.1.self_attn.kv_b_proj: a torch.float32 weight" in native_unsupported_reason(
        model)
    model = _model("fp32", "v3")
    model.layers[2].self_attn.q_a_layernorm = torch.nn.LayerNorm(48)
    assert "layers.2.self_attn.q_a_layernorm is not an RMSNorm" in native_unsupported_reason(
        model)


def test_only_length_dependent_rope_is_refused() -> None:
    """YaRN's frequencies and softmax scale are fixed by the config (it qualifies); dynamic
    NTK rescales with the sequence length, which the step's RoPE table cannot follow."""
    dynamic = {"type": "dynamic", "factor": 2.0}
    model = Transformer(ModelConfig.preset("tiny-v2").replace(**SHAPE, rope_scaling=dynamic))
    assert "depends on the sequence length" in native_unsupported_reason(model.eval())
    assert native_unsupported_reason(_model("fp32", "v2")) is None
