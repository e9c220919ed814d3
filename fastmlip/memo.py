"""Values derived from a tensor, kept on the tensor itself.

Every layer of a step receives the same species index and edge list, and sorting or chunking them once per step
instead of once per layer saves dozens of launches. Keeping the result on the input tensor (its ``__dict__``)
instead of in a module-level cache means it lives exactly as long as that tensor and belongs to the call that
made it: two models, or two threads, never see each other's (they make their own inputs), and nothing E-sized
outlives the step.
"""
from __future__ import annotations

from typing import Callable, Hashable

import torch

_SLOT = "_fastmlip_derived"
_WITH = "derived_with"  # first part of the keys of derived_with's values


def _hashable(key):
    """``key`` with its symbolic sizes (a node count while a program is exported) as their expressions."""
    if isinstance(key, tuple):
        return tuple(_hashable(part) for part in key)
    return ("symbolic", str(key)) if isinstance(key, torch.SymInt) else key


def derived(tensor: torch.Tensor, key: Hashable, compute: Callable):
    """``compute()``, once per ``key`` for this tensor object and its current version (an in-place change of the
    tensor computes it again)."""
    key = _hashable(key)
    cache = tensor.__dict__.setdefault(_SLOT, {})
    hit = cache.get(key)
    if hit is not None and hit[0] == tensor._version:
        return hit[1]
    value = compute()
    cache[key] = (tensor._version, value)
    return value


def derived_with(tensor: torch.Tensor, key: Hashable, sources: tuple, compute: Callable):
    """:func:`derived` for a value that also depends on ``sources`` (a model's parameters or buffers): they are
    named in the key by identity and version, and the kept value holds them, so no other tensor can take their
    ids while it is kept (a model freed and another built in its place computes anew)."""
    return derived(tensor, (_WITH, key, _identities(sources)), lambda: (sources, compute()))[1]


def derived_with_values(tensor: torch.Tensor, name: str) -> list:
    """The values :func:`derived_with` keeps on ``tensor`` under keys whose first part is ``name``, made from
    sources as they are now: what a pass would reuse instead of computing again."""
    values = []
    for key, (version, kept) in tensor.__dict__.get(_SLOT, {}).items():
        if isinstance(key, tuple) and key[0] == _WITH and _first_part(key[1]) == name:
            sources, value = kept
            if version == tensor._version and key[2] == _identities(sources):
                values.append(value)
    return values


def _first_part(key: Hashable) -> Hashable:
    return key[0] if isinstance(key, tuple) else key


def _identities(sources: tuple) -> tuple:
    return tuple((id(source), source._version) for source in sources)


def attach(tensor: torch.Tensor, key: Hashable, value) -> None:
    """Give ``tensor`` a value that :func:`attached` returns while the tensor is unchanged (e.g. the edge mask
    that belongs to an edge list)."""
    tensor.__dict__.setdefault(_SLOT, {})[_hashable(key)] = (tensor._version, value)


def attached(tensor: torch.Tensor, key: Hashable, default=None):
    hit = tensor.__dict__.get(_SLOT, {}).get(_hashable(key))
    return hit[1] if hit is not None and hit[0] == tensor._version else default
