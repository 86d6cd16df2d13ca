"""Smoke tests for the benchmarks (benchmarks/): code size of enumerated chains, and the VAE
gradient step against the hand-written one. Fast: tracing only, plus one tiny jitted VAE step."""

import sys
from pathlib import Path

import jax
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `benchmarks` is not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import count_eqns  # noqa: E402
from benchmarks import vae_step as vae  # noqa: E402
from benchmarks.enum_scaling import (  # noqa: E402
    chain_objective,
    exact_value_and_grad,
    hand_written_value_and_grad,
    jaxpr_size,
    thetas,
)


@pytest.fixture(scope="module")
def sizes():
    return {n: jaxpr_size(n) for n in range(1, 9)}


def test_enumerated_chain_code_size_is_linear(sizes):
    # Exact enumeration does 2^n work, but the program must grow linearly: the rest of the program
    # runs once over all worlds, and each equation costs O(1) extra equations however many world
    # axes its operands vary over. (Nested vmaps gave 2.5 n^2 + 115 n: a broadcast per level.)
    increments = np.diff([sizes[n] for n in range(1, 9)])
    assert np.all(increments > 0)
    assert np.all(increments[1:] == increments[1]), increments


def test_enumerated_chain_is_exact():
    n = 4
    value, grad = jax.jit(lambda t, k: chain_objective(n).value_and_grad_estimate(k, t))(thetas(n), jax.random.key(3))
    exact_value, exact_grad = exact_value_and_grad(thetas(n))
    np.testing.assert_allclose(value, exact_value, atol=1e-5)
    np.testing.assert_allclose(grad, exact_grad, atol=1e-5)
    hand_value, hand_grad = hand_written_value_and_grad(n)(thetas(n))  # the compile-time reference
    np.testing.assert_allclose(hand_value, exact_value, atol=1e-5)
    np.testing.assert_allclose(hand_grad, exact_grad, atol=1e-5)


def test_vae_gradient_matches_hand_written_with_same_noise():
    params, x = vae.init_params(jax.random.key(1)), vae.make_data(4)
    step = jax.jit(lambda p, x, k: (vae.ours_step(p, x, k), vae.hand_step(p, x, k)))
    for key in jax.random.split(jax.random.key(0), 2):
        (v_ours, g_ours), (v_hand, g_hand) = step(params, x, key)
        np.testing.assert_allclose(v_ours, v_hand, rtol=1e-5)
        assert vae.max_relative_error(g_ours, g_hand) < 1e-4
    # and the step is not doing extra work the hand-written one does not (dead code aside)
    j_ours = jax.make_jaxpr(vae.ours_step)(params, x, key)
    j_hand_np = jax.make_jaxpr(vae.hand_numpyro_step)(params, x, key)
    assert count_eqns(j_ours) <= 1.1 * count_eqns(j_hand_np)
