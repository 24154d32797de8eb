"""Plan data + expert parallel training: memory per rank, FLOPs, all-to-all traffic.

From a preset (or an HF config.json) and a device count, prints per-rank memory
(parameters, gradients, AdamW state, activations), FLOPs per token, and the expected
all-to-all bytes per step with unrestricted and device-limited routing. Nothing is built
or allocated, so the 145B preset plans in a second. The formulas and their assumptions are
in the docstring of dsmoe.plan.

  dsmoe plan --preset deepseek-moe-16b --devices 8
  dsmoe plan --preset deepseek-moe-145b --devices 64 --ep 16 --max-devices-per-token 4
"""

from __future__ import annotations

import argparse

from dsmoe.cli import positive_int
from dsmoe.plan import DTYPE_BYTES


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="deepseek-moe-16b",
                        help="model size (tiny, deepseek-moe-2b, -16b, -145b)")
    parser.add_argument("--config", default=None, help="an HF config.json instead of --preset")
    parser.add_argument("--devices", type=positive_int, required=True, help="total ranks (GPUs)")
    parser.add_argument("--ep", type=positive_int, default=None,
                        help="expert-parallel group size (default: --devices when it "
                             "divides the expert count, else 1)")
    parser.add_argument("--max-devices-per-token", type=positive_int, default=None, metavar="M",
                        help="device-limited routing: show only this M (default: every M)")
    parser.add_argument("--tokens-per-step", type=positive_int, default=None,
                        help="global tokens per optimizer step (default: one sequence per rank)")
    parser.add_argument("--seq-len", type=positive_int, default=None,
                        help="sequence length (default: the config's max_position_embeddings)")
    parser.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="bf16")


def run(args: argparse.Namespace) -> int:
    from dsmoe.config import ModelConfig
    from dsmoe.plan import format_plan, make_plan

    if args.config:
        config, name = ModelConfig.from_json_file(args.config), args.config
    else:
        config, name = ModelConfig.preset(args.preset), args.preset
    plan = make_plan(config, args.devices, ep=args.ep, max_devices=args.max_devices_per_token,
                     tokens_per_step=args.tokens_per_step, dtype=args.dtype,
                     seq_len=args.seq_len)
    print(format_plan(plan, name))
    return 0
