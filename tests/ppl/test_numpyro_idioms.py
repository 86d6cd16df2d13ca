"""What a NumPyro user writes first (issue 13): improper priors, `obs=None`, autoguides for models
without parameters, flow guides, auxiliary guide sites, FIVO's resampling gradients."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import keys, mean_and_stderr, within_stderr
from numpyro.distributions import constraints
from numpyro.distributions.flows import InverseAutoregressiveTransform
from numpyro.nn import AutoregressiveNN

import ppl
from ppl import dist

KEY = jax.random.key(0)
X = jnp.array([1.0, 2.0, 0.5])


# -- ImproperUniform ----------------------------------------------------------------------------


@ppl.gen
def improper_model(params, x):
    mu = ppl.sample("mu", dist.ImproperUniform(constraints.real, (), ()))
    ppl.sample("x", dist.Normal(mu, 1.0).expand(x.shape), obs=x)


def test_improper_uniform_scores_given_values():
    log_p, _ = improper_model.assess({"mu": 0.3}, None, X)
    np.testing.assert_allclose(log_p, dist.Normal(0.3, 1.0).log_prob(X).sum(), rtol=1e-6)


def _elbo_of_normal_guide(loc, scale, x):
    """The ELBO of q = Normal(loc, scale) for `improper_model` (flat prior: log p = the likelihood)."""
    expected_log_lik = jnp.sum(dist.Normal(loc, 1.0).log_prob(x)) - 0.5 * x.shape[0] * scale**2
    return expected_log_lik + dist.Normal(loc, scale).entropy()


def test_improper_uniform_site_in_an_elbo_with_a_guide():
    @ppl.gen
    def guide(params, x):
        ppl.sample("mu", dist.Normal(params["loc"], 0.5))

    objective = ppl.objectives.elbo(improper_model, guide)
    params = {"loc": jnp.array(0.2)}
    values, grads = jax.vmap(lambda k: objective.value_and_grad_estimate(k, params, X))(keys(2000))
    exact, exact_grad = jax.value_and_grad(_elbo_of_normal_guide)(params["loc"], 0.5, X)
    assert within_stderr(values, exact) and within_stderr(grads["loc"], exact_grad)


def test_drawing_an_improper_uniform_names_the_address_and_the_remedy():
    with pytest.raises(NotImplementedError, match=r"site 'mu' cannot be drawn.*ImproperUniform.*obs=.*guide"):
        improper_model.simulate(KEY, None, X)

    @ppl.gen
    def improper_guide(params, x):
        ppl.sample("mu", dist.ImproperUniform(constraints.real, (), ()))

    with pytest.raises(NotImplementedError, match="site 'mu' cannot be drawn"):
        ppl.objectives.elbo(improper_model, improper_guide).estimate(KEY, {}, X)


def test_autoguide_starts_an_improper_site_at_zero():
    guide, params = ppl.autoguide.mean_field(improper_model, {}, X, init_scale=0.5)
    assert float(params["mu"]["loc"]) == 0.0
    values = jax.vmap(lambda k: ppl.objectives.elbo(improper_model, guide).estimate(k, params, X))(keys(2000))
    assert within_stderr(values, _elbo_of_normal_guide(0.0, 0.5, X))


# -- obs=None -----------------------------------------------------------------------------------


@ppl.gen
def regression(params, x, y):
    w = ppl.sample("w", dist.Normal(0.0, 1.0))
    with ppl.plate("data", x.shape[0]):
        ppl.sample("y", dist.Normal(w * x, 0.5), obs=y)


def test_obs_none_is_an_unobserved_site():
    x = jnp.array([1.0, -2.0])
    trace = regression.simulate(KEY, None, x, None)
    assert set(trace.choices) == {"w", "y"}
    log_p, _ = regression.assess(trace.choices, None, x, None)
    np.testing.assert_allclose(log_p, trace.score, rtol=1e-6)
    with pytest.raises(KeyError, match="no value for address 'y'"):
        regression.assess({"w": 0.0}, None, x, None)


@pytest.mark.parametrize("autoguide", [ppl.autoguide.mean_field, ppl.autoguide.full_rank, ppl.autoguide.delta])
def test_predictive_with_none_for_the_observation(autoguide):
    x, y = jnp.linspace(-1.0, 1.0, 8), 2.0 * jnp.linspace(-1.0, 1.0, 8)
    guide, params = autoguide(regression, {}, x, y)
    loc, scale = 1.5, 0.2
    if autoguide is ppl.autoguide.full_rank:
        params = {"loc": jnp.array([loc]), "log_diag": jnp.log(jnp.array([scale])), "lower": jnp.zeros((1, 1))}
    elif autoguide is ppl.autoguide.delta:
        params, scale = {"w": {"loc": jnp.array(loc)}}, 0.0
    else:
        params = {"w": {"loc": jnp.array(loc), "log_scale": jnp.log(jnp.array(scale))}}
    x_new = jnp.array([-3.0, 0.0, 4.0])
    draws = ppl.predictive(regression, guide, num_samples=4000)(KEY, params, x_new, None)
    assert draws["y"].shape == (4000, 3)
    mean, se = mean_and_stderr(draws["y"])
    assert np.all(np.abs(mean - loc * np.asarray(x_new)) < 5 * se)
    std = np.asarray(draws["y"]).std(0)
    np.testing.assert_allclose(std, np.sqrt(scale**2 * np.asarray(x_new) ** 2 + 0.25), rtol=0.1)


# -- models without a params argument -----------------------------------------------------------


@ppl.gen
def paramless(x, y):
    w = ppl.sample("w", dist.Normal(0.0, 1.0))
    ppl.sample("y", dist.Normal(w * x, 0.5), obs=y)


CONVENTION = r"paramless\(x, y\) cannot be called with these 3 argument\(s\).*model\(params, \*args\)"


def test_autoguide_for_a_model_without_params_says_what_signature_is_expected():
    x, y = jnp.array([1.0, 2.0]), jnp.array([2.0, 4.0])
    with pytest.raises(TypeError, match=CONVENTION):  # built as the docs say: (params, x, y)
        ppl.autoguide.mean_field(paramless, {}, x, y)
    guide, params = ppl.autoguide.mean_field(paramless, x, y)  # built with the model's own arguments
    with pytest.raises(TypeError, match=CONVENTION):
        ppl.objectives.elbo(paramless, guide).estimate(KEY, params, x, y)


# -- flows (an inverse autoregressive flow, as NumPyro's AutoIAFNormal) --------------------------

SIGMA = 0.5  # x ~ Normal(z_1 + z_2, SIGMA) with z ~ Normal(0, I): the posterior has correlation -0.8
ARN_INIT, ARN_APPLY = AutoregressiveNN(2, [8], permutation=jnp.arange(2), skip_connections=True)
STD_NORMAL_2D = dist.Normal(0.0, 1.0).expand((2,)).to_event(1)


@ppl.gen
def sum_model(params, x):
    z = ppl.sample("z", STD_NORMAL_2D)
    ppl.sample("x", dist.Normal(z.sum(), SIGMA), obs=x)


def iaf(params):
    arn = lambda u: ARN_APPLY(params["arn"], u)  # closes over traced parameters
    return dist.TransformedDistribution(STD_NORMAL_2D, InverseAutoregressiveTransform(arn))


@ppl.gen
def iaf_guide(params, x):
    ppl.sample("z", iaf(params))


def _iaf_params():
    return {"arn": ARN_INIT(jax.random.key(1), (2,))[1]}


def test_flow_site_log_density_is_numpyros():
    params, z = _iaf_params(), jnp.array([0.3, -1.2])
    log_q, _ = iaf_guide.assess({"z": z}, params, 1.0)
    np.testing.assert_allclose(log_q, iaf(params).log_prob(z), rtol=1e-5)


def test_flow_guide_reparam_gradient_is_unbiased():
    params, x = _iaf_params(), jnp.array(1.0)
    objective = ppl.objectives.elbo(sum_model, iaf_guide)
    grads = jax.jit(jax.vmap(lambda k: objective.grad_estimate(k, params, x)))(keys(2000))

    def reference(params, us):  # the same ELBO, reparameterized by hand through the base draws u
        t = InverseAutoregressiveTransform(lambda u: ARN_APPLY(params["arn"], u))

        def log_weight(u):
            z, log_scale = t.call_with_intermediates(u)
            log_q = STD_NORMAL_2D.log_prob(u) - t.log_abs_det_jacobian(u, z, log_scale)
            return STD_NORMAL_2D.log_prob(z) + dist.Normal(z.sum(), SIGMA).log_prob(x) - log_q

        return jnp.mean(jax.vmap(log_weight)(us))

    us = jax.random.normal(jax.random.key(7), (200_000, 2))
    exact = jax.grad(reference)(params, us)
    flat, flat_exact = jax.tree.leaves(grads), jax.tree.leaves(exact)
    assert any(np.abs(g).max() > 1e-2 for g in flat_exact)  # the flow's parameters get gradients
    for g, e in zip(flat, flat_exact):
        mean, se = mean_and_stderr(g)
        assert np.all(np.abs(mean - e) <= 5 * se * math.sqrt(1 + 2000 / 200_000) + 1e-6)


def test_flow_guide_fits_a_correlated_posterior():
    x = jnp.array(1.0)
    objective = ppl.objectives.elbo(sum_model, iaf_guide)
    optimizer = optax.adam(optax.cosine_decay_schedule(2e-2, 4000))
    params, _ = ppl.fit(objective, _iaf_params(), x, optimizer=optimizer, steps=4000, key=KEY)
    precision = jnp.eye(2) + jnp.ones((2, 2)) / SIGMA**2
    cov = jnp.linalg.inv(precision)
    mean = cov @ jnp.ones(2) * x / SIGMA**2
    log_evidence = dist.Normal(0.0, math.sqrt(2 + SIGMA**2)).log_prob(x)

    elbos = jax.jit(jax.vmap(lambda k: objective.estimate(k, params, x)))(keys(20_000, seed=5))
    elbo, se = mean_and_stderr(elbos)
    # KL(q || p) > 0 keeps a gap; the best mean-field guide's is 0.5 log(25 / 9) = 0.51 nats
    assert -5 * se < log_evidence - elbo < 0.01
    z = np.asarray(ppl.predictive(sum_model, iaf_guide, num_samples=20_000)(KEY, params, x)["z"])
    np.testing.assert_allclose(z.mean(0), mean, atol=0.03)
    np.testing.assert_allclose(np.cov(z.T), cov, atol=0.03)


# -- auxiliary guide sites ----------------------------------------------------------------------

MU0, SIGMA0, X_OBS = 0.3, 0.8, 1.1  # z ~ LogNormal(MU0, SIGMA0), x ~ Normal(log z, 1)


@ppl.gen
def lognormal_model(params, x):
    z = ppl.sample("z", dist.LogNormal(MU0, SIGMA0))
    ppl.sample("x", dist.Normal(jnp.log(z), 1.0), obs=x)


@ppl.gen
def latent_guide(params, x):
    """An AutoContinuous-style guide: an auxiliary latent u, and z = exp(u) as a Delta whose log
    density is the log-Jacobian term, so that log q(u) + log Delta = log q(z)."""
    u = ppl.sample("_latent", dist.Normal(params["m"], jnp.exp(params["log_s"])), aux=True)
    ppl.sample("z", dist.Delta(jnp.exp(u), log_density=-u))


def _lognormal_elbo(params):
    """The ELBO of q(z) = LogNormal(m, s) for `lognormal_model`, in closed form."""
    m, s = params["m"], jnp.exp(params["log_s"])
    log_2pi = math.log(2 * math.pi)
    log_prior = -m - math.log(SIGMA0) - 0.5 * log_2pi - (s**2 + (m - MU0) ** 2) / (2 * SIGMA0**2)
    log_lik = -0.5 * log_2pi - 0.5 * ((X_OBS - m) ** 2 + s**2)
    entropy = m + 0.5 + jnp.log(s) + 0.5 * log_2pi
    return log_prior + log_lik + entropy


def test_auxiliary_guide_site_gives_the_elbo_of_its_marginal():
    params = {"m": jnp.array(0.2), "log_s": jnp.array(-0.5)}
    objective = ppl.objectives.elbo(lognormal_model, latent_guide)
    values, grads = jax.vmap(lambda k: objective.value_and_grad_estimate(k, params, X_OBS))(keys(4000))
    exact, exact_grads = jax.value_and_grad(_lognormal_elbo)(params)
    assert within_stderr(values, exact)
    assert within_stderr(grads["m"], exact_grads["m"]) and within_stderr(grads["log_s"], exact_grads["log_s"])


def test_auxiliary_choices_are_marked_and_skipped_only_where_the_program_lacks_them():
    params = {"m": jnp.array(0.2), "log_s": jnp.array(-0.5)}
    choices = latent_guide.simulate(KEY, params, X_OBS).choices
    assert choices.aux == {("_latent",)}
    assert (choices | {"x": 1.0}).aux == choices.aux  # merges and pytree maps keep the marks
    assert jax.tree.map(lambda v: v, choices).aux == choices.aux
    log_p, _ = lognormal_model.assess(choices, params, X_OBS)
    np.testing.assert_allclose(log_p, lognormal_model.assess({"z": choices["z"]}, params, X_OBS)[0])
    log_q, _ = latent_guide.assess(choices, params, X_OBS)  # the guide has the site: it is read
    np.testing.assert_allclose(log_q, latent_guide.simulate(KEY, params, X_OBS).score, rtol=1e-6)
    with pytest.raises(KeyError, match="unknown address '_latent'"):  # undeclared: still an error
        lognormal_model.assess(dict(choices), params, X_OBS)

    @ppl.gen
    def undeclared(params, x):
        u = ppl.sample("_latent", dist.Normal(params["m"], jnp.exp(params["log_s"])))
        ppl.sample("z", dist.Delta(jnp.exp(u), log_density=-u))

    with pytest.raises(KeyError, match="unknown address '_latent'"):
        ppl.objectives.elbo(lognormal_model, undeclared).estimate(KEY, params, X_OBS)
    with pytest.raises(TypeError, match="observed site 'y' has no auxiliary role"):
        ppl.gen(lambda: ppl.sample("y", dist.Normal(0.0, 1.0), obs=0.0, aux=True)).simulate(KEY)


# -- FIVO's resampling gradients ----------------------------------------------------------------

A_SSM, SX_SSM = 0.8, 0.5


@ppl.gen
def ssm_step(params, z_prev, x_t):
    z = ppl.sample("z", dist.Normal(A_SSM * z_prev, 1.0))
    ppl.sample("x", dist.Normal(z, SX_SSM), obs=x_t)
    return z


def _proposal_loc_scale(params, z_prev, x_t):
    return params["w"] * A_SSM * z_prev + params["v"] * x_t, jnp.exp(params["s"])


@ppl.gen
def ssm_proposal(params, z_prev, x_t):
    ppl.sample("z", dist.Normal(*_proposal_loc_scale(params, z_prev, x_t)))


def _fivo_given_noise(params, xs, eps):
    """E[log Z_hat] over the ancestors, enumerated exactly, given the proposals' standard normal
    noise eps (T, N): a deterministic function of params whose gradient, averaged over eps, is
    the gradient of the FIVO bound."""
    num = eps.shape[1]
    configs = jnp.array(list(itertools.product(range(num), repeat=num)))  # every ancestor vector

    def expected_from(t, states):
        loc, scale = _proposal_loc_scale(params, states, xs[t])
        z = loc + scale * eps[t]
        log_w = (
            dist.Normal(A_SSM * states, 1.0).log_prob(z)
            + dist.Normal(z, SX_SSM).log_prob(xs[t])
            - dist.Normal(loc, scale).log_prob(z)
        )
        increment = jax.nn.logsumexp(log_w) - math.log(num)
        if t == xs.shape[0] - 1:
            return increment
        probs = jnp.exp(jnp.sum(jax.nn.log_softmax(log_w)[configs], axis=-1))
        return increment + jnp.sum(probs * jnp.stack([expected_from(t + 1, z[c]) for c in configs]))

    return expected_from(0, jnp.zeros(num))


def test_fivo_resampling_gradients_are_unbiased():
    xs, params, n = 1.5 * jax.random.normal(jax.random.key(1), (3,)), {"w": 0.5, "v": 0.3, "s": -0.3}, 20_000
    eps = jax.random.normal(jax.random.key(2), (n, 3, 2))
    exact = jax.jit(jax.vmap(jax.grad(_fivo_given_noise), in_axes=(None, None, 0)))(params, xs, eps)

    def z_scores(resampling_gradients):
        objective = ppl.objectives.fivo(ssm_step, ssm_proposal, jnp.zeros(()), 2, resampling_gradients)
        grads = jax.jit(jax.vmap(lambda k: objective.grad_estimate(k, params, xs)))(keys(n, seed=3))
        scores = []
        for name in params:
            (mean, se), (ref, ref_se) = mean_and_stderr(grads[name]), mean_and_stderr(exact[name])
            scores.append(abs(mean - ref) / math.sqrt(se**2 + ref_se**2))
        return np.array(scores)

    assert np.all(z_scores(True) < 5)
    assert np.any(z_scores(False) > 5)  # the default drops the resampling term: biased, and seen to be
