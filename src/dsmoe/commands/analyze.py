"""Show what a trained model's experts learned.

Writes to --out: expert_load.png (per-layer load heatmap), redundancy.png (validation loss
as the top-routed experts of each token are disabled, and with the shared experts off),
analysis.json (all numbers, incl. routing entropies and each expert's preferred tokens)
and report.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    from dsmoe.commands._common import add_device_argument

    parser.add_argument("model", help="HF model directory (with tokenizer.json) or .gguf file")
    parser.add_argument("--data", default=None,
                        help="text file / directory / .jsonl (default: the built-in corpus); "
                             "its validation split is used")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--seq-len", type=int, default=128)
    add_device_argument(parser)


def run(args: argparse.Namespace) -> int:
    from dsmoe.analysis import analyze, windows, write_outputs
    from dsmoe.commands._common import resolve_device
    from dsmoe.data import load_corpus
    from dsmoe.model import Transformer
    from dsmoe.tokenizer import Tokenizer

    model = Transformer.from_pretrained(args.model, device=resolve_device(args.device))
    tokenizer = Tokenizer.from_file(Path(args.model).parent if args.model.endswith(".gguf")
                                    else args.model)
    corpus = load_corpus(args.data)
    texts = corpus.val or corpus.train
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer.encode(text))
        if tokenizer.eos_id is not None:
            ids.append(tokenizer.eos_id)
        if len(ids) > args.max_tokens:
            break
    data = windows(ids, args.seq_len, args.max_tokens)
    result = analyze(model, data, tokenizer.decode)
    write_outputs(result, Path(args.out))
    worst = max(result.redundancy.values())
    print(f"analysed {result.n_tokens:,} tokens: base loss {result.base_loss:.3f}, with top "
          f"experts disabled up to {worst:.3f}"
          + (f", without shared experts {result.shared_disabled_loss:.3f}"
             if result.shared_disabled_loss is not None else ""))
    print(f"results in {args.out}/ (report.md, expert_load.png, redundancy.png)")
    return 0
