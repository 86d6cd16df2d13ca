"""Smoke test for benchmarks/air_epoch.py: one tiny epoch of the cheapest estimator, measured and
printed as a markdown table."""

import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `benchmarks` is not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import air_epoch  # noqa: E402


def test_air_epoch_measures_and_prints_a_table(capsys):
    args = ["--estimators", "reinforce", "--canvases", "8", "--batch", "4", "--epochs", "2", "--max-wait", "0"]
    results = air_epoch.main(args)
    r = results["reinforce"]
    assert r["lower"] > 0 and r["compile"] > 0
    assert len(r["epochs"]) == 2 and all(e["seconds"] > 0 for e in r["epochs"])
    assert math.isfinite(r["loss"])
    out = capsys.readouterr().out
    assert "| estimator | trace+lower (s)" in out
    assert "| reinforce |" in out
    assert "8 canvases per epoch, batch 4 (2 steps per epoch)" in out
