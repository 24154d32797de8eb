"""The CLI table: every command the design names exists, documents itself and fails cleanly."""

from __future__ import annotations

import importlib

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
