"""The ``dsmoe`` command: a table from subcommand to module.

Each command module has a docstring (its help text), ``configure(parser)`` to declare its
arguments and ``run(args) -> int``. Only the module of the command being run is imported
(the others' one-line summaries are read from their source), so ``dsmoe --help`` and a
mistyped command answer without loading torch. Bad input ends with one ``error:`` line
and exit code 2.

Arguments are checked here, before any work starts: every float flag must be finite (a
``--temperature nan`` is refused, not sampled with), every ``--seed`` must fit torch's
64-bit seed, and count flags use ``positive_int`` / ``non_negative_int``.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import math
import sys

COMMANDS: dict[str, str] = {
    "demo": "dsmoe.commands.demo",
    "train": "dsmoe.commands.train",
    "generate": "dsmoe.commands.generate",
    "chat": "dsmoe.commands.chat",
    "analyze": "dsmoe.commands.analyze",
    "info": "dsmoe.commands.info",
    "plan": "dsmoe.commands.plan",
    "export": "dsmoe.commands.export",
    "quantize": "dsmoe.commands.quantize",
    "finetune": "dsmoe.commands.finetune",
    "merge": "dsmoe.commands.merge",
}


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit code 2."""


def _docstring(module_name: str) -> str:
    """A module's docstring, read from its source without importing it."""
    spec = importlib.util.find_spec(module_name)
    with open(spec.origin, encoding="utf-8") as fh:
        return ast.get_docstring(ast.parse(fh.read())) or ""


USER_ERRORS = (CommandError, ValueError, FileNotFoundError, NotADirectoryError,
               PermissionError, RuntimeError)


def _bounded_int(low: int, high: int | None, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
        return value

    parse.__name__ = what  # argparse names the type in some messages
    return parse


positive_int = _bounded_int(1, None, "a positive integer")
non_negative_int = _bounded_int(0, None, "an integer >= 0")
seed_int = _bounded_int(-(1 << 63), (1 << 64) - 1,
                        "an integer in [-2**63, 2**64 - 1] (torch's seeds)")


def finite_float(text: str) -> float:
    """argparse type: a float that is neither nan nor infinite."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _check_types(parser: argparse.ArgumentParser) -> None:
    """Every float flag finite, every --seed a valid seed: no command can forget."""
    for action in parser._actions:
        if action.type is float:
            action.type = finite_float
        elif action.dest == "seed" and action.type is int:
            action.type = seed_int


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser: every command with its help text, and the arguments of ``command``
    only (the one module imported)."""
    parser = argparse.ArgumentParser(prog="dsmoe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        doc = _docstring(module_name).strip()
        summary = doc.splitlines()[0] if doc else ""
        parser_for = sub.add_parser(name, help=summary, description=doc,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        if name == command:
            module = importlib.import_module(module_name)
            module.configure(parser_for)
            _check_types(parser_for)
            parser_for.set_defaults(_run=module.run)
    return parser


def _command_in(argv: list[str]) -> str | None:
    """The subcommand argv names (its first word that is not an option), if known."""
    first = next((arg for arg in argv if not arg.startswith("-")), None)
    return first if first in COMMANDS else None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(_command_in(argv)).parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
