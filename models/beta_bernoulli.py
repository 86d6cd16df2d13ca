"""Beta-Bernoulli: p ~ Beta(a0, b0), x_i ~ Bernoulli(p), with a Beta guide and the exact posterior
Beta(a0 + #ones, b0 + #zeros). The guide's concentrations are exp of unconstrained parameters."""

import jax.numpy as jnp
from jax.scipy.special import betaln

import ppl
from ppl import dist

PRIOR = (1.0, 1.0)
DATA = jnp.array([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0])  # 8 ones, 2 zeros


@ppl.gen
def model(params, data):
    p = ppl.sample("p", dist.Beta(*PRIOR))
    ppl.sample("x", dist.Bernoulli(probs=p).expand(data.shape), obs=data)
    return p


@ppl.gen
def guide(params, data):
    ppl.sample("p", dist.Beta(jnp.exp(params["log_a"]), jnp.exp(params["log_b"])))


def init_params():
    return {"log_a": jnp.array(0.0), "log_b": jnp.array(0.0)}


def exact_posterior(data):
    """(alpha, beta) of p(p | data)."""
    ones = jnp.sum(data)
    return PRIOR[0] + ones, PRIOR[1] + data.shape[0] - ones


def exact_params(data):
    a, b = exact_posterior(data)
    return {"log_a": jnp.log(a), "log_b": jnp.log(b)}


def posterior_mean(params):
    a, b = jnp.exp(params["log_a"]), jnp.exp(params["log_b"])
    return a / (a + b)


def log_evidence(data):
    """log p(data) = log B(a0 + #ones, b0 + #zeros) - log B(a0, b0)."""
    a, b = exact_posterior(data)
    return betaln(a, b) - betaln(*PRIOR)
