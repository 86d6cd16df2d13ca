"""The shared jaxpr interpreter for the generative-function transformations.

`run(jaxpr, consts, args, handler, carry, reads)` evaluates a staged program under the current
trace, re-emitting every ordinary equation and handing each `sample_p` site to
`handler.site(site, carry, read) -> (value, carry, write)`:

- `carry` is the handler's running state (a key, a log density, ...), threaded in program order,
  through `lax.scan` carries and `lax.switch` branches;
- `reads` maps addresses to values the handler consumes (observations, choices); values of sites
  inside a scan body carry the scan length as a leading dimension;
- `writes` maps addresses to values the handler produces (the choices of a simulation); sites
  inside a scan body are stacked along a leading dimension, sites inside cond branches hold the
  taken branch's value (zeros where that branch has no such site).

Equations that contain no sample site are bound as they are. `jit`/`closed_call`/`checkpoint`
bodies with sites are inlined; `scan` and `cond` are re-emitted; any other primitive holding a site
(`while`, `custom_vjp`, ...) raises `NotImplementedError` naming it.
"""

import jax
import jax.numpy as jnp
from jax import lax

from transforms import compat
from transforms.primitives import Site, eqn_contains_sample, format_address, sample_p


def site_avals(jaxpr, scan_lengths=()):
    """{address: (shape, dtype)} of every site in an open jaxpr, with scan lengths prepended."""
    found = {}
    for eqn in jaxpr.eqns:
        if eqn.primitive is sample_p:
            aval = eqn.outvars[0].aval
            found[eqn.params["address"]] = (scan_lengths + tuple(aval.shape), aval.dtype)
        elif eqn.primitive.name == "scan":
            found.update(site_avals(eqn.params["jaxpr"].jaxpr, scan_lengths + (eqn.params["length"],)))
        else:
            for sub in compat.sub_jaxprs(eqn.params):
                found.update(site_avals(sub, scan_lengths))
    return found


def addresses_with(jaxpr, flag):
    """The addresses of the sites of an open jaxpr (at any depth) whose parameter `flag`
    ("observed", "aux") is set."""
    found = set()
    for eqn in jaxpr.eqns:
        if eqn.primitive is sample_p and eqn.params.get(flag, False):
            found.add(eqn.params["address"])
        for sub in compat.sub_jaxprs(eqn.params):
            found |= addresses_with(sub, flag)
    return found


def live_eqns(jaxpr):
    """The equations of an open jaxpr that its outputs, its sample sites or its effects depend
    on, in order (NumPyro's argument checks, for example, leave unused values behind); dropping
    the rest saves interpreting them.

        >>> [e.primitive.name for e in live_eqns(jax.make_jaxpr(lambda x: (x > 0, x + 1)[1])(1.0).jaxpr)]
        ['add']
    """
    live = {v for v in jaxpr.outvars if not isinstance(v, compat.Literal)}
    kept = []
    for eqn in reversed(jaxpr.eqns):
        if eqn.effects or eqn_contains_sample(eqn) or any(v in live for v in eqn.outvars):
            kept.append(eqn)
            live.update(v for v in eqn.invars if not isinstance(v, compat.Literal))
    return kept[::-1]


def check_unique_addresses(jaxpr):
    """Raise if two sites share an address (sites in different branches of one cond may)."""
    seen = set()

    def visit(j, seen):
        for eqn in j.eqns:
            if eqn.primitive is sample_p:
                _claim(eqn.params["address"], seen)
            elif eqn.primitive.name == "cond":
                branch_sets = []
                for br in eqn.params["branches"]:
                    s = set()
                    visit(br.jaxpr, s)
                    branch_sets.append(s)
                _check_branch_avals(eqn.params["branches"])
                for address in set().union(*branch_sets):
                    _claim(address, seen)
            else:
                for sub in compat.sub_jaxprs(eqn.params):
                    visit(sub, seen)

    visit(jaxpr, seen)
    return seen


def _check_branch_avals(branches):
    """Raise if one address has two shapes or dtypes in the branches of a cond. Branch i is the
    i-th function of `lax.switch`; `lax.cond(pred, true_fn, false_fn)` stages false_fn first."""
    names = [f"branch {i}" for i in range(len(branches))]
    if len(branches) == 2:
        names = [f"{names[0]} (lax.cond's false_fn)", f"{names[1]} (lax.cond's true_fn)"]
    first = {}
    for name, br in zip(names, branches):
        for address, aval in site_avals(br.jaxpr).items():
            other, seen_in = first.setdefault(address, (aval, name))
            if other != aval:
                (s1, d1), (s2, d2) = other, aval
                raise ValueError(
                    f"address '{format_address(address)}' is drawn with shape {s1} {d1} in {seen_in} and shape "
                    f"{s2} {d2} in {name} of a lax.cond/switch: a site needs one shape and dtype in every branch"
                )


def _claim(address, seen):
    if address in seen:
        raise ValueError(
            f"duplicate address '{format_address(address)}': two sample sites use it. Give each "
            "site its own address (inside a loop, use a scan/vmap so the site is stacked)."
        )
    seen.add(address)


def run(jaxpr, consts, args, handler, carry, reads):
    """Evaluate open `jaxpr`; returns (outputs, carry, writes)."""
    env = {}
    for v, x in zip(jaxpr.constvars, consts):
        env[v] = x
    for v, x in zip(jaxpr.invars, args):
        env[v] = x
    writes = {}
    for eqn in jaxpr.eqns:
        invals = [compat.read_atom(env, v) for v in eqn.invars]
        if eqn.primitive is sample_p:
            site = Site.from_eqn(eqn, invals)
            read = _observed_read(site, reads) if site.observed else reads.get(site.address)
            value, carry, write = handler.site(site, carry, read)
            outs = [value]
            if write is not None:
                writes[site.address] = write
        elif not eqn_contains_sample(eqn):
            outs = compat.bind_eqn(eqn, invals)
        else:
            rule = CONTROL_FLOW.get(eqn.primitive.name)
            if rule is None and eqn.primitive.name in compat.INLINE_CALLS:
                rule = _inline
            if rule is None:
                raise unsupported(eqn)
            outs, carry, new_writes = rule(eqn, invals, handler, carry, reads)
            writes.update(new_writes)
        for v, x in zip(eqn.outvars, outs):
            env[v] = x
    return [compat.read_atom(env, v) for v in jaxpr.outvars], carry, writes


def _observed_read(site, reads):
    if site.address in reads:
        raise ValueError(
            f"a value was given for address '{site.name}', which the program observes with obs=: the "
            "observation is used, so the given value would be ignored; leave it out of the choices, or "
            "give the value through the choices and drop obs="
        )
    return site.observed_value()


def unsupported(eqn, where=""):
    """The error for sample sites inside a primitive the interpreters do not handle."""
    return NotImplementedError(
        f"sample sites inside '{eqn.primitive.name}' are not supported{where} "
        f"(sites: {', '.join(map(format_address, site_avals(_as_jaxpr(eqn))))}); "
        "use lax.scan, lax.cond/switch, fori_loop with static bounds, vmap or jit."
    )


def _as_jaxpr(eqn):
    class _Holder:
        eqns = [eqn]

    return _Holder


def _inline(eqn, invals, handler, carry, reads):
    inner, consts = compat.inline_jaxpr(eqn)
    return run(inner, consts, invals, handler, carry, reads)


def _scan(eqn, invals, handler, carry, reads):
    p = eqn.params
    body = p["jaxpr"]
    n_consts, n_carry, length = p["num_consts"], p["num_carry"], p["length"]
    consts, init, xs = invals[:n_consts], invals[n_consts : n_consts + n_carry], invals[n_consts + n_carry :]
    body_reads = _restrict(reads, site_avals(body.jaxpr), leading=length)

    def step(state, x):
        values, hcarry = state
        x_vals, x_reads = x
        outs, hcarry, writes = run(body.jaxpr, body.consts, consts + values + x_vals, handler, hcarry, x_reads)
        return (outs[:n_carry], hcarry), (outs[n_carry:], writes)

    (final, carry), (ys, writes) = lax.scan(step, (init, carry), (xs, body_reads), length=length, reverse=p["reverse"])
    return final + ys, carry, writes


def _cond(eqn, invals, handler, carry, reads):
    index, ops = invals[0], invals[1:]
    branches = eqn.params["branches"]
    avals = {}
    for br in branches:
        avals.update(site_avals(br.jaxpr))
    branch_reads = _restrict(reads, avals)

    def branch_fn(br):
        def f(ops, hcarry, r):
            outs, hcarry, writes = run(br.jaxpr, br.consts, ops, handler, hcarry, r)
            return outs, hcarry, writes

        return f

    fns = [branch_fn(br) for br in branches]
    shapes = [jax.eval_shape(f, ops, carry, branch_reads)[2] for f in fns]
    write_avals = {}
    for s in shapes:
        write_avals.update(s)

    def padded(f):
        def g(ops, hcarry, r):
            outs, hcarry, writes = f(ops, hcarry, r)
            full = {a: writes[a] if a in writes else jnp.zeros(s.shape, s.dtype) for a, s in write_avals.items()}
            return outs, hcarry, full

        return g

    return lax.switch(index, [padded(f) for f in fns], ops, carry, branch_reads)


def _restrict(reads, avals, leading=None):
    """The reads for the sites of a sub-program, checking scan-stacked shapes."""
    sub = {}
    for address in avals:
        if address in reads:
            value = reads[address]
            if leading is not None and (jnp.ndim(value) == 0 or jnp.shape(value)[0] != leading):
                raise ValueError(
                    f"choice at '{format_address(address)}' is inside a scan of length {leading}: "
                    f"its value needs leading dimension {leading}, got shape {jnp.shape(value)}"
                )
            sub[address] = value
    return sub


CONTROL_FLOW = {"scan": _scan, "cond": _cond}
