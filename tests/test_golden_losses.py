"""Golden per-step losses (torchtitan's ``tests/assets/losses``): the first steps of a fixed
tiny training run of each DeepSeek generation (V1, V2 and V3 routing) and of the dense
baseline, through the real training loop, compared with committed files.

A numerics change anywhere on the training path (model, routing, balance losses,
dispatch, optimizer, data sampling) changes these numbers, so it has to be a visible,
deliberate commit that rewrites the files:

    DSMOE_UPDATE_GOLDEN=1 python -m pytest tests/test_golden_losses.py

Exact equality on the build that wrote the files (same torch version, CPU capability and
machine; conftest runs one intra-op thread). Elsewhere (another torch, another ISA: other
BLAS summation orders) within ``OTHER_BUILD_RTOL``: 8 AdamW steps turn 1e-7 differences
in a gradient into ~1e-5 in the loss, far below what a real numerics change moves.

The corpus and tokenizer are committed too (``tests/assets/losses/``), so neither the
tokenizers library's BPE trainer nor the corpus code can move the numbers.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import pytest
import torch

from dsmoe.train import loop
from dsmoe.train.config import TrainConfig

ASSETS = Path(__file__).resolve().parent / "assets" / "losses"
STEPS = 8
OTHER_BUILD_RTOL = 1e-3
RUNS = {  # name -> the TrainConfig fields that select it
    "v1": dict(preset="tiny", routing="v1"),
    "v2": dict(preset="tiny-v2", routing="v2"),
    "v3": dict(preset="tiny-v3", routing="v3"),
    "dense": dict(preset="tiny", dense=True),
}


def _build() -> dict[str, str]:
    return {"torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability(),
            "machine": platform.machine()}


def _run(name: str, tmp_path: Path) -> dict[str, list[float]]:
    """Per-step train and aux losses of the fixed run ``name``."""
    cfg = TrainConfig(
        **RUNS[name], data=str(ASSETS / "corpus.txt"), tokenizer=str(ASSETS / "tokenizer"),
        out=str(tmp_path / name), cache_dir=str(tmp_path / "cache"), max_steps=STEPS,
        batch_size=4, seq_len=32, log_every=1, eval_every=STEPS, eval_batches=1,
        checkpoint_every=STEPS, warmup_steps=2, samples=0, seed=0,
        overrides=("num_hidden_layers=2", "max_position_embeddings=64"))
    loop.train(cfg, quiet=True)
    lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    return {key: [r[key] for r in records] for key in ("train_loss", "aux_loss")}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RUNS))
def test_losses_match_the_golden_file(name: str, tmp_path: Path) -> None:
    got = _run(name, tmp_path)
    path = ASSETS / f"{name}.json"
    if os.environ.get("DSMOE_UPDATE_GOLDEN"):
        path.write_text(json.dumps({"build": _build(), "steps": STEPS, **got}, indent=1) + "\n")
        pytest.skip(f"rewrote {path.name}")
    golden = json.loads(path.read_text())
    assert all(torch.isfinite(torch.tensor(v)).all() for v in got.values()), got
    for key in ("train_loss", "aux_loss"):
        if golden["build"] == _build():
            assert got[key] == golden[key], f"{name} {key}: {got[key]} != golden {golden[key]}"
        else:
            torch.testing.assert_close(torch.tensor(got[key]), torch.tensor(golden[key]),
                                       rtol=OTHER_BUILD_RTOL, atol=1e-6,
                                       msg=lambda m: f"{name} {key} on another build: {m}")
