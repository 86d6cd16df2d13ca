"""Prior and posterior predictive simulation (NumPyro's `Predictive`).

    sample = ppl.predictive(model, guide, num_samples=1000)
    draws = sample(key, params, x)        # {"mu": (1000,), "x": (1000, n)}: every site, stacked

Each draw takes the latents from `guide(params, *args)` (or from the prior when there is no
guide, or from `posterior_samples`, e.g. an MCMC run's), then simulates the rest of the model with
its observed sites *not* clamped to the data: `obs=` sites are drawn afresh from their
distributions (the posterior predictive; the prior predictive without a guide). Downstream
computations see the fresh draws. `unobserved(model)` is that transformation on its own.

For new inputs, pass None for the observation, as in NumPyro (`obs=None` is an unobserved site):
`ppl.predictive(model, guide, 1000)(key, params, x_new, None)["y"]` are draws of y at x_new. An
autoguide built with y observed ignores the site then (it is no choice of the guide).
"""

import functools

import jax
import jax.numpy as jnp

from ppl.autoguide import bind_site, observed_addresses
from ppl.choicemap import flatten_choices, nest_choices
from ppl.gen import GenerativeFunction
from transforms import interpreter
from transforms.primitives import format_address, sample_p

__all__ = ["predictive", "unobserved"]


class _Unobserve:
    """Re-binds every observed site as an ordinary site of its base distribution; the other
    sites are re-bound as they are."""

    def site(self, site, carry, read):
        if not site.observed:
            return sample_p.bind(*site.leaves, **site.params), carry, None
        draw = lambda d, e: bind_site(site.address, d.base, site.scale)
        return site.map(draw, site.leaves).astype(site.value_dtype), carry, None


def unobserved(gen_fn):
    """A copy of `gen_fn` whose observed (`obs=`) sites are ordinary sample sites: simulating it
    draws them from their distributions instead of returning the data."""
    if not isinstance(gen_fn, GenerativeFunction):
        raise TypeError(f"expected a generative function (decorate it with @ppl.gen), got {gen_fn!r}")

    def fn(*args):
        closed, flat, out_tree = gen_fn.stage(*args)
        outs, _, _ = interpreter.run(closed.jaxpr, closed.consts, flat, _Unobserve(), None, {})
        return jax.tree_util.tree_unflatten(out_tree, outs)

    return GenerativeFunction(functools.wraps(gen_fn.fn)(fn))


def predictive(model, guide=None, num_samples=None, posterior_samples=None, return_sites=None):
    """`sample(key, params, *args) -> ChoiceMap` of every site of `model(params, *args)`, each
    stacked along a leading axis of `num_samples` independent draws (vmapped, jitted).

    Latents come from `guide(params, *args)` when given (its sites that are not latent sites of
    the model are dropped), else from `posterior_samples` (a choice map stacked along its leading
    axis, which sets `num_samples`), else from the prior; observed sites are redrawn.
    `return_sites`: addresses to keep (default: all)."""
    if guide is not None and posterior_samples is not None:
        raise ValueError("predictive takes a guide or posterior_samples, not both")
    flat_posterior = None
    if posterior_samples is not None:
        flat_posterior = {a: jnp.asarray(v) for a, v in flatten_choices(posterior_samples).items()}
        sizes = {v.shape[0] if v.ndim else None for v in flat_posterior.values()}
        if len(sizes) != 1 or None in sizes:
            raise ValueError("posterior_samples must share one leading (sample) dimension")
        (n,) = sizes
        if num_samples is not None and num_samples != n:
            raise ValueError(f"num_samples={num_samples} but posterior_samples hold {n} draws")
        num_samples = n
    if num_samples is None:
        raise ValueError("predictive needs num_samples (or posterior_samples)")
    simulator = unobserved(model)
    keep = None if return_sites is None else {a if isinstance(a, tuple) else tuple(a.split("/")) for a in return_sites}

    def one(key, latents, params, args):
        guide_key, model_key = jax.random.split(key)
        if guide is not None:
            closed, _, _ = model.stage(params, *args)
            latent = set(interpreter.site_avals(closed.jaxpr)) - observed_addresses(closed.jaxpr)
            choices = flatten_choices(guide.simulate(guide_key, params, *args).choices)
            latents = {a: v for a, v in choices.items() if a in latent}
        trace, _ = simulator.generate(model_key, nest_choices(latents or {}), params, *args)
        flat = flatten_choices(trace.choices)
        if keep is not None:
            unknown = keep - set(flat)
            if unknown:
                raise KeyError(f"return_sites names unknown addresses: {', '.join(map(format_address, unknown))}")
            flat = {a: v for a, v in flat.items() if a in keep}
        return nest_choices(flat)

    @jax.jit
    def sample(key, params, *args):
        keys = jax.random.split(key, num_samples)
        return jax.vmap(lambda k, z: one(k, z, params, args))(keys, flat_posterior)

    return sample
