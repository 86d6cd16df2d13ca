"""Exact marginalization: sum the finite-support sites of a staged program out of its density.

    log_marginal(closed, args, given)            -> log sum_u p(given, u)
    log_marginal(closed, args, given, MAX)       -> log max_u p(given, u)
    posterior(closed, args, given[, MAX])        -> {address: marginals (or the most probable values)}
    sample(closed, args, given, key)             -> {address: a draw from p(u | given)}

Every site whose value is neither given nor observed is summed out (it must have a finite
support). The program is evaluated once over all *worlds*, as in `transforms.adev`: a summed-out
site opens a world axis holding its support, and values computed from it carry that axis. Each
site contributes a log-density *factor* over the world axes it depends on; variable elimination
then sums the factors out:

- A site with one coordinate gets an ordinary world axis; the factors over these axes are summed
  out jointly at the end (cost: the product of their support sizes).
- A site with several independent coordinates (under `jax.vmap`, a `ppl.plate` or a plate
  context) gets one world axis *per element* (value v in world v, element by element), as Pyro's
  plates do: the factors that read it must have the same elements, and each element is summed out
  on its own, so the cost is linear in the plate size; nested plates are summed inside out
  (Pyro's tensor variable elimination). Like Pyro, this assumes the plate's
  elements are conditionally independent: a factor whose elements differ from the plate's is
  refused, but one that reads another element's value (a reversed or rolled copy) cannot be told
  from one that does not.
- A `lax.scan` whose body holds summed-out sites is a Markov chain: its state is the joint value
  of the body's summed-out sites, and the forward algorithm (Rabiner, 1989) sums it out in
  O(T S^2) time inside one `lax.scan` (compile time independent of T). When the carry is the
  state alone, every step's factors are computed at once, vectorized over the steps (those that
  do not depend on the step's inputs, a transition table, once), and only the forward recursion
  is sequential, as in a hand-written forward algorithm. The carry must depend on
  the previous step's summed-out values only through this step's sites (first-order Markov);
  anything else is refused, naming the addresses. A scan under `jax.vmap` (several sequences) runs
  one chain per element.

`offsets` ({address: array}) adds a term to each summed-out site's log factor (shape (K,) plus the
site's value shape, and a leading scan length inside a scan): the gradient of `log_marginal` with
respect to it is the posterior marginal of each value, and under the max semiring the indicator of
the most probable assignment (the Viterbi path): see `posterior`.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from transforms import compat, families
from transforms.adev import Dual, _expand, _world_axes
from transforms.adev import _per_world as _per_world_unfolded
from transforms.folding import evaluate_folded
from transforms.gfi import _conform, check_known
from transforms.interpreter import live_eqns, site_avals, unsupported
from transforms.primitives import Site, eqn_contains_sample, format_address, sample_p


class Semiring(NamedTuple):
    """How log factors combine over the values of a summed-out site: `sum(x, axes)`."""

    name: str
    sum: object


SUM = Semiring("sum", lambda x, axes: jax.nn.logsumexp(x, axis=axes))
MAX = Semiring("max", lambda x, axes: jnp.max(x, axis=axes))


class _Axis(NamedTuple):
    """A world axis: the summed-out site that owns it, its support size, and its elements (the
    site's independent coordinates, `()` for a site with one)."""

    address: tuple
    size: int
    elements: tuple


class _Factor(NamedTuple):
    """A log-density term: an array led by its world axes (`worlds`, (axis, size) pairs), then
    `elements`; `scale` multiplies it once its own world axes are summed out."""

    log_prob: object
    worlds: tuple
    elements: tuple
    scale: float
    address: tuple


class _Poisoned(NamedTuple):
    """A value that depends on summed-out sites in a way the elimination cannot follow (a scan's
    output that depends on its chain's state): an error if a site or a loop reads it."""

    addresses: tuple


def log_marginal(closed, args, given, semiring=SUM, offsets=None):
    """log sum (or max) over the values of every site not in `given` (flat {address: value}) and
    not observed, of the joint density of a staged program with flat arguments `args`."""
    check_known(closed, given, "the given values")
    elim = _Eliminator(given, semiring, offsets or {})
    elim.run(closed.jaxpr, closed.consts, [Dual(a) for a in args])
    return _eliminate(elim.factors, elim.axes, semiring)


class Summed(NamedTuple):
    """A summed-out site: the shape of its offsets ((scan length,) if in a scan, then its support
    size K, then its value's shape), where K sits in it, and its support values (K,)."""

    offset_shape: tuple
    support_axis: int
    support: object


def summed_sites(closed, args, given):
    """{address: Summed} for the sites `log_marginal` sums out (found by tracing abstractly)."""
    found = {}

    def probe(args):
        elim = _Eliminator(given, SUM, {})
        elim.run(closed.jaxpr, closed.consts, [Dual(a) for a in args])
        found.update(elim.summed)
        return jnp.zeros(())

    jax.eval_shape(probe, list(args))
    return found


def posterior(closed, args, given, semiring=SUM):
    """{address: array} for the summed-out sites: with SUM the posterior marginals given `given`
    (the site's value shape plus a last axis over its support values, in order), with MAX the
    values of the most probable joint assignment (the Viterbi path in a scan; ties broken
    arbitrarily). Both are gradients of `log_marginal` with respect to zero offsets."""
    sites = summed_sites(closed, args, given)
    zeros = {a: jnp.zeros(s.offset_shape, jnp.result_type(float)) for a, s in sites.items()}
    grads = jax.grad(lambda o: log_marginal(closed, args, given, semiring, o))(zeros)
    out = {}
    for address, s in sites.items():
        probs = jnp.moveaxis(grads[address], s.support_axis, -1)
        out[address] = probs if semiring is SUM else jnp.asarray(s.support)[jnp.argmax(probs, axis=-1)]
    return out


class _Eliminator:
    """Evaluates a jaxpr over worlds, collecting the factors of its sites (see module docstring)."""

    def __init__(self, given, semiring, offsets, record=False):
        self.given, self.semiring, self.offsets, self.record = given, semiring, offsets, record
        self.factors, self.axes = [], {}
        self.summed = {}  # {address: Summed}
        self.chains = []  # with `record`: a _ChainRecord per scan, for sampling

    def new_axis(self, address, size, elements):
        axis = len(self.axes)
        self.axes[axis] = _Axis(address, size, elements)
        return axis

    def run(self, jaxpr, consts, duals):
        with jax.ensure_compile_time_eval():  # what depends on the supports alone is computed now
            return self._run(jaxpr, consts, duals)

    def _run(self, jaxpr, consts, duals):
        env = {v: Dual(c) for v, c in zip(jaxpr.constvars, consts)}
        env.update(zip(jaxpr.invars, duals))
        for eqn in live_eqns(jaxpr):
            ins = [Dual(v.val) if isinstance(v, compat.Literal) else env[v] for v in eqn.invars]
            poisoned = [d for d in ins if isinstance(d, _Poisoned)]
            if poisoned and eqn_contains_sample(eqn):
                raise _poisoned_error(poisoned, eqn)
            if poisoned:
                outs = [_Poisoned(tuple(sorted({a for d in poisoned for a in d.addresses})))] * len(eqn.outvars)
            elif eqn.primitive is sample_p:
                outs = [self.site(eqn, ins)]
            elif not eqn_contains_sample(eqn):
                outs = _per_world(ins, lambda ds: [Dual(o) for o in compat.bind_eqn(eqn, [d.primal for d in ds])])
            elif eqn.primitive.name in compat.INLINE_CALLS:
                inner, inner_consts = compat.inline_jaxpr(eqn)
                outs = self._run(inner, inner_consts, ins)
            elif eqn.primitive.name == "scan":
                outs = self.scan(eqn, ins)
            else:
                raise unsupported(eqn, " in an exact marginal")
            env.update(zip(eqn.outvars, outs))
        return [Dual(v.val) if isinstance(v, compat.Literal) else env[v] for v in jaxpr.outvars]

    # -- sites --------------------------------------------------------------------------------

    def site(self, eqn, ins):
        address = eqn.params["address"]
        first = Site.from_eqn(eqn, [_first_world(d) for d in ins])
        if first.observed:
            value = _per_world(ins, lambda ds: Dual(Site.from_eqn(eqn, _primals(ds)).observed_value()))
            self.add_factor(eqn, ins, value, given=True)
            return value
        if address in self.given:
            value = Dual(_conform(first, self.given[address]))
            self.add_factor(eqn, ins, value, given=True)
            return value
        support = _support(first)
        size, elements = support.shape[0], first.value_shape
        axis = self.new_axis(address, size, elements)
        values = jnp.broadcast_to(support.reshape((size,) + (1,) * len(elements)), (size,) + elements)
        value = Dual(values, None, ((axis, size),))
        self.summed[address] = Summed((size,) + elements, 0, support)
        offset = self.offsets.get(address)
        if offset is not None:
            if jnp.shape(offset) != (size,) + elements:
                raise ValueError(
                    f"offset at '{first.name}' has shape {jnp.shape(offset)}, expected {(size,) + elements}"
                )
            offset = Dual(offset, None, ((axis, size),))
        self.add_factor(eqn, ins, value, given=False, offset=offset)
        return value

    def add_factor(self, eqn, ins, value, given, offset=None):
        extra = [] if offset is None else [offset]

        def one_world(ds):
            site = Site.from_eqn(eqn, _primals(ds[: len(ins)]))
            lp = site.log_prob_elements(ds[len(ins)].primal, given=given)
            return Dual(lp if offset is None else lp + ds[-1].primal)

        lp = _per_world(ins + [value] + extra, one_world)
        first = Site.from_eqn(eqn, [_first_world(d) for d in ins])
        elements = first.batch_shape + first.distribution.batch_shape
        self.factors.append(_Factor(lp.primal, lp.worlds, elements, first.scale, eqn.params["address"]))

    # -- scans: the forward algorithm ---------------------------------------------------------

    def scan(self, eqn, ins):
        p = eqn.params
        body, length = p["jaxpr"], p["length"]
        avals = site_avals(body.jaxpr)
        reads = {}
        for address in avals:
            if address in self.given:
                value = jnp.asarray(self.given[address])
                if jnp.ndim(value) == 0 or jnp.shape(value)[0] != length:
                    raise ValueError(
                        f"the value at '{format_address(address)}' is inside a scan of length {length}: it needs "
                        f"leading dimension {length}, got shape {jnp.shape(value)}"
                    )
                reads[address] = value
        offsets = {a: self.offsets[a] for a in avals if a in self.offsets}
        if any(self.axes[a].elements for d in ins for a, _ in d.worlds):
            raise NotImplementedError(
                f"the scan holding {_listed(avals)} reads a value summed out in a plate; exact sums of a "
                "plate's sites feeding a scan are not supported"
            )
        chain = _Chain(self, eqn, reads, offsets)
        structure = chain.structure()
        for address, s in structure.summed.items():
            self.summed[address] = Summed((length,) + s.offset_shape, s.support_axis + 1, s.support)

        def one_world(ds):
            log_z, outs, filtered = chain.forward(_primals(ds), structure, self.record)
            return Dual(log_z), [Dual(o) for o in outs], [Dual(f) for f in filtered]

        log_z, outs, filtered = _per_world(ins, one_world)
        self.factors.append(_Factor(log_z.primal, log_z.worlds, structure.elements, structure.scale, ("scan",)))
        if self.record:
            if set(structure.summed) != set(structure.addresses):
                raise NotImplementedError(f"sampling the sites of a scan inside a scan ({_listed(structure.summed)})")
            records = [f.primal for f in filtered]  # all led by the same world axes
            self.chains.append(_ChainRecord(structure, filtered[0].worlds, *records, p["reverse"]))
        outs = iter(outs)
        return [
            _Poisoned(structure.addresses) if i in structure.poisoned else next(outs) for i in range(len(eqn.outvars))
        ]


class _Structure(NamedTuple):
    """What one step of a chain looks like (found by tracing it): the carry positions that hold
    its state, the output positions that depend on the state, the number of states, the chain's
    elements (several independent chains under `vmap`), the body factors' common scale, the
    summed-out addresses and their `Summed` records (without the scan's length)."""

    state: frozenset
    poisoned: frozenset
    size: int
    elements: tuple
    scale: float
    addresses: tuple
    summed: dict
    sizes: tuple  # support sizes of the sites in `addresses` (the state is their joint value)


class _Chain:
    """A `lax.scan` with summed-out sites, as a Markov chain (see module docstring)."""

    PREVIOUS = ("<previous state>",)

    def __init__(self, outer, eqn, reads, offsets):
        self.outer, self.eqn, self.reads, self.offsets = outer, eqn, reads, offsets
        p = eqn.params
        self.body, self.nc, self.nk, self.length = p["jaxpr"], p["num_consts"], p["num_carry"], p["length"]

    def step(self, state_positions, size, elements, consts, carry, x):
        """One step for `size` previous states: (factors over (previous, this step's axes), the
        body's outputs, the eliminator)."""
        _, prev, free = carry
        xs, reads, offsets = x
        elim = _Eliminator(reads, self.outer.semiring, offsets)
        previous = elim.new_axis(self.PREVIOUS, size, elements)
        carry_duals = [
            Dual(prev[i], None, ((previous, size),)) if i in state_positions else Dual(free[i]) for i in range(self.nk)
        ]
        outs = elim.run(
            self.body.jaxpr, self.body.consts, [Dual(c) for c in consts] + carry_duals + [Dual(v) for v in xs]
        )
        return elim, previous, outs

    def structure(self):
        """Trace one step (abstractly) until the state's carry positions are a fixed point."""
        ins_avals = [v.aval for v in self.eqn.invars]
        consts = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in ins_avals[: self.nc]]
        carry = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in ins_avals[self.nc : self.nc + self.nk]]
        xs = [jax.ShapeDtypeStruct(a.shape[1:], a.dtype) for a in ins_avals[self.nc + self.nk :]]
        reads = {a: jax.ShapeDtypeStruct(jnp.shape(v)[1:], jnp.result_type(v)) for a, v in self.reads.items()}
        state, found = frozenset(), {}
        while True:

            def probe(consts, carry, xs, reads):
                prev = [c[None] for c in carry]
                elim, previous, outs = self.step(state, 1, (), consts, (None, prev, carry), (xs, reads, {}))
                found["elim"], found["previous"], found["outs"] = elim, previous, outs
                return jnp.zeros(())

            jax.eval_shape(probe, consts, carry, xs, reads)
            outs, elim = found["outs"], found["elim"]
            depends = {i for i, o in enumerate(outs) if isinstance(o, _Poisoned) or o.worlds}
            new_state = frozenset(i for i in depends if i < self.nk)
            if new_state <= state:
                break
            state = state | new_state
        axes = {a: ax for a, ax in elim.axes.items() if a != found["previous"]}
        addresses = tuple(ax.address for ax in axes.values())
        if not axes:
            elements = ()
        else:
            kinds = {ax.elements for ax in axes.values()}
            if len(kinds) > 1:
                raise NotImplementedError(
                    f"the scan's summed-out sites {_listed(addresses)} have different elements {sorted(kinds)}: "
                    "a chain's state must be one value, or one per element of a vmapped chain"
                )
            (elements,) = kinds
        scales = {f.scale for f in elim.factors}
        if len(scales) > 1:
            raise NotImplementedError(f"the sites of the scan holding {_listed(addresses)} have different scales")
        size = math.prod(ax.size for ax in axes.values())
        poisoned = frozenset(i for i in depends if i >= self.nk) | state
        scale = scales.pop() if scales else 1.0
        sizes = tuple(ax.size for ax in axes.values())
        return _Structure(state, poisoned, size, elements, scale, addresses, elim.summed, sizes)

    def table(self, structure, consts, prev, free, x):
        """One step without its alpha update: (its log factor table (S, S) + elements, over the
        previous state and this step's; the carry with the state positions replaced by this step's
        state values, (S,) + their shape each; the carry's free positions; the outputs that do not
        depend on the state)."""
        size, elements = structure.size, structure.elements
        elim, previous, outs = self.step(structure.state, size, elements, consts, (None, prev, free), x)
        axes = [(a, ax.size) for a, ax in elim.axes.items()]
        mine = [(a, n) for a, n in axes if a != previous]
        table = 0.0
        for f in elim.factors:
            table = table + _on_axes(f, elim.axes, axes, elements)
        table = jnp.broadcast_to(table, tuple(n for _, n in axes) + elements).reshape((size, size) + elements)
        prev, free, ys = list(prev), list(free), []
        for i, o in enumerate(outs):
            if i in structure.state:
                if any(a == previous for a, _ in o.worlds):
                    raise NotImplementedError(_non_markov(structure.addresses, i))
                dense = _expand(o.primal, o.worlds, mine)
                shape = tuple(n for _, n in mine) + jnp.shape(o.primal)[len(o.worlds) :]
                prev[i] = jnp.broadcast_to(dense, shape).reshape((size,) + shape[len(mine) :])
            elif i < self.nk:
                free[i] = o.primal
            elif i not in structure.poisoned:
                ys.append(o.primal)
        return table, prev, free, ys

    def forward(self, ins, structure, record=False):
        """(log of the chain's total (or max) weight, per element; the scan's outputs that do not
        depend on the state; with `record` the filtering record [each step's incoming log alpha
        (T, S) + elements, its table (T, S, S) + elements, the final log alpha], else []) for
        inputs without worlds. Without free carry positions every step's table is computed at
        once (`tables_at_once`) and only the alpha update is sequential, as in a hand-written
        forward algorithm; otherwise each step computes its table inside the scan."""
        consts, init, xs = ins[: self.nc], ins[self.nc : self.nc + self.nk], ins[self.nc + self.nk :]
        semiring, reverse = self.outer.semiring, self.eqn.params["reverse"]
        alpha = jnp.full((structure.size,) + structure.elements, -jnp.inf, jnp.result_type(float)).at[0].set(0.0)
        prev = [
            jnp.broadcast_to(c, (structure.size,) + jnp.shape(c)) if i in structure.state else c
            for i, c in enumerate(init)
        ]
        x = (xs, self.reads, self.offsets)

        def update(alpha, table):  # the next alpha, and with `record` the incoming one
            return semiring.sum(alpha[:, None] + table, 0), alpha if record else None

        if structure.state == frozenset(range(self.nk)) and self.length > 0:
            tables, ys = self.tables_at_once(structure, consts, prev, x)
            alpha, alphas = lax.scan(update, alpha, tables, length=self.length, reverse=reverse)
            free, filtered = [], [alphas, tables]
        else:

            def step(carry, x):
                alpha, prev, free = carry
                table, prev, free, ys = self.table(structure, consts, prev, free, x)
                alpha, incoming = update(alpha, table)
                return (alpha, prev, free), (ys, [incoming, table] if record else [])

            (alpha, _, free), (ys, filtered) = lax.scan(
                step, (alpha, prev, list(init)), x, length=self.length, reverse=reverse
            )
            free = [free[i] for i in range(self.nk) if i not in structure.state]
        return semiring.sum(alpha, 0), free + list(ys), filtered + [alpha] if record else []

    def tables_at_once(self, structure, consts, init, x):
        """Every step's table, (T, S, S) + elements, and outputs, under `jax.vmap` over the steps,
        for a chain whose carry is all state. A step's state values do not depend on the previous
        state (the Markov condition), so step t's table is found from the inputs of steps t and
        t - 1 alone (the first step's from the initial carry): what does not depend on the inputs
        (a transition table from the parameters) is computed once, not once per step."""
        step = lambda prev, x: self.table(structure, consts, prev, prev, x)  # all carry is state: no free positions
        given_before = lambda x_before, x: step(step(init, x_before)[1], x)
        at = lambda t: jax.tree.map(lambda a: a[t], x)
        reverse = self.eqn.params["reverse"]  # then the first step is the last, and each reads the one after it
        table, _, _, ys = step(init, at(-1 if reverse else 0))
        if self.length == 1:
            return table[None], [y[None] for y in ys]
        early, late = at(slice(None, -1)), at(slice(1, None))
        before, after = (late, early) if reverse else (early, late)
        tables, _, _, rest = jax.vmap(given_before, axis_size=self.length - 1)(before, after)
        join = lambda one, rest: jnp.concatenate([rest, one[None]] if reverse else [one[None], rest])
        return join(table, tables), [join(y, r) for y, r in zip(ys, rest)]


def _on_axes(factor, axes, wanted, elements):
    """A step factor led by the world axes `wanted` (all of the step's), then `elements` if it
    reads a per-element state, else summed over its own elements."""
    per_element = any(axes[a].elements for a, _ in factor.worlds)
    x = factor.log_prob
    if per_element:
        if factor.elements != elements:
            raise NotImplementedError(_mismatch(factor, elements))
    else:
        own = tuple(range(len(factor.worlds), x.ndim))
        x = jnp.sum(x, axis=own) if own else x
        x = x.reshape(x.shape + (1,) * len(elements))
    have = dict(factor.worlds)  # world axes are in creation order, as `wanted` is
    return x.reshape(tuple(have.get(a, 1) for a, _ in wanted) + x.shape[len(factor.worlds) :])


def _eliminate(factors, axes, semiring, tables=None):
    """Sum (or max) every world axis out of the factors; returns the log total. Plates go first,
    innermost (most elements) first: a plate's axes are summed out per element, and the result,
    summed over the elements the next plate out does not have, joins that plate's factors. With
    `tables` (a dict), records there what sampling needs: "plates", a list of (world axes, the
    table over them and the plate's elements, those elements) in elimination order, and "global",
    (world axes, the joint table of the sites with one coordinate)."""
    if tables is not None:
        tables["plates"] = []
    factors = [_in_plate(f, axes) for f in factors]
    while True:
        plates = {axes[a].elements for f in factors for a, _ in f.worlds if axes[a].elements}
        if not plates:
            break
        inner = max(plates, key=len)
        group = [f for f in factors if f.elements == inner and any(axes[a].elements == inner for a, _ in f.worlds)]
        factors = [f for f in factors if not any(f is g for g in group)]
        scales = {f.scale for f in group if f.scale is not None}
        if len(scales) > 1:
            raise NotImplementedError(
                f"the sites {_listed(f.address for f in group)} of one plate have different scales"
            )
        wanted = _world_axes([Dual(None, None, f.worlds) for f in group])
        table = sum(
            jnp.broadcast_to(_expand(f.log_prob, f.worlds, wanted), tuple(n for _, n in wanted) + inner) for f in group
        )
        if tables is not None:
            tables["plates"].append((wanted, table, inner))
        summed = tuple(i for i, (a, _) in enumerate(wanted) if axes[a].elements == inner)
        reduced = semiring.sum(table, summed) * (scales.pop() if scales else 1.0)
        kept = tuple(w for w in wanted if axes[w[0]].elements != inner)
        outer = max((axes[a].elements for a, _ in kept), key=len, default=())
        leading = tuple(range(len(kept), len(kept) + len(inner) - len(outer)))
        factors.append(_Factor(jnp.sum(reduced, axis=leading), kept, outer, None, group[0].address))
    wanted = _world_axes([Dual(None, None, f.worlds) for f in factors])
    total = jnp.zeros(tuple(n for _, n in wanted), jnp.result_type(float))
    for f in factors:
        x = jnp.sum(f.log_prob, axis=tuple(range(len(f.worlds), jnp.ndim(f.log_prob))))
        total = total + _expand(x * f.scale if f.scale not in (None, 1.0) else x, f.worlds, wanted)
    if tables is not None:
        tables["global"] = (wanted, total)
    return semiring.sum(total, tuple(range(len(wanted)))) if wanted else total


def _in_plate(factor, axes):
    """`factor` with the elements of the innermost plate whose summed-out values it reads: its
    extra leading elements (a site in a plate nested inside that one) summed, as each of them
    depends on the same plate element. Plates must nest (each one's elements end with the next
    one out's, NumPyro's dims from the right); a factor with other elements is refused."""
    plates = {axes[a].elements for a, _ in factor.worlds if axes[a].elements}
    if not plates:
        return factor
    inner = max(plates, key=len)
    if any(inner[len(inner) - len(e) :] != e for e in plates):
        raise NotImplementedError(
            f"the site '{format_address(factor.address)}' reads values summed out in plates that do not nest "
            f"({sorted(plates)}): a plate's elements must end with those of every plate outside it"
        )
    extra = len(factor.elements) - len(inner)
    if extra < 0 or factor.elements[extra:] != inner:
        raise NotImplementedError(_mismatch(factor, inner))
    if extra == 0:
        return factor
    leading = tuple(range(len(factor.worlds), len(factor.worlds) + extra))
    return factor._replace(log_prob=jnp.sum(factor.log_prob, axis=leading), elements=inner)


# -- exact posterior samples ------------------------------------------------------------------------


class _ChainRecord(NamedTuple):
    """What a chain's forward pass leaves for sampling, led by the outer world axes `worlds`."""

    structure: _Structure
    worlds: tuple
    alphas: object  # (T, S) + elements: the log alpha entering each step
    tables: object  # (T, S, S) + elements: each step's log factors (previous state, state)
    final: object  # (S,) + elements
    reverse: bool


def sample(closed, args, given, key):
    """{address: value}: one draw of all the summed-out sites from their exact joint posterior
    given `given` (scan sites stacked), in reverse order of elimination: the sites with one
    coordinate jointly, then each plate's elements given them, then each chain by backward
    sampling from its forward pass (forward filtering, backward sampling)."""
    elim = _Eliminator(given, SUM, {}, record=True)
    elim.run(closed.jaxpr, closed.consts, [Dual(a) for a in args])
    tables = {}
    _eliminate(elim.factors, elim.axes, SUM, tables)
    keys = iter(jax.random.split(key, 1 + len(tables["plates"]) + len(elim.chains)))
    index = {}  # world axis -> sampled support index (one per element for a plate's axis)
    wanted, total = tables["global"]
    _draw(next(keys), total, wanted, (), index)
    for wanted, table, elements in reversed(tables["plates"]):  # outermost first
        table, free = _condition(table, wanted, index)
        _draw(next(keys), table, free, elements, index)
    values = {elim.axes[a].address: elim.summed[elim.axes[a].address].support[i] for a, i in index.items()}
    for chain in elim.chains:
        at = tuple(index[a] for a, _ in chain.worlds)
        states = _backward_sample(next(keys), chain.alphas[at], chain.tables[at], chain.final[at], chain.reverse)
        s = chain.structure
        for address, i in zip(s.addresses, jnp.unravel_index(states, s.sizes)):
            values[address] = s.summed[address].support[i]
    return values


def _condition(table, wanted, index):
    """`table` (led by the world axes `wanted`, then elements) at the values already drawn for
    some of them (an index per element of an outer plate, or one for all), and the other axes."""
    for p in reversed(range(len(wanted))):
        drawn = index.get(wanted[p][0])
        if drawn is None:
            continue
        drawn = jnp.asarray(drawn)
        drawn = drawn.reshape((1,) * (table.ndim - drawn.ndim) + drawn.shape)  # its elements are the last
        drawn = jnp.broadcast_to(drawn, table.shape[:p] + (1,) + table.shape[p + 1 :])
        table = jnp.take_along_axis(table, drawn, axis=p).squeeze(p)
    return table, [w for w in wanted if w[0] not in index]


def _draw(key, table, wanted, elements, index):
    """Draw the joint index of the world axes `wanted` from the log weights `table` (their sizes,
    then `elements`: one draw per element), into `index`."""
    if not wanted:
        return
    sizes = tuple(n for _, n in wanted)
    flat = jax.random.categorical(key, table.reshape((-1,) + elements), axis=0)
    for (a, _), i in zip(wanted, jnp.unravel_index(flat, sizes)):
        index[a] = i


def _backward_sample(key, alphas, tables, final, reverse):
    """The states of a chain, (T,) + elements, from its forward pass: the last from the final
    alpha, each earlier one given the next from alpha(previous) + table(previous, next)."""
    keys = jax.random.split(key, alphas.shape[0] + 1)
    last = jax.random.categorical(keys[0], final, axis=0)

    def back(state, x):
        alpha, table, k = x
        column = jnp.take_along_axis(table, state[None, None], axis=1)[:, 0]
        return jax.random.categorical(k, alpha + column, axis=0), state

    _, states = lax.scan(back, last, (alphas, tables, keys[1:]), reverse=not reverse)
    return states


def _support(site):
    """The values of a site to sum over, (K,) (the same for every element), or a ValueError
    naming it."""
    d = site.distribution
    base = families.unwrap(d)
    if not d.has_enumerate_support:
        raise ValueError(
            f"the site '{site.name}' cannot be summed out: {type(base).__name__} has no finite support. Give "
            "its value (keep it in the marginal), observe it, or sum out only finite-support sites"
        )
    if base.event_shape:
        raise NotImplementedError(
            f"the site '{site.name}' has event shape {base.event_shape}: only sites with scalar values "
            "(Categorical, Bernoulli, Binomial, ...) can be summed out"
        )
    with jax.ensure_compile_time_eval():  # a constant, also when found while tracing abstractly
        return base.enumerate_support(expand=False).reshape(-1).astype(site.value_dtype)


def _first_world(d):
    return d.primal[(0,) * len(d.worlds)] if d.worlds else d.primal


def _primals(duals):
    return [d.primal for d in duals]


def _listed(addresses):
    return ", ".join(f"'{format_address(a)}'" for a in addresses) or "no summed-out sites"


def _mismatch(factor, elements):
    return (
        f"the site '{format_address(factor.address)}' (elements {factor.elements}) reads a value summed out over "
        f"a plate of elements {elements}: an exact sum over a plate needs every site that reads its summed-out "
        "values to be in the same plate, element by element"
    )


def _non_markov(addresses, position):
    return (
        f"the scan holding the summed-out sites {_listed(addresses)} carries (position {position}) a value that "
        "depends on the previous step's summed-out values other than through this step's sites: the forward "
        "algorithm needs a first-order Markov chain (carry this step's values, not a function of the past)"
    )


def _poisoned_error(poisoned, eqn):
    addresses = sorted({a for d in poisoned for a in d.addresses})
    return NotImplementedError(
        f"a value computed from the summed-out sites {_listed(addresses)} of a scan (its final carry or its "
        f"outputs) is read by a later sample site or loop ('{eqn.primitive.name}'): the forward algorithm sums the "
        "chain out inside the scan, so nothing after it may depend on the chain's state"
    )


def _per_world(duals, fn):
    """`adev._per_world` with constants folded: the worlds' values are the sites' supports,
    constants, and indexing with them is cheaper as a selection (transforms/folding.py)."""
    return _per_world_unfolded(duals, fn, evaluate=evaluate_folded)
