"""MoELayer: DeepSeekMoE's feed-forward block (residual not included).

forward(x):
  1. router: fp32 scores -> top-K experts per token and their gate weights
  2. dispatch: sort assignments by expert; in training with ``drop_tokens``, drop each
     expert's lowest-affinity assignments beyond its capacity
  3. experts: one grouped matmul over the stacked expert weights
  4. combine: weighted sum over each token's K outputs, plus the shared experts
  5. balance losses (training only, as DeepSeek computes them) and expert load
The same path runs in train and eval mode; without dropping, outputs are identical.

Design choices (the seams expert parallelism uses; ``dsmoe.moe.parallel`` fills them from
outside, on a built layer, the way quantization swaps experts):
- Steps 2-4 are the layer's ``dispatcher``: ``LocalDispatcher`` runs every expert in this
  process; ``parallel.AllToAllDispatcher`` sends tokens to the ranks owning their experts.
  Both take (tokens, route, experts, capacity factor) and return a ``Dispatched``: the
  routed output and the per-expert counts. ``experts`` is whatever block of experts this
  process holds (all of them, or one rank's shard).
- Step 5 has one loss table, ``_loss_terms``; where the selection frequencies are counted
  is the layer's ``balance_total`` (``None``: this call's tokens; a sum over the ranks
  under data/expert parallelism, see ``dsmoe.moe.balance``).

Shapes: B batch, S sequence, T = B*S tokens, D hidden, E experts, K picks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
from torch import nn

from dsmoe.checkpoint import keys
from dsmoe.config import ModelConfig, MoEConfig
from dsmoe.mlp import SwiGLUMLP
from dsmoe.moe import balance
from dsmoe.moe.dispatch import expert_capacity, plan_dispatch, run_experts
from dsmoe.moe.experts import SwiGLUExperts
from dsmoe.moe.router import Router, RouterOutput


@dataclass
class MoEOutput:
    hidden_states: torch.Tensor  # [B, S, D] (or [T, D]): shared + routed, no residual
    aux_loss: torch.Tensor  # scalar: sum of the weighted balance losses
    losses: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> alpha * loss
    expert_counts: torch.Tensor | None = None  # [E] assignments per expert chosen by router
    topk_idx: torch.Tensor | None = None  # [T, K]
    topk_weight: torch.Tensor | None = None  # [T, K] fp32
    router_logits: torch.Tensor | None = None  # [T, E] fp32
    dropped_fraction: torch.Tensor | None = None  # scalar: share of assignments dropped


# fn(route, probs [T, E], B, S, total) -> the loss before its alpha
LossTerm = Callable[[RouterOutput, torch.Tensor, int, int, "balance.Total | None"], torch.Tensor]


def _loss_terms(cfg: MoEConfig) -> dict[str, tuple[float, LossTerm]]:
    """The balance losses this config asks for: name -> (alpha, fn)."""
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    terms: dict[str, tuple[float, LossTerm]] = {}
    if cfg.aux_loss_alpha > 0:
        terms["expert"] = (cfg.aux_loss_alpha, lambda r, p, B, S, total: (
            balance.expert_balance_loss(p.view(B, S, E), r.topk_idx.view(B, S, K), E,
                                        cfg.seq_aux, total)))
    if cfg.device_balance_alpha > 0 and cfg.n_devices > 1:
        terms["device"] = (cfg.device_balance_alpha, lambda r, p, B, S, total: (
            balance.device_balance_loss(p, r.topk_idx, E, cfg.n_devices, total)))
    if cfg.comm_balance_alpha > 0 and cfg.n_devices > 1:
        terms["comm"] = (cfg.comm_balance_alpha, lambda r, p, B, S, total: (
            balance.comm_balance_loss(p, r.topk_idx, E, cfg.n_devices, cfg.max_devices,
                                      total)))
    if cfg.z_loss_alpha > 0:
        terms["z"] = (cfg.z_loss_alpha, lambda r, p, B, S, total: balance.z_loss(r.logits))
    return terms


def _none(*args: object) -> None:
    return None


# --- dispatchers ---------------------------------------------------------------------------
@dataclass
class Dispatched:
    """What a dispatcher returns."""

    out: torch.Tensor  # [T, D] routed output: each token's weighted sum over its K experts
    counts: torch.Tensor  # [E] assignments per expert chosen for these T tokens (pre-drop)
    dropped_fraction: torch.Tensor  # scalar: share of assignments dropped over capacity
    shared_added: bool = False  # out already holds the shared experts' output


class LocalDispatcher(nn.Module):
    """Every expert lives in this process: plan (sort by expert, drop over capacity) ->
    grouped experts -> combine. ``capacity_factor`` ``None``: drop nothing. A CPU decode
    step whose experts offer ``decode_step`` runs all three in that one native call
    instead: at batch <= 8 the torch ops between the matmuls cost more than the matmuls'
    own overhead (benchmarks/quantized.py)."""

    def forward(self, tokens: torch.Tensor, route: RouterOutput, experts: nn.Module,
                capacity_factor: float | None, shared: tuple | None = None) -> Dispatched:
        """``shared``: the shared experts' operands, for the decode step's one call to add
        (``Dispatched.shared_added`` says whether it did)."""
        T, K = route.topk_idx.shape
        E = route.scores.shape[-1]
        capacity = None
        if capacity_factor is not None:
            capacity = expert_capacity(capacity_factor, T, K, E)
        if capacity is None:  # a decode step the experts run in one native call
            fused = experts.decode_step(tokens, route.topk_idx, route.topk_weight, shared)
            if fused is not None:
                out, counts = fused
                return Dispatched(out, counts, out.new_zeros((), dtype=torch.float32),
                                  shared is not None)
        plan = plan_dispatch(route.topk_idx, E, capacity, route.topk_score)
        # gather -> experts -> combine; the gather is an index_select, not tokens[idx]:
        # CPU advanced indexing opens a thread pool region even for one decode token's rows.
        out = run_experts(experts, tokens, plan, route.topk_weight.to(tokens.dtype))  # [T, D]
        dropped = 1.0 - plan.counts.sum().float() / max(plan.n_assignments, 1)
        return Dispatched(out, plan.routed_counts, dropped)


class MoELayer(nn.Module):
    """One DeepSeekMoE FFN block. ``experts`` / ``shared_experts`` may be swapped in (the
    facade uses ReLU experts; quantized or expert-parallel variants replace them)."""

    def __init__(self, config: MoEConfig | ModelConfig, *, experts: nn.Module | None = None,
                 shared_experts: nn.Module | None = None) -> None:
        super().__init__()
        if isinstance(config, ModelConfig):  # a whole model's config: its MoE part
            if config.moe is None:
                raise ValueError("MoELayer needs n_routed_experts (the config describes a "
                                 "dense model)")
            config = config.moe
        if not isinstance(config, MoEConfig):
            raise TypeError(f"MoELayer expects a MoEConfig or ModelConfig, got "
                            f"{type(config).__name__}")
        self.config = config
        E, D, F = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        std = config.initializer_range
        self.gate = Router(config)
        self.experts = experts or SwiGLUExperts(E, D, F, config.hidden_act, std)
        n_shared = config.n_shared_experts or 0
        if shared_experts is None and n_shared > 0:
            shared_experts = SwiGLUMLP(D, F * n_shared, config.hidden_act, std)
        self.shared_experts = shared_experts
        self.loss_terms = _loss_terms(config)
        self.dispatcher: nn.Module = LocalDispatcher()
        # Where the balance losses count selection frequencies: None = this call's tokens
        # (set from outside by dsmoe.moe.parallel to a sum over the data-parallel ranks).
        self.balance_total: balance.Total | None = None
        # Tokens per expert since the last bias update (training only); not checkpointed
        # on purpose: it is reset by every optimizer step. NOTE: an integer buffer, so
        # ``.to(torch.bfloat16)`` leaves it alone (a bf16 counter rounds past 256).
        self.register_buffer("load_counts", torch.zeros(E, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor, *, check_finite: bool = False) -> MoEOutput:
        self._check_input(x, check_finite)
        cfg = self.config
        shape = x.shape
        B, S = (shape[0], shape[1]) if x.dim() == 3 else (1, shape[0])
        tokens = x.reshape(-1, shape[-1])  # [T, D]

        route = self.gate(tokens)
        capacity_factor = cfg.capacity_factor if cfg.drop_tokens and self.training else None
        shared = None  # a decode step may fold the shared experts into the experts' call
        if capacity_factor is None and self.shared_experts is not None:
            shared = getattr(self.shared_experts, "decode_operands", _none)(tokens)
        routed = self.dispatcher(tokens, route, self.experts, capacity_factor, shared)
        out = routed.out  # [T, D]
        if self.shared_experts is not None and not routed.shared_added:
            out = out + self.shared_experts(tokens)

        losses: dict[str, torch.Tensor] = {}
        if self.training and self.loss_terms:  # also for T = 0: every rank must take part
            probs = self._balance_probs(route.scores)
            losses = {name: alpha * fn(route, probs, B, S, self.balance_total)
                      for name, (alpha, fn) in self.loss_terms.items()}
        if self.training:
            with torch.no_grad():
                self.load_counts += routed.counts
        aux = sum(losses.values()) if losses else tokens.new_zeros((), dtype=torch.float32)
        return MoEOutput(out.view(shape), aux, losses, routed.counts, route.topk_idx,
                         route.topk_weight, route.logits, routed.dropped_fraction)

    def _balance_probs(self, scores: torch.Tensor) -> torch.Tensor:
        """Affinities the balance losses use: softmax scores as they are; sigmoid scores
        normalised to sum to one per token (DeepSeek-V3's sequence-wise loss)."""
        if self.config.scoring_func == "sigmoid":
            return scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)
        return scores

    def _check_input(self, x: torch.Tensor, check_finite: bool) -> None:
        D = self.config.hidden_size
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"MoELayer expects a tensor, got {type(x).__name__}")
        if x.dim() not in (2, 3) or x.shape[-1] != D:
            raise ValueError(f"MoELayer expects [batch, seq, {D}] or [tokens, {D}], "
                             f"got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"MoELayer expects a floating-point input, got {x.dtype}")
        if check_finite and not torch.isfinite(x).all():
            raise ValueError("MoELayer input contains NaN or inf")

    # --- aux-loss-free balancing (V3) ----------------------------------------------------
    @torch.no_grad()
    def update_bias(self, expert_load: torch.Tensor | None = None) -> torch.Tensor:
        """Call after each optimizer step: nudge the routing bias towards balance using the
        load seen since the last call (or ``expert_load``, e.g. all-reduced across ranks)."""
        load = self.load_counts if expert_load is None else expert_load
        error = self.gate.update_bias(load, self.config.bias_update_speed)
        self.load_counts.zero_()
        return error

    # --- HF checkpoint keys ----------------------------------------------------------------
    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """This layer's weights under HF DeepSeek key names (per-expert tensors)."""
        self._check_holds_every_expert()
        return keys.moe_to_hf(self.state_dict())

    def _check_holds_every_expert(self) -> None:
        """HF names number experts 0..E-1: a layer holding one rank's shard has no names."""
        held = getattr(self.experts, "num_experts", self.config.n_routed_experts)
        if held != self.config.n_routed_experts:
            raise NotImplementedError(
                f"this layer holds {held} of its {self.config.n_routed_experts} experts "
                "(an expert-parallel shard): gather the model first "
                "(dsmoe.distributed.gather_model), or load HF weights before parallelize")

    def load_hf_state_dict(self, state_dict: Mapping[str, torch.Tensor], *,
                           assign: bool = False) -> None:
        """Load HF-named weights (``gate.weight``, ``experts.{e}.*``, ``shared_experts.*``,
        V3's ``gate.e_score_correction_bias``); missing, unexpected or misshapen tensors
        raise a ``ValueError`` naming them."""
        self._check_holds_every_expert()
        # Check under HF names first, so errors name the tensors the caller passed (a
        # misshapen single expert would otherwise fail inside torch.stack).
        expected = keys.moe_to_hf({k: v.to("meta") for k, v in self.state_dict().items()})
        keys.check_shapes({k: tuple(v.shape) for k, v in expected.items()}, state_dict)
        native = keys.moe_from_hf(state_dict, self.config.n_routed_experts)
        keys.check_state_dict(self, native)
        bias = "gate.e_score_correction_bias"
        if bias in native:  # balancing state stays fp32, also with assign=True
            native[bias] = native[bias].float()
        self.load_state_dict(native, strict=True, assign=assign)
