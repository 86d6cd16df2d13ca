"""Callables that NumPyro transforms keep as static data, made pytrees whose leaves they close over.

An inverse autoregressive flow (`InverseAutoregressiveTransform(arn)`, NumPyro's AutoIAFNormal)
keeps its network `arn`, a Python callable that usually closes over traced parameters, in the
*static* part of its pytree. A site is staged as `sample_p(*leaves)` with the treedef, static data
included, as an equation parameter, so such a callable would carry tracers of the trace that staged
the guide into every later interpretation of the program (`UnexpectedTracerError`).
`hoist(distribution)` closure-converts each such callable (`jax.closure_convert`, at the argument
types it is called with in one abstract draw and log density) into a `Hoisted` pytree whose leaves
are the floating-point values it closes over, and makes it a child of its transform: those values
become operands of the site like any parameter, and are differentiated like one.
"""

import functools

import jax
import numpy as np
from numpyro.distributions.constraints import Constraint
from numpyro.distributions.distribution import Distribution
from numpyro.distributions.transforms import Transform


@jax.tree_util.register_pytree_node_class
class Hoisted:
    """`fn(*args, *consts)` called as `hoisted(*args)`; `consts` are its pytree leaves."""

    def __init__(self, fn, consts):
        self.fn, self.consts = fn, tuple(consts)

    def __call__(self, *args):
        return self.fn(*args, *self.consts)

    def tree_flatten(self):
        return self.consts, self.fn

    @classmethod
    def tree_unflatten(cls, fn, consts):
        return cls(fn, consts)


def hoist(distribution):
    """`distribution` with each callable its transforms keep as static data replaced by a
    `Hoisted` child (see the module docstring); `distribution` itself when there is none."""
    if not any(_holds_callables(t) for t in _transforms(distribution)):
        return distribution
    calls = {}
    recording = _map_callables(distribution, lambda f: _Recorder(f, calls))
    jax.eval_shape(lambda: recording.log_prob(recording.sample(jax.random.key(0))))

    def convert(f):
        if id(f) not in calls:  # not called by sample or log_prob: nothing to specialize it to
            return f
        fn, consts = jax.closure_convert(f, *calls[id(f)])
        return Hoisted(fn, consts) if consts else f

    return _map_callables(distribution, convert, hoisting=True)


def _transforms(distribution):
    return jax.tree_util.tree_leaves(distribution, is_leaf=_holds_callables)


def _is_static_callable(x):
    return callable(x) and not isinstance(x, (type, Constraint, Transform, Distribution, Hoisted))


def _static(t):
    """The static data of a transform flattened as NumPyro's are, `(children, (names, {name:
    value}))`; {} for any other flattening."""
    _, aux = t.tree_flatten()
    return aux[1] if isinstance(aux, tuple) and len(aux) == 2 and isinstance(aux[1], dict) else {}


def _holds_callables(x):
    """Whether `x` is a NumPyro transform with a callable in its static data."""
    return isinstance(x, Transform) and any(_is_static_callable(v) for v in _static(x).values())


def _map_callables(distribution, fn, hoisting=False):
    """`distribution` with `fn(f)` for each callable `f` in its transforms' static data; with
    `hoisting`, those transforms flatten their `Hoisted` callables as children."""

    def rebuild(t):
        if not _holds_callables(t):
            return t
        children, (names, static) = t.tree_flatten()
        static = {k: fn(v) if _is_static_callable(v) else v for k, v in static.items()}
        cls = _hoisting_class(type(t)) if hoisting else type(t)
        return cls.tree_unflatten((names, static), children)

    return jax.tree_util.tree_map(rebuild, distribution, is_leaf=_holds_callables)


class _Recorder:
    """Calls `fn`, recording the (zero-filled) argument types of its first call in `calls`."""

    def __init__(self, fn, calls):
        self.fn, self.calls = fn, calls

    def __call__(self, *args):
        as_zeros = lambda x: np.zeros(np.shape(x), jax.dtypes.result_type(x))
        self.calls.setdefault(id(self.fn), jax.tree.map(as_zeros, args))
        return self.fn(*args)


@functools.cache
def _hoisting_class(cls):
    """A subclass of the transform class `cls` (registered as a pytree by NumPyro) whose
    `Hoisted` static entries are flattened as children."""

    def tree_flatten(self):
        children, (names, static) = cls.tree_flatten(self)
        moved = tuple(k for k, v in static.items() if isinstance(v, Hoisted))
        kept = {k: v for k, v in static.items() if k not in moved}
        return (*children, *(static[k] for k in moved)), ((*names, *moved), kept)

    return type(cls.__name__, (cls,), {"tree_flatten": tree_flatten, "__module__": cls.__module__})
