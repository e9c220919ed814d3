"""e3nn's ``o3.Linear`` and the species-indexed linear map (a tensor product with a one-hot species vector).

Path weights, the bias layout and the coupling blocks are read from the module's own instructions.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .irreps import Irreps, MulIrrep, irreps_dim, irreps_str, parse_irreps, with_key
from .tensor_product import tensor_product_problem


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
    irreps_in, paths = _merge_stacked_inputs(irreps_in, paths)
    return with_key(LinearProblem(irreps_in, irreps_out, tuple(paths), w_off, tuple(biases), b_off))


def _merge_stacked_inputs(irreps_in: Irreps, paths: list) -> tuple:
    """(irreps_in, paths) with each run of neighbouring input irreps of one kind that feed the same output, one
    path each, equally weighted, weights one after another, made one irrep and one path.

    Nothing moves: in the mul_ir layout the run's blocks are one block already, and its weights are one
    [sum of mul_in, mul_out] matrix, so the product is the same sum in one longer K loop. MACE's interaction
    linear reads its tensor product's 10 blocks this way as 4: a third of the kernel code, whose compile bounded
    MACE's cold start (fwd/bwd 7.8/8.2 s of 30.7 on 2 cores for sm_90).
    """
    users = [[p for p in paths if p.i_in == i] for i in range(len(irreps_in))]

    def extends(run: list, i: int) -> bool:
        """Whether input irrep ``i`` continues ``run``."""
        if len(users[i]) != 1 or len(users[run[-1]]) != 1:
            return False
        path, tail, head = users[i][0], users[run[-1]][0], irreps_in[run[0]]
        return ((irreps_in[i].l, irreps_in[i].p) == (head.l, head.p) and path.i_out == tail.i_out
                and path.path_weight == tail.path_weight
                and path.weight_offset == tail.weight_offset + tail.mul_in * tail.mul_out)

    runs = []
    for i in range(len(irreps_in)):
        if runs and extends(runs[-1], i):
            runs[-1].append(i)
        else:
            runs.append([i])
    merged_irreps, merged_paths, new_index = [], [], {}
    for new, run in enumerate(runs):
        head = irreps_in[run[0]]
        merged_irreps.append(MulIrrep(sum(irreps_in[i].mul for i in run), head.l, head.p))
        for i in run:
            new_index[i] = new
        if len(run) > 1:
            first = users[run[0]][0]
            merged_paths.append(LinearPath(new, first.i_out, first.path_weight, first.weight_offset,
                                           merged_irreps[-1].mul, first.mul_out))
    merged_paths += [LinearPath(new_index[p.i_in], p.i_out, p.path_weight, p.weight_offset, p.mul_in, p.mul_out)
                     for p in paths if len(runs[new_index[p.i_in]]) == 1]
    return tuple(merged_irreps), sorted(merged_paths, key=lambda p: p.weight_offset)


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
        return (f"SpeciesLinear({irreps_str(self.irreps_in)} x {self.num_species} species -> "
                f"{irreps_str(self.irreps_out)})")


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
