"""The generative-function interface as handlers for the shared interpreter.

Each function takes a staged program (`ClosedJaxpr`) and its flat arguments; choices are flat
dicts from address tuples to values.

    simulate(closed, args, key)            -> (outs, choices, score)
    assess(closed, args, choices)          -> (score, outs)
    site_scores(closed, args, choices)     -> {address: log density} (or per element)
    generate(closed, args, key, constraints) -> (outs, choices, score, weight)
    staged_simulate(closed, args)          -> (outs, choices, score)   # re-emits the sites
    staged_generate(closed, args, constraints, weigh) -> (outs, choices, weight)
    rebind(closed, args, prefix, overrides, scale) -> outs   # renames / re-estimates / rescales

`staged_simulate` is simulate *inside* another staged program (an expectation): the sites stay
sites, so the enclosing transformation (ADEV) chooses how to sample and differentiate them.
"""

import jax
import jax.numpy as jnp

from transforms import checks, interpreter
from transforms.primitives import format_address, sample_p, typed_key


def _score_zero():
    return jnp.zeros((), jnp.result_type(float))


def _conform(site, value):
    """A given choice as an array of the site's shape. Integer values take the site's dtype (a
    Python int at a Normal site becomes a float); a float value at an integer site stays a float
    (truncating 0.5 to 0 would silently change the density)."""
    value = jnp.asarray(value)
    checks.check_not_complex(site.name, value)
    if jnp.shape(value) != site.value_shape:
        raise ValueError(
            f"shape mismatch at address '{site.name}': the model draws shape {site.value_shape} "
            f"there, the given value has shape {jnp.shape(value)}"
        )
    if jnp.issubdtype(site.value_dtype, jnp.inexact) or not jnp.issubdtype(value.dtype, jnp.inexact):
        value = value.astype(site.value_dtype)
    return value


def _as_arrays(choices):
    return {address: as_value(value, address) for address, value in choices.items()}


def as_value(value, address):
    """`value` (an array, a number or a nested list of numbers) as a JAX array; anything else
    raises a TypeError naming the address."""
    try:
        return jnp.asarray(value)
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"the value at address '{format_address(address)}' must be an array or a number, got {type(value).__name__}"
        ) from e


class _Simulate:
    def site(self, site, carry, read):
        key, score = carry
        key, sub = jax.random.split(key)
        value = site.sample(sub)
        return value, (key, score + site.log_prob(value, given=site.observed)), value


class _StagedSimulate:
    def site(self, site, score, read):
        value = sample_p.bind(*site.leaves, **site.params)
        return value, score + site.log_prob(value, given=site.observed), value


class _StagedGenerate:
    """Unconstrained sites stay sites; the weight sums the log densities of the constrained
    sites whose address is in `weigh` (all constrained sites when `weigh` is None)."""

    def __init__(self, weigh):
        self.weigh = weigh

    def site(self, site, weight, read):
        if read is None:
            value = sample_p.bind(*site.leaves, **site.params)
            return value, weight, value
        read = _conform(site, read)
        if self.weigh is None or site.address in self.weigh:
            weight = weight + site.log_prob(read, given=True)
        return read, weight, None


class _Assess:
    """Reads every site's choice and sums log densities; with `record`, also writes each site's
    (scaled) log density at its address, or with `record="elements"` its unscaled log density
    per element (`Site.log_prob_elements`)."""

    def __init__(self, record=False):
        self.record = record

    def site(self, site, score, read):
        if read is None:
            raise KeyError(f"no value for address '{site.name}': assess/density needs a choice for every site")
        read = _conform(site, read)
        if self.record == "elements":
            elements = site.log_prob_elements(read, given=True)
            return read, score + site.scaled(jnp.sum(elements)), elements
        lp = site.log_prob(read, given=True)
        return read, score + lp, lp if self.record else None


class _Generate:
    def site(self, site, carry, read):
        key, score, weight = carry
        key, sub = jax.random.split(key)
        if read is None:
            value = site.sample(sub)
            return value, (key, score + site.log_prob(value), weight), value
        read = _conform(site, read)
        lp = site.log_prob(read, given=True)
        return read, (key, score + lp, weight + lp), read


class _Rebind:
    def __init__(self, prefix, overrides, scale):
        self.prefix, self.overrides, self.scale = tuple(prefix), overrides, scale

    def site(self, site, carry, read):
        params = dict(site.params, address=self.prefix + site.address, scale=site.scale * self.scale)
        leaves = site.leaves
        if site.address in self.overrides:
            distribution = site.distribution
            estimator = self.overrides[site.address]
            if estimator is not None:
                estimator.check(distribution, site.address)
            n_dist = site.params["treedef"].children()[0].num_leaves
            est_leaves, est_def = jax.tree_util.tree_flatten(estimator)
            est_leaves = [jnp.broadcast_to(jnp.asarray(x), site.batch_shape + jnp.shape(x)) for x in est_leaves]
            params["treedef"] = jax.tree_util.tree_structure((distribution, estimator))
            leaves = tuple(site.leaves[:n_dist]) + tuple(est_leaves)
        return sample_p.bind(*leaves, **params), carry, None


def check_known(closed, choices, what):
    """Raise if `choices` names an address the program has no site for."""
    known = interpreter.site_avals(closed.jaxpr)
    for address in choices:
        if address not in known:
            listed = ", ".join(sorted(map(format_address, known))) or "none"
            hint = ""
            if any("/" in str(name) for name in address):
                hint = "; nested addresses are nested dicts, e.g. {'enc': {'h': value}}, not 'enc/h' keys"
            raise KeyError(
                f"unknown address '{format_address(address)}' in {what}; the program's addresses are: {listed}{hint}"
            )


def simulate(closed, args, key):
    key = typed_key(key)
    outs, (_, score), choices = interpreter.run(
        closed.jaxpr, closed.consts, args, _Simulate(), (key, _score_zero()), {}
    )
    return outs, choices, score


def staged_simulate(closed, args):
    outs, score, choices = interpreter.run(closed.jaxpr, closed.consts, args, _StagedSimulate(), _score_zero(), {})
    return outs, choices, score


def staged_generate(closed, args, constraints, weigh=None):
    check_known(closed, constraints, "the constraints")
    outs, weight, choices = interpreter.run(
        closed.jaxpr, closed.consts, args, _StagedGenerate(weigh), _score_zero(), _as_arrays(constraints)
    )
    return outs, choices, weight


def assess(closed, args, choices):
    check_known(closed, choices, "the choices")
    outs, score, _ = interpreter.run(closed.jaxpr, closed.consts, args, _Assess(), _score_zero(), _as_arrays(choices))
    return score, outs


def site_scores(closed, args, choices, per_element=False):
    """{address: log density of its value} (values inside a scan are per step); with
    `per_element`, unscaled and one per element of the site (its batch shape)."""
    check_known(closed, choices, "the choices")
    handler = _Assess(record="elements" if per_element else True)
    _, _, scores = interpreter.run(closed.jaxpr, closed.consts, args, handler, _score_zero(), _as_arrays(choices))
    return scores


def generate(closed, args, key, constraints):
    key = typed_key(key)
    check_known(closed, constraints, "the constraints")
    zero = _score_zero()
    outs, (_, score, weight), choices = interpreter.run(
        closed.jaxpr, closed.consts, args, _Generate(), (key, zero, zero), _as_arrays(constraints)
    )
    return outs, choices, score, weight


def rebind(closed, args, prefix=(), overrides=None, scale=1.0):
    overrides = overrides or {}
    check_known(closed, overrides, "the estimator overrides")
    outs, _, _ = interpreter.run(closed.jaxpr, closed.consts, args, _Rebind(prefix, overrides, scale), None, {})
    return outs
