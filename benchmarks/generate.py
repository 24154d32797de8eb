"""Benchmark: dsmoe generation against transformers (Llama + DeepseekV2Moe composite, or
its native DeepSeek-V2/V3 model for MLA presets).

What is measured, for each dtype and batch size, in one run on the same random weights:
- ``dsmoe``: ``dsmoe.generate`` (one prefill into a preallocated ``KVCache``, then one
  forward per new token, greedy).
- ``dsmoe input-major`` (fp32, V1 presets: the MLA rows are about the attention form):
  the same after ``model.set_matmul_layout("input_major")``
  (weights stored transposed; values, shapes and checkpoints unchanged).
- ``transformers``: ``LlamaForCausalLM`` whose MLPs at the MoE layers are transformers'
  ``DeepseekV2Moe`` (V1 routing: softmax, greedy top-k, no renormalisation, scaling 1), the
  composite the parity tests check dsmoe against. Eager attention, eager experts (the
  per-expert loop; ``--hf-experts grouped_mm`` switches to transformers' grouped kernel),
  ``model.generate(do_sample=False)`` with its own ``DynamicCache``.
  For an MLA preset (``deepseek-v2-lite``, ``deepseek-v2``, ``deepseek-v3``, ``tiny-v2``)
  the reference is transformers' own ``DeepseekV2ForCausalLM`` / ``DeepseekV3ForCausalLM``
  built from the same HF config (eager attention), and dsmoe decodes from its latent cache
  in the absorbed form.
Both models hold the *same Parameter objects*: the reference is built on the meta device
and dsmoe's parameters are put into it (no copy), so one set of weights fits in memory and
both compute on identical numbers. Each run first sets the layout it runs with (untimed):
transformers and ``dsmoe`` always see the default output-major weights.

Metrics, from ``--repeats`` timed runs per implementation; the implementations alternate,
so background load hits them alike. The table's ratios compare the *best* runs: load on
a shared machine only ever adds time, so the best run is the steadiest estimate of what the
code does; the median shows how much the load moved things.
- ``TTFT``: time from the call to the first new token (prefill + first sampling).
- ``decode tok/s``: new tokens after the first, over all rows, per second:
  B * (N - 1) / (time of token N - time of token 1), read from each library's streamer.
- ``KV bytes/token``: what each cache object holds per token of one row after a prefill
  (all layers, and per layer): dsmoe's preallocated ``KVCache`` / ``LatentCache`` and
  transformers' ``DynamicCache``, summed over their tensors.
- The bandwidth bound, per (dtype, batch), so that a target such as "3x transformers" can be
  checked against what the memory allows (a decode step must read every weight it uses):
  - bytes per step, counted from the run: the experts each MoE layer was sent to (the union
    of the B tokens' top-k, from a hook on dsmoe's MoE layers during one untimed run of the
    same prompts, mean over the decode steps) priced by ``dsmoe.params.decode_step_bytes``
    with attention, routers, shared experts, dense FFNs, norms, ``lm_head`` and B embedding
    rows; plus the KV cache attention reads (dsmoe's cache bytes per token x B x the mean
    context P + N/2 of the timed steps);
  - the bandwidth drawn on the same threads just before and right after the timing, over
    ``--bandwidth-mib`` of fp32 (1 GiB, far beyond the L3), best of 3 + 3: the ceiling is
    the faster of a torch ``sum`` and ``dsmoe.native.stream_read`` (64-byte loads into
    independent sums, the threads reading contiguous slices: the native kernels drew up to
    113% of the ``sum`` rate alone, so it was no ceiling); a ``copy_`` for reference (bytes
    read + written);
  - the bound B x GB/s ceiling / bytes per step tok/s, its ratio to transformers' measured
    speed (the best ratio any implementation could reach against that baseline: "3x" is
    out of reach where it is below 3), 3x transformers as a share of the bound, and the
    GB/s each library streamed (dsmoe's also as a share of the ceiling).
Sanity check before timing: both produce the same greedy tokens for a short run. The router
weights are drawn with std 1 (as in the parity tests) so that no token sits near a top-k
tie, where a rounding difference between the two attention kernels could legitimately pick
another expert; bf16 mismatches are reported, fp32 mismatches abort the run.

Reading the numbers (2-core AMD EPYC VM, torch 2.13 with MKL; see the README table):
- A decode step streams every active weight once (~1.6 GB per token at batch 1 in fp32; the
  bound tables count it), so its speed is how fast the weights come from memory.
  transformers multiplies with torch's BLAS kernels, which read fp32 weights at ~13-14 GB/s
  and bf16 at ~10 GB/s on one core; dsmoe sends products of at most
  ``dsmoe.linear.DECODE_MAX_ROWS`` rows to its native kernels (``dsmoe.native``), which read
  both at ~20 GB/s, about what one core can draw.
  That is the whole gap at batch 1 on one thread: ~1.6x in fp32, ~2.2x in bf16; fp32
  cannot reach 2x there against a baseline that already streams at half the memory's
  speed. With two threads the native kernels split rows between the cores (~33 GB/s),
  torch's fp32 GEMV does not.
- At batch 8 the attention projections and ``lm_head`` see 8 rows and stay on torch's
  GEMMs in both libraries (8-row products are compute-bound on this CPU); the experts,
  1-2 rows each, go native in dsmoe, all of a layer's experts in one call per matrix.
- ``dsmoe input-major`` (``set_matmul_layout``) feeds torch's fp32 kernels a layout they
  stream faster (~1.3x); with the native kernels the default layout is faster still.
- With other jobs on the machine and two threads, every OpenMP parallel region can wait
  milliseconds for a descheduled worker; transformers' eager expert loop issues several
  such ops per routed expert. ``--threads 1`` (the README's table) shows the
  contention-free picture.

Usage:
  python benchmarks/generate.py                  # deepseek-moe-2b shape, 5-20 min on 2 cores
  python benchmarks/generate.py --quick          # tiny preset, seconds
  python benchmarks/generate.py --preset deepseek-v2-lite --layers 3 --markdown  # MLA, ~40 min
                                                 # under load (the README's table)
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
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from dsmoe import ModelConfig, native
from dsmoe.config import MLA_MODEL_TYPES
from dsmoe.generate import generate
from dsmoe.model import Transformer
from dsmoe.params import DecodeStepBytes, decode_step_bytes

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
WEIGHT_FORMAT = {"float32": "fp32", "bfloat16": "bf16"}  # dsmoe.params.WEIGHT_FORMATS keys
DSMOE, DSMOE_IM, HF = "dsmoe", "dsmoe input-major", "transformers"
# dtypes that also get a row with Transformer.set_matmul_layout("input_major"): it speeds up
# fp32 GEMVs on CPU; bf16 kernels run slower on transposed weights.
INPUT_MAJOR_DTYPES = ("float32",)


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


def reference_moe_config(cfg: ModelConfig, experts_impl: str):  # noqa: ANN201
    """transformers' ``DeepseekV2Config`` for a ``DeepseekV2Moe`` with ``cfg``'s sizes and
    V1 routing (softmax, greedy top-k, no renormalisation, scaling 1)."""
    from transformers import DeepseekV2Config

    moe_cfg = DeepseekV2Config(
        hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
        moe_intermediate_size=cfg.moe_intermediate_size, n_routed_experts=cfg.n_routed_experts,
        n_shared_experts=cfg.n_shared_experts, num_experts_per_tok=cfg.num_experts_per_tok,
        topk_method="greedy", routed_scaling_factor=1.0, norm_topk_prob=False,
        hidden_act=cfg.hidden_act)
    moe_cfg._experts_implementation = experts_impl
    return moe_cfg


def build_reference(model: Transformer, experts_impl: str) -> nn.Module:
    """transformers' model holding ``model``'s parameter tensors (shared): the native
    ``DeepseekV2ForCausalLM`` / ``DeepseekV3ForCausalLM`` for MLA configs, else the Llama +
    DeepseekV2Moe composite."""
    if model.config.model_type in MLA_MODEL_TYPES:
        return build_native_reference(model, experts_impl)
    return build_composite_reference(model, experts_impl)


def build_composite_reference(model: Transformer, experts_impl: str) -> nn.Module:
    """transformers' Llama + DeepseekV2Moe holding ``model``'s parameter tensors (shared)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = model.config
    if cfg.rope_scaling or cfg.norm_topk_prob or cfg.topk_method != "greedy" \
            or cfg.scoring_func != "softmax" or cfg.routed_scaling_factor != 1.0:
        raise ValueError("the reference composite covers plain RoPE and V1 routing only")
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
    moe_cfg = reference_moe_config(cfg, experts_impl)
    with torch.device("meta"):
        ref = LlamaForCausalLM(llama)
        for i in cfg.moe_layer_indices:
            ref.model.layers[i].mlp = DeepseekV2Moe(moe_cfg)
    return _share_weights(ref, model, LlamaRotaryEmbedding(config=llama))


def build_native_reference(model: Transformer, experts_impl: str) -> nn.Module:
    """transformers' own DeepSeek-V2/V3 model (eager attention, its per-head ``DynamicCache``)
    from ``model``'s HF config, holding ``model``'s parameter tensors (shared)."""
    import transformers

    family = {"deepseek_v2": "DeepseekV2", "deepseek_v3": "DeepseekV3"}[model.config.model_type]
    module = getattr(transformers.models, model.config.model_type)
    hf = {k: v for k, v in model.config.to_hf().items() if k not in ("architectures", "auto_map")}
    config = getattr(transformers, f"{family}Config")(**hf)
    config._attn_implementation = "eager"
    config._experts_implementation = experts_impl
    with torch.device("meta"):
        ref = getattr(transformers, f"{family}ForCausalLM")(config)
    rotary = getattr(module, f"modeling_{model.config.model_type}")
    return _share_weights(ref, model, getattr(rotary, f"{family}RotaryEmbedding")(config=config))


def _share_weights(ref: nn.Module, model: Transformer, rotary: nn.Module) -> nn.Module:
    """Put ``model``'s Parameter objects (not copies) into the meta-built ``ref`` under HF's
    names (dsmoe's without the "model." prefix); ``rotary`` replaces ``ref``'s rotary
    embedding, whose buffers are not parameters."""
    ours = dict(model.named_parameters(remove_duplicate=False))
    theirs = [name for name, _ in ref.named_parameters(remove_duplicate=False)]
    names = {name: name.removeprefix("model.") for name in theirs}
    if set(names.values()) != set(ours):
        raise RuntimeError(f"reference weights do not line up: "
                           f"{sorted(set(names.values()) ^ set(ours))[:4]}")
    for name, our_name in names.items():
        owner, leaf = name.rsplit(".", 1)
        ref.get_submodule(owner)._parameters[leaf] = ours[our_name]
    our_buffers = dict(model.named_buffers())
    for name, buf in list(ref.named_buffers()):  # V3's e_score_correction_bias
        if buf.is_meta and name.removeprefix("model.") in our_buffers:
            owner, leaf = name.rsplit(".", 1)
            ref.get_submodule(owner)._buffers[leaf] = our_buffers[name.removeprefix("model.")]
    ref.model.rotary_emb = rotary
    left = [n for n, t in [*ref.named_parameters(), *ref.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"reference tensors left on the meta device: {left[:4]}")
    return ref.eval()


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
    ttft: list[float]  # seconds, one per timed run
    decode_tps: list[float]  # tokens/s, one per timed run

    @property
    def best_ttft(self) -> float:
        return min(self.ttft)

    @property
    def best_tps(self) -> float:
        return max(self.decode_tps)


def measure(impls: dict[str, Callable[[int], Run]], new_tokens: int, repeats: int,
            probe: Callable[[], float] | None = None
            ) -> tuple[dict[str, tuple[list[float], list[float]]], list[float]]:
    """A short warm-up run each, then ``repeats`` alternating rounds of ``new_tokens``:
    impl -> (TTFT per run, decode tok/s per run), and ``probe()`` (bytes/s a plain read
    draws) right before each round: this VM's bandwidth moves by up to 2x within minutes,
    so a run is judged against the read next to it, not one taken minutes away."""
    for fn in impls.values():
        fn(2)
    ttft: dict[str, list[float]] = {k: [] for k in impls}
    tps: dict[str, list[float]] = {k: [] for k in impls}
    adjacent: list[float] = []
    for _ in range(repeats):
        if probe is not None:
            adjacent.append(probe())
        for name, fn in impls.items():
            r = fn(new_tokens)
            ttft[name].append(r.ttft)
            tps[name].append(r.decode_tps)
    return {k: (ttft[k], tps[k]) for k in impls}, adjacent


def runners(model: Transformer, ref: nn.Module, ids: torch.Tensor, dtype: str
            ) -> dict[str, Callable[[int], Run]]:
    """impl name -> run(n new tokens). The reference shares the model's Parameter objects,
    so every runner first sets the weight layout it runs with (untimed)."""

    def with_layout(layout: str, fn: Callable[[int], Run]) -> Callable[[int], Run]:
        def run(n: int) -> Run:
            model.set_matmul_layout(layout)
            return fn(n)
        return run

    impls = {DSMOE: with_layout("output_major", lambda n: run_dsmoe(model, ids, n))}
    if dtype in INPUT_MAJOR_DTYPES and model.config.model_type not in MLA_MODEL_TYPES:
        impls[DSMOE_IM] = with_layout("input_major", lambda n: run_dsmoe(model, ids, n))
    impls[HF] = with_layout("output_major", lambda n: run_reference(ref, ids, n))
    return impls


def check_same_tokens(impls: dict[str, Callable[[int], Run]], n: int, dtype: str) -> str:
    """Greedy tokens of every implementation for a short run; fp32 must agree exactly."""
    tokens = {name: fn(n).tokens for name, fn in impls.items()}
    theirs = tokens[HF]
    lines = []
    for name, ours in tokens.items():
        if name == HF:
            continue
        same = int((ours == theirs).all(dim=0).long().cumprod(0).sum())  # agreeing steps
        if same < n and dtype == "float32":
            raise RuntimeError(f"{name} and transformers disagree after {same} of {n} greedy "
                               f"steps: {ours.tolist()} vs {theirs.tolist()}")
        lines.append(f"{name}: {same}/{n}")
    shape = f"{theirs.shape[0]} x {n}"
    note = "" if dtype == "float32" else " (bf16: rounding may differ between the kernels)"
    return f"{dtype}: greedy steps identical to transformers ({shape}): {', '.join(lines)}{note}"


@dataclass
class CacheSize:
    dtype: str
    layers: int
    ours: float  # bytes per token of one row, all layers
    theirs: float


@torch.no_grad()
def cache_bytes_per_token(model: Transformer, ref: nn.Module, ids: torch.Tensor, dtype: str
                          ) -> CacheSize:
    """What each library's cache holds per token after a prefill of ``ids`` [B, P], read
    from the cache objects themselves: dsmoe's preallocated ``KVCache`` / ``LatentCache``
    (its tensors over B x capacity) and transformers' ``DynamicCache`` (its layers' tensors
    over B x P)."""
    B, P = ids.shape
    model.set_matmul_layout("output_major")
    cache = model.new_cache(B, P)
    model(ids, cache=cache)
    ours = sum(t.nbytes for t in vars(cache).values() if isinstance(t, torch.Tensor))
    out = ref(ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1)
    theirs = sum(t.nbytes for layer in out.past_key_values.layers
                 for t in (layer.keys, layer.values))
    return CacheSize(dtype, model.config.num_hidden_layers, ours / (B * cache.max_seq_len),
                     theirs / (B * P))


# --- the bandwidth bound ----------------------------------------------------------------------
@dataclass
class Bandwidth:
    read: float  # bytes/s of a plain fp32 ``sum``, best run
    copy: float  # bytes/s read + written by ``copy_``, best run (STREAM's convention)
    native: float  # bytes/s of ``dsmoe.native.stream_read``, best run (0: unavailable)

    def best(self, other: Bandwidth) -> Bandwidth:
        return Bandwidth(max(self.read, other.read), max(self.copy, other.copy),
                         max(self.native, other.native))

    @property
    def ceiling(self) -> float:
        """The fastest read measured: what a decode step's weights can stream at, at best."""
        return max(self.read, self.native)


PROBE_MIB = 256  # each round's read: 8x the L3, ~10-20 ms


def read_probe(mib: int) -> Callable[[], float]:
    """A quick read of ``mib`` MiB (beyond the L3) on the current threads, best of 2: the
    faster of ``native.stream_read`` and a torch ``sum``, as the ceiling is taken."""
    src = torch.ones(mib * 2**20 // 4)  # [mib MiB / 4] fp32, first-touched

    def probe() -> float:
        times = [t for _ in range(2) for t in _read_times(src) if t is not None]
        return src.nbytes / min(times)
    return probe


def _read_times(src: torch.Tensor) -> tuple[float, float | None]:
    """Seconds a torch ``sum`` of ``src`` takes, and ``native.stream_read`` (None: the
    kernels are unavailable), on torch's current thread count."""
    t0 = time.perf_counter()
    float(src.sum())
    t1 = time.perf_counter()
    read = native.stream_read(src, torch.get_num_threads())
    return t1 - t0, (time.perf_counter() - t1 if read is not None else None)


def memory_bandwidth(mib: int, repeats: int = 3) -> Bandwidth:
    """What this process draws from memory on torch's current thread count: a torch
    reduction, the native streaming read and a copy over ``mib`` MiB of fp32, which must
    dwarf the last-level cache so that every byte comes from DRAM. The buffers are filled
    (first-touched) before timing."""
    src = torch.ones(mib * 2**20 // 4)  # [mib MiB / 4] fp32
    dst = torch.zeros_like(src)
    reads, natives, copies = [], [], []
    for _ in range(repeats):
        summed, streamed = _read_times(src)
        reads.append(summed)
        if streamed is not None:
            natives.append(streamed)
        t0 = time.perf_counter()
        dst.copy_(src)
        copies.append(time.perf_counter() - t0)
    return Bandwidth(src.nbytes / min(reads), 2 * src.nbytes / min(copies),
                     src.nbytes / min(natives) if natives else 0.0)


@torch.no_grad()
def experts_hit(model: Transformer, ids: torch.Tensor, n: int) -> list[float]:
    """Distinct routed experts each MoE layer reads per decode step, read from the routing
    dsmoe really did on ``ids`` [B, P] over ``n`` greedy tokens (untimed: a hook per
    layer): the mean over the n - 1 decode steps of the union of the B tokens' top-k."""
    model.set_matmul_layout("output_major")
    calls: list[list[torch.Tensor]] = [[] for _ in model.moe_layers()]

    def recorder(i: int):  # noqa: ANN202
        return lambda module, args, out: calls[i].append(out.topk_idx.clone())  # [T, K]

    hooks = [layer.register_forward_hook(recorder(i))
             for i, layer in enumerate(model.moe_layers())]
    try:
        generate(model, ids, n)
    finally:
        for hook in hooks:
            hook.remove()
    # the first call of each layer is the prefill; the n - 1 others are the timed steps
    return [statistics.mean(idx.unique().numel() for idx in layer[1:]) for layer in calls]


@dataclass
class Bound:
    dtype: str
    batch: int
    threads: int
    layers: int
    experts: int  # routed experts per MoE layer
    hit: list[float]  # distinct experts per step, per MoE layer
    weights: DecodeStepBytes
    kv: float  # KV-cache bytes attention reads per step, mean over the timed steps
    bandwidth: Bandwidth
    ours: float  # dsmoe decode tok/s, best run
    theirs: float  # transformers decode tok/s, best run
    rounds: list[tuple[float, float, float]] = field(default_factory=list)
    # per timed round: (plain read bytes/s just before it, dsmoe tok/s, transformers tok/s)

    @property
    def step_bytes(self) -> float:
        return self.weights.total + self.kv

    def achieved(self, tps: float) -> float:
        """Bytes/s an implementation streams at ``tps`` tokens/s (B tokens per step)."""
        return self.step_bytes * tps / self.batch

    @property
    def tps(self) -> float:
        """The bound: tokens/s with every byte of a step read once at the ceiling."""
        return self.batch * self.bandwidth.ceiling / self.step_bytes

    def adjacent(self) -> tuple[float, float, float]:
        """Medians over the rounds of: the read just before a round (bytes/s), dsmoe's draw
        as a share of it, and 3x transformers' speed in that round as a share of the bound
        that read gives (above 100%: 3x was out of reach in that round)."""
        reads = [r for r, _, _ in self.rounds]
        drew = [self.achieved(ours) / r for r, ours, _ in self.rounds]
        needs = [3 * self.achieved(theirs) / r for r, _, theirs in self.rounds]
        return statistics.median(reads), statistics.median(drew), statistics.median(needs)


def bandwidth_bound(model: Transformer, ids: torch.Tensor, n: int, dtype: str,
                    cache: CacheSize, rows: list[Row], before: Bandwidth, mib: int,
                    adjacent: list[float]) -> Bound:
    """The bytes one decode step of ``ids`` [B, P] reads, counted from the run (experts hit
    from dsmoe's routing, KV from its cache's bytes per token over the timed steps'
    contexts P + 1 .. P + n - 1), against the bandwidth drawn: the best of ``before`` (just
    before the timing) and of a measurement right after it, since load only ever lowers it."""
    B, P = ids.shape
    hit = experts_hit(model, ids, n)
    by_impl = {r.impl: r for r in rows}
    c = model.config
    return Bound(dtype, B, torch.get_num_threads(), c.num_hidden_layers,
                 c.n_routed_experts or 0, hit, decode_step_bytes(c, WEIGHT_FORMAT[dtype], B, hit),
                 cache.ours * B * (P + n / 2), before.best(memory_bandwidth(mib)),
                 by_impl[DSMOE].best_tps, by_impl[HF].best_tps,
                 list(zip(adjacent, by_impl[DSMOE].decode_tps, by_impl[HF].decode_tps)))


def run(cfg: ModelConfig, dtypes: list[str], batches: list[int], prompt_len: int,
        new_tokens: int, repeats: int, experts_impl: str, seed: int, bandwidth_mib: int
        ) -> tuple[list[Row], list[CacheSize], list[Bound]]:
    rows: list[Row] = []
    caches: list[CacheSize] = []
    bounds: list[Bound] = []
    t0 = time.perf_counter()
    model = build_dsmoe(cfg, seed)
    print(f"# built {model.num_parameters() / 1e9:.2f}B parameters in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    gen = torch.Generator().manual_seed(seed + 1)
    probe = read_probe(PROBE_MIB)
    for dtype in dtypes:
        model = model.set_matmul_layout("output_major").to(DTYPES[dtype])
        gc.collect()
        ref = build_reference(model, experts_impl)
        with _quiet_transformers():
            check_ids = torch.randint(0, cfg.vocab_size, (2, prompt_len), generator=gen)
            print(f"# {check_same_tokens(runners(model, ref, check_ids, dtype), 8, dtype)}",
                  flush=True)
            caches.append(cache_bytes_per_token(model, ref, check_ids, dtype))
            for batch in batches:
                ids = torch.randint(0, cfg.vocab_size, (batch, prompt_len), generator=gen)
                before = memory_bandwidth(bandwidth_mib)
                results, adjacent = measure(runners(model, ref, ids, dtype), new_tokens,
                                            repeats, probe)
                done = [Row(dtype, batch, impl, ttft, tps) for impl, (ttft, tps) in results.items()]
                rows += done
                bounds.append(bandwidth_bound(model, ids, new_tokens, dtype, caches[-1], done,
                                              before, bandwidth_mib, adjacent))
                summary = ", ".join(f"{r.impl} {r.best_tps:.2f} tok/s (TTFT {r.best_ttft:.3f} s)"
                                    for r in done)
                print(f"# {dtype} batch {batch}: {summary}; bound {bounds[-1].tps:.2f} tok/s; "
                      f"{time.perf_counter() - t0:.0f} s elapsed, load {os.getloadavg()[0]:.2f}",
                      flush=True)
        del ref
        gc.collect()
    return rows, caches, bounds


def _median_tps(row: Row) -> float:
    return statistics.median(row.decode_tps)


def format_table(rows: list[Row], markdown: bool) -> str:
    """Best run (ratios) and median run of every implementation."""
    base = {(r.dtype, r.batch): r for r in rows if r.impl == HF}
    header = ["dtype", "batch", "impl", "TTFT s best (median)", "decode tok/s best (median)",
              "TTFT speed-up", "tok/s ratio best (median)"]
    lines = []
    for r in rows:
        b = base[(r.dtype, r.batch)]
        lines.append([
            r.dtype, str(r.batch), r.impl,
            f"{r.best_ttft:.3f} ({statistics.median(r.ttft):.3f})",
            f"{r.best_tps:.2f} ({statistics.median(r.decode_tps):.2f})",
            f"{b.best_ttft / r.best_ttft:.2f}x",
            f"{r.best_tps / b.best_tps:.2f}x ({_median_tps(r) / _median_tps(b):.2f}x)"])
    return _render(header, lines, markdown)


def format_cache_table(caches: list[CacheSize], markdown: bool) -> str:
    """KV-cache bytes per token (one row of the batch), all layers and per layer."""
    header = ["dtype", "layers", "dsmoe B/token", "transformers B/token",
              "dsmoe B/token/layer", "transformers B/token/layer", "transformers / dsmoe"]
    lines = [[c.dtype, str(c.layers), f"{c.ours:,.0f}", f"{c.theirs:,.0f}",
              f"{c.ours / c.layers:,.0f}", f"{c.theirs / c.layers:,.0f}",
              f"{c.theirs / c.ours:.2f}x"] for c in caches]
    return _render(header, lines, markdown)


def format_bytes_table(bounds: list[Bound], markdown: bool) -> str:
    """What one decode step reads, in MB (1e6 bytes): weights per layer (attention over all
    layers, the MoE parts over the MoE layers, routed experts as hit), the rest whole."""
    header = ["dtype", "batch", "experts hit/layer", "attention/layer", "router/layer",
              "shared/layer", "routed hit/layer", "dense MLPs", "lm_head", "norms+embed rows",
              "KV read", "MB/step"]
    lines = []
    for b in bounds:
        w, moe = b.weights, max(len(b.hit), 1)
        mb = [w.attention / b.layers, w.routers / moe, w.shared_experts / moe,
              w.routed_experts / moe, w.dense_mlp, w.lm_head, w.norms + w.embedding, b.kv,
              b.step_bytes]
        hit = statistics.mean(b.hit) if b.hit else 0.0
        lines.append([b.dtype, str(b.batch), f"{hit:.1f} of {b.experts}",
                      *(f"{x / 1e6:,.2f}" for x in mb)])
    return _render(header, lines, markdown)


def format_bound_table(bounds: list[Bound], markdown: bool) -> str:
    """The bandwidth bound: tok/s <= B x GB/s ceiling / bytes per step.
    ``bound/transformers`` is the best ratio any implementation could reach against
    transformers' measured speed (3x is out of reach where it is below 3); ``3x needs`` is 3x
    transformers' speed as a share of the bound; the GB/s columns are what each library
    streamed (bytes/step x steps/s) and dsmoe's share of the ceiling. The last column judges
    each timed round against the read taken just before it (``measure``'s probe): the
    median read, dsmoe's median share of it, and the median share 3x transformers' speed in
    the same round would have needed."""
    header = ["dtype", "batch", "threads", "GB/s native read / sum (copy)", "bound tok/s",
              "transformers tok/s", "bound/transformers", "3x needs", "dsmoe tok/s",
              "dsmoe GB/s (of ceiling)", "transformers GB/s",
              "per round: read GB/s, dsmoe draws, 3x needs (medians)"]
    lines = []
    for b in bounds:
        bw, drawn = b.bandwidth, b.bandwidth.ceiling
        read, share, needs = b.adjacent() if b.rounds else (0.0, 0.0, 0.0)
        lines.append([
            b.dtype, str(b.batch), str(b.threads),
            f"{bw.native / 1e9:.1f} / {bw.read / 1e9:.1f} ({bw.copy / 1e9:.1f})", f"{b.tps:.2f}",
            f"{b.theirs:.2f}", f"{b.tps / b.theirs:.2f}x", f"{3 * b.theirs / b.tps:.0%}",
            f"{b.ours:.2f}", f"{b.achieved(b.ours) / 1e9:.1f} ({b.achieved(b.ours) / drawn:.0%})",
            f"{b.achieved(b.theirs) / 1e9:.1f}",
            f"{read / 1e9:.1f}, {share:.0%}, {needs:.0%}" if b.rounds else "-"])
    return _render(header, lines, markdown)


def _render(header: list[str], lines: list[list[str]], markdown: bool) -> str:
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
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after warm-up")
    parser.add_argument("--hf-experts", default="eager", choices=["eager", "grouped_mm"],
                        help="transformers' experts implementation")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads (default: every core)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bandwidth-mib", type=int, default=1024,
                        help="fp32 buffer the memory bandwidth is measured on (default 1 GiB; "
                             "it must dwarf the last-level cache)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny preset (tiny-v2 for an MLA --preset), short runs: a smoke "
                             "test in seconds")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = parser.parse_args(argv)
    if args.new_tokens < 2:
        parser.error("--new-tokens must be >= 2 (decode speed needs two tokens)")
    preset = args.preset
    if args.quick:  # the tiny preset with the requested attention kind
        mla = ModelConfig.preset(args.preset).model_type in MLA_MODEL_TYPES
        preset = "tiny-v2" if mla else "tiny"
    cfg = ModelConfig.preset(preset).replace(eos_token_id=None, bos_token_id=None)
    if args.layers is not None:
        cfg = cfg.replace(num_hidden_layers=args.layers)
    if args.quick:
        args.new_tokens, args.prompt_len, args.repeats = 8, 16, 1
        args.bandwidth_mib = min(args.bandwidth_mib, 256)
    if args.bandwidth_mib < 1:
        parser.error(f"--bandwidth-mib must be >= 1, got {args.bandwidth_mib}")
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    print(f"# {preset}, {cfg.num_hidden_layers} layers, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, {args.repeats} repeats, {torch.get_num_threads()} "
          f"threads, torch {torch.__version__}, load {load:.2f}", flush=True)
    rows, caches, bounds = run(cfg, args.dtype, args.batch, args.prompt_len, args.new_tokens,
                               args.repeats, args.hf_experts, args.seed, args.bandwidth_mib)
    print(f"# load average at the end: {os.getloadavg()[0]:.2f}")
    print(format_table(rows, args.markdown))
    print()
    print(format_cache_table(caches, args.markdown))
    print()
    print("# bytes one decode step reads, MB (experts hit: dsmoe's routing, mean over steps)")
    print(format_bytes_table(bounds, args.markdown))
    print()
    print("# bandwidth bound: tok/s <= B x GB/s ceiling (the faster of the native streaming "
          "read and a torch fp32 sum, best of 6) / bytes per step")
    print(format_bound_table(bounds, args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
