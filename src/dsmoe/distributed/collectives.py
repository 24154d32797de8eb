"""Per-step collectives: gradient sync and clipping, expert loads, batch shards, logging.

Design choices:
- Gradient synchronisation is an explicit, bucketed all-reduce (DDP's arithmetic without
  its hooks): every gradient is summed over the ranks that hold that parameter and divided
  by the world size. For replicated parameters that is the mean; for experts, whose
  gradient already arrived from every EP rank's tokens through the all-to-all, it is the
  gradient of the global-batch mean loss. One call per optimizer step makes gradient
  accumulation free of ``no_sync`` contexts.
- Each rank takes a contiguous slice of rows of the step's *global* batch, so the data a
  step sees does not depend on the world size (resuming with another world size works).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed.tensor import DTensor

from dsmoe.distributed.fsdp import clip_sharded_grad_norm_, is_fully_sharded
from dsmoe.distributed.launcher import device, get_rank, get_world_size, is_distributed
from dsmoe.distributed.parallelism import dtype_buckets, ep_layers, expert_params
from dsmoe.moe.layer import MoELayer


def any_rank(flag: bool) -> bool:
    """True on every rank if it is true on any (e.g. a Ctrl-C seen by some ranks only:
    all must stop at the same step, or the others wait forever in a collective)."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([1 if flag else 0], device=device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place (e.g. expert loads for logging); returns it."""
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor


def reduce_mean(value: float | torch.Tensor) -> float:
    """The mean of a scalar over all ranks (for logging; a no-op in one process)."""
    value = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device())
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


@torch.no_grad()
def sync_gradients(model: nn.Module) -> None:
    """Sum each gradient over the ranks holding its parameter, divide by the world size
    (module docstring). Call once per optimizer step, after the last backward. Missing
    gradients count as zeros so every rank reduces the same buckets. A fully sharded
    model's gradients were reduce-scattered in backward already, except those of expert
    blocks FSDP leaves alone (one holder each): those are scaled here."""
    if not is_distributed():
        return
    world = dist.get_world_size()
    expert, replica_group = expert_params(model)
    expert_ids = {id(p) for p in expert}
    shared = [p for p in model.parameters() if p.requires_grad and id(p) not in expert_ids]
    if is_fully_sharded(model):
        shared, expert = [], [p for p in expert if not isinstance(p, DTensor)]
    jobs = [(shared, dist.group.WORLD)]
    if expert:
        jobs.append(([p for p in expert if p.requires_grad], replica_group))
    for params, group in jobs:
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        for bucket in dtype_buckets(p.grad for p in params):
            flat = _flatten_dense_tensors(bucket)
            if group is not None:
                dist.all_reduce(flat, group=group)
            flat.div_(world)
            for g, synced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                g.copy_(synced)


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over the whole distributed model: replicated
    gradients count once, each expert block's gradients are added over the EP group.
    Call after ``sync_gradients``; returns the total norm (the same on every rank)."""
    if is_fully_sharded(model):
        return clip_sharded_grad_norm_(model, max_norm)
    expert, _ = expert_params(model)
    expert_ids = {id(p) for p in expert}
    params = [p for p in model.parameters() if p.grad is not None]
    zero = torch.zeros((), dtype=torch.float32,
                       device=params[0].grad.device if params else None)
    shared_sq = sum((p.grad.float().square().sum() for p in params
                     if id(p) not in expert_ids), zero)
    expert_sq = sum((p.grad.float().square().sum() for p in params
                     if id(p) in expert_ids), zero.clone())
    layers = ep_layers(model)
    if layers and layers[0].dispatcher.ep_size > 1:
        dist.all_reduce(expert_sq, group=layers[0].dispatcher.group)
    total = (shared_sq + expert_sq).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for p in params:
        p.grad.mul_(coef.to(p.grad.dtype))
    return total


@torch.no_grad()
def all_reduce_expert_load(model: nn.Module) -> None:
    """Sum every MoE layer's ``load_counts`` over all ranks, so V3's bias update (run
    next, on every rank) sees the global batch's load and the biases stay identical."""
    if not is_distributed():
        return
    counts = [m.load_counts for m in model.modules() if isinstance(m, MoELayer)]
    for bucket in dtype_buckets(counts):
        flat = _flatten_dense_tensors(bucket)
        dist.all_reduce(flat)
        for c, synced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            c.copy_(synced)


def data_shard(batch: torch.Tensor | Sequence[torch.Tensor], rank: int | None = None,
               world: int | None = None) -> Any:
    """This rank's contiguous rows of the step's global batch (a tensor or a tuple of
    tensors with the same batch size): rank r gets rows [r*B/W, (r+1)*B/W)."""
    rank = get_rank() if rank is None else rank
    world = get_world_size() if world is None else world
    if isinstance(batch, torch.Tensor):
        return _rows(batch, rank, world)
    return type(batch)(_rows(t, rank, world) for t in batch)


def _rows(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    B = t.shape[0]
    if B % world:
        raise ValueError(f"batch size {B} is not divisible by the world size {world}; "
                         f"use a --batch-size that is a multiple of {world}")
    size = B // world
    return t[rank * size:(rank + 1) * size]


def comm_bytes(model: nn.Module, *, reset: bool = False) -> dict[str, int]:
    """Bytes this rank sent to other ranks through the MoE all-to-alls, summed over the
    layers since the last reset: per exchange, plus ``payload`` and ``metadata`` totals."""
    total: dict[str, int] = {}
    for layer in ep_layers(model):
        counter = layer.dispatcher.counter
        for kind, n in counter.bytes.items():
            total[kind] = total.get(kind, 0) + n
        total["payload"] = total.get("payload", 0) + counter.payload
        total["metadata"] = total.get("metadata", 0) + counter.metadata
        if reset:
            counter.reset()
    return total
