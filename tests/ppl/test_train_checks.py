"""What `ppl.fit` and `ppl.svi` say when something is wrong, and what they report while training:
argument errors at call time (naming the argument, with a hint), the warning about non-finite
parameters, the loss history's contract at skipped steps, and the progress bar."""

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ppl
from ppl import dist

DATA = jnp.arange(8.0)


@ppl.expectation
def uphill(params, *data):
    """Gradient 1 in `loc` everywhere, whatever the data."""
    return params["loc"]


def run_fit(objective=uphill, *args, params=None, **kwargs):
    """`ppl.fit` with 5 SGD steps from loc = 0 unless told otherwise."""
    options = {"optimizer": optax.sgd(0.1), "steps": 5, "key": jax.random.key(0), "progress": False}
    return ppl.fit(objective, {"loc": jnp.array(0.0)} if params is None else params, *args, **options | kwargs)


# -- argument errors ------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [0, -3])
def test_a_batch_size_below_one_is_refused(batch_size):
    with pytest.raises(
        ValueError,
        match=rf"batch_size must be >= 1 \(.*batch_size=None uses all the data\), got batch_size={batch_size}",
    ):
        run_fit(uphill, DATA, batch_size=batch_size)


def test_a_batch_size_larger_than_the_data_is_refused():
    with pytest.raises(ValueError, match=r"batch_size=9 is larger than the data \(8 along the leading axis\)"):
        run_fit(uphill, DATA, batch_size=9)
    run_fit(uphill, DATA, batch_size=8)  # the whole data set is a valid minibatch


def test_data_arguments_whose_leading_axes_disagree_are_named():
    with pytest.raises(
        ValueError, match=r"share their leading axis.*args\[0\] has 8, args\[1\]\['y'\] has 5.*data_argnums"
    ):
        run_fit(uphill, DATA, {"y": jnp.ones(5)}, batch_size=2)
    with pytest.raises(ValueError, match=r"args\[1\] has no leading axis.*data_argnums"):
        run_fit(uphill, DATA, jnp.array(1.0), batch_size=2)
    with pytest.raises(ValueError, match=r"needs data to minibatch"):
        run_fit(uphill, batch_size=2)
    with pytest.raises(ValueError, match=r"data_argnums=\(2,\) are positions in the 2 argument"):
        run_fit(uphill, DATA, DATA, batch_size=2, data_argnums=(2,))
    # listing only the per-datum argument makes the same call valid
    run_fit(uphill, DATA, jnp.ones(5), batch_size=2, data_argnums=(0,))


def test_minibatching_a_later_argument_keeps_the_arguments_in_order():
    @ppl.expectation
    def objective(params, scale, batch):  # the data is the second argument
        return params["loc"] * scale * batch.shape[0]

    params, _ = run_fit(objective, jnp.array(2.0), DATA, batch_size=3, data_argnums=(1,))
    np.testing.assert_allclose(params["loc"], 5 * 0.1 * 2.0 * 3, rtol=1e-6)


def test_zero_steps_return_the_parameters_and_an_empty_history():
    params, losses = run_fit(steps=0)
    assert params["loc"] == 0.0 and losses.shape == (0,) and losses.dtype == jnp.result_type(float)
    state, losses = run_fit(steps=0, return_state=True)
    assert int(state.step) == 0 and losses.shape == (0,)
    with pytest.raises(ValueError, match=r"steps must be >= 0 \(the number of optimizer steps\), got steps=-1"):
        run_fit(steps=-1)
    with pytest.raises(TypeError, match=r"steps must be an int .*got float 100.0"):
        run_fit(steps=100.0)
    with pytest.raises(ValueError, match=r"chunk_size must be >= 1"):
        run_fit(chunk_size=0)


@pytest.mark.parametrize(
    "optimizer, hint",
    [(0.01, r"write optimizer=optax\.adam\(0\.01\)"), (optax.adam, r"call it"), (lambda g: g, r"call it")],
    ids=["learning-rate", "uncalled-optax", "function"],
)
def test_an_optimizer_that_is_not_a_gradient_transformation_is_refused(optimizer, hint):
    for call in (lambda: run_fit(optimizer=optimizer), lambda: ppl.svi(uphill, optimizer)):
        with pytest.raises(TypeError, match=rf"optimizer must be an optax GradientTransformation, got .*{hint}"):
            call()


@ppl.gen
def guide(params):
    ppl.sample("z", dist.Normal(params["loc"], 1.0))


def test_an_objective_that_is_not_an_expectation_is_refused():
    def plain(params):
        return params["loc"]

    for objective, what in ((plain, "function plain"), (guide, "GenerativeFunction")):
        for call in (lambda: run_fit(objective), lambda: ppl.svi(objective, optax.sgd(0.1))):
            with pytest.raises(
                TypeError, match=rf"objective must be an @ppl\.expectation, got {what}.*@ppl\.expectation"
            ):
                call()
    with pytest.raises(TypeError, match=r"ppl\.objectives\.elbo\(model, guide\)"):
        run_fit(guide)


class DuckObjective:
    """The interface `fit` uses, without `@ppl.expectation`'s filtering of static leaves."""

    def value_and_grad_estimate(self, key, params):
        return jax.value_and_grad(lambda p: p["loc"])(params)


def test_an_objective_with_only_the_interface_trains_array_params_and_refuses_static_leaves():
    params, _ = run_fit(DuckObjective())
    np.testing.assert_allclose(params["loc"], 0.5, rtol=1e-6)
    with pytest.raises(TypeError, match=r"leaves that are not floating-point arrays.*@ppl\.expectation"):
        ppl.fit(
            DuckObjective(),
            {"loc": jnp.array(0.0), "f": jnp.tanh},
            optimizer=optax.sgd(0.1),
            steps=2,
            key=jax.random.key(0),
            progress=False,
        )


# -- non-finite parameters -------------------------------------------------------------------------


@ppl.expectation
def into_a_sqrt(params):
    """Drives `a` down by the learning rate per step, through 0 into sqrt's NaN (value and
    gradient); `b` stays finite."""
    return -params["net"]["a"] + 0.0 * jnp.sqrt(params["net"]["a"]) - params["b"] ** 2


def fit_into_a_sqrt(skip_nonfinite):
    """(params, losses, the warning messages): 10 SGD steps from a = 0.25; step 3 reaches a < 0."""
    params = {"net": {"a": jnp.array(0.25)}, "b": jnp.array(1.0)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        params, losses = run_fit(into_a_sqrt, params=params, steps=10, chunk_size=4, skip_nonfinite=skip_nonfinite)
    return params, losses, [str(w.message) for w in caught]


def test_non_finite_parameters_at_the_end_are_named_with_the_steps_that_made_them():
    params, losses, messages = fit_into_a_sqrt(skip_nonfinite=False)
    assert bool(jnp.isnan(params["net"]["a"])) and bool(jnp.isfinite(params["b"]))
    (message,) = [m for m in messages if "non-finite parameters" in m]
    assert "['net']['a']" in message and "['b']" not in message
    assert "7 of 10 steps had a non-finite loss (the first: losses[3])" in message
    assert "skip_nonfinite=True" in message
    assert np.array_equal(np.isnan(losses), np.arange(10) >= 3)
    # negative control: with the check, the same steps are skipped, and the parameters stay finite
    params, losses, messages = fit_into_a_sqrt(skip_nonfinite=True)
    assert np.isfinite(params["net"]["a"]) and not [m for m in messages if "non-finite parameters" in m]
    assert messages == ["fit skipped 7 of 10 steps whose loss or update was not finite"]


# -- the loss history and the progress bar ---------------------------------------------------------


@ppl.gen
def point_guide(params):
    ppl.sample("z", dist.Normal(params["loc"], 0.3))


@ppl.expectation
def nan_in_the_tail(params):
    """NaN (value and gradient) for the draws more than 0.45 from 1: some steps, not all."""
    z, _ = ppl.sim(point_guide)(params)
    return -((z["z"] - 1.0) ** 2) + jnp.where(jnp.abs(z["z"] - 1.0) > 0.45, jnp.nan, 0.0)


@ppl.expectation
def always_nan(params):
    return params["loc"] * jnp.nan


class RecordingBar:
    """Stands in for `tqdm.auto.tqdm`: records the bar's arguments, updates and postfixes."""

    made = []

    def __init__(self, **kwargs):
        self.kwargs, self.updates, self.postfixes = kwargs, [], []
        RecordingBar.made.append(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def set_postfix(self, postfix, refresh=True):
        self.postfixes.append(dict(postfix))

    def update(self, n):
        self.updates.append(n)


def fit_with_a_recording_bar(monkeypatch, objective, steps=45, chunk_size=10):
    RecordingBar.made = []
    monkeypatch.setattr(ppl.train, "tqdm", RecordingBar)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, losses = ppl.fit(
            objective,
            {"loc": jnp.array(1.4)},
            optimizer=optax.adam(0.01),
            steps=steps,
            key=jax.random.key(1),
            chunk_size=chunk_size,
        )
    (bar,) = RecordingBar.made
    skipped = [int(m) for w in caught for m in re.findall(r"skipped (\d+) of", str(w.message))]
    return bar, np.asarray(losses), skipped


def test_the_history_marks_skipped_steps_and_the_bar_shows_the_applied_ones(monkeypatch):
    bar, losses, (skipped,) = fit_with_a_recording_bar(monkeypatch, nan_in_the_tail)
    # the history: one entry per step, NaN exactly at the steps skipped for their loss
    assert losses.shape == (45,) and 0 < skipped < 45 and skipped == np.sum(np.isnan(losses))
    # the bar: one update per chunk (the last one partial), out of the total
    assert bar.kwargs["total"] == 45 and not bar.kwargs["disable"] and bar.updates == [10, 10, 10, 10, 5]
    chunks = np.split(losses, [10, 20, 30, 40])
    for postfix, chunk, done in zip(bar.postfixes, chunks, np.cumsum(bar.updates)):
        # the mean loss over the chunk's applied steps (finite), and the running count of skipped steps
        np.testing.assert_allclose(float(postfix["loss"]), np.nanmean(chunk), rtol=1e-3)
        assert postfix.get("skipped", 0) == np.sum(np.isnan(losses[:done]))
    # negative control: the plain mean of a chunk with a skipped step is NaN
    assert any(np.isnan(np.mean(chunk)) for chunk in chunks)


def test_a_run_with_every_step_skipped_shows_no_loss(monkeypatch):
    bar, losses, (skipped,) = fit_with_a_recording_bar(monkeypatch, always_nan, steps=20)
    assert skipped == 20 and np.all(np.isnan(losses))
    assert bar.postfixes == [{"skipped": 10}, {"skipped": 20}]


def test_the_progress_bar_prints_to_stderr_and_progress_false_prints_nothing(capsys):
    run_fit(steps=30, chunk_size=10, progress=True)
    out, err = capsys.readouterr()
    assert out == "" and "30/30" in err and "loss=" in err
    run_fit(steps=30, chunk_size=10, progress=False)
    assert capsys.readouterr() == ("", "")
