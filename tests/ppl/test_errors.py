"""Every user error is raised at trace time and names the address (or primitive) it is about."""

import jax
import jax.numpy as jnp
import pytest
from jax import lax

import ppl
from ppl import dist

KEY = jax.random.key(0)


@ppl.gen
def model():
    z = ppl.sample("z", dist.Normal(0.0, 1.0))
    ppl.sample("x", dist.Normal(z, 1.0).expand((2,)))
    return z


@ppl.gen
def encoder():
    return ppl.sample("h", dist.Normal(0.0, 1.0))


@ppl.gen
def outer():
    h = ppl.sample("enc", encoder)
    return ppl.sample("z", dist.Normal(h, 1.0))


# -- addresses ----------------------------------------------------------------------------------


def test_duplicate_address():
    @ppl.gen
    def twice():
        ppl.sample("a", dist.Normal(0.0, 1.0))
        ppl.sample("a", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="duplicate address 'a'"):
        twice.simulate(KEY)


def test_duplicate_address_through_nested_calls():
    @ppl.gen
    def two_calls():
        ppl.sample("enc", encoder)
        ppl.sample("enc", encoder)

    with pytest.raises(ValueError, match="duplicate address 'enc/h'"):
        two_calls.simulate(KEY)


def test_one_address_in_two_branches_of_a_cond_is_not_a_duplicate():
    @ppl.gen
    def branches(flag):
        return lax.cond(
            flag, lambda: ppl.sample("a", dist.Normal(0.0, 1.0)), lambda: ppl.sample("a", dist.Normal(5.0, 1.0))
        )

    assert set(branches.simulate(KEY, True).choices) == {"a"}


def test_unknown_address_in_choices():
    with pytest.raises(KeyError, match="unknown address 'w' in the choices.*x, z"):
        model.assess({"z": 0.0, "x": jnp.zeros(2), "w": 1.0})
    with pytest.raises(KeyError, match="unknown address 'enc/k' in the choices"):
        outer.assess({"z": 0.0, "enc": {"h": 0.0, "k": 1.0}})


def test_unknown_address_in_constraints():
    with pytest.raises(KeyError, match="unknown address 'q' in the constraints"):
        model.generate(KEY, {"q": 1.0})


def test_unknown_address_in_with_estimators():
    with pytest.raises(KeyError, match="unknown address 'zz' in the estimator overrides"):
        ppl.with_estimators(model, {"zz": ppl.reinforce()}).simulate(KEY)
    with pytest.raises(KeyError, match="unknown address 'enc/zz' in the estimator overrides"):
        ppl.with_estimators(outer, {"enc": {"zz": ppl.reinforce()}}).simulate(KEY)


def test_missing_choice_in_assess():
    with pytest.raises(KeyError, match="no value for address 'x'"):
        model.assess({"z": 0.0})
    with pytest.raises(KeyError, match="no value for address 'enc/h'"):
        outer.assess({"z": 0.0})


def test_missing_choice_in_density_inside_an_expectation():
    @ppl.expectation
    def objective(theta):
        return ppl.density(model)({"z": theta}) * 1.0

    with pytest.raises(KeyError, match="no value for address 'x'"):
        objective.estimate(KEY, 0.0)


def test_address_must_be_a_string():
    with pytest.raises(TypeError, match="address is a string"):
        ppl.gen(lambda: ppl.sample(1, dist.Normal(0.0, 1.0))).simulate(KEY)


# -- values ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [jnp.zeros(3), jnp.zeros((2, 1)), 0.0], ids=["longer", "extra-dim", "scalar"])
def test_observation_shape_mismatch(value):
    with pytest.raises(ValueError, match=r"shape mismatch at address 'x'.*\(2,\)"):
        model.assess({"z": 0.0, "x": value})
    with pytest.raises(ValueError, match="shape mismatch at address 'x'"):
        model.generate(KEY, {"x": value})


def test_choice_inside_scan_needs_the_scan_length():
    @ppl.gen
    def walk():
        return lax.scan(lambda c, _: (c + ppl.sample("s", dist.Normal(c, 1.0)), None), 0.0, None, length=3)[0]

    with pytest.raises(ValueError, match="choice at 's' is inside a scan of length 3"):
        walk.assess({"s": jnp.zeros(2)})
    with pytest.raises(ValueError, match="choice at 's' is inside a scan of length 3"):
        walk.generate(KEY, {"s": 0.0})


def test_choices_of_other_python_types_are_converted():
    """Python scalars, lists and integer data are accepted (cast to the site's dtype)."""
    score, _ = model.assess({"z": 1, "x": [0, 1]})
    expected = dist.Normal(0.0, 1.0).log_prob(1.0) + jnp.sum(dist.Normal(1.0, 1.0).log_prob(jnp.array([0.0, 1.0])))
    assert jnp.allclose(score, expected)

    @ppl.gen
    def coins(p):
        ppl.sample("y", dist.Bernoulli(probs=p).expand((3,)))

    score, _ = coins.assess({"y": jnp.array([1.0, 0.0, 1.0])}, 0.25)  # float 0/1 data at a Bernoulli site
    assert jnp.allclose(score, 2 * jnp.log(0.25) + jnp.log(0.75))


# -- estimators -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "estimator, distribution, why",
    [
        (ppl.reparam(), dist.Bernoulli(probs=0.5), "no reparameterized sampler"),
        (ppl.enum(), dist.Normal(0.0, 1.0), "no finite support"),
        (ppl.mvd(), dist.Gamma(2.0, 1.0), "no measure-valued derivative is known for Gamma"),
    ],
    ids=["reparam-bernoulli", "enum-normal", "mvd-gamma"],
)
def test_estimator_distribution_mismatch(estimator, distribution, why):
    pattern = f"does not apply at address 'site': .*{why}"

    @ppl.gen
    def guide():
        return ppl.sample("site", distribution, estimator=estimator)

    with pytest.raises(ppl.EstimatorError, match=pattern):
        guide.simulate(KEY)

    @ppl.expectation
    def objective(loc):
        return ppl.sample("site", distribution, estimator=estimator) * loc

    with pytest.raises(ppl.EstimatorError, match=pattern):
        objective.grad_estimate(KEY, 1.0)

    @ppl.gen
    def plain():
        return ppl.sample("site", distribution)

    with pytest.raises(ppl.EstimatorError, match=pattern):
        ppl.with_estimators(plain, {"site": estimator}).simulate(KEY)


def test_estimator_mismatch_at_a_nested_address():
    with pytest.raises(ppl.EstimatorError, match="address 'enc/h'.*no finite support"):
        ppl.with_estimators(outer, {"enc": {"h": ppl.enum()}}).simulate(KEY)


def test_estimator_is_for_distributions_only():
    with pytest.raises(TypeError, match="'enc'"):
        ppl.gen(lambda: ppl.sample("enc", encoder, estimator=ppl.reinforce())).simulate(KEY)
    with pytest.raises(TypeError, match="estimator at 'z' must be an estimator"):
        ppl.gen(lambda: ppl.sample("z", dist.Normal(0.0, 1.0), estimator="reparam")).simulate(KEY)


# -- where sample may be called -------------------------------------------------------------------


def test_sample_outside_any_transformation():
    message = "ppl.sample at address 'loose' was called outside any generative function or expectation"
    with pytest.raises(RuntimeError, match=message):
        ppl.sample("loose", dist.Normal(0.0, 1.0))
    with pytest.raises(RuntimeError, match=message):
        jax.jit(lambda: ppl.sample("loose", dist.Normal(0.0, 1.0)))()
    with pytest.raises(RuntimeError, match=message):
        jax.jit(jax.vmap(lambda m: ppl.sample("loose", dist.Normal(m, 1.0))))(jnp.zeros(2))


def test_non_scalar_objective():
    @ppl.expectation
    def vector(theta):
        return ppl.sample("z", dist.Normal(theta, 1.0).expand((2,)))

    with pytest.raises(TypeError, match=r"one real scalar; this program returns \(float32\[2\]\)"):
        vector.estimate(KEY, 0.0)

    @ppl.expectation
    def integer(p):
        return ppl.sample("b", dist.Bernoulli(probs=p))

    with pytest.raises(TypeError, match=r"one real scalar; this program returns \(int32\[\]\)"):
        integer.grad_estimate(KEY, 0.5)


def test_sites_inside_a_dynamic_while_loop():
    def loop(n):
        body = lambda c: (c[0] + 1, c[1] + ppl.sample("w", dist.Normal(0.0, 1.0)))
        return lax.while_loop(lambda c: c[0] < n, body, (0, 0.0))[1]

    message = "sample sites inside 'while' are not supported.*sites: w"
    with pytest.raises(NotImplementedError, match=message):
        ppl.gen(loop).simulate(KEY, 3)
    with pytest.raises(NotImplementedError, match=message):
        ppl.gen(loop).assess({"w": 0.0}, 3)

    @ppl.expectation
    def objective(n):
        return loop(n)

    with pytest.raises(NotImplementedError, match="'while' are not supported in an expectation.*sites: w"):
        objective.estimate(KEY, 3)
    # A fori_loop with a dynamic trip count is a while loop too.
    dynamic_fori = ppl.gen(lambda n: lax.fori_loop(0, n, lambda i, c: c + ppl.sample("f", dist.Normal(c, 1.0)), 0.0))
    with pytest.raises(NotImplementedError, match="'while'.*sites: f"):
        dynamic_fori.simulate(KEY, 3)
