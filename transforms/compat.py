"""Every use of JAX internals lives here, so a JAX upgrade breaks one file, loudly.

Contract: the rest of the project touches jaxprs and primitives only through these names.
`tests/transforms/test_compat.py` pins the behaviour each helper relies on.

Sharp edges this module papers over (JAX 0.10):
- `fancy_primitive_batchers` rules run under `vmap` even when no operand is batched. `sample_p`
  relies on that: a site inside `jax.vmap` (also through `jit`, `scan`, `cond`) draws one
  independent value per element although its distribution's parameters are not batched.
- Call-like primitives (`jit`, `custom_jvp_call`, ...) need `get_bind_params` before `bind`.
- JAX batches a `cond` whose index is batched into a `select` of *both* branches, which would
  run (and score) the sample sites of the branch not taken; `wrap_batching` lets `primitives`
  replace that rule for conds that hold sites.
- That `select` also wraps every operand in `stop_gradient`. ADEV computes tangents as ordinary
  values inside a `custom_jvp` rule, and enumeration vmaps the rest of the program over a
  support, so tangents can pass through it; reverse mode must then transpose `stop_gradient`,
  which JAX leaves undefined. On values it is the identity, so its transpose is too (below).
"""

import jax
import numpy as np
from jax.extend import core as jex_core
from jax.interpreters import ad, batching, mlir

Primitive = jex_core.Primitive
Literal = jex_core.Literal
ClosedJaxpr = jex_core.ClosedJaxpr
ShapedArray = jax.core.ShapedArray
cond_p = jex_core.primitives.cond_p  # lax.cond / lax.switch
jaxpr_as_fun = jex_core.jaxpr_as_fun

# The identity's transpose, for tangents that reach a `stop_gradient` (see the module docstring).
ad.primitive_transposes.setdefault(jex_core.primitives.stop_gradient_p, lambda ct, x: [ct])

# Primitives whose sub-program is run once, inline, with the caller's values.
INLINE_CALLS = frozenset({"jit", "pjit", "closed_call", "core_call", "remat2", "checkpoint"})


def register_batching(primitive, rule):
    """Register `rule(axis_size, values, dims, **params) -> (out, out_dim)`, run under every
    vmap level the primitive is bound in, batched operands or not."""

    def fancy(axis_data, values, dims, **params):
        return rule(axis_data.size, values, dims, **params)

    batching.fancy_primitive_batchers[primitive] = fancy


_jax_batchers = {}


def wrap_batching(primitive, wrapper):
    """Wrap the vmap rule JAX registered for `primitive`: `wrapper(default, axis_size, values,
    dims, **params) -> (outs, out_dims)`, where `default(values, dims, **params)` runs JAX's rule."""
    original = _jax_batchers.setdefault(primitive, batching.fancy_primitive_batchers[primitive])

    def fancy(axis_data, values, dims, **params):
        default = lambda vs, ds, **ps: original(axis_data, vs, ds, **ps)
        return wrapper(default, axis_data.size, values, dims, **params)

    batching.fancy_primitive_batchers[primitive] = fancy


def move_batch_dim_to_front(x, dim, size):
    """`x` with its batch dimension (or a broadcast one, when `dim` is None) first."""
    return batching.bdim_at_front(x, dim, size)


def register_lowering_error(primitive, message):
    """Make compiling a program that still contains `primitive` raise `message`."""

    def lowering(ctx, *args, **params):
        raise RuntimeError(message(params))

    mlir.register_lowering(primitive, lowering)


def register_jvp_error(primitive, message):
    """Make differentiating through `primitive` with `jax.jvp`/`jax.grad` raise `message`."""

    def jvp(primals, tangents, **params):
        raise TypeError(message(params))

    ad.primitive_jvps[primitive] = jvp


def bind_eqn(eqn, invals):
    """Evaluate one jaxpr equation on `invals` under the current trace; returns a list."""
    params = eqn.primitive.get_bind_params(eqn.params)
    out = eqn.primitive.bind(*invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def is_elementwise(primitive):
    """Whether `primitive` acts elementwise with shape-free params (JAX batches it by broadcasting
    its operands): evaluating it on operands with extra leading axes is evaluating it per element."""
    rule = getattr(batching.fancy_primitive_batchers.get(primitive), "func", None)
    return getattr(rule, "__name__", None) in ("broadcast_batcher", "vectorized_batcher")


def read_atom(env, atom):
    """Value of a jaxpr variable or literal."""
    return atom.val if isinstance(atom, Literal) else env[atom]


def sub_jaxprs(params):
    """Open jaxprs held in an equation's params (scan body, cond branches, call bodies)."""
    return list(jex_core.jaxprs_in_params(params))


def inline_jaxpr(eqn):
    """(jaxpr, consts) of a call-like equation that can be inlined."""
    inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
    if isinstance(inner, ClosedJaxpr):
        return inner.jaxpr, inner.consts
    return inner, []


def zero_tangent(x):
    """A zero tangent for `x` (float0 for integer and boolean values)."""
    dtype = jax.dtypes.result_type(x)
    if jax.numpy.issubdtype(dtype, jax.numpy.inexact):
        return jax.numpy.zeros(np.shape(x), dtype)
    return np.zeros(np.shape(x), jax.dtypes.float0)


def is_concrete(x):
    """Whether `x` is a value known now (not a tracer of `jit`, `vmap`, `grad`, ...)."""
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(x))


def has_tangent_space(x):
    """Whether `x` is a floating or complex value (so a nonzero tangent can exist)."""
    return jax.numpy.issubdtype(jax.dtypes.result_type(x), jax.numpy.inexact)
