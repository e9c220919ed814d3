"""Tensor-product problems (the fused convolution's "what"): irreps, paths, path weights, CG blocks.

The Clebsch-Gordan blocks and path weights are copied from the module a problem is built from, never rebuilt
from the installed e3nn: e3nn's ``wigner_3j`` changed sign for odd l1+l2+l3 after 0.4.4.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Iterable, Sequence

import numpy as np

from .irreps import Irreps, irreps_dim, irreps_offsets, irreps_str, parse_irreps, with_key

CONNECTION_MODES = ("uvw", "uvu", "uvv", "uuw", "uuu")


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
    return with_key(TensorProductProblem(irreps_in1, irreps_in2, irreps_out, tuple(paths), offset,
                                          bool(getattr(tp, "shared_weights", False))))


def scaled_problem(problem: TensorProductProblem, factor: float) -> TensorProductProblem:
    """``problem`` with every path weight times ``factor``: a constant scale of the output folded into the kernels'
    coefficients instead of an elementwise launch (and its backward) after them."""
    paths = tuple(replace(p, path_weight=p.path_weight * factor) for p in problem.paths)
    return with_key(replace(problem, paths=paths, key=""))


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
