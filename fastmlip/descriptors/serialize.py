"""Problems as JSON: what an exported model file carries so that a fresh process can register the problems its
operators name, without importing a framework and without unpickling anything.

Every problem is a frozen dataclass of numbers, strings, tuples and other such dataclasses; an activation is kept
by name and scale (its callable is rebuilt from the name, ``scale * f(v)`` as e3nn's ``normalize2mom`` computes
it). Reading accepts only the classes of :mod:`fastmlip.descriptors` and checks that each problem's content hash
(its key) is the one it was written under.
"""
from __future__ import annotations

import dataclasses
import json

from . import activations, gate, irreps, linear, radial_basis, radial_mlp, spherical_harmonics
from . import symmetric_contraction, tensor_product

_MODULES = (activations, gate, irreps, linear, radial_basis, radial_mlp, spherical_harmonics, symmetric_contraction,
            tensor_product)
_SKIPPED = ("key", "function")  # recomputed on reading


def _classes() -> dict:
    return {name: cls for module in _MODULES for name, cls in vars(module).items()
            if isinstance(cls, type) and dataclasses.is_dataclass(cls) and cls.__module__ == module.__name__}


def _encode(value):
    if dataclasses.is_dataclass(value):
        if isinstance(value, activations.Activation) and value.name not in activations.KNOWN_ACTIVATIONS:
            raise ValueError(f"an activation fastmlip does not know by name ({value.function!r}) cannot be written")
        fields = {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value) if f.name not in _SKIPPED}
        return {"type": type(value).__name__, "fields": fields}
    if isinstance(value, tuple):
        return {"tuple": [_encode(v) for v in value]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot write {type(value).__name__} into a problem description")


def _activation_function(name: str, scale: float):
    """The callable of a known activation, ``scale * f(v)`` (``f(v)`` alone when the scale is 1, as e3nn does)."""
    import torch
    import torch.nn.functional as F

    if name == "identity":
        return None
    f = {"silu": F.silu, "sigmoid": torch.sigmoid, "tanh": torch.tanh, "abs": torch.abs}[name]
    return f if scale == 1.0 else (lambda v: f(v).mul(scale))


def _decode(value, classes: dict):
    if isinstance(value, dict) and set(value) == {"tuple"}:
        return tuple(_decode(v, classes) for v in value["tuple"])
    if isinstance(value, dict) and set(value) == {"type", "fields"}:
        cls = classes.get(value["type"])
        if cls is None:
            raise ValueError(f"unknown problem part {value['type']!r}")
        kwargs = {name: _decode(v, classes) for name, v in value["fields"].items()}
        if cls is activations.Activation:
            if kwargs["name"] not in activations.KNOWN_ACTIVATIONS:
                raise ValueError(f"unknown activation {kwargs['name']!r}")
            kwargs["function"] = _activation_function(kwargs["name"], kwargs["scale"])
        made = cls(**kwargs)
        return irreps.with_key(made) if any(f.name == "key" for f in dataclasses.fields(cls)) else made
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ValueError(f"malformed problem description near {str(value)[:60]!r}")


def problems_to_json(problems) -> str:
    """``{key: description}`` of ``problems`` as JSON text."""
    return json.dumps({p.key: _encode(p) for p in problems})


def problems_from_json(text: str) -> list:
    """The problems of :func:`problems_to_json`'s text; ValueError when any is malformed or not what its key says."""
    classes = _classes()
    try:
        described = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"problem descriptions are not JSON ({exc})") from None
    if not isinstance(described, dict):
        raise ValueError("problem descriptions are not a mapping")
    problems = []
    for key, value in described.items():
        problem = _decode(value, classes)
        if getattr(problem, "key", None) != key:
            raise ValueError(f"problem {key!r} does not match its description (hash {getattr(problem, 'key', None)})")
        problems.append(problem)
    return problems
