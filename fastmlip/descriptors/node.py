"""Node-side problems: MACE's symmetric contraction, e3nn Linear, species-indexed linear, spherical harmonics.

The symmetric contraction's U matrices come from the module's own buffers (they carry the training-time e3nn
sign convention); nothing is recomputed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .irreps import Irreps, MulIrrep, irreps_dim, irreps_str, parse_irreps, with_key
from .tensor_product import tensor_product_problem


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
    """MACE stores order ``correlation`` as ``weights_max`` and order nu < correlation as ``weights[correlation-1-nu]``."""
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


@dataclass(frozen=True)
class LinearPath:
    """out[i_out] += path_weight * x[i_in] @ W, W [mul_in, mul_out] at ``weight_offset`` of the flat weight."""

    i_in: int
    i_out: int
    path_weight: float
    weight_offset: int
    mul_in: int
    mul_out: int


@dataclass(frozen=True)
class LinearBias:
    """out[i_out] += path_weight * b, b the ``dim`` entries at ``bias_offset`` of the flat bias (scalars only)."""

    i_out: int
    path_weight: float
    bias_offset: int
    dim: int


@dataclass(frozen=True)
class LinearProblem:
    """e3nn's ``o3.Linear`` with shared weights: a block-sparse matmul in the mul_ir layout."""

    irreps_in: Irreps
    irreps_out: Irreps
    paths: tuple
    weight_numel: int
    biases: tuple
    bias_numel: int
    key: str = field(default="", compare=False)

    @property
    def dim_in(self) -> int:
        return irreps_dim(self.irreps_in)

    @property
    def dim_out(self) -> int:
        return irreps_dim(self.irreps_out)

    def __str__(self) -> str:
        return f"Linear({irreps_str(self.irreps_in)} -> {irreps_str(self.irreps_out)})"


def linear_problem(module) -> LinearProblem:
    """Describe an e3nn ``o3.Linear``; path weights and the bias layout come from ``module.instructions``."""
    if not getattr(module, "shared_weights", True):
        raise ValueError("o3.Linear with per-sample weights (shared_weights=False) is not supported")
    weight = getattr(module, "weight", None)
    if weight is not None and weight.dim() > 1:
        raise ValueError("o3.Linear with f_in/f_out is not supported")
    irreps_in, irreps_out = parse_irreps(module.irreps_in), parse_irreps(module.irreps_out)
    paths, biases, w_off, b_off = [], [], 0, 0
    for ins in module.instructions:
        if 0 in tuple(ins.path_shape):
            continue
        if ins.i_in == -1:
            out = irreps_out[ins.i_out]
            if out.l != 0 or out.p != 1:
                raise ValueError(f"bias on non-scalar output {out}")
            biases.append(LinearBias(ins.i_out, float(ins.path_weight), b_off, out.dim))
            b_off += out.dim
            continue
        a, c = irreps_in[ins.i_in], irreps_out[ins.i_out]
        if (a.l, a.p) != (c.l, c.p):
            raise ValueError(f"linear path {a} -> {c} changes the irrep")
        paths.append(LinearPath(ins.i_in, ins.i_out, float(ins.path_weight), w_off, a.mul, c.mul))
        w_off += a.mul * c.mul
    if w_off != module.weight_numel or b_off != module.bias_numel:
        raise ValueError(f"layout mismatch: paths need {w_off} weights and {b_off} biases, module has "
                         f"{module.weight_numel} and {module.bias_numel}")
    return with_key(LinearProblem(irreps_in, irreps_out, tuple(paths), w_off, tuple(biases), b_off))


@dataclass(frozen=True)
class SpeciesLinearPath:
    """For nodes of species s in [species_start, species_start + num_species):
    out[i_out] += coefficient * x[i_in] @ W[:, s - species_start, :], W [mul_in, num_species, mul_out]."""

    i_in: int
    i_out: int
    species_start: int
    num_species: int
    coefficient: float
    weight_offset: int
    mul_in: int
    mul_out: int


@dataclass(frozen=True)
class SpeciesLinearProblem:
    """A ``FullyConnectedTensorProduct(x, one_hot(species))`` seen as per-species linear maps (a gathered matmul)."""

    irreps_in: Irreps
    irreps_out: Irreps
    num_species: int
    paths: tuple
    weight_numel: int
    key: str = field(default="", compare=False)

    @property
    def dim_in(self) -> int:
        return irreps_dim(self.irreps_in)

    @property
    def dim_out(self) -> int:
        return irreps_dim(self.irreps_out)

    def __str__(self) -> str:
        return f"SpeciesLinear({irreps_str(self.irreps_in)} x {self.num_species} species -> {irreps_str(self.irreps_out)})"


def species_linear_problem(fctp) -> SpeciesLinearProblem:
    """Describe an e3nn tensor product whose second input is a one-hot species vector (all ``0e``).

    Folds each path's weight and (diagonal) coupling block into one coefficient; both come from the module.
    """
    tp = tensor_product_problem(fctp)
    starts, s = [], 0
    for m in tp.irreps_in2:
        if (m.l, m.p) != (0, 1):
            raise ValueError(f"second input must be one-hot scalars (0e), got {irreps_str(tp.irreps_in2)}")
        starts.append(s)
        s += m.mul
    if not tp.shared_weights:
        raise ValueError("species linear needs the module's shared weights")
    paths = []
    for p in tp.paths:
        if p.mode != "uvw" or not p.has_weight:
            raise ValueError(f"species linear supports weighted 'uvw' paths only, got {p.mode!r}")
        cg = p.cg.dense()[:, 0, :]
        diag = np.diag(cg)
        if cg.shape[0] != cg.shape[1] or not np.array_equal(cg, np.diag(diag)) or np.any(diag != diag[0]):
            raise ValueError(f"coupling block of path {p.i_in1}->{p.i_out} is not a multiple of the identity")
        a, b, c = tp.irreps_in1[p.i_in1], tp.irreps_in2[p.i_in2], tp.irreps_out[p.i_out]
        paths.append(SpeciesLinearPath(p.i_in1, p.i_out, starts[p.i_in2], b.mul, p.path_weight * float(diag[0]),
                                       p.weight_offset, a.mul, c.mul))
    return with_key(SpeciesLinearProblem(tp.irreps_in1, tp.irreps_out, s, tuple(paths), tp.weight_numel))


SH_NORMALIZATIONS = ("integral", "component", "norm")


@dataclass(frozen=True)
class SphericalHarmonicsProblem:
    """e3nn's ``SphericalHarmonics``: degrees ``ls`` (in output order) of a vector (input_parity -1) or pseudovector."""

    ls: tuple
    normalize: bool
    normalization: str
    input_parity: int = -1

    @property
    def irreps_out(self) -> Irreps:
        return tuple(MulIrrep(1, l, self.input_parity ** l) for l in self.ls)

    @property
    def dim_out(self) -> int:
        return sum(2 * l + 1 for l in self.ls)


def spherical_harmonics_problem(module) -> SphericalHarmonicsProblem:
    """Describe an e3nn ``o3.SphericalHarmonics`` module (degrees, input normalisation, output normalisation)."""
    if module.normalization not in SH_NORMALIZATIONS:
        raise ValueError(f"unknown normalization {module.normalization!r}")
    parity = int(parse_irreps(module.irreps_in)[0].p)
    return SphericalHarmonicsProblem(tuple(int(l) for l in module._ls_list), bool(module.normalize),
                                     str(module.normalization), parity)
