"""Which leaves of a pytree are arrays (staged, differentiated) and which are static (closed
over), as Equinox's `partition`/`combine` split a module: an `eqx.nn.MLP` holds arrays and its
activation function.

    arrays, static = partition(tree, is_array)      # two trees of tree's structure, None elsewhere
    combine(arrays, static) == tree
"""

import jax
import numpy as np


def is_array(leaf):
    """Arrays (jax, numpy, tracers) and Python numbers: what `jax.make_jaxpr` can take."""
    return isinstance(leaf, (jax.Array, np.ndarray, np.generic, bool, int, float, complex))


def array_leaves(tree):
    """The leaves of `tree` that are arrays, in `jax.tree.leaves` order."""
    return [leaf for leaf in jax.tree.leaves(tree) if is_array(leaf)]


def partition(tree, predicate):
    """(the leaves where `predicate` holds, the others), each a tree of `tree`'s structure with
    None in place of the other half's leaves."""
    leaves, treedef = jax.tree.flatten(tree)
    picked = [leaf if predicate(leaf) else None for leaf in leaves]
    others = [None if predicate(leaf) else leaf for leaf in leaves]
    return treedef.unflatten(picked), treedef.unflatten(others)


def combine(picked, others):
    """The inverse of `partition`: `combine(*partition(tree, p)) == tree`."""
    return jax.tree.map(lambda a, b: b if a is None else a, picked, others, is_leaf=lambda x: x is None)
