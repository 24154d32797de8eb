"""FSDP2 x expert parallelism on gloo (CPU): the layouts train like one process, sharded
(DCP) checkpoints survive SIGKILL and resume on another world size, per-rank state
shrinks with the number of shards, and bad combinations fail in one line.

Parity runs use fp32 and `n_devices=2` in every layout (V1's device-balance loss groups
experts into devices; under EP the devices are the EP ranks, so one process must use the
same grouping to compute the same loss). CI runs STEPS steps; the 20-step check of the
issue runs with DSMOE_FSDP_STEPS=20.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import assert_close
from dsmoe import distributed as ddist
from dsmoe.cli import main
from dsmoe.config import ModelConfig
from dsmoe.model import Transformer
from dsmoe.train import loop
from dsmoe.train.runner import spawn
from test_finetune import task  # noqa: F401  (the fixture: a tiny base and its data)
from test_train import _cfg, _write_corpus

STEPS = int(os.environ.get("DSMOE_FSDP_STEPS", "6"))
LAYOUTS = {"fsdp2": (2, 1), "ep2": (2, 2), "2x2": (4, 2)}  # name: (--nproc, --ep)


def _settings(root: Path, name: str, **kw):
    base = _cfg(root / "corpus", root / name, root / "cache", max_steps=STEPS, log_every=1,
                checkpoint_every=2, eval_every=100)
    return _cfg(root / "corpus", root / name, root / "cache",
                **{"max_steps": STEPS, "log_every": 1, "checkpoint_every": 2,
                   "eval_every": 100, "overrides": base.overrides + ("n_devices=2",), **kw})


def _losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["train_loss"]) for r in
            map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "train_loss" in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """One process, then each layout with --fsdp, on the same data and settings."""
    root = tmp_path_factory.mktemp("fsdp")
    _write_corpus(root / "corpus", n_files=4)
    spawn(loop.train, 1, _settings(root, "single"), quiet=True)
    for name, (nproc, ep) in LAYOUTS.items():
        spawn(loop.train, nproc, _settings(root, name), quiet=True, ep=ep,
              fsdp=ddist.FSDPOptions())
    return root


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts_train_like_one_process(runs: Path, layout: str) -> None:
    """Every step's loss within 1e-6 relative of one process's; the exported HF
    directories hold the same files, config and tensor names, the weights equal up to
    summation order (fp32: Adam turns ~1e-7 gradient differences of rarely seen
    embedding rows, whose second moment is tiny, into up to ~2e-5 in the weights)."""
    single, sharded = _losses(runs / "single"), _losses(runs / layout)
    assert [s for s, _ in sharded] == [s for s, _ in single] == list(range(1, STEPS + 1))
    for (step, x), (_, y) in zip(single, sharded):
        assert y == pytest.approx(x, rel=1e-6), f"step {step}: {y} vs {x}"
    a, b = runs / "single" / "model", runs / layout / "model"
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    assert json.loads((a / "config.json").read_text()) == \
        json.loads((b / "config.json").read_text())
    ref, got = Transformer.from_pretrained(a).state_dict(), \
        Transformer.from_pretrained(b).state_dict()
    assert list(ref) == list(got)
    for key, value in ref.items():
        assert_close(got[key], value, atol=1e-4, rtol=1e-4, what=f"{layout} {key}")


@pytest.mark.slow
def test_sigkill_then_resume_on_other_world_sizes(runs: Path, tmp_path: Path) -> None:
    """`--nproc 2 --ep 2 --fsdp` killed (SIGKILL to the launcher's process group) after a
    sharded checkpoint; resumed with 4 ranks (EP 2 x 2 FSDP), then killed again and
    finished in one process without FSDP: the loss curve is the uninterrupted run's."""
    out = tmp_path / "killed"
    common = _cli_args(runs, out)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for layout, ckpt in ((["--nproc", "2", "--ep", "2"], 2),
                         (["--nproc", "4", "--ep", "2", "--resume"], 4)):
        proc = subprocess.Popen([*common, *layout, "--fsdp"], env=env,
                                start_new_session=True)
        target = out / "checkpoints" / f"step_{ckpt:08d}"
        deadline = time.time() + 240
        while not target.is_dir():
            assert proc.poll() is None, "run ended before it could be killed"
            assert time.time() < deadline
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "model").exists()
    subprocess.run([*common, "--resume"], check=True, timeout=300, env=env)
    single, resumed = _losses(runs / "single"), _losses(out)
    assert [s for s, _ in resumed] == [s for s, _ in single]
    for (step, x), (_, y) in zip(single, resumed):
        assert y == pytest.approx(x, rel=1e-6), f"step {step}: {y} vs {x}"


def _cli_args(runs: Path, out: Path) -> list[str]:
    cfg = _settings(runs, "unused")
    sets = [a for item in cfg.overrides for a in ("--set", item)]
    return [sys.executable, "-m", "dsmoe", "train", "--data", cfg.data, "--out", str(out),
            "--cache-dir", cfg.cache_dir, "--batch-size", str(cfg.batch_size),
            "--seq-len", str(cfg.seq_len), "--max-steps", str(cfg.max_steps),
            "--warmup-steps", str(cfg.warmup_steps), "--log-every", "1",
            "--eval-every", "100", "--checkpoint-every", "2", "--quiet", *sets]


@pytest.mark.parametrize("argv, message", [
    (["--fsdp"], "--fsdp shards over processes: use --nproc N with N >= 2"),
    (["--offload-optimizer"], "options of --fsdp; add --fsdp"),
    (["--nproc", "4", "--ep", "3", "--fsdp"], "not divisible by --ep 3"),
])
def test_bad_train_layouts_are_one_line(tmp_path: Path, capsys, argv, message) -> None:
    assert main(["train", "--out", str(tmp_path / "run"), "--quiet", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def _state_bytes_worker(cfg, ep: int, options) -> dict:
    ddist.init_distributed()
    try:
        torch.manual_seed(0)
        model = ddist.apply_fsdp(ddist.parallelize(Transformer(cfg), ep), ep, options)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
        ids = torch.randint(0, cfg.vocab_size, (2, 8))
        with torch.autocast("cpu", torch.bfloat16, enabled=options.param_dtype is not None):
            loss = model(ids).logits.float().square().mean()  # as train's --dtype bfloat16
        loss.backward()
        optimizer.step()
        return {**ddist.local_state_bytes(model, optimizer), "loss": ddist.reduce_mean(loss)}
    finally:
        ddist.teardown()


@pytest.mark.parametrize("world, ep, options", [
    (2, 1, ddist.FSDPOptions()),
    (4, 2, ddist.FSDPOptions(reshard_after_forward=False, offload_optimizer=True)),
    (2, 2, ddist.FSDPOptions(param_dtype="bfloat16")),
], ids=["fsdp2", "2x2-no-reshard-offload", "ep2-bf16"])
def test_local_state_bytes_split_the_model_over_the_ranks(world: int, ep: int,
                                                           options) -> None:
    """Each element of every parameter (and of its gradient and Adam moments) is stored
    on exactly one rank: the ranks' sums are one process's, and no rank holds more than
    its share plus a row of padding. The options change how weights travel, not what is
    stored (offload is a no-op on CPU; bf16 gathers for compute, fp32 master weights),
    and the first forward's loss is one process's (bf16: to bf16 precision)."""
    cfg = ModelConfig.preset("tiny").replace(num_hidden_layers=2, n_devices=2)
    torch.manual_seed(0)
    single = Transformer(cfg)
    params = sum(p.numel() * p.element_size() for p in single.parameters())
    n_params = sum(1 for _ in single.parameters())
    ids = torch.randint(0, cfg.vocab_size, (2, 8))
    expected = single(ids).logits.float().square().mean().item()
    ranks = ddist.launch(_state_bytes_worker, world, cfg, ep, options, threads=1)
    assert sum(r["params"] for r in ranks) == params
    assert sum(r["grads"] for r in ranks) == params
    # exp_avg + exp_avg_sq split like the parameters; each rank keeps every step count
    assert sum(r["optimizer"] for r in ranks) == 2 * params + world * 4 * n_params
    for r in ranks:
        assert r["params"] <= params / world * 1.05, r
        assert r["total"] == r["params"] + r["grads"] + r["optimizer"]
    rel = 2e-2 if options.param_dtype == "bfloat16" else 1e-6
    assert ranks[0]["loss"] == pytest.approx(expected, rel=rel)


def _distcp_bytes(checkpoint: Path, prefix: str) -> dict[str, int]:
    """Tensor bytes (elements x size, no file overhead) whose key starts with ``prefix``,
    per file of the DCP checkpoint (one file per rank)."""
    from dsmoe.distributed.sharded_checkpoint import SafeReader

    metadata = SafeReader(str(checkpoint)).read_metadata()
    sizes: dict[str, int] = {}
    for index, info in metadata.storage_data.items():
        if not index.fqn.startswith(prefix):
            continue
        meta = metadata.state_dict_metadata[index.fqn]
        chunk = next(c for c in meta.chunks if tuple(c.offsets) == tuple(index.offset))
        n = chunk.sizes.numel() * meta.properties.dtype.itemsize
        sizes[info.relative_path] = sizes.get(info.relative_path, 0) + n
    return sizes


@pytest.mark.slow
def test_full_finetune_fsdp_shards_the_optimizer_state(task, tmp_path: Path) -> None:
    """`dsmoe finetune --full --nproc 2 --fsdp`: the losses of one process, the same
    exported model, and each rank's share of the Adam moments in the sharded checkpoint
    is about half of the one-process checkpoint's (together exactly all of it)."""
    common = [str(task["base"]), "--data", str(task["data"]), "--full", "--max-steps", "3",
              "--lr", "1e-3", "--batch-size", "8", "--log-every", "1", "--quiet",
              "--checkpoint-every", "3"]
    assert main(["finetune", *common, "--out", str(tmp_path / "one")]) == 0
    assert main(["finetune", *common, "--out", str(tmp_path / "two"), "--nproc", "2",
                 "--fsdp"]) == 0
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert [s for s, _ in one] == [s for s, _ in two] == [1, 2, 3]
    for (_, x), (_, y) in zip(one, two):
        assert y == pytest.approx(x, rel=1e-6), (one, two)
    whole = torch.load(tmp_path / "one" / "checkpoints" / "step_00000003.pt",
                       weights_only=True)["optimizer"]["state"]
    moments = sum(t.numel() * t.element_size() for entry in whole.values()
                  for name, t in entry.items() if name != "step")
    shards = _distcp_bytes(tmp_path / "two" / "checkpoints" / "step_00000003", "optim/")
    step_bytes = 4 * len(whole)  # the step counts, written once
    assert len(shards) == 2 and sum(shards.values()) - step_bytes == moments
    assert max(shards.values()) < 0.55 * moments, (shards, moments)
    a = Transformer.from_pretrained(tmp_path / "one" / "model").state_dict()
    b = Transformer.from_pretrained(tmp_path / "two" / "model").state_dict()
    for key, value in a.items():
        assert_close(b[key], value, atol=1e-5, rtol=1e-4, what=key)


def test_lora_and_expert_flags_need_full_fsdp(task, tmp_path: Path, capsys) -> None:
    base = [str(task["base"]), "--data", str(task["data"]), "--out", str(tmp_path / "r"),
            "--quiet"]
    for extra, message in ((["--nproc", "2", "--fsdp"], "--fsdp shards full finetuning"),
                           (["--full", "--ep", "2"], "--ep 2 shards the experts of --full "
                                                     "--fsdp finetuning")):
        assert main(["finetune", *base, *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def _unswapped_worker(cfg) -> str:
    ddist.init_distributed()
    try:
        ddist.apply_fsdp(Transformer(cfg), 1)
        return ""
    except ValueError as exc:
        return str(exc)
    finally:
        ddist.teardown()


def test_apply_fsdp_refuses_a_model_without_the_ep_swap() -> None:
    """FSDP goes on after ``parallelize`` (torchtitan's order): on a model without it the
    balance statistics would be per rank, so it says what to call first."""
    cfg = ModelConfig.preset("tiny").replace(num_hidden_layers=2)
    messages = ddist.launch(_unswapped_worker, 2, cfg, threads=1)
    assert all("call dsmoe.distributed.parallelize(model, 1) before it" in m
               for m in messages), messages


@pytest.mark.slow
def test_full_finetune_resumes_across_layouts(task, tmp_path: Path) -> None:
    """A sharded finetuning checkpoint (--nproc 2 --ep 2 --fsdp) continues in one process,
    and a one-process checkpoint continues sharded (--nproc 2 --fsdp): with the newest
    checkpoint removed, the resumed steps log the losses of the run that made them."""
    common = [str(task["base"]), "--data", str(task["data"]), "--full", "--max-steps", "4",
              "--lr", "1e-3", "--batch-size", "8", "--log-every", "1", "--quiet",
              "--checkpoint-every", "2"]
    for name, first, then in (("sharded", ["--nproc", "2", "--ep", "2", "--fsdp"], []),
                              ("whole", [], ["--nproc", "2", "--fsdp"])):
        out = tmp_path / name
        assert main(["finetune", *common, "--out", str(out), *first]) == 0
        reference = _losses(out)
        newest = sorted((out / "checkpoints").glob("step_*"))[-1]
        assert newest.name.startswith("step_00000004")
        if newest.is_dir():
            shutil.rmtree(newest)
        else:
            newest.unlink()
        assert main(["finetune", *common, "--out", str(out), "--resume", *then]) == 0
        resumed = _losses(out)
        assert [s for s, _ in resumed] == [s for s, _ in reference] == [1, 2, 3, 4]
        for (step, x), (_, y) in zip(reference, resumed):
            assert y == pytest.approx(x, rel=1e-6), f"{name} step {step}: {y} vs {x}"


class _Payload:
    """What a crafted pickle would run on load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_dcp_metadata_is_refused_without_running_it(tmp_path: Path, capsys) -> None:
    """DCP's .metadata is a pickle: a checkpoint whose .metadata asks for anything but
    DCP's own classes is skipped with a warning naming it, and nothing in it runs."""
    from dsmoe.train import checkpoint as ckpt

    out = tmp_path / "run"
    step = out / "checkpoints" / "step_00000002"
    step.mkdir(parents=True)
    torch.save({"step": 2, "rng": {}, "interval": {}, "scheduler": {}, "param_groups": []},
               step / "trainer.pt")
    marker = tmp_path / "ran"
    (step / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ValueError, match="none of the 1 checkpoint"):
        ckpt.load_latest(out)
    assert not marker.exists()
    assert "posix.system is not allowed in DCP metadata" in capsys.readouterr().err


def _v3_bias_worker(cfg, ep: int, ids: torch.Tensor) -> list[torch.Tensor]:
    ddist.init_distributed()
    try:
        torch.manual_seed(0)
        model = ddist.apply_fsdp(ddist.parallelize(Transformer(cfg), ep), ep)
        model(ddist.data_shard(ids)).logits.float().square().mean().backward()
        ddist.all_reduce_expert_load(model)
        model.update_router_biases()
        return [layer.gate.e_score_correction_bias.clone() for layer in model.moe_layers()]
    finally:
        ddist.teardown()


def test_v3_bias_update_under_fsdp_is_one_process_update() -> None:
    """V3's router bias is a buffer FSDP leaves whole: the expert loads of the 2x2
    layout's ranks (a row each), all-reduced, move it exactly as one process's loads of
    the whole batch do."""
    cfg = ModelConfig.preset("tiny-v3").replace(num_hidden_layers=2, bias_update_speed=0.01)
    torch.manual_seed(0)
    single = Transformer(cfg)
    ids = torch.randint(0, cfg.vocab_size, (4, 16))
    single(ids).logits.float().square().mean().backward()
    single.update_router_biases()
    expected = [layer.gate.e_score_correction_bias for layer in single.moe_layers()]
    assert any(b.abs().sum() > 0 for b in expected)
    for rank in ddist.launch(_v3_bias_worker, 4, cfg, 2, ids, threads=1):
        for got, want in zip(rank, expected):
            assert torch.equal(got, want), (got, want)
