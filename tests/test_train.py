"""End-to-end training: run directory, exact resume after SIGKILL, SIGINT, bad data, NaN,
export fidelity, and that every routing variant learns."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dsmoe.model import Transformer
from dsmoe.train import loop
from dsmoe.train.config import TrainConfig, build_model_config, routing_overrides
from dsmoe.config import ModelConfig


def _write_corpus(root: Path, n_files: int = 12) -> Path:
    """Small, learnable 'code': templated functions with random names and numbers."""
    rng = random.Random(0)
    names = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        lines = []
        for _ in range(60):
            a, b = rng.sample(names, 2)
            n = rng.randint(0, 99)
            lines.append(f"def {a}_{n}({b}):\n    return {b} + {n}\n")
        (root / f"mod_{i}.py").write_text("\n".join(lines))
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return _write_corpus(tmp_path_factory.mktemp("corpus"))


def _cfg(corpus: Path, out: Path, cache: Path, **kw) -> TrainConfig:
    base = dict(data=str(corpus), out=str(out), cache_dir=str(cache), max_steps=6,
                batch_size=4, seq_len=32, log_every=2, eval_every=3, eval_batches=2,
                checkpoint_every=3, warmup_steps=2, samples=1,
                overrides=("hidden_size=64", "num_attention_heads=2", "num_key_value_heads=2",
                           "moe_intermediate_size=32", "intermediate_size=128",
                           "num_hidden_layers=2", "max_position_embeddings=64"))
    base.update(kw)
    return TrainConfig(**base)


def test_run_directory_and_export(corpus: Path, tmp_path: Path) -> None:
    cfg = _cfg(corpus, tmp_path / "run", tmp_path / "cache")
    result = loop.train(cfg, quiet=True)
    out = Path(cfg.out)
    assert result.status == "finished" and result.step == 6
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6]
    assert "val_loss" in records[-1] and "val_loss" not in records[0]
    for key in ("train_loss", "aux_loss", "lr", "tokens_per_s", "expert_load", "dropped_fraction"):
        assert key in records[-1], key
    assert len(records[-1]["expert_load"]) == 1  # one MoE layer (first layer is dense)
    assert sum(records[-1]["expert_load"][0]) == 2 * 4 * 32 * 3  # 2 steps x tokens x top-k
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (out / "model" / name).exists(), name
    assert (out / "report.md").exists() and (out / "plots" / "loss.png").exists()
    # The exported model's logits equal those of the final checkpoint's model.
    state = torch.load(sorted((out / "checkpoints").glob("*.pt"))[-1], weights_only=True)
    trained = Transformer(ModelConfig.from_hf(state["model_config"]))
    trained.load_state_dict(state["model"])
    exported = Transformer.from_pretrained(out / "model")
    ids = torch.randint(0, trained.config.vocab_size, (2, 16))
    trained.eval(), exported.eval()
    torch.testing.assert_close(exported(ids).logits, trained(ids).logits, atol=0, rtol=0)
    with pytest.raises(ValueError, match="--resume"):
        loop.train(cfg, quiet=True)


def _cli(*args: str, out: Path, cache: Path, corpus: Path) -> list[str]:
    return [sys.executable, "-m", "dsmoe", "train", "--data", str(corpus), "--out", str(out),
            "--cache-dir", str(cache), "--batch-size", "4", "--seq-len", "32",
            "--log-every", "1", "--eval-every", "4", "--checkpoint-every", "2",
            "--set", "hidden_size=64", "--set", "num_attention_heads=2",
            "--set", "num_key_value_heads=2", "--set", "num_hidden_layers=2",
            "--set", "max_position_embeddings=64", "--quiet", *args]


def _losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["train_loss"]) for r in
            map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


@pytest.mark.slow
@pytest.mark.parametrize("routing", ["v2", "v3"])
def test_sigkill_then_resume_is_bit_exact(corpus: Path, tmp_path: Path, routing: str) -> None:
    cache = tmp_path / "cache"
    steps = "10"
    ref = tmp_path / "ref"
    subprocess.run(_cli("--max-steps", steps, "--routing", routing, out=ref, cache=cache,
                        corpus=corpus), check=True, timeout=300)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cli("--max-steps", steps, "--routing", routing, out=killed,
                                 cache=cache, corpus=corpus))
    deadline = time.time() + 240
    while not (killed / "checkpoints" / "step_00000004.pt").exists():
        assert proc.poll() is None, "run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "model").exists()
    subprocess.run(_cli("--max-steps", steps, "--routing", routing, "--resume", out=killed,
                        cache=cache, corpus=corpus), check=True, timeout=300)
    assert _losses(killed) == _losses(ref)  # bit for bit, every logged step
    a = torch.load(sorted((ref / "checkpoints").glob("*.pt"))[-1], weights_only=True)
    b = torch.load(sorted((killed / "checkpoints").glob("*.pt"))[-1], weights_only=True)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


@pytest.mark.slow
def test_sigint_saves_and_exits_cleanly(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.Popen(_cli("--max-steps", "100000", out=out, cache=tmp_path / "cache",
                                 corpus=corpus), stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    saved = sorted((out / "checkpoints").glob("*.pt"))
    assert saved, "SIGINT must leave a checkpoint"
    step = torch.load(saved[-1], weights_only=True)["step"]
    assert step >= 1 and _losses(out)[-1][0] <= step


def test_bad_data_fails_before_training(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError):
        loop.train(_cfg(empty, tmp_path / "run", tmp_path / "cache"), quiet=True)
    assert not (tmp_path / "run" / "checkpoints").exists()
    binary = tmp_path / "blob.txt"
    binary.write_bytes(bytes(range(256)) * 10)
    with pytest.raises(ValueError):
        loop.train(_cfg(binary, tmp_path / "run2", tmp_path / "cache"), quiet=True)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(corpus: Path, tmp_path: Path,
                                                       monkeypatch, capsys) -> None:
    real = loop.F.cross_entropy
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        value = real(*args, **kwargs)
        return value * float("nan") if calls["n"] == 5 else value

    monkeypatch.setattr(loop.F, "cross_entropy", poisoned)
    cfg = _cfg(corpus, tmp_path / "run", tmp_path / "cache", max_steps=8, checkpoint_every=2,
               eval_every=100)
    result = loop.train(cfg, quiet=True)
    assert result.status == "diverged" and result.step == 4
    saved = sorted((Path(cfg.out) / "checkpoints").glob("*.pt"))
    assert [p.name for p in saved][-1] == "step_00000004.pt"
    assert not (Path(cfg.out) / "model").exists()
    out, err = capsys.readouterr()  # --quiet: nothing but the one line saying why
    assert out == "" and err.count("\n") == 1 and "loss became nan at step 5" in err, err


@pytest.mark.slow
@pytest.mark.parametrize("routing,dense", [("v1", False), ("v2", False), ("v3", False),
                                           ("v1", True)])
def test_each_routing_variant_learns(corpus: Path, tmp_path: Path, routing: str,
                                     dense: bool) -> None:
    cfg = _cfg(corpus, tmp_path / "run", tmp_path / "cache", max_steps=40, log_every=5,
               eval_every=40, checkpoint_every=40, routing=routing, dense=dense, lr=3e-3,
               samples=0)
    result = loop.train(cfg, quiet=True)
    losses = [loss for _, loss in _losses(Path(cfg.out))]
    assert losses[-1] < 0.7 * losses[0], losses
    assert result.val_loss < result.unigram_entropy


def test_routing_recipes_are_valid_for_every_preset() -> None:
    for preset in ("tiny", "deepseek-moe-2b", "deepseek-moe-16b", "deepseek-moe-145b"):
        base = ModelConfig.preset(preset)
        for routing in ("v1", "v2", "v3"):
            cfg = base.replace(**routing_overrides(routing, base))
            if routing == "v2" and cfg.n_devices > 1:
                assert cfg.topk_method == "device_limited" and cfg.max_devices < cfg.n_devices
            if routing == "v3":
                assert cfg.scoring_func == "sigmoid" and cfg.bias_update_speed > 0
    dense = build_model_config(TrainConfig(dense=True), vocab_size=1000)
    tiny = ModelConfig.preset("tiny")
    assert dense.n_routed_experts is None and dense.vocab_size == 1000
    assert dense.intermediate_size == (tiny.n_shared_experts + tiny.num_experts_per_tok) * \
        tiny.moe_intermediate_size


def test_lr_schedule_warms_up_then_decays() -> None:
    cfg = TrainConfig(max_steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    lrs = [loop.lr_at(cfg, s) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)


@pytest.mark.slow
def test_nproc_expert_parallel_run_matches_one_process(corpus: Path, tmp_path: Path) -> None:
    """`dsmoe train --nproc 2 --ep 2`: same global batch, same losses as one process."""
    cache = tmp_path / "cache"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single, parallel = tmp_path / "single", tmp_path / "ep2"
    common = ("--max-steps", "4", "--routing", "v3", "--set", "n_group=2", "--set", "topk_group=1")
    subprocess.run(_cli(*common, out=single, cache=cache, corpus=corpus), check=True,
                   timeout=300, env=env)
    subprocess.run(_cli(*common, "--nproc", "2", "--ep", "2", out=parallel, cache=cache,
                        corpus=corpus), check=True, timeout=300, env=env)
    a, b = _losses(single), _losses(parallel)
    assert [s for s, _ in a] == [s for s, _ in b]
    for (_, x), (_, y) in zip(a, b):
        assert y == pytest.approx(x, rel=1e-5, abs=1e-6)
    exported = Transformer.from_pretrained(parallel / "model")
    reference = Transformer.from_pretrained(single / "model")
    for (name, p), (_, q) in zip(exported.state_dict().items(), reference.state_dict().items()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=name)


def test_resume_of_a_finished_run_reexports_and_reports(corpus: Path, tmp_path: Path) -> None:
    """`make demo` twice: --resume on a finished run (or one killed during its export)
    trains nothing, re-exports the model, rewrites report.md with the run's numbers."""
    cfg = _cfg(corpus, tmp_path / "run", tmp_path / "cache")
    first = loop.train(cfg, quiet=True)
    out = Path(cfg.out)
    report = (out / "report.md").read_text()
    again = loop.train(cfg, resume=True, quiet=True)
    assert again.status == "finished" and again.step == 6
    assert (again.train_loss, again.val_loss) == (first.train_loss, first.val_loss)
    assert (out / "report.md").read_text().split("- throughput")[0] == \
        report.split("- throughput")[0]
    import shutil
    shutil.rmtree(out / "model")  # as if killed during the final export
    (out / "report.md").unlink()
    loop.train(cfg, resume=True, quiet=True)
    assert (out / "model" / "model.safetensors").exists() and (out / "report.md").exists()


class _Payload:
    """Unpickling this creates ``marker``: what a crafted checkpoint could run instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_crafted_checkpoint_runs_no_code(corpus: Path, tmp_path: Path, capsys) -> None:
    cfg = _cfg(corpus, tmp_path / "run", tmp_path / "cache")
    loop.train(cfg, quiet=True)
    marker = tmp_path / "pwned"
    folder = Path(cfg.out) / "checkpoints"
    torch.save({"step": 9, "model": _Payload(marker)}, folder / "step_00000009.pt")
    result = loop.train(cfg, resume=True, quiet=True)  # falls back to step 6
    assert result.step == 6 and not marker.exists()
    assert "step_00000009.pt" in capsys.readouterr().err
    for path in folder.glob("step_*.pt"):
        torch.save(_Payload(marker), path)
    with pytest.raises(ValueError, match="refusing to restart"):
        loop.train(cfg, resume=True, quiet=True)
    assert not marker.exists()


_HOLD_LOCK = """
import sys, time
from pathlib import Path
from dsmoe.train import rundir
with rundir.locked(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_one_live_run_per_directory(corpus: Path, tmp_path: Path) -> None:
    """An OS lock: a second run names the first's pid; a SIGKILLed owner releases it."""
    cfg = _cfg(corpus, tmp_path / "run", tmp_path / "cache", max_steps=2)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    owner = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, cfg.out], env=env,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match=f"in use by another dsmoe run \\(pid {owner.pid}\\)"):
            loop.train(cfg, quiet=True)
        with pytest.raises(ValueError, match=f"pid {owner.pid}"):
            loop.train(cfg, resume=True, quiet=True)
        assert not (Path(cfg.out) / "metrics.jsonl").exists()
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    assert loop.train(cfg, quiet=True).status == "finished"


def test_resume_refuses_changed_model_or_data_and_allows_more_steps(
        corpus: Path, tmp_path: Path, capsys) -> None:
    cfg = _cfg(corpus, tmp_path / "run", tmp_path / "cache", max_steps=3)
    loop.train(cfg, quiet=True)
    other = _write_corpus(tmp_path / "other", n_files=3)
    for change, flag in ((dict(routing="v3"), "--routing"), (dict(dense=True), "--dense"),
                         (dict(seq_len=16), "--seq-len"), (dict(lr=1e-3), "--lr"),
                         (dict(seed=1), "--seed"), (dict(data=str(other)), "--data"),
                         (dict(overrides=cfg.overrides + ("hidden_size=32",)), "--set")):
        with pytest.raises(ValueError, match=f"--resume: {flag} was .* when this run started"):
            loop.train(dataclasses.replace(cfg, **change), resume=True, quiet=True)
    capsys.readouterr()
    # CLI semantics: flags not given keep the run's own settings.
    more = loop.train(TrainConfig(out=cfg.out, max_steps=4, cache_dir=cfg.cache_dir),
                      resume=True, given=frozenset({"max_steps"}))
    assert more.step == 4 and "resume: max_steps 3 -> 4" in capsys.readouterr().out
    assert [r["step"] for r in map(json.loads, (Path(cfg.out) / "metrics.jsonl")
                                   .read_text().splitlines())] == [2, 3, 4]


def test_leftovers_of_a_kill_are_handled_on_resume(corpus: Path, tmp_path: Path) -> None:
    """Temp files of a killed write are removed; a metrics line cut short is dropped."""
    cfg = _cfg(corpus, tmp_path / "run", tmp_path / "cache", max_steps=4, log_every=1,
               checkpoint_every=2)
    loop.train(cfg, quiet=True)
    out = Path(cfg.out)
    stale = [out / "checkpoints" / ".step_00000006.pt.k2j3.tmp", out / ".metrics.jsonl.x.tmp",
             out / "tokenizer" / ".tokenizer.json.y.tmp"]
    for path in stale:
        path.write_bytes(b"\0" * 1000)
    (out / ".model.tmp-abc").mkdir()
    (out / ".model.tmp-abc" / "model.safetensors").write_bytes(b"x")
    whole = (out / "metrics.jsonl").read_text()
    (out / "metrics.jsonl").write_text(whole + '{"step": 5, "train_lo')
    loop.train(dataclasses.replace(cfg, max_steps=5), resume=True, quiet=True)
    assert not any(p.exists() for p in stale) and not (out / ".model.tmp-abc").exists()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


def test_out_is_a_file_and_seq_len_beyond_positions(corpus: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="--out .*file is an existing file"):
        loop.train(_cfg(corpus, tmp_path / "file", tmp_path / "cache"), quiet=True)
    with pytest.raises(ValueError, match="--seq-len 128 is longer than the model's "
                                         "max_position_embeddings=64"):
        loop.train(_cfg(corpus, tmp_path / "run", tmp_path / "cache", seq_len=128), quiet=True)


def test_disk_full_while_checkpointing(corpus: Path, tmp_path: Path, monkeypatch) -> None:
    def full(obj, path):
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    cfg = _cfg(corpus, tmp_path / "run", tmp_path / "cache")
    with pytest.raises(ValueError, match=r"cannot write checkpoint .*step_00000003.pt "
                                         r"\(No space left on device\); is the disk full"):
        loop.train(cfg, quiet=True)
    assert list((Path(cfg.out) / "checkpoints").iterdir()) == []  # no leftovers
    monkeypatch.undo()

    def report_full(out, *args):
        raise OSError(28, "No space left on device", str(out / "report.md"))

    import dsmoe.train.report
    monkeypatch.setattr(dsmoe.train.report, "write_report", report_full)
    with pytest.raises(ValueError, match=r"no space left on the device writing .*report.md"):
        loop.train(dataclasses.replace(cfg, out=str(tmp_path / "run2")), quiet=True)


def test_tokenizer_samples_and_vocab_follow_the_data(corpus: Path, tmp_path: Path,
                                                     capsys) -> None:
    """A failed run's tokenizer is not reused on other data; samples start from the
    validation text; --set vocab_size sizes the BPE, and a smaller result says so."""
    prose = tmp_path / "prose"
    prose.mkdir()
    for i in range(6):
        (prose / f"doc{i}.txt").write_text("".join(
            f"Permission number {i * 50 + j} is hereby granted to everyone.\n"
            for j in range(50)))
    out = tmp_path / "run"
    loop.train(_cfg(corpus, out, tmp_path / "cache", max_steps=1), quiet=True)
    code_tokenizer = (out / "tokenizer" / "tokenizer.json").read_text()
    import shutil
    shutil.rmtree(out / "checkpoints")  # as if the run had failed before its first save
    cfg = _cfg(prose, out, tmp_path / "cache", max_steps=1,
               overrides=_cfg(corpus, out, out).overrides + ("vocab_size=5000",))
    result = loop.train(cfg, quiet=True)
    assert (out / "tokenizer" / "tokenizer.json").read_text() != code_tokenizer
    assert '"Permission' in (out / "tokenizer" / "tokenizer.json").read_text()
    assert all(s.startswith("Permission number ") for s in result.samples), result.samples
    err = capsys.readouterr().err
    assert "--set vocab_size=5000 is overridden by the tokenizer's" in err


@pytest.mark.slow
def test_nproc_bad_input_is_one_line(corpus: Path, tmp_path: Path, capsys) -> None:
    from dsmoe.cli import main

    (tmp_path / "file").write_text("x")
    assert main(["train", "--data", str(corpus), "--out", str(tmp_path / "file"),
                 "--nproc", "2", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "error: --out" in err and "is an existing file" in err and "Traceback" not in err


def test_nproc_must_be_positive(tmp_path: Path, capsys) -> None:
    from dsmoe.cli import main

    for command in (["train"], ["finetune", str(tmp_path), "--data", "x.jsonl"]):
        assert main([*command, "--out", str(tmp_path / "run"), "--nproc", "0"]) == 2
        assert "--nproc must be a positive integer, got 0" in capsys.readouterr().err


def test_routing_defaults_to_the_presets_generation() -> None:
    """A V2/V3 preset trains with its own routing unless --routing says otherwise (it used to
    get V1's softmax routing silently)."""
    assert TrainConfig(preset="tiny").routing == "v1"
    assert TrainConfig(preset="tiny-v2").routing == "v2"
    assert TrainConfig(preset="tiny-v3").routing == "v3"
    assert TrainConfig(preset="deepseek-v3").routing == "v3"
    assert TrainConfig(preset="tiny-v3", routing="v1").routing == "v1"
    assert TrainConfig.from_dict(TrainConfig(preset="tiny-v3").to_dict()).routing == "v3"
