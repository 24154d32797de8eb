"""Routed experts: E expert MLPs as stacked ``[E, ...]`` weights, run as grouped GEMMs.

Design choices:
- Weights keep HF's per-expert ``[out, in]`` orientation, so loading is a stack and the
  GEMMs read transposed views, never copies. SwiGLU's gate and up projections are fused into
  one ``gate_up_proj [E, 2F, D]`` for one GEMM instead of two.
- The GEMMs run on a ``GroupedGEMM`` plan (``dsmoe.moe.grouped_gemm``: the kernels, their
  registry and the per-batch plan); each module's ``kernel`` attribute forces one.
- ``SwiGLUExperts`` runs both GEMMs and the activation as one Function
  (``_SwiGLUExpertsFn``) that keeps one ``[P, F]`` activation and writes the gate and up
  gradients into one buffer: on CPU every freshly allocated buffer costs page faults.
- Under autocast the GEMMs run in autocast's dtype (fp32 master weights, bf16 products),
  as ``nn.Linear`` does.
- The experts protocol (``Experts``) is what ``dispatch.run_experts`` calls:
  ``gemm_plan(counts, n_rows)`` returns a plan whose work buffer the dispatch gathers tokens
  into, or None for modules that take sorted rows (quantized and LoRA experts);
  ``forward(x, counts, gemm=None)``.

Shapes: A rows (assignments, sorted by expert), P rows of the work buffer (A, or A plus
padding), D hidden, F expert width, E experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsmoe import native
from dsmoe.autograd import records_grad
from dsmoe.mlp import ACTIVATIONS
from dsmoe.moe.grouped_gemm import DECODE_STEP_MAX_ROWS, GroupedGEMM


def decode_sized(tokens: torch.Tensor) -> bool:
    """Whether ``tokens [T, D]`` are a CPU decode step (1 to ``DECODE_STEP_MAX_ROWS``
    tokens) that ``Experts.decode_step`` may run in one native call."""
    return tokens.device.type == "cpu" and 0 < tokens.shape[0] <= DECODE_STEP_MAX_ROWS


class Experts(nn.Module):
    """The experts protocol ``dispatch.run_experts`` drives.

    ``gemm_plan(counts [E], n_rows)``: a ``GroupedGEMM`` whose work buffer the dispatch
    fills (tokens gathered straight into it, combined straight from it), or None: then
    ``forward`` gets the sorted rows ``[A_kept, D]`` and returns ``[A_kept, D]``.
    """

    def gemm_plan(self, counts: torch.Tensor, n_rows: int) -> GroupedGEMM | None:
        return None

    def decode_step(self, tokens: torch.Tensor, topk_idx: torch.Tensor,
                    topk_weight: torch.Tensor, shared: tuple | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Dispatch, experts and combine of a decode step in one call: (routed output
        [T, D] in the tokens' dtype, assignments per expert [E]), or None where this module
        has no such path (the dispatcher then plans, gathers and combines itself).
        ``shared``: the shared experts' ``native.Operand`` triple (``SwiGLUMLP``'s
        ``decode_operands``), whose output the same call adds (taking them is all or
        nothing: with None returned the caller runs them itself)."""
        return None


def _swiglu_backward(gu: torch.Tensor, grad_hidden: torch.Tensor) -> torch.Tensor:
    """d loss / d [gate, up] of hidden = silu(gate) * up, given ``gu [P, 2F]`` and
    ``grad_hidden [P, F]`` (consumed). Eagerly the two halves are written straight into one
    buffer; under ``torch.compile`` (which takes no ``out=`` views) as plain ops, which the
    compiler fuses the same way."""
    gate, up = gu.chunk(2, dim=-1)  # [P, F] views
    if torch.compiler.is_compiling():
        return torch.cat([torch.ops.aten.silu_backward(grad_hidden * up, gate),
                          F.silu(gate) * grad_hidden], dim=-1)
    grad_gu = torch.empty_like(gu)  # [P, 2F]
    grad_gate, grad_up = grad_gu.chunk(2, dim=-1)
    torch.ops.aten.silu.out(gate, out=grad_up)
    grad_up.mul_(grad_hidden)  # d/d up = grad_hidden * silu(gate)
    grad_hidden.mul_(up)  # d/d silu(gate)
    torch.ops.aten.silu_backward.grad_input(grad_hidden, gate, grad_input=grad_gate)
    return grad_gu


class _SwiGLUExpertsFn(torch.autograd.Function):
    """down(silu(gate x) * up x) per expert on work rows, with the backward written out.

    Against autograd through ``linear -> chunk -> silu * up -> linear`` this keeps one
    ``[P, F]`` activation instead of two (``silu(gate)`` is recomputed in backward, an
    elementwise pass) and writes the gate and up gradients straight into one ``[P, 2F]``
    buffer instead of separate buffers joined by a copy. Each freshly allocated buffer
    costs page faults as well as bandwidth, which on CPU is a measurable share of the step.
    """

    @staticmethod
    def run(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, gemm: "GroupedGEMM"
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The forward math, without autograd: (output [P, D], gate_up out [P, 2F], hidden)."""
        gu = gemm.mm(x, gate_up.transpose(-2, -1))  # [P, 2F]
        gate, up = gu.chunk(2, dim=-1)  # [P, F] views
        hidden = F.silu(gate).mul_(up)  # [P, F]
        return gemm.mm(hidden, down.transpose(-2, -1)), gu, hidden  # [P, D]

    @staticmethod
    def forward(ctx, x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,  # noqa: ANN001
                gemm: "GroupedGEMM") -> torch.Tensor:
        out, gu, hidden = _SwiGLUExpertsFn.run(x, gate_up, down, gemm)
        ctx.save_for_backward(x, gate_up, down)
        # NOTE: intermediates as attributes, not saved tensors, so that backward can free
        # them before it allocates the largest tensor, the [E, 2F, D] gradient.
        ctx.gemm, ctx.gu, ctx.hidden = gemm, gu, hidden
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        x, gate_up, down = ctx.saved_tensors
        gemm: GroupedGEMM = ctx.gemm
        gu, hidden = ctx.gu, ctx.hidden
        if gu is None:  # a second backward (retain_graph=True): recompute them
            _, gu, hidden = _SwiGLUExpertsFn.run(x, gate_up, down, gemm)
        ctx.gu = ctx.hidden = None
        grad = grad.contiguous()  # [P, D]
        grad_down = gemm.mm_weight(grad, hidden, down) if ctx.needs_input_grad[2] else None
        del hidden
        grad_hidden = gemm.mm(grad, down)  # [P, F]
        grad_gu = _swiglu_backward(gu, grad_hidden)  # [P, 2F]
        del grad_hidden, gu
        grad_gate_up = gemm.mm_weight(grad_gu, x, gate_up) if ctx.needs_input_grad[1] else None
        grad_x = gemm.mm(grad_gu, gate_up) if ctx.needs_input_grad[0] else None  # [P, D]
        return grad_x, grad_gate_up, grad_down, None


# --- expert modules ---------------------------------------------------------------------------
def compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype the expert GEMMs run in: autocast's where autocast is on for the weight's
    device (as it is for ``nn.Linear``: fp32 master weights, bf16 products), else the
    weight's own. ``.to()`` of a weight already in that dtype is free."""
    device = weight.device.type
    if weight.is_floating_point() and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


class SwiGLUExperts(Experts):
    """E SwiGLU experts without bias (DeepSeek): down(act(gate x) * up x) per expert."""

    def __init__(self, n_experts: int, hidden_size: int, expert_size: int,
                 hidden_act: str = "silu", init_std: float = 0.02) -> None:
        super().__init__()
        self.num_experts, self.expert_size = n_experts, expert_size
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * expert_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(n_experts, hidden_size, expert_size))
        self.act = ACTIVATIONS[hidden_act]
        self.init_std = init_std
        self.kernel: str | None = None  # None: per device and dtype (grouped_gemm.default_kernel)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.gate_up_proj, std=self.init_std)
        nn.init.normal_(self.down_proj, std=self.init_std)

    def forward(self, x: torch.Tensor, counts: torch.Tensor, gemm: GroupedGEMM | None = None
                ) -> torch.Tensor:
        """Sorted rows ``x [A, D]`` with ``counts [E]`` per expert -> [A, D]; or, given
        ``gemm`` (from ``gemm_plan``), rows of its work buffer ``x [P, D]`` -> [P, D]."""
        if gemm is None:
            gemm = self.gemm_plan(counts, x.shape[0])
            return gemm.leave(self._forward_rows(gemm.enter(x), gemm))
        return self._forward_rows(x, gemm)

    def decode_step(self, tokens: torch.Tensor, topk_idx: torch.Tensor,
                    topk_weight: torch.Tensor, shared: tuple | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """See ``Experts.decode_step``: on CPU, for at most ``DECODE_STEP_MAX_ROWS``
        gradient-free tokens of the weights' own dtype, ``native.experts_decode``."""
        weights = (self.gate_up_proj, self.down_proj)
        if (self.act is not F.silu or not decode_sized(tokens) or records_grad(tokens, *weights)
                or compute_dtype(self.gate_up_proj) != tokens.dtype):
            return None
        return native.experts_decode(tokens, topk_idx, topk_weight, *weights,
                                     out_dtype=tokens.dtype, shared=shared)

    def gemm_plan(self, counts: torch.Tensor, n_rows: int) -> GroupedGEMM:
        """The GEMM plan for ``n_rows`` sorted rows, ``counts [E]`` per expert."""
        dtype = compute_dtype(self.gate_up_proj)
        return GroupedGEMM.plan(counts, n_rows, dtype, self.kernel)

    def _forward_rows(self, x: torch.Tensor, gemm: GroupedGEMM) -> torch.Tensor:  # [P, D]
        dtype = compute_dtype(self.gate_up_proj)
        x, gate_up, down = x.to(dtype), self.gate_up_proj.to(dtype), self.down_proj.to(dtype)
        if self.act is F.silu:
            if not records_grad(x, gate_up, down):
                return _SwiGLUExpertsFn.run(x, gate_up, down, gemm)[0]
            return _SwiGLUExpertsFn.apply(x, gate_up, down, gemm)
        gate, up = gemm.linear(x, gate_up).chunk(2, dim=-1)  # [P, F] x2
        return gemm.linear(self.act(gate) * up, down)  # [P, D]


class ReLUExperts(Experts):
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
        self.kernel: str | None = None  # None: per device and dtype (grouped_gemm.default_kernel)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w1, std=self.init_std)
        nn.init.normal_(self.w2, std=self.init_std)
        nn.init.zeros_(self.b1)
        nn.init.zeros_(self.b2)

    def forward(self, x: torch.Tensor, counts: torch.Tensor, gemm: GroupedGEMM | None = None
                ) -> torch.Tensor:
        """As ``SwiGLUExperts.forward``. Padded work rows come out as w2 relu(b1) + b2,
        not zero; whoever reads the output ignores them."""
        if gemm is None:
            gemm = self.gemm_plan(counts, x.shape[0])
            return gemm.leave(self._forward_rows(gemm.enter(x), gemm))
        return self._forward_rows(x, gemm)

    def gemm_plan(self, counts: torch.Tensor, n_rows: int) -> GroupedGEMM:
        """The GEMM plan for ``n_rows`` sorted rows, ``counts [E]`` per expert."""
        return GroupedGEMM.plan(counts, n_rows, self.w1.dtype, self.kernel)

    def _forward_rows(self, x: torch.Tensor, gemm: GroupedGEMM) -> torch.Tensor:  # [P, D]
        hidden = F.relu(gemm.linear(x, self.w1, self.b1))  # [P, F]
        return gemm.linear(hidden, self.w2, self.b2)
