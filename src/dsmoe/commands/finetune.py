"""Finetune a DeepSeekMoE model on chat or instruction data (LoRA, QLoRA or full).

--data is jsonl: one row per line, {"messages": [{"role", "content"}, ...]} or
{"prompt", "completion"}. Rows are rendered in the model's chat format (deepseek-moe:
"User: ...\n\nAssistant: ...<eos>") and only the assistant tokens carry loss. LoRA (the
default) puts low-rank adapters on --targets, the routed experts included (one pair per
expert, run through the grouped expert matmul), on a frozen base that --quant int8|int4
can quantize; --full trains every weight instead. --out gets metrics.jsonl (with the
expert load before and after and how much it shifted), checkpoints/, tokenizer/, and
adapter/ (adapter_model.safetensors + adapter_config.json, PEFT layout, + dsmoe_adapter.json)
or model/ (--full). DeepSeek-V2/V3 adapters load whole with PEFT on transformers' native
classes (experts and routers through target_parameters, so --lora-dropout is 0 there); for
V1 routed-expert and router LoRA are applied by dsmoe, DeepSeek's own modeling code and
llama.cpp, and PEFT drops them (the output and dsmoe_adapter.json say so); `dsmoe merge`
bakes every part into the weights.
Ctrl-C saves a checkpoint; --resume continues exactly where the run stopped.
"""

from __future__ import annotations

import argparse
import os

from dsmoe.commands._common import add_sharding_arguments, fsdp_options
from dsmoe.finetune.config import DTYPES, QUANTS, FinetuneConfig
from dsmoe.finetune.lora import TARGETS

_DEFAULTS = FinetuneConfig(model="", data="")
_UNSET = argparse.SUPPRESS  # a FinetuneConfig option not given: absent from the namespace
# every option that sets a FinetuneConfig field of the same name (but MODEL, --data, --out)
_FIELDS = ("val_data", "val_fraction", "tokenizer", "full", "freeze_router", "freeze_experts",
           "lora_r", "lora_alpha", "lora_dropout", "targets", "quant", "dtype", "device",
           "max_seq_len",
           "packing", "batch_size", "grad_accum", "max_steps", "epochs", "lr", "warmup_steps",
           "weight_decay", "seed", "log_every", "eval_every", "checkpoint_every")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="base model: HF model directory or .gguf file")
    parser.add_argument("--data", required=True, help="training rows (.jsonl)")
    parser.add_argument("--out", default=_DEFAULTS.out, help="run directory")
    parser.add_argument("--val-data", default=_UNSET, help="validation rows (.jsonl); default: "
                        "--val-fraction of --data")
    parser.add_argument("--val-fraction", type=float, default=_UNSET)
    parser.add_argument("--tokenizer", default=_UNSET,
                        help="tokenizer directory (default: MODEL's)")
    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--lora-r", type=int, default=_UNSET, help="rank")
    lora.add_argument("--lora-alpha", type=float, default=_UNSET,
                      help="scale: the update is alpha / r * B A")
    lora.add_argument("--lora-dropout", type=float, default=_UNSET)
    lora.add_argument("--targets", default=_UNSET,
                      help=f"comma-separated, from {','.join(TARGETS)} (gate/up/down: dense MLPs "
                           "and routed experts; shared: shared experts; router: MoE gates)")
    lora.add_argument("--quant", choices=QUANTS, default=_UNSET,
                      help="quantize the frozen base (QLoRA-style)")
    full = parser.add_argument_group("full finetuning")
    full.add_argument("--full", action="store_true", default=_UNSET,
                      help="train every weight instead of LoRA")
    full.add_argument("--freeze-router", action="store_true", default=_UNSET,
                      help="--full: keep the routers")
    full.add_argument("--freeze-experts", action="store_true", default=_UNSET,
                      help="--full: keep the routed experts")
    parser.add_argument("--max-steps", type=int, default=_UNSET,
                        help="optimizer steps (default: --epochs over the training rows)")
    parser.add_argument("--epochs", type=float, default=_UNSET)
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    parser.add_argument("--batch-size", type=int, default=_UNSET)
    parser.add_argument("--grad-accum", type=int, default=_UNSET)
    parser.add_argument("--max-seq-len", type=int, default=_UNSET,
                        help="longer examples are cut")
    parser.add_argument("--packing", action="store_true", default=_UNSET,
                        help="pack several examples per row instead of padding")
    parser.add_argument("--lr", type=float, default=_UNSET,
                        help="peak learning rate (default: 2e-4 LoRA, 2e-5 full)")
    parser.add_argument("--warmup-steps", type=int, default=_UNSET)
    parser.add_argument("--weight-decay", type=float, default=_UNSET)
    parser.add_argument("--dtype", choices=DTYPES, default=_UNSET,
                        help="dtype of the base model's float weights")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=_UNSET,
                        help="where finetuning runs (cuda: each rank its local GPU, NCCL)")
    parser.add_argument("--seed", type=int, default=_UNSET)
    parser.add_argument("--log-every", type=int, default=_UNSET)
    parser.add_argument("--eval-every", type=int, default=_UNSET)
    parser.add_argument("--checkpoint-every", type=int, default=_UNSET)
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.add_argument("--nproc", type=int, default=1,
                        help="spawn N local processes, each training on its share of every "
                             "batch (as torchrun --nproc-per-node N would)")
    parser.add_argument("--ep", type=int, default=1,
                        help="--full --fsdp: expert-parallel group size (N/E FSDP shards "
                             "of each expert block; default 1: FSDP only)")
    add_sharding_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from dsmoe.train.runner import spawn

    # Only the flags given on the command line: --resume keeps the run's own settings and
    # must tell a changed one from a default.
    given = {name: getattr(args, name) for name in _FIELDS if hasattr(args, name)}
    cfg = FinetuneConfig(model=args.model, data=args.data, out=args.out, **given)
    given = frozenset(given) | {"model", "data"}
    fsdp = fsdp_options(args)
    from dsmoe.finetune.loop import check_sharding

    check_sharding(cfg, args.ep, fsdp)
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:  # checked once, not per rank
        from dsmoe.distributed import check_world

        check_world(args.nproc, args.ep)
    result = spawn(_finetune_rank, args.nproc, cfg, args.resume, args.quiet, given,
                   args.ep, fsdp)
    if result.output is not None and not args.quiet:
        from dsmoe.finetune.adapter import peft_note

        note = peft_note(result.output)
        if note:
            print(note)
    return 3 if result.status == "diverged" else 0


def _finetune_rank(cfg: FinetuneConfig, resume: bool, quiet: bool, given: frozenset[str],
                   ep: int = 1, fsdp: object = None):
    """One rank's run; its result travels to the launcher without the model."""
    from dsmoe.finetune.loop import finetune

    result = finetune(cfg, resume=resume, quiet=quiet, given=given, ep=ep, fsdp=fsdp)
    result.model = None
    return result
