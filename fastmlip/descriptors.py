"""Frozen, torch-free descriptions of the problems fastmlip computes ("what", not "how").

Every constant (Clebsch-Gordan blocks, path weights) is copied from the module a problem is built from, never
rebuilt from the installed e3nn: e3nn's ``wigner_3j`` changed sign for odd l1+l2+l3 after 0.4.4, so a model
trained under one convention must keep its own coefficients.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

CONNECTION_MODES = ("uvw", "uvu", "uvv", "uuw", "uuu")


@dataclass(frozen=True)
class MulIrrep:
    """``mul`` copies of the irrep of degree ``l`` and parity ``p`` (+1 even, -1 odd)."""

    mul: int
    l: int
    p: int

    @property
    def ir_dim(self) -> int:
        return 2 * self.l + 1

    @property
    def dim(self) -> int:
        return self.mul * self.ir_dim

    def __str__(self) -> str:
        return f"{self.mul}x{self.l}{'e' if self.p == 1 else 'o'}"


Irreps = tuple  # tuple[MulIrrep, ...]


def parse_irreps(irreps) -> Irreps:
    """Accept an e3nn ``Irreps``, its string form, or ``[(mul, (l, p)), ...]``."""
    if isinstance(irreps, tuple) and all(isinstance(m, MulIrrep) for m in irreps):
        return irreps
    if isinstance(irreps, str):
        out = []
        for term in filter(None, (t.strip() for t in irreps.split("+"))):
            mul, ir = term.split("x") if "x" in term else ("1", term)
            if ir[-1] not in "eoy" or not ir[:-1].isdigit():
                raise ValueError(f"cannot parse irrep {term!r} in {irreps!r}")
            out.append(MulIrrep(int(mul), int(ir[:-1]), 1 if ir[-1] == "e" else -1))
        return tuple(out)
    out = []
    for item in irreps:
        mul, ir = item
        l, p = (ir.l, ir.p) if hasattr(ir, "l") else ir
        out.append(MulIrrep(int(mul), int(l), int(p)))
    return tuple(out)


def irreps_dim(irreps: Irreps) -> int:
    return sum(m.dim for m in irreps)


def irreps_offsets(irreps: Irreps) -> tuple:
    """Start of each irrep block in the flat (mul, 2l+1) "mul_ir" layout e3nn uses."""
    offs, o = [], 0
    for m in irreps:
        offs.append(o)
        o += m.dim
    return tuple(offs)


def irreps_str(irreps: Irreps) -> str:
    return "+".join(str(m) for m in irreps)


@dataclass(frozen=True)
class CGBlock:
    """A coupling block C[i, j, k] of shape (2l1+1, 2l2+1, 2l3+1), kept as its nonzeros."""

    shape: tuple
    nonzeros: tuple  # ((i, j, k, value), ...), values as Python floats (float64)

    @staticmethod
    def from_dense(array, tol: float = 1e-12) -> "CGBlock":
        a = np.asarray(array, dtype=np.float64)
        idx = np.argwhere(np.abs(a) > tol)
        return CGBlock(tuple(a.shape), tuple((int(i), int(j), int(k), float(a[i, j, k])) for i, j, k in idx))

    def dense(self) -> np.ndarray:
        a = np.zeros(self.shape, dtype=np.float64)
        for i, j, k, v in self.nonzeros:
            a[i, j, k] = v
        return a


def _delta_block(l1: int, l2: int, l3: int) -> CGBlock:
    """The blocks e3nn's specialised code paths use instead of a stored wigner_3j (all have l1+l2+l3 even)."""
    d1, d2, d3 = 2 * l1 + 1, 2 * l2 + 1, 2 * l3 + 1
    a = np.zeros((d1, d2, d3))
    if l1 == 0:
        a[0, range(d2), range(d3)] = 1.0 / math.sqrt(d3)
    elif l2 == 0:
        a[range(d1), 0, range(d3)] = 1.0 / math.sqrt(d3)
    else:
        a[range(d1), range(d2), 0] = 1.0 / math.sqrt(d1)
    return CGBlock.from_dense(a)


def _cross_block() -> CGBlock:
    """e3nn computes an elementwise 1x1->1 product as a cross product / sqrt(6), whatever its wigner_3j says."""
    a = np.zeros((3, 3, 3))
    for i, j, k in ((0, 1, 2), (1, 2, 0), (2, 0, 1)):
        a[i, j, k], a[j, i, k] = 1.0, -1.0
    return CGBlock.from_dense(a / math.sqrt(6.0))


def _specialized_code() -> bool:
    """e3nn's global switch for its hand-written special cases, for modules that predate the per-module flag."""
    import e3nn

    return bool(e3nn.get_optimization_defaults().get("specialized_code", True))


@dataclass(frozen=True)
class TPPath:
    """One instruction of a tensor product, with its normalisation already folded into ``path_weight``."""

    i_in1: int
    i_in2: int
    i_out: int
    mode: str
    has_weight: bool
    path_weight: float
    weight_offset: int
    weight_shape: tuple
    cg: CGBlock

    @property
    def weight_numel(self) -> int:
        return math.prod(self.weight_shape) if self.has_weight else 0


@dataclass(frozen=True)
class TensorProductProblem:
    """out = sum over paths of path_weight * w * C(x1, x2), in e3nn's mul_ir layout."""

    irreps_in1: Irreps
    irreps_in2: Irreps
    irreps_out: Irreps
    paths: tuple
    weight_numel: int
    shared_weights: bool
    key: str = field(default="", compare=False)

    @property
    def dim_in1(self) -> int:
        return irreps_dim(self.irreps_in1)

    @property
    def dim_in2(self) -> int:
        return irreps_dim(self.irreps_in2)

    @property
    def dim_out(self) -> int:
        return irreps_dim(self.irreps_out)

    def __str__(self) -> str:
        return (f"{irreps_str(self.irreps_in1)} x {irreps_str(self.irreps_in2)} -> {irreps_str(self.irreps_out)} "
                f"({len(self.paths)} paths)")


def _with_key(problem):
    """Attach a content hash: the name under which ops and kernel caches find the problem."""
    digest = hashlib.sha1(repr(problem).encode()).hexdigest()[:16]
    object.__setattr__(problem, "key", f"{type(problem).__name__}-{digest}")
    return problem


def _check_path(irreps_in1, irreps_in2, irreps_out, i1, i2, io, mode):
    if mode not in CONNECTION_MODES:
        raise ValueError(f"unsupported connection mode {mode!r}; fastmlip supports {CONNECTION_MODES}")
    a, b, c = irreps_in1[i1], irreps_in2[i2], irreps_out[io]
    if not abs(a.l - b.l) <= c.l <= a.l + b.l or a.p * b.p != c.p:
        raise ValueError(f"path {a} x {b} -> {c} violates the selection rules")


def _weight_shape(mode, m1, m2, mo):
    return {"uvw": (m1, m2, mo), "uvu": (m1, m2), "uvv": (m1, m2), "uuw": (m1, mo), "uuu": (m1,)}[mode]


def _cg_blocks_of(tp) -> dict:
    """The wigner_3j buffers baked into an e3nn TensorProduct's generated code, keyed by (l1, l2, l3)."""
    blocks = {}
    for attr in ("_compiled_main_left_right", "_compiled_main_right"):
        mod = getattr(tp, attr, None)
        if mod is None:
            continue
        for name, buf in mod.named_buffers():
            if name.startswith("_w3j_"):
                l1, l2, l3 = (int(s) for s in name[len("_w3j_"):].split("_"))
                blocks[(l1, l2, l3)] = CGBlock.from_dense(buf.detach().cpu().double().numpy())
    return blocks


def tensor_product_problem(tp, cg_blocks: dict | None = None) -> TensorProductProblem:
    """Describe an e3nn ``o3.TensorProduct`` module (any subclass), constants taken from the module itself.

    ``cg_blocks`` overrides the coupling blocks per (l1, l2, l3), for modules whose generated code could not be
    read (e.g. unpickled from another e3nn version by :mod:`fastmlip.patches`).
    """
    irreps_in1, irreps_in2, irreps_out = (parse_irreps(tp.irreps_in1), parse_irreps(tp.irreps_in2),
                                          parse_irreps(tp.irreps_out))
    stored = dict(_cg_blocks_of(tp))
    stored.update(cg_blocks or {})
    specialized = getattr(tp, "_specialized_code", None)
    specialized = _specialized_code() if specialized is None else bool(specialized)
    paths, offset = [], 0
    for ins in tp.instructions:
        _check_path(irreps_in1, irreps_in2, irreps_out, ins.i_in1, ins.i_in2, ins.i_out, ins.connection_mode)
        a, b, c = irreps_in1[ins.i_in1], irreps_in2[ins.i_in2], irreps_out[ins.i_out]
        if a.mul == 0 or b.mul == 0 or c.mul == 0:
            continue
        ls = (a.l, b.l, c.l)
        if ins.connection_mode == "uuu" and ls == (1, 1, 1) and specialized:
            cg = _cross_block()
        elif ls in stored:
            cg = stored[ls]
        elif 0 in ls:
            cg = _delta_block(*ls)
        else:
            raise ValueError(f"module {type(tp).__name__} holds no coupling block for path {a} x {b} -> {c}")
        shape = tuple(ins.path_shape) if ins.has_weight else ()
        paths.append(TPPath(ins.i_in1, ins.i_in2, ins.i_out, ins.connection_mode, bool(ins.has_weight),
                            float(ins.path_weight), offset, shape, cg))
        offset += math.prod(shape) if ins.has_weight else 0
    if offset != tp.weight_numel:
        raise ValueError(f"weight layout mismatch: paths need {offset} weights, module has {tp.weight_numel}")
    return _with_key(TensorProductProblem(irreps_in1, irreps_in2, irreps_out, tuple(paths), offset,
                                          bool(getattr(tp, "shared_weights", False))))


def make_tensor_product_problem(irreps_in1, irreps_in2, irreps_out, instructions: Sequence,
                                irrep_normalization: str = "component", path_normalization: str = "element",
                                shared_weights: bool = False) -> TensorProductProblem:
    """A new problem from irreps and e3nn-style instructions ``(i1, i2, i_out, mode, has_weight[, path_weight])``.

    Normalisation follows e3nn exactly because e3nn computes it; the coupling blocks are the installed e3nn's,
    which is right for a new problem (a loaded model's problem comes from :func:`tensor_product_problem`).
    """
    from e3nn import o3

    for ins in instructions:
        if ins[3] not in CONNECTION_MODES:
            raise ValueError(f"unsupported connection mode {ins[3]!r}; fastmlip supports {CONNECTION_MODES}")
    tp = o3.TensorProduct(irreps_str(parse_irreps(irreps_in1)), irreps_str(parse_irreps(irreps_in2)),
                          irreps_str(parse_irreps(irreps_out)), list(instructions),
                          irrep_normalization=irrep_normalization, path_normalization=path_normalization,
                          shared_weights=shared_weights, internal_weights=False)
    return tensor_product_problem(tp)


def channelwise_instructions(irreps_in1, irreps_in2, irreps_target) -> tuple:
    """MACE's "uvu" instruction set (``tp_out_irreps_with_instructions``): outputs sorted the way e3nn sorts."""
    from e3nn import o3

    irreps_in1, irreps_in2 = parse_irreps(irreps_in1), parse_irreps(irreps_in2)
    target = {(m.l, m.p) for m in parse_irreps(irreps_target)}
    mid, instr = [], []
    for i, a in enumerate(irreps_in1):
        for j, b in enumerate(irreps_in2):
            for l in range(abs(a.l - b.l), a.l + b.l + 1):
                if (l, a.p * b.p) in target:
                    instr.append((i, j, len(mid), "uvu", True))
                    mid.append((a.mul, (l, a.p * b.p)))
    _, perm, _ = o3.Irreps(mid).sort()
    ordered = [None] * len(mid)
    for k, m in enumerate(mid):
        ordered[perm[k]] = m
    return parse_irreps(ordered), tuple(sorted(((a, b, perm[c], m, w) for a, b, c, m, w in instr),
                                               key=lambda ins: ins[2]))


def sparsity(problem: TensorProductProblem) -> int:
    """Total number of CG nonzeros: the multiply-adds per channel per edge."""
    return sum(len(p.cg.nonzeros) for p in problem.paths)


def iter_paths(problem: TensorProductProblem) -> Iterable:
    """Yield (path, in1 offset, in2 offset, out offset, MulIrreps) for kernel and reference generators."""
    o1, o2, oo = irreps_offsets(problem.irreps_in1), irreps_offsets(problem.irreps_in2), irreps_offsets(
        problem.irreps_out)
    for p in problem.paths:
        yield p, o1[p.i_in1], o2[p.i_in2], oo[p.i_out], (problem.irreps_in1[p.i_in1], problem.irreps_in2[p.i_in2],
                                                       problem.irreps_out[p.i_out])


# --- Node-side problems: MACE's symmetric contraction, e3nn Linear, species-indexed linear, spherical harmonics ---


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
    return _with_key(SymmetricContractionProblem(irreps_in, irreps_out, num_features, coupling, int(num_elements),
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
    return _with_key(LinearProblem(irreps_in, irreps_out, tuple(paths), w_off, tuple(biases), b_off))


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
    return _with_key(SpeciesLinearProblem(tp.irreps_in1, tp.irreps_out, s, tuple(paths), tp.weight_numel))


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
