"""The whole-model native decode step (``NativeDecoder``, csrc/decode_step.c).

It must give the per-module CPU decode path's logits (``EagerDecoder``, whose modules
call the same native ops one by one): exactly here, and at most fp32 reassociation
apart in general (stated tolerances: fp32 1e-5; bf16 and quantized 2e-2 of the largest
logit, one bf16 rounding flipped somewhere). Against torch's own path
(``DSMOE_NATIVE_KERNELS=0``) the usual kernel tolerances hold. Batches are left-padded,
so rows differ in positions and masked slots; the first layer is dense.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, generation_config, needs_native, spy_native
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsmoe import native
from dsmoe.config import ModelConfig
from dsmoe.decode import EagerDecoder, NativeDecoder, make_decoder, native_unsupported_reason
from dsmoe.generate import left_pad
from dsmoe.model import Transformer
from dsmoe.quant.convert import quantize_model

pytestmark = needs_native

PROMPTS = {1: [[5, 17, 42, 8, 3]], 3: [[5, 17, 42, 8, 3], [9], [60, 61]]}
KINDS = ["fp32", "bf16", "int8", "int4", "int4-sym"]


def _model(kind: str, cfg: ModelConfig | None = None, attention_bias: bool = False
           ) -> Transformer:
    torch.manual_seed(0)
    cfg = (cfg or generation_config()).replace(attention_bias=attention_bias)
    model = Transformer(cfg).eval()
    if attention_bias:  # zero-initialised: give them values that matter
        for name, p in model.named_parameters():
            if name.endswith("_proj.bias"):
                p.data.normal_(std=0.2)
    if kind != "fp32":
        model = model.to(torch.bfloat16)
    if kind.startswith("int"):
        quantize_model(model, bits=int(kind[3]), group_size=32, lm_head_bits=int(kind[3]),
                       symmetric=kind.endswith("sym"))
    return model


def _decode(decoder, prompts: list[list[int]], tokens: list[torch.Tensor] | None, steps: int
            ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Logits of the prefill and ``steps`` steps, fed ``tokens`` (None: greedy picks)."""
    ids, mask = left_pad(prompts, 0)
    positions = (mask.cumsum(dim=1) - 1).clamp_min(0)
    with torch.inference_mode():
        logits = [decoder.prefill(ids, positions, mask)]
        fed = tokens or []
        for i in range(steps):
            if tokens is None:
                fed.append(logits[-1].argmax(dim=-1))
            logits.append(decoder.step(fed[i]).clone())
    return logits, fed


def _tolerance(kind: str, logits: torch.Tensor) -> float:
    return 1e-5 if kind == "fp32" else 2e-2 * float(logits.abs().max())


@pytest.mark.parametrize("attention_bias", [False, True])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("kind", KINDS)
def test_native_step_matches_the_module_path(kind: str, batch: int, attention_bias: bool
                                             ) -> None:
    model = _model(kind, attention_bias=attention_bias)
    prompts, steps = PROMPTS[batch], 6
    P = len(prompts[0])
    want, tokens = _decode(EagerDecoder(model, batch, P + steps), prompts, None, steps)
    got, _ = _decode(NativeDecoder(model, batch, P + steps), prompts, tokens, steps)
    for i, (g, w) in enumerate(zip(got, want)):
        tol = _tolerance(kind, w)
        assert_close(g, w, atol=tol, rtol=0, what=f"{kind} batch {batch} step {i}")


@pytest.mark.parametrize("kind", ["fp32", "bf16", "int8"])
def test_native_step_matches_torch_without_native_kernels(kind: str, monkeypatch) -> None:
    """The torch path (kernels switched off) sums in other orders and, for int8, keeps
    bf16 activations where the native kernel takes 16-bit fixed point."""
    model = _model(kind)
    prompts, steps = PROMPTS[3], 4
    got, tokens = _decode(NativeDecoder(model, 3, 9), prompts, None, steps)
    try:
        monkeypatch.setenv("DSMOE_NATIVE_KERNELS", "0")
        native.library.cache_clear()
        want, _ = _decode(EagerDecoder(model, 3, 9), prompts, tokens, steps)
    finally:
        monkeypatch.delenv("DSMOE_NATIVE_KERNELS")
        native.library.cache_clear()
    for i, (g, w) in enumerate(zip(got, want)):
        tol = 1e-4 if kind == "fp32" else 6e-2 * float(w.abs().max())
        assert_close(g, w, atol=tol, rtol=0, what=f"{kind} vs torch, step {i}")


@pytest.mark.parametrize("routing", [
    dict(scoring_func="sigmoid", topk_method="noaux_tc", n_group=2, topk_group=1),
    dict(topk_method="group_limited_greedy", n_group=2, topk_group=1),
])
def test_native_step_routes_as_the_router(routing: dict) -> None:
    """V2/V3 routing methods on MHA models: the step calls the router's own native routing."""
    cfg = generation_config().replace(**routing)
    model = _model("fp32", cfg)
    if model.layers[1].mlp.gate.e_score_correction_bias is not None:
        model.layers[1].mlp.gate.e_score_correction_bias.normal_(std=0.3)
    want, tokens = _decode(EagerDecoder(model, 3, 9), PROMPTS[3], None, 4)
    got, _ = _decode(NativeDecoder(model, 3, 9), PROMPTS[3], tokens, 4)
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close(g, w, atol=1e-5, rtol=0, what=f"{routing} step {i}")


def test_each_step_is_one_native_call(monkeypatch) -> None:
    """make_decoder picks the native step on CPU, and a step calls nothing else native."""
    model = _model("int8")
    steps = spy_native(monkeypatch, "decode_step", lambda *args: [1])
    per_module = [spy_native(monkeypatch, name, lambda *args: [name])
                  for name in ("linear_decode", "rmsnorm_decode", "attention_decode",
                               "router_decode", "experts_decode", "swiglu_decode")]
    decoder = make_decoder(model, 3, 9)
    assert isinstance(decoder, NativeDecoder)
    ids, mask = left_pad(PROMPTS[3], 0)
    with torch.inference_mode():
        logits = decoder.prefill(ids, (mask.cumsum(1) - 1).clamp_min(0), mask)
        before = [len(seen) for seen in per_module]
        for _ in range(4):
            logits = decoder.step(logits.argmax(dim=-1))
    assert len(steps) == 4
    assert [len(seen) for seen in per_module] == before


def test_plan_follows_replaced_weights() -> None:
    """Weights assigned anew after the decoder was built are the ones the next prefill's
    steps read (the plan is keyed on the tensors' addresses)."""
    model = _model("fp32")
    decoder = NativeDecoder(model, 1, 9)
    state = {k: v.clone() * 1.5 if v.is_floating_point() else v.clone()
             for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)
    got, tokens = _decode(decoder, PROMPTS[1], None, 3)
    want, _ = _decode(EagerDecoder(model, 1, 9), PROMPTS[1], tokens, 3)
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close(g, w, atol=1e-5, rtol=0, what=f"step {i} after new weights")


def test_non_finite_step_is_redone_by_the_modules() -> None:
    """A token whose embedding is not finite makes the router decline (-1): that step runs
    through the modules, whose torch fallbacks give what the eager decoder gives."""
    model = _model("fp32")
    with torch.no_grad():
        model.embed_tokens.weight[7] = float("inf")
    tokens = [torch.tensor([7]), torch.tensor([3]), torch.tensor([4])]
    got, _ = _decode(NativeDecoder(model, 1, 9), PROMPTS[1], tokens, 3)
    want, _ = _decode(EagerDecoder(model, 1, 9), PROMPTS[1], tokens, 3)
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0, equal_nan=True,
                                   msg=f"step {i}")


def test_token_outside_the_vocabulary_is_an_error() -> None:
    decoder = NativeDecoder(_model("fp32"), 1, 9)
    _decode(decoder, PROMPTS[1], None, 0)
    with pytest.raises(ValueError, match=r"token id outside \[0, vocab_size\)"):
        decoder.step(torch.tensor([97]))


def test_unsupported_models_decode_eagerly() -> None:
    """(MLA models qualify: tests/test_native_step_mla.py.)"""
    dynamic = {"type": "dynamic", "factor": 2.0}
    model = Transformer(generation_config().replace(rope_scaling=dynamic)).eval()
    assert "depends on the sequence length" in native_unsupported_reason(model)
    assert type(make_decoder(model, 1, 8)) is EagerDecoder


def test_layouts_the_step_cannot_read_decode_eagerly() -> None:
    """The step copies embedding rows by offset and adds biases of the activations' dtype,
    as the modules' decode paths do: anything else is refused, not misread."""
    model = _model("fp32")
    table = model.embed_tokens.weight
    model.embed_tokens.weight = torch.nn.Parameter(table.detach().t().contiguous().t())
    assert "embedding table is not contiguous" in native_unsupported_reason(model)
    mixed = _model("bf16")
    down = mixed.layers[1].mlp.experts.down_proj
    down.data = down.data.float()  # gate_up bf16, down fp32: the experts call takes one kind
    assert "layers.1.mlp.experts" in native_unsupported_reason(mixed)
    biased = _model("bf16", attention_bias=True)
    biased.layers[0].self_attn.q_proj.bias.data = biased.layers[0].self_attn.q_proj.bias.float()
    assert "layers.0.self_attn.q_proj: a torch.float32 bias" in native_unsupported_reason(biased)


def test_decode_step_checks_what_it_is_given() -> None:
    decoder = NativeDecoder(_model("fp32"), 2, 9)
    plan, scratch = decoder.plan.model, decoder.scratch
    ids, pos, valid = torch.zeros(2, dtype=torch.long), decoder.positions, decoder.valid
    with pytest.raises(ValueError, match=r"slot 9 outside the cache's \[0, 9\)"):
        native.decode_step(plan, ids, pos, valid, 9, scratch)
    with pytest.raises(ValueError, match=r"tokens must be contiguous torch.int64 \[2\]"):
        native.decode_step(plan, ids[:1], pos, valid, 0, scratch)
    with pytest.raises(ValueError, match="scratch smaller"):
        native.decode_step(plan, ids, pos, valid, 0, scratch[:1])


def test_other_fallback_reasons(monkeypatch) -> None:
    model = _model("fp32")
    assert native_unsupported_reason(model, 3) is None
    assert "batch size 9" in native_unsupported_reason(model, 9)
    assert "training mode" in native_unsupported_reason(model.train())
    model.eval()
    hook = model.layers[2].mlp.register_forward_hook(lambda *args: None)
    assert "layers.2.mlp has forward hooks" in native_unsupported_reason(model)
    hook.remove()
    model.layers[1].mlp.dispatcher = torch.nn.Identity()  # e.g. expert parallelism's
    assert "experts outside this process" in native_unsupported_reason(model)
    try:
        monkeypatch.setenv("DSMOE_NATIVE_KERNELS", "0")
        native.library.cache_clear()
        assert "unavailable" in native_unsupported_reason(_model("fp32"))
    finally:
        monkeypatch.delenv("DSMOE_NATIVE_KERNELS")
        native.library.cache_clear()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(heads=st.sampled_from([(2, 1), (2, 2), (4, 2), (6, 3)]), d=st.sampled_from([8, 16]),
       experts=st.sampled_from([(4, 1), (4, 2), (6, 3)]), batch=st.integers(1, 8),
       dense=st.integers(0, 2), dtype=st.sampled_from(["fp32", "bf16"]),
       seed=st.integers(0, 2**16))
def test_native_step_matches_over_shapes(heads, d, experts, batch, dense, dtype, seed) -> None:
    (H, Hkv), (E, K) = heads, experts
    cfg = generation_config().replace(
        hidden_size=H * d, num_attention_heads=H, num_key_value_heads=Hkv,
        n_routed_experts=E, num_experts_per_tok=K, first_k_dense_replace=dense,
        num_hidden_layers=2)
    model = _model(dtype, cfg)
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 97, (int(n),), generator=g).tolist()
               for n in torch.randint(1, 6, (batch,), generator=g)]
    P = max(map(len, prompts))
    want, tokens = _decode(EagerDecoder(model, batch, P + 3), prompts, None, 3)
    got, _ = _decode(NativeDecoder(model, batch, P + 3), prompts, tokens, 3)
    for i, (a, b) in enumerate(zip(got, want)):
        assert_close(a, b, atol=_tolerance(dtype, b), rtol=0, what=f"step {i}")
