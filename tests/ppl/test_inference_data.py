"""Export to ArviZ (ppl/inference_data.py): the pointwise log-likelihood is each observation's
log density at each posterior draw, and the InferenceData has ArviZ's layout, so its LOO runs."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ppl
from ppl import dist

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # ArviZ announces its refactor on import
    az = pytest.importorskip("arviz")


@ppl.gen
def regression(params, x, y):
    w = ppl.sample("w", dist.Normal(0.0, 1.0).expand((x.shape[1],)).to_event(1))
    with ppl.plate("data", x.shape[0]):
        ppl.sample("y", dist.Bernoulli(logits=x @ w), obs=y)


def _data(n=40, seed=0):
    kx, ky = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (n, 3))
    y = jax.random.bernoulli(ky, jax.nn.sigmoid(x @ jnp.array([1.0, -1.0, 0.5]))).astype(jnp.float32)
    return x, y


def test_the_pointwise_log_likelihood_is_each_observation_at_each_draw():
    x, y = _data()
    w = 0.5 * jax.random.normal(jax.random.key(1), (50, 3))
    ll = ppl.log_likelihood(regression, {"w": w}, None, x, y)["y"]
    assert ll.shape == (50, 40)
    by_hand = dist.Bernoulli(logits=w @ x.T).log_prob(y)
    np.testing.assert_allclose(np.asarray(ll), np.asarray(by_hand), rtol=1e-5, atol=1e-6)


def test_inference_data_has_arviz_layout_and_loo_runs():
    x, y = _data()
    guide, params = ppl.autoguide.mean_field(regression, None, x, y)
    draws = ppl.predictive(regression, guide, num_samples=400)(jax.random.key(2), params, x, y)
    posterior = {"w": draws["w"]}
    idata = ppl.to_inference_data(
        posterior=posterior,
        posterior_predictive={"y": draws["y"]},
        log_likelihood=ppl.log_likelihood(regression, posterior, None, x, y),
        observed_data={"y": y},
        num_chains=4,
    )
    assert idata.posterior["w"].shape == (4, 100, 3)
    assert idata.posterior_predictive["y"].shape == (4, 100, 40)
    assert idata.observed_data["y"].shape == (40,)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PSIS may warn about a few high Pareto k at an untrained guide
        loo = az.loo(idata)
    ll = np.asarray(idata.log_likelihood["y"]).reshape(400, 40)
    lppd = np.sum(np.log(np.mean(np.exp(ll), axis=0)))
    assert np.isfinite(loo.elpd_loo) and loo.elpd_loo <= lppd + 1e-6


def test_draws_that_do_not_split_into_chains_and_models_without_observations_are_named():
    with pytest.raises(ValueError, match=r"posterior\['w'\] has 10 draws .* num_chains=3"):
        ppl.to_inference_data(posterior={"w": jnp.zeros((10, 3))}, num_chains=3)

    @ppl.gen
    def prior_only(params):
        ppl.sample("w", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="no observed"):
        ppl.log_likelihood(prior_only, {"w": jnp.zeros(5)}, None)
