"""A discrete hidden Markov model with Gaussian emissions, written with `lax.scan`:

    z_1 ~ Categorical(INIT),  z_t | z_{t-1} ~ Categorical(TRANS[z_{t-1}]),  x_t ~ N(MEANS[z_t], SCALE)

with S = 2 states and known parameters. The first step uses a virtual start state S whose
transition row is INIT, so every step is the same scanned body. The exact marginal likelihood
log p(x) comes from the forward algorithm (`log_marginal`) and the exact posterior marginals
p(z_t | x) from forward-backward (`posterior_marginals`) (Rabiner, 1989).

The guide is mean field over the states, q(z) = prod_t Categorical(z_t; logits_t), drawn under
`jax.vmap` and trained with `ppl.enum()` at its site (local expectation gradients). `ppl.enum` is
a gradient estimator, not a marginalization: `ppl` cannot sum the model's states out through the
scan (the forward algorithm) by itself, so the forward algorithm is written by hand here. (Enum
at sites *inside* a scan is limited to short top-level scans, unrolled; this module does not rely
on it: the guide's sites are under `vmap`.)

`python -m models.hmm` fits the guide with `ppl.fit`, compares its ELBO with log p(x) and its
marginals with the exact ones, and writes `hmm.png`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.scipy.special import logsumexp

import ppl
from ppl import dist

S = 2
INIT = jnp.array([0.5, 0.5])
TRANS = jnp.array([[0.9, 0.1], [0.2, 0.8]])
MEANS = jnp.array([-1.0, 1.5])
SCALE = 0.8
_ROWS = jnp.vstack([TRANS, INIT[None]])  # row S: the virtual start state


@ppl.gen
def model(params, x):
    def step(prev, x_t):
        z = ppl.sample("z", dist.Categorical(probs=_ROWS[prev]))
        ppl.sample("x", dist.Normal(MEANS[z], SCALE), obs=x_t)
        return z, None

    jax.lax.scan(step, jnp.asarray(S), x)


@ppl.gen
def guide(params, x):
    jax.vmap(lambda logits: ppl.sample("z", dist.Categorical(logits=logits)))(params["logits"])


def init_params(t):
    return {"logits": jnp.zeros((t, S))}


def make_data(t=20, seed=0):
    """(x, z): a state path and its emissions, drawn from the model with a fixed seed."""
    key = jax.random.key(seed)

    def step(prev, key):
        kz, kx = jax.random.split(key)
        z = jax.random.categorical(kz, jnp.log(_ROWS[prev]))
        return z, (MEANS[z] + SCALE * jax.random.normal(kx), z)

    _, (x, z) = jax.lax.scan(step, jnp.asarray(S), jax.random.split(key, t))
    return x, z


def log_emissions(x):
    """(T, S): log N(x_t; MEANS[s], SCALE)."""
    return dist.Normal(MEANS, SCALE).log_prob(x[:, None])


def log_joint(x, z):
    """log p(x, z) by hand: the sum of the initial, transition and emission log probabilities."""
    log_init = jnp.log(INIT[z[0]])
    log_trans = jnp.sum(jnp.log(TRANS[z[:-1], z[1:]]))
    return log_init + log_trans + jnp.sum(log_emissions(x)[jnp.arange(x.shape[0]), z])


def _forward(x):
    log_e = log_emissions(x)

    def step(log_alpha, log_e_t):
        log_alpha = logsumexp(log_alpha[:, None] + jnp.log(TRANS), axis=0) + log_e_t
        return log_alpha, log_alpha

    first = jnp.log(INIT) + log_e[0]
    _, rest = jax.lax.scan(step, first, log_e[1:])
    return jnp.concatenate([first[None], rest])


def log_marginal(x):
    """log p(x) by the forward algorithm: alpha_t(s) = p(x_1..t, z_t = s)."""
    return logsumexp(_forward(x)[-1])


def posterior_marginals(x):
    """(T, S): p(z_t = s | x) by forward-backward."""
    log_e = log_emissions(x)

    def step(log_beta, log_e_next):
        log_beta = logsumexp(jnp.log(TRANS) + (log_e_next + log_beta)[None, :], axis=1)
        return log_beta, log_beta

    _, betas = jax.lax.scan(step, jnp.zeros(S), log_e[1:], reverse=True)
    log_beta = jnp.concatenate([betas, jnp.zeros((1, S))])
    log_post = _forward(x) + log_beta
    return jnp.exp(log_post - logsumexp(log_post, axis=1, keepdims=True))


def elbo():
    return ppl.objectives.elbo(model, ppl.with_estimators(guide, {"z": ppl.enum()}))


def main():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, z = make_data()
    params, losses = ppl.fit(
        elbo(), init_params(x.shape[0]), x, optimizer=optax.adam(0.1), steps=1000, key=jax.random.key(0)
    )
    exact = posterior_marginals(x)
    q = jax.nn.softmax(params["logits"], axis=-1)
    objective = elbo()
    est = jax.jit(jax.vmap(lambda k: objective.estimate(k, params, x)))(jax.random.split(jax.random.key(1), 2000))
    print(f"T = {x.shape[0]}, S = {S}")
    print(f"log p(x) (forward algorithm): {float(log_marginal(x)):.3f}")
    se = float(jnp.std(est) / jnp.sqrt(est.size))
    print(f"ELBO of the fitted mean-field guide: {float(jnp.mean(est)):.3f} ± {se:.3f}")
    print(f"max |q(z_t = 1) - p(z_t = 1 | x)|: {float(jnp.max(jnp.abs(q[:, 1] - exact[:, 1]))):.3f}")
    decoded = float(jnp.mean(jnp.argmax(exact, 1) == z))
    print(f"states decoded by argmax p(z_t | x) that match the true path: {decoded:.2f}")

    t = np.arange(x.shape[0])
    fig, (a, b) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    a.plot(t, np.asarray(x), "o-", label="x_t")
    a.step(t, np.asarray(MEANS[z]), where="mid", label="MEANS[true z_t]")
    a.legend()
    a.set(title="data")
    b.plot(t, np.asarray(exact[:, 1]), "o-", label="p(z_t = 1 | x) (forward-backward)")
    b.plot(t, np.asarray(q[:, 1]), "s--", label="q(z_t = 1) (mean field, enum)")
    b.set(xlabel="t", ylim=(-0.05, 1.05))
    b.legend()
    fig.tight_layout()
    fig.savefig("hmm.png", dpi=100)
    print("wrote hmm.png")


if __name__ == "__main__":
    main()
