"""Training: a pure `(init, step)` pair and `fit`, a compiled, chunked loop.

Objectives are *maximized* (an ELBO, a bound on log p(x)); the loss reported is its negation.

    vi = ppl.svi(objective, optax.adam(1e-2))
    state = vi.init(params)
    state, info = vi.step(key, state, x)          # info: loss, grad_norm, skipped

    params, history = ppl.fit(objective, params, x, optimizer=optax.adam(1e-2), steps=2000, key=key)

`fit` runs chunks of steps in a `lax.fori_loop` inside one `jax.jit` (so Python does no per-step
work), compiles once per objective/optimizer/shape (a second `fit` with the same shapes reuses the
compiled chunk), prints a progress bar with the running loss, and skips non-finite updates,
counting them (`skip_nonfinite=False` turns the check off). With `batch_size`, each step sees
a random minibatch of the leading axis of the data arguments; objectives scale their per-datum
terms with `ppl.plate(..., subsample_size=...)` or by hand, so the minibatch gradient is unbiased
for the full-data one.
"""

import functools
import sys
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class SVIState(NamedTuple):
    params: Any
    opt_state: Any
    step: Any


class SVI(NamedTuple):
    """`init(params) -> state`, `step(key, state, *args) -> (state, info)`; both pure and jit-able."""

    init: Any
    step: Any


def svi(objective, optimizer, skip_nonfinite=True):
    """The (init, step) pair that maximizes `objective(params, *args)` with an optax optimizer.

    With `skip_nonfinite`, a step whose loss or gradient is not finite leaves the parameters and
    optimizer state unchanged (`info["skipped"]`). The check runs the update under a `lax.cond`,
    which costs time on small models (`benchmarks/RESULTS.md`); `skip_nonfinite=False` applies
    every update, as optax and NumPyro's `SVI.update` do."""

    def init(params):
        return SVIState(params, optimizer.init(params), jnp.zeros((), jnp.int32))

    def step(key, state, *args):
        value, grads = objective.value_and_grad_estimate(key, state.params, *args)
        grads = jax.tree.map(jnp.negative, grads)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(value) & jnp.isfinite(grad_norm)

        def update(state):
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            return SVIState(optax.apply_updates(state.params, updates), opt_state, state.step + 1)

        if not skip_nonfinite:
            return update(state), {"loss": -value, "grad_norm": grad_norm, "skipped": jnp.zeros((), bool)}
        # a cond, not a select per leaf: selects would keep XLA from fusing the optimizer update
        new_state = jax.lax.cond(finite, update, lambda state: state._replace(step=state.step + 1), state)
        return new_state, {"loss": -value, "grad_norm": grad_norm, "skipped": ~finite}

    return SVI(init, step)


@functools.lru_cache(maxsize=64)
def _compiled_chunk(objective, optimizer, length, batch_size, skip_nonfinite):
    """One jitted function running `steps <= length` steps (a traced count, so the last, partial
    chunk reuses the same compiled code) in a `lax.fori_loop`; returns the state and each step's
    loss and skipped flag in arrays of `length` (entries past `steps` are padding)."""
    vi = svi(objective, optimizer, skip_nonfinite)

    def chunk(state, key, steps, data, rest):
        keys = jax.random.split(key, length)

        def one(i, carry):
            state, losses, skipped = carry
            key, batch_key = jax.random.split(keys[i])
            args = data
            if batch_size is not None:
                n = jax.tree.leaves(data)[0].shape[0]
                idx = jax.random.choice(batch_key, n, (batch_size,), replace=False)
                args = jax.tree.map(lambda a: a[idx], data)
            state, info = vi.step(key, state, *args, *rest)
            return state, losses.at[i].set(info["loss"]), skipped.at[i].set(info["skipped"])

        init = (state, jnp.full(length, jnp.nan, jnp.result_type(float)), jnp.zeros(length, bool))
        state, losses, skipped = jax.lax.fori_loop(0, steps, one, init)
        return state, {"loss": losses, "skipped": skipped}

    return vi, jax.jit(chunk)


def _strong(tree):
    """The same values without weak types (so the compiled loop sees one input type)."""
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.result_type(x)), tree)


def fit(
    objective,
    params,
    *args,
    optimizer,
    steps,
    key,
    batch_size=None,
    data_argnums=None,
    chunk_size=100,
    progress=True,
    skip_nonfinite=True,
):
    """Maximize `objective(params, *args)`; returns (params, losses) with one loss per step.

    `batch_size`: minibatch the leading axis of the arguments listed in `data_argnums`
    (positions in `args`; default: all of them). `skip_nonfinite`: as in `svi`."""
    data_argnums = tuple(range(len(args))) if data_argnums is None else tuple(data_argnums)
    data = tuple(args[i] for i in data_argnums)
    rest = tuple(a for i, a in enumerate(args) if i not in data_argnums)
    if batch_size is not None and data_argnums != tuple(range(len(data_argnums))):
        raise ValueError("with batch_size, the objective's data arguments must come first")
    length = min(chunk_size, steps)
    vi, run = _compiled_chunk(objective, optimizer, length, batch_size, skip_nonfinite)
    state = _strong(vi.init(params))
    losses, skipped, done = [], 0, 0
    while done < steps:
        key, sub = jax.random.split(key)
        n = min(length, steps - done)
        state, info = run(state, sub, n, data, rest)
        losses.append(info["loss"][:n])
        skipped += int(jnp.sum(info["skipped"][:n]))
        done += n
        if progress:
            _progress(done, steps, float(jnp.mean(info["loss"][:n])))
    if progress:
        print(file=sys.stderr)
    if skipped:
        warnings.warn(f"fit skipped {skipped} of {steps} steps whose gradient or loss was not finite", stacklevel=2)
    return state.params, jnp.concatenate(losses)


def _progress(done, total, loss, width=30):
    filled = int(width * done / total)
    bar = "#" * filled + "-" * (width - filled)
    print(f"\r[{bar}] {done}/{total}  loss {loss:.4f}", end="", file=sys.stderr, flush=True)
