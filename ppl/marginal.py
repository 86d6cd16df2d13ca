"""Marginalization and normalization: exact sums over finite-support sites, or nested importance
sampling (Becker, Lew et al., "Probabilistic programming with programmable variational inference",
PLDI 2024).

`marginal(p, keep, exact())` is the marginal of `p` over the addresses in `keep` with every other
site summed out exactly (each must have a finite support): `ppl.density(m)(z, *args)` is
log sum_u p(z, u) (deterministic, differentiated by JAX), `ppl.sim(m)(*args)` a draw of z with that
exact log density. Plates cost linear time in their size, `lax.scan` chains the forward algorithm
(see `transforms.exact`). `m.marginals(z, *args)`, `m.map(z, *args)` and `m.sample(key, z, *args)`
give the posterior over the summed-out sites: marginals, the most probable assignment (the Viterbi
path in a scan), exact joint draws (forward filtering, backward sampling in a scan).

    hmm = ppl.marginal(model, keep=[], algorithm=ppl.exact())
    log_lik = ppl.density(hmm)({}, params, x)                 # the forward algorithm
    path = hmm.map({}, params, x)["z"]                        # Viterbi

`marginal(q, keep, sir(K, proposal=r))` stands for the marginal of `q` over the addresses in
`keep`; the other addresses u are integrated out by importance sampling with proposal r(u | z):

- `ppl.sim(m)(*args) -> (z, log_w)`: z from q, and log_w with E[exp(-log_w)] = 1 / q(z) (one
  particle from q's own u, K - 1 from r), so -log_w can stand in for -log q(z) in a lower bound:
  K = 1 gives hierarchical VI (HVI), K > 1 importance weighted HVI (IWHVI);
- `ppl.density(m)(z, *args)`: log of an unbiased estimate of q(z) from K particles of r.

`normalize(p, constraints, sir(K, proposal=q))` stands for the posterior of `p` given the
constraints, approximated by sampling importance resampling: `sim` resamples one of K particles
of q and returns log p(z, x) - log Z_hat (whose exponential's reciprocal is unbiased for the
reciprocal of the SIR density); `density` is the matching estimate with z as one of the particles.

Without a proposal, `marginal` proposes u from q's own prior given z (the `generate` weight).
Both objects are used through `ppl.sim` and `ppl.density` inside an `@ppl.expectation`.

    q_z = ppl.marginal(guide, keep=["z"], algorithm=ppl.sir(5, proposal=reverse_model))
    z, log_w = ppl.sim(q_z)(params, x)
"""

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ppl import dist
from ppl.choicemap import flatten_choices, nest_choices
from ppl.expectation import density, sim
from transforms import exact as exact_elimination
from transforms import gfi
from transforms.primitives import format_address, sample_site


class SIR(NamedTuple):
    """Importance sampling with `num_particles` particles from `proposal` (a generative function)."""

    num_particles: int
    proposal: Any = None


def sir(num_particles, proposal=None):
    """The importance-sampling algorithm for `marginal` and `normalize`."""
    if num_particles < 1:
        raise ValueError(f"sir needs at least one particle, got {num_particles}")
    return SIR(num_particles, proposal)


def _log_mean_exp(log_w):
    return jax.nn.logsumexp(log_w) - math.log(log_w.shape[0])


def _particles(fn, n):
    return jax.vmap(lambda _: fn())(jnp.arange(n))


class Marginal:
    """The marginal of a generative function over some of its addresses (see module docstring)."""

    def __init__(self, gen_fn, keep, algorithm):
        self.gen_fn, self.algorithm = gen_fn, algorithm
        self.keep = frozenset(a if isinstance(a, tuple) else (a,) for a in keep)

    def _split(self, flat):
        kept = {a: v for a, v in flat.items() if a in self.keep}
        return kept, {a: v for a, v in flat.items() if a not in self.keep}

    def _proposed_log_weight(self, kept, args):
        """log q(z, u) - log r(u | z) for one u from the proposal."""
        proposal = self.algorithm.proposal
        if proposal is None:
            closed, flat_args, _ = self.gen_fn.stage(*args)
            return gfi.staged_generate(closed, flat_args, kept)[2]
        u, log_r = sim(proposal)(nest_choices(kept), *args)
        return density(self.gen_fn)(nest_choices(kept) | u, *args) - log_r

    def sim_estimate(self, *args):
        full, log_q = sim(self.gen_fn)(*args)
        kept, rest = self._split(flatten_choices(full))
        unknown = self.keep - set(kept)
        if unknown:
            raise KeyError(f"marginal keeps addresses the program does not have: {sorted(unknown)}")
        if self.algorithm.proposal is None:
            closed, flat_args, _ = self.gen_fn.stage(*args)
            first = gfi.staged_generate(closed, flat_args, {**kept, **rest}, weigh=self.keep)[2]
        else:
            first = log_q - density(self.algorithm.proposal)(nest_choices(rest), nest_choices(kept), *args)
        log_w = first[None]
        if self.algorithm.num_particles > 1:
            others = _particles(lambda: self._proposed_log_weight(kept, args), self.algorithm.num_particles - 1)
            log_w = jnp.concatenate([log_w, others])
        return nest_choices(kept), _log_mean_exp(log_w)

    def density_estimate(self, choices, *args):
        kept = flatten_choices(choices)
        return _log_mean_exp(_particles(lambda: self._proposed_log_weight(kept, args), self.algorithm.num_particles))


class Exact(NamedTuple):
    """Exact summation of the sites not kept (see the module docstring)."""


def exact():
    """The exact algorithm for `marginal`: `ppl.marginal(model, keep=["mu"], algorithm=ppl.exact())`."""
    return Exact()


class ExactMarginal:
    """The marginal of a generative function over `keep`, its other sites summed out exactly."""

    def __init__(self, gen_fn, keep):
        self.gen_fn = gen_fn
        self.keep = frozenset(a if isinstance(a, tuple) else (a,) for a in keep)

    def _given(self, choices):
        given = flatten_choices(choices)
        extra = set(given) - self.keep
        if extra:
            shown = ", ".join(sorted(map(format_address, extra)))
            raise KeyError(f"values given for sites the marginal sums out: {shown}; to condition on them, keep them")
        missing = self.keep - set(given)
        if missing:
            shown = ", ".join(sorted(map(format_address, missing)))
            raise KeyError(f"the marginal keeps {shown}, so its density needs their values")
        return given

    def density_estimate(self, choices, *args):
        """log p(choices) with the other sites summed out: exact, not an estimate."""
        closed, flat_args, _ = self.gen_fn.stage(*args)
        return exact_elimination.log_marginal(closed, flat_args, self._given(choices))

    def sim_estimate(self, *args):
        full, _ = sim(self.gen_fn)(*args)
        kept = nest_choices({a: v for a, v in flatten_choices(full).items() if a in self.keep})
        return kept, self.density_estimate(kept, *args)

    def marginals(self, choices, *args):
        """{address: p(value | choices)} for every summed-out site: its value's shape plus a last
        axis over its support values (in `enumerate_support` order)."""
        closed, flat_args, _ = self.gen_fn.stage(*args)
        return nest_choices(exact_elimination.posterior(closed, flat_args, self._given(choices)))

    def sample(self, key, choices, *args):
        """{address: value}: one exact draw of the summed-out sites from their posterior given
        `choices` (forward filtering, backward sampling in a scan), as Pyro's `infer_discrete`."""
        closed, flat_args, _ = self.gen_fn.stage(*args)
        return nest_choices(exact_elimination.sample(closed, flat_args, self._given(choices), key))

    def map(self, choices, *args):
        """{address: value} of the most probable joint assignment of the summed-out sites given
        `choices` (Viterbi in a scan; ties broken arbitrarily)."""
        closed, flat_args, _ = self.gen_fn.stage(*args)
        given = self._given(choices)
        return nest_choices(exact_elimination.posterior(closed, flat_args, given, exact_elimination.MAX))


def marginal(gen_fn, keep, algorithm):
    """The marginal of `gen_fn` over the addresses in `keep`, by `algorithm`: `ppl.exact()` (sum
    the other sites out) or `ppl.sir(K, proposal)` (importance sampling)."""
    if isinstance(algorithm, Exact):
        return ExactMarginal(gen_fn, keep)
    return Marginal(gen_fn, keep, algorithm)


class Normalized:
    """The posterior of a program given constraints, approximated by SIR (see module docstring)."""

    def __init__(self, model, constraints, algorithm):
        if algorithm.proposal is None:
            raise ValueError("normalize needs a proposal: ppl.sir(K, proposal=guide)")
        self.model, self.constraints, self.algorithm = model, constraints, algorithm

    def _observed(self, args):
        return self.constraints(*args) if callable(self.constraints) else self.constraints

    def _particle(self, args):
        z, log_q = sim(self.algorithm.proposal)(*args)
        return z, density(self.model)(z | self._observed(args), *args) - log_q

    def sim_estimate(self, *args):
        zs, log_w = _particles(lambda: self._particle(args), self.algorithm.num_particles)
        index = sample_site(("normalize", "resample"), dist.Categorical(logits=jax.lax.stop_gradient(log_w)), None)
        z = jax.tree.map(lambda a: a[index], zs)
        log_p = density(self.model)(z | self._observed(args), *args)
        return z, log_p - _log_mean_exp(log_w)

    def density_estimate(self, choices, *args):
        log_p = density(self.model)(choices | self._observed(args), *args)
        log_q = density(self.algorithm.proposal)(choices, *args)
        if self.algorithm.num_particles > 1:
            _, others = _particles(lambda: self._particle(args), self.algorithm.num_particles - 1)
        else:
            others = jnp.zeros((0,))
        return log_p - _log_mean_exp(jnp.concatenate([(log_p - log_q)[None], others]))


def normalize(model, constraints, algorithm):
    """The posterior of `model` given `constraints` (a choice map, or a function of the
    arguments returning one), by `algorithm` (`ppl.sir` with a proposal)."""
    return Normalized(model, constraints, algorithm)
