"""The VAE on scikit-learn's digits: every objective trains, and the held-out estimate is sane."""

import jax
import jax.numpy as jnp
import pytest

from models import vae


def test_data_are_binary_digits_split_without_overlap():
    train, test = vae.load_digits()
    assert train.shape[1] == test.shape[1] == vae.PIXELS
    assert set(jnp.unique(train).tolist()) == {0.0, 1.0}
    assert train.shape[0] + test.shape[0] == 1797


@pytest.mark.parametrize("name", ["elbo", "iwae", "dreg", "rws"])
def test_each_objective_lowers_its_loss(name):
    _, losses, _, _ = vae.train(name, steps=200, batch_size=32, progress=False)
    assert jnp.all(jnp.isfinite(losses))
    assert jnp.mean(losses[-20:]) < jnp.mean(losses[:20]) - 1.0


def test_held_out_log_likelihood_improves_with_training_and_is_a_log_probability():
    params0 = vae.init_params(jax.random.key(0))
    params, _, _, test = vae.train("elbo", steps=300, batch_size=32, progress=False)
    before = vae.held_out_log_likelihood(jax.random.key(1), params0, test[:50], num_particles=10)
    after = vae.held_out_log_likelihood(jax.random.key(1), params, test[:50], num_particles=10)
    assert after < 0.0
    assert after > before + 5.0
