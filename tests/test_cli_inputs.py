"""Bad or surprising input to the user-facing commands: each ends with a clear message naming
the flag, file or value (non-zero exit, no traceback), or is capped with a note -- never a
crash deep inside, a silent no-op or a 200 GB allocation."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsmoe import ModelConfig
from dsmoe.cli import main
from dsmoe.generate import generate
from dsmoe.model import Transformer
from dsmoe.plan import make_plan
from dsmoe.tokenizer import EOS_TOKEN, Tokenizer

CONTEXT = 96


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny HF directory with a tokenizer and a 48-token context."""
    path = tmp_path_factory.mktemp("model")
    tok = Tokenizer.train_bpe(["the cat sat on the mat. " * 4] * 10, vocab_size=280)
    cfg = ModelConfig.preset("tiny").replace(vocab_size=288, num_hidden_layers=2,
                                             max_position_embeddings=CONTEXT)
    Transformer(cfg).save_pretrained(path)
    tok.save(path)
    return path


def _argparse_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


# --- flags --------------------------------------------------------------------------------
@pytest.mark.parametrize("flag, value, message", [
    ("--temperature", "nan", "argument --temperature: must be a finite number, got 'nan'"),
    ("--temperature", "inf", "must be a finite number, got 'inf'"),
    ("--top-p", "nan", "argument --top-p: must be a finite number"),
    ("--repetition-penalty", "inf", "argument --repetition-penalty: must be a finite number"),
    ("--seed", str(1 << 64), "argument --seed: must be an integer in [-2**63, 2**64 - 1]"),
    ("--max-new-tokens", "-1", "argument --max-new-tokens: must be an integer >= 0, got -1"),
    ("--top-k", "0", "argument --top-k: must be a positive integer, got 0"),
])
def test_generate_flags_are_checked_before_loading(flag: str, value: str, message: str,
                                                   capsys) -> None:
    err = _argparse_error(["generate", "/no/such/model", "--prompt", "x", flag, value], capsys)
    assert message in err
    assert "Traceback" not in err


def test_every_float_flag_of_every_command_refuses_nan(capsys) -> None:
    from dsmoe.cli import COMMANDS, build_parser, finite_float

    subparsers = {}
    for name in COMMANDS:  # the CLI configures only the command being run
        parser = build_parser(name)
        subparsers[name] = next(a for a in parser._actions if a.dest == "command").choices[name]
    floats = [(name, a.option_strings[0]) for name, sub in subparsers.items()
              for a in sub._actions if a.type is float]
    assert not floats, f"float flags that accept nan: {floats}"
    assert any(a.type is finite_float for sub in subparsers.values() for a in sub._actions)


def test_library_generate_refuses_nan_and_oversized_seeds(model_dir: Path) -> None:
    model = Transformer.from_pretrained(model_dir)
    ids = torch.tensor([[1, 2, 3]])
    for kwargs, message in (({"temperature": float("nan")}, "temperature must be a finite"),
                            ({"repetition_penalty": float("nan")}, "repetition_penalty must"),
                            ({"seed": 1 << 64, "temperature": 1.0}, "seed must lie in")):
        with pytest.raises(ValueError, match=message):
            generate(model, ids, 2, **kwargs)


def test_max_new_tokens_is_capped_at_the_context(model_dir: Path, capsys, monkeypatch) -> None:
    allocated = []
    original = Transformer.new_cache

    def new_cache(self, batch: int, n: int, **kw):
        allocated.append(n)
        assert n <= CONTEXT, f"a KV cache for {n} positions"  # before allocating it
        return original(self, batch, n, **kw)

    monkeypatch.setattr(Transformer, "new_cache", new_cache)
    assert main(["generate", str(model_dir), "--prompt", "the cat", "--max-new-tokens",
                 "100000000"]) == 0
    err = capsys.readouterr().err
    assert "note: --max-new-tokens 100000000 capped at" in err and f"context is {CONTEXT}" in err
    assert allocated and max(allocated) <= CONTEXT


def test_a_prompt_longer_than_the_context_is_refused(model_dir: Path, capsys) -> None:
    assert main(["generate", str(model_dir), "--prompt", "the cat sat " * 80]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"context (max_position_embeddings) is {CONTEXT} tokens" in err[0]


def test_chat_survives_binary_stdin_and_refuses_an_overlong_turn(model_dir: Path, capsys,
                                                                 monkeypatch) -> None:
    raw = b"\xff\xfe\x00 binary \x80\n" + b"the cat " * 120 + b"\n" + b"hi\n/exit\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8"))
    assert main(["chat", str(model_dir), "--max-new-tokens", "100000000"]) == 0
    captured = capsys.readouterr()
    assert f"capped at {CONTEXT // 2}" in captured.err  # half the context: the prompt
    assert "error: the prompt is" in captured.err  # the long turn, and the session goes on
    assert captured.out.count("Assistant:") == 2
    assert "Traceback" not in captured.err


def test_chat_and_generate_keep_special_token_text_as_text(model_dir: Path, capsys,
                                                           monkeypatch) -> None:
    seen = []
    monkeypatch.setattr("dsmoe.generate.generate",
                        lambda model, ids, **kw: seen.append(ids[0].tolist()) or ids[:, :0])
    tok = Tokenizer.from_file(model_dir)
    assert main(["generate", str(model_dir), "--prompt", f"a{EOS_TOKEN}b", "--chat"]) == 0
    assert main(["generate", str(model_dir), "--prompt", f"a{EOS_TOKEN}b"]) == 0
    assert all(tok.eos_id not in ids for ids in seen) and len(seen) == 2


# --- plan and train: validated in the parent ---------------------------------------------
def test_plan_refuses_zero_devices(capsys) -> None:
    assert "argument --devices: must be a positive integer, got 0" in _argparse_error(
        ["plan", "--devices", "0"], capsys)
    with pytest.raises(ValueError, match="--devices must be a positive integer, got 0"):
        make_plan(ModelConfig.preset("tiny"), 0)
    with pytest.raises(ValueError, match="--seq-len must be a positive integer, got 0"):
        make_plan(ModelConfig.preset("tiny"), 2, seq_len=0)


def test_train_nproc_and_ep_are_checked_before_launching(tmp_path: Path, capsys,
                                                         monkeypatch) -> None:
    import dsmoe.distributed

    monkeypatch.setattr(dsmoe.distributed, "launch",
                        lambda *a, **k: pytest.fail("launched ranks for a bad set-up"))
    assert main(["train", "--nproc", "0", "--out", str(tmp_path / "r")]) == 2
    assert "--nproc must be a positive integer, got 0" in capsys.readouterr().err
    assert main(["train", "--nproc", "2", "--ep", "3", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "world size 2 is not divisible by --ep 3" in err[0], err


# --- info ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, name", [(torch.int32, "I32"), (torch.float8_e4m3fn, "F8_E4M3")])
def test_info_flags_stored_dtypes_that_loading_rejects(tmp_path: Path, capsys,
                                                       dtype: torch.dtype, name: str) -> None:
    cfg = ModelConfig.preset("tiny").replace(vocab_size=256, num_hidden_layers=2)
    Transformer(cfg).save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(dtype)
    save_file(tensors, weights)
    assert main(["info", str(tmp_path / "m")]) == 1
    out = capsys.readouterr().out
    assert f"DOES NOT match the config: unsupported stored dtype: model.norm.weight ({name})" \
        in out
    with pytest.raises(ValueError, match="unsupported stored dtype"):
        Transformer.from_pretrained(tmp_path / "m")  # what info predicts


def test_info_on_a_quantized_directory_still_matches(tmp_path: Path, capsys) -> None:
    cfg = ModelConfig.preset("tiny").replace(vocab_size=256, num_hidden_layers=2)
    Transformer(cfg).save_pretrained(tmp_path / "m")
    assert main(["quantize", str(tmp_path / "m"), "--bits", "8", "--out",
                 str(tmp_path / "q")]) == 0
    capsys.readouterr()
    assert main(["info", str(tmp_path / "q")]) == 0


# --- plots ---------------------------------------------------------------------------------
@pytest.mark.parametrize("layers, experts", [(1, 4), (2, 8), (40, 64)])
def test_expert_load_heatmap_has_integer_ticks(tmp_path: Path, monkeypatch, layers: int,
                                               experts: int) -> None:
    from dsmoe import plots

    ticks = {}
    save = plots.save_figure

    def capture(fig, path):
        ax = fig.axes[0]
        fig.canvas.draw()
        ticks["y"] = [t.get_text() for t in ax.get_yticklabels()]
        ticks["x"] = [t.get_text() for t in ax.get_xticklabels()]
        save(fig, path)

    monkeypatch.setattr(plots, "save_figure", capture)
    plots.plot_expert_load([[1] * experts] * layers, tmp_path / "load.png", "load")
    for axis, n in (("y", layers), ("x", experts)):
        values = [int(t) for t in ticks[axis]]  # "0.5" or "−0.5" would fail here
        assert values[0] == 0 and values == sorted(set(values)) and values[-1] <= n - 1
    if layers <= 16:
        assert ticks["y"] == [str(i) for i in range(layers)]
