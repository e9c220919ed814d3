"""Which backend computes an op: ``FASTMLIP_BACKEND=reference|triton|auto`` (default auto).

auto: Triton kernels on CUDA tensors when Triton imports and has a kernel for the op, the reference otherwise
(never the interpreter: it is for testing the kernel code, far too slow to pick by default).
triton: forces the kernels, on CPU too when ``TRITON_INTERPRET=1`` (how CI runs the real kernel code); ops
that have no kernel keep using the reference, so a whole model still runs with the kernels it has.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os

import torch

BACKENDS = ("reference", "triton", "auto")
_KERNELS_ON_CPU = contextvars.ContextVar("fastmlip_kernels_on_cpu", default=False)


@contextlib.contextmanager
def kernels_on_cpu():
    """Within the block (this thread), ops with a kernel take the Triton backend for CPU tensors too.

    For dry runs that only record which kernels a model launches (:mod:`fastmlip.kernels.precompile`), e.g. to
    compile them for a GPU this machine does not have; such a run must never launch them.
    """
    token = _KERNELS_ON_CPU.set(True)
    try:
        yield
    finally:
        _KERNELS_ON_CPU.reset(token)


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def requested_backend() -> str:
    name = os.environ.get("FASTMLIP_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"FASTMLIP_BACKEND={name!r}: expected one of {', '.join(BACKENDS)}")
    return name


def backend_for(tensor: torch.Tensor, has_kernel: bool = True) -> str:
    """Resolve the backend for an op whose inputs live where ``tensor`` lives."""
    name = requested_backend()
    if name == "reference" or not has_kernel:
        return "reference"
    if _KERNELS_ON_CPU.get() and triton_available():
        return "triton"
    usable = tensor.is_cuda and triton_available()
    if name == "triton":
        if not triton_available():
            raise RuntimeError("FASTMLIP_BACKEND=triton, but triton is not installed (pip install triton)")
        if not (tensor.is_cuda or interpreting()):
            raise RuntimeError("FASTMLIP_BACKEND=triton on CPU tensors needs TRITON_INTERPRET=1 (interpreter mode)")
        return "triton"
    return "triton" if usable else "reference"


def available_backends() -> dict:
    """For ``fastmlip info``: what could run here."""
    return {
        "reference": True,
        "triton": triton_available(),
        "cuda": torch.cuda.is_available(),
        "triton_interpret": interpreting(),
        "requested": os.environ.get("FASTMLIP_BACKEND", "auto"),
    }
