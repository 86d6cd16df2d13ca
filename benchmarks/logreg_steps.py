"""SVI steps per second on Bayesian logistic regression: our language, hand-written JAX and NumPyro,
with one particle (the ELBO) and with ten (the IWAE bound).

    python -m benchmarks.logreg_steps                        # N = 2000, D = 30, K = 1 and 10 (`make bench`)
    python -m benchmarks.logreg_steps --n 5000 --d 50 --rounds 40

The model is models/logreg.py: w ~ N(0, I_D), y_i ~ Bernoulli(logits = x_i . w), on synthetic data
(independent standard normal features, labels drawn at fixed random weights, fixed seeds). The
guide is a mean-field Normal, q(w) = N(loc, diag(exp(log_scale))^2), starting at loc = 0.

A step is a full Adam update (gradient and update) under `jax.jit`, per particle count K:
- ours ppl.svi: `ppl.svi(objective, adam).step` with `ppl.autoguide.mean_field` and
  `ppl.objectives.elbo` (K = 1) or `ppl.objectives.iwae(model, guide, 10)`; it also skips
  non-finite updates and computes the gradient norm.
- ours grad+optax (diagnostic): our gradient estimate with the bare optax update hand+optax uses.
- hand+optax: the reparameterized bound written out in JAX, `jax.value_and_grad`, optax Adam.
- numpyro SVI.update: the same model and guide as NumPyro programs, `SVI(..., Trace_ELBO())`
  (K = 1) or `RenyiELBO(alpha=0, num_particles=10)` (the IWAE bound), `.update`.

Measured, interleaved: compile times of a fresh jit, steady-state time per call (every call
blocked on: it includes JAX's per-call dispatch, which is most of a step this small), and time per
step inside one jitted `lax.scan` of `--loop-steps` chained steps (what a training loop costs).
Finally the end-to-end wall time of `ppl.fit` and `SVI.run(progress_bar=False)` for `--fit-steps`
steps, cold (first call, compiling) and warm (again, same objects): `ppl.fit` reuses its compiled
chunk, `SVI.run` traces and compiles its scan on every call.
"""

import argparse
import math

import jax
import jax.numpy as jnp
import numpyro
import optax
from numpyro.infer import SVI, RenyiELBO, Trace_ELBO

import ppl
from benchmarks import (
    COMPILE_COLUMNS,
    ROUND_COLUMNS,
    CpuMonitor,
    mean_difference_z,
    measure_variants,
    median,
    optax_step,
    print_machine,
    print_markdown,
    scan_loop,
    summarize,
    timed,
)
from models.logreg import make_data, model
from ppl import dist

LEARNING_RATE = 1e-2
OPTIMIZER = optax.adam(LEARNING_RATE)


def problem(n, d, seed=0):
    """(x, y, guide, params): synthetic data with true weights N(0, 0.5^2), and our mean-field guide."""
    true_w = 0.5 * jax.random.normal(jax.random.key(seed + 1), (d,))
    x, y = make_data(n, true_w, seed=seed)
    guide, params = ppl.autoguide.mean_field(model, None, x, y, init="zero")
    return x, y, guide, params


# -- ours -----------------------------------------------------------------------------------------


def ours_objective(guide, num_particles):
    if num_particles == 1:
        return ppl.objectives.elbo(model, guide)
    return ppl.objectives.iwae(model, guide, num_particles)


def ours_loss_and_grad(objective):
    def loss_and_grad(params, x, y, key):
        value, grads = objective.value_and_grad_estimate(key, params, x, y)
        return -value, jax.tree.map(jnp.negative, grads)

    return loss_and_grad


# -- hand-written ---------------------------------------------------------------------------------


def hand_objective(params, x, y, key, num_particles):
    """log 1/K sum_k p(y, w_k | x) / q(w_k), w_k = loc + exp(log_scale) eps_k (the ELBO for K = 1);
    the 2 pi constants of log p(w) and log q(w) cancel."""
    q = params["w"]
    eps = jax.random.normal(key, (num_particles, x.shape[1]))
    w = q["loc"] + eps * jnp.exp(q["log_scale"])
    log_q = jnp.sum(-0.5 * eps**2 - q["log_scale"], axis=1)
    log_prior = jnp.sum(-0.5 * w**2, axis=1)
    logits = w @ x.T
    log_lik = jnp.sum(y * logits - jax.nn.softplus(logits), axis=1)
    return jax.nn.logsumexp(log_prior + log_lik - log_q) - math.log(num_particles)


def hand_loss_and_grad(num_particles):
    def loss_and_grad(params, x, y, key):
        return jax.value_and_grad(lambda p: -hand_objective(p, x, y, key, num_particles))(params)

    return loss_and_grad


# -- NumPyro --------------------------------------------------------------------------------------


def np_model(x, y):
    w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand((x.shape[1],)).to_event(1))
    numpyro.sample("y", dist.Bernoulli(logits=x @ w).to_event(1), obs=y)


def np_guide(x, y):
    """Our guide's parameters, at the param site "guide" (`{"guide": params}`)."""
    q = numpyro.param("guide")["w"]
    numpyro.sample("w", dist.Normal(q["loc"], jnp.exp(q["log_scale"])).to_event(1))


def numpyro_loss(num_particles):
    return Trace_ELBO() if num_particles == 1 else RenyiELBO(alpha=0.0, num_particles=num_particles)


def numpyro_svi(num_particles):
    return SVI(np_model, np_guide, OPTIMIZER, numpyro_loss(num_particles))


# -- the variants ---------------------------------------------------------------------------------


def variants(guide, params, x, y, num_particles):
    """name -> (initial state, step(state, x, y, key) -> (state, loss or info)); hand+optax first."""
    objective = ours_objective(guide, num_particles)
    ours = ppl.svi(objective, OPTIMIZER)
    npy = numpyro_svi(num_particles)
    np_state = npy.init(jax.random.key(0), x, y, init_params={"guide": params})
    optax_state = (params, OPTIMIZER.init(params))
    return {
        "hand+optax": (optax_state, optax_step(hand_loss_and_grad(num_particles), OPTIMIZER)),
        "ours ppl.svi": (ours.init(params), lambda s, x, y, k: ours.step(k, s, x, y)),
        "ours grad+optax": (optax_state, optax_step(ours_loss_and_grad(objective), OPTIMIZER)),
        "numpyro SVI.update": (np_state, lambda s, x, y, k: npy.update(s, x, y)),
    }


def bound_agreement(guide, params, x, y, num_particles, n_keys):
    """z-scores of the mean bound estimate (ours, NumPyro) minus hand's over `n_keys` independent
    keys each, at the initial parameters, and whether every gradient was finite."""
    objective = ours_objective(guide, num_particles)
    loss = numpyro_loss(num_particles)
    estimates = {
        "hand": jax.jit(lambda k: jax.value_and_grad(hand_objective)(params, x, y, k, num_particles)),
        "ours": jax.jit(lambda k: objective.value_and_grad_estimate(k, params, x, y)),
        "numpyro": jax.jit(
            lambda k: jax.tree.map(
                jnp.negative, jax.value_and_grad(lambda p: loss.loss(k, p, np_model, np_guide, x, y))({"guide": params})
            )
        ),
    }
    values, finite = {}, True
    for i, (name, f) in enumerate(estimates.items()):
        out = [f(k) for k in jax.random.split(jax.random.key(100 + i), n_keys)]
        values[name] = [float(v) for v, _ in out]
        finite &= all(bool(jnp.all(jnp.isfinite(leaf))) for _, g in out for leaf in jax.tree.leaves(g))
    z = {name: float(mean_difference_z(values["hand"], values[name])) for name in ("ours", "numpyro")}
    return z, finite


# -- measurements ---------------------------------------------------------------------------------


def measure_steps(num_particles, x, y, guide, params, args):
    """Rows for the per-call steps and for the scanned loop (see `benchmarks.summarize`)."""
    found = variants(guide, params, x, y, num_particles)
    states = {name: (state, x, y) for name, (state, _) in found.items()}
    monitor = CpuMonitor(args.quiet_cores)
    keys = list(jax.random.split(jax.random.key(7), args.calls))
    steps = {name: step for name, (_, step) in found.items()}
    res = measure_variants(steps, states, keys, args.rounds, args.compile_reps, monitor, args.max_wait)
    rows = [r | {"K": num_particles, "mode": "per call"} for r in summarize(res, "hand+optax", args.quiet_cores)]
    loops = {name: scan_loop(step, args.loop_steps) for name, step in steps.items()}
    keys = list(jax.random.split(jax.random.key(8), args.loop_calls))
    res = measure_variants(loops, states, keys, args.rounds, 0, monitor, args.max_wait)
    loop_rows = summarize(res, "hand+optax", args.quiet_cores, args.loop_steps)
    return rows + [r | {"K": num_particles, "mode": f"scan of {args.loop_steps}"} for r in loop_rows]


def fit_times(num_particles, x, y, guide, params, steps, reps):
    """Median wall seconds of `ppl.fit` and `SVI.run` for `steps` steps: cold (new objective / new
    SVI, so compiling) and warm (the same objects again)."""

    def ours_fit(objective):
        kwargs = {"optimizer": OPTIMIZER, "steps": steps, "key": jax.random.key(1), "progress": False}
        return lambda: ppl.fit(objective, params, x, y, **kwargs)[0]

    def numpyro_run(svi):
        init = {"guide": params}
        return lambda: svi.run(jax.random.key(1), steps, x, y, progress_bar=False, init_params=init).params

    makers = {
        "ppl.fit": (lambda: ours_objective(guide, num_particles), ours_fit),
        "numpyro SVI.run": (lambda: numpyro_svi(num_particles), numpyro_run),
    }
    out = {name: {"cold": [], "warm": []} for name in makers}
    for _ in range(reps):
        for name, (build, runner) in makers.items():
            run = runner(build())
            out[name]["cold"].append(timed(run)[1])
            out[name]["warm"].append(timed(run)[1])
    return [
        {"K": num_particles, "variant": name, "cold_s": median(t["cold"]), "warm_s": median(t["warm"]), "steps": steps}
        for name, t in out.items()
    ]


STEP_COLUMNS = [
    ("K", lambda r: str(r["K"])),
    ("mode", lambda r: r["mode"]),
    ("variant", lambda r: r["variant"]),
    *COMPILE_COLUMNS,
    ("median (us/step)", lambda r: f"{1e3 * r['steady_ms']:.1f}"),
    ("IQR (us)", lambda r: f"{1e3 * r['steady_iqr_ms'][0]:.1f}-{1e3 * r['steady_iqr_ms'][1]:.1f}"),
    ("steps/s", lambda r: f"{1e3 / r['steady_ms']:,.0f}"),
    ("time vs hand", lambda r: f"**{r['ratio']:.3f}x**"),
    *ROUND_COLUMNS,
]
FIT_COLUMNS = [
    ("K", lambda r: str(r["K"])),
    ("variant", lambda r: r["variant"]),
    ("steps", lambda r: str(r["steps"])),
    ("cold (s)", lambda r: f"{r['cold_s']:.2f}"),
    ("warm (s)", lambda r: f"{r['warm_s']:.2f}"),
    ("warm steps/s", lambda r: f"{r['steps'] / r['warm_s']:,.0f}"),
]


def print_verdicts(rows):
    """Ours (ppl.svi) against NumPyro, steps per second, per K and mode."""
    for k, mode in dict.fromkeys((r["K"], r["mode"]) for r in rows):
        by = {r["variant"]: r for r in rows if r["K"] == k and r["mode"] == mode}
        ours, npy = by["ours ppl.svi"], by["numpyro SVI.update"]
        print(
            f"K={k}, {mode}: ours ppl.svi {1e3 / ours['steady_ms']:,.0f} steps/s, numpyro {1e3 / npy['steady_ms']:,.0f}"
            f" steps/s -> ours is {npy['steady_ms'] / ours['steady_ms']:.2f}x NumPyro's rate"
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="data points")
    parser.add_argument("--d", type=int, default=30, help="features")
    parser.add_argument("--particles", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--rounds", type=int, default=30, help="interleaved rounds of steady-state calls")
    parser.add_argument("--calls", type=int, default=50, help="calls per round")
    parser.add_argument("--loop-steps", type=int, default=500, help="steps per scanned loop")
    parser.add_argument("--loop-calls", type=int, default=3, help="scanned loops per round")
    parser.add_argument("--compile-reps", type=int, default=3)
    parser.add_argument("--fit-steps", type=int, default=2000, help="steps of ppl.fit and SVI.run (0: skip)")
    parser.add_argument("--fit-reps", type=int, default=3)
    parser.add_argument("--check-keys", type=int, default=200, help="keys for the bound agreement check")
    parser.add_argument("--max-wait", type=float, default=10.0, help="seconds to wait for a quiet machine each time")
    parser.add_argument(
        "--quiet-cores", type=float, default=0.25, help="rounds where other processes used more CPU are set aside"
    )
    args = parser.parse_args(argv)

    print_machine()
    x, y, guide, params = problem(args.n, args.d)
    print(f"data: N = {args.n}, D = {args.d}; Adam({LEARNING_RATE})")
    rows, fits, checks = [], [], []
    for k in args.particles:
        z, finite = bound_agreement(guide, params, x, y, k, args.check_keys)
        checks.append({"K": k, "z": z, "finite": finite})
        print(
            f"K={k}: mean bound minus hand's over {args.check_keys} keys: ours z = {z['ours']:.2f}, "
            f"numpyro z = {z['numpyro']:.2f}; gradients finite: {finite}"
        )
        rows += measure_steps(k, x, y, guide, params, args)
        if args.fit_steps:
            fits += fit_times(k, x, y, guide, params, args.fit_steps, args.fit_reps)
    print()
    print_markdown(rows, STEP_COLUMNS)
    if fits:
        print()
        print_markdown(fits, FIT_COLUMNS)
    print()
    print_verdicts(rows)
    return {"steps": rows, "fits": fits, "checks": checks}


if __name__ == "__main__":
    main()
