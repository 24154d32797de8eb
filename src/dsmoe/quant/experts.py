"""QuantSwiGLUExperts: ``SwiGLUExperts`` with stacked int8/int4 weights, same contract.

forward(x_sorted [A, D], counts [E]) -> [A, D], rows grouped by expert exactly as the MoE
dispatch hands them over, so ``MoELayer``'s router, dispatch and combine run unchanged.
Each expert with rows is two kernel calls on its slice of the stacks (no grouped int
kernel exists in torch on CPU); a decode step is instead two calls of
dsmoe's native kernel (int8 or int4) for all experts at once (``QuantMatrix.matmul_blocks``):
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
        decoded = self._decode_step(x, counts)
        if decoded is not None:
            return decoded
        out = x.new_empty(x.shape)
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n == 0:
                continue
            rows = x[start:start + n]  # [n, D]
            gate, up = self.gate_up_proj.matmul(rows, e).chunk(2, dim=-1)  # [n, F] x2
            out[start:start + n] = self.down_proj.matmul(self.act(gate) * up, e)
            start += n
        return out

    def _decode_step(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor | None:
        """A decode step (at most ``kernel_max_rows`` rows per expert) in two native
        calls for all experts instead of two kernel calls per expert; None otherwise."""
        counts_list = counts.tolist()
        limit = min(self.gate_up_proj.kernel_max_rows, self.down_proj.kernel_max_rows)
        if not counts_list or max(counts_list) > limit:  # (a narrow down_proj stays int8)
            return None
        blocks = expert_blocks(counts_list)
        gate_up = self.gate_up_proj.matmul_blocks(x, blocks)  # fp32 [A, 2F]
        if gate_up is None:
            return None
        gate, up = gate_up.chunk(2, dim=-1)  # [A, F] x2
        out = self.down_proj.matmul_blocks(self.act(gate) * up, blocks)  # fp32 [A, D]
        return None if out is None else out.to(x.dtype)
