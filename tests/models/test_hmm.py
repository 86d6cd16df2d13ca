"""Hidden Markov model (models/hmm.py): the model's log joint (through `assess`, sites inside a
`lax.scan`) is the hand-computed one, and the forward algorithm's marginal likelihood and
forward-backward's marginals equal brute-force enumeration of every state path (T = 4) with
`model.assess`. A short ELBO fit stays below log p(x) and close to it."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.scipy.special import logsumexp

import ppl
from models import hmm


def test_log_joint_matches_a_hand_computation():
    x, z = hmm.make_data(t=6, seed=1)
    for path in (z, jnp.array([0, 0, 1, 1, 0, 1]), jnp.ones(6, jnp.int32)):
        log_p, _ = hmm.model.assess({"z": path}, None, x)
        by_hand = np.log(np.asarray(hmm.INIT)[int(path[0])])
        for t in range(1, 6):
            by_hand += np.log(np.asarray(hmm.TRANS)[int(path[t - 1]), int(path[t])])
        for t in range(6):
            mean = float(hmm.MEANS[int(path[t])])
            by_hand += -0.5 * ((float(x[t]) - mean) / hmm.SCALE) ** 2 - np.log(hmm.SCALE * np.sqrt(2 * np.pi))
        np.testing.assert_allclose(float(log_p), by_hand, rtol=1e-5)
        np.testing.assert_allclose(float(hmm.log_joint(x, path)), by_hand, rtol=1e-5)


def brute_force(x):
    """(log p(x), p(z_t | x)) by summing model.assess over all S^T paths."""
    t = x.shape[0]
    paths = jnp.array(list(itertools.product(range(hmm.S), repeat=t)))
    assess = jax.jit(lambda path: hmm.model.assess({"z": path}, None, x)[0])  # one compile, S^T calls
    log_ps = jnp.array([assess(p) for p in paths])
    log_z = logsumexp(log_ps)
    weights = jnp.exp(log_ps - log_z)
    marginals = jnp.stack([jnp.sum(weights[:, None] * (paths == s), axis=0) for s in range(hmm.S)], axis=1)
    return log_z, marginals


def test_forward_algorithm_equals_brute_force_enumeration():
    for seed in (0, 1):
        x, _ = hmm.make_data(t=4, seed=seed)
        log_z, marginals = brute_force(x)
        np.testing.assert_allclose(float(hmm.log_marginal(x)), float(log_z), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(hmm.posterior_marginals(x)), np.asarray(marginals), atol=1e-5)
    # and the check can fail: other observations give another likelihood
    assert abs(float(hmm.log_marginal(x + 0.5)) - float(log_z)) > 0.1


def test_a_short_fit_stays_below_the_log_marginal():
    x, _ = hmm.make_data(t=12, seed=2)
    params, _ = ppl.fit(
        hmm.elbo(), hmm.init_params(12), x, optimizer=optax.adam(0.1), steps=300, key=jax.random.key(0), progress=False
    )
    objective = hmm.elbo()
    est = np.asarray(
        jax.jit(jax.vmap(lambda k: objective.estimate(k, params, x)))(jax.random.split(jax.random.key(1), 2000)),
        np.float64,
    )
    mean, se = est.mean(), est.std(ddof=1) / np.sqrt(est.size)
    log_z = float(hmm.log_marginal(x))
    assert mean <= log_z + 5 * se, (mean, se, log_z)
    assert mean > log_z - 2.0, (mean, log_z)  # a mean-field guide of a sticky chain loses little here
    # the guide's marginals follow the exact ones
    q = jax.nn.softmax(params["logits"], axis=-1)
    assert np.max(np.abs(np.asarray(q - hmm.posterior_marginals(x)))) < 0.35
