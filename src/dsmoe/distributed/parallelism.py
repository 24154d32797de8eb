"""Applying data and expert parallelism to a built model, and validating the set-up.

Design choices:
- Ranks form an ``ep_size x replicas`` grid: EP groups are contiguous ranks (one node's
  fast links carry the all-to-all), and rank ``r`` holds expert block ``r % ep_size``.
- ``parallelize`` changes the model from outside, in place: each ``MoELayer`` gets its
  expert shard, an all-to-all dispatcher and a global balance-frequency source
  (``dsmoe.moe.parallel.parallelize_layer``); its class and forward stay the same.
- Every check runs before the first collective, so a bad set-up raises on every rank
  instead of leaving ranks waiting for each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from dsmoe.config import ModelConfig, MoEConfig, check_expert_split
from dsmoe.moe.layer import MoELayer
from dsmoe.moe.parallel import is_expert_parallel, parallelize_layer


# --- topology --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Topology:
    """Where this rank sits in the ``ep_size x replicas`` grid and its process groups."""

    rank: int
    world: int
    ep_size: int
    ep_group: dist.ProcessGroup | None  # the N ranks that together hold all experts
    replica_group: dist.ProcessGroup | None  # ranks holding this rank's expert block
    data_group: dist.ProcessGroup | None  # all ranks: the batch is split over them

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep_size

    @property
    def replicas(self) -> int:
        return self.world // self.ep_size

    @classmethod
    def create(cls, ep_size: int) -> "Topology":
        """Build the process groups (a collective: every rank must call it)."""
        rank, world = dist.get_rank(), dist.get_world_size()
        check_world(world, ep_size)
        everyone = dist.group.WORLD
        ep_group = replica_group = None
        if ep_size == world:
            ep_group = everyone
        elif ep_size > 1:  # new_group is collective: create every group on every rank
            for start in range(0, world, ep_size):
                g = dist.new_group(list(range(start, start + ep_size)))
                if start <= rank < start + ep_size:
                    ep_group = g
        if ep_size == 1:
            replica_group = everyone
        elif ep_size < world:
            for block in range(ep_size):
                g = dist.new_group(list(range(block, world, ep_size)))
                if rank % ep_size == block:
                    replica_group = g
        return cls(rank, world, ep_size, ep_group, replica_group, everyone)


# --- validation --------------------------------------------------------------------------------
def check_world(world: int, ep_size: int) -> None:
    if isinstance(ep_size, bool) or not isinstance(ep_size, int) or ep_size < 1:
        raise ValueError(f"--ep must be a positive integer, got {ep_size!r}")
    if world % ep_size:
        raise ValueError(f"world size {world} is not divisible by --ep {ep_size}: the ranks "
                         f"form ep x replicas groups; use --nproc/--nproc-per-node a multiple "
                         f"of {ep_size} or an --ep that divides {world}")


def check_parallel_setup(config: ModelConfig | MoEConfig, world: int, ep_size: int) -> None:
    """Clear errors for set-ups expert parallelism cannot run (before any collective)."""
    check_world(world, ep_size)
    E = config.n_routed_experts
    if ep_size == 1 or E is None:
        if E is None and ep_size > 1:
            raise ValueError(f"--ep {ep_size} needs routed experts; this model is dense "
                             "(use --ep 1 for data parallelism)")
        return
    check_expert_split(E, ep_size)
    _check_max_devices(config, ep_size)
    uses_devices = (config.topk_method == "device_limited" or config.device_balance_alpha > 0
                    or config.comm_balance_alpha > 0)
    if uses_devices and config.n_devices != ep_size:
        raise ValueError(f"the config routes over n_devices={config.n_devices} devices but "
                         f"--ep is {ep_size}; under expert parallelism the devices are the "
                         "EP ranks (build the config with ep_model_config)")


def ep_model_config(config: ModelConfig, ep_size: int) -> ModelConfig:
    """The config with the EP ranks as DeepSeek's devices (``n_devices = ep_size``) for
    device-limited routing and the device/communication balance losses."""
    if ep_size == 1 or config.n_routed_experts is None:
        return config
    _check_max_devices(config, ep_size)
    check_expert_split(config.n_routed_experts, ep_size)
    return config.replace(n_devices=ep_size)


def _check_max_devices(config: ModelConfig | MoEConfig, ep_size: int) -> None:
    M = config.max_devices_per_token
    if M is not None and M > ep_size:
        raise ValueError(f"max_devices_per_token M={M} exceeds the EP size {ep_size}: a "
                         f"token can reach at most {ep_size} ranks; lower M or raise --ep")


# --- model transformation ------------------------------------------------------------------------
def ep_layers(model: nn.Module) -> list[MoELayer]:
    """The model's MoE layers that hold one rank's block of experts."""
    return [m for m in model.modules() if is_expert_parallel(m)]


def parallelize(model: nn.Module, ep_size: int, *, sync_weights: bool = True) -> nn.Module:
    """Make ``model`` data- and expert-parallel in place and return it.

    Every ``MoELayer`` gets this rank's expert block, an all-to-all dispatcher and a
    global balance-frequency source (``parallelize_layer``; layers already done are left
    alone); with ``sync_weights`` all replicated tensors are broadcast from rank 0 (and
    each expert block from its first holder), so ranks start identical even if their
    initial seeds differed. Build the optimizer *after* this call. A collective.
    """
    if not (dist.is_available() and dist.is_initialized()):
        if ep_size != 1:
            raise ValueError(f"--ep {ep_size} needs a process group: start with torchrun "
                             "or --nproc")
        return model
    world = dist.get_world_size()
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    for layer in layers:
        check_parallel_setup(layer.config, world, ep_size)
    if not layers:
        check_world(world, ep_size)
        if ep_size > 1:
            raise ValueError(f"--ep {ep_size} needs MoE layers; this model has none")
    topology = Topology.create(ep_size)
    for layer in layers:
        parallelize_layer(layer, topology)
    if sync_weights:
        _broadcast_weights(model, topology)
    return model


def expert_params(model: nn.Module) -> tuple[list[nn.Parameter], dist.ProcessGroup | None]:
    """The parameters of every rank-local expert block, and the group of ranks that hold
    the same blocks (their replicas)."""
    layers = ep_layers(model)
    params = [p for layer in layers for p in layer.experts.parameters()]
    return params, (layers[0].dispatcher.replica_group if layers else None)


def _broadcast_weights(model: nn.Module, topology: Topology) -> None:
    expert, replica_group = expert_params(model)
    expert_ids = {id(p) for p in expert}
    shared = [p.data for p in model.parameters() if id(p) not in expert_ids]
    shared += [b for name, b in model.named_buffers() if not name.endswith("load_counts")]
    _broadcast_coalesced(shared, src=0, group=dist.group.WORLD)
    if expert and replica_group is not None and topology.ep_size > 1:
        _broadcast_coalesced([p.data for p in expert], src=topology.ep_rank, group=replica_group)


def _broadcast_coalesced(tensors: Sequence[torch.Tensor], src: int,
                         group: dist.ProcessGroup | None) -> None:
    for bucket in dtype_buckets(tensors):
        flat = _flatten_dense_tensors(bucket)
        dist.broadcast(flat, src=src, group=group)  # src is a global rank
        for t, synced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            t.copy_(synced)


def dtype_buckets(tensors: Iterable[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Tensors grouped by (dtype, device): each group flattens into one collective."""
    buckets: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        buckets.setdefault((t.dtype, t.device), []).append(t)
    return list(buckets.values())
