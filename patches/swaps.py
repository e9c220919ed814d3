"""Swapping a model's modules in place and putting them back exactly.

A swap records (parent, attribute name, original module) on the model itself, so :func:`restore_swaps` puts the
very same module objects back: the restored state_dict has the same keys and the same tensors. Replacement
modules share their trainable submodules (radial MLPs, denominators) with the originals instead of copying them.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch import nn


SWAPS_ATTRIBUTE = "_fastmlip_swaps"


@dataclass
class Swap:
    parent: nn.Module
    name: str
    original: nn.Module
    replacement: nn.Module
    qualified_name: str


def swaps_of(model: nn.Module) -> list:
    return model.__dict__.get(SWAPS_ATTRIBUTE, [])


def resolve_parent(model: nn.Module, qualified_name: str) -> tuple:
    """(parent module, attribute name) of the submodule called ``qualified_name``."""
    parent_name, _, name = qualified_name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), name


def swap_in_place(model: nn.Module, plan: Iterable) -> list:
    """Replace modules per ``plan`` = [(qualified name, factory(original) -> replacement)], all or nothing.

    Replacements are all built before the first one is put in, and if putting them in fails midway the ones
    already put in are taken out again, so the model is either fully swapped or exactly as before.
    """
    staged = []
    for qualified_name, factory in plan:
        parent, name = resolve_parent(model, qualified_name)
        original = parent._modules[name]
        replacement = factory(original).train(original.training)  # a new module starts in train mode
        staged.append(Swap(parent, name, original, replacement, qualified_name))
    done = []
    try:
        for swap in staged:
            swap.parent._modules[swap.name] = swap.replacement
            done.append(swap)
    except BaseException:
        for swap in reversed(done):
            swap.parent._modules[swap.name] = swap.original
        raise
    model.__dict__[SWAPS_ATTRIBUTE] = swaps_of(model) + done
    return done


def apply_plan(model, swaps, skipped: dict, *, strict: bool) -> list:
    """Carry out a patch's plan in place; with ``strict`` refuse (model untouched) if anything would be skipped."""
    if strict and skipped:
        details = "; ".join(f"{name}: {reason}" for name, reason in skipped.items())
        raise ValueError(f"cannot accelerate every module (strict=True), model left unchanged: {details}")
    swap_in_place(model, swaps)
    return list(skipped)


def is_accelerated(model) -> bool:
    return bool(swaps_of(model))


def _placement_of(module: nn.Module) -> tuple:
    """(device, floating dtype) of a module's tensors; (None, None) when it holds none."""
    for tensor in list(module.parameters()) + list(module.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return None, None


def _put_back(swap: Swap) -> None:
    """Reinstate an original, moved to where the model went meanwhile (``.to()``/``.double()`` after swapping) and in
    the mode it was switched to (``.eval()``/``.train()``)."""
    device, dtype = _placement_of(swap.replacement)
    if device is not None:
        swap.original.to(device=device, dtype=dtype)
    swap.original.train(swap.replacement.training)
    swap.parent._modules[swap.name] = swap.original


def restore_swaps(model: nn.Module) -> int:
    """Put every original module back (latest swap first); returns how many were restored."""
    swaps = swaps_of(model)
    for swap in reversed(swaps):
        _put_back(swap)
    model.__dict__.pop(SWAPS_ATTRIBUTE, None)
    return len(swaps)


@contextlib.contextmanager
def originals_in_place(model: nn.Module):
    """Run the original modules for a while (the exact original model, at no copying cost)."""
    swaps = swaps_of(model)
    for swap in reversed(swaps):
        _put_back(swap)
    try:
        yield model
    finally:
        for swap in swaps:
            swap.parent._modules[swap.name] = swap.replacement


def first_tensor_placement(model: nn.Module) -> tuple:
    """(device, dtype) of the model's first floating parameter, defaulting to CPU float32."""
    device, dtype = _placement_of(model)
    return device or torch.device("cpu"), dtype or torch.float32


def share_tensors(target: nn.Module, original: nn.Module) -> None:
    """Hold the original's own parameters and buffers (the same objects): state_dict keys and tensors stay."""
    for name, param in original.named_parameters(recurse=False):
        setattr(target, name, param)
    for name, buffer in original.named_buffers(recurse=False):
        target.register_buffer(name, buffer, persistent=name not in original._non_persistent_buffers_set)


def fast_replacement(module: nn.Module, factories: dict) -> Optional[type]:
    """The class in ``factories`` (keyed by exact module type) that can describe ``module``, else None."""
    factory = factories.get(type(module))
    if factory is None:
        return None
    try:
        factory(module)
    except ValueError:
        return None
    return factory


def maybe_fast(module: nn.Module, factory) -> nn.Module:
    """``factory(module)``, or ``module`` itself when the factory cannot describe it (ValueError)."""
    try:
        return factory(module)
    except ValueError:
        return module
