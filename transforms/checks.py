"""What makes a site's numbers meaningful: parameters inside their constraints and given values
(observations, choices) inside the support.

Both are checked where a site's log density is computed (`Site.log_prob`). A check whose result
is concrete (the values are known at trace time: eager calls, constants) raises at once, naming
the address; a check on traced values (under `jax.jit`) cannot raise, so it shapes the number
instead, with NumPyro's semantics: a value outside the support has log density -inf, and a site
whose parameters are invalid has log density NaN (which `ppl.fit` reports as a non-finite step).

    >>> parameter_flags(dist.Normal(0.0, -1.0))   # {"Normal's parameter 'scale' must be in ...": False}
    >>> support_flag(dist.Bernoulli(0.3), 2.0)    # Array(False)
"""

import jax
import jax.numpy as jnp
import numpyro.distributions as nd
from jax import lax
from numpyro.distributions import constraints

from transforms import compat


def _is_real(constraint):
    """Whether `constraint` only asks for finite real numbers (NaN there shows up on its own)."""
    while hasattr(constraint, "base_constraint"):  # `to_event`: the base's, per element
        constraint = constraint.base_constraint
    return isinstance(constraint, constraints.real.__class__)


def _layers(d):
    """`d` and the distributions it wraps (`expand`, `to_event`, masks, transforms, observations)."""
    while d is not None:
        yield d
        d = getattr(d, "base_dist", None) or getattr(d, "base", None)


def parameter_flags(d):
    """{description: whether it holds} for the parameters of `d` (and of what it wraps) whose
    constraint is more than 'real', can be checked on its own, and is cheap: matrix constraints
    (positive definite, Cholesky factors) would cost a factorization per evaluation and are left
    to NumPyro."""
    flags = {}
    for layer in _layers(d):
        if not isinstance(layer, nd.Distribution):
            break
        for name, value in layer.get_args().items():
            constraint = layer.arg_constraints[name]
            if not constraints.is_dependent(constraint) and not _is_real(constraint) and constraint.event_dim <= 1:
                rule = f"{display_name(layer)}'s parameter '{name}' must be in {constraint}"
                flags[rule] = _all(_holds(constraint, value))
    return flags


def _holds(constraint, value):
    """`constraint(value)`, except that a simplex may be off 1 by float32 rounding: NumPyro allows
    1e-6, which probabilities normalized over a few hundred categories already exceed."""
    if constraint is constraints.simplex:
        return jnp.all(value >= 0, axis=-1) & (jnp.abs(jnp.sum(value, axis=-1) - 1) < 1e-4)
    return constraint(value)


def checks_support(d, value):
    """Whether a given `value` at a site of `d` gets a support check: not when the support is
    the real numbers and `value` is traced (NaN and infinities then show up in the density)."""
    support = d.support
    return not constraints.is_dependent(support) and not (_is_real(support) and not compat.is_concrete(value))


def support_flag(d, value):
    """Whether `value` lies in the support of `d` (all of it)."""
    return _all(d.support(value))


def _failed(flag):
    """Whether `flag` is known now to be False somewhere (call under `ensure_compile_time_eval`)."""
    return compat.is_concrete(flag) and not bool(jnp.all(flag))


def display_name(d):
    """The family a user wrote (`Bernoulli` for NumPyro's `BernoulliProbs`, `Normal` for an
    observed, expanded Normal)."""
    layers = [layer for layer in _layers(d) if isinstance(layer, nd.Distribution)]
    base = next((layer for layer in layers if type(layer).__name__ not in _WRAPPERS), layers[-1])
    name = type(base).__name__
    for suffix in ("Probs", "Logits"):
        name = name.removesuffix(suffix)
    return name


_WRAPPERS = {"Observed", "ExpandedDistribution", "Independent", "MaskedDistribution"}


def check_not_complex(address, value):
    if jnp.issubdtype(jnp.result_type(value), jnp.complexfloating):
        raise TypeError(f"complex value at address '{address}': sample sites take real or integer values")


def check_given(address, d, value):
    """Raise if a value handed in for a site (an observation, a choice) cannot be one of its
    values: complex, or known now to lie outside the support of `d`."""
    check_not_complex(address, value)
    if checks_support(d, value):
        with jax.ensure_compile_time_eval():
            if _failed(support_flag(d, value)):
                raise ValueError(_outside(address, d, value))


def _outside(address, d, value):
    return (
        f"value outside the support at address '{address}': {display_name(d)} has support "
        f"{d.support}, the given value is {_short(value)}"
    )


def guard(address, family, log_prob, param_flags, in_support, value=None):
    """`log_prob` of a site (a scalar, or one entry per element), made NaN where its parameters
    are invalid and -inf where the given value is outside the support; raises instead when a
    check's outcome is known now.

    `param_flags` is `parameter_flags` of the site (flags batched), `in_support` a flag or None.
    """
    with jax.ensure_compile_time_eval():
        _raise_known_failures(address, family, param_flags, in_support, value)
    params_ok = None
    for flag in param_flags.values():
        if not compat.is_concrete(flag):
            params_ok = flag if params_ok is None else params_ok & flag
    if in_support is not None and not compat.is_concrete(in_support):
        log_prob = lax.select(_all(in_support), log_prob, jnp.full_like(log_prob, -jnp.inf))
    if params_ok is not None:
        log_prob = lax.select(_all(params_ok), log_prob, jnp.full_like(log_prob, jnp.nan))
    return log_prob


def _raise_known_failures(address, family, param_flags, in_support, value):
    for rule, flag in param_flags.items():
        if _failed(flag):
            raise ValueError(f"invalid parameter at address '{address}': {rule}")
    if in_support is not None and _failed(in_support):
        raise ValueError(_outside(address, family, value))


def _all(flag):
    """One flag for all elements (no equation for a scalar)."""
    return flag if jnp.ndim(flag) == 0 else jnp.all(flag)


def _short(value, limit=80):
    text = repr(jax.device_get(value)) if compat.is_concrete(value) else "traced"
    return text if len(text) <= limit else text[: limit - 3] + "..."
