"""Sample sites inside JAX control flow: vmap, the plate and scan combinators, lax.scan, lax.cond /
lax.switch (also under vmap with a batched predicate), fori_loop, nested jit and nested generative
function calls; both through the generative-function interface and inside `@ppl.expectation`."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import keys, mean_and_stderr, within_stderr
from jax import lax
from scipy import stats

import ppl
from ppl import dist

N_GRAD = 10_000


def grad_samples(objective, *args, n=N_GRAD, seed=0):
    """`n` independent gradient estimates (one per key), vectorized and compiled."""
    return jax.jit(jax.vmap(lambda k: objective.grad_estimate(k, *args)))(keys(n, seed))


def value_samples(objective, *args, n=N_GRAD, seed=0):
    return jax.jit(jax.vmap(lambda k: objective.estimate(k, *args)))(keys(n, seed))


def simulations(model, n, *args, seed=0):
    return jax.jit(jax.vmap(lambda k: model.simulate(k, *args)))(keys(n, seed))


def consistent_traces(model, *args, n=4, seed=0):
    """`n` simulated traces (stacked), checking on each that simulate, assess and generate agree:
    assess(choices) == (score, retval), and generate fully constrained returns weight == score."""

    def check(key):
        trace = model.simulate(key, *args)
        score, retval = model.assess(trace.choices, *args)
        regenerated, weight = model.generate(jax.random.fold_in(key, 1), trace.choices, *args)
        return trace, score, retval, regenerated.score, weight

    trace, score, retval, regenerated_score, weight = jax.jit(jax.vmap(check))(keys(n, seed))
    np.testing.assert_allclose(score, trace.score, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), retval, trace.retval)
    np.testing.assert_allclose(weight, trace.score, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(regenerated_score, trace.score, rtol=1e-5, atol=1e-5)
    return trace


def generate(model, key, constraints, *args):
    return jax.jit(model.generate)(key, constraints, *args)


# Hand-computed log densities, by scipy (an oracle independent of the code under test).
def normal_lp(x, loc, scale):
    return stats.norm.logpdf(np.asarray(x, np.float64), loc, scale)


def gamma_lp(x, concentration, rate):
    return stats.gamma.logpdf(np.asarray(x, np.float64), concentration, scale=1.0 / rate)


# -- jax.vmap: one independent draw per element ------------------------------------------------


@ppl.gen
def vmapped_pair():
    """Four draws per trace: vmap over 2 of a jitted scan of length 2, no operand batched."""

    def one(_):
        body = lambda c, _: (c, ppl.sample("z", dist.Normal(0.0, 1.0)))
        return jax.jit(lambda: lax.scan(body, 0.0, None, length=2)[1])()

    return jax.vmap(one)(jnp.arange(2))


def test_sites_under_vmap_are_independent_draws():
    n = 4000
    traces = simulations(vmapped_pair, n)
    z = np.asarray(traces.choices["z"]).reshape(n, 4)
    np.testing.assert_allclose(z.std(0), 1.0, atol=0.1)  # none collapsed to a constant
    corr = np.corrcoef(z.T)[np.triu_indices(4, 1)]
    assert np.all(np.abs(corr) < 5.0 / math.sqrt(n)), corr
    # Choices and return value hold the same draws; the score is their total log density.
    np.testing.assert_allclose(np.sort(z, 1), np.sort(np.asarray(traces.retval).reshape(n, 4), 1))
    np.testing.assert_allclose(traces.score, np.sum(normal_lp(z, 0.0, 1.0), 1), rtol=1e-5)


def test_two_reparam_sites_draw_independent_noise():
    """E[(a - b)^2] = 2 for independent a, b ~ N(theta, 1); shared noise would give exactly 0.
    The same holds for two elements of one site under vmap."""

    @ppl.expectation
    def two_sites(theta):
        a = ppl.sample("a", dist.Normal(theta, 1.0))
        b = ppl.sample("b", dist.Normal(theta, 1.0))
        return (a - b) ** 2

    @ppl.expectation
    def vmapped_site(theta):
        z = jax.vmap(lambda _: ppl.sample("z", dist.Normal(theta, 1.0)))(jnp.arange(2))
        return (z[0] - z[1]) ** 2

    for objective in (two_sites, vmapped_site):
        values = value_samples(objective, 0.7, n=4000)
        assert np.std(values) > 0.5
        assert within_stderr(values, 2.0)


def test_vmapped_reparam_gradient_is_unbiased():
    theta = jnp.array([0.5, -1.0, 2.0])

    @ppl.expectation
    def objective(theta):
        z = jax.vmap(lambda t: ppl.sample("z", dist.Normal(t, 1.0)))(theta)
        return jnp.sum(z**2) + z[0] * z[1]

    grads = grad_samples(objective, theta)
    # E = sum(theta^2 + 1) + theta0 theta1
    assert within_stderr(grads, 2 * theta + jnp.array([theta[1], theta[0], 0.0]))


# -- ppl.vmap: a plate --------------------------------------------------------------------------


@ppl.gen
def point(mu, scale):
    return ppl.sample("x", dist.Normal(mu, scale))


@ppl.gen
def plate_model(scales):
    mu = ppl.sample("mu", dist.Normal(0.0, 2.0))
    return ppl.vmap(point, in_axes=(None, 0))(mu, scales)


def test_plate_gfi_matches_hand_density():
    scales = jnp.array([0.5, 1.0, 2.0])
    trace = consistent_traces(plate_model, scales)
    mu, x = trace.choices["mu"], trace.choices["x"]
    assert x.shape == (4, 3)
    expected = normal_lp(mu, 0.0, 2.0) + np.sum(normal_lp(x, np.asarray(mu)[:, None], scales), 1)
    np.testing.assert_allclose(trace.score, expected, rtol=1e-5)
    data = jnp.array([0.3, -1.2, 2.5])
    constrained, weight = generate(plate_model, jax.random.key(3), {"x": data}, scales)
    np.testing.assert_allclose(weight, np.sum(normal_lp(data, constrained.choices["mu"], scales)), rtol=1e-5)
    np.testing.assert_array_equal(constrained.choices["x"], data)


@pytest.mark.parametrize("estimator", [ppl.reparam(), ppl.reinforce()], ids=["reparam", "reinforce"])
def test_plate_gradient_is_unbiased(estimator):
    plate = ppl.vmap(ppl.with_estimators(point, {"x": estimator}), in_axes=(0, None))

    @ppl.expectation
    def objective(theta):
        choices, _ = ppl.sim(plate)(theta, 1.0)
        return jnp.sum(choices["x"] ** 2)

    theta = jnp.array([0.5, -1.0, 0.0])
    assert within_stderr(grad_samples(objective, theta), 2 * theta)


# -- lax.scan and ppl.scan: a state-space model -------------------------------------------------


@ppl.gen
def transition(z, drift):
    z = ppl.sample("z", dist.Normal(0.8 * z + drift, 1.0))
    ppl.sample("y", dist.Normal(z, 0.5))
    return z, z


ssm = ppl.scan(transition)


@ppl.gen
def ssm_by_lax_scan(z0, drifts):
    return lax.scan(transition.fn, z0, drifts)


def ssm_log_density(z0, drifts, z, y):
    total, prev = 0.0, z0
    for t in range(len(drifts)):
        total += normal_lp(z[t], 0.8 * prev + drifts[t], 1.0) + normal_lp(y[t], z[t], 0.5)
        prev = z[t]
    return total


@pytest.mark.parametrize("model", [ssm, ssm_by_lax_scan], ids=["ppl.scan", "lax.scan"])
def test_state_space_model_gfi(model):
    drifts = jnp.array([0.0, 0.5, -0.5, 1.0, 0.0])
    trace = consistent_traces(model, 0.2, drifts)
    z, y = trace.choices["z"], trace.choices["y"]
    assert z.shape == y.shape == (4, 5)
    np.testing.assert_allclose(trace.retval[1], z)
    np.testing.assert_allclose(trace.score, ssm_log_density(0.2, drifts, z.T, y.T), rtol=1e-5)
    # Condition on observations: the weight is their log density given the sampled states.
    y_obs = jnp.array([0.1, 0.4, -0.3, 1.5, 0.2])
    constrained, weight = generate(model, jax.random.key(7), {"y": y_obs}, 0.2, drifts)
    np.testing.assert_allclose(weight, np.sum(normal_lp(y_obs, constrained.choices["z"], 0.5)), rtol=1e-5)
    np.testing.assert_allclose(
        constrained.score, ssm_log_density(0.2, drifts, constrained.choices["z"], y_obs), rtol=1e-5
    )


@pytest.mark.parametrize("estimator", [ppl.reparam(), ppl.reinforce()], ids=["reparam", "reinforce"])
def test_scan_gradient_is_unbiased(estimator):
    """x_T = sum of T draws from N(theta, 1): E[x_T^2] = T + T^2 theta^2."""
    T = 4

    @ppl.expectation
    def walk(theta):
        step = lambda c, _: (c + ppl.sample("d", dist.Normal(theta, 1.0), estimator=estimator), None)
        return lax.scan(step, 0.0, None, length=T)[0] ** 2

    assert within_stderr(grad_samples(walk, 0.5), 2 * T**2 * 0.5)


def test_scan_combinator_gradient_through_sim_is_unbiased():
    @ppl.expectation
    def objective(drift):
        choices, _ = ppl.sim(ssm)(0.0, drift * jnp.ones(3))
        return jnp.sum(choices["y"])

    # z_t = 0.8 z_{t-1} + drift + noise: E[sum y] = drift (1 + 1.8 + 2.44)
    assert within_stderr(grad_samples(objective, 0.3), 1 + 1.8 + 2.44)


# -- lax.cond and lax.switch --------------------------------------------------------------------


@ppl.gen
def branching(p):
    b = ppl.sample("b", dist.Bernoulli(probs=p))
    return lax.cond(
        b == 1,
        lambda: ppl.sample("x", dist.Normal(-2.0, 1.0)),
        lambda: ppl.sample("y", dist.Gamma(2.0, 1.0)),
    )


def branching_log_density(p, b, x, y):
    lb = math.log(p if b == 1 else 1 - p)
    return lb + (normal_lp(x, -2.0, 1.0) if b == 1 else gamma_lp(y, 2.0, 1.0))


def test_cond_gfi_scores_only_the_taken_branch():
    traces = consistent_traces(branching, 0.3, n=4000)
    b, x, y = (np.asarray(traces.choices[a]) for a in "bxy")
    assert 0 < b[:8].sum() < 8  # both branches taken
    expected = [branching_log_density(0.3, *bxy) for bxy in zip(b[:8], x, y)]
    np.testing.assert_allclose(traces.score[:8], expected, rtol=1e-5)
    # The other branch's choice is zero, and its value does not matter to assess.
    np.testing.assert_array_equal(np.where(b == 1, y, x), 0.0)
    junk = traces.choices | {"x": np.where(b == 1, x, 123.0), "y": np.where(b == 0, y, 123.0)}
    scores, _ = jax.jit(jax.vmap(lambda c: branching.assess(c, 0.3)))(junk)
    np.testing.assert_allclose(scores, traces.score, rtol=1e-6)
    # Marginals: b ~ Bernoulli(0.3), and the return value is the taken branch's draw.
    assert within_stderr(b, 0.3)
    assert within_stderr(traces.retval, 0.3 * -2.0 + 0.7 * 2.0)
    np.testing.assert_array_equal(traces.retval, np.where(b == 1, x, y))
    _, weight = generate(branching, jax.random.key(0), {"b": 1, "x": 0.3}, 0.3)
    np.testing.assert_allclose(weight, math.log(0.3) + normal_lp(0.3, -2.0, 1.0), rtol=1e-5)
    trace, weight = generate(branching, jax.random.key(0), {"b": 0}, 0.3)
    np.testing.assert_allclose(weight, math.log(0.7), rtol=1e-5)
    assert trace.choices["y"] > 0.0 and trace.choices["x"] == 0.0


@ppl.gen
def switching(probs):
    k = ppl.sample("k", dist.Categorical(probs=probs))
    return lax.switch(
        k,
        [
            lambda: ppl.sample("a", dist.Normal(0.0, 1.0)),
            lambda: ppl.sample("g", dist.Gamma(2.0, 1.0)),
            lambda: 3.0,
        ],
    )


def test_switch_gfi_matches_hand_density():
    probs = np.array([0.2, 0.3, 0.5], np.float32)
    traces = consistent_traces(switching, probs, n=4000)
    k, a, g = (np.asarray(traces.choices[name]) for name in "kag")
    assert len(set(k[:12])) == 3
    branch = [lambda i: normal_lp(a[i], 0.0, 1.0), lambda i: gamma_lp(g[i], 2.0, 1.0), lambda i: 0.0]
    expected = [math.log(probs[k[i]]) + branch[k[i]](i) for i in range(12)]
    np.testing.assert_allclose(traces.score[:12], expected, rtol=1e-5)
    np.testing.assert_allclose(traces.retval, np.choose(k, [a, g, np.full(k.shape, 3.0)]))
    assert within_stderr(k[:, None] == np.arange(3), probs)


def test_cond_gradient_is_unbiased():
    """b ~ Bernoulli(p) (REINFORCE); E = p (theta^2 + 1) + (1 - p) * 1."""

    @ppl.expectation
    def objective(params):
        p, theta = params
        b = ppl.sample("b", dist.Bernoulli(probs=p))
        return lax.cond(
            b == 1,
            lambda: ppl.sample("x", dist.Normal(theta, 1.0)) ** 2,
            lambda: ppl.sample("y", dist.Normal(1.0, 2.0)),
        )

    p, theta = 0.3, 1.5
    grads = grad_samples(objective, jnp.array([p, theta]))
    assert within_stderr(grads, [theta**2, 2 * p * theta])


def test_switch_gradient_is_unbiased():
    """k ~ Categorical(softmax(logits)), branch means m(theta): d/dlogits = pi (m - E)."""

    @ppl.expectation
    def objective(logits, theta):
        k = ppl.sample("k", dist.Categorical(logits=logits))
        return lax.switch(
            k,
            [
                lambda: ppl.sample("a", dist.Normal(theta, 1.0)),
                lambda: ppl.sample("g", dist.Normal(2.0 * theta, 1.0)) ** 2,
                lambda: jnp.asarray(1.0),
            ],
        )

    logits, theta = jnp.array([0.1, -0.3, 0.4]), 0.5
    pi = jax.nn.softmax(logits)
    means = jnp.array([theta, 4 * theta**2 + 1, 1.0])
    grads = jax.jit(jax.vmap(lambda k: objective.grad_estimate(k, logits, theta, argnums=(0, 1))))(keys(N_GRAD))
    assert within_stderr(grads[0], pi * (means - pi @ means))
    assert within_stderr(grads[1], pi[0] + pi[1] * 8 * theta)


# -- fori_loop with static bounds, nested jit ----------------------------------------------------


@ppl.gen
def fori_model(theta):
    return lax.fori_loop(0, 3, lambda i, c: c + ppl.sample("f", dist.Normal(c + theta, 1.0)), 0.0)


def test_fori_loop_gfi():
    trace = consistent_traces(fori_model, 0.5)
    f = trace.choices["f"]
    assert f.shape == (4, 3)
    c, expected = 0.0, 0.0
    for i in range(3):
        expected += normal_lp(f[:, i], c + 0.5, 1.0)
        c = c + f[:, i]
    np.testing.assert_allclose(trace.score, expected, rtol=1e-5)
    np.testing.assert_allclose(trace.retval, c, rtol=1e-5)


def test_fori_loop_gradient_is_unbiased():
    @ppl.expectation
    def objective(theta):
        return lax.fori_loop(0, 3, lambda i, c: c + ppl.sample("f", dist.Normal(theta, 1.0)), 0.0) ** 2

    assert within_stderr(grad_samples(objective, 0.5), 2 * 9 * 0.5)  # E = 3 + 9 theta^2


@ppl.gen
def jitted(theta):
    inner = jax.jit(lambda t: ppl.sample("j", dist.Normal(t, 1.0)) * 2.0)
    return jax.jit(lambda t: inner(t) + ppl.sample("k", dist.Normal(t, 2.0)))(theta)


def test_nested_jit_gfi():
    trace = consistent_traces(jitted, 0.5)
    j, k = trace.choices["j"], trace.choices["k"]
    np.testing.assert_allclose(trace.score, normal_lp(j, 0.5, 1.0) + normal_lp(k, 0.5, 2.0), rtol=1e-5)
    np.testing.assert_allclose(trace.retval, 2 * j + k, rtol=1e-5)


def test_nested_jit_gradient_is_unbiased():
    @ppl.expectation
    def objective(theta):
        choices, _ = ppl.sim(jitted)(theta)
        return jax.jit(lambda c: c["j"] * c["k"])(choices)

    assert within_stderr(grad_samples(objective, 0.5), 2 * 0.5)  # E = theta^2


# -- nested generative functions -----------------------------------------------------------------


@ppl.gen
def encoder(x, scale):
    return ppl.sample("h", dist.Normal(x, scale))


@ppl.gen
def middle(x):
    h = ppl.sample("enc", encoder, x, 1.0)
    return ppl.sample("m", dist.Normal(h, 0.5))


@ppl.gen
def outer(x):
    m = ppl.sample("mid", middle, x)
    inlined = encoder(m, 2.0)  # a direct call: its address joins the caller's
    return ppl.sample("z", dist.Normal(inlined, 1.0))


def test_nested_calls_nest_choices():
    trace = consistent_traces(outer, 1.0)
    c = trace.choices
    assert set(c) == {"mid", "h", "z"} and set(c["mid"]) == {"enc", "m"} and set(c["mid"]["enc"]) == {"h"}
    h1, m, h2, z = c["mid"]["enc"]["h"], c["mid"]["m"], c["h"], c["z"]
    expected = normal_lp(h1, 1.0, 1.0) + normal_lp(m, h1, 0.5) + normal_lp(h2, m, 2.0) + normal_lp(z, h2, 1.0)
    np.testing.assert_allclose(trace.score, expected, rtol=1e-5)
    constrained, weight = generate(outer, jax.random.key(2), {"mid": {"enc": {"h": 0.25}}}, 1.0)
    np.testing.assert_allclose(weight, normal_lp(0.25, 1.0, 1.0), rtol=1e-5)
    assert constrained.choices["mid"]["enc"]["h"] == 0.25


@pytest.mark.parametrize("override", [False, True], ids=["default", "nested-reinforce"])
def test_nested_calls_gradient_is_unbiased(override):
    model = ppl.with_estimators(middle, {"enc": {"h": ppl.reinforce()}}) if override else middle

    @ppl.expectation
    def objective(x):
        choices, _ = ppl.sim(model)(x)
        return choices["enc"]["h"] * choices["m"]

    assert within_stderr(grad_samples(objective, 0.7), 2 * 0.7)  # E = E[h^2] = x^2 + 1


# -- enum / mvd under control flow ----------------------------------------------------------------


def enum_in_cond(estimator):
    @ppl.expectation
    def objective(p, q):
        b = ppl.sample("b", dist.Bernoulli(probs=p), estimator=ppl.enum())
        return lax.cond(
            b == 1,
            lambda: (ppl.sample("k", dist.Bernoulli(probs=q), estimator=estimator) - 0.3) ** 2,
            lambda: 2.0 * ppl.sample("j", dist.Bernoulli(probs=q), estimator=estimator),
        )

    return objective


P, Q = 0.4, 0.7
# E = p (0.49 q + 0.09 (1 - q)) + (1 - p) 2 q
COND_GRAD = (0.09 + 0.4 * Q - 2 * Q, 0.4 * P + 2 * (1 - P))


def test_enum_sites_inside_a_top_level_cond_are_exact():
    objective = enum_in_cond(ppl.enum())
    grads = jax.jit(jax.vmap(lambda k: objective.grad_estimate(k, P, Q, argnums=(0, 1))))(keys(8))
    np.testing.assert_allclose(np.stack(grads, 1), np.tile(COND_GRAD, (8, 1)), rtol=1e-5)


def test_mvd_sites_inside_a_top_level_cond_are_unbiased():
    objective = enum_in_cond(ppl.mvd())
    grads = jax.jit(jax.vmap(lambda k: objective.grad_estimate(k, P, Q, argnums=(0, 1))))(keys(N_GRAD))
    assert np.std(grads[0]) > 0.1  # really stochastic (the MVD derivative of a Bernoulli alone is exact)
    assert within_stderr(np.stack(grads, 1), COND_GRAD)


def test_reinforce_and_reparam_sites_after_an_enumerated_site_are_unbiased():
    # b is enumerated (two worlds); c (REINFORCE) and z (reparam) have parameters that differ between
    # the worlds, so their rules run per world.
    @ppl.expectation
    def objective(p, q, mu):
        b = ppl.sample("b", dist.Bernoulli(probs=p), estimator=ppl.enum())
        c = ppl.sample("c", dist.Bernoulli(logits=q + b), estimator=ppl.reinforce())
        z = ppl.sample("z", dist.Normal(mu + b, 1.0))
        return (b + c - z) ** 2

    def exact(p, q, mu):  # E_z[(b + c - z)^2] = (c - mu)^2 + 1
        total = 0.0
        for b, c in itertools.product((0.0, 1.0), repeat=2):
            pc = jax.nn.sigmoid(q + b)
            total += (p if b else 1 - p) * (pc if c else 1 - pc) * ((c - mu) ** 2 + 1)
        return total

    args = (0.3, -0.4, 0.8)
    grads = jax.jit(jax.vmap(lambda k: objective.grad_estimate(k, *args, argnums=(0, 1, 2))))(keys(N_GRAD))
    exact_grad = jax.grad(exact, argnums=(0, 1, 2))(*args)
    assert np.std(grads[1]) > 0.05 and abs(exact_grad[1]) > 0.05  # the REINFORCE term is really exercised
    assert within_stderr(np.stack(grads, 1), np.asarray(exact_grad))


def flips_in_scan(estimator, length=3):
    @ppl.expectation
    def objective(q):
        def step(c, _):
            flip = ppl.sample("flip", dist.Bernoulli(probs=jax.nn.sigmoid(q + c)), estimator=estimator)
            return c + flip, flip

        total, flips = lax.scan(step, 0.0, None, length=length)
        return jnp.sin(total) + 0.3 * flips[0]

    return objective


def flips_in_scan_exact(q):
    """E[sin(total) + 0.3 flip_0] by summing over all 8 paths."""
    expected = 0.0
    for bits in itertools.product([0, 1], repeat=3):
        c, log_p = 0.0, 0.0
        for b in bits:
            p = jax.nn.sigmoid(q + c)
            log_p += jnp.log(p if b else 1 - p)
            c += b
        expected += jnp.exp(log_p) * (jnp.sin(c) + 0.3 * bits[0])
    return expected


def test_enum_inside_a_scan_is_exact():
    """A top-level scan holding enumerated sites is unrolled: every path is summed exactly."""
    value, grad = flips_in_scan(ppl.enum()).value_and_grad_estimate(jax.random.key(0), 0.2)
    np.testing.assert_allclose(value, flips_in_scan_exact(0.2), rtol=1e-5)
    np.testing.assert_allclose(grad, jax.grad(flips_in_scan_exact)(0.2), rtol=1e-4, atol=1e-6)


def test_mvd_inside_a_scan_is_unbiased():
    objective = flips_in_scan(ppl.mvd())
    grads = jax.jit(jax.vmap(lambda k: objective.grad_estimate(k, 0.2)))(keys(N_GRAD))
    assert np.std(grads) > 0.01
    assert within_stderr(grads, jax.grad(flips_in_scan_exact)(0.2))


def test_non_local_estimator_inside_a_long_scan_names_the_address():
    with pytest.raises(NotImplementedError, match="'flip'.*unrolled up to length 32"):
        flips_in_scan(ppl.enum(), length=40).grad_estimate(jax.random.key(0), 0.5)


def test_non_local_estimator_inside_a_large_vmapped_cond_names_the_address():
    """A vmapped cond with a batched predicate runs as a loop over the batch, which is unrolled for
    non-local estimators only up to 32 elements."""

    @ppl.expectation
    def objective(p, q):
        def one(p):
            b = ppl.sample("b", dist.Bernoulli(probs=p))
            return lax.cond(
                b == 1, lambda: 1.0 * ppl.sample("k", dist.Bernoulli(probs=q), estimator=ppl.enum()), lambda: 0.5
            )

        return jnp.sum(jax.vmap(one)(p))

    with pytest.raises(NotImplementedError, match="'k'.*unrolled up to length 32"):
        objective.grad_estimate(jax.random.key(0), jnp.full(40, 0.3), 0.3)


# -- vmap of a cond with a batched predicate ------------------------------------------------------


@ppl.gen
def coin_then_branch(p):
    b = ppl.sample("b", dist.Bernoulli(probs=p))
    return lax.cond(
        b == 1,
        lambda: ppl.sample("x", dist.Normal(1.0, 1.0)),
        lambda: ppl.sample("y", dist.Normal(-1.0, 2.0)),
    )


plate_of_branches = ppl.vmap(coin_then_branch)
PS = np.array([0.2, 0.5, 0.9], np.float32)


def per_element_density(ps, b, x, y):
    total = 0.0
    for i in range(len(ps)):
        total += math.log(ps[i] if b[i] == 1 else 1 - ps[i])
        total += normal_lp(x[i], 1.0, 1.0) if b[i] == 1 else normal_lp(y[i], -1.0, 2.0)
    return total


def test_vmapped_cond_density_scores_only_taken_branches():
    traces = consistent_traces(plate_of_branches, PS, n=4000)
    b, x, y = (np.asarray(traces.choices[a]) for a in "bxy")
    assert b.shape == x.shape == y.shape == (4000, 3)
    expected = [per_element_density(PS, *bxy) for bxy in zip(b[:6], x, y)]
    np.testing.assert_allclose(traces.score[:6], expected, rtol=1e-5)
    # Values at branches not taken are ignored by assess/density.
    junk = {"b": b, "x": np.where(b == 1, x, 50.0), "y": np.where(b == 0, y, -50.0)}
    scores, _ = jax.jit(jax.vmap(lambda c: plate_of_branches.assess(c, PS)))(junk)
    np.testing.assert_allclose(scores, traces.score, rtol=1e-5)
    # Marginals: each element's coin, and the taken branch's draw.
    assert within_stderr(b, PS)
    np.testing.assert_array_equal(np.where(b == 1, y, x), 0.0)  # untaken branches drew nothing
    assert within_stderr(traces.retval, PS * 1.0 + (1 - PS) * -1.0)
    taken_x, taken_y = x[b == 1], y[b == 0]
    assert abs(taken_x.mean() - 1.0) < 5 * taken_x.std() / math.sqrt(len(taken_x))
    assert abs(taken_y.std() - 2.0) < 0.1
    # By hand, on fixed values.
    b = np.array([1, 0, 1])
    x, y = np.array([0.5, 7.0, 2.0]), np.array([-9.0, 0.3, 4.0])
    score, retval = jax.jit(plate_of_branches.assess)({"b": b, "x": x, "y": y}, PS)
    np.testing.assert_allclose(score, per_element_density(PS, b, x, y), rtol=1e-5)
    np.testing.assert_allclose(retval, [0.5, 0.3, 2.0])


@ppl.gen
def branch_per_element(probs, loc, scale):
    k = ppl.sample("k", dist.Categorical(probs=probs))
    branches = [
        lambda: ppl.sample("a", dist.Normal(loc, scale)),
        lambda: loc,
        lambda: ppl.sample("g", dist.Gamma(2.0, scale)) + loc,
    ]
    return lax.switch(k, branches)


def test_vmapped_switch_with_batched_and_unbatched_operands():
    """Index and `loc` batched, `scale` shared: each element scores only its own branch."""
    model = ppl.vmap(branch_per_element, in_axes=(None, 0, None))
    probs, locs, scale = np.array([0.3, 0.3, 0.4], np.float32), np.array([-1.0, 0.0, 1.0, 2.0], np.float32), 1.5
    trace = consistent_traces(model, probs, locs, scale, n=6)
    k, a, g = (np.asarray(trace.choices[name]) for name in "kag")
    assert k.shape == a.shape == g.shape == (6, 4) and len(set(k.ravel())) == 3
    by_branch = [normal_lp(a, locs, scale), np.zeros_like(a), gamma_lp(np.where(k == 2, g, 1.0), 2.0, scale)]
    expected = np.sum(np.log(probs[k]) + np.choose(k, by_branch), 1)
    np.testing.assert_allclose(trace.score, expected, rtol=1e-5)
    np.testing.assert_allclose(trace.retval, np.choose(k, [a, np.broadcast_to(locs, k.shape), g + locs]), rtol=1e-6)


def test_vmapped_cond_expectation_is_unbiased():
    """E[sum_i out_i^2 + log q] with b_i ~ Bernoulli(p_i) (REINFORCE), out_i ~ N(theta, 1) or N(2, 1).
    Scoring an untaken branch would shift the value by -log N(...) terms."""

    @ppl.gen
    def guide(p, theta):
        def one(p):
            b = ppl.sample("b", dist.Bernoulli(probs=p))
            return lax.cond(
                b == 1,
                lambda: ppl.sample("x", dist.Normal(theta, 1.0)),
                lambda: ppl.sample("y", dist.Normal(2.0, 1.0)),
            )

        return jax.vmap(one)(p)

    @ppl.expectation
    def objective(p, theta):
        c, log_q = ppl.sim(guide)(p, theta)
        out = jnp.where(c["b"] == 1, c["x"], c["y"])
        return jnp.sum(out**2) + log_q

    p, theta = jnp.array([0.3, 0.6]), 0.8
    entropy_normal = 0.5 * math.log(2 * math.pi * math.e)
    exact_value = jnp.sum(p * (theta**2 + 1) + (1 - p) * 5 + p * jnp.log(p) + (1 - p) * jnp.log1p(-p) - entropy_normal)
    grads = jax.jit(jax.vmap(lambda k: objective.value_and_grad_estimate(k, p, theta, argnums=(0, 1))))(keys(N_GRAD))
    values, (dp, dtheta) = grads
    assert within_stderr(values, exact_value)
    assert within_stderr(dp, theta**2 + 1 - 5 + jnp.log(p / (1 - p)))
    assert within_stderr(dtheta, 2 * theta * jnp.sum(p))


# -- negative control -----------------------------------------------------------------------------


def test_a_wrong_exact_gradient_is_rejected():
    """The statistical check has power: the same samples reject a gradient 5% off."""

    @ppl.expectation
    def walk(theta):
        step = lambda c, _: (c + ppl.sample("d", dist.Normal(theta, 1.0)), None)
        return lax.scan(step, 0.0, None, length=4)[0] ** 2

    grads = grad_samples(walk, 0.5)
    assert within_stderr(grads, 16.0)
    assert not within_stderr(grads, 16.0 * 1.15)
    _, se = mean_and_stderr(grads)
    assert 16.0 * 0.15 > 10 * se
