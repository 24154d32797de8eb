"""World-size independent checkpoints of a parallelized model and its optimizer.

Design choices:
- ``full_state_dict`` / ``full_optimizer_state`` gather the experts into single-process
  tensors, so what rank 0 saves loads into any world size; ``shard_optimizer_state``
  slices them again for this rank.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from torch.distributed.fsdp import FSDPModule

from dsmoe.distributed.fsdp import is_fully_sharded
from dsmoe.distributed.parallelism import ep_layers
from dsmoe.moe.layer import MoELayer
from dsmoe.moe.parallel import is_expert_parallel


def expert_keys(model: nn.Module) -> dict[str, MoELayer]:
    """State-dict key -> EP layer, for every expert parameter."""
    keys = {}
    for prefix, module in model.named_modules():
        if is_expert_parallel(module):
            for name, _ in module.experts.named_parameters():
                keys[f"{prefix}.experts.{name}" if prefix else f"experts.{name}"] = module
    return keys


def gather_dim0(t: torch.Tensor, layer: MoELayer) -> torch.Tensor:
    N = layer.dispatcher.ep_size
    if N == 1:
        return t
    pieces = [torch.empty_like(t) for _ in range(N)]
    dist.all_gather(pieces, t.contiguous(), group=layer.dispatcher.group)
    return torch.cat(pieces)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The single-process state dict (experts gathered to [E, ...]); a collective over
    every rank, the result is the same everywhere."""
    state = model.state_dict()
    for key, layer in expert_keys(model).items():
        state[key] = gather_dim0(state[key], layer)
    return state


def _param_indices(optimizer: torch.optim.Optimizer) -> dict[int, int]:
    """id(param) -> its index in ``optimizer.state_dict()`` (torch numbers them in order)."""
    ids, i = {}, 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            ids.setdefault(id(p), i)
            i += 1
    return ids


def _expert_state_slots(model: nn.Module, optimizer: torch.optim.Optimizer
                        ) -> dict[int, tuple[MoELayer, int]]:
    """Optimizer state index -> (EP layer, local expert count) for each expert param."""
    index = _param_indices(optimizer)
    slots = {}
    for layer in ep_layers(model):
        for p in layer.experts.parameters():
            if id(p) in index:
                slots[index[id(p)]] = (layer, p.shape[0])
    return slots


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with expert states gathered to single-process shapes, so
    it loads into any world size (via ``shard_optimizer_state``). A collective."""
    state = optimizer.state_dict()
    slots = _expert_state_slots(model, optimizer)
    out = {"state": {}, "param_groups": state["param_groups"]}
    for i, entry in state["state"].items():
        if i in slots:
            layer, local = slots[i]
            entry = {k: gather_dim0(v, layer) if torch.is_tensor(v) and v.dim() > 0
                     and v.shape[0] == local else v for k, v in entry.items()}
        out["state"][i] = entry
    return out


def shard_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                          full_state: dict) -> dict:
    """This rank's slice of a ``full_optimizer_state`` (any world size saved it), ready for
    ``optimizer.load_state_dict``. Every tensor is a fresh copy.

    NOTE: ``optimizer.load_state_dict`` keeps the tensors it is given and updates them in
    place; tensors handed to several processes (e.g. through torch.multiprocessing, which
    moves them to shared memory) would otherwise be updated by every rank at once.
    """
    slots = _expert_state_slots(model, optimizer)
    out = {"state": {}, "param_groups": copy.deepcopy(full_state["param_groups"])}
    for i, entry in full_state["state"].items():
        layer, local = slots.get(int(i), (None, 0))

        def piece(v: Any) -> Any:
            if not torch.is_tensor(v):
                return copy.deepcopy(v)
            if layer is not None and v.dim() > 0 and v.shape[0] == layer.config.n_routed_experts:
                start = layer.dispatcher.expert_offset
                v = v[start:start + local]
            return v.clone()

        out["state"][int(i)] = {k: piece(v) for k, v in entry.items()}
    return out


def gather_model(model: nn.Module) -> nn.Module:
    """A single-process copy of a parallelized model (``type(model)(model.config)`` with the
    full state), for export and generation on one rank. A collective."""
    if is_fully_sharded(model):
        from dsmoe.distributed.sharded_checkpoint import full_model_state

        state = full_model_state(model)
    else:
        state = full_state_dict(model)
    cls = type(model)
    if is_fully_sharded(model):  # fully_shard made a subclass: build the model's own
        cls = next(c for c in cls.__mro__ if not issubclass(c, FSDPModule))
    single = cls(model.config)
    single.load_state_dict(state)
    single.train(model.training)
    return single
