"""Expert parallelism across real processes (gloo, 2 and 4 ranks on this CPU).

Every test compares against the single-process ``MoELayer`` / ``Transformer`` on the same
weights and the same *global* batch, split by ``data_shard``. The objective each rank
minimises is its own mean over tokens, so the single-process reference is the mean over
ranks (see ``dsmoe.distributed``): input gradients compare as ``world * x_r.grad``.
Tolerances: fp32 outputs and gradients to 1e-6 abs / 1e-5 rel (only the summation order
differs); training losses to 2e-5 after a few AdamW steps.

Shapes: B batch, S sequence, D hidden, E experts, K picks.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from conftest import assert_close, moe_config, randomize_

from dsmoe import distributed as ddist
from dsmoe import plan
from dsmoe.config import ModelConfig
from dsmoe.model import Transformer
from dsmoe.moe.layer import MoELayer
from dsmoe.moe.parallel import parallelize_layer, slice_experts

ATOL, RTOL = 1e-6, 1e-5
# Outputs: the EP ranks' experts run inside the dispatcher's autograd Function, where grad is
# off, so few-row blocks take dsmoe's native kernels; the single-process reference runs
# torch.mm under autograd. Both are fp32 sums of the same terms in different orders, and the
# outputs reach ~30 (mean |y| ~4: std-0.3 weights, routed_scaling_factor 2.5), where one ulp
# is ~2e-6.
OUT_ATOL = 1e-5


def _run(worker: Callable[..., dict], nproc: int, *args: Any) -> list[dict]:
    """``worker(*args)`` on ``nproc`` gloo ranks (one thread each); their results by rank."""
    return ddist.launch(worker, nproc, *args, threads=1)


# --- the EP layer against the single-process layer -----------------------------------------------
def _objective(out: torch.Tensor, probe: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of <out, probe> plus the balance losses: a loss with every part of
    the output in it, normalised per token like cross-entropy."""
    return (out * probe).sum() / (out.numel() // out.shape[-1]) + aux


def _remote_ranks(topk_idx: torch.Tensor, per_rank: int, ep: int, rank: int) -> torch.Tensor:
    """[T] how many ranks other than ``rank`` own one of each token's experts."""
    owners = torch.zeros(topk_idx.shape[0], ep, dtype=torch.bool)
    owners.scatter_(1, topk_idx // per_rank, True)
    owners[:, rank] = False
    return owners.sum(dim=1)


def _layer_worker(cfg: ModelConfig, state: dict, x: torch.Tensor,
                  probe: torch.Tensor, ep: int, update_bias: bool) -> dict:
    rank, world = ddist.init_distributed()
    try:
        layer = MoELayer(cfg)
        layer.load_state_dict(state)
        ep_layer = parallelize_layer(layer.train(), ddist.Topology.create(ep))
        x_r = ddist.data_shard(x, rank, world).clone().requires_grad_(True)
        out = ep_layer(x_r)
        _objective(out.hidden_states, ddist.data_shard(probe, rank, world),
                   out.aux_loss).backward()
        ddist.sync_gradients(ep_layer)
        result = {
            "out": out.hidden_states.detach(), "x_grad": x_r.grad,
            "aux": ddist.reduce_mean(out.aux_loss),
            "losses": {k: ddist.reduce_mean(v) for k, v in out.losses.items()},
            "grads": {n: p.grad.clone() for n, p in ep_layer.named_parameters()},
            "offset": ep_layer.dispatcher.expert_offset, "counts": out.expert_counts,
            "dropped": float(out.dropped_fraction),
            "ranks_per_token": ep_layer.dispatcher.last_ranks_per_token,
            "remote_ranks": _remote_ranks(out.topk_idx, cfg.n_routed_experts // ep, ep,
                                          rank % ep),
            "bytes": ddist.comm_bytes(ep_layer),
        }
        if update_bias:
            ddist.all_reduce_expert_load(ep_layer)
            ep_layer.update_bias()
            result["bias"] = ep_layer.gate.e_score_correction_bias.clone()
        return result
    finally:
        ddist.teardown()


def _reference(cfg: ModelConfig, B: int = 4, S: int = 8, seed: int = 0):
    """A randomised layer, a global batch and the single-process results on it."""
    layer = randomize_(MoELayer(cfg), std=0.3, seed=seed).train()
    gen = torch.Generator().manual_seed(seed + 1)
    if layer.gate.e_score_correction_bias is not None:  # V3: a bias that changes choices
        layer.gate.e_score_correction_bias.copy_(
            torch.randn(cfg.n_routed_experts, generator=gen) * 0.1)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(B, S, cfg.hidden_size, generator=gen).requires_grad_(True)
    probe = torch.randn(B, S, cfg.hidden_size, generator=gen)
    out = layer(x)
    _objective(out.hidden_states, probe, out.aux_loss).backward()
    return layer, state, x, probe, out


def _check_layer_parity(cfg: ModelConfig, ep: int, world: int | None = None,
                        update_bias: bool = False) -> list[dict]:
    """EP layer on ``world`` ranks (default ``ep``) vs the single-process layer."""
    world = world or ep
    layer, state, x, probe, ref = _reference(cfg)
    ranks = _run(_layer_worker, world, cfg, state, x.detach(), probe, ep, update_bias)
    out = torch.cat([r["out"] for r in ranks])
    assert_close(out, ref.hidden_states.detach(), atol=OUT_ATOL, rtol=RTOL, what="outputs")
    x_grad = torch.cat([r["x_grad"] for r in ranks]) / world
    assert_close(x_grad, x.grad, atol=ATOL, rtol=RTOL, what="input gradients")
    aux = float(ref.aux_loss.detach())
    assert math.isclose(ranks[0]["aux"], aux, rel_tol=1e-5, abs_tol=1e-7), \
        f"aux loss: EP mean {ranks[0]['aux']} vs single {aux}"
    for name, value in ref.losses.items():
        assert math.isclose(ranks[0]["losses"][name], float(value.detach()), rel_tol=1e-5,
                            abs_tol=1e-7), f"{name} loss differs"
    counts = sum(r["counts"] for r in ranks)
    assert torch.equal(counts, ref.expert_counts), "routed counts differ"
    E = cfg.n_routed_experts
    for r in ranks:
        for name, grad in r["grads"].items():
            expected = dict(layer.named_parameters())[name].grad
            if name.startswith("experts."):
                expected = expected[r["offset"]:r["offset"] + E // ep]
            assert_close(grad, expected, atol=ATOL, rtol=RTOL, what=f"grad of {name}")
        assert math.isclose(r["dropped"], float(ref.dropped_fraction), abs_tol=1e-7)
    if update_bias:
        layer.update_bias()
        for r in ranks:
            assert_close(r["bias"], layer.gate.e_score_correction_bias, atol=0, rtol=0,
                         what="V3 bias after the update")
    return ranks


@pytest.mark.parametrize("world, ep", [(2, 2), (4, 4), (4, 2)])
def test_v1_greedy_matches_single_process(world: int, ep: int) -> None:
    """(4, 2): two replicas of each expert block, whose gradients are summed across them."""
    cfg = moe_config(aux_loss_alpha=0.01, seq_aux=False, n_devices=ep,
                     device_balance_alpha=0.05, z_loss_alpha=0.001)
    _check_layer_parity(cfg, ep, world)


def test_v2_device_limited_sends_each_token_to_at_most_m_ranks() -> None:
    ep, M = 4, 2
    cfg = moe_config(num_experts_per_tok=3, topk_method="device_limited", n_devices=ep,
                     max_devices_per_token=M, aux_loss_alpha=0.003,
                     device_balance_alpha=0.05, comm_balance_alpha=0.02)
    ranks = _check_layer_parity(cfg, ep)
    reach = torch.cat([r["ranks_per_token"] for r in ranks])
    assert int(reach.max()) <= M, f"a token was sent to {int(reach.max())} > M={M} ranks"
    # The limit must bind: unrestricted routing of the same tokens reaches more ranks.
    _, _, _, _, greedy = _reference(cfg.replace(topk_method="greedy"))
    unlimited = torch.zeros(greedy.topk_idx.shape[0], ep, dtype=torch.bool).scatter_(
        1, greedy.topk_idx // (cfg.n_routed_experts // ep), True).sum(dim=1)
    assert int(unlimited.max()) > M
    # Each token's hidden state crossed to every remote rank it needed exactly once.
    D = cfg.hidden_size
    for r in ranks:  # rows to the token's own rank are a local copy, not sent
        assert r["bytes"]["dispatch"] == int(r["remote_ranks"].sum()) * D * 4


def test_v2_capacity_dropping_across_ranks() -> None:
    ep = 2
    cfg = moe_config(num_experts_per_tok=2, topk_method="device_limited", n_devices=ep,
                     max_devices_per_token=1, drop_tokens=True, capacity_factor=1.0,
                     aux_loss_alpha=0.003, comm_balance_alpha=0.02)
    layer, _, x, _, ref = _reference(cfg)
    assert float(ref.dropped_fraction) > 0, "the case must actually drop tokens"
    ranks = _check_layer_parity(cfg, ep)
    assert all(r["dropped"] == pytest.approx(float(ref.dropped_fraction)) for r in ranks)


def test_v3_bias_routing_and_bias_update() -> None:
    ep = 2
    cfg = moe_config(scoring_func="sigmoid", topk_method="noaux_tc", n_group=4, topk_group=2,
                     norm_topk_prob=True, routed_scaling_factor=2.5, aux_loss_alpha=0.001,
                     seq_aux=True, bias_update_speed=0.01)
    _check_layer_parity(cfg, ep, update_bias=True)


def _uneven_worker(cfg: ModelConfig, state: dict, inputs: list[torch.Tensor]) -> dict:
    rank, world = ddist.init_distributed()
    try:
        layer = MoELayer(cfg)
        layer.load_state_dict(state)
        ep_layer = parallelize_layer(layer.train(), ddist.Topology.create(world))
        x = inputs[rank].clone().requires_grad_(True)
        out = ep_layer(x)
        out.hidden_states.sum().backward()
        ddist.sync_gradients(ep_layer)
        return {"out": out.hidden_states.detach(), "x_grad": x.grad,
                "grads": {n: p.grad.clone() for n, p in ep_layer.named_parameters()},
                "offset": ep_layer.dispatcher.expert_offset, "bytes": ddist.comm_bytes(ep_layer)}
    finally:
        ddist.teardown()


@pytest.mark.parametrize("case", ["one rank has no tokens", "every token to rank 0"])
def test_empty_exchanges(case: str) -> None:
    """Ranks that send, receive or hold nothing still take part in every exchange."""
    cfg, ep = moe_config(), 2
    layer = randomize_(MoELayer(cfg), std=0.3).train()
    x = torch.randn(12, cfg.hidden_size)
    if case == "one rank has no tokens":
        inputs = [x, x[:0]]
    else:  # feature 0 is large; only experts 0-3 (rank 0's) respond to it
        x[:, 0] = 20.0
        with torch.no_grad():
            layer.gate.weight[:, 0] = torch.tensor([1.0] * 4 + [-1.0] * 4)
        inputs = [x[:6], x[6:]]
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    ranks = _run(_uneven_worker, ep, cfg, state, inputs)
    x_ref = x.clone().requires_grad_(True)
    layer(x_ref).hidden_states.sum().backward()
    assert_close(torch.cat([r["out"] for r in ranks]), layer(x).hidden_states.detach(),
                 atol=ATOL, rtol=RTOL, what="outputs")
    # each rank minimises the sum of its outputs: input gradients equal the reference's;
    # parameter gradients are averaged over ranks by sync_gradients
    assert_close(torch.cat([r["x_grad"] for r in ranks]), x_ref.grad, atol=ATOL, rtol=RTOL,
                 what="input gradients")
    for r in ranks:
        expected = layer.experts.gate_up_proj.grad[r["offset"]:r["offset"] + 4] / ep
        assert_close(r["grads"]["experts.gate_up_proj"], expected, atol=ATOL, rtol=RTOL,
                     what="expert gradients")
    if case == "every token to rank 0":
        assert ranks[0]["bytes"]["dispatch"] == 0 and ranks[1]["bytes"]["combine"] == 0


# --- one forward for one process and many ------------------------------------------------------
def _moe_calls(fn: Callable[[], Any]) -> set[str]:
    """The functions of the MoE layer's stages (router, dispatch, balance, the layer and
    its dispatchers) that ``fn()`` runs: {"file.py:Qualified.name"}. Private helpers of
    dispatch.py are left out: which of them run depends on the expert counts (the grouped
    GEMM pads some batches and not others), and a rank holds other counts than one process."""
    moe = Path(MoELayer.__module__.replace(".", "/")).parent.name  # "moe"
    stages = {"layer.py", "router.py", "dispatch.py", "balance.py", "parallel.py"}
    calls: set[str] = set()

    def profile(frame, event, arg) -> None:  # noqa: ANN001
        code = frame.f_code
        path = Path(code.co_filename)
        if event != "call" or path.parent.name != moe or path.name not in stages:
            return
        if path.name == "dispatch.py" and code.co_name.startswith("_"):
            return
        calls.add(f"{path.name}:{code.co_qualname}")

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls


def _code_path_worker(cfg: ModelConfig, state: dict, x: torch.Tensor) -> dict:
    rank, world = ddist.init_distributed()
    try:
        layer = MoELayer(cfg).train()
        layer.load_state_dict(state)
        x_r = ddist.data_shard(x, rank, world)
        single = _moe_calls(lambda: layer(x_r))
        ep_layer = parallelize_layer(layer, ddist.Topology.create(world))
        parallel = _moe_calls(lambda: ep_layer(x_r))
        return {"single": single, "parallel": parallel, "same_object": ep_layer is layer,
                "type": type(ep_layer), "forward": type(ep_layer).forward}
    finally:
        ddist.teardown()


def test_expert_parallel_layer_runs_the_single_process_forward() -> None:
    """Not a subclass with its own forward: the same MoELayer.forward, router, plan,
    grouped experts, combine and loss table run; only the dispatcher (and the exchange it
    calls, all in moe/parallel.py) differs."""
    cfg = moe_config(aux_loss_alpha=0.01, seq_aux=False, n_devices=2, drop_tokens=True,
                     device_balance_alpha=0.05, comm_balance_alpha=0.02, z_loss_alpha=0.001)
    layer = randomize_(MoELayer(cfg), std=0.3)
    x = torch.randn(4, 8, cfg.hidden_size)
    for r in _run(_code_path_worker, 2, cfg, layer.state_dict(), x):
        assert r["same_object"] and r["type"] is MoELayer and r["forward"] is MoELayer.forward
        assert r["single"] - r["parallel"] == {"layer.py:LocalDispatcher.forward"}
        extra = r["parallel"] - r["single"]
        assert extra and all(name.startswith("parallel.py:") for name in extra), extra
        for name in ("layer.py:MoELayer.forward", "dispatch.py:plan_dispatch",
                     "dispatch.py:run_experts", "dispatch.py:combine",
                     "balance.py:comm_balance_loss", "parallel.py:GroupSum.__call__"):
            assert name in r["parallel"], name


def _empty_worker(configs: list[ModelConfig], state: dict, inputs: list[torch.Tensor]
                  ) -> list[dict]:
    rank, world = ddist.init_distributed()
    try:
        results = []
        for cfg in configs:
            layer = MoELayer(cfg).train()
            layer.load_state_dict(state, strict=False)  # V3's bias buffer is not in state
            model = ddist.parallelize(torch.nn.Sequential(layer), world)
            x = inputs[rank].clone().requires_grad_(True)
            out = model[0](x)
            (out.hidden_states.sum() + out.aux_loss).backward()  # collectives in backward too
            results.append({"aux": out.aux_loss.detach(),
                            "losses": {k: v.detach() for k, v in out.losses.items()},
                            "grads_finite": all(torch.isfinite(p.grad).all()
                                                for p in model.parameters()
                                                if p.grad is not None)})
        return results
    finally:
        ddist.teardown()


@pytest.mark.parametrize("world, case", [(1, "empty batch"), (2, "empty batch"),
                                         (4, "empty batch"), (2, "only rank 0 has tokens"),
                                         (4, "only rank 0 has tokens")])
def test_empty_batch_and_empty_local_shard_give_aux_zero(world: int, case: str) -> None:
    """Balance losses on a rank without tokens are 0, not NaN (sequence-level loss) or a
    ZeroDivisionError (token-level frequencies); with tokens on rank 0 only, rank 0 gets
    the single-process losses of its batch (it is the whole global batch)."""
    all_losses = dict(aux_loss_alpha=0.01, device_balance_alpha=0.05, comm_balance_alpha=0.02,
                      z_loss_alpha=0.001, n_devices=world)
    configs = [moe_config(seq_aux=True, **all_losses), moe_config(seq_aux=False, **all_losses),
               moe_config(scoring_func="sigmoid", topk_method="noaux_tc", n_group=4,
                          topk_group=2, seq_aux=True, aux_loss_alpha=0.01, n_devices=world)]
    layer = randomize_(MoELayer(configs[0]), std=0.3)
    state = layer.state_dict()
    D = configs[0].hidden_size
    inputs = [torch.zeros(2, 0, D) for _ in range(world)]
    if case == "only rank 0 has tokens":
        inputs[0] = torch.randn(2, 6, D)
    ranks = _run(_empty_worker, world, configs, state, inputs)
    for rank, results in enumerate(ranks):
        for cfg, r in zip(configs, results):
            assert r["grads_finite"], f"rank {rank}: non-finite gradients"
            if inputs[rank].numel() == 0:
                assert float(r["aux"]) == 0.0, f"rank {rank}: aux {float(r['aux'])}"
                assert all(float(v) == 0.0 for v in r["losses"].values()), r["losses"]
                continue
            single = MoELayer(cfg).train()
            single.load_state_dict(state, strict=False)
            expected = single(inputs[rank])
            assert set(r["losses"]) == set(expected.losses)
            for name, value in expected.losses.items():
                assert math.isclose(float(r["losses"][name]), float(value.detach()),
                                    rel_tol=1e-5), name


# --- communication volume against dsmoe.plan -----------------------------------------------------
def _bytes_worker(cfg: ModelConfig, x: torch.Tensor, ep: int) -> dict:
    rank, world = ddist.init_distributed()
    try:
        torch.manual_seed(0)
        layer = MoELayer(cfg)
        with torch.no_grad():  # orthonormal router rows: i.i.d. logits, as plan assumes
            q, _ = torch.linalg.qr(torch.randn(cfg.hidden_size, cfg.hidden_size))
            layer.gate.weight.copy_(q[: cfg.n_routed_experts] * 3.0)
        model = ddist.parallelize(torch.nn.Sequential(layer), ep)
        out = model[0](ddist.data_shard(x, rank, world).clone().requires_grad_(True))
        out.hidden_states.sum().backward()
        remote = _remote_ranks(out.topk_idx, cfg.n_routed_experts // ep, ep, rank)
        return {"bytes": ddist.comm_bytes(model),
                "reach": model[0].dispatcher.last_ranks_per_token, "remote": remote}
    finally:
        ddist.teardown()


@pytest.mark.parametrize("M", [None, 1])
def test_measured_bytes_match_plan(M: int | None) -> None:
    ep, tokens = 4, 4096
    cfg = moe_config(n_routed_experts=16, num_experts_per_tok=4, n_devices=ep,
                     topk_method="device_limited" if M else "greedy", max_devices_per_token=M)
    x = torch.randn(tokens // 64, 64, cfg.hidden_size, generator=torch.Generator().manual_seed(3))
    ranks = _run(_bytes_worker, ep, cfg, x, ep)
    predicted = plan.a2a_bytes_per_layer(cfg, tokens // ep, ep, bytes_per_elem=4,
                                         training=True)
    D = cfg.hidden_size
    for r in ranks:
        # The counter against the routing actually taken, exactly: a rank sends its tokens'
        # remote rows (and, in backward, their gradients' counterparts for combine).
        sent_rows = int(r["remote"].sum())
        assert r["bytes"]["dispatch"] == r["bytes"]["combine_grad"] == sent_rows * D * 4
        if M:
            assert int(r["reach"].max()) <= M
    total = {k: sum(r["bytes"][k] for r in ranks) for k in ranks[0]["bytes"]}
    assert total["combine"] == total["dispatch"] == total["dispatch_grad"]
    # plan's expectation (i.i.d. scores) against one random batch, per rank: within 5%.
    measured = total["payload"] / ep
    assert measured == pytest.approx(predicted["payload"], rel=0.05), \
        f"measured {measured:.0f} B/rank vs plan {predicted['payload']:.0f}"
    assert total["metadata"] / ep == pytest.approx(predicted["metadata"], rel=0.05)


# --- training steps --------------------------------------------------------------------------
def _train_config() -> ModelConfig:
    """2 layers (dense, then MoE), 8 experts, V3 routing with bias updates and a seq loss."""
    return moe_config(num_hidden_layers=2, first_k_dense_replace=1, scoring_func="sigmoid",
                      topk_method="noaux_tc", n_group=4, topk_group=2, norm_topk_prob=True,
                      aux_loss_alpha=0.001, seq_aux=True, bias_update_speed=0.001)


def _batches(cfg: ModelConfig, steps: int, B: int = 4, S: int = 16) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(0, cfg.vocab_size, (B, S + 1), generator=gen) for _ in range(steps)]


def _train_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 batches: list[torch.Tensor], rank: int, world: int) -> list[float]:
    """The training step of ``dsmoe.train.loop`` with the distributed calls added."""
    losses = []
    for batch in batches:
        ids = ddist.data_shard(batch, rank, world)
        out = model(ids[:, :-1], return_routing=True)
        ce = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), ids[:, 1:].flatten())
        (ce + out.aux_loss).backward()
        ddist.sync_gradients(model)
        ddist.clip_grad_norm_(model, 0.5)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ddist.all_reduce_expert_load(model)
        model.update_router_biases()
        losses.append(ddist.reduce_mean(ce.detach() + out.aux_loss.detach()))
    return losses


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)


def _train_worker(cfg: ModelConfig, ep: int, batches: list[torch.Tensor],
                  resume: dict) -> dict:
    rank, world = ddist.init_distributed()
    try:
        torch.manual_seed(rank)  # parallelize must make differently-seeded ranks agree
        model = Transformer(cfg)
        model.load_state_dict(resume["model"])  # full state: load before parallelize
        model = ddist.parallelize(model, ep)
        optimizer = _optimizer(model)  # after parallelize: it must see the local experts
        if resume["optimizer"] is not None:
            optimizer.load_state_dict(ddist.shard_optimizer_state(model, optimizer,
                                                                  resume["optimizer"]))
        losses = _train_steps(model, optimizer, batches, rank, world)
        state = {"model": ddist.full_state_dict(model),
                 "optimizer": ddist.full_optimizer_state(model, optimizer)}
        return {"losses": losses, **state} if rank == 0 else {}
    finally:
        ddist.teardown()


def _single_run(cfg: ModelConfig, batches: list[torch.Tensor]) -> tuple[list[float], dict]:
    torch.manual_seed(0)
    model = Transformer(cfg)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    losses = _train_steps(model, _optimizer(model), batches, 0, 1)
    return losses, {"init": init, "final": model.state_dict()}


def test_training_steps_match_single_process_and_resume_with_another_world_size() -> None:
    """6 AdamW steps on the same global batches: 2 on 2 ranks (EP 2), resumed from the
    gathered checkpoint for 2 on 4 ranks (EP 4), then 2 on 4 ranks as EP 2 x 2 replicas.
    Losses and final weights equal one process's to 2e-5 (fp32; Adam turns summation-order
    differences of ~1e-7 in the gradients into ~1e-6 in the weights)."""
    cfg = _train_config()
    batches = _batches(cfg, 6)
    single_losses, single = _single_run(cfg, batches)
    state = {"model": single["init"], "optimizer": None}
    losses: list[float] = []
    for phase, (world, ep) in enumerate([(2, 2), (4, 4), (4, 2)]):
        state = _run(_train_worker, world, cfg, ep, batches[2 * phase:2 * phase + 2], state)[0]
        losses += state.pop("losses")
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(single_losses), atol=2e-5,
                               rtol=0, msg=lambda m: f"losses {losses} vs {single_losses}\n{m}")
    for key, value in single["final"].items():
        assert_close(state["model"][key], value, atol=2e-5, rtol=1e-4, what=f"final {key}")


# --- bad set-ups ---------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, world, ep, message", [
    ({}, 4, 3, "not divisible by --ep 3"),
    (dict(n_routed_experts=8), 6, 6, "n_routed_experts=8 is not divisible by --ep 6"),
    (dict(topk_method="device_limited", n_devices=4, max_devices_per_token=3), 2, 2,
     "M=3 exceeds the EP size 2"),
    (dict(topk_method="device_limited", n_devices=4, max_devices_per_token=2), 2, 2,
     "n_devices=4 devices but --ep is 2"),
    (dict(n_routed_experts=None), 2, 2, "needs routed experts"),
])
def test_bad_setups_raise_clear_errors(kwargs: dict, world: int, ep: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ddist.check_parallel_setup(moe_config(**kwargs), world, ep)


def _setup_worker(cfg: ModelConfig, ep: int) -> dict:
    ddist.init_distributed()
    try:
        ddist.parallelize(Transformer(cfg), ep)
        return {}
    finally:
        ddist.teardown()


@pytest.mark.parametrize("kwargs, ep, message", [
    ({}, 3, "world size 2 is not divisible by --ep 3"),
    (dict(n_routed_experts=7, n_devices=1), 2, "n_routed_experts=7 is not divisible by --ep 2"),
    (dict(topk_method="device_limited", n_devices=4, max_devices_per_token=2), 2,
     "n_devices=4 devices but --ep is 2"),
])
def test_bad_setups_fail_on_every_rank_without_hanging(kwargs: dict, ep: int,
                                                         message: str) -> None:
    """parallelize validates before its first collective, so a bad set-up raises (and the
    launcher reports it) instead of leaving ranks waiting for each other."""
    with pytest.raises(Exception, match=message):
        _run(_setup_worker, 2, moe_config(**kwargs), ep)


def test_ep_model_config_uses_ranks_as_devices() -> None:
    cfg = moe_config(topk_method="device_limited", n_devices=2, max_devices_per_token=1)
    assert ddist.ep_model_config(cfg, 4).n_devices == 4
    with pytest.raises(ValueError, match="M=3 exceeds the EP size 2"):
        ddist.ep_model_config(cfg.replace(n_devices=4, max_devices_per_token=3), 2)


def test_data_shard_splits_rows_of_the_global_batch() -> None:
    batch = torch.arange(8).view(4, 2)
    shards = [ddist.data_shard((batch, batch + 1), r, 2) for r in range(2)]
    assert torch.equal(torch.cat([s[0] for s in shards]), batch)
    assert torch.equal(shards[1][1], batch[2:] + 1)
    with pytest.raises(ValueError, match="batch size 4 is not divisible by the world size 3"):
        ddist.data_shard(batch, 0, 3)


def test_a_layer_holding_an_expert_shard_has_no_hf_names() -> None:
    layer = MoELayer(moe_config())
    layer.experts = slice_experts(layer.experts, 4, 8)  # what parallelize_layer does on rank 1
    for call in (layer.hf_state_dict, lambda: layer.load_hf_state_dict({})):
        with pytest.raises(NotImplementedError, match="holds 4 of its 8 experts"):
            call()
