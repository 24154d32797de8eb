"""MixtureOfExperts: the paper-notation facade over MoELayer, residual included.

outputs = x + sum_i shared_i(x) + sum_{routed i} g_i(x) * expert_i(x), with ReLU experts that
carry biases, softmax gates (no renormalisation), device-limited routing of each token to
at most M of D devices, and the three DeepSeek-V2 balance losses with weights alpha1..3.
"""

from __future__ import annotations

import torch
from torch import nn

from dsmoe.config import MoEConfig
from dsmoe.mlp import ReLUMLP
from dsmoe.moe.experts import ReLUExperts
from dsmoe.moe.layer import MoELayer


class MixtureOfExperts(nn.Module):
    """DeepSeekMoE block in the papers' symbols.

    d_model: hidden size; d_expert: width of each expert; K: routed experts per token;
    N_s / N_r: shared / routed experts; alpha1/2/3: expert-, device- and communication-
    balance loss weights; D: devices the routed experts are spread over; M: most devices
    one token may use (defaults to D, i.e. no limit).
    forward(x) -> (outputs, expert_loss, device_loss, commu_loss)
    """

    def __init__(self, d_model: int, d_expert: int, K: int = 2, N_s: int = 1, N_r: int = 8,
                 alpha1: float = 0.003, alpha2: float = 0.05, alpha3: float = 0.02,
                 D: int = 1, M: int | None = None) -> None:
        super().__init__()
        self.config = MoEConfig(
            hidden_size=d_model, moe_intermediate_size=d_expert, n_routed_experts=N_r,
            n_shared_experts=N_s, num_experts_per_tok=K, scoring_func="softmax",
            topk_method="device_limited", norm_topk_prob=False, aux_loss_alpha=alpha1,
            seq_aux=False, device_balance_alpha=alpha2, comm_balance_alpha=alpha3,
            n_devices=D, max_devices_per_token=M, hidden_act="relu",
        )
        std = self.config.initializer_range
        shared = ReLUMLP(d_model, d_expert * N_s, std) if N_s > 0 else None
        self.moe = MoELayer(self.config, experts=ReLUExperts(N_r, d_model, d_expert, std),
                            shared_experts=shared)

    def forward(self, x: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.moe(x)
        zero = out.aux_loss.new_zeros(())
        return (x + out.hidden_states, out.losses.get("expert", zero),
                out.losses.get("device", zero), out.losses.get("comm", zero))
