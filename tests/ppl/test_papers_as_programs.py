"""The literature as programs (notebook 07): each paper's objective or estimator from the library,
tested for its defining property against exact answers (closed forms, Gauss-Hermite quadrature,
enumeration), with negative controls."""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import keys, mean_and_stderr, within_stderr
from jax.scipy.special import gammaln
from scipy.special import logsumexp

import ppl
from models import normal_2d
from ppl import dist, flows, objectives

# -- z ~ N(0, 1), x ~ N(z, 1), x = 1.5: p(z | x) = N(0.75, 0.5), p(x) = N(1.5; 0, 2) --------------

X = jnp.array(1.5)
LOG_EVIDENCE = float(dist.Normal(0.0, math.sqrt(2.0)).log_prob(X))
POSTERIOR = {"loc": jnp.array(0.75), "log_scale": jnp.log(jnp.sqrt(jnp.array(0.5)))}
OFF = {"loc": jnp.array(0.2), "log_scale": jnp.log(jnp.array(0.6))}


@ppl.gen
def model(params, x):
    z = ppl.sample("z", dist.Normal(0.0, 1.0))
    ppl.sample("x", dist.Normal(z, 1.0), obs=x)


@ppl.gen
def guide(params, x):
    ppl.sample("z", dist.Normal(params["loc"], jnp.exp(params["log_scale"])))


def draws(objective, n, seed=0, params=OFF):
    """(values, gradients) of `n` independent estimates at `params` (one compilation per objective
    and `n`, whatever the parameters)."""
    return _compiled_draws(objective)(keys(n, seed), params)


@functools.cache
def _compiled_draws(objective):
    return jax.jit(jax.vmap(lambda k, params: objective.value_and_grad_estimate(k, params, X), in_axes=(0, None)))


def iwae_by_quadrature(num_particles, params=OFF, nodes=20):
    """IWAE_K = E[log 1/K sum_k w_k] over K independent z_k ~ q, by K-dimensional Gauss-Hermite."""
    m, s = float(params["loc"]), math.exp(float(params["log_scale"]))
    eps, weights = np.polynomial.hermite_e.hermegauss(nodes)
    z = m + s * eps
    log_w = -np.log(2 * np.pi) - 0.5 * z**2 - 0.5 * (1.5 - z) ** 2 + 0.5 * np.log(2 * np.pi) + np.log(s) + 0.5 * eps**2
    grid = np.stack(np.meshgrid(*[log_w] * num_particles, indexing="ij"))
    prob = np.prod(np.stack(np.meshgrid(*[weights / weights.sum()] * num_particles, indexing="ij")), axis=0)
    return float(np.sum(prob * (logsumexp(grid, axis=0) - math.log(num_particles))))


def exact_elbo(params=OFF, kappa=1.0):
    """E_q[kappa log N(x; z, 1) + log N(z; 0, 1) - log q(z)] in closed form (kappa = 1: the ELBO)."""
    m, s = params["loc"], jnp.exp(params["log_scale"])
    log_prior = -0.5 * math.log(2 * math.pi) - 0.5 * (m**2 + s**2)
    log_lik = -0.5 * math.log(2 * math.pi) - 0.5 * ((X - m) ** 2 + s**2)
    return log_prior + kappa * log_lik + 0.5 * math.log(2 * math.pi * math.e) + jnp.log(s)


# -- Rainforth et al. (2018): PIWAE, MIWAE, CIWAE --------------------------------------------------


def test_the_quadrature_oracle_is_right():
    assert math.isclose(iwae_by_quadrature(1), float(exact_elbo()), abs_tol=1e-6)  # float32 closed form
    assert math.isclose(iwae_by_quadrature(2, POSTERIOR), LOG_EVIDENCE, abs_tol=1e-6)
    assert abs(iwae_by_quadrature(3, nodes=30) - iwae_by_quadrature(3, nodes=20)) < 1e-7


def test_each_estimator_has_its_bound_as_expected_value():
    iwae2, iwae4 = iwae_by_quadrature(2), iwae_by_quadrature(4)
    bounds = {
        "miwae": (objectives.miwae(model, guide, 3, 2), iwae2),
        "ciwae": (objectives.ciwae(model, guide, 2, 0.3), 0.3 * float(exact_elbo()) + 0.7 * iwae2),
        "piwae": (objectives.piwae(model, guide, 2, 2), iwae4),
    }
    for name, (objective, exact) in bounds.items():
        values, _ = draws(objective, 20_000, seed=1)
        assert within_stderr(values, exact), (name, mean_and_stderr(values), exact)
        # negative control: the neighbouring bound (IWAE_4 for MIWAE_{3,2}, IWAE_2 for the others)
        # is many standard errors away, so the test can tell the bounds apart
        other = iwae4 if name == "miwae" else iwae2
        assert not within_stderr(values, other), (name, other)
        at_posterior, _ = draws(objective, 20_000, params=POSTERIOR)
        np.testing.assert_allclose(at_posterior, LOG_EVIDENCE, atol=2e-5)  # every weight is p(x)


def test_piwae_splits_its_gradient_between_iwae_and_miwae():
    """With model parameters next to the guide's, PIWAE's model gradient is IWAE_{MK}'s and its guide
    gradient MIWAE_{M,K}'s, key for key (the draws are the same particles)."""

    @ppl.gen
    def shifted_model(params, x):
        z = ppl.sample("z", dist.Normal(params["prior_loc"], 1.0))
        ppl.sample("x", dist.Normal(z, 1.0), obs=x)

    params = dict(OFF, prior_loc=jnp.array(0.3))
    run = lambda o: jax.jit(jax.vmap(lambda k: o.value_and_grad_estimate(k, params, X)))(keys(200))
    v_p, g_p = run(objectives.piwae(shifted_model, guide, 2, 3))
    v_i, g_i = run(objectives.iwae(shifted_model, guide, 6))
    _, g_m = run(objectives.miwae(shifted_model, guide, 2, 3))
    np.testing.assert_allclose(v_p, v_i, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g_p["prior_loc"], g_i["prior_loc"], rtol=1e-4, atol=1e-5)
    for name in OFF:
        np.testing.assert_allclose(g_p[name], g_m[name], rtol=1e-4, atol=1e-5)
        assert np.max(np.abs(g_i[name] - g_m[name])) > 0.05  # the two targets do differ


def snr(gradients):
    """|mean| / std of one gradient coordinate, with its standard error sqrt((1 + snr^2 / 2) / n)."""
    g = np.asarray(gradients, np.float64)
    value = abs(g.mean()) / g.std(ddof=1)
    return value, math.sqrt((1 + value**2 / 2) / g.shape[0])


def test_the_guide_gradient_snr_falls_with_k_for_iwae_but_not_for_miwae():
    n = 4000
    iwaes = {k: objectives.iwae(model, guide, k) for k in (1, 8, 64)}
    iwae = [snr(draws(iwaes[k], n, seed=k)[1]["loc"]) for k in (1, 8, 64)]
    for (a, se_a), (b, se_b) in zip(iwae, iwae[1:]):
        assert a - b > 5 * math.hypot(se_a, se_b), iwae  # falls, by many standard errors
    miwae, se_m = snr(draws(objectives.miwae(model, guide, 8, 8), n, seed=9)[1]["loc"])
    piwae, se_p = snr(draws(objectives.piwae(model, guide, 8, 8), n, seed=10)[1]["loc"])
    (iwae64, se_i) = iwae[-1]  # the same budget of 64 draws
    assert miwae - iwae64 > 5 * math.hypot(se_m, se_i) and piwae - iwae64 > 5 * math.hypot(se_p, se_i)
    # negative control: with one bound MIWAE is IWAE_K, key for key: the gain comes from M
    one = draws(objectives.miwae(model, guide, 1, 64), n, seed=64)[1]["loc"]
    np.testing.assert_allclose(one, draws(iwaes[64], n, seed=64)[1]["loc"], rtol=1e-4)


# -- the data-emphasized ELBO (Harvey, Petrov & Hughes, 2024) ---------------------------------------


def tempered_posterior(kappa):
    """Guide parameters of p_kappa(z) proportional to N(z; 0, 1) N(x; z, 1)^kappa."""
    precision = 1.0 + kappa
    return {"loc": kappa * X / precision, "log_scale": -0.5 * jnp.log(jnp.asarray(precision))}


def test_data_emphasized_elbo_at_kappa_one_is_the_elbo_key_for_key():
    v_de, g_de = draws(objectives.data_emphasized_elbo(model, guide, 1.0), 200)
    v_elbo, g_elbo = draws(objectives.elbo(model, guide), 200)
    np.testing.assert_allclose(v_de, v_elbo, rtol=1e-6, atol=1e-6)
    for name in OFF:
        np.testing.assert_allclose(g_de[name], g_elbo[name], rtol=1e-5, atol=1e-6)
    assert np.std(v_elbo) > 0.1


def test_data_emphasized_elbo_value_and_gradient_are_unbiased_and_its_optimum_is_the_tempered_posterior():
    kappa = 4.0
    objective = objectives.data_emphasized_elbo(model, guide, kappa)
    values, grads = draws(objective, 10_000)
    exact_value, exact_grad = jax.value_and_grad(lambda p: exact_elbo(p, kappa))(OFF)
    assert within_stderr(values, exact_value)
    for name in OFF:
        assert within_stderr(grads[name], exact_grad[name]), name
        assert not within_stderr(grads[name], jax.grad(exact_elbo)(OFF)[name])  # not the ELBO's gradient
    # the optimum: zero gradient at the tempered posterior (the oracle agrees), not at the posterior
    exact_at_tempered = jax.grad(lambda p: exact_elbo(p, kappa))(tempered_posterior(kappa))
    assert all(abs(float(g)) < 1e-5 for g in exact_at_tempered.values())
    _, at_tempered = draws(objective, 10_000, params=tempered_posterior(kappa))
    _, at_posterior = draws(objective, 10_000, params=POSTERIOR)
    for name in OFF:
        assert within_stderr(at_tempered[name], 0.0), name
        assert not within_stderr(at_posterior[name], 0.0), name


# -- forward chi^2 variational importance sampling (Dieng et al., 2017; Li et al., 2024) ------------

WIDE = {"loc": jnp.array(0.2), "log_scale": jnp.log(jnp.array(0.9))}  # var q > 3/4 var p: finite variance


def chi2_closed_form(mu, cov, loc, scale):
    """-E_q[(p(z | x) / q(z))^2] = -int N(z; mu, cov)^2 / q(z) dz for q = N(loc, diag(scale^2)),
    a Gaussian integral: int exp(-z'Az + 2b'z - c) dz = pi^(d/2) |A|^(-1/2) exp(b'A^-1 b - c)."""
    d, precision, inv_s = mu.shape[0], jnp.linalg.inv(cov), jnp.diag(scale**-2.0)
    a = precision - inv_s / 2
    b = precision @ mu - inv_s @ loc / 2
    c = mu @ precision @ mu - loc @ inv_s @ loc / 2
    log_norm = d / 2 * jnp.log(jnp.pi / (2 * jnp.pi)) - jnp.linalg.slogdet(cov)[1] + jnp.sum(jnp.log(scale))
    return -jnp.exp(log_norm - 0.5 * jnp.linalg.slogdet(a)[1] + b @ jnp.linalg.solve(a, b) - c)


def exact_chi2_objective(params):
    """`chi2_vis` with log_scale = log p(x) on the one-dimensional model, in closed form."""
    loc, scale = jnp.atleast_1d(params["loc"]), jnp.exp(jnp.atleast_1d(params["log_scale"]))
    return chi2_closed_form(jnp.array([0.75]), jnp.array([[0.5]]), loc, scale)


def test_chi2_vis_value_and_gradient_are_unbiased():
    objective = objectives.chi2_vis(model, guide, log_scale=LOG_EVIDENCE)
    values, grads = draws(objective, 20_000, params=WIDE)
    exact_value, exact_grad = jax.value_and_grad(exact_chi2_objective)(WIDE)
    assert within_stderr(values, exact_value)
    np.testing.assert_allclose(float(exact_chi2_objective(POSTERIOR)), -1.0, rtol=1e-5)  # chi^2 = 0 there
    for name in WIDE:
        assert within_stderr(grads[name], exact_grad[name]), name
        assert abs(float(exact_grad[name])) > 0.1  # a real gradient, not a trivial zero


def test_chi2_vis_covers_more_mass_than_the_reverse_kl_fit():
    """On a correlated 2-D Gaussian posterior, a mean-field guide fitted by the ELBO (reverse KL)
    has variances 1 / Lambda_ii, narrower than the marginals; there the chi^2 gradient (exact, and
    its estimate) widens both scales, and the chi^2 optimum is wider than the marginals."""
    mean, cov = normal_2d.exact_posterior(normal_2d.DATA)
    precision = jnp.linalg.inv(cov)
    reverse_kl_fit = {"loc": mean, "log_scale": -0.5 * jnp.log(jnp.diag(precision)), "coupling": jnp.array(0.0)}
    log_joint, _ = normal_2d.model.assess({"z1": mean[0], "z2": mean[1]}, {}, normal_2d.DATA)
    log_evidence = float(log_joint - dist.MultivariateNormal(mean, cov).log_prob(mean))
    exact = lambda p: chi2_closed_form(mean, cov, p["loc"], jnp.exp(p["log_scale"]))

    objective = objectives.chi2_vis(normal_2d.model, normal_2d.guide, log_scale=log_evidence)
    run = jax.vmap(lambda k: objective.value_and_grad_estimate(k, reverse_kl_fit, normal_2d.DATA))
    values, grads = jax.jit(run)(keys(20_000))
    exact_grad = jax.grad(exact)(reverse_kl_fit)["log_scale"]
    assert within_stderr(values, exact(reverse_kl_fit))
    assert within_stderr(grads["log_scale"], exact_grad)
    assert np.all(exact_grad > 0.1)  # maximizing it widens both scales
    assert np.all(np.abs(jax.grad(exact_elbo_2d)(reverse_kl_fit)["log_scale"]) < 1e-5)  # the ELBO's optimum
    # the exact chi^2 optimum over mean-field Gaussians, by Adam on the closed form
    optimizer = optax.adam(1e-2)

    def step(carry, _):
        p, state = carry
        updates, state = optimizer.update(jax.tree.map(jnp.negative, jax.grad(exact)(p)), state)
        return (optax.apply_updates(p, updates), state), None

    (fit, _), _ = jax.jit(lambda p: jax.lax.scan(step, (p, optimizer.init(p)), length=2000))(reverse_kl_fit)
    variances = jnp.exp(2 * fit["log_scale"])
    assert np.all(variances > jnp.diag(cov)) and np.all(jnp.diag(cov) > 1 / jnp.diag(precision)), variances


def exact_elbo_2d(params):
    """The mean-field ELBO on normal_2d up to a constant: -KL(q || p(z | x))."""
    mean, cov = normal_2d.exact_posterior(normal_2d.DATA)
    q = dist.MultivariateNormal(params["loc"], jnp.diag(jnp.exp(2 * params["log_scale"])))
    return -dist.kl_divergence(q, dist.MultivariateNormal(mean, cov))


# -- RSVI: reparameterization through Gamma's acceptance-rejection sampler (Naesseth et al., 2017) ---

GAMMA_EXPECTATIONS = {  # E[f(z)] for z ~ Gamma(alpha, rate), in closed form
    "sqrt": (jnp.sqrt, lambda a, b: jnp.exp(gammaln(a + 0.5) - gammaln(a)) / jnp.sqrt(b)),
    "exp(-z)": (lambda z: jnp.exp(-z), lambda a, b: (b / (b + 1.0)) ** a),
}


def gamma_gradients(estimator, f, params, n, seed=0):
    @ppl.expectation
    def objective(params):
        return f(ppl.sample("z", dist.Gamma(params["alpha"], params["rate"]), estimator=estimator))

    return jax.jit(jax.vmap(lambda k: objective.grad_estimate(k, params)))(keys(n, seed))


@pytest.mark.parametrize("alpha", [0.4, 1.0, 3.0])
@pytest.mark.parametrize("name", list(GAMMA_EXPECTATIONS))
def test_rsvi_is_unbiased_and_agrees_with_implicit_reparameterization(name, alpha):
    f, expected = GAMMA_EXPECTATIONS[name]
    params = {"alpha": jnp.array(alpha), "rate": jnp.array(2.0)}
    exact = jax.grad(lambda p: expected(p["alpha"], p["rate"]))(params)
    rsvi = gamma_gradients(ppl.rsvi(), f, params, 100_000)
    implicit = gamma_gradients(ppl.reparam(), f, params, 100_000, seed=1)  # NumPyro's Gamma: implicit reparam
    assert dist.Gamma(1.0).has_rsample
    for p in params:
        assert within_stderr(rsvi[p], exact[p]), (p, mean_and_stderr(rsvi[p]), exact[p])
        assert within_stderr(implicit[p], exact[p]), (p, mean_and_stderr(implicit[p]), exact[p])


def test_rsvi_without_its_correction_term_is_biased():
    f, expected = GAMMA_EXPECTATIONS["sqrt"]
    params = {"alpha": jnp.array(1.0), "rate": jnp.array(1.0)}
    exact = jax.grad(lambda p: expected(p["alpha"], p["rate"]))(params)["alpha"]
    with_correction = gamma_gradients(ppl.rsvi(), f, params, 200_000)["alpha"]
    without = gamma_gradients(ppl.rsvi(correction=False), f, params, 200_000)["alpha"]
    assert within_stderr(with_correction, exact)
    assert not within_stderr(without, exact, n_se=10.0), mean_and_stderr(without)  # off by more than 10 SE


def test_rsvi_refuses_other_families():
    with pytest.raises(ppl.EstimatorError, match="rsvi"):
        ppl.with_estimators(model, {"z": ppl.rsvi()}).simulate(jax.random.key(0), {}, X)


def test_rsvi_at_batched_sites():
    """A vector-valued Gamma site under `jax.vmap` particles: each coordinate its own accepted draw."""
    alpha = jnp.array([0.5, 1.0, 4.0])

    @ppl.expectation
    def objective(alpha):
        draw = lambda _: ppl.sample("z", dist.Gamma(alpha, 1.0), estimator=ppl.rsvi())
        return jnp.sum(jnp.mean(jnp.sqrt(jax.vmap(draw)(jnp.arange(2))), axis=0))

    grads = jax.jit(jax.vmap(lambda k: objective.grad_estimate(k, alpha)))(keys(50_000))
    exact = jax.grad(lambda a: jnp.sum(GAMMA_EXPECTATIONS["sqrt"][1](a, 1.0)))(alpha)
    assert within_stderr(grads, exact), (mean_and_stderr(grads), exact)
    assert np.std(np.asarray(grads[:, 0] - grads[:, 1])) > 0.01  # the coordinates are not one shared draw


# -- the Concrete / Gumbel-softmax relaxation (Maddison et al., 2017; Jang et al., 2017) -----------
# z in {0, 1}^3 with a uniform prior, x ~ N(W z, 0.5^2): every gradient is exact by enumeration

W = jnp.array([[1.0, -0.5, 0.8], [0.3, 1.2, -1.0]])
XD = jnp.array([1.2, -0.4])
PRIOR_LOGITS = jnp.zeros(3)
LOGITS = {"logits": jnp.array([0.5, -1.0, 0.2])}
CONFIGURATIONS = jnp.array(list(itertools.product([0.0, 1.0], repeat=3)))


@ppl.gen
def decoder(params, z, x):
    ppl.sample("x", dist.Normal(W @ z, 0.5).to_event(1), obs=x)


@ppl.gen
def discrete_model(params, x):
    z = ppl.sample("z", dist.Bernoulli(logits=PRIOR_LOGITS).to_event(1))
    decoder(params, z, x)


@ppl.gen
def bernoulli_guide(params, x):
    ppl.sample("z", dist.Bernoulli(logits=params["logits"]).to_event(1))


def enumerated_log_weights(params):
    """(log q(z), log p(x, z) - log q(z)) at each of the 8 configurations."""
    log_bernoulli = lambda logits: jnp.sum(
        CONFIGURATIONS * jax.nn.log_sigmoid(logits) + (1 - CONFIGURATIONS) * jax.nn.log_sigmoid(-logits), 1
    )
    log_q = log_bernoulli(params["logits"])
    log_lik = jnp.sum(-0.5 * ((XD - CONFIGURATIONS @ W.T) / 0.5) ** 2 - jnp.log(0.5 * jnp.sqrt(2 * jnp.pi)), 1)
    return log_q, log_bernoulli(PRIOR_LOGITS) + log_lik - log_q


def exact_discrete_iwae(params, num_particles):
    """IWAE_K by enumerating all 8^K particle configurations (K = 1: the ELBO)."""
    log_q, log_w = enumerated_log_weights(params)
    rows = jnp.array(list(itertools.product(range(8), repeat=num_particles)))
    bound = jax.nn.logsumexp(log_w[rows], axis=1) - math.log(num_particles)
    return jnp.sum(jnp.exp(jnp.sum(log_q[rows], axis=1)) * bound)


def discrete_gradients(objective, n=20_000, seed=0):
    return jax.jit(jax.vmap(lambda k: objective.grad_estimate(k, LOGITS, XD)))(keys(n, seed))["logits"]


def test_reinforce_vimco_and_enumeration_are_unbiased_for_the_discrete_objective():
    elbo_grad = jax.grad(exact_discrete_iwae)(LOGITS, 1)["logits"]
    iwae3_grad = jax.grad(exact_discrete_iwae)(LOGITS, 3)["logits"]
    cases = {
        "reinforce": (objectives.elbo(discrete_model, bernoulli_guide), elbo_grad),
        "enum": (objectives.elbo(discrete_model, ppl.with_estimators(bernoulli_guide, {"z": ppl.enum()})), elbo_grad),
        "vimco": (objectives.vimco(discrete_model, bernoulli_guide, 3), iwae3_grad),
    }
    for name, (objective, exact) in cases.items():
        grads = discrete_gradients(objective)
        assert within_stderr(grads, exact), (name, mean_and_stderr(grads), exact)
    assert np.max(np.abs(elbo_grad - iwae3_grad)) > 0.05  # VIMCO's target is not the ELBO's gradient


def test_the_concrete_gradient_is_biased_with_a_bias_that_falls_and_a_variance_that_grows_with_temperature():
    exact = np.asarray(jax.grad(exact_discrete_iwae)(LOGITS, 1)["logits"])
    make = lambda t: objectives.concrete_elbo(decoder, PRIOR_LOGITS, lambda p, x: p["logits"], t)
    check_bias_falls_and_variance_grows(relaxed_gradients(make, LOGITS, [1.0, 0.5, 0.2], 100_000), exact)


def relaxed_gradients(make_objective, params, temperatures, n):
    """Gradient estimates, (temperatures, n) + the logits' shape, in one compiled program."""

    def at(temperature):
        objective = make_objective(temperature)
        return jax.vmap(lambda k: objective.grad_estimate(k, params, XD)["logits"])(keys(n))

    return np.asarray(jax.jit(jax.vmap(at))(jnp.asarray(temperatures)))


def check_bias_falls_and_variance_grows(grads, exact, per_coordinate=True):
    """Biased at the first temperature; from each temperature to the next (falling) the bias falls,
    in every coordinate or in norm, by more than 5 standard errors, and the variance doubles."""
    mean, se = grads.mean(axis=1), grads.std(axis=1) / math.sqrt(grads.shape[1])
    bias, variance = np.abs(mean - exact), grads.var(axis=1)
    assert np.all(bias[0] > 10 * se[0]), (bias[0], se[0])  # biased for the discrete gradient
    for k in range(len(grads) - 1):
        if per_coordinate:
            assert np.all(bias[k] - bias[k + 1] > 5 * np.hypot(se[k], se[k + 1])), (bias, se)
        else:  # the norm's standard error is at most the largest coordinate's
            fall = np.linalg.norm(bias[k]) - np.linalg.norm(bias[k + 1])
            assert fall > 5 * np.hypot(se[k].max(), se[k + 1].max()), (bias, se)
        assert np.all(variance[k + 1] > 2 * variance[k]), variance


# Categorical latents: z_j in {0, 1, 2} (j = 1, 2) one-hot, uniform prior, x ~ N(W6 onehot(z), 0.5^2)

W6 = jnp.array([[1.0, -0.5, 0.8, 0.3, 0.0, -1.0], [0.3, 1.2, -1.0, 0.5, -0.7, 0.2]])
CATEGORICAL_PRIOR = jnp.zeros((2, 3))
CATEGORICAL_LOGITS = {"logits": jnp.array([[0.5, -1.0, 0.2], [0.0, 0.8, -0.3]])}


@ppl.gen
def one_hot_decoder(params, z, x):
    ppl.sample("x", dist.Normal(W6 @ z.reshape(-1), 0.5).to_event(1), obs=x)


def exact_categorical_elbo(params):
    """The ELBO of q(z) = prod_j Categorical(logits_j) by enumerating the 9 configurations."""
    log_q, log_p = jax.nn.log_softmax(params["logits"]), jax.nn.log_softmax(CATEGORICAL_PRIOR)
    total = 0.0
    for a, b in itertools.product(range(3), repeat=2):
        z = jnp.stack([jax.nn.one_hot(a, 3), jax.nn.one_hot(b, 3)])
        log_lik = dist.Normal(W6 @ z.reshape(-1), 0.5).to_event(1).log_prob(XD)
        total += jnp.exp(log_q[0, a] + log_q[1, b]) * (log_lik + log_p[0, a] + log_p[1, b] - log_q[0, a] - log_q[1, b])
    return total


def test_the_gumbel_softmax_gradient_for_categorical_latents_has_a_bias_that_falls_with_temperature():
    exact = np.asarray(jax.grad(exact_categorical_elbo)(CATEGORICAL_LOGITS)["logits"])
    make = lambda t: objectives.gumbel_softmax_elbo(one_hot_decoder, CATEGORICAL_PRIOR, lambda p, x: p["logits"], t)
    grads = relaxed_gradients(make, CATEGORICAL_LOGITS, [1.0, 0.5, 0.2], 100_000)
    # in norm: one coordinate's bias barely moves from 1.0 to 0.5
    check_bias_falls_and_variance_grows(grads, exact, per_coordinate=False)
    # a negative control for the oracle: the KL term's gradient alone is far from the ELBO's
    kl_only = jax.grad(lambda p: -jnp.sum(jax.nn.softmax(p["logits"]) * jax.nn.log_softmax(p["logits"])))
    assert np.max(np.abs(np.asarray(kl_only(CATEGORICAL_LOGITS)["logits"]) - exact)) > 0.1


def test_the_gumbel_softmax_value_at_a_low_temperature_is_the_discrete_elbo():
    """As the temperature falls, the relaxed one-hot tends to an exact Categorical draw (Gumbel-max),
    so the objective's mean tends to the discrete ELBO."""
    objective = objectives.gumbel_softmax_elbo(one_hot_decoder, CATEGORICAL_PRIOR, lambda p, x: p["logits"], 0.01)
    values = jax.jit(jax.vmap(lambda k: objective.estimate(k, CATEGORICAL_LOGITS, XD)))(keys(50_000))
    assert within_stderr(values, exact_categorical_elbo(CATEGORICAL_LOGITS)), mean_and_stderr(values)


# -- normalizing-flow guides (Rezende & Mohamed, 2015) with path gradients (Roeder et al., 2017) ----
# z ~ N(0, I2), x ~ N(z, I2): p(z | x) = N(x / 2, I2 / 2), a flow guide at the identity represents it

X2 = jnp.array([1.0, -0.5])
IDENTITY_U = jnp.log(jnp.expm1(1.0)) / 1.25 * jnp.array([1.0, 0.5])  # u^ = 0 for w = (1, 0.5)
FLOW_AT_POSTERIOR = {
    "loc": X2 / 2,
    "log_scale": jnp.full(2, 0.5 * jnp.log(0.5)),
    "u": IDENTITY_U,
    "w": jnp.array([1.0, 0.5]),
    "b": jnp.array(0.3),
    "z0": jnp.array([0.2, 0.1]),
    "a": jnp.array(0.4),
    "c": jnp.array(0.4),  # beta = 0
}
FLOW_OFF = dict(FLOW_AT_POSTERIOR, loc=jnp.array([0.1, 0.2]), u=jnp.array([0.7, -0.4]), c=jnp.array(1.0))


@ppl.gen
def model_2d(params, x):
    z = ppl.sample("z", dist.Normal(jnp.zeros(2), 1.0).to_event(1))
    ppl.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)


@ppl.gen
def flow_guide(params, x):
    base = dist.Normal(params["loc"], jnp.exp(params["log_scale"])).to_event(1)
    planar = flows.PlanarTransform(params["u"], params["w"], params["b"])
    radial = flows.RadialTransform(params["z0"], params["a"], params["c"])
    ppl.sample("z", dist.TransformedDistribution(base, [planar, radial]))


def flow_gradients(objective, params, n, seed=0):
    return jax.jit(jax.vmap(lambda k: objective.grad_estimate(k, params, X2)))(keys(n, seed))


def test_the_flows_are_bijections_with_their_log_determinants():
    z = jax.random.normal(jax.random.key(0), (20, 2)) * 2
    p = FLOW_OFF
    for flow in (flows.PlanarTransform(p["u"], p["w"], p["b"]), flows.RadialTransform(p["z0"], p["a"], p["c"])):
        y = flow(z)
        np.testing.assert_allclose(flow.inv(y), z, atol=1e-5)
        jacobians = jax.vmap(jax.jacfwd(flow))(z)
        np.testing.assert_allclose(flow.log_abs_det_jacobian(z, y), jnp.linalg.slogdet(jacobians)[1], atol=1e-5)
        inverse_jacobians = jax.vmap(jax.jacfwd(flow.inv))(y)  # the planar inverse's derivative is implicit
        np.testing.assert_allclose(inverse_jacobians @ jacobians, jnp.broadcast_to(jnp.eye(2), (20, 2, 2)), atol=1e-4)


def test_stl_gradients_of_a_flow_guide_are_unbiased_and_vanish_at_the_exact_posterior():
    stl, elbo = objectives.stl(model_2d, flow_guide), objectives.elbo(model_2d, flow_guide)
    g_stl, g_elbo = flow_gradients(stl, FLOW_OFF, 20_000), flow_gradients(elbo, FLOW_OFF, 20_000, seed=1)
    for name in FLOW_OFF:
        (m_s, se_s), (m_e, se_e) = mean_and_stderr(g_stl[name]), mean_and_stderr(g_elbo[name])
        assert np.all(np.abs(m_s - m_e) <= 5 * np.hypot(se_s, se_e) + 1e-6), (name, m_s, m_e)
    assert np.abs(mean_and_stderr(g_stl["u"])[0]).max() > 0.1  # a real gradient away from the posterior
    at_stl, at_elbo = flow_gradients(stl, FLOW_AT_POSTERIOR, 500), flow_gradients(elbo, FLOW_AT_POSTERIOR, 500)
    for name in FLOW_OFF:
        np.testing.assert_allclose(at_stl[name], 0.0, atol=1e-4, err_msg=name)  # zero variance: every estimate 0
    assert np.std(np.asarray(at_elbo["loc"])) > 0.1  # negative control: the ELBO's score term is noise
