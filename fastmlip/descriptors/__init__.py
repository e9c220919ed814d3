"""Frozen, torch-free descriptions of the problems fastmlip computes ("what", not "how").

One module per op family: tensor_product (the fused convolution), symmetric_contraction, linear (o3.Linear and
the species-indexed linear), spherical_harmonics, gate, radial_mlp, radial_basis, and activations (named, so
kernels can emit them). Kernels (:mod:`fastmlip.kernels`) learn what to compute from these alone; the reference
(:mod:`fastmlip.reference`) computes the same in plain torch. Nothing here imports torch at module level: the
builders that read a loaded module (``gate_problem(gate)``, ...) import what they need when called.

Every constant (Clebsch-Gordan blocks, path weights, U matrices) is copied from the module a problem is built
from, never rebuilt from the installed e3nn: e3nn's ``wigner_3j`` changed sign for odd l1+l2+l3 after 0.4.4, so a
model trained under one convention must keep its own coefficients. Each problem carries a content ``key``
(:func:`with_key`) under which ops and kernel caches find it.
"""
from .activations import KNOWN_ACTIVATIONS, Activation, activation_of
from .gate import GatedRun, GateProblem, ScalarRun, gate_problem
from .irreps import Irreps, MulIrrep, irreps_dim, irreps_offsets, irreps_str, parse_irreps, with_key
from .linear import (LinearBias, LinearPath, LinearProblem, SpeciesLinearPath, SpeciesLinearProblem, linear_problem,
                     species_linear_problem)
from .radial_basis import Envelope, RadialBasisProblem, radial_basis_problem
from .radial_mlp import MLPLayer, RadialMLPProblem, radial_mlp_problem
from .spherical_harmonics import (NORMALIZE_EPS, SH_NORMALIZATIONS, SphericalHarmonicsProblem, monomial_coefficients,
                                  spherical_harmonics_problem)
from .symmetric_contraction import (ContractionSpec, SparseArray, SymmetricContractionProblem,
                                    symmetric_contraction_problem)
from .tensor_product import (CONNECTION_MODES, CGBlock, TensorProductProblem, TPPath, channelwise_instructions,
                             iter_paths, make_tensor_product_problem, scaled_problem, sparsity,
                             tensor_product_problem)

__all__ = [
    "KNOWN_ACTIVATIONS", "Activation", "activation_of",
    "GatedRun", "GateProblem", "ScalarRun", "gate_problem",
    "Irreps", "MulIrrep", "irreps_dim", "irreps_offsets", "irreps_str", "parse_irreps", "with_key",
    "LinearBias", "LinearPath", "LinearProblem", "SpeciesLinearPath", "SpeciesLinearProblem", "linear_problem",
    "species_linear_problem",
    "Envelope", "RadialBasisProblem", "radial_basis_problem",
    "MLPLayer", "RadialMLPProblem", "radial_mlp_problem",
    "NORMALIZE_EPS", "SH_NORMALIZATIONS", "SphericalHarmonicsProblem", "monomial_coefficients",
    "spherical_harmonics_problem",
    "ContractionSpec", "SparseArray", "SymmetricContractionProblem", "symmetric_contraction_problem",
    "CONNECTION_MODES", "CGBlock", "TensorProductProblem", "TPPath", "channelwise_instructions", "iter_paths",
    "make_tensor_product_problem", "scaled_problem", "sparsity", "tensor_product_problem",
]
