"""A library of variational objectives, each a short program built from the public constructs.

Every builder takes a model and a guide and returns an `@ppl.expectation` program
`objective(params, *args)` to be *maximized*; both generative functions are called as
`model(params, *args)` and `guide(params, *args)` (a model without parameters ignores its first
argument; observations enter through `ppl.sample(..., obs=...)`).

    params, losses = ppl.fit(objectives.iwae(model, guide, 10), params, data, optimizer=..., ...)
"""

import math

import jax
import jax.numpy as jnp
from jax.lax import stop_gradient
from numpyro.distributions import Categorical

from ppl.choicemap import flatten_choices, nest_choices
from ppl.expectation import density, expectation, sim
from ppl.gen import with_estimators
from ppl.marginal import marginal, sir
from ppl.predictive import unobserved
from transforms.estimators import reinforce
from transforms.primitives import sample_site


def _log_weight(model, guide, params, args, guide_params=None):
    """log p(z, x) - log q(z) for one draw z ~ q; `guide_params` evaluates log q elsewhere."""
    z, log_q = sim(guide)(params, *args)
    if guide_params is not None:
        log_q = density(guide)(z, guide_params, *args)
    return density(model)(z, params, *args) - log_q


def _particles(fn, num_particles):
    return jax.vmap(lambda _: fn())(jnp.arange(num_particles))


def _log_mean_exp(log_w):
    return jax.nn.logsumexp(log_w) - math.log(log_w.shape[0])


def elbo(model, guide):
    """The evidence lower bound E_q[log p(x, z) - log q(z)] (Jordan et al., 1999)."""

    @expectation
    def objective(params, *args):
        return _log_weight(model, guide, params, args)

    return objective


def iwae(model, guide, num_particles):
    """The importance weighted bound E[log 1/K sum_k w_k] (Burda et al., 2016); `iwae(1)` is `elbo`."""

    @expectation
    def objective(params, *args):
        return _log_mean_exp(_particles(lambda: _log_weight(model, guide, params, args), num_particles))

    return objective


def vimco(model, guide, num_particles):
    """IWAE with leave-one-out REINFORCE baselines at every guide site, for discrete guides
    (Mnih & Rezende, 2016; the baseline of particle i re-runs the bound with particle i replaced
    by each other particle)."""

    @expectation
    def objective(params, *args):
        sites = guide.addresses(params, *args)
        loo = with_estimators(guide, {a: reinforce(leave_one_out=True) for a in sites})
        return _log_mean_exp(_particles(lambda: _log_weight(model, loo, params, args), num_particles))

    return objective


def stl(model, guide):
    """ELBO with the 'sticking the landing' gradient: log q is evaluated at stopped guide
    parameters, leaving only the path derivative (Roeder et al., 2017). Same value as `elbo`."""

    @expectation
    def objective(params, *args):
        return _log_weight(model, guide, params, args, guide_params=stop_gradient(params))

    return objective


def dreg(model, guide, num_particles):
    """IWAE value with doubly reparameterized gradients (Tucker et al., 2019): the guide gets
    sum_k w~_k^2 (d log w_k / dz)(dz / dphi), the model the usual sum_k w~_k d log p(x, z_k)."""

    @expectation
    def objective(params, *args):
        def particle():
            z, _ = sim(guide)(params, *args)
            log_w = density(model)(z, params, *args) - density(guide)(z, stop_gradient(params), *args)
            return log_w, density(model)(stop_gradient(z), params, *args)

        log_w, log_p_at_fixed_z = _particles(particle, num_particles)
        w = stop_gradient(jax.nn.softmax(log_w))
        surrogate = jnp.sum(w**2 * log_w) + jnp.sum((w - w**2) * log_p_at_fixed_z)
        return stop_gradient(_log_mean_exp(log_w)) + surrogate - stop_gradient(surrogate)

    return objective


def renyi(model, guide, alpha, num_particles):
    """The Rényi (variational alpha) bound 1/(1-alpha) log 1/K sum_k w_k^(1-alpha)
    (Li & Turner, 2016); alpha -> 1 is the ELBO, alpha = 0 the IWAE."""

    @expectation
    def objective(params, *args):
        log_w = _particles(lambda: _log_weight(model, guide, params, args), num_particles)
        return _log_mean_exp((1.0 - alpha) * log_w) / (1.0 - alpha)

    return objective


def cubo(model, guide, num_particles, n=2.0):
    """The chi upper bound CUBO_n = 1/n log 1/K sum_k w_k^n (Dieng et al., 2017), returned
    negated so that maximizing it minimizes the upper bound."""

    @expectation
    def objective(params, *args):
        log_w = _particles(lambda: _log_weight(model, guide, params, args), num_particles)
        return -_log_mean_exp(n * log_w) / n

    return objective


def rws_wake_q(model, guide, num_particles):
    """Reweighted wake-sleep, wake phase for the guide (Bornschein & Bengio, 2015):
    sum_k w~_k log q(z_k) with z_k ~ q drawn at fixed parameters; its gradient estimates
    -d KL(p(z|x) || q) / dphi. The value is a surrogate, not a bound."""

    @expectation
    def objective(params, *args):
        fixed = stop_gradient(params)

        def particle():
            z, log_q_fixed = sim(guide)(fixed, *args)
            return density(model)(z, fixed, *args) - log_q_fixed, density(guide)(z, params, *args)

        log_w, log_q = _particles(particle, num_particles)
        return jnp.sum(stop_gradient(jax.nn.softmax(log_w)) * log_q)

    return objective


def rws_wake_p(model, guide, num_particles):
    """Reweighted wake-sleep, wake phase for the model: the IWAE bound with the guide held fixed
    (gradient sum_k w~_k d log p(x, z_k) / dtheta)."""

    @expectation
    def objective(params, *args):
        fixed = stop_gradient(params)

        def particle():
            z, log_q = sim(guide)(fixed, *args)
            return density(model)(z, params, *args) - log_q

        return _log_mean_exp(_particles(particle, num_particles))

    return objective


def iwhvi(model, guide, keep, num_inner, proposal=None):
    """Importance weighted hierarchical VI (Sobolev & Vetrov, 2019): the ELBO of the guide's
    marginal over `keep`, with log q(z) estimated by `num_inner` importance samples of the
    auxiliary variables from `proposal(z, params, *args)` (default: the guide's own prior)."""
    return elbo(model, marginal(guide, keep, sir(num_inner, proposal)))


def hvi(model, guide, keep, proposal=None):
    """Hierarchical VI with an auxiliary reverse model (Ranganath et al., 2016): `iwhvi` with
    one inner particle."""
    return iwhvi(model, guide, keep, 1, proposal)


def diwhvi(model, guide, keep, num_outer, num_inner, proposal=None):
    """Doubly importance weighted HVI (Sobolev & Vetrov, 2019): the IWAE bound over `num_outer`
    particles of the guide's marginal, each with `num_inner` inner importance samples."""
    return iwae(model, marginal(guide, keep, sir(num_inner, proposal)), num_outer)


def fivo(model_step, proposal_step, init_state, num_particles, resampling_gradients=False):
    """The filtering variational objective (Maddison et al., 2017; Le et al., 2018; Naesseth et
    al., 2018): log of the SMC estimate of p(x_{1:T}) with `num_particles` particles and
    multinomial resampling at every step, over a state-space model run with `lax.scan`.

    `model_step(params, state, x_t)` is a generative function that draws the step's latents and
    observes x_t (with `obs=`), returning the next state; `proposal_step(params, state, x_t)`
    draws the same latents. `objective(params, xs)` scans over the leading axis of `xs`. Resampling
    is a sample site; by default its score term is dropped (`resampling_gradients=False`, the
    usual biased but low-variance choice); `True` keeps it (unbiased for the bound's gradient)."""

    @expectation
    def objective(params, xs):
        def step(carry, x_t):
            states, log_z = carry

            def particle(state):
                z, log_q = sim(proposal_step)(params, state, x_t)
                log_p, new_state = model_step.assess(z, params, state, x_t)
                return new_state, log_p - log_q

            new_states, log_w = jax.vmap(particle)(states)
            logits = log_w if resampling_gradients else stop_gradient(log_w)
            ancestors = jax.vmap(lambda _: sample_site(("fivo", "ancestor"), Categorical(logits=logits), None))(
                jnp.arange(num_particles)
            )
            return (jax.tree.map(lambda a: a[ancestors], new_states), log_z + _log_mean_exp(log_w)), None

        states = jax.tree.map(lambda a: jnp.broadcast_to(a, (num_particles,) + jnp.shape(a)), init_state)
        (_, log_z), _ = jax.lax.scan(step, (states, jnp.zeros(())), xs)
        return log_z

    return objective


def sleep(model, guide, observed="x", data_argnum=0):
    """Reweighted wake-sleep, sleep phase for the guide (Hinton et al., 1995; Bornschein & Bengio,
    2015): draw a fantasy (z, x) from the model with its `obs=` sites unclamped, then maximize
    log q(z | x), with x (the fantasy at address `observed`) in place of argument `data_argnum`."""

    @expectation
    def objective(params, *args):
        fantasy, _ = sim(unobserved(model))(stop_gradient(params), *args)
        flat = flatten_choices(fantasy)
        address = observed if isinstance(observed, tuple) else (observed,)
        dreamed = list(args)
        dreamed[data_argnum] = flat.pop(address)
        return density(guide)(nest_choices(flat), params, *dreamed)

    return objective
