"""MACE's symmetric contraction (the product basis) as a problem.

The U matrices come from the module's own buffers (they carry the training-time e3nn sign convention); nothing is
recomputed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .irreps import Irreps, MulIrrep, irreps_dim, irreps_str, parse_irreps, with_key


@dataclass(frozen=True)
class SparseArray:
    """A dense array of any rank kept as its exact nonzeros (flat C-order index, float64 value)."""

    shape: tuple
    flat_index: tuple
    values: tuple

    @staticmethod
    def from_dense(array) -> "SparseArray":
        a = np.asarray(array, dtype=np.float64)
        idx = np.flatnonzero(a)
        return SparseArray(tuple(int(s) for s in a.shape), tuple(int(i) for i in idx),
                           tuple(float(v) for v in a.ravel()[idx]))

    def dense(self) -> np.ndarray:
        a = np.zeros(math.prod(self.shape), dtype=np.float64)
        a[list(self.flat_index)] = self.values
        return a.reshape(self.shape)


@dataclass(frozen=True)
class ContractionSpec:
    """One output irrep of a symmetric contraction: ``u_matrices[nu - 1]`` has shape (2l+1, L, ..., L, P_nu).

    ``weight_names[nu - 1]`` names the module parameter holding the per-species weights [E, P_nu, C] for order nu.
    """

    l: int
    p: int
    correlation: int
    u_matrices: tuple
    weight_names: tuple

    @property
    def ir_dim(self) -> int:
        return 2 * self.l + 1

    def num_params(self, nu: int) -> int:
        return self.u_matrices[nu - 1].shape[-1]


@dataclass(frozen=True)
class SymmetricContractionProblem:
    """MACE's product basis: x [N, C, L] (L = coupling dim) and a species index -> [N, irreps_out.dim] (mul_ir).

    The op takes the weights as a flat list in :attr:`weight_names` order (per contraction, nu = 1..correlation).
    """

    irreps_in: Irreps
    irreps_out: Irreps
    num_features: int
    coupling_irreps: Irreps
    num_elements: int
    contractions: tuple
    key: str = field(default="", compare=False)

    @property
    def coupling_dim(self) -> int:
        return irreps_dim(self.coupling_irreps)

    @property
    def dim_out(self) -> int:
        return irreps_dim(self.irreps_out)

    @property
    def weight_names(self) -> tuple:
        return tuple(name for c in self.contractions for name in c.weight_names)

    @property
    def weight_shapes(self) -> tuple:
        return tuple((self.num_elements, c.num_params(nu), self.num_features)
                     for c in self.contractions for nu in range(1, c.correlation + 1))

    def __str__(self) -> str:
        corr = sorted({c.correlation for c in self.contractions})
        return (f"SymmetricContraction({irreps_str(self.irreps_in)} -> {irreps_str(self.irreps_out)}, "
                f"correlation {corr}, {self.num_elements} elements)")


def _sc_weight_name(index: int, nu: int, correlation: int) -> str:
    """MACE stores order ``correlation`` as ``weights_max`` and order nu < correlation as
    ``weights[correlation-1-nu]``."""
    if nu == correlation:
        return f"contractions.{index}.weights_max"
    return f"contractions.{index}.weights.{correlation - 1 - nu}"


def symmetric_contraction_problem(module) -> SymmetricContractionProblem:
    """Describe a mace ``SymmetricContraction``; its U matrices are copied from the module's own buffers.

    Works for modules built with or without ``use_reduced_cg``: the basis is whatever the buffers hold.
    """
    irreps_in, irreps_out = parse_irreps(module.irreps_in), parse_irreps(module.irreps_out)
    muls = {m.mul for m in irreps_in}
    if len(muls) != 1:
        raise ValueError(f"symmetric contraction needs equal multiplicities in irreps_in, got {irreps_str(irreps_in)}")
    num_features = muls.pop()
    if any(m.mul != num_features for m in irreps_out):
        raise ValueError(f"irreps_out {irreps_str(irreps_out)} must all have multiplicity {num_features}")
    coupling = tuple(MulIrrep(1, m.l, m.p) for m in irreps_in)
    big_l = irreps_dim(coupling)
    if len(module.contractions) != len(irreps_out):
        raise ValueError(f"module has {len(module.contractions)} contractions for {len(irreps_out)} output irreps")
    specs, num_elements = [], None
    for index, (contraction, out) in enumerate(zip(module.contractions, irreps_out)):
        correlation = int(contraction.correlation)
        buffers = dict(contraction.named_buffers())
        params = dict(contraction.named_parameters())
        u_list, names = [], []
        for nu in range(1, correlation + 1):
            name = _sc_weight_name(index, nu, correlation)
            local = name.split(".", 2)[2]
            weight = params.get(local)
            if weight is None:
                raise ValueError(f"contraction {index} has no parameter {local!r} (external weights are unsupported)")
            elements, num_params, channels = weight.shape
            num_elements = elements if num_elements is None else num_elements
            if elements != num_elements or channels != num_features:
                raise ValueError(f"{name} has shape {tuple(weight.shape)}, expected ({num_elements}, P, "
                                 f"{num_features})")
            u = buffers[f"U_matrix_{nu}"].detach().cpu().double().numpy()
            shape = (out.ir_dim,) + (big_l,) * nu + (num_params,)
            if u.size != math.prod(shape):
                raise ValueError(f"U_matrix_{nu} of contraction {index} has shape {u.shape}, expected {shape} "
                                 "up to size-1 axes")
            u_list.append(SparseArray.from_dense(u.reshape(shape)))
            names.append(name)
        specs.append(ContractionSpec(out.l, out.p, correlation, tuple(u_list), tuple(names)))
    return with_key(SymmetricContractionProblem(irreps_in, irreps_out, num_features, coupling, int(num_elements),
                                                 tuple(specs)))
