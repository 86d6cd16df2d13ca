"""evaluate_folded: gathers at known indices become selections with the same values and gradients,
and what depends on constants alone is computed while tracing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ppl
from models import hmm
from transforms import compat, folding
from transforms.folding import evaluate_folded

ROWS = jnp.array([[0.2, 0.3, 0.5], [0.6, 0.4, 0.0], [0.1, 0.1, 0.8], [1.0 / 3, 1.0 / 3, 1.0 / 3]])
INDEXINGS = {
    "rows[i]": lambda rows, i: rows[i],
    "negative index": lambda rows, i: rows[i - 4],
    "take_along_axis, -inf in the operand": lambda rows, i: jnp.take_along_axis(
        jnp.log(rows[:3]), i[:3, None] % 3, axis=1
    ),
    "out of bounds, filled": lambda rows, i: rows.at[i + 2].get(mode="fill", fill_value=-7.0),
    "clipped": lambda rows, i: rows.at[i + 2].get(mode="clip"),
    "two axes": lambda rows, i: rows[i, (i + 1) % 3],
}


def primitive_names(fn, *args):
    names = set()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            names.add(eqn.primitive.name)
            for sub in compat.sub_jaxprs(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return names


@pytest.mark.parametrize("name", INDEXINGS)
def test_selection_has_the_gathers_values_and_gradients(name):
    index = INDEXINGS[name]
    i = jnp.array([0, 3, 1, 2, 1])
    folded = lambda rows: evaluate_folded(lambda args: index(*args), (rows, i))
    assert "gather" in primitive_names(lambda rows: index(rows, i), ROWS)
    assert "gather" not in primitive_names(folded, ROWS)
    weights = jax.random.normal(jax.random.key(0), jnp.shape(index(ROWS, i)))
    loss = lambda f: lambda rows: jnp.sum(jnp.where(jnp.isfinite(f(rows)), f(rows), 0.0) * weights)
    np.testing.assert_array_equal(jax.jit(folded)(ROWS), index(ROWS, i))
    np.testing.assert_allclose(jax.grad(loss(folded))(ROWS), jax.grad(loss(lambda r: index(r, i)))(ROWS), rtol=1e-6)


def test_constants_are_computed_now_and_large_gathers_stay_gathers():
    i = jnp.arange(3)
    table = jnp.zeros((folding.SELECTION_LIMIT, 1))
    names = primitive_names(lambda t: evaluate_folded(lambda args: args[0][args[1] * 2 + 1], (t, i)), table)
    assert "gather" in names and "mul" not in names and "add" not in names


def test_exact_hmm_marginal_gradient_has_no_gathers_or_scatters():
    """The model indexes its transition rows with the summed-out state: with folding, the
    compiled gradient of the forward algorithm holds no gather and no scatter-add."""
    marginal = hmm.exact_marginal(hmm.learned_model)
    x = hmm.make_data(t=20, seed=1, init=hmm.INIT_3, trans=hmm.TRANS_3, means=hmm.MEANS_3)[0]
    params = {"init_logits": jnp.log(hmm.INIT_3), "trans_logits": jnp.log(hmm.TRANS_3)}
    step = jax.value_and_grad(lambda p: ppl.density(marginal)({}, p, x))
    names = primitive_names(step, params)
    assert not names & {"gather", "scatter-add", "scatter_add", "scatter"}, names
    value, grad = step(params)
    softmax = jax.nn.softmax
    hand = lambda p: hmm.log_marginal(x, softmax(p["init_logits"]), softmax(p["trans_logits"], -1), hmm.MEANS_3)
    expected_value, expected_grad = jax.value_and_grad(hand)(params)
    np.testing.assert_allclose(value, expected_value, rtol=1e-5)
    for k in params:
        np.testing.assert_allclose(grad[k], expected_grad[k], rtol=1e-4, atol=1e-5)
