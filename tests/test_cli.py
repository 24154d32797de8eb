"""The CLI table: every command the design names exists, documents itself and fails cleanly."""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dsmoe import cli

DESIGNED = {"train", "generate", "chat", "info", "export", "analyze", "finetune", "merge",
            "quantize", "plan"}


def test_every_designed_command_is_registered() -> None:
    assert DESIGNED <= set(cli.COMMANDS)


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_command_modules_follow_the_table_contract(name: str, capsys) -> None:
    module = importlib.import_module(cli.COMMANDS[name])
    assert (module.__doc__ or "").strip(), f"{name}: the docstring is the help text"
    assert callable(module.configure) and callable(module.run)
    with pytest.raises(SystemExit) as exit_info:
        cli.main([name, "--help"])
    assert exit_info.value.code == 0
    assert module.__doc__.strip().splitlines()[0] in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["generate", "/nonexistent/model", "--prompt", "x"],
                                  ["info", "/nonexistent/model"],
                                  ["analyze", "/nonexistent/model", "--out", "/tmp/x"]])
def test_bad_model_path_is_one_error_line(argv: list[str], capsys) -> None:
    assert cli.main(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err


_PROBE = """
import sys
from dsmoe.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(sorted(name for name in sys.modules if name == "torch" or name.startswith("torch.")))
"""


def _torch_modules_after(*argv: str) -> list[str]:
    """The torch modules a fresh interpreter has loaded after ``dsmoe argv...``."""
    src = str(Path(cli.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", _PROBE, *argv], capture_output=True,
                          text=True, env=env, timeout=120, check=True)
    return ast.literal_eval(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("argv", [("--help",), (), ("no-such-command",)])
def test_top_level_help_and_errors_do_not_import_torch(argv: tuple[str, ...]) -> None:
    """Measured with ``python -X importtime -m dsmoe --help``: 0.04 s of imports (was 7.6 s,
    the model and torch, before a single argument was parsed)."""
    assert _torch_modules_after(*argv) == []


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_command_help_and_argument_errors_do_not_import_torch(name: str) -> None:
    if name == "finetune":
        pytest.xfail("dsmoe.finetune's package imports torch (its argument tables live "
                     "beside the LoRA modules)")
    assert _torch_modules_after(name, "--help") == []
    assert _torch_modules_after(name, "--no-such-option") == []
