"""Capacity planning for data + expert parallel training: memory per rank, FLOPs per token
and all-to-all traffic, from a ModelConfig alone (nothing is built or allocated).

Models (stated so the numbers can be checked and argued with):
- Parameters come from ``dsmoe.params.count_parameters``. Routed experts are split over
  the EP group (E/ep per rank); everything else is replicated on every rank (DDP).
- Training state per parameter: ``bf16``/``fp16``: 2-byte weights and gradients plus an
  fp32 master copy and fp32 AdamW moments (2 + 2 + 4 + 8 = 16 bytes); ``fp32``: 4-byte
  weights and gradients plus fp32 moments (4 + 4 + 8 = 16 bytes). No optimizer sharding.
- Activations kept for backward, per token, without recomputation, with a fused (flash)
  attention that stores no S x S scores; in the compute dtype unless noted:
    attention block   2D (residual, norm) + q + k + v + o (``params.attention_widths``:
                      MHA 2 q_out + 2 kv_out; MLA its expanded per-head keys and values)
    FFN block         2D (residual, norm) +
      dense           3 I (gate, up, act(gate) * up)
      MoE             2E fp32 (logits, scores) + 3 F n_shared + K (2D + 3F) (each routed
                      assignment: gathered input, gate/up, product, expert output)
    head              D (final norm) + V (logits) + V fp32 (the loss's upcast)
  Each rank holds its tokens' activations; under balanced routing the assignments it
  computes for other ranks equal the ones others compute for it.
- FLOPs per token, forward: 2 x the active matmul parameters (all active parameters but
  the embedding and norms) + 2 x L x (q + o) x S for attention scores and values (S the
  sequence length, causal masking not discounted, as in PaLM's 6N + 12 L H Q T).
  Training = 3 x forward.
- All-to-all bytes, per rank and MoE layer: a token goes once to every *other* rank that
  owns one of its experts (DeepSeek's dispatch), and its partial result comes back; the
  backward pass repeats both. payload = 4 x T_rank x r x D x bytes, r = expected other
  ranks per token. Under uniform (exchangeable) routing each rank is needed with
  p = 1 - C(E - E/ep, K) / C(E, K), r = (ep - 1) p. With device-limited routing (M) the
  expectation is estimated by running the router's own selection on i.i.d. scores
  (20,000 samples, fixed seed; standard error < 0.5%). Metadata: per (token, rank) row
  K fp32 gate weights + K expert ids (+ K affinities when dropping), forward and back,
  plus the (ep - 1)(E/ep + 2) int64 counts per layer.
- Gradient all-reduce (ring): 2 (W - 1)/W x replicated gradient bytes over all W ranks,
  2 (R - 1)/R x expert gradient bytes over the R = W/ep replicas of each expert block.

Shapes: E experts, K picks, D hidden, F expert width, I dense width, V vocab, L layers.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

from dsmoe.config import ModelConfig, check_expert_split
from dsmoe.params import attention_widths, count_parameters

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
MONTE_CARLO_SAMPLES = 20_000


# --- routing statistics --------------------------------------------------------------------------
def remote_rank_probability(n_experts: int, top_k: int, ep: int) -> float:
    """P(a given rank owns at least one of a token's K experts), uniform routing:
    1 - C(E - E/ep, K) / C(E, K)."""
    per_rank = n_experts // ep
    return 1.0 - math.comb(n_experts - per_rank, top_k) / math.comb(n_experts, top_k)


@functools.lru_cache(maxsize=None)
def ranks_per_token(n_experts: int, top_k: int, ep: int, max_devices: int | None = None,
                    samples: int = MONTE_CARLO_SAMPLES, seed: int = 0) -> float:
    """Expected number of distinct ranks (the token's own included) a token's K experts
    live on, for exchangeable expert scores; with ``max_devices`` M, after DeepSeek-V2's
    device-limited selection (the router's own ``select_group_limited``)."""
    if max_devices is None or max_devices >= min(ep, top_k):
        # M >= K cannot bind: the K best experts lie on at most K devices, each of whose
        # best score beats every device holding none of them.
        return ep * remote_rank_probability(n_experts, top_k, ep)
    import torch  # here, not at the top: ``dsmoe plan --help`` should not load it

    from dsmoe.moe.router import select_group_limited

    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(samples, n_experts, generator=gen, dtype=torch.float64)  # [T, E]
    picks = select_group_limited(scores, top_k, ep, max_devices, "max")  # [T, K]
    owners = torch.zeros(samples, ep, dtype=torch.bool)
    owners.scatter_(1, picks // (n_experts // ep), True)
    return float(owners.sum(dim=1).double().mean())


def a2a_bytes_per_layer(config: ModelConfig, tokens_per_rank: int, ep: int, *,
                        bytes_per_elem: int, training: bool = True) -> dict[str, float]:
    """Expected bytes one rank sends to other ranks in one MoE layer for one micro-batch
    (module docstring); device-limited routing is taken from the config."""
    E, K, D = config.n_routed_experts, config.num_experts_per_tok, config.hidden_size
    if E is None or ep == 1:
        return {"payload": 0.0, "metadata": 0.0, "ranks_per_token": 1.0,
                "remote_ranks_per_token": 0.0}
    M = config.max_devices if config.topk_method == "device_limited" else None
    reach = ranks_per_token(E, K, ep, M)
    remote = reach * (ep - 1) / ep  # exchangeable ranks: the home rank is one of ep
    rows = tokens_per_rank * remote
    passes = 2 if training else 1  # forward, and the backward's reverse exchanges
    meta_width = K * (3 if training and config.drop_tokens else 2)
    return {
        "payload": passes * 2 * rows * D * bytes_per_elem,
        "metadata": passes * rows * meta_width * 4 + (ep - 1) * (E // ep + 2) * 8,
        "ranks_per_token": reach,
        "remote_ranks_per_token": remote,
    }


# --- the plan ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class RoutingTraffic:
    label: str
    max_devices: int | None
    ranks_per_token: float  # distinct ranks per token, own included
    fraction_per_remote_rank: float  # share of a rank's tokens each other rank receives
    payload_bytes: float  # per step per rank, all MoE layers, forward + backward
    metadata_bytes: float


@dataclass(frozen=True)
class Plan:
    config: ModelConfig
    devices: int
    ep: int
    dtype: str
    tokens_per_step: int
    seq_len: int
    total_params: int
    active_params: int
    replicated_params: int  # per rank
    expert_params_per_rank: int
    memory: dict[str, float]  # bytes per rank: parameters, gradients, optimizer, activations
    flops_forward_per_token: float
    traffic: list[RoutingTraffic] = field(default_factory=list)
    allreduce_bytes: float = 0.0  # gradient all-reduce per step per rank (ring)

    @property
    def replicas(self) -> int:
        return self.devices // self.ep

    @property
    def tokens_per_rank(self) -> int:
        return self.tokens_per_step // self.devices


def validate(config: ModelConfig, devices: int, ep: int, max_devices: int | None,
             tokens_per_step: int, dtype: str) -> None:
    """The same set-up errors training would raise, before any arithmetic."""
    if devices < 1:
        raise ValueError(f"--devices must be >= 1, got {devices}")
    if ep < 1 or devices % ep:
        raise ValueError(f"--devices {devices} is not divisible by --ep {ep}: ranks form "
                         f"ep x replicas groups; pick an --ep that divides {devices}")
    E, K = config.n_routed_experts, config.num_experts_per_tok
    if E is None and ep > 1:
        raise ValueError(f"--ep {ep} needs routed experts; this preset is dense")
    if E is not None:
        check_expert_split(E, ep)
    if max_devices is not None:
        if not 1 <= max_devices <= ep:
            raise ValueError(f"--max-devices-per-token M={max_devices} must lie in "
                             f"[1, --ep {ep}]: a token can reach at most {ep} ranks")
        if E is not None and max_devices * (E // ep) < K:
            raise ValueError(f"--max-devices-per-token M={max_devices}: {max_devices} "
                             f"ranks of {E // ep} experts cannot hold top-{K}; raise M")
    if tokens_per_step < devices or tokens_per_step % devices:
        raise ValueError(f"--tokens-per-step {tokens_per_step} must be a positive multiple "
                         f"of --devices {devices} (each rank takes an equal share)")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}")


def activation_bytes_per_token(config: ModelConfig, dtype: str) -> float:
    """Bytes kept for backward per token (module docstring's model)."""
    c, b = config, DTYPE_BYTES[dtype]
    D, V = c.hidden_size, c.vocab_size
    attention = (2 * D + sum(attention_widths(c))) * b
    ffn_common = 2 * D * b
    dense = 3 * c.intermediate_size * b
    total = 0.0
    for i in range(c.num_hidden_layers):
        total += attention + ffn_common
        if c.is_moe_layer(i):
            E, K, F = c.n_routed_experts, c.num_experts_per_tok, c.moe_intermediate_size
            total += 2 * E * 4 + (3 * F * (c.n_shared_experts or 0) + K * (2 * D + 3 * F)) * b
        else:
            total += dense
    return total + (D + V) * b + V * 4


def forward_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    counts = count_parameters(config)
    matmul = counts.active - counts.embedding - counts.norms
    q, _, _, o = attention_widths(config)  # scores q.k over q's width, then values (o)
    return 2.0 * matmul + 2.0 * config.num_hidden_layers * (q + o) * seq_len


def make_plan(config: ModelConfig, devices: int, *, ep: int | None = None,
              max_devices: int | None = None, tokens_per_step: int | None = None,
              dtype: str = "bf16", seq_len: int | None = None) -> Plan:
    """Plan training of ``config`` on ``devices`` ranks (EP ``ep``, default all of them)."""
    for flag, value in (("--devices", devices), ("--ep", ep), ("--seq-len", seq_len),
                        ("--tokens-per-step", tokens_per_step)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):  # 0 must not mean "the default"
            raise ValueError(f"{flag} must be a positive integer, got {value!r}")
    E = config.n_routed_experts
    ep = (devices if E is not None and E % devices == 0 else 1) if ep is None else ep
    seq_len = seq_len or config.max_position_embeddings
    tokens_per_step = tokens_per_step or devices * seq_len
    validate(config, devices, ep, max_devices, tokens_per_step, dtype)
    counts = count_parameters(config)
    expert_per_rank = counts.routed_experts // ep
    replicated = counts.total - counts.routed_experts
    per_rank = replicated + expert_per_rank
    b = DTYPE_BYTES[dtype]
    tokens_per_rank = tokens_per_step // devices
    memory = {
        "parameters": per_rank * b,
        "gradients": per_rank * b,
        "optimizer": per_rank * (8 + (4 if b < 4 else 0)),
        "activations": tokens_per_rank * activation_bytes_per_token(config, dtype),
    }
    traffic = _traffic(config, ep, max_devices, tokens_per_rank, b)
    W, R = devices, devices // ep
    allreduce = (2 * (W - 1) / W * replicated * b if W > 1 else 0.0) + (
        2 * (R - 1) / R * expert_per_rank * b if R > 1 else 0.0)
    return Plan(config, devices, ep, dtype, tokens_per_step, seq_len, counts.total,
                counts.active, replicated, expert_per_rank, memory,
                forward_flops_per_token(config, seq_len), traffic, allreduce)


def _traffic(config: ModelConfig, ep: int, max_devices: int | None, tokens_per_rank: int,
             b: int) -> list[RoutingTraffic]:
    """Rows: unrestricted routing, then device-limited with the given M, or every M that
    can hold top-K and limits anything (M < ep)."""
    E, K = config.n_routed_experts, config.num_experts_per_tok
    if E is None or ep == 1:
        return []
    n_moe = len(config.moe_layer_indices)
    base = config.replace(topk_method="greedy", n_devices=ep, max_devices_per_token=None)
    # M >= K cannot bind (K experts span at most K ranks); M * E/ep < K cannot hold top-K.
    limits = [max_devices] if max_devices is not None else [
        m for m in range(1, min(ep, K)) if m * (E // ep) >= K]
    rows = []
    for M in [None] + [m for m in limits if m < ep]:
        cfg = base if M is None else base.replace(topk_method="device_limited",
                                                  max_devices_per_token=M)
        per_layer = a2a_bytes_per_layer(cfg, tokens_per_rank, ep, bytes_per_elem=b)
        label = f"top-{K} of {E}" if M is None else f"device-limited, M={M}"
        rows.append(RoutingTraffic(label, M, per_layer["ranks_per_token"],
                                   per_layer["ranks_per_token"] / ep,
                                   n_moe * per_layer["payload"], n_moe * per_layer["metadata"]))
    return rows


# --- presentation --------------------------------------------------------------------------------
def format_bytes(n: float) -> str:
    """Binary units: 512 B, 3.0 KiB, 1.25 GiB."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n:,.0f} B"


def format_count(n: float, unit: str = "") -> str:
    """Decimal prefixes: 2.83B, 1.2M, 512 (parameters); 6.18 G (FLOPs with unit)."""
    prefixes = (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)) if unit else (
        ("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3))
    for prefix, scale in prefixes:
        if n >= scale:
            return f"{n / scale:,.2f}{' ' if unit else ''}{prefix}{unit}"
    return f"{n:,.0f}{' ' + unit if unit else ''}"


def format_plan(plan: Plan, name: str = "") -> str:
    """A markdown report of ``plan``."""
    c = plan.config
    n_moe = len(c.moe_layer_indices)
    E = c.n_routed_experts or 0
    flops = plan.flops_forward_per_token
    lines = [
        f"## {name or 'model'} on {plan.devices} device(s): EP {plan.ep} x {plan.replicas} "
        f"replica(s), {plan.dtype}",
        "",
        f"- parameters: {format_count(plan.total_params)} total, "
        f"{format_count(plan.active_params)} active per token; per rank "
        f"{format_count(plan.replicated_params)} replicated + "
        f"{format_count(plan.expert_params_per_rank)} routed experts "
        f"({E // plan.ep} of {E} per MoE layer)",
        f"- tokens per step: {plan.tokens_per_step:,} ({plan.tokens_per_rank:,} per rank), "
        f"sequence length {plan.seq_len:,}",
        f"- FLOPs per token: {format_count(flops, 'FLOP')} forward, "
        f"{format_count(3 * flops, 'FLOP')} training; per step per rank "
        f"{format_count(3 * flops * plan.tokens_per_rank, 'FLOP')}",
        "",
        "| memory per rank | bytes |",
        "|---|---:|",
        f"| parameters ({plan.dtype}) | {format_bytes(plan.memory['parameters'])} |",
        f"| gradients ({plan.dtype}) | {format_bytes(plan.memory['gradients'])} |",
        "| optimizer (AdamW m, v fp32" + (" + fp32 master" if plan.dtype != "fp32" else "")
        + f") | {format_bytes(plan.memory['optimizer'])} |",
        f"| activations ({plan.tokens_per_rank:,} tokens, no recomputation) | "
        f"{format_bytes(plan.memory['activations'])} |",
        f"| **total** | **{format_bytes(sum(plan.memory.values()))}** |",
    ]
    if plan.traffic:
        lines += [
            "",
            f"All-to-all per step per rank ({n_moe} MoE layers, forward + backward; "
            "expected under uniform routing):",
            "",
            "| routing | ranks per token | share of tokens each other rank receives "
            "| payload | metadata |",
            "|---|---:|---:|---:|---:|",
        ]
        for row in plan.traffic:
            lines.append(f"| {row.label} | {row.ranks_per_token:.2f} | "
                         f"{row.fraction_per_remote_rank:.3f} | "
                         f"{format_bytes(row.payload_bytes)} | "
                         f"{format_bytes(row.metadata_bytes)} |")
    lines += ["", "Gradient all-reduce per step per rank (ring): "
              f"{format_bytes(plan.allreduce_bytes)}"]
    return "\n".join(lines)
