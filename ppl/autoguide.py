"""Automatic guides built from a model (NumPyro's AutoNormal, AutoMultivariateNormal, AutoDelta,
AutoIAFNormal, AutoBNAFNormal).

    guide, params = ppl.autoguide.mean_field(model, None, x)   # the model's own arguments
    params, losses = ppl.fit(ppl.objectives.elbo(model, guide), params, x, optimizer=optax.adam(0.05),
                             steps=2000, key=key)
    guide.median(params, x)                                     # a constrained point estimate

Each builder takes the model (`model(params, *args)`, observations marked with `obs=`) and example
arguments exactly as the model is called, and returns `(guide, init_params)`. The guide is a
generative function with the model's signature whose choices are the model's latent
(non-observed) sites, at the same addresses and shapes, so `objectives.elbo(model, guide)` and
every other objective apply unchanged. Observed sites are not choices of the guide.

Design:

- **The guide mirrors the model.** Calling the guide runs the model's staged program; at each latent
  site it draws from q at that address instead of from the prior (sites under `jax.vmap` stay
  batched sites, sites in a `lax.scan` stay in the scan, with parameters stacked along it), and
  observed sites just return their data. The bijection at a site is
  `biject_to(distribution.support)` of the model's distribution *at that point of the run*, so a
  support that depends on another latent (`Uniform(0, z)`) gets the right bijection and Jacobian.
  The model's other computations in the guide's program are dead code that `jit` removes.
- **Unconstrained Gaussians pushed through the bijection.** A mean-field site is
  `TransformedDistribution(Normal(loc, exp(log_scale)).to_event(k), biject_to(support))` (a plain
  Normal where the support is the real line): its log density includes the log-Jacobian, and its
  draws are reparameterized.
- **Joint guides as a chain of conditionals.** `full_rank`, `iaf` and `bnaf` put one
  distribution on the concatenation u = (u_1, ..., u_n) of the unconstrained latents (in program
  order): u = F(eps), eps ~ N(0, I), with F block-triangular (u_k depends on eps_1..eps_k only).
  Site k draws eps_k and sets u_k = F(eps_<k, eps_k)_k, eps_<k recovered from the earlier sites'
  values, so its density is the conditional q(u_k | u_<k) and the product over the sites is
  exactly the joint (with each site's bijection Jacobian): log q at the model's addresses is
  exact and no auxiliary address is needed (`density(model)` rejects addresses it does not
  have). Full rank: F(eps) = loc + L eps, an MVN. Flows: NumPyro's IAF or BNAF transforms over
  the whole vector, autoregressive in program order, with the coordinates reversed *within* each
  site's block between flows (NumPyro reverses the whole vector, which would couple a site to
  later ones and leave no tractable conditional). Sites inside `scan`/`cond` are not supported
  by the joint guides (use `mean_field`).
- **Delta (MAP).** `Delta(biject_to(support)(loc))` with log density 0: the ELBO is the log joint
  at the point, maximized in the constrained space (MAP, as NumPyro's AutoDelta).
- **Initialization.** `init="median"` (default): loc is the coordinatewise median, in unconstrained
  space, of the unconstrained values of 15 prior draws (NumPyro's `init_to_median`; a median in
  unconstrained space is always a valid point, and unlike a fixed box it follows the prior's
  location and scale); non-finite values become 0. `init="zero"`: loc = 0 (e.g. a sigmoid
  site's midpoint). `init_values={"address": constrained value}` overrides either per site.
  Scales start at `init_scale`.
- **Parameters.** A dict keyed by the address string ("a/b" for nested addresses); mean field:
  `{"loc", "log_scale"}` per site, shaped like the unconstrained site (scan and vmap dimensions
  first); delta: `{"loc"}`; full rank: `{"loc": (D,), "log_diag": (D,), "lower": (D, D)}` with
  L = diag(exp(log_diag)) + strictly-lower(lower); flows: `{"flows": (network params, ...)}`,
  one entry per flow from its network's init (as NumPyro's AutoIAFNormal/AutoBNAFNormal). The
  guide reads only these entries, so a model's own parameters may live in the same dict;
  `param_key="guide"` nests the guide's entries under that key instead (the model receives the
  whole dict).
- **Sites observed when the guide was built** stay outside it: called with the observation as
  None (`obs=None`, for prediction), the site is latent in the model but no choice of the guide,
  and holds 0 in the guide's program.
- **Continuous latents only.** A discrete latent site raises `ValueError` naming its address.
- **Scales are not copied.** The guide's log densities are unscaled whatever `ppl.scale` or a
  subsampled `ppl.plate` does to the model's: q is a distribution over the latents, and with
  one parameter per latent coordinate an autoguide cannot serve latents local to a subsampled
  plate anyway (NumPyro indexes such parameters by the subsample; ppl's plates carry no indices).
"""

import functools
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpyro.distributions as nd
from jax.example_libraries import stax
from numpyro.distributions import constraints
from numpyro.distributions.flows import BlockNeuralAutoregressiveTransform, InverseAutoregressiveTransform
from numpyro.distributions.transforms import (
    ComposeTransform,
    LowerCholeskyAffine,
    PermuteTransform,
    Transform,
    biject_to,
)
from numpyro.nn import AutoregressiveNN, BlockNeuralAutoregressiveNN

from ppl.choicemap import flatten_choices, nest_choices
from ppl.gen import GenerativeFunction
from transforms import compat, interpreter
from transforms.primitives import format_address, sample_p, sample_site

__all__ = ["AutoGuide", "LatentSite", "bnaf", "delta", "full_rank", "iaf", "mean_field"]

NUM_INIT_DRAWS = 15


@dataclass(frozen=True)
class LatentSite:
    """A latent site of the model, as the guide sees it."""

    address: tuple
    shape: tuple  # of the choice (scan lengths and vmap dimensions first)
    unconstrained_shape: tuple  # of its unconstrained value (same leading dimensions)
    support: str  # the support's class, e.g. "Positive", "Simplex", "Independent(Real, 1)"
    context: tuple  # enclosing control flow, e.g. ("scan",)

    @property
    def name(self):
        return format_address(self.address)


class AutoGuide(GenerativeFunction):
    """The generative function an autoguide builder returns: `guide(params, *args)`, with the
    model's signature; `sites` describes its latent sites."""

    def __init__(self, fn, kind, model, sites, param_key, layout=None):
        super().__init__(fn)
        self.kind, self.model, self.sites, self.param_key, self.layout = kind, model, sites, param_key, layout

    def median(self, params, *args):
        """The latents at the guide's unconstrained median (loc) pushed through each site's
        bijection (for the delta guide: its point), as a choice map."""
        return self._median(params, *args)

    @functools.cached_property
    def _median(self):
        return jax.jit(functools.partial(self.fn, emit=False))

    def own_params(self, params):
        return params if self.param_key is None else params[self.param_key]

    def scale_tril(self, params):
        """Full rank: the Cholesky factor L of the unconstrained covariance."""
        own = self.own_params(params)
        return _tril(own["log_diag"], own["lower"])

    def covariance(self, params):
        """Full rank: the covariance L L^T of the unconstrained latents (order: `layout`)."""
        L = self.scale_tril(params)
        return L @ L.T

    def __repr__(self):
        return f"<{self.kind} autoguide for {self.model!r}: {', '.join(s.name for s in self.sites)}>"


# ---------------------------------------------------------------------------------------------
# Inspecting the model


def _contexts(jaxpr, context=()):
    """{address: enclosing control flow} of the sites of an open jaxpr."""
    found = {}
    for eqn in jaxpr.eqns:
        if eqn.primitive is sample_p:
            found[eqn.params["address"]] = context
            continue
        name = eqn.primitive.name
        inner = context + (name,) if name in ("scan", "cond", "while") else context
        for sub in compat.sub_jaxprs(eqn.params):
            found.update(_contexts(sub, inner))
    return found


def observed_addresses(jaxpr):
    """The addresses of the observed sites of an open jaxpr (at any depth)."""
    return interpreter.addresses_with(jaxpr, "observed")


def _check_continuous(site):
    d = site.distribution
    if d.support.is_discrete or not jnp.issubdtype(site.value_dtype, jnp.floating):
        raise ValueError(
            f"the latent site '{site.name}' is discrete ({type(d).__name__} with support {d.support!r}): "
            "automatic guides cover continuous latents only; observe it, marginalize it out, or "
            "write a guide for it by hand"
        )


def bind_site(address, distribution, scale=1.0):
    """Bind a site at `address` drawing from `distribution` (one unbatched draw; under `vmap` the
    batching rule adds the batch dimensions), its log density multiplied by `scale`."""
    return sample_site(address, distribution, None, scale=scale)


def _bijection(d, name):
    """biject_to(support) of a latent site's distribution, or a clear error."""
    support = d.support
    try:
        return biject_to(support)
    except NotImplementedError:
        raise ValueError(
            f"no bijection from the real line onto the support {support!r} of the latent site "
            f"'{name}' ({type(d).__name__}); automatic guides need one (numpyro's biject_to)"
        ) from None


def _support_name(support):
    """The name of a constraint's class ('Positive', 'Simplex', 'Independent(Real, 1)'), not of
    its traced parameters."""
    if isinstance(support, constraints.independent):
        return f"Independent({_support_name(support.base_constraint)}, {support.reinterpreted_batch_ndims})"
    return type(support).__name__.lstrip("_")


def _is_real(support):
    return support is constraints.real or (
        isinstance(support, constraints.independent) and support.base_constraint is constraints.real
    )


def _inverse(site, value):
    """Unconstrained value of a site's value, per batch element."""
    return site.map(lambda d, e, x: _bijection(d, site.name).inv(x), site.leaves, value)


def _conform(site, value):
    value = jnp.asarray(value, site.value_dtype)
    if value.shape != site.value_shape:
        raise ValueError(
            f"init value at '{site.name}' has shape {value.shape}, the site draws shape {site.value_shape}"
        )
    return value


class _Prior:
    """Writes each latent site's unconstrained value: of a prior draw (`draw=True`), of the given
    `init_values`, or 0 (`draw=False`), the site's value being its image; records each latent
    site's support."""

    def __init__(self, draw):
        self.draw, self.supports = draw, {}

    def site(self, site, key, read):
        if site.observed:
            return read, key, None
        _check_continuous(site)
        _bijection(site.distribution, site.name)
        self.supports[site.address] = _support_name(site.distribution.support)
        key, sub = jax.random.split(key)
        if read is not None or self.draw:
            value = _prior_draw(site, sub) if read is None else _conform(site, read)
            if value is not None:
                return value, key, _inverse(site, value)
        shape = biject_to(site.distribution.support).inverse_shape(site.params["draw_shape"])
        u = jnp.zeros(site.batch_shape + shape, site.value_dtype)
        value = site.map(lambda d, e, u: _bijection(d, site.name)(u), site.leaves, u)
        return value.astype(site.value_dtype), key, u


def _prior_draw(site, key):
    """A draw of the site, or None when its distribution has no sampler (an ImproperUniform then
    starts at the unconstrained 0, as NumPyro's init_to_median falls back to a fixed point)."""
    try:
        return site.sample(key)
    except NotImplementedError:
        return None


def _prototype(model, example_args, init, init_values, key):
    """(latent sites, {address: initial unconstrained loc}) from the model at `example_args`."""
    if not isinstance(model, GenerativeFunction):
        raise TypeError(f"expected a generative function (decorate the model with @ppl.gen), got {model!r}")
    if init not in ("median", "zero"):
        raise ValueError(f"init must be 'median' or 'zero', got {init!r}")
    closed, flat, _ = model.stage(*example_args)
    avals = interpreter.site_avals(closed.jaxpr)
    contexts = _contexts(closed.jaxpr)
    reads = {a: jnp.asarray(v) for a, v in flatten_choices(init_values or {}).items()}
    observed = observed_addresses(closed.jaxpr)
    for address in reads:
        if address not in avals or address in observed:
            raise KeyError(f"init_values names '{format_address(address)}', which is not a latent site of the model")
    handler = _Prior(draw=init == "median")
    draw = lambda k, consts, flat, reads: interpreter.run(closed.jaxpr, consts, flat, handler, k, reads)[2]
    key = jax.random.key(0) if key is None else key
    if init == "median":
        keys = jax.random.split(key, NUM_INIT_DRAWS)
        draws = jax.jit(jax.vmap(draw, in_axes=(0, None, None, None)))(keys, closed.consts, flat, reads)
        locs = {a: jnp.median(u, axis=0) for a, u in draws.items()}
        locs = {a: jnp.where(jnp.isfinite(u) | (a in reads), u, 0.0) for a, u in locs.items()}
    else:  # no sampling at all: nothing to compile but the bijections
        locs = jax.jit(draw)(key, closed.consts, flat, reads)
    sites = tuple(
        LatentSite(a, avals[a][0], locs[a].shape, handler.supports[a], tuple(contexts.get(a, ())))
        for a in handler.supports  # program order (the writes of a vmap come back sorted)
    )
    return sites, locs


# ---------------------------------------------------------------------------------------------
# Guides that mirror the model


def _guide_fn(model, kind, sites, param_key, handler_for, reads_for):
    def fn(params, *args, emit=True):
        own = params if param_key is None else params[param_key]
        closed, flat, _ = model.stage(params, *args)
        handler = _OnlyGuided(handler_for(own, emit), {s.address for s in sites})
        reads = reads_for(own) if reads_for is not None else {}
        _, _, writes = interpreter.run(closed.jaxpr, closed.consts, flat, handler, None, reads)
        missing = {s.address for s in sites} - set(writes)
        if missing:
            raise ValueError(
                f"the model's latent sites changed since the guide was built: "
                f"{', '.join(map(format_address, sorted(missing)))} not reached"
            )
        return nest_choices(writes)

    fn.__name__ = f"{kind}_guide"
    return fn


class _OnlyGuided:
    """Hands `handler` the observed sites and the latent sites the guide was built for. Any other
    site is latent now but was observed then (its observation passed as None, `obs=None`, as for
    prediction): it is no choice of the guide, and its value in the guide's program is 0."""

    def __init__(self, handler, addresses):
        self.handler, self.addresses = handler, addresses

    def site(self, site, carry, read):
        if site.observed or site.address in self.addresses:
            return self.handler.site(site, carry, read)
        return jnp.zeros(site.value_shape, site.value_dtype), carry, None


def _site_params(own, site):
    try:
        return own[site.name]
    except (KeyError, TypeError):
        raise KeyError(f"the guide's parameters have no entry for the latent site '{site.name}'") from None


def _check_shape(q, d, name):
    if q.shape() != d.shape():
        raise ValueError(
            f"the guide's parameters at '{name}' give draws of shape {q.shape()}, the model's site "
            f"draws shape {d.shape()}; were they built for other arguments?"
        )


def _emit(site, make, emit, *batched):
    """Bind a guide site at the model site's address: `make(model_distribution, *args)` builds the
    guide's distribution for one batch element, vmapped over the site's batch dimensions so that
    the guide's site has the model site's batch structure. `emit=False` returns the distribution's
    point `make(...).mean` instead (for `median`)."""
    if emit:
        draw = lambda d, e, *xs: bind_site(site.address, make(d, *xs))
    else:
        draw = lambda d, e, *xs: make(d, *xs).mean
    return site.map(draw, site.leaves, *batched).astype(site.value_dtype)


class _MeanFieldSites:
    def __init__(self, emit):
        self.emit = emit

    def site(self, site, carry, read):
        if site.observed:
            return read, carry, None
        _check_continuous(site)
        loc, log_scale = read[..., 0], read[..., 1]

        def make(d, loc, log_scale):
            t = _bijection(d, site.name)
            base = nd.Normal(loc, jnp.exp(log_scale))
            if jnp.ndim(loc):
                base = base.to_event(jnp.ndim(loc))
            if not self.emit:  # the median: exp(log_scale) plays no part
                return nd.Delta(t(loc), event_dim=len(d.shape()))
            q = base if _is_real(d.support) else nd.TransformedDistribution(base, t)
            _check_shape(q, d, site.name)
            return q

        value = _emit(site, make, self.emit, loc, log_scale)
        return value, carry, value


class _DeltaSites:
    def __init__(self, emit):
        self.emit = emit

    def site(self, site, carry, read):
        if site.observed:
            return read, carry, None
        _check_continuous(site)

        def make(d, loc):
            q = nd.Delta(_bijection(d, site.name)(loc), event_dim=len(d.shape()))
            _check_shape(q, d, site.name)
            return q

        value = _emit(site, make, self.emit, read)
        return value, carry, value


def _mirrored(kind, model, example_args, init, init_values, key, param_key, handler, params_of, reads_of):
    sites, locs = _prototype(model, example_args, init, init_values, key)
    own = {s.name: params_of(locs[s.address]) for s in sites}
    by_name = {s.name: s for s in sites}

    def reads_for(own):
        return {by_name[n].address: reads_of(_site_params(own, by_name[n])) for n in by_name}

    fn = _guide_fn(model, kind, sites, param_key, lambda own, emit: handler(emit), reads_for)
    guide = AutoGuide(fn, kind, model, sites, param_key)
    return guide, (own if param_key is None else {param_key: own})


def mean_field(model, *example_args, init_scale=0.1, init="median", init_values=None, key=None, param_key=None):
    """(guide, init_params): a mean-field Gaussian in unconstrained space, pushed through each
    latent site's `biject_to(support)` (NumPyro's AutoNormal); see the module docstring.

    `example_args`: the model's arguments exactly as it is called (e.g. `(params, x)`).
    `init_scale`: the initial standard deviation of every unconstrained coordinate.
    `init`: "median" (of 15 prior draws, in unconstrained space) or "zero"; `init_values`:
    constrained values for some sites (a choice map), which override it. `key`: for the prior
    draws (default `jax.random.key(0)`). `param_key`: nest the guide's parameters under this key."""
    log_scale = math.log(init_scale)
    return _mirrored(
        "mean_field",
        model,
        example_args,
        init,
        init_values,
        key,
        param_key,
        _MeanFieldSites,
        lambda loc: {"loc": loc, "log_scale": jnp.full_like(loc, log_scale)},
        lambda p: jnp.stack(jnp.broadcast_arrays(jnp.asarray(p["loc"]), jnp.asarray(p["log_scale"])), axis=-1),
    )


def delta(model, *example_args, init="median", init_values=None, key=None, param_key=None):
    """(guide, init_params): a point mass at `biject_to(support)(loc)` at each latent site, log
    density 0, so the ELBO is the log joint and maximizing it is MAP (NumPyro's AutoDelta).
    Arguments as for `mean_field`."""
    return _mirrored(
        "delta",
        model,
        example_args,
        init,
        init_values,
        key,
        param_key,
        _DeltaSites,
        lambda loc: {"loc": loc},
        lambda p: jnp.asarray(p["loc"]),
    )


# ---------------------------------------------------------------------------------------------
# A site's block of a joint unconstrained vector


class _SiteBijection(Transform):
    """The flat unconstrained block of one model site -> the site's value: reshape to
    (batch..., unconstrained draw...) and apply `biject_to(support)` of each batch element's
    distribution (the model site's leaves carry its batch dimensions). The log-Jacobian is the
    total over the site."""

    domain = constraints.real_vector

    def __init__(self, site):
        self.leaves = tuple(site.leaves)
        self.treedef = site.params["treedef"]
        self.batch_shape = tuple(site.batch_shape)
        self.draw_shape = tuple(site.params["draw_shape"])
        self.unconstrained_shape = biject_to(site.distribution.support).inverse_shape(self.draw_shape)
        self.name = site.name

    @property
    def size(self):
        return math.prod(self.batch_shape + self.unconstrained_shape)

    def _map(self, fn, *xs):
        def g(leaves, *xs):
            d, _ = jax.tree_util.tree_unflatten(self.treedef, list(leaves))
            return fn(_bijection(d, self.name), *xs)

        for _ in self.batch_shape:
            g = jax.vmap(g)
        return g(list(self.leaves), *xs)

    def __call__(self, x):
        return self._map(lambda t, u: t(u), jnp.reshape(x, self.batch_shape + self.unconstrained_shape))

    def _inverse(self, y):
        return jnp.reshape(self._map(lambda t, y: t.inv(y), y), (self.size,))

    def log_abs_det_jacobian(self, x, y, intermediates=None):
        u = jnp.reshape(x, self.batch_shape + self.unconstrained_shape)
        return jnp.sum(self._map(lambda t, u, y: jnp.sum(t.log_abs_det_jacobian(u, y)), u, y))

    @property
    def codomain(self):
        # The value's support is checked per batch element by the bijections themselves; as a
        # constraint it is only used for its event dimension here.
        return constraints.independent(constraints.real, len(self.batch_shape + self.draw_shape))

    def forward_shape(self, shape):
        return tuple(shape[:-1]) + self.batch_shape + self.draw_shape

    def inverse_shape(self, shape):
        return tuple(shape[: len(shape) - len(self.batch_shape + self.draw_shape)]) + (self.size,)

    def tree_flatten(self):
        aux = {k: getattr(self, k) for k in ("treedef", "batch_shape", "draw_shape", "unconstrained_shape", "name")}
        return (self.leaves,), (("leaves",), aux)


# ---------------------------------------------------------------------------------------------
# Joint guides: one unconstrained vector u = F(eps) over all latents, a chain of conditionals


def _layout(kind, sites):
    """({address: (start, stop)} of each site's block of the joint vector, in program order; its
    size). Latents inside scan/cond raise NotImplementedError."""
    nested = [s for s in sites if s.context]
    if nested:
        s = nested[0]
        raise NotImplementedError(
            f"{kind}: the latent site '{s.name}' is inside {'/'.join(s.context)}; a joint guide "
            "needs every latent at the top level of the model (use mean_field for this model)"
        )
    layout, start = {}, 0
    for s in sites:
        size = math.prod(s.unconstrained_shape)
        layout[s.address] = (start, start + size)
        start += size
    return layout, start


class _JointSites:
    """The sites of u = F(eps), eps ~ N(0, I), F block-triangular in program order: site k draws
    eps_k and u_k = block(eps_k), where `block = joint.block(start, stop, eps, u)` is F's map
    from eps_k to u_k given the blocks before it (`eps`, `u`: the joint vectors so far, 0 from
    `start` on), then the site's bijection. `emit=False` gives the image of eps = 0 (`median`)."""

    def __init__(self, layout, size, joint, emit):
        self.layout, self.joint, self.emit = layout, joint, emit
        self.eps = self.u = jnp.zeros(size)
        self.next = 0

    def site(self, site, carry, read):
        if site.observed:
            return read, carry, None
        _check_continuous(site)
        start, stop = self._block(site)
        t = _SiteBijection(site)
        if t.size != stop - start:
            raise ValueError(
                f"the model's site '{site.name}' has {t.size} unconstrained coordinates now, "
                f"{stop - start} when the guide was built"
            )
        block = self.joint.block(start, stop, self.eps, self.u)
        if not self.emit:  # eps stays 0
            value = t(block(jnp.zeros(stop - start))).astype(site.value_dtype)
            return value, carry, value
        base = nd.Normal(0.0, 1.0).expand((stop - start,)).to_event(1)
        value = bind_site(site.address, nd.TransformedDistribution(base, [block, t])).astype(site.value_dtype)
        u = t.inv(value)
        self.u = self.u.at[start:stop].set(u)
        self.eps = self.eps.at[start:stop].set(block.inv(u))
        return value, carry, value

    def _block(self, site):
        start, stop = self.layout[site.address]
        if start != self.next:  # the conditionals need the blocks in program order
            raise ValueError(
                f"the model reached the latent site '{site.name}' out of the order the guide was built with"
            )
        self.next = stop
        return start, stop


def _joint_guide(kind, model, sites, layout, size, param_key, joint_of, own):
    """(guide, init_params) of a `_JointSites` guide whose F is `joint_of(own params)`."""
    handler_for = lambda own, emit: _JointSites(layout, size, joint_of(own), emit)
    fn = _guide_fn(model, kind, sites, param_key, handler_for, None)
    named_layout = {s.name: slice(*layout[s.address]) for s in sites}
    guide = AutoGuide(fn, kind, model, sites, param_key, named_layout)
    return guide, (own if param_key is None else {param_key: own})


# ---------------------------------------------------------------------------------------------
# Full rank


def _tril(log_diag, lower):
    return jnp.diag(jnp.exp(log_diag)) + jnp.tril(lower, -1)


class _Affine:
    """F(eps) = loc + L eps: block k is affine, u_k = loc_k + L_k,<k eps_<k + L_kk eps_k."""

    def __init__(self, loc, L):
        self.loc, self.L = loc, L

    def block(self, start, stop, eps, u):
        mean = self.loc[start:stop] + self.L[start:stop, :start] @ eps[:start]
        return LowerCholeskyAffine(mean, self.L[start:stop, start:stop])


def full_rank(model, *example_args, init_scale=0.1, init="median", init_values=None, key=None, param_key=None):
    """(guide, init_params): one multivariate normal over all unconstrained latents (NumPyro's
    AutoMultivariateNormal), drawn as a chain of conditionals at the model's own addresses; see
    the module docstring. `guide.layout` gives each site's slice of the flat vector,
    `guide.covariance(params)` the unconstrained covariance. Arguments as for `mean_field`;
    latents inside `scan`/`cond` raise `NotImplementedError`."""
    sites, locs = _prototype(model, example_args, init, init_values, key)
    layout, size = _layout("full_rank", sites)
    loc = jnp.concatenate([jnp.reshape(locs[s.address], (-1,)) for s in sites]) if sites else jnp.zeros(0)
    own = {
        "loc": loc,
        "log_diag": jnp.full(loc.shape, math.log(init_scale), loc.dtype),
        "lower": jnp.zeros(loc.shape * 2, loc.dtype),
    }
    joint_of = lambda own: _Affine(jnp.asarray(own["loc"]), _tril(own["log_diag"], own["lower"]))
    return _joint_guide("full_rank", model, sites, layout, size, param_key, joint_of, own)


# ---------------------------------------------------------------------------------------------
# Normalizing flows


@dataclass(frozen=True)
class _FlowSpec:
    """The static part of a flow guide: per flow, its network's apply function; between flows,
    `reversal`, which reverses the coordinates of each site's block."""

    kind: str  # "iaf" or "bnaf"
    networks: tuple
    reversal: tuple


def _flows(spec, params):
    """NumPyro's transforms of the flow stack with the networks' parameters `params`."""
    layers = []
    for i, (network, p) in enumerate(zip(spec.networks, params)):
        if i:
            layers.append(PermuteTransform(jnp.asarray(spec.reversal)))
        arn = functools.partial(network, p)
        layers.append(InverseAutoregressiveTransform(arn) if spec.kind == "iaf" else _BNAF(network, p))
    return layers


class _BNAF(BlockNeuralAutoregressiveTransform):
    """NumPyro's BNAF with an inverse. Each coordinate of x = F^-1(y) is found in order by
    bisection (F_i increases in x_i given x_<i), then one Newton step from that stopped root x*,
    x* - J^-1 (F(x*) - y), gives the implicit derivative J^-1 (dy - dF)."""

    def __init__(self, network, params):
        super().__init__(functools.partial(network, params))
        self.network, self.params = network, params

    def _inverse(self, y):
        fixed = BlockNeuralAutoregressiveTransform(functools.partial(self.network, jax.lax.stop_gradient(self.params)))
        root = _increasing_root(fixed, jax.lax.stop_gradient(y))
        jac = jax.jacfwd(fixed)(root)
        return root - jax.scipy.linalg.solve_triangular(jac, self(root) - y, lower=True)


def _increasing_root(f, y, expansions=40, bisections=50):
    """x with f(x) = y, for f triangular with f_i increasing in x_i: coordinate by coordinate,
    a bracket doubled from [-1, 1] until it holds the root, then bisected."""

    def coordinate(i, x):
        gap = lambda c: f(x.at[i].set(c))[i] - y[i]

        def expand(_, bracket):
            lo, hi = bracket
            return jnp.where(gap(lo) > 0, 2 * lo, lo), jnp.where(gap(hi) < 0, 2 * hi, hi)

        def bisect(_, bracket):
            lo, hi = bracket
            mid = (lo + hi) / 2
            above = gap(mid) > 0
            return jnp.where(above, lo, mid), jnp.where(above, mid, hi)

        bracket = jax.lax.fori_loop(0, expansions, expand, (-jnp.ones((), y.dtype), jnp.ones((), y.dtype)))
        lo, hi = jax.lax.fori_loop(0, bisections, bisect, bracket)
        return x.at[i].set((lo + hi) / 2)

    return jax.lax.fori_loop(0, y.shape[-1], coordinate, jnp.zeros_like(y))


def _flow_with_log_diagonal(layers, x):
    """(F(x), the log-diagonal of F's Jacobian per coordinate, summed over the flows)."""
    log_diagonal = jnp.zeros_like(x)
    for t in layers:
        x, intermediates = t.call_with_intermediates(x)
        if intermediates is not None:  # a permutation has none
            log_diagonal = log_diagonal + intermediates
    return x, log_diagonal


class _BlockFlow(Transform):
    """Block k of a flow F over the joint vector: eps_k -> F(eps_<k, eps_k, 0)_k, the earlier
    blocks `eps` (and their image `u`) fixed. F is block-triangular (each flow is autoregressive
    in the joint order, and the permutations stay within blocks), so the later blocks play no
    part, the inverse is F^-1(u_<k, u_k, 0)_k, and the log-Jacobian is the sum of F's
    log-diagonal over the block (the permutations only reorder it within the block)."""

    domain = constraints.real_vector
    codomain = constraints.real_vector

    def __init__(self, spec, params, eps, u, start, stop):
        self.spec, self.params, self.eps, self.u, self.start, self.stop = spec, params, eps, u, start, stop

    def call_with_intermediates(self, x):
        y, log_diagonal = _flow_with_log_diagonal(_flows(self.spec, self.params), self._into(self.eps, x))
        return y[self.start : self.stop], jnp.sum(log_diagonal[self.start : self.stop])

    def __call__(self, x):
        return self.call_with_intermediates(x)[0]

    def _inverse(self, y):
        return ComposeTransform(_flows(self.spec, self.params)).inv(self._into(self.u, y))[self.start : self.stop]

    def log_abs_det_jacobian(self, x, y, intermediates=None):
        return self.call_with_intermediates(x)[1] if intermediates is None else intermediates

    def _into(self, joint, block):
        return joint.at[self.start : self.stop].set(block)

    def tree_flatten(self):
        return (self.params, self.eps, self.u), (
            ("params", "eps", "u"),
            {"spec": self.spec, "start": self.start, "stop": self.stop},
        )


class _Flow:
    """F(eps): the flow stack of `spec` with the networks' parameters `params`."""

    def __init__(self, spec, params):
        self.spec, self.params = spec, params

    def block(self, start, stop, eps, u):
        return _BlockFlow(self.spec, self.params, eps, u, start, stop)


def _flow_guide(kind, model, example_args, make_network, num_flows, key, param_key):
    sites, _ = _prototype(model, example_args, "zero", None, None)
    layout, size = _layout(kind, sites)
    if size == 0:
        raise ValueError(f"{kind}: the model has no latent sites")
    networks = [make_network(size, i) for i in range(num_flows)]
    keys = jax.random.split(jax.random.key(0) if key is None else key, num_flows)
    own = {"flows": tuple(init(k, (size,))[1] for (init, _), k in zip(networks, keys))}
    reversal = tuple(i for start, stop in layout.values() for i in reversed(range(start, stop)))
    spec = _FlowSpec(kind, tuple(apply for _, apply in networks), reversal)
    return _joint_guide(kind, model, sites, layout, size, param_key, lambda own: _Flow(spec, own["flows"]), own)


def iaf(
    model,
    *example_args,
    num_flows=2,
    hidden_dims=None,
    skip_connections=False,
    nonlinearity=stax.Elu,
    key=None,
    param_key=None,
):
    """(guide, init_params): an inverse autoregressive flow over all unconstrained latents
    (NumPyro's AutoIAFNormal): u = F(eps), eps ~ N(0, I), F `num_flows` of NumPyro's
    `InverseAutoregressiveTransform`, each with an `AutoregressiveNN(D, hidden_dims)` (default
    `[D, D]`, D the number of unconstrained coordinates), then each site's bijection.

        guide, params = ppl.autoguide.iaf(model, None, x)
        params, losses = ppl.fit(ppl.objectives.stl(model, guide), params, x, optimizer=..., ...)

    Like `full_rank`, it is a chain of conditionals at the model's own addresses, so every flow
    is autoregressive in the model's order and, between flows, the coordinates are reversed
    *within each site's block* (NumPyro reverses the whole vector): for scalar sites the
    conditionals u_k | u_<k stay Gaussian (use `bnaf` for more). `init_params["flows"]` holds
    each network's parameters from its init (keys split from `key`, default `jax.random.key(0)`);
    `guide.median(params, ...)` is the image of eps = 0. Latents inside `scan`/`cond` raise
    `NotImplementedError`; `param_key` as for `mean_field`.

    Path-derivative training (`objectives.stl`) suits flows: measured on a 2-D Gaussian posterior
    with correlation -0.8 (tests/ppl/test_flow_autoguide.py's model), KL(q || p) after 3000 Adam
    steps is 0.0025 with STL against 0.019 with the ELBO (bnaf: 0.017 and 0.040; the best mean
    field: 0.51)."""

    def network(size, i):
        hidden = [size, size] if hidden_dims is None else list(hidden_dims)
        return AutoregressiveNN(
            size, hidden, permutation=jnp.arange(size), skip_connections=skip_connections, nonlinearity=nonlinearity
        )

    return _flow_guide("iaf", model, example_args, network, num_flows, key, param_key)


def bnaf(model, *example_args, num_flows=1, hidden_factors=(8, 8), key=None, param_key=None):
    """(guide, init_params): a block neural autoregressive flow over all unconstrained latents
    (NumPyro's AutoBNAFNormal): u = F(eps), eps ~ N(0, I), F `num_flows` of NumPyro's
    `BlockNeuralAutoregressiveTransform` with `BlockNeuralAutoregressiveNN(D, hidden_factors)`
    (gated residuals in all but the last), then each site's bijection.

        guide, params = ppl.autoguide.bnaf(model, None, x)

    Its conditionals u_k | u_<k are not Gaussian, even for scalar sites. NumPyro's BNAF has no
    inverse, which the guide's density at given values needs (every objective evaluates log q at
    a draw): here it is found by bisection, coordinate by coordinate, with its implicit
    derivative, costing about 130 network evaluations per coordinate. Otherwise as for `iaf`."""

    def network(size, i):
        return BlockNeuralAutoregressiveNN(size, list(hidden_factors), "gated" if i < num_flows - 1 else None)

    return _flow_guide("bnaf", model, example_args, network, num_flows, key, param_key)
