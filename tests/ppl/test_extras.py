"""Constrained parameters, diagnostics, FIVO, the sleep phase and minibatch plates."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from conftest import keys, mean_and_stderr

import ppl
from ppl import dist
from ppl.dist import constraints


def test_constrained_parameters_stay_in_their_support_and_train():
    params = {
        "loc": 0.0,
        "scale": ppl.constrained(2.0, constraints.positive),
        "probs": ppl.constrained(jnp.array([0.2, 0.3, 0.5]), constraints.simplex),
    }
    values = ppl.constrain(params)
    np.testing.assert_allclose(values["scale"], 2.0, rtol=1e-6)
    np.testing.assert_allclose(values["probs"], [0.2, 0.3, 0.5], rtol=1e-5)
    assert jax.tree.leaves(params)[1].shape == (2,)  # the simplex is stored in R^2

    @ppl.expectation
    def objective(params):  # maximized at scale = 3 and probs = (0.1, 0.1, 0.8)
        p = ppl.constrain(params)
        target = jnp.array([0.1, 0.1, 0.8])
        return -((p["scale"] - 3.0) ** 2) + jnp.sum(target * jnp.log(p["probs"]))

    fitted, _ = ppl.fit(
        objective, params, optimizer=optax.adam(0.05), steps=1500, key=jax.random.key(0), progress=False
    )
    values = ppl.constrain(fitted)
    np.testing.assert_allclose(values["scale"], 3.0, atol=1e-2)
    np.testing.assert_allclose(values["probs"], [0.1, 0.1, 0.8], atol=1e-2)


@ppl.gen
def mixed_model(params, x):
    z = ppl.sample("z", dist.Normal(0.0, 1.0))
    k = ppl.sample("k", dist.Bernoulli(0.3))
    ppl.sample("x", dist.Normal(z + k, 1.0), obs=x)


@ppl.gen
def mixed_guide(params, x):
    ppl.sample("z", dist.Normal(params["z"], 1.0))
    ppl.sample("k", dist.Bernoulli(jax.nn.sigmoid(params["k"])))


def test_site_contributions_add_up_to_the_elbo():
    params = {"z": 0.1, "k": 0.2}
    parts = ppl.diagnostics.site_contributions(
        jax.random.key(0), mixed_model, mixed_guide, params, 1.0, num_samples=4000
    )
    total = sum(p.get("log_p", 0.0) - p.get("log_q", 0.0) for p in parts.values())
    elbos = jax.vmap(lambda k: ppl.objectives.elbo(mixed_model, mixed_guide).estimate(k, params, 1.0))(keys(4000))
    mean, se = mean_and_stderr(elbos)
    assert abs(total - mean) < 5 * se * math.sqrt(2)
    assert set(parts) == {"z", "k", "x"} and "log_q" not in parts["x"]


def test_gradient_stats_show_enumeration_quiets_a_noisy_site():
    params = {"z": 0.1, "k": 0.2}
    noisy = ppl.diagnostics.gradient_stats(
        jax.random.key(1), ppl.objectives.elbo(mixed_model, mixed_guide), params, 1.0, num_samples=2000
    )
    enumerated = ppl.objectives.elbo(mixed_model, ppl.with_estimators(mixed_guide, {"k": ppl.enum()}))
    quiet = ppl.diagnostics.gradient_stats(jax.random.key(1), enumerated, params, 1.0, num_samples=2000)
    assert quiet["k"]["std"] < 0.3 * noisy["k"]["std"]
    assert quiet["k"]["snr"] > 3 * noisy["k"]["snr"]


A, SX = 0.8, 0.5


@ppl.gen
def ssm_step(params, z_prev, x_t):
    z = ppl.sample("z", dist.Normal(A * z_prev, 1.0))
    ppl.sample("x", dist.Normal(z, SX), obs=x_t)
    return z


@ppl.gen
def ssm_proposal(params, z_prev, x_t):
    ppl.sample("z", dist.Normal(params["w"] * A * z_prev + params["v"] * x_t, jnp.exp(params["s"])))


def kalman_log_likelihood(xs):
    m, p, ll = 0.0, 0.0, 0.0
    for x in np.asarray(xs, np.float64):
        m, p = A * m, A * A * p + 1.0
        s = p + SX**2
        ll += -0.5 * (math.log(2 * math.pi * s) + (x - m) ** 2 / s)
        gain = p / s
        m, p = m + gain * (x - m), (1 - gain) * p
    return ll


def test_fivo_is_the_log_of_an_unbiased_smc_estimate_and_tightens_with_particles():
    xs = jax.random.normal(jax.random.key(1), (8,))
    params = {"w": 1.0, "v": 0.0, "s": 0.0}
    exact = kalman_log_likelihood(xs)
    bounds = []
    for k in (2, 16):
        objective = ppl.objectives.fivo(ssm_step, ssm_proposal, jnp.zeros(()), k)
        log_z = jax.jit(jax.vmap(lambda key: objective.estimate(key, params, xs)))(keys(20_000))
        ratio_mean, ratio_se = mean_and_stderr(np.exp(np.asarray(log_z, np.float64) - exact))
        assert abs(ratio_mean - 1.0) < 5 * ratio_se  # E[Z_hat] = p(x)
        bounds.append(mean_and_stderr(log_z))
    (low, low_se), (high, high_se) = bounds
    assert low + 3 * low_se < high < exact
    grads = jax.vmap(lambda key: objective.grad_estimate(key, params, xs))(keys(64))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


@ppl.gen
def conjugate(params, x):
    z = ppl.sample("z", dist.Normal(0.0, 1.0))
    ppl.sample("x", dist.Normal(z, 1.0), obs=x)


@ppl.gen
def amortized(params, x):
    ppl.sample("z", dist.Normal(params["a"] * x + params["b"], jnp.exp(params["s"])))


def test_sleep_phase_learns_the_amortized_posterior():
    params = {"a": 0.0, "b": 0.3, "s": 0.0}
    objective = ppl.objectives.sleep(conjugate, amortized, "x")
    schedule = optax.cosine_decay_schedule(0.05, 3000)
    fitted, _ = ppl.fit(
        objective, params, 1.0, optimizer=optax.adam(schedule), steps=3000, key=jax.random.key(1), progress=False
    )
    # p(z | x) = N(x / 2, 1 / sqrt 2): a = 0.5, b = 0, s = log(1 / sqrt 2).
    np.testing.assert_allclose([fitted["a"], fitted["b"], fitted["s"]], [0.5, 0.0, math.log(math.sqrt(0.5))], atol=0.05)


@ppl.gen
def datum(mu, xi):
    ppl.sample("x", dist.Normal(mu, 1.0), obs=xi)


def test_subsampled_plate_gradients_average_to_the_full_data_gradient():
    n = 8
    data = jnp.arange(n) * 0.3

    @ppl.gen
    def model(params, x):
        mu = ppl.sample("mu", dist.Normal(0.0, 3.0))
        ppl.sample("data", ppl.plate(datum, size=n, subsample_size=x.shape[0], in_axes=(None, 0)), mu, x)

    @ppl.gen
    def guide(params, x):
        ppl.sample("mu", dist.Normal(params["loc"], 1.0))

    objective = ppl.objectives.elbo(model, guide)
    params = {"loc": jnp.array(0.3)}
    for key in keys(3):
        full = objective.grad_estimate(key, params, data)["loc"]
        parts = [objective.grad_estimate(key, params, data[i : i + 2])["loc"] for i in range(0, n, 2)]
        np.testing.assert_allclose(np.mean(parts), full, rtol=1e-5)
    # Negative control: without the size / subsample_size scale the average is not the full gradient.
    unscaled = ppl.objectives.elbo(
        ppl.gen(
            lambda p, x: (
                ppl.sample("mu", dist.Normal(0.0, 3.0)),
                ppl.sample("data", ppl.plate(datum, in_axes=(None, 0)), 0.0, x),
            )
        ),
        guide,
    )
    key = keys(1)[0]
    parts = [unscaled.grad_estimate(key, params, data[i : i + 2])["loc"] for i in range(0, n, 2)]
    assert abs(np.mean(parts) - objective.grad_estimate(key, params, data)["loc"]) > 1.0
