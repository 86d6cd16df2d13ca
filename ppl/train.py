"""Training: a pure `(init, step)` pair and `fit`, a compiled, chunked loop.

Objectives are *maximized* (an ELBO, a bound on log p(x)); the loss reported is its negation.

    vi = ppl.svi(objective, optax.adam(1e-2))
    state = vi.init(params)
    state, info = vi.step(key, state, x)          # info: loss, grad_norm, nonfinite, skipped

    params, losses = ppl.fit(objective, params, x, optimizer=optax.adam(1e-2), steps=2000, key=key)

    state, losses = ppl.fit(objective, params, x, ..., steps=1000, key=key, return_state=True)
    state, more = ppl.fit(objective, state, x, ..., steps=1000, key=key, return_state=True)
    # the same parameters, bit for bit, as one fit of 2000 steps

`fit` runs chunks of steps in a `lax.while_loop` inside one `jax.jit` (so Python does no per-step
work), compiles once per objective/optimizer/shape (a second `fit` with the same shapes reuses the
compiled chunk), shows a `tqdm` progress bar with the running loss, skips non-finite updates,
counting them (`skip_nonfinite=False` turns the check off), and with `checkpoint=directory` saves
its state after every chunk and resumes from it (`ppl.checkpoint`). With `batch_size`, each step sees
a random minibatch of the leading axis of the data arguments; objectives scale their per-datum
terms with `ppl.plate(..., subsample_size=...)` or by hand, so the minibatch gradient is unbiased
for the full-data one.

Parameters are any pytree: dicts, `ppl.constrained` nodes, Equinox modules. The trained leaves are
the floating-point arrays (jax or numpy) and Python floats; every other leaf (an activation
function, an int, an int array, a string) is kept as it is and closed over, as Equinox's
`partition`/`combine` do, so `params` may be an `eqx.nn.MLP`. Unlike `eqx.is_inexact_array`,
Python floats are trained (`{"loc": 0.0}` trains), so a float hyperparameter inside a module
(`eqx.nn.Dropout`'s `p`) is trained too: keep such a module out of `params`.
"""

import functools
import operator
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.tree_util import keystr, tree_flatten_with_path
from tqdm.auto import tqdm

from ppl import distributed
from ppl.checkpoint import Checkpoints, leaf_specs
from ppl.expectation import Expectation
from ppl.gen import GenerativeFunction
from ppl.leaves import combine, partition


class SVIState(NamedTuple):
    """`params`: the whole parameter pytree (static leaves included); `opt_state`: the optimizer's
    state for its trained leaves; `step`: the number of steps taken (int32), skipped ones included.
    `fit(..., return_state=True)` returns one and accepts it in place of `params`."""

    params: Any
    opt_state: Any
    step: Any


class SVI(NamedTuple):
    """`init(params) -> state`, `step(key, state, *args) -> (state, info)`; both pure and jit-able."""

    init: Any
    step: Any


# -- which leaves are trained ---------------------------------------------------------------------


def _is_array(leaf):
    return isinstance(leaf, (jax.Array, np.ndarray, np.generic))


def _is_trained(leaf):
    """Floating-point (or complex) arrays and Python floats: `_is_trained(jnp.ones(2))` and
    `_is_trained(0.5)` hold; `_is_trained(jnp.arange(2))`, `_is_trained(3)` and
    `_is_trained(jax.nn.relu)` do not."""
    if isinstance(leaf, (float, complex)):
        return True
    return _is_array(leaf) and jnp.issubdtype(leaf.dtype, jnp.inexact)


def _strong(tree):
    """The array and Python-float leaves as jax arrays without weak types (so the compiled loop
    sees one input type); other leaves unchanged."""
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.result_type(x)) if _is_array(x) or _is_trained(x) else x, tree)


class _Static(NamedTuple):
    """The non-array leaves of a tree and its structure: hashable, a key of the compiled chunk.
    `arrays, static = _Static.split(tree)`; `static.combine(arrays) == tree`."""

    treedef: Any
    leaves: tuple

    @staticmethod
    def split(tree):
        arrays, others = partition(tree, _is_array)
        leaves, treedef = jax.tree.flatten(others)
        return arrays, _Static(treedef, tuple(leaves))

    def combine(self, arrays):
        return combine(arrays, self.treedef.unflatten(self.leaves))


# -- argument checks ------------------------------------------------------------------------------


def _describe(value):
    return f"{type(value).__name__} {getattr(value, '__name__', repr(value))}"


def _check_objective(objective):
    if hasattr(objective, "value_and_grad_estimate"):
        return
    if isinstance(objective, GenerativeFunction):
        hint = (
            "a generative function is a model or a guide; train an objective built from it, decorated "
            "with @ppl.expectation, e.g. ppl.objectives.elbo(model, guide)"
        )
    else:
        hint = "decorate it with @ppl.expectation (a function of (params, *args) returning a scalar to maximize)"
    raise TypeError(f"objective must be an @ppl.expectation, got {_describe(objective)}: {hint}")


def _check_optimizer(optimizer):
    if isinstance(optimizer, optax.GradientTransformation):
        return
    if isinstance(optimizer, (int, float)):
        hint = f"a learning rate is not an optimizer; write optimizer=optax.adam({optimizer!r})"
    elif callable(optimizer):
        hint = "call it to build the optimizer, e.g. optimizer=optax.adam(1e-2)"
    else:
        hint = "e.g. optimizer=optax.adam(1e-2)"
    raise TypeError(f"optimizer must be an optax GradientTransformation, got {_describe(optimizer)}: {hint}")


def _count(name, value, minimum, meaning):
    """`value` as an int >= minimum, or a TypeError/ValueError naming `name`."""
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int ({meaning}), got {_describe(value)}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum} ({meaning}), got {name}={value}")
    return value


def _check_params(params):
    """Raise on Python ints in `params`: they are not trained, and are almost always a float
    written without its point (`{"loc": 0}`); integer arrays are taken as deliberate constants."""
    for path, leaf in tree_flatten_with_path(params)[0]:
        if isinstance(leaf, int) and not isinstance(leaf, bool):
            raise TypeError(
                f"params{keystr(path)} = {leaf!r} is a Python int, which is not trained: write {float(leaf)!r} "
                "to train it, or pass constants to the objective in another argument"
            )


def _check_argnums(args, data_argnums):
    if any(not 0 <= i < len(args) for i in data_argnums):
        raise ValueError(f"data_argnums={data_argnums} are positions in the {len(args)} argument(s) after params")


def _check_batch(args, data_argnums, batch_size):
    """Raise unless every data argument's leaves share a leading axis of at least `batch_size`."""
    if not data_argnums:
        raise ValueError(
            f"batch_size={batch_size} needs data to minibatch: pass it after params, fit(objective, params, x, ...)"
        )
    _check_argnums(args, data_argnums)
    sizes = {}
    for i in data_argnums:
        for path, leaf in tree_flatten_with_path(args[i])[0]:
            name = f"args[{i}]{keystr(path)}"
            if not np.shape(leaf):
                raise ValueError(
                    f"with batch_size, {name} has no leading axis to minibatch; list only the per-datum "
                    "arguments in data_argnums (positions in the arguments after params)"
                )
            sizes[name] = np.shape(leaf)[0]
    n, *others = set(sizes.values())
    if others:
        found = ", ".join(f"{name} has {size}" for name, size in sizes.items())
        raise ValueError(
            f"with batch_size, the data arguments must share their leading axis (one entry per datum): {found}; "
            "list only the per-datum arguments in data_argnums"
        )
    if batch_size > n:
        raise ValueError(
            f"batch_size={batch_size} is larger than the data ({n} along the leading axis): "
            f"use batch_size <= {n}, or batch_size=None for full batches"
        )


# -- the step -------------------------------------------------------------------------------------


def svi(objective, optimizer, skip_nonfinite=True, mesh=None, data_argnums=None):
    """The (init, step) pair that maximizes `objective(params, *args)` with an optax optimizer.

        vi = ppl.svi(elbo, optax.adam(1e-2))
        state, info = jax.jit(vi.step)(key, vi.init(params), x)

    `objective`: an `@ppl.expectation`, or any object with its `value_and_grad_estimate(key,
    params, *args)` (then every leaf of `params` must be a trained one). Only the trained leaves
    of `params` (floating-point arrays and Python floats) are differentiated and optimized; the
    others pass through unchanged (under `jax.jit`, a module with function leaves needs
    `eqx.filter_jit`; `fit` handles it).

    `info["nonfinite"]`: whether the step's loss or gradient is not finite. With `skip_nonfinite`,
    such a step leaves the parameters and optimizer state unchanged (`info["skipped"]`; the step
    counter still advances). The check runs the update under a `lax.cond`, which costs time on
    small models (`benchmarks/RESULTS.md`); `skip_nonfinite=False` applies every update, as optax
    and NumPyro's `SVI.update` do. `fit` does not use this check (see its `skip_nonfinite`).

    `mesh`: a `jax.sharding.Mesh` or `ppl.Sharding` (see `ppl.distributed`): the step shards the
    leading axis of the data arguments (positions `data_argnums` in `args`, default all) over the
    mesh's data axis, and the objective's particles over its particles axis; the state and data
    stay where the caller placed them (`fit` places them)."""
    _check_objective(objective)
    _check_optimizer(optimizer)
    spec = distributed.resolve(mesh)

    def init(params):
        _check_params(params)
        trained, _ = partition(params, _is_trained)
        return SVIState(params, optimizer.init(trained), jnp.zeros((), jnp.int32))

    def step(key, state, *args):
        trained, frozen = partition(state.params, _is_trained)
        value, grads = _value_and_grad(objective, frozen)(key, trained, *args)
        grads = jax.tree.map(jnp.negative, grads)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(value) & jnp.isfinite(grad_norm)

        def update(trained, opt_state):
            updates, opt_state = optimizer.update(grads, opt_state, trained)
            return optax.apply_updates(trained, updates), opt_state

        if skip_nonfinite:
            # a cond, not a select per leaf: selects would keep XLA from fusing the optimizer update
            trained, opt_state = jax.lax.cond(finite, update, lambda *kept: kept, trained, state.opt_state)
        else:
            trained, opt_state = update(trained, state.opt_state)
        skipped = ~finite if skip_nonfinite else jnp.zeros((), bool)
        new_state = SVIState(combine(trained, frozen), opt_state, state.step + 1)
        return new_state, {"loss": -value, "grad_norm": grad_norm, "nonfinite": ~finite, "skipped": skipped}

    def sharded_step(key, state, *args):
        nums = range(len(args)) if data_argnums is None else data_argnums
        with distributed.active(spec):  # read by the objective's particles while it is traced
            return step(key, state, *distributed.shard_data(spec, args, tuple(nums)))

    return SVI(init, step if spec is None else sharded_step)


def _value_and_grad(objective, frozen):
    """`(key, trained, *args) -> (value, d value / d trained)` for `objective(combine(trained,
    frozen), *args)`: the static leaves are closed over, so only arrays are staged."""
    if isinstance(objective, Expectation):
        return Expectation(lambda trained, *args: objective(combine(trained, frozen), *args)).value_and_grad_estimate
    if jax.tree.leaves(frozen):
        raise TypeError(
            f"params has leaves that are not floating-point arrays ({_describe(objective)} cannot leave them "
            "out of its gradient); train it with an @ppl.expectation objective, or keep such leaves out of params"
        )
    return objective.value_and_grad_estimate


# -- the loop -------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _compiled_chunk(objective, optimizer, length, batch_size, data_argnums, static, spec, placement, precise):
    """One jitted `run(arrays, key, steps, stop, skipped, args) -> (arrays, info)` on the array leaves
    of an `SVIState` (`static` holds the others): up to `steps <= length` unguarded steps (plain
    optax updates) in a `lax.while_loop`, stopping after the first non-finite step if `stop`, then
    `skipped` (0 or 1) added to the step counter. `info`: each step's loss and non-finite flag, in
    arrays of `length` (entries past the last step run are padding), and whether the trained
    parameters at the end are `finite`. A step's flag: its loss is not finite, or if `precise`,
    the parameters it produced are not (`_finite_sums`, which costs ~9% of a small step; without
    `precise`, a non-finite update shows in the end parameters, as NaN and inf stay in `p + u`).
    The counts are traced, so every run of a fit, the last partial chunk included, reuses one
    compiled program. Step `t` of a run (`state.step == t`) draws from `fold_in(key, t)`, so the
    draws depend on neither the chunking nor where a run was resumed. With a mesh (`spec`), the
    state comes back with its input shardings (`placement`), so the next chunk reuses the
    compiled code, and the losses replicated."""
    vi = svi(objective, optimizer, skip_nonfinite=False, mesh=spec, data_argnums=data_argnums)

    def chunk(arrays, key, steps, stop, skipped, args):
        def running(carry):
            i, _, _, _, last_nonfinite = carry
            return (i < steps) & ~(stop & last_nonfinite)

        def one(carry):
            i, arrays, losses, nonfinite, _ = carry
            state = static.combine(arrays)
            step_key, batch_key = jax.random.split(jax.random.fold_in(key, state.step))
            state, info = vi.step(step_key, state, *_minibatch(batch_key, args, data_argnums, batch_size))
            arrays, _ = _Static.split(state)
            finite = jnp.isfinite(info["loss"])
            if precise:
                finite &= _finite_sums(partition(state.params, _is_trained)[0])
            return i + 1, arrays, losses.at[i].set(info["loss"]), nonfinite.at[i].set(~finite), ~finite

        init = (0, arrays, jnp.full(length, jnp.nan, jnp.result_type(float)), jnp.zeros(length, bool), False)
        _, arrays, losses, nonfinite, _ = jax.lax.while_loop(running, one, init)
        state = static.combine(arrays)
        arrays, _ = _Static.split(state._replace(step=state.step + skipped))
        finite = _finite_sums(partition(state.params, _is_trained)[0])
        return arrays, {"loss": losses, "nonfinite": nonfinite, "finite": finite}

    if spec is None:
        return jax.jit(chunk)
    return jax.jit(chunk, out_shardings=(placement.tree(), spec.replicated))


def _finite_sums(tree):
    """Whether each leaf of `tree` sums to a finite number: a test for a NaN or an infinity."""
    sums = [jnp.isfinite(jnp.sum(leaf)) for leaf in jax.tree.leaves(tree)]
    return functools.reduce(operator.and_, sums, jnp.array(True))


def _run_chunk(runs, arrays, key, n, args, skip_nonfinite):
    """`n` steps from `arrays` with `runs`, the fast and the precise `_compiled_chunk`: (arrays,
    losses, nonfinite flags).

    Every applied step is a plain optax update run by the fast program, at the speed of a
    hand-written loop. With `skip_nonfinite`, a run stops after its first non-finite loss; if one
    appeared or the parameters at the end are not finite, the precise program runs the same steps
    again to find the first step whose loss or parameters are not finite, the fast one runs the
    steps before it again from the same start (same code, same inputs: the same bits) and advances
    the step counter past it, and the rest of the chunk continues from there. A clean chunk runs
    once; one with non-finite steps costs at most about three times its steps."""
    fast, precise = runs
    losses, nonfinite = [], []
    while n:
        after, info = fast(arrays, key, n, skip_nonfinite, 0, args)
        loss, bad = np.asarray(info["loss"])[:n], np.asarray(info["nonfinite"])[:n]
        if skip_nonfinite and (bad.any() or not info["finite"]):
            _, found = precise(arrays, key, n, True, 0, args)
            bad = bad | np.asarray(found["nonfinite"])[:n]
            if bad.any():
                ran = int(np.argmax(bad)) + 1  # up to the first non-finite step
                after, before = fast(arrays, key, ran - 1, False, 1, args)  # the steps before it again, then skip it
                loss = np.append(np.asarray(before["loss"])[: ran - 1], np.asarray(found["loss"])[ran - 1])
                bad = np.arange(ran) == ran - 1
        losses.append(loss)
        nonfinite.append(bad)
        arrays, n = after, n - loss.size
    return arrays, np.concatenate(losses), np.concatenate(nonfinite)


def _minibatch(key, args, data_argnums, batch_size):
    """`args` with the data arguments (positions `data_argnums`) restricted to `batch_size`
    entries of their leading axis, drawn without replacement; `args` itself without `batch_size`."""
    if batch_size is None:
        return args
    n = jax.tree.leaves(args[data_argnums[0]])[0].shape[0]
    idx = jax.random.choice(key, n, (batch_size,), replace=False)
    return tuple(jax.tree.map(lambda a: a[idx], arg) if i in data_argnums else arg for i, arg in enumerate(args))


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
    return_state=False,
    mesh=None,
    checkpoint=None,
):
    """Maximize `objective(params, *args)` for `steps` steps; returns `(params, losses)`, or with
    `return_state`, `(state, losses)` where `state` is the `SVIState` (params, optimizer state,
    step counter) to continue from.

        params, losses = ppl.fit(elbo, params, x, optimizer=optax.adam(1e-2), steps=2000, key=key)

    `params`: a pytree (dict, `ppl.constrained` nodes, an Equinox module; see the module
    docstring for which leaves are trained), or an `SVIState` from an earlier `fit(...,
    return_state=True)` to resume that run, optimizer state and step counter included. With the
    same `key` (and objective, optimizer, data, `batch_size`), fit(N steps) then fit(M steps) from
    its state gives bit-identical parameters to one fit of N + M steps, wherever N falls: step t
    draws from `jax.random.fold_in(key, t)` (also independently of `chunk_size`).

    `losses`: one entry per step of this call, the negated objective estimated at that step
    (before its update), whether or not the update was applied; a step skipped for a non-finite
    loss has NaN or inf there (so `~jnp.isfinite(losses)` marks the steps skipped for their loss),
    one skipped for a non-finite gradient keeps its finite loss. A warning reports how many steps
    were skipped; another, which trained leaves of the final parameters are not finite, if any (as
    with `skip_nonfinite=False` once a gradient is NaN), and how many steps had a non-finite loss
    (with the check: or update).

    `skip_nonfinite` (default True): skip the steps whose loss, or the trained parameters their
    update would produce, are not finite (a NaN or infinite gradient gives non-finite optax updates
    and so such parameters); a skipped step leaves the parameters and optimizer state as they were,
    and still advances the step counter. Every step runs as a plain optax update at the speed of a
    hand-written loop, testing only its loss; the parameters are tested once per chunk (a NaN or
    an infinity stays in them). Only a chunk where either test fails is run again, with a test of
    the parameters after every step, up to its first non-finite step, which is skipped by running
    the steps before it once more from the chunk's start; so a clean chunk runs once, one with
    non-finite steps costs up to about three times. Each applied step runs the same compiled code,
    so the result does not depend on `chunk_size`, and differs from a loop of `svi(...).step`
    (whose `lax.cond` XLA compiles with other rounding) only in the last bits. Sharp edges: an
    optimizer that turns non-finite gradients into finite updates (`optax.zero_nans`) has those
    steps applied, and a trained leaf that is not finite from the start (a `-inf` mask) makes
    every step count as non-finite: keep it out of `params`. `False`: apply every update, as
    optax does.

    `checkpoint`: a directory (str or path). After every chunk, the run's state (parameters,
    optimizer state, step counter) and the losses so far are saved there with Orbax (atomically;
    the latest save is kept); calling `fit` again with the same arguments and directory, after an
    interruption, resumes from the latest save and returns exactly what an uninterrupted fit
    returns, parameters and the whole `losses` bit for bit, static leaves taken from `params`. A
    directory holding another fit's save (other steps, key, parameter structure, shapes or
    `batch_size`; see `ppl.checkpoint`) raises a ValueError naming the difference. A finished
    fit's save stays: the same call returns its result without training. Each save costs a few
    tens of milliseconds (it is written while the next chunk runs): choose `chunk_size` so that a
    chunk takes longer.

    `batch_size`: minibatch the leading axis of the arguments listed in `data_argnums` (positions
    in `args`; default: all of them); they must share that axis, of length >= `batch_size`.
    `chunk_size`: steps per compiled call (one progress-bar update each). `progress`: show a
    `tqdm.auto` bar (also in Jupyter), one update per chunk, with the mean loss over the last
    chunk's applied steps and the running count of skipped steps once there are any; `False`
    prints nothing.

    `mesh`: train on several devices or hosts, data- and particle-parallel (`ppl.distributed`): a
    `jax.sharding.Mesh`, e.g. `jax.make_mesh((n,), ("data",))`, or a `ppl.Sharding` naming its
    axes. Each minibatch (the leading axis of the `data_argnums` arguments) is sharded over the data
    axis, so `batch_size` (without it, the data's length) must divide evenly over it, and the
    objective's particles over the particles axis if there is one. The parameters, optimizer state
    and key are replicated, except arrays the caller already placed on the mesh, which keep their
    sharding (so a large network's weights can be sharded with `jax.device_put` before `fit`); so
    are the data arguments (e.g. each host's shard, `jax.make_array_from_process_local_data`),
    which are otherwise replicated with `batch_size` (each device gathers its rows of the minibatch)
    and sharded without. Same key, same answer on any device count: the minibatch indices are drawn
    from the key as without a mesh, and random draws do not depend on the sharding, so 1, 2, 4 or 8
    devices give the same parameters to float rounding (the gradient's all-reduce sums in another
    order). The parameters come back on the mesh, placed as they went in."""
    _check_objective(objective)
    _check_optimizer(optimizer)
    spec = distributed.resolve(mesh)
    steps = _count("steps", steps, 0, "the number of optimizer steps")
    chunk_size = _count("chunk_size", chunk_size, 1, "steps per compiled call")
    data_argnums = tuple(range(len(args))) if data_argnums is None else tuple(data_argnums)
    if batch_size is not None:
        batch_size = _count("batch_size", batch_size, 1, "the minibatch size; batch_size=None uses all the data")
        _check_batch(args, data_argnums, batch_size)
    if spec is not None:
        _check_argnums(args, data_argnums)
        distributed.check_sizes(spec, args, data_argnums, batch_size)
    state = params if isinstance(params, SVIState) else svi(objective, optimizer, skip_nonfinite).init(params)
    arrays, static = _Static.split(_strong(state))
    saves = None
    if checkpoint is not None:
        described = _description(arrays, key, args, steps, skip_nonfinite, batch_size, data_argnums)
        saves = Checkpoints(checkpoint, described)
    arrays, key, args, placement = _placed(spec, arrays, key, args, data_argnums, batch_size)
    length = max(1, min(chunk_size, steps))
    compiled = functools.partial(_compiled_chunk, objective, optimizer, length, batch_size, data_argnums, static)
    run = compiled(spec, placement, False), compiled(spec, placement, True)  # the second compiles only if called
    try:
        arrays, losses, nonfinite = _chunks(run, arrays, key, args, steps, length, skip_nonfinite, progress, saves)
    finally:
        if saves is not None:
            saves.close()
    state = static.combine(arrays)
    _warn_nonfinite(state.params, nonfinite, skip_nonfinite)
    return (state if return_state else state.params), jnp.asarray(losses)


def _chunks(run, arrays, key, args, steps, length, skip_nonfinite, progress, saves):
    """`fit`'s loop: `steps` steps of `run` in chunks of `length`, resumed from the latest of
    `saves` (a `Checkpoints`, or None) and saved after each chunk; (arrays, losses, nonfinite)."""
    losses, nonfinite = [np.zeros(0, jnp.result_type(float))], [np.zeros(0, bool)]
    done = 0
    restored = saves.restore(arrays, losses[0].dtype) if saves is not None else None
    if restored is not None:
        done, arrays, *history = restored
        losses[0], nonfinite[0] = history
    with tqdm(total=steps, initial=done, disable=not progress, unit="step") as bar:
        postfix = _count_nonfinite({}, nonfinite[0], skip_nonfinite)
        for start in range(done, steps, length):
            n = min(length, steps - start)
            arrays, chunk_losses, chunk_nonfinite = _run_chunk(run, arrays, key, n, args, skip_nonfinite)
            losses.append(chunk_losses)
            nonfinite.append(chunk_nonfinite)
            if saves is not None:
                saves.save(start + n, arrays, np.concatenate(losses), np.concatenate(nonfinite))
            _show(bar, postfix, chunk_losses, chunk_nonfinite, skip_nonfinite)
    return arrays, np.concatenate(losses), np.concatenate(nonfinite)


def _description(arrays, key, args, steps, skip_nonfinite, batch_size, data_argnums):
    """What a checkpoint records of a fit (see `ppl.checkpoint`), to refuse resuming another."""
    key_data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    return {
        "steps": steps,
        "key": [str(key.dtype), _host_value(key_data).tolist()],
        "first_step": int(_host_value(arrays.step)),
        "skip_nonfinite": bool(skip_nonfinite),
        "batch_size": batch_size,
        "data_argnums": list(data_argnums),
        "state": leaf_specs(arrays),
        "args": leaf_specs(args),
    }


def _host_value(x):
    """The value of a local or replicated array on this host (a multi-host array is not fetchable whole)."""
    return np.asarray(x.addressable_data(0) if isinstance(x, jax.Array) else x)


def _placed(spec, arrays, key, args, data_argnums, batch_size):
    """`fit`'s state arrays, key and arguments placed on the mesh (see `fit`), with the state's
    placement; all unchanged, and no placement, without a mesh."""
    if spec is None:
        return arrays, key, args, None
    arrays, key = distributed.place(spec, arrays), distributed.place(spec, key)
    args = distributed.place_args(spec, args, data_argnums, split=batch_size is None)
    return arrays, key, args, distributed.Placement.of(arrays)


def _show(bar, postfix, losses, nonfinite, skip_nonfinite):
    """Advance `bar` by one chunk. `postfix`, kept across chunks: `loss`, the mean over the
    chunk's applied steps (kept from the last chunk that had some), and once there are any, the
    running count of `skipped` steps (without the check: of `nonfinite` ones, all applied)."""
    applied = losses[~nonfinite] if skip_nonfinite else losses
    if applied.size:
        postfix["loss"] = f"{applied.mean():.4g}"
    bar.set_postfix(_count_nonfinite(postfix, nonfinite, skip_nonfinite), refresh=False)
    bar.update(losses.size)


def _count_nonfinite(postfix, nonfinite, skip_nonfinite):
    """`postfix` with the non-finite steps among `nonfinite` added to its running count, if any."""
    if nonfinite.any():
        label = "skipped" if skip_nonfinite else "nonfinite"
        postfix[label] = postfix.get(label, 0) + int(nonfinite.sum())
    return postfix


def _warn_nonfinite(params, nonfinite, skip_nonfinite):
    """`fit`'s warnings: how many steps were skipped; which trained leaves of the final
    parameters are not finite, with how many steps had a non-finite loss or update."""
    steps, count = nonfinite.size, int(nonfinite.sum())
    if skip_nonfinite and count:
        warnings.warn(f"fit skipped {count} of {steps} steps whose loss or update was not finite", stacklevel=3)
    bad = _nonfinite_leaves(params)
    if bad:
        first = f" (the first: losses[{np.argmax(nonfinite)}])" if count else ""
        hint = (
            "the initial parameters may not have been finite"
            if skip_nonfinite
            else "skip_nonfinite=True (the default) skips such updates; a smaller learning rate may avoid them"
        )
        warnings.warn(
            f"fit ended with non-finite parameters at {', '.join(bad)}; {count} of {steps} steps had a "
            f"non-finite loss{' or update' if skip_nonfinite else ''}{first}: {hint}",
            RuntimeWarning,
            stacklevel=3,
        )


def _nonfinite_leaves(params):
    """The paths (`jax.tree_util.keystr`) of the trained leaves holding a NaN or an infinity."""
    leaves = [(path, leaf) for path, leaf in tree_flatten_with_path(params)[0] if _is_trained(leaf)]
    finite = jax.device_get(_all_finite([leaf for _, leaf in leaves]))
    return [keystr(path) for (path, _), ok in zip(leaves, finite) if not ok]


@jax.jit
def _all_finite(leaves):
    """Whether each array holds only finite values: one compiled program (on several hosts, every
    eager operation would be one, compiled in step on all of them)."""
    return [jnp.all(jnp.isfinite(leaf)) for leaf in leaves]
