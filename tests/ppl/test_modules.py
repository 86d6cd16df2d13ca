"""Neural-network modules as parameters: a small VAE whose encoder and decoder are Equinox modules,
Flax linen modules (their parameter dicts) or Flax nnx modules trains with `ppl.fit`, the guide
taking the modules as arguments; the fitted parameters keep their types."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import mean_and_stderr

import ppl
from ppl import dist

eqx = pytest.importorskip("equinox")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    linen = pytest.importorskip("flax.linen")
    nnx = pytest.importorskip("flax.nnx")

D, LATENT, N = 6, 2, 64


def _data():
    """Binary vectors from two prototypes (so a 2-D latent explains them)."""
    k1, k2 = jax.random.split(jax.random.key(0))
    which = jax.random.bernoulli(k1, 0.5, (N,))
    probs = jnp.where(
        which[:, None], jnp.array([0.9, 0.9, 0.9, 0.1, 0.1, 0.1]), jnp.array([0.1, 0.1, 0.1, 0.9, 0.9, 0.9])
    )
    return jax.random.bernoulli(k2, probs).astype(jnp.float32)


def vae(encode, decode):
    """(model, guide) of a VAE whose networks are `encode(params["enc"], x) -> (loc, log_scale)`
    and `decode(params["dec"], z) -> logits`."""

    @ppl.gen
    def model(params, x):
        with ppl.plate("data", x.shape[0]):
            z = ppl.sample("z", dist.Normal(0.0, 1.0).expand((LATENT,)).to_event(1))
            ppl.sample("x", dist.Bernoulli(logits=decode(params["dec"], z)).to_event(1), obs=x)

    @ppl.gen
    def guide(params, x):
        loc, log_scale = encode(params["enc"], x)
        with ppl.plate("data", x.shape[0]):
            ppl.sample("z", dist.Normal(loc, jnp.exp(log_scale)).to_event(1))

    return model, guide


def _fits(encode, decode, params):
    """Fit the VAE 300 steps; returns (fitted params, ELBO (mean, se) before, after)."""
    x = _data()
    model, guide = vae(encode, decode)
    elbo = ppl.objectives.elbo(model, guide)
    keys = jax.random.split(jax.random.key(1), 500)
    stats = lambda p: mean_and_stderr(jax.vmap(lambda k: elbo.estimate(k, p, x))(keys))
    before = stats(params)
    fitted, _ = ppl.fit(elbo, params, x, optimizer=optax.adam(0.02), steps=300, key=jax.random.key(2), progress=False)
    return fitted, before, stats(fitted)


def _improved(before, after):
    return after[0] - before[0] > 5 * np.hypot(before[1], after[1])


def _split(out):
    return out[..., :LATENT], out[..., LATENT:]


def test_equinox_modules_train_as_parameters():
    k1, k2 = jax.random.split(jax.random.key(3))
    params = {"enc": eqx.nn.MLP(D, 2 * LATENT, 16, 1, key=k1), "dec": eqx.nn.MLP(LATENT, D, 16, 1, key=k2)}
    encode = lambda net, x: _split(jax.vmap(net)(x))
    decode = lambda net, z: jax.vmap(net)(z)
    fitted, before, after = _fits(encode, decode, params)
    assert _improved(before, after), (before, after)
    assert isinstance(fitted["enc"], eqx.nn.MLP) and fitted["enc"].activation is params["enc"].activation


class _Linen(linen.Module):
    features: int

    @linen.compact
    def __call__(self, x):
        return linen.Dense(self.features)(jnp.tanh(linen.Dense(16)(x)))


def test_flax_linen_parameters_train():
    enc, dec = _Linen(2 * LATENT), _Linen(D)
    k1, k2 = jax.random.split(jax.random.key(4))
    params = {"enc": enc.init(k1, jnp.zeros(D)), "dec": dec.init(k2, jnp.zeros(LATENT))}
    fitted, before, after = _fits(lambda p, x: _split(enc.apply(p, x)), dec.apply, params)
    assert _improved(before, after), (before, after)
    assert jax.tree.structure(fitted) == jax.tree.structure(params)


class _Nnx(nnx.Module):
    def __init__(self, d_in, d_out, rngs):
        self.hidden, self.out = nnx.Linear(d_in, 16, rngs=rngs), nnx.Linear(16, d_out, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.tanh(self.hidden(x)))


def test_flax_nnx_modules_train_as_parameters():
    rngs = nnx.Rngs(5)
    params = {"enc": _Nnx(D, 2 * LATENT, rngs), "dec": _Nnx(LATENT, D, rngs)}
    fitted, before, after = _fits(lambda net, x: _split(net(x)), lambda net, z: net(z), params)
    assert _improved(before, after), (before, after)
    assert isinstance(fitted["enc"], _Nnx)


def test_a_gradient_through_a_module_argument_skips_its_static_leaves():
    net = eqx.nn.MLP(D, 2 * LATENT, 8, 1, key=jax.random.key(6))
    model, guide = vae(lambda net, x: _split(jax.vmap(net)(x)), lambda p, z: z @ p)

    @ppl.expectation
    def elbo(net, x):
        params = {"enc": net, "dec": jnp.ones((LATENT, D))}
        z, log_q = ppl.sim(guide)(params, x)
        return ppl.density(model)(z, params, x) - log_q

    grads = elbo.grad_estimate(jax.random.key(7), net, _data())
    assert isinstance(grads, eqx.nn.MLP) and grads.activation is None
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads)) and jax.tree.leaves(grads)
