"""fastmlip: fast, exact GPU kernels for equivariant interatomic potentials, applied to models in place."""
import importlib

__version__ = "0.1.0"

_LAZY = {
    "fused_conv": "fastmlip.ops.conv",
    "make_tensor_product_problem": "fastmlip.descriptors",
    "tensor_product_problem": "fastmlip.descriptors",
    "load": "fastmlip.api",
    "accelerate": "fastmlip.api",
    "restore": "fastmlip.api",
    "chunk_convolutions": "fastmlip.api",
    "Calculator": "fastmlip.calculator",
    "simulate": "fastmlip.engine",
    "evaluate": "fastmlip.batch",
    "neighbor_list": "fastmlip.neighbors",
    "UntrustedFileError": "fastmlip.patches.files",
    "StructureError": "fastmlip.calculator",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    """Everything loads on first use, not on ``import fastmlip``: the faces import ASE and the frameworks, the
    ops torch, and kernel compile workers (``fastmlip.kernels.precompile``) need neither."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fastmlip' has no attribute {name!r}")
