"""Bayesian logistic regression: w ~ N(0, I_D), y_i ~ Bernoulli(logits = x_i . w).

Two guides, both automatic (`ppl.autoguide`): a mean-field Gaussian (independent coordinates, as
NumPyro's AutoNormal) and a full-rank Gaussian (AutoMultivariateNormal), which can represent the
posterior correlation between the weights of correlated features. The data are synthetic: a
design whose columns are correlated (correlation `rho`) and labels drawn from the model at fixed
true weights, with a fixed seed. See e.g. Jaakkola & Jordan (2000) for variational logistic
regression.

`python -m models.logreg` fits both guides with `ppl.fit`, prints the posterior means and the
full-rank correlation matrix, and writes `logreg.png`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ppl
from ppl import dist

TRUE_W = jnp.array([1.5, -2.0, 0.5, 1.0])


@ppl.gen
def model(params, x, y):
    w = ppl.sample("w", dist.Normal(0.0, 1.0).expand((x.shape[1],)).to_event(1))
    ppl.sample("y", dist.Bernoulli(logits=x @ w).to_event(1), obs=y)
    return w


def make_data(n=500, w=TRUE_W, rho=0.0, seed=0):
    """(x, y): n rows of D = len(w) standard normal features with pairwise correlation `rho`,
    labels y ~ Bernoulli(logits = x w)."""
    d = w.shape[0]
    kx, ky = jax.random.split(jax.random.key(seed))
    cov = (1.0 - rho) * jnp.eye(d) + rho * jnp.ones((d, d))
    x = jax.random.multivariate_normal(kx, jnp.zeros(d), cov, (n,))
    y = jax.random.bernoulli(ky, jax.nn.sigmoid(x @ w)).astype(jnp.float32)
    return x, y


def guides(x, y):
    """{"mean_field": (guide, params), "full_rank": (guide, params)} for this data."""
    return {
        "mean_field": ppl.autoguide.mean_field(model, None, x, y, init="zero"),
        "full_rank": ppl.autoguide.full_rank(model, None, x, y, init="zero"),
    }


def fit(guide, params, x, y, steps=2000, learning_rate=0.02, seed=0, progress=True):
    """Maximize the ELBO; returns (params, losses)."""
    return ppl.fit(
        ppl.objectives.elbo(model, guide),
        params,
        x,
        y,
        optimizer=optax.adam(learning_rate),
        steps=steps,
        key=jax.random.key(seed),
        progress=progress,
    )


def posterior_mean(guide, params, x, y):
    """The guide's mean of w (the unconstrained loc: w lives on the real line)."""
    return guide.median(params, x, y)["w"]


def main():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, y = make_data(n=300, rho=0.8)
    print(f"true weights: {np.asarray(TRUE_W)}  (features correlated, rho = 0.8; n = {x.shape[0]})")
    results = {}
    for name, (guide, params) in guides(x, y).items():
        params, losses = fit(guide, params, x, y)
        results[name] = (guide, params, losses)
        print(
            f"{name:>10}: posterior mean {np.round(np.asarray(posterior_mean(guide, params, x, y)), 3)}  "
            f"final -ELBO (last 100 steps) {float(jnp.mean(losses[-100:])):.3f}"
        )
    guide, params, _ = results["full_rank"]
    cov = guide.covariance(params)
    sd = jnp.sqrt(jnp.diag(cov))
    print("full-rank posterior correlation of w:")
    print(np.round(np.asarray(cov / jnp.outer(sd, sd)), 2))

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for name, (_, _, losses) in results.items():
        a.plot(np.convolve(np.asarray(losses), np.ones(50) / 50, mode="valid"), label=name)
    a.set(xlabel="step", ylabel="-ELBO (moving average)", title="training")
    a.legend()
    idx = np.arange(TRUE_W.shape[0])
    for offset, (name, (g, p, _)) in zip((-0.15, 0.15), results.items()):
        mean = np.asarray(posterior_mean(g, p, x, y))
        if name == "full_rank":
            err = np.sqrt(np.diag(np.asarray(g.covariance(p))))
        else:
            err = np.exp(np.asarray(p["w"]["log_scale"]))
        b.errorbar(idx + offset, mean, yerr=2 * err, fmt="o", label=f"{name} (±2 sd)")
    b.scatter(idx, np.asarray(TRUE_W), marker="x", color="k", label="true")
    b.set(xlabel="weight", ylabel="value", title="posterior of w")
    b.legend()
    fig.tight_layout()
    fig.savefig("logreg.png", dpi=100)
    print("wrote logreg.png")


if __name__ == "__main__":
    main()
