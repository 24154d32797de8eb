"""Expert parallelism (EP): the routed experts of a MoE layer split across ranks.

Each of the N ranks of an EP group owns a contiguous block of E/N experts (rank r owns
experts [r*E/N, (r+1)*E/N)), which is exactly what DeepSeek's "device" means in
device-limited routing and in the device/communication balance losses.

forward, on every rank, for its own tokens:
  1. route with the replicated router (same code as the single-process layer)
  2. per token, the set of ranks owning its experts; each (token, rank) pair is one row to
     send: a token goes to a rank *once* however many of its experts live there (so with
     device-limited routing a token really travels to at most M ranks)
  3. exchange counts (``all_to_all_single`` on a small int tensor): rows per rank,
     assignments per expert, tokens per rank (for the capacity)
  4. send the rows (``all_to_all_single`` with uneven splits), plus per row the K slots'
     local expert ids and gate weights (fp32)
  5. the owner expands rows into (row, slot) assignments, groups them by local expert with
     the single-process ``plan_dispatch`` (dropping over capacity by affinity, the
     capacity computed from the EP group's token count), runs its experts as one grouped
     matmul, and sums each row's slots with its gate weights (``combine``)
  6. send each row's partial sum back (the reverse all-to-all) and add a token's partial
     sums in a fixed order (deterministic, no scatter-add)

Design choices:
- Gate weights travel with the tokens and the owner does the weighted sum, so both
  directions move one row per (token, rank) pair, as DeepSeek's dispatch/combine kernels
  do; the gradient of the gate weights comes back through the same exchange.
- ``_AllToAll`` is an autograd function: its backward is the reverse all-to-all, so
  gradients reach the tokens' home ranks and the router, shared experts and attention.
- Balance losses: f (selection frequency) is counted over all data-parallel ranks' tokens
  (an all-gather of the [T, K] expert ids, no gradient), P (mean affinity) over the local
  tokens. The mean of the ranks' losses then equals the single-process loss on the global
  batch, and so do its gradients once they are averaged across ranks.
- Bytes sent to *other* ranks are counted per exchange in ``CommCounter`` (forward and
  backward, payload and metadata separately); ``dsmoe.plan`` predicts the same numbers.

Shapes: T tokens on this rank, D hidden, E experts, K picks, N ranks in the EP group,
El = E/N local experts, P (token, rank) pairs this rank sends, R rows it receives.
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch
import torch.distributed as dist
from torch import nn

from dsmoe.moe import balance
from dsmoe.moe.dispatch import DispatchPlan, combine, expert_capacity, plan_dispatch
from dsmoe.moe.layer import MoELayer, MoEOutput
from dsmoe.moe.router import RouterOutput

if TYPE_CHECKING:
    from dsmoe.distributed import Topology

PAYLOAD_KINDS = ("dispatch", "combine", "dispatch_grad", "combine_grad")
META_KINDS = ("counts", "meta", "meta_grad")


# --- communication accounting ---------------------------------------------------------------
@dataclass
class CommCounter:
    """Bytes this rank sent to other ranks, by exchange. Rows a rank "sends" to itself are
    a local copy and are not counted (``dsmoe.plan`` counts the same way)."""

    bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        PAYLOAD_KINDS + META_KINDS, 0))

    def add(self, kind: str, n_bytes: int) -> None:
        self.bytes[kind] += int(n_bytes)

    @property
    def payload(self) -> int:
        """Hidden-state rows (tokens out, results back, and their gradients)."""
        return sum(self.bytes[k] for k in PAYLOAD_KINDS)

    @property
    def metadata(self) -> int:
        """Counts, expert ids and gate weights (and the weights' gradients)."""
        return sum(self.bytes[k] for k in META_KINDS)

    def reset(self) -> None:
        for key in self.bytes:
            self.bytes[key] = 0


# --- the differentiable exchange --------------------------------------------------------------
class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with uneven splits; backward runs the reverse exchange."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int],  # noqa: ANN001
                group: dist.ProcessGroup | None, counter: CommCounter | None, kind: str
                ) -> torch.Tensor:
        ctx.splits, ctx.group, ctx.counter, ctx.kind = (out_splits, in_splits), group, counter, kind
        return _exchange(x, out_splits, in_splits, group, counter, kind)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        out_splits, in_splits = ctx.splits
        grad_x = _exchange(grad, in_splits, out_splits, ctx.group, ctx.counter,
                           f"{ctx.kind}_grad")
        return grad_x, None, None, None, None, None


def _exchange(x: torch.Tensor, out_splits: list[int], in_splits: list[int],
              group: dist.ProcessGroup | None, counter: CommCounter | None, kind: str
              ) -> torch.Tensor:
    """Send rows ``x[sum(in_splits[:r]):...]`` to rank r; receive ``out_splits[r]`` from r."""
    x = x.contiguous()
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x, out_splits, in_splits, group=group)
    if counter is not None:
        me = dist.get_rank(group)
        row_bytes = math.prod(x.shape[1:]) * x.element_size()  # x may have no rows
        counter.add(kind, (sum(in_splits) - in_splits[me]) * row_bytes)
    return out


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int],
               group: dist.ProcessGroup | None = None, counter: CommCounter | None = None,
               kind: str = "dispatch") -> torch.Tensor:
    """Differentiable uneven all-to-all of the rows of ``x`` (see ``_AllToAll``)."""
    return _AllToAll.apply(x, out_splits, in_splits, group, counter, kind)


def all_gather_rows(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Concatenate every rank's ``x [n_r, ...]`` in rank order (n_r may differ); no grad."""
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, n, group=group)
    longest = int(max(s.item() for s in sizes))
    padded = x.new_zeros((longest,) + tuple(x.shape[1:]))
    padded[: x.shape[0]] = x
    pieces = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(pieces, padded, group=group)
    return torch.cat([p[: int(s.item())] for p, s in zip(pieces, sizes)])


# --- dispatch across ranks --------------------------------------------------------------------
@dataclass
class DispatchStats:
    routed_counts: torch.Tensor  # [E] assignments this rank's tokens chose (before dropping)
    dropped_fraction: torch.Tensor  # scalar: share of the EP group's assignments dropped
    ranks_per_token: torch.Tensor  # [T] distinct ranks each local token was sent to (own too)
    local_expert_load: torch.Tensor  # [El] assignments the whole group routed to my experts


class ExpertParallelDispatch(nn.Module):
    """Moves tokens to the ranks owning their experts and brings the results back (steps
    2-6 of the module docstring). No parameters: the experts are passed to ``forward``."""

    def __init__(self, n_experts: int, group: dist.ProcessGroup | None, ep_size: int,
                 ep_rank: int, max_ranks_per_token: int | None = None) -> None:
        super().__init__()
        if n_experts % ep_size:
            raise ValueError(f"n_routed_experts={n_experts} is not divisible by the EP size "
                             f"{ep_size}; pick an EP size that divides it")
        self.n_experts, self.group, self.ep_size, self.ep_rank = (
            n_experts, group, ep_size, ep_rank)
        self.local_experts = n_experts // ep_size
        self.max_ranks_per_token = max_ranks_per_token  # M with device-limited routing
        self.counter = CommCounter()

    def extra_repr(self) -> str:
        return (f"experts={self.n_experts}, ep_size={self.ep_size}, ep_rank={self.ep_rank}, "
                f"local_experts={self.local_experts}")

    def forward(self, tokens: torch.Tensor, route: RouterOutput, experts: nn.Module,
                capacity_factor: float | None) -> tuple[torch.Tensor, DispatchStats]:
        """tokens [T, D] -> routed output [T, D] (weighted sum over the K experts)."""
        if self.ep_size == 1:
            return self._local(tokens, route, experts, capacity_factor)
        T, K = route.topk_idx.shape
        D, N, El = tokens.shape[-1], self.ep_size, self.local_experts
        topk_idx = route.topk_idx  # [T, K]
        dest = topk_idx // El  # [T, K] owning rank of each pick
        sent = torch.zeros(T, N, dtype=torch.bool, device=tokens.device)
        sent.scatter_(1, dest, True)  # [T, N]: token t travels to rank r
        pair_rank, pair_token = sent.t().nonzero(as_tuple=True)  # [P], sorted by rank, token
        here = dest[pair_token] == pair_rank[:, None]  # [P, K]: slot k lives on that rank
        local_idx = torch.where(here, topk_idx[pair_token] - (pair_rank * El)[:, None], El)
        weight = torch.where(here, route.topk_weight[pair_token], 0.0)  # [P, K] fp32
        columns = [weight, local_idx.float()]
        if capacity_factor is not None:  # affinities rank assignments for dropping
            columns.append(route.topk_score.detach()[pair_token])
        meta = torch.cat(columns, dim=1)  # [P, 2K or 3K] fp32

        # 3. counts: rows per rank | assignments per expert of that rank | my token count
        routed = torch.bincount(topk_idx.reshape(-1), minlength=self.n_experts)  # [E]
        counts = torch.cat([sent.sum(dim=0, keepdim=True).t(), routed.view(N, El),
                            torch.full((N, 1), T, device=tokens.device)], dim=1)  # [N, El+2]
        recv_counts = _exchange(counts, [1] * N, [1] * N, self.group, self.counter, "counts")
        in_splits = counts[:, 0].tolist()  # rows I send to each rank
        out_splits = recv_counts[:, 0].tolist()  # rows each rank sends me
        group_tokens = int(recv_counts[:, -1].sum())

        # 4. tokens and their slots to the owners
        x_recv = all_to_all(tokens[pair_token], out_splits, in_splits, self.group,
                            self.counter, "dispatch")  # [R, D]
        meta_recv = all_to_all(meta, out_splits, in_splits, self.group, self.counter, "meta")
        w_recv = meta_recv[:, :K]  # [R, K]
        idx_recv = meta_recv[:, K:2 * K].detach().long()  # [R, K]; El = not mine
        score_recv = meta_recv[:, 2 * K:].detach() if capacity_factor is not None else None

        # 5. group by local expert (El = a "not here" bucket that sorts last), drop, run
        capacity = None
        if capacity_factor is not None:
            capacity = expert_capacity(capacity_factor, group_tokens, K, self.n_experts)
        plan = plan_dispatch(idx_recv, El + 1, capacity, score_recv)
        kept_counts = plan.counts[:El]  # [El]
        n_kept = int(kept_counts.sum())
        order = plan.order[:n_kept]
        local = DispatchPlan(order, order // K, kept_counts, plan.routed_counts[:El],
                             idx_recv.numel(), dropped=True)  # zero-filled combine
        expert_out = experts(x_recv[local.token_idx], local.counts)  # [A_kept, D]
        partial = combine(expert_out, local, w_recv.to(expert_out.dtype))  # [R, D]

        # 6. results home; add each token's partial sums in rank order
        back = all_to_all(partial, in_splits, out_splits, self.group, self.counter,
                          "combine")  # [P, D]
        slots = min(K, N, self.max_ranks_per_token or N)
        slot = (sent.cumsum(dim=1) - 1)[pair_token, pair_rank]  # [P]
        buffer = back.new_zeros(T * slots, D).index_copy(0, pair_token * slots + slot, back)
        out = buffer.view(T, slots, D).sum(dim=1)  # [T, D]

        dropped = torch.zeros((), device=tokens.device)
        if capacity is not None:
            tally = torch.tensor([n_kept, int(plan.routed_counts[:El].sum())],
                                 dtype=torch.float64, device=tokens.device)
            dist.all_reduce(tally, group=self.group)
            dropped = (1.0 - tally[0] / tally[1].clamp(min=1)).float()
        load = recv_counts[:, 1:El + 1].sum(dim=0)  # [El]
        return out, DispatchStats(routed, dropped, sent.sum(dim=1), load)

    def _local(self, tokens: torch.Tensor, route: RouterOutput, experts: nn.Module,
               capacity_factor: float | None) -> tuple[torch.Tensor, DispatchStats]:
        """EP size 1 (pure data parallelism): the single-process dispatch, unchanged."""
        T, K = route.topk_idx.shape
        capacity = None
        if capacity_factor is not None:
            capacity = expert_capacity(capacity_factor, T, K, self.n_experts)
        plan = plan_dispatch(route.topk_idx, self.n_experts, capacity, route.topk_score)
        expert_out = experts(tokens[plan.token_idx], plan.counts)  # [A_kept, D]
        out = combine(expert_out, plan, route.topk_weight.to(tokens.dtype))  # [T, D]
        dropped = (1.0 - plan.counts.sum().float() / max(plan.n_assignments, 1))
        ones = torch.ones(T, dtype=torch.long, device=tokens.device)
        return out, DispatchStats(plan.routed_counts, dropped, ones, plan.routed_counts)


# --- the EP layer -------------------------------------------------------------------------------
def slice_experts(experts: nn.Module, start: int, stop: int) -> nn.Module:
    """A copy of a stacked-experts module (every parameter ``[E, ...]``, no submodules, a
    ``num_experts`` attribute: ``SwiGLUExperts``, ``ReLUExperts``) holding experts
    [start, stop). Parameter names stay the same, so state-dict keys do too."""
    if any(True for _ in experts.children()):
        raise ValueError(f"cannot slice {type(experts).__name__}: expected stacked [E, ...] "
                         "parameters without submodules")
    E = getattr(experts, "num_experts", None)
    local = copy.copy(experts)  # shares attributes (activation, sizes); params replaced below
    local._parameters, local._buffers = {}, {}
    local._modules = {}
    for name, p in experts.named_parameters(recurse=False):
        if p.dim() == 0 or p.shape[0] != E:
            raise ValueError(f"cannot slice {type(experts).__name__}.{name} of shape "
                             f"{tuple(p.shape)}: not stacked over {E} experts")
        local.register_parameter(name, nn.Parameter(p.detach()[start:stop].clone(),
                                                    requires_grad=p.requires_grad))
    local.num_experts = stop - start
    return local


LossFn = Callable[[], torch.Tensor]


class ExpertParallelMoELayer(MoELayer):
    """A ``MoELayer`` whose routed experts live across an EP group (module docstring).

    Same parameters and names as the layer it replaces, except that ``experts`` holds only
    this rank's E/N experts; the router and shared experts are the replicated originals.
    Build it with ``from_layer``; ``dsmoe.distributed.parallelize`` does so for a model.
    """

    def __init__(self, layer: MoELayer, topology: "Topology") -> None:
        cfg = layer.config
        E, N = cfg.n_routed_experts, topology.ep_size
        if E % N:
            raise ValueError(f"n_routed_experts={E} is not divisible by the EP size {N}; "
                             f"pick an EP size that divides {E}")
        if N > 1 and cfg.topk_method == "device_limited" and cfg.n_devices != N:
            raise ValueError(f"device-limited routing groups experts into n_devices="
                             f"{cfg.n_devices} devices but the EP size is {N}; the devices "
                             f"must be the EP ranks (use dsmoe.distributed.ep_model_config)")
        El = E // N
        start = topology.ep_rank * El
        local = slice_experts(layer.experts, start, start + El)
        # NOTE: on meta, the base class's throw-away router and counters take neither
        # memory nor random numbers (the global RNG stays where single-process runs have it).
        with torch.device("meta"):
            super().__init__(cfg, experts=local, shared_experts=layer.shared_experts)
        self.gate = layer.gate  # replicated: the same parameters and bias buffer
        self.load_counts = layer.load_counts
        originals = dict(itertools.chain(layer.named_parameters(), layer.named_buffers()))
        left_on_meta = [name for name, t in itertools.chain(self.named_parameters(),
                                                            self.named_buffers())
                        if t.is_meta and not originals.get(name, t).is_meta]
        if left_on_meta:  # MoELayer grew state this class does not take over yet
            raise RuntimeError(f"ExpertParallelMoELayer did not take over {left_on_meta} "
                               "from the layer it replaces; update dsmoe.moe.parallel")
        self.train(layer.training)
        self.expert_offset = start
        self.data_group = topology.data_group  # every rank: the batch balance losses see
        M = cfg.max_devices if cfg.topk_method == "device_limited" else None
        self.dispatch = ExpertParallelDispatch(E, topology.ep_group, N, topology.ep_rank, M)
        self.replica_group = topology.replica_group  # ranks holding these same experts

    @classmethod
    def from_layer(cls, layer: MoELayer, topology: "Topology") -> "ExpertParallelMoELayer":
        return cls(layer, topology)

    def forward(self, x: torch.Tensor, *, check_finite: bool = False) -> MoEOutput:
        """As ``MoELayer.forward`` (a collective: every rank of the EP group must call it)."""
        self._check_input(x, check_finite)
        cfg = self.config
        shape = x.shape
        B, S = (shape[0], shape[1]) if x.dim() == 3 else (1, shape[0])
        tokens = x.reshape(-1, shape[-1])  # [T, D]

        route = self.gate(tokens)
        dropping = cfg.capacity_factor if cfg.drop_tokens and self.training else None
        out, stats = self.dispatch(tokens, route, self.experts, dropping)  # [T, D]
        if self.shared_experts is not None:
            out = out + self.shared_experts(tokens)

        losses = self._balance_losses(route, B, S) if self.training and self.loss_terms else {}
        if self.training:
            with torch.no_grad():
                self.load_counts += stats.routed_counts.to(self.load_counts.dtype)
        aux = sum(losses.values()) if losses else tokens.new_zeros((), dtype=torch.float32)
        self.last_ranks_per_token = stats.ranks_per_token  # [T]: for checks and benchmarks
        return MoEOutput(out.view(shape), aux, losses, stats.routed_counts, route.topk_idx,
                         route.topk_weight, route.logits, stats.dropped_fraction)

    def _balance_losses(self, route: RouterOutput, B: int, S: int) -> dict[str, torch.Tensor]:
        """The config's balance losses, with frequencies counted over all ranks' tokens
        (see the module docstring) so that their mean across ranks is the global loss."""
        cfg = self.config
        E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
        probs = self._balance_probs(route.scores)  # [T, E]
        global_names = {"device", "comm"} | ({"expert"} if not cfg.seq_aux else set())
        idx_all = None
        if global_names & set(self.loss_terms):
            idx_all = all_gather_rows(route.topk_idx, self.data_group)  # [T_all, K]
        terms: dict[str, LossFn] = {
            "expert": lambda: (
                balance.expert_balance_loss(probs.view(B, S, E), route.topk_idx.view(B, S, K),
                                            E, True) if cfg.seq_aux else
                balance.expert_balance_loss(probs.view(1, -1, E), idx_all.view(1, -1, K),
                                            E, False)),
            "device": lambda: balance.device_balance_loss(probs, idx_all, E, cfg.n_devices),
            "comm": lambda: balance.comm_balance_loss(probs, idx_all, E, cfg.n_devices,
                                                      cfg.max_devices),
            "z": lambda: balance.z_loss(route.logits),
        }
        unknown = set(self.loss_terms) - set(terms)
        if unknown:
            raise NotImplementedError(f"balance loss(es) {sorted(unknown)} have no "
                                      "expert-parallel form in dsmoe.moe.parallel yet")
        return {name: alpha * terms[name]() for name, (alpha, _) in self.loss_terms.items()}

    # --- HF checkpoint keys: only whole layers have them ---------------------------------
    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        stop = self.expert_offset + self.experts.num_experts
        raise NotImplementedError(f"an expert-parallel layer holds experts "
                                  f"[{self.expert_offset}, {stop}) only; gather the model "
                                  "first (dsmoe.distributed.gather_model)")

    def load_hf_state_dict(self, state_dict, *, assign: bool = False) -> None:  # noqa: ANN001
        raise NotImplementedError("load HF weights into the single-process model, then call "
                                  "dsmoe.distributed.parallelize")
