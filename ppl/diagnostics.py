"""Diagnostics: where an objective's value comes from, and how noisy its gradient is.

    contributions = ppl.diagnostics.site_contributions(key, model, guide, params, x, num_samples=200)
    # {"z": {"log_p": ..., "log_q": ...}, "x": {"log_p": ...}}: per-site terms of the ELBO
    stats = ppl.diagnostics.gradient_stats(key, objective, params, x, num_samples=200)
    # pytree like params of {"mean", "std", "snr"}: a parameter with low |snr| has a noisy estimator

With an automatic guide (parameters keyed by address) or any guide whose parameters belong to one
site, a low signal-to-noise ratio points at the site to give a better estimator
(`ppl.with_estimators`).
"""

import jax
import jax.numpy as jnp

from ppl.choicemap import flatten_choices, nest_choices
from transforms import gfi


def site_log_densities(gen_fn, choices, *args):
    """{address: log density of its choice} (observed sites included; per-step values of sites
    inside a scan are summed)."""
    closed, flat, _ = gen_fn.stage(*args)
    scores = gfi.site_scores(closed, flat, flatten_choices(choices))
    return nest_choices({a: jnp.sum(v) for a, v in scores.items()})


def site_contributions(key, model, guide, params, *args, num_samples=100):
    """Mean per-site log p (model) and log q (guide) over draws from the guide; the ELBO is the
    sum of the log_p terms minus the sum of the log_q terms. Sites are flat address strings."""

    def one(key):
        trace = guide.simulate(key, params, *args)
        log_q = flatten_choices(site_log_densities(guide, trace.choices, params, *args))
        log_p = flatten_choices(site_log_densities(model, trace.choices, params, *args))
        return log_p, log_q

    log_p, log_q = jax.vmap(one)(jax.random.split(key, num_samples))
    out = {}
    for terms, name in ((log_p, "log_p"), (log_q, "log_q")):
        for address, values in terms.items():
            out.setdefault("/".join(address), {})[name] = jnp.mean(values)
    return out


def gradient_stats(key, objective, params, *args, num_samples=100):
    """Mean, standard deviation and signal-to-noise ratio |mean| / std of each gradient
    coordinate over `num_samples` independent estimates."""
    grads = jax.vmap(lambda k: objective.grad_estimate(k, params, *args))(jax.random.split(key, num_samples))

    def stats(g):
        mean, std = jnp.mean(g, 0), jnp.std(g, 0)
        return {"mean": mean, "std": std, "snr": jnp.abs(mean) / jnp.maximum(std, jnp.finfo(g.dtype).tiny)}

    return jax.tree.map(stats, grads)
