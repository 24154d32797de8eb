"""Native decode kernels for float weights (dsmoe.native.float_rows_matmul, linear_decode)
and where the model uses them (dsmoe.linear.Linear, the experts' decode step).

They may only change summation order: fp32 results equal F.linear to fp32 rounding
(atol 1e-5 on O(1) outputs), bf16 results are the exact product rounded once to bf16; and
training, prefill and input-major weights must never reach them.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import needs_native, spy_native
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsmoe import native
from dsmoe.config import ModelConfig
from dsmoe.linear import (DECODE_MAX_ROWS, FP32_DECODE_MAX_ROWS, Linear, decode_linear,
                          fp32_linear)
from dsmoe.model import Transformer
from dsmoe.moe.experts import SwiGLUExperts
from dsmoe.moe.grouped_gemm import DECODE_STEP_MAX_ROWS



# Every native call of a float model's decode step; each may decline (None) at any time.
DECODE_OPS = ("float_blocks_matmul", "experts_decode", "linear_decode", "swiglu_decode",
              "rmsnorm_decode", "router_decode", "attention_decode")


@pytest.fixture
def calls(monkeypatch):
    """Row counts of every native linear-layer product made while the test runs."""
    return spy_native(monkeypatch, "linear_decode", lambda x, *rest: [x.shape[0]])


@pytest.fixture
def block_calls(monkeypatch):
    """Row counts of every block of every native float matmul made while the test runs."""
    return spy_native(monkeypatch, "float_blocks_matmul",
                      lambda x, weight, blocks: [rows for _, _, rows in blocks])


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # the path is constant
@given(M=st.integers(1, 9), N=st.integers(1, 40), K=st.integers(1, 200),
       bf16=st.booleans(), seed=st.integers(0, 2**16))
def test_float_rows_match_the_exact_product(native_isa, M, N, K, bf16, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g).to(torch.bfloat16 if bf16 else torch.float32)
    out = native.float_rows_matmul(x, w)
    exact = x.double() @ w.double().T
    # fp32 sums of K products: error below K * eps32 * sum |x w| (a loose classical bound)
    bound = K * 2.0**-23 * (x.double().abs() @ w.double().abs().T) + 1e-30
    assert out.dtype == torch.float32 and ((out.double() - exact).abs() <= bound).all()


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # the path is constant
@given(M=st.integers(1, 17), N=st.integers(1, 40), K=st.integers(1, 300),
       seed=st.integers(0, 2**16))
def test_bf16_rows_of_a_bf16_model_match_the_exact_product(native_isa, M, N, K, seed):
    """Rows that are bf16 numbers (a bf16 model's activations) meet bf16 weights as bf16
    pairs where the CPU has vdpbf16ps: up to 8 rows per pass, 64- and 32-weight steps and a
    masked tail, all within the fp32 summation bound of the exact product."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).bfloat16().float()
    w = torch.randn(N, K, generator=g).bfloat16()
    out = native.float_rows_matmul(x, w)
    exact = x.double() @ w.double().T
    bound = K * 2.0**-23 * (x.double().abs() @ w.double().abs().T) + 1e-30
    assert ((out.double() - exact).abs() <= bound).all()


@pytest.mark.parametrize("weights, rows", [
    (torch.float32, "fp32"),  # fp32 FMAs
    (torch.bfloat16, "fp32"),  # bf16 weights widened
    (torch.bfloat16, "bf16"),  # bf16 pairs (vdpbf16ps where the CPU has it)
])
def test_avx512_rows_are_batch_invariant(native_isa, weights, rows):
    """On the AVX-512 paths an output's sum is ordered the same whatever the other rows and
    weight rows of its pass: a sequence decodes to the same bits alone or batched with 1-16
    others, at every position, for odd N (a weight row without a partner) and a K with a
    masked tail and several folds. (Within one path: a call whose rows are not all bf16
    numbers widens every row, so one such row changes the others' path.)"""
    if not native_isa.startswith("avx512"):
        pytest.skip("the AVX2 and portable paths combine one- and four-row dots")
    g = torch.Generator().manual_seed(0)
    N, K = 7, 16 * 16 * 2 + 37
    x = torch.randn(17, K, generator=g)
    if rows == "bf16":
        x = x.bfloat16().float()
    w = torch.randn(N, K, generator=g).to(weights)
    alone = torch.cat([native.float_rows_matmul(x[i:i + 1], w) for i in range(17)])
    for M in (2, 3, 8, 9, 17):
        batched = native.float_rows_matmul(x[:M], w)
        assert torch.equal(batched, alone[:M]), f"{M} rows"
    assert torch.equal(native.float_rows_matmul(x, w[1:]), alone[:, 1:])  # other partners


@needs_native
def test_subnormal_bf16_rows_are_not_flushed(native_isa):
    """vdpbf16ps reads bf16 subnormals as zero: rows holding one take the exact path."""
    tiny = 2.0**-130  # a bf16 (and fp32) subnormal
    x = torch.zeros(2, 96)
    x[:, 5] = tiny
    x[1, 7] = 1.0  # a normal row beside it
    out = native.float_rows_matmul(x, torch.ones(3, 96, dtype=torch.bfloat16))
    assert out[0].tolist() == [tiny] * 3 and out[1].tolist() == [1.0 + tiny] * 3


@needs_native
@pytest.mark.parametrize("threads", [1, 2])
def test_stream_read_reads_every_element(threads):
    buf = torch.arange(1000.0)  # 1000 floats: the vector loop and a tail
    assert native.stream_read(buf, threads) == pytest.approx(float(buf.sum()), rel=1e-6)
    with pytest.raises(ValueError, match="contiguous fp32"):
        native.stream_read(buf.double(), 1)
    with pytest.raises(ValueError, match="threads must be >= 1, got 0"):
        native.stream_read(buf, 0)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, DECODE_MAX_ROWS, FP32_DECODE_MAX_ROWS])
def test_linear_decode_steps_equal_f_linear(calls, dtype, rows):
    """Up to DECODE_MAX_ROWS rows go native; fp32 up to FP32_DECODE_MAX_ROWS."""
    torch.manual_seed(0)
    layer = Linear(96, 80, bias=True).to(dtype)
    x = torch.randn(rows, 1, 96).to(dtype)
    with torch.no_grad():
        out = layer(x)
        reference = (x.double() @ layer.weight.double().T + layer.bias.double())
    limit = FP32_DECODE_MAX_ROWS if dtype == torch.float32 else DECODE_MAX_ROWS
    assert calls == ([rows] if rows <= limit else [])
    assert out.shape == (rows, 1, 80) and out.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias), atol=1e-5,
                                   rtol=1e-5)
    else:  # the exact value rounded once to bf16 (F.linear's bf16 may round more)
        torch.testing.assert_close(out, reference.to(torch.bfloat16), atol=0, rtol=0)


@needs_native
def test_training_prefill_and_input_major_weights_use_torch(calls):
    layer = Linear(64, 48)
    x = torch.randn(2, 64, requires_grad=True)
    layer(x).sum().backward()  # training: gradients must flow
    assert calls == [] and x.grad is not None and layer.weight.grad is not None
    with torch.no_grad():
        layer(torch.randn(FP32_DECODE_MAX_ROWS + 1, 64))  # prefill-sized
        layer.bfloat16()(torch.randn(DECODE_MAX_ROWS + 1, 64).bfloat16())
        layer.float()
        transposed = layer.weight.detach().T.contiguous().T  # input-major storage
        assert decode_linear(torch.randn(1, 64), transposed) is None
        assert decode_linear(torch.randn(1, 64).double(), layer.weight.double()) is None
    assert calls == []


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expert_decode_steps_equal_the_torch_loop(block_calls, dtype):
    calls = block_calls
    torch.manual_seed(0)
    experts = SwiGLUExperts(8, 64, 32, init_std=0.1).to(dtype)
    counts = torch.tensor([1, 0, 2, 0, 0, DECODE_MAX_ROWS, DECODE_STEP_MAX_ROWS, 1])
    x = torch.randn(int(counts.sum()), 64).to(dtype)
    with torch.no_grad():
        out = experts(x, counts)
        few = counts[(counts > 0) & (counts <= DECODE_MAX_ROWS)].tolist()
        assert sorted(calls) == sorted(few * 2)  # gate_up and down of each small expert
        reference = []
        for e, rows in enumerate(torch.split(x.double(), counts.tolist())):
            gate, up = (rows @ experts.gate_up_proj[e].double().T).chunk(2, dim=-1)
            reference.append((F.silu(gate) * up) @ experts.down_proj[e].double().T)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out.double(), torch.cat(reference), **tol)

    calls.clear()
    busy = torch.tensor([DECODE_STEP_MAX_ROWS + 1, 0, 0, 0, 0, 0, 0, 1])  # not a decode step
    with torch.no_grad():
        experts(torch.randn(int(busy.sum()), 64).to(dtype), busy)
    assert calls == []


@needs_native
def test_greedy_decoding_is_unchanged_by_the_native_kernels(monkeypatch):
    config = ModelConfig.preset("tiny").replace(num_hidden_layers=2, vocab_size=300)
    torch.manual_seed(0)
    model = Transformer(config).eval()
    prompt = torch.randint(0, 300, (1, 7))
    with torch.no_grad():
        fast = model.generate(prompt, max_new_tokens=12)
        cache = model.new_cache(1, 8)
        step_logits = model(prompt, cache=cache).logits[:, -1]
        step_logits = model(fast[:, :1], cache=cache).logits[:, -1]
    for name in DECODE_OPS:
        monkeypatch.setattr(native, name, lambda *args, **kwargs: None)
    with torch.no_grad():
        slow = model.generate(prompt, max_new_tokens=12)
        cache = model.new_cache(1, 8)
        model(prompt, cache=cache)
        slow_logits = model(fast[:, :1], cache=cache).logits[:, -1]
    assert torch.equal(fast, slow)
    torch.testing.assert_close(step_logits, slow_logits, atol=1e-5, rtol=1e-5)


@needs_native
@pytest.mark.parametrize("rows", [1, DECODE_MAX_ROWS, DECODE_MAX_ROWS + 1])
def test_fp32_linear_equals_casting_both_operands(calls, rows):
    """The router's logits: fp32 math on a bf16 weight, with or without the kernel."""
    torch.manual_seed(0)
    weight = torch.randn(63, 200).to(torch.bfloat16)
    x = torch.randn(rows, 200).to(torch.bfloat16)
    out = fp32_linear(x, weight)
    assert out.dtype == torch.float32
    assert calls == ([rows] if rows <= DECODE_MAX_ROWS else [])
    torch.testing.assert_close(out, F.linear(x.float(), weight.float()), atol=1e-5, rtol=1e-5)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float_blocks_equal_one_call_per_matrix(dtype):
    torch.manual_seed(4)
    weight = torch.randn(3, 24, 80).to(dtype)
    x = torch.randn(7, 80)
    blocks = [(1, 0, 2), (0, 4, 3)]  # rows 2 and 3 belong to no block
    out = native.float_blocks_matmul(x, weight, blocks)
    for e, first, rows in blocks:
        assert torch.equal(out[first:first + rows],
                           native.float_rows_matmul(x[first:first + rows], weight[e]))
    assert not out[2:4].any()
    with pytest.raises(ValueError, match="do not fit"):
        native.float_blocks_matmul(x, weight, [(0, 6, 2)])
