"""The shared jaxpr helpers."""

import jax
import jax.numpy as jnp

import ppl
from ppl import dist
from transforms.interpreter import live_eqns


def test_live_eqns_drops_unused_values_and_keeps_sites_and_effects():
    @ppl.expectation
    def program(x):
        _ = jnp.exp(x) > 0.0  # unused, as NumPyro's argument checks leave behind
        ppl.sample("z", dist.Normal(x, 1.0))  # unused value, but a site always counts
        jax.debug.print("{}", x)  # an effect
        return x + 1.0

    closed, _ = program.stage(1.0)
    names = [e.primitive.name for e in closed.jaxpr.eqns]
    assert "exp" in names and "gt" in names
    assert [e.primitive.name for e in live_eqns(closed.jaxpr)] == ["sample", "debug_print", "add"]
