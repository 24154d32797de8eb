"""The ``dsmoe`` command: a table from subcommand to module.

Each command module has a docstring (its help text), ``configure(parser)`` to declare its
arguments and ``run(args) -> int``. Only the module of the command being run is imported
(the others' one-line summaries are read from their source), so ``dsmoe --help`` and a
mistyped command answer without loading torch. Bad input ends with one ``error:`` line
and exit code 2.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
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
    except (CommandError, ValueError, FileNotFoundError, NotADirectoryError,
            PermissionError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
