"""The CPU decode step's small native ops (csrc/decode_ops.c via ``dsmoe.native``) and where
the model takes them: linear layers reading and writing their activations' dtype, the
shared experts' SwiGLU, RMSNorm (with the residual add), every routing method, and the routed
experts' and attention's one-call steps without casts around them.

Each must give torch's result: the linear layers bit for bit (the same kernel, one
rounding), RMSNorm to the last bit of its dtype (only the mean square's sum order differs),
the router the same experts (ties: the same scores) and fp32 weights to a few ulp (exp is
another implementation). And every decode step
must really take them (the spies), while training and prefill keep torch's ops.

Shapes: T tokens, D hidden, E experts, K picks, F expert width, V vocab.
"""

from __future__ import annotations

import pytest
import torch
from conftest import needs_native, spy_native
from hypothesis import given, settings
from hypothesis import strategies as st

from dsmoe import native
from dsmoe.config import ModelConfig
from dsmoe.linear import DECODE_MAX_ROWS, FP32_DECODE_MAX_ROWS, Linear
from dsmoe.mlp import SwiGLUMLP
from dsmoe.model import Transformer
from dsmoe.model.norm import RMSNorm
from dsmoe.moe.experts import SwiGLUExperts
from dsmoe.moe.router import Router
from dsmoe.quant import quantize_model
from dsmoe.quant.experts import QuantSwiGLUExperts
from dsmoe.quant.linear import QuantLinear

pytestmark = needs_native
DTYPES = [torch.float32, torch.bfloat16]
# The native ops a decode step uses; None from any of them means "torch's path".
OPS = ("linear_decode", "swiglu_decode", "rmsnorm_decode", "router_decode", "experts_decode",
       "attention_decode")


def _assert_near(fast: torch.Tensor, slow: torch.Tensor, dtype: torch.dtype, bits: int) -> None:
    """Largest difference within a share of the largest value: fp32 rounding; bf16
    rounding; the quantized kernels' fixed-point activations (int4: a step of 1/127 of a
    block's largest value, int8: 1/32767 of a row's, which a last-bit difference upstream
    can move by one step), for both paths alike."""
    share = max({4: 5e-2, 8: 1e-3}.get(bits, 0.0), 1e-5 if dtype == torch.float32 else 2e-2)
    diff, top = (fast.float() - slow.float()).abs().max(), slow.float().abs().max()
    assert diff <= share * top, f"max diff {diff:.3g}, largest value {top:.3g}"


def _torch_only(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in OPS:
        monkeypatch.setattr(native, name, lambda *args, **kwargs: None)


# --- linear layers ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["float", "int8", "int4", "int4 symmetric"])
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_linear_layers_equal_the_cast_path_bit_for_bit(monkeypatch, dtype, kind, rows):
    calls = spy_native(monkeypatch, "linear_decode", lambda x, *rest: [x.shape[0]])
    layer = Linear(256, 64, bias=False).to(dtype)
    if kind != "float":
        layer = QuantLinear.from_linear(layer, bits=8 if kind == "int8" else 4, group_size=64,
                                        symmetric=kind.endswith("symmetric"))
    x = torch.randn(rows, 1, 256).to(dtype)
    with torch.no_grad():
        fast = layer(x)
        monkeypatch.setattr(native, "linear_decode", lambda *args, **kwargs: None)
        slow = layer(x)
    limit = FP32_DECODE_MAX_ROWS if dtype == torch.float32 else DECODE_MAX_ROWS
    expected = [rows] if kind != "float" or rows <= limit else []  # float: the row limits
    assert calls == expected and fast.dtype == dtype and fast.shape == (rows, 1, 64)
    if kind == "float":  # torch's path is F.linear, another summation order
        _assert_near(fast, slow, dtype, 0)
    else:  # the same kernel on the same fp32 rows, one rounding
        assert torch.equal(fast, slow)


def test_linear_decode_refuses_what_it_cannot_read():
    x = torch.randn(2, 64)
    assert native.linear_decode(x.double(), native.Operand(torch.randn(8, 64))) is None
    assert native.linear_decode(x, native.Operand(torch.randn(64, 8).T)) is None  # strided
    assert native.linear_decode(x, native.Operand(torch.randn(8, 64).half())) is None
    with pytest.raises(ValueError, match="do not fit"):
        native.linear_decode(x, native.Operand(torch.randn(8, 32)))
    x[1, 3] = float("inf")  # int8 rows must be finite: torch's path handles them
    q = torch.randint(-127, 127, (8, 64), dtype=torch.int8)
    assert native.linear_decode(x, native.Operand(q, torch.ones(8).bfloat16())) is None


# --- shared experts ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [0, 8, 4])
def test_swiglu_mlp_decode_step_is_one_call_equal_to_torch(monkeypatch, dtype, bits):
    calls = spy_native(monkeypatch, "swiglu_decode", lambda x, *ops: [x.shape[0]])
    mlp = SwiGLUMLP(128, 192, init_std=0.1).to(dtype).eval()
    if bits:
        quantize_model(mlp, bits=bits, group_size=64)
    x = torch.randn(3, 1, 128).to(dtype)
    with torch.no_grad():
        fast = mlp(x)
        mlp(torch.randn(9, 128).to(dtype))  # prefill-sized: torch's path
    _torch_only(monkeypatch)
    with torch.no_grad():
        slow = mlp(x)
    assert calls == [3] and fast.shape == x.shape and fast.dtype == dtype
    _assert_near(fast, slow, dtype, bits)  # fp32 inside and one rounding vs one per op


def test_swiglu_mlp_with_gradients_keeps_torchs_path(monkeypatch):
    calls = spy_native(monkeypatch, "swiglu_decode", lambda x, *ops: [x.shape[0]])
    mlp = SwiGLUMLP(64, 96)
    x = torch.randn(1, 64, requires_grad=True)
    mlp(x).sum().backward()
    assert calls == [] and x.grad is not None and mlp.gate_proj.weight.grad is not None


# --- RMSNorm -----------------------------------------------------------------------------------
@given(rows=st.integers(1, 8), D=st.integers(1, 300), bf16=st.booleans(),
       scale=st.sampled_from([1e-3, 1.0, 50.0]), seed=st.integers(0, 2**16))
def test_rmsnorm_decode_equals_torch(rows, D, bf16, scale, seed):
    g = torch.Generator().manual_seed(seed)
    dtype = torch.bfloat16 if bf16 else torch.float32
    norm = RMSNorm(D, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(D, generator=g))
    x = (torch.randn(rows, D, generator=g) * scale).to(dtype)
    delta = torch.randn(rows, D, generator=g).to(dtype)
    total, out = native.rmsnorm_decode(x, norm.weight.detach(), norm.eps, delta)
    with torch.no_grad():
        ref_total = x + delta
        x32 = ref_total.float()
        ref = norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)
                             ).to(dtype)
    assert torch.equal(total, ref_total)
    # the mean square may differ in its last fp32 bit: within one unit of the dtype
    ulp = 2.0**-7 if bf16 else 2.0**-22
    torch.testing.assert_close(out.float(), ref.float(), atol=1e-30,
                               rtol=2 * ulp)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rmsnorm_module_takes_the_native_step_only_without_gradients(monkeypatch, dtype):
    calls = spy_native(monkeypatch, "rmsnorm_decode",
                       lambda x, w, eps, delta=None: [(x.shape[0], delta is not None)])
    norm = RMSNorm(64).to(dtype)
    x, delta = torch.randn(2, 1, 64).to(dtype), torch.randn(2, 1, 64).to(dtype)
    with torch.no_grad():
        y = norm(x)
        total, z = norm.add_and_norm(x, delta)
        norm(torch.randn(9, 64).to(dtype))  # prefill-sized
    assert calls == [(2, False), (2, True)]
    assert torch.equal(total, x + delta)
    _torch_only(monkeypatch)
    with torch.no_grad():
        tol = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=0, rtol=1e-2)
        torch.testing.assert_close(y, norm(x), **tol)
        torch.testing.assert_close(z, norm(x + delta), **tol)
    x.requires_grad_(True)
    norm.add_and_norm(x, delta)[1].float().sum().backward()
    assert x.grad is not None and len(calls) == 2


# --- router ----------------------------------------------------------------------------------
# topk_method -> the config keys of its groups (n_group / n_devices and how many are kept).
GROUP_KEYS = {"greedy": None, "group_limited_greedy": ("n_group", "topk_group"),
              "noaux_tc": ("n_group", "topk_group"),
              "device_limited": ("n_devices", "max_devices_per_token")}


def _router(E: int, K: int, renorm: bool, scaling: float, dtype: torch.dtype,
            method: str = "greedy", groups: int = 1, keep: int = 1,
            scoring: str = "softmax") -> Router:
    keys = GROUP_KEYS[method]
    cfg = ModelConfig.preset("tiny").replace(
        hidden_size=48, n_routed_experts=E, num_experts_per_tok=K, norm_topk_prob=renorm,
        routed_scaling_factor=scaling, topk_method=method, scoring_func=scoring,
        **(dict(zip(keys, (groups, keep))) if keys else {}))
    return Router(cfg).to(dtype)


@st.composite
def routings(draw):
    """(method, scoring, E, K, groups, keep) that the config accepts."""
    method = draw(st.sampled_from(sorted(GROUP_KEYS)))
    scoring = "sigmoid" if method == "noaux_tc" else draw(st.sampled_from(["softmax", "sigmoid"]))
    E = draw(st.sampled_from([8, 16, 64]))
    groups = keep = 1
    if method != "greedy":  # keeping every group would be greedy again: keep fewer
        groups = draw(st.sampled_from([g for g in (2, 4, 8) if E // g >= 2]))
        keep = draw(st.integers(1, groups - 1))
    K = draw(st.integers(1, min(8, keep * (E // groups))))
    return method, scoring, E, K, groups, keep


def _native_route(router: Router, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    rank, groups, keep = router.grouping
    return native.router_decode(x, router.weight, router.top_k, router.renormalize,
                                router.scaling, sigmoid=router.sigmoid,
                                bias=router.e_score_correction_bias, group_rank=rank,
                                groups=groups, keep_groups=keep)


@settings(max_examples=60)  # ~2 ms each; 15 rarely drew a group ranking that decides
@given(routing=routings(), T=st.integers(1, 8), renorm=st.booleans(),
       scaling=st.sampled_from([1.0, 2.5]), bf16=st.booleans(),
       ties=st.sampled_from(["none", "row", "bias"]), seed=st.integers(0, 2**16))
def test_router_decode_picks_torchs_experts_with_torchs_weights(routing, T, renorm, scaling,
                                                                bf16, ties, seed):
    """Every routing method: torch's selection run on the native scores picks the same
    experts (ties: of the same scores), the picks keep to their groups, and the weights
    equal torch's path's to fp32 rounding."""
    method, scoring, E, K, groups, keep = routing
    torch.manual_seed(seed)
    dtype = torch.bfloat16 if bf16 else torch.float32
    router = _router(E, K, renorm, scaling, dtype, method, groups, keep, scoring)
    bias = router.e_score_correction_bias
    if bias is not None:  # V3's balancing bias; "bias": equal steps, ties between experts
        bias.copy_(torch.randint(-2, 3, (E,)) * 0.05 if ties == "bias" else torch.randn(E) * 0.1)
    x = torch.randn(T, 48).to(dtype)
    if ties == "row":
        x[0] = 0  # every score equal: a tie over all experts and groups
    with torch.no_grad():
        idx, weight, score, scores, logits = _native_route(router, x)
        router.native_decode = False
        ref = router(x)
    torch.testing.assert_close(logits, ref.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores, ref.scores, atol=1e-7, rtol=1e-5)
    choice = scores if bias is None else scores + bias  # [T, E], the native values
    want = router.select(choice)  # torch's selection on the same values
    got_c = choice.gather(1, idx)
    assert torch.equal(got_c, got_c.sort(-1, descending=True).values)  # descending order
    assert torch.equal(got_c, choice.gather(1, want).sort(-1, descending=True).values)
    assert all(len(set(row)) == K for row in idx.tolist())
    if groups > 1:  # every pick inside the kept groups
        assert all(len({e // (E // groups) for e in row}) <= keep for row in idx.tolist())
    torch.testing.assert_close(score, scores.gather(1, idx), atol=0, rtol=0)
    for t in range(T):  # weights expert by expert where both paths picked the same ones
        if torch.equal(idx[t].sort().values, ref.topk_idx[t].sort().values):
            torch.testing.assert_close(weight[t, idx[t].argsort()],
                                       ref.topk_weight[t, ref.topk_idx[t].argsort()],
                                       atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("method", sorted(GROUP_KEYS))
def test_router_decode_breaks_ties_toward_the_lower_id(method):
    """All scores equal: the first groups, then the first experts in them, as torch's topk
    keeps the lower index of a tie; a bias that lifts the last group moves the picks."""
    scoring = "sigmoid" if method == "noaux_tc" else "softmax"
    router = _router(16, 3, True, 1.0, torch.float32, method, 4, 2, scoring)
    x = torch.zeros(1, 48)
    with torch.no_grad():
        assert _native_route(router, x)[0].tolist() == [[0, 1, 2]]
        if router.e_score_correction_bias is not None:
            router.e_score_correction_bias[12:] = 0.25  # the last group, a tie inside it
            router.e_score_correction_bias[14] = 0.5
            assert _native_route(router, x)[0].tolist() == [[14, 12, 13]]
            router.e_score_correction_bias.zero_()[0] = 0.3  # group 0 has the best expert,
            router.e_score_correction_bias[[4, 5, 8, 9]] = 0.2  # 1 and 2 the best two
            assert _native_route(router, x)[0].tolist() == [[4, 5, 8]]


@pytest.mark.parametrize("method", sorted(GROUP_KEYS))
def test_router_takes_the_native_step_for_every_method(monkeypatch, method):
    calls = spy_native(monkeypatch, "router_decode", lambda x, *rest, **kw: [x.shape[0]])
    scoring = "sigmoid" if method == "noaux_tc" else "softmax"
    router = _router(16, 2, True, 1.0, torch.bfloat16, method, 4, 2, scoring)
    with torch.no_grad():
        out = router(torch.randn(3, 48).to(torch.bfloat16))
        router(torch.randn(9, 48).to(torch.bfloat16))  # prefill-sized
    assert calls == [3] and out.topk_idx.dtype == torch.int64 and out.topk_weight.dtype == torch.float32
    router.float()(torch.randn(1, 48, requires_grad=True)).topk_weight.sum().backward()
    router.select = lambda c: router._own_select(c)  # analysis.disabled_top_experts' swap
    with torch.no_grad():
        router(torch.randn(1, 48))
    assert calls == [3]


# --- the model's decode step ------------------------------------------------------------------
def _model(bits: int, dtype: torch.dtype, **changes) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny").replace(
        vocab_size=300, hidden_size=128, num_attention_heads=4, num_key_value_heads=4,
        num_hidden_layers=2, moe_intermediate_size=64, intermediate_size=192,
        initializer_range=0.1, **changes)
    model = Transformer(cfg).to(dtype).eval()
    with torch.no_grad():
        for layer in model.moe_layers():
            layer.gate.weight.normal_(std=1.0)  # decisive routing: no near-ties
    return quantize_model(model, bits=bits, group_size=64) if bits else model


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [0, 8, 4])
def test_decode_steps_take_every_native_op_and_equal_torchs(monkeypatch, dtype, bits):
    model = _model(bits, dtype)
    seen = {name: spy_native(monkeypatch, name, lambda *args, **kwargs: [1]) for name in OPS}
    prompt = torch.randint(0, 300, (2, 6))
    with torch.inference_mode():
        fast = model.generate(prompt, max_new_tokens=4)
        cache = model.new_cache(2, 12)
        model(prompt, cache=cache)
        fast_logits = model(fast[:, :1], cache=cache).logits
    # per step: each layer's 2 norms + the final one, V1 routing of the MoE layer, the
    # shared experts (and the dense layer's MLP), the attention's projections
    assert all(seen.values()), {name: len(v) for name, v in seen.items()}
    _torch_only(monkeypatch)
    with torch.inference_mode():
        cache = model.new_cache(2, 12)
        model(prompt, cache=cache)
        slow_logits = model(fast[:, :1], cache=cache).logits
        slow = model.generate(prompt, max_new_tokens=4)
    _assert_near(fast_logits, slow_logits, dtype, bits)
    if dtype == torch.float32 and bits != 4:
        assert torch.equal(fast, slow)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("preset", ["tiny-v2", "tiny-v3"])
def test_mla_models_route_their_decode_steps_natively(monkeypatch, dtype, preset):
    """V2's group-limited and V3's sigmoid + bias routing: one native call per MoE layer
    and step, the torch path's logits."""
    torch.manual_seed(0)
    cfg = ModelConfig.preset(preset).replace(vocab_size=300, num_hidden_layers=3,
                                             initializer_range=0.1)
    model = Transformer(cfg).to(dtype).eval()
    with torch.no_grad():
        for layer in model.moe_layers():
            layer.gate.weight.normal_(std=1.0)  # decisive routing: no near-ties
            if layer.gate.e_score_correction_bias is not None:
                layer.gate.e_score_correction_bias.normal_(std=0.1)
    routed = spy_native(monkeypatch, "router_decode", lambda x, *rest, **kw: [x.shape[0]])
    prompt = torch.randint(0, 300, (2, 6))
    with torch.inference_mode():
        cache = model.new_cache(2, 8)
        model(prompt, cache=cache)
        fast = model(prompt[:, :1], cache=cache).logits
    assert routed == [2, 2]  # the step's two MoE layers (the prompt is prefill-sized)
    monkeypatch.setattr(native, "router_decode", lambda *args, **kwargs: None)
    with torch.inference_mode():
        cache = model.new_cache(2, 8)
        model(prompt, cache=cache)
        slow = model(prompt[:, :1], cache=cache).logits
    _assert_near(fast, slow, dtype, 0)


# --- the one-call experts and attention, in the activations' dtype ------------------------
@pytest.mark.parametrize("kind", ["bf16", "int8", "int4"])
def test_experts_decode_reads_and_writes_bf16_as_the_cast_path(kind):
    T, D, F, E = 3, 128, 64, 8
    experts = SwiGLUExperts(E, D, F, init_std=0.1).to(torch.bfloat16)
    weights: tuple = (experts.gate_up_proj.detach(), experts.down_proj.detach())
    extra: dict = {}
    if kind != "bf16":
        q = QuantSwiGLUExperts.from_experts(experts, bits=8 if kind == "int8" else 4,
                                            group_size=64)
        gu, dn = q.gate_up_proj, q.down_proj
        weights = (gu.qweight, dn.qweight, (gu.scale, dn.scale))
        if kind == "int4":
            extra = dict(zeros=(gu.zero, dn.zero), group_size=64)
    x = torch.randn(T, D).to(torch.bfloat16)
    idx = torch.tensor([[0, 3], [3, 5], [7, 0]])
    w = torch.rand(T, 2)
    wide, counts = native.experts_decode(x.float(), idx, w, *weights, **extra)
    narrow, same_counts = native.experts_decode(x, idx, w, *weights, **extra,
                                                out_dtype=torch.bfloat16)
    assert narrow.dtype == torch.bfloat16 and torch.equal(counts, same_counts)
    assert torch.equal(narrow, wide.to(torch.bfloat16))  # widened exactly, rounded once


def test_attention_decode_rounds_its_output_once_to_the_inputs_dtype():
    B, H, d, S = 2, 4, 16, 6
    q = torch.randn(B, 1, H * d).to(torch.bfloat16)
    k, v = torch.randn(B, 1, H * d).to(torch.bfloat16), torch.randn(B, 1, H * d).to(torch.bfloat16)
    cos, sin = torch.rand(B, 1, d).to(torch.bfloat16), torch.rand(B, 1, d).to(torch.bfloat16)
    caches = [torch.randn(B, H, S, d).to(torch.bfloat16) for _ in range(2)]
    copies = [c.clone() for c in caches]
    wide = native.attention_decode(q, k, v, cos, sin, *caches, 3, None, d ** -0.5)
    narrow = native.attention_decode(q, k, v, cos, sin, *copies, 3, None, d ** -0.5,
                                     same_dtype=True)
    assert wide.dtype == torch.float32 and narrow.dtype == torch.bfloat16
    assert torch.equal(narrow, wide.to(torch.bfloat16))
    assert all(torch.equal(a, b) for a, b in zip(caches, copies))


@pytest.mark.parametrize("bits", [0, 8, 4])
def test_two_threads_give_the_one_thread_result(bits):
    """The kernels split output rows between threads: each sum keeps its order."""
    mlp = SwiGLUMLP(128, 256, init_std=0.1).to(torch.bfloat16).eval()
    if bits:
        quantize_model(mlp, bits=bits, group_size=64)
    router = _router(64, 6, True, 1.0, torch.bfloat16)
    x = torch.randn(2, 128).to(torch.bfloat16)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        try:
            with torch.no_grad():
                results.append((mlp(x), *native.router_decode(x[:, :48].contiguous(),
                                                               router.weight, 6, True, 1.0)))
        finally:
            torch.set_num_threads(1)
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [0, 8, 4])
def test_moe_layers_add_the_shared_experts_inside_the_experts_call(monkeypatch, dtype, bits):
    model = _model(bits, dtype, first_k_dense_replace=0)  # every layer MoE
    swiglu = spy_native(monkeypatch, "swiglu_decode", lambda x, *ops: [x.shape[0]])
    experts = spy_native(monkeypatch, "experts_decode", lambda x, *args: [x.shape[0]])
    prompt = torch.randint(0, 300, (2, 6))
    with torch.inference_mode():
        cache = model.new_cache(2, 8)
        model(prompt, cache=cache)
        fast = model(prompt[:, :1], cache=cache).logits
    assert swiglu == [] and experts == [2, 2]  # one call per layer does routed + shared
    # the same step with the shared experts run on their own (their own native call)
    monkeypatch.setattr(SwiGLUMLP, "decode_operands", lambda self, x: None)
    with torch.inference_mode():
        cache = model.new_cache(2, 8)
        model(prompt, cache=cache)
        slow = model(prompt[:, :1], cache=cache).logits
    assert len(swiglu) == 0  # (spied before the patch: decode_operands now declines)
    _assert_near(fast, slow, dtype, 0 if bits != 4 else 4)


def test_shared_experts_of_mixed_int4_groups_run_beside_the_experts_call(monkeypatch):
    """int4 picks a smaller group for a matrix whose inputs 128 does not divide (the shared
    expert's down projection, 96 inputs: groups 128, 128, 32): no native SwiGLU step takes
    that mix, so the layer adds the shared experts itself instead of failing."""
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny").replace(
        vocab_size=300, hidden_size=256, num_attention_heads=4, num_key_value_heads=4,
        num_hidden_layers=1, moe_intermediate_size=96, first_k_dense_replace=0)
    model = quantize_model(Transformer(cfg).eval(), bits=4, group_size=128)
    mlp = model.layers[0].mlp.shared_experts
    assert [m.group_size for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)] == [128, 128, 32]
    prompt = torch.randint(0, 300, (1, 5))
    with torch.inference_mode():
        assert mlp.decode_operands(torch.randn(1, 256)) is None
        cache = model.new_cache(1, 8)
        model(prompt, cache=cache)
        fast = model(prompt[:, :1], cache=cache).logits
    _torch_only(monkeypatch)
    with torch.inference_mode():
        cache = model.new_cache(1, 8)
        model(prompt, cache=cache)
        slow = model(prompt[:, :1], cache=cache).logits
    _assert_near(fast, slow, torch.float32, 4)


def test_shared_experts_are_added_before_the_one_rounding():
    T, D, F, E = 2, 64, 32, 4
    routed = SwiGLUExperts(E, D, F, init_std=0.2)
    shared = SwiGLUMLP(D, 2 * F, init_std=0.2)
    x = torch.randn(T, D)
    idx, w = torch.tensor([[0, 3], [2, 3]]), torch.rand(T, 2)
    weights = (routed.gate_up_proj.detach(), routed.down_proj.detach())
    with torch.no_grad():
        ops = shared.decode_operands(x)
        alone, counts = native.experts_decode(x, idx, w, *weights)
        both, _ = native.experts_decode(x, idx, w, *weights, shared=ops)
        assert torch.equal(both, alone + native.swiglu_decode(x, *ops))  # fp32: one add
        with pytest.raises(ValueError, match="shared experts"):
            native.experts_decode(x, idx, w, *weights, shared=(ops[0], ops[1], native.Operand(torch.randn(D, 8))))
        shared.bfloat16()
        narrow, _ = native.experts_decode(x.bfloat16(), idx, w,
                                          *(t.bfloat16() for t in weights),
                                          out_dtype=torch.bfloat16,
                                          shared=shared.decode_operands(x.bfloat16()))
        assert narrow.dtype == torch.bfloat16
