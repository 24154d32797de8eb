"""The benchmark scripts are not run by the suite (they take minutes and their numbers
belong in the README), but each must at least compile and answer ``--help``, so that a
refactor cannot silently break one."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
SCRIPTS = sorted(p for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_"))
HELPERS = sorted(BENCHMARKS.glob("_*.py"))  # modules the scripts import


def test_there_are_benchmarks() -> None:
    assert len(SCRIPTS) >= 5


@pytest.mark.parametrize("script", SCRIPTS + HELPERS, ids=lambda p: p.name)
def test_benchmark_compiles(script: Path) -> None:
    compile(script.read_text(), str(script), "exec")


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_benchmark_answers_help(script: Path) -> None:
    result = subprocess.run([sys.executable, str(script), "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage" in result.stdout.lower()


@pytest.mark.slow
def test_generate_benchmark_runs_mla_against_transformers_native_model() -> None:
    """The MLA row: transformers' own DeepseekV2ForCausalLM on dsmoe's parameters, the same
    greedy tokens (fp32 mismatches abort), both caches measured and the bandwidth bound's
    tables printed."""
    pytest.importorskip("transformers")
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "generate.py"), "--quick", "--preset",
         "deepseek-v2-lite", "--dtype", "float32", "--batch", "1"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "tiny-v2" in result.stdout and "greedy steps identical" in result.stdout
    assert "transformers B/token" in result.stdout, result.stdout[-2000:]
    assert "bound/transformers" in result.stdout, result.stdout[-2000:]
    # every timed round judged against the read taken just before it: "GB/s, x%, y%"
    assert re.search(r"\| \d+\.\d, \d+%, \d+% \|", result.stdout.replace("  ", " ")) or \
        re.search(r"\d+\.\d, \d+%, \d+%\s*$", result.stdout, re.M), result.stdout[-2000:]
    # one token per step is sent to exactly top-k = 3 of tiny-v2's 16 experts in every layer
    assert re.search(r"float32\s+1\s+3\.0 of 16\s", result.stdout), result.stdout[-2000:]
