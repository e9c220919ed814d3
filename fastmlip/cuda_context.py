"""Create the GPU's CUDA context on a thread while the caller imports torch and builds its model.

Creating the driver's primary context is the slowest part of a process's first CUDA call (seconds on an H200 with
its 141 GB to map), and torch does it lazily: at the model's first ``.to("cuda")``, after the framework has been
imported and the model built, so nothing overlaps it. Through ``ctypes`` (which releases the GIL for the call)
the driver creates that same primary context on a thread meanwhile; torch's runtime then finds it made. Anything
that fails here is left for torch to meet and report in its own words.
"""
from __future__ import annotations

import ctypes
import functools
import os
import threading
from typing import Optional


def _retain_primary_context(ordinal: int) -> None:
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return
    device, context = ctypes.c_int(), ctypes.c_void_p()
    if driver.cuInit(0) == 0 and driver.cuDeviceGet(ctypes.byref(device), ordinal) == 0:
        driver.cuDevicePrimaryCtxRetain(ctypes.byref(context), device)  # held for the process, as torch holds it


def create_in_background(device) -> Optional[threading.Thread]:
    """Start creating the CUDA context of ``device`` ("auto", None, "cuda", "cuda:N", or a torch.device) on a
    daemon thread; None (nothing started) for CPU devices, names that are not CUDA, or when CUDA is hidden."""
    name = str(device if device is not None else "auto")
    if name != "auto" and not name.startswith("cuda"):
        return None
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return None
    index = name.partition(":")[2]
    if index and not index.isdigit():
        return None
    return _started(int(index or 0))


@functools.lru_cache(maxsize=None)
def _started(ordinal: int) -> threading.Thread:
    """One thread per device and process: the context, once made, serves every later model."""
    thread = threading.Thread(target=_retain_primary_context, args=(ordinal,), daemon=True,
                              name="fastmlip-cuda-context")
    thread.start()
    return thread
