"""fastmlip: fast, exact GPU kernels for equivariant interatomic potentials, applied to models in place."""
from .descriptors import make_tensor_product_problem, tensor_product_problem
from .ops.conv import fused_conv

__version__ = "0.1.0"

__all__ = ["fused_conv", "make_tensor_product_problem", "tensor_product_problem", "__version__"]
