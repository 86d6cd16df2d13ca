"""Data- and particle-parallel training (`ppl.distributed`): with the same key, 1, 2, 4 and 8
devices (forced CPU devices, in subprocesses) give the parameters and losses of a run without a
mesh, for the ELBO, IWAE with sharded particles and a subsampled plate with `batch_size`; the step
really works on per-device blocks; parameters placed on the mesh keep their sharding; two processes
on localhost (gloo collectives), each loading only its shard, train the VAE as one process does, and
the launcher reports a failed or hung process; particle chunks give the values and gradients of one
vmap in less memory; misnamed axes and uneven sizes raise, naming them."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ppl
from models import vae
from ppl import dist, distributed, objectives

ROOT = Path(__file__).resolve().parents[2]


def run_python(code, devices=8, timeout=120):
    """Run `code` in a fresh Python on `devices` forced CPU devices; returns the JSON value of the
    last line it prints."""
    env = distributed.cpu_devices_env(devices)
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# A global mean and a latent per datum (its draws are sharded with the batch), inside a plate that
# is subsampled when fit minibatches.
MODEL = """
import json
import jax, jax.numpy as jnp, optax
import ppl
from ppl import dist

N = 32
X = jax.random.normal(jax.random.key(0), (N,)) + 1.0


@ppl.gen
def model(params, x):
    mu = ppl.sample("mu", dist.Normal(0.0, 10.0))
    with ppl.plate("data", N, subsample_size=x.shape[0]):
        z = ppl.sample("z", dist.Normal(mu, 1.0))
        ppl.sample("x", dist.Normal(z, 0.5), obs=x)


@ppl.gen
def guide(params, x):
    ppl.sample("mu", dist.Normal(params["loc"], jnp.exp(params["log_scale"])))
    with ppl.plate("data", N, subsample_size=x.shape[0]):
        ppl.sample("z", dist.Normal(params["a"] * x + params["b"], jnp.exp(params["c"])))


PARAMS = {name: jnp.array(0.0) for name in ("loc", "log_scale", "a", "b", "c")}


def fit(objective, mesh, batch_size=None):
    params, losses = ppl.fit(objective, PARAMS, X, optimizer=optax.adam(0.05), steps=20, key=jax.random.key(1),
                             batch_size=batch_size, chunk_size=8, mesh=mesh, progress=False)
    return jnp.stack(jax.tree.leaves(params)), losses


def deviations(objective, meshes, batch_size=None):
    # per mesh: the largest difference of the parameters and of the losses from the run without one
    reference = fit(objective, None, batch_size)
    out = {}
    for name, mesh in meshes.items():
        result = fit(objective, mesh, batch_size)
        out[name] = [float(jnp.max(jnp.abs(a - b))) for a, b in zip(result, reference)]
    return out


def data_meshes():
    return {n: jax.make_mesh((n,), ("data",)) for n in (1, 2, 4, 8)}
"""


def assert_same(deviations, meshes):
    assert sorted(deviations) == sorted(meshes), deviations
    for name, (params, losses) in deviations.items():
        assert params < 1e-5 and losses < 1e-4, (name, params, losses)


def test_elbo_same_parameters_on_1_2_4_8_devices():
    out = run_python(MODEL + "print(json.dumps(deviations(ppl.objectives.elbo(model, guide), data_meshes())))")
    assert_same(out, ["1", "2", "4", "8"])


def test_subsampled_plate_minibatch_same_on_1_2_4_8_devices():
    code = MODEL + "print(json.dumps(deviations(ppl.objectives.elbo(model, guide), data_meshes(), batch_size=8)))"
    assert_same(run_python(code), ["1", "2", "4", "8"])


def test_iwae_particles_sharded_same_on_1_2_4_8_devices():
    """8 particles over a particles axis of 1, 2 and 4 devices, and over 2 x 4 (data x particles)."""
    code = MODEL + textwrap.dedent("""
        meshes = {n: jax.make_mesh((n,), ("particles",)) for n in (1, 2, 4)}
        meshes[8] = jax.make_mesh((2, 4), ("data", "particles"))
        print(json.dumps(deviations(ppl.objectives.iwae(model, guide, 8), meshes)))
    """)
    assert_same(run_python(code), ["1", "2", "4", "8"])


def test_step_works_on_per_device_blocks_and_only_all_reduces():
    """On a 2 x 4 (data x particles) mesh, `svi`'s step computes 16 particles x 32 data as blocks
    of 4 x 16 per device: the full 16 x 32 block never appears, the only collective is all-reduce."""
    code = MODEL + textwrap.dedent("""
        import re
        from ppl import distributed
        objective = ppl.objectives.iwae(model, guide, 16)

        def compiled(mesh):
            vi = ppl.svi(objective, optax.adam(0.05), mesh=mesh)
            args = (jax.random.key(0), vi.init(PARAMS), X)
            if mesh is not None:
                args = distributed.place(distributed.resolve(mesh), args)
            return jax.jit(vi.step).lower(*args).compile().as_text()

        sharded, single = compiled(jax.make_mesh((2, 4), ("data", "particles"))), compiled(None)
        names = r"(all-reduce|all-gather|all-to-all|reduce-scatter|collective-permute)\\("
        collectives = sorted(set(re.findall(names, sharded)))
        print(json.dumps([("f32[16,32]" in sharded, "f32[4,16]" in sharded, "f32[16,32]" in single, collectives)]))
    """)
    [(full_block_sharded, local_block, full_block_single, collectives)] = run_python(code)
    assert full_block_single and not full_block_sharded and local_block
    assert collectives == ["all-reduce"]


def test_parameters_placed_on_the_mesh_keep_their_sharding():
    """A weight sharded over a `model` axis stays sharded through `fit` (no copy per device),
    and trains as replicated parameters do."""
    code = textwrap.dedent("""
        import json
        import jax, jax.numpy as jnp, optax
        from jax.sharding import NamedSharding, PartitionSpec as P
        import ppl
        from ppl import dist

        x = jax.random.normal(jax.random.key(0), (64, 8))
        y = (x @ jnp.linspace(-1.0, 1.0, 8) > 0).astype(jnp.float32)

        @ppl.gen
        def model(params, x, y):
            w = ppl.sample("w", dist.Normal(0.0, 1.0).expand((8,)).to_event(1))
            ppl.sample("y", dist.Bernoulli(logits=x @ w).to_event(1), obs=y)

        @ppl.gen
        def guide(params, x, y):
            ppl.sample("w", dist.Normal(params["loc"], jnp.exp(params["log_scale"])).to_event(1))

        mesh = jax.make_mesh((2, 4), ("data", "model"))
        weights = NamedSharding(mesh, P("model"))
        params = {"loc": jnp.zeros(8), "log_scale": jnp.zeros(8)}
        run = lambda p, mesh: ppl.fit(ppl.objectives.elbo(model, guide), p, x, y, optimizer=optax.adam(0.05),
                                      steps=10, key=jax.random.key(1), batch_size=16, mesh=mesh, progress=False)[0]
        reference, sharded = run(params, None), run(jax.device_put(params, weights), mesh)
        print(json.dumps([str(sharded["loc"].sharding.spec),
                          max(float(jnp.max(jnp.abs(sharded[k] - reference[k]))) for k in params)]))
    """)
    spec, deviation = run_python(code)
    assert spec == str(jax.sharding.PartitionSpec("model")) and deviation < 1e-5


def test_uneven_sizes_raise_naming_the_axis():
    code = MODEL + textwrap.dedent("""
        def message(objective, mesh, batch_size=None, x=X):
            try:
                ppl.fit(objective, PARAMS, x, optimizer=optax.adam(0.05), steps=1, key=jax.random.key(1),
                        batch_size=batch_size, mesh=mesh, progress=False)
            except ValueError as e:
                return str(e)

        elbo, iwae = ppl.objectives.elbo(model, guide), ppl.objectives.iwae(model, guide, 6)
        data4 = jax.make_mesh((4,), ("data",))
        print(json.dumps([message(elbo, data4, batch_size=6), message(elbo, data4, x=X[:30]),
                          message(iwae, jax.make_mesh((4,), ("particles",)))]))
    """)
    batch, data, particles = run_python(code, devices=4)
    assert "batch_size=6 is not divisible by the 4 devices of mesh axis 'data'" in batch
    assert "args[0]'s leading axis (30) is not divisible by the 4 devices of mesh axis 'data'" in data
    assert "6 particles is not divisible by the 4 devices of mesh axis 'particles'" in particles


# -- in this process (one device) -----------------------------------------------------------------


@ppl.gen
def model(params, x):
    mu = ppl.sample("mu", dist.Normal(0.0, 10.0))
    ppl.sample("x", dist.Normal(mu + params["shift"], 1.0).expand(x.shape).to_event(1), obs=x)


@ppl.gen
def guide(params, x):
    ppl.sample("mu", dist.Normal(params["loc"], jnp.exp(params["log_scale"])))


PARAMS = {"loc": jnp.array(0.3), "log_scale": jnp.array(-0.5), "shift": jnp.array(0.1)}
X = jnp.array([1.2, -0.3, 2.1, 0.8])


def fit_with(mesh):
    return ppl.fit(
        objectives.elbo(model, guide), PARAMS, X, optimizer=optax.adam(0.1), steps=1, key=keys(1)[0], mesh=mesh
    )


def keys(n):
    return jax.random.split(jax.random.key(0), n)


def test_mesh_without_the_named_axis_raises_naming_it():
    mesh = jax.make_mesh((1,), ("x",))
    with pytest.raises(ValueError, match=r"mesh has axes \('x',\) but no 'data' axis .* no 'particles' axis"):
        fit_with(mesh)
    with pytest.raises(ValueError, match=r"ppl.Sharding\(data='batch'\): the mesh has no axis 'batch', only \('x',\)"):
        fit_with(ppl.Sharding(mesh, data="batch"))
    with pytest.raises(ValueError, match=r"ppl.Sharding\(particles='k'\): the mesh has no axis 'k'"):
        fit_with(ppl.Sharding(mesh, data="x", particles="k"))
    with pytest.raises(ValueError, match="data and particles cannot share the mesh axis 'x'"):
        fit_with(ppl.Sharding(mesh, data="x", particles="x"))
    with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh or a ppl.Sharding, got str"):
        fit_with("data")


def test_a_named_mesh_of_one_device_trains_as_no_mesh():
    (reference, _), (meshed, losses) = fit_with(None), fit_with(jax.make_mesh((1,), ("data",)))
    for k in PARAMS:
        np.testing.assert_array_equal(meshed[k], reference[k])
    assert losses.shape == (1,)


CHUNKED = {  # one per way of scoring particles, and a non-local estimator
    "iwae": lambda chunk: objectives.iwae(model, guide, 7, particle_chunk=chunk),
    "dreg": lambda chunk: objectives.dreg(model, guide, 7, particle_chunk=chunk),
    "vimco": lambda chunk: objectives.vimco(model, guide, 7, particle_chunk=chunk),
    "rws_wake_q": lambda chunk: objectives.rws_wake_q(model, guide, 7, particle_chunk=chunk),
}


@pytest.mark.parametrize("name", sorted(CHUNKED))
def test_particle_chunks_give_the_values_and_gradients_of_one_vmap(name):
    """Chunks of 3 particles (two, and a remainder of 1) and one vmap: the same estimates for the
    same key."""
    (value, grads), (chunked_value, chunked_grads) = [
        jax.jit(CHUNKED[name](chunk).value_and_grad_estimate)(keys(1)[0], PARAMS, X) for chunk in (None, 3)
    ]
    np.testing.assert_allclose(chunked_value, value, rtol=1e-6)
    for k in PARAMS:
        np.testing.assert_allclose(chunked_grads[k], grads[k], rtol=1e-5, atol=1e-6)


def test_particle_chunks_take_less_memory():
    """The VAE's IWAE gradient with 256 particles: scoring 16 at a time needs a fraction of the
    temporary memory XLA allocates for one vmap."""
    x, params = vae.load_digits()[0][:8], vae.init_params(jax.random.key(0))

    def temp_bytes(chunk):
        estimate = jax.jit(objectives.iwae(vae.model, vae.guide, 256, particle_chunk=chunk).value_and_grad_estimate)
        return estimate.lower(keys(1)[0], params, x).compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes(16) < temp_bytes(None) / 4


# -- two processes ----------------------------------------------------------------------------------

# Process i of 2 reads only its file of 32 images, shard<i>.npy, trains on the 64 of both and writes result<i>.json.
WORKER = """
import json, sys
import jax
folder, address, num_processes, process = sys.argv[1:]
jax.distributed.initialize(address, int(num_processes), int(process))
import numpy as np, optax
from jax.sharding import NamedSharding, PartitionSpec as P
import ppl
from models import vae

mesh = jax.make_mesh((2,), ("data",))
mine = np.load(f"{folder}/shard{process}.npy")
x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), mine, (64, vae.PIXELS))
[held] = x.addressable_shards
params = jax.jit(vae.init_params)(jax.random.key(0))  # one program: each eager operation would be compiled
params, losses = ppl.fit(vae.objective("elbo", 16), params, x, optimizer=optax.adam(1e-2), steps=3,
                         key=jax.random.key(0), batch_size=16, mesh=mesh, progress=False)
with open(f"{folder}/result{process}.json", "w") as f:
    json.dump({"held_rows": [held.index[0].start, held.index[0].stop], "fully_addressable": x.is_fully_addressable,
               "leaves": [np.asarray(leaf).tolist() for leaf in jax.tree.leaves(params) + [losses]]}, f)
"""


def test_two_processes_train_the_vae_as_one_process(tmp_path):
    """Two processes on localhost, one CPU device each, each loading only its half of the images
    (rows 0-31 and 32-63, and nothing else): minibatches of 16, drawn from all 64 by the key,
    give the single-process parameters and losses."""
    images = np.asarray(vae.load_digits()[0][:64])
    for process in range(2):
        np.save(tmp_path / f"shard{process}.npy", images[32 * process : 32 * (process + 1)])
    workers = distributed.LocalProcesses([sys.executable, "-c", WORKER, str(tmp_path)], 2, tmp_path, cwd=ROOT)
    reference, losses = ppl.fit(
        vae.objective("elbo", 16),
        vae.init_params(jax.random.key(0)),
        images,
        optimizer=optax.adam(1e-2),
        steps=3,
        key=jax.random.key(0),
        batch_size=16,
        progress=False,
    )
    workers.wait(timeout=120)
    for process in range(2):
        result = json.loads((tmp_path / f"result{process}.json").read_text())
        assert result["held_rows"] == [32 * process, 32 * (process + 1)] and not result["fully_addressable"]
        for got, want in zip(result["leaves"], jax.tree.leaves(reference) + [losses], strict=True):
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_local_processes_report_a_failed_or_hung_process(tmp_path):
    failing = [sys.executable, "-c", "import sys; print('worker failed:', sys.argv[1:]); sys.exit(3)"]
    with pytest.raises(RuntimeError, match=r"process 0 of 2: 3\nworker failed: \['localhost:\d+', '2', '0'\]"):
        distributed.LocalProcesses(failing, 2, tmp_path).wait(timeout=60)
    hung = distributed.LocalProcesses([sys.executable, "-c", "import time; time.sleep(60)"], 1, tmp_path)
    with pytest.raises(RuntimeError, match="process 0 of 1: still running after 1 s"):
        hung.wait(timeout=1)
    assert hung.processes[0].poll() is not None
