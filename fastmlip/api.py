"""Load a model, accelerate it in place, put it back: the same calls for every supported framework.

Each framework lives in a patch module (``fastmlip.patches.sevenn``, ``fastmlip.patches.mace``) that provides
every member of :class:`fastmlip.patches.framework.Framework`; this module only picks one.
"""
from __future__ import annotations

import importlib
import os
import time
import warnings
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastmlip.patches.framework import Framework

FRAMEWORK_MODULES = ("fastmlip.patches.sevenn", "fastmlip.patches.mace", "fastmlip.patches.exported")


def _patch_modules() -> list[Framework]:
    """The framework patches present in this installation (a missing one is simply not offered)."""
    modules = []
    for name in FRAMEWORK_MODULES:
        try:
            modules.append(importlib.import_module(name))
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
    return modules


def framework_of(model) -> Framework:
    """The patch module that handles ``model``; TypeError for a model no patch recognises."""
    for patch in _patch_modules():
        if patch.handles(model):
            return patch
    names = ", ".join(m.FRAMEWORK for m in _patch_modules()) or "none installed"
    raise TypeError(f"fastmlip does not know models of type {type(model).__module__}.{type(model).__name__} "
                    f"(frameworks: {names})")


def _known_names() -> list:
    names = []
    for patch in _patch_modules():
        names.extend(patch.pretrained_checkpoints())
    return names


def _looks_like_mace(path: str) -> bool:
    return path.endswith(".model") or "mace" in os.path.basename(path).lower()


def patch_for_file(path_or_name) -> Framework:
    """The patch module that can load ``path_or_name``; ValueError with a one-line reason otherwise."""
    text = os.fspath(path_or_name)
    patches = _patch_modules()
    for patch in patches:
        if patch.can_load(text):
            return patch
    if not os.path.exists(text):
        raise ValueError(f"{text}: no such file and not a known model name (known: {', '.join(_known_names())})")
    if os.path.isdir(text):
        raise ValueError(f"{text}: is a directory, not a model file")
    if _looks_like_mace(text) and not any(p.FRAMEWORK == "mace" for p in patches):
        raise ValueError(f"{text}: looks like a MACE model, but fastmlip.patches.mace is not installed here")
    reasons = []
    for patch in patches:
        try:
            patch.read_checkpoint(text)
        except ValueError as exc:
            reasons.append(str(exc).replace(f"{text}: ", "", 1))
    detail = "; ".join(reasons) if reasons else "no installed framework recognises it"
    raise ValueError(f"{text}: not a model fastmlip can load ({detail})")


def resolve_device(device):
    """A torch device from "auto" (or None: CUDA when available, else CPU), "cpu", "cuda", "cuda:1", ...;
    ValueError in one line for a name torch does not know or a GPU this machine does not have."""
    import torch

    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {str(device)!r} asked for, but this machine has no CUDA GPU "
                             f"(torch {torch.__version__})")
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {str(device)!r} asked for, but this machine has {count} CUDA GPU(s)")
    elif device.type not in ("cpu",):
        raise ValueError(f"device {str(device)!r}: fastmlip runs on cpu or cuda")
    return device


def resolve_dtype(dtype):
    """Accept torch dtypes and the strings "float32"/"float64" (also "fp32"/"fp64")."""
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64,
             "fp64": torch.float64, "float": torch.float32, "double": torch.float64}
    if str(dtype) not in names:
        raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
    return names[str(dtype)]


def trust(path, trusted: bool, sha256=None) -> bool:
    """Whether the caller trusts ``path``: ``trusted``, or a pinned ``sha256`` that the file matches
    (:class:`fastmlip.UntrustedFileError` when it does not)."""
    from fastmlip.patches.files import UntrustedFileError, file_sha256

    if sha256 is None:
        return bool(trusted)
    actual = file_sha256(path) if os.path.isfile(path) else None
    if actual != str(sha256).strip().lower():
        raise UntrustedFileError(f"{path}: its SHA-256 is {actual}, not the {sha256} you pinned; not loaded")
    return True


def load(path_or_name, device=None, dtype=None, *, trusted: bool = False, sha256=None):
    """The framework's own model from a checkpoint, a pretrained name, or a file ``fastmlip convert`` wrote.

    ``dtype``: a torch dtype or "float32"/"float64". Files converted ``--to fast`` come back accelerated (and
    checked against the original); files converted ``--to exported`` come back as the exported program, without
    importing their framework (:mod:`fastmlip.patches.exported`; pickled tensors: trusted files only).

    No code from the file runs unless you trust it. SevenNet checkpoints hold tensors and arrays and are read
    without running code. A MACE ``.model`` file is a whole pickled model: it is opened only with ``trusted=True``,
    or with ``sha256`` equal to the file's SHA-256 (pin a file you checked once); otherwise
    :class:`fastmlip.UntrustedFileError` says so in one line. Checkpoints shipped inside installed packages are
    trusted.
    """
    patch = patch_for_file(path_or_name)
    path = os.fspath(path_or_name)
    model = patch.load(path, device=device, dtype=resolve_dtype(dtype), trusted=trust(path, trusted, sha256))
    stored = model.__dict__.get("_fastmlip_file") or {}
    if stored.get("format") == "fast":
        accelerate(model, check=True)
    elif stored.get("format") == "exported":  # comes accelerated: its kernels, before anything runs
        from fastmlip.patches import self_check

        start = time.perf_counter()
        model.__dict__["_fastmlip_kernels"] = self_check.prepare_kernels(model, patch)
        model.__dict__["_fastmlip_timing"] = {"kernels": time.perf_counter() - start}
    return model


def accelerate(model, *, check: bool = True, strict: bool = False, progress=None):
    """Swap the model's e3nn modules for fastmlip ones in place and return the same object.

    Modules that cannot be accelerated stay as they are and are named in one warning (strict=True: ValueError
    and the model untouched). On a GPU every kernel the model will launch is then compiled in parallel (or
    loaded from the cache) before anything runs; :func:`kernel_report` says what was done (``progress``: a
    progress bar, None: when stderr is a terminal). With ``check`` the accelerated model is compared with its
    originals on a probe structure; beyond tolerance it is restored exactly and ``AccelerationCheckError`` says
    by how much.
    """
    patch = framework_of(model)
    start = time.perf_counter()
    left = patch.accelerate(model, strict=strict)
    if left:
        described = ", ".join(f"{name} ({type(model.get_submodule(name)).__name__})" for name in left)
        warnings.warn(f"fastmlip left {len(left)} module(s) as e3nn: {described}", stacklevel=2)
    timing = {"surgery": time.perf_counter() - start}
    if patch.is_accelerated(model):
        from fastmlip.patches import self_check

        start = time.perf_counter()
        model.__dict__["_fastmlip_kernels"] = self_check.prepare_kernels(model, patch, progress=progress)
        timing["kernels"] = time.perf_counter() - start
        if check:
            start = time.perf_counter()
            model.__dict__["_fastmlip_check"] = self_check.check(model, patch)
            timing["check"] = time.perf_counter() - start
    model.__dict__["_fastmlip_timing"] = timing
    return model


def restore(model):
    """Put the original modules back (state_dict bit-identical to before acceleration); returns the model."""
    framework_of(model).restore(model)
    model.__dict__.pop("_fastmlip_check", None)
    model.__dict__.pop("_fastmlip_kernels", None)
    model.__dict__.pop("_fastmlip_timing", None)
    return model


def chunk_convolutions(model, chunk_edges) -> int:
    """Make the model's fused convolutions recompute their radial weights in the backward, taking receivers in
    chunks of at most ``chunk_edges`` edges (None: keep the weights, the fastest and the default). Returns how
    many convolutions it set. Results equal the unchunked ones to rounding; memory per layer no longer grows
    with the number of edges beyond one chunk."""
    if chunk_edges is not None and int(chunk_edges) < 1:
        raise ValueError(f"chunk_edges must be a positive integer or None, got {chunk_edges!r}")
    from .memory import convolutions

    modules = convolutions(model)
    for module in modules:
        module.chunk_edges = None if chunk_edges is None else int(chunk_edges)
    return len(modules)


def last_check(model):
    """The report of the self-check run by the last :func:`accelerate` (None if it did not run)."""
    return model.__dict__.get("_fastmlip_check")


def setup_timing(model) -> dict:
    """Seconds the last :func:`accelerate` spent on the surgery, the kernels (dry run and compile or cache) and
    the self-check; for an exported file, what :func:`load` spent on its kernels."""
    return dict(model.__dict__.get("_fastmlip_timing") or {})


def kernel_report(model):
    """What the last :func:`accelerate` (or :func:`load` of an exported file) did to make the model's kernels ready
    (:class:`fastmlip.kernels.precompile.Report`; None where the model runs no Triton kernels)."""
    return model.__dict__.get("_fastmlip_kernels")
