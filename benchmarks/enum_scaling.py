"""Code size and compile time of a chain of n enumerated Bernoulli sites.

    python -m benchmarks.enum_scaling               # n = 1, 2, ... until one compile takes > 20 s (or n = 20)
    python -m benchmarks.enum_scaling --max-n 12 --budget 5

The objective: x_0 ~ Bernoulli(sigmoid(theta_0 - 1)), x_i ~ Bernoulli(sigmoid(theta_i + 2 x_{i-1} - 1)),
every site with `ppl.enum()`; it returns sin(sum_i (i + 1) x_i). Enumeration is exact, so the
"estimate" is the exact expectation and gradient (checked against brute force over all 2^n paths
for small n). Exact enumeration of a chain does 2^n work, which is inherent; what should stay
linear in n is the size of the program: the enumeration rule runs each site's continuation once,
vectorized over the support (`jax.vmap`), instead of once per value.

For each n: equations of the jitted gradient's jaxpr (counted recursively inside sub-jaxprs),
instructions of the optimized HLO, trace + lower time and XLA compile time of a fresh `jax.jit`,
and the run time of the compiled gradient; beside them, the trace + lower + compile time of the
same computation written by hand in JAX (`hand_written_value_and_grad`).
"""

import argparse
import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np

import ppl
from benchmarks import CpuMonitor, count_eqns, hlo_op_count, median, print_machine, timed
from ppl import dist


def chain_objective(n):
    """The expectation over a chain of `n` enumerated Bernoulli sites (see the module docstring)."""

    @ppl.expectation
    def objective(theta):
        x = jnp.zeros(())
        total = jnp.zeros(())
        for i in range(n):
            p = jax.nn.sigmoid(theta[i] + 2.0 * x - 1.0)
            x = ppl.sample(f"x{i}", dist.Bernoulli(probs=p), estimator=ppl.enum()).astype(jnp.float32)
            total = total + (i + 1.0) * x
        return jnp.sin(total)

    return objective


def thetas(n):
    return jnp.linspace(-1.0, 1.0, n)


def gradient_fn(n):
    """(theta, key) -> (value, gradient): the ADEV step for the chain of length n."""
    objective = chain_objective(n)
    return lambda theta, key: objective.value_and_grad_estimate(key, theta)


def exact_value_and_grad(theta):
    """Brute force over all 2^n paths."""
    n = theta.shape[0]
    paths = jnp.asarray(list(itertools.product([0.0, 1.0], repeat=n)))

    def expectation(theta):
        prev = jnp.concatenate([jnp.zeros((paths.shape[0], 1)), paths[:, :-1]], axis=1)
        p = jax.nn.sigmoid(theta + 2.0 * prev - 1.0)
        prob = jnp.prod(jnp.where(paths == 1.0, p, 1.0 - p), axis=1)
        return jnp.sum(prob * jnp.sin(paths @ jnp.arange(1.0, n + 1.0)))

    return jax.value_and_grad(expectation)(theta)


def hand_written_value_and_grad(n):
    """The same exact computation written by hand in JAX, with the same algorithm (parallel
    enumeration: x_i varies along axis i of rank-n arrays), differentiated by `jax.value_and_grad`."""

    def expectation(theta):
        prob, total, prev = 1.0, 0.0, 0.0
        for i in range(n):
            x = jnp.arange(2.0).reshape((1,) * i + (2,) + (1,) * (n - i - 1))
            p = jax.nn.sigmoid(theta[i] + 2.0 * prev - 1.0)
            prob = prob * jnp.where(x == 1.0, p, 1.0 - p)
            total, prev = total + (i + 1.0) * x, x
        return jnp.sum(prob * jnp.sin(total))

    return jax.value_and_grad(expectation)


def jaxpr_size(n):
    """Equations (recursive) of the jaxpr of the jitted gradient of the length-n chain."""
    return count_eqns(jax.make_jaxpr(jax.jit(gradient_fn(n)))(thetas(n), jax.random.key(0)))


def measure(n, reps=3, run_calls=5, monitor=None, max_wait=10.0):
    """Sizes, and the median over `reps` fresh jits of the trace + lower and XLA compile times."""
    args = (thetas(n), jax.random.key(0))
    eqns = count_eqns(jax.make_jaxpr(jax.jit(gradient_fn(n)))(*args))
    lowers, compiles, loads = [], [], []
    for _ in range(reps):
        if monitor is not None:
            monitor.wait_quiet(max_wait)
            start = monitor.snapshot()
        t = time.perf_counter()
        lowered = jax.jit(gradient_fn(n)).lower(*args)
        lowers.append(time.perf_counter() - t)
        compiled, t_compile = timed(lambda lowered=lowered: lowered.compile())
        compiles.append(t_compile)
        loads.append(monitor.other_cores(start) if monitor is not None else 0.0)
    jax.block_until_ready(compiled(*args))
    run = median([timed(lambda: compiled(*args))[1] for _ in range(run_calls)])
    hand_totals = []
    for _ in range(reps):
        if monitor is not None:
            monitor.wait_quiet(max_wait)
        t = time.perf_counter()
        jax.jit(hand_written_value_and_grad(n)).lower(args[0]).compile()
        hand_totals.append(time.perf_counter() - t)
    err = None
    if n <= 12:
        (v, g), (v0, g0) = compiled(*args), exact_value_and_grad(args[0])
        err = max(abs(float(v) - float(v0)), float(jnp.max(jnp.abs(g - g0))))
    return {
        "n": n,
        "jaxpr_eqns": eqns,
        "hlo_ops": hlo_op_count(compiled),
        "lower_s": median(lowers),
        "compile_s": median(compiles),
        "best_total_s": min(a + b for a, b in zip(lowers, compiles)),
        "other_load": min(loads),
        "run_ms": 1e3 * run,
        "hand_total_s": median(hand_totals),
        "max_abs_err": err,
    }


def fit(ns, ys, degree):
    """(coefficients, max |residual|) of a least-squares polynomial fit."""
    coef = np.polyfit(np.asarray(ns, float), np.asarray(ys, float), degree)
    resid = np.asarray(ys) - np.polyval(coef, np.asarray(ns, float))
    return coef, float(np.max(np.abs(resid)))


def print_table(rows):
    print()
    print(
        "| n | jaxpr eqns | increment | HLO instrs | trace+lower (s) | XLA compile (s) | total (s) | total, best (s) "
        "| run (ms) | hand-written total (s) "
        "| max abs err vs brute force | other load, least (cores) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    prev = None
    for r in rows:
        inc = "" if prev is None else str(r["jaxpr_eqns"] - prev)
        err = "" if r["max_abs_err"] is None else f"{r['max_abs_err']:.1e}"
        total = r["lower_s"] + r["compile_s"]
        print(
            f"| {r['n']} | {r['jaxpr_eqns']} | {inc} | {r['hlo_ops']} | {r['lower_s']:.2f} | {r['compile_s']:.2f} "
            f"| {total:.2f} | {r['best_total_s']:.2f} | {r['run_ms']:.3f} | {r['hand_total_s']:.2f} | {err} "
            f"| {r['other_load']:.2f} |"
        )
        prev = r["jaxpr_eqns"]
    ns, sizes = [r["n"] for r in rows], [r["jaxpr_eqns"] for r in rows]
    if len(ns) >= 4:
        (b, a), res1 = fit(ns, sizes, 1)
        (c2, c1, c0), res2 = fit(ns, sizes, 2)
        print()
        print(f"linear fit:    eqns = {a:.1f} + {b:.1f} n              (max |residual| {res1:.1f})")
        print(f"quadratic fit: eqns = {c0:.1f} + {c1:.1f} n + {c2:.2f} n^2 (max |residual| {res2:.1f})")
        hlo = [r["hlo_ops"] for r in rows]
        (hb, ha), hres = fit(ns, hlo, 1)
        (h2, h1, h0), hres2 = fit(ns, hlo, 2)
        print(f"HLO linear fit:    instrs = {ha:.1f} + {hb:.1f} n (max |residual| {hres:.1f})")
        print(f"HLO quadratic fit: instrs = {h0:.1f} + {h1:.1f} n + {h2:.2f} n^2 (max |residual| {hres2:.1f})")
    by_n = {r["n"]: r for r in rows}
    if 10 in by_n:
        total, best = by_n[10]["lower_s"] + by_n[10]["compile_s"], by_n[10]["best_total_s"]
        print(
            f"10 sites: trace+lower+compile {total:.2f} s (median), {best:.2f} s (best) -> "
            f"'compiles under 1 s': {'yes' if best < 1 else 'NO'}; hand-written JAX {by_n[10]['hand_total_s']:.2f} s"
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-n", type=int, default=20)
    parser.add_argument("--budget", type=float, default=20.0, help="stop after a compile longer than this (s)")
    parser.add_argument("--reps", type=int, default=3, help="fresh compiles per n (median reported)")
    parser.add_argument("--max-wait", type=float, default=10.0, help="seconds to wait for a quiet machine each time")
    args = parser.parse_args(argv)
    print_machine()
    monitor = CpuMonitor()
    jax.block_until_ready(jax.jit(gradient_fn(1))(thetas(1), jax.random.key(0)))  # warm JAX's own caches
    rows = []
    for n in range(1, args.max_n + 1):
        r = measure(n, reps=args.reps, monitor=monitor, max_wait=args.max_wait)
        rows.append(r)
        print(f"n={n}: {r}", flush=True)
        if r["best_total_s"] > args.budget:
            print(f"stopping: compiling n={n} took more than {args.budget} s")
            break
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
