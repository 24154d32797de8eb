"""Where training runs: ``--device`` and ``--activation-checkpointing`` (CPU checks here;
tests/test_cuda.py trains on a GPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dsmoe import cli
from dsmoe.train import loop
from dsmoe.train.config import TrainConfig
from test_train import _cfg, _write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return _write_corpus(tmp_path_factory.mktemp("corpus"))


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["train_loss"]
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_activation_checkpointing_trains_the_same_run(corpus: Path, tmp_path: Path) -> None:
    plain = loop.train(_cfg(corpus, tmp_path / "a", tmp_path / "cache", max_steps=4), quiet=True)
    ckpt = loop.train(_cfg(corpus, tmp_path / "b", tmp_path / "cache", max_steps=4,
                           activation_checkpointing=True), quiet=True)
    assert plain.status == ckpt.status == "finished"
    assert _losses(tmp_path / "b") == pytest.approx(_losses(tmp_path / "a"), rel=1e-6)


def test_device_is_validated() -> None:
    with pytest.raises(ValueError, match="--device must be cpu or cuda, got 'tpu'"):
        TrainConfig(device="tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_cuda_without_a_gpu_is_one_line(corpus: Path, tmp_path: Path, capsys) -> None:
    code = cli.main(["train", "--data", str(corpus), "--out", str(tmp_path / "run"),
                     "--cache-dir", str(tmp_path / "cache"), "--device", "cuda",
                     "--max-steps", "2", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "no CUDA device is available" in err and "\n" not in err, err
