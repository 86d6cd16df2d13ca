"""Benchmarks: `python -m benchmarks.vae_step` (ELBO gradient step of an MNIST-sized VAE, ours
against hand-written JAX) and `python -m benchmarks.enum_scaling` (code size and compile time of
a chain of enumerated sites). Results and the machine they ran on: benchmarks/RESULTS.md."""

import datetime
import os
import platform
import statistics
import time

import jax

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
        `max_wait` seconds. Returns the load of the last window."""
        deadline = time.perf_counter() + max_wait
        while True:
            s = self.snapshot()
            time.sleep(window)
            load = self.other_cores(s)
            if load < self.quiet_cores or time.perf_counter() > deadline:
                return load
