"""`ppl.fit(..., checkpoint=directory)`: a fit interrupted (an exception, or the process killed
with SIGKILL while saving) and run again resumes from its latest save and returns what an
uninterrupted fit returns, bit for bit, losses, skipped steps and warnings included; Equinox
modules keep their static leaves; a fit on a two-device mesh resumes onto the mesh; a finished
fit is not re-run; a save from another fit is refused, naming the difference."""

import os
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ppl
from ppl import dist

HERE = Path(__file__).resolve().parent
DATA = jnp.array([1.2, -0.3, 2.1, 0.8, 1.6, 0.4, 1.1, 2.5])


@ppl.gen
def guide(params, x):
    ppl.sample("z", dist.Normal(params["loc"], jnp.exp(params["log_scale"])))


@ppl.expectation
def elbo(params, x):
    """A minibatch ELBO of z ~ N(0, 1), x_i ~ N(z, 1), NaN for the draws far from 1 (skipped steps)."""
    z, log_q = ppl.sim(guide)(params, x)
    z = z["z"]
    log_lik = jnp.sum(dist.Normal(z, 1.0).log_prob(x)) * DATA.shape[0] / x.shape[0]
    return dist.Normal(0.0, 1.0).log_prob(z) + log_lik - log_q + jnp.where(jnp.abs(z - 1.0) > 0.8, jnp.nan, 0.0)


OPTIMIZER = optax.adam(optax.cosine_decay_schedule(0.05, 100))
OPTIONS = {"optimizer": OPTIMIZER, "steps": 100, "batch_size": 3, "chunk_size": 20, "progress": False}


def run(checkpoint=None, params=None, key=0, **changes):
    """(state, losses, warning messages) of the fit, with `changes` to OPTIONS."""
    params = {"loc": jnp.array(0.0), "log_scale": jnp.array(0.0)} if params is None else params
    options = OPTIONS | {"key": jax.random.key(key), "checkpoint": checkpoint, "return_state": True} | changes
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state, losses = ppl.fit(elbo, params, DATA, **options)
    return state, np.asarray(losses), [str(w.message) for w in caught]


def interrupt(monkeypatch, chunks, fit):
    """Call `fit()` with a KeyboardInterrupt raised once `chunks` chunks have run (and been saved)."""
    shown = []

    def stop(*args):
        shown.append(1)
        if len(shown) == chunks:
            raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(ppl.train, "_show", stop)
        with pytest.raises(KeyboardInterrupt):
            fit()


def saved_steps(directory):
    """The steps of the finished saves in `directory` (Orbax names each after its step)."""
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def count_chunks(monkeypatch):
    """A list that gets one entry per chunk `fit` runs."""
    chunks, real = [], ppl.train._run_chunk

    def counted(*args):
        chunks.append(1)
        return real(*args)

    monkeypatch.setattr(ppl.train, "_run_chunk", counted)
    return chunks


def assert_same(got, expected):
    (state, losses, messages), (state_expected, losses_expected, messages_expected) = got, expected
    for leaf, expected_leaf in zip(jax.tree.leaves(state), jax.tree.leaves(state_expected), strict=True):
        np.testing.assert_array_equal(leaf, expected_leaf)
    np.testing.assert_array_equal(losses, losses_expected)
    assert messages == messages_expected


def test_an_interrupted_fit_resumes_and_returns_what_an_uninterrupted_fit_returns(tmp_path, monkeypatch):
    whole = run()
    assert 0 < np.sum(np.isnan(whole[1])) < 100 and "fit skipped" in whole[2][0]  # skipped steps are part of it
    interrupt(monkeypatch, 3, lambda: run(tmp_path))
    assert saved_steps(tmp_path) == [60]  # the latest save only: after the third chunk
    chunks = count_chunks(monkeypatch)
    resumed = run(tmp_path)
    assert len(chunks) == 2  # steps 60-99 only
    assert_same(resumed, whole)
    # negative control: a fresh fit of the last 40 steps from the initial parameters is another run
    assert not np.array_equal(run(steps=40)[1], whole[1][60:])


def test_a_finished_fit_returns_its_saved_result_without_training(tmp_path, monkeypatch):
    first = run(tmp_path, chunk_size=30)
    chunks = count_chunks(monkeypatch)
    assert_same(run(tmp_path, chunk_size=30), first)
    assert chunks == []
    # a chunk size other than the saved run's resumes too: it changes no draw
    interrupt(monkeypatch, 2, lambda: run(tmp_path / "other", chunk_size=30))
    assert saved_steps(tmp_path / "other") == [60]
    assert_same(run(tmp_path / "other", chunk_size=7), first)


def test_an_equinox_module_keeps_its_static_leaves_across_a_resume(tmp_path, monkeypatch):
    @ppl.expectation
    def fit_identity(net, x):
        return -jnp.sum((jax.vmap(net)(x[:, None])[:, 0] - x) ** 2)

    net = eqx.nn.MLP(1, 1, 8, 1, activation=jnp.tanh, key=jax.random.key(2))
    options = {"optimizer": optax.adam(0.01), "steps": 40, "chunk_size": 10, "key": jax.random.key(0)}

    def fit(checkpoint=None):
        return ppl.fit(fit_identity, net, DATA, progress=False, checkpoint=checkpoint, **options)

    whole, losses = fit()
    interrupt(monkeypatch, 2, lambda: fit(tmp_path))
    resumed, resumed_losses = fit(tmp_path)
    assert isinstance(resumed, eqx.nn.MLP) and resumed.activation is jnp.tanh
    assert jax.tree.structure(resumed) == jax.tree.structure(whole)
    for leaf, expected in zip(jax.tree.leaves(resumed), jax.tree.leaves(whole), strict=True):
        np.testing.assert_array_equal(leaf, expected)
    np.testing.assert_array_equal(resumed_losses, losses)
    assert not np.array_equal(resumed.layers[0].weight, net.layers[0].weight)  # it did train


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"steps": 120}, r"it was saved with steps=100, this call has steps=120"),
        ({"key": 1}, r"it was saved with key=\['key<fry>', \[0, 0\]\], this call has key=\['key<fry>', \[0, 1\]\]"),
        ({"batch_size": 4}, r"it was saved with batch_size=3, this call has batch_size=4"),
        ({"skip_nonfinite": False}, r"it was saved with skip_nonfinite=True, this call has skip_nonfinite=False"),
        (
            {"params": {"loc": jnp.zeros(2), "log_scale": jnp.array(0.0)}},
            r"its state leaf \.params\['loc'\] float32\[\] is \.params\['loc'\] float32\[2\] in this call",
        ),
        (
            {"params": {"loc": jnp.array(0.0), "log_scale": jnp.array(0.0), "w": jnp.array(1.0)}},
            r"its state leaf .* is \.params\['w'\] float32\[\] in this call",
        ),
    ],
    ids=["steps", "key", "batch-size", "skip-nonfinite", "shape", "structure"],
)
def test_a_save_from_another_fit_is_refused_naming_the_difference(tmp_path, monkeypatch, changes, message):
    interrupt(monkeypatch, 1, lambda: run(tmp_path))
    with pytest.raises(ValueError, match=rf"checkpoint='{tmp_path}' holds another fit: {message}; .*another directory"):
        run(tmp_path, **changes)
    assert saved_steps(tmp_path) == [20]  # untouched, and still resumable by its own fit
    assert_same(run(tmp_path), run())


def test_a_checkpoint_that_is_not_a_directory_name_is_refused():
    with pytest.raises(TypeError, match=r"checkpoint must be a directory \(a str or a path\), got int"):
        run(3)


KILLED = """
import os, signal, sys
sys.path.insert(0, {here!r})
import ppl, test_checkpoint

shown = []
def kill(*args):  # right after the third chunk's save has started: it is being written in the background
    shown.append(1)
    if len(shown) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
ppl.train._show = kill
test_checkpoint.run({directory!r})
"""


def test_a_fit_killed_while_saving_resumes_from_its_last_finished_save(tmp_path):
    code = textwrap.dedent(KILLED.format(here=str(HERE), directory=str(tmp_path)))
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert saved_steps(tmp_path)[-1] in (40, 60)  # the third save finished, or the second is the latest
    assert_same(run(tmp_path), run())


ON_A_MESH = """
import os, sys
sys.path.insert(0, {here!r})
import jax, numpy as np, pytest
import ppl, test_checkpoint

mesh = jax.make_mesh((2,), ("data",))
whole = test_checkpoint.run(mesh=mesh, batch_size=4)
with pytest.MonkeyPatch.context() as monkeypatch:
    test_checkpoint.interrupt(monkeypatch, 2, lambda: test_checkpoint.run({directory!r}, mesh=mesh, batch_size=4))
resumed = test_checkpoint.run({directory!r}, mesh=mesh, batch_size=4)
test_checkpoint.assert_same(resumed, whole)
print(resumed[0].params["loc"].sharding.is_fully_replicated, len(resumed[0].params["loc"].sharding.device_set))
"""


def test_a_fit_on_a_mesh_resumes_onto_the_mesh(tmp_path):
    code = textwrap.dedent(ON_A_MESH.format(here=str(HERE), directory=str(tmp_path)))
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["True", "2"]  # the parameters come back replicated on both devices
