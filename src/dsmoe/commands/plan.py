"""Plan data + expert parallel training: memory per rank, FLOPs, all-to-all traffic.

From a preset (or an HF config.json) and a device count, prints per-device memory
(parameters, gradients, AdamW state, activations, FSDP's transient gathers), FLOPs per
token, and the expected all-to-all bytes per step with unrestricted and device-limited
routing, for a layout of expert parallelism (--ep), FSDP (--fsdp), activation
checkpointing and optimizer CPU offload, when training, fully finetuning
(--full-finetune) or LoRA finetuning (--lora). With --memory it searches the layouts and
prints the cheapest one that fits that much memory per device, and the runners-up.
Nothing is built or allocated, so the 145B preset plans in a second. The formulas and
their assumptions are in the docstrings of dsmoe.plan, dsmoe.plan_memory and
dsmoe.plan_search.

  dsmoe plan --preset deepseek-moe-16b --devices 8
  dsmoe plan --preset deepseek-moe-145b --devices 64 --ep 16 --max-devices-per-token 4
  dsmoe plan --preset deepseek-moe-16b --devices 8 --ep 8 --fsdp --activation-checkpointing
  dsmoe plan --preset deepseek-moe-16b --devices 8 --memory 80GB --full-finetune
"""

from __future__ import annotations

import argparse

from dsmoe.cli import positive_int
from dsmoe.plan_memory import DTYPE_BYTES


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="deepseek-moe-16b",
                        help="model size (tiny, deepseek-moe-2b, -16b, -145b)")
    parser.add_argument("--config", default=None, help="an HF config.json instead of --preset")
    parser.add_argument("--devices", type=positive_int, required=True, help="total ranks (GPUs)")
    parser.add_argument("--ep", type=positive_int, default=None,
                        help="expert-parallel group size (default: --devices when it "
                             "divides the expert count, else 1; with --memory: searched)")
    parser.add_argument("--max-devices-per-token", type=positive_int, default=None, metavar="M",
                        help="device-limited routing: show only this M (default: every M)")
    parser.add_argument("--tokens-per-step", type=positive_int, default=None,
                        help="global tokens per optimizer step (default: one micro-batch "
                             "per rank)")
    parser.add_argument("--seq-len", type=positive_int, default=None,
                        help="sequence length (default: the config's max_position_embeddings)")
    parser.add_argument("--micro-batch", type=positive_int, default=None,
                        help="sequences per rank per forward pass, what activations are "
                             "sized for (default: all the rank's tokens of a step)")
    parser.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="bf16")
    layout = parser.add_argument_group("layout")
    layout.add_argument("--fsdp", action="store_true",
                        help="shard weights, gradients and optimizer state (FSDP2): 1/N of "
                             "everything per rank")
    layout.add_argument("--activation-checkpointing", action="store_true",
                        help="keep only block inputs, recompute each block in backward")
    layout.add_argument("--cpu-offload", action="store_true",
                        help="keep the optimizer state in host memory")
    layout.add_argument("--memory", default=None, metavar="SIZE",
                        help="per-device memory (80GB, 80GiB, 24G): search the layouts and "
                             "print the cheapest that fits; layout flags given stay fixed")
    method = parser.add_argument_group("finetuning").add_mutually_exclusive_group()
    method.add_argument("--full-finetune", action="store_true",
                        help="dsmoe finetune --full (the same state as training)")
    method.add_argument("--lora", action="store_true",
                        help="LoRA finetuning: frozen base, fp32 adapters trained")
    parser.add_argument("--lora-r", type=positive_int, default=None,
                        help="LoRA rank (--lora; default: dsmoe finetune's)")
    parser.add_argument("--targets", default=None,
                        help="LoRA targets, e.g. q,k,v,o,gate,up,down (--lora; default: "
                             "dsmoe finetune's)")


def run(args: argparse.Namespace) -> int:
    from dsmoe.config import ModelConfig
    from dsmoe.plan import format_plan, make_plan

    if args.config:
        config, name = ModelConfig.from_json_file(args.config), args.config
    else:
        config, name = ModelConfig.preset(args.preset), args.preset
    if (args.targets is not None or args.lora_r is not None) and not args.lora:
        raise ValueError("--lora-r and --targets size LoRA adapters; add --lora")
    targets = None
    if args.targets is not None:
        from dsmoe.finetune.lora import parse_targets

        targets = parse_targets(args.targets)
    workload = dict(max_devices=args.max_devices_per_token, tokens_per_step=args.tokens_per_step,
                    dtype=args.dtype, seq_len=args.seq_len, micro_batch=args.micro_batch,
                    method="lora" if args.lora else "full" if args.full_finetune else "train",
                    lora_targets=targets, **({"lora_r": args.lora_r} if args.lora_r else {}))
    layout = dict(ep=args.ep, fsdp=args.fsdp, cpu_offload=args.cpu_offload,
                  activation_checkpointing=args.activation_checkpointing)
    if args.memory is None:
        print(format_plan(make_plan(config, args.devices, **layout, **workload), name))
        return 0
    from dsmoe.plan_search import format_search, parse_size, search_layouts

    memory = parse_size(args.memory)
    print(format_search(search_layouts(config, args.devices, memory, **layout, **workload),
                        name))
    return 0
