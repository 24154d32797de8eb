"""Route one batch through the MoE layer with every DeepSeek routing variant and show the load.

A quick look at the layer before any training: for V1 (softmax, greedy), V2 (device-limited,
capacity dropping) and V3 (sigmoid, group-limited, aux-loss-free bias) it prints the balance
losses, the tokens each expert receives, and how a few hundred V3 bias updates flatten a
deliberately skewed router.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from dsmoe.config import ModelConfig

if TYPE_CHECKING:
    import torch

VARIANTS = {
    "v1": dict(scoring_func="softmax", topk_method="greedy", seq_aux=False,
               n_devices=4, device_balance_alpha=0.01),
    "v2": dict(scoring_func="softmax", topk_method="device_limited", n_devices=4,
               max_devices_per_token=2, device_balance_alpha=0.05, comm_balance_alpha=0.02,
               drop_tokens=True, capacity_factor=1.0, seq_aux=False),
    "v3": dict(scoring_func="sigmoid", topk_method="noaux_tc", n_group=4, topk_group=2,
               norm_topk_prob=True, routed_scaling_factor=2.5, bias_update_speed=0.001,
               aux_loss_alpha=0.0001, seq_aux=True),
}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=int, default=512, help="tokens in the batch")
    parser.add_argument("--seed", type=int, default=0)


def _load_line(counts: torch.Tensor) -> str:
    counts = counts.float()
    return (f"max/mean load {counts.max() / counts.mean():.2f}  "
            f"per expert: {' '.join(str(int(c)) for c in counts)}")


def run(args: argparse.Namespace) -> int:
    import torch

    from dsmoe.moe.layer import MoELayer

    torch.manual_seed(args.seed)
    base = ModelConfig.preset("tiny")
    x = torch.randn(4, max(1, args.tokens // 4), base.hidden_size)
    for name, overrides in VARIANTS.items():
        layer = MoELayer(base.replace(**overrides))
        out = layer(x)
        losses = ", ".join(f"{k}={v.item():.4f}" for k, v in out.losses.items()) or "none"
        print(f"{name}: losses {losses}; dropped {out.dropped_fraction.item():.1%}")
        print(f"    {_load_line(out.expert_counts)}")
    print(_bias_balancing(base.replace(**VARIANTS["v3"]), x))
    return 0


def _bias_balancing(cfg: ModelConfig, x: torch.Tensor, steps: int = 300) -> str:
    """Skew the V3 router towards a few experts, then let the bias update rebalance it."""
    import torch

    from dsmoe.moe.layer import MoELayer

    with torch.no_grad():
        layer = MoELayer(cfg.replace(bias_update_speed=0.01))
        layer.gate.weight[:3] += 0.5 * x.reshape(-1, cfg.hidden_size).mean(0)
        before = layer(x).expert_counts.float()
        for _ in range(steps):
            layer(x)
            layer.update_bias()
        after = layer(x).expert_counts.float()
    return (f"v3 bias balancing over {steps} updates: max/mean load "
            f"{before.max() / before.mean():.2f} -> {after.max() / after.mean():.2f}")
