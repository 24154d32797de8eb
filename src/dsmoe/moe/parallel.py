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
  5. the owner expands rows into (row, slot) assignments and runs them through the
     single-process path: ``plan_dispatch`` groups them by local expert (dropping over
     capacity by affinity, the capacity computed from the EP group's token count) and
     ``run_experts`` runs its experts as one grouped matmul and sums each row's slots with
     their gate weights
  6. send each row's partial sum back (the reverse all-to-all) and add a token's partial
     sums in a fixed order (deterministic, no scatter-add)

Design choices:
- Expert parallelism is applied to a built ``MoELayer`` from outside
  (``parallelize_layer``), torchtitan's way: no subclass, no second forward. The layer's
  own ``forward`` runs on every rank; only its seams change (this rank's expert shard, an
  ``AllToAllDispatcher`` doing steps 2-6 instead of ``LocalDispatcher``, and a balance
  frequency source summed over the ranks).
- Gate weights travel with the tokens and the owner does the weighted sum, so both
  directions move one row per (token, rank) pair, as DeepSeek's dispatch/combine kernels
  do; the gradient of the gate weights comes back through the same exchange.
- ``_AllToAll`` is an autograd function: its backward is the reverse all-to-all, so
  gradients reach the tokens' home ranks and the router, shared experts and attention.
- Balance losses: f (selection frequency) is counted over all data-parallel ranks' tokens
  (``GroupSum``: an all-reduce of the counts, no gradient), P (mean affinity) over the
  local tokens (``dsmoe.moe.balance``). The mean of the ranks' losses then equals the
  single-process loss on the global batch, and so do its gradients once they are averaged
  across ranks.
- Bytes sent to *other* ranks are counted per exchange in ``CommCounter`` (forward and
  backward, payload and metadata separately); ``dsmoe.plan`` predicts the same numbers.

Shapes: T tokens on this rank, D hidden, E experts, K picks, N ranks in the EP group,
El = E/N local experts, P (token, rank) pairs this rank sends, R rows it receives.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from dsmoe.config import check_expert_split
from dsmoe.moe import balance
from dsmoe.moe.dispatch import DispatchPlan, expert_capacity, plan_dispatch, run_experts
from dsmoe.moe.layer import Dispatched, MoELayer
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


# --- dispatch across ranks --------------------------------------------------------------------
class AllToAllDispatcher(nn.Module):
    """``MoELayer``'s dispatcher when its experts live across an EP group: moves tokens to
    the ranks owning their experts and brings the results back (steps 2-6 of the module
    docstring). Same protocol as ``LocalDispatcher``; ``experts`` is this rank's block.
    A collective: every rank of the EP group must call it, also with no tokens."""

    def __init__(self, n_experts: int, group: dist.ProcessGroup | None, ep_size: int,
                 ep_rank: int, max_ranks_per_token: int | None = None,
                 replica_group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        check_expert_split(n_experts, ep_size)
        self.n_experts, self.group, self.ep_size, self.ep_rank = (
            n_experts, group, ep_size, ep_rank)
        self.local_experts = n_experts // ep_size
        self.max_ranks_per_token = max_ranks_per_token  # M with device-limited routing
        self.replica_group = replica_group  # ranks holding these same experts
        self.counter = CommCounter()
        self.last_ranks_per_token: torch.Tensor | None = None  # [T]: for checks, benchmarks

    @property
    def expert_offset(self) -> int:
        """Global id of this rank's first expert."""
        return self.ep_rank * self.local_experts

    def extra_repr(self) -> str:
        return (f"experts={self.n_experts}, ep_size={self.ep_size}, ep_rank={self.ep_rank}, "
                f"local_experts={self.local_experts}")

    def forward(self, tokens: torch.Tensor, route: RouterOutput, experts: nn.Module,
                capacity_factor: float | None, shared: tuple | None = None) -> Dispatched:
        """tokens [T, D] -> routed output [T, D] (weighted sum over the K experts).
        ``shared`` is ignored: the MoE layer runs its shared experts itself."""
        T, K = route.topk_idx.shape
        N, El = self.ep_size, self.local_experts
        dest = route.topk_idx // El  # [T, K] owning rank of each pick
        sent = torch.zeros(T, N, dtype=torch.bool, device=tokens.device)
        sent.scatter_(1, dest, True)  # [T, N]: token t travels to rank r
        pair_rank, pair_token = sent.t().nonzero(as_tuple=True)  # [P], sorted by rank, token

        # 3. counts: rows per rank | assignments per expert of that rank | my token count
        routed = balance.expert_counts(route.topk_idx, self.n_experts)  # [E]
        counts = torch.cat([sent.sum(dim=0, keepdim=True).t(), routed.view(N, El),
                            torch.full((N, 1), T, device=tokens.device)], dim=1)  # [N, El+2]
        recv_counts = _exchange(counts, [1] * N, [1] * N, self.group, self.counter, "counts")
        in_splits = counts[:, 0].tolist()  # rows I send to each rank
        out_splits = recv_counts[:, 0].tolist()  # rows each rank sends me

        # 4. tokens and their slots to the owners
        x_recv = all_to_all(tokens[pair_token], out_splits, in_splits, self.group,
                            self.counter, "dispatch")  # [R, D]
        meta = self._slot_meta(route, dest, pair_rank, pair_token, capacity_factor)
        meta_recv = all_to_all(meta, out_splits, in_splits, self.group, self.counter, "meta")

        # 5. the owner's experts, on the single-process dispatch path
        capacity = None
        if capacity_factor is not None:
            group_tokens = int(recv_counts[:, -1].sum())
            capacity = expert_capacity(capacity_factor, group_tokens, K, self.n_experts)
        partial, kept = self._run_local(x_recv, meta_recv, K, experts, capacity)  # [R, D]

        # 6. results home; add each token's partial sums in rank order
        back = all_to_all(partial, in_splits, out_splits, self.group, self.counter,
                          "combine")  # [P, D]
        out = self._sum_partials(back, sent, pair_rank, pair_token, K)  # [T, D]
        self.last_ranks_per_token = sent.sum(dim=1)
        return Dispatched(out, routed, self._dropped(kept, capacity, tokens.device))

    def _slot_meta(self, route: RouterOutput, dest: torch.Tensor, pair_rank: torch.Tensor,
                   pair_token: torch.Tensor, capacity_factor: float | None) -> torch.Tensor:
        """Per (token, rank) row: the K slots' gate weights and local expert ids (El: "not
        on that rank"), plus their affinities when dropping ranks them. [P, 2K or 3K] fp32."""
        El = self.local_experts
        here = dest[pair_token] == pair_rank[:, None]  # [P, K]: slot k lives on that rank
        local_idx = torch.where(here, route.topk_idx[pair_token] - (pair_rank * El)[:, None], El)
        weight = torch.where(here, route.topk_weight[pair_token], 0.0)  # [P, K] fp32
        columns = [weight, local_idx.float()]
        if capacity_factor is not None:
            columns.append(route.topk_score.detach()[pair_token])
        return torch.cat(columns, dim=1)

    def _run_local(self, x_recv: torch.Tensor, meta_recv: torch.Tensor, K: int,
                   experts: nn.Module, capacity: int | None
                   ) -> tuple[torch.Tensor, tuple[int, int]]:
        """Received rows -> each row's weighted sum over its slots on this rank's experts
        ([R, D]), with ``plan_dispatch`` and ``run_experts`` as in one process; and (kept,
        routed) assignment counts for the dropped fraction."""
        El = self.local_experts
        w_recv = meta_recv[:, :K]  # [R, K]
        idx_recv = meta_recv[:, K:2 * K].detach().long()  # [R, K]; El = not mine
        score_recv = meta_recv[:, 2 * K:].detach() if capacity is not None else None
        # El is a "not here" bucket that sorts last: cut it off the plan
        plan = plan_dispatch(idx_recv, El + 1, capacity, score_recv)
        kept_counts = plan.counts[:El]  # [El]
        n_kept = int(kept_counts.sum())
        order = plan.order[:n_kept]
        local = DispatchPlan(order, order // K, kept_counts, plan.routed_counts[:El],
                             idx_recv.numel(), dropped=True)  # zero-filled combine
        partial = run_experts(experts, x_recv, local, w_recv.to(x_recv.dtype))  # [R, D]
        return partial, (n_kept, int(plan.routed_counts[:El].sum()))

    def _sum_partials(self, back: torch.Tensor, sent: torch.Tensor, pair_rank: torch.Tensor,
                      pair_token: torch.Tensor, K: int) -> torch.Tensor:
        """[P, D] partial sums (by rank, then token) -> [T, D], each token's in rank order
        (deterministic: no scatter-add)."""
        T, N = sent.shape
        slots = min(K, N, self.max_ranks_per_token or N)  # most ranks one token reaches
        slot = (sent.cumsum(dim=1) - 1)[pair_token, pair_rank]  # [P]
        D = back.shape[1]
        buffer = back.new_zeros(T * slots, D).index_copy(0, pair_token * slots + slot, back)
        return buffer.view(T, slots, D).sum(dim=1)

    def _dropped(self, kept: tuple[int, int], capacity: int | None,
                 device: torch.device) -> torch.Tensor:
        """Share of the EP group's assignments dropped over capacity."""
        if capacity is None:
            return torch.zeros((), device=device)
        tally = torch.tensor(kept, dtype=torch.float64, device=device)
        dist.all_reduce(tally, group=self.group)
        return (1.0 - tally[0] / tally[1].clamp(min=1)).float()


# --- applying expert parallelism to a built layer ---------------------------------------------
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


class GroupSum:
    """``balance.Total`` over a process group: sums a tensor of counts in place (no grad)."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group

    def __call__(self, counts: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(counts, group=self.group)
        return counts


def parallelize_layer(layer: MoELayer, topology: "Topology") -> MoELayer:
    """Apply data and expert parallelism to a built ``MoELayer`` in place, and return it.

    The layer's class, forward and parameter names stay; three seams are filled:
    ``experts`` becomes this rank's block of E/N experts, ``dispatcher`` an
    ``AllToAllDispatcher`` over the EP group (EP size 1: both stay), and ``balance_total``
    a sum over every rank, so the balance losses count the global batch. The router and
    shared experts stay replicated. ``dsmoe.distributed.parallelize`` does this for a model.
    """
    cfg = layer.config
    E, N = cfg.n_routed_experts, topology.ep_size
    check_expert_split(E, N)
    if N > 1 and cfg.topk_method == "device_limited" and cfg.n_devices != N:
        raise ValueError(f"device-limited routing groups experts into n_devices="
                         f"{cfg.n_devices} devices but the EP size is {N}; the devices "
                         f"must be the EP ranks (use dsmoe.distributed.ep_model_config)")
    if N > 1 and not is_expert_parallel(layer):
        M = cfg.max_devices if cfg.topk_method == "device_limited" else None
        dispatcher = AllToAllDispatcher(E, topology.ep_group, N, topology.ep_rank, M,
                                        topology.replica_group)
        start = dispatcher.expert_offset
        layer.experts = slice_experts(layer.experts, start, start + dispatcher.local_experts)
        layer.dispatcher = dispatcher
    layer.balance_total = GroupSum(topology.data_group)
    return layer


def is_expert_parallel(layer: nn.Module) -> bool:
    """Whether ``layer`` is a ``MoELayer`` holding one rank's block of experts."""
    return isinstance(layer, MoELayer) and isinstance(layer.dispatcher, AllToAllDispatcher)
