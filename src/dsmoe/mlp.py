"""Dense feed-forward blocks: DeepSeek's SwiGLU MLP (dense layers and shared experts) and
the ReLU-with-bias MLP of the ``MixtureOfExperts`` facade.

Shapes: T tokens, D hidden size, F intermediate size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsmoe import native
from dsmoe.autograd import records_grad
from dsmoe.linear import DECODE_STEP_MAX_ROWS, Linear

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}


def _none() -> None:
    return None


class SwiGLUMLP(nn.Module):
    """down(act(gate(x)) * up(x)) without biases; parameter names are HF's."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str = "silu",
                 init_std: float = 0.02) -> None:
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=False)  # [F, D]
        self.up_proj = Linear(hidden_size, intermediate_size, bias=False)  # [F, D]
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)  # [D, F]
        self.act = ACTIVATIONS[hidden_act]
        self.init_std = init_std
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for linear in (self.gate_proj, self.up_proj, self.down_proj):
            nn.init.normal_(linear.weight, std=self.init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., D] -> [..., D]
        out = self._decode_step(x)
        if out is not None:
            return out
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))

    def _decode_step(self, x: torch.Tensor) -> torch.Tensor | None:
        """A gradient-free CPU step of at most ``DECODE_STEP_MAX_ROWS`` rows in one native
        call (three matmuls, silu and the product; fp32 inside, rounded once), where the
        projections offer ``decode_operand`` (``Linear`` without bias, ``QuantLinear``;
        not LoRA-wrapped ones); None otherwise. At one token the three projections' casts
        and the activation were ~12 aten ops per shared-expert block."""
        operands = self.decode_operands(x)
        if operands is None:
            return None
        out = native.swiglu_decode(x.reshape(-1, x.shape[-1]).contiguous(), *operands)
        return None if out is None else out.view(x.shape)

    def decode_operands(self, x: torch.Tensor) -> tuple[native.Operand, ...] | None:
        """(gate, up, down) as the native decode ops take them when ``x [..., D]`` is a
        decode step they serve (silu, CPU, no gradient, at most ``DECODE_STEP_MAX_ROWS``
        rows; a MoE layer's experts call adds this block's output itself), all three of one
        kind and group size; else None."""
        if (self.act is not F.silu or x.device.type != "cpu" or records_grad(x)
                or not 0 < x.numel() <= DECODE_STEP_MAX_ROWS * x.shape[-1]):
            return None
        operands = tuple(getattr(p, "decode_operand", _none)()
                         for p in (self.gate_proj, self.up_proj, self.down_proj))
        if None in operands or native.uniform_kind(*operands) is None:
            return None
        return operands


class ReLUMLP(nn.Module):
    """w2(relu(w1 x + b1)) + b2: the expert of the original MoE papers the facade follows."""

    def __init__(self, hidden_size: int, intermediate_size: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.w1 = nn.Linear(hidden_size, intermediate_size)
        self.w2 = nn.Linear(intermediate_size, hidden_size)
        self.init_std = init_std
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for linear in (self.w1, self.w2):
            nn.init.normal_(linear.weight, std=self.init_std)
            nn.init.zeros_(linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.relu(self.w1(x)))
