"""Grouped expert GEMMs (``dsmoe.moe.grouped_gemm``): every kernel against a per-expert oracle.

- ``grouped_linear`` on each kernel (``batched``, ``grouped_mm`` where torch supports it,
  ``loop``) equals explicit per-expert GEMMs in values and in the gradients of x, weight and
  bias (fp32, 1e-5), with experts that receive no rows at the start, middle and end, and
  with no rows at all; bf16 agrees at 1e-2.
- The ``batched`` plan: chunks tile the work buffer, every non-empty expert is in exactly
  one chunk, padding rows are zero, ``leave(enter(x)) == x``, and the chunking is the
  cheapest (fewest padded rows) under its size rules (checked by brute force).
- ``SwiGLUExperts``' fused SwiGLU equals autograd through the HF per-expert formula, on
  sorted rows and on work rows; weight gradients keep the parameter's strides (output- and
  input-major); results are bit-identical when run twice.

Shapes: A rows sorted by expert, P work rows, E experts, D hidden, F expert width.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close
from dsmoe.moe.experts import ReLUExperts, SwiGLUExperts
from dsmoe.moe.grouped_gemm import (
    KERNELS, GroupedGEMM, _chunk_experts, grouped_linear, grouped_mm_supported,
)

FP32 = dict(atol=1e-5, rtol=1e-5)
BF16 = dict(atol=1e-2, rtol=1e-2)
COUNTS = {  # rows per expert; zeros where the dispatch can leave an expert idle
    "balanced": [3, 4, 3, 5, 4, 3],
    "idle start, middle, end": [0, 5, 2, 0, 0, 7, 1, 0],
    "one busy expert": [0, 0, 11, 0],
    "no rows at all": [0, 0, 0],
}


def _kernels(dtype: torch.dtype = torch.float32) -> list[str]:
    return [k for k in KERNELS if k != "grouped_mm" or grouped_mm_supported("cpu", dtype)]


def _oracle(x: torch.Tensor, w: torch.Tensor, counts: list[int], b: torch.Tensor | None
            ) -> torch.Tensor:
    """Explicit per-expert GEMMs: row block e of x times w[e].T (+ b[e])."""
    blocks, start = [], 0
    for e, n in enumerate(counts):
        rows = x[start:start + n] @ w[e].T
        blocks.append(rows + b[e] if b is not None else rows)
        start += n
    return torch.cat(blocks)


@pytest.mark.parametrize("kernel", _kernels())
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("name", list(COUNTS))
def test_grouped_linear_matches_per_expert_gemms(kernel: str, with_bias: bool, name: str
                                                 ) -> None:
    counts = COUNTS[name]
    gen = torch.Generator().manual_seed(len(name))
    E, A, d_in, d_out = len(counts), sum(counts), 12, 10
    x = torch.randn(A, d_in, generator=gen)  # [A, in]
    w = torch.randn(E, d_out, d_in, generator=gen)  # [E, out, in]
    b = torch.randn(E, d_out, generator=gen) if with_bias else None
    upstream = torch.randn(A, d_out, generator=gen)

    leaves = [t.clone().requires_grad_(True) for t in (x, w) + ((b,) if with_bias else ())]
    out = grouped_linear(leaves[0], leaves[1], torch.tensor(counts),
                         leaves[2] if with_bias else None, kernel=kernel)
    (out * upstream).sum().backward()
    refs = [t.clone().requires_grad_(True) for t in (x, w) + ((b,) if with_bias else ())]
    expected = _oracle(refs[0], refs[1], counts, refs[2] if with_bias else None)
    (expected * upstream).sum().backward()

    assert_close(out, expected, **FP32, what=f"{kernel}: output")
    for label, got, want in zip(("x", "weight", "bias"), leaves, refs):
        assert_close(got.grad, want.grad, **FP32, what=f"{kernel}: grad of {label}")
    idle = [e for e, n in enumerate(counts) if n == 0]
    assert torch.count_nonzero(leaves[1].grad[idle]) == 0, "an idle expert got a gradient"


@pytest.mark.parametrize("kernel", _kernels())
def test_expanded_upstream_gradient(kernel: str) -> None:
    """``out.sum().backward()`` hands the backward a stride-0 gradient."""
    counts = torch.tensor([2, 0, 3])
    x = torch.randn(5, 4, requires_grad=True)
    w = torch.randn(3, 6, 4, requires_grad=True)
    grouped_linear(x, w, counts, kernel=kernel).sum().backward()
    expected = torch.cat([torch.ones(2, 6) @ w[0], torch.ones(3, 6) @ w[2]])
    assert_close(x.grad, expected.detach(), **FP32, what=f"{kernel}: grad of x")


@pytest.mark.parametrize("kernel", _kernels(torch.bfloat16))
def test_bf16_kernels_agree_with_fp32_oracle(kernel: str) -> None:
    counts = [4, 0, 6, 2]
    x, w = torch.randn(12, 16), torch.randn(4, 8, 16) / 4
    out = grouped_linear(x.bfloat16(), w.bfloat16(), torch.tensor(counts), kernel=kernel)
    assert out.dtype == torch.bfloat16
    assert_close(out.float(), _oracle(x, w, counts, None), **BF16, what=f"{kernel} bf16")


def test_unknown_kernel_and_bad_shapes_are_rejected() -> None:
    x, w, counts = torch.randn(3, 4), torch.randn(2, 5, 4), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="unknown expert GEMM kernel 'fast'"):
        grouped_linear(x, w, counts, kernel="fast")
    with pytest.raises(ValueError, match="weight \\[E, out, in\\]"):
        grouped_linear(x, w.transpose(1, 2), counts)
    with pytest.raises(ValueError, match="one entry per expert"):
        grouped_linear(x, w, torch.tensor([1, 1, 1]))


# --- the batched plan ---------------------------------------------------------------------------
@pytest.mark.parametrize("min_experts", [1, 2, 4])
@pytest.mark.parametrize("name", list(COUNTS))
def test_batched_plan_layout(min_experts: int, name: str, monkeypatch) -> None:
    counts = COUNTS[name]
    monkeypatch.setattr(torch, "get_num_threads", lambda: max(1, min_experts // 2))
    gemm = GroupedGEMM.plan(torch.tensor(counts), sum(counts), torch.float32, "batched")
    covered = [e for first, end, _, _ in gemm.chunks for e in range(first, end)]
    assert covered == [e for e, n in enumerate(counts) if n > 0], gemm.chunks
    start = 0
    for first, end, width, chunk_start in gemm.chunks:
        assert chunk_start == start and width == max(counts[first:end]), gemm.chunks
        start += (end - first) * width
    assert gemm.rows == start

    x = torch.randn(sum(counts), 3)
    work = gemm.enter(x)
    assert torch.equal(gemm.leave(work), x)
    padding = torch.ones(gemm.rows, dtype=torch.bool)
    if gemm.index is not None:
        padding[gemm.index] = False
        assert gemm.index.unique().numel() == gemm.index.numel()
    else:
        padding[:] = False
    assert torch.count_nonzero(work[padding]) == 0, "padding rows must be zero"


def _brute_force(run: list[int], lo: int, hi: int) -> tuple[int, int]:
    """(padded rows, chunks) of the best split of one run into chunks of lo..hi experts."""
    best = None
    L = len(run)
    for n_cuts in range(L):
        for cuts in itertools.combinations(range(1, L), n_cuts):
            bounds = list(zip((0,) + cuts, cuts + (L,)))
            if any(not lo <= j - i <= hi for i, j in bounds):
                continue
            cost = (sum((j - i) * max(run[i:j]) - sum(run[i:j]) for i, j in bounds), len(bounds))
            best = cost if best is None or cost < best else best
    return best


@pytest.mark.parametrize("seed", range(12))
def test_chunking_has_fewest_padded_rows(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    run = (torch.randint(1, 20, (int(torch.randint(1, 9, (1,), generator=gen)),),
                         generator=gen)).tolist()
    for lo, hi in ((1, 3), (2, 4), (3, 8)):
        chunks = _chunk_experts(run, lo, hi)
        got = (sum((end - first) * width - sum(run[first:end]) for first, end, width, _ in chunks),
               len(chunks))
        expected = _brute_force(run, min(lo, len(run)), hi)
        assert got == expected, (run, lo, hi, chunks)


# --- expert modules ----------------------------------------------------------------------------
def _hf_swiglu(x: torch.Tensor, experts: SwiGLUExperts, counts: list[int]) -> torch.Tensor:
    """The HF formula per expert: down(silu(gate x) * up x) on each row block."""
    F_ = experts.expert_size
    blocks, start = [], 0
    for e, n in enumerate(counts):
        rows = x[start:start + n]
        gate, up = experts.gate_up_proj[e, :F_], experts.gate_up_proj[e, F_:]
        blocks.append((F.silu(rows @ gate.T) * (rows @ up.T)) @ experts.down_proj[e].T)
        start += n
    return torch.cat(blocks)


@pytest.mark.parametrize("kernel", _kernels())
@pytest.mark.parametrize("act", ["silu", "gelu"])
def test_swiglu_experts_match_hf_formula(kernel: str, act: str) -> None:
    """The fused silu path and the generic path (any other activation) against autograd."""
    counts = [3, 0, 5, 1, 0, 4]
    experts = SwiGLUExperts(len(counts), 8, 6, hidden_act=act, init_std=0.5)
    experts.kernel = kernel
    reference = SwiGLUExperts(len(counts), 8, 6, hidden_act=act)
    reference.load_state_dict(experts.state_dict())
    x = torch.randn(sum(counts), 8)
    upstream = torch.randn(sum(counts), 8)

    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out = experts(x1, torch.tensor(counts))
    (out * upstream).sum().backward()
    if act == "silu":
        expected = _hf_swiglu(x2, reference, counts)
    else:  # the same formula with gelu
        blocks, start = [], 0
        for e, n in enumerate(counts):
            rows = x2[start:start + n]
            gate, up = reference.gate_up_proj[e].chunk(2, dim=0)
            blocks.append((F.gelu(rows @ gate.T) * (rows @ up.T)) @ reference.down_proj[e].T)
            start += n
        expected = torch.cat(blocks)
    (expected * upstream).sum().backward()

    assert_close(out, expected, **FP32, what=f"{kernel}/{act}: output")
    assert_close(x1.grad, x2.grad, **FP32, what=f"{kernel}/{act}: grad of x")
    for name in ("gate_up_proj", "down_proj"):
        assert_close(getattr(experts, name).grad, getattr(reference, name).grad, **FP32,
                     what=f"{kernel}/{act}: grad of {name}")


def test_work_rows_and_sorted_rows_agree() -> None:
    """``forward(work, counts, gemm=...)`` on the padded buffer = ``forward(sorted rows)``."""
    counts = torch.tensor([5, 1, 0, 6, 2, 2])
    experts = SwiGLUExperts(6, 8, 4, init_std=0.5)
    experts.kernel = "batched"
    x = torch.randn(int(counts.sum()), 8)
    gemm = experts.gemm_plan(counts, x.shape[0])
    assert gemm.index is not None, "these counts should need padding"
    work_out = experts(gemm.enter(x), counts, gemm=gemm)
    assert work_out.shape == (gemm.rows, 8)
    assert torch.equal(gemm.leave(work_out), experts(x, counts))


@pytest.mark.parametrize("kernel", _kernels())
def test_relu_experts_with_bias_ignore_padding(kernel: str) -> None:
    """Padded rows come out as w2 relu(b1) + b2 but must not leak into any gradient."""
    counts = [4, 1, 0, 3]
    experts = ReLUExperts(4, 6, 5, init_std=0.5)
    with torch.no_grad():
        experts.b1.normal_()
        experts.b2.normal_()
    experts.kernel = kernel
    x = torch.randn(sum(counts), 6, requires_grad=True)
    out = experts(x, torch.tensor(counts))
    out.pow(2).sum().backward()
    xr = x.detach().clone().requires_grad_(True)
    w1, b1, w2, b2 = (p.detach().clone().requires_grad_(True)
                      for p in (experts.w1, experts.b1, experts.w2, experts.b2))
    expected = _oracle(F.relu(_oracle(xr, w1, counts, b1)), w2, counts, b2)
    expected.pow(2).sum().backward()
    assert_close(out, expected, **FP32, what=f"{kernel}: output")
    for label, got, want in (("x", x, xr), ("w1", experts.w1, w1), ("b1", experts.b1, b1),
                             ("w2", experts.w2, w2), ("b2", experts.b2, b2)):
        assert_close(got.grad, want.grad, **FP32, what=f"{kernel}: grad of {label}")


@pytest.mark.parametrize("layout", ["output_major", "input_major"])
def test_weight_gradients_keep_the_parameter_layout(layout: str) -> None:
    """A gradient laid out like its parameter is stored as is (no weight-sized copy)."""
    experts = SwiGLUExperts(4, 8, 6)
    if layout == "input_major":
        for p in experts.parameters():
            p.data = p.data.transpose(-2, -1).contiguous().transpose(-2, -1)
    x = torch.randn(10, 8, requires_grad=True)
    experts(x, torch.tensor([3, 0, 5, 2])).sum().backward()
    for name, p in experts.named_parameters():
        assert p.grad.stride() == p.stride(), (name, p.grad.stride(), p.stride())


def test_experts_are_deterministic() -> None:
    counts = torch.tensor([7, 0, 3, 9, 1])
    experts = SwiGLUExperts(5, 16, 8, init_std=0.5)
    x = torch.randn(20, 16)
    runs = []
    for _ in range(2):
        xg = x.clone().requires_grad_(True)
        experts.zero_grad()
        out = experts(xg, counts)
        out.sum().backward()
        runs.append((out, xg.grad, experts.gate_up_proj.grad.clone()))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_grouped_mm_probe_does_not_depend_on_grad_mode() -> None:
    grouped_mm_supported.cache_clear()
    try:
        with torch.inference_mode():
            under_inference = grouped_mm_supported("cpu", torch.float32)
        grouped_mm_supported.cache_clear()
        with torch.enable_grad():
            with_grad = grouped_mm_supported("cpu", torch.float32)
    finally:
        grouped_mm_supported.cache_clear()
    assert under_inference == with_grad == hasattr(torch, "_grouped_mm")


def test_second_backward_with_retained_graph() -> None:
    """The fused SwiGLU frees its activations during backward; a retained graph recomputes
    them, so a second backward gives the same gradients."""
    counts = torch.tensor([3, 0, 4])
    experts = SwiGLUExperts(3, 8, 4, init_std=0.5)
    x = torch.randn(7, 8, requires_grad=True)
    out = experts(x, counts).pow(2).sum()
    out.backward(retain_graph=True)
    first = (x.grad.clone(), experts.gate_up_proj.grad.clone(), experts.down_proj.grad.clone())
    x.grad = None
    experts.zero_grad()
    out.backward()
    for a, b in zip(first, (x.grad, experts.gate_up_proj.grad, experts.down_proj.grad)):
        assert torch.equal(a, b)
