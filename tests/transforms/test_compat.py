"""Pins the JAX behaviour that `transforms/compat.py` relies on; a JAX upgrade that changes it fails
here, by name, before it breaks the interpreters in a confusing way."""

import tomllib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from packaging.requirements import Requirement

from ppl import dist
from transforms import compat
from transforms.interpreter import site_avals
from transforms.primitives import contains_sample, eqn_contains_sample, sample_p, sample_site

ROOT = Path(__file__).resolve().parents[2]


def site():
    return sample_site(("z",), dist.Normal(0.0, 1.0), None)


def sample_eqns(jaxpr):
    """Every sample equation in an open jaxpr, recursively."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive is sample_p:
            found.append(eqn)
        for sub in compat.sub_jaxprs(eqn.params):
            found.extend(sample_eqns(sub))
    return found


def only_site(fn, *args):
    closed = jax.make_jaxpr(fn)(*args)
    (eqn,) = sample_eqns(closed.jaxpr)
    return closed, eqn


# -- sample_p under vmap ----------------------------------------------------------------------------


def test_batching_rule_runs_with_unbatched_operands_under_vmap():
    _, eqn = only_site(jax.vmap(lambda _: site()), jnp.arange(3))
    assert eqn.params["batch_shape"] == (3,)
    assert eqn.outvars[0].aval.shape == (3,)


def test_batching_rule_runs_under_vmap_of_jit():
    closed, eqn = only_site(jax.vmap(lambda _: jax.jit(site)()), jnp.arange(3))
    assert eqn.params["batch_shape"] == (3,)
    assert closed.jaxpr.eqns[0].primitive.name in compat.INLINE_CALLS


def test_batching_rule_runs_under_vmap_of_scan():
    """vmap moves into the scan body: the site is batched there, and its choices are laid out
    (scan length, vmap size) by the interpreter."""
    closed, eqn = only_site(
        jax.vmap(lambda _: lax.scan(lambda c, _: (c, site()), 0.0, None, length=4)[1]), jnp.arange(3)
    )
    assert eqn.params["batch_shape"] == (3,)
    assert closed.jaxpr.eqns[0].primitive.name == "scan"
    assert site_avals(closed.jaxpr)[("z",)][0] == (4, 3)


def test_nested_vmap_grows_the_batch_shape():
    _, eqn = only_site(jax.vmap(jax.vmap(lambda _: site())), jnp.zeros((2, 3)))
    assert eqn.params["batch_shape"] == (2, 3)


def test_vmap_of_cond_with_unbatched_index_batches_the_branch_sites():
    fn = jax.vmap(lambda x, flag: lax.cond(flag, lambda: site() + x, lambda: x), in_axes=(0, None))
    closed, eqn = only_site(fn, jnp.zeros(3), True)
    assert closed.jaxpr.eqns[-1].primitive is compat.cond_p
    assert eqn.params["batch_shape"] == (3,)


def test_vmap_of_cond_with_batched_index():
    """JAX's own rule turns the cond into a select of both branches; ours, for branches with sites,
    into a loop of real conds with unbatched sites. Conds without sites keep JAX's rule."""
    fn = jax.vmap(lambda flag: lax.cond(flag, site, lambda: 0.0))
    closed, eqn = only_site(fn, jnp.array([True, False]))
    (scan,) = [e for e in closed.jaxpr.eqns if e.primitive.name == "scan"]
    assert scan.params["length"] == 2
    (cond,) = [e for e in scan.params["jaxpr"].jaxpr.eqns if e.primitive is compat.cond_p]
    assert eqn.params["batch_shape"] == ()
    assert contains_sample(cond.params["branches"][1].jaxpr)

    plain = jax.make_jaxpr(jax.vmap(lambda flag: lax.cond(flag, lambda: 1.0, lambda: 0.0)))(jnp.array([True, False]))
    names = {e.primitive.name for e in plain.jaxpr.eqns}
    assert "select_n" in names and "cond" not in names and "scan" not in names


def test_fori_loop_with_static_bounds_is_a_scan():
    closed = jax.make_jaxpr(lambda: lax.fori_loop(0, 3, lambda i, c: c + site(), 0.0))()
    assert [e.primitive.name for e in closed.jaxpr.eqns if eqn_contains_sample(e)] == ["scan"]
    dynamic = jax.make_jaxpr(lambda n: lax.fori_loop(0, n, lambda i, c: c + site(), 0.0))(3)
    assert [e.primitive.name for e in dynamic.jaxpr.eqns if eqn_contains_sample(e)] == ["while"]


# -- bind_eqn and call-like equations ------------------------------------------------------------------


def test_bind_eqn_evaluates_a_jit_eqn():
    closed = jax.make_jaxpr(jax.jit(lambda x, y: (x * y, x + 1.0)))(2.0, 3.0)
    (eqn,) = closed.jaxpr.eqns
    assert eqn.primitive.name in compat.INLINE_CALLS
    out = compat.bind_eqn(eqn, [jnp.float32(2.0), jnp.float32(3.0)])
    np.testing.assert_allclose(out, [6.0, 3.0])
    inner, consts = compat.inline_jaxpr(eqn)
    assert len(inner.invars) == 2 and consts == []


def test_bind_eqn_evaluates_a_custom_jvp_eqn_and_keeps_its_rule():
    @jax.custom_jvp
    def f(x):
        return jnp.sin(x)

    f.defjvp(lambda primals, tangents: (f(primals[0]), 7.0 * tangents[0]))
    closed = jax.make_jaxpr(f)(1.0)
    (eqn,) = closed.jaxpr.eqns
    assert eqn.primitive.name == "custom_jvp_call"
    np.testing.assert_allclose(compat.bind_eqn(eqn, [jnp.float32(1.0)]), [np.sin(1.0)], rtol=1e-6)
    _, tangent = jax.jvp(lambda x: compat.bind_eqn(eqn, [x])[0], (1.0,), (1.0,))
    np.testing.assert_allclose(tangent, 7.0)  # the custom rule, not d sin


def test_bind_eqn_evaluates_a_checkpoint_eqn():
    closed = jax.make_jaxpr(jax.checkpoint(lambda x: x * 2.0))(1.0)
    (eqn,) = closed.jaxpr.eqns
    assert eqn.primitive.name in compat.INLINE_CALLS
    np.testing.assert_allclose(compat.bind_eqn(eqn, [jnp.float32(1.5)]), [3.0])


def test_sub_jaxprs_finds_bodies_and_branches():
    closed = jax.make_jaxpr(
        lambda x: lax.cond(x > 0, lambda: lax.scan(lambda c, _: (c, c), x, None, length=2)[1], lambda: jnp.zeros(2))
    )(1.0)
    cond = closed.jaxpr.eqns[-1]
    branches = compat.sub_jaxprs(cond.params)
    assert len(branches) == 2
    assert any(e.primitive.name == "scan" for b in branches for e in b.eqns)


def test_compiling_a_left_over_site_raises_the_address():
    try:
        jax.jit(lambda: sample_site(("left", "over"), dist.Normal(0.0, 1.0), None)).lower().compile()
    except RuntimeError as e:
        assert "'left/over'" in str(e)
    else:
        raise AssertionError("compiling a program with a sample site should fail")


def test_stop_gradient_on_tangents_transposes():
    """A custom_jvp rule that vmaps a cond with a batched index over tangent values (ADEV
    enumeration does) needs reverse mode to transpose the `stop_gradient` JAX inserts there."""

    @jax.custom_jvp
    def f(x):
        return x

    @f.defjvp
    def f_jvp(primals, tangents):
        (x,), (t,) = primals, tangents
        idx = jnp.array([0, 1])
        out = jax.vmap(lambda i: lax.switch(i, [lambda a: 2.0 * a, lambda a: 3.0 * a], t))(idx)
        return x, jnp.sum(out)

    np.testing.assert_allclose(jax.grad(f)(1.0), 5.0)


def test_is_elementwise_matches_evaluating_with_leading_axes():
    """ADEV evaluates elementwise equations on world-broadcast operands without `vmap`."""
    for p in (lax.add_p, lax.mul_p, lax.sin_p, lax.logistic_p, lax.integer_pow_p, lax.eq_p):
        assert compat.is_elementwise(p), p
    for p in (lax.reduce_sum_p, lax.dot_general_p, lax.broadcast_in_dim_p, lax.cumsum_p, sample_p, lax.transpose_p):
        assert not compat.is_elementwise(p), p
    (eqn,) = jax.make_jaxpr(lambda x: lax.integer_pow(x, 3))(jnp.ones(2)).jaxpr.eqns
    x = jnp.arange(6.0).reshape(3, 2)
    np.testing.assert_allclose(compat.bind_eqn(eqn, [x])[0], x**3)
    # rank-0 operands that vary over no world are left to the primitive, which broadcasts them
    (eqn,) = jax.make_jaxpr(lambda a, b: a + b)(1.0, 2.0).jaxpr.eqns
    out = jax.jit(lambda a, b: compat.bind_eqn(eqn, [a, b])[0])(jnp.float32(1.0), x)
    np.testing.assert_allclose(out, x + 1.0)


# -- the pinned version ------------------------------------------------------------------------------


def test_installed_jax_is_in_the_pinned_range():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = {r.name: r.specifier for r in map(Requirement, pyproject["project"]["dependencies"])}
    import jaxlib

    assert jax.__version__ in pins["jax"], (jax.__version__, str(pins["jax"]))
    assert jaxlib.__version__ in pins["jaxlib"], (jaxlib.__version__, str(pins["jaxlib"]))
