"""Seconds per training epoch of Attend-Infer-Repeat (models/air.py), for each estimator.

    python -m benchmarks.air_epoch                                   # every estimator, 512 canvases, batch 32
    python -m benchmarks.air_epoch --estimators enum mvd --canvases 256 --epochs 5

An epoch is one pass over `--canvases` training canvases in minibatches of `--batch`: a
`lax.scan` of `ppl.svi` steps (Adam) over a shuffled order, compiled once per estimator with
`jax.jit`. Measured per estimator: compile time (trace + lower, and XLA compile, of that epoch
function) and the steady-state seconds per epoch (median over `--epochs` epochs after one warm-up
epoch, each blocked on). Before each measurement the machine is given up to `--max-wait` seconds
to become quiet; epochs during which other processes used more than `--quiet-cores` cores are set
aside when enough quiet ones remain (the table says how many were used).
"""

import argparse
import time

import jax
import optax

import ppl
from benchmarks import CpuMonitor, median, print_machine, timed
from models import air


def epoch_function(name, canvases, batch):
    """(svi, jitted epoch(state, key, images) -> (state, losses)) for the estimator `name`."""
    vi = ppl.svi(air.objective(name), optax.adam(1e-3))
    steps = canvases // batch

    def epoch(state, key, images):
        order_key, step_key = jax.random.split(key)
        order = jax.random.permutation(order_key, images.shape[0])[: steps * batch].reshape(steps, batch)

        def one(state, xs):
            rows, k = xs
            state, info = vi.step(k, state, images[rows])
            return state, info["loss"]

        return jax.lax.scan(one, state, (order, jax.random.split(step_key, steps)))

    return vi, jax.jit(epoch)


def measure(name, images, batch, epochs, monitor, max_wait):
    """{"lower", "compile", "epochs": [{"seconds", "load"}], "loss"} for one estimator."""
    vi, epoch = epoch_function(name, images.shape[0], batch)
    state = vi.init(air.init_params(jax.random.key(0)))
    keys = jax.random.split(jax.random.key(1), epochs + 1)
    monitor.wait_quiet(max_wait)
    t = time.perf_counter()
    lowered = epoch.lower(state, keys[0], images)
    t_lower = time.perf_counter() - t
    compiled, t_compile = timed(lambda: lowered.compile())
    (state, losses), _ = timed(lambda: compiled(state, keys[0], images))  # warm-up epoch
    out = {"lower": t_lower, "compile": t_compile, "epochs": []}
    for key in keys[1:]:
        monitor.wait_quiet(max_wait)
        start = monitor.snapshot()
        (state, losses), seconds = timed(lambda k=key, s=state: compiled(s, k, images))
        out["epochs"].append({"seconds": seconds, "load": monitor.other_cores(start)})
    out["loss"] = float(losses.mean())
    return out


def print_table(results, canvases, batch, quiet_cores):
    steps = canvases // batch
    print()
    print(f"AIR, {canvases} canvases per epoch, batch {batch} ({steps} steps per epoch)")
    print()
    print("| estimator | trace+lower (s) | XLA compile (s) | s / epoch (median) | ms / step | epochs used | loss |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        quiet = [e for e in r["epochs"] if e["load"] < quiet_cores]
        used = quiet if quiet else r["epochs"]
        seconds = median([e["seconds"] for e in used])
        mark = "" if quiet else " (busy)"
        print(
            f"| {name} | {r['lower']:.2f} | {r['compile']:.2f} | {seconds:.3f} | {1e3 * seconds / steps:.2f} "
            f"| {len(used)}/{len(r['epochs'])}{mark} | {r['loss']:.2f} |"
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--estimators", nargs="+", default=list(air.ESTIMATORS), choices=air.ESTIMATORS)
    parser.add_argument("--canvases", type=int, default=512, help="training canvases per epoch")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per estimator (after one warm-up)")
    parser.add_argument("--max-wait", type=float, default=10.0, help="seconds to wait for a quiet machine each time")
    parser.add_argument("--quiet-cores", type=float, default=0.25, help="epochs with busier machines are set aside")
    args = parser.parse_args(argv)

    print_machine()
    images = air.load_data(n_train=args.canvases, n_test=1)[0]
    monitor = CpuMonitor(args.quiet_cores)
    results = {name: measure(name, images, args.batch, args.epochs, monitor, args.max_wait) for name in args.estimators}
    print_table(results, args.canvases, args.batch, args.quiet_cores)
    return results


if __name__ == "__main__":
    main()
