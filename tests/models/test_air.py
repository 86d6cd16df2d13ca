"""Attend-Infer-Repeat (models/air.py): the canvases hold the digits they say; the spatial
transformer places and extracts glimpses exactly at pixel positions and interpolates bilinearly
between them; model and guide score their own draws, and the latents of absent objects cancel in
the log weight; enum, MVD and REINFORCE at the presence site agree in mean gradient; every
estimator trains with finite losses."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from models import air
from ppl import dist


@pytest.fixture(scope="module")
def pools():
    return air.load_digit_pools()


@pytest.fixture(scope="module")
def canvases(pools):
    return air.make_canvases(400, pools[0], seed=3)


def test_canvases_hold_their_count_of_digits(pools, canvases):
    train_pool, test_pool = pools
    assert train_pool.shape[1:] == test_pool.shape[1:] == (air.GLIMPSE, air.GLIMPSE)
    assert train_pool.shape[0] + test_pool.shape[0] == 1797
    images, counts = canvases
    assert images.shape == (400, air.SIZE, air.SIZE) and counts.shape == (400,)
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    # counts are uniform on 0..STEPS: each frequency within 5 standard errors of 1/4
    freq = np.bincount(np.asarray(counts), minlength=air.STEPS + 1) / 400
    assert np.all(np.abs(freq - 0.25) < 5 * math.sqrt(0.25 * 0.75 / 400)), freq
    # blank exactly when empty; digits do not overlap, so the ink is the sum of whole digits
    ink = np.asarray(images.sum((1, 2)))
    assert np.all((ink == 0) == (np.asarray(counts) == 0))
    per_digit = float(train_pool.sum((1, 2)).mean())
    for c in range(1, air.STEPS + 1):
        mean_ink = ink[np.asarray(counts) == c].mean()
        assert abs(mean_ink / c - per_digit) < 0.2 * per_digit, (c, mean_ink / c, per_digit)


def test_place_and_extract_are_exact_at_pixel_positions_and_bilinear_between(pools):
    glimpse = jnp.asarray(pools[0][7])
    for row, col in [(0, 0), (3, 5), (12, 12), (7, 0)]:
        pasted = np.zeros((air.SIZE, air.SIZE), np.float32)
        pasted[row : row + air.GLIMPSE, col : col + air.GLIMPSE] = pools[0][7]
        placed = air.place(glimpse, air.where_at(row, col))
        np.testing.assert_allclose(placed, pasted, atol=1e-5)
        np.testing.assert_allclose(air.extract(placed, air.where_at(row, col)), glimpse, atol=1e-5)
    # half a pixel to the right: the average of the two neighbouring pixel positions
    halfway = air.place(glimpse, air.where_at(4, 6.5))
    both = 0.5 * (air.place(glimpse, air.where_at(4, 6)) + air.place(glimpse, air.where_at(4, 7)))
    np.testing.assert_allclose(halfway, both, atol=1e-5)
    assert float(jnp.max(jnp.abs(halfway - air.place(glimpse, air.where_at(4, 6))))) > 0.1
    # outside the canvas there is nothing to see; twice the scale covers twice the width
    assert float(jnp.max(jnp.abs(air.extract(jnp.ones((air.SIZE, air.SIZE)), jnp.array([0.0, 3.0, 0.0]))))) == 0.0
    wide = air.place(jnp.ones((air.GLIMPSE, air.GLIMPSE)), jnp.array([math.log(2.0), 0.0, 0.0]))
    np.testing.assert_allclose(float(wide.sum()), (2 * air.GLIMPSE) ** 2, rtol=0.05)


@pytest.fixture(scope="module")
def params():
    return jax.jit(air.init_params)(jax.random.key(0))


def test_model_and_guide_score_their_draws(params, canvases):
    image = canvases[0][1]

    @jax.jit
    def scores(key):
        trace = air.guide.simulate(key, params, image)
        z = trace.choices
        by_hand = (
            air.STEPS * math.log(air.PRIOR_PRES)
            + dist.Normal(air.WHERE_LOC, air.WHERE_SCALE).log_prob(z["where"]).sum()
            + dist.Normal(0.0, 1.0).log_prob(z["what"]).sum()
            + dist.Normal(air.render(params, z["pres"], z["where"], z["what"]), air.SIGMA).log_prob(image).sum()
        )
        return z, trace.score, air.guide.assess(z, params, image)[0], air.model.assess(z, params, image)[0], by_hand

    z, score, log_q, log_p, by_hand = scores(jax.random.key(1))
    assert z["pres"].shape == (air.STEPS,) and z["where"].shape == (air.STEPS, 3)
    assert z["what"].shape == (air.STEPS, air.WHAT)
    np.testing.assert_allclose(log_q, score, rtol=1e-5)
    # the model's log density, by hand: the prior terms plus the pixel likelihood of the rendered canvas
    np.testing.assert_allclose(log_p, by_hand, rtol=1e-5)


def test_absent_objects_cancel_in_the_log_weight(params, canvases):
    image = canvases[0][2]
    z = dict(air.guide.simulate(jax.random.key(2), params, image).choices)
    z["pres"] = jnp.array([1.0, 0.0, 1.0])  # object 2 absent, so object 3 too: one object
    log_w = jax.jit(lambda z: air.model.assess(z, params, image)[0] - air.guide.assess(z, params, image)[0])
    moved = {**z, "where": z["where"].at[1:].add(0.7), "what": z["what"].at[1:].add(-1.3)}
    np.testing.assert_allclose(log_w(moved), log_w(z), rtol=1e-5)
    assert int(air.count(z["pres"])) == 1
    # the first object's latents do matter
    moved_first = {**z, "where": z["where"].at[0].add(0.3)}
    assert abs(float(log_w(moved_first) - log_w(z))) > 1.0


BATCH, NUM_CALLS = 64, 16
FAST_COMPILE = {"xla_backend_optimization_level": 0}  # ~3x faster XLA compile; each program runs a few times


@functools.cache
def gradient_step(name):
    """The estimator's `value_and_grad_estimate`, compiled for batches of BATCH canvases."""
    args = (jax.random.key(0), air.init_params(jax.random.key(0)), jnp.zeros((BATCH, air.SIZE, air.SIZE)))
    return jax.jit(air.objective(name).value_and_grad_estimate).lower(*args).compile(FAST_COMPILE)


OPTIMIZER = optax.adam(1e-3)


@jax.jit
def ascend(params, opt_state, grads):
    """One Adam step up the gradient."""
    updates, opt_state = OPTIMIZER.update(jax.tree.map(jnp.negative, grads), opt_state)
    return optax.apply_updates(params, updates), opt_state


def presence_gradients(name, params, images):
    """NUM_CALLS estimates of the gradient w.r.t. the guide's presence-logit bias, each the mean of
    BATCH independent per-image estimates (the canvases `images`, repeated); float64 numpy."""
    batch = jnp.tile(images, (BATCH // images.shape[0], 1, 1))
    keys = jax.random.split(jax.random.key(11), NUM_CALLS)
    return np.array([float(gradient_step(name)(k, params, batch)[1]["locate"]["out"]["b"][0]) for k in keys])


def test_presence_estimators_agree_in_mean_gradient(params, canvases):
    images = canvases[0][:4]
    grads = {name: presence_gradients(name, params, images) for name in ("enum", "mvd", "reinforce")}
    mean = {n: g.mean() for n, g in grads.items()}
    se = {n: g.std(ddof=1) / math.sqrt(NUM_CALLS) for n, g in grads.items()}
    for name in ("mvd", "reinforce"):
        assert abs(mean[name] - mean["enum"]) < 5 * math.hypot(se[name], se["enum"]), (name, mean, se)
    assert abs(mean["enum"]) > 20 * se["enum"], (mean, se)  # not trivially zero
    assert se["enum"] < se["reinforce"] and se["mvd"] < se["reinforce"], se


@pytest.mark.parametrize("name", air.ESTIMATORS)
def test_each_estimator_takes_training_steps_with_finite_losses(name, params, canvases):
    images = canvases[0][:BATCH]
    p, opt_state = params, OPTIMIZER.init(params)
    for key in jax.random.split(jax.random.key(5), 3):
        value, grads = gradient_step(name)(key, p, images)
        assert np.isfinite(float(value))
        assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
        p, opt_state = ascend(p, opt_state, grads)
    assert float(jnp.abs(p["locate"]["out"]["b"][0] - params["locate"]["out"]["b"][0])) > 0
