"""`ppl.normalize`: sampling importance resampling as an approximate posterior."""

import math

import jax
import jax.numpy as jnp
import numpy as np
from conftest import keys, mean_and_stderr

import ppl
from ppl import dist

X = 1.5  # z ~ N(0, 1), x ~ N(z, 1): p(z | x) = N(x / 2, 1 / sqrt 2)
POST_MEAN, POST_STD = X / 2, math.sqrt(0.5)


@ppl.gen
def model():
    z = ppl.sample("z", dist.Normal(0.0, 1.0))
    ppl.sample("x", dist.Normal(z, 1.0))


def proposal_at(loc, scale):
    @ppl.gen
    def proposal():
        ppl.sample("z", dist.Normal(loc, scale))

    return proposal


def sir_draw(proposal, k):
    posterior = ppl.normalize(model, {"x": X}, ppl.sir(k, proposal=proposal))

    @ppl.expectation
    def draw(dummy):
        z, log_w = ppl.sim(posterior)()
        return z["z"] + 0.0 * log_w + 0.0 * dummy

    @ppl.expectation
    def weight(dummy):
        z, log_w = ppl.sim(posterior)()
        return log_w - dist.Normal(POST_MEAN, POST_STD).log_prob(z["z"]) + 0.0 * dummy

    return draw, weight


def test_with_the_exact_posterior_as_proposal_the_weight_is_the_posterior_density():
    _, weight = sir_draw(proposal_at(POST_MEAN, POST_STD), 5)
    gaps = jax.vmap(lambda k: weight.estimate(k, 0.0))(keys(200))
    np.testing.assert_allclose(gaps, 0.0, atol=1e-5)


def test_resampled_draws_approach_the_posterior_as_particles_grow():
    # A poor proposal: N(0, 1.5). With one particle SIR draws from the proposal itself.
    draw_1, _ = sir_draw(proposal_at(0.0, 1.5), 1)
    draw_100, _ = sir_draw(proposal_at(0.0, 1.5), 100)
    one = jax.jit(jax.vmap(lambda k: draw_1.estimate(k, 0.0)))(keys(20_000))
    many = jax.jit(jax.vmap(lambda k: draw_100.estimate(k, 0.0)))(keys(20_000, seed=1))
    mean_1, se_1 = mean_and_stderr(one)
    mean_100, se_100 = mean_and_stderr(many)
    assert abs(mean_1 - 0.0) < 5 * se_1  # the proposal's mean
    assert abs(mean_100 - POST_MEAN) < 0.02 + 5 * se_100  # SIR's bias is O(1/K)
    assert abs(np.std(many) - POST_STD) < 0.03


def test_density_estimate_at_the_exact_proposal_is_exact():
    posterior = ppl.normalize(model, {"x": X}, ppl.sir(4, proposal=proposal_at(POST_MEAN, POST_STD)))

    @ppl.expectation
    def log_density(z):
        return ppl.density(posterior)({"z": z})

    for z in (-0.5, 0.75, 2.0):
        values = jax.vmap(lambda k: log_density.estimate(k, jnp.asarray(z)))(keys(50))
        np.testing.assert_allclose(values, dist.Normal(POST_MEAN, POST_STD).log_prob(z), atol=1e-5)
