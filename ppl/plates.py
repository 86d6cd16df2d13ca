"""NumPyro's `plate` context manager: conditionally independent batch dimensions of the sites
written inside it.

    with ppl.plate("data", N):                      # sites inside get batch dimension N at dim -1
        ppl.sample("y", dist.Normal(mu, 1.0), obs=y)    # y.shape == (N,)

    with ppl.plate("data", N, subsample_size=B):     # a minibatch of B of N data points:
        ppl.sample("y", dist.Normal(mu, 1.0), obs=y_batch)   # log densities scaled by N / B

As in NumPyro, the outermost plate takes dim -1, the next -2, and so on (or `dim=`); a site's
distribution is broadcast to the plates' sizes (`expand`), and a batch dimension of another
size there is an error naming the site and the plate. Unlike NumPyro, a subsampled plate does
not draw the subsample: the data handed in *is* the minibatch (as `ppl.fit(batch_size=...)`
makes it), and the plate only scales densities; it yields the indices `arange(B)` of its
elements. The plates are a stack that only exists while a program is being staged (Python's
`with` is a tracing-time construct); nothing of it survives into the staged program except the
sites' batch shapes and scales.
"""

import threading
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

_stack = threading.local()


class Plate(NamedTuple):
    name: str
    size: int
    subsample_size: int | None
    dim: int

    @property
    def elements(self):
        return self.size if self.subsample_size is None else self.subsample_size

    @property
    def scale(self):
        return 1.0 if self.subsample_size is None else self.size / self.subsample_size


def active():
    """The plates entered so far, outermost first."""
    return getattr(_stack, "plates", ())


class plate_context:
    """`with plate_context(name, size, subsample_size=None, dim=None) as indices:` (what
    `ppl.plate(name, size)` returns; see the module docstring)."""

    def __init__(self, name, size, subsample_size=None, dim=None):
        check_sizes(name, size, subsample_size)
        used = {p.dim for p in active()}
        if dim is None:
            dim = -1 - len(used) if not used else min(used) - 1
        if not isinstance(dim, int) or dim >= 0:
            raise ValueError(f"plate '{name}': dim must be a negative int (counted from the right), got {dim!r}")
        if dim in used:
            raise ValueError(f"plate '{name}': dim {dim} is already taken by an enclosing plate")
        self.plate = Plate(name, size, subsample_size, dim)

    def __enter__(self):
        _stack.plates = active() + (self.plate,)
        return jnp.arange(self.plate.elements)

    def __exit__(self, *exc):
        _stack.plates = active()[:-1]
        return False


def check_sizes(name, size, subsample_size):
    """Raise unless `size` (if given) is a positive int and `subsample_size` (if given) a positive
    int no larger than `size`, which it then needs."""
    where = f"plate '{name}'" if name else "plate"
    for label, value in (("size", size), ("subsample_size", subsample_size)):
        if value is not None and not (_is_int(value) and value >= 1):
            raise ValueError(f"{where}: {label} must be a positive int, got {value!r}")
    if subsample_size is not None:
        if size is None:
            raise ValueError(f"{where} with subsample_size needs the full data set's size")
        if subsample_size > size:
            raise ValueError(f"{where}: subsample_size={subsample_size} is larger than size={size}")


def _is_int(value):
    return not isinstance(value, bool) and isinstance(value, (int, np.integer))


def broadcast(address, distribution):
    """(distribution broadcast over the active plates, product of their density scales)."""
    plates = active()
    if not plates:
        return distribution, 1.0
    batch = list(distribution.batch_shape)
    rank = max(len(batch), max(-p.dim for p in plates))
    batch = [1] * (rank - len(batch)) + batch
    scale = 1.0
    for p in plates:
        have = batch[p.dim]
        if have not in (1, p.elements):
            raise ValueError(
                f"site '{address}' has batch dimension {have} at dim {p.dim}, where plate '{p.name}' has "
                f"{p.elements} elements (batch shape {distribution.batch_shape})"
            )
        batch[p.dim] = p.elements
        scale *= p.scale
    if tuple(batch) != tuple(distribution.batch_shape):
        distribution = distribution.expand(tuple(batch))
    return distribution, scale
