"""Benchmark: dsmoe on one GPU (the MoE layer, a training step, decoding), in one run.

Sections (each prints a markdown table and appends it to ``--out``/gpu_tables.md):
1. ``machine``: GPU, torch, the measured bf16 matmul rate (8192^3) and device copy
   bandwidth: the ceilings the other sections are read against.
2. ``layer``: the MoE layer at the deepseek-moe-16b shape (D 2048, 64 routed experts of
   width 1408, top-6, 2 shared), bf16, 16,384 tokens, forward and forward+backward, against
   the dense-equivalent SwiGLU (width (6 + 2) x 1408: the same active FLOPs) and
   transformers' ``DeepseekV2Moe`` with its ``grouped_mm`` experts. TFLOP/s count the
   active FLOPs (router + routed + shared GEMMs; 3x forward for forward+backward).
   ``torch._dynamo.explain`` reports dsmoe's graph breaks in the MoE layer.
3. ``train``: a 16B-shaped model with 4 layers (the first dense, as in the 16B),
   sequence 4096, bf16 autocast with fp32 master weights and fused AdamW, eager and with
   each block compiled, each with and without activation checkpointing: tokens/s and MFU
   = active FLOPs x tokens/s / peak (the datasheet's 989 TFLOP/s dense bf16, and the
   measured rate of section 1).
4. ``decode``: the same model in bf16, batch 1 and 32, ``--new-tokens`` greedy tokens after
   a 64-token prompt: dsmoe eager, dsmoe with the CUDA-graph step, dsmoe with the compiled
   CUDA-graph step, and transformers' Llama + DeepseekV2Moe composite (SDPA attention,
   grouped_mm experts, its own cache) on the same weights. Decode time = time(N new tokens)
   - time(1 new token), median of ``--repeats``. The bandwidth bound is the active bytes of
   one batch-1 step (every weight but the routed experts, plus K/E of those; the embedding
   table excluded) over the measured copy bandwidth.

Usage:  python benchmarks/gpu.py --out DIR            (about 4-6 minutes on an H200)
        python benchmarks/gpu.py --quick --device cpu (tiny shapes: checks the script runs)

Shapes: T tokens, D hidden, E experts, K picks, F expert width, B batch, N new tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dsmoe import ModelConfig
from dsmoe.generate import generate
from dsmoe.mlp import SwiGLUMLP
from dsmoe.model import Transformer
from dsmoe.moe.layer import MoELayer
from dsmoe.train.activation_checkpointing import apply_activation_checkpointing

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import build_reference, reference_moe_config  # noqa: E402
from train import active_flops_per_token, dense_equivalent  # noqa: E402

DATASHEET_BF16_TFLOPS = 989.0  # H100/H200 SXM dense bf16, the vendor's datasheet


# --- timing ------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 2
            ) -> float:
    """Median wall milliseconds of ``fn`` (synchronised before and after each call)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def table(title: str, header: list[str], rows: list[list[str]], out: Path | None) -> None:
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    if out is not None:
        with open(out / "gpu_tables.md", "a") as f:
            f.write(text + "\n")


# --- 1. machine ------------------------------------------------------------------------------
def machine(device: torch.device, quick: bool, out: Path | None) -> tuple[float, float]:
    """(measured bf16 TFLOP/s, copy GB/s counting bytes read + written)."""
    n = 1024 if quick else 8192
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device,
                                                                      dtype=dtype)
    ms = time_ms(lambda: a @ b, device, 10)
    tflops = 2 * n**3 / ms / 1e9
    src = torch.empty(2**28 if not quick else 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), device, 10)
    gbs = 2 * src.numel() / copy_ms / 1e6
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    table("machine", ["device", "torch", "date", f"matmul TFLOP/s ({dtype}, {n}^3)",
                      "copy GB/s (read+write)"],
          [[name, torch.__version__, datetime.date.today().isoformat(), f"{tflops:.0f}",
            f"{gbs:,.0f}"]], out)
    return tflops, gbs


# --- 2. the MoE layer ------------------------------------------------------------------------
def layer_config(quick: bool) -> ModelConfig:
    if quick:
        return ModelConfig.preset("tiny").replace(torch_dtype="bfloat16")
    return ModelConfig.preset("deepseek-moe-16b").replace(num_hidden_layers=4,
                                                          torch_dtype="bfloat16")


def _hf_moe(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> nn.Module:
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe

    impl = "grouped_mm" if device.type == "cuda" else "eager"
    module = DeepseekV2Moe(reference_moe_config(cfg, impl)).to(device, dtype)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(std=0.02)
    return module


def graph_breaks(module: nn.Module, x: torch.Tensor) -> str:
    try:
        explained = torch._dynamo.explain(module)(x)
        return f"{explained.graph_count} graphs, {explained.graph_break_count} breaks"
    except Exception as exc:  # noqa: BLE001 - a report, not a test
        return f"explain failed: {type(exc).__name__}"
    finally:
        torch._dynamo.reset()


def layer_section(device: torch.device, quick: bool, repeats: int, out: Path | None) -> None:
    cfg = layer_config(quick)
    dtype = torch.bfloat16
    T = 512 if quick else 16384
    D, F_, E, K = cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts, \
        cfg.num_experts_per_tok
    S = cfg.n_shared_experts or 0
    fwd_flops = T * (2 * 3 * D * F_ * (K + S) + 2 * D * E)
    x = torch.randn(1, T, D, device=device, dtype=dtype)
    grad = torch.randn_like(x)
    torch.manual_seed(0)
    cases: dict[str, nn.Module] = {
        "dsmoe MoELayer": MoELayer(cfg).to(device, dtype).train(),
        "dense-equivalent SwiGLU": SwiGLUMLP(D, (K + S) * F_, cfg.hidden_act).to(device, dtype),
    }
    if device.type == "cuda":
        torch._dynamo.reset()
        cases["dsmoe MoELayer, torch.compile"] = torch.compile(cases["dsmoe MoELayer"])
    with contextlib.suppress(ImportError):
        cases["transformers DeepseekV2Moe (grouped_mm)"] = _hf_moe(cfg, device, dtype).train()

    def run(module: nn.Module, backward: bool) -> Callable[[], None]:
        def step() -> None:
            xi = x.detach().requires_grad_(backward)
            y = module(xi)
            y = y.hidden_states if hasattr(y, "hidden_states") else y
            if backward:
                y.backward(grad)
                module.zero_grad(set_to_none=True)
        return step

    rows, base = [], {}
    for name, module in cases.items():
        for backward in (False, True):
            ms = time_ms(run(module, backward), device, repeats)
            flops = fwd_flops * (3 if backward else 1)
            key = "fwd+bwd" if backward else "fwd"
            base.setdefault(key, {})[name] = ms
            rows.append([name, key, f"{ms:.2f}", f"{flops / ms / 1e9:.0f}"])
    for key in ("fwd", "fwd+bwd"):
        for ours in [n for n in base[key] if n.startswith("dsmoe")]:
            for name, ms in base[key].items():
                if not name.startswith("dsmoe"):
                    rows.append([f"{ours} / {name}", key,
                                 f"**{base[key][ours] / ms:.2f}x** time", ""])
    breaks = graph_breaks(cases["dsmoe MoELayer"], x) if device.type == "cuda" else "n/a"
    table(f"MoE layer, {T} tokens, bf16 (D={D}, E={E}, K={K}, F={F_}, shared={S}); "
          f"dynamo on dsmoe's layer: {breaks}", ["module", "pass", "ms", "TFLOP/s"], rows, out)
    del cases


def profile_section(device: torch.device, quick: bool, out: Path | None) -> None:
    """Where the MoE layer's forward+backward time goes: the top CUDA kernels (3 steps)."""
    from torch.profiler import ProfilerActivity, profile

    cfg = layer_config(quick)
    T = 512 if quick else 16384
    layer = MoELayer(cfg).to(device, torch.bfloat16).train()
    x = torch.randn(1, T, cfg.hidden_size, device=device, dtype=torch.bfloat16)
    grad = torch.randn_like(x)

    def step() -> None:
        xi = x.detach().requires_grad_(True)
        layer(xi).hidden_states.backward(grad)
        layer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    _sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            step()
        _sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages()  # kernels only: an aten op's time is its kernels'
              if device.type != "cuda" or not e.key.startswith(("aten::", "cuda", "cudnn"))]
    events.sort(key=lambda e: getattr(e, key, 0), reverse=True)
    total = sum(getattr(e, key, 0) for e in events) or 1
    rows = [[e.key[:70], f"{getattr(e, key, 0) / 3 / 1e3:.3f}",
             f"{getattr(e, key, 0) / total:.1%}", str(e.count // 3)] for e in events[:22]]
    table(f"profile: MoE layer forward+backward, {T} tokens, bf16 (per step)",
          ["kernel / op", "ms", "share", "calls"], rows, out)


# --- model building ----------------------------------------------------------------------------
@torch.no_grad()
def build_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> Transformer:
    """Random weights drawn on the device (uniform with DeepSeek's std; routers std 1 so
    no token sits near a top-k tie)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device=device)
    model.init_buffers()
    bound = math.sqrt(3.0) * cfg.initializer_range
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif name.endswith("mlp.gate.weight"):
            p.uniform_(-math.sqrt(3.0), math.sqrt(3.0))
        else:
            p.uniform_(-bound, bound)
    return model.to(dtype)


# --- 3. training -------------------------------------------------------------------------------
def train_section(device: torch.device, quick: bool, repeats: int, peak: float,
                  compile_blocks: bool, out: Path | None) -> None:
    cfg = layer_config(quick).replace(torch_dtype="float32")
    B, S = (2, 64) if quick else (4, 4096)
    rows = []
    variants = ["eager", "activation checkpointing"]
    if compile_blocks:
        variants += ["compiled blocks", "compiled blocks + activation checkpointing"]
    for variant in variants:
        model = build_model(cfg, device, torch.float32).train()
        if "activation checkpointing" in variant:
            apply_activation_checkpointing(model)
        if variant.startswith("compiled"):
            torch._dynamo.reset()  # entries from other sections would count as recompiles
            for block in model.layers:
                block.compile()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5,
                                      fused=device.type == "cuda")
        ids = torch.randint(0, cfg.vocab_size, (B, S + 1), device=device)

        def step() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                result = model(ids[:, :-1])
            loss = F.cross_entropy(result.logits.float().flatten(0, 1), ids[:, 1:].flatten())
            (loss + result.aux_loss).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            model.update_router_biases()

        try:
            ms = time_ms(step, device, repeats, warmup=3)
        except Exception as exc:  # noqa: BLE001 - report this variant, measure the next
            print(f"training variant {variant} failed: {type(exc).__name__}: {exc}", flush=True)
            del model, optimizer
            continue
        tps = B * S / ms * 1e3
        flops = active_flops_per_token(model, S)
        mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        rows.append([variant, f"{B}x{S}", f"{ms:.0f}", f"{tps:,.0f}",
                     f"{flops * tps / DATASHEET_BF16_TFLOPS / 1e12:.1%}",
                     f"{flops * tps / peak / 1e12:.1%}", f"{mem:.1f}"])
        del model, optimizer
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    table(f"training step, {cfg.num_hidden_layers} layers of the 16B shape, bf16 autocast "
          f"(fp32 master weights, fused AdamW), vocab {cfg.vocab_size}",
          ["variant", "batch x seq", "ms/step", "tokens/s",
           f"MFU ({DATASHEET_BF16_TFLOPS:.0f} TF datasheet)", f"MFU ({peak:.0f} TF measured)",
           "peak GiB"], rows, out)


# --- 4. decoding --------------------------------------------------------------------------------
def active_bytes_per_token(model: Transformer) -> int:
    total = 0
    for name, p in model.named_parameters():
        if name.startswith("embed_tokens"):
            continue
        share = 1.0
        if ".mlp.experts." in name:
            cfg = model.config
            share = cfg.num_experts_per_tok / cfg.n_routed_experts
        total += int(p.numel() * p.element_size() * share)
    return total


def decode_section(device: torch.device, quick: bool, repeats: int, copy_gbs: float,
                   batches: list[int], new_tokens: int, out: Path | None) -> None:
    cfg = layer_config(quick).replace(max_position_embeddings=4096)
    model = build_model(cfg, device, torch.bfloat16).eval()
    impls: dict[str, Callable[[torch.Tensor, int], object]] = {
        "dsmoe eager": lambda ids, n: generate(model, ids, n, cuda_graph=False)}
    if device.type == "cuda":
        impls["dsmoe CUDA graph"] = lambda ids, n: generate(model, ids, n, cuda_graph=True)
        impls["dsmoe compiled + graph"] = lambda ids, n: generate(model, ids, n, cuda_graph=True,
                                                                  compile=True)
    try:
        ref = build_reference(model, "grouped_mm" if device.type == "cuda" else "eager")
        ref.model.rotary_emb.to(device)
        ref.config._attn_implementation = "sdpa"
        from transformers import GenerationConfig

        def hf(ids: torch.Tensor, n: int) -> object:
            gen_cfg = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                       eos_token_id=None, pad_token_id=0, bos_token_id=None)
            with torch.inference_mode():
                return ref.generate(ids, attention_mask=torch.ones_like(ids),
                                    generation_config=gen_cfg)
        impls["transformers composite"] = hf
    except (ImportError, ValueError, RuntimeError) as exc:
        print(f"transformers composite skipped: {exc}")
    bound = copy_gbs * 1e9 / active_bytes_per_token(model)
    rows = []
    for B in batches:
        ids = torch.randint(0, cfg.vocab_size, (B, 64), device=device)
        speeds = {}
        for name, fn in impls.items():
            try:
                start = time.perf_counter()
                fn(ids, new_tokens)  # warm-up: captures, compiles, autotunes
                print(f"[decode {name} batch {B}: warm-up {time.perf_counter() - start:.1f} s]",
                      flush=True)
                first = time_ms(lambda: fn(ids, 1), device, repeats, warmup=1)
                full = time_ms(lambda: fn(ids, new_tokens), device, repeats, warmup=1)
                speeds[name] = B * (new_tokens - 1) / (full - first) * 1e3
            except Exception as exc:  # noqa: BLE001 - one failed implementation, not all
                print(f"decode {name} batch {B} failed: {type(exc).__name__}: {exc}",
                      flush=True)
        hf_speed = speeds.get("transformers composite")
        for name, tps in speeds.items():
            ratio = f"{tps / hf_speed:.2f}x" if hf_speed else ""
            rows.append([str(B), name, f"{tps:,.0f}", ratio,
                         f"{tps / bound:.0%}" if B == 1 else ""])
    table(f"decode tokens/s, {cfg.num_hidden_layers} layers of the 16B shape, bf16, "
          f"{new_tokens} new tokens after 64; batch-1 bandwidth bound "
          f"{bound:,.0f} tok/s ({active_bytes_per_token(model) / 1e9:.2f} GB per token at "
          f"{copy_gbs:,.0f} GB/s)", ["batch", "implementation", "tokens/s", "vs transformers",
                                     "of bound"], rows, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (a smoke test)")
    parser.add_argument("--out", type=Path, default=None, help="folder for gpu_tables.md")
    parser.add_argument("--sections", nargs="*", default=["layer", "decode", "train", "profile"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 32])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the compiled training variant")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device (use --device cpu --quick to check the script)",
              file=sys.stderr)
        return 2
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    peak, copy_gbs = machine(device, args.quick, args.out)
    sections = {
        "layer": lambda: layer_section(device, args.quick, args.repeats, args.out),
        "profile": lambda: profile_section(device, args.quick, args.out),
        "train": lambda: train_section(device, args.quick, args.repeats, peak,
                                       not args.no_compile, args.out),
        "decode": lambda: decode_section(device, args.quick, args.repeats, copy_gbs,
                                         args.batches, args.new_tokens, args.out),
    }
    for name in args.sections:
        start = time.perf_counter()
        try:
            sections[name]()
        except Exception as exc:  # noqa: BLE001 - report and go on to the next section
            import traceback
            traceback.print_exc()
            print(f"section {name} failed: {type(exc).__name__}: {exc}", flush=True)
        print(f"[{name}: {time.perf_counter() - start:.0f} s]", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
