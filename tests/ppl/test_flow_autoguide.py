"""Normalizing-flow autoguides (`ppl.autoguide.iaf`, `bnaf`): the density against NumPyro's own
pushforward, fits of a correlated posterior with the ELBO and STL, the STL gradient's zero
variance at an exactly represented posterior, and errors for latents they cannot cover."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import keys, mean_and_stderr
from jax.example_libraries import stax
from numpyro.distributions import constraints
from numpyro.distributions.flows import BlockNeuralAutoregressiveTransform, InverseAutoregressiveTransform
from numpyro.distributions.transforms import PermuteTransform, biject_to
from numpyro.nn import AutoregressiveNN, BlockNeuralAutoregressiveNN

import ppl
from ppl import autoguide, dist

KEY = jax.random.key(0)
SIGMA = 0.5  # x ~ Normal(z_1 + z_2 (+ s), SIGMA) with z ~ Normal(0, I): posterior correlation -0.8
X = jnp.array(1.0)
STD_NORMAL_2D = dist.Normal(0.0, 1.0).expand((2,)).to_event(1)


@ppl.gen
def mixed_supports(params, x):
    z = ppl.sample("z", STD_NORMAL_2D)
    s = ppl.sample("s", dist.LogNormal(0.5, 0.7))
    w = ppl.sample("w", dist.Dirichlet(jnp.ones(3)))
    ppl.sample("x", dist.Normal(z.sum() + s * w[0], SIGMA), obs=x)


SUPPORTS = {"z": constraints.real_vector, "s": constraints.positive, "w": constraints.simplex}
BLOCKS = {"z": slice(0, 2), "s": slice(2, 3), "w": slice(3, 5)}
REVERSED_WITHIN_SITES = jnp.array([1, 0, 2, 4, 3])


# -- the density is the pushforward's -----------------------------------------------------------


def _numpyro_flow(kind, params):
    """NumPyro's pushforward of N(0, I_5) through the same flows (built here, independently of
    the guide), the coordinates reversed within each site's block between flows."""
    layers = []
    for i, p in enumerate(params["flows"]):
        if i:
            layers.append(PermuteTransform(REVERSED_WITHIN_SITES))
        if kind == "iaf":
            arn = AutoregressiveNN(5, [5, 5], permutation=jnp.arange(5), nonlinearity=stax.Elu)[1]
            layers.append(InverseAutoregressiveTransform(functools.partial(arn, p)))
        else:
            residual = "gated" if i < len(params["flows"]) - 1 else None
            bn_arn = BlockNeuralAutoregressiveNN(5, [4], residual)[1]
            layers.append(BlockNeuralAutoregressiveTransform(functools.partial(bn_arn, p)))
    return dist.TransformedDistribution(dist.Normal(0.0, 1.0).expand((5,)).to_event(1), layers)


def _constrain(u):
    """The sites' values at the joint unconstrained vector u, and the log-Jacobian of the map."""
    values, log_jacobian = {}, 0.0
    for name, block in BLOCKS.items():
        t = biject_to(SUPPORTS[name])
        u_site = u[block] if name != "s" else u[2]
        values[name] = t(u_site)
        log_jacobian += jnp.sum(t.log_abs_det_jacobian(u_site, values[name]))
    return values, log_jacobian


def _build(kind):
    if kind == "iaf":
        return autoguide.iaf(mixed_supports, None, X, num_flows=2)
    return autoguide.bnaf(mixed_supports, None, X, num_flows=2, hidden_factors=(4,))


@pytest.mark.parametrize("kind", ["iaf", "bnaf"])
def test_density_is_numpyros_pushforward_with_the_support_jacobians(kind):
    guide, params = _build(kind)
    assert guide.layout == BLOCKS
    flow = _numpyro_flow(kind, params)

    def reference(key):  # a draw of NumPyro's flow (its intermediates avoid BNAF's missing inverse)
        u, intermediates = flow.sample_with_intermediates(key)
        values, log_jacobian = _constrain(u)
        return values, flow.log_prob(u, intermediates) - log_jacobian

    values, log_q = jax.jit(jax.vmap(reference))(keys(20, seed=3))
    traces = jax.jit(jax.vmap(lambda k: guide.simulate(k, params, X)))(keys(2000, seed=4))
    # one compiled assess (BNAF's is a bisection) for NumPyro's draws and the guide's own
    both = {name: jnp.concatenate([values[name], traces.choices[name]]) for name in values}
    assessed = jax.jit(jax.vmap(lambda v: guide.assess(v, params, X)[0]))(both)
    np.testing.assert_allclose(assessed[:20], log_q, rtol=1e-4, atol=1e-4)
    assert np.ptp(np.asarray(log_q)) > 1.0  # distinct points, not one density repeated
    # The test can fail: without the support bijections' Jacobians every density is off.
    without_jacobians = jax.jit(jax.vmap(lambda k: flow.log_prob(*flow.sample_with_intermediates(k))))(keys(20, seed=3))
    assert np.abs(np.asarray(log_q - without_jacobians)).min() > 0.1

    # The guide's own draws: their scores are their densities, and they follow the same law.
    np.testing.assert_allclose(assessed[20:], traces.score, rtol=1e-4, atol=1e-4)
    theirs = jax.jit(jax.vmap(lambda k: _constrain(flow.sample(k))[0]))(keys(2000, seed=5))
    for name in BLOCKS:
        (m1, se1), (m2, se2) = mean_and_stderr(traces.choices[name]), mean_and_stderr(theirs[name])
        assert np.all(np.abs(m1 - m2) < 5 * np.hypot(se1, se2)), name

    median = guide.median(params, X)  # the image of eps = 0
    for name, value in _constrain(functools.reduce(lambda x, t: t(x), flow.transforms, jnp.zeros(5)))[0].items():
        np.testing.assert_allclose(median[name], value, rtol=1e-5, atol=1e-6)


def test_bnaf_density_is_differentiable_through_its_numerical_inverse():
    # log q(z) goes through a bisection (no derivative of its own): the Newton step from the
    # stopped root must carry the implicit derivative, in z (STL's path term) and in the
    # parameters (the ELBO's). Checked against central differences of the density itself.
    guide, params = autoguide.bnaf(sum_model, None, X, num_flows=2, hidden_factors=(4,))
    log_q = jax.jit(lambda z, params: guide.assess({"z": z}, params, X)[0])
    z = jnp.array([0.7, -0.4])
    direction = jax.tree.map(lambda a: jax.random.normal(jax.random.key(a.size), a.shape), params)
    along = lambda h: jax.tree.map(lambda p, d: p + h * d, params, direction)
    grad_z, grad_params = jax.grad(log_q, argnums=(0, 1))(z, params)
    h = 1e-2
    for i in range(2):
        step = jnp.zeros(2).at[i].set(h)
        np.testing.assert_allclose(grad_z[i], (log_q(z + step, params) - log_q(z - step, params)) / (2 * h), rtol=1e-2)
    directional = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grad_params), jax.tree.leaves(direction)))
    finite = (log_q(z, along(h)) - log_q(z, along(-h))) / (2 * h)
    np.testing.assert_allclose(directional, finite, rtol=1e-2)
    assert abs(float(finite)) > 0.1 and float(jnp.abs(grad_z).max()) > 0.1  # not a trivial 0 = 0


# -- fitting a correlated posterior -------------------------------------------------------------


@ppl.gen
def sum_model(params, x):
    z = ppl.sample("z", STD_NORMAL_2D)
    ppl.sample("x", dist.Normal(z.sum(), SIGMA), obs=x)


LOG_EVIDENCE = float(dist.Normal(0.0, math.sqrt(2 + SIGMA**2)).log_prob(X))
MEAN_FIELD_GAP = 0.5 * math.log(25 / 9)  # KL of the best mean-field guide to this posterior


def _kl_to_posterior(guide, params, num_samples=20_000):
    """KL(q || p(z | x)) = log p(x) - ELBO, estimated with its standard error."""
    values = jax.jit(jax.vmap(lambda k: ppl.objectives.elbo(sum_model, guide).estimate(k, params, X)))(
        keys(num_samples, seed=9)
    )
    elbo, se = mean_and_stderr(values)
    return LOG_EVIDENCE - float(elbo), float(se)


def _fit(build, objective, steps=1000):
    guide, params = build(sum_model, None, X)
    optimizer = optax.adam(optax.cosine_decay_schedule(2e-2, steps))
    params, _ = ppl.fit(objective(sum_model, guide), params, X, optimizer=optimizer, steps=steps, key=KEY)
    return _kl_to_posterior(guide, params)


@pytest.mark.parametrize("build", [autoguide.iaf, autoguide.bnaf], ids=["iaf", "bnaf"])
@pytest.mark.parametrize("objective", [ppl.objectives.elbo, ppl.objectives.stl], ids=["elbo", "stl"])
def test_flows_fit_a_correlated_posterior_far_better_than_mean_field(build, objective):
    # Measured after 1000 steps (KL in nats, standard error ~0.002): iaf 0.028 (ELBO) and 0.018
    # (STL), bnaf 0.072 and 0.062; mean field 0.511, its optimum.
    kl, se = _fit(build, objective)
    assert -5 * se < kl < 0.1


def test_mean_field_cannot_fit_it():  # the negative control of the test above
    kl, se = _fit(autoguide.mean_field, ppl.objectives.elbo)
    assert kl > MEAN_FIELD_GAP - 5 * se > 0.4


# -- STL at an exactly represented posterior -----------------------------------------------------


@ppl.gen
def gaussian_and_lognormal(params, x):
    z = ppl.sample("z", STD_NORMAL_2D)
    ppl.sample("s", dist.LogNormal(0.5, 0.7))
    ppl.sample("x", dist.Normal(z.sum(), SIGMA), obs=x)


def _posterior_iaf():
    """An IAF guide (one flow with skip connections) set to the exact posterior: in the
    unconstrained coordinates (z_1, z_2, log s) it is Gaussian, u = mean + L eps, which the flow
    is when its network's last layer is 0 but for the biases (the mean, log diag L) and the skip
    connection carries L_21 eps_1 into the mean of u_2."""
    guide, params = autoguide.iaf(gaussian_and_lognormal, None, X, num_flows=1, skip_connections=True)
    cov_z = jnp.linalg.inv(jnp.eye(2) + jnp.ones((2, 2)) / SIGMA**2)
    mean = jnp.concatenate([cov_z @ jnp.ones(2) * X / SIGMA**2, jnp.array([0.5])])
    L = jnp.linalg.cholesky(jax.scipy.linalg.block_diag(cov_z, jnp.array([[0.7**2]])))
    (), (main, skip), () = params["flows"][0]
    *hidden, (w_out, _) = main
    w_skip = jnp.zeros_like(skip).at[0, 1].set(L[1, 0])
    last = (jnp.zeros_like(w_out), jnp.concatenate([mean, jnp.log(jnp.diag(L))]))
    return guide, {"flows": (((), ([*hidden, last], w_skip), ()),)}


def _gradients(objective, params, n=500):
    grads = jax.jit(jax.vmap(lambda k: objective.grad_estimate(k, params, X)))(keys(n, seed=2))
    return np.concatenate([np.reshape(g, (n, -1)) for g in jax.tree.leaves(grads)], axis=1)


def test_stl_gradient_vanishes_at_the_posterior_where_the_elbos_does_not():
    guide, params = _posterior_iaf()
    values = jax.jit(jax.vmap(lambda k: ppl.objectives.elbo(gaussian_and_lognormal, guide).estimate(k, params, X)))(
        keys(500)
    )
    # q is the posterior: log p(x, z) - log q(z) = log p(x) at every draw
    np.testing.assert_allclose(values, LOG_EVIDENCE, atol=1e-5)

    stl = _gradients(ppl.objectives.stl(gaussian_and_lognormal, guide), params)
    elbo = _gradients(ppl.objectives.elbo(gaussian_and_lognormal, guide), params)
    assert np.abs(stl).max() < 1e-4  # every draw's gradient is 0: no variance at all
    assert elbo.std(0).max() > 0.3  # the score term's noise (mean 0)
    mean, se = mean_and_stderr(elbo)
    assert np.all(np.abs(mean) <= 5 * se + 1e-6)  # both are unbiased for the true gradient, 0

    # The test can fail: off the optimum (the mean of u_1 shifted) STL's gradient varies.
    (), (main, skip), () = params["flows"][0]
    w_out, b_out = main[-1]
    shifted = {"flows": (((), ([*main[:-1], (w_out, b_out.at[0].add(0.3))], skip), ()),)}
    assert _gradients(ppl.objectives.stl(gaussian_and_lognormal, guide), shifted).std(0).max() > 0.05


# -- latents the flows cannot cover --------------------------------------------------------------


@ppl.gen
def with_a_discrete_latent(params, x):
    k = ppl.sample("k", dist.Bernoulli(0.3))
    z = ppl.sample("z", dist.Normal(k, 1.0))
    ppl.sample("x", dist.Normal(z, 1.0), obs=x)


@ppl.gen
def with_a_scan(params, x):
    def step(h, _):
        return ppl.sample("h", dist.Normal(h, 1.0)), None

    h, _ = jax.lax.scan(step, 0.0, None, length=3)
    ppl.sample("x", dist.Normal(h, 1.0), obs=x)


@pytest.mark.parametrize("build", [autoguide.iaf, autoguide.bnaf], ids=["iaf", "bnaf"])
def test_latents_a_flow_cannot_cover_are_named(build):
    with pytest.raises(ValueError, match="latent site 'k' is discrete"):
        build(with_a_discrete_latent, None, X)
    with pytest.raises(NotImplementedError, match=f"{build.__name__}: the latent site 'h' is inside scan"):
        build(with_a_scan, None, X)
