"""Bayesian logistic regression (models/logreg.py): the fitted posterior mean points along the true
weights, and the full-rank guide learns the posterior correlation that correlated features induce
(which a mean-field guide cannot represent)."""

import jax.numpy as jnp
import numpy as np

from models import logreg


def test_mean_field_posterior_mean_recovers_the_true_direction():
    x, y = logreg.make_data(n=400, seed=1)
    guide, params = logreg.guides(x, y)["mean_field"]
    params, losses = logreg.fit(guide, params, x, y, steps=3000, learning_rate=0.01, progress=False)
    mean = np.asarray(logreg.posterior_mean(guide, params, x, y))
    corr = np.corrcoef(mean, np.asarray(logreg.TRUE_W))[0, 1]
    assert corr > 0.9, (mean, corr)
    assert np.all(np.sign(mean) == np.sign(np.asarray(logreg.TRUE_W)))
    assert float(jnp.mean(losses[-100:])) < float(jnp.mean(losses[:20]))  # it trained


def test_full_rank_covariance_is_not_diagonal_with_correlated_features():
    x, y = logreg.make_data(n=300, rho=0.8, seed=2)
    guide, params = logreg.guides(x, y)["full_rank"]
    params, _ = logreg.fit(guide, params, x, y, steps=3000, learning_rate=0.01, progress=False)
    mean = np.asarray(logreg.posterior_mean(guide, params, x, y))
    assert np.corrcoef(mean, np.asarray(logreg.TRUE_W))[0, 1] > 0.9
    cov = np.asarray(guide.covariance(params))
    sd = np.sqrt(np.diag(cov))
    corr = cov / np.outer(sd, sd)
    off = corr[~np.eye(cov.shape[0], dtype=bool)]
    # positively correlated features give negatively correlated weights (x_i w_i + x_j w_j is
    # identified better than either weight): the initial guide is diagonal, the fitted one is not
    assert np.max(np.abs(off)) > 0.2, corr
    assert np.mean(off) < -0.1, corr
