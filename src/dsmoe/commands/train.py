"""Train a DeepSeekMoE language model end to end, resumably.

Without --data it trains on the running Python's standard library sources. The output
directory gets metrics.jsonl, checkpoints/, tokenizer/, model/ (HF layout), report.md and
plots/. Ctrl-C saves a checkpoint; --resume continues a run exactly where it stopped.
"""

from __future__ import annotations

import argparse

from dsmoe.train.config import DTYPES, ROUTINGS, TrainConfig

_DEFAULTS = TrainConfig()


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default=_DEFAULTS.preset, help="model size (default: tiny)")
    parser.add_argument("--data", default=None,
                        help="text file, directory of text files, or .jsonl with a 'text' field")
    parser.add_argument("--tokenizer", default=None, help="reuse this tokenizer.json / directory")
    parser.add_argument("--out", default=_DEFAULTS.out, help="run directory")
    parser.add_argument("--max-steps", type=int, default=_DEFAULTS.max_steps)
    parser.add_argument("--routing", choices=ROUTINGS, default=_DEFAULTS.routing,
                        help="DeepSeek generation's routing and balancing")
    parser.add_argument("--dense", action="store_true",
                        help="train the dense model with the same active parameters instead")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a model config key (repeatable)")
    parser.add_argument("--batch-size", type=int, default=_DEFAULTS.batch_size)
    parser.add_argument("--seq-len", type=int, default=_DEFAULTS.seq_len)
    parser.add_argument("--grad-accum", type=int, default=_DEFAULTS.grad_accum)
    parser.add_argument("--lr", type=float, default=_DEFAULTS.lr)
    parser.add_argument("--warmup-steps", type=int, default=_DEFAULTS.warmup_steps)
    parser.add_argument("--dtype", choices=DTYPES, default=_DEFAULTS.dtype,
                        help="autocast dtype of the forward pass")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--seed", type=int, default=_DEFAULTS.seed)
    parser.add_argument("--log-every", type=int, default=_DEFAULTS.log_every)
    parser.add_argument("--eval-every", type=int, default=_DEFAULTS.eval_every)
    parser.add_argument("--checkpoint-every", type=int, default=_DEFAULTS.checkpoint_every)
    parser.add_argument("--cache-dir", default=None, help="tokenizer/token cache directory")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.add_argument("--nproc", type=int, default=1,
                        help="spawn N local processes (as torchrun --nproc-per-node N would)")
    parser.add_argument("--ep", type=int, default=None,
                        help="expert-parallel group size (default: every rank)")


def run(args: argparse.Namespace) -> int:
    cfg = TrainConfig(
        preset=args.preset, routing=args.routing, dense=args.dense,
        overrides=tuple(args.overrides), data=args.data, tokenizer=args.tokenizer,
        out=args.out, cache_dir=args.cache_dir, max_steps=args.max_steps,
        batch_size=args.batch_size, seq_len=args.seq_len, grad_accum=args.grad_accum,
        lr=args.lr, warmup_steps=args.warmup_steps, dtype=args.dtype, compile=args.compile,
        seed=args.seed, log_every=args.log_every, eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every)
    from dsmoe.train.loop import train
    from dsmoe.train.runner import spawn

    result = spawn(train, args.nproc, cfg, resume=args.resume, quiet=args.quiet, ep=args.ep)
    return 3 if result.status == "diverged" else 0
