"""Data and expert parallel training on torch.distributed (gloo on CPU, NCCL on GPU).

Everything distributed lives here and in ``dsmoe.moe.parallel``; the model code stays
single-device. A training loop uses it like this (every call is made on every rank):

    rank, world = init_distributed()                   # torchrun or launch() env vars
    model_cfg = ep_model_config(model_cfg, ep)         # the EP ranks are the "devices"
    model = Transformer(model_cfg); model.load_state_dict(full_state)      # if resuming
    model = parallelize(model, ep)                     # shard experts, sync weights
    model = apply_fsdp(model, ep)                      # optional (--fsdp): shard the rest
    optimizer = AdamW(model.parameters(), ...)         # after parallelize: local experts
    optimizer.load_state_dict(shard_optimizer_state(model, optimizer, full_optim_state))
    # (fully sharded: sharded_checkpoint.save / load instead, any layout to any layout)
    inputs, targets = data_shard(sampler.batch(step), rank, world)   # rows of the global batch
    ...loss.backward()...
    sync_gradients(model); clip_grad_norm_(model, 1.0); optimizer.step()
    all_reduce_expert_load(model); model.update_router_biases()      # V3 bias, global load
    log(reduce_mean(loss)); comm_bytes(model, reset=True)             # logging
    full_state_dict(model), full_optimizer_state(model, optimizer)    # checkpoint (rank 0 saves)
    gather_model(model)                                # a single-process copy for export

One module per concern (each explains its design choices):
- ``launcher``: joining a process group, ``launch`` for local processes (``--nproc``)
- ``parallelism``: the rank grid (``Topology``), set-up checks, ``parallelize``
- ``collectives``: per-step gradient sync and clipping, expert loads, batch shards, logging
- ``state_dicts``: world-size independent checkpoints of model and optimizer
- ``fsdp``: FSDP2 (``fully_shard``) over a data dimension, composed with EP (``apply_fsdp``)
- ``sharded_checkpoint``: torch.distributed.checkpoint of a fully sharded model, any layout
"""

from dsmoe.distributed.collectives import (all_reduce_expert_load, all_reduce_sum_, any_rank,
                                           clip_grad_norm_, comm_bytes, data_shard,
                                           reduce_mean, sync_gradients)
from dsmoe.distributed.fsdp import (FSDPOptions, apply_fsdp, is_fully_sharded,
                                    local_state_bytes)
from dsmoe.distributed.launcher import (WORLD_ENV, barrier, device, get_rank, get_world_size,
                                        init_distributed, is_distributed, is_main_process,
                                        launch, main_process_first, teardown)
from dsmoe.distributed.parallelism import (Topology, check_parallel_setup, check_world,
                                           ep_layers, ep_model_config, parallelize)
from dsmoe.distributed.state_dicts import (full_optimizer_state, full_state_dict,
                                           gather_model, shard_optimizer_state)

__all__ = [
    "FSDPOptions", "WORLD_ENV", "Topology", "apply_fsdp", "is_fully_sharded",
    "local_state_bytes", "all_reduce_expert_load", "all_reduce_sum_", "any_rank",
    "barrier", "check_parallel_setup", "check_world", "clip_grad_norm_", "comm_bytes",
    "data_shard", "device", "ep_layers", "ep_model_config", "full_optimizer_state",
    "full_state_dict", "gather_model", "get_rank", "get_world_size", "init_distributed",
    "is_distributed", "is_main_process", "launch", "main_process_first", "parallelize",
    "reduce_mean", "shard_optimizer_state", "sync_gradients", "teardown",
]
