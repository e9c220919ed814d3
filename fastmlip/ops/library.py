"""fastmlip's operators on torch's dispatcher: what ``torch.library.custom_op`` registers, less its dynamo import.

Why: custom_op wraps every implementation in ``torch._disable_dynamo``, which imports torch._dynamo at the op's
first call: 1.4 s on this 2-core machine, 5.6 s on the lent H200 (2026-12-03), the largest part of an exported
model's warm start, which imports nothing else heavy. Here the same registrations go through ``torch.library``:
the schema inferred from the annotations, the implementation for every backend (CompositeExplicitAutograd), a fake
implementation for torch.export, autograd through ``torch.library.register_autograd``. The dynamo guard stays
where it matters: once torch._dynamo is imported (someone may be compiling), implementations run under
``torch._dynamo.disable`` as custom_op's do.
"""
from __future__ import annotations

import functools
import sys

import torch

LIBRARY = torch.library.Library("fastmlip", "FRAGMENT")


def _outside_dynamo(function):
    """``function``, run under ``torch._dynamo.disable`` whenever torch._dynamo has been imported."""
    guarded = []

    @functools.wraps(function)
    def implementation(*args, **kwargs):
        dynamo = sys.modules.get("torch._dynamo")
        if dynamo is None:
            return function(*args, **kwargs)
        if not guarded:
            guarded.append(dynamo.disable(function, recursive=True))
        return guarded[0](*args, **kwargs)

    return implementation


class Operator:
    """One ``fastmlip::`` operator, called like its Python implementation; ``overload`` is the dispatcher's op
    (what ``torch.library.opcheck`` and exported graphs name)."""

    def __init__(self, name: str, function):
        self.name = name
        LIBRARY.define(name + torch.library.infer_schema(function, mutates_args=()),
                       tags=(torch.Tag.pt2_compliant_tag,))
        LIBRARY.impl(name, _outside_dynamo(function), "CompositeExplicitAutograd")
        self.overload = getattr(torch.ops.fastmlip, name).default
        self._fake = None
        torch.library.register_fake(self.overload, self._call_fake, lib=LIBRARY)
        functools.update_wrapper(self, function)

    def __call__(self, *args, **kwargs):
        return self.overload(*args, **kwargs)

    def _call_fake(self, *args, **kwargs):
        if self._fake is None:
            raise RuntimeError(f"fastmlip::{self.name} has no fake implementation: it cannot be traced")
        return self._fake(*args, **kwargs)

    def register_fake(self, function):
        """Decorator: the output's shape and dtype from the inputs' (torch.export traces with fake tensors)."""
        self._fake = function
        return function

    def register_autograd(self, backward, *, setup_context) -> None:
        torch.library.register_autograd(self.overload, backward, setup_context=setup_context, lib=LIBRARY)


def custom_op(qualified_name: str):
    """Decorator: the function becomes the operator ``fastmlip::NAME`` (``qualified_name``), as
    ``torch.library.custom_op(qualified_name, mutates_args=())`` would make it."""
    namespace, _, name = qualified_name.partition("::")
    if namespace != "fastmlip" or not name:
        raise ValueError(f"fastmlip operators are named fastmlip::NAME, not {qualified_name!r}")
    return lambda function: Operator(name, function)
