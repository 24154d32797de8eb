"""``dsmoe demo``: one block per routing generation and a V3 bias-balancing line, checked by
content (variant names, losses, loads that add up, the imbalance ratio dropping)."""

from __future__ import annotations

import re

import pytest

from dsmoe import cli

LOAD = re.compile(r"max/mean load (?P<ratio>[\d.]+)\s+per expert: (?P<counts>[\d ]+)$")


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> list[str]:
    code = cli.main(["demo", "--tokens", "64", *args])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out.splitlines()


def test_demo_prints_each_variant_with_consistent_loads(capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    lines = _run(capsys)
    heads = {line.split(":")[0]: i for i, line in enumerate(lines) if re.match(r"v\d:", line)}
    assert list(heads) == ["v1", "v2", "v3"], lines
    expected_losses = {"v1": {"expert", "device"}, "v2": {"expert", "device", "comm"},
                       "v3": {"expert"}}
    for name, i in heads.items():
        losses = dict(re.findall(r"(\w+)=([\d.]+)", lines[i]))
        assert set(losses) == expected_losses[name], lines[i]
        assert all(float(v) > 0 for v in losses.values()), lines[i]
        load = LOAD.search(lines[i + 1].strip())
        assert load, lines[i + 1]
        counts = [int(c) for c in load["counts"].split()]
        assert len(counts) == 16  # the tiny preset's experts
        assert sum(counts) == 64 * 3, "every token picks K=3 experts"
        assert float(load["ratio"]) == pytest.approx(max(counts) / (sum(counts) / 16), abs=0.01)
        dropped = float(re.search(r"dropped ([\d.]+)%", lines[i])[1])
        if name == "v2":
            assert 0 < dropped < 100, "V2 runs with capacity dropping in training mode"
        else:
            assert dropped == 0.0


def test_demo_bias_balancing_line_shows_the_ratio_dropping(capsys: pytest.CaptureFixture[str]
                                                           ) -> None:
    lines = _run(capsys, "--seed", "1")
    line = next(line for line in lines if line.startswith("v3 bias balancing"))
    match = re.search(r"over (\d+) updates: max/mean load ([\d.]+) -> ([\d.]+)", line)
    assert match, line
    steps, before, after = int(match[1]), float(match[2]), float(match[3])
    assert steps > 0
    assert before > 2.0, "the demo skews the router first"
    assert after < before - 1.0, line


def test_demo_is_seeded(capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(capsys, "--seed", "3") == _run(capsys, "--seed", "3")


def test_demo_help_and_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["demo", "--help"])
    assert info.value.code == 0
    assert "routing variant" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        cli.main(["demo", "--tokens", "many"])
    assert info.value.code == 2
    assert "--tokens" in capsys.readouterr().err
