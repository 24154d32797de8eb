"""Activation checkpointing (``dsmoe.train.activation_checkpointing``): the same losses,
gradients and routing counts as without it, and less memory kept for backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import set_checkpoint_early_stop

from conftest import assert_close
from dsmoe.config import ModelConfig
from dsmoe.model import Transformer
from dsmoe.train.activation_checkpointing import apply_activation_checkpointing


def _pair(preset: str) -> tuple[Transformer, Transformer]:
    torch.manual_seed(0)
    cfg = ModelConfig.preset(preset).replace(vocab_size=97, num_hidden_layers=3,
                                             aux_loss_alpha=0.01)
    plain = Transformer(cfg).train()
    ckpt = Transformer(cfg).train()
    ckpt.load_state_dict(plain.state_dict())
    return plain, apply_activation_checkpointing(ckpt)


def _step(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids[:, :-1])
    loss = F.cross_entropy(out.logits.flatten(0, 1), ids[:, 1:].flatten()) + out.aux_loss
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("early_stop", [True, False])
def test_same_loss_gradients_and_load_counts(early_stop: bool) -> None:
    """Also with early stopping off, where the replay runs every MoE layer to its end."""
    for preset in ("tiny", "tiny-v3"):
        plain, ckpt = _pair(preset)
        ids = torch.randint(0, 97, (2, 33), generator=torch.Generator().manual_seed(1))
        with set_checkpoint_early_stop(early_stop):
            loss = _step(ckpt, ids)
        assert_close(loss, _step(plain, ids), atol=0, rtol=0, what=f"{preset} loss")
        for (name, p), q in zip(ckpt.named_parameters(), plain.parameters()):
            assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-6, what=f"{preset} grad {name}")
        for a, b in zip(ckpt.moe_layers(), plain.moe_layers()):
            assert torch.equal(a.load_counts, b.load_counts), "replay must not count twice"
            assert int(a.load_counts.sum()) > 0
        assert list(ckpt.state_dict()) == list(plain.state_dict())


def test_fewer_activations_are_kept_for_backward() -> None:
    def saved_bytes(model: Transformer, ids: torch.Tensor) -> int:
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(ids).logits.sum()
        return total

    plain, ckpt = _pair("tiny")
    ids = torch.randint(0, 97, (4, 64))
    assert saved_bytes(ckpt, ids) < 0.5 * saved_bytes(plain, ids)


def test_applying_twice_changes_nothing_and_eval_runs_plain() -> None:
    plain, ckpt = _pair("tiny")
    apply_activation_checkpointing(ckpt)
    ids = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        assert_close(ckpt.eval()(ids).logits, plain.eval()(ids).logits, atol=0, rtol=0,
                     what="eval logits")


@pytest.mark.slow
def test_compiled_checkpointed_blocks_match_eager() -> None:
    """Checkpointing before torch.compile (the order torchtitan uses): same loss and
    gradients, and the load counts of one forward."""
    plain, ckpt = _pair("tiny")
    for block in ckpt.layers:
        block.compile()
    ids = torch.randint(0, 97, (2, 33), generator=torch.Generator().manual_seed(1))
    assert_close(_step(ckpt, ids), _step(plain, ids), atol=1e-5, rtol=1e-5, what="loss")
    for (name, p), q in zip(ckpt.named_parameters(), plain.parameters()):
        assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, what=f"grad {name}")
    for a, b in zip(ckpt.moe_layers(), plain.moe_layers()):
        assert torch.equal(a.load_counts, b.load_counts)
