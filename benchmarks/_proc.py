"""Memory readings from /proc/self/status, shared by the benchmark scripts (a helper
module, not a benchmark: the scripts import it from their own directory)."""

from __future__ import annotations

from pathlib import Path


def status_kib(field: str) -> int:
    """``field`` of /proc/self/status (e.g. VmHWM, the peak RSS) in KiB."""
    return status_kib_of("/proc/self/status", field)


def status_kib_of(path: str, field: str) -> int:
    """``field`` of a /proc file of "Name: value kB" lines (e.g. /proc/meminfo's
    MemAvailable) in KiB."""
    for line in Path(path).read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in {path}")
