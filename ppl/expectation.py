"""Objectives as programs: `sim`, `density` and `expectation`.

    @ppl.expectation
    def elbo(params, x):
        z, log_q = ppl.sim(guide)(params, x)          # draw from q, with its log density
        return ppl.density(model)(z | {"x": x}, x) - log_q

    value = elbo.estimate(key, params, x)                       # unbiased
    grads = elbo.grad_estimate(key, params, x)                  # unbiased; argnums as jax.grad
    value, grads = elbo.value_and_grad_estimate(key, params, x)

Every sample site reached while running the objective (through `sim`, a direct `ppl.sample`, or
a generative function called inline) is a site of the expectation: its estimator decides how the
gradient of the expected value is estimated (see `transforms.adev`).
"""

import jax
import jax.numpy as jnp

from ppl import leaves
from ppl.gen import GenerativeFunction, choice_map, stage
from transforms import adev, gfi


def _as_gen(gen_fn):
    if not isinstance(gen_fn, GenerativeFunction):
        raise TypeError(f"expected a generative function (decorate it with @ppl.gen), got {gen_fn!r}")
    return gen_fn


def sim(gen_fn):
    """`sim(q)(*args) -> (choices, log q(choices))`: a draw whose sites remain sites of the
    enclosing expectation. For `ppl.marginal`/`ppl.normalize`, the log density is an estimate
    (see `ppl.marginal`)."""
    if hasattr(gen_fn, "sim_estimate"):
        return gen_fn.sim_estimate
    gen_fn = _as_gen(gen_fn)

    def run(*args):
        closed, flat, _ = gen_fn.stage(*args)
        _, choices, score = gfi.staged_simulate(closed, flat)
        return choice_map(closed, choices), score

    return run


def density(gen_fn):
    """`density(p)(choices, *args) -> log p(choices)`, exact; every site needs a choice. For
    `ppl.marginal`/`ppl.normalize`, the log of an unbiased density estimate."""
    if hasattr(gen_fn, "density_estimate"):
        return gen_fn.density_estimate
    gen_fn = _as_gen(gen_fn)

    def run(choices, *args):
        score, _ = gen_fn.assess(choices, *args)
        return score

    return run


class Expectation:
    """An objective program whose expected value ADEV estimates and differentiates."""

    def __init__(self, fn):
        self.fn = fn
        self.__name__ = getattr(fn, "__name__", "expectation")
        self.__doc__ = getattr(fn, "__doc__", None)

    def stage(self, *args):
        closed, flat, _ = stage(self.fn, args, unique_addresses=False)
        adev.check_objective(closed)
        return closed, flat

    def estimate(self, key, *args):
        """An unbiased estimate of the expected value."""
        closed, flat = self.stage(*args)
        return adev.estimator_fn(closed)(key, *flat)

    def value_and_grad_estimate(self, key, *args, argnums=0):
        """(value, gradient) estimates sharing one draw; the gradient is unbiased for
        d/d args[argnums] E[objective]."""
        nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
        _check_differentiable(args, nums)
        closed, _ = self.stage(*args)
        f = adev.estimator_fn(closed)
        parts = [leaves.partition(args[i], leaves.is_array) for i in nums]  # static leaves are not differentiated

        def of(diff):
            full = list(args)
            for i, d, (_, static) in zip(nums, diff, parts):
                full[i] = leaves.combine(d, static)
            return f(key, *leaves.array_leaves(full))

        value, grads = jax.value_and_grad(of)(tuple(arrays for arrays, _ in parts))
        return value, grads[0] if isinstance(argnums, int) else grads

    def grad_estimate(self, key, *args, argnums=0):
        """An unbiased estimate of d/d args[argnums] E[objective]."""
        return self.value_and_grad_estimate(key, *args, argnums=argnums)[1]

    def __call__(self, *args):
        return self.fn(*args)


def _check_differentiable(args, nums):
    """Raise unless every `args[i]`, i in `nums`, exists and has only floating-point array leaves
    (other leaves, such as a module's functions, are passed through)."""
    for i in nums:
        if not isinstance(i, int) or not -len(args) <= i < len(args):
            raise ValueError(f"argnums={nums}: the objective was called with {len(args)} argument(s) after the key")
        for path, leaf in jax.tree_util.tree_leaves_with_path(args[i]):
            if leaves.is_array(leaf) and not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
                where = f"args[{i}]{jax.tree_util.keystr(path)}"
                raise TypeError(
                    f"cannot differentiate with respect to {where} = {leaf!r}: differentiated arguments need "
                    "floating-point leaves (write 0.0, not 0; pass integers and other constants in another argument)"
                )


def expectation(fn):
    """Decorator: make `fn` (returning a real scalar) an objective program."""
    return Expectation(fn)
