"""Finetuning throughput and memory: full vs LoRA (fp32 base) vs LoRA over an int8 base.

A random model derived from a preset (default: deepseek-moe-2b's layer shapes -- hidden
1280, 63 routed experts of width 768, top-7, 1 shared -- with 2 layers and a 32k vocabulary,
~0.47B parameters) is saved with ``save_pretrained``; then each configuration runs in a
fresh subprocess, so each peak belongs to one run only, through the code ``dsmoe finetune``
runs: ``load_base`` (int8: quantized while loading), ``prepare_model``, ``build_optimizer``
and ``_train_step`` on synthetic chat-like rows (the second half of each row is the
"assistant" part that carries loss).

Reported per configuration:
  trainable   parameters the optimizer updates
  tokens/s    real tokens per second over the timed steps (after one warm-up step)
  weights     bytes of the model's tensors after loading (int8: quantized weights plus
              the float embedding, norms and routers)
  peak        peak RSS while training (VmHWM, reset after loading and after returning
              freed heap to the OS, so the transient float copies of quantize-while-loading
              do not count) minus the RSS after importing torch and dsmoe: weights +
              gradients + optimizer state + activations + temporaries
Linux only (reads and resets /proc/self counters; glibc's malloc_trim).

    python benchmarks/finetune.py [--preset deepseek-moe-2b] [--layers 2] [--vocab 32000]
                                  [--batch-size 2] [--seq-len 128] [--steps 3] [--lora-r 16]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _proc import status_kib

GIB = 2**30
CONFIGS = {  # name -> FinetuneConfig overrides
    "full": dict(full=True),
    "lora": dict(),
    "lora-int8": dict(quant="int8"),
}


def _reset_peak() -> None:
    """Return freed heap pages to the OS, then restart VmHWM from the current RSS."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")


def _write(args: argparse.Namespace, directory: str) -> None:
    """Subprocess: a random preset-derived model, its tokenizer and synthetic rows."""
    import torch

    from dsmoe import ModelConfig, Transformer
    from dsmoe.tokenizer import Tokenizer

    base = ModelConfig.preset(args.preset)
    tokenizer = Tokenizer.train_bpe(["User: hello\n\nAssistant: hi there"], 300)
    config = base.replace(num_hidden_layers=args.layers, vocab_size=args.vocab,
                          first_k_dense_replace=0, bos_token_id=tokenizer.bos_id,
                          eos_token_id=tokenizer.eos_id, torch_dtype="float32")
    with torch.device("meta"):
        model = Transformer(config)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    tokenizer.save(Path(directory) / "tok")
    model.save_pretrained(Path(directory) / "model", tokenizer_dir=Path(directory) / "tok")
    print(json.dumps({"parameters": model.num_parameters(),
                      "active": model.num_parameters(active=True)}))


def _run(args: argparse.Namespace, directory: str, name: str) -> None:
    """Subprocess: load, prepare and time ``args.steps`` optimizer steps of one config."""
    import torch

    from dsmoe.finetune import loop, sft_data
    from dsmoe.finetune.config import FinetuneConfig

    baseline = status_kib("VmRSS")  # after the imports
    cfg = FinetuneConfig(model=str(Path(directory) / "model"), data="-", out="-",
                         batch_size=args.batch_size, lora_r=args.lora_r,
                         lora_alpha=2.0 * args.lora_r, max_steps=args.steps + 1, lr=1e-4,
                         **CONFIGS[name])
    model, _ = loop.load_base(cfg)
    weights = sum(t.nbytes for t in [*model.parameters(), *model.buffers()])
    gen = torch.Generator().manual_seed(0)
    S = args.seq_len + 1
    examples = [sft_data.Example(tuple(torch.randint(1, args.vocab, (S,), generator=gen).tolist()),
                                 tuple([False] * (S // 2) + [True] * (S - S // 2)))
                for _ in range(args.batch_size * (args.steps + 1))]
    batches = sft_data.SFTBatches(examples, args.batch_size, 0, pad_id=0)
    description = loop.prepare_model(model, cfg)
    optimizer = loop.build_optimizer(model, cfg)
    n_moe, E = len(model.moe_layers()), model.config.n_routed_experts
    model.train()
    _reset_peak()
    loop._train_step(model, optimizer, batches, cfg, 0, n_moe, E)  # warm-up
    start = time.perf_counter()
    tokens = 0
    for step in range(1, args.steps + 1):
        *_, n_tokens = loop._train_step(model, optimizer, batches, cfg, step, n_moe, E)
        tokens += n_tokens
    seconds = time.perf_counter() - start
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(json.dumps({"name": name, "description": description, "trainable": trainable,
                      "tokens_per_s": tokens / seconds,
                      "weights_gib": weights / GIB,
                      "peak_gib": (status_kib("VmHWM") - baseline) * 1024 / GIB}))


def _subprocess(*argv: str) -> dict:
    result = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"subprocess {argv[:2]} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="deepseek-moe-2b")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--_write", help=argparse.SUPPRESS)
    parser.add_argument("--_run", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._write:
        return _write(args, args._write)
    if args._run:
        return _run(args, *args._run)

    common = ["--preset", args.preset, "--layers", str(args.layers), "--vocab", str(args.vocab),
              "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
              "--steps", str(args.steps), "--lora-r", str(args.lora_r)]
    directory = tempfile.mkdtemp(prefix="dsmoe-bench-finetune-")
    try:
        info = _subprocess(*common, "--_write", directory)
        rows = [_subprocess(*common, "--_run", directory, name) for name in args.configs]
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print(f"model: {args.preset} shapes, {args.layers} layers, vocab {args.vocab}: "
          f"{info['parameters'] / 1e6:.0f}M parameters ({info['active'] / 1e6:.0f}M active); "
          f"batch {args.batch_size} x {args.seq_len} tokens, LoRA r={args.lora_r} on "
          "q,k,v,o,gate,up,down (routed experts included), AdamW fp32, "
          f"{args.steps} timed steps\n")
    ref = next((r for r in rows if r["name"] == "full"), rows[0])
    print("| run | trainable params | tokens/s | x full | weights (GiB) | peak in training "
          "(GiB) | x full |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['name']} | {r['trainable'] / 1e6:.1f}M | {r['tokens_per_s']:.0f} | "
              f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f} | {r['weights_gib']:.2f} | "
              f"{r['peak_gib']:.2f} | {r['peak_gib'] / ref['peak_gib']:.2f} |")


if __name__ == "__main__":
    main()
