"""``dsmoe plan``: the capacity planner's arithmetic, its routing statistics against exact
enumeration, its FLOPs against the DeepSeekMoE paper, and the command's errors.

(Its byte counts against measured all-to-all traffic are in test_parallel.py.)
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from dsmoe import distributed as ddist
from dsmoe import plan, plan_memory, plan_search
from dsmoe.cli import main
from dsmoe.config import ModelConfig
from dsmoe.finetune import lora
from dsmoe.model import Transformer
from dsmoe.moe.router import select_group_limited
from dsmoe.params import count_parameters


def _exact_ranks_per_token(E: int, K: int, ep: int, M: int | None) -> float:
    """Mean distinct ranks per token over every ordering of E i.i.d. scores (all equally
    likely), through the router's own selection."""
    perms = torch.tensor(list(itertools.permutations(range(E))), dtype=torch.float64)
    if M is None:
        picks = torch.topk(perms, K, dim=-1).indices
    else:
        picks = select_group_limited(perms, K, ep, M, "max")
    owners = torch.zeros(perms.shape[0], ep, dtype=torch.bool)
    owners.scatter_(1, picks // (E // ep), True)
    return float(owners.sum(dim=1).double().mean())


@pytest.mark.parametrize("E, K, ep", [(8, 2, 4), (8, 3, 2), (6, 2, 3)])
def test_uniform_remote_probability_matches_enumeration(E: int, K: int, ep: int) -> None:
    exact = _exact_ranks_per_token(E, K, ep, None)
    assert plan.ranks_per_token(E, K, ep) == pytest.approx(exact, rel=1e-12)


@pytest.mark.parametrize("E, K, ep, M", [(8, 3, 4, 2), (8, 2, 4, 1), (6, 3, 3, 2), (8, 2, 4, 3)])
def test_device_limited_estimate_matches_enumeration(E: int, K: int, ep: int, M: int) -> None:
    """The Monte Carlo estimate (20,000 samples) against the exact expectation: 1%."""
    exact = _exact_ranks_per_token(E, K, ep, M)
    estimate = plan.ranks_per_token(E, K, ep, M)
    assert estimate == pytest.approx(exact, rel=0.01), f"MC {estimate} vs exact {exact}"
    assert estimate <= M


def test_device_limit_reduces_traffic_monotonically() -> None:
    E, K, ep = 64, 6, 8
    reach = [plan.ranks_per_token(E, K, ep, M) for M in range(1, ep + 1)]
    assert all(a <= b + 0.03 for a, b in zip(reach, reach[1:])), reach  # 0.03: ~5 MC s.e.
    assert reach[0] == pytest.approx(1.0)
    unlimited = plan.ranks_per_token(E, K, ep)
    assert reach[K - 1:] == [pytest.approx(unlimited)] * (ep - K + 1)  # M >= K cannot bind
    assert reach[K - 2] < unlimited


def test_payload_formula() -> None:
    cfg = ModelConfig.preset("tiny").replace(n_devices=4)
    T, ep = 512, 4
    got = plan.a2a_bytes_per_layer(cfg, T, ep, bytes_per_elem=2, training=True)
    remote = plan.ranks_per_token(16, 3, ep) * (ep - 1) / ep
    # dispatch + combine, forward + backward, one D-row per (token, other rank)
    assert got["payload"] == pytest.approx(4 * T * remote * cfg.hidden_size * 2)
    inference = plan.a2a_bytes_per_layer(cfg, T, ep, bytes_per_elem=2, training=False)
    assert inference["payload"] == pytest.approx(got["payload"] / 2)
    assert plan.a2a_bytes_per_layer(cfg, T, 1, bytes_per_elem=2)["payload"] == 0


@pytest.mark.parametrize("dtype, per_param", [("bf16", 2 + 2 + 12), ("fp32", 4 + 4 + 8)])
def test_memory_per_rank_splits_experts_only(dtype: str, per_param: int) -> None:
    cfg = ModelConfig.preset("deepseek-moe-16b")
    counts = count_parameters(cfg)
    p = plan.make_plan(cfg, 16, ep=8, dtype=dtype)
    assert p.replicas == 2
    assert p.expert_params_per_rank == counts.routed_experts // 8
    assert p.replicated_params == counts.total - counts.routed_experts
    per_rank = p.replicated_params + p.expert_params_per_rank
    state = p.memory["parameters"] + p.memory["gradients"] + p.memory["optimizer"]
    assert state == per_rank * per_param
    doubled = plan.make_plan(cfg, 16, ep=8, dtype=dtype, tokens_per_step=2 * p.tokens_per_step)
    assert doubled.memory["activations"] == pytest.approx(2 * p.memory["activations"])


@pytest.mark.parametrize("preset, paper_tflops", [
    ("deepseek-moe-16b", 74.4),  # DeepSeekMoE paper, Table 3: FLOPs per 4K tokens
    ("deepseek-moe-145b", 585.6),  # Table 5
])
def test_training_flops_match_the_paper(preset: str, paper_tflops: float) -> None:
    """Within 3%. (The paper's 2B figure, 4.3T per 2K tokens, is 29% below this model's
    5.5T; it appears to leave out the 131M-parameter output layer.)"""
    p = plan.make_plan(ModelConfig.preset(preset), 1, ep=1, seq_len=4096)
    training = 3 * p.flops_forward_per_token * 4096 / 1e12
    assert training == pytest.approx(paper_tflops, rel=0.03)


def test_plan_command_prints_memory_flops_and_traffic(capsys: pytest.CaptureFixture) -> None:
    assert main(["plan", "--preset", "deepseek-moe-16b", "--devices", "8"]) == 0
    out = capsys.readouterr().out
    assert "EP 8 x 1 replica(s)" in out and "activations (4,096 tokens" in out
    rows = [line for line in out.splitlines() if line.startswith("| device-limited, M=")]
    assert [row.split("M=")[1].split(" ")[0] for row in rows] == ["1", "2", "3", "4", "5"]
    assert "| top-6 of 64 |" in out


def test_plan_command_largest_preset_with_replicas(capsys: pytest.CaptureFixture) -> None:
    assert main(["plan", "--preset", "deepseek-moe-145b", "--devices", "64", "--ep", "16",
                 "--max-devices-per-token", "4", "--dtype", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "EP 16 x 4 replica(s), fp32" in out and "| device-limited, M=4 |" in out
    assert "Gradient all-reduce" in out


@pytest.mark.parametrize("argv, message", [
    (["--devices", "8", "--ep", "3"], "--devices 8 is not divisible by --ep 3"),
    (["--devices", "6", "--ep", "6"], "n_routed_experts=64 is not divisible by --ep 6"),
    (["--devices", "8", "--max-devices-per-token", "9"], "M=9 must lie in [1, --ep 8]"),
    (["--devices", "64", "--ep", "64", "--max-devices-per-token", "2"],
     "2 ranks of 1 experts cannot hold top-6"),
    (["--devices", "8", "--tokens-per-step", "100"], "multiple of --devices 8"),
])
def test_plan_command_errors(argv: list[str], message: str,
                             capsys: pytest.CaptureFixture) -> None:
    assert main(["plan", "--preset", "deepseek-moe-16b", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err


def test_plan_command_reads_an_hf_config(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "config.json"
    path.write_text(ModelConfig.preset("deepseek-moe-16b").to_json_string())
    assert main(["plan", "--config", str(path), "--devices", "8"]) == 0
    from_file = capsys.readouterr().out
    assert main(["plan", "--preset", "deepseek-moe-16b", "--devices", "8"]) == 0
    from_preset = capsys.readouterr().out
    assert from_file.splitlines()[1:] == from_preset.splitlines()[1:]  # all but the title


# --- layouts: FSDP x EP, activation checkpointing, offload, finetuning -------------------------
def _state(p: plan.Plan) -> float:
    return p.memory["parameters"] + p.memory["gradients"] + p.memory["optimizer"]


@pytest.mark.parametrize("preset", ["tiny", "tiny-v2", "deepseek-moe-16b", "deepseek-v3"])
def test_fsdp_units_add_up_to_the_parameter_count(preset: str) -> None:
    cfg = ModelConfig.preset(preset)
    counts = count_parameters(cfg)
    units = plan_memory.unit_parameters(cfg)
    assert sum(u.total for u in units) == counts.total
    assert sum(u.experts for u in units) == counts.routed_experts


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("devices, ep", [(8, 1), (8, 2), (8, 8), (16, 4)])
def test_fsdp_keeps_one_nth_of_everything(dtype: str, devices: int, ep: int) -> None:
    """ZeRO-3: 16 bytes per parameter (2 + 2 + 12 or 4 + 4 + 8) over N ranks, whatever
    the EP split. On top: the root (embedding, norm, lm_head) gathered with its gradients
    through the step, the largest block gathered twice (prefetch) + its gradients; an
    expert block with one holder (ep = N) is not gathered."""
    cfg = ModelConfig.preset("deepseek-moe-16b")
    counts = count_parameters(cfg)
    p = plan.make_plan(cfg, devices, ep=ep, dtype=dtype, fsdp=True)
    assert _state(p) == pytest.approx(16 * counts.total / devices)
    b = plan.DTYPE_BYTES[dtype]
    root = counts.embedding + counts.lm_head + cfg.hidden_size
    blocks = [plan_memory.block_parameters(cfg, i) for i in range(cfg.num_hidden_layers)]
    gathered = max(u.dense + (u.experts / ep if ep < devices else 0) for u in blocks)
    assert p.memory["fsdp_transient"] == pytest.approx((2 * root + 3 * gathered) * b)
    ddp = plan.make_plan(cfg, devices, ep=ep, dtype=dtype)
    assert _state(ddp) > _state(p) and ddp.memory["fsdp_transient"] == 0
    assert p.memory["activations"] == ddp.memory["activations"]


def test_cpu_offload_moves_the_optimizer_state_to_the_host() -> None:
    cfg = ModelConfig.preset("deepseek-moe-16b")
    """FSDP2's CPUOffloadPolicy: every sharded tensor on the host; only what is gathered
    and the activations stay on the device."""
    on, off = (plan.make_plan(cfg, 8, fsdp=True, cpu_offload=o) for o in (False, True))
    assert off.memory["parameters"] == off.memory["gradients"] == off.memory["optimizer"] == 0
    assert off.host_memory == pytest.approx(_state(on)) and on.host_memory == 0
    assert off.device_bytes == pytest.approx(on.device_bytes - _state(on))
    with pytest.raises(ValueError, match="--cpu-offload needs --fsdp"):
        plan.make_plan(cfg, 8, cpu_offload=True)


def test_activation_checkpointing_keeps_block_inputs_and_one_block() -> None:
    cfg = ModelConfig.preset("deepseek-moe-16b")
    b, D, V = 2, cfg.hidden_size, cfg.vocab_size
    full, ckpt = (plan.make_plan(cfg, 8, activation_checkpointing=a) for a in (False, True))
    blocks = [plan_memory.block_activation_bytes(cfg, i, b) for i in range(28)]
    head = D * b + V * 4
    assert full.memory["activations"] == pytest.approx(4096 * (sum(blocks) + head))
    assert ckpt.memory["activations"] == pytest.approx(4096 * (28 * D * b + max(blocks) + head))
    assert ckpt.memory["activations"] < full.memory["activations"] / 4


def test_micro_batch_sizes_activations_and_the_step() -> None:
    cfg = ModelConfig.preset("deepseek-moe-16b")
    one = plan.make_plan(cfg, 8, seq_len=1024)
    two = plan.make_plan(cfg, 8, seq_len=1024, micro_batch=2)
    assert two.micro_batch_tokens == 2048 and two.tokens_per_step == 8 * 2048
    assert two.memory["activations"] == pytest.approx(2 * one.memory["activations"])
    accumulated = plan.make_plan(cfg, 8, seq_len=1024, micro_batch=1, tokens_per_step=8 * 4096)
    assert accumulated.memory["activations"] == pytest.approx(one.memory["activations"])
    with pytest.raises(ValueError, match="--micro-batch 3 x --seq-len 1024"):
        plan.make_plan(cfg, 8, seq_len=1024, micro_batch=3, tokens_per_step=8 * 4096)


@pytest.mark.parametrize("preset", ["tiny", "tiny-v2", "tiny-v3"])
@pytest.mark.parametrize("targets", [lora.DEFAULT_TARGETS, lora.TARGETS])
def test_lora_adapter_counts_match_apply_lora(preset: str, targets: tuple[str, ...]) -> None:
    """The planner's adapter shapes against finetune's own adapters on a built model."""
    cfg = ModelConfig.preset(preset)
    model = Transformer(cfg)
    lora.apply_lora(model, lora.LoRASettings(r=4, targets=targets))
    adapters = lora.lora_parameters(model)
    expected = plan_memory.lora_unit_parameters(cfg, 4, targets)
    assert sum(p.numel() for p in adapters.values()) == sum(u.total for u in expected)
    expert_adapters = sum(p.numel() for name, p in adapters.items() if ".experts." in name)
    assert expert_adapters == sum(u.experts for u in expected)


def test_lora_plan_trains_adapters_only() -> None:
    cfg = ModelConfig.preset("deepseek-moe-16b")
    counts = count_parameters(cfg)
    p = plan.make_plan(cfg, 8, ep=8, dtype="bf16", method="lora", lora_r=8)
    adapters = sum(plan_memory.lora_unit_parameters(cfg, 8, lora.DEFAULT_TARGETS),
                   plan_memory.Split())
    per_rank = adapters.dense + adapters.experts / 8
    assert p.trainable_params_per_rank == pytest.approx(per_rank)
    assert p.memory["gradients"] == pytest.approx(4 * per_rank)  # fp32 adapters
    assert p.memory["optimizer"] == pytest.approx(8 * per_rank)  # moments, no master
    base = counts.total - counts.routed_experts + counts.routed_experts / 8
    assert p.memory["parameters"] == pytest.approx(2 * base + 4 * per_rank)
    full = plan.make_plan(cfg, 8, ep=8, dtype="bf16", method="full")
    assert _state(p) < _state(full) / 5


# --- sizes and the layout search ---------------------------------------------------------------
@pytest.mark.parametrize("text, size", [("80GB", 80 * 10**9), ("80GiB", 80 * 2**30),
                                        ("24G", 24 * 2**30), ("24g", 24 * 2**30),
                                        ("1.5 TB", 1.5e12), ("512MiB", 512 * 2**20),
                                        ("4096", 4096)])
def test_parse_size(text: str, size: float) -> None:
    assert plan_search.parse_size(text) == int(size)


@pytest.mark.parametrize("text", ["80 GBs", "GB", "-1GB", "80XB", "1e9", "0GB", ""])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="--memory"):
        plan_search.parse_size(text)


def test_search_picks_the_cheapest_layout_that_fits() -> None:
    cfg = ModelConfig.preset("deepseek-moe-16b")
    found = plan_search.search_layouts(cfg, 8, 80 * 10**9, method="full")
    assert len(found.ranked) == 4 * 3 * 2  # EP 1, 2, 4, 8 x DDP|FSDP|FSDP+offload x AC
    best = found.fitting[0]
    assert best.device_bytes <= 80e9
    assert (best.layout.cpu_offload, best.layout.activation_checkpointing) == (False, False)
    cheaper = [p for p in found.ranked if p.step_communication_bytes
               < best.step_communication_bytes and not p.layout.cpu_offload
               and not p.layout.activation_checkpointing and plan_search.dsmoe_flags(p)]
    assert all(p.device_bytes > 80e9 for p in cheaper)
    # EP 8 with DDP would fit with less traffic, but dsmoe finetune's --ep needs --fsdp
    assert plan_search.dsmoe_flags(best) == "dsmoe finetune --full --nproc 8 --ep 8 --fsdp"
    training = plan_search.search_layouts(cfg, 8, 80 * 10**9).fitting[0]
    assert plan_search.dsmoe_flags(training) == "dsmoe train --nproc 8 --ep 8"
    tight = plan_search.search_layouts(cfg, 8, 24 * 2**30, method="full")
    assert all(p.layout.cpu_offload for p in tight.fitting)  # ~30 GiB of state on device
    assert not tight.fitting[0].layout.activation_checkpointing
    fixed = plan_search.search_layouts(cfg, 8, 80 * 10**9, ep=2, fsdp=True, method="full")
    assert {(p.layout.ep, p.layout.fsdp) for p in fixed.ranked} == {(2, True)}


@pytest.mark.parametrize("method, layout, flags", [
    ("train", plan_memory.Layout(4, True, True, True),
     "dsmoe train --nproc 8 --ep 4 --fsdp --activation-checkpointing --offload-optimizer"),
    ("train", plan_memory.Layout(1, True), "dsmoe train --nproc 8 --ep 1 --fsdp"),  # default: 8
    ("full", plan_memory.Layout(1, False), "dsmoe finetune --full --nproc 8"),
    ("full", plan_memory.Layout(2, False), None),  # finetune's --ep needs --fsdp
    ("full", plan_memory.Layout(2, True, True), None),  # no recomputation in finetune
    ("lora", plan_memory.Layout(1, False), "dsmoe finetune --nproc 8"),
    ("lora", plan_memory.Layout(1, True), None),  # LoRA is data parallel only
])
def test_dsmoe_flags_name_the_commands_that_run_a_layout(method: str, layout, flags) -> None:
    p = plan.make_plan(ModelConfig.preset("deepseek-moe-16b"), 8, method=method, ep=layout.ep,
                       fsdp=layout.fsdp, activation_checkpointing=layout.activation_checkpointing,
                       cpu_offload=layout.cpu_offload)
    assert plan_search.dsmoe_flags(p) == flags


def test_plan_memory_command(capsys: pytest.CaptureFixture) -> None:
    assert main(["plan", "--preset", "deepseek-moe-16b", "--devices", "8", "--memory", "80GB",
                 "--full-finetune"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Chosen layout for 74.51 GiB (80.0 GB) per device: **EP ")
    assert "full finetuning on 8 device(s)" in out and "| 1 | EP " in out
    assert "Layouts considered" in out


@pytest.mark.parametrize("argv, message", [
    (["--devices", "8", "--memory", "4GB"], "no layout fits 3.73 GiB (4.0 GB) per device; "
                                            "the closest, EP 8, FSDP, activation "
                                            "checkpointing, CPU offload, needs"),
    (["--devices", "8", "--memory", "eighty"], "--memory 'eighty' is not a size"),
    (["--devices", "8", "--lora-r", "4"], "--lora-r and --targets size LoRA adapters"),
    (["--devices", "8", "--lora", "--targets", "q,zz"], "unknown LoRA target(s) 'zz'"),
    (["--devices", "8", "--micro-batch", "2", "--tokens-per-step", "32768"],
     "--micro-batch 2 x --seq-len 4096"),
])
def test_plan_layout_errors(argv: list[str], message: str,
                            capsys: pytest.CaptureFixture) -> None:
    assert main(["plan", "--preset", "deepseek-moe-16b", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_plan_command_layout_flags(capsys: pytest.CaptureFixture) -> None:
    assert main(["plan", "--preset", "deepseek-moe-16b", "--devices", "8", "--ep", "4",
                 "--fsdp", "--activation-checkpointing", "--cpu-offload", "--lora",
                 "--lora-r", "16", "--micro-batch", "2", "--seq-len", "2048"]) == 0
    out = capsys.readouterr().out
    assert ("LoRA finetuning on 8 device(s): EP 4 x 2 FSDP shard(s), bf16, activation "
            "checkpointing, CPU offload") in out
    assert "activations (4,096 tokens, activation checkpointing)" in out
    assert "| host memory (sharded weights, gradients, optimizer state) |" in out
    assert "FSDP per step" in out


# --- the plan against measured ranks ------------------------------------------------------------
STATE_KINDS = {"parameters": "params", "gradients": "grads", "optimizer": "optimizer"}


def _state_after_a_step(cfg: ModelConfig, ep: int, fsdp: bool) -> dict[str, int]:
    """One AdamW training step in the layout on this gloo rank; the bytes its parameters,
    gradients and optimizer state hold (``local_state_bytes``: local shards only)."""
    rank, _ = ddist.init_distributed()
    try:
        torch.manual_seed(0)
        model = ddist.parallelize(Transformer(cfg), ep)
        if fsdp:
            model = ddist.apply_fsdp(model, ep)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
        gen = torch.Generator().manual_seed(rank)
        ids = torch.randint(0, cfg.vocab_size, (2, 17), generator=gen)
        logits = model(ids[:, :-1]).logits
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        ddist.sync_gradients(model)
        optimizer.step()
        return ddist.local_state_bytes(model, optimizer)
    finally:
        ddist.teardown()


@pytest.mark.parametrize("nproc, ep, fsdp", [
    (1, 1, False), (2, 2, False), (2, 1, True),
    pytest.param(4, 2, True, marks=pytest.mark.slow)], ids=["1", "ep2", "fsdp2", "fsdp2xep2"])
def test_measured_state_matches_the_plan(nproc: int, ep: int, fsdp: bool) -> None:
    """Each rank's parameters, gradients and AdamW state (fp32) within 1% of the plan
    (the issue asks 10%; AdamW's per-tensor step counters are the difference)."""
    cfg = ddist.ep_model_config(ModelConfig.preset("tiny"), ep)
    predicted = plan.make_plan(cfg, nproc, ep=ep, fsdp=fsdp, dtype="fp32").memory
    for rank, measured in enumerate(ddist.launch(_state_after_a_step, nproc, cfg, ep, fsdp,
                                                 threads=1)):
        for kind, key in STATE_KINDS.items():
            assert measured[key] == pytest.approx(predicted[kind], rel=0.01), (rank, kind)
