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
import inspect

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as nd
from jax import lax

from ppl import leaves, plates
from ppl.choicemap import Trace, flatten_choices, nest_choices
from transforms import checks, gfi, interpreter
from transforms.estimators import Estimator
from transforms.primitives import Observed, format_address, sample_site


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
        return Trace(choice_map(closed, choices), score, jax.tree_util.tree_unflatten(out_tree, outs), args)

    def assess(self, choices, *args):
        """(log density of `choices`, return value); every site needs a choice. Auxiliary
        choices (`choices.aux`) at addresses the program lacks are skipped."""
        closed, flat, out_tree = self.stage(*args)
        score, outs = gfi.assess(closed, flat, given_choices(closed, choices))
        return score, jax.tree_util.tree_unflatten(out_tree, outs)

    def generate(self, key, constraints, *args):
        """(Trace, log weight): constrained sites take their given values (the weight is their log
        density); the others are drawn from the program itself. Auxiliary constraints at addresses
        the program lacks are skipped, as in `assess`."""
        closed, flat, out_tree = self.stage(*args)
        outs, choices, score, weight = gfi.generate(closed, flat, key, given_choices(closed, constraints))
        trace = Trace(choice_map(closed, choices), score, jax.tree_util.tree_unflatten(out_tree, outs), args)
        return trace, weight

    def addresses(self, *args):
        """{address tuple: (shape, dtype)} of the sites at these arguments."""
        closed, _, _ = self.stage(*args)
        return interpreter.site_avals(closed.jaxpr)

    def __repr__(self):
        return f"<generative function {getattr(self.fn, '__name__', self.fn)!r}>"


def stage(fn, args, unique_addresses=True):
    """Stage `fn(*args)` to a ClosedJaxpr whose inputs are the array leaves of `args` (returned
    flat); other leaves (an Equinox module's activation function) are closed over. Checks that
    addresses are unique (an objective's sites need not be: it may draw from the same guide twice)."""
    _check_arity(fn, args)
    arrays, static = leaves.partition(args, leaves.is_array)
    flat = jax.tree_util.tree_leaves(arrays)
    with_static = lambda arrays: fn(*leaves.combine(arrays, static))
    with numpyro.validation_enabled(False):  # the sites check parameters, naming their addresses
        closed, out_shape = jax.make_jaxpr(with_static, return_shape=True)(arrays)
    if unique_addresses:
        interpreter.check_unique_addresses(closed.jaxpr)
    return closed, flat, jax.tree_util.tree_structure(out_shape)


def _check_arity(fn, args):
    """Raise a TypeError stating the calling convention when `fn` cannot take `args`."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # no signature to read (a builtin): let the call decide
        return
    try:
        signature.bind(*args)
    except TypeError as e:
        name = getattr(fn, "__name__", repr(fn))
        raise TypeError(
            f"{name}{signature} cannot be called with these {len(args)} argument(s): {e}. The objectives "
            "(ppl.objectives), autoguides and ppl.predictive call model(params, *args) and guide(params, "
            "*args): a model without parameters still takes a first argument (`def model(params, x, y)`, "
            "ignoring it), and an autoguide is built with the model's arguments, `mean_field(model, {}, x, y)`."
        ) from None


def choice_map(closed, flat):
    """The `ChoiceMap` of a run's flat choices, its auxiliary sites marked (`ChoiceMap.aux`)."""
    return nest_choices(flat, aux=interpreter.addresses_with(closed.jaxpr, "aux"))


def given_choices(closed, choices):
    """The flat choices that a program reads: `choices` without the auxiliary ones at addresses
    it has no site for (unknown addresses that are not auxiliary are kept, and raise)."""
    flat = flatten_choices(choices)
    aux = getattr(choices, "aux", frozenset())
    if aux:
        known = interpreter.site_avals(closed.jaxpr)
        flat = {a: v for a, v in flat.items() if a in known or a not in aux}
    return flat


def gen(fn):
    """Decorator: make `fn` a generative function."""
    return GenerativeFunction(fn)


def sample(address, target, *args, estimator=None, obs=None, aux=False):
    """Draw from a distribution at `address`, or call a generative function with its choices
    nested under `address`. `estimator` picks the site's gradient estimator (default: reparam
    where the distribution has one, otherwise REINFORCE). `obs=value` observes the site: it
    returns `value` and adds its log density to the program's (NumPyro's `obs=`); `obs=None` is
    an unobserved site, so `model(x, y=None)` draws y (prediction).

    `aux=True` makes the site auxiliary, for a guide's variables that the model does not have
    (the latent vector of an IAF guide whose model sites are `Delta`s of it): its choice is
    marked in the choice map that `sim`/`simulate` return, and `density`/`assess`/`generate` of a
    program without that address skip it. See docs/architecture.md for what the ELBO then means."""
    _check_name(address)
    if isinstance(target, GenerativeFunction):
        if estimator is not None or aux:
            what = "estimator=" if estimator is not None else "aux="
            raise TypeError(f"{what} applies to a distribution, not to the generative function at '{address}'")
        return _call_at((address,), target, args)
    if args:
        raise TypeError(f"ppl.sample('{address}', distribution) takes no further positional arguments")
    if not isinstance(target, nd.Distribution):
        raise TypeError(
            f"ppl.sample('{address}', ...) takes a NumPyro distribution or a generative function, got {target!r}"
        )
    target, scale_by = plates.broadcast(address, target)
    if obs is not None:
        if estimator is not None or aux:
            what = "no gradient estimator" if estimator is not None else "no auxiliary role (aux=)"
            raise TypeError(f"the observed site '{address}' has {what}")
        obs = gfi.as_value(obs, (address,))
        if jnp.shape(obs) != target.shape():
            raise ValueError(
                f"observation shape mismatch at address '{address}': the distribution has shape "
                f"{target.shape()}, the observation {jnp.shape(obs)}"
            )
        checks.check_given(address, target, obs)
        return sample_site((address,), Observed(target, obs), None, observed=True, scale=scale_by)
    if estimator is not None:
        _check_estimator(address, estimator)
        estimator.check(target, (address,))
    return sample_site((address,), target, estimator, scale=scale_by, aux=aux)


def _check_name(address):
    """An address is a string without '/' (which separates the names of nested addresses)."""
    if not isinstance(address, str):
        raise TypeError(f"an address is a string, got {address!r}")
    if "/" in address:
        raise ValueError(
            f"address '{address}' contains '/', which separates nested addresses in messages and "
            "could collide with a nested call's sites; use another name (e.g. with '_' or '.')"
        )


def _check_estimator(address, estimator):
    if not isinstance(estimator, Estimator):
        raise TypeError(f"estimator at '{address}' must be an estimator such as ppl.reparam(), got {estimator!r}")


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
    for address, estimator in overrides.items():
        if estimator is not None:
            _check_estimator(format_address(address), estimator)

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


def plate(gen_fn=None, size=None, subsample_size=None, in_axes=0, *, dim=None):
    """Map `gen_fn` over the leading axis of its arguments (one independent call per datum). With
    `subsample_size`, the arguments are a minibatch of a data set of `size` points, and every
    log density is scaled by size / subsample_size, so a minibatch objective is unbiased for the
    full-data one. The mapped axis must have `subsample_size` (else `size`, when given) elements.

    `ppl.plate("data", N)` (a name first) is NumPyro's context manager instead: see `ppl.plates`.

        per_datum = ppl.plate(likelihood, size=N, subsample_size=B)   # per_datum(x_batch) ...
        with ppl.plate("data", N):
            ppl.sample("y", dist.Normal(mu, 1.0), obs=y)
    """
    if isinstance(gen_fn, str):
        return plates.plate_context(gen_fn, size, subsample_size, dim)
    if not isinstance(gen_fn, GenerativeFunction):
        raise TypeError(
            "ppl.plate takes a generative function, ppl.plate(gen_fn, size=N), or a name for NumPyro's "
            f"context manager, `with ppl.plate('data', N):`; got {gen_fn!r}"
        )
    plates.check_sizes(None, size, subsample_size)
    expected = subsample_size if subsample_size is not None else size
    mapped = vmap(gen_fn, in_axes=in_axes)

    def fn(*args):
        found = _mapped_size(args, in_axes)
        if expected is not None and found is not None and found != expected:
            what = "subsample_size" if subsample_size is not None else "size"
            raise ValueError(
                f"plate over {gen_fn!r}: the mapped arguments have {found} elements along the mapped axis, "
                f"but {what}={expected}"
            )
        return mapped.fn(*args)

    fn = GenerativeFunction(functools.wraps(gen_fn.fn)(fn))
    return fn if subsample_size is None else scale(fn, size / subsample_size)


def _mapped_size(args, in_axes):
    """The length of the mapped axis of `args` under `in_axes` (an int, or one int/None per
    argument), or None when no argument is mapped or the axes are given as pytrees."""
    axes = [in_axes] * len(args) if isinstance(in_axes, int) else list(in_axes)
    for arg, axis in zip(args, axes):
        if isinstance(axis, int):
            for leaf in jax.tree.leaves(arg):
                return jnp.shape(leaf)[axis]
    return None


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
