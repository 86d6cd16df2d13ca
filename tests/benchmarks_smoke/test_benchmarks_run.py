"""Smoke tests: each timing benchmark's `main` runs end to end at minimal sizes and rounds, and its
rows make sense (finite positive times and ratios, the reference at 1x, every variant present),
and NumPyro computes the same bounds and gradients as the hand-written JAX."""

import math
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `benchmarks` is not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import CpuMonitor, bootstrap_ci, mean_difference_z, measure_variants, summarize  # noqa: E402
from benchmarks import exact_marginal as exact  # noqa: E402
from benchmarks import logreg_steps as logreg  # noqa: E402
from benchmarks import vae_step as vae  # noqa: E402

FAST = ["--rounds", "2", "--calls", "2", "--loop-calls", "1", "--max-wait", "0"]


def assert_sane_timing(row, reference):
    assert math.isfinite(row["steady_ms"]) and row["steady_ms"] > 0, row
    assert math.isfinite(row["ratio"]) and row["ratio"] > 0, row
    lo, hi = row["paired_ci"]
    assert 0 < lo <= row["paired_ratio"] <= hi < math.inf, row
    if row["variant"] == reference:
        assert row["ratio"] == pytest.approx(1.0) and row["paired_ratio"] == pytest.approx(1.0), row


def test_bootstrap_and_z_helpers():
    assert bootstrap_ci([2.0] * 5) == (2.0, 2.0)
    lo, hi = bootstrap_ci(np.arange(100.0))
    assert 35 < lo < 49.5 < hi < 64
    rng = np.random.default_rng(0)
    assert abs(mean_difference_z(rng.normal(size=400), rng.normal(size=400))) < 4
    assert mean_difference_z(rng.normal(size=400), 1 + rng.normal(size=400)) > 10


def test_measure_variants_records_compile_and_steady_times():
    steps = {"a": lambda x, k: x + jax.random.normal(k), "b": lambda x, k: 2 * x}
    args = {"a": (1.0,), "b": (1.0,)}
    keys = list(jax.random.split(jax.random.key(0), 3))
    res = measure_variants(steps, args, keys, rounds=2, compile_reps=1, monitor=CpuMonitor(), max_wait=0)
    rows = summarize(res, "b", threshold=0.25)
    for row in rows:
        assert_sane_timing(row, "b")
        assert row["n_calls"] == 6
        assert all(0 < row[c] < 60 for c in ("lower_s", "compile_s", "first_call_s")), row


def test_vae_numpyro_matches_hand_written():
    # Same noise: NumPyro's Trace_ELBO at key k draws what hand draws at `numpyro_key(k)`.
    same = vae.agreement(4, n_keys=2)
    for name in ("ours", "numpyro"):
        value_err, grad_err = same[name]
        assert value_err < 1e-5 and grad_err < 1e-4, (name, same)
    # Independent noise: the mean ELBO and projected gradient agree within standard errors.
    z_value, z_grad = vae.mean_agreement(4, n_keys=16)
    assert abs(z_value) < 5 and abs(z_grad) < 5, (z_value, z_grad)


def test_vae_step_main_runs():
    rows = vae.main(
        ["--batches", "8", "--compile-reps", "0", "--loop-steps", "2", "--check-keys", "8", *FAST],
    )
    groups = {"grad": 4, "step": 5, "loop (2 steps)": 5}
    assert sorted({r["group"] for r in rows}) == sorted(groups)
    for group, n in groups.items():
        assert len([r for r in rows if r["group"] == group]) == n
    for row in rows:
        assert_sane_timing(row, row["reference"])
        if not row["group"].startswith("loop"):
            assert row["hlo_ops"] > 0 and row["jaxpr_eqns"] > 0 and row["flops"] > 0, row


@pytest.fixture(scope="module")
def logreg_result():
    return logreg.main(
        [
            "--n", "100", "--d", "3", "--particles", "1", "3", "--compile-reps", "0", "--loop-steps", "3",
            "--fit-steps", "5", "--fit-reps", "1", "--check-keys", "32", *FAST,
        ]
    )  # fmt: skip


def test_logreg_bounds_agree_and_gradients_are_finite(logreg_result):
    for check in logreg_result["checks"]:
        assert check["finite"], check
        assert all(abs(z) < 5 for z in check["z"].values()), check


def test_logreg_steps_rows_make_sense(logreg_result):
    rows = logreg_result["steps"]
    variants = {"hand+optax", "ours ppl.svi", "ours grad+optax", "numpyro SVI.update"}
    for k in (1, 3):
        for mode in ("per call", "scan of 3"):
            assert {r["variant"] for r in rows if r["K"] == k and r["mode"] == mode} == variants
    for row in rows:
        assert_sane_timing(row, "hand+optax")
    for fit in logreg_result["fits"]:
        assert 0 < fit["warm_s"] < math.inf and 0 < fit["cold_s"] < math.inf, fit


def test_logreg_hand_written_bound_is_the_elbo_for_one_particle():
    x, y, _, params = logreg.problem(50, 3)
    key = jax.random.key(0)
    one = logreg.hand_objective(params, x, y, key, 1)
    eps = jax.random.normal(key, (1, 3))
    w = params["w"]["loc"] + eps[0] * np.exp(params["w"]["log_scale"])
    logits = x @ w
    log_q = np.sum(-0.5 * eps**2 - params["w"]["log_scale"])
    elbo = np.sum(-0.5 * w**2) + np.sum(y * logits - np.logaddexp(0.0, logits)) - log_q
    np.testing.assert_allclose(one, elbo, rtol=1e-5)


def test_exact_marginal_main_runs_and_every_variant_matches_the_float64_reference():
    args = ["--lengths", "20", "--points", "50", "--rounds", "2", "--calls", "2", "--compile-reps", "0"]
    result = exact.main([*args, "--max-wait", "0"])
    variants = {"ours", "hand", exact.NUMPYRO, exact.TRACE_ENUM}
    for problem, size in (("hmm", 20), ("gmm", 50)):
        assert {r["variant"] for r in result["rows"] if (r["problem"], r["size"]) == (problem, size)} == variants
    for row in result["rows"]:
        assert_sane_timing(row, "hand")
        assert row["jaxpr_eqns"] > 0 and math.isfinite(row["vs_numpyro"]) and row["vs_numpyro"] > 0, row
    for check in result["checks"]:
        for name, c in check["variants"].items():
            if (check["problem"], name) == ("hmm", exact.TRACE_ENUM):
                assert c["value_err"] > 0.1, c  # NumPyro's TraceEnum_ELBO treats the scan as a plate (flagged)
            else:
                assert c["value_err"] < 1e-5 and c["grad_err"] < 1e-3, (check["problem"], name, c)
