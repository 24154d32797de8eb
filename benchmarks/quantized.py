"""Quantized CPU inference: kernel choice, then load time, peak memory, prefill and decode
speed of fp32 / bf16 / int8 / int4 models (and llama.cpp on the same weights, if present).

Sections (each prints a markdown table):
  kernels  one matmul with a deepseek-moe-16b expert's weights ([2816, 2048] gate_up and
           [2048, 1408] down) at several row counts M: dense fp32 and bf16 GEMMs, torch's
           int8 kernel (``_weight_int8pack_mm``), int8 converted to bf16 then a GEMM, and
           torch's int4 kernel (``_weight_int4pack_mm_for_cpu``, groups of 32 and 128),
           dsmoe's native int4 kernel (int8 activations per 32, integer dot products) and
           its prefill path (the weight dequantized by the native code, then a GEMM).
           Decoding sends 1 row through attention and each picked expert; prefill of P
           tokens sends P rows through attention and ~P*K/E rows through each expert.
  model    a random model of --preset (default deepseek-moe-2b, ~2.0B parameters) saved
           once in bf16 with a tokenizer; int8 and int4 checkpoints are made from it by
           ``dsmoe.quant.quantize_checkpoint`` (layer by layer). Each format then runs in a
           fresh subprocess: load time, peak RSS (VmHWM), prefill tokens/s (batch 1,
           --prompt tokens, one forward) and decode tokens/s (batch 1, KV cache, --decode
           greedy steps after the prompt).
  llama    with llama-cpp-python importable: the bf16 checkpoint exported to GGUF Q8_0 (and
           Q4_0) by ``dsmoe export``'s code path and timed the same way in llama.cpp; with
           int4 in --formats, dsmoe also runs the Q4_0 GGUF itself ("int4 from Q4_0": the
           same 4-bit blocks, loaded without dequantizing).
  quality  KL divergence, top-1 agreement and perplexity against fp32 of dsmoe int8 / int4
           and llama.cpp Q8_0 / Q4_0 (and F32, as a check) on one small trained model.
  16b      with --big: a random deepseek-moe-16b-shaped Q4_0 GGUF (9.4 GB) written tensor by
           tensor (its fp32 form, 65 GB, never exists), run by llama.cpp and by dsmoe (int4
           from the Q4_0 blocks, ``load_model(gguf, quant="int4")``) like the others, then
           deleted.

Timings on a shared machine vary: the load average is printed with every table.

    python benchmarks/quantized.py [--preset deepseek-moe-2b] [--formats fp32 bf16 int8 int4]
        [--prompt 128] [--decode 32] [--threads N] [--big] [--skip-model] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _proc import status_kib

GIB = 2**30


def _load_average() -> str:
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


def _best(fn, repeat: int) -> float:
    """Lower quartile of ``repeat`` runs, in seconds: robust to other processes stealing
    the CPU in some runs, without the luck of a single fastest run."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 4]


# --- kernels -------------------------------------------------------------------------------
def bench_kernels(rows: list[int], repeat: int) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from dsmoe import native
    from dsmoe.quant import kernels

    results = []
    for name, (N, K) in (("expert gate_up", (2816, 2048)), ("expert down", (2048, 1408))):
        w = torch.randn(N, K) * 0.02
        wb = w.bfloat16()
        q8, s8 = kernels.quantize_int8(w)
        int4 = {}
        for g in (32, 128):
            q4, sc, zr = kernels.quantize_int4(w, g)
            int4[g] = (kernels.kernel_pack_int4(q4), kernels.scales_and_zeros(sc, zr),
                       (q4, sc, zr))
        for m in rows:
            x = torch.randn(m, K)
            xb = x.bfloat16()
            row = {"matrix": name, "rows": m}
            row["fp32 GEMM"] = _best(lambda: F.linear(x, w), repeat)
            row["bf16 GEMM"] = _best(lambda: F.linear(xb, wb), repeat)
            row["int8 kernel"] = _best(lambda: torch._weight_int8pack_mm(xb, q8, s8), repeat)
            if m <= kernels.INT8_KERNEL_MAX_ROWS and native.library() is not None:
                row["int8 dsmoe native"] = _best(lambda: native.int8_rows_matmul(x, q8, s8),
                                                 repeat)
            row["int8->bf16 GEMM"] = _best(
                lambda: F.linear(xb, q8.to(torch.bfloat16)) * s8, repeat)
            for g, (packed, sz, canonical) in int4.items():
                row[f"int4 g{g} kernel"] = _best(
                    lambda: torch._weight_int4pack_mm_for_cpu(xb, packed, g, sz), repeat)
                if native.library() is None:
                    continue
                if m <= 2 * kernels.INT4_KERNEL_MAX_ROWS:  # past the crossover too
                    stack = [t.unsqueeze(0) for t in canonical]  # [1, N, ...]
                    row[f"int4 g{g} dsmoe native"] = _best(
                        lambda: native.int4_blocks_matmul(x, *stack, g, [(0, 0, m)]), repeat)
                row[f"int4 g{g} dequant+GEMM"] = _best(
                    lambda: F.linear(x, native.int4_dequantize(*canonical, g, x.dtype)), repeat)
            results.append(row)
    return results


def print_kernels(results: list[dict]) -> None:
    columns = list(dict.fromkeys(k for r in results for k in r if k not in ("matrix", "rows")))
    print(f"\n### Kernels: ms per matmul (lower quartile of runs; load average "
          f"{_load_average()})\n")
    print("| matrix | rows | " + " | ".join(columns) + " |")
    print("|---|---:|" + "---:|" * len(columns))
    for r in results:
        base = r["bf16 GEMM"]
        cells = [f"{r[c] * 1e3:.2f} ({base / r[c]:.1f}x)" if c in r else "-" for c in columns]
        print(f"| {r['matrix']} | {r['rows']} | " + " | ".join(cells) + " |")
    print("\n(x = speed relative to the bf16 GEMM on the same rows)")


# --- quality -------------------------------------------------------------------------------
QUALITY_VOCAB = 300  # a BPE with merges (llama.cpp refuses a tokenizer without any)


def _affine_batch(n: int, length: int, seed: int):
    """Sequences of a small learnable language, x[t+1] = (a x[t] + 1) mod 256 with a per
    sequence from {3, 5, 7, 11}: confident predictions after a few seconds of training."""
    import torch

    g = torch.Generator().manual_seed(seed)
    mult = torch.tensor([3, 5, 7, 11])[torch.randint(0, 4, (n, 1), generator=g)]
    steps = torch.arange(length)
    ids = torch.randint(0, 256, (n, 1), generator=g).expand(n, length).clone()
    for t in steps[1:]:
        ids[:, t] = (ids[:, t - 1] * mult[:, 0] + 1) % 256
    return ids  # [n, length]


def bench_quality(root: Path, llama: bool, steps: int = 300, held_out: int = 64) -> dict:
    """KL(fp32 || format) per token (mean and its standard error), top-1 agreement and
    perplexity of dsmoe int8 / int4 and llama.cpp F32/Q8_0/Q4_0 on one small trained model
    (D=256, E=8, 2 layers; every matrix has room for groups of 128), against dsmoe's fp32
    logits on ``held_out`` sequences. llama.cpp F32 checks that both run the same model (its
    KL should be ~0); "int4 from Q4_0" is dsmoe running llama.cpp's Q4_0 blocks."""
    import copy

    import torch
    import torch.nn.functional as F

    from dsmoe import ModelConfig
    from dsmoe.checkpoint import gguf, hf
    from dsmoe.model import Transformer
    from dsmoe.quant import load_model, quantize_model

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=QUALITY_VOCAB, hidden_size=256, intermediate_size=512,
                         moe_intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, n_routed_experts=8, num_experts_per_tok=2,
                         n_shared_experts=1, first_k_dense_replace=1,
                         max_position_embeddings=128, bos_token_id=None, eos_token_id=None)
    model = Transformer(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):
        ids = _affine_batch(16, 33, seed=step)
        loss = F.cross_entropy(model(ids[:, :-1]).logits.flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    sequences = _affine_batch(held_out, 49, seed=10**6)
    inputs, targets = sequences[:, :-1], sequences[:, 1:]
    with torch.no_grad():
        ref = model(inputs).logits.float()  # [n, 48, V]

    def scores(logits: torch.Tensor) -> dict:
        kl = F.kl_div(logits.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                      reduction="none").sum(-1)  # [n, 48]
        ppl = F.cross_entropy(logits.flatten(0, 1), targets.flatten()).exp().item()
        top1 = (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
        return {"kl": kl.mean().item(), "kl_se": (kl.std() / kl.numel() ** 0.5).item(),
                "ppl": ppl, "top1": top1}

    results = {"fp32": scores(ref)}
    variants = ((8, 128, False, "dsmoe int8"), (4, 32, False, "dsmoe int4 g32 (5 bits/weight)"),
                (4, 128, False, "dsmoe int4 g128 (4.25)"),
                (4, 32, True, "dsmoe int4 g32 symmetric (4.5, Q4_0's size)"))
    for bits, group, symmetric, name in variants:
        quantized = quantize_model(copy.deepcopy(model), bits, group, symmetric=symmetric)
        with torch.no_grad():
            results[name] = scores(quantized(inputs).logits.float())
    if llama:
        hf_dir = root / "quality-hf"
        model.save_pretrained(hf_dir)
        tokenizer = _tokenizer(QUALITY_VOCAB)
        for quant in ("f32", "q8_0", "q4_0"):
            path = root / f"quality-{quant}.gguf"
            gguf.write_gguf(path, hf.read_config(hf_dir), gguf.HFDirectoryState(hf_dir),
                            tokenizer, quant=quant)
            results[f"llama.cpp {quant.upper()}"] = scores(_llama_logits(path, inputs))
        from_q4_0 = load_model(root / "quality-q4_0.gguf", dtype=torch.float32, quant="int4")
        with torch.no_grad():
            results["dsmoe int4 from the Q4_0 GGUF"] = scores(from_q4_0(inputs).logits.float())
    return results


def _llama_logits(path: Path, inputs) -> "torch.Tensor":  # noqa: F821 - lazy import
    import llama_cpp
    import numpy as np
    import torch

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=inputs.shape[1] + 8,
                          n_batch=inputs.shape[1], logits_all=True, n_threads=1, verbose=False)
    rows = []
    for seq in inputs.tolist():
        llm.reset()
        llm.eval(seq)
        rows.append(torch.from_numpy(np.array(llm.scores[:len(seq)], dtype=np.float32)))
    return torch.stack(rows)  # [n, T, V]


def print_quality(results: dict) -> None:
    print(f"\n### Quality vs fp32 (small trained model; load average {_load_average()})\n")
    print("| format | KL(fp32 \\|\\| q) per token (+- s.e.) | top-1 agreement | perplexity |")
    print("|---|---:|---:|---:|")
    base = results["fp32"]["ppl"]
    for name, r in results.items():
        print(f"| {name} | {r['kl']:.2e} (+-{r['kl_se']:.1e}) | {r['top1'] * 100:.1f}% | {r['ppl']:.4f} "
              f"({(r['ppl'] / base - 1) * 100:+.2f}%) |")


# --- model setup -----------------------------------------------------------------------------
def _tokenizer(vocab_size: int):
    from dsmoe.tokenizer import Tokenizer

    text = [Path(__file__).read_text()] * 2
    return Tokenizer.train_bpe(text, vocab_size=min(vocab_size, 1000))


def make_checkpoints(preset: str, root: Path, formats: list[str], llama: bool) -> dict:
    """bf16 HF checkpoint (+ tokenizer), the quantized ones, and GGUFs for llama.cpp."""
    import torch

    from dsmoe import ModelConfig
    from dsmoe.model import Transformer
    from dsmoe.quant import quantize_checkpoint

    info: dict = {}
    config = ModelConfig.preset(preset).replace(torch_dtype="bfloat16", bos_token_id=None,
                                                eos_token_id=None)
    with torch.device("meta"):
        model = Transformer(config).to(torch.bfloat16)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    info["parameters"] = model.num_parameters()
    info["active_parameters"] = model.num_parameters(active=True)
    hf_dir = root / "bf16"
    if not (hf_dir / "config.json").is_file():  # --workdir: reuse what an earlier run made
        model.save_pretrained(hf_dir)
        _tokenizer(config.vocab_size).save(hf_dir)
    del model
    for fmt, bits in (("int8", 8), ("int4", 4)):
        if fmt in formats and not (root / fmt / "config.json").is_file():
            start = time.perf_counter()
            quantize_checkpoint(hf_dir, root / fmt, bits=bits, group_size=128,
                                dtype=torch.bfloat16, tokenizer_dir=hf_dir)
            info[f"quantize_{fmt}_s"] = time.perf_counter() - start
    if llama:
        from dsmoe.checkpoint import gguf, hf
        from dsmoe.tokenizer import Tokenizer

        for quant in ("q8_0", "q4_0"):
            if (root / f"{quant}.gguf").is_file():
                continue
            start = time.perf_counter()
            gguf.write_gguf(root / f"{quant}.gguf", hf.read_config(hf_dir),
                            gguf.HFDirectoryState(hf_dir), Tokenizer.from_file(hf_dir),
                            quant=quant)
            info[f"export_{quant}_s"] = time.perf_counter() - start
    return info


# --- workers (fresh subprocesses) -------------------------------------------------------------
def worker_dsmoe(path: str, fmt: str, prompt: int, decode: int, threads: int,
                 rounds: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from dsmoe.model import Transformer
    from dsmoe.quant import load_model, load_quantized

    baseline = status_kib("VmRSS") * 1024
    start = time.perf_counter()
    if fmt in ("int8", "int4"):
        model = load_quantized(path)
    elif fmt == "int4 from Q4_0":  # llama.cpp's own blocks, loaded without a float detour
        model = load_model(path, dtype=torch.bfloat16, quant="int4")
    else:
        model = Transformer.from_pretrained(path, dtype=torch.float32 if fmt == "fp32"
                                            else torch.bfloat16)
    load_s = time.perf_counter() - start
    load_peak = status_kib("VmHWM") * 1024
    timings = _time_dsmoe(model, prompt, decode, rounds)
    return {**timings, "load_s": load_s, "load_peak_gib": (load_peak - baseline) / GIB,
            "peak_gib": status_kib("VmHWM") * 1024 / GIB, "baseline_gib": baseline / GIB,
            "anon_gib": status_kib("RssAnon") * 1024 / GIB,
            "file_gib": status_kib("RssFile") * 1024 / GIB}


def _time_dsmoe(model, prompt: int, decode: int, rounds: int) -> dict:
    """Best and median of ``rounds`` prefill / decode measurements (best: the least
    disturbed by other processes on a shared machine). Decoding runs through the decoder
    ``generate`` uses (``make_decoder``: on CPU the one-native-call step where the model
    qualifies), greedy picks as ``generate`` makes them (numpy's argmax, as the llama.cpp
    worker's)."""
    import torch

    from dsmoe.decode import make_decoder
    from dsmoe.generate import greedy_tokens

    V = model.config.vocab_size
    ids = torch.randint(0, V, (1, prompt), generator=torch.Generator().manual_seed(0))
    positions, mask = torch.arange(prompt).view(1, prompt), torch.ones_like(ids)
    prefill, decoding = [], []
    with torch.inference_mode():
        model(ids[:, :8])  # warm-up
        for _ in range(rounds):
            start = time.perf_counter()
            model(ids, logits_to_keep=1)
            prefill.append(prompt / (time.perf_counter() - start))
            decoder = make_decoder(model, 1, prompt + decode + 1)
            token = greedy_tokens(decoder.prefill(ids, positions, mask))  # [1]
            start = time.perf_counter()
            for _ in range(decode):
                token = greedy_tokens(decoder.step(token))
            decoding.append(decode / (time.perf_counter() - start))
    return _rates(prefill, decoding)


def _rates(prefill: list[float], decoding: list[float]) -> dict:
    return {"prefill_tok_s": max(prefill), "decode_tok_s": max(decoding),
            "prefill_tok_s_median": sorted(prefill)[len(prefill) // 2],
            "decode_tok_s_median": sorted(decoding)[len(decoding) // 2]}


def worker_llama(path: str, prompt: int, decode: int, threads: int, rounds: int) -> dict:
    import llama_cpp
    import numpy as np

    baseline = status_kib("VmRSS") * 1024
    start = time.perf_counter()
    llm = llama_cpp.Llama(model_path=path, n_ctx=prompt + decode + 16, n_batch=prompt,
                          n_threads=threads, n_threads_batch=threads, verbose=False)
    load_s = time.perf_counter() - start
    load_peak = status_kib("VmHWM") * 1024
    vocab = llm.n_vocab()
    ids = np.random.default_rng(0).integers(0, vocab, prompt).tolist()
    llm.eval(ids[:8])  # warm-up

    def last_logits() -> np.ndarray:  # without logits_all only the last row is computed
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))

    prefill, decoding = [], []
    for _ in range(rounds):
        llm.reset()
        start = time.perf_counter()
        llm.eval(ids)
        prefill.append(prompt / (time.perf_counter() - start))
        token = int(np.argmax(last_logits()))
        start = time.perf_counter()
        for _ in range(decode):
            llm.eval([token])
            token = int(np.argmax(last_logits()))
        decoding.append(decode / (time.perf_counter() - start))
    return {**_rates(prefill, decoding), "load_s": load_s, "load_peak_gib": (load_peak - baseline) / GIB,
            "peak_gib": status_kib("VmHWM") * 1024 / GIB, "baseline_gib": baseline / GIB,
            "anon_gib": status_kib("RssAnon") * 1024 / GIB,
            "file_gib": status_kib("RssFile") * 1024 / GIB}


def _run_worker(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True,
                         text=True)
    if out.returncode != 0:
        reason = (out.stderr.strip().splitlines() or [f"exit code {out.returncode}"])[-1]
        if out.returncode == -9:
            reason = "killed (SIGKILL: out of memory?)"
        return {"error": reason}
    return json.loads(out.stdout.strip().splitlines()[-1])


def print_runs(title: str, runs: dict[str, dict], weights_gib: dict[str, float]) -> None:
    print(f"\n### {title} (load average {_load_average()})\n")
    print("| format | weights GiB | load s | peak RSS GiB | RSS anon + file GiB | "
          "prefill tok/s | decode tok/s (median) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for fmt, r in runs.items():
        if "error" in r:
            print(f"| {fmt} | | error: {r['error']} | | | | |")
            continue
        print(f"| {fmt} | {weights_gib.get(fmt, float('nan')):.2f} | {r['load_s']:.1f} | "
              f"{r['peak_gib']:.2f} | {r['anon_gib']:.2f} + {r['file_gib']:.2f} | "
              f"{r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.2f} "
              f"({r['decode_tok_s_median']:.2f}) |")
    print("\n(tok/s: best of the rounds, median in brackets; peak RSS = VmHWM; file = pages "
          "of memory-mapped weights, evictable; anon = copies in process memory)")


def _dir_gib(path: Path) -> float:
    files = [path] if path.is_file() else list(path.glob("*.safetensors"))
    return sum(f.stat().st_size for f in files) / GIB


# --- the 16B shape ---------------------------------------------------------------------------
def write_random_gguf(preset: str, path: Path) -> float:
    """A random Q4_0 GGUF of ``preset`` written tensor by tensor (its floats never exist):
    random nibbles with fp16 block scales so weights have std ~0.02, token_embd and output
    as Q8_0 (as dsmoe's exporter writes q4_0 files), F32 norms (ones) and routers, and the
    tokenizer metadata llama.cpp needs (a small BPE padded to the vocabulary)."""
    import math

    import gguf
    import numpy as np

    from dsmoe import ModelConfig
    from dsmoe.checkpoint.gguf.writer import write_gguf_tensors

    config = ModelConfig.preset(preset).replace(bos_token_id=None, eos_token_id=None)
    rng = np.random.default_rng(0)
    # block scale d so that d * (stored value) has std 0.02: Q4_0 stores q - 8 with q
    # uniform in 0..15 (std 4.61), Q8_0 a uniform int8 (std 73.9)
    scales = {gguf.GGMLQuantizationType.Q4_0: 0.02 / 4.61,
              gguf.GGMLQuantizationType.Q8_0: 0.02 / 73.9}

    def tensor_data(spec, qtype) -> np.ndarray:
        if qtype not in scales:  # F32 / F16: norms and routers
            if "norm" in spec.gguf_name:
                return np.ones(spec.shape, np.float32)
            value = rng.standard_normal(spec.shape, dtype=np.float32) * 0.02
            return value.astype(np.float16) if qtype == gguf.GGMLQuantizationType.F16 \
                else value
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        rows = math.prod(spec.shape[:-1])
        raw = rng.integers(0, 256, (rows, spec.shape[-1] // block, size), dtype=np.uint8)
        raw[:, :, :2] = np.array([scales[qtype]], np.float16).view(np.uint8)
        return raw.reshape(*spec.shape[:-1], -1)

    start = time.perf_counter()
    write_gguf_tensors(path, config, tensor_data, _tokenizer(config.vocab_size), quant="q4_0")
    return time.perf_counter() - start


def run_big(root: Path, args: argparse.Namespace, llama: bool) -> dict:
    """The 16B shape: a random Q4_0 GGUF (``write_random_gguf``), run by llama.cpp and by
    dsmoe (int4 from its Q4_0 blocks) in fresh processes; deleted afterwards."""
    path = root / "deepseek-moe-16b-q4_0.gguf"
    try:
        write_s = write_random_gguf("deepseek-moe-16b", path)
        size = _dir_gib(path)
        print(f"\nwrote a random deepseek-moe-16b Q4_0 GGUF: {size:.2f} GiB in {write_s:.0f} s")
        worker = [str(path), "", str(args.big_prompt), str(args.big_decode),
                  str(args.threads), str(args.rounds)]
        runs = {}
        if llama:
            runs["llama.cpp q4_0"] = _run_worker(["llama", *worker])
        worker[1] = "int4 from Q4_0"
        runs["int4 from Q4_0"] = _run_worker(["dsmoe", *worker])
        print_runs(f"deepseek-moe-16b shape, Q4_0 GGUF, prompt {args.big_prompt}, decode "
                   f"{args.big_decode}, batch 1", runs, {fmt: size for fmt in runs})
        for fmt, run in runs.items():
            if "peak_gib" in run:
                print(f"{fmt}: peak RSS {run['peak_gib'] * GIB / 1e9:.2f} GB (10^9 bytes)")
        return {"runs": runs, "weights_gib": size, "write_s": write_s}
    finally:
        path.unlink(missing_ok=True)


# --- main --------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="deepseek-moe-2b")
    parser.add_argument("--formats", nargs="+", default=["fp32", "bf16", "int8", "int4"])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--kernel-rows", type=int, nargs="+", default=[1, 4, 12, 16, 64, 256])
    parser.add_argument("--repeat", type=int, default=20, help="kernel timing runs")
    parser.add_argument("--rounds", type=int, default=3,
                        help="prefill/decode measurements per model (best and median)")
    parser.add_argument("--big", action="store_true",
                        help="also the 16B shape: a random Q4_0 GGUF in llama.cpp and dsmoe")
    parser.add_argument("--big-prompt", type=int, default=32)
    parser.add_argument("--big-decode", type=int, default=8)
    parser.add_argument("--skip-kernels", action="store_true")
    parser.add_argument("--skip-model", action="store_true")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--no-llama", action="store_true", help="skip llama.cpp even if present")
    parser.add_argument("--workdir", default=None,
                        help="keep the checkpoints here and reuse them in later runs "
                             "(default: a temporary directory, deleted)")
    parser.add_argument("--json", default=None, help="also write all results here")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        kind, path, fmt, prompt, decode, threads, rounds = args.worker
        if kind == "llama":
            result = worker_llama(path, int(prompt), int(decode), int(threads), int(rounds))
        else:
            result = worker_dsmoe(path, fmt, int(prompt), int(decode), int(threads),
                                  int(rounds))
        print(json.dumps(result))
        return

    import importlib.util

    import torch

    torch.set_num_threads(args.threads)
    results: dict = {"threads": args.threads, "torch": torch.__version__}
    print(f"threads {args.threads}, torch {torch.__version__}, "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}")
    if not args.skip_kernels:
        results["kernels"] = bench_kernels(args.kernel_rows, args.repeat)
        print_kernels(results["kernels"])

    llama = importlib.util.find_spec("llama_cpp") is not None and not args.no_llama
    keep = args.workdir is not None
    root = Path(args.workdir) if keep else Path(tempfile.mkdtemp(prefix="dsmoe-quant-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        if not args.skip_quality:
            results["quality"] = bench_quality(root, llama)
            print_quality(results["quality"])
        if not args.skip_model:
            info = make_checkpoints(args.preset, root, args.formats, llama)
            results["setup"] = info
            print(f"\n{args.preset}: {info['parameters'] / 1e9:.2f}B parameters "
                  f"({info['active_parameters'] / 1e9:.2f}B active); setup {json.dumps(info)}")
            runs, sizes = {}, {}
            for fmt in args.formats:
                path = root / ("bf16" if fmt in ("fp32", "bf16") else fmt)
                sizes[fmt] = _dir_gib(path) * (2 if fmt == "fp32" else 1)
                runs[fmt] = _run_worker(["dsmoe", str(path), fmt, str(args.prompt),
                                         str(args.decode), str(args.threads), str(args.rounds)])
            if llama and "int4" in args.formats:
                path = root / "q4_0.gguf"
                sizes["int4 from Q4_0"] = _dir_gib(path)
                runs["int4 from Q4_0"] = _run_worker(
                    ["dsmoe", str(path), "int4 from Q4_0", str(args.prompt), str(args.decode),
                     str(args.threads), str(args.rounds)])
            if llama:
                for quant in ("q8_0", "q4_0"):
                    path = root / f"{quant}.gguf"
                    sizes[f"llama.cpp {quant}"] = _dir_gib(path)
                    runs[f"llama.cpp {quant}"] = _run_worker(
                        ["llama", str(path), quant, str(args.prompt), str(args.decode),
                         str(args.threads), str(args.rounds)])
            results["model"] = {"runs": runs, "weights_gib": sizes}
            print_runs(f"{args.preset}, prompt {args.prompt}, decode {args.decode}, batch 1",
                       runs, sizes)
            if llama and "int8" in runs and "decode_tok_s" in runs.get("llama.cpp q8_0", {}):
                ratio = runs["int8"]["decode_tok_s"] / runs["llama.cpp q8_0"]["decode_tok_s"]
                print(f"\ndsmoe int8 decode / llama.cpp Q8_0 decode: {ratio:.2f}x")
            for fmt in ("int4", "int4 from Q4_0"):
                if llama and fmt in runs and "decode_tok_s" in runs.get("llama.cpp q4_0", {}):
                    ratio = runs[fmt]["decode_tok_s"] / runs["llama.cpp q4_0"]["decode_tok_s"]
                    print(f"dsmoe {fmt} decode / llama.cpp Q4_0 decode: {ratio:.2f}x")
            if not keep:
                for sub in ("bf16", "int8", "int4"):
                    shutil.rmtree(root / sub, ignore_errors=True)
        if args.big:
            results["16b"] = run_big(root, args, llama)
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
