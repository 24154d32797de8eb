"""Train a DeepSeekMoE language model end to end, resumably.

Without --data it trains on the running Python's standard library sources. The output
directory gets metrics.jsonl, checkpoints/, tokenizer/, model/ (HF layout), report.md and
plots/. Ctrl-C saves a checkpoint; --resume continues a run exactly where it stopped.
"""

from __future__ import annotations

import argparse
import os

from dsmoe.commands._common import add_sharding_arguments, fsdp_options
from dsmoe.train.config import DTYPES, ROUTINGS, TrainConfig

_DEFAULTS = TrainConfig()
_UNSET = argparse.SUPPRESS  # a TrainConfig option not given: absent from the namespace
# every option that sets a TrainConfig field of the same name (but --out)
_FIELDS = ("preset", "routing", "dense", "overrides", "data", "tokenizer", "cache_dir",
           "max_steps", "batch_size", "seq_len", "grad_accum", "lr", "warmup_steps", "dtype",
           "compile", "device", "activation_checkpointing", "seed", "log_every", "eval_every",
           "checkpoint_every")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default=_UNSET,
                        help=f"model size (default: {_DEFAULTS.preset})")
    parser.add_argument("--data", default=_UNSET,
                        help="text file, directory of text files, or .jsonl with a 'text' field")
    parser.add_argument("--tokenizer", default=_UNSET,
                        help="reuse this tokenizer.json / directory")
    parser.add_argument("--out", default=_DEFAULTS.out, help="run directory")
    parser.add_argument("--max-steps", type=int, default=_UNSET)
    parser.add_argument("--routing", choices=ROUTINGS, default=_UNSET,
                        help="DeepSeek generation's routing and balancing (default: the "
                             "preset's own: v2/v3 for the V2/V3 presets, else v1)")
    parser.add_argument("--dense", action="store_true", default=_UNSET,
                        help="train the dense model with the same active parameters instead")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    parser.add_argument("--set", dest="overrides", action="append", default=_UNSET,
                        metavar="KEY=VALUE", help="override a model config key (repeatable)")
    parser.add_argument("--batch-size", type=int, default=_UNSET)
    parser.add_argument("--seq-len", type=int, default=_UNSET)
    parser.add_argument("--grad-accum", type=int, default=_UNSET)
    parser.add_argument("--lr", type=float, default=_UNSET)
    parser.add_argument("--warmup-steps", type=int, default=_UNSET)
    parser.add_argument("--dtype", choices=DTYPES, default=_UNSET,
                        help="autocast dtype of the forward pass")
    parser.add_argument("--compile", action="store_true", default=_UNSET,
                        help="torch.compile the model")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=_UNSET,
                        help="where training runs (cuda: each rank its local GPU, NCCL)")
    parser.add_argument("--activation-checkpointing", action="store_true", default=_UNSET,
                        help="recompute each block's activations in backward (less memory "
                             "for long sequences, about a third more compute)")
    parser.add_argument("--seed", type=int, default=_UNSET)
    parser.add_argument("--log-every", type=int, default=_UNSET)
    parser.add_argument("--eval-every", type=int, default=_UNSET)
    parser.add_argument("--checkpoint-every", type=int, default=_UNSET)
    parser.add_argument("--cache-dir", default=_UNSET, help="tokenizer/token cache directory")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.add_argument("--nproc", type=int, default=1,
                        help="spawn N local processes (as torchrun --nproc-per-node N would)")
    parser.add_argument("--ep", type=int, default=None,
                        help="expert-parallel group size (default: every rank)")
    add_sharding_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from dsmoe.train.loop import train
    from dsmoe.train.runner import spawn

    # Only the flags given on the command line: --resume keeps the run's own settings and
    # must tell a changed one from a default.
    given = {name: getattr(args, name) for name in _FIELDS if hasattr(args, name)}
    if "overrides" in given:
        given["overrides"] = tuple(given["overrides"])
    cfg = TrainConfig(out=args.out, **given)
    fsdp = fsdp_options(args)
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:  # ranks to launch: check here,
        from dsmoe.distributed import check_world          # once, not in every rank

        check_world(args.nproc, args.ep or args.nproc)
    result = spawn(train, args.nproc, cfg, resume=args.resume, quiet=args.quiet, ep=args.ep,
                   given=frozenset(given), fsdp=fsdp)
    return 3 if result.status == "diverged" else 0
