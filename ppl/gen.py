"""Generative functions: traced Python functions with addressed random choices.

    @ppl.gen
    def model(x):
        mu = ppl.sample("mu", dist.Normal(0.0, 10.0))
        ppl.sample("x", dist.Normal(mu, 1.0).expand(x.shape))
        return mu

    trace = model.simulate(key, x)                 # Trace(choices, score, retval, args)
    log_p, mu = model.assess({"mu": 0.3, "x": x}, x)
    trace, log_w = model.generate(key, {"x": x}, x)

Inside a generative function, `ppl.sample(address, other_gen_fn, *args)` calls another generative
function with its choices nested under `address`; calling `other_gen_fn(*args)` directly inlines it
(its addresses join the caller's). Sites may sit inside `jax.vmap` (one independent draw per
element; the choice gains that dimension), `lax.scan` (choices stacked along the scan), `lax.cond`
/ `lax.switch`, `fori_loop` with static bounds, and `jax.jit`.

Arguments are traced like `jax.jit` arguments (arrays and pytrees of arrays).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from ppl.choicemap import Trace, flatten_choices, nest_choices
from transforms import gfi, interpreter
from transforms.estimators import Estimator
from transforms.primitives import Observed, sample_site


class GenerativeFunction:
    """A traced generative function; see the module docstring."""

    def __init__(self, fn):
        self.fn = fn
        functools.update_wrapper(self, fn)

    def __call__(self, *args):
        return self.fn(*args)

    def stage(self, *args):
        """(ClosedJaxpr, flat args, output treedef) of the program at these arguments."""
        return stage(self.fn, args)

    def simulate(self, key, *args):
        closed, flat, out_tree = self.stage(*args)
        outs, choices, score = gfi.simulate(closed, flat, key)
        return Trace(nest_choices(choices), score, jax.tree_util.tree_unflatten(out_tree, outs), args)

    def assess(self, choices, *args):
        """(log density of `choices`, return value); every site needs a choice."""
        closed, flat, out_tree = self.stage(*args)
        score, outs = gfi.assess(closed, flat, flatten_choices(choices))
        return score, jax.tree_util.tree_unflatten(out_tree, outs)

    def generate(self, key, constraints, *args):
        """(Trace, log weight): constrained sites take their given values (the weight is their log
        density); the others are drawn from the program itself."""
        closed, flat, out_tree = self.stage(*args)
        outs, choices, score, weight = gfi.generate(closed, flat, key, flatten_choices(constraints))
        trace = Trace(nest_choices(choices), score, jax.tree_util.tree_unflatten(out_tree, outs), args)
        return trace, weight

    def addresses(self, *args):
        """{address tuple: (shape, dtype)} of the sites at these arguments."""
        closed, _, _ = self.stage(*args)
        return interpreter.site_avals(closed.jaxpr)

    def __repr__(self):
        return f"<generative function {getattr(self.fn, '__name__', self.fn)!r}>"


def stage(fn, args, unique_addresses=True):
    """Stage `fn(*args)` to a ClosedJaxpr, checking that addresses are unique (an objective's
    sites need not be: it may draw from the same guide twice)."""
    flat = jax.tree_util.tree_leaves(args)
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    if unique_addresses:
        interpreter.check_unique_addresses(closed.jaxpr)
    return closed, flat, jax.tree_util.tree_structure(out_shape)


def gen(fn):
    """Decorator: make `fn` a generative function."""
    return GenerativeFunction(fn)


def sample(address, target, *args, estimator=None, obs=None):
    """Draw from a distribution at `address`, or call a generative function with its choices
    nested under `address`. `estimator` picks the site's gradient estimator (default: reparam
    where the distribution has one, otherwise REINFORCE). `obs=value` observes the site: it
    returns `value` and adds its log density to the program's (NumPyro's `obs=`)."""
    if not isinstance(address, str):
        raise TypeError(f"an address is a string, got {address!r}")
    if isinstance(target, GenerativeFunction):
        if estimator is not None:
            raise TypeError(f"estimator= applies to a distribution, not to the generative function at '{address}'")
        return _call_at((address,), target, args)
    if args:
        raise TypeError(f"ppl.sample('{address}', distribution) takes no further positional arguments")
    if obs is not None:
        if estimator is not None:
            raise TypeError(f"the observed site '{address}' has no gradient estimator")
        if jnp.shape(obs) != target.shape():
            raise ValueError(
                f"observation shape mismatch at address '{address}': the distribution has shape "
                f"{target.shape()}, the observation {jnp.shape(obs)}"
            )
        return sample_site((address,), Observed(target, obs), None, observed=True)
    if estimator is not None:
        if not isinstance(estimator, Estimator):
            raise TypeError(f"estimator at '{address}' must be an estimator such as ppl.reparam(), got {estimator!r}")
        estimator.check(target, (address,))
    return sample_site((address,), target, estimator)


def _call_at(prefix, gen_fn, args):
    closed, flat, out_tree = gen_fn.stage(*args)
    return jax.tree_util.tree_unflatten(out_tree, gfi.rebind(closed, flat, prefix=prefix))


def with_estimators(gen_fn, estimators):
    """A copy of `gen_fn` whose sites use the given estimators: `{"z": ppl.enum()}`; nested
    addresses as nested dicts or tuples. Unknown addresses and estimators that cannot apply raise."""
    overrides = {}
    for address, estimator in estimators.items():
        if isinstance(estimator, dict):
            overrides.update({(address,) + a: e for a, e in flatten_choices(estimator).items()})
        else:
            overrides[address if isinstance(address, tuple) else (address,)] = estimator

    def fn(*args):
        closed, flat, out_tree = gen_fn.stage(*args)
        return jax.tree_util.tree_unflatten(out_tree, gfi.rebind(closed, flat, overrides=overrides))

    return GenerativeFunction(functools.wraps(gen_fn.fn)(fn))


def scale(gen_fn, factor):
    """`gen_fn` with every site's log density multiplied by `factor` (a Python number) in scores,
    weights and densities; estimators' score functions stay unscaled."""

    def fn(*args):
        closed, flat, out_tree = gen_fn.stage(*args)
        return jax.tree_util.tree_unflatten(out_tree, gfi.rebind(closed, flat, scale=float(factor)))

    return GenerativeFunction(functools.wraps(gen_fn.fn)(fn))


def plate(gen_fn, size=None, subsample_size=None, in_axes=0):
    """Map `gen_fn` over the leading axis of its arguments (one independent call per datum). With
    `subsample_size`, the arguments are a minibatch of a data set of `size` points, and every
    log density is scaled by size / subsample_size, so a minibatch objective is unbiased for the
    full-data one."""
    mapped = vmap(gen_fn, in_axes=in_axes)
    if subsample_size is None:
        return mapped
    if size is None:
        raise ValueError("plate with subsample_size needs the full data set's size")
    return scale(mapped, size / subsample_size)


def vmap(gen_fn, in_axes=0, axis_size=None):
    """Map a generative function over a leading axis (a plate): one independent call per element,
    every choice stacked along that axis."""
    return GenerativeFunction(jax.vmap(gen_fn.fn, in_axes=in_axes, axis_size=axis_size))


def scan(gen_fn, length=None, reverse=False):
    """`(carry, x) -> (carry, y)` generative function scanned over `xs` (a state-space model);
    choices stacked along the scan."""

    def fn(init, xs):
        return lax.scan(gen_fn.fn, init, xs, length=length, reverse=reverse)

    return GenerativeFunction(fn)
