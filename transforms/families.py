"""Per-coordinate views of NumPyro distributions, for estimators that fork one coordinate at a time
(enumeration of batched sites, measure-valued derivatives).

A *coordinate* is one scalar draw of the base family after unwrapping `expand`/`to_event`
(e.g. `Normal(mu, 1).expand((3,))` has 3 coordinates). `coordinate_params(d, names)` returns the
base family's parameters broadcast to one row per coordinate.

Measure-valued derivatives: d/dθ p_θ = c_θ (p⁺ − p⁻). `MVD_FAMILIES[name](params, tangents, x, key)`
returns `(replacements, weights, main_weight)`: the continuation is re-run with coordinate i set to
each replacement, its value weighted by the (tangent) weight; `main_weight` multiplies the value of
the un-forked run (the p⁻ side when p⁻ is the distribution itself).
"""

import math

import jax
import jax.numpy as jnp
import numpyro.distributions as nd


def unwrap(d):
    """The base family under `ExpandedDistribution` / `Independent` wrappers."""
    while isinstance(d, (nd.ExpandedDistribution, nd.Independent)):
        d = d.base_dist
    return d


def coordinate_shape(d):
    """Shape of the grid of coordinates of one draw of `d`."""
    base = unwrap(d)
    full = d.batch_shape + d.event_shape
    return full[: len(full) - len(base.event_shape)]


def coordinate_params(d, names):
    """{name: base parameter broadcast to coordinate_shape(d) + its own trailing shape}."""
    base, shape = unwrap(d), coordinate_shape(d)
    out = {}
    for name in names:
        value = jnp.asarray(getattr(base, name))
        tail = value.shape[len(base.batch_shape) :]
        out[name] = jnp.broadcast_to(value, shape + tail)
    return out


def support_probs(d):
    """Probabilities of the values of `unwrap(d).enumerate_support(expand=False)`, in order (last
    axis), read off the parameters of a Bernoulli or Categorical (no log/exp round trip, which keeps
    enumerated gradient programs small); only for families where `has_support_probs(d)`.

        >>> support_probs(nd.Bernoulli(probs=0.25))        # [0.75, 0.25]
    """
    return _SUPPORT_PROBS[family_name(d)](unwrap(d))


def has_support_probs(d):
    """Whether `support_probs(d)` has a formula for `d`."""
    return family_name(d) in _SUPPORT_PROBS


_SUPPORT_PROBS = {
    "bernoulli": lambda base: jnp.stack([1.0 - base.probs, base.probs], -1),
    "categorical": lambda base: base.probs,
}


def family_name(d):
    base = unwrap(d)
    for name, cls in _FAMILY_CLASSES.items():
        if isinstance(base, cls):
            return name
    return None


_FAMILY_CLASSES = {
    "bernoulli": nd.BernoulliProbs | nd.BernoulliLogits,
    "categorical": nd.CategoricalProbs | nd.CategoricalLogits,
    "poisson": nd.Poisson,
    "geometric": nd.GeometricProbs | nd.GeometricLogits,
    "normal": nd.Normal,
}


def _bernoulli(params, tangents, x, key):
    dp = tangents["probs"]
    n = dp.shape[0]
    ones, zeros = jnp.ones(n, x.dtype), jnp.zeros(n, x.dtype)
    return (jnp.stack([ones, zeros]), jnp.stack([dp, -dp]), jnp.zeros((), dp.dtype))


def _categorical(params, tangents, x, key):
    dpi = tangents["probs"]  # (n, m)
    n, m = dpi.shape
    values = jnp.broadcast_to(jnp.arange(m, dtype=x.dtype)[:, None], (m, n))
    return values, dpi.T, -jnp.sum(dpi)


def _poisson(params, tangents, x, key):
    drate = tangents["rate"]
    return (x + 1)[None], drate[None], -jnp.sum(drate)


def _geometric(params, tangents, x, key):
    p, dp = params["probs"], tangents["probs"]
    # d/dp Geom(p) = (1/p) [Geom(p) - law of (X + Y + 1)], X, Y ~ Geom(p) independent.
    y = nd.Geometric(probs=p).sample(key)
    return (x + y + 1).astype(x.dtype)[None], (-dp / p)[None], jnp.sum(dp / p)


def _normal(params, tangents, x, key):
    mu, sigma = params["loc"], params["scale"]
    dmu, dsigma = tangents["loc"], tangents["scale"]
    k1, k2, k3 = jax.random.split(key, 3)
    # d/dmu: c (mu + sigma R) - c (mu - sigma R), R ~ Rayleigh(1), c = 1 / (sigma sqrt(2 pi)).
    rayleigh = jnp.sqrt(-2.0 * jnp.log1p(-jax.random.uniform(k1, mu.shape)))
    # d/dsigma: (1/sigma) [mu + sigma S M] - (1/sigma) N(mu, sigma), M ~ Maxwell (chi, 3 dof), S = +-1.
    maxwell = jnp.sqrt(jnp.sum(jax.random.normal(k2, (3,) + mu.shape) ** 2, axis=0))
    sign = jnp.where(jax.random.bernoulli(k3, 0.5, mu.shape), 1.0, -1.0)
    c = 1.0 / (sigma * math.sqrt(2.0 * math.pi))
    values = jnp.stack([mu + sigma * rayleigh, mu - sigma * rayleigh, mu + sigma * sign * maxwell])
    weights = jnp.stack([c * dmu, -c * dmu, dsigma / sigma])
    return values.astype(x.dtype), weights, -jnp.sum(dsigma / sigma)


MVD_FAMILIES = {
    "bernoulli": (("probs",), _bernoulli),
    "categorical": (("probs",), _categorical),
    "poisson": (("rate",), _poisson),
    "geometric": (("probs",), _geometric),
    "normal": (("loc", "scale"), _normal),
}
