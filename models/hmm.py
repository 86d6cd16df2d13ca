"""A discrete hidden Markov model with Gaussian emissions, written with `lax.scan`:

    z_1 ~ Categorical(INIT),  z_t | z_{t-1} ~ Categorical(TRANS[z_{t-1}]),  x_t ~ N(MEANS[z_t], SCALE)

with S = 2 states and known parameters. The first step uses a virtual start state S whose
transition row is INIT, so every step is the same scanned body. `ppl.marginal(model, [],
ppl.exact())` sums the states out through the scan (the forward algorithm, `transforms.exact`);
the hand-written forward algorithm (`log_marginal`) and forward-backward (`posterior_marginals`)
(Rabiner, 1989) are the oracles it is tested against.

The guide is mean field over the states, q(z) = prod_t Categorical(z_t; logits_t), drawn under
`jax.vmap` and trained with `ppl.enum()` at its site (local expectation gradients).

`learned_model` has three states whose initial and transition probabilities are parameters;
`fit_transitions` finds their maximum-likelihood values by maximizing the exact log-likelihood.

`python -m models.hmm` fits the guide with `ppl.fit`, compares its ELBO with log p(x) and its
marginals with the exact ones, decodes the path (Viterbi), and writes `hmm.png`.
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


def make_data(t=20, seed=0, init=INIT, trans=TRANS, means=MEANS):
    """(x, z): a state path and its emissions, drawn from the chain with a fixed seed."""
    key, rows = jax.random.key(seed), jnp.vstack([trans, init[None]])

    def step(prev, key):
        kz, kx = jax.random.split(key)
        z = jax.random.categorical(kz, jnp.log(rows[prev]))
        return z, (means[z] + SCALE * jax.random.normal(kx), z)

    _, (x, z) = jax.lax.scan(step, jnp.asarray(init.shape[0]), jax.random.split(key, t))
    return x, z


def exact_marginal(gen_fn=None):
    """The model (or `gen_fn`) with every state summed out: `ppl.density(...)({}, params, x)` is log p(x)."""
    return ppl.marginal(model if gen_fn is None else gen_fn, keep=[], algorithm=ppl.exact())


# -- three states with learned transitions ------------------------------------------------------

MEANS_3 = jnp.array([-2.0, 0.0, 2.0])
INIT_3 = jnp.array([0.6, 0.3, 0.1])
TRANS_3 = jnp.array([[0.8, 0.1, 0.1], [0.15, 0.7, 0.15], [0.05, 0.15, 0.8]])


@ppl.gen
def learned_model(params, x):
    """Like `model` with states at MEANS_3 and probabilities softmax(params["init_logits"]) and
    softmax(params["trans_logits"]) (row i: from state i)."""
    rows = jax.nn.softmax(jnp.vstack([params["trans_logits"], params["init_logits"][None]]), axis=-1)

    def step(prev, x_t):
        z = ppl.sample("z", dist.Categorical(probs=rows[prev]))
        ppl.sample("x", dist.Normal(MEANS_3[z], SCALE), obs=x_t)
        return z, None

    jax.lax.scan(step, jnp.asarray(MEANS_3.shape[0]), x)


def fit_transitions(x, steps=300, learning_rate=0.05, progress=False):
    """Maximum-likelihood (init, trans) of `learned_model` for data x, by `ppl.fit` of the exact
    log-likelihood from uniform starting probabilities."""
    marginal = exact_marginal(learned_model)
    log_likelihood = ppl.expectation(lambda params, x: ppl.density(marginal)({}, params, x) / x.shape[0])
    start = {"init_logits": jnp.zeros(3), "trans_logits": jnp.zeros((3, 3))}
    params, _ = ppl.fit(
        log_likelihood,
        start,
        x,
        optimizer=optax.adam(learning_rate),
        steps=steps,
        key=jax.random.key(0),
        progress=progress,
    )
    return jax.nn.softmax(params["init_logits"]), jax.nn.softmax(params["trans_logits"], axis=-1)


def log_emissions(x, means=MEANS):
    """(T, S): log N(x_t; means[s], SCALE)."""
    return dist.Normal(means, SCALE).log_prob(x[:, None])


def log_joint(x, z):
    """log p(x, z) by hand: the sum of the initial, transition and emission log probabilities."""
    log_init = jnp.log(INIT[z[0]])
    log_trans = jnp.sum(jnp.log(TRANS[z[:-1], z[1:]]))
    return log_init + log_trans + jnp.sum(log_emissions(x)[jnp.arange(x.shape[0]), z])


def _forward(x, init=INIT, trans=TRANS, means=MEANS):
    log_e = log_emissions(x, means)

    def step(log_alpha, log_e_t):
        log_alpha = logsumexp(log_alpha[:, None] + jnp.log(trans), axis=0) + log_e_t
        return log_alpha, log_alpha

    first = jnp.log(init) + log_e[0]
    _, rest = jax.lax.scan(step, first, log_e[1:])
    return jnp.concatenate([first[None], rest])


def log_marginal(x, init=INIT, trans=TRANS, means=MEANS):
    """log p(x) by the forward algorithm written by hand: alpha_t(s) = p(x_1..t, z_t = s)."""
    return logsumexp(_forward(x, init, trans, means)[-1])


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
    log_p = float(ppl.density(exact_marginal())({}, None, x))
    print(f"log p(x) (ppl.exact, the forward algorithm): {log_p:.3f} (by hand: {float(log_marginal(x)):.3f})")
    se = float(jnp.std(est) / jnp.sqrt(est.size))
    print(f"ELBO of the fitted mean-field guide: {float(jnp.mean(est)):.3f} ± {se:.3f}")
    print(f"max |q(z_t = 1) - p(z_t = 1 | x)|: {float(jnp.max(jnp.abs(q[:, 1] - exact[:, 1]))):.3f}")
    decoded = float(jnp.mean(jnp.argmax(exact, 1) == z))
    print(f"states decoded by argmax p(z_t | x) that match the true path: {decoded:.2f}")
    viterbi = exact_marginal().map({}, None, x)["z"]
    print(f"states of the Viterbi path that match the true path: {float(jnp.mean(viterbi == z)):.2f}")

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
