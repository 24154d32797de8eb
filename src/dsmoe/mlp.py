"""Dense feed-forward blocks: DeepSeek's SwiGLU MLP (dense layers and shared experts) and
the ReLU-with-bias MLP of the ``MixtureOfExperts`` facade.

Shapes: T tokens, D hidden size, F intermediate size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsmoe.linear import Linear

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}


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
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


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
