"""Training throughput and model FLOPs utilisation: MoE vs its dense equivalent, one run.

For each model it times full optimizer steps (forward, backward, AdamW) on random tokens and
reports tokens/s and MFU = active FLOPs per token x tokens/s / measured matmul peak.
Active FLOPs per token = 6 x (active matmul parameters, lm_head included, embedding
lookup excluded) + 6 x L x S x D for attention scores and values (causal: half of 12).
The dense equivalent replaces every MoE FFN by one SwiGLU MLP of the active width
((shared + top-k) x expert width): the same FLOPs per token without routing.

    python benchmarks/train.py [--steps 5] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from dsmoe.config import ModelConfig
from dsmoe.model import Transformer

MODELS = {
    # name: (preset, overrides, batch, seq)
    "tiny": ("tiny", {}, 16, 128),
    "2b-shape, 2 layers": ("deepseek-moe-2b", dict(num_hidden_layers=2, vocab_size=32000), 4, 256),
}


def matmul_peak(dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 5) -> float:
    """Measured GFLOP/s of a large square matmul: the machine's practical peak."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n**3 / min(times) / 1e9


def dense_equivalent(cfg: ModelConfig) -> ModelConfig:
    active = (cfg.n_shared_experts or 0) + cfg.num_experts_per_tok
    return cfg.replace(n_routed_experts=None, intermediate_size=active * cfg.moe_intermediate_size)


def active_flops_per_token(model: Transformer, seq: int) -> float:
    cfg = model.config
    matmul_params = model.num_parameters(active=True) - model.embed_tokens.weight.numel()
    if cfg.tie_word_embeddings:
        matmul_params += model.embed_tokens.weight.numel()
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    return 6 * (matmul_params - norms) + 6 * cfg.num_hidden_layers * seq * cfg.hidden_size


def time_training(cfg: ModelConfig, batch: int, seq: int, steps: int) -> tuple[float, float]:
    """Median seconds per optimizer step, and the model's active FLOPs per token."""
    torch.manual_seed(0)
    model = Transformer(cfg).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        out = model(ids[:, :-1])
        loss = F.cross_entropy(out.logits.flatten(0, 1), ids[:, 1:].flatten()) + out.aux_loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i:  # the first step warms up allocators and AdamW state
            times.append(time.perf_counter() - start)
    return statistics.median(times), active_flops_per_token(model, seq)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="intra-op threads (1 is steadier on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    peak = matmul_peak()
    rows = []
    for name in args.models:
        preset, overrides, batch, seq = MODELS[name]
        moe_cfg = ModelConfig.preset(preset).replace(**overrides)
        results = {}
        for kind, cfg in (("MoE", moe_cfg), ("dense-equivalent", dense_equivalent(moe_cfg))):
            seconds, flops = time_training(cfg, batch, seq, args.steps)
            tokens_per_s = batch * seq / seconds
            results[kind] = tokens_per_s
            rows.append((name, kind, batch * seq, seconds * 1e3, tokens_per_s,
                         flops * tokens_per_s / 1e9 / peak))
        rows.append((name, "MoE / dense tokens/s", None, None,
                     results["MoE"] / results["dense-equivalent"], None))
    print(f"matmul peak (fp32, 2048^3): {peak:.1f} GFLOP/s on {torch.get_num_threads()} threads")
    header = "| model | variant | tokens/step | ms/step | tokens/s | MFU |"
    print(header)
    print("|---|---|---:|---:|---:|---:|")
    for name, kind, tokens, ms, tps, mfu in rows:
        if tokens is None:
            print(f"| {name} | {kind} | | | **{tps:.2f}x** | |")
        else:
            print(f"| {name} | {kind} | {tokens} | {ms:.0f} | {tps:,.0f} | {mfu:.1%} |")


if __name__ == "__main__":
    main()
