"""ADEV: turn a staged objective program into unbiased estimators of its expected value and of
the gradient of that expectation.

The program is interpreted forward over dual numbers (primal, tangent-or-None). Ordinary equations
are evaluated with `jax.jvp`; at each `sample_p` site the site's estimator rule receives the
*continuation*, the rest of the program, which it may run once (reparam, REINFORCE), over every
value of the support (enumeration), or on forked values (MVD, leave-one-out baselines). The tangent
of the result is linear in the input tangents, so `value_and_grad` wraps the forward estimator in a
`jax.custom_jvp` and JAX's reverse mode transposes it.

Exact enumeration runs the rest of the program once over all *worlds* (combinations of enumerated
values), as Pyro's parallel enumeration does: the i-th enumerated site on a path owns world axis i,
a value carries leading world axes (size 1 along the sites it does not depend on), each equation is
evaluated under one `jax.vmap` over the worlds its operands vary over, and results are weighted by
each world's probability and summed when the rest of the program returns. Code size is therefore
linear in the number of enumerated sites (nested `vmap`s would add a broadcast per level to every
equation below them), and each value is computed only for the worlds it depends on.

Randomness: the key is split at every site, so no two sites share noise; forked continuations and
worlds share the key (common random numbers), which keeps each estimate unbiased.

Control flow: sites inside `jit`/`checkpoint` bodies are inlined; inside `scan` and `cond` bodies
the rules must be local (reparam, REINFORCE with a constant or learned baseline); a `cond` whose
branches hold non-local sites at top level gets the continuation pushed into each branch.
"""

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from transforms import compat, estimators, plate_sums
from transforms.interpreter import live_eqns, site_avals, unsupported
from transforms.primitives import Site, eqn_contains_sample, format_address, sample_p, typed_key


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Dual:
    """A value with its tangent (None: no tangent). Both start with one axis per world axis the
    value varies over: `worlds` lists them as (axis, size) pairs, in order (axis i belongs to the
    i-th enumerated site on the path)."""

    primal: object
    tangent: object = None
    worlds: tuple = dataclasses.field(default=(), metadata={"static": True})


class State(NamedTuple):
    key: object
    score: object  # tangent of the summed REINFORCE scores (None in primal-only mode), per world
    baseline: object  # tangent of the summed baseline * score terms, per world


class DualSite(Site):
    """A site whose distribution parameters are dual numbers (of one world)."""

    def __init__(self, eqn, duals):
        super().__init__(eqn.params["address"], tuple(d.primal for d in duals), eqn.params)
        object.__setattr__(self, "tangents", tuple(d.tangent for d in duals))

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


class _Record:
    """A continuation that returns the arguments it is called with: a local rule (which calls its
    continuation once and returns what it returns) evaluated per world under `vmap`."""

    def __call__(self, value, value_tangent=None, score=None, baseline=None):
        return value, value_tangent, score, baseline


class Interpreter:
    """Dual interpreter; `primal_only` evaluates without tangents (every site just samples);
    `scope` names the enclosing scan/cond body where only local rules may run (None at top);
    `worlds` holds the support sizes of the enumerated sites on the path so far (world axes
    `base`, `base + 1`, ...); the world axes before `base` are fixed at `coords` (see `per_world_rule`).
    `collapse` maps equations (by id) that sum a plate's enumerated elements to the site's
    probabilities (see `split_plate`); `top` is the program's top-level equations and output."""

    def __init__(self, primal_only=False, scope=None, worlds=(), base=0, coords=None, collapse=None, top=None):
        self.primal_only, self.scope, self.worlds = primal_only, scope, worlds
        self.base, self.coords = base, coords or {}
        self.collapse, self.top = collapse or {}, top

    def derived(self, **changes):
        """An interpreter like this one with some of primal_only, scope, worlds and collapse changed."""
        fields = {"primal_only": self.primal_only, "scope": self.scope, "worlds": self.worlds, **changes}
        fields.setdefault("collapse", self.collapse)
        return Interpreter(**fields, base=self.base, coords=self.coords, top=self.top)

    def run(self, eqns, i, env, state, k):
        """Evaluate eqns[i:] then call k(env, state, interpreter); returns what k (or a rule)
        returns: (value, tangent) in every world (world axes first). Continuations take
        the interpreter that reaches them, so a primal-only fork that leaves a sub-program (a jit
        body, a cond branch, an unrolled scan step) stays primal-only, and worlds opened by an
        enumerated site inside a sub-program carry on after it."""
        while i < len(eqns):
            eqn = eqns[i]
            duals = [self.read(env, v) for v in eqn.invars]
            if eqn.primitive is sample_p:
                return self.site(eqns, i, eqn, duals, env, state, k)
            if not eqn_contains_sample(eqn):
                for q, dims in self.collapse.get(id(eqn), ()):
                    duals = [_expected(duals[0], q, dims)] + duals[1:]
                outs = self.jvp_eqn(eqn, duals)
            elif eqn.primitive.name in compat.INLINE_CALLS:
                return self.inline(eqns, i, eqn, duals, env, state, k)
            elif eqn.primitive.name == "scan":
                if self.scope is None and not self.primal_only and _has_nonlocal_site(eqn):
                    return self.scan_unrolled(eqns, i, eqn, duals, env, state, k)
                outs, state = self.local_body(self.scan, eqn, duals, state)
            elif eqn.primitive.name == "cond":
                if self.scope is None and not self.primal_only and _has_nonlocal_site(eqn):
                    return self.cond_with_continuation(eqns, i, eqn, duals, env, state, k)
                outs, state = self.local_body(self.cond, eqn, duals, state)
            else:
                raise unsupported(eqn, " in an expectation")
            env = dict(env)
            for v, d in zip(eqn.outvars, outs):
                env[v] = d
            i += 1
        return k(env, state, self)

    def read(self, env, atom):
        if isinstance(atom, compat.Literal):
            return Dual(atom.val)
        return self.fix(env[atom])

    def fix(self, d):
        """`d` at this interpreter's fixed world coordinates (without those world axes)."""
        fixed = [axis for axis, _ in d.worlds if axis < self.base]
        if not fixed:
            return d
        at = tuple(self.coords[axis] for axis in fixed)
        return Dual(d.primal[at], None if d.tangent is None else d.tangent[at], d.worlds[len(fixed) :])

    def jvp_eqn(self, eqn, duals):
        if compat.is_elementwise(eqn.primitive) and any(d.worlds for d in duals):
            wanted = _world_axes(duals)
            outs = self._jvp_one_world(eqn, [_broadcast_to_worlds(d, wanted, eqn.outvars[0].aval.shape) for d in duals])
            return [dataclasses.replace(o, worlds=wanted) for o in outs]
        return _per_world(duals, lambda ds: self._jvp_one_world(eqn, ds))

    def _jvp_one_world(self, eqn, duals):
        primals = [d.primal for d in duals]
        active = [j for j, d in enumerate(duals) if d.tangent is not None]
        if self.primal_only or not active:
            return [Dual(o) for o in compat.bind_eqn(eqn, primals)]

        def at(*xs):
            vals = list(primals)
            for j, x in zip(active, xs):
                vals[j] = x
            return compat.bind_eqn(eqn, vals)

        outs, tangents = jax.jvp(at, [primals[j] for j in active], [duals[j].tangent for j in active])
        return [Dual(o, t if compat.has_tangent_space(o) else None) for o, t in zip(outs, tangents)]

    def local_body(self, method, eqn, duals, state):
        """`method(eqn, duals, state)` (a scan or cond evaluated in place) for every world."""
        rank = len(self.worlds)
        if rank == 0:
            return method(eqn, duals, state)
        fields = [f for f in ("score", "baseline") if getattr(state, f) is not None]
        axes = lambda x: tuple((self.base + j, size) for j, size in enumerate(x.shape[:rank]))
        pending = [Dual(getattr(state, f), None, axes(getattr(state, f))) for f in fields]

        def one_world(ds):
            s = state._replace(**{f: d.primal for f, d in zip(fields, ds[len(duals) :])})
            outs, s = method(eqn, ds[: len(duals)], s)
            return (outs, [Dual(getattr(s, f)) for f in fields]), s.key

        (outs, pending), key = _per_world(duals + pending, one_world, shared=True)
        dense = {f: _dense(d.primal, d.worlds, rank, self.base) for f, d in zip(fields, pending)}
        return outs, state._replace(key=key, **dense)

    # -- sample sites -------------------------------------------------------------------------

    def site(self, eqns, i, eqn, duals, env, state, k):
        worlds = _world_axes(duals)
        first = DualSite(eqn, [_first_world(d) for d in duals])
        out = eqn.outvars[0]
        estimator = None if first.observed or self.primal_only else self.estimator(first)
        if estimator is not None and estimator.splits(first):
            return self.split(eqns, i, eqn, first, duals, worlds, estimator, env, state, k)
        if isinstance(estimator, estimators.Enum) and not worlds and self.top is not None:
            top_eqns, out_var = self.top
            points = eqns is top_eqns and plate_sums.collapse_points(
                eqns, i + 1, eqn.outvars[0], first.value_shape, out_var
            )
            if points:
                return self.split_plate(eqns, i, eqn, first, estimator, points, env, state, k)
        key, site_key = (state.key, None) if first.observed else jax.random.split(state.key)

        def go(value, value_tangent=None, score=None, baseline=None, value_worlds=()):
            rank = len(self.worlds)
            s = state._replace(
                key=key,
                score=_add(state.score, _dense(score, value_worlds, rank, self.base)),
                baseline=_add(state.baseline, _dense(baseline, value_worlds, rank, self.base)),
            )
            return self.run(eqns, i + 1, {**env, out: Dual(value, value_tangent, value_worlds)}, s, k)

        if first.observed:
            return go(*_per_world(duals, lambda ds: _observed(DualSite(eqn, ds))), value_worlds=worlds)
        if self.primal_only:
            return go(_per_world(duals, lambda ds: DualSite(eqn, ds).sample(site_key)), value_worlds=worlds)
        if self.worlds and not estimator.local:
            return self.per_world_rule(eqns, i, eqn, duals, env, state, k)
        if worlds:
            recorded = _per_world(duals, lambda ds: estimator.rule(DualSite(eqn, ds), site_key, _Record()))
            return go(*recorded, value_worlds=worlds)

        def go_primal(value):
            side = self.derived(primal_only=True)
            s = State(key, None, None)
            return side.run(eqns, i + 1, {**env, out: Dual(value)}, s, _primal_k(k))

        return estimator.rule(first, site_key, Cont(go, go_primal))

    def estimator(self, site):
        """The site's estimator, checked against its distribution and this interpreter's scope."""
        estimator = estimators.resolve(site.estimator, site.distribution)
        estimator.check(site.distribution, site.address)
        if not estimator.local and self.scope is not None:
            raise NotImplementedError(
                f"estimator {estimator!r} at '{site.name}' needs the rest of the program, which it cannot "
                f"reach from inside a {self.scope} body (a lax.scan, a cond inside one, or a jax.vmap of a "
                "lax.cond whose predicate is batched, which runs as a loop); use a local estimator there "
                "(reparam, reinforce)"
            )
        return estimator

    def split(self, eqns, i, eqn, first, duals, worlds, estimator, env, state, k):
        """Exact enumeration: the site gets the next world axis, one world per support value, and
        the rest of the program runs once over all worlds (each world's pending REINFORCE terms are
        its parent's). Each world's result is then combined with its probability p:
        value sum_v p(v) f(v), tangent sum_v p(v) f'(v) + dp(v) f(v)."""
        rank = len(self.worlds)
        values = estimator.support(first)
        p, dp = _per_world(duals, lambda ds: estimator.probs(DualSite(eqn, ds), values))
        m = values.shape[0]
        axis = self.base + rank
        as_child = lambda x: _dense(x, worlds + ((axis, m),), rank + 1, self.base)  # the support axis is `axis`
        grow = lambda x: None if x is None else x.reshape(x.shape[:rank] + (1,) + x.shape[rank:])
        state = state._replace(score=grow(state.score), baseline=grow(state.baseline))
        children = self.derived(worlds=self.worlds + (m,))
        value = Dual(values, None, ((axis, m),))
        primals, tangents = children.run(eqns, i + 1, {**env, eqn.outvars[0]: value}, state, k)
        p, dp = as_child(p), as_child(dp)
        tangent = _add(None if tangents is None else p * tangents, None if dp is None else dp * primals)
        tangent = None if tangent is None else jnp.sum(tangent, rank)
        return jnp.sum(p * primals, rank), tangent

    def split_plate(self, eqns, i, eqn, first, estimator, points, env, state, k):
        """Exact enumeration of a site with several coordinates whose continuation is additive
        over them (`transforms.plate_sums`): one world axis whose world v holds every coordinate
        at v, read coordinate by coordinate; at each equation that sums the coordinates' terms,
        each term is first weighted by its coordinate's probability of v and the axis summed out
        (E_q[sum_e f_e(z_e)] = sum_e sum_v q_e(v) f_e(v)), so the result does not vary over the axis."""
        values = estimator.support(first)  # (m,) + value shape: every coordinate at each value
        m = values.shape[0]
        probs = lambda ls: jnp.exp(jax.vmap(lambda v: first.log_prob_elements(v, ls))(values))
        p, dp = first.jvp_leaves(probs)
        rank = len(self.worlds)
        worlds = ((self.base + rank, m),)
        q = Dual(p, dp, worlds)
        collapse = dict(self.collapse)
        for e, dims in points.items():  # a sum may run over the coordinates of several such sites
            collapse[e] = collapse.get(e, ()) + ((q, dims),)
        children = self.derived(worlds=self.worlds + (m,), collapse=collapse)
        key, _ = jax.random.split(state.key)
        grow = lambda x: None if x is None else jnp.expand_dims(x, rank)
        state = state._replace(key=key, score=grow(state.score), baseline=grow(state.baseline))
        primals, tangents = children.run(eqns, i + 1, {**env, eqn.outvars[0]: Dual(values, None, worlds)}, state, k)
        first_world = lambda x: None if x is None else jnp.take(x, 0, axis=rank)  # the same in every world
        return first_world(primals), first_world(tangents)

    def per_world_rule(self, eqns, i, eqn, duals, env, state, k):
        """A forking rule (MVD, leave-one-out, enumeration of a batched site) after an exactly
        enumerated site: run it, and the rest of the program, once per world under `vmap` over the
        world index, with every world-dependent value read at that world's coordinates."""
        end = self.base + len(self.worlds)

        def one(world):
            coords = dict(zip(range(self.base, end), jnp.unravel_index(world, self.worlds)))
            inner = Interpreter(self.primal_only, self.scope, (), end, {**self.coords, **coords}, self.collapse)
            at = tuple(coords.values())
            fixed = state._replace(**{f: None if x is None else x[at] for f, x in zip(State._fields[1:], state[1:])})
            return inner.site(eqns, i, eqn, [inner.fix(d) for d in duals], env, fixed, k)

        results = jax.vmap(one)(jnp.arange(math.prod(self.worlds)))
        return tuple(None if r is None else r.reshape(self.worlds) for r in results)

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

        return self.run(live_eqns(jaxpr), 0, _bind(jaxpr, consts, duals), state, back)

    def body(self, closed, scope):
        """A function (duals, state) -> (out duals, state) evaluating a sub-jaxpr locally."""
        inner = self.derived(scope=scope, worlds=())
        jaxpr = closed.jaxpr

        def f(duals, state):
            env = _bind(jaxpr, closed.consts, duals)
            outputs = lambda e, s, _: ([inner.read(e, v) for v in jaxpr.outvars], s)
            return inner.run(live_eqns(jaxpr), 0, env, state, outputs)

        return f

    def scan(self, eqn, duals, state):
        p = eqn.params
        nc, nk = p["num_consts"], p["num_carry"]
        consts, init, xs = duals[:nc], duals[nc : nc + nk], duals[nc + nk :]
        body = self.body(p["jaxpr"], "scan")
        xs_p, xs_t = [x.primal for x in xs], [x.tangent for x in xs]
        rows = lambda ps, ts: [Dual(x, t) for x, t in zip(ps, ts)]

        def make_step(has):
            def step(carry, x):
                (values, tangents), s = carry
                outs, s = body(consts + rows(values, tangents) + rows(*x), s)
                new_tangents = [_instantiate(o, h) for o, h in zip(outs[:nk], has)]
                return (([o.primal for o in outs[:nk]], new_tangents), s), [(o.primal, o.tangent) for o in outs[nk:]]

            return step

        # A carry needs a tangent if its initial value has one or the body gives it one.
        has = [d.tangent is not None for d in init]
        x_slice = ([_row(x) for x in xs_p], [None if t is None else _row(t) for t in xs_t])
        for _ in range(nk + 1):
            carry0 = (([d.primal for d in init], [_instantiate(d, h) for d, h in zip(init, has)]), state)
            out_t = jax.eval_shape(lambda c, x: body(consts + rows(*c[0]) + rows(*x), c[1])[0], carry0, x_slice)
            grown = [h or o.tangent is not None for h, o in zip(has, out_t[:nk])]
            if grown == has:
                break
            has = grown
        ((final, final_t), state), ys = lax.scan(
            make_step(has), carry0, (xs_p, xs_t), length=p["length"], reverse=p["reverse"]
        )
        return rows(final, final_t) + [Dual(y, t) for y, t in ys], state

    def cond(self, eqn, duals, state):
        index, ops = duals[0].primal, duals[1:]
        fns = [self.body(br, "cond") for br in eqn.params["branches"]]
        shapes = [jax.eval_shape(f, ops, state)[0] for f in fns]
        has_t = [any(s[j].tangent is not None for s in shapes) for j in range(len(shapes[0]))]

        def padded(f):
            def g(ops, s):
                outs, s = f(ops, s)
                return [Dual(o.primal, _instantiate(o, h)) for o, h in zip(outs, has_t)], s

            return g

        outs, state = lax.switch(index, [padded(f) for f in fns], ops, state)
        return [Dual(o.primal, o.tangent if h else None) for o, h in zip(outs, has_t)], state

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
        body_eqns = live_eqns(body.jaxpr)

        def iteration(n, carry, ys, s, interp):
            if n == length:
                ys = [ys[t] for t in range(length)]
                outer = dict(env)
                for v, d in zip(eqns[i].outvars, carry + [_stack(col) for col in zip(*ys)]):
                    outer[v] = d
                return interp.run(eqns, i + 1, outer, s, k)
            t = order[n]
            x_t = [_index(x, t) for x in xs]

            def back(benv, s2, interp2):
                outs = [interp2.read(benv, a) for a in body.jaxpr.outvars]
                return iteration(n + 1, outs[:nk], {**ys, t: outs[nk:]}, s2, interp2)

            return interp.run(body_eqns, 0, _bind(body.jaxpr, body.consts, consts + carry + x_t), s, back)

        return iteration(0, init, {}, state, self)

    def cond_with_continuation(self, eqns, i, eqn, duals, env, state, k):
        """A cond whose branches hold non-local sites, with the rest of the program pushed into each
        branch. When the branch index differs between enumeration worlds, every branch (with the
        rest of the program) runs over all worlds and each world keeps its own branch's result."""
        index, ops = duals[0], duals[1:]
        branches = [
            lambda ops, s, br=br: self.then_continue(br.jaxpr, br.consts, ops, s, eqns, i, env, k)
            for br in eqn.params["branches"]
        ]
        if not index.worlds:
            return lax.switch(index.primal, branches, ops, state)
        which = jnp.clip(_dense(index.primal, index.worlds, len(self.worlds), self.base), 0, len(branches) - 1)
        results = [b(ops, state) for b in branches]

        def select(*rs):
            shape = jnp.broadcast_shapes(which.shape, *(r.shape for r in rs))
            return lax.select_n(jnp.broadcast_to(which, shape), *(jnp.broadcast_to(r, shape) for r in rs))

        return jax.tree.map(select, *results)


UNROLL_LIMIT = 32


def _observed(site):
    """(value, tangent) of an observed site."""
    return site.jvp_leaves(site.observed_value)


def _expected(d, q, dims):
    """`d` (an operand of a sum over a plate's coordinates, at `dims` of its value) with each
    coordinate's term weighted by its probability in `q` (led by the plate site's world axis) and
    that axis summed out: sum_v q_e(v) d_e(v)."""
    ((axis, m),) = q.worlds
    rank = jnp.ndim(d.primal) - len(d.worlds)
    shape = [1] * rank
    for dim, size in zip(dims, q.primal.shape[1:]):
        shape[dim] = size
    weights = lambda x: (
        None if x is None else _align(x.reshape((m,) + tuple(shape)), q.worlds, [a for a, _ in d.worlds])
    )
    p, dp = weights(q.primal), weights(q.tangent)
    primal = d.primal * p
    tangent = _add(None if d.tangent is None else d.tangent * p, None if dp is None else d.primal * dp)
    at = [a for a, _ in d.worlds].index(axis)
    return Dual(
        jnp.sum(primal, at), None if tangent is None else jnp.sum(tangent, at), d.worlds[:at] + d.worlds[at + 1 :]
    )


def _add(a, b):
    return a if b is None else b if a is None else a + b


def _world_axes(duals):
    """The world axes the duals vary over together, as sorted (axis, size) pairs."""
    sizes = {}
    for d in duals:
        for axis, size in d.worlds:
            sizes[axis] = max(size, sizes.get(axis, 1))
    return tuple(sorted(sizes.items()))


def _align(x, worlds, axes):
    """`x`, led by the world axes `worlds`, reshaped to be led by `axes` (a superset; size 1 where
    `x` does not vary)."""
    have = dict(worlds)
    return x.reshape(tuple(have.get(axis, 1) for axis in axes) + x.shape[len(worlds) :])


def _expand(x, worlds, wanted):
    """`x`, led by the world axes `worlds`, led instead by the (more) world axes `wanted`."""
    if x is None or worlds == wanted:
        return x
    x = _align(jnp.asarray(x), worlds, [axis for axis, _ in wanted])
    return jnp.broadcast_to(x, tuple(size for _, size in wanted) + x.shape[len(wanted) :])


def _dense(x, worlds, rank, base=0):
    """`x`, led by the world axes `worlds`, led instead by all `rank` world axes from `base` on
    (size 1 where it does not vary)."""
    return None if x is None else _align(jnp.asarray(x), worlds, range(base, base + rank))


def _broadcast_to_worlds(d, wanted, shape):
    """The operand `d` of an elementwise equation with output `shape`, broadcast to be led by the
    world axes `wanted` (rank-0 operands without worlds are left to the primitive's broadcasting)."""
    if not d.worlds and jnp.ndim(d.primal) == 0:
        return d
    full = tuple(size for _, size in wanted) + tuple(shape)

    def widen(x):
        if x is None:
            return None
        x = _align(jnp.asarray(x), d.worlds, [axis for axis, _ in wanted])
        own = x.shape[len(wanted) :]
        x = x.reshape(x.shape[: len(wanted)] + (1,) * (len(shape) - len(own)) + own)
        return jnp.broadcast_to(x, full)

    return Dual(widen(d.primal), widen(d.tangent))


def _first_world(d):
    at = (0,) * len(d.worlds)
    return Dual(d.primal[at], None if d.tangent is None else d.tangent[at]) if at else d


def _per_world(duals, fn, shared=False, evaluate=None):
    """`fn(duals)` for one world, evaluated under one `vmap` over the worlds the duals vary over
    (duals that vary over fewer are broadcast, those that vary over none are shared). Duals and
    arrays in the result get those world axes in front; with `shared`, `fn` returns (per-world
    result, a result shared by all worlds). `evaluate(vmapped, args)` replaces the call
    `vmapped(args)` (e.g. `folding.evaluate_folded`)."""
    wanted = _world_axes(duals)
    if not wanted:
        return fn(duals)
    sizes = tuple(size for _, size in wanted)
    n = math.prod(sizes)

    def flat(x, d):
        x = _expand(x, d.worlds, wanted)
        return x if x is None or len(sizes) == 1 else x.reshape((n,) + x.shape[len(sizes) :])

    ops = [Dual(flat(d.primal, d), flat(d.tangent, d)) if d.worlds else d for d in duals]
    axes = [0 if d.worlds else None for d in duals]
    vmapped = jax.vmap(fn, in_axes=(axes,), out_axes=(0, None) if shared else 0)
    out = vmapped(ops) if evaluate is None else evaluate(vmapped, ops)
    per_world, rest = out if shared else (out, None)
    unflat = lambda x: x if len(sizes) == 1 else x.reshape(sizes + x.shape[1:])
    tagged = jax.tree.map(
        lambda x: (
            Dual(unflat(x.primal), None if x.tangent is None else unflat(x.tangent), wanted)
            if isinstance(x, Dual)
            else unflat(x)
        ),
        per_world,
        is_leaf=lambda x: isinstance(x, Dual),
    )
    return (tagged, rest) if shared else tagged


def _index(x, t):
    """Row t of a scanned-over dual (after its world axes)."""
    at = (slice(None),) * len(x.worlds) + (t,)
    return Dual(x.primal[at], None if x.tangent is None else x.tangent[at], x.worlds)


def _stack(duals):
    """One dual of stacked values, after their (broadcast) world axes; zeros stand in for absent
    tangents when some are present."""
    wanted = _world_axes(duals)
    primal = jnp.stack([_expand(d.primal, d.worlds, wanted) for d in duals], len(wanted))
    if all(d.tangent is None for d in duals):
        return Dual(primal, None, wanted)
    tangents = [jnp.zeros_like(d.primal) if d.tangent is None else d.tangent for d in duals]
    return Dual(primal, jnp.stack([_expand(t, d.worlds, wanted) for t, d in zip(tangents, duals)], len(wanted)), wanted)


def _bind(jaxpr, consts, duals):
    """An environment binding a jaxpr's constants (without tangents) and inputs (duals)."""
    env = {v: Dual(c) for v, c in zip(jaxpr.constvars, consts)}
    env.update(zip(jaxpr.invars, duals))
    return env


def _row(x):
    return jax.ShapeDtypeStruct(jnp.shape(x)[1:], jnp.result_type(x))


def _instantiate(dual, needed):
    if not needed:
        return None
    return dual.tangent if dual.tangent is not None else jnp.zeros_like(dual.primal)


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
    """The top-level end of the program: its value in every world, with pending REINFORCE terms
    resolved."""

    def k(env, state, interp):
        d = interp.read(env, out_var)
        rank = len(interp.worlds)
        value = _dense(d.primal, d.worlds, rank, interp.base)
        if state.score is None:
            return value, None
        tangent = jnp.zeros_like(value) if d.tangent is None else _dense(d.tangent, d.worlds, rank, interp.base)
        return value, tangent + value * state.score - state.baseline

    return k


def dual_estimate(closed, key, args, tangents):
    """(value, tangent) of one unbiased estimate of the program's expectation and its derivative
    along `tangents` (a list aligned with `args`, None where there is no tangent)."""
    jaxpr, key = closed.jaxpr, typed_key(key)
    env = _bind(jaxpr, closed.consts, [Dual(a, t) for a, t in zip(args, tangents)])
    dtype = jaxpr.outvars[0].aval.dtype
    zero = jnp.zeros((), dtype) if any(t is not None for t in tangents) else None
    eqns = live_eqns(jaxpr)
    interp = Interpreter(primal_only=False, top=(eqns, jaxpr.outvars[0]))
    return interp.run(eqns, 0, env, State(key, zero, zero), finish(jaxpr.outvars[0]))


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
