"""ADEV: turn a staged objective program into unbiased estimators of its expected value and of
the gradient of that expectation.

The program is interpreted forward over dual numbers (primal, tangent-or-None). Ordinary equations
are evaluated with `jax.jvp`; at each `sample_p` site the site's estimator rule receives the
*continuation*, the rest of the program, which it may run once (reparam, REINFORCE), vectorized
over the support (enumeration), or on forked values (MVD, leave-one-out baselines). The tangent of
the result is linear in the input tangents, so `value_and_grad` wraps the forward estimator in a
`jax.custom_jvp` and JAX's reverse mode transposes it.

Randomness: the key is split at every site, so no two sites share noise; forked continuations
share the key (common random numbers), which keeps each fork's estimate unbiased.

Control flow: sites inside `jit`/`checkpoint` bodies are inlined; inside `scan` and `cond` bodies
the rules must be local (reparam, REINFORCE with a constant or learned baseline); a `cond` whose
branches hold non-local sites at top level gets the continuation pushed into each branch.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from transforms import compat, estimators
from transforms.interpreter import site_avals, unsupported
from transforms.primitives import Site, eqn_contains_sample, format_address, sample_p


class State(NamedTuple):
    key: object
    score: object  # tangent of the summed REINFORCE scores (None in primal-only mode)
    baseline: object  # tangent of the summed baseline * score terms


class DualSite(Site):
    """A site whose distribution parameters are dual numbers."""

    def __init__(self, eqn, duals):
        super().__init__(eqn.params["address"], tuple(p for p, _ in duals), eqn.params)
        object.__setattr__(self, "tangents", tuple(t for _, t in duals))

    def jvp_leaves(self, fn):
        """(fn(leaves), tangent of fn) w.r.t. the leaves that carry tangents (tangent None if none)."""
        active = [i for i, t in enumerate(self.tangents) if t is not None]
        if not active:
            return fn(self.leaves), None

        def at(*xs):
            leaves = list(self.leaves)
            for i, x in zip(active, xs):
                leaves[i] = x
            return fn(leaves)

        return jax.jvp(at, [self.leaves[i] for i in active], [self.tangents[i] for i in active])

    def per_element(self, fn, leaves, value):
        """fn(distribution, value_element) for each batch element."""
        return self.map(lambda d, e, x: fn(d, x), leaves, value)

    def estimator_leaves(self):
        n_dist = self.params["treedef"].children()[0].num_leaves
        return self.leaves[n_dist:]


class Cont:
    """The rest of the program after a site (see `transforms.estimators`)."""

    def __init__(self, run, primal_run):
        self._run, self._primal_run = run, primal_run

    def __call__(self, value, value_tangent=None, score=None, baseline=None):
        return self._run(value, value_tangent, score, baseline)

    def primal(self, values):
        return jax.vmap(self._primal_run)(values)


class Interpreter:
    """Dual interpreter; `primal_only` evaluates without tangents (every site just samples);
    `scope` names the enclosing scan/cond body where only local rules may run (None at top)."""

    def __init__(self, primal_only=False, scope=None):
        self.primal_only, self.scope = primal_only, scope

    def run(self, eqns, i, env, state, k):
        """Evaluate eqns[i:] then call k(env, state, interpreter); returns what k (or a rule)
        returns. Continuations take the interpreter that reaches them, so a primal-only fork that
        leaves a sub-program (a jit body, a cond branch, an unrolled scan step) stays primal-only."""
        while i < len(eqns):
            eqn = eqns[i]
            duals = [self.read(env, v) for v in eqn.invars]
            if eqn.primitive is sample_p:
                return self.site(eqns, i, eqn, duals, env, state, k)
            if not eqn_contains_sample(eqn):
                outs = self.jvp_eqn(eqn, duals)
            elif eqn.primitive.name in compat.INLINE_CALLS:
                return self.inline(eqns, i, eqn, duals, env, state, k)
            elif eqn.primitive.name == "scan":
                if self.scope is None and not self.primal_only and _has_nonlocal_site(eqn):
                    return self.scan_unrolled(eqns, i, eqn, duals, env, state, k)
                outs, state = self.scan(eqn, duals, state)
            elif eqn.primitive.name == "cond":
                if self.scope is None and not self.primal_only and _has_nonlocal_site(eqn):
                    return self.cond_with_continuation(eqns, i, eqn, duals, env, state, k)
                outs, state = self.cond(eqn, duals, state)
            else:
                raise unsupported(eqn, " in an expectation")
            env = dict(env)
            for v, d in zip(eqn.outvars, outs):
                env[v] = d
            i += 1
        return k(env, state, self)

    @staticmethod
    def read(env, atom):
        if isinstance(atom, compat.Literal):
            return atom.val, None
        return env[atom]

    def jvp_eqn(self, eqn, duals):
        primals = [p for p, _ in duals]
        active = [j for j, (_, t) in enumerate(duals) if t is not None]
        if self.primal_only or not active:
            return [(o, None) for o in compat.bind_eqn(eqn, primals)]

        def at(*xs):
            vals = list(primals)
            for j, x in zip(active, xs):
                vals[j] = x
            return compat.bind_eqn(eqn, vals)

        outs, tangents = jax.jvp(at, [primals[j] for j in active], [duals[j][1] for j in active])
        return [(o, t if compat.has_tangent_space(o) else None) for o, t in zip(outs, tangents)]

    # -- sample sites -------------------------------------------------------------------------

    def site(self, eqns, i, eqn, duals, env, state, k):
        site = DualSite(eqn, duals)
        if site.observed:
            value, tangent = site.jvp_leaves(site.observed_value)
            return self.run(eqns, i + 1, {**env, eqn.outvars[0]: (value, tangent)}, state, k)
        key, site_key = jax.random.split(state.key)
        if self.primal_only:
            value = site.sample(site_key)
            return self.run(eqns, i + 1, {**env, eqn.outvars[0]: (value, None)}, state._replace(key=key), k)
        estimator = estimators.resolve(site.estimator, site.distribution)
        estimator.check(site.distribution, site.address)
        if not estimator.local and self.scope is not None:
            raise NotImplementedError(
                f"estimator {estimator!r} at '{site.name}' needs the rest of the program, which it cannot "
                f"reach from inside a {self.scope} body (a lax.scan, a cond inside one, or a jax.vmap of a "
                "lax.cond whose predicate is batched, which runs as a loop); use a local estimator there "
                "(reparam, reinforce)"
            )

        def go(value, value_tangent, score, baseline):
            s = state._replace(
                key=key,
                score=state.score if score is None else state.score + score,
                baseline=state.baseline if baseline is None else state.baseline + baseline,
            )
            return self.run(eqns, i + 1, {**env, eqn.outvars[0]: (value, value_tangent)}, s, k)

        def go_primal(value):
            side = Interpreter(primal_only=True, scope=self.scope)
            s = State(key, None, None)
            return side.run(eqns, i + 1, {**env, eqn.outvars[0]: (value, None)}, s, _primal_k(k))

        return estimator.rule(site, site_key, Cont(go, go_primal))

    # -- calls and control flow ---------------------------------------------------------------

    def inline(self, eqns, i, eqn, duals, env, state, k):
        inner, consts = compat.inline_jaxpr(eqn)
        return self.then_continue(inner, consts, duals, state, eqns, i, env, k)

    def then_continue(self, jaxpr, consts, duals, state, eqns, i, env, k):
        """Evaluate `jaxpr` on `duals`, bind its outputs to eqns[i]'s outputs, and go on after it."""

        def back(sub_env, s, interp):
            outer = dict(env)
            for v, atom in zip(eqns[i].outvars, jaxpr.outvars):
                outer[v] = interp.read(sub_env, atom)
            return interp.run(eqns, i + 1, outer, s, k)

        return self.run(jaxpr.eqns, 0, _bind(jaxpr, consts, duals), state, back)

    def body(self, closed, scope):
        """A function (duals, state) -> (out duals, state) evaluating a sub-jaxpr locally."""
        inner = Interpreter(self.primal_only, scope)
        jaxpr = closed.jaxpr

        def f(duals, state):
            env = _bind(jaxpr, closed.consts, duals)
            return inner.run(jaxpr.eqns, 0, env, state, lambda e, s, _: ([inner.read(e, v) for v in jaxpr.outvars], s))

        return f

    def scan(self, eqn, duals, state):
        p = eqn.params
        nc, nk = p["num_consts"], p["num_carry"]
        consts, init, xs = duals[:nc], duals[nc : nc + nk], duals[nc + nk :]
        body = self.body(p["jaxpr"], "scan")
        xs_p, xs_t = [x for x, _ in xs], [t for _, t in xs]

        def make_step(has):
            def step(carry, x):
                (values, tangents), s = carry
                outs, s = body(consts + list(zip(values, tangents)) + list(zip(*x)), s)
                new_tangents = [_instantiate(o, h) for o, h in zip(outs[:nk], has)]
                return (([o for o, _ in outs[:nk]], new_tangents), s), outs[nk:]

            return step

        # A carry needs a tangent if its initial value has one or the body gives it one.
        has = [t is not None for _, t in init]
        x_slice = ([_row(x) for x in xs_p], [None if t is None else _row(t) for t in xs_t])
        for _ in range(nk + 1):
            carry0 = (([v for v, _ in init], [_instantiate(d, h) for d, h in zip(init, has)]), state)
            out_t = jax.eval_shape(
                lambda c, x: body(consts + list(zip(*c[0])) + list(zip(*x)), c[1])[0], carry0, x_slice
            )
            grown = [h or t is not None for h, (_, t) in zip(has, out_t[:nk])]
            if grown == has:
                break
            has = grown
        ((final, final_t), state), ys = lax.scan(
            make_step(has), carry0, (xs_p, xs_t), length=p["length"], reverse=p["reverse"]
        )
        return list(zip(final, final_t)) + list(ys), state

    def cond(self, eqn, duals, state):
        index, ops = duals[0][0], duals[1:]
        fns = [self.body(br, "cond") for br in eqn.params["branches"]]
        shapes = [jax.eval_shape(f, ops, state)[0] for f in fns]
        has_t = [any(s[j][1] is not None for s in shapes) for j in range(len(shapes[0]))]

        def padded(f):
            def g(ops, s):
                outs, s = f(ops, s)
                return [(o, _instantiate((o, t), h)) for (o, t), h in zip(outs, has_t)], s

            return g

        outs, state = lax.switch(index, [padded(f) for f in fns], ops, state)
        return [(o, t if h else None) for (o, t), h in zip(outs, has_t)], state

    def scan_unrolled(self, eqns, i, eqn, duals, env, state, k):
        """A top-level scan whose body holds non-local sites, unrolled (at most UNROLL_LIMIT
        iterations) so that each iteration's continuation is the later iterations and the rest."""
        p = eqn.params
        nc, nk, length, body = p["num_consts"], p["num_carry"], p["length"], p["jaxpr"]
        if length > UNROLL_LIMIT:
            names = ", ".join(f"'{format_address(a)}'" for a in site_avals(body.jaxpr))
            raise NotImplementedError(
                f"a scan of length {length} holds sites ({names}) whose estimators need the rest of the "
                f"program; such scans are unrolled up to length {UNROLL_LIMIT}: use reparam/reinforce there"
            )
        consts, init, xs = duals[:nc], duals[nc : nc + nk], duals[nc + nk :]
        order = list(range(length))[::-1] if p["reverse"] else list(range(length))

        def iteration(n, carry, ys, s, interp):
            if n == length:
                ys = [ys[t] for t in range(length)]
                outer = dict(env)
                for v, d in zip(eqns[i].outvars, carry + [_stack(col) for col in zip(*ys)]):
                    outer[v] = d
                return interp.run(eqns, i + 1, outer, s, k)
            t = order[n]
            x_t = [(x[t], None if tx is None else tx[t]) for x, tx in xs]

            def back(benv, s2, interp2):
                outs = [interp2.read(benv, a) for a in body.jaxpr.outvars]
                return iteration(n + 1, outs[:nk], {**ys, t: outs[nk:]}, s2, interp2)

            return interp.run(body.jaxpr.eqns, 0, _bind(body.jaxpr, body.consts, consts + carry + x_t), s, back)

        return iteration(0, init, {}, state, self)

    def cond_with_continuation(self, eqns, i, eqn, duals, env, state, k):
        index, ops = duals[0][0], duals[1:]

        def branch(closed):
            return lambda ops, s: self.then_continue(closed.jaxpr, closed.consts, ops, s, eqns, i, env, k)

        return lax.switch(index, [branch(br) for br in eqn.params["branches"]], ops, state)


UNROLL_LIMIT = 32


def _stack(duals):
    """One dual of stacked values (zeros stand in for absent tangents when some are present)."""
    primal = jnp.stack([p for p, _ in duals])
    if all(t is None for _, t in duals):
        return primal, None
    return primal, jnp.stack([jnp.zeros_like(p) if t is None else t for p, t in duals])


def _bind(jaxpr, consts, duals):
    """An environment binding a jaxpr's constants (without tangents) and inputs (duals)."""
    env = {v: (c, None) for v, c in zip(jaxpr.constvars, consts)}
    env.update(zip(jaxpr.invars, duals))
    return env


def _row(x):
    return jax.ShapeDtypeStruct(jnp.shape(x)[1:], jnp.result_type(x))


def _instantiate(dual, needed):
    value, tangent = dual
    if not needed:
        return None
    return tangent if tangent is not None else jnp.zeros_like(value)


def _has_nonlocal_site(eqn):
    for sub in compat.sub_jaxprs(eqn.params):
        for e in sub.eqns:
            if e.primitive is sample_p:
                est = _static_estimator(e)
                if est is not None and not est.local:
                    return True
            elif eqn_contains_sample(e) and _has_nonlocal_site(e):
                return True
    return False


def _static_estimator(eqn):
    """The estimator of a site, read from its treedef (estimators with array leaves get zeros)."""
    est_def = eqn.params["treedef"].children()[1]
    return jax.tree_util.tree_unflatten(est_def, [0.0] * est_def.num_leaves)


def _primal_k(k):
    """Continuation end for primal-only forks: the final primal value."""

    def finish(env, state, interp):
        return k(env, state, interp)[0]

    return finish


def finish(out_var):
    """The top-level end of the program: its value, with pending REINFORCE terms resolved."""

    def k(env, state, interp):
        value, tangent = interp.read(env, out_var)
        if state.score is None:
            return value, None
        tangent = jnp.zeros_like(value) if tangent is None else tangent
        return value, tangent + value * state.score - state.baseline

    return k


def dual_estimate(closed, key, args, tangents):
    """(value, tangent) of one unbiased estimate of the program's expectation and its derivative
    along `tangents` (a list aligned with `args`, None where there is no tangent)."""
    jaxpr = closed.jaxpr
    env = _bind(jaxpr, closed.consts, list(zip(args, tangents)))
    dtype = jaxpr.outvars[0].aval.dtype
    zero = jnp.zeros((), dtype) if any(t is not None for t in tangents) else None
    interp = Interpreter(primal_only=False)
    return interp.run(jaxpr.eqns, 0, env, State(key, zero, zero), finish(jaxpr.outvars[0]))


def check_objective(closed):
    """Raise unless the program returns one real scalar."""
    avals = [v.aval for v in closed.jaxpr.outvars]
    if len(avals) != 1 or avals[0].shape != () or not jnp.issubdtype(avals[0].dtype, jnp.floating):
        shown = ", ".join(f"{a.dtype}{list(a.shape)}" for a in avals)
        raise TypeError(f"an expectation must return one real scalar; this program returns ({shown})")


def estimator_fn(closed):
    """`f(key, *flat_args)`: an estimate of the expectation whose JAX derivative (forward or
    reverse) is the ADEV gradient estimate for the same key."""

    @jax.custom_jvp
    def f(key, *args):
        value, _ = dual_estimate(closed, key, list(args), [None] * len(args))
        return value

    @f.defjvp
    def f_jvp(primals, tangents):
        key, *args = primals
        _, *arg_tangents = tangents
        arg_tangents = [
            None if isinstance(t, jax.custom_derivatives.SymbolicZero) or not compat.has_tangent_space(a) else t
            for a, t in zip(args, arg_tangents)
        ]
        value, tangent = dual_estimate(closed, key, args, arg_tangents)
        return value, jnp.zeros_like(value) if tangent is None else tangent

    f.defjvp(f_jvp, symbolic_zeros=True)
    return f
