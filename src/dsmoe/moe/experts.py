"""Routed experts as stacked ``[E, ...]`` weights, run as one grouped matmul.

Design choices:
- Inputs arrive sorted by expert with per-expert ``counts``; every expert's rows are one
  contiguous slice, so an expert is a plain GEMM on a view (no masks, no padding).
- ``torch._grouped_mm`` runs all experts in one call where the installed torch supports the
  device and dtype (probed once); otherwise a loop over non-empty experts does the same GEMMs.
  Both are differentiable and give the same numbers.
- Weights keep HF's per-expert ``[out, in]`` orientation, so loading is a stack and
  ``_grouped_mm`` reads a transposed view, not a copy. SwiGLU's gate and up projections are
  fused into one ``gate_up_proj [E, 2F, D]`` for one GEMM instead of two.

Shapes: A assignments (rows, sorted by expert), D hidden, F expert width, E experts.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from dsmoe.mlp import ACTIVATIONS


@functools.lru_cache(maxsize=None)
def _grouped_mm_works(device_type: str, dtype: torch.dtype) -> bool:
    """Probe ``torch._grouped_mm`` once per (device, dtype): forward and backward."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:  # NOTE: cached, so independent of the caller's grad mode (e.g. inference_mode)
        with torch.inference_mode(False), torch.enable_grad():
            x = torch.randn(16, 16, device=device_type, dtype=dtype, requires_grad=True)
            w = torch.randn(2, 16, 16, device=device_type, dtype=dtype, requires_grad=True)
            offs = torch.tensor([8, 16], device=device_type, dtype=torch.int32)
            out = torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)
            out.backward(torch.ones_like(out))
            ref = x[:8] @ w[0].T
            return bool(torch.allclose(out[:8], ref, atol=1e-2, rtol=1e-2))
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor,
                   bias: torch.Tensor | None = None, *, use_grouped_mm: bool | None = None
                   ) -> torch.Tensor:
    """Row block e of ``x [A, in]`` times ``weight[e].T`` for ``weight [E, out, in]``.

    ``counts [E]`` gives the rows of each expert, in order; sum(counts) == A.
    """
    if use_grouped_mm is None:
        use_grouped_mm = (
            _grouped_mm_works(x.device.type, x.dtype)
            and (x.device.type == "cpu" or (x.shape[-1] % 8 == 0 and weight.shape[1] % 8 == 0))
        )
    if use_grouped_mm and x.shape[0] > 0:
        offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
        out = torch._grouped_mm(x, weight.transpose(-2, -1), offs=offs)  # [A, out]
    else:
        pieces = []
        for e, rows in enumerate(torch.split(x, counts.tolist(), dim=0)):
            if rows.shape[0]:
                pieces.append(F.linear(rows, weight[e]))
        out = torch.cat(pieces) if pieces else x.new_zeros(0, weight.shape[1])
    if bias is not None:
        out = out + bias.repeat_interleave(counts, dim=0, output_size=x.shape[0])
    return out


class SwiGLUExperts(nn.Module):
    """E SwiGLU experts without bias (DeepSeek): down(act(gate x) * up x) per expert."""

    def __init__(self, n_experts: int, hidden_size: int, expert_size: int,
                 hidden_act: str = "silu", init_std: float = 0.02) -> None:
        super().__init__()
        self.num_experts, self.expert_size = n_experts, expert_size
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * expert_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(n_experts, hidden_size, expert_size))
        self.act = ACTIVATIONS[hidden_act]
        self.init_std = init_std
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.gate_up_proj, std=self.init_std)
        nn.init.normal_(self.down_proj, std=self.init_std)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:  # [A, D]
        gate, up = grouped_linear(x, self.gate_up_proj, counts).chunk(2, dim=-1)  # [A, F] x2
        return grouped_linear(self.act(gate) * up, self.down_proj, counts)  # [A, D]


class ReLUExperts(nn.Module):
    """E ReLU experts with biases: w2 relu(w1 x + b1) + b2 (the facade's expert)."""

    def __init__(self, n_experts: int, hidden_size: int, expert_size: int,
                 init_std: float = 0.02) -> None:
        super().__init__()
        self.num_experts, self.expert_size = n_experts, expert_size
        self.w1 = nn.Parameter(torch.empty(n_experts, expert_size, hidden_size))  # [E, F, D]
        self.b1 = nn.Parameter(torch.empty(n_experts, expert_size))  # [E, F]
        self.w2 = nn.Parameter(torch.empty(n_experts, hidden_size, expert_size))  # [E, D, F]
        self.b2 = nn.Parameter(torch.empty(n_experts, hidden_size))  # [E, D]
        self.init_std = init_std
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w1, std=self.init_std)
        nn.init.normal_(self.w2, std=self.init_std)
        nn.init.zeros_(self.b1)
        nn.init.zeros_(self.b2)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:  # [A, D]
        hidden = F.relu(grouped_linear(x, self.w1, counts, self.b1))
        return grouped_linear(hidden, self.w2, counts, self.b2)
