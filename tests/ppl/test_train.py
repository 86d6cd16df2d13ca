"""`ppl.fit` and `ppl.svi`: the compiled loop compiles once, non-finite steps are skipped and
counted, minibatch gradients are unbiased (exactly, over a partition of the data), an objective a
user writes trains like the library's, a run resumed from its state is bit-identical to one run,
and Equinox modules train as parameters (argument checks and the progress bar: test_train_checks)."""

import math
import re
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import keys
from jax import monitoring

import ppl
from ppl import dist, objectives

# z ~ N(0, 1), x_i ~ N(z, 1): p(z | x) = N(sum x / (1 + n), 1 / sqrt(1 + n))
DATA = jnp.array([1.2, -0.3, 2.1, 0.8, 1.6, 0.4, 1.1, 2.5])


@ppl.gen
def model(params, x):
    z = ppl.sample("z", dist.Normal(0.0, 1.0))
    ppl.sample("x", dist.Normal(z, 1.0).expand(x.shape), obs=x)


@ppl.gen
def guide(params, x):
    ppl.sample("z", dist.Normal(params["loc"], jnp.exp(params["log_scale"])))


def init_params():
    return {"loc": jnp.array(0.0), "log_scale": jnp.array(0.0)}


def posterior(x, likelihood_weight=1.0):
    """(mean, std) of p(z) p(x | z)^likelihood_weight, normalized."""
    precision = 1.0 + likelihood_weight * x.shape[0]
    return float(likelihood_weight * jnp.sum(x) / precision), float(1.0 / math.sqrt(precision))


def cosine_adam(learning_rate, steps):
    return optax.adam(optax.cosine_decay_schedule(learning_rate, steps))


# -- compilation ---------------------------------------------------------------------------------


class CompileCounter:
    """Names of the programs XLA compiles while active (JAX's monitoring events)."""

    def __init__(self):
        self.names = []

    def __call__(self, event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            self.names.append(kwargs.get("fun_name"))

    def __enter__(self):
        monitoring.register_event_duration_secs_listener(self)
        return self

    def __exit__(self, *exc):
        monitoring.unregister_event_duration_listener(self)


def test_a_second_fit_on_the_same_shapes_does_not_recompile():
    traces = []

    @ppl.expectation
    def elbo(params, x):
        traces.append(1)  # runs once per Python-level trace of the objective's body
        z, log_q = ppl.sim(guide)(params, x)
        return ppl.density(model)(z, params, x) - log_q

    optimizer = optax.adam(0.05)
    with CompileCounter() as first:
        params, losses = ppl.fit(
            elbo, init_params(), DATA, optimizer=optimizer, steps=300, key=jax.random.key(0), progress=False
        )
    # one trace of the body for 300 steps in 3 chunks: the step is staged once, not once per step or chunk
    assert len(traces) == 1
    assert first.names.count("jit(chunk)") == 1, first.names  # the compiled loop (a failure here may be a rename)
    assert losses.shape == (300,)

    # another fit: other initial values, another key, another number of steps (the last chunk is
    # partial), data of the same shape but other values
    other = {"loc": jnp.array(1.0), "log_scale": jnp.array(-1.0)}
    with CompileCounter() as second:
        params2, losses2 = ppl.fit(
            elbo, other, DATA + 0.5, optimizer=optimizer, steps=250, key=jax.random.key(1), progress=False
        )
    assert len(traces) == 1
    assert "jit(chunk)" not in second.names, second.names
    assert losses2.shape == (250,)
    # and it did optimize: each fit is near its own posterior
    assert abs(float(params["loc"]) - posterior(DATA)[0]) < 0.15
    assert abs(float(params2["loc"]) - posterior(DATA + 0.5)[0]) < 0.15

    # negative control: data of another shape is another program, and the counters see it
    with CompileCounter() as third:
        ppl.fit(elbo, init_params(), DATA[:5], optimizer=optimizer, steps=100, key=jax.random.key(2), progress=False)
    assert third.names.count("jit(chunk)") == 1, third.names
    assert len(traces) == 2


# -- non-finite steps ------------------------------------------------------------------------------


@ppl.gen
def point_guide(params, flag):
    ppl.sample("z", dist.Normal(params["loc"], 0.3))


@ppl.expectation
def nan_when_flagged(params, flag):
    """Maximized at loc = 1; NaN whenever the data flag is set."""
    z, _ = ppl.sim(point_guide)(params, flag)
    return -((z["z"] - 1.0) ** 2) + jnp.where(flag > 0, jnp.nan, 0.0)


@ppl.expectation
def nan_in_the_tail(params, flag):
    """NaN (value and gradient) for the draws more than 0.45 from 1: about 13% of the steps near
    loc = 1 (symmetric, so that skipping them leaves the optimum at 1)."""
    z, _ = ppl.sim(point_guide)(params, flag)
    return -((z["z"] - 1.0) ** 2) + jnp.where(jnp.abs(z["z"] - 1.0) > 0.45, jnp.nan, 0.0)


@jax.custom_jvp
def _poison(z):
    return jnp.zeros_like(z)


@_poison.defjvp
def _poison_jvp(primals, tangents):
    (z,), (t,) = primals, tangents
    return _poison(z), jnp.where(jnp.abs(z - 1.0) > 0.45, jnp.nan, 0.0) * t


@ppl.expectation
def nan_gradient_in_the_tail(params, flag):
    """A finite value whose gradient is NaN for the draws more than 0.45 from 1."""
    z, _ = ppl.sim(point_guide)(params, flag)
    return -((z["z"] - 1.0) ** 2) + _poison(z["z"])


SKIP_STEPS = 400
SKIP_OPTIMIZER = optax.adam(optax.cosine_decay_schedule(0.05, SKIP_STEPS))  # one object: one compile per objective


def _fit_counting_skips(objective, flag):
    """(params, losses, number of skipped steps that fit's warning reports)."""
    params = {"loc": jnp.array(0.7)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        params, losses = ppl.fit(
            objective, params, flag, optimizer=SKIP_OPTIMIZER, steps=SKIP_STEPS, key=jax.random.key(3), progress=False
        )
    messages = [str(w.message) for w in caught if "skipped" in str(w.message)]
    if not messages:
        return params, losses, 0
    (message,) = messages
    skipped, total = map(int, re.search(r"skipped (\d+) of (\d+)", message).groups())
    assert total == SKIP_STEPS
    return params, losses, skipped


def test_every_step_is_skipped_when_the_objective_is_nan():
    params, losses, skipped = _fit_counting_skips(nan_when_flagged, jnp.array(1.0))
    assert skipped == SKIP_STEPS and np.all(np.isnan(losses))
    assert params["loc"] == jnp.float32(0.7)  # untouched: no update was applied
    # the same program without the flag trains, and warns about nothing
    params, losses, skipped = _fit_counting_skips(nan_when_flagged, jnp.array(0.0))
    assert skipped == 0 and np.all(np.isfinite(losses))
    assert abs(float(params["loc"]) - 1.0) < 0.2


def test_steps_with_a_nan_loss_or_a_nan_gradient_are_skipped_and_counted():
    params, losses, skipped = _fit_counting_skips(nan_in_the_tail, jnp.array(0.0))
    nan_steps = int(np.sum(np.isnan(losses)))
    assert 0 < skipped < SKIP_STEPS and skipped == nan_steps, (skipped, nan_steps)
    # the other steps trained normally: the parameters are finite and near the optimum
    assert abs(float(params["loc"]) - 1.0) < 0.2, params
    # a finite loss whose gradient is NaN on the same draws (same key): the same steps are skipped
    params2, losses2, skipped2 = _fit_counting_skips(nan_gradient_in_the_tail, jnp.array(0.0))
    assert np.all(np.isfinite(losses2))
    assert skipped2 == skipped
    np.testing.assert_allclose(params2["loc"], params["loc"], rtol=1e-5)


def guarded_steps(objective, params, flag, steps, key):
    """The always-guarded semantics: `ppl.svi`'s step (its update under a `lax.cond` on the loss
    and gradient), jitted, one call per step, drawing as fit's step t does (the first half of
    `split(fold_in(key, t))`). Returns (state, losses)."""
    vi = ppl.svi(objective, SKIP_OPTIMIZER)
    step = jax.jit(vi.step)
    state, losses = vi.init(params), []
    for t in range(steps):
        state, info = step(jax.random.split(jax.random.fold_in(key, t))[0], state, flag)
        losses.append(info["loss"])
    return state, np.asarray(losses)


def applied_updates(state):
    """Adam's count of the updates applied (a skipped step leaves the optimizer state alone)."""
    return int(state.opt_state[0].count)


@pytest.mark.parametrize("objective", [nan_in_the_tail, nan_gradient_in_the_tail], ids=["nan-loss", "nan-gradient"])
def test_fit_skips_the_steps_the_always_guarded_step_skips(objective):
    """fit runs every step unguarded and re-runs a chunk up to a non-finite step to skip it: the
    same steps are skipped as by the guarded step, whatever the chunk size, bit for bit between
    chunk sizes and to float rounding against the guarded step (whose cond XLA compiles apart)."""
    params, key, steps = {"loc": jnp.array(0.7)}, jax.random.key(3), 120
    reference, reference_losses = guarded_steps(objective, params, jnp.array(0.0), steps, key)
    assert 0 < applied_updates(reference) < steps  # some steps skipped, not all
    fits = []
    for chunk_size in (1, 7, 120):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fits.append(
                ppl.fit(
                    objective,
                    params,
                    jnp.array(0.0),
                    optimizer=SKIP_OPTIMIZER,
                    steps=steps,
                    key=key,
                    chunk_size=chunk_size,
                    return_state=True,
                    progress=False,
                )
            )
    for state, losses in fits:
        assert int(state.step) == steps and applied_updates(state) == applied_updates(reference)
        np.testing.assert_array_equal(np.isnan(losses), np.isnan(reference_losses))
        np.testing.assert_allclose(losses, reference_losses, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(state.params["loc"], reference.params["loc"], rtol=1e-5)
        for mine, first in zip(jax.tree.leaves(state), jax.tree.leaves(fits[0][0])):
            np.testing.assert_array_equal(mine, first)
        np.testing.assert_array_equal(losses, fits[0][1])
    # negative control: without the check those updates go in (NaN ones, or for a NaN loss, finite
    # ones), and the run lands elsewhere
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unchecked, _ = ppl.fit(
            objective,
            params,
            jnp.array(0.0),
            optimizer=SKIP_OPTIMIZER,
            steps=steps,
            key=key,
            progress=False,
            skip_nonfinite=False,
        )
    assert not np.isclose(unchecked["loc"], reference.params["loc"], rtol=1e-3)


class CountingRuns:
    """Wraps fit's compiled chunks: per call, (which program: "fast" or "precise", steps asked
    for, steps computed)."""

    def __init__(self, monkeypatch):
        self.calls, compiled = [], ppl.train._compiled_chunk

        def counting(*key):
            run, name = compiled(*key), "precise" if key[-1] else "fast"

            def counted(arrays, key, steps, stop, skipped, args):
                out = run(arrays, key, steps, stop, skipped, args)
                self.calls.append((name, steps, int(out[0].step) - int(arrays.step) - skipped))
                return out

            return counted

        monkeypatch.setattr(ppl.train, "_compiled_chunk", counting)


def test_a_clean_chunk_runs_once_and_a_non_finite_step_costs_a_rerun_up_to_it(monkeypatch):
    runs = CountingRuns(monkeypatch)
    options = {"optimizer": SKIP_OPTIMIZER, "key": jax.random.key(3), "progress": False}
    ppl.fit(nan_when_flagged, {"loc": jnp.array(0.7)}, jnp.array(0.0), steps=25, chunk_size=10, **options)
    assert runs.calls == [("fast", 10, 10), ("fast", 10, 10), ("fast", 5, 5)]  # one call per chunk
    runs.calls.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ppl.fit(nan_when_flagged, {"loc": jnp.array(0.7)}, jnp.array(1.0), steps=3, chunk_size=3, **options)
    # every step NaN: each run stops after its first step, the precise run finds it is the first,
    # and skipping it re-runs nothing
    per_step = lambda n: [("fast", n, 1), ("precise", n, 1), ("fast", 0, 0)]
    assert runs.calls == per_step(3) + per_step(2) + per_step(1)
    runs.calls.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state, losses = ppl.fit(
            nan_gradient_in_the_tail,
            {"loc": jnp.array(0.7)},
            jnp.array(0.0),
            steps=60,
            chunk_size=60,
            return_state=True,
            **options,
        )
    # finite losses, NaN gradients: the fast run sees them in the end parameters (and stops at the
    # next step, whose loss the NaN parameters make NaN); per skipped step a fast run, a precise
    # one and a fast re-run up to it, then the clean rest of the chunk
    skipped = 60 - applied_updates(state)
    assert np.all(np.isfinite(losses)) and 1 < skipped < 30
    names = [name for name, *_ in runs.calls]
    assert names[: 3 * skipped] == ["fast", "precise", "fast"] * skipped and names[3 * skipped :] in ([], ["fast"])
    assert sum(computed for *_, computed in runs.calls) <= 3 * 60 + skipped


def test_a_skipped_svi_step_leaves_the_state_unchanged():
    vi = ppl.svi(nan_gradient_in_the_tail, optax.adam(0.1))
    state = vi.init({"loc": jnp.array(1.45)})  # half the draws land more than 0.45 from 1
    step = jax.jit(vi.step)
    outcomes = [step(k, state, jnp.array(0.0)) for k in keys(20, seed=4)]
    skipped = [bool(info["skipped"]) for _, info in outcomes]
    assert any(skipped) and not all(skipped)
    for (new, _), was_skipped in zip(outcomes, skipped):
        assert int(new.step) == 1
        same = jax.tree.leaves(
            jax.tree.map(
                lambda a, b: bool(jnp.all(a == b)), (new.params, new.opt_state), (state.params, state.opt_state)
            )
        )
        assert all(same) == was_skipped


def test_without_the_check_every_update_is_applied():
    vi = ppl.svi(nan_gradient_in_the_tail, optax.adam(0.1), skip_nonfinite=False)
    state = vi.init({"loc": jnp.array(1.45)})
    step = jax.jit(vi.step)
    outcomes = [step(k, state, jnp.array(0.0)) for k in keys(20, seed=4)]
    assert not any(bool(info["skipped"]) for _, info in outcomes)
    nan_params = [bool(jnp.isnan(new.params["loc"])) for new, _ in outcomes]
    assert any(nan_params) and not all(nan_params)  # the NaN gradients went in
    # and fit runs exactly `steps` updates when they are not a multiple of the chunk size
    params, losses = ppl.fit(
        uphill,
        {"loc": jnp.array(0.7)},
        optimizer=optax.sgd(0.1),
        steps=7,
        key=jax.random.key(0),
        chunk_size=3,
        progress=False,
        skip_nonfinite=False,
    )
    assert losses.shape == (7,)
    np.testing.assert_allclose(params["loc"], 0.7 + 7 * 0.1, rtol=1e-6)


@ppl.expectation
def uphill(params):
    """Gradient 1 everywhere: each SGD step adds the learning rate."""
    return params["loc"]


# -- minibatches ----------------------------------------------------------------------------------

N = DATA.shape[0]


def minibatch_elbo(estimator, scaled=True):
    """The ELBO with the log-likelihood of a minibatch scaled by N / batch size, by hand."""
    g = ppl.with_estimators(guide, {"z": estimator})

    @ppl.expectation
    def objective(params, batch):
        z, log_q = ppl.sim(g)(params, batch)
        log_prior = dist.Normal(0.0, 1.0).log_prob(z["z"])
        log_lik = jnp.sum(dist.Normal(z["z"], 1.0).log_prob(batch)) * (N / batch.shape[0] if scaled else 1.0)
        return log_prior + log_lik - log_q

    return objective


def _partition_average(value_and_grad, key, params, num_batches):
    """The average (value, gradient) over a partition of the data, and the full-data ones."""
    batches = DATA[jax.random.permutation(jax.random.key(6), N)].reshape(num_batches, -1)
    values, grads = zip(*(value_and_grad(key, params, b) for b in batches))
    averaged = {name: np.array([g[name] for g in grads]) for name in params}
    return np.mean(values), averaged, value_and_grad(key, params, DATA)


@pytest.mark.parametrize("estimator", [ppl.reparam(), ppl.reinforce()], ids=["reparam", "reinforce"])
def test_minibatch_gradients_average_to_the_full_data_gradient(estimator):
    """With the same key (so the same draw of z), the gradients over a partition of the data into
    minibatches average to the full-data gradient: the scaled log-likelihood is linear in the data."""
    params = {"loc": jnp.array(0.3), "log_scale": jnp.array(-0.5)}
    value_and_grad = jax.jit(minibatch_elbo(estimator).value_and_grad_estimate)
    for key in keys(5, seed=5):
        value, grads, (full_value, full_grad) = _partition_average(value_and_grad, key, params, 4)
        np.testing.assert_allclose(value, full_value, rtol=1e-5)
        for name in params:
            np.testing.assert_allclose(np.mean(grads[name]), full_grad[name], rtol=1e-5, atol=1e-5)
            assert np.std(grads[name]) > 1e-2  # each minibatch's gradient differs from the average
    # negative control: without the N / batch size factor the average is not the full-data gradient
    unscaled = jax.jit(minibatch_elbo(estimator, scaled=False).value_and_grad_estimate)
    _, grads, (_, full_grad) = _partition_average(unscaled, key, params, 4)
    assert not np.allclose(np.mean(grads["loc"]), full_grad["loc"], rtol=0.1)


@ppl.gen
def datum(z, x):
    ppl.sample("x", dist.Normal(z, 1.0), obs=x)


@ppl.gen
def subsampled_model(params, batch):
    z = ppl.sample("z", dist.Normal(0.0, 1.0))
    likelihood = ppl.plate(datum, size=N, subsample_size=batch.shape[0], in_axes=(None, 0))
    ppl.sample("data", likelihood, z, batch)


def test_fit_with_minibatches_reaches_the_full_data_posterior():
    """Minibatches of 2 of the 8 points, scaled by hand or by `ppl.plate(subsample_size=...)`: the
    same program, so the same fit for the same key; both reach the full-data posterior."""
    steps = 10_000
    fitted = []
    for objective in (minibatch_elbo(ppl.reparam()), objectives.elbo(subsampled_model, guide)):
        params, _ = ppl.fit(
            objective,
            init_params(),
            DATA,
            optimizer=cosine_adam(0.01, steps),
            steps=steps,
            batch_size=2,
            key=jax.random.key(8),
            progress=False,
        )
        fitted.append(params)
        mean, std = posterior(DATA)
        assert abs(float(params["loc"]) - mean) < 0.06, (params, mean)
        assert abs(float(jnp.exp(params["log_scale"])) - std) < 0.06, (params, std)
    by_hand, plate = fitted
    for name in by_hand:
        np.testing.assert_allclose(plate[name], by_hand[name], atol=1e-3)


# -- an objective written by a user ----------------------------------------------------------------


def tempered_elbo(likelihood_weight):
    """E_q[log p(z) + w log p(x | z) - log q(z)], maximized by q(z) proportional to p(z) p(x | z)^w."""

    @ppl.expectation
    def objective(params, x):
        z, log_q = ppl.sim(guide)(params, x)
        z = z["z"]
        return dist.Normal(0.0, 1.0).log_prob(z) + likelihood_weight * jnp.sum(dist.Normal(z, 1.0).log_prob(x)) - log_q

    return objective


def analytic_kl_elbo(likelihood_weight):
    """The same bound with the KL term in closed form and a Monte Carlo likelihood term."""

    @ppl.expectation
    def objective(params, x):
        loc, scale = params["loc"], jnp.exp(params["log_scale"])
        kl = jnp.log(1.0 / scale) + (scale**2 + loc**2) / 2.0 - 0.5  # KL(N(loc, scale) || N(0, 1))
        z, _ = ppl.sim(guide)(params, x)
        return likelihood_weight * jnp.sum(dist.Normal(z["z"], 1.0).log_prob(x)) - kl

    return objective


@pytest.mark.parametrize("build", [tempered_elbo, analytic_kl_elbo], ids=["tempered", "analytic-kl"])
def test_a_user_written_objective_trains_through_fit(build):
    steps, weight = 10_000, 0.25
    params, losses = ppl.fit(
        build(weight),
        init_params(),
        DATA,
        optimizer=cosine_adam(0.01, steps),
        steps=steps,
        key=jax.random.key(9),
        progress=False,
    )
    mean, std = posterior(DATA, weight)
    assert abs(float(params["loc"]) - mean) < 0.05, (params, mean)
    assert abs(float(jnp.exp(params["log_scale"])) - std) < 0.05, (params, std)
    # it found the tempered posterior, not the posterior (the two differ by much more than the tolerance)
    assert abs(posterior(DATA)[0] - mean) > 0.2 and abs(posterior(DATA)[1] - std) > 0.2
    assert np.mean(losses[-200:]) < np.mean(losses[:50])


# -- resuming a run ---------------------------------------------------------------------------------


def test_a_run_resumed_from_its_state_is_bit_identical_to_one_run():
    """200 steps at once, or 130 then 70 from the returned state (a split inside a chunk of 50),
    with minibatches and a schedule: the same parameters and losses, bit for bit, and no compile."""
    objective = minibatch_elbo(ppl.reparam())
    common = dict(optimizer=cosine_adam(0.05, 200), key=jax.random.key(10), batch_size=2, chunk_size=50, progress=False)
    whole, losses = ppl.fit(objective, init_params(), DATA, steps=200, **common)
    state, first = ppl.fit(objective, init_params(), DATA, steps=130, return_state=True, **common)
    assert isinstance(state, ppl.SVIState) and int(state.step) == 130
    with CompileCounter() as resumed:
        state, second = ppl.fit(objective, state, DATA, steps=70, return_state=True, **common)
    assert "jit(chunk)" not in resumed.names, resumed.names
    assert int(state.step) == 200
    for name in whole:
        np.testing.assert_array_equal(state.params[name], whole[name])
    np.testing.assert_array_equal(np.concatenate([first, second]), losses)
    # negative control: continuing from the parameters alone restarts the optimizer (its moments
    # and schedule) and the step numbering, and lands elsewhere
    restarted, _ = ppl.fit(objective, state_after(objective, 130, common), DATA, steps=70, **common)
    assert not np.array_equal(restarted["loc"], whole["loc"])


def state_after(objective, steps, common):
    return ppl.fit(objective, init_params(), DATA, steps=steps, **common)[0]


def test_the_draws_of_a_step_do_not_depend_on_the_chunk_size():
    objective = minibatch_elbo(ppl.reparam())
    fits = [
        ppl.fit(
            objective,
            init_params(),
            DATA,
            optimizer=optax.adam(0.05),
            steps=60,
            key=jax.random.key(11),
            batch_size=3,
            chunk_size=chunk_size,
            progress=False,
        )
        for chunk_size in (7, 60)
    ]
    (params7, losses7), (params60, losses60) = fits
    np.testing.assert_array_equal(losses7, losses60)
    np.testing.assert_array_equal(params7["loc"], params60["loc"])


# -- parameters with static leaves: Equinox modules --------------------------------------------------


@ppl.gen
def latent_per_datum(x):
    z = ppl.sample("z", dist.Normal(0.0, 1.0).expand(x.shape))
    ppl.sample("x", dist.Normal(z, 1.0), obs=x)


def amortized_guide(net):
    """q(z_i | x_i) = N(net(x_i)): the guide closes over the module (a generative function's
    arguments are staged as arrays, so a module with a function leaf cannot be one yet)."""

    @ppl.gen
    def guide(x):
        out = jax.vmap(net)(x[:, None])
        ppl.sample("z", dist.Normal(out[:, 0], jnp.exp(out[:, 1])))

    return guide


@ppl.expectation
def mlp_elbo(net, x):
    z, log_q = ppl.sim(amortized_guide(net))(x)
    return ppl.density(latent_per_datum)(z, x) - log_q


def test_fit_trains_an_equinox_mlp_and_returns_the_module():
    """The amortized guide's posterior is N(x_i / 2, 1 / sqrt 2); params is the module itself."""
    net = eqx.nn.MLP(1, 2, 16, 1, activation=jax.nn.tanh, key=jax.random.key(12))
    steps = 3000
    optimizer = cosine_adam(0.01, steps)
    fitted, losses = ppl.fit(
        mlp_elbo, net, DATA, optimizer=optimizer, steps=steps, key=jax.random.key(13), progress=False
    )
    assert isinstance(fitted, eqx.nn.MLP) and fitted.activation is net.activation
    out = jax.vmap(fitted)(DATA[:, None])
    np.testing.assert_allclose(out[:, 0], DATA / 2, atol=0.1)
    np.testing.assert_allclose(jnp.exp(out[:, 1]), 1 / math.sqrt(2), atol=0.1)
    assert np.mean(losses[-200:]) < np.mean(losses[:50])
    # negative control: the initial module is far from the posterior
    assert not np.allclose(jax.vmap(net)(DATA[:, None])[:, 0], DATA / 2, atol=0.1)
    # the static leaves are part of the compiled chunk's key: the same module structure reuses it
    with CompileCounter() as again:
        ppl.fit(mlp_elbo, fitted, DATA, optimizer=optimizer, steps=100, key=jax.random.key(14), progress=False)
    assert "jit(chunk)" not in again.names, again.names


@ppl.gen
def mlp_guide(net, x):
    out = jax.vmap(net)(x[:, None])
    ppl.sample("z", dist.Normal(out[:, 0], jnp.exp(out[:, 1])))


def test_a_guide_may_take_the_module_as_an_argument():
    @ppl.expectation
    def elbo(net, x):
        z, log_q = ppl.sim(mlp_guide)(net, x)
        return ppl.density(latent_per_datum)(z, x) - log_q

    net = eqx.nn.MLP(1, 2, 4, 1, key=jax.random.key(17))
    fitted, _ = ppl.fit(elbo, net, DATA, optimizer=optax.adam(0.01), steps=10, key=jax.random.key(18), progress=False)
    assert isinstance(fitted, eqx.nn.MLP)


def test_svi_steps_an_equinox_mlp_under_filter_jit():
    net = eqx.nn.MLP(1, 2, 4, 1, key=jax.random.key(15))
    vi = ppl.svi(mlp_elbo, optax.adam(0.01))
    state, info = eqx.filter_jit(vi.step)(jax.random.key(16), vi.init(net), DATA)
    assert isinstance(state.params, eqx.nn.MLP) and state.params.activation is net.activation
    assert np.isfinite(info["loss"]) and int(state.step) == 1
    assert not np.array_equal(state.params.layers[1].bias, net.layers[1].bias)


def test_only_floating_point_leaves_are_trained():
    """A Python float is trained (as `ppl.constrained` documents); an int array and a function
    pass through unchanged; a Python int (a float written without its point) is refused."""

    @ppl.expectation
    def objective(params):
        return params["f"](params["loc"]) * params["scale"] + jnp.sum(params["shift"])

    params = {"loc": 0.0, "shift": jnp.arange(3), "scale": jnp.array(2), "f": lambda v: v}
    fitted, _ = ppl.fit(objective, params, optimizer=optax.sgd(0.1), steps=5, key=jax.random.key(0), progress=False)
    np.testing.assert_allclose(fitted["loc"], 5 * 0.1 * 2, rtol=1e-6)
    np.testing.assert_array_equal(fitted["shift"], jnp.arange(3))
    assert fitted["shift"].dtype == jnp.arange(3).dtype
    assert fitted["scale"] == 2 and fitted["f"] is params["f"]
    with pytest.raises(TypeError, match=r"params\['scale'\] = 2 is a Python int, which is not trained: write 2.0"):
        ppl.fit(objective, params | {"scale": 2}, optimizer=optax.sgd(0.1), steps=5, key=jax.random.key(0))
