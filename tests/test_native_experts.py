"""A MoE layer's routed experts in one native call per decode step
(``dsmoe.native.experts_decode``, reached through ``Experts.decode_step``).

The call replaces the torch ops of a decode step's dispatch (sort by expert, gather, the
two grouped matmuls, the activation, the weighted combine): it must give the torch path's
output (fp32: to fp32 summation order; bf16: rounded once instead of after every op; int8:
the same fixed-point products), the same expert counts, on every ISA path and with two
threads, and must leave every other forward (training, prefill, dropping, other
activations, int4 in torch's packed layout) to the torch path.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import needs_native, spy_native

from dsmoe import native
from dsmoe.config import ModelConfig
from dsmoe.moe.balance import expert_counts
from dsmoe.moe.grouped_gemm import DECODE_STEP_MAX_ROWS
from dsmoe.moe.layer import MoELayer
from dsmoe.quant.experts import QuantSwiGLUExperts



@pytest.fixture
def fused_calls(monkeypatch):
    """T of every native experts call that returned a result while the test runs."""
    return spy_native(monkeypatch, "experts_decode", lambda x, *args: [x.shape[0]])


def _layer(bits: int | None = None, dtype: torch.dtype = torch.float32, symmetric: bool = False,
           **overrides) -> MoELayer:
    # F = 128: wide enough that two threads split it (the C code wants 64 per thread)
    cfg = ModelConfig.preset("tiny").replace(moe_intermediate_size=128, **overrides)
    layer = MoELayer(cfg).eval().to(dtype)
    if bits is not None:
        layer.experts = QuantSwiGLUExperts.from_experts(layer.experts, bits=bits,
                                                        symmetric=symmetric)
    return layer


def _torch_path(layer: MoELayer, x: torch.Tensor):
    """The same forward with the one-call path switched off."""
    slow = copy.deepcopy(layer)
    slow.experts.decode_step = lambda *args: None
    with torch.no_grad():
        return slow(x)


@needs_native
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("T", [1, 3, DECODE_STEP_MAX_ROWS])
@pytest.mark.parametrize("kind", ["fp32", "bf16", "int8", "int4", "int4 symmetric"])
def test_one_call_equals_the_torch_dispatch(native_isa, fused_calls, kind, T, threads):
    dtype = torch.bfloat16 if kind == "bf16" else torch.float32
    bits = {"int8": 8, "int4": 4, "int4 symmetric": 4}.get(kind)
    layer = _layer(bits, dtype, symmetric=kind == "int4 symmetric")
    x = torch.randn(T, layer.config.hidden_size).to(dtype)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            out = layer(x)
    finally:
        torch.set_num_threads(before)
    want = _torch_path(layer, x)
    assert fused_calls == [T]
    assert out.hidden_states.dtype == dtype and out.hidden_states.shape == x.shape
    assert torch.equal(out.expert_counts, want.expert_counts)
    E = layer.config.n_routed_experts
    assert torch.equal(out.expert_counts, expert_counts(out.topk_idx, E))
    # bf16: the torch path rounds to bf16 after each op, the call once at the end
    tol = dict(atol=3e-2, rtol=3e-2) if kind == "bf16" else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.hidden_states.float(), want.hidden_states.float(), **tol)


@needs_native
def test_other_forwards_keep_the_torch_path(fused_calls):
    layer = _layer()
    D = layer.config.hidden_size
    with torch.no_grad():
        layer(torch.randn(DECODE_STEP_MAX_ROWS + 1, D))  # prefill-sized
    layer(torch.randn(2, D, requires_grad=True)).hidden_states.sum().backward()  # training
    relu = _layer(hidden_act="relu")
    with torch.no_grad():
        relu(torch.randn(1, D))  # the call computes silu only
        dropping = _layer(drop_tokens=True, capacity_factor=0.5).train()
        dropping(torch.randn(2, D))
    assert fused_calls == []
    with torch.no_grad():
        layer(torch.randn(1, D))
    assert fused_calls == [1]


@needs_native
def test_bad_expert_ids_and_non_finite_rows():
    layer = _layer(8)
    E, D = layer.config.n_routed_experts, layer.config.hidden_size
    gu, dn = layer.experts.gate_up_proj, layer.experts.down_proj
    x, w = torch.randn(1, D), torch.ones(1, 2)
    with pytest.raises(ValueError, match=r"outside \[0, 16\)"):
        native.experts_decode(x, torch.tensor([[0, E]]), w, gu.qweight, dn.qweight,
                              (gu.scale, dn.scale))
    nan = torch.full((1, D), float("nan"))
    assert native.experts_decode(nan, torch.tensor([[0, 1]]), w, gu.qweight, dn.qweight,
                                 (gu.scale, dn.scale)) is None
    with torch.no_grad():  # the layer falls back to the torch path, which propagates nan
        assert layer(nan).hidden_states.isnan().all()
    fp = _layer()
    with pytest.raises(ValueError, match="do not fit"):
        native.experts_decode(torch.randn(1, D + 1), torch.tensor([[0, 1]]), w,
                              fp.experts.gate_up_proj, fp.experts.down_proj)


@needs_native
def test_the_combine_weights_each_pick():
    """Two picks of one token: out = w0 * expert_a(x) + w1 * expert_b(x), exactly the
    single-expert outputs weighted (a check independent of the torch dispatch)."""
    layer = _layer()
    gu, dn = layer.experts.gate_up_proj.detach(), layer.experts.down_proj.detach()
    x = torch.randn(1, gu.shape[-1])

    def expert(e: int) -> torch.Tensor:
        gate, up = (x.double() @ gu[e].double().T).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ dn[e].double().T

    out, counts = native.experts_decode(x, torch.tensor([[5, 2]]), torch.tensor([[0.25, 2.0]]),
                                        gu, dn)
    torch.testing.assert_close(out.double(), 0.25 * expert(5) + 2.0 * expert(2), atol=1e-6,
                               rtol=1e-5)
    assert counts.tolist() == [0, 0, 1, 0, 0, 1] + [0] * 10


@needs_native
@pytest.mark.parametrize("kind", ["bf16", "int8", "int4", "int4 symmetric"])
def test_two_threads_give_the_one_thread_result_bit_for_bit(native_isa, kind):
    """One parallel region per call, outputs taken in pieces of 64 rows by whichever thread
    is free: F = 160 ends in a short piece. Every sum keeps its one-thread order."""
    bits = {"int8": 8, "int4": 4, "int4 symmetric": 4}.get(kind)
    cfg = ModelConfig.preset("tiny").replace(moe_intermediate_size=160)
    layer = MoELayer(cfg).eval().to(torch.bfloat16 if kind == "bf16" else torch.float32)
    if bits is not None:
        layer.experts = QuantSwiGLUExperts.from_experts(
            layer.experts, bits=bits, symmetric=kind == "int4 symmetric", group_size=32)
    E, D = layer.config.n_routed_experts, layer.config.hidden_size
    x = torch.randn(3, D).to(layer.experts.gate_up_proj.dtype if bits is None else torch.float32)
    idx, w = torch.stack([torch.randperm(E)[:4] for _ in range(3)]), torch.rand(3, 4)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with torch.no_grad():
                results.append(layer.experts.decode_step(x, idx, w)[0])
    finally:
        torch.set_num_threads(before)
    assert torch.equal(*results)
    if bits == 4:  # rows finite, silu(gate) * up not: found when quantized for down
        huge = torch.full((1, D), 1e30)
        assert layer.experts.decode_step(huge, idx[:1], w[:1]) is None
