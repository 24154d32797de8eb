"""Benchmark: dsmoe generation against transformers' Llama + DeepseekV2Moe composite.

What is measured, for each dtype and batch size, in one run on the same random weights:
- ``dsmoe``: ``dsmoe.generate`` (one prefill into a preallocated ``KVCache``, then one
  forward per new token, greedy).
- ``transformers``: ``LlamaForCausalLM`` whose MLPs at the MoE layers are transformers'
  ``DeepseekV2Moe`` (V1 routing: softmax, greedy top-k, no renormalisation, scaling 1), the
  composite the parity tests check dsmoe against. Eager attention, eager experts (the
  per-expert loop; ``--hf-experts grouped_mm`` switches to transformers' grouped kernel),
  ``model.generate(do_sample=False)`` with its own ``DynamicCache``.
Both models hold the *same tensors*: the reference is built on the meta device and its
parameters are assigned dsmoe's (no copy), so one set of weights fits in memory and both
compute on identical numbers.

Metrics (median over ``--repeats`` timed runs; the implementations alternate, so
background load hits them alike):
- ``TTFT``: time from the call to the first new token (prefill + first sampling).
- ``decode tok/s``: new tokens after the first, over all rows, per second:
  B * (N - 1) / (time of token N - time of token 1), read from each library's streamer.
Sanity check before timing: both produce the same greedy tokens for a short run. The router
weights are drawn with std 1 (as in the parity tests) so that no token sits near a top-k
tie, where a rounding difference between the two attention kernels could legitimately pick
another expert; bf16 mismatches are reported, fp32 mismatches abort the run.

Usage:
  python benchmarks/generate.py                  # deepseek-moe-2b shape, ~5-10 min on 2 cores
  python benchmarks/generate.py --quick          # tiny preset, seconds
  python benchmarks/generate.py --layers 4 --batch 1 --dtype bfloat16 --new-tokens 16

Shapes: B batch, P prompt length, N new tokens, D hidden, V vocab.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from dsmoe import ModelConfig
from dsmoe.generate import generate
from dsmoe.model import Transformer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DSMOE, HF = "dsmoe", "transformers"


# --- models ---------------------------------------------------------------------------------
@torch.no_grad()
def build_dsmoe(cfg: ModelConfig, seed: int) -> Transformer:
    """A random dsmoe model, built on meta and filled once.

    ``uniform_`` with DeepSeek's std (sqrt(3) * std bounds) instead of ``normal_``: the same
    scale, several times faster to draw for two billion parameters. Routers get std 1 (see
    the module docstring); norms are ones.
    """
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device="cpu")
    model.init_buffers()
    gen = torch.Generator().manual_seed(seed)
    bound = math.sqrt(3.0) * cfg.initializer_range
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif name.endswith("mlp.gate.weight"):
            p.uniform_(-math.sqrt(3.0), math.sqrt(3.0), generator=gen)
        else:
            p.uniform_(-bound, bound, generator=gen)
    return model.eval()


def build_reference(model: Transformer, experts_impl: str) -> nn.Module:
    """transformers' Llama + DeepseekV2Moe holding ``model``'s parameter tensors (shared)."""
    from transformers import DeepseekV2Config, LlamaConfig, LlamaForCausalLM
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = model.config
    if cfg.rope_scaling or cfg.norm_topk_prob or cfg.topk_method != "greedy" \
            or cfg.scoring_func != "softmax" or cfg.routed_scaling_factor != 1.0:
        raise ValueError("the reference composite covers plain RoPE and V1 routing only")
    dtype = model.embed_tokens.weight.dtype
    llama = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
        hidden_act=cfg.hidden_act, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_word_embeddings,
        attention_bias=cfg.attention_bias, mlp_bias=False, bos_token_id=None,
        eos_token_id=None, pad_token_id=None,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)})
    llama._attn_implementation = "eager"
    moe_cfg = DeepseekV2Config(
        hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
        moe_intermediate_size=cfg.moe_intermediate_size, n_routed_experts=cfg.n_routed_experts,
        n_shared_experts=cfg.n_shared_experts, num_experts_per_tok=cfg.num_experts_per_tok,
        topk_method="greedy", routed_scaling_factor=1.0, norm_topk_prob=False,
        hidden_act=cfg.hidden_act)
    moe_cfg._experts_implementation = experts_impl
    with torch.device("meta"):
        ref = LlamaForCausalLM(llama)
        for i in cfg.moe_layer_indices:
            ref.model.layers[i].mlp = DeepseekV2Moe(moe_cfg)
    state = {(k if k.startswith("lm_head.") else f"model.{k}"): v
             for k, v in model.state_dict().items()}
    result = ref.load_state_dict(state, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(f"reference weights do not line up: missing {result.missing_keys[:4]}, "
                           f"unexpected {result.unexpected_keys[:4]}")
    if cfg.tie_word_embeddings:
        ref.tie_weights()
    ref.model.rotary_emb = LlamaRotaryEmbedding(config=llama)  # non-persistent buffers
    return ref.to(dtype).eval()


# --- timing ---------------------------------------------------------------------------------
@dataclass
class Run:
    tokens: torch.Tensor  # [B, N] new ids
    ttft: float  # seconds to the first new token
    decode_tps: float  # (N - 1) * B / seconds from token 1 to token N


class _Clock:
    """Streamer for both libraries: remembers when each step's tokens arrive."""

    def __init__(self, skip_first: bool) -> None:
        self.start = time.perf_counter()
        self.stamps: list[float] = []
        self.steps: list[torch.Tensor] = []
        self._skip = skip_first  # transformers first hands over the prompt

    def put(self, value: torch.Tensor) -> None:
        if self._skip:
            self._skip = False
            return
        self.stamps.append(time.perf_counter())
        self.steps.append(value.reshape(-1).clone())

    def __call__(self, token: torch.Tensor) -> bool:  # dsmoe's streamer protocol
        self.put(token)
        return False

    def end(self) -> None:
        pass

    def result(self, batch: int) -> Run:
        n = len(self.stamps)
        tokens = torch.stack(self.steps, dim=1)  # [B, N]
        span = self.stamps[-1] - self.stamps[0]
        tps = batch * (n - 1) / span if n > 1 and span > 0 else float("nan")
        return Run(tokens, self.stamps[0] - self.start, tps)


def run_dsmoe(model: Transformer, ids: torch.Tensor, n: int) -> Run:
    clock = _Clock(skip_first=False)
    generate(model, ids, n, streamer=clock)
    return clock.result(ids.shape[0])


def run_reference(ref: nn.Module, ids: torch.Tensor, n: int) -> Run:
    from transformers import GenerationConfig

    gen_cfg = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False,
                               eos_token_id=None, pad_token_id=0, bos_token_id=None)
    clock = _Clock(skip_first=True)
    with torch.inference_mode():
        ref.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen_cfg,
                     streamer=clock)
    return clock.result(ids.shape[0])


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers logs generation-config advice on every call; keep the table readable."""
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@dataclass
class Row:
    dtype: str
    batch: int
    impl: str
    ttft: float
    decode_tps: float


def measure(runners: dict[str, Callable[[int], Run]], new_tokens: int, repeats: int
            ) -> dict[str, tuple[float, float]]:
    """A short warm-up run each, then ``repeats`` alternating rounds of ``new_tokens``:
    impl -> (median TTFT, median decode tok/s)."""
    for fn in runners.values():
        fn(2)
    ttft: dict[str, list[float]] = {k: [] for k in runners}
    tps: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(repeats):
        for name, fn in runners.items():
            r = fn(new_tokens)
            ttft[name].append(r.ttft)
            tps[name].append(r.decode_tps)
    return {k: (statistics.median(ttft[k]), statistics.median(tps[k])) for k in runners}


def check_same_tokens(model: Transformer, ref: nn.Module, ids: torch.Tensor, n: int,
                      dtype: str) -> str:
    """Greedy tokens of both for a short run; fp32 must agree exactly."""
    ours, theirs = run_dsmoe(model, ids, n).tokens, run_reference(ref, ids, n).tokens
    same = int((ours == theirs).all(dim=0).long().cumprod(0).sum())  # agreeing leading steps
    if same == n:
        return f"{dtype}: greedy tokens identical ({ids.shape[0]} x {n})"
    msg = f"{dtype}: greedy tokens agree for the first {same} of {n} steps"
    if dtype == "float32":
        raise RuntimeError(f"{msg}: dsmoe {ours.tolist()} vs transformers {theirs.tolist()}")
    return msg + " (bf16 rounding differs between the attention kernels)"


def run(cfg: ModelConfig, dtypes: list[str], batches: list[int], prompt_len: int,
        new_tokens: int, repeats: int, experts_impl: str, seed: int) -> list[Row]:
    rows: list[Row] = []
    t0 = time.perf_counter()
    model = build_dsmoe(cfg, seed)
    print(f"# built {model.num_parameters() / 1e9:.2f}B parameters in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    gen = torch.Generator().manual_seed(seed + 1)
    for dtype in dtypes:
        model = model.to(DTYPES[dtype])
        gc.collect()
        ref = build_reference(model, experts_impl)
        with _quiet_transformers():
            check_ids = torch.randint(0, cfg.vocab_size, (2, prompt_len), generator=gen)
            print(f"# {check_same_tokens(model, ref, check_ids, 8, dtype)}", flush=True)
            for batch in batches:
                ids = torch.randint(0, cfg.vocab_size, (batch, prompt_len), generator=gen)
                results = measure({DSMOE: lambda n: run_dsmoe(model, ids, n),
                                   HF: lambda n: run_reference(ref, ids, n)},
                                  new_tokens, repeats)
                for impl, (ttft, tps) in results.items():
                    rows.append(Row(dtype, batch, impl, ttft, tps))
                ours, theirs = results[DSMOE], results[HF]
                print(f"# {dtype} batch {batch}: dsmoe {ours[1]:.2f} tok/s (TTFT {ours[0]:.3f} s), "
                      f"transformers {theirs[1]:.2f} tok/s (TTFT {theirs[0]:.3f} s); "
                      f"{time.perf_counter() - t0:.0f} s elapsed, load {os.getloadavg()[0]:.2f}",
                      flush=True)
        del ref
        gc.collect()
    return rows


def format_table(rows: list[Row], markdown: bool) -> str:
    base = {(r.dtype, r.batch): r for r in rows if r.impl == HF}
    header = ["dtype", "batch", "impl", "TTFT (s)", "decode tok/s", "TTFT speed-up",
              "tok/s ratio"]
    lines = []
    for r in rows:
        b = base[(r.dtype, r.batch)]
        lines.append([r.dtype, str(r.batch), r.impl, f"{r.ttft:.3f}", f"{r.decode_tps:.2f}",
                      f"{b.ttft / r.ttft:.2f}x", f"{r.decode_tps / b.decode_tps:.2f}x"])
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(line) + " |" for line in lines]
        return "\n".join(out)
    widths = [max(len(x) for x in col) for col in zip(header, *lines)]
    return "\n".join("  ".join(x.rjust(w) for x, w in zip(line, widths))
                     for line in [header, *lines])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="deepseek-moe-2b")
    parser.add_argument("--layers", type=int, default=None,
                        help="override num_hidden_layers (default: the preset's)")
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES),
                        default=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs after warm-up")
    parser.add_argument("--hf-experts", default="eager", choices=["eager", "grouped_mm"],
                        help="transformers' experts implementation")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads (default: every core)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="tiny preset, short runs: a smoke test in seconds")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = parser.parse_args(argv)
    if args.new_tokens < 2:
        parser.error("--new-tokens must be >= 2 (decode speed needs two tokens)")
    preset = "tiny" if args.quick else args.preset
    cfg = ModelConfig.preset(preset).replace(eos_token_id=None, bos_token_id=None)
    if args.layers is not None:
        cfg = cfg.replace(num_hidden_layers=args.layers)
    if args.quick:
        args.new_tokens, args.prompt_len, args.repeats = 8, 16, 1
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    print(f"# {preset}, {cfg.num_hidden_layers} layers, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, {args.repeats} repeats, {torch.get_num_threads()} "
          f"threads, torch {torch.__version__}, load {load:.2f}", flush=True)
    rows = run(cfg, args.dtype, args.batch, args.prompt_len, args.new_tokens, args.repeats,
               args.hf_experts, args.seed)
    print(f"# load average at the end: {os.getloadavg()[0]:.2f}")
    print(format_table(rows, args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
