"""One distributed training step, shared by the parallelism benchmarks (a helper module,
not a benchmark: the scripts import it from their own directory)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsmoe import distributed as ddist


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor,
               *, keep_grads: bool = False) -> None:
    """Forward, backward, gradient reduction, clip, AdamW step, V3 load all-reduce and bias
    update on this rank's rows ``ids [B, S+1]``; ``keep_grads``: leave the (zeroed)
    gradient tensors allocated, so a byte count after the step sees them."""
    out = model(ids[:, :-1], return_routing=True)
    loss = F.cross_entropy(out.logits.flatten(0, 1), ids[:, 1:].flatten()) + out.aux_loss
    loss.backward()
    ddist.sync_gradients(model)
    ddist.clip_grad_norm_(model, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=not keep_grads)
    ddist.all_reduce_expert_load(model)
    model.update_router_biases()
