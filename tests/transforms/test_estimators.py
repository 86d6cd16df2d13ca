"""Every gradient estimator is unbiased for every distribution family it claims, and the check has
power.

The check (`passes`): the mean of N = 20,000 vmapped gradient estimates at a random parameter point
(drawn from a seeded RNG per case) is within 5 standard errors (+1e-6) of the exact gradient in every
coordinate (`conftest.within_stderr`); an estimate with no variance at all (exact enumeration) must
equal it to float32 tolerance. Exact gradients are `jax.grad`, in float64, of a closed-form
expectation or of an exact sum over a (truncated) discrete support.

Negative controls: deliberately biased estimators, written through the public extension point
(`ppl.Estimator` subclasses), go through the very same check with the same N on the same problem
as a correct estimator, which passes, and fail it.

REINFORCE refuses a Uniform whose bounds are differentiated (the support moves, so the score
function misses boundary terms). Enumeration of a Binomial under jax.vmap inside jax.jit needs
its total_count to stay concrete through the batching rule (`primitives._as_leaf`).
"""

import dataclasses
import zlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import keys, mean_and_stderr, within_stderr
from jax.scipy.special import digamma, gammaln

import ppl
from ppl import dist

N = 20_000  # estimates per check (the spec asks for >= 10,000)
BATCH = 3  # coordinates of a batched site


# -- running estimators and exact references -----------------------------------------------------


def seed_of(name):
    return zlib.crc32(name.encode())


# Compiling dominates the cost of a check (running 20,000 estimates takes milliseconds): skip
# XLA's backend optimizations, which halves compile times on CPU.
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def grad_samples(objective, theta, n=N, seed=0):
    """n independent gradient estimates at `theta`, as float64 numpy (n, *theta.shape)."""
    theta, ks = jnp.asarray(theta, jnp.float32), keys(n, seed)
    run = jax.jit(jax.vmap(lambda k, t: objective.grad_estimate(k, t), in_axes=(0, None)))
    compiled = run.lower(ks, theta).compile(compiler_options=COMPILER_OPTIONS)
    return np.asarray(compiled(ks, theta), np.float64)


def exact_grad(expected, theta):
    """jax.grad of the closed-form expectation, in float64."""
    with jax.enable_x64(True):
        return np.asarray(jax.jit(jax.grad(expected))(jnp.asarray(theta, jnp.float64)))


def passes(samples, exact):
    """THE check: the mean is within 5 standard errors (+1e-6) of the exact gradient, per
    coordinate (`conftest.within_stderr`). An estimator without variance (every standard error
    below float32 resolution, e.g. exact enumeration) must instead equal it to float32 tolerance,
    which the 1e-6 slack alone does not allow for."""
    mean, se = mean_and_stderr(samples)
    if np.all(se <= 1e-6 * (1 + np.abs(exact))):
        return np.allclose(mean, exact, rtol=1e-5, atol=1e-6)
    return within_stderr(samples, exact)


def report(samples, exact):
    mean, se = mean_and_stderr(samples)
    z = (mean - exact) / np.maximum(se, 1e-30)
    return f"mean {mean}\nexact {exact}\nstderr {se}\nz {z}"


def assert_unbiased(samples, exact):
    assert np.all(np.isfinite(samples))
    assert passes(samples, exact), report(samples, exact)


def assert_biased(samples, exact):
    """The negative-control side of the same check (on finite estimates, so that it fails for bias)."""
    assert np.all(np.isfinite(samples))
    assert not passes(samples, exact), report(samples, exact)


def objective_for(make, f, estimator):
    @ppl.expectation
    def objective(theta):
        return f(ppl.sample("x", make(theta), estimator=estimator))

    return objective


# -- families ------------------------------------------------------------------------------------
#
# A `Case` is a scalar site: `make(theta)` is its distribution, `f` the objective's integrand,
# `expected(theta)` the closed-form E[f(x)] (written in jnp so that jax.grad applies).
# The "moment" families (Normal and the discrete ones) also give `moments(theta) = (E x, E x^2,
# E cos x)` per coordinate; `make` broadcasts over leading dimensions of theta, so the same family
# also builds batched sites (a plate) and per-element sites under jax.vmap.


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    make: Callable
    draw: Callable  # np.random.Generator -> theta (one coordinate)
    f: Callable
    expected: Callable
    moments: Callable = None


def f_scalar(x):
    x = x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.integer) else x
    return x**2 - 3.0 * jnp.cos(x)


def from_moments(moments):
    def expected(theta):
        m1, m2, mcos = moments(theta)
        return m2 - 3.0 * mcos

    return expected


def discrete_moments(pmf):
    """Moments by an exact sum over the (truncated) support: pmf(theta) -> (support, probs)."""

    def moments(theta):
        k, p = pmf(theta)
        k = k.astype(p.dtype)
        return jnp.sum(p * k), jnp.sum(p * k**2), jnp.sum(p * jnp.cos(k))

    return moments


def normal_moments(theta):
    mu, sigma = theta[0], theta[1]
    return mu, mu**2 + sigma**2, jnp.cos(mu) * jnp.exp(-(sigma**2) / 2)


def bernoulli_pmf(theta):
    p = theta[0]
    return jnp.arange(2), jnp.stack([1 - p, p])


def categorical_pmf(theta):
    return jnp.arange(theta.shape[-1]), jax.nn.softmax(theta)


def poisson_pmf(theta):
    k = jnp.arange(80)  # rate <= 3: the tail beyond 80 is below 1e-70
    rate = theta[0]
    return k, jnp.exp(k * jnp.log(rate) - rate - gammaln(k + 1.0))


def geometric_pmf(theta):
    k = jnp.arange(400)  # probs >= 0.3: the tail beyond 400 is below 1e-60
    p = theta[0]
    return k, p * (1 - p) ** k


BINOMIAL_N = 4


def binomial_pmf(theta):
    k = jnp.arange(BINOMIAL_N + 1)
    p = theta[0]
    log_comb = gammaln(BINOMIAL_N + 1.0) - gammaln(k + 1.0) - gammaln(BINOMIAL_N - k + 1.0)
    return k, jnp.exp(log_comb) * p**k * (1 - p) ** (BINOMIAL_N - k)


def moment_case(name, make, draw, moments):
    return Case(name, make, draw, f_scalar, from_moments(moments), moments)


NORMAL = moment_case(
    "Normal",
    lambda t: dist.Normal(t[..., 0], t[..., 1]),
    lambda rng: np.array([rng.uniform(-1, 1), rng.uniform(0.5, 1.5)]),
    normal_moments,
)
BERNOULLI = moment_case(
    "Bernoulli",
    lambda t: dist.Bernoulli(probs=t[..., 0]),
    lambda rng: np.array([rng.uniform(0.2, 0.8)]),
    discrete_moments(bernoulli_pmf),
)
CATEGORICAL = moment_case(
    "Categorical",
    lambda t: dist.Categorical(logits=t),
    lambda rng: rng.normal(0.0, 1.0, size=4),
    discrete_moments(categorical_pmf),
)
POISSON = moment_case(
    "Poisson",
    lambda t: dist.Poisson(t[..., 0]),
    lambda rng: np.array([rng.uniform(0.5, 3.0)]),
    discrete_moments(poisson_pmf),
)
GEOMETRIC = moment_case(
    "Geometric",
    lambda t: dist.Geometric(probs=t[..., 0]),
    lambda rng: np.array([rng.uniform(0.3, 0.8)]),
    discrete_moments(geometric_pmf),
)
BINOMIAL = moment_case(
    "Binomial",
    lambda t: dist.Binomial(BINOMIAL_N, probs=t[..., 0]),
    lambda rng: np.array([rng.uniform(0.2, 0.8)]),
    discrete_moments(binomial_pmf),
)


def _mvn_parts(t):
    loc = t[:2]
    scale_tril = jnp.array([[t[2], 0.0], [t[3], t[4]]], dtype=t.dtype)
    return loc, scale_tril


def _mvn_expected(t):
    # f(x) = (a.x)^2 + sin(b.x): E = (a.mu)^2 + a'Sa + sin(b.mu) exp(-b'Sb / 2).
    loc, scale_tril = _mvn_parts(t)
    cov = scale_tril @ scale_tril.T
    a, b = jnp.array([1.0, -1.0], t.dtype), jnp.array([1.0, 2.0], t.dtype)
    return (a @ loc) ** 2 + a @ cov @ a + jnp.sin(b @ loc) * jnp.exp(-(b @ cov @ b) / 2)


MVN = Case(
    "MultivariateNormal",
    lambda t: dist.MultivariateNormal(_mvn_parts(t)[0], scale_tril=_mvn_parts(t)[1]),
    lambda rng: np.array(
        [*rng.uniform(-1, 1, 2), rng.uniform(0.5, 1.2), rng.uniform(-0.5, 0.5), rng.uniform(0.5, 1.2)]
    ),
    lambda x: (x[0] - x[1]) ** 2 + jnp.sin(x[0] + 2 * x[1]),
    _mvn_expected,
)


def _lognormal_expected(t):
    # f(x) = x + 1/x: E[x] = exp(mu + s^2/2), E[1/x] = exp(-mu + s^2/2).
    mu, s = t[0], t[1]
    return jnp.exp(mu + s**2 / 2) + jnp.exp(-mu + s**2 / 2)


lognormal_draw = lambda rng: np.array([rng.uniform(-0.5, 0.5), rng.uniform(0.3, 0.7)])

LOGNORMAL = Case(
    "LogNormal", lambda t: dist.LogNormal(t[0], t[1]), lognormal_draw, lambda x: x + 1 / x, _lognormal_expected
)
UNIFORM = Case(
    "Uniform",
    lambda t: dist.Uniform(t[0], t[1]),
    lambda rng: np.array([rng.uniform(-1, 0), rng.uniform(0.5, 1.5)]),
    lambda x: x**2 + jnp.sin(x),
    lambda t: (t[0] ** 2 + t[0] * t[1] + t[1] ** 2) / 3 + (jnp.cos(t[0]) - jnp.cos(t[1])) / (t[1] - t[0]),
)
GAMMA = Case(
    "Gamma",
    lambda t: dist.Gamma(t[0], t[1]),
    lambda rng: np.array([rng.uniform(1, 3), rng.uniform(0.7, 2)]),
    lambda x: x**2 + jnp.exp(-x),
    # E[x^2] = a(a+1)/b^2, E[exp(-x)] = (b/(b+1))^a
    lambda t: t[0] * (t[0] + 1) / t[1] ** 2 + (t[1] / (t[1] + 1)) ** t[0],
)


def _beta_expected(t):
    # f(x) = x^2 + log x: E[x^2] = a(a+1) / (s(s+1)), E[log x] = digamma(a) - digamma(s).
    a, b = t[0], t[1]
    s = a + b
    return a * (a + 1) / (s * (s + 1)) + digamma(a) - digamma(s)


BETA = Case(
    "Beta",
    lambda t: dist.Beta(t[0], t[1]),
    lambda rng: rng.uniform(1, 3, 2),
    lambda x: x**2 + jnp.log(x),
    _beta_expected,
)


def _dirichlet_expected(t):
    # f(x) = x0^2 x1 + x2: E[x0^2 x1] = a0(a0+1)a1 / (s(s+1)(s+2)), E[x2] = a2/s.
    s = jnp.sum(t)
    return t[0] * (t[0] + 1) * t[1] / (s * (s + 1) * (s + 2)) + t[2] / s


DIRICHLET = Case(
    "Dirichlet",
    lambda t: dist.Dirichlet(t),
    lambda rng: rng.uniform(1, 3, 3),
    lambda x: x[0] ** 2 * x[1] + x[2],
    _dirichlet_expected,
)
TRANSFORMED_EXP = Case(
    "Transformed(Normal, Exp)",
    lambda t: dist.TransformedDistribution(dist.Normal(t[0], t[1]), dist.transforms.ExpTransform()),
    lognormal_draw,
    lambda x: x + 1 / x,
    _lognormal_expected,
)
# y = c + d x, x ~ Normal(m, 1), parameters in both the base and the transform: y ~ N(c + d m, d^2).
TRANSFORMED_AFFINE = Case(
    "Transformed(Normal, Affine)",
    lambda t: dist.TransformedDistribution(dist.Normal(t[0], 1.0), dist.transforms.AffineTransform(t[1], t[2])),
    lambda rng: np.array([rng.uniform(-1, 1), rng.uniform(-1, 1), rng.uniform(0.5, 1.5)]),
    f_scalar,
    lambda t: from_moments(normal_moments)(jnp.stack([t[1] + t[2] * t[0], t[2]])),
)

CONTINUOUS = [NORMAL, MVN, LOGNORMAL, UNIFORM, GAMMA, BETA, DIRICHLET, TRANSFORMED_EXP, TRANSFORMED_AFFINE]
DISCRETE = [BERNOULLI, CATEGORICAL, POISSON, GEOMETRIC, BINOMIAL]


def theta_for(case, tag=""):
    rng = np.random.default_rng(seed_of(case.name + tag))
    return np.asarray(case.draw(rng), np.float32)


def scalar_problem(case, tag):
    """(objective for an estimator, parameter point, exact gradient) for one scalar site."""
    theta = theta_for(case, tag)
    exact = exact_grad(case.expected, theta)
    assert np.all(np.abs(exact) > 1e-3), "pick a parameter point with a nontrivial gradient"
    return (lambda est: objective_for(case.make, case.f, est)), theta, exact


def check_scalar(case, estimator, tag):
    objective, theta, exact = scalar_problem(case, tag)
    samples = grad_samples(objective(estimator), theta, seed=seed_of(case.name + tag))
    assert_unbiased(samples, exact)
    return samples, exact


def ids(cases):
    return [c.name for c in cases]


# -- batched sites: a plate and a site under jax.vmap --------------------------------------------

C = np.array([1.0, -2.0, 0.5])


def f_batched(x):
    """Couples the coordinates: (c.x)^2 + prod_i cos(x_i)."""
    x = x.astype(jnp.float32)
    return (x @ C.astype(np.float32)) ** 2 + jnp.prod(jnp.cos(x))


def batched_expected(moments):
    def expected(theta):  # theta: (BATCH, params per coordinate); coordinates independent
        m1, m2, mcos = jax.vmap(moments)(theta)
        c = jnp.asarray(C, theta.dtype)
        return (c @ m1) ** 2 + c**2 @ (m2 - m1**2) + jnp.prod(mcos)

    return expected


def batched_objective(case, estimator, layout):
    @ppl.expectation
    def objective(theta):
        if layout == "plate":
            x = ppl.sample("x", case.make(theta), estimator=estimator)
        else:
            x = jax.vmap(lambda t: ppl.sample("x", case.make(t), estimator=estimator))(theta)
        return f_batched(x)

    return objective


def batched_problem(case, layout, tag):
    rng = np.random.default_rng(seed_of(case.name + tag + layout))
    theta = np.stack([case.draw(rng) for _ in range(BATCH)]).astype(np.float32)
    exact = exact_grad(batched_expected(case.moments), theta)
    return (lambda est: batched_objective(case, est, layout)), theta, exact


def check_batched(case, estimator, layout, tag):
    objective, theta, exact = batched_problem(case, layout, tag)
    samples = grad_samples(objective(estimator), theta, seed=seed_of(case.name + layout))
    assert_unbiased(samples, exact)


# -- reparam ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CONTINUOUS, ids=ids(CONTINUOUS))
def test_reparam_is_unbiased(case):
    check_scalar(case, ppl.reparam(), "reparam")


# -- REINFORCE -------------------------------------------------------------------------------------

REINFORCE_CASES = [c for c in CONTINUOUS + DISCRETE if c is not UNIFORM]


@pytest.mark.parametrize("case", REINFORCE_CASES, ids=ids(REINFORCE_CASES))
def test_reinforce_is_unbiased(case):
    check_scalar(case, ppl.reinforce(), "reinforce")


def test_reinforce_refuses_a_uniform_whose_bounds_are_differentiated():
    """d/da E[f] for Uniform(a, b) has boundary terms -f(a)/(b-a) (and +f(b)/(b-a) for b) that the
    score function d log p = (1, -1)/(b-a) cannot produce, so REINFORCE would be biased there."""
    objective = objective_for(UNIFORM.make, UNIFORM.f, ppl.reinforce())
    with pytest.raises(ppl.EstimatorError, match="Uniform moves with the parameters"):
        objective.grad_estimate(jax.random.key(0), theta_for(UNIFORM, "reinforce"))


def offset_normal_objective(estimator):
    # A large offset in f: plain REINFORCE pays for it in variance, a baseline near E[f] does not.
    @ppl.expectation
    def objective(theta):
        x = ppl.sample("x", dist.Normal(theta[0], theta[1]), estimator=estimator)
        return f_scalar(x) + 10.0

    return objective


def test_reinforce_with_a_constant_baseline_is_unbiased_and_reduces_variance():
    theta = theta_for(NORMAL, "baseline")
    exact = exact_grad(NORMAL.expected, theta)
    baseline = float(NORMAL.expected(jnp.asarray(theta)) + 10.0)
    plain = grad_samples(offset_normal_objective(ppl.reinforce()), theta, seed=1)
    with_baseline = grad_samples(offset_normal_objective(ppl.reinforce(baseline=baseline)), theta, seed=2)
    assert_unbiased(plain, exact)
    assert_unbiased(with_baseline, exact)
    ratio = with_baseline.var(0) / plain.var(0)
    assert np.all(ratio < 0.5), ratio


def test_reinforce_with_a_traced_baseline_is_unbiased_and_gives_the_baseline_no_gradient():
    @ppl.expectation
    def objective(theta):  # theta = (loc, scale, baseline)
        x = ppl.sample("x", dist.Normal(theta[0], theta[1]), estimator=ppl.reinforce(baseline=theta[2]))
        return f_scalar(x)

    theta = np.append(theta_for(NORMAL, "traced"), np.float32(1.7))
    samples = grad_samples(objective, theta, seed=3)
    exact = np.append(exact_grad(NORMAL.expected, theta[:2]), 0.0)
    assert_unbiased(samples, exact)
    assert np.all(samples[:, 2] == 0.0)


K = 8


def particles_objective(case, estimator):
    @ppl.expectation
    def objective(theta):
        x = jax.vmap(lambda _: ppl.sample("x", case.make(theta), estimator=estimator))(jnp.arange(K))
        return jnp.mean(f_scalar(x) + 10.0)

    return objective


@pytest.mark.parametrize("case", [NORMAL, BERNOULLI], ids=["Normal", "Bernoulli"])
def test_reinforce_leave_one_out_is_unbiased_and_reduces_variance(case):
    theta = theta_for(case, "loo")
    exact = exact_grad(case.expected, theta)
    plain = grad_samples(particles_objective(case, ppl.reinforce()), theta, seed=4)
    loo = grad_samples(particles_objective(case, ppl.reinforce(leave_one_out=True)), theta, seed=5)
    assert_unbiased(plain, exact)
    assert_unbiased(loo, exact)
    ratio = loo.var(0) / plain.var(0)
    assert np.all(ratio < 0.5), ratio


def test_a_wrong_expected_gradient_is_rejected_for_reinforce():
    """Power: the same REINFORCE samples that pass against the exact gradient fail against one
    10% off (the standard error here is about 1.2% of the gradient)."""
    samples, exact = check_scalar(BINOMIAL, ppl.reinforce(), "reinforce")
    assert_biased(samples, exact * 1.1)


# -- enumeration -----------------------------------------------------------------------------------

ENUM_CASES = [BERNOULLI, CATEGORICAL, BINOMIAL]


@pytest.mark.parametrize("case", ENUM_CASES, ids=ids(ENUM_CASES))
def test_enum_scalar_site_is_exact(case):
    theta = theta_for(case, "enum")
    samples = grad_samples(objective_for(case.make, case.f, ppl.enum()), theta)
    exact = exact_grad(case.expected, theta)
    assert np.all(samples == samples[0]), "an enumerated scalar site has no variance"
    np.testing.assert_allclose(samples[0], exact, rtol=1e-5, atol=1e-6)


LAYOUTS = ["plate", "vmap"]
ENUM_BATCHED = [pytest.param(c, layout, id=f"{c.name}-{layout}") for c in ENUM_CASES for layout in LAYOUTS]


@pytest.mark.parametrize("case, layout", ENUM_BATCHED)
def test_enum_batched_site_is_unbiased(case, layout):
    check_batched(case, ppl.enum(), layout, "enum")


@pytest.mark.parametrize("parametrization", ["logits", "probs", "expanded"])
def test_enum_chain_of_three_dependent_sites_is_exact(parametrization):
    # theta: x1 ~ Bernoulli(sigmoid(t0)); x2 ~ Categorical(logits = t1:4 + t4 x1);
    # x3 ~ Binomial(3, sigmoid(t5 + t6 x2)); f also depends on theta directly. Bernoulli and
    # Categorical weights are read off either parameter (also under a size-1 `expand`), the
    # Binomial's come from its log_prob.
    def dists(t, x1=None, x2=None):
        if x1 is None:
            if parametrization == "logits":
                return dist.Bernoulli(logits=t[0])
            d = dist.Bernoulli(probs=jax.nn.sigmoid(t[0]))
            return d.expand((1,)) if parametrization == "expanded" else d
        if x2 is None:
            logits = t[1:4] + t[4] * jnp.sum(x1)
            if parametrization == "logits":
                return dist.Categorical(logits=logits)
            return dist.Categorical(probs=jax.nn.softmax(logits))
        return dist.Binomial(3, logits=t[5] + t[6] * x2)

    def f(t, x1, x2, x3):
        return (x1 + x2 - x3) ** 2 + jnp.sin(x1 * x2 + x3) * t[0] + x3 * t[6]

    @ppl.expectation
    def objective(t):
        x1 = jnp.sum(ppl.sample("x1", dists(t), estimator=ppl.enum()))
        x2 = ppl.sample("x2", dists(t, x1), estimator=ppl.enum())
        x3 = ppl.sample("x3", dists(t, x1, x2), estimator=ppl.enum())
        return f(t, *(v.astype(t.dtype) for v in (x1, x2, x3)))

    def expected(t):  # the exact sum over all 2 * 3 * 4 paths, with closed-form pmfs
        x1, x2, x3 = (jnp.arange(m, dtype=t.dtype) for m in (2, 3, 4))
        p1 = jnp.stack([jax.nn.sigmoid(-t[0]), jax.nn.sigmoid(t[0])])  # [x1]
        p2 = jax.nn.softmax(t[1:4] + t[4] * x1[:, None], axis=-1)  # [x1, x2]
        q = jax.nn.sigmoid(t[5] + t[6] * x2)[:, None]
        p3 = jnp.array([1.0, 3.0, 3.0, 1.0], t.dtype) * q**x3 * (1 - q) ** (3 - x3)  # [x2, x3]
        paths = p1[:, None, None] * p2[:, :, None] * p3[None, :, :]
        values = f(t, x1[:, None, None], x2[None, :, None], x3[None, None, :])
        return jnp.sum(paths * values)

    theta = np.random.default_rng(7).normal(0.0, 1.0, 7).astype(np.float32)
    samples = grad_samples(objective, theta)
    exact = exact_grad(expected, theta)
    assert np.all(samples == samples[0]), "a chain of enumerated scalar sites has no variance"
    np.testing.assert_allclose(samples[0], exact, rtol=1e-5, atol=1e-6)


# -- measure-valued derivatives --------------------------------------------------------------------

MVD_CASES = [BERNOULLI, CATEGORICAL, POISSON, GEOMETRIC, NORMAL]


@pytest.mark.parametrize("case", MVD_CASES, ids=ids(MVD_CASES))
def test_mvd_scalar_site_is_unbiased(case):
    check_scalar(case, ppl.mvd(), "mvd")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", MVD_CASES, ids=ids(MVD_CASES))
def test_mvd_batched_site_is_unbiased(case, layout):
    check_batched(case, ppl.mvd(), layout, "mvd")


# -- negative controls: biased estimators through the public extension point ------------------------


def estimator_class(cls):
    cls = dataclasses.dataclass(frozen=True)(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    return jax.tree_util.register_dataclass(cls, data_fields=[], meta_fields=fields)


@estimator_class
class ScoreDroppingReinforce(ppl.Estimator):
    """REINFORCE without its score term: the sample carries no gradient at all."""

    def rule(self, site, key, cont):
        return cont(site.sample(key))


@estimator_class
class SampleBaselineReinforce(ppl.Estimator):
    """REINFORCE with a baseline that depends on the sample itself (b = x): biased by
    -E[x d log p] = -d E[x]."""

    def rule(self, site, key, cont):
        value = site.sample(key)
        _, score = site.jvp_leaves(lambda ls: site.log_prob(value, ls))
        return cont(value, None, score, jax.lax.stop_gradient(jnp.sum(value)) * score)


@estimator_class
class DetachedReparam(ppl.Estimator):
    """Reparameterization with the gradient stopped at the sample."""

    def check(self, distribution, address):
        if not distribution.has_rsample:
            self._fail(address, "no rsample")

    def rule(self, site, key, cont):
        value, _ = site.jvp_leaves(lambda ls: site.sample(key, ls))
        return cont(jax.lax.stop_gradient(value))


class _LastForkDropped:
    """A continuation whose last forked re-run (`cont.primal`) returns 0."""

    def __init__(self, cont):
        self._cont = cont

    def __call__(self, *args):
        return self._cont(*args)

    def primal(self, values):
        return self._cont.primal(values).at[-1].set(0.0)


@estimator_class
class DropOneFork(ppl.Estimator):
    """`inner` (enum or mvd) with the term of one forked continuation dropped, as if its weight
    were zero."""

    inner: ppl.Estimator = None
    local = False

    def check(self, distribution, address):
        self.inner.check(distribution, address)

    def rule(self, site, key, cont):
        return self.inner.rule(site, key, _LastForkDropped(cont))


@estimator_class
class ScalarEnum(ppl.Estimator):
    """Enumeration of a scalar site's support; `drop_last_weight` drops the score weight
    dp(v) f(v) of the last support value."""

    drop_last_weight: bool = False
    local = False

    def rule(self, site, key, cont):
        support = site.distribution.enumerate_support(expand=False).astype(site.value_dtype)
        log_p, dlog_p = jax.vmap(lambda v: site.jvp_leaves(lambda ls: site.log_prob(v, ls)))(support)
        primals, tangents = jax.vmap(lambda v: cont(v))(support)
        p = jnp.exp(log_p)
        weights = p * dlog_p
        if self.drop_last_weight:
            weights = weights.at[-1].set(0.0)
        return jnp.sum(p * primals), jnp.sum(p * tangents) + jnp.sum(weights * primals)


NEGATIVE_CONTROLS = [
    # (correct estimator, biased variant, case, layout of the site)
    (ppl.reinforce(), ScoreDroppingReinforce(), CATEGORICAL, "scalar"),
    (ppl.reinforce(), SampleBaselineReinforce(), NORMAL, "scalar"),
    (ppl.reparam(), DetachedReparam(), NORMAL, "scalar"),
    (ppl.mvd(), DropOneFork(ppl.mvd()), NORMAL, "scalar"),
    (ppl.mvd(), DropOneFork(ppl.mvd()), POISSON, "plate"),
    (ppl.enum(), DropOneFork(ppl.enum()), BERNOULLI, "plate"),
    (ppl.enum(), ScalarEnum(drop_last_weight=True), CATEGORICAL, "scalar"),
    (ScalarEnum(), ScalarEnum(drop_last_weight=True), BINOMIAL, "scalar"),
]


@pytest.mark.parametrize(
    "correct, biased, case, layout",
    NEGATIVE_CONTROLS,
    ids=[f"{type(b).__name__}-vs-{type(a).__name__}-{c.name}-{layout}" for a, b, c, layout in NEGATIVE_CONTROLS],
)
def test_the_check_rejects_a_biased_estimator(correct, biased, case, layout):
    """The same problem, sample size (N) and check pass the correct estimator and fail the biased one."""
    if layout == "scalar":
        objective, theta, exact = scalar_problem(case, "negative")
    else:
        objective, theta, exact = batched_problem(case, layout, "negative")
    assert_unbiased(grad_samples(objective(correct), theta, seed=11), exact)
    assert_biased(grad_samples(objective(biased), theta, seed=11), exact)
