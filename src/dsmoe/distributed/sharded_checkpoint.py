"""Sharded checkpoints of a fully sharded model through torch.distributed.checkpoint (DCP).

Every rank writes its own shards in parallel; a checkpoint loads into any layout: another
(world size, EP size) with FSDP (each rank reads the pieces its shards overlap), or one
process / expert parallelism alone (the whole tensors are read).

Design choices:
- Only tensors go to DCP, keyed by their single-process names with their single-process
  shapes: ``model/<name>`` and ``optim/<name>/<state>`` (``exp_avg``, ``exp_avg_sq``,
  ``step``). So what is saved does not depend on the layout that saved it. Non-expert
  FSDP parameters are DTensors over all ranks already; an expert block (``[El, ...]``,
  FSDP-sharded over the ``dp`` ranks) is presented as a view of the whole ``[E, ...]``
  tensor on the 2-D ``(ep, dp)`` mesh: ``Shard(0)`` over ``ep``, then the block's own FSDP
  placement over ``dp``. Views share storage, so DCP saves from and loads into the live
  parameters and optimizer state without copies.
- Optimizer state goes through ``get_optimizer_state_dict`` / ``set_optimizer_state_dict``
  (names instead of positions); the parameter groups (lr, betas, weight decay and the
  names in each group) are plain values the caller keeps beside the tensors.
- Trust: DCP's ``.metadata`` file is a pickle and torch has no ``weights_only`` mode for it
  (its tensor files load with ``weights_only=True``). ``SafeReader`` reads ``.metadata``
  with an unpickler that only builds DCP's own metadata classes and torch's sizes and
  dtypes; and dsmoe only ever loads a DCP directory that the run itself wrote inside its
  own locked run directory (``train.checkpoint``), never a path a user hands in.

Shapes: E routed experts, El = E/ep per EP rank.
"""

from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                     get_optimizer_state_dict,
                                                     set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from dsmoe.distributed.fsdp import model_meshes
from dsmoe.moe.layer import MoELayer
from dsmoe.distributed.state_dicts import expert_keys, gather_dim0

MODEL, OPTIM = "model/", "optim/"


# --- reading .metadata without running code ----------------------------------------------------
class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata dataclasses, torch sizes/dtypes and plain containers only."""

    _MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner")
    _NAMES = {("torch", "Size"), ("collections", "OrderedDict"), ("pathlib", "PosixPath"),
              ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
              ("torch.serialization", "_get_layout")}  # a layout looked up by its name

    def find_class(self, module: str, name: str) -> Any:
        if module in self._MODULES or (module, name) in self._NAMES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in DCP metadata")


class SafeReader(FileSystemReader):
    """``FileSystemReader`` whose ``.metadata`` is unpickled by ``_MetadataUnpickler``; a
    foreign or corrupt file raises a one-line ``ValueError`` naming it."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self.path) / ".metadata"
        try:
            metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError, TypeError,
                ValueError, IndexError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ValueError(f"{path}: not a readable DCP checkpoint ({first})") from None
        if not isinstance(metadata, Metadata):
            raise ValueError(f"{path}: not DCP metadata")
        metadata.storage_meta = getattr(metadata, "storage_meta", None)
        return metadata


# --- the layout-independent view of a sharded model -----------------------------------------
def _global_view(t: torch.Tensor, model: nn.Module, layer: MoELayer) -> torch.Tensor:
    """An expert block's tensor (``[El, ...]``, a DTensor over the ``dp`` ranks) as a view
    of the whole ``[E, ...]`` tensor on the ``(ep, dp)`` mesh (module docstring)."""
    mesh = model_meshes(model).experts
    if isinstance(t, DTensor):
        placements, local = (Shard(0), t.placements[0]), t.to_local()
    else:  # a block FSDP leaves alone: one holder (ep == N)
        placements, local = (Shard(0), Replicate()), t
    shape = (t.shape[0] * layer.dispatcher.ep_size,) + tuple(t.shape[1:])
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, mesh, placements, run_check=False,
                              shape=torch.Size(shape), stride=stride)


def sharded_tensors(model: nn.Module, optimizer: torch.optim.Optimizer
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(the flat DCP state of views, the model state dict, the optimizer state dict) of a
    fully sharded model; the last two hold the same storage as the first."""
    experts = expert_keys(model)
    model_sd = get_model_state_dict(model)
    optim_sd = get_optimizer_state_dict(model, optimizer)  # creates missing state
    flat: dict[str, torch.Tensor] = {}
    for name, t in model_sd.items():
        flat[MODEL + name] = _global_view(t, model, experts[name]) if name in experts else t
    for name, entry in optim_sd["state"].items():
        for key, t in entry.items():
            if name in experts and t.dim() > 0:  # not the scalar step count
                t = _global_view(t, model, experts[name])
            flat[f"{OPTIM}{name}/{key}"] = t
    return flat, model_sd, optim_sd


def save(model: nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> list[dict]:
    """Write this rank's shards of ``model`` and ``optimizer`` to the DCP directory
    ``path`` (a collective); returns the optimizer's parameter groups (plain values, by
    name) for the caller to keep beside them."""
    flat, _, optim_sd = sharded_tensors(model, optimizer)
    dcp.save(flat, checkpoint_id=str(path))
    return optim_sd["param_groups"]


def _apply(model: nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict,
           optim_sd: dict, param_groups: list[dict]) -> None:
    set_model_state_dict(model, model_sd)
    set_optimizer_state_dict(model, optimizer, {"state": optim_sd["state"],
                                                "param_groups": param_groups})


def load(model: nn.Module, optimizer: torch.optim.Optimizer, path: Path,
         param_groups: list[dict]) -> None:
    """Load a DCP checkpoint any layout wrote into this fully sharded model and its
    optimizer: each rank reads the parts its shards cover. A collective."""
    flat, model_sd, optim_sd = sharded_tensors(model, optimizer)
    dcp.load(flat, storage_reader=SafeReader(str(path)))
    _apply(model, optimizer, model_sd, optim_sd, param_groups)


def load_full(model: nn.Module, optimizer: torch.optim.Optimizer,
              model_state: dict[str, torch.Tensor], optimizer_state: dict) -> None:
    """Load single-process state dicts (a checkpoint written without FSDP: the model's
    ``state_dict``, or part of it, and ``full_optimizer_state``) into this fully sharded
    model: each rank copies the slices its shards hold."""
    flat, model_sd, optim_sd = sharded_tensors(model, optimizer)
    full = full_flat(model_state, optimizer_state, _group_names(optim_sd["param_groups"]))
    # model tensors a checkpoint leaves out (a finetuning run's frozen base) are kept
    missing = sorted(k for k in set(flat) - set(full) if k.startswith(OPTIM))
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} optimizer tensors, e.g. "
                         f"{missing[0]}")
    with torch.no_grad():
        for key, target in flat.items():
            if key in full:
                _copy_slice(target, full[key])
    groups = _named_groups(optimizer_state["param_groups"], optim_sd["param_groups"])
    _apply(model, optimizer, model_sd, optim_sd, groups)


def _copy_slice(target: torch.Tensor, whole: torch.Tensor) -> None:
    if not isinstance(target, DTensor):
        target.copy_(whole)
        return
    shape, offset = compute_local_shape_and_global_offset(target.shape, target.device_mesh,
                                                          target.placements)
    index = tuple(slice(o, o + s) for o, s in zip(offset, shape))
    target.to_local().copy_(whole[index])


def _group_names(param_groups: list[dict]) -> list[str]:
    return [name for group in param_groups for name in group["params"]]


def _named_groups(indexed: list[dict], named: list[dict]) -> list[dict]:
    """Index-keyed parameter groups (``optimizer.state_dict()``) with the names of
    ``named`` (the same groups, by name) in place of the positions."""
    return [{**group, "params": list(other["params"])} for group, other in zip(indexed, named)]


def full_flat(model_state: dict[str, torch.Tensor], optimizer_state: dict,
              names: list[str]) -> dict[str, torch.Tensor]:
    """Single-process state dicts as the flat DCP keys; ``optimizer_state`` is
    index-keyed, ``names`` are its parameters' names in index order."""
    flat = {MODEL + k: v for k, v in model_state.items()}
    for index, entry in optimizer_state["state"].items():
        for key, t in entry.items():
            flat[f"{OPTIM}{names[int(index)]}/{key}"] = t
    return flat


def read_full(path: Path, param_groups: list[dict]) -> tuple[dict[str, torch.Tensor], dict]:
    """Every tensor of a DCP checkpoint, whole (for one process or expert parallelism
    without FSDP): the model's state dict and an index-keyed optimizer state (the form
    ``full_optimizer_state`` gives). Each rank reads independently."""
    reader = SafeReader(str(path))
    metadata = reader.read_metadata()
    flat = {key: torch.empty(meta.size, dtype=meta.properties.dtype)
            for key, meta in metadata.state_dict_metadata.items()
            if isinstance(meta, TensorStorageMetadata)}
    with warnings.catch_warnings():  # no process group here is the point, not a mistake
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(flat, storage_reader=reader, no_dist=True)
    model_state = {k[len(MODEL):]: v for k, v in flat.items() if k.startswith(MODEL)}
    names = _group_names(param_groups)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for index, name in enumerate(names):
        prefix = f"{OPTIM}{name}/"
        entry = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
        if entry:
            state[index] = entry
    groups, start = [], 0
    for group in param_groups:
        n = len(group["params"])
        groups.append({**group, "params": list(range(start, start + n))})
        start += n
    return model_state, {"state": state, "param_groups": groups}


@torch.no_grad()
def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The single-process state dict of a fully sharded model, whole on every rank, on the
    CPU (a collective: each tensor is all-gathered in turn; an expert block over its
    ``dp`` ranks, then the blocks over the EP group)."""
    experts = expert_keys(model)
    out = {}
    for name, t in get_model_state_dict(model).items():
        t = t.full_tensor() if isinstance(t, DTensor) else t
        if name in experts:
            t = gather_dim0(t, experts[name])
        out[name] = t.detach().cpu()
    return out
