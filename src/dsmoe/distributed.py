"""Data and expert parallel training on torch.distributed (gloo on CPU, NCCL on GPU).

Everything distributed lives here and in ``dsmoe.moe.parallel``; the model code stays
single-device. A training loop uses it like this (every call is made on every rank):

    rank, world = init_distributed()                   # torchrun or launch() env vars
    model_cfg = ep_model_config(model_cfg, ep)         # the EP ranks are the "devices"
    model = Transformer(model_cfg); model.load_state_dict(full_state)      # if resuming
    model = parallelize(model, ep)                     # swap in EP MoE layers, sync weights
    optimizer = AdamW(model.parameters(), ...)         # after parallelize: local experts
    optimizer.load_state_dict(shard_optimizer_state(model, optimizer, full_optim_state))
    inputs, targets = data_shard(sampler.batch(step), rank, world)   # rows of the global batch
    ...loss.backward()...
    sync_gradients(model); clip_grad_norm_(model, 1.0); optimizer.step()
    all_reduce_expert_load(model); model.update_router_biases()      # V3 bias, global load
    log(reduce_mean(loss)); comm_bytes(model, reset=True)             # logging
    full_state_dict(model), full_optimizer_state(model, optimizer)    # checkpoint (rank 0 saves)
    gather_model(model)                                # a single-process copy for export

Design choices:
- Ranks form an ``ep_size x replicas`` grid: EP groups are contiguous ranks (one node's
  fast links carry the all-to-all), and rank ``r`` holds expert block ``r % ep_size``.
- Gradient synchronisation is an explicit, bucketed all-reduce (DDP's arithmetic without
  its hooks): every gradient is summed over the ranks that hold that parameter and divided
  by the world size. For replicated parameters that is the mean; for experts, whose
  gradient already arrived from every EP rank's tokens through the all-to-all, it is the
  gradient of the global-batch mean loss. One call per optimizer step makes gradient
  accumulation free of ``no_sync`` contexts.
- Each rank takes a contiguous slice of rows of the step's *global* batch, so the data a
  step sees does not depend on the world size (resuming with another world size works).
- Checkpoints are world-size independent: ``full_state_dict`` / ``full_optimizer_state``
  gather the experts into single-process tensors; ``shard_optimizer_state`` slices them.
- ``launch`` starts local processes the way torchrun would (same env vars), from a
  forkserver that imports torch once, so ``--nproc N`` and torchrun share one code path.
"""

from __future__ import annotations

import contextlib
import copy
import multiprocessing
import os
import signal
import socket
import sys
import tempfile
import threading
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from dsmoe.config import ModelConfig
from dsmoe.moe.layer import MoELayer
from dsmoe.moe.parallel import ExpertParallelMoELayer

WORLD_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


# --- process group lifecycle -----------------------------------------------------------------
def init_distributed(backend: str | None = None, timeout_s: float = 600.0) -> tuple[int, int]:
    """Join the process group described by torchrun's env vars; returns (rank, world).
    Without them (a plain single process) nothing is initialised and (0, 1) comes back."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "WORLD_SIZE" not in os.environ:
        return 0, 1
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE is set but {', '.join(missing)} is not: start "
                           "the processes with torchrun or dsmoe.distributed.launch")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def teardown() -> None:
    """Leave the process group (safe to call when none was created)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """Rank 0 (or no process group): the one that logs and writes files."""
    return get_rank() == 0


def device() -> torch.device:
    """This process's device: its local GPU under NCCL, the CPU otherwise."""
    if torch.cuda.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if is_distributed():
        dist.barrier()


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. trains and caches the tokenizer), then the others
    (which find the caches). A collective; a no-op in one process."""
    if not is_main_process():
        barrier()
    yield
    if is_main_process():
        barrier()


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


# --- launching local processes ---------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _child(local_rank: int, fn: Callable[..., Any], nproc: int, port: int,
           threads: int, results: str, args: tuple) -> None:
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank),
                      WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    result = fn(*args)
    # A file, not a queue: a large result in a pipe nobody reads until join would block.
    torch.save(result, Path(results) / f"rank{local_rank}.pt")


def launch(fn: Callable[..., Any], nproc: int, *args: Any, threads: int | None = None
           ) -> list[Any]:
    """Run ``fn(*args)`` in ``nproc`` local processes with torchrun's env vars set and
    return each rank's return value (in rank order). ``fn`` (a module-level function)
    calls ``init_distributed()`` itself, exactly as under torchrun. If any process fails,
    the others are stopped and ``torch.multiprocessing.ProcessRaisedException`` carries
    the child's traceback. ``threads``: intra-op threads per process (default: the cores
    shared out)."""
    import torch.multiprocessing as mp

    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"--nproc must be a positive integer, got {nproc!r}")
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // nproc)
    # The forkserver imports torch once; every later process is a cheap fork of it.
    context = multiprocessing.get_context("forkserver")
    # torch._dynamo: the first optimizer built in a process imports it (seconds).
    context.set_forkserver_preload(["torch", "torch._dynamo", "torch.distributed",
                                    "dsmoe.distributed"])
    with tempfile.TemporaryDirectory(prefix="dsmoe-launch-") as results, _patient_sigint():
        mp.start_processes(_child, args=(fn, nproc, _free_port(), threads, results, args),
                           nprocs=nproc, start_method="forkserver", join=True)
        return [torch.load(Path(results) / f"rank{r}.pt", weights_only=False)
                for r in range(nproc)]


@contextlib.contextmanager
def _patient_sigint() -> Iterator[None]:
    """Ctrl-C reaches the children too (same process group); they stop at a step boundary
    and save. So the launcher waits for them on the first Ctrl-C, and gives up only on a
    second one."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    presses = 0

    def handle(signum: int, frame: object) -> None:
        nonlocal presses
        presses += 1
        if presses > 1:
            raise KeyboardInterrupt
        print("interrupt: waiting for the ranks to finish their step (Ctrl-C again to "
              "abort)", file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGINT, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


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


def check_parallel_setup(config: ModelConfig, world: int, ep_size: int) -> None:
    """Clear errors for set-ups expert parallelism cannot run (before any collective)."""
    check_world(world, ep_size)
    E = config.n_routed_experts
    if ep_size == 1 or E is None:
        if E is None and ep_size > 1:
            raise ValueError(f"--ep {ep_size} needs routed experts; this model is dense "
                             "(use --ep 1 for data parallelism)")
        return
    if E % ep_size:
        raise ValueError(f"n_routed_experts={E} is not divisible by --ep {ep_size}; "
                         f"pick an EP size that divides {E}")
    M = config.max_devices_per_token
    if M is not None and M > ep_size:
        raise ValueError(f"max_devices_per_token M={M} exceeds the EP size {ep_size}: a "
                         f"token can reach at most {ep_size} ranks; lower M or raise --ep")
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
    M = config.max_devices_per_token
    if M is not None and M > ep_size:
        raise ValueError(f"max_devices_per_token M={M} exceeds the EP size {ep_size}: a "
                         f"token can reach at most {ep_size} ranks; lower M or raise --ep")
    if config.n_routed_experts % ep_size:
        raise ValueError(f"n_routed_experts={config.n_routed_experts} is not divisible by "
                         f"--ep {ep_size}; pick an EP size that divides it")
    return config.replace(n_devices=ep_size)


# --- model transformation ------------------------------------------------------------------------
def _moe_slots(model: nn.Module) -> list[tuple[nn.Module, str, MoELayer]]:
    """(parent, attribute, layer) for every single-process MoE layer of ``model``."""
    slots = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, MoELayer) and not isinstance(child, ExpertParallelMoELayer):
                slots.append((parent, name, child))
    return slots


def ep_layers(model: nn.Module) -> list[ExpertParallelMoELayer]:
    return [m for m in model.modules() if isinstance(m, ExpertParallelMoELayer)]


def parallelize(model: nn.Module, ep_size: int, *, sync_weights: bool = True) -> nn.Module:
    """Make ``model`` data- and expert-parallel in place and return it.

    Every ``MoELayer`` becomes an ``ExpertParallelMoELayer`` holding this rank's expert
    block; with ``sync_weights`` all replicated tensors are broadcast from rank 0 (and
    each expert block from its first holder), so ranks start identical even if their
    initial seeds differed. Build the optimizer *after* this call. A collective.
    """
    if not (dist.is_available() and dist.is_initialized()):
        if ep_size != 1:
            raise ValueError(f"--ep {ep_size} needs a process group: start with torchrun "
                             "or --nproc")
        return model
    world = dist.get_world_size()
    slots = _moe_slots(model)
    for _, _, layer in slots:
        check_parallel_setup(layer.config, world, ep_size)
    if not slots:
        check_world(world, ep_size)
        if ep_size > 1:
            raise ValueError(f"--ep {ep_size} needs MoE layers; this model has none")
    topology = Topology.create(ep_size)
    for parent, name, layer in slots:
        setattr(parent, name, ExpertParallelMoELayer.from_layer(layer, topology))
    if sync_weights:
        _broadcast_weights(model, topology)
    return model


def _expert_params(model: nn.Module) -> tuple[list[nn.Parameter], dist.ProcessGroup | None]:
    layers = ep_layers(model)
    params = [p for layer in layers for p in layer.experts.parameters()]
    return params, (layers[0].replica_group if layers else None)


def _broadcast_weights(model: nn.Module, topology: Topology) -> None:
    expert, replica_group = _expert_params(model)
    expert_ids = {id(p) for p in expert}
    shared = [p.data for p in model.parameters() if id(p) not in expert_ids]
    shared += [b for name, b in model.named_buffers() if not name.endswith("load_counts")]
    _broadcast_coalesced(shared, src=0, group=dist.group.WORLD)
    if expert and replica_group is not None and topology.ep_size > 1:
        _broadcast_coalesced([p.data for p in expert], src=topology.ep_rank, group=replica_group)


def _broadcast_coalesced(tensors: Sequence[torch.Tensor], src: int,
                         group: dist.ProcessGroup | None) -> None:
    for bucket in _by_dtype(tensors):
        flat = _flatten_dense_tensors(bucket)
        dist.broadcast(flat, src=src, group=group)  # src is a global rank
        for t, synced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            t.copy_(synced)


def _by_dtype(tensors: Iterable[torch.Tensor]) -> list[list[torch.Tensor]]:
    buckets: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        buckets.setdefault((t.dtype, t.device), []).append(t)
    return list(buckets.values())


# --- training-step collectives -------------------------------------------------------------------
@torch.no_grad()
def sync_gradients(model: nn.Module) -> None:
    """Sum each gradient over the ranks holding its parameter, divide by the world size
    (module docstring). Call once per optimizer step, after the last backward. Missing
    gradients count as zeros so every rank reduces the same buckets."""
    if not is_distributed():
        return
    world = dist.get_world_size()
    expert, replica_group = _expert_params(model)
    expert_ids = {id(p) for p in expert}
    shared = [p for p in model.parameters() if p.requires_grad and id(p) not in expert_ids]
    jobs = [(shared, dist.group.WORLD)]
    if expert:
        jobs.append(([p for p in expert if p.requires_grad], replica_group))
    for params, group in jobs:
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        for bucket in _by_dtype(p.grad for p in params):
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
    expert, _ = _expert_params(model)
    expert_ids = {id(p) for p in expert}
    params = [p for p in model.parameters() if p.grad is not None]
    zero = torch.zeros((), dtype=torch.float32,
                       device=params[0].grad.device if params else None)
    shared_sq = sum((p.grad.float().square().sum() for p in params
                     if id(p) not in expert_ids), zero)
    expert_sq = sum((p.grad.float().square().sum() for p in params
                     if id(p) in expert_ids), zero.clone())
    layers = ep_layers(model)
    if layers and layers[0].dispatch.ep_size > 1:
        dist.all_reduce(expert_sq, group=layers[0].dispatch.group)
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
    for bucket in _by_dtype(counts):
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
        counter = layer.dispatch.counter
        for kind, n in counter.bytes.items():
            total[kind] = total.get(kind, 0) + n
        total["payload"] = total.get("payload", 0) + counter.payload
        total["metadata"] = total.get("metadata", 0) + counter.metadata
        if reset:
            counter.reset()
    return total


# --- world-size independent checkpoints ----------------------------------------------------------
def _expert_keys(model: nn.Module) -> dict[str, ExpertParallelMoELayer]:
    """State-dict key -> EP layer, for every expert parameter."""
    keys = {}
    for prefix, module in model.named_modules():
        if isinstance(module, ExpertParallelMoELayer):
            for name, _ in module.experts.named_parameters():
                keys[f"{prefix}.experts.{name}" if prefix else f"experts.{name}"] = module
    return keys


def _gather_dim0(t: torch.Tensor, layer: ExpertParallelMoELayer) -> torch.Tensor:
    N = layer.dispatch.ep_size
    if N == 1:
        return t
    pieces = [torch.empty_like(t) for _ in range(N)]
    dist.all_gather(pieces, t.contiguous(), group=layer.dispatch.group)
    return torch.cat(pieces)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The single-process state dict (experts gathered to [E, ...]); a collective over
    every rank, the result is the same everywhere."""
    state = model.state_dict()
    for key, layer in _expert_keys(model).items():
        state[key] = _gather_dim0(state[key], layer)
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
                        ) -> dict[int, tuple[ExpertParallelMoELayer, int]]:
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
            entry = {k: _gather_dim0(v, layer) if torch.is_tensor(v) and v.dim() > 0
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
                v = v[layer.expert_offset:layer.expert_offset + local]
            return v.clone()

        out["state"][int(i)] = {k: piece(v) for k, v in entry.items()}
    return out


def gather_model(model: nn.Module) -> nn.Module:
    """A single-process copy of a parallelized model (``type(model)(model.config)`` with the
    full state), for export and generation on one rank. A collective."""
    state = full_state_dict(model)
    single = type(model)(model.config)
    single.load_state_dict(state)
    single.train(model.training)
    return single
