"""When an enumerated site with several coordinates (a plate's elements) can be summed exactly in
an objective: the rest of the program must be *additive* over the elements.

ADEV sums a site with one coordinate exactly by running the rest of the program once per value.
A site with N coordinates would need K^N runs, unless the program only ever combines the
coordinates' terms by summing them and uses those sums linearly (the ELBO: log p(x, z) - log q(z)
with every site's log density a sum over the plate). Then E_q[sum_e f_e(z_e)] = sum_e sum_k
q_e(k) f_e(k), so one run with every coordinate at the same value k, read per coordinate, and each
such sum replaced by its expectation, is exact. `collapse_points` checks this on the jaxpr by
following the site's value forward: where it goes elementwise (arithmetic, comparisons, a
gather that looks up a table at it, broadcasts and reshapes that keep its elements apart) it stays
*aligned* with the elements; a `reduce_sum` over all its element dimensions makes it *summed* (a
collapse point); summed values may only be added, subtracted, scaled by values that do not depend
on the site, and returned. A boolean reduced over the elements (NumPyro's support check) may only
pick between an aligned value and one that does not depend on the site. Anything else (a sample
site, a loop, a nonlinear function of a sum, a reduction mixing elements) means "not provably
additive", and the site keeps its local-expectation gradient.
"""

from typing import NamedTuple

from transforms import compat
from transforms.primitives import sample_p

_LINEAR = {"add", "sub", "neg", "convert_element_type", "copy", "add_any"}
_SHAPE = {"broadcast_in_dim", "reshape", "squeeze", "reduce_sum", "expand_dims"}
_UNARY_PASS = {"stop_gradient", "convert_element_type", "copy"}


class Aligned(NamedTuple):
    """A value whose dimensions `dims` are the site's element dimensions, in order."""

    dims: tuple


SUMMED = "summed"  # a sum over the elements of aligned values (linear in it from here on)
REDUCED = "reduced"  # a boolean reduced over the elements (a support or parameter check)


def collapse_points(eqns, start, site_var, elements, out_var):
    """{id(eqn): element dims} of the `reduce_sum` equations in eqns[start:] (and the call bodies
    they inline) that sum the site's aligned values over its elements, if the program from there
    on is additive over the elements of `site_var` (shape `elements`) and returns `out_var`
    linearly in those sums; None otherwise."""
    tags = {site_var: Aligned(tuple(range(len(elements))))}
    points = {}
    if not _walk(eqns[start:], tags, points):
        return None
    out = tags.get(out_var)
    return points if out is None or out == SUMMED else None


def _walk(eqns, tags, points):
    for eqn in eqns:
        ins = [None if isinstance(v, compat.Literal) else tags.get(v) for v in eqn.invars]
        if all(t is None for t in ins):
            continue
        outs = _rule(eqn, ins, tags, points)
        if outs is None:
            return False
        for v, t in zip(eqn.outvars, outs):
            if t is not None:
                tags[v] = t
    return True


def _rule(eqn, ins, tags, points):
    """The tags of eqn's outputs from its inputs' (None: does not depend on the site), or None
    when the equation breaks additivity."""
    name = eqn.primitive.name
    if eqn.primitive is sample_p:
        return None
    if name in compat.INLINE_CALLS or name == "custom_jvp_call":
        return _call(eqn, ins)
    if SUMMED in ins:
        return _summed(eqn, name, ins)
    if name == "select_n":
        return _select(eqn, ins)
    if REDUCED in ins:
        elementwise = compat.is_elementwise(eqn.primitive)
        return [REDUCED] * len(eqn.outvars) if elementwise and set(ins) <= {None, REDUCED} else None
    if name in _SHAPE or (name.startswith("reduce_") and "axes" in eqn.params):
        return _reshaped(eqn, name, ins[0], points)
    if name == "gather":
        return _gather(eqn, ins)
    if compat.is_elementwise(eqn.primitive) or name in _UNARY_PASS:
        return _elementwise(eqn, ins)
    return None


def _call(eqn, ins):
    """A call body (jit, custom_jvp function) is followed inside; ADEV binds a body without sites
    as one equation, so the elements may not be summed in there."""
    body = eqn.params["call_jaxpr"] if eqn.primitive.name == "custom_jvp_call" else compat.inline_jaxpr(eqn)[0]
    body = getattr(body, "jaxpr", body)
    inner_tags, inner_points = {v: t for v, t in zip(body.invars, ins) if t is not None}, {}
    if not _walk(body.eqns, inner_tags, inner_points) or inner_points:
        return None
    return [None if isinstance(v, compat.Literal) else inner_tags.get(v) for v in body.outvars]


def _summed(eqn, name, ins):
    if any(isinstance(t, Aligned) or t == REDUCED for t in ins):
        return None
    if name in _LINEAR or name in _SHAPE:
        return [SUMMED]
    if name == "mul" and ins.count(SUMMED) == 1:
        return [SUMMED]
    if name == "div" and ins[0] == SUMMED and ins[1] is None:
        return [SUMMED]
    return None


def _select(eqn, ins):
    """select_n(predicate, *cases): a reduced predicate picks between aligned and site-free cases."""
    predicate, cases = ins[0], ins[1:]
    if predicate not in (None, REDUCED) and not isinstance(predicate, Aligned):
        return None
    aligned = {t for t in cases if t is not None}
    if any(not isinstance(t, Aligned) for t in aligned) or len(aligned) > 1:
        return None
    if isinstance(predicate, Aligned):
        if aligned and predicate not in aligned:
            return None
        aligned = {predicate}
    return [aligned.pop()] if aligned else None


def _elementwise(eqn, ins):
    aligned = {t for t in ins if t is not None}
    if len(aligned) != 1 or not isinstance(next(iter(aligned)), Aligned):
        return None
    (tag,) = aligned
    shape = eqn.outvars[0].aval.shape
    for v, t in zip(eqn.invars, ins):  # size-1 dimensions broadcast, the element dimensions may not
        if t is not None and (v.aval.ndim != len(shape) or any(v.aval.shape[d] != shape[d] for d in tag.dims)):
            return None
    return [tag] * len(eqn.outvars)


def _reshaped(eqn, name, tag, points):
    if not isinstance(tag, Aligned):
        return None
    in_shape, out_shape = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
    if name == "broadcast_in_dim":
        where = eqn.params["broadcast_dimensions"]
        dims = tuple(where[d] for d in tag.dims)
        return [Aligned(dims)] if all(in_shape[d] == out_shape[where[d]] for d in tag.dims) else None
    if name in ("reshape", "squeeze", "expand_dims"):
        return _kept_dims(tag, in_shape, out_shape)
    axes = set(eqn.params["axes"])
    if set(tag.dims) <= axes:
        if name == "reduce_sum":
            points[id(eqn)] = tag.dims
            return [SUMMED]
        return [REDUCED] if name in ("reduce_and", "reduce_or") else None
    if axes & set(tag.dims):
        return None
    return [Aligned(tuple(d - sum(a < d for a in axes) for d in tag.dims))]


def _kept_dims(tag, in_shape, out_shape):
    """A reshape that only adds or removes size-1 dimensions keeps the element dimensions."""
    big_in = [d for d, n in enumerate(in_shape) if n != 1]
    big_out = [d for d, n in enumerate(out_shape) if n != 1]
    if [in_shape[d] for d in big_in] != [out_shape[d] for d in big_out] or any(in_shape[d] == 1 for d in tag.dims):
        return None
    where = dict(zip(big_in, big_out))
    return [Aligned(tuple(where[d] for d in tag.dims))]


def _gather(eqn, ins):
    """A table that does not depend on the site, looked up at aligned indices: each output row
    belongs to the element of its index."""
    operand, indices = ins
    if operand is not None or not isinstance(indices, Aligned):
        return None
    index_rank = eqn.invars[1].aval.ndim
    if any(d >= index_rank - 1 for d in indices.dims):  # the last axis holds the index vectors
        return None
    offsets = eqn.params["dimension_numbers"].offset_dims
    batch = [d for d in range(eqn.outvars[0].aval.ndim) if d not in offsets]
    return [Aligned(tuple(batch[d] for d in indices.dims))]
