"""ELBO gradient step and optimizer step of an MNIST-sized VAE: our language, the same computation
written by hand in JAX, and NumPyro.

    python -m benchmarks.vae_step                 # batch 64 and 1024, all groups (what `make bench` runs)
    python -m benchmarks.vae_step --batches 64 --groups grad --rounds 40
    python -m benchmarks.vae_step --batches 64 --hlo   # also: optimized-HLO opcodes that differ
    python -m benchmarks.vae_step --groups fit         # whole ppl.fit runs against a hand-written loop

Encoder 784-200-(2x10) (mean and log-scale of a diagonal Normal over a 10-d z), decoder
10-200-784 with Bernoulli logits, tanh hidden units; random binary data from a fixed seed.

Group `grad`, the ELBO and its gradient only (reference: hand):
- ours:  `@ppl.gen` model and guide, the ELBO as an `@ppl.expectation`, the step is
  `elbo.value_and_grad_estimate(key, params, x)`.
- hand:  the reparameterized sample with `jax.random.normal`, log densities written out,
  `jax.value_and_grad`. It draws its noise from the same key as ADEV does
  (`jax.random.split(key)[1]`), so both compute the same number and the same gradient.
- hand+numpyro (diagnostic): the hand-written program scoring with NumPyro's `log_prob`s, which
  our language uses; it separates the cost of the distributions from the cost of ADEV.
- numpyro: the same model and guide as NumPyro programs (`numpyro.sample`, the weights at
  `numpyro.param` sites "enc" and "dec"); the step is `jax.value_and_grad` of
  `Trace_ELBO().loss(key, params, model, guide, x)` (the negated ELBO and its gradient).

Group `step`, a full Adam step (gradient and update; reference: hand+optax):
- ours ppl.svi: `ppl.svi(elbo, adam).step`, which also skips non-finite updates and computes the
  gradient norm.
- ours ppl.svi, no check: `ppl.svi(elbo, adam, skip_nonfinite=False).step` (gradient norm only).
- ours grad+optax (diagnostic): our gradient with the bare optax update hand+optax uses.
- hand+optax: hand's gradient, `optimizer.update`, `optax.apply_updates`.
- numpyro SVI.update: `SVI(model, guide, adam, Trace_ELBO()).update` (its key lives in its state).

Group `loop`: the `step` variants chained `--loop-steps` times inside one jitted `lax.scan`, so
that nothing is loop-invariant and per-call dispatch is amortized; times are per step.

Group `fit`, whole training runs of `--fit-steps` steps from the same initial parameters, timed
per call (reference: hand+optax):
- ours ppl.fit: `ppl.fit(elbo, params, x, optimizer=adam, steps=S, key=key, progress=False)`, the
  default (non-finite steps skipped), chunks of 100 steps, the loss history fetched per chunk.
- ours ppl.fit, no check: the same with `skip_nonfinite=False`.
- hand+optax: one jitted function initializing Adam and running hand+optax's step S times in a
  `lax.scan` that also returns each step's loss, fetched to the host at the end.

Everything runs under `jax.jit`. Per batch size and group, interleaved: compile time (trace + lower,
and XLA compile, of a fresh jit, median over repetitions) and steady-state time (rounds of calls,
the variants interleaved call by call, each call blocked on). The table gives each variant's ratio
to the group's reference, pooled and as the median of per-round ratios with a 95% bootstrap
interval over rounds.
"""

import argparse
import collections
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import optax
from numpyro.infer import SVI, Trace_ELBO

import ppl
from benchmarks import (
    COMPILE_COLUMNS,
    ROUND_COLUMNS,
    CpuMonitor,
    count_eqns,
    hlo_op_count,
    mean_difference_z,
    measure_variants,
    optax_step,
    paired_text,
    print_machine,
    print_markdown,
    scan_loop,
    steady_rounds,
    summarize,
)
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


# -- NumPyro --------------------------------------------------------------------------------------


def np_model(x):
    dec = numpyro.param("dec")
    z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand((x.shape[0], Z_DIM)).to_event(2))
    numpyro.sample("x", dist.Bernoulli(logits=decode(dec, z)).to_event(2), obs=x)


def np_guide(x):
    loc, log_scale = encode(numpyro.param("enc"), x)
    numpyro.sample("z", dist.Normal(loc, jnp.exp(log_scale)).to_event(2))


def numpyro_step(params, x, key):
    """(-ELBO estimate, its gradient): NumPyro's loss, the params substituted at the param sites."""
    return jax.value_and_grad(lambda p: Trace_ELBO().loss(key, p, np_model, np_guide, x))(params)


def numpyro_key(key):
    """The key for which `hand_step` draws the same noise as `numpyro_step(.., key)`: Trace_ELBO
    seeds the guide with `split(key)[1]`, whose seed handler splits once more for the site, as
    ADEV's reparam rule does."""
    return jax.random.split(key)[1]


# -- full optimizer steps -------------------------------------------------------------------------

OPTIMIZER = optax.adam(1e-3)
OURS_SVI = ppl.svi(elbo, OPTIMIZER)
OURS_SVI_UNCHECKED = ppl.svi(elbo, OPTIMIZER, skip_nonfinite=False)
NUMPYRO_SVI = SVI(np_model, np_guide, OPTIMIZER, Trace_ELBO())


def ours_svi_step(state, x, key):
    return OURS_SVI.step(key, state, x)


def ours_svi_unchecked_step(state, x, key):
    return OURS_SVI_UNCHECKED.step(key, state, x)


def ours_loss_and_grad(params, x, key):
    value, grads = ours_step(params, x, key)
    return -value, jax.tree.map(jnp.negative, grads)


def hand_loss_and_grad(params, x, key):
    return jax.value_and_grad(lambda p: -hand_elbo(p, x, key))(params)


def numpyro_svi_step(state, x, key):
    """`SVI.update`; `key` is unused (the state carries NumPyro's key)."""
    return NUMPYRO_SVI.update(state, x)


def optax_init(params, x, key):
    return params, OPTIMIZER.init(params)


def first(params, x, key):
    return params


# name -> (init(params, x, key) -> state, step(state, x, key)), per group; the first is the reference
STEPS = {
    "ours ppl.svi": (lambda p, x, k: OURS_SVI.init(p), ours_svi_step),
    "ours ppl.svi, no check": (lambda p, x, k: OURS_SVI_UNCHECKED.init(p), ours_svi_unchecked_step),
    "ours grad+optax": (optax_init, optax_step(ours_loss_and_grad, OPTIMIZER)),
    "hand+optax": (optax_init, optax_step(hand_loss_and_grad, OPTIMIZER)),
    "numpyro SVI.update": (lambda p, x, k: NUMPYRO_SVI.init(k, x, init_params=p), numpyro_svi_step),
}
GROUPS = {
    "grad": (
        "hand",
        {
            "ours": (first, ours_step),
            "hand": (first, hand_step),
            "hand+numpyro": (first, hand_numpyro_step),
            "numpyro": (first, numpyro_step),
        },
    ),
    "step": ("hand+optax", STEPS),
}


def loop_group(length):
    """The `step` group chained `length` times in a jitted scan."""
    return "hand+optax", {name: (init, scan_loop(step, length)) for name, (init, step) in STEPS.items()}


def fit_group(steps):
    """`fit` variants: (params, x, key) -> (params, losses) of a whole run of `steps` steps."""
    hand_step = optax_step(hand_loss_and_grad, OPTIMIZER)

    @jax.jit
    def hand(params, x, key):
        def body(state, k):
            return hand_step(state, x, k)

        (params, _), losses = jax.lax.scan(body, (params, OPTIMIZER.init(params)), jax.random.split(key, steps))
        return params, losses

    def ours(skip_nonfinite):
        options = {"optimizer": OPTIMIZER, "steps": steps, "progress": False, "skip_nonfinite": skip_nonfinite}
        return lambda params, x, key: ppl.fit(elbo, params, x, key=key, **options)

    def hand_fit(params, x, key):
        params, losses = hand(params, x, key)
        return params, np.asarray(losses)

    return "hand+optax", {"ours ppl.fit": ours(True), "ours ppl.fit, no check": ours(False), "hand+optax": hand_fit}


def measure_fit(batch, steps, args):
    """Rows of the `fit` group at one batch size: whole runs, interleaved, timed per step."""
    reference, calls = fit_group(steps)
    params, x = init_params(jax.random.key(1)), make_data(batch)
    keys = list(jax.random.split(jax.random.key(7), args.fit_calls))
    monitor = CpuMonitor(args.quiet_cores)
    rounds = steady_rounds(calls, {name: (params, x) for name in calls}, keys, args.rounds, monitor, args.max_wait)
    res = {name: {"compile_reps": [], "rounds": r} for name, r in rounds.items()}
    rows = summarize(res, reference, args.quiet_cores, steps)
    for row in rows:
        row |= {"batch": batch, "group": f"fit ({steps} steps)", "reference": reference}
    return rows


# -- checks ---------------------------------------------------------------------------------------


def max_relative_error(grads, reference):
    """Largest over leaves of max|g - r| / max|r|."""
    errs = jax.tree.map(lambda g, r: float(jnp.max(jnp.abs(g - r)) / (jnp.max(jnp.abs(r)) + 1e-30)), grads, reference)
    return max(jax.tree.leaves(errs))


def agreement(batch, n_keys=3):
    """Same noise, against hand: (max |value difference| / |value|, max relative gradient error)
    for ours and for NumPyro (negated loss and gradient, at `numpyro_key`)."""
    params, x = init_params(jax.random.key(1)), make_data(batch)
    ours, hand, npy = jax.jit(ours_step), jax.jit(hand_step), jax.jit(numpyro_step)
    worst = {"ours": (0.0, 0.0), "numpyro": (0.0, 0.0)}
    for key in jax.random.split(jax.random.key(123), n_keys):
        v_hand, g_hand = hand(params, x, key)
        v_hand_np, g_hand_np = hand(params, x, numpyro_key(key))
        v_ours, g_ours = ours(params, x, key)
        loss, g_np = npy(params, x, key)
        for name, v, g, rv, rg in (
            ("ours", v_ours, g_ours, v_hand, g_hand),
            ("numpyro", -loss, jax.tree.map(jnp.negative, g_np), v_hand_np, g_hand_np),
        ):
            dv, dg = abs(float(v) - float(rv)) / abs(float(rv)), max_relative_error(g, rg)
            worst[name] = (max(worst[name][0], dv), max(worst[name][1], dg))
    return worst


def mean_agreement(batch, n_keys):
    """Independent noise: z-scores of (NumPyro's mean ELBO estimate - hand's) and of the same for
    the gradient projected on a fixed random direction, over `n_keys` keys each (|z| < 4 agrees)."""
    params, x = init_params(jax.random.key(1)), make_data(batch)
    leaves, tree = jax.tree.flatten(params)
    direction = jax.tree.unflatten(tree, [jax.random.normal(jax.random.key(i), a.shape) for i, a in enumerate(leaves)])
    project = lambda g: sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(direction)))
    hand = jax.jit(lambda p, x, k: (lambda v, g: (v, project(g)))(*hand_step(p, x, k)))
    npy = jax.jit(lambda p, x, k: (lambda v, g: (-v, -project(g)))(*numpyro_step(p, x, k)))
    k_hand, k_np = jax.random.split(jax.random.key(99))
    a = [hand(params, x, k) for k in jax.random.split(k_hand, n_keys)]
    b = [npy(params, x, k) for k in jax.random.split(k_np, n_keys)]
    return tuple(float(z) for z in mean_difference_z(a, b))


# -- code ------------------------------------------------------------------------------------------

_OPCODE = re.compile(r"^\s*(?:ROOT\s+)?%?\S+\s*=\s*.*?\s([a-z][a-z0-9-]*)\(")


def hlo_opcodes(text):
    """Counter of the opcodes in optimized HLO text (all computations, fusion bodies included)."""
    return collections.Counter(m.group(1) for line in text.splitlines() if (m := _OPCODE.match(line)))


def code_size(step, args):
    """{jaxpr_eqns, hlo_ops, flops, opcodes} of the jitted step."""
    compiled = jax.jit(step).lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return {
        "jaxpr_eqns": count_eqns(jax.make_jaxpr(jax.jit(step))(*args)),
        "hlo_ops": hlo_op_count(compiled),
        "flops": float(cost.get("flops", float("nan"))) if cost else float("nan"),
        "opcodes": hlo_opcodes(compiled.as_text()),
    }


def print_opcode_differences(batch, sizes):
    """The opcodes whose counts differ between the variants."""
    names = list(sizes)
    ops = sorted(set().union(*(sizes[n]["opcodes"] for n in names)))
    rows = [{"op": op, **{n: sizes[n]["opcodes"][op] for n in names}} for op in ops]
    rows = [r for r in rows if len({r[n] for n in names}) > 1]
    print(f"\nbatch {batch}: optimized-HLO opcodes whose counts differ")
    print_markdown(rows, [("opcode", lambda r: r["op"])] + [(n, lambda r, n=n: str(r[n])) for n in names])


# -- measurements ---------------------------------------------------------------------------------


def measure_group(batch, group, reference, variants, calls, args, steps_per_call=1, with_code=True):
    """Rows of one group at one batch size (see `benchmarks.summarize`), with code sizes."""
    params, x = init_params(jax.random.key(1)), make_data(batch)
    key = jax.random.key(0)
    states = {name: (init(params, x, key), x) for name, (init, _) in variants.items()}
    steps = {name: step for name, (_, step) in variants.items()}
    keys = list(jax.random.split(jax.random.key(7), calls))
    monitor = CpuMonitor(args.quiet_cores)
    compile_reps = args.compile_reps if with_code else 0
    res = measure_variants(steps, states, keys, args.rounds, compile_reps, monitor, args.max_wait)
    rows = summarize(res, reference, args.quiet_cores, steps_per_call)
    for row in rows:
        row |= {"batch": batch, "group": group, "reference": reference}
        if with_code:
            row |= code_size(steps[row["variant"]], (*states[row["variant"]], key))
    return rows


TIME_COLUMNS = [
    ("batch", lambda r: str(r["batch"])),
    ("group", lambda r: r["group"]),
    ("variant", lambda r: r["variant"]),
    *COMPILE_COLUMNS,
    ("steady, median (ms/step)", lambda r: f"{r['steady_ms']:.3f}"),
    ("IQR (ms)", lambda r: f"{r['steady_iqr_ms'][0]:.3f}-{r['steady_iqr_ms'][1]:.3f}"),
    ("p10 (ms)", lambda r: f"{r['steady_p10_ms']:.3f}"),
    ("vs reference", lambda r: f"**{r['ratio']:.3f}x**"),
    *ROUND_COLUMNS,
]
CODE_COLUMNS = [
    ("batch", lambda r: str(r["batch"])),
    ("group", lambda r: r["group"]),
    ("variant", lambda r: r["variant"]),
    ("jaxpr eqns (recursive)", lambda r: str(r["jaxpr_eqns"])),
    ("optimized HLO instrs", lambda r: str(r["hlo_ops"])),
    ("XLA flops", lambda r: f"{r['flops']:.4g}"),
]


def print_verdicts(rows):
    """ours / hand and ours / NumPyro in the `grad` group, against the targets."""
    for batch in sorted({r["batch"] for r in rows}):
        by = {r["variant"]: r for r in rows if r["batch"] == batch and r["group"] == "grad"}
        if not by:
            continue
        ours, npy = by["ours"], by["numpyro"]
        verdict = "met" if ours["ratio"] <= 1.05 else "NOT met"
        if "busy" in ours["rounds"]:
            verdict += " (other processes kept the machine busy in every round: not reliable)"
        print(
            f"batch {batch}: ours/hand = {ours['ratio']:.3f}x pooled, per round {paired_text(ours)} "
            f"-> target <= 1.05x {verdict}; "
            f"ours/numpyro = {ours['steady_ms'] / npy['steady_ms']:.3f}x "
            f"({'faster' if ours['steady_ms'] < npy['steady_ms'] else 'NOT faster'})"
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 1024])
    parser.add_argument(
        "--groups", nargs="+", default=["grad", "step", "loop"], choices=["grad", "step", "loop", "fit"]
    )
    parser.add_argument("--rounds", type=int, default=30, help="interleaved rounds of steady-state calls")
    parser.add_argument("--calls", type=int, default=0, help="calls per round (default: 20 for B<=256, else 5)")
    parser.add_argument("--loop-steps", type=int, default=0, help="steps per scan (default: 3200 / B, at least 5)")
    parser.add_argument("--loop-calls", type=int, default=3, help="scans per round")
    parser.add_argument("--fit-steps", type=int, default=0, help="steps per fit (default: 32000 / B, at least 100)")
    parser.add_argument("--fit-calls", type=int, default=1, help="fits per round")
    parser.add_argument("--compile-reps", type=int, default=3)
    parser.add_argument("--check-keys", type=int, default=64, help="keys for the independent-noise check")
    parser.add_argument("--hlo", action="store_true", help="print the optimized-HLO opcodes that differ")
    parser.add_argument("--max-wait", type=float, default=10.0, help="seconds to wait for a quiet machine each time")
    parser.add_argument(
        "--quiet-cores", type=float, default=0.25, help="rounds where other processes used more CPU are set aside"
    )
    args = parser.parse_args(argv)

    print_machine()
    rows = []
    for batch in args.batches:
        same = agreement(batch)
        z_value, z_grad = mean_agreement(batch, args.check_keys)
        print(
            f"batch {batch}: same noise as hand -> ours: ELBO rel. diff {same['ours'][0]:.2e}, gradient "
            f"{same['ours'][1]:.2e}; numpyro: {same['numpyro'][0]:.2e}, {same['numpyro'][1]:.2e}. "
            f"Independent noise, {args.check_keys} keys each: numpyro - hand z = {z_value:.2f} (ELBO), "
            f"{z_grad:.2f} (gradient . random direction)"
        )
        calls = args.calls or (20 if batch <= 256 else 5)
        for group in args.groups:
            if group == "fit":
                rows += measure_fit(batch, args.fit_steps or max(100, 32000 // batch), args)
            elif group == "loop":
                length = args.loop_steps or max(5, 3200 // batch)
                reference, variants = loop_group(length)
                rows += measure_group(
                    batch, f"loop ({length} steps)", reference, variants, args.loop_calls, args, length, False
                )
            else:
                reference, variants = GROUPS[group]
                rows += measure_group(batch, group, reference, variants, calls, args)
        if args.hlo and "grad" in args.groups:
            sized = {r["variant"]: r for r in rows if r["batch"] == batch and r["group"] == "grad"}
            print_opcode_differences(batch, sized)
    print()
    print_markdown(rows, TIME_COLUMNS)
    print()
    print_markdown([r for r in rows if "hlo_ops" in r], CODE_COLUMNS)
    print()
    print_verdicts(rows)
    return rows


if __name__ == "__main__":
    main()
