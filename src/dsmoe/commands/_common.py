"""Helpers shared by the commands that load a model: paths, dtypes, tokenizers."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from dsmoe.cli import non_negative_int, positive_int
from dsmoe.devices import resolve_device

if TYPE_CHECKING:
    import torch


class _Dtypes(Mapping[str, "torch.dtype"]):
    """``--dtype`` name -> torch dtype. Listing the names (argparse choices) does not
    import torch; looking one up does (so ``--help`` and argument errors stay fast)."""

    _names = ("float32", "bfloat16", "float16")

    def __getitem__(self, name: str) -> "torch.dtype":
        if name not in self._names:
            raise KeyError(name)
        import torch

        return getattr(torch, name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


DTYPES = _Dtypes()


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="HF model directory or .gguf file")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--adapter", default=None, metavar="DIR",
                        help="apply this LoRA adapter (dsmoe finetune's) without merging")
    parser.add_argument("--quant", choices=("int8", "int4"), default=None,
                        help="quantize the weights while loading (no full-precision copy); "
                             "int4 of a Q4_0 GGUF keeps its 4-bit blocks as stored")
    add_device_argument(parser)


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu",
                        help="where the model runs: cpu, cuda or cuda:N (default: cpu)")


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=non_negative_int, default=128,
                        help="at most this many (capped at the model's context)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=positive_int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--repetition-penalty", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="stop when this text appears (repeatable)")


def load_model_and_tokenizer(args: argparse.Namespace):
    from dsmoe.quant.checkpoint import load_model
    from dsmoe.tokenizer import Tokenizer

    path = Path(args.model)
    if not path.exists():
        raise FileNotFoundError(f"model not found: {path}")
    quant = getattr(args, "quant", None)
    device = resolve_device(getattr(args, "device", "cpu"), quant=quant)
    model = load_model(path, dtype=DTYPES[args.dtype], quant=quant, device=device)
    if path.suffix == ".gguf":
        from dsmoe.checkpoint.gguf import load_tokenizer

        tokenizer = load_tokenizer(path)
    else:
        tokenizer = Tokenizer.from_file(path)
    if getattr(args, "adapter", None):
        from dsmoe.finetune.adapter import load_adapter

        load_adapter(model, args.adapter)
    model.eval()
    return model, tokenizer


def sampling_kwargs(args: argparse.Namespace) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                top_k=args.top_k, top_p=args.top_p,
                repetition_penalty=args.repetition_penalty, seed=args.seed)


def new_token_budget(prompt_len: int, max_new_tokens: int, context: int) -> int:
    """``max_new_tokens`` capped so the prompt and the reply fit the model's context (the KV
    cache is allocated for all of it up front: 10^8 tokens would ask for hundreds of GB).
    A prompt that alone fills the context is refused."""
    from dsmoe.cli import CommandError

    if prompt_len >= context:
        raise CommandError(f"the prompt is {prompt_len} tokens, but the model's context "
                           f"(max_position_embeddings) is {context} tokens: shorten it")
    room = context - prompt_len
    if max_new_tokens > room:
        print(f"note: --max-new-tokens {max_new_tokens} capped at {room}: the model's "
              f"context is {context} tokens and the prompt takes {prompt_len}", file=sys.stderr)
        return room
    return max_new_tokens


def add_sharding_arguments(parser: argparse.ArgumentParser) -> None:
    """``--fsdp`` and its options (``dsmoe train`` and ``dsmoe finetune --full``)."""
    group = parser.add_argument_group("sharding over processes (FSDP2)")
    group.add_argument("--fsdp", action="store_true",
                       help="shard parameters, gradients and optimizer state over the "
                            "--nproc ranks (with --ep E: each expert block over the N/E "
                            "ranks holding it); checkpoints become sharded (DCP)")
    group.add_argument("--no-reshard-after-forward", dest="reshard_after_forward",
                       action="store_false",
                       help="--fsdp: keep each block's gathered weights from forward to "
                            "backward (less communication, more memory)")
    group.add_argument("--offload-optimizer", action="store_true",
                       help="--fsdp on CUDA: keep sharded weights, gradients and optimizer "
                            "state in host memory and step there (no effect on CPU)")


def fsdp_options(args: argparse.Namespace) -> Any:
    """The ``FSDPOptions`` the flags ask for (None without ``--fsdp``); one-line errors
    for options given without ``--fsdp`` and for one process."""
    from dsmoe.distributed import FSDPOptions

    if not args.fsdp:
        if args.offload_optimizer or not args.reshard_after_forward:
            raise ValueError("--offload-optimizer and --no-reshard-after-forward are "
                             "options of --fsdp; add --fsdp")
        return None
    if args.nproc < 2 and "WORLD_SIZE" not in os.environ:
        raise ValueError("--fsdp shards over processes: use --nproc N with N >= 2 (or "
                         "torchrun); one process holds everything anyway")
    return FSDPOptions(reshard_after_forward=args.reshard_after_forward,
                       offload_optimizer=args.offload_optimizer)
