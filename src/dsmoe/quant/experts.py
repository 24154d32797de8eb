"""QuantSwiGLUExperts: ``SwiGLUExperts`` with stacked int8/int4 weights, same contract.

forward(x_sorted [A, D], counts [E]) -> [A, D], rows grouped by expert exactly as the MoE
dispatch hands them over, so ``MoELayer``'s router, dispatch and combine run unchanged.
Experts with few rows (a decode step's, and most of a short prompt's: up to
``QuantMatrix.prefill_max_rows``) run in two calls of dsmoe's native row kernels (int8 or
int4) for all of them at once (``QuantMatrix.matmul_blocks``); each expert with more rows
is two kernel calls on its slice of the stacks (dequantize + GEMM; no grouped int kernel
exists in torch on CPU):
  gate_up = x_e @ gate_up_proj[e].T   [n_e, 2F]  (gate rows first, then up, as in fp)
  out_e   = (act(gate) * up) @ down_proj[e].T   [n_e, D]

Shapes: A assignments sorted by expert, D hidden, F expert width, E experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsmoe import native
from dsmoe.autograd import records_grad
from dsmoe.mlp import ACTIVATIONS
from dsmoe.moe.experts import Experts, SwiGLUExperts, decode_sized
from dsmoe.moe.grouped_gemm import expert_blocks
from dsmoe.quant.matrix import QuantMatrix


class QuantSwiGLUExperts(Experts):
    def __init__(self, n_experts: int, hidden_size: int, expert_size: int, *, bits: int,
                 group_size: int = 128, hidden_act: str = "silu", symmetric: bool = False,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.num_experts, self.expert_size, self.hidden_act = n_experts, expert_size, hidden_act
        E, D, F = n_experts, hidden_size, expert_size
        common = dict(bits=bits, group_size=group_size, stack=(E,), symmetric=symmetric,
                      device=device)
        self.gate_up_proj = QuantMatrix(2 * F, D, **common)  # [E, 2F, D]
        self.down_proj = QuantMatrix(D, F, **common)  # [E, D, F]
        self.act = ACTIVATIONS[hidden_act]

    @classmethod
    def from_experts(cls, experts: SwiGLUExperts, *, bits: int, group_size: int = 128,
                     hidden_act: str = "silu", symmetric: bool = False
                     ) -> "QuantSwiGLUExperts":
        """Quantise ``experts`` (on meta: an empty shell of the right shapes)."""
        E, twoF, D = experts.gate_up_proj.shape
        out = cls(E, D, twoF // 2, bits=bits, group_size=group_size, hidden_act=hidden_act,
                  symmetric=symmetric, device=experts.gate_up_proj.device)
        if not experts.gate_up_proj.is_meta:
            out.gate_up_proj.set_float(experts.gate_up_proj)
            out.down_proj.set_float(experts.down_proj)
        return out

    def decode_step(self, tokens: torch.Tensor, topk_idx: torch.Tensor,
                    topk_weight: torch.Tensor, shared: tuple | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """See ``Experts.decode_step``: int8 and int4 silu experts in
        ``native.experts_decode``."""
        gu, dn = self.gate_up_proj, self.down_proj
        if (self.act is not F.silu or not decode_sized(tokens) or records_grad(tokens)
                or gu.packed or (gu.bits, gu.group_size) != (dn.bits, dn.group_size)):
            return None  # packed: torch's int4 layout, for its own kernel only
        int4 = {} if gu.bits == 8 else dict(
            zeros=(getattr(gu, "zero", None), getattr(dn, "zero", None)),
            group_size=gu.group_size)
        if tokens.dtype not in native.FLOAT_WEIGHT_DTYPES:
            return None  # (fp16 rows: torch's path)
        return native.experts_decode(tokens, topk_idx, topk_weight, gu.qweight, dn.qweight,
                                     (gu.scale, dn.scale), **int4, out_dtype=tokens.dtype,
                                     shared=shared)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:  # [A, D]
        sizes = counts.tolist()
        blocks = expert_blocks(sizes)
        limit = min(self.gate_up_proj.prefill_max_rows, self.down_proj.prefill_max_rows)
        few = [n if n <= limit else 0 for n in sizes]  # (a narrow down_proj stays int8)
        out = self._row_kernels(x, counts, few) if any(few) else None
        rest = [b for b in blocks if b[2] > limit] if out is not None else blocks
        out = x.new_empty(x.shape) if out is None else out
        for e, start, n in rest:  # dequantize + GEMM per expert
            rows = x[start:start + n]  # [n, D]
            gate, up = self.gate_up_proj.matmul(rows, e).chunk(2, dim=-1)  # [n, F] x2
            out[start:start + n] = self.down_proj.matmul(self.act(gate) * up, e)
        return out

    def _row_kernels(self, x: torch.Tensor, counts: torch.Tensor, few: list[int]
                     ) -> torch.Tensor | None:
        """The experts with ``few`` [E] rows (``counts``' where at most ``prefill_max_rows``,
        else 0) in two native calls for all of them, -> [A, D] in x's dtype with their rows
        filled (the rest uninitialised), or None where the native kernels cannot run. One call instead
        of two kernel calls per expert: a 128-token prompt of the 2B shape gives each of
        63 experts ~14 rows, and per-expert calls paid Python overhead and a thread
        barrier each, and fell to dequantize + GEMM above a few rows."""
        if not self.gate_up_proj.takes_blocks(x):  # e.g. QLoRA training: gather nothing
            return None
        blocks = expert_blocks(few)  # rows of these experts, packed in expert order
        if sum(few) == len(x):
            rows = x  # every row (a decode step): no gather
        else:
            taken = torch.tensor([n > 0 for n in few]).repeat_interleave(counts.cpu())  # [A]
            index = taken.nonzero().squeeze(1)
            rows = x.index_select(0, index)  # [a, D]: a rows of these experts
        gate_up = self.gate_up_proj.matmul_blocks(rows, blocks)  # fp32 [a, 2F]
        if gate_up is None:
            return None
        gate, up = gate_up.chunk(2, dim=-1)  # [a, F] x2
        done = self.down_proj.matmul_blocks(self.act(gate) * up, blocks)  # fp32 [a, D]
        if done is None:
            return None
        if rows is x:
            return done.to(x.dtype)
        return x.new_empty(x.shape).index_copy_(0, index, done.to(x.dtype))
