"""Exact marginalization (`ppl.marginal(model, keep, ppl.exact())`, transforms/exact.py): the
marginal density equals brute-force enumeration and hand-written sums (mixtures in plates, hidden
Markov chains of any length, several chains, a plate of sequences), its gradient equals JAX's
gradient of the hand-written sum, it trains, its posterior (marginals, Viterbi) is exact, and what
cannot be summed out is refused by name."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import mean_and_stderr
from jax.scipy.special import logsumexp

import ppl
from models import gmm, hmm
from ppl import dist


def _exact(model, keep=()):
    return ppl.marginal(model, keep=list(keep), algorithm=ppl.exact())


# -- mixtures: a site per datum, in a plate --------------------------------------------------------


def _gmm_by_hand(mu, x):
    prior = jnp.sum(dist.Normal(0.0, gmm.PRIOR_SCALE).log_prob(mu))
    per_point = logsumexp(jnp.log(gmm.WEIGHTS) + dist.Normal(mu, gmm.NOISE).log_prob(x[:, None]), axis=1)
    return prior + jnp.sum(per_point)


@ppl.gen
def gmm_with_plate_context(params, x):
    """The mixture of models/gmm.py, written with NumPyro's plate context manager."""
    mu = ppl.sample("mu", dist.Normal(0.0, gmm.PRIOR_SCALE).expand((gmm.K,)).to_event(1))
    with ppl.plate("data", x.shape[0]):
        z = ppl.sample("z", dist.Categorical(probs=gmm.WEIGHTS))
        ppl.sample("x", dist.Normal(mu[z], gmm.NOISE), obs=x)


MU = jnp.array([-3.0, 0.5, 4.0])
SHIFTS = jnp.array([-1.5, 1.5])  # the two components' offsets in the two-component mixtures below


def test_a_mixture_marginal_equals_brute_force_over_every_assignment():
    x, _ = gmm.make_data(n=5, seed=3)
    assess = jax.jit(lambda z: gmm.model.assess({"mu": MU, "z": z}, None, x)[0])
    brute = logsumexp(jnp.array([assess(jnp.array(z)) for z in itertools.product(range(gmm.K), repeat=5)]))
    for model in (gmm.model, gmm_with_plate_context):
        value = ppl.density(_exact(model, ["mu"]))({"mu": MU}, None, x)
        np.testing.assert_allclose(float(value), float(brute), rtol=1e-6)
    assert abs(float(ppl.density(_exact(gmm.model, ["mu"]))({"mu": MU + 1.0}, None, x)) - float(brute)) > 0.5


def test_a_large_mixture_marginal_and_its_gradient_equal_the_hand_written_sum():
    x, _ = gmm.make_data(n=500, seed=4)
    marginal = _exact(gmm.model, ["mu"])
    ours = jax.jit(jax.value_and_grad(lambda mu, x: ppl.density(marginal)({"mu": mu}, None, x)))
    value, grad = ours(MU, x)
    want, want_grad = jax.value_and_grad(_gmm_by_hand)(MU, x)
    np.testing.assert_allclose(float(value), float(want), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(want_grad), rtol=1e-4, atol=1e-3)
    # the data's gradient too (the sum is differentiable in everything it reads)
    dx = jax.grad(lambda x: ppl.density(marginal)({"mu": MU}, None, x))(x)
    np.testing.assert_allclose(np.asarray(dx), np.asarray(jax.grad(lambda x: _gmm_by_hand(MU, x))(x)), atol=1e-4)


def test_the_marginal_of_a_plate_costs_linear_code_not_k_to_the_n():
    """The staged density has the same number of equations for 10 and 1000 points."""
    marginal = _exact(gmm.model, ["mu"])
    size = lambda n: len(jax.make_jaxpr(lambda x: ppl.density(marginal)({"mu": MU}, None, x))(jnp.zeros(n)).eqns)
    assert size(10) == size(1000)


# -- hidden Markov chains ---------------------------------------------------------------------------


def _three_state_data(t, seed=5):
    return hmm.make_data(t=t, seed=seed, init=hmm.INIT_3, trans=hmm.TRANS_3, means=hmm.MEANS_3)


TRUE_3 = {"init_logits": jnp.log(hmm.INIT_3), "trans_logits": jnp.log(hmm.TRANS_3)}


def test_a_long_chain_log_likelihood_equals_the_hand_written_forward_algorithm():
    x, _ = _three_state_data(1000)
    log_lik = jax.jit(lambda p, x: ppl.density(hmm.exact_marginal(hmm.learned_model))({}, p, x))
    want = hmm.log_marginal(x, hmm.INIT_3, hmm.TRANS_3, hmm.MEANS_3)
    np.testing.assert_allclose(float(log_lik(TRUE_3, x)), float(want), rtol=1e-5)
    # and its gradient in the transition logits is the hand-written one's
    by_hand = lambda p: hmm.log_marginal(
        x, jax.nn.softmax(p["init_logits"]), jax.nn.softmax(p["trans_logits"], -1), hmm.MEANS_3
    )
    grads = jax.grad(log_lik)(TRUE_3, x)
    for name, g in jax.grad(by_hand)(TRUE_3).items():
        np.testing.assert_allclose(np.asarray(grads[name]), np.asarray(g), rtol=1e-3, atol=1e-3)


def test_a_chain_compiles_to_one_loop_whatever_its_length():
    marginal = hmm.exact_marginal()
    size = lambda t: len(jax.make_jaxpr(lambda x: ppl.density(marginal)({}, None, x))(jnp.zeros(t)).eqns)
    assert size(10) == size(10_000)


def test_maximum_likelihood_recovers_the_transition_matrix():
    x, z = _three_state_data(1000)
    init, trans = hmm.fit_transitions(x, steps=300)
    # the standard error of each row's estimate, from the number of visits of the true path
    visits = np.bincount(np.asarray(z[:-1]), minlength=3)[:, None]
    p = np.asarray(hmm.TRANS_3)
    se = np.sqrt(p * (1 - p) / visits)
    assert np.all(np.abs(np.asarray(trans) - p) < 5 * se), (np.asarray(trans), p, se)
    assert not np.all(np.abs(np.full((3, 3), 1 / 3) - p) < 5 * se)  # the uniform start would fail


def test_viterbi_and_marginals_equal_brute_force_on_a_short_chain():
    x, _ = _three_state_data(7, seed=8)
    assess = jax.jit(lambda z: hmm.learned_model.assess({"z": z}, TRUE_3, x)[0])
    paths = jnp.array(list(itertools.product(range(3), repeat=7)))
    log_ps = jax.vmap(assess)(paths)
    weights = jnp.exp(log_ps - logsumexp(log_ps))
    marginal = hmm.exact_marginal(hmm.learned_model)
    np.testing.assert_array_equal(np.asarray(marginal.map({}, TRUE_3, x)["z"]), np.asarray(paths[jnp.argmax(log_ps)]))
    brute = jnp.stack([jnp.sum(weights[:, None] * (paths == s), 0) for s in range(3)], axis=-1)
    np.testing.assert_allclose(np.asarray(marginal.marginals({}, TRUE_3, x)["z"]), np.asarray(brute), atol=1e-5)


@ppl.gen
def factorial_hmm(params, x):
    """Two independent binary chains; x_t ~ N(a_t + 2 b_t, 0.5)."""
    sticky = jnp.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]])
    loose = jnp.array([[0.6, 0.4], [0.3, 0.7], [0.5, 0.5]])

    def step(prev, x_t):
        a = ppl.sample("a", dist.Categorical(probs=sticky[prev[0]]))
        b = ppl.sample("b", dist.Categorical(probs=loose[prev[1]]))
        ppl.sample("x", dist.Normal(a + 2.0 * b, 0.5), obs=x_t)
        return (a, b), None

    jax.lax.scan(step, (jnp.asarray(2), jnp.asarray(2)), x)


def test_a_factorial_chain_sums_the_joint_state_of_both_chains():
    x = jnp.array([0.1, 2.2, 3.1, 0.9])
    assess = jax.jit(lambda a, b: factorial_hmm.assess({"a": a, "b": b}, None, x)[0])
    paths = list(itertools.product(range(2), repeat=4))
    brute = logsumexp(jnp.array([assess(jnp.array(a), jnp.array(b)) for a in paths for b in paths]))
    value = ppl.density(hmm.exact_marginal(factorial_hmm))({}, None, x)
    np.testing.assert_allclose(float(value), float(brute), rtol=1e-6)
    marginals = hmm.exact_marginal(factorial_hmm).marginals({}, None, x)
    assert marginals["a"].shape == (4, 2) and marginals["b"].shape == (4, 2)


@ppl.gen
def sequences(params, xs):
    """Several independent sequences of models/hmm.py's chain, vmapped: one chain per row."""
    jax.vmap(lambda x: hmm.model.fn(params, x))(xs)


def test_a_plate_of_sequences_sums_each_chain_on_its_own():
    xs = jnp.stack([hmm.make_data(t=50, seed=s)[0] for s in range(4)])
    value = ppl.density(hmm.exact_marginal(sequences))({}, None, xs)
    np.testing.assert_allclose(float(value), float(sum(hmm.log_marginal(x) for x in xs)), rtol=1e-5)
    marginals = hmm.exact_marginal(sequences).marginals({}, None, xs)["z"]  # (T, sequences, S)
    np.testing.assert_allclose(np.asarray(marginals[:, 2]), np.asarray(hmm.posterior_marginals(xs[2])), atol=1e-5)


def _path_frequencies(paths, draws):
    """The fraction of `draws` (n, T) equal to each of `paths` (m, T)."""
    return jnp.mean(jnp.all(draws[:, None, :] == paths[None], axis=-1), axis=0)


def test_backward_sampling_draws_whole_paths_from_the_exact_posterior():
    x, _ = _three_state_data(5, seed=2)
    assess = jax.jit(jax.vmap(lambda z: hmm.learned_model.assess({"z": z}, TRUE_3, x)[0]))
    paths = jnp.array(list(itertools.product(range(3), repeat=5)))
    posterior = np.asarray(jnp.exp(assess(paths) - logsumexp(assess(paths))))
    marginal = hmm.exact_marginal(hmm.learned_model)
    n = 20_000
    draws = jax.jit(jax.vmap(lambda k: marginal.sample(k, {}, TRUE_3, x)["z"]))(jax.random.split(jax.random.key(3), n))
    se = np.sqrt(posterior * (1 - posterior) / n) + 1e-4
    assert np.all(np.abs(np.asarray(_path_frequencies(paths, draws)) - posterior) < 5 * se)
    # negative control: each state drawn from its own marginal gives the right marginals but not the paths
    probs = marginal.marginals({}, TRUE_3, x)["z"]
    keys = jax.random.split(jax.random.key(4), n)
    independent = jax.vmap(lambda k: jax.random.categorical(k, jnp.log(probs), axis=-1))(keys)
    assert not np.all(np.abs(np.asarray(_path_frequencies(paths, independent)) - posterior) < 5 * se)


def _chain(step, init, reverse=False):
    """models/hmm.py's two-state chain over x with the scan body `step(carry, x_t)`."""

    @ppl.gen
    def chain(params, x):
        jax.lax.scan(step, init, x, reverse=reverse)

    return chain


def _hmm_step(prev, x_t):
    return _emit(hmm._ROWS[prev], 0.0, x_t), None


def _emit(row, shift, x_t):
    z = ppl.sample("z", dist.Categorical(probs=row))
    ppl.sample("x", dist.Normal(hmm.MEANS[z] + shift, hmm.SCALE), obs=x_t)
    return z


def _counting_step(carry, x_t):  # a free carry position (a step counter): each step's table inside the scan
    prev, t = carry
    return (_emit(hmm._ROWS[prev], 0.3 * t, x_t), t + 1.0), None


def _encoded_step(prev, x_t):  # the state's value depends on the data: z + S after x_t > 0, which flips the next row
    z = _emit(jnp.vstack([hmm.TRANS, hmm.TRANS[:, ::-1], hmm.INIT[None]])[prev], 0.0, x_t)
    return jnp.where(x_t > 0, z + hmm.S, z), None


CHAINS = {
    "forward": (_chain(_hmm_step, jnp.asarray(hmm.S)), 4),
    "reversed": (_chain(_hmm_step, jnp.asarray(hmm.S), reverse=True), 4),
    "one step": (_chain(_hmm_step, jnp.asarray(hmm.S)), 1),
    "free carry": (_chain(_counting_step, (jnp.asarray(hmm.S), 0.0)), 4),
    "state from data": (_chain(_encoded_step, jnp.asarray(2 * hmm.S)), 4),
}


@pytest.mark.parametrize("name", list(CHAINS))
def test_chain_variants_equal_brute_force_in_density_marginals_and_samples(name):
    model, t = CHAINS[name]
    x = jnp.array([0.9, -1.2, 1.4, -0.3])[:t]
    paths = jnp.array(list(itertools.product(range(hmm.S), repeat=t)))
    log_ps = jax.jit(jax.vmap(lambda z: model.assess({"z": z}, None, x)[0]))(paths)
    posterior = np.asarray(jnp.exp(log_ps - logsumexp(log_ps)))
    marginal = _exact(model)
    np.testing.assert_allclose(float(ppl.density(marginal)({}, None, x)), float(logsumexp(log_ps)), rtol=1e-6)
    brute = jnp.stack([jnp.sum(posterior[:, None] * (paths == s), 0) for s in range(hmm.S)], axis=-1)
    np.testing.assert_allclose(np.asarray(marginal.marginals({}, None, x)["z"]), np.asarray(brute), atol=1e-5)
    n = 4000
    draws = jax.jit(jax.vmap(lambda k: marginal.sample(k, {}, None, x)["z"]))(jax.random.split(jax.random.key(9), n))
    se = np.sqrt(posterior * (1 - posterior) / n) + 1e-3
    assert np.all(np.abs(np.asarray(_path_frequencies(paths, draws)) - posterior) < 5 * se)


@ppl.gen
def switching_mixture(params, x):
    """c ~ Bernoulli(0.5) for all points; z_i ~ Bernoulli(0.3); x_i ~ N((1 + c) SHIFTS[z_i], 1)."""
    c = ppl.sample("c", dist.Bernoulli(0.5))
    with ppl.plate("data", x.shape[0]):
        z = ppl.sample("z", dist.Bernoulli(0.3))
        ppl.sample("x", dist.Normal((1.0 + c) * SHIFTS[z], 1.0), obs=x)


def test_a_site_shared_by_a_plate_is_summed_and_sampled_jointly_with_it():
    x = jnp.array([-2.5, 0.4, 3.1])
    assess = jax.jit(lambda c, z: switching_mixture.assess({"c": c, "z": z}, None, x)[0])
    configs = [(c, z) for c in range(2) for z in itertools.product(range(2), repeat=3)]
    log_ps = jnp.array([assess(c, jnp.array(z)) for c, z in configs])
    marginal = _exact(switching_mixture)
    np.testing.assert_allclose(float(ppl.density(marginal)({}, None, x)), float(logsumexp(log_ps)), rtol=1e-6)
    posterior = np.asarray(jnp.exp(log_ps - logsumexp(log_ps)))
    n = 20_000
    draws = jax.jit(jax.vmap(lambda k: marginal.sample(k, {}, None, x)))(jax.random.split(jax.random.key(5), n))
    as_rows = jnp.concatenate([draws["c"][:, None], draws["z"]], axis=1)
    rows = jnp.array([[c, *z] for c, z in configs])
    se = np.sqrt(posterior * (1 - posterior) / n) + 1e-4
    assert np.all(np.abs(np.asarray(_path_frequencies(rows, as_rows)) - posterior) < 5 * se)


@ppl.gen
def nested_plates(params, x, y):
    """Groups i < N, members j < M: z_i ~ Categorical, w_ij ~ Bernoulli(sigmoid(z_i - 1)),
    x_ij ~ N(z_i + 2 w_ij, 1), y_ij ~ N(z_i, 1) (x, y of shape (M, N))."""
    members, groups = x.shape
    with ppl.plate("groups", groups):
        z = ppl.sample("z", dist.Categorical(probs=jnp.array([0.5, 0.3, 0.2])))
        with ppl.plate("members", members):
            w = ppl.sample("w", dist.Bernoulli(jax.nn.sigmoid(z - 1.0)))
            ppl.sample("x", dist.Normal(z + 2.0 * w, 1.0), obs=x)
            ppl.sample("y", dist.Normal(z, 1.0), obs=y)


def test_nested_plates_are_summed_inside_out_and_sampled_outside_in():
    x = jnp.array([[0.2, 2.9], [2.1, 1.2]])
    y = jnp.array([[0.1, 1.8], [-0.3, 2.2]])
    assess = jax.jit(lambda z, w: nested_plates.assess({"z": z, "w": w}, None, x, y)[0])
    configs = [(z, w) for z in itertools.product(range(3), repeat=2) for w in itertools.product(range(2), repeat=4)]
    log_ps = jnp.array([assess(jnp.array(z), jnp.array(w).reshape(2, 2)) for z, w in configs])
    marginal = _exact(nested_plates)
    np.testing.assert_allclose(float(ppl.density(marginal)({}, None, x, y)), float(logsumexp(log_ps)), rtol=1e-6)
    posterior = np.asarray(jnp.exp(log_ps - logsumexp(log_ps)))
    n = 20_000
    draws = jax.jit(jax.vmap(lambda k: marginal.sample(k, {}, None, x, y)))(jax.random.split(jax.random.key(6), n))
    as_rows = jnp.concatenate([draws["z"], draws["w"].reshape(n, 4)], axis=1)
    rows = jnp.array([[*z, *w] for z, w in configs])
    se = np.sqrt(posterior * (1 - posterior) / n) + 1e-4
    assert np.all(np.abs(np.asarray(_path_frequencies(rows, as_rows)) - posterior) < 5 * se)


# -- inside objectives ---------------------------------------------------------------------------------


@ppl.gen
def shifted_mixture(params, x):
    """mu ~ N(0, 2); z_i ~ Bernoulli(0.3); x_i ~ N(mu + SHIFTS[z_i], 1)."""
    mu = ppl.sample("mu", dist.Normal(0.0, 2.0))
    with ppl.plate("data", x.shape[0]):
        z = ppl.sample("z", dist.Bernoulli(0.3))
        ppl.sample("x", dist.Normal(mu + SHIFTS[z], 1.0), obs=x)


@ppl.gen
def mu_guide(params, x):
    ppl.sample("mu", dist.Normal(params["loc"], jnp.exp(params["log_scale"])))


def _log_joint_mu(mu, x, combine=logsumexp):
    """log p(x, mu) with each z_i summed out (or, with combine=jnp.max, maximized: a wrong marginal)."""
    per_point = combine(jnp.log(jnp.array([0.7, 0.3])) + dist.Normal(mu + SHIFTS, 1.0).log_prob(x[:, None]), axis=1)
    return dist.Normal(0.0, 2.0).log_prob(mu) + jnp.sum(per_point)


def _quadrature_elbo(params, x, log_joint):
    """E_q[log p(x, mu) - log q(mu)] by Gauss-Hermite quadrature (exact to float precision here)."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)
    scale = jnp.exp(params["log_scale"])
    mus = params["loc"] + scale * jnp.asarray(nodes)
    values = jax.vmap(lambda mu: log_joint(mu, x))(mus) - dist.Normal(params["loc"], scale).log_prob(mus)
    return jnp.sum(jnp.asarray(weights) * values) / np.sqrt(2 * np.pi)


def test_an_elbo_over_the_exact_marginal_has_unbiased_gradients():
    x = jnp.array([-2.0, -1.1, 0.3, 1.9, 2.4, -0.7])
    params = {"loc": jnp.array(0.2), "log_scale": jnp.array(-0.5)}
    objective = ppl.objectives.elbo(_exact(shifted_mixture, ["mu"]), mu_guide)
    keys = jax.random.split(jax.random.key(0), 10_000)
    grads = jax.jit(jax.vmap(lambda k: objective.grad_estimate(k, params, x)))(keys)
    exact = jax.grad(_quadrature_elbo)(params, x, _log_joint_mu)
    wrong = jax.grad(_quadrature_elbo)(params, x, lambda mu, x: _log_joint_mu(mu, x, jnp.max))
    for name in params:
        mean, se = mean_and_stderr(grads[name])
        assert abs(mean - float(exact[name])) < 5 * se, (name, mean, se, exact[name])
        assert abs(mean - float(wrong[name])) > 5 * se  # negative control: max instead of sum is told apart
    values = jax.vmap(lambda k: objective.estimate(k, params, x))(keys)
    mean, se = mean_and_stderr(values)
    assert abs(mean - float(_quadrature_elbo(params, x, _log_joint_mu))) < 5 * se


def test_sim_of_an_exact_marginal_returns_the_kept_sites_with_their_exact_density():
    x = jnp.array([-2.0, 0.3, 1.9])
    marginal = _exact(shifted_mixture, ["mu"])

    @ppl.expectation
    def draw(params):
        kept, log_p = ppl.sim(marginal)(None, x)
        return log_p - _log_joint_mu(kept["mu"], x)

    assert abs(float(draw.estimate(jax.random.key(1), None))) < 1e-4


# -- what cannot be summed out ---------------------------------------------------------------------


def test_a_site_with_infinite_support_is_named():
    x = jnp.array([0.1, 0.2])
    with pytest.raises(ValueError, match="'mu' cannot be summed out: Normal has no finite support"):
        ppl.density(_exact(shifted_mixture))({}, None, x)


def test_values_for_summed_out_sites_and_missing_kept_values_are_named():
    x = jnp.array([0.1, 0.2])
    with pytest.raises(KeyError, match="sums out: z"):
        ppl.density(_exact(shifted_mixture, ["mu"]))({"mu": 0.0, "z": jnp.array([0, 1])}, None, x)
    with pytest.raises(KeyError, match="keeps mu, so its density needs their values"):
        ppl.density(_exact(shifted_mixture, ["mu"]))({}, None, x)


@ppl.gen
def counting_chain(params, x):
    """Not first-order Markov: the carry counts the ones so far."""

    def step(count, x_t):
        z = ppl.sample("z", dist.Bernoulli(jax.nn.sigmoid(count - 1.0)))
        ppl.sample("x", dist.Normal(z, 1.0), obs=x_t)
        return count + z, None

    jax.lax.scan(step, jnp.asarray(0), x)


def test_a_chain_that_is_not_first_order_markov_is_refused():
    with pytest.raises(NotImplementedError, match="'z'.*first-order Markov"):
        ppl.density(hmm.exact_marginal(counting_chain))({}, None, jnp.zeros(5))


@ppl.gen
def mixed_plate(params, x):
    """Each x_i reads the sum of all z: not conditionally independent across the plate."""
    z = jax.vmap(lambda _: ppl.sample("z", dist.Bernoulli(0.5)))(x)
    ppl.sample("x", dist.Normal(jnp.sum(z), 1.0), obs=jnp.sum(x))


def test_a_plate_whose_elements_are_mixed_is_refused():
    with pytest.raises(NotImplementedError, match="'x'.*reads a value summed out over a plate"):
        ppl.density(_exact(mixed_plate))({}, None, jnp.zeros(4))


@ppl.gen
def chain_then_site(params, x):
    def step(prev, x_t):
        z = ppl.sample("z", dist.Bernoulli(0.5))
        ppl.sample("x", dist.Normal(z, 1.0), obs=x_t)
        return z, None

    last, _ = jax.lax.scan(step, jnp.asarray(0), x)
    ppl.sample("y", dist.Normal(last, 1.0), obs=0.0)


def test_a_site_reading_a_chain_state_after_its_scan_is_refused():
    with pytest.raises(NotImplementedError, match="'z'.*read by a later sample site"):
        ppl.density(hmm.exact_marginal(chain_then_site))({}, None, jnp.zeros(3))


def test_under_jit_and_vmap_the_marginal_traces_once():
    traces = []
    marginal = hmm.exact_marginal()

    @jax.jit
    def batch(xs):
        traces.append(1)
        return jax.vmap(lambda x: ppl.density(marginal)({}, None, x))(xs)

    xs = jnp.stack([hmm.make_data(t=30, seed=s)[0] for s in range(3)])
    values = batch(xs)
    batch(xs + 0.1)
    assert len(traces) == 1
    np.testing.assert_allclose(np.asarray(values), [float(hmm.log_marginal(x)) for x in xs], rtol=1e-5)


def test_a_fit_of_the_exact_marginal_likelihood_trains():
    x, _ = _three_state_data(200, seed=9)
    marginal = hmm.exact_marginal(hmm.learned_model)
    objective = ppl.expectation(lambda p, x: ppl.density(marginal)({}, p, x))
    start = {"init_logits": jnp.zeros(3), "trans_logits": jnp.zeros((3, 3))}
    _, losses = ppl.fit(
        objective, start, x, optimizer=optax.adam(0.05), steps=100, key=jax.random.key(0), progress=False
    )
    assert float(losses[-1]) < float(losses[0]) - 5.0
