"""The objective library (`ppl.objectives`) against exact answers: convergence to conjugate
posteriors by reparameterization and REINFORCE, the importance weighted bound's monotonicity in
K, and the zero-variance gradients of STL and DReG at the exact posterior."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import keys, mean_and_stderr, within_stderr

import ppl
from models import beta_bernoulli, exponential_gamma, normal_2d
from ppl import dist, objectives

# -- z ~ N(0, 1), x ~ N(z, 1), x = 1.5: p(z | x) = N(0.75, sqrt(0.5)), log p(x) = log N(1.5; 0, 2) -----

X = jnp.array(1.5)
LOG_EVIDENCE = -1.828012
POSTERIOR = {"loc": jnp.array(0.75), "log_scale": jnp.log(jnp.sqrt(jnp.array(0.5)))}
OFF = {"loc": jnp.array(0.2), "log_scale": jnp.log(jnp.array(0.6))}


@ppl.gen
def model(params, x):
    z = ppl.sample("z", dist.Normal(0.0, 1.0))
    ppl.sample("x", dist.Normal(z, 1.0), obs=x)


@ppl.gen
def guide(params, x):
    ppl.sample("z", dist.Normal(params["loc"], jnp.exp(params["log_scale"])))


def exact_elbo(params):
    """E_q[log N(z; 0, 1) + log N(x; z, 1) - log q(z)] in closed form."""
    m, s = params["loc"], jnp.exp(params["log_scale"])
    log_prior = -0.5 * math.log(2 * math.pi) - 0.5 * (m**2 + s**2)
    log_lik = -0.5 * math.log(2 * math.pi) - 0.5 * ((X - m) ** 2 + s**2)
    entropy = 0.5 * math.log(2 * math.pi * math.e) + jnp.log(s)
    return float(log_prior + log_lik + entropy)


def estimates(objective, num_keys, seed=0):
    """A jitted function params -> one estimate per key (compiled once per objective)."""
    ks = keys(num_keys, seed)
    return jax.jit(lambda params: jax.vmap(lambda k: objective.estimate(k, params, X))(ks))


def gradients(objective, num_keys, seed=0):
    ks = keys(num_keys, seed)
    return jax.jit(lambda params: jax.vmap(lambda k: objective.grad_estimate(k, params, X))(ks))


def test_the_oracle_is_right():
    assert math.isclose(float(dist.Normal(0.0, math.sqrt(2.0)).log_prob(X)), LOG_EVIDENCE, abs_tol=1e-5)
    assert math.isclose(exact_elbo(POSTERIOR), LOG_EVIDENCE, abs_tol=1e-5)


# -- IWAE ----------------------------------------------------------------------------------------


def test_iwae_is_nondecreasing_in_k_and_below_the_log_evidence():
    means, ses = [], []
    for k, n in [(1, 10_000), (2, 10_000), (5, 10_000), (10, 5_000), (100, 2_000)]:
        f = estimates(objectives.iwae(model, guide, k), n, seed=k)
        off = f(OFF)
        mean, se = mean_and_stderr(off)
        means.append(mean)
        ses.append(se)
        assert mean <= LOG_EVIDENCE + 3 * se, (k, mean, se)
        if k == 1:
            assert within_stderr(off, exact_elbo(OFF))  # iwae(1) is the ELBO, whose value is known
        # at the exact posterior every weight is p(x): each estimate is log p(x), for every K
        np.testing.assert_allclose(f(POSTERIOR), LOG_EVIDENCE, atol=2e-5)
    for k in range(len(means) - 1):
        # strictly increasing here (q is not the posterior), by many standard errors
        gap, se = means[k + 1] - means[k], math.hypot(ses[k], ses[k + 1])
        assert gap > 5 * se, (k, means, ses)
    assert means[-1] > means[0] + 0.25  # a strong negative control: the bound moved by much more than noise


def test_iwae_with_one_particle_is_the_elbo_key_for_key():
    elbo, iwae1 = objectives.elbo(model, guide), objectives.iwae(model, guide, 1)
    both = jax.jit(
        jax.vmap(lambda k: (elbo.value_and_grad_estimate(k, OFF, X), iwae1.value_and_grad_estimate(k, OFF, X)))
    )
    (v_elbo, g_elbo), (v_iwae, g_iwae) = both(keys(200))
    np.testing.assert_allclose(v_iwae, v_elbo, rtol=1e-6, atol=1e-6)
    for name in OFF:
        np.testing.assert_allclose(g_iwae[name], g_elbo[name], rtol=1e-5, atol=1e-6)
    assert np.std(v_elbo) > 0.1  # the estimates do vary with the key: the equality is not trivial


# -- STL and DReG: zero-variance guide gradients at the exact posterior ------------------------


@pytest.mark.parametrize(
    "name, build, zero",
    [
        ("stl", lambda: objectives.stl(model, guide), True),
        ("dreg", lambda: objectives.dreg(model, guide, 5), True),
        ("elbo", lambda: objectives.elbo(model, guide), False),
        ("iwae", lambda: objectives.iwae(model, guide, 5), False),
    ],
)
def test_path_derivative_gradients_vanish_at_the_exact_posterior(name, build, zero):
    f = gradients(build(), 2_000)
    at_posterior = f(POSTERIOR)
    for p in POSTERIOR:
        g = np.asarray(at_posterior[p])
        assert np.all(np.isfinite(g))
        # every estimator here is unbiased for the gradient, which is zero at the optimum
        assert within_stderr(g, 0.0)
        if zero:
            np.testing.assert_allclose(g, 0.0, atol=1e-5, err_msg=f"{name} {p}")
        else:  # negative control: the score term of log q makes each estimate nonzero
            assert np.max(np.abs(g)) > 0.1 and np.std(g) > 0.05, (name, p)
    # away from the optimum the same estimator does have a gradient (the zero is not trivial)
    away = f(OFF)
    assert np.mean(np.asarray(away["loc"])) > 0.1


# -- convergence to conjugate posteriors ----------------------------------------------------------


def cosine_adam(learning_rate, steps):
    return optax.adam(optax.cosine_decay_schedule(learning_rate, steps))


def _beta_bernoulli_guide(kind):
    if kind == "reparam":  # the default for Beta
        return beta_bernoulli.guide
    if kind == "reinforce":  # a constant baseline keeps it unbiased; log p(x) makes its variance vanish at the optimum
        baseline = float(beta_bernoulli.log_evidence(beta_bernoulli.DATA))
        return ppl.with_estimators(beta_bernoulli.guide, {"p": ppl.reinforce(baseline=baseline)})
    # leave-one-out baselines across the particles (VIMCO's estimator)
    return ppl.with_estimators(beta_bernoulli.guide, {"p": ppl.reinforce(leave_one_out=True)})


@pytest.mark.parametrize(
    "objective, estimator, steps",
    [
        ("elbo", "reparam", 5000),
        ("elbo", "reinforce", 5000),
        ("iwae", "reparam", 10_000),
        ("iwae", "reinforce-loo", 10_000),
    ],
)
def test_beta_bernoulli_reaches_the_posterior_mean(objective, estimator, steps):
    data = beta_bernoulli.DATA
    g = _beta_bernoulli_guide(estimator)
    obj = (
        objectives.elbo(beta_bernoulli.model, g)
        if objective == "elbo"
        else objectives.iwae(beta_bernoulli.model, g, 10)
    )
    params, losses = ppl.fit(
        obj,
        beta_bernoulli.init_params(),
        data,
        optimizer=cosine_adam(0.05, steps),
        steps=steps,
        key=jax.random.key(0),
        progress=False,
    )
    a, b = beta_bernoulli.exact_posterior(data)
    assert float(a / (a + b)) == 0.75
    mean = float(beta_bernoulli.posterior_mean(params))
    assert abs(mean - 0.75) <= 0.03, mean
    assert abs(float(beta_bernoulli.posterior_mean(beta_bernoulli.init_params())) - 0.75) > 0.2  # it had to move
    if objective == "elbo":  # (IWAE(10) is already close to log p(x) at the initial, wide guide)
        assert np.mean(losses[-500:]) < np.mean(losses[:100]) - 0.2


def test_normal_2d_reaches_the_analytic_posterior():
    data = normal_2d.DATA
    steps = 20_000
    params, _ = ppl.fit(
        objectives.elbo(normal_2d.model, normal_2d.guide),
        normal_2d.init_params(),
        data,
        optimizer=cosine_adam(0.02, steps),
        steps=steps,
        key=jax.random.key(0),
        progress=False,
    )
    mean, cov = normal_2d.guide_moments(params)
    exact_mean, exact_cov = normal_2d.exact_posterior(data)
    np.testing.assert_allclose(mean, exact_mean, atol=0.04)
    np.testing.assert_allclose(jnp.sqrt(jnp.diag(cov)), jnp.sqrt(jnp.diag(exact_cov)), atol=0.04)
    np.testing.assert_allclose(cov[0, 1], exact_cov[0, 1], atol=0.02)
    assert exact_cov[0, 1] < -0.04  # the posterior is correlated, and the guide found the sign
    # the oracle: at the exact parameters the guide is the posterior, and p(x, z) / p(z | x) = p(x) at any z
    exact_mean_from_params, exact_cov_from_params = normal_2d.guide_moments(normal_2d.exact_params(data))
    np.testing.assert_allclose(exact_mean_from_params, exact_mean, rtol=1e-5)
    np.testing.assert_allclose(exact_cov_from_params, exact_cov, rtol=1e-5)
    z = jnp.array([0.3, -1.1])
    log_joint, _ = normal_2d.model.assess({"z1": z[0], "z2": z[1]}, None, data)
    log_posterior = dist.MultivariateNormal(exact_mean, exact_cov).log_prob(z)
    np.testing.assert_allclose(log_joint - log_posterior, normal_2d.log_evidence(data), rtol=1e-5)


def test_exponential_gamma_reaches_gamma_3_6():
    """STL: its gradient vanishes at the exact posterior, so Adam lands on it."""
    data = exponential_gamma.DATA
    assert [float(v) for v in exponential_gamma.exact_posterior(data)] == [3.0, 6.0]
    steps = 5000
    params, _ = ppl.fit(
        objectives.stl(exponential_gamma.model, exponential_gamma.guide),
        exponential_gamma.init_params(),
        data,
        optimizer=cosine_adam(0.05, steps),
        steps=steps,
        key=jax.random.key(0),
        progress=False,
    )
    alpha, beta = float(jnp.exp(params["log_alpha"])), float(jnp.exp(params["log_beta"]))
    assert abs(alpha - 3.0) <= 0.2 and abs(beta - 6.0) <= 0.2, (alpha, beta)
