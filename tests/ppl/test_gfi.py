"""The generative-function interface on small models, against log densities computed by hand with
NumPyro; choice maps; traces; `with_estimators`."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import keys

import ppl
from ppl import dist
from ppl.choicemap import flatten_choices, nest_choices

MEANS = jnp.array([-2.0, 0.0, 3.0])


N_FLIPS = 5


@ppl.gen
def beta_bernoulli():
    p = ppl.sample("p", dist.Beta(2.0, 3.0))
    ppl.sample("flips", dist.Bernoulli(probs=p).expand((N_FLIPS,)))
    return p


@jax.jit
def beta_bernoulli_lp(p, flips):
    return dist.Beta(2.0, 3.0).log_prob(p) + jnp.sum(dist.Bernoulli(probs=p).log_prob(flips))


@ppl.gen
def mixture(scale):
    w = ppl.sample("w", dist.Dirichlet(jnp.array([1.0, 2.0, 3.0])))
    k = ppl.sample("k", dist.Categorical(probs=w))
    x = ppl.sample("x", dist.Normal(MEANS[k], scale))
    return x - MEANS[k]


@jax.jit
def mixture_lp(w, k, x, scale):
    return (
        dist.Dirichlet(jnp.array([1.0, 2.0, 3.0])).log_prob(w)
        + dist.Categorical(probs=w).log_prob(k)
        + dist.Normal(MEANS[k], scale).log_prob(x)
    )


@ppl.gen
def regression(xs):
    slope = ppl.sample("slope", dist.Normal(0.0, 1.0))
    params = {
        "intercept": ppl.sample("intercept", dist.Normal(0.0, 2.0)),
        "noise": ppl.sample("noise", dist.Gamma(2.0, 2.0)),
    }
    ppl.sample("y", dist.Normal(slope * xs + params["intercept"], params["noise"]))
    return slope * xs + params["intercept"], params


@jax.jit
def regression_lp(c, xs):
    return (
        dist.Normal(0.0, 1.0).log_prob(c["slope"])
        + dist.Normal(0.0, 2.0).log_prob(c["intercept"])
        + dist.Gamma(2.0, 2.0).log_prob(c["noise"])
        + jnp.sum(dist.Normal(c["slope"] * xs + c["intercept"], c["noise"]).log_prob(c["y"]))
    )


XS = jnp.array([-1.0, 0.0, 0.5, 2.0])


# -- simulate ---------------------------------------------------------------------------------------


def test_simulate_trace_fields():
    trace = jax.jit(regression.simulate)(jax.random.key(0), XS)
    assert isinstance(trace, ppl.Trace) and trace._fields == ("choices", "score", "retval", "args")
    assert isinstance(trace.choices, ppl.ChoiceMap)
    assert set(trace.choices) == {"slope", "intercept", "noise", "y"}
    assert trace.choices["y"].shape == (4,) and trace.choices["slope"].shape == ()
    np.testing.assert_allclose(trace.score, regression_lp(trace.choices, XS), rtol=1e-5)
    mean, params = trace.retval
    np.testing.assert_allclose(mean, trace.choices["slope"] * XS + trace.choices["intercept"], rtol=1e-6)
    assert set(params) == {"intercept", "noise"} and params["noise"] == trace.choices["noise"]
    np.testing.assert_array_equal(trace.args[0], XS)


def test_simulate_matches_hand_densities():
    bb = jax.jit(jax.vmap(beta_bernoulli.simulate))(keys(6))
    assert bb.choices["flips"].shape == (6, 5) and bb.choices["flips"].dtype == jnp.int32
    np.testing.assert_allclose(bb.score, jax.vmap(beta_bernoulli_lp)(bb.choices["p"], bb.choices["flips"]), rtol=1e-5)
    np.testing.assert_array_equal(bb.retval, bb.choices["p"])
    mx = jax.jit(jax.vmap(lambda k: mixture.simulate(k, 0.5)))(keys(6))
    c = mx.choices
    np.testing.assert_allclose(mx.score, jax.vmap(mixture_lp, (0, 0, 0, None))(c["w"], c["k"], c["x"], 0.5), rtol=1e-5)


def test_simulate_is_deterministic_in_the_key_and_varies_across_keys():
    k3, k4 = jax.random.key(3), jax.random.key(4)
    traces = jax.jit(jax.vmap(regression.simulate, (0, None)))(jnp.stack([k3, k3, k4]), XS)
    slope, y = traces.choices["slope"], traces.choices["y"]
    assert slope[0] == slope[1] and np.all(y[0] == y[1])
    assert slope[0] != slope[2] and np.all(y[0] != y[2])


def test_simulate_draws_from_the_prior():
    traces = jax.jit(jax.vmap(beta_bernoulli.simulate))(keys(4000))
    p, flips = np.asarray(traces.choices["p"]), np.asarray(traces.choices["flips"])
    assert abs(p.mean() - 0.4) < 5 * p.std() / math.sqrt(len(p))
    assert abs(flips.mean() - 0.4) < 5 * flips.std() / math.sqrt(flips.size) * 2  # flips within a trace correlate


# -- assess -----------------------------------------------------------------------------------------


def test_assess_matches_hand_densities():
    """(atol: the float32 log densities sum terms of size ~5 to totals near 0.)"""
    choices = {"slope": 0.3, "intercept": -1.0, "noise": 0.7, "y": jnp.array([0.1, -0.9, 0.0, 1.2])}
    score, (mean, params) = jax.jit(regression.assess)(choices, XS)
    np.testing.assert_allclose(score, regression_lp(choices, XS), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mean, 0.3 * XS - 1.0, rtol=1e-6)
    flips = jnp.array([1, 0, 0, 1, 1])
    score, _ = beta_bernoulli.assess({"p": 0.2, "flips": flips})
    np.testing.assert_allclose(score, beta_bernoulli_lp(0.2, flips), rtol=1e-5)
    score, retval = mixture.assess({"w": jnp.array([0.2, 0.3, 0.5]), "k": 2, "x": 2.5}, 0.5)
    np.testing.assert_allclose(score, mixture_lp(jnp.array([0.2, 0.3, 0.5]), 2, 2.5, 0.5), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(retval, -0.5)


# -- generate ---------------------------------------------------------------------------------------


def test_generate_weight_is_the_density_of_the_constrained_sites():
    y = jnp.array([0.1, -0.9, 0.0, 1.2])
    trace, weight = jax.jit(regression.generate)(jax.random.key(1), {"y": y, "noise": 0.4}, XS)
    c = trace.choices
    np.testing.assert_array_equal(c["y"], y)
    assert c["noise"] == np.float32(0.4)
    expected = dist.Gamma(2.0, 2.0).log_prob(0.4) + jnp.sum(
        dist.Normal(c["slope"] * XS + c["intercept"], 0.4).log_prob(y)
    )
    np.testing.assert_allclose(weight, expected, rtol=1e-5)
    np.testing.assert_allclose(trace.score, regression_lp(c, XS), rtol=1e-5)


def test_generate_without_constraints_is_simulate_and_fully_constrained_is_assess():
    trace, weight = regression.generate(jax.random.key(2), {}, XS)
    assert weight == 0.0
    np.testing.assert_allclose(trace.score, regression_lp(trace.choices, XS), rtol=1e-5)
    full, weight = regression.generate(jax.random.key(9), trace.choices, XS)
    np.testing.assert_allclose(weight, trace.score, rtol=1e-6)
    np.testing.assert_allclose(full.score, trace.score, rtol=1e-6)
    jax.tree.map(np.testing.assert_array_equal, full.choices, trace.choices)


def test_generate_is_an_importance_sampler():
    """mu ~ N(0, 2), x_i ~ N(mu, 1): with x constrained, generate draws mu from the prior and weighs it
    by the likelihood, so mean(w) estimates the evidence and the weighted mean of mu the posterior mean."""

    @ppl.gen
    def conjugate(x):
        mu = ppl.sample("mu", dist.Normal(0.0, 2.0))
        ppl.sample("x", dist.Normal(mu, 1.0).expand(x.shape))

    x = jnp.array([0.8, 1.5, 1.1])
    traces, log_w = jax.jit(jax.vmap(lambda k: conjugate.generate(k, {"x": x}, x)))(keys(20_000))
    log_evidence = dist.MultivariateNormal(jnp.zeros(3), jnp.eye(3) + 4.0).log_prob(x)
    log_w = np.asarray(log_w, np.float64)
    w = np.exp(log_w - log_w.max())
    assert abs(np.log(w.mean()) + log_w.max() - log_evidence) < 0.02
    posterior_mean = float(jnp.sum(x) / (3 + 0.25))
    assert abs(np.sum(w * np.asarray(traces.choices["mu"])) / w.sum() - posterior_mean) < 0.02


def test_addresses():
    found = regression.addresses(XS)
    assert found[("y",)][0] == (4,) and set(found) == {("slope",), ("intercept",), ("noise",), ("y",)}


# -- choice maps -------------------------------------------------------------------------------------


def test_choicemap_deep_merge():
    left = ppl.ChoiceMap({"a": {"b": 1, "c": 2}, "x": 0})
    right = {"a": {"c": 3, "d": {"e": 4}}, "y": 5}
    merged = left | right
    assert merged == {"a": {"b": 1, "c": 3, "d": {"e": 4}}, "x": 0, "y": 5}
    assert isinstance(merged, ppl.ChoiceMap) and isinstance(merged["a"], ppl.ChoiceMap)
    assert left == {"a": {"b": 1, "c": 2}, "x": 0}  # operands unchanged
    # A plain dict on the left merges deeply too; the right-hand side wins.
    merged = {"a": {"b": 10, "z": 0}} | ppl.ChoiceMap({"a": {"b": 1}})
    assert merged == {"a": {"b": 1, "z": 0}} and isinstance(merged, ppl.ChoiceMap)
    # A leaf replaces a sub-map and vice versa.
    assert (ppl.ChoiceMap({"a": {"b": 1}}) | {"a": 7}) == {"a": 7}
    assert (ppl.ChoiceMap({"a": 7}) | {"a": {"b": 1}}) == {"a": {"b": 1}}


def test_choicemap_is_a_pytree_and_flattens_to_addresses():
    cm = ppl.ChoiceMap({"z": jnp.ones(2), "enc": {"h": jnp.zeros(3)}})
    doubled = jax.tree.map(lambda v: 2 * v, cm)
    assert isinstance(doubled, ppl.ChoiceMap)
    np.testing.assert_array_equal(doubled["z"], [2.0, 2.0])
    jitted = jax.jit(lambda c: c)(cm)
    assert set(jitted) == {"z", "enc"} and jitted["enc"]["h"].shape == (3,)
    flat = flatten_choices(cm)
    assert set(flat) == {("z",), ("enc", "h")}
    assert nest_choices(flat) == cm


def test_merged_choices_feed_assess():
    trace = mixture.simulate(jax.random.key(0), 0.5)
    latent = ppl.ChoiceMap({"w": trace.choices["w"], "k": trace.choices["k"]})
    score, _ = mixture.assess(latent | {"x": 1.0}, 0.5)
    np.testing.assert_allclose(score, mixture_lp(trace.choices["w"], trace.choices["k"], 1.0, 0.5), rtol=1e-5)


# -- with_estimators ---------------------------------------------------------------------------------


@ppl.gen
def coin(q):
    return ppl.sample("b", dist.Bernoulli(probs=q))


def kl_to_quarter(guide):
    @ppl.expectation
    def kl(q):
        choices, log_q = ppl.sim(guide)(q)
        return log_q - dist.Bernoulli(probs=0.25).log_prob(choices["b"])

    return kl


def test_with_estimators_enum_gives_exact_gradients():
    """d/dq KL(Bernoulli(q) || Bernoulli(0.25)) at q = 0.5 is log 3. The default estimator for a
    Bernoulli (REINFORCE) is noisy; switched to enum, every estimate is exact."""
    grad = lambda objective: jax.jit(jax.vmap(lambda k: objective.grad_estimate(k, 0.5)))(keys(1000))
    noisy = grad(kl_to_quarter(coin))
    assert np.std(noisy) > 0.1
    exact = grad(kl_to_quarter(ppl.with_estimators(coin, {"b": ppl.enum()})))
    np.testing.assert_allclose(exact, math.log(3.0), rtol=1e-5)


@pytest.mark.parametrize("spelling", ["nested-dict", "tuple"])
def test_with_estimators_at_a_nested_address(spelling):
    @ppl.gen
    def wrapper(q):
        return ppl.sample("inner", coin, q)

    estimators = {"inner": {"b": ppl.enum()}} if spelling == "nested-dict" else {("inner", "b"): ppl.enum()}
    guide = ppl.with_estimators(wrapper, estimators)

    @ppl.expectation
    def kl(q):
        choices, log_q = ppl.sim(guide)(q)
        return log_q - dist.Bernoulli(probs=0.25).log_prob(choices["inner"]["b"])

    grads = jax.jit(jax.vmap(lambda k: kl.grad_estimate(k, 0.5)))(keys(16))
    np.testing.assert_allclose(grads, math.log(3.0), rtol=1e-5)


def test_with_estimators_keeps_the_model():
    switched = ppl.with_estimators(regression, {"slope": ppl.reinforce(), "noise": ppl.reinforce()})
    a, b = regression.simulate(jax.random.key(5), XS), switched.simulate(jax.random.key(5), XS)
    jax.tree.map(np.testing.assert_array_equal, a.choices, b.choices)
    np.testing.assert_allclose(a.score, b.score)
    np.testing.assert_allclose(switched.assess(a.choices, XS)[0], a.score, rtol=1e-6)
