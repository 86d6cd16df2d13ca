"""`sample_p`: the one primitive the language adds to JAX.

A sample site is staged as `sample_p` with the flattened leaves of `(distribution, estimator)` as
operands and the address as a parameter. It carries no key: the transformation that interprets
the program (simulate, assess, ADEV, ...) decides where randomness comes from. Under `jax.vmap`
the site becomes batched (`batch_shape` grows at the front) and stands for independent draws,
one per element, whether or not the distribution's parameters are batched. A `lax.cond`/`lax.switch`
with sites in a branch and a batched index becomes a loop over the batch (see `_cond_batch`).

    >>> value = sample_site(("mu",), dist.Normal(0.0, 1.0), None)   # inside a staged program
"""

import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as nd
from jax import lax

from transforms import checks, compat
from transforms.hoist import hoist

sample_p = compat.Primitive("sample")


def format_address(address):
    return "/".join(str(a) for a in address)


class Observed(nd.Distribution):
    """`base` observed at `value`: drawing returns the value, densities are `base`'s. A site with
    this distribution is bound with `observed=True`: every transformation reads the value instead
    of a choice, and the value's log density joins the score (like NumPyro's `obs=`)."""

    pytree_data_fields = ("base", "value")

    def __init__(self, base, value):
        self.base, self.value = base, value
        super().__init__(base.batch_shape, base.event_shape)

    @property
    def has_rsample(self):
        return True

    @property
    def support(self):
        return self.base.support

    def sample(self, key, sample_shape=()):
        return jnp.broadcast_to(self.value, sample_shape + self.shape())

    def log_prob(self, value):
        return self.base.log_prob(value)


def sample_site(address, distribution, estimator, observed=False, scale=1.0, aux=False):
    """Bind `sample_p` for one draw of `distribution` at `address` (a tuple of names);
    `observed=True` for an `Observed` distribution; `scale` multiplies its log density; `aux`
    marks an auxiliary site (`ppl.sample(..., aux=True)`; the transformations ignore it). Callables
    that the distribution's transforms keep as static data (a flow's network) become leaves
    (`transforms.hoist`), so that no traced value hides in the site's treedef."""
    leaves, treedef = jax.tree_util.tree_flatten((hoist(distribution), estimator))
    leaves = [_as_leaf(leaf) for leaf in leaves]
    draw_shape, draw_dtype = _draw_aval(treedef, leaves)
    return sample_p.bind(
        *leaves,
        address=tuple(address),
        treedef=treedef,
        batch_shape=(),
        draw_shape=draw_shape,
        draw_dtype=draw_dtype,
        observed=observed,
        scale=float(scale),
        aux=bool(aux),
    )


def _draw_aval(treedef, leaves):
    """(shape, dtype) of one draw of the distribution in `tree_unflatten(treedef, leaves)[0]`: of
    its `sample`, or, for a distribution without a sampler (`ImproperUniform`), its shape with an
    integer dtype for a discrete support and a float dtype otherwise."""
    unpack = lambda ls: jax.tree_util.tree_unflatten(treedef, list(ls))[0]
    try:
        draw = jax.eval_shape(lambda ls: unpack(ls).sample(jax.random.key(0)), leaves)
    except NotImplementedError:
        d = unpack(leaves)
        dtype = jax.dtypes.canonicalize_dtype(int if d.support.is_discrete else float)
        return tuple(d.shape()), np.dtype(dtype)
    return tuple(draw.shape), np.dtype(draw.dtype)


def _as_leaf(x):
    """An operand of `sample_p`. Integers given as Python or numpy values stay numpy arrays, so
    they stay concrete (`jnp.asarray` would stage them as tracers): a Binomial's `total_count`
    fixes the support that enumeration needs to know."""
    if isinstance(x, (int, np.integer)) or (isinstance(x, np.ndarray) and np.issubdtype(x.dtype, np.integer)):
        x = np.asarray(x)
        return x.astype(jax.dtypes.canonicalize_dtype(x.dtype))
    return jnp.asarray(x)


def _abstract_eval(*leaves, batch_shape, draw_shape, draw_dtype, **params):
    return compat.ShapedArray(batch_shape + draw_shape, draw_dtype)


def _impl(*leaves, address, **params):
    raise RuntimeError(_outside_message(address))


def _outside_message(address):
    return (
        f"ppl.sample at address '{format_address(address)}' was called outside any generative "
        "function or expectation. Run it through a transformation, e.g. "
        "`model.simulate(key, *args)` or `ppl.sim(model)` inside an `@ppl.expectation`."
    )


def _differentiated_message(address):
    return (
        f"jax.grad/jax.jvp reached the sample site '{format_address(address)}' directly; a sample site "
        "has no derivative of its own. Differentiate an expected value with an `@ppl.expectation` "
        "(`objective.grad_estimate(key, params, ...)`), or a log density with "
        "`jax.grad(lambda p: model.assess(choices, p)[0])`."
    )


def _no_sampler_message(site):
    return (
        f"the site '{site.name}' cannot be drawn: its distribution ({type(site.distribution).__name__}) has "
        "no sampler (NumPyro's `sample` raises NotImplementedError; an ImproperUniform has none). Give "
        "its value instead: observe it (`obs=`), pass it in the choices (assess, density, generate's "
        "constraints), or, in an objective, draw it from a guide with a site at this address."
    )


def _batch(axis_size, leaves, dims, *, batch_shape, **params):
    leaves = [_batch_leaf(x, d, axis_size) for x, d in zip(leaves, dims)]
    return sample_p.bind(*leaves, batch_shape=(axis_size,) + batch_shape, **params), 0


_FOLD_LIMIT = 1 << 16  # elements


def _batch_leaf(x, dim, axis_size):
    """A leaf with its batch dimension first. An unbatched, concrete integer leaf (see `_as_leaf`)
    is broadcast with numpy so it stays concrete (a staged broadcast would be a tracer under `jit`)."""
    if dim is None and isinstance(x, np.ndarray) and np.issubdtype(x.dtype, np.integer):
        if x.size * axis_size <= _FOLD_LIMIT:
            return np.broadcast_to(x, (axis_size,) + x.shape)
    return compat.move_batch_dim_to_front(x, dim, axis_size)


def typed_key(key):
    """`key` as a typed PRNG key: a legacy raw key (`jax.random.PRNGKey(0)`, a uint32 array of
    shape (2,)) becomes the typed key with the same bits, so both draw exactly the same values."""
    dtype = getattr(key, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return key
    if dtype == np.uint32 and jnp.shape(key)[-1:] == (2,):
        return jax.random.wrap_key_data(key)
    raise TypeError(f"expected a PRNG key such as jax.random.key(0), got {key!r}")


def contains_sample(jaxpr):
    """Whether an open jaxpr has a sample site anywhere inside."""
    return any(eqn_contains_sample(e) for e in jaxpr.eqns)


def eqn_contains_sample(eqn):
    if eqn.primitive is sample_p:
        return True
    return any(contains_sample(j) for j in compat.sub_jaxprs(eqn.params))


def _cond_batch(default, axis_size, values, dims, *, branches, **params):
    """vmap of a cond. With a batched index JAX would evaluate every branch and select, which
    would draw and score the sites of branches not taken; when a branch holds a site, run instead
    one real cond per element in a sequential loop (its choices stacked along the batch axis)."""
    if dims[0] is None or params.get("branches_platforms") or not any(contains_sample(b.jaxpr) for b in branches):
        return default(values, dims, branches=branches, **params)
    ops, op_dims = values[1:], dims[1:]
    mapped = [compat.move_batch_dim_to_front(x, d, axis_size) for x, d in zip(values, dims) if d is not None]
    fns = [compat.jaxpr_as_fun(b) for b in branches]

    def one(row):
        index, rest = row[0], iter(row[1:])
        return lax.switch(index, fns, *[x if d is None else next(rest) for x, d in zip(ops, op_dims)])

    outs = lax.map(one, mapped)
    return outs, [0] * len(outs)


sample_p.def_impl(_impl)
sample_p.def_abstract_eval(_abstract_eval)
compat.register_batching(sample_p, _batch)
compat.register_lowering_error(sample_p, lambda params: _outside_message(params["address"]))
compat.register_jvp_error(sample_p, lambda params: _differentiated_message(params["address"]))
compat.wrap_batching(compat.cond_p, _cond_batch)


@dataclass(frozen=True)
class Site:
    """One `sample_p` equation with its operand values: rebuilds the distribution and draws or
    scores values, handling the batch dimensions that `vmap` added (independent draws)."""

    address: tuple
    leaves: tuple
    params: Any

    @classmethod
    def from_eqn(cls, eqn, leaves):
        return cls(eqn.params["address"], tuple(leaves), eqn.params)

    @property
    def name(self):
        return format_address(self.address)

    @property
    def batch_shape(self):
        return self.params["batch_shape"]

    @property
    def value_shape(self):
        return self.batch_shape + self.params["draw_shape"]

    @property
    def value_dtype(self):
        return self.params["draw_dtype"]

    def unpack(self, leaves=None):
        """(distribution, estimator) for unbatched leaves."""
        leaves = self.leaves if leaves is None else leaves
        return jax.tree_util.tree_unflatten(self.params["treedef"], list(leaves))

    @property
    def estimator(self):
        """The estimator attached at the site (None for the default); its array leaves are
        taken from the first batch element."""
        return self.unpack(self._first_element())[1]

    @property
    def distribution(self):
        """The distribution of one batch element (for shape and type checks)."""
        return self.unpack(self._first_element())[0]

    def _first_element(self):
        leaves = self.leaves
        for _ in self.batch_shape:
            leaves = [x[0] for x in leaves]
        return leaves

    def map(self, fn, leaves, *batched):
        """`fn(distribution, estimator, *args)` applied to each batch element."""
        g = lambda ls, *xs: fn(*self.unpack(ls), *xs)
        for _ in self.batch_shape:
            g = jax.vmap(g)
        return g(list(leaves), *batched)

    def keys(self, key):
        if not self.batch_shape:
            return key
        if math.prod(self.batch_shape) == 1:  # one element draws what the unbatched site draws
            return key[(None,) * len(self.batch_shape)]
        return jax.random.split(key, math.prod(self.batch_shape)).reshape(self.batch_shape)

    def sample(self, key, leaves=None):
        """One independent draw per batch element."""
        leaves = self.leaves if leaves is None else leaves
        try:
            return self.map(lambda d, e, k: d.sample(k), leaves, self.keys(key))
        except NotImplementedError as e:
            raise NotImplementedError(_no_sampler_message(self)) from e

    @property
    def observed(self):
        return self.params.get("observed", False)

    def observed_value(self, leaves=None):
        """The value of an observed site (one per batch element)."""
        leaves = self.leaves if leaves is None else leaves
        return self.map(lambda d, e: d.value, leaves)

    def log_prob(self, value, leaves=None, given=False):
        """Total log density of `value` (summed over batch and distribution dimensions), times
        the site's scale. Parameters are checked, and with `given` (an observation or a choice
        handed in) so is the value's support: see `transforms.checks` (raises when the outcome
        is known at trace time, else NaN / -inf)."""
        return self.scaled(jnp.sum(self.log_prob_elements(value, leaves, given)))

    def scaled(self, log_density):
        """`log_density` times the site's scale."""
        return log_density * self.scale if self.scale != 1.0 else log_density

    def log_prob_elements(self, value, leaves=None, given=False):
        """The log density of each element of `value`, unscaled and checked as in `log_prob`: an
        array of the site's batch shape plus its distribution's batch shape (event dimensions
        summed, as NumPyro's `log_prob` does)."""
        leaves = self.leaves if leaves is None else leaves
        lps = self.map(lambda d, e, x: d.log_prob(x), leaves, value)
        check_support = given and checks.checks_support(self.distribution, value)

        def flags(d, e, x):
            return checks.parameter_flags(d), checks.support_flag(d, x) if check_support else None

        with jax.ensure_compile_time_eval():  # known values are checked now, and raise
            param_flags, in_support = self.map(flags, leaves, value)
        return checks.guard(self.name, self.distribution, lps, param_flags, in_support, value)

    @property
    def scale(self):
        """Multiplier of the site's log density in scores and weights (a minibatch's size / subsample
        size); estimators' score functions are not scaled."""
        return self.params.get("scale", 1.0)
