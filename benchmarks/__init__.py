"""Benchmarks: `python -m benchmarks.vae_step` (ELBO gradient and optimizer step of an MNIST-sized
VAE: ours, hand-written JAX and NumPyro), `python -m benchmarks.logreg_steps` (SVI steps per second
of Bayesian logistic regression, ELBO and IWAE: ours, hand-written JAX and NumPyro) and
`python -m benchmarks.enum_scaling` (code size and compile time of a chain of enumerated sites).
Results and the machine they ran on: benchmarks/RESULTS.md.

The helpers below time jitted functions the same way in every script: compile times of fresh
jits, then rounds of steady-state calls with the variants interleaved call by call, summarized
as medians and as per-round ratios against a reference variant with a bootstrap interval."""

import datetime
import os
import platform
import statistics
import time

import jax
import numpy as np
import optax

from transforms.compat import sub_jaxprs


def count_eqns(jaxpr):
    """Number of equations of a (closed or open) jaxpr, counting recursively inside sub-jaxprs
    (jit bodies, scan/cond bodies, custom_jvp/vjp functions); a sub-jaxpr used twice counts twice."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    n = 0
    for eqn in jaxpr.eqns:
        n += 1
        for sub in sub_jaxprs(eqn.params):
            n += count_eqns(sub)
    return n


def hlo_op_count(compiled):
    """Instructions in the optimized HLO of a compiled computation (all computations, fusion
    bodies included): a rough measure of the code XLA runs."""
    text = compiled.as_text()
    return sum(1 for line in text.splitlines() if " = " in line and not line.lstrip().startswith(("HloModule", "//")))


def timed(fn):
    """(result, seconds) of fn(), blocking on the result."""
    t = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - t


def median(xs):
    return statistics.median(xs)


def machine():
    """A dict describing this machine and the software versions."""
    import jaxlib
    import numpyro

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu,
        "cores": cores,
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "numpyro": numpyro.__version__,
        "backend": jax.default_backend(),
        "date": datetime.date.today().isoformat(),
    }


def print_machine():
    m = machine()
    print(
        f"machine: {m['cpu']}, {m['cores']} cores ({m['backend']}); Python {m['python']}, jax {m['jax']}, "
        f"jaxlib {m['jaxlib']}, numpyro {m['numpyro']}; {m['date']}"
    )


class CpuMonitor:
    """How busy *other* processes keep this machine, from /proc/stat minus this process's own CPU
    time. Benchmarks wait for a quiet machine before each measurement and record how quiet it
    was, so that measurements taken while, say, a test suite ran alongside can be set aside.
    Where /proc/stat is missing, the machine always reads as quiet."""

    def __init__(self, quiet_cores=0.25):
        self.quiet_cores = quiet_cores
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def snapshot(self):
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            fields = []
        busy = sum(fields[:3]) + sum(fields[5:8]) if len(fields) >= 8 else 0  # user nice system irq softirq steal
        own = os.times()
        return time.perf_counter(), busy / self.tick, own.user + own.system

    def other_cores(self, start, end=None):
        """Average number of cores other processes used between two snapshots."""
        end = end or self.snapshot()
        wall = end[0] - start[0]
        if wall <= 0:
            return 0.0
        return max(0.0, ((end[1] - start[1]) - (end[2] - start[2])) / wall)

    def wait_quiet(self, max_wait=30.0, window=0.5):
        """Sleep until other processes use less than `quiet_cores` over a `window`; gives up after
        `max_wait` seconds (at once when `max_wait` <= 0, returning 0). Returns the load of the last window."""
        if max_wait <= 0:
            return 0.0
        deadline = time.perf_counter() + max_wait
        while True:
            s = self.snapshot()
            time.sleep(window)
            load = self.other_cores(s)
            if load < self.quiet_cores or time.perf_counter() > deadline:
                return load


# -- steps built from a loss ----------------------------------------------------------------------


def optax_step(loss_and_grad, optimizer):
    """A step `((params, opt_state), *data, key) -> ((params, opt_state), loss)`: one optax update
    with the gradient from `loss_and_grad(params, *data, key) -> (loss, grads)` (loss minimized)."""

    def step(state, *rest):
        params, opt_state = state
        loss, grads = loss_and_grad(params, *rest)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    return step


def scan_loop(step, length):
    """`run(state, *data, key) -> state`: `length` chained `step(state, *data, key_i)` calls in one
    `lax.scan` (keys split from `key`), keeping only the state each step returns first."""

    def run(state, *rest):
        *data, key = rest

        def body(s, k):
            return step(s, *data, k)[0], None

        return jax.lax.scan(body, state, jax.random.split(key, length))[0]

    return run


# -- measuring ------------------------------------------------------------------------------------


def fresh(fn):
    """A new jitted function (a new closure, so no tracing or compilation cache applies)."""
    return jax.jit(lambda *args: fn(*args))


def compile_times(fn, args):
    """(trace + lower seconds, XLA compile seconds, first-call seconds) of fresh jits of `fn`; the
    first call traces, compiles and runs."""
    t = time.perf_counter()
    lowered = fresh(fn).lower(*args)
    t_lower = time.perf_counter() - t
    _, t_compile = timed(lambda: lowered.compile())
    f = fresh(fn)
    _, t_first = timed(lambda: f(*args))
    return t_lower, t_compile, t_first


def alternate(names, i):
    """`names` in order for even i, reversed for odd i."""
    return list(names) if i % 2 == 0 else list(reversed(names))


def measure_variants(steps, args, keys, rounds, compile_reps, monitor, max_wait):
    """Compile and steady-state times of `jax.jit(steps[name])(*args[name], key)` for every name.

    Compile: `compile_reps` measured repetitions of fresh jits (after one unmeasured repetition that
    warms JAX's own caches), variants in alternating order. Steady state: `rounds` rounds, each of
    `len(keys)` calls per variant, interleaved call by call in alternating order, each call blocked
    on. Before each repetition and round the machine gets up to `max_wait` seconds to become quiet;
    the load of other processes is recorded. Returns
    {name: {"compile_reps": [{"lower", "compile", "first_call", "load"}], "rounds": [{"times", "load"}]}}."""
    res = {name: {"compile_reps": [], "rounds": []} for name in steps}
    for rep in range(compile_reps + 1 if compile_reps else 0):
        for name in alternate(steps, rep):
            monitor.wait_quiet(max_wait)
            start = monitor.snapshot()
            t_lower, t_compile, t_first = compile_times(steps[name], (*args[name], keys[0]))
            if rep > 0:
                res[name]["compile_reps"].append(
                    {"lower": t_lower, "compile": t_compile, "first_call": t_first, "load": monitor.other_cores(start)}
                )
    compiled = {name: jax.jit(steps[name]) for name in steps}
    for name, rounds_of_name in steady_rounds(compiled, args, keys, rounds, monitor, max_wait).items():
        res[name]["rounds"] = rounds_of_name
    return res


def steady_rounds(calls, args, keys, rounds, monitor, max_wait):
    """Steady-state times of `calls[name](*args[name], key)` (callables, e.g. jitted functions, or
    a whole `ppl.fit`): after 3 warm-up calls each, `rounds` rounds of `len(keys)` calls per
    variant, interleaved call by call in alternating order, each call blocked on, with the load of
    other processes per round (see `measure_variants`). Returns {name: [{"times", "load"}]}."""
    for name in calls:
        for k in keys[:3]:
            jax.block_until_ready(calls[name](*args[name], k))
    res = {name: [] for name in calls}
    for r in range(rounds):
        monitor.wait_quiet(max_wait)
        start = monitor.snapshot()
        times = {name: [] for name in calls}
        for i, k in enumerate(keys):
            for name in alternate(calls, r + i):
                times[name].append(timed(lambda: calls[name](*args[name], k))[1])
        load = monitor.other_cores(start)
        for name in calls:
            res[name].append({"times": times[name], "load": load})
    return res


def mean_difference_z(a, b):
    """z-scores of mean(b) - mean(a), per column, for independent samples a and b (rows are draws)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    se = np.sqrt(a.var(0, ddof=1) / len(a) + b.var(0, ddof=1) / len(b))
    return (b.mean(0) - a.mean(0)) / se


def quiet(entries, threshold, at_least):
    """(entries measured on a quiet machine, True), or (all of them, False) when fewer than
    `at_least` were."""
    q = [e for e in entries if e["load"] < threshold]
    return (q, True) if len(q) >= at_least else (entries, False)


def bootstrap_ci(values, stat=np.median, level=0.95, n_boot=2000, seed=0):
    """Percentile bootstrap interval (lo, hi) of `stat` of `values`."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    stats = [stat(values[rng.integers(0, len(values), len(values))]) for _ in range(n_boot)]
    return tuple(float(q) for q in np.percentile(stats, [50 * (1 - level), 50 * (1 + level)]))


def summarize(res, reference, threshold, steps_per_call=1):
    """One row per variant of `measure_variants`' result: compile medians, steady-state time per
    step (median, IQR, 10th percentile of calls in quiet rounds, divided by `steps_per_call`), the
    ratio of pooled medians to `reference`, and the median over rounds of the per-round ratio
    (median of the round's calls over the reference's) with its 95% bootstrap interval."""
    ref_rounds, _ = quiet(res[reference]["rounds"], threshold, 5)
    ref_ms = 1e3 * median([t for rd in ref_rounds for t in rd["times"]]) / steps_per_call
    rows = []
    for name, r in res.items():
        rounds, rounds_quiet = quiet(r["rounds"], threshold, 5)
        steady = 1e3 * np.asarray([t for rd in rounds for t in rd["times"]]) / steps_per_call
        paired = [median(a["times"]) / median(h["times"]) for a, h in zip(rounds, ref_rounds)]
        row = {
            "variant": name,
            "steady_ms": float(np.median(steady)),
            "steady_iqr_ms": tuple(float(q) for q in np.percentile(steady, [25, 75])),
            "steady_p10_ms": float(np.percentile(steady, 10)),
            "ratio": float(np.median(steady)) / ref_ms,
            "paired_ratio": float(np.median(paired)),
            "paired_ci": bootstrap_ci(paired),
            "rounds": f"{len(rounds)}/{len(r['rounds'])}{'' if rounds_quiet else ' (busy)'}",
            "n_calls": int(steady.size),
        }
        if r["compile_reps"]:
            reps, reps_quiet = quiet(r["compile_reps"], threshold, 1)
            row |= {
                "lower_s": median([e["lower"] for e in reps]),
                "compile_s": median([e["compile"] for e in reps]),
                "first_call_s": median([e["first_call"] for e in reps]),
                "compile_reps": f"{len(reps)}{'' if reps_quiet else ' (busy)'}",
            }
        rows.append(row)
    return rows


def optional(row, key, fmt):
    """row[key] formatted, or "" where the row has no such entry."""
    return format(row[key], fmt) if key in row else ""


def paired_text(row):
    """The per-round ratio of a `summarize` row with its 95% interval."""
    return f"{row['paired_ratio']:.3f}x [{row['paired_ci'][0]:.3f}-{row['paired_ci'][1]:.3f}]"


def print_markdown(rows, columns):
    """A markdown table: `columns` is a list of (header, row -> cell text)."""
    print("| " + " | ".join(h for h, _ in columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(cell(row) for _, cell in columns) + " |")


# Columns shared by the per-step timing tables: compile times, and the paired per-round ratio.
COMPILE_COLUMNS = [
    ("trace+lower (s)", lambda r: optional(r, "lower_s", ".3f")),
    ("XLA compile (s)", lambda r: optional(r, "compile_s", ".3f")),
    ("first call (s)", lambda r: optional(r, "first_call_s", ".3f")),
]
ROUND_COLUMNS = [
    ("per-round ratio [95% CI]", paired_text),
    ("rounds used", lambda r: r["rounds"]),
]
