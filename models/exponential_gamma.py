"""Exponential-Gamma: rate ~ Gamma(a0, b0), x_i ~ Exponential(rate), with a Gamma guide and the
exact posterior Gamma(a0 + n, b0 + sum x). With a0 = b0 = 1 and data (2, 3) it is Gamma(3, 6)."""

import jax.numpy as jnp

import ppl
from ppl import dist

PRIOR = (1.0, 1.0)  # (concentration, rate)
DATA = jnp.array([2.0, 3.0])  # exact posterior Gamma(3, 6)


@ppl.gen
def model(params, data):
    rate = ppl.sample("rate", dist.Gamma(*PRIOR))
    ppl.sample("x", dist.Exponential(rate).expand(data.shape), obs=data)
    return rate


@ppl.gen
def guide(params, data):
    ppl.sample("rate", dist.Gamma(jnp.exp(params["log_alpha"]), jnp.exp(params["log_beta"])))


def init_params():
    return {"log_alpha": jnp.array(0.0), "log_beta": jnp.array(0.0)}


def exact_posterior(data):
    """(alpha, beta) (concentration, rate) of p(rate | data)."""
    return PRIOR[0] + data.shape[0], PRIOR[1] + jnp.sum(data)


def exact_params(data):
    alpha, beta = exact_posterior(data)
    return {"log_alpha": jnp.log(alpha), "log_beta": jnp.log(beta)}
