"""The noisy cone (models/cone.py): the quadrature evidence is right, the five bounds are ordered
as theory says at fixed guides, and a short run of each objective improves it."""

import math

import jax
import jax.numpy as jnp
import pytest
from conftest import mean_and_stderr, within_stderr

from models import cone

LOG_P = cone.log_evidence()
SHORT_STEPS, BATCH = 300, 4
N = 80_000  # estimates per bound: the hvi -> iwhvi_5 gap after a short run is about 0.5 nats, over 8 SE at this N


@pytest.fixture(scope="module")
def short_runs():
    """{name: (initial params, params after SHORT_STEPS steps of that objective)}."""
    runs = {}
    for name in cone.NAMES:
        trained, _ = cone.train(name, SHORT_STEPS, batch=BATCH, progress=False)
        runs[name] = (cone.init_params(name, jax.random.key(0)), trained)
    return runs


def _stats(objective, params, seed):
    return mean_and_stderr(cone.estimates(objective, params, N, seed))


def test_posterior_density_integrates_to_one_on_a_grid():
    """The 1-D quadrature over s = x^2 + y^2 agrees with a 2-D Riemann sum of the model's own joint."""
    grid = jnp.linspace(-3.0, 3.0, 1001)  # spacing 0.006: about 6 points per radial standard deviation
    gx, gy = jnp.meshgrid(grid, grid)
    mass = float(jnp.sum(cone.posterior_density(gx, gy))) * float(grid[1] - grid[0]) ** 2
    assert abs(mass - 1.0) < 1e-3, mass


def test_log_evidence_matches_a_monte_carlo_estimate():
    """p(z) = E_r[p(x, y, z) / r(x, y)] with r a ring proposal: angle ~ U(0, 2 pi),
    s = x^2 + y^2 ~ N(z, 0.5), whose density in the plane is N(s; z, 0.5) / pi."""
    k_angle, k_s = jax.random.split(jax.random.key(0))
    n = 200_000
    angle = jax.random.uniform(k_angle, (n,), maxval=2 * math.pi)
    s = cone.Z_OBS + 0.5 * jax.random.normal(k_s, (n,))
    x, y = jnp.sqrt(s) * jnp.cos(angle), jnp.sqrt(s) * jnp.sin(angle)
    log_r = jax.scipy.stats.norm.logpdf(s, cone.Z_OBS, 0.5) - math.log(math.pi)
    weights = jnp.exp(cone.log_joint(x, y) - log_r) / math.exp(LOG_P)  # mean 1 if LOG_P is right
    assert within_stderr(weights, 1.0), mean_and_stderr(weights)
    assert not within_stderr(weights, 1.02)  # negative control: the test can tell 2%


def _assert_increasing(stats, upper):
    """Each bound in `stats` (a list of (mean, se)) exceeds the previous one, and the last is below
    `upper`, each by more than 5 standard errors."""
    for (low, se_low), (high, se_high) in zip(stats, stats[1:]):
        assert high - low > 5 * math.hypot(se_low, se_high), stats
    mean, se = stats[-1]
    assert upper - mean > 5 * se, (stats, upper)


def test_mean_field_bounds_are_ordered_below_the_log_evidence():
    """E[elbo] < E[iwae_5] < log p(z) at a mean-field guide on part of the ring."""
    params = {"loc": jnp.array([math.sqrt(cone.Z_OBS), 0.0]), "log_scale": jnp.log(jnp.array([0.05, 0.5]))}
    bounds = [cone.objective("elbo"), cone.objective("iwae")]
    _assert_increasing([_stats(b, params, i) for i, b in enumerate(bounds)], LOG_P)


def test_hierarchical_bounds_are_ordered_below_the_log_evidence(short_runs):
    """E[hvi] < E[iwhvi_5] < E[diwhvi_5x5] < log p(z) at the guide and reverse model of a short HVI run."""
    params = short_runs["hvi"][1]
    bounds = [cone.objective(name) for name in cone.HIERARCHICAL]
    _assert_increasing([_stats(b, params, 10 + i) for i, b in enumerate(bounds)], LOG_P)


@pytest.mark.parametrize("name", cone.NAMES)
def test_a_short_run_improves_the_bound(short_runs, name):
    start, trained = short_runs[name]
    before, after = _stats(cone.objective(name), start, 20), _stats(cone.objective(name), trained, 21)
    assert after[0] - before[0] > 5 * math.hypot(before[1], after[1]), (before, after)
    assert after[0] < LOG_P + 5 * after[1], (after, LOG_P)
