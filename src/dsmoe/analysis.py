"""What the experts learned: load, routing entropy, preferred tokens, redundancy.

Design choices:
- Everything is measured from outside the model: routing statistics come from
  ``return_routing=True``; experiments swap a router's ``select`` function or a layer's
  shared experts for the duration of a ``with`` block, so model code stays untouched.
- The redundancy experiment follows the DeepSeekMoE paper: for each token, disable the
  top-ranked fraction of its routed experts (by that token's affinity) and pick the top-K
  among the rest; a model whose experts are specialised (not redundant) loses more.

Shapes: N windows, S window length, T tokens, E experts, K picks, L MoE layers.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

from dsmoe.io import atomic_write_text
from dsmoe.model import Transformer
from dsmoe.moe.layer import MoELayer
from dsmoe.plots import plot_curves, plot_expert_load

DEFAULT_FRACTIONS = (0.0, 1 / 16, 1 / 8, 3 / 16, 1 / 4)


@dataclass
class AnalysisResult:
    expert_load: list[list[int]]  # [L][E] assignments per expert
    load_entropy: list[float]  # [L] entropy of the layer's load distribution (nats)
    token_entropy: list[float]  # [L] mean per-token entropy of the routing scores (nats)
    preferred_tokens: list[list[list[str]]]  # [L][E] tokens the expert is most specific to
    redundancy: dict[str, float] = field(default_factory=dict)  # fraction -> val loss
    shared_disabled_loss: float | None = None
    base_loss: float = 0.0
    n_tokens: int = 0


def windows(ids: list[int], seq_len: int, max_tokens: int) -> torch.Tensor:
    """Cut a token list into [N, seq_len + 1] windows (inputs plus next-token targets)."""
    ids = ids[: max_tokens + 1]
    n = (len(ids) - 1) // seq_len
    if n < 1:
        raise ValueError(f"need at least {seq_len + 1} tokens of analysis data, got {len(ids)}")
    return torch.tensor([ids[i * seq_len: i * seq_len + seq_len + 1] for i in range(n)])


@torch.no_grad()
def mean_loss(model: Transformer, data: torch.Tensor, batch_size: int = 8) -> float:
    total, count = 0.0, 0
    device = model.embed_tokens.weight.device
    for start in range(0, data.shape[0], batch_size):
        chunk = data[start: start + batch_size].to(device)
        logits = model(chunk[:, :-1]).logits.float()
        total += F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum").item()
        count += chunk[:, 1:].numel()
    return total / count


@contextlib.contextmanager
def disabled_top_experts(model: Transformer, fraction: float) -> Iterator[None]:
    """Within the block, each token may not use its top ``fraction`` of routed experts."""
    layers = model.moe_layers()
    originals = [layer.gate.select for layer in layers]
    try:
        for layer, select in zip(layers, originals):
            E, K = layer.config.n_routed_experts, layer.config.num_experts_per_tok
            n_off = min(round(fraction * E), E - K)
            if n_off > 0:
                layer.gate.select = _masking(select, n_off)
        yield
    finally:
        for layer, select in zip(layers, originals):
            layer.gate.select = select


def _masking(select, n_off: int):
    def masked_select(choice: torch.Tensor) -> torch.Tensor:  # choice: [T, E]
        top = choice.topk(n_off, dim=-1).indices
        return select(choice.scatter(1, top, float("-inf")))
    return masked_select


@contextlib.contextmanager
def disabled_shared_experts(model: Transformer) -> Iterator[None]:
    layers: list[MoELayer] = model.moe_layers()
    saved = [layer.shared_experts for layer in layers]
    try:
        for layer in layers:
            layer.shared_experts = None
        yield
    finally:
        for layer, shared in zip(layers, saved):
            layer.shared_experts = shared


@torch.no_grad()
def routing_statistics(model: Transformer, data: torch.Tensor, decode, batch_size: int = 8,
                       top_tokens: int = 5, min_count: int = 5):
    """Per MoE layer: expert load, entropies, and each expert's most specific tokens
    (highest share of a token's occurrences routed to the expert, among frequent tokens)."""
    layers = model.moe_layers()
    E = layers[0].config.n_routed_experts
    load = torch.zeros(len(layers), E)
    token_entropy = torch.zeros(len(layers))
    per_expert = [[Counter() for _ in range(E)] for _ in layers]
    token_count: Counter = Counter()
    n_tokens = 0
    for start in range(0, data.shape[0], batch_size):
        inputs = data[start: start + batch_size, :-1]
        routing = model(inputs.to(model.embed_tokens.weight.device), return_routing=True).routing
        flat_ids = inputs.reshape(-1).tolist()
        token_count.update(flat_ids)
        n_tokens += len(flat_ids)
        for i, r in enumerate(routing):
            load[i] += r.expert_counts.float().cpu()
            probs = _probs(r.router_logits, layers[i].config.scoring_func)
            token_entropy[i] += -(probs * probs.clamp_min(1e-12).log()).sum(-1).sum().cpu()
            for tok, experts in zip(flat_ids, r.topk_idx.tolist()):
                for e in experts:
                    per_expert[i][e][tok] += 1
    share = load / load.sum(dim=1, keepdim=True).clamp_min(1)
    load_entropy = -(share * share.clamp_min(1e-12).log()).sum(dim=1)
    preferred = []
    for counters in per_expert:
        layer_pref = []
        for counter in counters:
            ranked = sorted(((c / token_count[t], c, t) for t, c in counter.items()
                             if token_count[t] >= min_count), reverse=True)[:top_tokens]
            layer_pref.append([decode([t]) for _, _, t in ranked])
        preferred.append(layer_pref)
    return (load.long().tolist(), load_entropy.tolist(), (token_entropy / n_tokens).tolist(),
            preferred, n_tokens)


def _probs(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    if scoring == "sigmoid":
        s = logits.sigmoid()
        return s / s.sum(-1, keepdim=True)
    return logits.softmax(-1)


def analyze(model: Transformer, data: torch.Tensor, decode,
            fractions: tuple[float, ...] = DEFAULT_FRACTIONS) -> AnalysisResult:
    if not model.moe_layers():
        raise ValueError("the model has no MoE layers to analyse")
    model.eval()
    load, load_h, token_h, preferred, n_tokens = routing_statistics(model, data, decode)
    result = AnalysisResult(load, load_h, token_h, preferred, n_tokens=n_tokens)
    result.base_loss = mean_loss(model, data)
    for fraction in fractions:
        with disabled_top_experts(model, fraction):
            result.redundancy[f"{fraction:.4f}"] = mean_loss(model, data)
    if any(layer.shared_experts is not None for layer in model.moe_layers()):
        with disabled_shared_experts(model):
            result.shared_disabled_loss = mean_loss(model, data)
    return result


def write_outputs(result: AnalysisResult, out: Path) -> None:
    """analysis.json, load heatmap, redundancy curve and a short report.md."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "analysis.json", json.dumps(result.__dict__, indent=1) + "\n")
    plot_expert_load(result.expert_load, out / "expert_load.png", "expert load per MoE layer")
    fractions = [float(f) for f in result.redundancy]
    curves = {"top routed experts disabled": (fractions, list(result.redundancy.values()))}
    if result.shared_disabled_loss is not None:
        curves["shared experts disabled"] = (fractions, [result.shared_disabled_loss] * len(fractions))
    plot_curves(curves, out / "redundancy.png", title="redundancy among routed experts",
                xlabel="fraction of routed experts disabled (per token, highest affinity first)",
                ylabel="validation loss (nats/token)", markers="o-")
    lines = ["# Expert analysis", "", f"{result.n_tokens:,} tokens; base loss "
             f"{result.base_loss:.4f} nats/token", "", "| MoE layer | load max/mean | load entropy "
             "(max ln E) | mean token routing entropy |", "|---|---|---|---|"]
    for i, (load, lh, th) in enumerate(zip(result.expert_load, result.load_entropy,
                                          result.token_entropy)):
        mean = sum(load) / len(load)
        lines.append(f"| {i} | {max(load) / max(mean, 1e-9):.2f} | {lh:.3f} "
                     f"({math.log(len(load)):.3f}) | {th:.3f} |")
    lines += ["", "## Redundancy (DeepSeekMoE paper, Fig. 4)", "", "| disabled | loss | increase |",
              "|---|---|---|"]
    for fraction, loss in result.redundancy.items():
        lines.append(f"| {float(fraction):.3f} | {loss:.4f} | {loss - result.base_loss:+.4f} |")
    if result.shared_disabled_loss is not None:
        lines.append(f"| shared experts | {result.shared_disabled_loss:.4f} | "
                     f"{result.shared_disabled_loss - result.base_loss:+.4f} |")
    lines += ["", "![load](expert_load.png)", "![redundancy](redundancy.png)", "",
              "## Tokens each expert is most specific to (first MoE layer)", ""]
    for e, tokens in enumerate(result.preferred_tokens[0] if result.preferred_tokens else []):
        lines.append(f"- expert {e}: {', '.join(repr(t) for t in tokens) or '(none frequent)'}")
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
