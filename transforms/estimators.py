"""Gradient estimators: one rule each, chosen per sample site.

An estimator is a frozen pytree attached to a site. ADEV calls
`rule(site, key, cont)` where `site` is the site with dual (primal, tangent) parameters and `cont`
runs the rest of the program:

- `cont(value, value_tangent=None, score=None, baseline=None)` continues once in dual mode; `score`
  is the tangent of a log density whose REINFORCE term (final value - baseline) * score is added
  when the program ends, `baseline` the tangent `b * score` to subtract.
- `cont.primal(values)` re-runs the rest of the program, primal only, once per leading row of
  `values` (vectorized), and returns the final values.

A rule with `local = True` calls `cont` exactly once, so it also works inside `scan` and `cond`
bodies. Rules return what `cont` returns.

An estimator whose `splits(site)` is true (exact enumeration) has no rule at that site: ADEV asks
it for `support(site)` and `probs(site, values)` and runs the rest of the program once over
all values at once, one *world* per value, weighted by its probability.

    >>> ppl.sample("k", dist.Bernoulli(p), estimator=enum())
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpyro.distributions as nd

from transforms import families
from transforms.primitives import format_address


class EstimatorError(ValueError):
    """An estimator was asked for at a site where it cannot apply."""


@dataclasses.dataclass(frozen=True)
class Estimator:
    """Base class: subclasses define `rule`, may override `check`, and set `local`."""

    local = True

    def check(self, distribution, address):
        """Raise `EstimatorError` naming `address` if the estimator cannot apply."""

    def rule(self, site, key, cont):
        raise NotImplementedError

    def splits(self, site):
        """Whether ADEV enumerates this site's values as worlds (see `Enum`)."""
        return False

    def _fail(self, address, why):
        raise EstimatorError(f"estimator {self!r} does not apply at address '{format_address(address)}': {why}")


def _estimator(cls=None, *, data=()):
    def wrap(cls):
        cls = dataclasses.dataclass(frozen=True)(cls)
        meta = [f.name for f in dataclasses.fields(cls) if f.name not in data]
        return jax.tree_util.register_dataclass(cls, data_fields=list(data), meta_fields=meta)

    return wrap(cls) if cls is not None else wrap


@_estimator
class Reparam(Estimator):
    """Reparameterization (pathwise) gradients, including NumPyro's implicit reparameterization
    (Gamma, Beta, Dirichlet): the draw is a differentiable function of the parameters."""

    def check(self, distribution, address):
        if not distribution.has_rsample:
            self._fail(
                address,
                f"{type(distribution).__name__} has no reparameterized sampler "
                "(has_rsample is False); use reinforce(), enum() or mvd()",
            )

    def rule(self, site, key, cont):
        value, tangent = site.jvp_leaves(lambda ls: site.sample(key, ls))
        return cont(value, tangent)


@_estimator(data=("baseline",))
class Reinforce(Estimator):
    """Score-function (REINFORCE) gradients: (f - b) * d log p(x). Applies to every distribution
    with a `log_prob`. `baseline` is a constant or a traced value (e.g. a learned parameter;
    it receives no gradient through this term). `leave_one_out=True` uses, for particle i of a
    site drawn under `vmap`, the mean of the objective re-run with particle i replaced by each other
    particle as its baseline (RLOO; exact leave-one-out for objectives that average particles)."""

    baseline: object = None
    leave_one_out: bool = False

    @property
    def local(self):
        return not self.leave_one_out

    def rule(self, site, key, cont):
        _check_fixed_support(self, site)
        value = site.sample(key)
        per_element = lambda d: site.per_element(lambda dist, x: jnp.sum(dist.log_prob(x)), d, value)
        _, score = site.jvp_leaves(per_element)
        if score is None:
            return cont(value)
        if self.leave_one_out:
            return self._loo(site, value, score, cont)
        baseline = None
        if self.baseline is not None:
            b = jnp.broadcast_to(site.estimator_leaves()[0], score.shape)
            baseline = jnp.sum(jax.lax.stop_gradient(b) * score)
        return cont(value, None, jnp.sum(score), baseline)

    def _loo(self, site, value, score, cont):
        if not site.batch_shape or site.batch_shape[0] < 2:
            raise EstimatorError(
                f"reinforce(leave_one_out=True) at '{site.name}' needs particles: draw "
                "the site under jax.vmap with at least 2 elements"
            )
        k = site.batch_shape[0]
        primal, tangent = cont(value)
        i, j = jnp.nonzero(~jnp.eye(k, dtype=bool), size=k * (k - 1))
        forked = fork(value, k, i, value[j])
        others = cont.primal(forked).reshape(k, k - 1)
        per_particle = jnp.sum(score.reshape(k, -1), axis=1)
        return primal, tangent + jnp.sum(per_particle * (primal - jnp.mean(others, axis=1)))


@_estimator
class Enum(Estimator):
    """Exact enumeration over a finite support. A site with one coordinate is summed exactly
    (vectorized over the support, so a chain of enumerated sites stays linear in code size); a site
    with several independent coordinates (a plate or vmap) enumerates each coordinate's derivative
    with the others held at their sampled values (local expectation gradients)."""

    local = False

    def check(self, distribution, address):
        if not distribution.has_enumerate_support:
            self._fail(address, f"{type(distribution).__name__} has no finite support to enumerate")

    def rule(self, site, key, cont):
        d = site.distribution
        n = _coordinates(site)
        value = site.sample(key)
        primal, tangent = cont(value)
        support = families.unwrap(d).enumerate_support(expand=False).reshape(-1)
        m = support.shape[0]

        def coordinate_log_probs(dist, _):
            base, shape = families.unwrap(dist), families.coordinate_shape(dist)
            return jax.vmap(lambda v: jnp.broadcast_to(base.log_prob(v), shape))(support)

        log_p, dlog_p = site.jvp_leaves(lambda ls: site.per_element(coordinate_log_probs, ls, value))
        if dlog_p is None:
            return primal, tangent
        # (batch..., m, coords...) -> (m, n)
        nb = len(site.batch_shape)
        to_rows = lambda a: jnp.moveaxis(a, nb, 0).reshape(m, n)
        weights = to_rows(jnp.exp(log_p) * dlog_p)
        rows = jnp.tile(jnp.arange(n), m)
        replacements = jnp.repeat(support, n).astype(value.dtype)
        values = cont.primal(fork(value, n, rows, replacements))
        return primal, tangent + jnp.sum(weights.reshape(-1) * values)

    def splits(self, site):
        return _coordinates(site) == 1

    def support(self, site):
        """Every value of the site's support (leading axis), each held by all its coordinates."""
        support = families.unwrap(site.distribution).enumerate_support(expand=False).reshape(-1)
        shape = site.value_shape
        return jnp.broadcast_to(support.reshape((-1,) + (1,) * len(shape)), support.shape + shape).astype(
            site.value_dtype
        )

    def probs(self, site, values):
        """(p(value), its tangent or None) for each of `values`, the support in order."""
        if site.scale == 1.0 and families.has_support_probs(site.distribution):
            one_coordinate = lambda ls: site.map(lambda d, _: families.support_probs(d), ls).reshape(-1)
            return site.jvp_leaves(one_coordinate)
        log_p, dlog_p = jax.vmap(lambda v: site.jvp_leaves(lambda ls: site.log_prob(v, ls)))(values)
        p = jnp.exp(log_p)
        return p, None if dlog_p is None else p * dlog_p


@_estimator
class MVD(Estimator):
    """Measure-valued derivatives: d/dθ p = c (p⁺ - p⁻), estimated by re-running the rest of the
    program with one coordinate drawn from p⁺ and p⁻ (Bernoulli, Categorical, Poisson, Geometric,
    Normal). Each coordinate of a batched site is forked separately."""

    local = False

    def check(self, distribution, address):
        if families.family_name(distribution) not in families.MVD_FAMILIES:
            self._fail(
                address,
                f"no measure-valued derivative is known for {type(families.unwrap(distribution)).__name__}; "
                f"supported: {', '.join(families.MVD_FAMILIES)}",
            )

    def rule(self, site, key, cont):
        key, fork_key = jax.random.split(key)
        value = site.sample(key)
        primal, tangent = cont(value)
        names, decompose = families.MVD_FAMILIES[families.family_name(site.distribution)]
        params, dparams = site.jvp_leaves(
            lambda ls: site.per_element(lambda d, _: families.coordinate_params(d, names), ls, value)
        )
        if dparams is None:
            return primal, tangent
        d = site.distribution
        n = math.prod(site.batch_shape) * math.prod(families.coordinate_shape(d))
        rows = lambda a: a.reshape((n,) + a.shape[len(site.batch_shape) + len(families.coordinate_shape(d)) :])
        params, dparams = ({k: rows(v) for k, v in ps.items()} for ps in (params, dparams))
        flat_value = value.reshape((n,) + families.unwrap(d).event_shape)
        replacements, weights, main_weight = decompose(params, dparams, flat_value, fork_key)
        j = replacements.shape[0]
        values = cont.primal(
            fork(value, n, jnp.tile(jnp.arange(n), j), replacements.reshape((j * n,) + replacements.shape[2:]))
        )
        return primal, tangent + main_weight * primal + jnp.sum(weights.reshape(-1) * values)


@_estimator
class RSVI(Estimator):
    """Reparameterization through an acceptance-rejection sampler (RSVI, Naesseth et al., 2017,
    'Reparameterization gradients through acceptance-rejection sampling algorithms'), for Gamma.
    Marsaglia and Tsang's sampler proposes h(eps, a) = (a - 1/3)(1 + eps / sqrt(9a - 3))^3 with
    eps ~ N(0, 1) and accepts or rejects; the accepted eps has density
    pi(eps; a) = Gamma(h(eps, a); a, 1) |dh/deps|, which depends on a. With eps held fixed, the
    gradient is the pathwise term through h plus the score term d log pi(eps; a) (a REINFORCE term
    of the rest of the program). A Gamma(alpha, rate) draw is h(eps, alpha + 1) u^(1/alpha) / rate,
    u ~ U(0, 1) (shape augmentation, valid for every alpha > 0). `correction=False` drops the score
    term: a biased estimator, for comparison."""

    correction: bool = True

    def check(self, distribution, address):
        if not isinstance(families.unwrap(distribution), nd.Gamma):
            self._fail(address, f"rsvi() reparameterizes Gamma's rejection sampler, not {type(distribution).__name__}")

    def rule(self, site, key, cont):
        params = lambda ls: site.map(lambda d, _: families.coordinate_params(d, ("concentration", "rate")), ls)
        alpha = jax.lax.stop_gradient(params(site.leaves)["concentration"])
        eps_key, u_key = jax.random.split(key)
        eps = _marsaglia_tsang_noise(eps_key, alpha + 1.0)
        u = jax.random.uniform(u_key, alpha.shape, minval=jnp.finfo(alpha.dtype).tiny)

        def draw(leaves):
            p = params(leaves)
            a = p["concentration"] + 1.0
            c = 1.0 / jnp.sqrt(9.0 * a - 3.0)
            h = (a - 1.0 / 3.0) * (1.0 + c * eps) ** 3
            log_pi = nd.Gamma(a).log_prob(h) + jnp.log(3.0 * (a - 1.0 / 3.0) * c * (1.0 + c * eps) ** 2)
            return h * u ** (1.0 / p["concentration"]) / p["rate"], jnp.sum(log_pi)

        (value, _), tangents = site.jvp_leaves(draw)
        if tangents is None:
            return cont(value)
        tangent, score = tangents
        return cont(value, tangent, score if self.correction else None)


def _marsaglia_tsang_noise(key, a):
    """The accepted proposal noise eps of Marsaglia and Tsang's Gamma(a) sampler (a >= 1), one per
    element of `a`: draws are repeated, element by element, until accepted."""
    d = a - 1.0 / 3.0
    c = 1.0 / jnp.sqrt(9.0 * d)

    def propose(state):
        key, eps, accepted = state
        key, k_eps, k_u = jax.random.split(key, 3)
        x = jax.random.normal(k_eps, a.shape, a.dtype)
        v = (1.0 + c * x) ** 3
        log_u = jnp.log(jax.random.uniform(k_u, a.shape, a.dtype))
        ok = (v > 0) & (log_u < 0.5 * x**2 + d - d * v + d * jnp.log(jnp.where(v > 0, v, 1.0)))
        return key, jnp.where(accepted, eps, x), accepted | ok

    start = (key, jnp.zeros_like(a), jnp.zeros(a.shape, bool))
    return jax.lax.while_loop(lambda state: ~jnp.all(state[2]), propose, start)[1]


def _coordinates(site):
    """Number of independent coordinates of a site (batch elements times the family's coordinates)."""
    return math.prod(site.batch_shape) * math.prod(families.coordinate_shape(site.distribution))


def _check_fixed_support(estimator, site):
    """Score-function gradients miss the boundary terms of a support whose bounds are the
    parameters being differentiated (Uniform's low/high, Pareto's scale): refuse those."""
    base = families.unwrap(site.distribution)
    bounds = {nd.Uniform: ("low", "high"), nd.Pareto: ("scale",)}.get(type(base))
    if bounds is None:
        return
    _, tangent = site.jvp_leaves(
        lambda leaves: site.map(lambda d, e: [jnp.asarray(getattr(families.unwrap(d), b)) for b in bounds], leaves)
    )
    if tangent is not None and any(t is not None and t.dtype != jax.dtypes.float0 for t in tangent):
        estimator._fail(
            site.address,
            f"the support of {type(base).__name__} moves with the parameters being differentiated, "
            "so the score function misses its boundary terms; use reparam()",
        )


def fork(value, n, rows, replacements):
    """Copies of `value`, viewed as `n` rows, with row `rows[v]` set to `replacements[v]`."""
    flat = value.reshape((n,) + replacements.shape[1:])
    return jax.vmap(lambda i, r: flat.at[i].set(r).reshape(value.shape))(rows, replacements)


def resolve(estimator, distribution):
    """The estimator a site uses: its own, or reparam where available, otherwise REINFORCE."""
    if estimator is not None:
        return estimator
    return Reparam() if distribution.has_rsample else Reinforce()


def reparam():
    """Reparameterization gradients (pathwise)."""
    return Reparam()


def reinforce(baseline=None, leave_one_out=False):
    """Score-function gradients, optionally with a baseline or leave-one-out baselines."""
    return Reinforce(baseline=baseline, leave_one_out=leave_one_out)


def enum():
    """Exact enumeration over a finite support."""
    return Enum()


def mvd():
    """Measure-valued derivatives."""
    return MVD()


def rsvi(correction=True):
    """Reparameterization through Gamma's acceptance-rejection sampler (see `RSVI`)."""
    return RSVI(correction=correction)
