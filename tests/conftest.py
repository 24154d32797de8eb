"""Shared test helpers: small MoE configs, a seeded RNG per test, a hypothesis profile that
is stable in CI, and an ``assert_close`` that prints max/mean differences on failure.

Test files import the helpers with ``from conftest import ...`` (pytest puts ``tests/`` on
``sys.path`` because it has no ``__init__.py``).

Shapes: T tokens, D hidden, E experts, K picks, F expert width.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, settings

from dsmoe.config import ModelConfig

# Tests use tiny tensors: one intra-op thread is faster for them (no OpenMP spin-waits when
# the cores are shared; measured 2 ms vs 68 ms per MoE step on a loaded 2-core machine) and
# gives the same reduction order on every machine.
torch.set_num_threads(1)

# derandomize: the same examples on every run, so CI never flakes on a lucky draw.
settings.register_profile(
    "dsmoe", deadline=None, derandomize=True, database=None, max_examples=15,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("dsmoe")


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same RNG state, whatever ran before it."""
    torch.manual_seed(0)


def _native_unavailable() -> bool:
    from dsmoe import native

    return native.library() is None


needs_native = pytest.mark.skipif(_native_unavailable(),
                                  reason="no C compiler: the native kernels cannot be built here")


def spy_native(monkeypatch: pytest.MonkeyPatch, name: str, record) -> list:
    """Wrap ``dsmoe.native.<name>`` for the test: after every call that returned a result
    (None means the kernel declined), ``record(*args)`` is added to the returned list."""
    from dsmoe import native

    seen: list = []
    real = getattr(native, name)

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        if out is not None:
            seen.extend(record(*args))
        return out

    monkeypatch.setattr(native, name, spy)
    return seen


@pytest.fixture(params=["avx512vnni", "avx512", "avx2", "portable C"])
def native_isa(request):
    """Each code path of dsmoe's native kernels this CPU can run, in turn (the others are
    skipped, as is everything when the kernels cannot be built here)."""
    from dsmoe import native

    if _native_unavailable():
        pytest.skip("no C compiler: the native kernels cannot be built here")
    best = native.isa()
    try:
        if native.limit_isa(request.param) != request.param:
            pytest.skip(f"this CPU cannot run the {request.param} path")
        yield request.param
    finally:
        native.limit_isa(best)


REFERENCE = Path(__file__).resolve().parent / "assets" / "reference"


def reference_file(model: str, name: str) -> Path:
    """A file of a real checkpoint's published metadata (``config.json``, ``tensors.json``,
    ``tokenizer_config.json``), copied into ``tests/assets/reference/<model>/`` so the suite
    runs from any clone. A missing file is a broken checkout: it fails, it does not skip."""
    path = REFERENCE / model / name
    if not path.is_file():
        raise FileNotFoundError(f"test asset {path} is missing (copy it from the reference set)")
    return path


def moe_config(**overrides: Any) -> ModelConfig:
    """A CPU-sized MoE config (D=32, E=8, F=16, K=2, one shared expert), softmax greedy,
    no balance losses unless asked for: the starting point of most layer tests."""
    base = dict(
        vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2, first_k_dense_replace=0,
        aux_loss_alpha=0.0, seq_aux=False, torch_dtype="float32",
    )
    base.update(overrides)
    return ModelConfig(**base)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float,
                 what: str) -> None:
    """``torch.testing.assert_close`` with a message giving the max and mean difference."""
    actual_f, expected_f = actual.detach().float(), expected.detach().float()
    diff = (actual_f - expected_f).abs() if actual_f.shape == expected_f.shape else None
    stats = (f"max |diff| {diff.max().item():.3e}, mean |diff| {diff.mean().item():.3e}"
             if diff is not None and diff.numel() else "shapes differ")
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol,
                               msg=lambda m: f"{what}: {stats}\n{m}")


def randomize_(module: torch.nn.Module, std: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """Give every floating parameter of ``module`` random values (``std``), in place: the
    default init (std 0.02, zero biases) makes outputs too small for tolerances to mean much."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std)
    return module


def generation_config() -> ModelConfig:
    """A 3-layer GQA MoE model with decisive weights (std 0.2) and no EOS: the generation
    tests' model, whose greedy tokens are far from ties."""
    return ModelConfig.preset("tiny").replace(
        vocab_size=97, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=3, moe_intermediate_size=32, intermediate_size=96,
        eos_token_id=None, initializer_range=0.2)
