"""The native int8 decode kernel (dsmoe.native, csrc/rows_matmul.c).

Its one approximation is writing each activation row as 16-bit fixed point, so every output
must lie within sum_k |W[n, k]| * max|x[m]| / 65534 of the exact fp32 product (plus fp32
rounding); everything else (tails, threads, fallbacks) must not change a thing.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import needs_native
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsmoe import native
from dsmoe.quant import kernels



def _exact(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return F.linear(x.double(), q.double()) * scale.double()  # [M, N]


def _bound(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The fixed-point rounding bound per output, plus fp32 accumulation slack."""
    step = x.double().abs().amax(dim=-1, keepdim=True) / 65534  # [M, 1]
    weight_l1 = (q.double().abs() * scale.double().abs().unsqueeze(-1)).sum(-1)  # [N]
    exact = _exact(x, q, scale).abs()
    return step * weight_l1 + 1e-6 * (exact + 1e-6) * x.shape[-1] ** 0.5


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # the path is constant
@given(M=st.integers(1, 12), N=st.integers(1, 70), K=st.integers(1, 300),
       seed=st.integers(0, 2**16), spread=st.sampled_from([1.0, 1e-3, 1e3]))
def test_native_rows_are_within_the_fixed_point_bound(native_isa, M, N, K, seed,
                                                       spread):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * spread
    q, scale = kernels.quantize_int8(torch.randn(N, K, generator=g))
    out = native.int8_rows_matmul(x, q, scale)
    assert out is not None and out.shape == (M, N) and out.dtype == torch.float32
    err = (out.double() - _exact(x, q, scale)).abs()
    bound = _bound(x, q, scale)
    assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3g}"


@needs_native
def test_native_is_more_accurate_than_torchs_bf16_activation_kernel():
    torch.manual_seed(0)
    x = torch.randn(4, 2048)
    q, scale = kernels.quantize_int8(torch.randn(1408, 2048) * 0.02)
    exact = _exact(x, q, scale)
    ours = (native.int8_rows_matmul(x, q, scale).double() - exact).abs().mean()
    torch_kernel = torch._weight_int8pack_mm(x.bfloat16(), q, scale).double()
    theirs = (torch_kernel - exact).abs().mean()
    assert ours < theirs / 4, (ours.item(), theirs.item())


def test_long_rows_of_extreme_values_do_not_overflow_the_int32_sums(native_isa):
    K = 3 * 4096 + 17  # several int32 chunks and a tail
    x = torch.full((2, K), 7.5)
    x[1, ::2] = -7.5
    q = torch.full((5, K), 127, dtype=torch.int8)
    q[3] = -127
    scale = torch.full((5,), 0.01, dtype=torch.bfloat16)
    out = native.int8_rows_matmul(x, q, scale).double()
    torch.testing.assert_close(out, _exact(x, q, scale), rtol=1e-6, atol=1e-3)


@needs_native
@pytest.mark.parametrize("M", [1, 3, 8, 11])
def test_every_int8_path_gives_the_same_bits(M):
    """The integer sums are exact and each path adds them into float chunk by chunk in the
    same order, so the AVX-512 passes (two weight rows x up to 8 rows), the AVX2 dots and
    the portable loop agree to the bit, across int32 chunks, a masked tail and odd N."""
    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, 4096 + 100 + 7, generator=g)
    q, scale = kernels.quantize_int8(torch.randn(9, x.shape[1], generator=g))
    best = native.isa()
    results = {}
    try:
        for isa in ("avx512vnni", "avx512", "avx2", "portable C"):
            if native.limit_isa(isa) == isa:
                results[isa] = native.int8_rows_matmul(x, q, scale)
    finally:
        native.limit_isa(best)
    first = next(iter(results.values()))
    assert len(results) >= 1 and all(torch.equal(r, first) for r in results.values()), \
        {isa: (r - first).abs().max().item() for isa, r in results.items()}


@needs_native
def test_zero_rows_give_zero_and_threads_give_identical_results():
    torch.manual_seed(1)
    x = torch.randn(3, 512)
    x[1] = 0.0
    q, scale = kernels.quantize_int8(torch.randn(1000, 512))
    threads = torch.get_num_threads()
    one = native.int8_rows_matmul(x, q, scale)
    try:
        torch.set_num_threads(2)
        two = native.int8_rows_matmul(x, q, scale)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    assert torch.equal(one[1], torch.zeros(1000))


@needs_native
def test_non_finite_rows_fall_back_to_torch_with_torchs_result():
    q, scale = kernels.quantize_int8(torch.randn(32, 64))
    x = torch.randn(2, 64)
    x[0, 3] = float("inf")
    assert native.int8_rows_matmul(x, q, scale) is None
    out = kernels.int8_linear(x, q, scale)
    expected = torch._weight_int8pack_mm(x.bfloat16(), q, scale).float()
    torch.testing.assert_close(out, expected, equal_nan=True)


@needs_native
def test_int8_linear_decodes_with_the_native_kernel_and_prefills_without(monkeypatch):
    calls = []
    real = native.int8_rows_matmul

    def counting(rows, q, scale):
        calls.append(rows.shape[0])
        return real(rows, q, scale)

    monkeypatch.setattr(native, "int8_rows_matmul", counting)
    q, scale = kernels.quantize_int8(torch.randn(48, 64))
    for M in (1, kernels.INT8_KERNEL_MAX_ROWS, kernels.INT8_KERNEL_MAX_ROWS + 1):
        x = torch.randn(2, M, 64).reshape(-1, 64)[:M]  # a non-contiguous-origin view
        out = kernels.int8_linear(x, q, scale)
        torch.testing.assert_close(out.double(), _exact(x, q, scale), atol=2e-3, rtol=1e-3)
    assert calls == [1, kernels.INT8_KERNEL_MAX_ROWS]
    x = torch.randn(1, 64, requires_grad=True)  # a ctypes call would cut the graph
    kernels.int8_linear(x, q, scale)
    assert calls == [1, kernels.INT8_KERNEL_MAX_ROWS]


def test_switched_off_or_unbuildable_kernel_falls_back(monkeypatch, tmp_path):
    q, scale = kernels.quantize_int8(torch.randn(16, 32))
    x = torch.randn(1, 32)
    expected = torch._weight_int8pack_mm(x.bfloat16(), q, scale).float()
    try:
        monkeypatch.setenv("DSMOE_NATIVE_KERNELS", "0")
        native.library.cache_clear()
        assert native.isa() is None and native.int8_rows_matmul(x, q, scale) is None
        torch.testing.assert_close(kernels.int8_linear(x, q, scale), expected)

        monkeypatch.setenv("DSMOE_NATIVE_KERNELS", "1")
        monkeypatch.setenv("DSMOE_CACHE", str(tmp_path / "cache"))
        monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
        native.library.cache_clear()
        with pytest.warns(RuntimeWarning, match="native decode kernels are unavailable"):
            assert native.library() is None
        torch.testing.assert_close(kernels.int8_linear(x, q, scale), expected)
    finally:
        native.library.cache_clear()


@needs_native
def test_the_kernel_builds_into_an_empty_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("DSMOE_CACHE", str(tmp_path))
    native.library.cache_clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert native.isa() in native.ISA_NAMES.values()
        built = list(tmp_path.glob("rows_matmul-*.so"))
        assert len(built) == 1 and not list(tmp_path.glob("tmp*"))  # no temp dir left
    finally:
        native.library.cache_clear()


@needs_native
def test_blocks_equal_one_call_per_matrix_and_leave_other_rows_zero():
    torch.manual_seed(3)
    q, scale = kernels.quantize_int8(torch.randn(4, 40, 96))  # a stack of 4 experts
    x = torch.randn(9, 96)
    blocks = [(2, 0, 3), (0, 3, 1), (3, 6, 2)]  # rows 4, 5 and 8 belong to no block
    out = native.int8_blocks_matmul(x, q, scale, blocks)
    for e, first, rows in blocks:
        alone = native.int8_rows_matmul(x[first:first + rows], q[e], scale[e])
        assert torch.equal(out[first:first + rows], alone)
    assert not out[[4, 5, 8]].any()
    with pytest.raises(ValueError, match="do not fit"):
        native.int8_blocks_matmul(x, q, scale, [(4, 0, 1)])
    with pytest.raises(ValueError, match="do not fit"):
        native.int8_blocks_matmul(x, q, scale, [(0, 8, 2)])


@needs_native
@pytest.mark.parametrize("bits, kernel, table_arg", [(8, "int8_blocks_matmul", 3),
                                                     (4, "int4_blocks_matmul", 5)])
def test_quantized_experts_decode_in_one_call_per_matrix(monkeypatch, bits, kernel, table_arg):
    from dsmoe.moe.experts import SwiGLUExperts
    from dsmoe.quant.experts import QuantSwiGLUExperts

    experts = QuantSwiGLUExperts.from_experts(SwiGLUExperts(6, 64, 32, init_std=0.1),
                                              bits=bits, group_size=32)
    counts = torch.tensor([1, 0, 2, 0, 1, 3])
    x = torch.randn(int(counts.sum()), 64)
    calls = []
    real = getattr(native, kernel)
    monkeypatch.setattr(native, kernel, lambda *a: calls.append(len(a[table_arg])) or real(*a))
    with torch.no_grad():
        fast = experts(x, counts)
        assert calls == [4, 4]  # gate_up and down, four experts each
        monkeypatch.setattr(native, kernel, lambda *a: None)
        loop = experts(x, counts)  # the per-expert loop (torch's kernel / dequantized GEMMs)
    # bf16 activations in torch's int8 kernel; int8 activations in both int4 paths
    torch.testing.assert_close(fast, loop, atol=2e-2 if bits == 8 else 3e-2, rtol=2e-2)


@needs_native
@pytest.mark.parametrize("bits, kernel, table_arg, limit", [
    (8, "int8_blocks_matmul", 3, "INT8_BLOCKS_MAX_ROWS"),
    (4, "int4_blocks_matmul", 5, "INT4_BLOCKS_MAX_ROWS")])
def test_quantized_experts_prefill_few_row_experts_in_one_call(monkeypatch, bits, kernel,
                                                               table_arg, limit):
    """A prompt's experts with at most ``prefill_max_rows`` rows go to one row-kernel call
    per matrix (their rows gathered, the table renumbered), the busier ones to the
    per-expert loop; together equal to the loop for all."""
    from dsmoe.moe.experts import SwiGLUExperts
    from dsmoe.quant.experts import QuantSwiGLUExperts

    experts = QuantSwiGLUExperts.from_experts(SwiGLUExperts(6, 64, 32, init_std=0.1),
                                              bits=bits, group_size=32)
    monkeypatch.setattr(kernels, limit, 3)
    counts = torch.tensor([1, 0, 3, 5, 2, 4])  # experts 0, 2, 4 take the row kernel
    x = torch.randn(int(counts.sum()), 64)
    tables = []
    real = getattr(native, kernel)
    monkeypatch.setattr(native, kernel, lambda *a: tables.append(
        (a[0].shape[0], a[table_arg])) or real(*a))
    with torch.no_grad():
        fast = experts(x, counts)
        few = [(0, 0, 1), (2, 1, 3), (4, 4, 2)]  # (expert, first gathered row, rows)
        assert tables[:2] == [(6, few), (6, few)]  # (then the loop's one-matrix calls)
        monkeypatch.setattr(native, kernel, lambda *a: None)
        loop = experts(x, counts)
    torch.testing.assert_close(fast, loop, atol=2e-2 if bits == 8 else 3e-2, rtol=2e-2)


# --- int4 (csrc/int4_matmul.c) -----------------------------------------------------------
def _int4_stack(E: int, N: int, K: int, group: int, seed: int, symmetric: bool = False):
    g = torch.Generator().manual_seed(seed)
    parts = [kernels.quantize_int4(torch.randn(N, K, generator=g), group) for _ in range(E)]
    q, scale, zero = (torch.stack([p[i] for p in parts]) for i in range(3))
    return q, scale, (None if symmetric else zero)


def _int4_weight(q, scale, zero):  # [N, K] float64, what the kernel must multiply by
    zero = torch.zeros_like(scale) if zero is None else zero
    return kernels.dequantize_int4(q, scale, zero).double()


def _int4_bound(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The int8 activation rounding bound per output (half a step of each block of 32,
    step = the block's max / 127), plus fp32 accumulation slack: [M, N]."""
    M, K = x.shape
    step = x.double().reshape(M, K // 32, 32).abs().amax(-1) / 127  # [M, K/32]
    half_steps = (step / 2).repeat_interleave(32, dim=1)  # [M, K]
    exact = (x.double() @ weight.T).abs()
    return half_steps @ weight.abs().T + 1e-5 * (exact + 1e-3) * K ** 0.5


@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # the path is constant
@given(M=st.integers(1, 9), N=st.integers(1, 40), blocks32=st.integers(1, 11),
       group=st.sampled_from([32, 64, 128]), symmetric=st.booleans(),
       seed=st.integers(0, 2**16), spread=st.sampled_from([1.0, 1e-3, 1e3]))
def test_native_int4_is_within_the_int8_activation_bound(native_isa, M, N, blocks32, group,
                                                         symmetric, seed, spread):
    K = 32 * blocks32 * (group // 32)  # odd multiples of 32 too (the avx512 tail block)
    q, scale, zero = _int4_stack(2, N, K, group, seed, symmetric)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(seed + 1)) * spread
    split = M // 2
    blocks = [(1, 0, split), (0, split, M - split)]
    out = native.int4_blocks_matmul(x, q, scale, zero, group, blocks)
    assert out is not None and out.shape == (M, N) and out.dtype == torch.float32
    for e, first, rows in blocks:
        w = _int4_weight(q[e], scale[e], None if zero is None else zero[e])
        xs = x[first:first + rows]
        err = (out[first:first + rows].double() - xs.double() @ w.T).abs()
        bound = _int4_bound(xs, w)
        assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3g}"


def test_native_int4_dequantize_is_exact(native_isa):
    q, scale, zero = _int4_stack(1, 24, 256, 64, seed=5)
    expected = kernels.dequantize_int4(q[0], scale[0], zero[0])
    assert torch.equal(native.int4_dequantize(q[0], scale[0], zero[0], 64, torch.float32),
                       expected)
    assert torch.equal(native.int4_dequantize(q[0], scale[0], zero[0], 64, torch.bfloat16),
                       expected.bfloat16())


@needs_native
def test_native_int4_rejects_groups_it_cannot_take():
    q, scale, zero = _int4_stack(1, 8, 192, 32, seed=0)
    x = torch.randn(1, 192)
    with pytest.raises(ValueError, match="do not fit"):
        native.int4_blocks_matmul(x, q, scale, zero, 64, [(0, 0, 1)])
    with pytest.raises(ValueError, match="group_size 96"):
        native.int4_blocks_matmul(x, q, scale[..., :2], zero[..., :2], 96, [(0, 0, 1)])
    x[0, 5] = float("nan")
    assert native.int4_blocks_matmul(x, q, scale, zero, 32, [(0, 0, 1)]) is None


@needs_native
def test_int4_matrices_keep_the_canonical_tensors_and_convert_back():
    """No torch packing: the buffers are the checkpoint's tensors, so a matrix converts
    back exactly (torch's packed layout could not be, cheaply)."""
    from dsmoe.quant.matrix import QuantMatrix

    m = QuantMatrix(48, 128, bits=4, group_size=32, stack=(3,))
    m.set_float(torch.randn(3, 48, 128))
    assert not m.packed and not hasattr(m, "scale_zero")
    state = m.quantized_state()
    assert state["qweight"].data_ptr() == m.qweight.data_ptr()
    again = QuantMatrix(48, 128, bits=4, group_size=32, stack=(3,))
    again.load_quantized_state({k: v.clone() for k, v in state.items()})
    assert all(torch.equal(again.quantized_state()[k], v) for k, v in state.items())


@needs_native
def test_int4_matmul_decodes_natively_and_prefills_with_a_gemm(monkeypatch):
    calls = []
    real = native.int4_blocks_matmul
    monkeypatch.setattr(native, "int4_blocks_matmul",
                        lambda x, *a: calls.append(x.shape[0]) or real(x, *a))
    q, scale, zero = _int4_stack(1, 48, 128, 32, seed=2)
    w = _int4_weight(q[0], scale[0], zero[0])
    for M in (1, kernels.INT4_KERNEL_MAX_ROWS, kernels.INT4_KERNEL_MAX_ROWS + 1):
        x = torch.randn(M, 128)
        out = kernels.int4_matmul(x, q[0], scale[0], zero[0], 32)
        bound = _int4_bound(x, w)
        assert ((out.double() - x.double() @ w.T).abs() <= bound).all()
    assert calls == [1, kernels.INT4_KERNEL_MAX_ROWS]
    x = torch.randn(2, 128, requires_grad=True)  # a ctypes call would cut the graph
    kernels.int4_matmul(x, q[0], scale[0], zero[0], 32).sum().backward()
    torch.testing.assert_close(x.grad.double(), w.sum(0).expand(2, -1))
    assert calls == [1, kernels.INT4_KERNEL_MAX_ROWS]


def test_int4_falls_back_to_torchs_packed_kernel_without_the_library(monkeypatch):
    from dsmoe.quant.matrix import QuantMatrix

    weight = torch.randn(32, 64)
    try:
        monkeypatch.setenv("DSMOE_NATIVE_KERNELS", "0")
        native.library.cache_clear()
        m = QuantMatrix(32, 64, bits=4, group_size=32)
        m.set_float(weight)
        assert m.packed and hasattr(m, "scale_zero")
        x = torch.randn(2, 64)
        expected = x @ m.dequantize().T
        torch.testing.assert_close(m.matmul(x), expected, atol=5e-2, rtol=1e-2)
    finally:
        native.library.cache_clear()


@pytest.mark.parametrize("group,K", [(32, 32 * 37), (64, 64 * 19), (128, 128 * 21), (32, 2048),
                                     (192, 192 * 20)])
def test_native_int4_long_rows_cross_the_scale_windows(native_isa, group, K):
    """Rows of more than 16 groups (the avx512 paths hold 16 groups' scales in a register and
    reload them per window; g = 192: windows and steps of 128 meet unevenly), K % 128 of 0-3
    blocks, 1-5 activation rows and a row count that is no multiple of the 4 weight rows
    taken per pass."""
    q, scale, zero = _int4_stack(1, 13, K, group, seed=K)
    for M in range(1, 6):
        x = torch.randn(M, K, generator=torch.Generator().manual_seed(M))
        out = native.int4_blocks_matmul(x, q, scale, zero, group, [(0, 0, M)])
        w = _int4_weight(q[0], scale[0], zero[0])
        err = (out.double() - x.double() @ w.T).abs()
        assert (err <= _int4_bound(x, w)).all(), (M, (err - _int4_bound(x, w)).max().item())


@pytest.mark.parametrize("bits", [8, 4])
def test_two_threads_share_the_blocks_in_pieces_with_the_one_thread_result(native_isa, bits):
    """Threads take outputs in pieces of 64 rows, whichever is free: N = 150 gives two full
    pieces and one that ends inside a pass of four weight rows, for each of three blocks
    (one of them empty); every output must keep its one-thread value."""
    torch.manual_seed(4)
    if bits == 8:
        q, scale = kernels.quantize_int8(torch.randn(3, 150, 96))
        run = lambda x, blocks: native.int8_blocks_matmul(x, q, scale, blocks)  # noqa: E731
    else:
        q, scale, zero = _int4_stack(3, 150, 128, 32, seed=4)
        run = lambda x, blocks: native.int4_blocks_matmul(x, q, scale, zero, 32, blocks)  # noqa: E731
    x = torch.randn(6, q.shape[-1] * (2 if bits == 4 else 1))
    blocks = [(2, 0, 1), (0, 1, 0), (1, 1, 5)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(x, blocks)
        alone = [run(x[first:first + rows], [(e, 0, rows)]) for e, first, rows in blocks]
        torch.set_num_threads(2)
        two = run(x, blocks)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    for (e, first, rows), part in zip(blocks, alone):
        assert torch.equal(one[first:first + rows], part)
