"""Smoke test for benchmarks/scaling.py: at minimal sizes, a run on one device and a run of two
processes on localhost measure the logistic regression step and print the table, with
throughputs consistent with the times and efficiency 1 on one device."""

import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `benchmarks` is not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import scaling  # noqa: E402


def test_scaling_measures_one_device_and_two_processes(capsys):
    args = ["--devices", "1", "--processes", "2", "--problems", "logreg", "--logreg-n", "64", "--logreg-d", "3"]
    args += ["--loop-steps", "2", "--calls", "2", "--rounds", "2", "--compile-reps", "0", "--max-wait", "0"]
    rows = scaling.main(args)
    assert [(r["run"], r["mode"], r["total"], r["per_device"]) for r in rows] == [
        ("1 device", "weak", 64, 64),
        ("2 processes", "weak", 128, 64),
        ("2 processes", "strong", 64, 32),
    ]
    for r in rows:
        assert math.isfinite(r["steady_ms"]) and r["steady_ms"] > 0, r
        assert r["items_per_s"] == pytest.approx(r["total"] / (1e-3 * r["steady_ms"]))
        assert 0 < r["efficiency"] < math.inf and r["other_load"] >= 0, r
    assert rows[0]["efficiency"] == 1.0
    out = capsys.readouterr().out
    assert (
        "| problem | scaling | run | batch per device |" in out and "| logreg | strong | 2 processes | 32 | 64 |" in out
    )
