"""Constrained parameters through NumPyro's bijections.

    params = {"loc": 0.0, "scale": ppl.constrained(1.0, constraints.positive),
              "probs": ppl.constrained(jnp.ones(3) / 3, constraints.simplex)}
    ...
    p = ppl.constrain(params)        # inside a model or guide: {"loc": 0.0, "scale": 1.0, "probs": [...]}

A `Constrained` node is a pytree whose leaf is the *unconstrained* value (what gradients and
optimizers see); `.value` maps it through `biject_to(constraint)`. Any pytree of parameters works
(dicts, Equinox modules, Flax parameter dicts); `constrain` replaces every `Constrained` node in it
by its value.
"""

import jax
import jax.numpy as jnp
from numpyro.distributions.transforms import biject_to


class Constrained:
    """A parameter kept in unconstrained space; `.value` is the constrained one."""

    def __init__(self, unconstrained, constraint):
        self.unconstrained, self.constraint = unconstrained, constraint

    @property
    def value(self):
        return biject_to(self.constraint)(self.unconstrained)

    def __repr__(self):
        return f"Constrained({self.value!r}, {self.constraint})"


jax.tree_util.register_pytree_node(
    Constrained,
    lambda c: ((c.unconstrained,), c.constraint),
    lambda constraint, leaves: Constrained(leaves[0], constraint),
)


def constrained(value, constraint):
    """A parameter with initial (constrained) `value` that stays in `constraint`'s support."""
    return Constrained(biject_to(constraint).inv(jnp.asarray(value, jnp.result_type(float))), constraint)


def constrain(params):
    """`params` with every `Constrained` node replaced by its constrained value."""
    return jax.tree.map(
        lambda node: node.value if isinstance(node, Constrained) else node,
        params,
        is_leaf=lambda node: isinstance(node, Constrained),
    )
