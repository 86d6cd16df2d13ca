"""The analytic cases from the specification, by reparameterization and REINFORCE."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import keys, within_stderr

import ppl
from models import normal_normal
from ppl import dist


@ppl.gen
def latent_model(x):
    z = ppl.sample("z", dist.Normal(0.0, 1.0).expand(x.shape))
    ppl.sample("x", dist.Normal(z, 1.0))


def negative_elbo(estimator):
    @ppl.gen
    def guide(params, x):
        ppl.sample("z", dist.Normal(params["loc"], params["scale"]).expand(x.shape), estimator=estimator)

    @ppl.expectation
    def objective(params, x):
        z, log_q = ppl.sim(guide)(params, x)
        return log_q - ppl.density(latent_model)(z | {"x": x}, x)

    return objective


@pytest.mark.parametrize("estimator", [ppl.reparam(), ppl.reinforce()], ids=["reparam", "reinforce"])
def test_gradient_of_negative_elbo_matches_closed_form(estimator):
    x = jnp.array([-0.5, 2.0])
    params = {"loc": jnp.zeros(2), "scale": jnp.array(1.0)}
    objective = negative_elbo(estimator)
    grads = jax.jit(jax.vmap(lambda k: objective.grad_estimate(k, params, x)))(keys(20_000))
    assert within_stderr(grads["loc"], [0.5, -2.0])
    assert within_stderr(grads["scale"], 2.0)


def test_a_wrong_expected_gradient_is_rejected():
    """Negative control: the same samples are far from a slightly different gradient."""
    x = jnp.array([-0.5, 2.0])
    params = {"loc": jnp.zeros(2), "scale": jnp.array(1.0)}
    grads = jax.jit(jax.vmap(lambda k: negative_elbo(ppl.reparam()).grad_estimate(k, params, x)))(keys(20_000))
    assert within_stderr(grads["loc"], [0.5, -2.0])
    assert not within_stderr(grads["loc"], [0.6, -2.0])


@pytest.mark.parametrize("estimator", [ppl.enum(), ppl.reinforce(), ppl.mvd()], ids=["enum", "reinforce", "mvd"])
def test_bernoulli_kl_gradient_is_log_3(estimator):
    @ppl.expectation
    def kl(q):
        z = ppl.sample("z", dist.Bernoulli(probs=q), estimator=estimator)
        return dist.Bernoulli(probs=q).log_prob(z) - dist.Bernoulli(probs=0.25).log_prob(z)

    grads = jax.jit(jax.vmap(lambda k: kl.grad_estimate(k, 0.5)))(keys(20_000))
    if isinstance(estimator, type(ppl.enum())):
        np.testing.assert_allclose(grads, np.log(3.0), rtol=1e-5)  # exact: no variance at all
    else:
        assert within_stderr(grads, np.log(3.0))


@pytest.mark.parametrize("estimator", [ppl.reparam(), ppl.reinforce()], ids=["reparam", "reinforce"])
def test_every_elbo_sample_at_the_exact_posterior_is_the_log_evidence(estimator):
    x = jnp.array([1.3, 0.4, 2.2])
    guide = ppl.with_estimators(normal_normal.guide, {"mu": estimator})

    @ppl.expectation
    def elbo(params, x):
        z, log_q = ppl.sim(guide)(params, x)
        return ppl.density(normal_normal.model)(z | {"x": x}, x) - log_q

    values = jax.vmap(lambda k: elbo.estimate(k, normal_normal.exact_params(x), x))(keys(100))
    np.testing.assert_allclose(values, normal_normal.log_evidence(x), rtol=1e-4)
