"""Training steps per second over 1, 2, 4 and 8 devices and over 2 processes: the VAE of
models/vae.py and the Bayesian logistic regression of models/logreg.py, data-parallel with
`ppl.svi(..., mesh=jax.make_mesh((n,), ("data",)))`.

    python -m benchmarks.scaling                      # VAE batch 1024, logreg N = 100k (`make bench`)
    python -m benchmarks.scaling --devices 1 2 --processes 0 --rounds 5

Each device count runs in its own Python, on `n` forced CPU devices
(`ppl.distributed.cpu_devices_env`: JAX fixes its devices when it starts); "2 processes" is two
Pythons on localhost with one CPU device each, joined by `jax.distributed.initialize` and gloo
collectives (`ppl.distributed.LocalProcesses`), each building only its own rows of the data.

The step is the one `ppl.fit` runs, `ppl.svi(objective, adam, mesh=mesh).step` (ELBO gradient,
all-reduce, Adam update), chained `--loop-steps` times in one jitted `lax.scan`, on the full batch
(the data is the batch, each device holding its block of rows; parameters replicated). Scaling:
- weak: the per-device batch is fixed (VAE 1024 images, logreg 100k data points per device), so
  the total grows with the device count;
- strong: the total is fixed (VAE 1024, logreg 100k), split over the devices.
Throughput is data items (images, data points) per second; efficiency is the per-device
throughput over the one-device run's (1 = perfect scaling, in both modes).

Forced CPU devices and local processes share this machine's cores: with fewer cores than devices,
devices take turns, so efficiency beyond the core count measures the overhead of sharding and
communication, not a speedup. Before each run the machine gets up to `--max-wait` seconds to go
quiet, and the CPU other processes used during the run is recorded ("other load"); within a
device-count run, rounds where others used more than `--quiet-cores` are set aside (two processes
load each other, so their rounds are all kept).
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np
import optax

import ppl
from benchmarks import (
    COMPILE_COLUMNS,
    CpuMonitor,
    measure_variants,
    print_machine,
    print_markdown,
    scan_loop,
    summarize,
)
from ppl import distributed

ROOT = Path(__file__).resolve().parents[1]
OPTIMIZER = optax.adam(1e-3)
UNITS = {"vae": "images", "logreg": "points"}


# -- the problems (in a worker) -------------------------------------------------------------------


def sharded_rows(sharding, rows, make_rows):
    """Data arrays of `rows` rows sharded by `sharding`; `make_rows(start, stop)` builds the rows of
    one block, and is called only for this process's devices (`jax.make_array_from_callback`)."""
    blocks = {}

    def block(index):
        bounds = index[0].indices(rows)[:2]
        if bounds not in blocks:
            blocks[bounds] = make_rows(*bounds)
        return blocks[bounds]

    example = make_rows(0, 1)
    return tuple(
        jax.make_array_from_callback((rows, *np.shape(a)[1:]), sharding, lambda index, i=i: block(index)[i])
        for i, a in enumerate(example)
    )


def vae_problem(rows, sharding, args):
    """(objective, params, data): the VAE's per-image ELBO on `rows` digits (the training images
    repeated as needed)."""
    from models import vae

    images = np.asarray(vae.load_digits()[0])
    data = sharded_rows(sharding, rows, lambda start, stop: (images[np.arange(start, stop) % len(images)],))
    return vae.objective("elbo", rows), jax.jit(vae.init_params)(jax.random.key(0)), data


def logreg_problem(rows, sharding, args):
    """(objective, params, data): the ELBO of logistic regression on `rows` synthetic data points with
    `args.logreg_d` features and a mean-field guide."""
    from models import logreg  # after jax.distributed.initialize: it makes an array when imported

    true_w = 0.5 * jax.random.normal(jax.random.key(1), (args.logreg_d,))
    make_rows = lambda start, stop: tuple(np.asarray(a) for a in logreg.make_data(stop - start, true_w, seed=start))
    x, y = sharded_rows(sharding, rows, make_rows)
    guide, params = ppl.autoguide.mean_field(logreg.model, None, *make_rows(0, 2), init="zero")
    return ppl.objectives.elbo(logreg.model, guide), params, (x, y)


PROBLEMS = {"vae": vae_problem, "logreg": logreg_problem}


def sizes(problem, args):
    """The issue's size of `problem`: the per-device batch (weak) or the total (strong)."""
    return {"vae": args.vae_batch, "logreg": args.logreg_n}[problem]


def loop(objective, params, data, spec, length):
    """(loop, its arguments): `length` chained `ppl.svi` steps in one `lax.scan`, the state placed on
    the mesh (replicated)."""
    vi = ppl.svi(objective, OPTIMIZER, mesh=spec)
    step = lambda state, *rest: vi.step(rest[-1], state, *rest[:-1])
    return scan_loop(step, length), (distributed.place(spec, vi.init(params)), *data)


def worker(args):
    """Measure every problem and mode on this process's devices (all of a multi-process run's, with
    `args.initialize`); writes the rows to `args.out`/result<process>.json."""
    if args.initialize:
        address, num_processes, process = args.initialize
        jax.distributed.initialize(address, int(num_processes), int(process))
    n = jax.device_count()
    spec = distributed.resolve(jax.make_mesh((n,), ("data",)))
    sharding = jax.sharding.NamedSharding(spec.mesh, jax.sharding.PartitionSpec("data"))
    steps, inputs, meta = {}, {}, {}
    for problem in args.problems:
        for mode in args.modes if n > 1 else ["weak"]:  # on one device both are the same run
            total = sizes(problem, args) * (n if mode == "weak" else 1)
            name = f"{problem} {mode}"
            steps[name], inputs[name] = loop(*PROBLEMS[problem](total, sharding, args), spec, args.loop_steps)
            meta[name] = {"problem": problem, "mode": mode, "total": total, "per_device": total // n}
    keys = [distributed.place(spec, k) for k in jax.random.split(jax.random.key(7), args.calls)]
    monitor = CpuMonitor(args.quiet_cores)
    res = measure_variants(steps, inputs, keys, args.rounds, args.compile_reps, monitor, args.max_wait)
    rows = [r | meta[r["variant"]] for r in summarize(res, next(iter(steps)), args.quiet_cores, args.loop_steps)]
    Path(args.out, f"result{jax.process_index()}.json").write_text(json.dumps(rows))


# -- the runs (in the parent) ---------------------------------------------------------------------


def worker_argv(args, out):
    """The command of a worker measuring what `args` asks, writing to `out`."""
    options = ["--problems", *args.problems, "--modes", *args.modes, "--vae-batch", str(args.vae_batch)]
    options += ["--logreg-n", str(args.logreg_n), "--logreg-d", str(args.logreg_d)]
    options += ["--loop-steps", str(args.loop_steps), "--calls", str(args.calls), "--rounds", str(args.rounds)]
    options += ["--compile-reps", str(args.compile_reps)]
    return [sys.executable, "-m", "benchmarks.scaling", *options, "--worker", "--out", str(out)]


def children_cpu():
    times = os.times()
    return times.children_user + times.children_system


def measured_run(label, devices, launch, args):
    """Rows of one run: wait for a quiet machine, `launch(folder)` the workers (they write into
    `folder`), and record the cores other processes used meanwhile (ours and the workers' own CPU
    time taken out)."""
    monitor = CpuMonitor(args.quiet_cores)
    monitor.wait_quiet(args.max_wait)
    start, children = monitor.snapshot(), children_cpu()
    with tempfile.TemporaryDirectory() as folder:
        launch(folder)
        rows = json.loads(Path(folder, "result0.json").read_text())
    end = monitor.snapshot()
    load = max(0.0, monitor.other_cores(start, end) - (children_cpu() - children) / (end[0] - start[0]))
    return [r | {"run": label, "devices": devices, "other_load": load} for r in rows]


def device_run(n, args):
    """One Python on `n` forced CPU devices."""

    def launch(folder):
        command = worker_argv(args, folder) + ["--quiet-cores", str(args.quiet_cores), "--max-wait", str(args.max_wait)]
        proc = subprocess.run(command, capture_output=True, text=True, env=distributed.cpu_devices_env(n), cwd=ROOT)
        if proc.returncode:
            raise RuntimeError(f"the run on {n} devices failed:\n{proc.stderr[-4000:]}")

    return measured_run(f"{n} device{'s' if n > 1 else ''}", n, launch, args)


def process_run(n, args):
    """`n` Pythons on localhost, one CPU device each; they wait for each other, not for a quiet
    machine, and keep every round (each loads the other)."""

    def launch(folder):
        command = worker_argv(args, folder) + ["--quiet-cores", "inf", "--max-wait", "0", "--initialize"]
        distributed.LocalProcesses(command, n, folder, cwd=ROOT).wait(timeout=args.timeout)

    return measured_run(f"{n} processes", n, launch, args)


def with_efficiency(rows):
    """Rows with throughput (items/s, total and per device) and efficiency: per-device throughput
    over the one-device run's for the same problem."""
    for r in rows:
        r["items_per_s"] = r["total"] / (1e-3 * r["steady_ms"])
        r["per_device_items_per_s"] = r["items_per_s"] / r["devices"]
    single = {r["problem"]: r["per_device_items_per_s"] for r in rows if r["devices"] == 1}
    for r in rows:
        r["efficiency"] = r["per_device_items_per_s"] / single[r["problem"]] if r["problem"] in single else math.nan
    return rows


COLUMNS = [
    ("problem", lambda r: r["problem"]),
    ("scaling", lambda r: r["mode"] if r["devices"] > 1 else "(1 device)"),
    ("run", lambda r: r["run"]),
    ("batch per device", lambda r: f"{r['per_device']:,}"),
    ("total batch", lambda r: f"{r['total']:,}"),
    ("ms/step", lambda r: f"{r['steady_ms']:.2f}"),
    ("IQR (ms)", lambda r: f"{r['steady_iqr_ms'][0]:.2f}-{r['steady_iqr_ms'][1]:.2f}"),
    ("steps/s", lambda r: f"{1e3 / r['steady_ms']:,.1f}"),
    ("items/s", lambda r: f"{r['items_per_s']:,.0f} {UNITS[r['problem']]}"),
    ("items/s per device", lambda r: f"{r['per_device_items_per_s']:,.0f}"),
    ("efficiency", lambda r: f"**{r['efficiency']:.2f}**"),
    *COMPILE_COLUMNS[1:2],
    ("rounds used", lambda r: r["rounds"]),
    ("other load (cores)", lambda r: f"{r['other_load']:.2f}"),
]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8], help="forced CPU device counts")
    parser.add_argument("--processes", type=int, default=2, help="processes on localhost (0: skip)")
    parser.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
    parser.add_argument("--modes", nargs="+", default=["weak", "strong"], choices=["weak", "strong"])
    parser.add_argument("--vae-batch", type=int, default=1024, help="images per device (weak) or in all (strong)")
    parser.add_argument("--logreg-n", type=int, default=100_000, help="points per device (weak) or in all (strong)")
    parser.add_argument("--logreg-d", type=int, default=30, help="logistic regression features")
    parser.add_argument("--loop-steps", type=int, default=20, help="steps per scanned loop (per timed call)")
    parser.add_argument("--calls", type=int, default=3, help="timed calls per round")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds of timed calls")
    parser.add_argument("--compile-reps", type=int, default=1)
    parser.add_argument("--max-wait", type=float, default=10.0, help="seconds to wait for a quiet machine each time")
    parser.add_argument(
        "--quiet-cores", type=float, default=0.25, help="rounds where other processes used more CPU are set aside"
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds a run of processes may take")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--initialize", nargs=3, help=argparse.SUPPRESS)  # appended by LocalProcesses
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)

    print_machine()
    rows = [r for n in args.devices for r in device_run(n, args)]
    if args.processes:
        rows += process_run(args.processes, args)
    rows = with_efficiency(rows)
    print(f"Adam(1e-3), scans of {args.loop_steps} steps; logistic regression with D = {args.logreg_d}")
    print_markdown(rows, COLUMNS)
    return rows


if __name__ == "__main__":
    main()
