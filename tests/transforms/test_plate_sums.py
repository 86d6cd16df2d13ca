"""Exact enumeration of guide sites in plates (transforms/plate_sums.py and ADEV's `split_plate`):
when the objective is additive over a plate's elements (the ELBO), an enumerated guide site with
several coordinates is summed exactly: the estimate has zero variance and equals the analytic
value, and so does its gradient, for one plate, nested plates and sites that interact through an
observation; where additivity cannot be shown (IWAE, a nonlinear function of a sum, a guide site
reading another's value) the site keeps its local-expectation gradient."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np

import ppl
from ppl import dist
from transforms import plate_sums

P_Z = jnp.array([0.2, 0.3, 0.5])
P_W = jnp.array([0.6, 0.4])
MEANS = jnp.array([-1.0, 0.0, 1.0])
N, M = 3, 4


def _estimates(objective, params, *args, n=4):
    """(values, grads) of `n` estimates with different keys."""
    keys = jax.random.split(jax.random.key(1), n)
    return jax.vmap(lambda k: objective.value_and_grad_estimate(k, params, *args))(keys)


def _assert_exact(values, grads, value, grad):
    np.testing.assert_allclose(np.asarray(values), float(value), rtol=1e-5)
    for name, g in grad.items():
        np.testing.assert_allclose(np.asarray(grads[name]), np.broadcast_to(g, grads[name].shape), atol=1e-5)


@ppl.gen
def mixture(params, x):
    with ppl.plate("data", x.shape[0]):
        z = ppl.sample("z", dist.Categorical(probs=P_Z))
        ppl.sample("x", dist.Normal(MEANS[z], 1.0), obs=x)


@ppl.gen
def assignments(params, x):
    with ppl.plate("data", x.shape[0]):
        ppl.sample("z", dist.Categorical(logits=params["z"]), estimator=ppl.enum())


def test_an_enumerated_plate_site_in_an_elbo_is_summed_exactly():
    x = jnp.array([-1.2, 0.1, 0.8, 2.0])
    params = {"z": jax.random.normal(jax.random.key(0), (4, 3))}

    def exact(params):
        q = jax.nn.softmax(params["z"], -1)
        return jnp.sum(q * (jnp.log(P_Z) + dist.Normal(MEANS, 1.0).log_prob(x[:, None]) - jnp.log(q)))

    values, grads = _estimates(ppl.objectives.elbo(mixture, assignments), params, x)
    _assert_exact(values, grads, exact(params), jax.grad(exact)(params))


@ppl.gen
def independent_nested(params):
    with ppl.plate("outer", N):
        ppl.sample("z", dist.Categorical(probs=P_Z))
        with ppl.plate("inner", M):
            ppl.sample("w", dist.Categorical(probs=P_W))


@ppl.gen
def nested_guide(params, *data):
    with ppl.plate("outer", params["z"].shape[0]):
        ppl.sample("z", dist.Categorical(logits=params["z"]), estimator=ppl.enum())
        with ppl.plate("inner", params["w"].shape[0]):
            ppl.sample("w", dist.Categorical(logits=params["w"]), estimator=ppl.enum())


def _nested_params():
    k1, k2 = jax.random.split(jax.random.key(2))
    return {"z": jax.random.normal(k1, (N, 3)), "w": jax.random.normal(k2, (M, N, 2))}


def test_nested_plates_all_enumerated_give_minus_the_sum_of_kls_with_zero_variance():
    params = _nested_params()

    def minus_kls(params):
        kl = lambda logits, p: jnp.sum(jax.nn.softmax(logits, -1) * (jax.nn.log_softmax(logits, -1) - jnp.log(p)))
        return -kl(params["z"], P_Z) - kl(params["w"], P_W)

    values, grads = _estimates(ppl.objectives.elbo(independent_nested, nested_guide), params)
    _assert_exact(values, grads, minus_kls(params), jax.grad(minus_kls)(params))


@ppl.gen
def interacting_nested(params, x):
    with ppl.plate("outer", 2):
        z = ppl.sample("z", dist.Categorical(probs=P_Z))
        with ppl.plate("inner", 2):
            w = ppl.sample("w", dist.Categorical(probs=P_W))
            ppl.sample("x", dist.Normal(z + 2.0 * w, 1.0), obs=x)


def test_sites_of_two_plates_meeting_in_an_observation_are_summed_exactly():
    x = jnp.array([[0.3, 1.2], [2.1, -0.4]])
    k1, k2 = jax.random.split(jax.random.key(3))
    params = {"z": jax.random.normal(k1, (2, 3)), "w": jax.random.normal(k2, (2, 2, 2))}

    zs = jnp.array([z for z in itertools.product(range(3), repeat=2) for _ in range(16)])
    ws = jnp.array([w for _ in range(9) for w in itertools.product(range(2), repeat=4)]).reshape(-1, 2, 2)
    log_p = jax.vmap(lambda z, w: interacting_nested.assess({"z": z, "w": w}, None, x)[0])(zs, ws)

    def by_brute_force(params):
        log_qz, log_qw = jax.nn.log_softmax(params["z"], -1), jax.nn.log_softmax(params["w"], -1)
        rows, cols = jnp.arange(2)[:, None], jnp.arange(2)[None, :]
        log_q = jnp.sum(log_qz[jnp.arange(2), zs], 1) + jnp.sum(log_qw[rows, cols, ws], (1, 2))
        return jnp.sum(jnp.exp(log_q) * (log_p - log_q))

    values, grads = _estimates(ppl.objectives.elbo(interacting_nested, nested_guide), params, x)
    _assert_exact(values, grads, by_brute_force(params), jax.grad(by_brute_force)(params))


def test_where_additivity_cannot_be_shown_the_estimate_stays_random():
    x = jnp.array([-1.2, 0.1, 0.8, 2.0])
    params = {"z": jax.random.normal(jax.random.key(0), (4, 3))}
    values, _ = _estimates(ppl.objectives.iwae(mixture, assignments, 3), params, x, n=20)
    assert np.std(np.asarray(values)) > 1e-3  # IWAE's log-mean-exp is not additive: local expectation

    @ppl.expectation
    def exp_of_a_sum(params, x):
        z, log_q = ppl.sim(assignments)(params, x)
        return jnp.exp(log_q)

    closed, _ = exp_of_a_sum.stage(params, x)
    site = next(i for i, e in enumerate(closed.jaxpr.eqns) if e.primitive.name == "sample")
    eqns = closed.jaxpr.eqns
    assert plate_sums.collapse_points(eqns, site + 1, eqns[site].outvars[0], (4,), closed.jaxpr.outvars[0]) is None
    elbo_closed, _ = ppl.objectives.elbo(mixture, assignments).stage(params, x)
    eqns = elbo_closed.jaxpr.eqns
    site = next(i for i, e in enumerate(eqns) if e.primitive.name == "sample")
    points = plate_sums.collapse_points(eqns, site + 1, eqns[site].outvars[0], (4,), elbo_closed.jaxpr.outvars[0])
    assert points is not None and len(points) == 3  # log q(z), log p(z), log p(x | z)
