"""Quantize a model's weights to int8 or int4 for fast CPU inference (weight-only).

MODEL is an HF model directory or a .gguf file; it is read one layer at a time and each
layer quantized as it arrives, so a model whose float weights do not fit in memory can be
quantized as long as its quantized form does (deepseek-moe-16b: ~17 GB in int8).
Attention, dense MLP, shared and routed expert weights become int8 (one scale per output
row) or int4 (one scale and zero per --group-size inputs; with --symmetric one scale only,
llama.cpp's Q4_0 form at --group-size 32, each scale searched for the smallest error);
lm_head stays int8; embedding,
norms and routers stay in --dtype. DIR gets config.json (with quantization_config), the
safetensors and the tokenizer; load it with ``Transformer.from_pretrained(DIR)`` or
``dsmoe.quant.load_quantized(DIR)``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from dsmoe.commands._common import DTYPES
from dsmoe.commands.export import _progress


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="HF model directory or .gguf file")
    parser.add_argument("--bits", type=int, choices=(8, 4), required=True)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--group-size", type=int, choices=(32, 64, 128, 256), default=128,
                        help="int4: inputs per scale/zero group (default: 128)")
    parser.add_argument("--symmetric", action="store_true",
                        help="int4: no zeros, w = (q - 8) * scale (with --group-size 32: "
                             "Q4_0's size, 4.5 bits per weight)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16",
                        help="dtype of the parts kept in float (default: bfloat16)")


def run(args: argparse.Namespace) -> int:
    from dsmoe.quant import quantize_checkpoint

    source = Path(args.model)
    if args.symmetric and args.bits != 4:
        raise ValueError("--symmetric applies to --bits 4 only (int8 is always symmetric)")
    if not source.exists():
        raise FileNotFoundError(f"model not found: {source}")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_dir = _tokenizer_dir(source, Path(tmp))
        with _progress(f"quantize int{args.bits}") as update:
            quantize_checkpoint(source, args.out, bits=args.bits, group_size=args.group_size,
                                symmetric=args.symmetric, dtype=DTYPES[args.dtype],
                                tokenizer_dir=tokenizer_dir, progress=update)
    size = sum(f.stat().st_size for f in Path(args.out).glob("*.safetensors"))
    print(f"wrote {args.out} (int{args.bits}, {size / 2**20:.1f} MiB of weights)")
    return 0


def _tokenizer_dir(source: Path, tmp: Path) -> Path | None:
    """Where the tokenizer files are: the HF directory, or written from the GGUF's metadata."""
    if source.is_dir():
        return source if (source / "tokenizer.json").is_file() else None
    from dsmoe.checkpoint.gguf import GGUFFile

    data = GGUFFile(source).tokenizer_data()
    if data is None:
        return None
    data.to_tokenizer().save(tmp)
    return tmp
