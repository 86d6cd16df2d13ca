"""`ppl.marginal` and the objectives built on it (HVI, IWHVI, DIWHVI), and reweighted wake-sleep,
on a Gaussian model whose guide has an auxiliary variable:

    model   z ~ N(theta, 1), x ~ N(z, 1), x = 1.5
    guide   u ~ N(mu_u, 1), z ~ N(a u + b, s)          so q(z) = N(a mu_u + b, sqrt(a^2 + s^2))
    reverse u ~ N(r_c z + r_d, r_s)                     the proposal r(u | z) for the marginal

q(z) and q(u | z) are Gaussian and known, so every estimate has an exact answer."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import keys, mean_and_stderr, within_stderr

import ppl
from ppl import dist, objectives

X = jnp.array(1.5)
LOG_EVIDENCE = -1.828012  # at theta = 0: log N(1.5; 0, sqrt(2))


@ppl.gen
def model(params, x):
    z = ppl.sample("z", dist.Normal(params["theta"], 1.0))
    ppl.sample("x", dist.Normal(z, 1.0), obs=x)


@ppl.gen
def guide(params, x):
    u = ppl.sample("u", dist.Normal(params["mu_u"], 1.0))
    ppl.sample("z", dist.Normal(params["a"] * u + params["b"], jnp.exp(params["log_s"])))


@ppl.gen
def reverse(kept, params, x):
    ppl.sample("u", dist.Normal(params["r_c"] * kept["z"] + params["r_d"], jnp.exp(params["r_log_s"])))


def _params(**values):
    return {name: jnp.asarray(v, jnp.float32) for name, v in values.items()}


# q(u | z) = N(0.8 z - 0.06, 1/sqrt(5)); the reverse model is deliberately a little off, with a
# scale between that of q(u | z) / sqrt(2) and sqrt(2) times it, so that both the density estimate
# and its reciprocal have finite variance.
FIXED = _params(theta=0.0, mu_u=0.5, a=1.0, b=0.2, log_s=math.log(0.5), r_c=0.6, r_d=0.1, r_log_s=math.log(0.55))
EXACT_REVERSE = {**FIXED, **_params(r_c=0.8, r_d=-0.06, r_log_s=-0.5 * math.log(5.0))}


def q_z(params):
    """The guide's exact marginal over z."""
    return dist.Normal(
        params["a"] * params["mu_u"] + params["b"], jnp.sqrt(params["a"] ** 2 + jnp.exp(2 * params["log_s"]))
    )


def exact_marginal_elbo(params):
    """E_q(z)[log p(z) + log p(x | z) - log q(z)] in closed form."""
    m, s = q_z(params).loc, q_z(params).scale
    log_prior = -0.5 * math.log(2 * math.pi) - 0.5 * ((m - params["theta"]) ** 2 + s**2)
    log_lik = -0.5 * math.log(2 * math.pi) - 0.5 * ((X - m) ** 2 + s**2)
    return float(log_prior + log_lik + 0.5 * math.log(2 * math.pi * math.e) + jnp.log(s))


def test_the_oracle_is_right():
    """q(u | z) as written above is the guide's conditional: q(u) q(z | u) = q(z) q(u | z)."""
    p = EXACT_REVERSE
    u, z = 0.3, -0.4
    lhs = dist.Normal(p["mu_u"], 1.0).log_prob(u) + dist.Normal(p["a"] * u + p["b"], jnp.exp(p["log_s"])).log_prob(z)
    rhs = q_z(p).log_prob(z) + dist.Normal(p["r_c"] * z + p["r_d"], jnp.exp(p["r_log_s"])).log_prob(u)
    np.testing.assert_allclose(lhs, rhs, rtol=1e-5)
    assert math.isclose(float(dist.Normal(0.0, math.sqrt(2.0)).log_prob(X)), LOG_EVIDENCE, abs_tol=1e-5)


@functools.cache
def _compiled(objective, n, seed):
    ks = keys(n, seed)
    return jax.jit(lambda params, *extra: jax.vmap(lambda k: objective.estimate(k, params, X, *extra))(ks))


def _estimates(objective, params, n, seed, *extra):
    """n estimates of `objective(params, X, *extra)`, one per key (compiled once per objective)."""
    return _compiled(objective, n, seed)(params, *extra)


# -- the marginal as a density and as a sampler ------------------------------------------------------


@pytest.mark.parametrize(
    "proposal, k", [(reverse, 1), (reverse, 3), (None, 3)], ids=["reverse-1", "reverse-3", "prior-3"]
)
def test_density_estimate_is_unbiased_for_the_marginal_density(proposal, k):
    q = ppl.marginal(guide, ["z"], ppl.sir(k, proposal))

    @ppl.expectation
    def density_hat(params, x, z):
        return jnp.exp(ppl.density(q)({"z": z}, params, x))

    for z in (-0.5, 0.7, 2.0):
        samples = _estimates(density_hat, FIXED, 20_000, 1, jnp.array(z))
        exact = float(jnp.exp(q_z(FIXED).log_prob(z)))
        assert within_stderr(samples, exact), (z, mean_and_stderr(samples), exact)
        assert not within_stderr(samples, 1.1 * exact)  # negative control: the test can tell 10%


@pytest.mark.parametrize(
    "proposal, k", [(reverse, 1), (reverse, 5), (None, 3)], ids=["reverse-1", "reverse-5", "prior-3"]
)
def test_sim_weight_is_an_unbiased_reciprocal_density(proposal, k):
    """E[exp(-log_w) g(z)] = E_q(z)[g(z) / q(z)] = integral of g, for z ~ q and any integrable g."""
    q = ppl.marginal(guide, ["z"], ppl.sir(k, proposal))
    g = dist.Normal(0.7, 0.8)  # integrates to 1

    @ppl.expectation
    def weighted(params, x):
        z, log_w = ppl.sim(q)(params, x)
        return jnp.exp(g.log_prob(z["z"]) - log_w)

    samples = _estimates(weighted, FIXED, 50_000, 2)
    assert within_stderr(samples, 1.0), mean_and_stderr(samples)
    assert not within_stderr(samples, 1.1)


def test_with_the_exact_reverse_model_every_estimate_is_exact():
    """With r(u | z) = q(u | z), each importance weight is q(z): no variance at all."""
    q = ppl.marginal(guide, ["z"], ppl.sir(3, reverse))

    @ppl.expectation
    def sim_error(params, x):
        z, log_w = ppl.sim(q)(params, x)
        return log_w - q_z(params).log_prob(z["z"])

    @ppl.expectation
    def density_error(params, x, z):
        return ppl.density(q)({"z": z}, params, x) - q_z(params).log_prob(z)

    np.testing.assert_allclose(_estimates(sim_error, EXACT_REVERSE, 200, 3), 0.0, atol=2e-5)
    np.testing.assert_allclose(_estimates(density_error, EXACT_REVERSE, 200, 4, jnp.array(1.3)), 0.0, atol=2e-5)
    assert np.std(_estimates(sim_error, FIXED, 200, 3)) > 0.01  # negative control: not so with the inexact one


# -- HVI, IWHVI, DIWHVI at fixed parameters -----------------------------------------------------------


def test_hierarchical_bounds_are_ordered_and_below_the_log_evidence():
    n = 20_000
    bounds = {
        "hvi": objectives.hvi(model, guide, ["z"], reverse),
        "iwhvi": objectives.iwhvi(model, guide, ["z"], 5, reverse),
        "diwhvi": objectives.diwhvi(model, guide, ["z"], 5, 5, reverse),
    }
    stats = {name: mean_and_stderr(_estimates(b, FIXED, n, 10 + i)) for i, (name, b) in enumerate(bounds.items())}
    (hvi, se_h), (iwhvi, se_i), (diwhvi, se_d) = stats["hvi"], stats["iwhvi"], stats["diwhvi"]
    elbo = exact_marginal_elbo(FIXED)
    # more inner particles tighten the bound (by many standard errors here: r is not exact) ...
    assert iwhvi - hvi > 5 * math.hypot(se_h, se_i), stats
    # ... towards the ELBO of the exact marginal, which every inner-particle count lower-bounds
    assert hvi < elbo and iwhvi <= elbo + 3 * se_i, (stats, elbo)
    # outer particles tighten it further, and nothing exceeds log p(x)
    assert diwhvi - iwhvi > 5 * math.hypot(se_i, se_d), stats
    for mean, se in stats.values():
        assert mean <= LOG_EVIDENCE + 3 * se, (stats, LOG_EVIDENCE)


# -- training --------------------------------------------------------------------------------------

INIT = _params(theta=0.0, mu_u=0.0, a=0.5, b=0.0, log_s=0.0, r_c=0.0, r_d=0.0, r_log_s=0.0)


@ppl.gen
def extended_model(params, x):
    """The model with the reverse model as an auxiliary factor: same p(x), same p(z | x)."""
    z = ppl.sample("z", dist.Normal(params["theta"], 1.0))
    ppl.sample("x", dist.Normal(z, 1.0), obs=x)
    ppl.sample("u", dist.Normal(params["r_c"] * z + params["r_d"], jnp.exp(params["r_log_s"])))


def reweighted_wake_sleep(num_particles):
    """Both wake phases in one program: the model phase moves only theta (and r), the guide phase
    only the guide (each holds the other's parameters fixed)."""
    wake_p = objectives.rws_wake_p(extended_model, guide, num_particles)
    wake_q = objectives.rws_wake_q(extended_model, guide, num_particles)

    @ppl.expectation
    def objective(params, x):
        return wake_p(params, x) + wake_q(params, x)

    return objective


MODEL_SIDE = ("theta", "r_c", "r_d", "r_log_s")


@pytest.mark.parametrize("phase", ["wake_p", "wake_q"])
def test_each_wake_phase_moves_only_its_own_parameters(phase):
    build = objectives.rws_wake_p if phase == "wake_p" else objectives.rws_wake_q
    objective = build(extended_model, guide, 10)
    grads = jax.jit(jax.vmap(lambda k: objective.grad_estimate(k, FIXED, X)))(keys(200, 20))
    own = MODEL_SIDE if phase == "wake_p" else tuple(n for n in FIXED if n not in MODEL_SIDE)
    for name, g in grads.items():
        if name in own:
            assert np.std(g) > 1e-3 or abs(np.mean(g)) > 1e-3, (phase, name)
        else:
            np.testing.assert_array_equal(g, 0.0, err_msg=f"{phase} moved {name}")


@pytest.mark.parametrize(
    "name, build",
    [
        ("hvi", lambda: objectives.hvi(model, guide, ["z"], reverse)),
        ("iwhvi", lambda: objectives.iwhvi(model, guide, ["z"], 5, reverse)),
        ("diwhvi", lambda: objectives.diwhvi(model, guide, ["z"], 5, 5, reverse)),
        ("rws", lambda: reweighted_wake_sleep(10)),
    ],
)
def test_training_learns_the_model_and_the_posterior(name, build):
    """Maximum likelihood theta = x = 1.5, where p(z | x) = N(1.5, sqrt(0.5))."""
    steps = 20_000
    params, _ = ppl.fit(
        build(),
        INIT,
        X,
        optimizer=optax.adam(optax.cosine_decay_schedule(0.02, steps)),
        steps=steps,
        key=jax.random.key(0),
        progress=False,
    )
    q = q_z(params)
    assert abs(float(params["theta"]) - 1.5) < 0.05, params
    assert abs(float(q.loc) - 1.5) < 0.08, (float(q.loc), params)
    assert abs(float(q.scale) - math.sqrt(0.5)) < 0.05, (float(q.scale), params)
