"""Export a model as an HF directory or as a llama.cpp GGUF file.

MODEL is an HF model directory or a .gguf file. --format gguf writes llama.cpp's "deepseek"
architecture (V1) or "deepseek2" (DeepSeek-V2/V3's MLA; a V3 multi-token-prediction layer is
left out), which llama.cpp and llama-cpp-python load, tokenizer included when MODEL has
one; --quant picks the tensor type (norms and routers always stay f32). An HF directory is
converted tensor by tensor without loading the model, so checkpoints larger than memory
export too. --format hf writes config.json, safetensors with DeepSeek's tensor names and
the tokenizer files (e.g. to turn a GGUF back into an HF checkpoint).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from dsmoe.cli import CommandError
from dsmoe.commands._common import DTYPES

GGUF_QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="HF model directory or .gguf file")
    parser.add_argument("--format", required=True, choices=("hf", "gguf"))
    parser.add_argument("--out", required=True, help="output .gguf file or HF directory")
    parser.add_argument("--quant", choices=GGUF_QUANTS, default="f16",
                        help="GGUF tensor type (default: f16)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="HF export: weight dtype (default: as stored)")


def run(args: argparse.Namespace) -> int:
    source = Path(args.model)
    if not source.exists():
        raise FileNotFoundError(f"model not found: {source}")
    from dsmoe.quant import is_quantized_checkpoint

    if source.is_dir() and is_quantized_checkpoint(source):
        raise CommandError(f"{source} is a quantized dsmoe checkpoint; export from the float "
                           "checkpoint it was made from")
    if args.format == "gguf":
        _export_gguf(source, Path(args.out), args.quant)
    else:
        _export_hf(source, Path(args.out), args.dtype)
    return 0


def _export_gguf(source: Path, out: Path, quant: str) -> None:
    from dsmoe.checkpoint import gguf, hf
    from dsmoe.tokenizer import Tokenizer

    if out.suffix.lower() != ".gguf":
        raise CommandError(f"--out {out}: a GGUF file name must end in .gguf")
    if out.is_dir():
        raise CommandError(f"--out {out} is an existing directory; a GGUF is written as a "
                           "file (choose another name)")
    if source.suffix.lower() == ".gguf":
        model = gguf.load_gguf(source, dtype=None)
        config, state = model.config, gguf.writer.ModelAsHF(model.state_dict())
        tokenizer = gguf.GGUFFile(source).tokenizer_data()
    else:
        config, state = hf.read_config(source), gguf.HFDirectoryState(source)
        tokenizer = Tokenizer.from_file(source) if (source / "tokenizer.json").is_file() else None
    if tokenizer is None:
        print("warning: MODEL has no tokenizer; llama.cpp needs one to run the file",
              file=sys.stderr)
    with _progress(f"export {quant}") as update:
        gguf.write_gguf(out, config, state, tokenizer, quant=quant, progress=update)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {quant})")


def _export_hf(source: Path, out: Path, dtype_name: str | None) -> None:
    from dsmoe.model import Transformer

    dtype = DTYPES[dtype_name] if dtype_name else None
    model = Transformer.from_pretrained(source, dtype=dtype)
    if source.suffix.lower() != ".gguf":
        tokenizer_dir = source if (source / "tokenizer.json").is_file() else None
        model.save_pretrained(out, tokenizer_dir=tokenizer_dir)
    else:
        from dsmoe.checkpoint.gguf import GGUFFile

        data = GGUFFile(source).tokenizer_data()
        with tempfile.TemporaryDirectory() as tmp:
            if data is not None:
                data.to_tokenizer().save(tmp)
            model.save_pretrained(out, tokenizer_dir=tmp if data is not None else None)
    print(f"wrote {out}")


class _progress:
    """A rich progress bar on a terminal, nothing otherwise; yields update(done, total)."""

    def __init__(self, label: str) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.bar = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
                            disable=not sys.stderr.isatty(), transient=True)
        self.task = self.bar.add_task(label, total=None)

    def __enter__(self):  # noqa: ANN204
        self.bar.__enter__()
        return lambda done, total: self.bar.update(self.task, completed=done, total=total)

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(*exc)
