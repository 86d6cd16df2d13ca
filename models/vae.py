"""A variational autoencoder (Kingma & Welling, 2014) on scikit-learn's bundled handwritten digits
(8x8, binarized at half intensity; loaded from the installed package, no download).

The model draws z ~ N(0, I) per image and x ~ Bernoulli(logits = decoder(z)); the guide is an
amortized Normal from an encoder. Both are generative functions over a batch (a plate by `expand`);
any objective in `ppl.objectives` trains them: `elbo`, `iwae(K)`, `dreg(K)`, or reweighted
wake-sleep (`rws_wake_p` + `rws_wake_q`).

    python -m models.vae            # trains with the ELBO, prints a held-out log-likelihood, writes vae.png
"""

import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ppl
from ppl import dist

LATENT, HIDDEN, PIXELS = 4, 128, 64


def load_digits(seed=0, test_fraction=0.2):
    """(train, test) binarized 64-pixel images as float32 arrays, split with a fixed seed."""
    from sklearn.datasets import load_digits as sklearn_digits

    images = (sklearn_digits().data >= 8.0).astype(np.float32)
    order = np.random.default_rng(seed).permutation(len(images))
    n_test = int(len(images) * test_fraction)
    return jnp.asarray(images[order[n_test:]]), jnp.asarray(images[order[:n_test]])


def _dense(key, n_in, n_out):
    return {"w": jax.random.normal(key, (n_in, n_out)) * math.sqrt(1.0 / n_in), "b": jnp.zeros(n_out)}


def init_params(key):
    k = jax.random.split(key, 4)
    return {
        "enc": {"h": _dense(k[0], PIXELS, HIDDEN), "out": _dense(k[1], HIDDEN, 2 * LATENT)},
        "dec": {"h": _dense(k[2], LATENT, HIDDEN), "out": _dense(k[3], HIDDEN, PIXELS)},
    }


def _mlp(p, x):
    return jnp.tanh(x @ p["h"]["w"] + p["h"]["b"]) @ p["out"]["w"] + p["out"]["b"]


def decode(params, z):
    """Bernoulli logits of the pixels."""
    return _mlp(params["dec"], z)


@ppl.gen
def model(params, x):
    z = ppl.sample("z", dist.Normal(0.0, 1.0).expand((x.shape[0], LATENT)).to_event(2))
    ppl.sample("x", dist.Bernoulli(logits=decode(params, z)).to_event(2), obs=x)


@ppl.gen
def guide(params, x):
    loc, log_scale = jnp.split(_mlp(params["enc"], x), 2, axis=-1)
    ppl.sample("z", dist.Normal(loc, jnp.exp(log_scale)).to_event(2))


def per_image(objective, batch_size):
    """The objective averaged over the images of a batch (so step sizes do not depend on it)."""

    @ppl.expectation
    def scaled(params, x):
        return objective(params, x) / batch_size

    return scaled


def objective(name, batch_size, num_particles=5):
    """The named objective (elbo, iwae, dreg or rws), per image."""
    builders = {
        "elbo": lambda: ppl.objectives.elbo(model, guide),
        "iwae": lambda: ppl.objectives.iwae(model, guide, num_particles),
        "dreg": lambda: ppl.objectives.dreg(model, guide, num_particles),
        "rws": lambda: _rws(num_particles),
    }
    return per_image(builders[name](), batch_size)


def _rws(num_particles):
    wake_p = ppl.objectives.rws_wake_p(model, guide, num_particles)
    wake_q = ppl.objectives.rws_wake_q(model, guide, num_particles)

    @ppl.expectation
    def both(params, x):
        return wake_p(params, x) + wake_q(params, x)

    return both


def held_out_log_likelihood(key, params, x, num_particles=100):
    """Per-image IWAE estimate of log p(x) (a lower bound in expectation)."""
    bound = ppl.objectives.iwae(model, guide, num_particles)
    one = lambda k, image: bound.estimate(k, params, image[None])
    return jnp.mean(jax.vmap(one)(jax.random.split(key, x.shape[0]), x))


def train(name="elbo", steps=3000, batch_size=64, seed=0, progress=True):
    """Fit the VAE with one of `objective`'s names; returns (params, losses, train, test)."""
    key = jax.random.key(seed)
    train_x, test_x = load_digits()
    params = init_params(key)
    params, losses = ppl.fit(
        objective(name, batch_size),
        params,
        train_x,
        optimizer=optax.adam(optax.cosine_decay_schedule(3e-3, steps)),
        steps=steps,
        key=key,
        batch_size=batch_size,
        progress=progress,
    )
    return params, losses, train_x, test_x


def main(argv=sys.argv[1:]):
    name = argv[0] if argv else "elbo"
    params, losses, _, test_x = train(name)
    ll = held_out_log_likelihood(jax.random.key(1), params, test_x)
    print(f"objective {name}: final training loss per image {float(jnp.mean(losses[-100:])):.2f}")
    print(f"held-out log-likelihood per image (IWAE, K=100, {test_x.shape[0]} images): {float(ll):.2f} nats")
    _figure(params, losses, test_x)


def _figure(params, losses, test_x):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recon_trace = guide.simulate(jax.random.key(2), params, test_x[:8])
    recon = jax.nn.sigmoid(decode(params, recon_trace.choices["z"]))
    samples = jax.nn.sigmoid(decode(params, jax.random.normal(jax.random.key(3), (8, LATENT))))
    fig, axes = plt.subplots(4, 8, figsize=(8, 5))
    rows = [(test_x[:8], "data"), (recon, "reconstruction"), (samples, "samples")]
    for r, (images, label) in enumerate(rows):
        for c in range(8):
            axes[r, c].imshow(np.asarray(images[c]).reshape(8, 8), cmap="gray_r")
            axes[r, c].axis("off")
        axes[r, 0].set_title(label, fontsize=8, loc="left")
    for c in range(8):
        axes[3, c].remove()
    curve = fig.add_subplot(4, 1, 4)
    window = 50
    smooth = np.convolve(np.asarray(losses), np.ones(window) / window, mode="valid")
    curve.plot(smooth)
    curve.set(xlabel="step", ylabel="loss / image")
    fig.tight_layout()
    fig.savefig("vae.png", dpi=100)
    print("wrote vae.png")


if __name__ == "__main__":
    main()
