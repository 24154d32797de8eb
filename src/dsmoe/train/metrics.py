"""metrics.jsonl (one JSON object per logged step) and the live progress display."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

from dsmoe.io import atomic_write_text


class MetricsLog:
    """Append-only JSON lines; on resume, lines past the checkpoint's step are dropped so a
    resumed run's file equals an uninterrupted run's. A kill can cut the last line short:
    that line is dropped too; a bad line before it is an error naming the line."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _lines(self) -> list[tuple[str, dict[str, Any]]]:
        if not self.path.exists():
            return []
        try:
            lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError as exc:
            raise ValueError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        numbered = [(n, line) for n, line in enumerate(lines, start=1) if line.strip()]
        records = []
        for i, (n, line) in enumerate(numbered):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                if i == len(numbered) - 1:  # cut short by a kill: the checkpoint has it
                    break
                raise ValueError(f"{self.path} line {n}: not a JSON record ({exc.msg}); "
                                 "fix or remove the line") from None
            if not isinstance(record, dict):
                raise ValueError(f"{self.path} line {n}: not a JSON object")
            records.append((line, record))
        return records

    def truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [line for line, record in self._lines() if record.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        try:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
                fh.flush()
        except OSError as exc:
            raise ValueError(f"cannot write {self.path}: {exc.strerror or exc}") from None

    def read(self) -> list[dict[str, Any]]:
        return [record for _, record in self._lines()]


class ProgressDisplay:
    """A rich progress bar on a terminal; plain log lines otherwise (CI, pipes)."""

    def __init__(self, total: int, start: int, quiet: bool = False) -> None:
        self.interactive = sys.stderr.isatty() and not quiet
        self.quiet = quiet
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TimeRemainingColumn(),
            disable=not self.interactive, transient=False)
        self.task = self.progress.add_task("train", total=total, completed=start, stats="")
        self.started = time.perf_counter()

    def __enter__(self) -> "ProgressDisplay":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def update(self, step: int, record: dict[str, Any] | None = None) -> None:
        if record is not None:
            stats = (f"loss {record['train_loss']:.3f} aux {record['aux_loss']:.4f} "
                     f"{record['tokens_per_s']:.0f} tok/s load max/mean "
                     f"{record.get('load_max_mean', 0.0):.2f}")
            if "val_loss" in record:
                stats += f" val {record['val_loss']:.3f}"
            self.progress.update(self.task, completed=step, stats=stats)
            if not self.interactive and not self.quiet:
                print(f"step {step}: {stats}", flush=True)
        else:
            self.progress.update(self.task, completed=step)

    def warn(self, message: str) -> None:
        """A line shown even with --quiet (on stderr): why a run stopped."""
        if self.interactive:
            self.progress.console.print(message)
        else:
            print(message, file=sys.stderr, flush=True)

    def print(self, message: str) -> None:
        if self.interactive:
            self.progress.console.print(message)
        elif not self.quiet:
            print(message, flush=True)
