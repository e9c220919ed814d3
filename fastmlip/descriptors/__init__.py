"""Frozen, torch-free descriptions of the problems fastmlip computes ("what", not "how").

Every constant (Clebsch-Gordan blocks, path weights, U matrices) is copied from the module a problem is built
from, never rebuilt from the installed e3nn: e3nn's ``wigner_3j`` changed sign for odd l1+l2+l3 after 0.4.4, so a
model trained under one convention must keep its own coefficients. Each problem carries a content ``key``
(:func:`with_key`) under which ops and kernel caches find it.
"""
from .irreps import Irreps, MulIrrep, irreps_dim, irreps_offsets, irreps_str, parse_irreps, with_key
from .node import (SH_NORMALIZATIONS, ContractionSpec, LinearBias, LinearPath, LinearProblem, SparseArray,
                   SpeciesLinearPath, SpeciesLinearProblem, SphericalHarmonicsProblem, SymmetricContractionProblem,
                   linear_problem, species_linear_problem, spherical_harmonics_problem,
                   symmetric_contraction_problem)
from .tensor_product import (CONNECTION_MODES, CGBlock, TensorProductProblem, TPPath, channelwise_instructions,
                             iter_paths, make_tensor_product_problem, sparsity, tensor_product_problem)

__all__ = [
    "Irreps", "MulIrrep", "irreps_dim", "irreps_offsets", "irreps_str", "parse_irreps", "with_key",
    "SH_NORMALIZATIONS", "ContractionSpec", "LinearBias", "LinearPath", "LinearProblem", "SparseArray",
    "SpeciesLinearPath", "SpeciesLinearProblem", "SphericalHarmonicsProblem", "SymmetricContractionProblem",
    "linear_problem", "species_linear_problem", "spherical_harmonics_problem", "symmetric_contraction_problem",
    "CONNECTION_MODES", "CGBlock", "TensorProductProblem", "TPPath", "channelwise_instructions", "iter_paths",
    "make_tensor_product_problem", "sparsity", "tensor_product_problem",
]
