"""Bad input gets a clear error naming the address (or argument), or a number that is correct;
never a silently wrong one. Each case here was once a silently wrong or obscure result."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

import ppl
from ppl import dist

KEY = jax.random.key(0)


def gen_site(distribution, obs=None):
    @ppl.gen
    def one():
        return ppl.sample("a", distribution, obs=obs)

    return one


# -- legacy raw keys ----------------------------------------------------------------------------


@ppl.gen
def batched(mu):
    return jax.vmap(lambda _: ppl.sample("x", dist.Normal(mu, 1.0)))(jnp.arange(3))


@ppl.expectation
def batched_objective(mu):
    choices, log_q = ppl.sim(batched)(mu)
    return jnp.sum(choices["x"] ** 2) + log_q


@pytest.mark.parametrize(
    "run",
    [
        lambda k: batched.simulate(k, 0.5).choices["x"],
        lambda k: batched.generate(k, {}, 0.5)[0].choices["x"],
        lambda k: batched_objective.value_and_grad_estimate(k, 0.5),
        lambda k: jax.jit(batched_objective.grad_estimate)(k, 0.5),
        lambda k: jax.vmap(lambda kk: batched_objective.estimate(kk, 0.5))(jax.random.split(k, 4)),
        lambda k: ppl.predictive(batched, num_samples=3)(k, 0.5)["x"],
    ],
    ids=["simulate", "generate", "value_and_grad", "jit", "vmap", "predictive"],
)
def test_a_legacy_raw_key_draws_exactly_what_the_typed_key_draws(run):
    legacy, typed = run(jax.random.PRNGKey(3)), run(jax.random.key(3))
    for a, b in zip(jax.tree.leaves(legacy), jax.tree.leaves(typed)):
        np.testing.assert_array_equal(a, b)


def test_fit_takes_a_legacy_raw_key():
    @ppl.expectation
    def objective(params):
        z, log_q = ppl.sim(batched)(params["mu"])
        return -jnp.sum((z["x"] - 1.0) ** 2)

    runs = [
        ppl.fit(objective, {"mu": 0.0}, optimizer=optax.adam(0.1), steps=20, key=k, progress=False)[0]
        for k in (jax.random.PRNGKey(1), jax.random.key(1))
    ]
    np.testing.assert_array_equal(runs[0]["mu"], runs[1]["mu"])


def test_a_key_that_is_not_a_key_is_refused():
    with pytest.raises(TypeError, match="expected a PRNG key such as jax.random.key"):
        batched.simulate(0, 0.5)


# -- observations and choices outside the support -------------------------------------------------


@pytest.mark.parametrize(
    "distribution, value, support",
    [
        (dist.Bernoulli(0.3), 2, "Boolean"),
        (dist.Categorical(jnp.ones(3) / 3), -1, "IntegerInterval"),
        (dist.Categorical(jnp.ones(3) / 3), 3, "IntegerInterval"),
        (dist.Poisson(2.0), 1.5, "IntegerNonnegative"),
        (dist.Poisson(2.0), -1, "IntegerNonnegative"),
        (dist.Gamma(2.0, 1.0), -0.5, "Positive"),
        (dist.Beta(2.0, 2.0), 1.5, "UnitInterval"),
        (dist.Normal(0.0, 1.0), jnp.nan, "Real"),
        (dist.Normal(0.0, 1.0), jnp.inf, "Real"),
    ],
)
def test_an_observation_outside_the_support_raises_naming_the_address(distribution, value, support):
    with pytest.raises(ValueError, match=f"value outside the support at address 'a'.*{support}"):
        gen_site(distribution, obs=value).assess({})
    with pytest.raises(ValueError, match=f"value outside the support at address 'a'.*{support}"):
        gen_site(distribution).assess({"a": value})
    with pytest.raises(ValueError, match="value outside the support at address 'a'"):
        gen_site(distribution).generate(KEY, {"a": value})


def test_a_value_inside_the_support_is_scored_as_numpyro_scores_it():
    for distribution, value in [
        (dist.Bernoulli(0.3), 1),
        (dist.Categorical(jnp.ones(3) / 3), 2),
        (dist.Poisson(2.0), 3.0),
    ]:
        np.testing.assert_allclose(gen_site(distribution, obs=value).assess({})[0], distribution.log_prob(value))
        np.testing.assert_allclose(gen_site(distribution).assess({"a": value})[0], distribution.log_prob(value))


def test_under_jit_a_value_outside_the_support_has_log_density_minus_infinity():
    model = gen_site(dist.Bernoulli(0.3))
    score = jax.jit(lambda v: model.assess({"a": v})[0])
    assert score(-1) == -jnp.inf and score(2) == -jnp.inf
    np.testing.assert_allclose(score(1), np.log(0.3), rtol=1e-6)  # control: in the support, exact

    @ppl.gen
    def observed(y):
        ppl.sample("y", dist.Poisson(2.0).expand((3,)), obs=y)

    weight = jax.jit(lambda y: observed.assess({}, y)[0])
    assert weight(jnp.array([1.0, 1.5, 2.0])) == -jnp.inf
    assert np.isfinite(weight(jnp.array([1.0, 0.0, 2.0])))


def test_a_batched_site_checks_each_element_against_its_own_support():
    @ppl.gen
    def uniforms(highs):
        return jax.vmap(lambda h: ppl.sample("u", dist.Uniform(0.0, h)))(highs)

    highs = jnp.array([1.0, 2.0, 3.0])
    assert np.isfinite(uniforms.assess({"u": jnp.array([0.5, 1.5, 2.5])}, highs)[0])
    with pytest.raises(ValueError, match="value outside the support at address 'u'"):
        uniforms.assess({"u": jnp.array([0.5, 2.5, 2.5])}, highs)


def test_a_complex_value_is_refused():
    with pytest.raises(TypeError, match="complex value at address 'a'"):
        gen_site(dist.Normal(0.0, 1.0), obs=1j).assess({})
    with pytest.raises(TypeError, match="complex value at address 'a'"):
        jax.jit(lambda v: gen_site(dist.Normal(0.0, 1.0)).assess({"a": v})[0])(jnp.array(1j))


def test_an_objective_with_data_outside_the_support_is_minus_infinity_not_a_number():
    @ppl.gen
    def model(params, x):
        p = ppl.sample("p", dist.Beta(1.0, 1.0))
        ppl.sample("x", dist.Bernoulli(p).expand(x.shape), obs=x)

    @ppl.gen
    def guide(params, x):
        ppl.sample("p", dist.Beta(jnp.exp(params), 1.0))

    objective = ppl.objectives.elbo(model, guide)
    assert objective.estimate(KEY, 0.0, jnp.array([0.0, 2.0])) == -jnp.inf
    assert np.isfinite(objective.estimate(KEY, 0.0, jnp.array([0.0, 1.0])))


# -- invalid parameters -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, bad, good, rule",
    [
        (lambda t: dist.Normal(0.0, t), -1.0, 1.0, "Normal's parameter 'scale'"),
        (lambda t: dist.Bernoulli(probs=t), 1.5, 0.5, "Bernoulli's parameter 'probs'"),
        (lambda t: dist.Categorical(probs=jnp.array([t, 1.0 - t])), -0.2, 0.2, "Categorical's parameter 'probs'"),
        (lambda t: dist.Gamma(t, 1.0), -1.0, 1.0, "Gamma's parameter 'concentration'"),
        (lambda t: dist.Normal(0.0, t).expand((3,)).to_event(1), -1.0, 1.0, "Normal's parameter 'scale'"),
    ],
)
def test_invalid_parameters_raise_when_known_and_are_nan_under_jit(make, bad, good, rule):
    @ppl.gen
    def model(t):
        ppl.sample("a", make(t))

    with pytest.raises(ValueError, match=f"invalid parameter at address 'a': {rule}"):
        model.simulate(KEY, bad)
    assert np.isnan(jax.jit(lambda t: model.simulate(KEY, t).score)(bad))
    value = model.simulate(KEY, good).choices["a"]
    score = jax.jit(lambda t: model.assess({"a": value}, t)[0])
    assert np.isnan(score(bad))
    np.testing.assert_allclose(score(good), jnp.sum(make(good).log_prob(value)), rtol=1e-6)  # control


def test_constant_invalid_parameters_raise_at_trace_time_naming_the_address():
    @ppl.gen
    def model():
        ppl.sample("a", dist.Normal(0.0, -1.0))

    with pytest.raises(ValueError, match="invalid parameter at address 'a': Normal's parameter 'scale'"):
        jax.jit(lambda k: model.simulate(k).score)(KEY)


def test_an_objective_with_invalid_parameters_is_nan_and_fit_says_so():
    @ppl.gen
    def guide(params):
        ppl.sample("b", dist.Bernoulli(probs=params["p"]))

    @ppl.expectation
    def objective(params):
        _, log_q = ppl.sim(guide)(params)
        return -log_q

    assert np.isnan(objective.estimate(KEY, {"p": 1.5}))
    assert np.isfinite(objective.estimate(KEY, {"p": 0.5}))


# -- addresses ---------------------------------------------------------------------------------


def test_an_address_with_a_slash_is_refused():
    with pytest.raises(ValueError, match="address 'enc/h' contains '/'"):
        ppl.gen(lambda: ppl.sample("enc/h", dist.Normal(0.0, 1.0))).simulate(KEY)


def test_a_slash_key_in_a_choice_map_is_explained():
    @ppl.gen
    def encoder():
        ppl.sample("h", dist.Normal(0.0, 1.0))

    @ppl.gen
    def outer():
        ppl.sample("enc", encoder)

    with pytest.raises(KeyError, match=r"unknown address 'enc/h'.*nested addresses are nested dicts"):
        outer.assess({"enc/h": 0.0})
    assert np.isfinite(outer.assess({"enc": {"h": 0.0}})[0])


def test_a_choice_for_an_observed_site_is_refused():
    model = gen_site(dist.Normal(0.0, 1.0), obs=1.0)
    with pytest.raises(ValueError, match="value was given for address 'a', which the program observes with obs="):
        model.assess({"a": 5.0})
    with pytest.raises(ValueError, match="observes with obs="):
        model.generate(KEY, {"a": 5.0})
    np.testing.assert_allclose(model.assess({})[0], dist.Normal(0.0, 1.0).log_prob(1.0))


def test_a_cond_giving_one_address_two_shapes_names_the_branches_in_order():
    @ppl.gen
    def branches(flag):
        return lax.cond(
            flag,
            lambda: ppl.sample("a", dist.Normal(0.0, 1.0)),
            lambda: ppl.sample("a", dist.Normal(0.0, 1.0).expand((2,))).sum(),
        )

    with pytest.raises(
        ValueError,
        match=r"'a' is drawn with shape \(2,\) .* in branch 0 \(lax.cond's false_fn\) and shape \(\) .*true_fn",
    ):
        branches.simulate(KEY, True)


# -- obscure inputs get named ---------------------------------------------------------------------


def test_assess_of_a_trace_says_to_pass_its_choices():
    model = gen_site(dist.Normal(0.0, 1.0))
    with pytest.raises(TypeError, match="got a Trace: pass `trace.choices`"):
        model.assess(model.simulate(KEY))


def test_observations_may_be_lists_but_not_strings():
    model = gen_site(dist.Normal(0.0, 1.0).expand((2,)), obs=[1.0, 2.0])
    np.testing.assert_allclose(model.assess({})[0], jnp.sum(dist.Normal(0.0, 1.0).log_prob(jnp.array([1.0, 2.0]))))
    with pytest.raises(TypeError, match="value at address 'a' must be an array or a number, got str"):
        gen_site(dist.Normal(0.0, 1.0), obs="1.0").assess({})


def test_a_sample_of_something_else_than_a_distribution_is_refused():
    with pytest.raises(TypeError, match=r"ppl.sample\('a', ...\) takes a NumPyro distribution"):
        gen_site(lambda: 0.0).simulate(KEY)


def test_an_estimator_given_by_name_is_refused():
    with pytest.raises(
        TypeError, match="estimator at 'a' must be an estimator such as ppl.reparam\\(\\), got 'reparam'"
    ):
        ppl.with_estimators(gen_site(dist.Normal(0.0, 1.0)), {"a": "reparam"})


def test_jax_grad_through_a_site_says_what_to_differentiate():
    @ppl.gen
    def model(mu):
        return ppl.sample("a", dist.Normal(mu, 1.0))

    with pytest.raises(TypeError, match="jax.grad/jax.jvp reached the sample site 'a'"):
        jax.grad(model)(0.0)


def test_integer_parameters_and_bad_argnums_are_named():
    @ppl.expectation
    def objective(params, x):
        return params["loc"] * x

    with pytest.raises(TypeError, match=r"args\[0\]\['loc'\] = 0: differentiated arguments need floating-point"):
        objective.grad_estimate(KEY, {"loc": 0}, 1.0)
    with pytest.raises(ValueError, match=r"argnums=\(2,\): the objective was called with 2 argument"):
        objective.grad_estimate(KEY, {"loc": 0.0}, 1.0, argnums=2)
    np.testing.assert_allclose(objective.grad_estimate(KEY, {"loc": 0.0}, 2.0)["loc"], 2.0)


# -- plates -------------------------------------------------------------------------------------


@ppl.gen
def datum(x):
    return ppl.sample("y", dist.Normal(x, 1.0))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"size": 2, "subsample_size": 5}, "subsample_size=5 is larger than size=2"),
        ({"size": -7}, "size must be a positive int, got -7"),
        ({"size": 0}, "size must be a positive int, got 0"),
        ({"size": 5, "subsample_size": 0}, "subsample_size must be a positive int"),
        ({"subsample_size": 5}, "needs the full data set's size"),
    ],
)
def test_plate_sizes_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ppl.plate(datum, **kwargs)


def test_plate_size_must_match_the_data():
    with pytest.raises(ValueError, match="mapped arguments have 5 elements along the mapped axis, but size=7"):
        ppl.plate(datum, size=7).simulate(KEY, jnp.zeros(5))
    with pytest.raises(ValueError, match="5 elements along the mapped axis, but subsample_size=4"):
        ppl.plate(datum, size=10, subsample_size=4).simulate(KEY, jnp.zeros(5))
    y = jnp.arange(5.0)
    full = ppl.plate(datum, size=5).assess({"y": y}, jnp.zeros(5))[0]
    np.testing.assert_allclose(full, jnp.sum(dist.Normal(0.0, 1.0).log_prob(y)), rtol=1e-6)
    scaled = ppl.plate(datum, size=20, subsample_size=5).assess({"y": y}, jnp.zeros(5))[0]
    np.testing.assert_allclose(scaled, 4 * full, rtol=1e-6)


def test_plate_without_a_generative_function_says_what_to_write():
    with pytest.raises(TypeError, match="ppl.plate takes a generative function"):
        ppl.plate()
    with pytest.raises(TypeError, match="ppl.plate takes a generative function"):
        ppl.plate(lambda x: x, size=3)


# -- NumPyro's plate context manager --------------------------------------------------------------


def test_the_plate_context_manager_broadcasts_sites_like_numpyro():
    y = jnp.array([0.5, -1.0, 2.0])

    @ppl.gen
    def model(y):
        mu = ppl.sample("mu", dist.Normal(0.0, 1.0))
        with ppl.plate("data", 3):
            ppl.sample("y", dist.Normal(mu, 1.0), obs=y)

    expected = dist.Normal(0.0, 1.0).log_prob(0.3) + jnp.sum(dist.Normal(0.3, 1.0).log_prob(y))
    np.testing.assert_allclose(model.assess({"mu": 0.3}, y)[0], expected, rtol=1e-6)
    assert ppl.plates.active() == ()


def test_a_subsampled_plate_context_scales_its_sites():
    y = jnp.array([0.5, -1.0, 2.0])

    @ppl.gen
    def model(y):
        mu = ppl.sample("mu", dist.Normal(0.0, 1.0))
        with ppl.plate("data", 30, subsample_size=3) as idx:
            assert idx.shape == (3,)
            ppl.sample("y", dist.Normal(mu, 1.0), obs=y)

    expected = dist.Normal(0.0, 1.0).log_prob(0.3) + 10 * jnp.sum(dist.Normal(0.3, 1.0).log_prob(y))
    np.testing.assert_allclose(model.assess({"mu": 0.3}, y)[0], expected, rtol=1e-6)


def test_nested_plate_contexts_take_dims_from_the_right():
    @ppl.gen
    def grid():
        with ppl.plate("rows", 2):
            with ppl.plate("cols", 3):
                return ppl.sample("z", dist.Normal(0.0, 1.0))

    assert grid.simulate(KEY).choices["z"].shape == (3, 2)

    @ppl.gen
    def explicit():
        with ppl.plate("rows", 2, dim=-2):
            with ppl.plate("cols", 3, dim=-1):
                return ppl.sample("z", dist.Normal(0.0, 1.0))

    assert explicit.simulate(KEY).choices["z"].shape == (2, 3)


def test_a_site_of_the_wrong_size_inside_a_plate_context_is_named():
    @ppl.gen
    def model():
        with ppl.plate("data", 4):
            ppl.sample("y", dist.Normal(jnp.zeros(3), 1.0))

    with pytest.raises(ValueError, match="site 'y' has batch dimension 3 at dim -1, where plate 'data' has 4"):
        model.simulate(KEY)
    assert ppl.plates.active() == ()  # the failed staging left no plate behind


# -- sites inside a while loop --------------------------------------------------------------------


@ppl.gen
def loop():
    def body(carry):
        i, total = carry
        return i + 1, total + ppl.sample("w", dist.Normal(0.0, 1.0))

    return lax.while_loop(lambda c: c[0] < 3, body, (0, 0.0))[1]


@pytest.mark.parametrize(
    "run",
    [
        lambda: loop.simulate(KEY),
        lambda: loop.assess({"w": 0.0}),
        lambda: loop.generate(KEY, {}),
        lambda: ppl.expectation(lambda: ppl.sim(loop)()[1]).estimate(KEY),
        lambda: ppl.expectation(lambda mu: ppl.sim(loop)()[1] * mu).grad_estimate(KEY, 1.0),
    ],
    ids=["simulate", "assess", "generate", "estimate", "grad"],
)
def test_a_site_inside_a_while_loop_raises_naming_it(run):
    with pytest.raises(NotImplementedError, match="sample sites inside 'while' are not supported.*sites: w"):
        run()
