"""Exact marginalization: the gradient of an exact log marginal likelihood (`ppl.marginal(model,
keep, ppl.exact())`), against the same sum written by hand in JAX and NumPyro's enumeration.

    python -m benchmarks.exact_marginal                       # HMM T = 100, 1000, 10000; GMM N = 1000 (`make bench`)
    python -m benchmarks.exact_marginal --lengths 100 1000 --rounds 20 --problems hmm

Problems (fixed seeds):
- hmm: models/hmm.py `learned_model`, three states with Gaussian emissions at MEANS_3, initial
  and transition probabilities softmax(init_logits), softmax(trans_logits); data of length T drawn
  from the chain at INIT_3, TRANS_3. The step is log p(x) (every state summed out: the forward
  algorithm) and its gradient w.r.t. both logits, at the log of the true probabilities.
- gmm: models/gmm.py `model`, K = 3 components, N points, the means mu given (kept): the step is
  log p(mu, x) (every assignment summed out) and its gradient w.r.t. mu, at mu = (-1, 0, 1).

Variants (reference: hand):
- ours: `ppl.density(ppl.marginal(model, keep, ppl.exact()))(choices, params, x)` under
  `jax.value_and_grad` (for the HMM `hmm.exact_marginal(hmm.learned_model)`, keep = []).
- hand: the hand-written sum: `hmm.log_marginal` (the forward algorithm in `lax.scan`, log
  emissions computed before it) with the softmaxed parameters; for the GMM the prior plus
  `logsumexp` over components per point.
- numpyro log_density: the same model as a NumPyro program (`numpyro.contrib.control_flow.scan`
  for the chain, `numpyro.plate` for the points, `infer={"enumerate": "parallel"}` at the
  discrete site), `numpyro.contrib.funsor.log_density` under `enum`: the enumerated log joint
  NumPyro's HMC/NUTS uses, which eliminates a scan's states sequentially (the Markov sum).
- numpyro TraceEnum_ELBO: `-TraceEnum_ELBO().loss` with an empty guide (no continuous latents,
  so the ELBO is log p(x) exactly), parameters passed as model arguments, mu given by
  `handlers.condition`. For the GMM it is exact. For the HMM its value is *not* log p(x):
  `TraceEnum_ELBO` contracts the scan's time dimension as if it were a plate, without the Markov
  (sequential) elimination `log_density` does (NumPyro 0.22), so it is timed but flagged, and the
  verdicts compare with `log_density`. (`handlers.substitute` for mu is wrong too: the
  substituted site is treated as a summed-out variable and its prior term drops out.)

Before timing, every variant's value and gradient are compared with a float64 NumPy evaluation
of the same sum (the forward algorithm step by step, and logsumexp), and each value with ours.

Measured, interleaved (see benchmarks/__init__.py): compile times of fresh jits (trace + lower,
XLA compile, first call), steady-state time per call (each call blocked on), ratios to hand
(pooled and per round, with a 95% bootstrap interval) and per round to NumPyro's log_density;
the step's jaxpr size (equations, counted recursively) and the equations inside each scan body.
"""

import argparse

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import numpyro
from jax.scipy.special import logsumexp
from numpyro.contrib.control_flow import scan as np_scan
from numpyro.contrib.funsor import enum
from numpyro.contrib.funsor import log_density as np_log_density
from numpyro.handlers import condition
from numpyro.infer import TraceEnum_ELBO

import ppl
from benchmarks import (
    COMPILE_COLUMNS,
    ROUND_COLUMNS,
    CpuMonitor,
    count_eqns,
    measure_variants,
    paired_text,
    print_machine,
    print_markdown,
    summarize,
)
from models import gmm, hmm
from ppl import dist

NUMPYRO = "numpyro log_density"  # the NumPyro variant the verdicts compare with
TRACE_ENUM = "numpyro TraceEnum_ELBO"
HMM_PARAMS = {"init_logits": jnp.log(hmm.INIT_3), "trans_logits": jnp.log(hmm.TRANS_3)}
GMM_MU = jnp.array([-1.0, 0.0, 1.0])


# -- the HMM --------------------------------------------------------------------------------------


def hmm_data(t, seed=5):
    return hmm.make_data(t=t, seed=seed, init=hmm.INIT_3, trans=hmm.TRANS_3, means=hmm.MEANS_3)[0]


def hmm_hand(params, x):
    init, trans = jax.nn.softmax(params["init_logits"]), jax.nn.softmax(params["trans_logits"], axis=-1)
    return hmm.log_marginal(x, init, trans, hmm.MEANS_3)


def np_hmm(params, x):
    """`hmm.learned_model` as a NumPyro program (the virtual start state 3 picks the initial row)."""
    rows = jax.nn.softmax(jnp.vstack([params["trans_logits"], params["init_logits"][None]]), axis=-1)

    def step(prev, x_t):
        z = numpyro.sample("z", dist.Categorical(probs=rows[prev]), infer={"enumerate": "parallel"})
        numpyro.sample("x", dist.Normal(hmm.MEANS_3[z], hmm.SCALE), obs=x_t)
        return z, None

    np_scan(step, jnp.asarray(hmm.MEANS_3.shape[0]), x)


def softmax64(logits):
    """softmax over the last axis in float64 NumPy."""
    logits = np.asarray(logits, np.float64)
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def hmm_reference(params, x):
    """log p(x) in float64 NumPy, the forward algorithm step by step."""
    init, trans = softmax64(params["init_logits"]), softmax64(params["trans_logits"])
    x, means = np.asarray(x, np.float64), np.asarray(hmm.MEANS_3, np.float64)
    log_e = -0.5 * ((x[:, None] - means) / hmm.SCALE) ** 2 - np.log(hmm.SCALE) - 0.5 * np.log(2 * np.pi)
    log_alpha = np.log(init) + log_e[0]
    for t in range(1, len(x)):
        m = log_alpha.max()
        log_alpha = m + np.log(np.exp(log_alpha - m) @ trans) + log_e[t]
    m = log_alpha.max()
    return m + np.log(np.sum(np.exp(log_alpha - m)))


def hmm_variants():
    """name -> log marginal (params, x) -> scalar."""
    marginal = hmm.exact_marginal(hmm.learned_model)
    elbo = TraceEnum_ELBO(max_plate_nesting=0)
    empty_guide = lambda params, x: None
    return {
        "hand": hmm_hand,
        "ours": lambda params, x: ppl.density(marginal)({}, params, x),
        NUMPYRO: lambda params, x: np_log_density(enum(np_hmm, first_available_dim=-1), (params, x), {}, {})[0],
        TRACE_ENUM: lambda params, x: -elbo.loss(jax.random.key(0), {}, np_hmm, empty_guide, params, x),
    }


# -- the GMM --------------------------------------------------------------------------------------


def gmm_data(n, seed=0):
    return gmm.make_data(n=n, seed=seed)[0]


def gmm_hand(mu, x):
    prior = jnp.sum(dist.Normal(0.0, gmm.PRIOR_SCALE).log_prob(mu))
    return prior + jnp.sum(logsumexp(jnp.log(gmm.WEIGHTS) + dist.Normal(mu, gmm.NOISE).log_prob(x[:, None]), axis=1))


def np_gmm(x):
    """models/gmm.py `model` as a NumPyro program."""
    mu = numpyro.sample("mu", dist.Normal(0.0, gmm.PRIOR_SCALE).expand((gmm.K,)).to_event(1))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(probs=gmm.WEIGHTS), infer={"enumerate": "parallel"})
        numpyro.sample("x", dist.Normal(mu[z], gmm.NOISE), obs=x)


def gmm_reference(mu, x):
    """log p(mu, x) in float64 NumPy."""
    mu, x = np.asarray(mu, np.float64), np.asarray(x, np.float64)
    normal = lambda v, loc, scale: -0.5 * ((v - loc) / scale) ** 2 - np.log(scale) - 0.5 * np.log(2 * np.pi)
    terms = np.log(1.0 / gmm.K) + normal(x[:, None], mu, gmm.NOISE)
    m = terms.max(axis=1, keepdims=True)
    per_point = m[:, 0] + np.log(np.sum(np.exp(terms - m), axis=1))
    return np.sum(normal(mu, 0.0, gmm.PRIOR_SCALE)) + np.sum(per_point)


def gmm_variants():
    marginal = ppl.marginal(gmm.model, keep=["mu"], algorithm=ppl.exact())
    elbo = TraceEnum_ELBO(max_plate_nesting=1)
    empty_guide = lambda x: None
    return {
        "hand": gmm_hand,
        "ours": lambda mu, x: ppl.density(marginal)({"mu": mu}, None, x),
        NUMPYRO: lambda mu, x: np_log_density(
            enum(condition(np_gmm, {"mu": mu}), first_available_dim=-2), (x,), {}, {}
        )[0],
        TRACE_ENUM: lambda mu, x: -elbo.loss(jax.random.key(0), {}, condition(np_gmm, {"mu": mu}), empty_guide, x),
    }


# -- checks and measurements ----------------------------------------------------------------------


def gradient_step(log_marginal):
    """The step `(params, x, key) -> (log marginal, its gradient w.r.t. params)` (key unused)."""
    value_and_grad = jax.value_and_grad(log_marginal)
    return lambda params, x, key: value_and_grad(params, x)


def float64_gradient(reference, params, x, eps=1e-5):
    """Central differences of the float64 reference, coordinate by coordinate (leaves in
    `ravel_pytree` order, kept in float64 NumPy)."""
    leaves, treedef = jax.tree.flatten(params)
    leaves = [np.asarray(leaf, np.float64) for leaf in leaves]

    def moved(i, idx, delta):
        copies = [leaf.copy() for leaf in leaves]
        copies[i][idx] += delta
        return reference(jax.tree.unflatten(treedef, copies), x)

    grad = [
        [(moved(i, idx, eps) - moved(i, idx, -eps)) / (2 * eps) for idx in np.ndindex(leaf.shape)]
        for i, leaf in enumerate(leaves)
    ]
    return np.concatenate([np.asarray(g, np.float64) for g in grad])


def agreement(variants, reference, params, x, check_gradient=True):
    """{name: {value, value_err (relative to the float64 reference), vs_ours (relative), grad_err
    (max abs difference over max abs reference gradient)}}, and the reference value."""
    want = float(reference(params, x))
    want_grad = float64_gradient(reference, params, x) if check_gradient else None
    out = {}
    for name, fn in variants.items():
        value, grad = jax.jit(jax.value_and_grad(fn))(params, x)
        flat = np.asarray(jax.flatten_util.ravel_pytree(grad)[0], np.float64)
        out[name] = {"value": float(value), "value_err": abs(float(value) - want) / abs(want)}
        if want_grad is not None:
            out[name]["grad_err"] = float(np.max(np.abs(flat - want_grad)) / np.max(np.abs(want_grad)))
    for name in out:
        out[name]["vs_ours"] = abs(out[name]["value"] - out["ours"]["value"]) / abs(out["ours"]["value"])
    return out, want


def scan_body_eqns(jaxpr):
    """Equations (recursive) in the body of each `lax.scan` of a jaxpr, outermost first, in order."""
    from transforms.compat import sub_jaxprs

    found = []

    def walk(j):
        j = getattr(j, "jaxpr", j)
        for eqn in j.eqns:
            if eqn.primitive.name == "scan":
                found.append(count_eqns(eqn.params["jaxpr"]))
            for sub in sub_jaxprs(eqn.params):
                walk(sub)

    walk(jaxpr)
    return found


def measure(problem, size, variants, params, x, args):
    """Rows for one problem and size: timings, ratios, code size."""
    steps = {name: gradient_step(fn) for name, fn in variants.items()}
    states = {name: (params, x) for name in steps}
    monitor = CpuMonitor(args.quiet_cores)
    keys = list(jax.random.split(jax.random.key(7), args.calls))
    res = measure_variants(steps, states, keys, args.rounds, args.compile_reps, monitor, args.max_wait)
    rows = summarize(res, "hand", args.quiet_cores)
    vs_numpyro = {r["variant"]: r for r in summarize(res, NUMPYRO, args.quiet_cores)} if NUMPYRO in res else {}
    for row in rows:
        jaxpr = jax.make_jaxpr(steps[row["variant"]])(params, x, keys[0])
        row |= {"problem": problem, "size": size, "jaxpr_eqns": count_eqns(jaxpr), "scan_eqns": scan_body_eqns(jaxpr)}
        if vs_numpyro:
            other = vs_numpyro[row["variant"]]
            row |= {
                "vs_numpyro": row["steady_ms"] / vs_numpyro[NUMPYRO]["steady_ms"],
                "np_paired_ratio": other["paired_ratio"],
                "np_paired_ci": other["paired_ci"],
            }
    return rows


def numpyro_paired_text(row):
    if "np_paired_ratio" not in row:
        return ""
    return paired_text(row | {"paired_ratio": row["np_paired_ratio"], "paired_ci": row["np_paired_ci"]})


COLUMNS = [
    ("problem", lambda r: r["problem"]),
    ("T or N", lambda r: str(r["size"])),
    ("variant", lambda r: r["variant"]),
    *COMPILE_COLUMNS,
    ("median (ms/step)", lambda r: f"{r['steady_ms']:.3f}"),
    ("IQR (ms)", lambda r: f"{r['steady_iqr_ms'][0]:.3f}-{r['steady_iqr_ms'][1]:.3f}"),
    ("time vs hand", lambda r: f"**{r['ratio']:.2f}x**"),
    *ROUND_COLUMNS[:1],
    ("per-round ratio to numpyro log_density", numpyro_paired_text),
    ROUND_COLUMNS[1],
    ("jaxpr eqns", lambda r: str(r["jaxpr_eqns"])),
    ("scan-body eqns", lambda r: "+".join(map(str, r["scan_eqns"])) or "-"),
]


def print_agreement(problem, size, checks, want):
    parts = []
    for name, c in checks.items():
        grad = f", gradient {c['grad_err']:.1e}" if "grad_err" in c else ""
        parts.append(f"{name} {c['value']:.4f} (rel. err {c['value_err']:.1e}{grad}; vs ours {c['vs_ours']:.1e})")
    print(f"{problem} {size}: float64 reference {want:.4f}; " + "; ".join(parts))


def print_verdicts(rows):
    for problem, size in dict.fromkeys((r["problem"], r["size"]) for r in rows):
        by = {r["variant"]: r for r in rows if r["problem"] == problem and r["size"] == size}
        ours = by["ours"]
        vs = f", {ours['vs_numpyro']:.2f}x numpyro log_density" if "vs_numpyro" in ours else ""
        print(
            f"{problem} {size}: ours {ours['steady_ms']:.3f} ms/step = {ours['ratio']:.2f}x hand "
            f"(per round {paired_text(ours)}){vs}"
        )
    hmm_rows = {r["size"]: r for r in rows if r["problem"] == "hmm" and r["variant"] == "ours" and "lower_s" in r}
    if len(hmm_rows) > 1:
        lo, hi = min(hmm_rows), max(hmm_rows)
        total = lambda r: r["lower_s"] + r["compile_s"]
        print(
            f"hmm compile (trace+lower + XLA) of ours: T={lo} {total(hmm_rows[lo]):.2f} s, "
            f"T={hi} {total(hmm_rows[hi]):.2f} s ({total(hmm_rows[hi]) / total(hmm_rows[lo]):.2f}x)"
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", nargs="+", default=["hmm", "gmm"], choices=["hmm", "gmm"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[100, 1000, 10000], help="HMM lengths T")
    parser.add_argument("--numpyro-max-length", type=int, default=10000, help="skip NumPyro above this T")
    parser.add_argument("--points", type=int, default=1000, help="GMM points N")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds of steady-state calls")
    parser.add_argument("--calls", type=int, default=20, help="calls per round")
    parser.add_argument("--compile-reps", type=int, default=2)
    parser.add_argument("--max-wait", type=float, default=10.0, help="seconds to wait for a quiet machine each time")
    parser.add_argument(
        "--quiet-cores", type=float, default=0.25, help="rounds where other processes used more CPU are set aside"
    )
    args = parser.parse_args(argv)

    print_machine()
    print(f"HMM: S = 3, T in {args.lengths}; GMM: K = {gmm.K}, N = {args.points}")
    cases = []
    if "hmm" in args.problems:
        for t in args.lengths:
            variants = hmm_variants()
            if t > args.numpyro_max_length:
                variants = {k: v for k, v in variants.items() if not k.startswith("numpyro")}
            cases.append(("hmm", t, variants, hmm_reference, HMM_PARAMS, hmm_data(t)))
    if "gmm" in args.problems:
        cases.append(("gmm", args.points, gmm_variants(), gmm_reference, GMM_MU, gmm_data(args.points)))
    rows, checks = [], []
    for problem, size, variants, reference, params, x in cases:
        check, want = agreement(variants, reference, params, x)
        checks.append({"problem": problem, "size": size, "reference": want, "variants": check})
        print_agreement(problem, size, check, want)
        rows += measure(problem, size, variants, params, x, args)
    print()
    print_markdown(rows, COLUMNS)
    print()
    print_verdicts(rows)
    return {"rows": rows, "checks": checks}


if __name__ == "__main__":
    main()
