"""ELBO gradient step of an MNIST-sized VAE: our language against the same computation written by
hand in JAX.

    python -m benchmarks.vae_step                 # batch 64 and 1024 (what `make bench` runs)
    python -m benchmarks.vae_step --batches 64 --rounds 10

Encoder 784-200-(2x10) (mean and log-scale of a diagonal Normal over a 10-d z), decoder
10-200-784 with Bernoulli logits, tanh hidden units; random binary data from a fixed seed.

- ours:  `@ppl.gen` model and guide, the ELBO as an `@ppl.expectation`, the step is
  `elbo.value_and_grad_estimate(key, params, x)` under `jax.jit`.
- hand:  the reparameterized sample with `jax.random.normal`, log densities written out,
  `jax.value_and_grad`, under `jax.jit`. It draws its noise from the same key as ADEV does
  (`jax.random.split(key)[1]`), so both compute the same number and the same gradient.
- hand+numpyro (diagnostic): the hand-written program scoring with NumPyro's `log_prob`s, which
  our language uses; it separates the cost of the distributions from the cost of ADEV.

Measured in one run, interleaved: compile time (trace + lower, and XLA compile, of a fresh
`jax.jit`, median over repetitions) and steady-state time (median of many calls after warm-up, each
blocked on), for each batch size; the table gives the ratio ours / hand.
"""

import argparse
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

import ppl
from benchmarks import CpuMonitor, count_eqns, hlo_op_count, median, print_machine, timed
from ppl import dist

X_DIM, H_DIM, Z_DIM = 784, 200, 10
HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


# -- the network ----------------------------------------------------------------------------------


def init_params(key):
    def dense(k, n_in, n_out):
        return {"w": jax.random.normal(k, (n_in, n_out)) / math.sqrt(n_in), "b": jnp.zeros(n_out)}

    k = jax.random.split(key, 5)
    return {
        "enc": {
            "h": dense(k[0], X_DIM, H_DIM),
            "loc": dense(k[1], H_DIM, Z_DIM),
            "log_scale": dense(k[2], H_DIM, Z_DIM),
        },
        "dec": {"h": dense(k[3], Z_DIM, H_DIM), "out": dense(k[4], H_DIM, X_DIM)},
    }


def make_data(batch, seed=0):
    """Random binary 'images' (float32 zeros and ones), fixed seed."""
    return jnp.asarray(np.random.default_rng(seed).random((batch, X_DIM)) < 0.3, jnp.float32)


def _dense(p, h):
    return h @ p["w"] + p["b"]


def encode(enc, x):
    h = jnp.tanh(_dense(enc["h"], x))
    return _dense(enc["loc"], h), _dense(enc["log_scale"], h)


def decode(dec, z):
    return _dense(dec["out"], jnp.tanh(_dense(dec["h"], z)))


# -- ours -----------------------------------------------------------------------------------------


@ppl.gen
def model(params, x):
    z = ppl.sample("z", dist.Normal(0.0, 1.0).expand((x.shape[0], Z_DIM)).to_event(2))
    ppl.sample("x", dist.Bernoulli(logits=decode(params["dec"], z)).to_event(2))


@ppl.gen
def guide(params, x):
    loc, log_scale = encode(params["enc"], x)
    ppl.sample("z", dist.Normal(loc, jnp.exp(log_scale)).to_event(2))


@ppl.expectation
def elbo(params, x):
    z, log_q = ppl.sim(guide)(params, x)
    return ppl.density(model)(z | {"x": x}, params, x) - log_q


def ours_step(params, x, key):
    return elbo.value_and_grad_estimate(key, params, x)


# -- hand-written ---------------------------------------------------------------------------------


def noise(key, shape):
    """The standard normal noise ADEV's reparam rule uses for the first site drawn with `key`."""
    _, site_key = jax.random.split(key)
    return jax.random.normal(site_key, shape)


def hand_elbo(params, x, key):
    loc, log_scale = encode(params["enc"], x)
    eps = noise(key, loc.shape)
    z = loc + eps * jnp.exp(log_scale)
    log_q = jnp.sum(-0.5 * eps**2 - log_scale - HALF_LOG_2PI)
    log_pz = jnp.sum(-0.5 * z**2 - HALF_LOG_2PI)
    logits = decode(params["dec"], z)
    # log Bernoulli(x | sigmoid(logits)) = x l - softplus(l), in its stable form
    log_px = jnp.sum(x * logits - jnp.maximum(logits, 0.0) - jnp.log1p(jnp.exp(-jnp.abs(logits))))
    return log_pz + log_px - log_q


def hand_step(params, x, key):
    return jax.value_and_grad(hand_elbo)(params, x, key)


def hand_numpyro_elbo(params, x, key):
    loc, log_scale = encode(params["enc"], x)
    q = dist.Normal(loc, jnp.exp(log_scale))
    z = loc + noise(key, loc.shape) * q.scale
    log_q = jnp.sum(q.log_prob(z))
    log_pz = jnp.sum(dist.Normal(0.0, 1.0).log_prob(z))
    log_px = jnp.sum(dist.Bernoulli(logits=decode(params["dec"], z)).log_prob(x))
    return log_pz + log_px - log_q


def hand_numpyro_step(params, x, key):
    return jax.value_and_grad(hand_numpyro_elbo)(params, x, key)


VARIANTS = {"ours": ours_step, "hand": hand_step, "hand+numpyro": hand_numpyro_step}


# -- checks ---------------------------------------------------------------------------------------


def max_relative_error(grads, reference):
    """Largest over leaves of max|g - r| / max|r|."""
    errs = jax.tree.map(lambda g, r: float(jnp.max(jnp.abs(g - r)) / (jnp.max(jnp.abs(r)) + 1e-30)), grads, reference)
    return max(jax.tree.leaves(errs))


def agreement(batch, n_keys=3):
    """(max |value difference| / |value|, max relative gradient error) of ours against hand, same keys."""
    params, x = init_params(jax.random.key(1)), make_data(batch)
    ours, hand = jax.jit(ours_step), jax.jit(hand_step)
    worst_v, worst_g = 0.0, 0.0
    for key in jax.random.split(jax.random.key(123), n_keys):
        (v1, g1), (v2, g2) = ours(params, x, key), hand(params, x, key)
        worst_v = max(worst_v, abs(float(v1) - float(v2)) / abs(float(v2)))
        worst_g = max(worst_g, max_relative_error(g1, g2))
    return worst_v, worst_g


# -- measurements ---------------------------------------------------------------------------------


def fresh(step):
    """A new jitted function (a new closure, so no tracing or compilation cache applies)."""
    return jax.jit(lambda p, x, k: step(p, x, k))


def compile_times(step, args):
    """(trace + lower seconds, XLA compile seconds, compiled) of a fresh jit of `step`."""
    lowered, t_lower = timed_lower(fresh(step), args)
    compiled, t_compile = timed(lambda: lowered.compile())
    return t_lower, t_compile, compiled


def timed_lower(jitted, args):
    t = time.perf_counter()
    lowered = jitted.lower(*args)
    return lowered, time.perf_counter() - t


def measure(batch, rounds, calls, compile_reps, variants, monitor, max_wait):
    """Everything for one batch size; the variants are interleaved in every phase. Before each
    compile repetition and each steady-state round the machine is given up to `max_wait` seconds
    to become quiet, and the CPU load of other processes during it is recorded."""
    params, x = init_params(jax.random.key(1)), make_data(batch)
    key = jax.random.key(0)
    args = (params, x, key)
    res = {name: {"compile_reps": [], "rounds": []} for name in variants}

    # Compile: fresh jits, alternating order; one unmeasured repetition first (warms JAX's own
    # caches, e.g. the jitted helpers inside jax.random, for every variant alike).
    for rep in range(compile_reps + 1):
        order = list(variants) if rep % 2 == 0 else list(reversed(variants))
        for name in order:
            monitor.wait_quiet(max_wait)
            start = monitor.snapshot()
            t_lower, t_compile, _ = compile_times(variants[name], args)
            f = fresh(variants[name])
            _, t_first = timed(lambda f=f: f(*args))
            if rep > 0:
                res[name]["compile_reps"].append(
                    {"lower": t_lower, "compile": t_compile, "first_call": t_first, "load": monitor.other_cores(start)}
                )

    # Steady state: one compiled function per variant, warmed up, then rounds of calls with the
    # variants interleaved (alternating order), each call blocked on.
    compiled = {name: jax.jit(variants[name]) for name in variants}
    keys = list(jax.random.split(jax.random.key(7), calls))
    for name in variants:
        for k in keys[:3]:
            jax.block_until_ready(compiled[name](params, x, k))
    for r in range(rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        monitor.wait_quiet(max_wait)
        start = monitor.snapshot()
        times = {}
        for name in order:
            f = compiled[name]
            times[name] = [timed(lambda f=f, k=k: f(params, x, k))[1] for k in keys]
        load = monitor.other_cores(start)
        for name in variants:
            res[name]["rounds"].append({"times": times[name], "load": load})

    # Code size: jaxpr equations (recursive) and optimized-HLO instructions.
    for name in variants:
        res[name]["jaxpr_eqns"] = count_eqns(jax.make_jaxpr(jax.jit(variants[name]))(*args))
        lowered = jax.jit(variants[name]).lower(*args)
        c = lowered.compile()
        res[name]["hlo_ops"] = hlo_op_count(c)
        cost = c.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        res[name]["flops"] = float(cost.get("flops", float("nan"))) if cost else float("nan")
    return res


def quiet(entries, threshold, at_least):
    """The entries measured on a quiet machine, or all of them when fewer than `at_least` were."""
    q = [e for e in entries if e["load"] < threshold]
    return (q, True) if len(q) >= at_least else (entries, False)


def summarize(batch, res, threshold):
    rows = []
    hand_rounds, _ = quiet(res["hand"]["rounds"], threshold, 5)
    for name, r in res.items():
        rounds, rounds_quiet = quiet(r["rounds"], threshold, 5)
        reps, reps_quiet = quiet(r["compile_reps"], threshold, 1)
        steady = [t for rd in rounds for t in rd["times"]]
        paired = np.asarray([median(a["times"]) / median(h["times"]) for a, h in zip(rounds, hand_rounds)])
        rows.append(
            {
                "batch": batch,
                "variant": name,
                "lower_s": median([e["lower"] for e in reps]),
                "compile_s": median([e["compile"] for e in reps]),
                "first_call_s": median([e["first_call"] for e in reps]),
                "best_total_s": min(e["lower"] + e["compile"] for e in reps),
                "compile_reps": f"{len(reps)}{'' if reps_quiet else ' (busy)'}",
                "steady_ms": 1e3 * median(steady),
                "steady_iqr_ms": tuple(1e3 * q for q in np.percentile(steady, [25, 75])),
                "steady_p10_ms": 1e3 * float(np.percentile(steady, 10)),
                "rounds": f"{len(rounds)}/{len(r['rounds'])}{'' if rounds_quiet else ' (busy)'}",
                "n_calls": len(steady),
                "paired_ratio": float(np.median(paired)),
                "paired_ratio_iqr": tuple(float(q) for q in np.percentile(paired, [25, 75])),
                "jaxpr_eqns": r["jaxpr_eqns"],
                "hlo_ops": r["hlo_ops"],
                "flops": r["flops"],
            }
        )
    return rows


def print_table(rows):
    by = {(r["batch"], r["variant"]): r for r in rows}
    print()
    print(
        "| batch | variant | trace+lower (s) | XLA compile (s) | compile total, best (s) | first call (s) "
        "| first call vs hand "
        "| steady, median (ms) | steady IQR (ms) | steady vs hand | per-round ratio, median (IQR) "
        "| steady p10 (ms) | p10 vs hand | rounds used |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        h = by[(r["batch"], "hand")]
        print(
            f"| {r['batch']} | {r['variant']} | {r['lower_s']:.3f} | {r['compile_s']:.3f} | {r['best_total_s']:.3f} "
            f"| {r['first_call_s']:.3f} "
            f"| {r['first_call_s'] / h['first_call_s']:.2f}x "
            f"| {r['steady_ms']:.3f} | {r['steady_iqr_ms'][0]:.3f}-{r['steady_iqr_ms'][1]:.3f} "
            f"| **{r['steady_ms'] / h['steady_ms']:.3f}x** "
            f"| {r['paired_ratio']:.3f}x ({r['paired_ratio_iqr'][0]:.3f}-{r['paired_ratio_iqr'][1]:.3f}) "
            f"| {r['steady_p10_ms']:.3f} | {r['steady_p10_ms'] / h['steady_p10_ms']:.3f}x "
            f"| {r['rounds']} |"
        )
    print()
    print("| batch | variant | jaxpr eqns (recursive) | optimized HLO instrs | XLA flops |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['variant']} | {r['jaxpr_eqns']} | {r['hlo_ops']} | {r['flops']:.4g} |")
    print()
    for batch in sorted({r["batch"] for r in rows}):
        ratio = by[(batch, "ours")]["steady_ms"] / by[(batch, "hand")]["steady_ms"]
        paired = by[(batch, "ours")]["paired_ratio"]
        p10 = by[(batch, "ours")]["steady_p10_ms"] / by[(batch, "hand")]["steady_p10_ms"]
        verdict = "met" if ratio <= 1.05 else "NOT met"
        if "busy" in by[(batch, "ours")]["rounds"]:
            verdict += " (but other processes kept the machine busy in every round: not reliable)"
        print(
            f"batch {batch}: steady-state ours/hand = {ratio:.3f}x (median of per-round ratios {paired:.3f}x, "
            f"10th percentiles {p10:.3f}x) "
            f"-> target <= 1.05x {verdict}"
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 1024])
    parser.add_argument("--rounds", type=int, default=30, help="interleaved rounds of steady-state calls")
    parser.add_argument("--calls", type=int, default=0, help="calls per round (default: 20 for B<=256, else 5)")
    parser.add_argument("--compile-reps", type=int, default=3)
    parser.add_argument("--no-numpyro-variant", action="store_true", help="leave out the hand+numpyro diagnostic")
    parser.add_argument("--max-wait", type=float, default=10.0, help="seconds to wait for a quiet machine each time")
    parser.add_argument(
        "--quiet-cores", type=float, default=0.25, help="rounds where other processes used more CPU are set aside"
    )
    args = parser.parse_args(argv)

    print_machine()
    monitor = CpuMonitor(args.quiet_cores)
    variants = dict(VARIANTS)
    if args.no_numpyro_variant:
        del variants["hand+numpyro"]
    rows = []
    for batch in args.batches:
        dv, dg = agreement(batch)
        print(
            f"batch {batch}: same key -> |ELBO ours - hand|/|ELBO| = {dv:.2e}, "
            f"max relative gradient difference = {dg:.2e}"
        )
        calls = args.calls or (20 if batch <= 256 else 5)
        res = measure(batch, args.rounds, calls, args.compile_reps, variants, monitor, args.max_wait)
        rows += summarize(batch, res, args.quiet_cores)
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
