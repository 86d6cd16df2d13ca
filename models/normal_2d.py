"""A 2-D linear Gaussian model: z = (z1, z2) ~ N(0, I2), x_i ~ N(A z, sigma^2 I2), with a
full-covariance guide (z1 ~ N(m1, s1), z2 | z1 ~ N(m2 + c z1, s2): every 2-D Gaussian) and the
exact posterior N(S A^T sum_i x_i / sigma^2, S), S = (I + n A^T A / sigma^2)^-1."""

import jax.numpy as jnp

import ppl
from ppl import dist

A = jnp.array([[1.0, 0.5], [-0.3, 0.8]])
SIGMA = 1.0
DATA = jnp.array([[1.0, 0.4], [0.6, 1.2], [1.4, 0.2]])  # (n, 2)


@ppl.gen
def model(params, data):
    z1 = ppl.sample("z1", dist.Normal(0.0, 1.0))
    z2 = ppl.sample("z2", dist.Normal(0.0, 1.0))
    mean = A @ jnp.stack([z1, z2])
    ppl.sample("x", dist.Normal(jnp.broadcast_to(mean, data.shape), SIGMA), obs=data)
    return z1, z2


@ppl.gen
def guide(params, data):
    z1 = ppl.sample("z1", dist.Normal(params["loc"][0], jnp.exp(params["log_scale"][0])))
    ppl.sample("z2", dist.Normal(params["loc"][1] + params["coupling"] * z1, jnp.exp(params["log_scale"][1])))


def init_params():
    return {"loc": jnp.zeros(2), "log_scale": jnp.zeros(2), "coupling": jnp.array(0.0)}


def exact_posterior(data):
    """(mean, covariance) of p(z | data)."""
    cov = jnp.linalg.inv(jnp.eye(2) + data.shape[0] * A.T @ A / SIGMA**2)
    return cov @ A.T @ jnp.sum(data, axis=0) / SIGMA**2, cov


def guide_moments(params):
    """(mean, covariance) of the guide's joint Gaussian over (z1, z2)."""
    m1, m2 = params["loc"]
    s1, s2 = jnp.exp(params["log_scale"])
    c = params["coupling"]
    mean = jnp.stack([m1, m2 + c * m1])
    cov = jnp.array([[s1**2, c * s1**2], [c * s1**2, c**2 * s1**2 + s2**2]])
    return mean, cov


def exact_params(data):
    """Guide parameters at which the guide is the exact posterior."""
    mean, cov = exact_posterior(data)
    c = cov[1, 0] / cov[0, 0]
    return {
        "loc": jnp.stack([mean[0], mean[1] - c * mean[0]]),
        "log_scale": jnp.log(jnp.stack([jnp.sqrt(cov[0, 0]), jnp.sqrt(cov[1, 1] - c * cov[1, 0])])),
        "coupling": c,
    }


def log_evidence(data):
    """log p(data): vec(x) ~ N(0, (1_n 1_n^T) kron (A A^T) + sigma^2 I)."""
    n = data.shape[0]
    cov = jnp.kron(jnp.ones((n, n)), A @ A.T) + SIGMA**2 * jnp.eye(2 * n)
    return dist.MultivariateNormal(jnp.zeros(2 * n), cov).log_prob(data.reshape(-1))
