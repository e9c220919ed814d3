"""Problems are passed to custom ops by key (ops take only tensors and scalars); this maps keys back."""
from __future__ import annotations

_PROBLEMS: dict = {}


def register(problem):
    """Make ``problem`` reachable from ops under ``problem.key``; returns the key."""
    _PROBLEMS.setdefault(problem.key, problem)
    return problem.key


def lookup(key: str):
    try:
        return _PROBLEMS[key]
    except KeyError:
        raise KeyError(f"fastmlip problem {key!r} was never registered in this process") from None
