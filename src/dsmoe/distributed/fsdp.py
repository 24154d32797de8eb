"""FSDP2 (``fully_shard``) composed with expert parallelism, applied from outside the model.

torchtitan's composition for MoE models, on dsmoe's own expert parallelism:

    model = parallelize(model, ep)        # experts: this rank's block of E/ep (all-to-all)
    model = apply_fsdp(model, ep, opts)   # then shard everything over the data dimension
    optimizer = build_optimizer(model)    # after: it sees the sharded parameters

Design choices:
- Two meshes over the N ranks. Non-expert parameters (attention, norms, dense MLPs, shared
  experts, routers, embeddings, lm_head) are sharded over all N ranks (1-D ``world``
  mesh). Each expert block already lives on the N/ep ranks with the same EP rank (the
  ``dp`` dimension of the 2-D ``(ep, dp)`` mesh, the ``Topology`` replica group); it is
  sharded over exactly those ranks, so each expert element is stored once in the world
  and its gradient is reduce-scattered over the N/ep ranks that hold the same experts.
- One ``fully_shard`` per block (all-gathered just before the block runs, freed after:
  ``reshard_after_forward``), one per MoE layer's expert block (its own mesh), and the
  root for embeddings, final norm and lm_head. Model code is untouched: ``Experts`` is
  always called as a module, also with no rows, so every rank of a ``dp`` group joins
  each all-gather and reduce-scatter.
- Gradient scale: every rank's loss is the mean over its own rows, and the gradient of
  the global-batch mean is the sum over ranks divided by N. FSDP divides by its mesh
  size, which is N for non-expert parameters; an expert block's gradient already holds
  the tokens of its whole EP group (the all-to-all's backward), so its reduce over the
  N/ep replicas divides by N too (``set_gradient_divide_factor``), as ``sync_gradients``
  does without FSDP.
- Expert blocks shard on dim 0 (whole experts) when the replicas divide the local expert
  count, else on dim 1 (rows of each expert), so no rank holds an empty shard. With
  ep == N each block has one holder and nothing to shard: FSDP ignores those parameters
  (it would not divide a one-rank reduction) and ``sync_gradients`` scales their
  gradients by 1/N as without FSDP.
- Balance statistics and V3's router bias are buffers, which FSDP leaves replicated:
  ``all_reduce_expert_load`` and ``update_router_biases`` work as without FSDP.
- CPU offload (``offload_optimizer``) keeps the sharded parameters, gradients and the
  optimizer state in host memory and steps there (``CPUOffloadPolicy``); on a CPU run
  they are there already, so the option changes nothing but is accepted.

Shapes: N ranks, E routed experts, El = E/ep experts per EP rank, F expert width, D hidden.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import (CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy,
                                    OffloadPolicy, fully_shard)
from torch.distributed.tensor import DTensor, Shard

from dsmoe.distributed.parallelism import ep_layers
from dsmoe.moe.layer import MoELayer
from dsmoe.moe.parallel import GroupSum

PARAM_DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True, kw_only=True)
class FSDPOptions:
    """How ``apply_fsdp`` shards. ``param_dtype``: the dtype blocks compute in (weights
    all-gathered in it; the sharded master copy and the optimizer keep the parameters'
    own dtype; None: that dtype); ``reduce_dtype``: gradient reduce-scatter dtype; ``reshard_after_forward``: free the
    gathered weights after each block's forward (ZeRO-3; False keeps them until backward,
    ZeRO-2); ``offload_optimizer``: CPU offload (module docstring)."""

    param_dtype: str | None = None
    reduce_dtype: str = "float32"
    reshard_after_forward: bool = True
    offload_optimizer: bool = False

    def __post_init__(self) -> None:
        for name in ("param_dtype", "reduce_dtype"):
            if getattr(self, name) not in PARAM_DTYPES + ((None,) if name == "param_dtype"
                                                          else ()):
                raise ValueError(f"FSDPOptions.{name} must be one of {PARAM_DTYPES}, got "
                                 f"{getattr(self, name)!r}")


@dataclass(frozen=True)
class Meshes:
    """``world``: 1-D over all N ranks; ``experts``: 2-D ``(ep, dp)``, rank r at
    (r % ep, r // ep), so ``experts["ep"]`` is r's EP group (contiguous ranks, as
    ``Topology``) and ``experts["dp"]`` the ranks holding r's expert block."""

    world: DeviceMesh
    experts: DeviceMesh


def build_meshes(ep_size: int, device_type: str = "cpu") -> Meshes:
    """The two meshes for this process group (a collective: every rank calls it)."""
    world = dist.get_world_size()
    if world % ep_size:
        raise ValueError(f"world size {world} is not divisible by --ep {ep_size}")
    ranks = torch.arange(world).view(world // ep_size, ep_size).t()  # [ep, dp]
    return Meshes(init_device_mesh(device_type, (world,), mesh_dim_names=("fsdp",)),
                  DeviceMesh(device_type, ranks, mesh_dim_names=("ep", "dp")))


def is_fully_sharded(model: nn.Module) -> bool:
    """Whether ``apply_fsdp`` sharded ``model``."""
    return isinstance(model, FSDPModule)


def model_meshes(model: nn.Module) -> Meshes | None:
    """The meshes ``apply_fsdp`` sharded ``model`` over (None: not sharded)."""
    return getattr(model, "_dsmoe_meshes", None)


def apply_fsdp(model: nn.Module, ep_size: int, options: FSDPOptions | None = None
               ) -> nn.Module:
    """Shard ``model`` (already ``parallelize``-d over ``ep_size``) in place with
    ``fully_shard`` as the module docstring says; returns it. A collective. Build the
    optimizer after this call."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("--fsdp needs a process group: start with --nproc N (N >= 2) "
                         "or torchrun")
    unswapped = [m for m in model.modules() if isinstance(m, MoELayer)
                 and not isinstance(m.balance_total, GroupSum)]
    if unswapped:  # its experts would be sharded whole, its balance counted per rank
        raise ValueError("apply_fsdp needs a model parallelize()-d first: call "
                         f"dsmoe.distributed.parallelize(model, {ep_size}) before it")
    options = options or FSDPOptions()
    # NOTE: blocks return (hidden, MoEOutput) whose routing tensors may be views; FSDP
    # warns that an in-place op on one would skip its pre-backward hook. dsmoe's loops
    # only read them (sums and counts go to new tensors), so the warning is noise.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view")
    device_type = next(model.parameters()).device.type
    meshes = build_meshes(ep_size, device_type)
    offload = OffloadPolicy()
    if options.offload_optimizer and device_type != "cpu":
        offload = CPUOffloadPolicy(pin_memory=True)
    shared = dict(mp_policy=MixedPrecisionPolicy(
        param_dtype=getattr(torch, options.param_dtype) if options.param_dtype else None,
        reduce_dtype=getattr(torch, options.reduce_dtype)),
        offload_policy=offload, reshard_after_forward=options.reshard_after_forward)
    expert_mesh = meshes.experts["dp"]
    ignored: set[nn.Parameter] = set()  # expert blocks held by one rank each (ep == N)
    for layer in ep_layers(model):  # experts first: the block's own shard leaves them out
        if expert_mesh.size() == 1:
            ignored |= set(layer.experts.parameters())
            continue
        local = layer.dispatcher.local_experts
        dim = 0 if local % expert_mesh.size() == 0 else 1
        fully_shard(layer.experts, mesh=expert_mesh,
                    shard_placement_fn=lambda p, dim=dim: Shard(dim), **shared)
        layer.experts.set_gradient_divide_factor(float(dist.get_world_size()))
        if dist.get_backend() == "gloo":  # no PREMUL_SUM there: sum, then divide
            layer.experts.set_force_sum_reduction_for_comms(True)
    for block in model.layers:
        fully_shard(block, mesh=meshes.world, ignored_params=ignored, **shared)
    # the root: embeddings, final norm, lm_head; its gathered weights are needed again
    # first in backward (lm_head), so freeing them after forward would only re-gather
    fully_shard(model, mesh=meshes.world, ignored_params=ignored,
                **{**shared, "reshard_after_forward": False})
    model._dsmoe_meshes = meshes
    return model


def local_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None
                      ) -> dict[str, int]:
    """Bytes this rank stores for parameters, gradients and optimizer state: the sum of
    its local shards' sizes (a sharded parameter counts its own shard; an unsharded one,
    e.g. in one process or under expert parallelism alone, counts whole). Gradients count
    when present (measure after a step's backward); ``total`` is their sum."""
    def nbytes(t: torch.Tensor) -> int:
        local = t.to_local() if isinstance(t, DTensor) else t
        return local.numel() * local.element_size()

    params = list(model.parameters())
    out = {"params": sum(nbytes(p) for p in params),
           "grads": sum(nbytes(p.grad) for p in params if p.grad is not None),
           "optimizer": 0}
    if optimizer is not None:
        out["optimizer"] = sum(nbytes(v) for state in optimizer.state.values()
                               for v in state.values() if torch.is_tensor(v))
    out["total"] = out["params"] + out["grads"] + out["optimizer"]
    return out


@torch.no_grad()
def clip_sharded_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_`` for a fully sharded model: every parameter element (experts
    included) is stored on exactly one rank, so the squared norm is the sum of the local
    shards' squares over all ranks. Returns the total norm (the same on every rank)."""
    grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
             for p in model.parameters() if p.grad is not None]
    device = grads[0].device if grads else torch.device("cpu")
    sq = torch.zeros((), dtype=torch.float32, device=device)
    for g in grads:
        sq += g.float().square().sum()
    dist.all_reduce(sq)
    total = sq.sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype))
    return total
