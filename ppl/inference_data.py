"""Draws to ArviZ: pointwise log-likelihoods and `InferenceData` (ArviZ is an optional extra,
`pip install ppl[arviz]`, imported only by `to_inference_data`).

    draws = ppl.predictive(model, guide, num_samples=1000)(key, params, x)    # every site
    posterior = {"w": draws["w"]}
    idata = ppl.to_inference_data(
        posterior=posterior,
        posterior_predictive={"y": draws["y"]},
        log_likelihood=ppl.log_likelihood(model, posterior, params, x, y),
        observed_data={"y": y},
    )
    az.loo(idata)          # PSIS-LOO from the pointwise log-likelihood

Addresses become variable names, nested ones joined with "/"; the leading axis of every array is
the draw, split into `num_chains` chains (ArviZ's (chain, draw, ...) layout).
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np

from ppl.autoguide import observed_addresses
from ppl.choicemap import flatten_choices, nest_choices
from transforms import gfi
from transforms.primitives import format_address


def log_likelihood(model, posterior_samples, *args):
    """{observed address: (num_samples, *elements)}: the log density of each observation (each
    element of each `obs=` site, unscaled) at each of the stacked `posterior_samples` (a choice
    map of the model's latent sites, leading axis = draw), as NumPyro's `infer.log_likelihood`.
    `args` are the model's arguments, e.g. `(params, x, y)`."""
    closed, flat_args, _ = model.stage(*args)
    observed = observed_addresses(closed.jaxpr)
    if not observed:
        raise ValueError(f"{model!r} has no observed (obs=) sites to give a log-likelihood for")
    flat = {a: jnp.asarray(v) for a, v in flatten_choices(posterior_samples).items()}

    def one(choices, flat_args):
        scores = gfi.site_scores(closed, flat_args, choices, per_element=True)
        return {a: scores[a] for a in observed}

    return nest_choices(jax.jit(jax.vmap(one, in_axes=(0, None)))(flat, flat_args))


def to_inference_data(
    posterior=None,
    *,
    posterior_predictive=None,
    prior=None,
    prior_predictive=None,
    log_likelihood=None,
    observed_data=None,
    num_chains=1,
    coords=None,
    dims=None,
):
    """An `arviz.InferenceData` from choice maps of stacked draws (leading axis = draw, e.g. from
    `ppl.predictive`) and a choice map of observed data (`observed_data`, not stacked)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # ArviZ 0.2x announces its 1.0 refactor on import
        import arviz as az

    groups = {
        "posterior": posterior,
        "posterior_predictive": posterior_predictive,
        "prior": prior,
        "prior_predictive": prior_predictive,
        "log_likelihood": log_likelihood,
    }
    data = {name: _chains(draws, num_chains, name) for name, draws in groups.items() if draws is not None}
    if observed_data is not None:
        data["observed_data"] = _named(observed_data)
    return az.from_dict(**data, coords=coords, dims=dims)


def _named(choices):
    return {format_address(a): np.asarray(v) for a, v in flatten_choices(choices).items()}


def _chains(draws, num_chains, group):
    named = _named(draws)
    out = {}
    for name, value in named.items():
        n = value.shape[0] if value.ndim else 0
        if n == 0 or n % num_chains:
            raise ValueError(
                f"{group}['{name}'] has {n} draws along its leading axis, which does not split into "
                f"num_chains={num_chains} chains"
            )
        out[name] = value.reshape((num_chains, n // num_chains) + value.shape[1:])
    return out
