"""Merge a LoRA adapter into its base model and write an HF checkpoint.

MODEL is the base (HF directory or .gguf), ADAPTER an adapter directory (or a finetune
run directory holding adapter/). The base is loaded in float (--dtype), every update
alpha / r * B A is added to its weight (routed experts per expert, the router too), and
DIR gets config.json, the safetensors and MODEL's tokenizer files: a plain model that any
DeepSeekMoE loader reads, with the adapter's outputs.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from dsmoe.commands._common import DTYPES


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="base model: HF model directory or .gguf file")
    parser.add_argument("adapter", help="adapter directory (or finetune run directory)")
    parser.add_argument("--out", required=True, help="output HF model directory")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="dtype of the merged weights (the merge itself is done in fp32)")


def run(args: argparse.Namespace) -> int:
    import torch

    from dsmoe.commands.quantize import _tokenizer_dir
    from dsmoe.finetune.adapter import load_adapter
    from dsmoe.finetune.lora import merge_lora
    from dsmoe.model import Transformer

    source = Path(args.model)
    if not source.exists():
        raise FileNotFoundError(f"model not found: {source}")
    model = Transformer.from_pretrained(source, dtype=torch.float32)
    config = load_adapter(model, args.adapter)
    merge_lora(model).to(DTYPES[args.dtype])
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(args.out, tokenizer_dir=_tokenizer_dir(source, Path(tmp)))
    s = config.settings
    print(f"merged LoRA r={s.r} alpha={s.alpha:g} ({','.join(s.targets)}) into {source}; "
          f"wrote {args.out}")
    return 0
