"""The ``dsmoe`` command: a table from subcommand to module.

Each command module has a docstring (its help text), ``configure(parser)`` to declare its
arguments and ``run(args) -> int``. Modules are imported only when their command runs, so
``dsmoe --help`` stays fast. Bad input ends with one ``error:`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
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


def _summary(module_name: str) -> str:
    doc = importlib.import_module(module_name).__doc__ or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsmoe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=_summary(module_name), description=module.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
        module.configure(command)
        command.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
