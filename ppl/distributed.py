"""Data- and particle-parallel training on JAX's SPMD runtime: which mesh axes shard what.

    mesh = jax.make_mesh((4,), ("data",))
    params, losses = ppl.fit(elbo, params, x, ..., batch_size=256, mesh=mesh)   # minibatch over 4 devices

    mesh = jax.make_mesh((2, 4), ("data", "particles"))
    ppl.fit(ppl.objectives.iwae(model, guide, 64), params, x, ..., mesh=mesh)   # and 64 particles over 4
    ppl.fit(..., mesh=ppl.Sharding(mesh, data="batch", particles="k"))        # other axis names

With a mesh, `ppl.fit` and `ppl.svi` shard the leading axis of each minibatch over the `data` axis
and keep the parameters and optimizer state where they are placed (replicated unless the caller
placed them on the mesh, e.g. a large weight with `jax.device_put(w, NamedSharding(mesh, P(None,
"model")))`); the objectives of `ppl.objectives` shard their particles over the `particles` axis
while `fit`/`svi` trace them (`shard_particles`, which a hand-written objective may call too).
Nothing is communicated by hand: arrays are placed with `jax.device_put` at the boundary and
constrained with `jax.lax.with_sharding_constraint` inside, and XLA's SPMD partitioner inserts the
all-reduce of the gradient. This runs in JAX's automatic sharding mode: a mesh with explicit axis
types (`jax.make_mesh`'s default) is used as the same devices with Auto axes.

On one machine, `cpu_devices_env` gives a fresh Python several CPU devices and `LocalProcesses`
starts a multi-host script as several processes on localhost (how the tests and
`benchmarks/scaling.py` try both).

Random draws do not depend on the sharding: a `jax.random` value is a function of the key and the
shape only, and with `jax_threefry_partitionable` (the default since JAX 0.5, on in the pinned
0.10) each device generates just its own part. So the same key gives the same parameters on any
number of devices, to the rounding of the gradient's all-reduce (sums in another order).
"""

import contextlib
import os
import socket
import subprocess
import threading
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jax.tree_util import keystr, tree_flatten_with_path


class Sharding(NamedTuple):
    """Which axes of `mesh` shard the minibatch (`data`) and the particles (`particles`); None
    shards nothing. `fit(..., mesh=m)` with a plain mesh means `Sharding(m, "data", "particles")`,
    each axis only if `m` has it."""

    mesh: Mesh
    data: str | None = "data"
    particles: str | None = None

    def size(self, axis):
        return self.mesh.shape[axis]

    @property
    def replicated(self):
        return NamedSharding(self.mesh, P())


# -- the mesh and its axes ------------------------------------------------------------------------


def resolve(mesh):
    """`mesh` (None, a `jax.sharding.Mesh` or a `Sharding`) as a checked `Sharding` whose mesh has
    Auto axes, or None."""
    if mesh is None:
        return None
    if isinstance(mesh, Mesh):
        names = mesh.axis_names
        if "data" not in names and "particles" not in names:
            raise ValueError(
                f"mesh has axes {names} but no 'data' axis to shard the minibatch over and no 'particles' axis: "
                "name them so, e.g. jax.make_mesh((n,), ('data',)), or say which with ppl.Sharding(mesh, data=<axis>)"
            )
        mesh = Sharding(mesh, *(axis if axis in names else None for axis in ("data", "particles")))
    if not isinstance(mesh, Sharding):
        raise TypeError(f"mesh must be a jax.sharding.Mesh or a ppl.Sharding, got {type(mesh).__name__}")
    for role, axis in (("data", mesh.data), ("particles", mesh.particles)):
        if axis is not None and axis not in mesh.mesh.axis_names:
            names = mesh.mesh.axis_names
            raise ValueError(f"ppl.Sharding({role}={axis!r}): the mesh has no axis {axis!r}, only {names}")
    if mesh.data is not None and mesh.data == mesh.particles:
        raise ValueError(f"ppl.Sharding: data and particles cannot share the mesh axis {mesh.data!r}")
    auto = Mesh(mesh.mesh.devices, mesh.mesh.axis_names, axis_types=(AxisType.Auto,) * mesh.mesh.devices.ndim)
    return mesh._replace(mesh=auto)


def _check_divisible(spec, axis, n, what, hint):
    if n % spec.size(axis):
        raise ValueError(
            f"{what} is not divisible by the {spec.size(axis)} devices of mesh axis {axis!r} that shards it: {hint}"
        )


def check_sizes(spec, args, data_argnums, batch_size):
    """Raise unless the minibatch divides evenly over the data axis: `batch_size`, or without it
    the data arguments' leading axes (`check_data`)."""
    if spec.data is None:
        return
    if batch_size is None:
        check_data(spec, args, data_argnums)
    else:
        hint = f"use a multiple of {spec.size(spec.data)}"
        _check_divisible(spec, spec.data, batch_size, f"batch_size={batch_size}", hint)


def check_data(spec, args, data_argnums):
    """Raise, naming the leaf, unless every leaf of the data arguments (positions `data_argnums`)
    has a leading axis that divides evenly over the data axis."""
    for i in data_argnums:
        for path, leaf in tree_flatten_with_path(args[i])[0]:
            name, shape = f"args[{i}]{keystr(path)}", np.shape(leaf)
            if not shape:
                raise ValueError(
                    f"with a mesh, {name} has no leading axis to shard over {spec.data!r}; list only the "
                    "per-datum arguments in data_argnums (positions in the arguments after params)"
                )
            hint = "give it a length (or fit a batch_size) that divides evenly, or use another mesh"
            _check_divisible(spec, spec.data, shape[0], f"{name}'s leading axis ({shape[0]})", hint)


# -- constraints inside the step ------------------------------------------------------------------


def _constrain(x, mesh, axis):
    """`x` with its leading axis sharded over `axis`, its other axes left to XLA."""
    spec = P(axis, *[P.UNCONSTRAINED] * (np.ndim(x) - 1))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def shard_data(spec, args, data_argnums):
    """`args` with the leading axis of every leaf of the data arguments sharded over the data
    axis (checked by `check_data`)."""
    if spec is None or spec.data is None:
        return args
    check_data(spec, args, data_argnums)
    shard = lambda a: _constrain(a, spec.mesh, spec.data)
    return tuple(jax.tree.map(shard, arg) if i in data_argnums else arg for i, arg in enumerate(args))


_context = threading.local()


@contextlib.contextmanager
def active(spec):
    """While active (`svi`'s step holds it while the objective is traced), `shard_particles`
    shards over `spec.particles`."""
    before = getattr(_context, "spec", None)
    _context.spec = spec
    try:
        yield spec
    finally:
        _context.spec = before


def shard_particles(tree):
    """`tree` (leaves with a leading particle axis, as `jax.vmap` over particles returns them) with
    that axis sharded over the active mesh's particles axis; `tree` unchanged when none is active
    (outside `fit`/`svi`, or a mesh without a particles axis). Raises unless the particle count
    divides evenly over the axis."""
    spec = getattr(_context, "spec", None)
    if spec is None or spec.particles is None:
        return tree
    for leaf in jax.tree.leaves(tree):
        hint = f"use a multiple of {spec.size(spec.particles)} particles"
        _check_divisible(spec, spec.particles, np.shape(leaf)[0], f"{np.shape(leaf)[0]} particles", hint)
    return jax.tree.map(lambda a: _constrain(a, spec.mesh, spec.particles), tree)


# -- placement at the boundary --------------------------------------------------------------------


def _on_mesh(leaf, mesh):
    """The sharding of `leaf` moved onto `mesh` if `leaf` is already placed on its devices (as
    a `NamedSharding` over axes of the same names), else None."""
    s = getattr(leaf, "sharding", None)
    if not isinstance(s, NamedSharding) or s.mesh.axis_names != mesh.axis_names:
        return None
    if not np.array_equal(s.mesh.device_ids, mesh.device_ids):
        return None
    return NamedSharding(mesh, s.spec)


def _placed(leaf, mesh, sharding):
    """`leaf` on `mesh`: moved onto it with its own sharding if it is already on the mesh's
    devices, else built with `sharding` from its value, which must be the same on every process
    (it is not checked: `jax.device_put` would check it with a collective per leaf)."""
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        data = _placed(jax.random.key_data(leaf), mesh, sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
    moved = _on_mesh(leaf, mesh)
    if moved is not None:
        return jax.device_put(leaf, moved)
    return jax.make_array_from_callback(np.shape(leaf), sharding, lambda index: leaf[index])


def place(spec, tree, sharding=None):
    """`tree` with every array leaf on the mesh: kept where it is if the caller already placed it
    there, else put with `sharding` (default: replicated). Non-array leaves are left as they are."""
    sharding = spec.replicated if sharding is None else sharding
    is_array = lambda leaf: isinstance(leaf, (jax.Array, np.ndarray, np.generic))
    return jax.tree.map(lambda leaf: _placed(leaf, spec.mesh, sharding) if is_array(leaf) else leaf, tree)


def place_args(spec, args, data_argnums, split):
    """The arguments placed for `fit`: with `split` (full-batch training, the data is the
    batch) the data arguments sharded along their leading axis over the data axis, else (the
    minibatch is gathered on each device) replicated, as are the other arguments."""
    batch = NamedSharding(spec.mesh, P(spec.data)) if split and spec.data is not None else None
    return tuple(place(spec, arg, batch if i in data_argnums else None) for i, arg in enumerate(args))


class Placement(NamedTuple):
    """The shardings of a tree's array leaves, hashable (a key of the compiled chunk)."""

    treedef: object
    shardings: tuple

    @staticmethod
    def of(tree):
        leaves, treedef = jax.tree.flatten(tree)
        return Placement(treedef, tuple(leaf.sharding for leaf in leaves))

    def tree(self):
        return self.treedef.unflatten(self.shardings)


# -- on one machine: forced CPU devices and local processes ---------------------------------------


def cpu_devices_env(devices, env=None):
    """`env` (default `os.environ`) for a fresh Python whose JAX runs on `devices` CPU devices:
    XLA's forced host device count, which JAX reads once, when it starts."""
    env = dict(os.environ if env is None else env)
    flags = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    return env | {"XLA_FLAGS": flags.strip(), "JAX_PLATFORMS": "cpu"}


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


class LocalProcesses:
    """`num_processes` copies of the command `argv` started on this machine as the processes of
    one multi-host run on CPU, `devices` CPU devices each. Copy i gets the arguments
    `localhost:<free port> <num_processes> <i>` appended, for its
    `jax.distributed.initialize(address, num_processes, i)`; its output goes to
    `log_dir/process<i>.log` (a pipe could fill and block it at exit, where `jax.distributed`
    waits for the others)."""

    def __init__(self, argv, num_processes, log_dir, cwd=None, devices=1):
        address = f"localhost:{_free_port()}"
        self.logs = [Path(log_dir) / f"process{i}.log" for i in range(num_processes)]
        self.processes = []
        for i, log in enumerate(self.logs):
            with open(log, "w") as out:
                command = [*argv, address, str(num_processes), str(i)]
                env = cpu_devices_env(devices)
                self.processes.append(subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd))

    def wait(self, timeout):
        """Wait up to `timeout` seconds for all of them; raise RuntimeError with the end of the log
        of the first that failed or was still running (then all are stopped)."""
        try:
            for i, process in enumerate(self.processes):
                try:
                    returncode = process.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    returncode = f"still running after {timeout} s"
                if returncode != 0:
                    raise RuntimeError(
                        f"process {i} of {len(self.processes)}: {returncode}\n{self.logs[i].read_text()[-4000:]}"
                    )
        finally:
            for process in self.processes:
                if process.poll() is None:
                    process.kill()
                    process.wait()
