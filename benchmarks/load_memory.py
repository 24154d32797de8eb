"""Peak memory of ``Transformer.from_pretrained`` against the size of the weights it loads.

A large random model (default: the deepseek-moe-2b preset, ~2.0B parameters) is written
with ``save_pretrained`` to a temporary directory, then loaded in fresh subprocesses, one
per load dtype, so that each peak (VmHWM from /proc/self/status) belongs to one load only.

Reported per load:
  weights     bytes of the loaded model's tensors
  baseline    RSS of the subprocess after importing torch and dsmoe, before loading
  peak/load   peak RSS during from_pretrained, minus the baseline, over the weights
  peak/touch  the same after summing every weight once: memory-mapped weights count in
              RSS only once read, so this is the honest number for a model in use
The temporary directory is deleted at the end. Linux only (reads /proc).

    python benchmarks/load_memory.py [--preset deepseek-moe-2b] [--save-dtype bfloat16]
                                     [--load-dtypes bfloat16 float32]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _proc import status_kib

GIB = 2**30


def _write(preset: str, dtype_name: str, directory: str) -> None:
    """Subprocess: a random model of ``preset`` saved to ``directory``."""
    import torch

    from dsmoe import ModelConfig, Transformer

    dtype = getattr(torch, dtype_name)
    config = ModelConfig.preset(preset).replace(torch_dtype=dtype_name)
    with torch.device("meta"):
        model = Transformer(config).to(dtype)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    start = time.perf_counter()
    model.save_pretrained(directory)
    print(json.dumps({"save_s": time.perf_counter() - start,
                      "parameters": model.num_parameters()}))


def _load(directory: str, dtype_name: str) -> None:
    """Subprocess: load ``directory`` and report memory."""
    import torch

    from dsmoe import Transformer

    baseline = status_kib("VmRSS") * 1024
    start = time.perf_counter()
    model = Transformer.from_pretrained(directory, dtype=getattr(torch, dtype_name))
    load_s = time.perf_counter() - start
    peak_load = status_kib("VmHWM") * 1024
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if model.config.tie_word_embeddings:
        weights -= model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    with torch.no_grad():  # reads every page; sums in the weights' dtype (no big temporaries)
        checksum = sum(float(p.sum()) for p in model.parameters())
    peak_touch = status_kib("VmHWM") * 1024
    print(json.dumps({"dtype": dtype_name, "weights": weights, "baseline": baseline,
                      "peak_load": peak_load, "peak_touch": peak_touch, "load_s": load_s,
                      "checksum_finite": math.isfinite(checksum)}))


def _child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True,
                         text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="deepseek-moe-2b")
    parser.add_argument("--save-dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--load-dtypes", nargs="+", default=["bfloat16", "float32"],
                        choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--dir", default=None, help="where to put the temporary checkpoint")
    parser.add_argument("--_write", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--_load", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._write:
        return _write(*args._write)
    if args._load:
        return _load(*args._load)

    tmp = Path(tempfile.mkdtemp(prefix="dsmoe-load-memory-", dir=args.dir))
    try:
        directory = tmp / "model"
        written = _child("--_write", args.preset, args.save_dtype, str(directory))
        on_disk = sum(f.stat().st_size for f in directory.iterdir())
        print(f"{args.preset}: {written['parameters'] / 1e9:.2f}B parameters, saved as "
              f"{args.save_dtype} in {written['save_s']:.1f} s, {on_disk / GIB:.2f} GiB on disk")
        print()
        print("| stored -> loaded | weights (GiB) | baseline RSS (GiB) | load time (s) "
              "| peak/load | peak/touch |")
        print("|---|---|---|---|---|---|")
        for dtype in args.load_dtypes:
            r = _child("--_load", str(directory), dtype)
            assert r["checksum_finite"], "loaded weights contain NaN"
            ratio_load = (r["peak_load"] - r["baseline"]) / r["weights"]
            ratio_touch = (r["peak_touch"] - r["baseline"]) / r["weights"]
            print(f"| {args.save_dtype} -> {dtype} | {r['weights'] / GIB:.2f} "
                  f"| {r['baseline'] / GIB:.2f} | {r['load_s']:.1f} | {ratio_load:.2f}x "
                  f"| {ratio_touch:.2f}x |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
