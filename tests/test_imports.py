"""What importing dsmoe costs a process that only runs models: torch._dynamo (and sympy,
which it imports) take ~70 MB of RSS and ~2 s, so the model code must not pull them in."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_loading_a_model_imports_neither_dynamo_nor_sympy(tmp_path: Path) -> None:
    """Importing the loading code, building the model on meta (whose random init torch
    runs through Python meta kernels that import both) and running it."""
    from conftest import moe_config

    from dsmoe.model import Transformer

    Transformer(moe_config(num_hidden_layers=2)).save_pretrained(tmp_path)
    code = ("import sys, torch, dsmoe.quant, dsmoe.checkpoint.gguf.loader\n"
            "from dsmoe.checkpoint import load\n"
            f"model = load({str(tmp_path)!r}, quant='int8')\n"
            "model(torch.zeros(1, 3, dtype=torch.long))\n"
            "print(sorted(m for m in ('torch._dynamo', 'sympy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
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
