"""Choice maps and traces.

A choice map is a nested dict from names to values (`{"z": 1.0, "enc": {"h": ...}}`); plain dicts
are accepted everywhere. `ChoiceMap` adds a deep merge with `|` and is a pytree.

    >>> cm = ChoiceMap({"z": 0.3}) | {"x": jnp.ones(2)}
    >>> cm["x"]
"""

from typing import Any, NamedTuple

import jax


class ChoiceMap(dict):
    """A nested dict of choices; `a | b` merges deeply (b wins where both have a value). `aux`:
    the address tuples of its auxiliary choices (a guide's `ppl.sample(..., aux=True)` sites),
    which a density or importance weight skips where its program has no site (see `ppl.sample`);
    copies and merges keep them."""

    def __init__(self, *args, aux=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.aux = frozenset(aux).union(*(getattr(a, "aux", ()) for a in args))

    def __or__(self, other):
        merged = ChoiceMap(self, aux=getattr(other, "aux", ()))
        for name, value in dict(other).items():
            if isinstance(value, dict) and isinstance(merged.get(name), dict):
                merged[name] = ChoiceMap(merged[name]) | value
            else:
                merged[name] = value
        return merged

    def __ror__(self, other):
        return ChoiceMap(other) | self

    def __repr__(self):
        return f"ChoiceMap({dict.__repr__(self)})"


jax.tree_util.register_pytree_with_keys(
    ChoiceMap,
    lambda cm: ([(jax.tree_util.DictKey(k), cm[k]) for k in sorted(cm)], (tuple(sorted(cm)), cm.aux)),
    lambda static, values: ChoiceMap(zip(static[0], values), aux=static[1]),
)


def flatten_choices(choices, prefix=()):
    """{address tuple: value} of a nested choice map."""
    if isinstance(choices, Trace):
        raise TypeError("expected a choice map (a dict), got a Trace: pass `trace.choices`")
    if not isinstance(choices, dict):
        raise TypeError(f"expected a choice map (a dict from names to values), got {type(choices).__name__}")
    flat = {}
    for name, value in dict(choices).items():
        if isinstance(value, dict):
            flat.update(flatten_choices(value, prefix + (name,)))
        else:
            flat[prefix + (name,)] = value
    return flat


def nest_choices(flat, aux=()):
    """The nested `ChoiceMap` of {address tuple: value}, `aux` its auxiliary addresses."""
    root = ChoiceMap(aux=aux)
    for address, value in flat.items():
        node = root
        for name in address[:-1]:
            node = node.setdefault(name, ChoiceMap())
        node[address[-1]] = value
    return root


class Trace(NamedTuple):
    """The result of `simulate`/`generate`: choices, total log density, return value, arguments."""

    choices: ChoiceMap
    score: Any
    retval: Any
    args: tuple
