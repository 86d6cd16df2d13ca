"""A library of variational objectives, each a short program built from the public constructs.

Every builder takes a model and a guide and returns an `@ppl.expectation` program
`objective(params, *args)` to be *maximized*; both generative functions are called as
`model(params, *args)` and `guide(params, *args)` (a model without parameters ignores its first
argument; observations enter through `ppl.sample(..., obs=...)`).

    params, losses = ppl.fit(objectives.iwae(model, guide, 10), params, data, optimizer=..., ...)

Particles are drawn under one `jax.vmap` (each guide site draws independently per particle) and
then scored. Builders with `num_particles` take `particle_chunk`: score (run the model's density,
a VAE's decoder) that many particles at a time in a `lax.map` whose body is recomputed for the
gradient, so the memory of scoring grows with the chunk instead of with the number of particles;
the draws stay one vmap, so the value and gradient are those of `particle_chunk=None` to float
rounding. Under `ppl.fit(..., mesh=...)` with a particles axis, the particle axis is sharded over
it (`ppl.distributed.shard_particles`).
"""

import math

import jax
import jax.numpy as jnp
from jax.lax import stop_gradient
from numpyro.distributions import Categorical, Gumbel, RelaxedBernoulliLogits

from ppl.choicemap import flatten_choices, nest_choices
from ppl.distributed import shard_particles
from ppl.expectation import density, expectation, sim
from ppl.gen import with_estimators
from ppl.marginal import marginal, sir
from ppl.predictive import unobserved
from transforms import gfi, interpreter
from transforms.estimators import reinforce
from transforms.primitives import sample_site


def _log_weight(model, guide, params, args, guide_params=None):
    """log p(z, x) - log q(z) for one draw z ~ q; `guide_params` evaluates log q elsewhere."""
    z, log_q = sim(guide)(params, *args)
    if guide_params is not None:
        log_q = density(guide)(z, guide_params, *args)
    return density(model)(z, params, *args) - log_q


def _particles(fn, num_particles):
    """`fn()` for each of `num_particles` particles under one `jax.vmap`: its sites draw one value
    per particle, its results gain a leading particle axis."""
    return shard_particles(jax.vmap(lambda _: fn())(jnp.arange(num_particles)))


def _each(fn, particles, chunk=None):
    """`fn(particle)` for each particle (the leading axis of the leaves of `particles`), `fn`
    deterministic (densities, no sites): under one `jax.vmap`, or `chunk` particles at a time
    (`lax.map`, each chunk rematerialized in the backward pass)."""
    if chunk is None:
        return shard_particles(jax.vmap(fn)(particles))
    return shard_particles(jax.lax.map(jax.checkpoint(fn), particles, batch_size=chunk))


def _log_weights(model, guide, params, args, num_particles, chunk, model_params=None):
    """log p(z_k, x) - log q(z_k) for `num_particles` draws z_k ~ q(. ; params); `model_params`
    (default `params`) evaluates log p elsewhere."""
    zs, log_q = _particles(lambda: sim(guide)(params, *args), num_particles)
    model_params = params if model_params is None else model_params
    return _each(lambda z: density(model)(z, model_params, *args), zs, chunk) - log_q


def _log_mean_exp(log_w):
    return jax.nn.logsumexp(log_w) - math.log(log_w.shape[0])


def elbo(model, guide):
    """The evidence lower bound E_q[log p(x, z) - log q(z)] (Jordan et al., 1999)."""

    @expectation
    def objective(params, *args):
        return _log_weight(model, guide, params, args)

    return objective


def iwae(model, guide, num_particles, particle_chunk=None):
    """The importance weighted bound E[log 1/K sum_k w_k] (Burda et al., 2016); `iwae(1)` is `elbo`."""

    @expectation
    def objective(params, *args):
        return _log_mean_exp(_log_weights(model, guide, params, args, num_particles, particle_chunk))

    return objective


def vimco(model, guide, num_particles, particle_chunk=None):
    """IWAE with leave-one-out REINFORCE baselines at every guide site, for discrete guides
    (Mnih & Rezende, 2016; the baseline of particle i re-runs the bound with particle i replaced
    by each other particle)."""

    @expectation
    def objective(params, *args):
        sites = guide.addresses(params, *args)
        loo = with_estimators(guide, {a: reinforce(leave_one_out=True) for a in sites})
        return _log_mean_exp(_log_weights(model, loo, params, args, num_particles, particle_chunk))

    return objective


def stl(model, guide):
    """ELBO with the 'sticking the landing' gradient: log q is evaluated at stopped guide
    parameters, leaving only the path derivative (Roeder et al., 2017). Same value as `elbo`."""

    @expectation
    def objective(params, *args):
        return _log_weight(model, guide, params, args, guide_params=stop_gradient(params))

    return objective


def dreg(model, guide, num_particles, particle_chunk=None):
    """IWAE value with doubly reparameterized gradients (Tucker et al., 2019): the guide gets
    sum_k w~_k^2 (d log w_k / dz)(dz / dphi), the model the usual sum_k w~_k d log p(x, z_k)."""

    @expectation
    def objective(params, *args):
        def score(z):
            log_w = density(model)(z, params, *args) - density(guide)(z, stop_gradient(params), *args)
            return log_w, density(model)(stop_gradient(z), params, *args)

        zs, _ = _particles(lambda: sim(guide)(params, *args), num_particles)
        log_w, log_p_at_fixed_z = _each(score, zs, particle_chunk)
        w = stop_gradient(jax.nn.softmax(log_w))
        surrogate = jnp.sum(w**2 * log_w) + jnp.sum((w - w**2) * log_p_at_fixed_z)
        return stop_gradient(_log_mean_exp(log_w)) + surrogate - stop_gradient(surrogate)

    return objective


def renyi(model, guide, alpha, num_particles, particle_chunk=None):
    """The Rényi (variational alpha) bound 1/(1-alpha) log 1/K sum_k w_k^(1-alpha)
    (Li & Turner, 2016); alpha -> 1 is the ELBO, alpha = 0 the IWAE."""

    @expectation
    def objective(params, *args):
        log_w = _log_weights(model, guide, params, args, num_particles, particle_chunk)
        return _log_mean_exp((1.0 - alpha) * log_w) / (1.0 - alpha)

    return objective


def cubo(model, guide, num_particles, n=2.0, particle_chunk=None):
    """The chi upper bound CUBO_n = 1/n log 1/K sum_k w_k^n (Dieng et al., 2017), returned
    negated so that maximizing it minimizes the upper bound."""

    @expectation
    def objective(params, *args):
        log_w = _log_weights(model, guide, params, args, num_particles, particle_chunk)
        return -_log_mean_exp(n * log_w) / n

    return objective


def rws_wake_q(model, guide, num_particles, particle_chunk=None):
    """Reweighted wake-sleep, wake phase for the guide (Bornschein & Bengio, 2015):
    sum_k w~_k log q(z_k) with z_k ~ q drawn at fixed parameters; its gradient estimates
    -d KL(p(z|x) || q) / dphi. The value is a surrogate, not a bound."""

    @expectation
    def objective(params, *args):
        fixed = stop_gradient(params)
        zs, log_q_fixed = _particles(lambda: sim(guide)(fixed, *args), num_particles)
        score = lambda z: (density(model)(z, fixed, *args), density(guide)(z, params, *args))
        log_p, log_q = _each(score, zs, particle_chunk)
        return jnp.sum(stop_gradient(jax.nn.softmax(log_p - log_q_fixed)) * log_q)

    return objective


def rws_wake_p(model, guide, num_particles, particle_chunk=None):
    """Reweighted wake-sleep, wake phase for the model: the IWAE bound with the guide held fixed
    (gradient sum_k w~_k d log p(x, z_k) / dtheta)."""

    @expectation
    def objective(params, *args):
        log_w = _log_weights(model, guide, stop_gradient(params), args, num_particles, particle_chunk, params)
        return _log_mean_exp(log_w)

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
    usual biased but low-variance choice); `True` keeps it, with the log-evidence estimate so far
    as its REINFORCE baseline (the ancestors cannot change it): unbiased for the bound's gradient,
    but its variance grows with T. Measured on a linear-Gaussian model (T = 100, 4 particles), the
    gradient's std per coordinate is 4e3-9e3 with resampling gradients (1.3e4-1.6e4 without the
    baseline) against 20-75 by default, for means of 50-500; Adam (lr 1e-2) then makes no
    progress (loss 200 -> 203 in 2000 steps; without the baseline 199 -> 240) where the default
    trains (181 -> 165). Use it for short sequences, or with many particles and small steps."""

    @expectation
    def objective(params, xs):
        def step(carry, x_t):
            states, log_z = carry

            def particle(state):
                z, log_q = sim(proposal_step)(params, state, x_t)
                log_p, new_state = model_step.assess(z, params, state, x_t)
                return new_state, log_p - log_q

            new_states, log_w = jax.vmap(particle)(states)
            log_z = log_z + _log_mean_exp(log_w)
            if resampling_gradients:  # the estimate so far does not depend on the ancestors: a baseline
                logits, estimator = log_w, reinforce(baseline=log_z)
            else:
                logits, estimator = stop_gradient(log_w), None
            ancestors = jax.vmap(lambda _: sample_site(("fivo", "ancestor"), Categorical(logits=logits), estimator))(
                jnp.arange(num_particles)
            )
            return (jax.tree.map(lambda a: a[ancestors], new_states), log_z), None

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


def _particle_grid(model, guide, params, args, num_bounds, num_particles):
    """log w of `num_bounds` x `num_particles` independent draws from the guide, shape (M, K)."""
    draw = lambda: _log_weights(model, guide, params, args, num_particles, None)
    return _particles(draw, num_bounds)


def miwae(model, guide, num_bounds, num_particles):
    """The average of `num_bounds` independent IWAE bounds of `num_particles` particles each
    (Rainforth et al., 2018, 'Tighter variational bounds are not necessarily better'): its expected
    value is IWAE_K, its guide gradient keeps a signal-to-noise ratio that IWAE_{MK} loses."""

    @expectation
    def objective(params, *args):
        log_w = _particle_grid(model, guide, params, args, num_bounds, num_particles)
        return jnp.mean(jax.vmap(_log_mean_exp)(log_w))

    return objective


def ciwae(model, guide, num_particles, beta):
    """beta ELBO + (1 - beta) IWAE_K over the same K particles (Rainforth et al., 2018): its
    expected value is that combination of the two bounds."""

    @expectation
    def objective(params, *args):
        log_w = _log_weights(model, guide, params, args, num_particles, None)
        return beta * jnp.mean(log_w) + (1.0 - beta) * _log_mean_exp(log_w)

    return objective


def piwae(model, guide, num_bounds, num_particles):
    """Partially importance weighted (Rainforth et al., 2018): over one set of M x K reparameterized
    draws, the model's parameters follow IWAE_{MK} and the guide's follow MIWAE_{M,K}; the value
    is IWAE_{MK}. The split uses `stop_gradient` on the draws, so the guide must be reparameterized."""

    @expectation
    def objective(params, *args):
        fixed = stop_gradient(params)
        zs, log_q = _particles(lambda: _particles(lambda: sim(guide)(params, *args), num_particles), num_bounds)
        score = lambda z: (density(model)(stop_gradient(z), params, *args), density(model)(z, fixed, *args))
        log_p_model, log_p_guide = jax.vmap(lambda row: _each(score, row))(zs)
        model_term = _log_mean_exp((log_p_model - stop_gradient(log_q)).reshape(-1))
        guide_term = jnp.mean(jax.vmap(_log_mean_exp)(log_p_guide - log_q))
        return model_term + guide_term - stop_gradient(guide_term)

    return objective


def _tempered_log_joint(model, choices, kappa, params, args):
    """log p(z) + kappa log p(x | z): the model's log density with its observed sites' terms
    multiplied by `kappa`."""
    closed, flat, _ = model.stage(params, *args)
    scores = gfi.site_scores(closed, flat, flatten_choices(choices))
    observed = interpreter.addresses_with(closed.jaxpr, "observed")
    weight = lambda address: kappa if address in observed else 1.0
    return sum(weight(a) * jnp.sum(s) for a, s in scores.items())


def data_emphasized_elbo(model, guide, kappa):
    """E_q[kappa log p(x | z) + log p(z) - log q(z)], the likelihood (the `obs=` sites) weighted
    by `kappa` (Harvey, Petrov & Hughes, 2024, 'Learning the regularization strength for deep
    fine-tuning via a data-emphasized variational objective'); `kappa = 1` is the ELBO. It is
    -KL(q || p_kappa) plus a constant, p_kappa(z) proportional to p(z) p(x | z)^kappa, so its optimum
    is that tempered posterior."""

    @expectation
    def objective(params, *args):
        z, log_q = sim(guide)(params, *args)
        return _tempered_log_joint(model, z, kappa, params, args) - log_q

    return objective


def chi2_vis(model, guide, log_scale=0.0):
    """Forward chi^2 variational importance sampling (Dieng et al., 2017, CHIVI; Li et al., 2024,
    'Forward chi^2 divergence based variational importance sampling'): E_q[(p(x, z) / q(z) / c)^2]
    with c = exp(`log_scale`), which is p(x)^2 (1 + chi^2(p(z | x) || q)) / c^2, negated to be
    maximized. Its gradient is unbiased (no logarithm outside the expectation); minimizing it makes q
    a mass-covering proposal for importance sampling. Choose `log_scale` near log p(x) so the
    squared weights stay in floating-point range."""

    @expectation
    def objective(params, *args):
        return -jnp.exp(2.0 * (_log_weight(model, guide, params, args) - log_scale))

    return objective


def concrete_elbo(decoder, prior_logits, guide_logits, temperature):
    """The ELBO of a model with independent Bernoulli latents z ~ Bernoulli(logits=`prior_logits`)
    and likelihood `decoder(params, z, *args)` (a generative function observing the data with
    `obs=`), under the Concrete / Gumbel-softmax relaxation (Maddison, Mnih & Teh, 2017; Jang, Gu
    & Poole, 2017): the decoder reads z~ ~ RelaxedBernoulli(`temperature`, logits) in place of the
    guide's z ~ Bernoulli(logits), logits = `guide_logits(params, *args)`, so the gradient is
    pathwise, and the KL term between the Bernoulli guide and prior is exact. The gradient is
    biased for the discrete ELBO's; the bias vanishes as the temperature falls, while the
    variance grows. Categorical latents: `gumbel_softmax_elbo`."""

    def relaxed(logits):
        return sample_site(("z",), RelaxedBernoulliLogits(temperature, logits).to_event(1), None)

    def kl(logits):
        q, log_q, log_q0 = jax.nn.sigmoid(logits), jax.nn.log_sigmoid(logits), jax.nn.log_sigmoid(-logits)
        log_p, log_p0 = jax.nn.log_sigmoid(prior_logits), jax.nn.log_sigmoid(-prior_logits)
        return jnp.sum(q * (log_q - log_p) + (1.0 - q) * (log_q0 - log_p0))

    return _relaxed_elbo(decoder, guide_logits, relaxed, kl)


def gumbel_softmax_elbo(decoder, prior_logits, guide_logits, temperature):
    """`concrete_elbo` for independent Categorical latents z ~ Categorical(logits=`prior_logits`),
    logits of shape (..., K) (Jang, Gu & Poole, 2017; Maddison, Mnih & Teh, 2017): the decoder
    reads the relaxed one-hot z~ = softmax((logits + g) / `temperature`), g standard Gumbel noise
    drawn at the address "z" (shape (..., K), pathwise), in place of the guide's one-hot z ~
    Categorical(logits); the KL term between the Categorical guide and prior is exact. As the
    temperature falls, z~ tends to the one-hot of argmax(logits + g), an exact Categorical draw
    (the Gumbel-max trick), so the bias vanishes while the variance grows."""

    def relaxed(logits):
        gumbel = sample_site(("z",), Gumbel(jnp.zeros(jnp.shape(logits))).to_event(jnp.ndim(logits)), None)
        return jax.nn.softmax((logits + gumbel) / temperature, axis=-1)

    def kl(logits):
        log_q, log_p = jax.nn.log_softmax(logits, axis=-1), jax.nn.log_softmax(prior_logits, axis=-1)
        return jnp.sum(jnp.exp(log_q) * (log_q - log_p))

    return _relaxed_elbo(decoder, guide_logits, relaxed, kl)


def _relaxed_elbo(decoder, guide_logits, relaxed, kl):
    """E[log decoder density at `relaxed(logits)`] - `kl(logits)`, logits = `guide_logits(params, *args)`."""

    @expectation
    def objective(params, *args):
        logits = guide_logits(params, *args)
        return density(decoder)({}, params, relaxed(logits), *args) - kl(logits)

    return objective
