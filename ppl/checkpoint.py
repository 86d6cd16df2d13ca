"""`ppl.fit`'s checkpoints (`fit(..., checkpoint=directory)`): the run's state, saved with Orbax
after every chunk, so that the same call, run again after an interruption, resumes where the last
save left off and returns what an uninterrupted fit would have, bit for bit.

    params, losses = ppl.fit(elbo, params, x, optimizer=optax.adam(1e-3), steps=10_000, key=key,
                             checkpoint="runs/vae")   # killed at step 6,450: the last save is 6,400
    params, losses = ppl.fit(...the same call...)     # runs steps 6,400-9,999; all 10,000 losses

A save holds the array leaves of the `SVIState` (parameters, optimizer state, step counter), the
losses and non-finite flags so far, and a description of the fit: the number of steps, the key,
the step counter it started from, `skip_nonfinite`, `batch_size`, `data_argnums`, and the paths,
shapes and dtypes of the state's and the data's array leaves. Resuming a checkpoint whose
description differs from the call's raises, naming the difference; a different objective,
optimizer hyperparameter or data of the same shapes cannot be told apart. Static leaves (an
Equinox module's activation function) are not saved: they come from the call's `params`.

Orbax writes each save to a temporary directory and renames it once complete, so a fit killed
while saving resumes from the save before; only the latest save is kept. Needs `orbax-checkpoint`
(`pip install ppl[checkpoint]`).
"""

import itertools
import json
import os

import jax
import numpy as np
from jax.tree_util import keystr, tree_flatten_with_path

from ppl.leaves import is_array

FORMAT = "ppl.fit checkpoint 1"


def leaf_specs(tree):
    """`[path, shape, dtype]` of each array leaf: `leaf_specs({"w": jnp.ones(2)})` is
    `[["['w']", [2], "float32"]]`."""
    return [
        [keystr(path), list(np.shape(leaf)), str(getattr(leaf, "dtype", type(leaf).__name__))]
        for path, leaf in tree_flatten_with_path(tree)[0]
        if is_array(leaf)
    ]


def _orbax():
    try:
        import orbax.checkpoint
    except ImportError as error:
        raise ImportError(
            "fit(..., checkpoint=...) saves with Orbax: pip install orbax-checkpoint (or ppl[checkpoint])"
        ) from error
    return orbax.checkpoint


class Checkpoints:
    """The saves of one fit in `directory`, described by `description` (JSON: lists, not tuples).

    saves = Checkpoints("runs/vae", {"steps": 1000, ...})
    done, arrays, losses, nonfinite = saves.restore(arrays, losses.dtype)  # or None: nothing saved
    saves.save(done, arrays, losses, nonfinite); saves.close()"""

    def __init__(self, directory, description):
        if not isinstance(directory, str | os.PathLike):
            raise TypeError(f"checkpoint must be a directory (a str or a path), got {type(directory).__name__}")
        self.ocp = _orbax()
        self.directory = os.path.abspath(os.fspath(directory))
        self.description = json.loads(json.dumps({"format": FORMAT, **description}))
        options = self.ocp.CheckpointManagerOptions(max_to_keep=1)
        self.manager = self.ocp.CheckpointManager(self.directory, options=options)

    def restore(self, arrays, loss_dtype):
        """`(steps done, arrays, losses, nonfinite)` from the latest save, `arrays` giving the
        structure, shapes and placement (shardings) of the state; None if nothing was saved."""
        done = self.manager.latest_step()
        if done is None:
            return None
        args = self.ocp.args
        self._check(self.manager.restore(done, args=args.Composite(fit=args.JsonRestore()))["fit"])
        leaves, treedef = jax.tree.flatten(arrays)
        target = {
            "state": [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding) for a in leaves],
            "losses": np.zeros(done, loss_dtype),
            "nonfinite": np.zeros(done, bool),
        }
        saved = self.manager.restore(done, args=args.Composite(arrays=args.StandardRestore(target)))["arrays"]
        return done, treedef.unflatten(saved["state"]), np.asarray(saved["losses"]), np.asarray(saved["nonfinite"])

    def save(self, done, arrays, losses, nonfinite):
        """Save the state after `done` steps (in the background: the next chunk runs meanwhile)."""
        tree = {"state": jax.tree.leaves(arrays), "losses": losses, "nonfinite": nonfinite}
        args = self.ocp.args
        saved = args.Composite(fit=args.JsonSave(self.description), arrays=args.StandardSave(tree))
        self.manager.save(done, args=saved)

    def close(self):
        """Wait for the last save to be written."""
        self.manager.close()

    def _check(self, saved):
        """Raise unless the saved description is this fit's, naming the first difference."""
        if not isinstance(saved, dict) or saved.get("format") != FORMAT:
            raise ValueError(f"checkpoint={self.directory!r} holds an Orbax checkpoint that is not a ppl.fit one")
        for name, value in self.description.items():
            if saved.get(name) != value:
                raise ValueError(
                    f"checkpoint={self.directory!r} holds another fit: {_difference(name, saved.get(name), value)}; "
                    "call fit with the arguments it was saved with to resume it, or pass another directory"
                )


def _difference(name, saved, current):
    """`name`'s saved and current values, or for lists of leaf specs, the first entry that differs."""
    if name in ("state", "args"):
        for old, new in itertools.zip_longest(saved or [], current):
            if old != new:
                return f"its {name} leaf {_spec_text(old)} is {_spec_text(new)} in this call"
    return f"it was saved with {name}={saved}, this call has {name}={current}"


def _spec_text(spec):
    """`["['w']", [2, 3], "float32"]` as `['w'] float32[2, 3]`; None as `missing`."""
    return "missing" if spec is None else f"{spec[0]} {spec[2]}{spec[1]}"
