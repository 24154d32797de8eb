"""Benchmark: dsmoe's MoE layer against its lower bound and DeepSeek V1's own MoE code paths.

Implementations, all timed in one run on the same input and (for the MoE ones) the same
weights:
- ``dense-equiv``: one SwiGLU MLP of width (K + N_shared) * F over all tokens. The same
  active FLOPs as the MoE layer with no routing at all: the lower bound.
- ``dsmoe``: ``dsmoe.MoELayer`` (sorted dispatch, grouped expert GEMMs, gather combine).
  Forward runs in eval mode, forward+backward in training mode (balance loss included).
- ``v1-train``: a re-implementation of DeepSeek V1's ``DeepseekMoE.forward`` training path
  (``repeat_interleave(K)``, then ``y[idx == i] = expert(x[idx == i])`` for every expert,
  then a weighted sum over K; the aux loss rides on ``AddAuxiliaryLoss``).
- ``v1-infer``: V1's ``moe_infer`` (argsort by expert, a loop over experts on contiguous
  slices, ``scatter_reduce_`` combine). It is ``@torch.no_grad`` in DeepSeek's code, so it
  has no forward+backward row.
The V1 modules are per-expert ``nn.Linear`` layers loaded from ``MoELayer.hf_state_dict()``
(HF key names), so they hold the same numbers as dsmoe's stacked weights. One deliberate
deviation: the V1 gate computes its logits in fp32 (as dsmoe does) instead of the compute
dtype, so every path routes identically and the outputs can be cross-checked.

Method: ``torch.set_num_threads(os.cpu_count())``; the implementations run round-robin (a
warm-up round, then ``--repeats`` timed rounds) so that background load hits them alike;
the table gives the median wall-clock time per step and its ratio to the dense-equivalent.
On a shared machine wall time swings with other processes, so the ratio is also given on
CPU time (user + system, per thread; system time counts the page faults of fresh
buffers), which load disturbs much less. GFLOP/s counts the active FFN matmul FLOPs
(2 * 3 * D * F * (K + N_shared) per token forward, 3x that for forward+backward), the same
for every row. Peak memory is the highest total of bytes held by torch's CPU allocator
during the warm-up step above what was allocated when it began (weights and the input
excluded; activations, workspaces and weight gradients count), read from
``torch.profiler``'s allocation events (``profile_memory=True``), not from RSS. Before the
table, each pass checks that the MoE paths agree with dsmoe (relative max difference).

Usage:
  python benchmarks/moe_layer.py                     # full run, 16B layer shape
  python benchmarks/moe_layer.py --quick             # tiny shapes, a few seconds
  python benchmarks/moe_layer.py --tokens 2048 --dtype bfloat16 --repeats 5 --markdown

Shapes: B batch, S sequence, T = B*S tokens, D hidden, E experts, K picks, F expert width.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from dsmoe import ModelConfig, MoELayer
from dsmoe.mlp import ACTIVATIONS, SwiGLUMLP

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
FWD, FWD_BWD = "forward", "fwd+bwd"


# --- DeepSeek V1's MoE, re-implemented (modeling_deepseek.py, deepseek-moe-16b) ------------
class V1MLP(nn.Module):
    """DeepseekMLP: one expert (or the shared experts) as three separate nn.Linear."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act_fn = ACTIVATIONS[hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class V1Gate(nn.Module):
    """MoEGate: softmax scores, greedy top-k, optional renormalisation, V1's aux loss."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.top_k, self.n_routed_experts = cfg.num_experts_per_tok, cfg.n_routed_experts
        self.norm_topk_prob, self.alpha, self.seq_aux = (
            cfg.norm_topk_prob, cfg.aux_loss_alpha, cfg.seq_aux)
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))

    def forward(self, hidden_states: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        B, S, D = hidden_states.shape
        E, K = self.n_routed_experts, self.top_k
        # fp32 logits (the one deviation, see the module docstring).
        logits = F.linear(hidden_states.reshape(-1, D).float(), self.weight.float())  # [T, E]
        scores = logits.softmax(dim=-1)
        topk_weight, topk_idx = torch.topk(scores, k=K, dim=-1, sorted=False)  # [T, K]
        if K > 1 and self.norm_topk_prob:
            topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
        aux_loss = None
        if self.training and self.alpha > 0.0:
            idx_for_aux = topk_idx.view(B, -1)  # [B, S*K]
            if self.seq_aux:
                ce = torch.zeros(B, E, device=hidden_states.device)
                ce.scatter_add_(1, idx_for_aux, torch.ones(B, S * K, device=hidden_states.device))
                ce.div_(S * K / E)
                aux_loss = (ce * scores.view(B, S, E).mean(dim=1)).sum(dim=1).mean() * self.alpha
            else:
                mask_ce = F.one_hot(idx_for_aux.view(-1), num_classes=E)
                ce = mask_ce.float().mean(0)
                aux_loss = (scores.mean(0) * ce * E).sum() * self.alpha
        return topk_idx, topk_weight, aux_loss


class AddAuxiliaryLoss(torch.autograd.Function):
    """V1's trick: return x unchanged, give the aux loss a gradient of 1 in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.dtype, ctx.required_aux_loss = loss.dtype, loss.requires_grad
        return x

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # noqa: ANN001, ANN205
        grad_loss = None
        if ctx.required_aux_loss:
            grad_loss = torch.ones(1, dtype=ctx.dtype, device=grad_output.device)
        return grad_output, grad_loss


class V1MoE(nn.Module):
    """DeepseekMoE: the training path loops over experts with boolean masks on K-fold
    repeated tokens; the inference path sorts by expert and scatter-reduces."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_experts_per_tok = cfg.num_experts_per_tok
        self.experts = nn.ModuleList(
            V1MLP(cfg.hidden_size, cfg.moe_intermediate_size, cfg.hidden_act)
            for _ in range(cfg.n_routed_experts))
        self.gate = V1Gate(cfg)
        self.shared_experts = V1MLP(
            cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, cfg.hidden_act
        ) if cfg.n_shared_experts else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # [B, S, D]
        identity, orig_shape = hidden_states, hidden_states.shape
        topk_idx, topk_weight, aux_loss = self.gate(hidden_states)
        hidden_states = hidden_states.view(-1, hidden_states.shape[-1])  # [T, D]
        flat_topk_idx = topk_idx.view(-1)  # [T*K]
        if self.training:
            hidden_states = hidden_states.repeat_interleave(self.num_experts_per_tok, dim=0)
            y = torch.empty_like(hidden_states)  # [T*K, D]
            for i, expert in enumerate(self.experts):
                y[flat_topk_idx == i] = expert(hidden_states[flat_topk_idx == i])
            y = (y.view(*topk_weight.shape, -1) * topk_weight.unsqueeze(-1)).sum(dim=1)
            y = y.to(hidden_states.dtype).view(*orig_shape)
            if aux_loss is not None:
                y = AddAuxiliaryLoss.apply(y, aux_loss)
        else:
            y = self.moe_infer(hidden_states, flat_topk_idx, topk_weight.view(-1, 1))
            y = y.view(*orig_shape)
        if self.shared_experts is not None:
            y = y + self.shared_experts(identity)
        return y

    @torch.no_grad()
    def moe_infer(self, x: torch.Tensor, flat_expert_indices: torch.Tensor,
                  flat_expert_weights: torch.Tensor) -> torch.Tensor:
        expert_cache = torch.zeros_like(x)  # [T, D]
        idxs = flat_expert_indices.argsort()
        tokens_per_expert = flat_expert_indices.bincount().cpu().numpy().cumsum(0)
        token_idxs = idxs // self.num_experts_per_tok
        for i, end_idx in enumerate(tokens_per_expert):
            start_idx = 0 if i == 0 else tokens_per_expert[i - 1]
            if start_idx == end_idx:
                continue
            expert = self.experts[i]
            exp_token_idx = token_idxs[start_idx:end_idx]
            expert_out = expert(x[exp_token_idx])
            expert_out.mul_(flat_expert_weights[idxs[start_idx:end_idx]].to(expert_out.dtype))
            expert_cache.scatter_reduce_(
                0, exp_token_idx.view(-1, 1).repeat(1, x.shape[-1]), expert_out, reduce="sum")
        return expert_cache


# --- the measured steps --------------------------------------------------------------------
@dataclass
class Case:
    """One implementation in one pass: ``step()`` runs it once (timed), ``reset()`` before
    each step drops the previous step's weight gradients (untimed; as
    ``zero_grad(set_to_none=True)``), ``output()`` gives the last result."""

    name: str
    step: Callable[[], None]
    output: Callable[[], torch.Tensor]
    reset: Callable[[], None] = lambda: None


def _zero_grads(module: nn.Module) -> None:
    for p in module.parameters():
        p.grad = None


def build_cases(cfg: ModelConfig, tokens: int, dtype: torch.dtype, passes: list[str],
                seed: int = 0) -> tuple[dict[str, list[Case]], dict[str, float]]:
    """The models at ``dtype`` and one Case per (pass, implementation)."""
    torch.manual_seed(seed)
    D, F_, K, S_ = (cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok,
                    cfg.n_shared_experts or 0)
    moe = MoELayer(cfg).to(dtype)
    with torch.device("meta"):  # no storage: the weights below are assigned, not copied
        v1 = V1MoE(cfg)
    v1.load_state_dict(moe.hf_state_dict(), strict=True, assign=True)
    dense = SwiGLUMLP(D, (K + S_) * F_, cfg.hidden_act, cfg.initializer_range).to(dtype)
    x = torch.randn(1, tokens, D, dtype=dtype)  # [B, S, D] one sequence (seq_aux over it)
    grad = torch.randn(1, tokens, D, dtype=dtype) / tokens  # upstream gradient [B, S, D]

    with torch.no_grad():
        counts = moe.eval()(x).expert_counts.float()
    info = {"max_load": float(counts.max() / counts.mean())}

    last: dict[str, torch.Tensor] = {}

    def fwd(name: str, module: nn.Module, train: bool, fn: Callable[[torch.Tensor], torch.Tensor]
            ) -> Case:
        def step() -> None:
            module.train(train)
            with torch.no_grad():
                last[name] = fn(x)
        return Case(name, step, lambda: last[name])

    def fwd_bwd(name: str, module: nn.Module,
                fn: Callable[[torch.Tensor], tuple[list[torch.Tensor], list[torch.Tensor]]]
                ) -> Case:
        def step() -> None:
            module.train(True)
            xg = x.detach().requires_grad_(True)
            outs, grads = fn(xg)
            torch.autograd.backward(outs, grads)
            last[name] = xg.grad
        return Case(name, step, lambda: last[name], lambda: _zero_grads(module))

    def moe_fb(xg: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        out = moe(xg)
        return [out.hidden_states, out.aux_loss], [grad, torch.ones_like(out.aux_loss)]

    cases: dict[str, list[Case]] = {}
    if FWD in passes:
        cases[FWD] = [
            fwd("dense-equiv", dense, False, dense),
            fwd("dsmoe", moe, False, lambda t: moe(t).hidden_states),
            fwd("v1-train", v1, True, v1),
            fwd("v1-infer", v1, False, v1),
        ]
    if FWD_BWD in passes:
        cases[FWD_BWD] = [
            fwd_bwd("dense-equiv", dense, lambda t: ([dense(t)], [grad])),
            fwd_bwd("dsmoe", moe, moe_fb),
            fwd_bwd("v1-train", v1, lambda t: ([v1(t)], [grad])),
        ]
    return cases, info


# --- measurement ---------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """The profiler's native start/stop lines go to fd 2; keep the table readable."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_seconds() -> float:
    """User + system CPU time of this process (all threads); system time includes the page
    faults of freshly allocated buffers, a real cost on CPU."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def profiled_peak_bytes(step: Callable[[], None]) -> int:
    """Run ``step`` once under the profiler; the highest net bytes the CPU allocator held
    during it, from the profiler's allocation events."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and str(e.device_type()).endswith("CPU"))
    held = peak = 0
    for _, nbytes in events:
        held += nbytes
        peak = max(peak, held)
    return peak


@dataclass
class Timing:
    wall: list[float]  # seconds per timed step
    cpu: list[float]  # CPU seconds per timed step, divided by the thread count
    peak_bytes: int


def time_cases(cases: list[Case], repeats: int) -> dict[str, Timing]:
    """Round-robin: a warm-up round (profiled for peak memory, not timed), then
    ``repeats`` timed rounds."""
    def reset_all() -> None:  # one model's weight gradients alive at a time
        for other in cases:
            other.reset()
        gc.collect()

    peaks = {}
    for case in cases:
        reset_all()
        peaks[case.name] = profiled_peak_bytes(case.step)
    threads = torch.get_num_threads()
    result = {c.name: Timing([], [], peaks[c.name]) for c in cases}
    for _ in range(repeats):
        for case in cases:
            reset_all()
            cpu, start = _cpu_seconds(), time.perf_counter()
            case.step()
            result[case.name].wall.append(time.perf_counter() - start)
            result[case.name].cpu.append((_cpu_seconds() - cpu) / threads)
    return result


def check_agreement(cases: list[Case], dtype: torch.dtype) -> float:
    """Largest relative deviation of any MoE path from dsmoe (after the warm-up round)."""
    ref = next(c for c in cases if c.name == "dsmoe").output().float()
    worst = 0.0
    for case in cases:
        if case.name in ("dsmoe", "dense-equiv"):
            continue
        diff = (case.output().float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)
        worst = max(worst, float(diff))
    return worst


@dataclass
class Row:
    dtype: str
    tokens: int
    pass_: str
    name: str
    ms: float  # median wall-clock per step
    vs_dense: float  # ms / dense-equiv ms
    vs_v1_train: float | None  # v1-train ms / ms
    cpu_vs_dense: float  # the same ratio on CPU time per thread
    gflops: float  # active FLOPs / median wall
    peak_mib: float


def run_config(cfg: ModelConfig, tokens: int, dtype_name: str, passes: list[str],
               repeats: int, log: Callable[[str], None]) -> list[Row]:
    """All passes at one (dtype, tokens); the models die with this call's locals."""
    D, F_, K, S_ = (cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok,
                    cfg.n_shared_experts or 0)
    cases, info = build_cases(cfg, tokens, DTYPES[dtype_name], passes)
    log(f"# {dtype_name}, {tokens} tokens: busiest expert {info['max_load']:.2f}x mean")
    rows: list[Row] = []
    for pass_, pass_cases in cases.items():
        t0, load0 = time.perf_counter(), os.getloadavg()[0]
        timings = time_cases(pass_cases, repeats)
        tol = 1e-4 if dtype_name == "float32" else 5e-2
        dev = check_agreement(pass_cases, DTYPES[dtype_name])
        for case in pass_cases:  # weight gradients of this pass: gone before the next
            case.reset()
        status = "ok" if dev <= tol else "MISMATCH"
        log(f"#   {pass_}: {time.perf_counter() - t0:.0f}s, load average "
            f"{load0:.1f} -> {os.getloadavg()[0]:.1f}; MoE paths agree to {dev:.1e} "
            f"relative ({status}, tolerance {tol:.0e})")
        wall = {n: statistics.median(t.wall) for n, t in timings.items()}
        cpu = {n: statistics.median(t.cpu) for n, t in timings.items()}
        flops = 2 * 3 * D * F_ * (K + S_) * tokens * (3 if pass_ == FWD_BWD else 1)
        v1 = wall.get("v1-train")
        for name, timing in timings.items():
            rows.append(Row(dtype_name, tokens, pass_, name, wall[name] * 1e3,
                            wall[name] / wall["dense-equiv"],
                            v1 / wall[name] if v1 is not None else None,
                            cpu[name] / cpu["dense-equiv"],
                            flops / wall[name] / 1e9, timing.peak_bytes / 2**20))
    return rows


def run(cfg: ModelConfig, tokens_list: list[int], dtypes: list[str], passes: list[str],
        repeats: int, log: Callable[[str], None]) -> list[Row]:
    rows: list[Row] = []
    for dtype_name in dtypes:
        for tokens in tokens_list:
            rows += run_config(cfg, tokens, dtype_name, passes, repeats, log)
            gc.collect()
    return rows


def format_table(rows: list[Row], markdown: bool) -> str:
    header = ["dtype", "tokens", "pass", "implementation", "median ms", "x dense-equiv",
              "x dense-equiv (CPU time)", "v1-train / this", "GFLOP/s", "peak MiB"]
    body = [[r.dtype, str(r.tokens), r.pass_, r.name, f"{r.ms:.1f}", f"{r.vs_dense:.2f}",
             f"{r.cpu_vs_dense:.2f}",
             "-" if r.vs_v1_train is None else f"{r.vs_v1_train:.2f}", f"{r.gflops:.1f}",
             f"{r.peak_mib:.0f}"] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(header) + " |",
                 "|" + "|".join("---:" if i >= 4 else "---" for i in range(len(header))) + "|"]
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(  # noqa: E731
        c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(b) for b in body])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES),
                        default=["float32", "bfloat16"])
    parser.add_argument("--pass", dest="passes", nargs="+", choices=[FWD, FWD_BWD],
                        default=[FWD, FWD_BWD])
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed rounds after the warm-up (default 3; 2 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes (the 'tiny' preset, 64 and 256 tokens): a smoke run")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 2 if args.quick else 3
    if args.repeats < 1 or min(args.tokens) < 1:
        parser.error("--repeats and --tokens must be positive")

    torch.set_num_threads(os.cpu_count() or 1)
    if args.quick:
        cfg = ModelConfig.preset("tiny")
        tokens = [64, 256] if args.tokens == parser.get_default("tokens") else args.tokens
    else:
        cfg = ModelConfig.preset("deepseek-moe-16b")
        tokens = args.tokens
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    log(f"# MoE layer: D={cfg.hidden_size}, {cfg.n_routed_experts} experts x "
        f"{cfg.moe_intermediate_size}, {cfg.n_shared_experts} shared, top-"
        f"{cfg.num_experts_per_tok}; dense-equiv width "
        f"{(cfg.num_experts_per_tok + (cfg.n_shared_experts or 0)) * cfg.moe_intermediate_size}"
        f"; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{args.repeats} timed rounds")
    rows = run(cfg, tokens, args.dtype, args.passes, args.repeats, log)
    print(format_table(rows, args.markdown))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
