"""Finetune a DeepSeekMoE model on chat or instruction data (LoRA, QLoRA or full).

--data is jsonl: one row per line, {"messages": [{"role", "content"}, ...]} or
{"prompt", "completion"}. Rows are rendered in the model's chat format (deepseek-moe:
"User: ...\n\nAssistant: ...<eos>") and only the assistant tokens carry loss. LoRA (the
default) puts low-rank adapters on --targets, the routed experts included (one pair per
expert, run through the grouped expert matmul), on a frozen base that --quant int8|int4
can quantize; --full trains every weight instead. --out gets metrics.jsonl (with the
expert load before and after and how much it shifted), checkpoints/, tokenizer/, and
adapter/ (adapter_model.safetensors + adapter_config.json, PEFT layout, + dsmoe_adapter.json)
or model/ (--full). Routed-expert and router LoRA are applied by dsmoe, DeepSeek's own
modeling code and llama.cpp; PEFT on transformers' native DeepSeek models drops them (the
output and dsmoe_adapter.json say so); `dsmoe merge` bakes every part into the weights.
Ctrl-C saves a checkpoint; --resume continues exactly where the run stopped.
"""

from __future__ import annotations

import argparse

from dsmoe.finetune.config import DTYPES, QUANTS, FinetuneConfig
from dsmoe.finetune.lora import TARGETS

_DEFAULTS = FinetuneConfig(model="", data="")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="base model: HF model directory or .gguf file")
    parser.add_argument("--data", required=True, help="training rows (.jsonl)")
    parser.add_argument("--out", default=_DEFAULTS.out, help="run directory")
    parser.add_argument("--val-data", default=None, help="validation rows (.jsonl); default: "
                        "--val-fraction of --data")
    parser.add_argument("--val-fraction", type=float, default=_DEFAULTS.val_fraction)
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: MODEL's)")
    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--lora-r", type=int, default=_DEFAULTS.lora_r, help="rank")
    lora.add_argument("--lora-alpha", type=float, default=_DEFAULTS.lora_alpha,
                      help="scale: the update is alpha / r * B A")
    lora.add_argument("--lora-dropout", type=float, default=_DEFAULTS.lora_dropout)
    lora.add_argument("--targets", default=",".join(_DEFAULTS.targets),
                      help=f"comma-separated, from {','.join(TARGETS)} (gate/up/down: dense MLPs "
                           "and routed experts; shared: shared experts; router: MoE gates)")
    lora.add_argument("--quant", choices=QUANTS, default=None,
                      help="quantize the frozen base (QLoRA-style)")
    full = parser.add_argument_group("full finetuning")
    full.add_argument("--full", action="store_true", help="train every weight instead of LoRA")
    full.add_argument("--freeze-router", action="store_true", help="--full: keep the routers")
    full.add_argument("--freeze-experts", action="store_true",
                      help="--full: keep the routed experts")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="optimizer steps (default: --epochs over the training rows)")
    parser.add_argument("--epochs", type=float, default=_DEFAULTS.epochs)
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    parser.add_argument("--batch-size", type=int, default=_DEFAULTS.batch_size)
    parser.add_argument("--grad-accum", type=int, default=_DEFAULTS.grad_accum)
    parser.add_argument("--max-seq-len", type=int, default=_DEFAULTS.max_seq_len,
                        help="longer examples are cut")
    parser.add_argument("--packing", action="store_true",
                        help="pack several examples per row instead of padding")
    parser.add_argument("--lr", type=float, default=None,
                        help="peak learning rate (default: 2e-4 LoRA, 2e-5 full)")
    parser.add_argument("--warmup-steps", type=int, default=_DEFAULTS.warmup_steps)
    parser.add_argument("--weight-decay", type=float, default=_DEFAULTS.weight_decay)
    parser.add_argument("--dtype", choices=DTYPES, default=_DEFAULTS.dtype,
                        help="dtype of the base model's float weights")
    parser.add_argument("--seed", type=int, default=_DEFAULTS.seed)
    parser.add_argument("--log-every", type=int, default=_DEFAULTS.log_every)
    parser.add_argument("--eval-every", type=int, default=_DEFAULTS.eval_every)
    parser.add_argument("--checkpoint-every", type=int, default=_DEFAULTS.checkpoint_every)
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.add_argument("--nproc", type=int, default=1,
                        help="spawn N local processes, each training on its share of every "
                             "batch (as torchrun --nproc-per-node N would)")


def run(args: argparse.Namespace) -> int:
    from dsmoe.train.runner import spawn

    cfg = FinetuneConfig(
        model=args.model, data=args.data, out=args.out, val_data=args.val_data,
        val_fraction=args.val_fraction, tokenizer=args.tokenizer, full=args.full,
        freeze_router=args.freeze_router, freeze_experts=args.freeze_experts,
        lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        targets=args.targets, quant=args.quant, dtype=args.dtype,
        max_seq_len=args.max_seq_len, packing=args.packing, batch_size=args.batch_size,
        grad_accum=args.grad_accum, max_steps=args.max_steps, epochs=args.epochs, lr=args.lr,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, seed=args.seed,
        log_every=args.log_every, eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every)
    result = spawn(_finetune_rank, args.nproc, cfg, args.resume, args.quiet)
    if result.output is not None and not args.quiet:
        from dsmoe.finetune.adapter import peft_note

        note = peft_note(result.output)
        if note:
            print(note)
    return 3 if result.status == "diverged" else 0


def _finetune_rank(cfg: FinetuneConfig, resume: bool, quiet: bool):
    """One rank's run; its result travels to the launcher without the model."""
    from dsmoe.finetune.loop import finetune

    result = finetune(cfg, resume=resume, quiet=quiet)
    result.model = None
    return result
