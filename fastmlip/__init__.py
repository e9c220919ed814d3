"""fastmlip: fast, exact GPU kernels for equivariant interatomic potentials, applied to models in place."""
import importlib

from .descriptors import make_tensor_product_problem, tensor_product_problem
from .ops.conv import fused_conv

__version__ = "0.1.0"

_LAZY = {
    "load": "fastmlip.api",
    "accelerate": "fastmlip.api",
    "restore": "fastmlip.api",
    "Calculator": "fastmlip.calculator",
    "neighbor_list": "fastmlip.neighbors",
}

__all__ = ["fused_conv", "make_tensor_product_problem", "tensor_product_problem", "__version__", *_LAZY]


def __getattr__(name):
    """The faces import ASE and the frameworks: load them on first use, not on ``import fastmlip``."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fastmlip' has no attribute {name!r}")
