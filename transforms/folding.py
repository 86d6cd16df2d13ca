"""Evaluate a function with its constants folded and its gathers at known indices as selections.

Summing a site out evaluates the rest of the program at every value of the site's support, and
those values are constants. A program that indexes with the site's value (`rows[z]`, `mu[z]`, and
`Categorical.log_prob`'s `take_along_axis`) then holds XLA gathers at constant indices, and its
gradient holds their transposes, scatter-adds. XLA keeps both as separate kernels, so on a CPU
each costs a few microseconds of dispatch: four of them made a T = 100 HMM gradient ~1.5x a
hand-written forward algorithm (benchmarks/RESULTS.md section 5). Here such a gather is a
masked sum over the operand's elements (a compare, a select and a reduction, which XLA fuses
with what surrounds them), and everything computed from constants alone is computed now.

    evaluate_folded(lambda z: rows[z], support) == rows[support]    # without a gather
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from transforms import compat

# A gather becomes a masked sum when (output elements) x (operand elements) is at most this: the
# sum's work, against the gather's one read per output element.
SELECTION_LIMIT = 1 << 16


def evaluate_folded(fn, args):
    """`fn(args)`, with the parts computed from concrete leaves of `args` alone evaluated now and
    gathers whose indices are among them replaced by masked sums (same values and gradients)."""
    leaves, tree = jax.tree.flatten(args)
    traced = [i for i, x in enumerate(leaves) if not compat.is_concrete(x)]
    if not traced:
        with jax.ensure_compile_time_eval():
            return fn(args)
    if len(traced) == len(leaves):
        return fn(args)

    def of_traced(*xs):
        full = list(leaves)
        for i, x in zip(traced, xs):
            full[i] = x
        return fn(jax.tree.unflatten(tree, full))

    closed, shapes = jax.make_jaxpr(of_traced, return_shape=True)(*[leaves[i] for i in traced])
    outs = _run(closed.jaxpr, closed.consts, [leaves[i] for i in traced])
    return jax.tree.unflatten(jax.tree.structure(shapes), outs)


def _run(jaxpr, consts, args):
    env = dict(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for eqn in jaxpr.eqns:
        ins = [compat.read_atom(env, a) for a in eqn.invars]
        if all(compat.is_concrete(x) for x in ins):
            with jax.ensure_compile_time_eval():
                outs = compat.bind_eqn(eqn, ins)
        elif eqn.primitive.name == "gather" and _selectable(eqn, *ins):
            outs = [_selection(eqn, *ins)]
        elif eqn.primitive.name in compat.INLINE_CALLS:
            inner, inner_consts = compat.inline_jaxpr(eqn)
            outs = _run(inner, inner_consts, ins)
        else:
            outs = compat.bind_eqn(eqn, ins)
        env.update(zip(eqn.outvars, outs))
    return [compat.read_atom(env, v) for v in jaxpr.outvars]


def _selectable(eqn, operand, indices):
    out_size = math.prod(eqn.outvars[0].aval.shape)
    return (
        compat.is_concrete(indices)
        and jnp.issubdtype(operand.dtype, jnp.inexact)
        and out_size * math.prod(operand.shape) <= SELECTION_LIMIT
    )


def _selection(eqn, operand, indices):
    """The gather `eqn` of `operand` at the concrete `indices`, as a masked sum: the same gather of
    the operand's flat positions finds each output's source (NaN where out of bounds); outputs
    that repeat along an axis (an enumerated value broadcast over a plate) are selected once."""
    size = math.prod(operand.shape)
    params = dict(eqn.params)
    filling = params["mode"] == lax.GatherScatterMode.FILL_OR_DROP
    if filling:
        params["fill_value"] = np.nan
    positions = np.arange(size, dtype=np.float32).reshape(operand.shape)  # exact: size <= 2**16
    with jax.ensure_compile_time_eval():
        source = np.asarray(eqn.primitive.bind(positions, indices, **eqn.primitive.get_bind_params(params)))
    source = np.where(np.isnan(source), -1, source).astype(np.int32)
    shape = source.shape
    for axis in range(source.ndim):  # select once along axes where the source does not change
        first = np.take(source, [0], axis=axis)
        if np.all(source == first):
            source = first
    chosen = source[..., None] == np.arange(size, dtype=np.int32)
    out = jnp.where(chosen, operand.reshape(-1), jnp.zeros((), operand.dtype)).sum(-1)
    if (source < 0).any():
        fill = eqn.params.get("fill_value")
        out = jnp.where(source >= 0, out, jnp.asarray(np.nan if fill is None else fill, operand.dtype))
    return jnp.broadcast_to(out, shape)
