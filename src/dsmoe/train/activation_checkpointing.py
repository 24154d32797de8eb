"""Activation checkpointing: keep only each block's input, recompute the rest in backward.

Applied to a built model from outside (the model code knows nothing of it), before
``torch.compile``, as torchtitan orders the two. Each ``Block`` of the model runs under
``torch.utils.checkpoint`` (non-reentrant): its forward stores no intermediate
activations, and backward replays it. Memory then grows with the number of blocks times
one block's input ``[B, S, D]`` instead of every intermediate of every block, which is
what lets long sequences fit; the price is one more forward (about a third more compute).

NOTE: the replay runs ``MoELayer.forward`` a second time, which in training adds the
step's routing counts to ``load_counts`` (V3's bias update reads them). During the replay
each MoE layer of the block gets a scratch counter instead, so the counts are the ones the
real forward saw. The replay routes exactly as the forward did: same inputs, deterministic
kernels, RNG state restored by ``torch.utils.checkpoint``.

Shapes: B batch, S sequence, D hidden.
"""

from __future__ import annotations

import contextlib
import types
from typing import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dsmoe.moe.layer import MoELayer


@contextlib.contextmanager
def _scratch_load_counts(block: nn.Module) -> Iterator[None]:
    """Route the replay's load counting into throwaway buffers."""
    layers = [m for m in block.modules() if isinstance(m, MoELayer)]
    saved = [layer.load_counts for layer in layers]
    try:
        for layer, counts in zip(layers, saved):
            layer.load_counts = torch.zeros_like(counts)
        yield
    finally:
        for layer, counts in zip(layers, saved):
            layer.load_counts = counts


def _checkpointed_forward(block: nn.Module, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
    forward = type(block).forward.__get__(block)
    if not torch.is_grad_enabled():  # inference: nothing would be stored anyway
        return forward(*args, **kwargs)
    if torch.compiler.is_compiling():
        # torch.compile traces the block once into its checkpointed region; buffer updates
        # (the load counts) are applied once after the forward graph, not in the replay
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), _scratch_load_counts(block)),
                      **kwargs)


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Checkpoint every block of ``model.layers`` in place (idempotent); returns ``model``.
    Parameter names, state dicts and outputs are unchanged."""
    for block in model.layers:
        if not getattr(block, "activation_checkpointing", False):
            block.forward = types.MethodType(_checkpointed_forward, block)
            block.activation_checkpointing = True
    return model
