"""Plain-torch implementations: the oracle for every fast path and the CPU backend."""
from torch._guards import detect_fake_mode

_CONSTANTS: dict = {}


def device_constant(key, build, dtype, device):
    """``build(dtype, device)`` cached per (key, dtype, device): constants are made once, not on every call.

    While tracing (torch.compile's fake tensors) it is built afresh, since a cached real tensor must not leak in.
    """
    if detect_fake_mode() is not None:
        return build(dtype, device)
    cache_key = (key, dtype, str(device))
    if cache_key not in _CONSTANTS:
        _CONSTANTS[cache_key] = build(dtype, device)
    return _CONSTANTS[cache_key]
