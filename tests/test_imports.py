"""What importing dsmoe costs a process that only runs models: torch._dynamo (and sympy,
which it imports) take ~70 MB of RSS and ~2 s, so the model code must not pull them in."""

from __future__ import annotations

import subprocess
import sys


def test_loading_code_imports_neither_dynamo_nor_sympy() -> None:
    code = ("import sys, dsmoe.model, dsmoe.quant, dsmoe.checkpoint.gguf.loader\n"
            "print(sorted(m for m in ('torch._dynamo', 'sympy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_grouped_mm_probe_is_marked_as_torch_compiler_would_mark_it() -> None:
    """grouped_gemm sets the attribute ``torch.compiler.assume_constant_result`` sets,
    instead of calling it at import; this fails if torch marks functions differently."""
    import torch

    from dsmoe.moe import grouped_gemm

    def probe() -> bool:
        return True

    marked = torch.compiler.assume_constant_result(probe)
    added = dict(vars(marked))
    assert added == {"_dynamo_marked_constant": True}
    assert all(getattr(grouped_gemm._grouped_mm_ok, k) == v for k, v in added.items())
