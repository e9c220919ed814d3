"""Triton kernels for e3nn's ``o3.Linear`` with shared weights: one launch forward, one for the whole backward.

Why: as torch ops every o3.Linear is an einsum per path, a ``cat`` and a bias add (5-10 launches, about twice that
backward), on problems so small in an MD step that launches, not flops, cost the time. Each problem gets generated
kernels with every offset, multiplicity and path weight baked in (:mod:`.codegen`), launched over a grid of
(row blocks, tasks). The generated body has one branch per destination irrep, path or bias, each owning a
contiguous range of task ids (one per channel block), so the code grows with the paths, not the multiplicities:

* apply (forward, and the x-gradient with W transposed): a task is one block of BJ channels of one destination
  irrep; it sums every path into that irrep (a tile of x times W[mul_in, BJ]), adds the bias (forward) and stores
  each column once. The tile's rows are (node, component) pairs, every component of BN nodes at once
  (``FASTMLIP_LINEAR_STACK=1``, the default; measured on an H200, docs/kernels.md: x-gradient 2.1-3.2x, forward
  1.0-1.6x faster than a tile per component, whose products are too small to keep the GPU busy), or one component of BN nodes per product.
  Irreps no path reaches get zeros, so the output is ``torch.empty``: no zero fill, no atomics.
* weight / bias gradients (tasks of the same backward launch): program ``s`` sums x^T g (or g's columns) over the
  rows of split ``s`` (``ROWS_PER_SPLIT`` rows) into its own partial; torch sums the partials over splits, in a
  fixed order (deterministic). Up to ``ROWS_PER_SPLIT`` rows there is one split and no sum.

float32 products run on tensor cores by default (``input_precision="tf32x3"``, about float32 accuracy;
``FASTMLIP_DOT_PRECISION=ieee`` for exact float32 products); tiles are at least 16 wide there (tl.dot's
reduction minimum on Triton 3.6), masked past the multiplicity. float64 uses broadcast products, which every
Triton build lowers.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import triton

from ..descriptors import LinearProblem, irreps_offsets
from . import codegen
from . import tiles as shared_tiles
from .launch import new_output, product_mode, settings, tl_dtype

ROWS_PER_SPLIT = 256  # rows each weight/bias-gradient program sums


@dataclass(frozen=True)
class _Tiles:
    """Tile sizes and products of one kernel variant: ``product`` is ``ieee``/``tf32x3`` (float32, tl.dot) or
    ``fma`` (float64, broadcast products)."""

    product: str
    rows: int  # BN of apply tasks and BR of the gradient row loops
    k_max: int
    j_max: int
    minimum: int
    warps: int
    stack: bool = False  # apply tasks of an irrep with components take all of them in one tile (rows x comps)

    @property
    def name(self) -> str:
        return f"{self.product}_r{self.rows}k{self.k_max}j{self.j_max}w{self.warps}{'s' if self.stack else ''}"

    def k(self, n: int) -> int:
        return max(self.minimum, min(self.k_max, triton.next_power_of_2(n)))

    def j(self, n: int) -> int:
        return max(self.minimum, min(self.j_max, triton.next_power_of_2(n)))


def _tiles(dtype) -> _Tiles:
    """float32: tiles from the settings, at least 16 wide (tl.dot's minimum on Triton 3.6), masked past the
    multiplicity; float64: small broadcast-product tiles. TypeError for any other dtype."""
    tl_dtype(dtype)
    product = product_mode(dtype)
    if product == "fma":
        return _Tiles("fma", 16, 8, 32, 2, 4)
    s = settings()
    return _Tiles(product, s.linear_rows, s.linear_k, s.linear_block, 16, s.linear_warps, bool(s.linear_stack))


def _apply_branches(problem: LinearProblem, transpose: bool, tiles: _Tiles) -> list:
    """(destination irrep, paths into it, biases on it, BJ, channel blocks) per destination irrep."""
    dst_irreps = problem.irreps_in if transpose else problem.irreps_out
    branches = []
    for d, m in enumerate(dst_irreps):
        paths = [p for p in problem.paths if (p.i_in if transpose else p.i_out) == d]
        biases = [] if transpose else [b for b in problem.biases if b.i_out == d]
        bj = tiles.j(m.mul)
        branches.append((d, paths, biases, bj, triton.cdiv(m.mul, bj) if m.dim else 0))
    return branches


def _weight_branches(problem: LinearProblem, tiles: _Tiles) -> list:
    """(path, BK, BJ, j blocks, [BK, BJ] blocks) per path."""
    return [(p, tiles.k(p.mul_in), tiles.j(p.mul_out), triton.cdiv(p.mul_out, tiles.j(p.mul_out)),
             triton.cdiv(p.mul_in, tiles.k(p.mul_in)) * triton.cdiv(p.mul_out, tiles.j(p.mul_out)))
            for p in problem.paths]


def _bias_branches(problem: LinearProblem, tiles: _Tiles) -> list:
    """(bias, BJ, channel blocks) per biased output."""
    return [(b, tiles.j(b.dim), triton.cdiv(b.dim, tiles.j(b.dim))) for b in problem.biases]


class _Branches:
    """Emits one branch per irrep/path/bias, owning a contiguous range of task ids (one per channel block), so
    the code grows with the number of paths, not with the multiplicities."""

    def __init__(self, code, base: str):
        self.code, self.base, self.start = code, base, 0

    def __call__(self, blocks: int):
        lo, hi = f"{self.base}{self.start}", f"{self.base}{self.start + blocks}"
        self.start += blocks
        self.code(f"if (task >= {lo}) & (task < {hi}):")
        self.code(f"    block = task - ({lo})")
        return self.code.indent()


def _emit_apply(code, consts, problem: LinearProblem, transpose: bool, tiles: _Tiles, inp: str, out: str) -> None:
    """out = inp @ W per path (W^T: the x-gradient), each column written exactly once (zeros where no path)."""
    in_irreps, out_irreps = ((problem.irreps_out, problem.irreps_in) if transpose
                             else (problem.irreps_in, problem.irreps_out))
    in_off, out_off = irreps_offsets(in_irreps), irreps_offsets(out_irreps)
    in_stride, out_stride = sum(m.dim for m in in_irreps), sum(m.dim for m in out_irreps)
    branch = _Branches(code, "")
    for d, paths, biases, bj, blocks in _apply_branches(problem, transpose, tiles):
        if not blocks:
            continue
        m = out_irreps[d]
        with branch(blocks):
            into = f"{len(paths)} path{'s' if len(paths) != 1 else ''}{' and a bias' if biases else ''}"
            stacked = tiles.stack and m.ir_dim > 1 and not biases
            code.comment(f"{'grad_x' if transpose else 'out'} irrep {d} ({m}): {into} summed "
                         f"{'for all components in one' if stacked else 'per component into a'} [rows, {bj}] tile, "
                         "stored once")
            code(f"j = block * {bj} + tl.arange(0, {bj})")
            if stacked:  # the tile's rows are (node, component) pairs, components padded to a power of two
                slots = triton.next_power_of_2(m.ir_dim)
                height = tiles.rows * slots
                code(f"r = tl.arange(0, {height})")
                code(f"nodes = tl.program_id(0) * {tiles.rows} + r // {slots}")
                code(f"comps = r % {slots}")
                code(f"ok = (nodes < num_rows) & (comps < {m.ir_dim})")
                code("nodes = nodes.to(tl.int64)")
            else:
                height = tiles.rows
                code(f"for comp in range({m.ir_dim}):")
            with contextlib.nullcontext() if stacked else code.indent():
                if not stacked:
                    code("nodes, ok, comps = rows, row_ok, rows * 0 + comp")
                code(f"acc = tl.zeros([{height}, {bj}], DT)")
                for p in paths:
                    k_dim, i_from = (p.mul_out, p.i_out) if transpose else (p.mul_in, p.i_in)
                    k_stride, j_stride = (1, p.mul_out) if transpose else (p.mul_out, 1)
                    code(f"acc += {consts(p.path_weight)} * path_tile({inp}, weight, nodes, comps, ok, j, DT=DT, "
                         f"IN_STRIDE={in_stride}, IN_OFF={in_off[i_from]}, D={m.ir_dim}, K={k_dim}, J={m.mul}, "
                         f"W_OFF={p.weight_offset}, K_STRIDE={k_stride}, J_STRIDE={j_stride}, BM={height}, "
                         f"BK={tiles.k(k_dim)}, BJ={bj}, PRODUCT=\"{tiles.product}\")")
                for b in biases:
                    code("if HAS_BIAS:")
                    code(f"    acc += {consts(b.path_weight)} * tl.load(bias + {b.bias_offset} + j, "
                         f"mask=j < {b.dim}, other=0.0)[None, :]")
                code(f"tl.store({out} + nodes[:, None] * {out_stride} + {out_off[d]} + j[None, :] * {m.ir_dim} + "
                     f"comps[:, None], acc, mask=ok[:, None] & (j[None, :] < {m.mul}))")


def _emit_weight_grads(code, consts, problem: LinearProblem, tiles: _Tiles) -> None:
    off_in, off_out = irreps_offsets(problem.irreps_in), irreps_offsets(problem.irreps_out)
    branch = _Branches(code, "w_base + ")
    for p, bk, bj, j_blocks, blocks in _weight_branches(problem, tiles):
        with branch(blocks):
            code.comment(f"weight of path {p.i_in} -> {p.i_out}: a [{bk}, {bj}] block of x^T grad_out over this "
                         "split's rows")
            code(f"k = (block // {j_blocks}) * {bk} + tl.arange(0, {bk})")
            code(f"j = (block % {j_blocks}) * {bj} + tl.arange(0, {bj})")
            code(f"acc = weight_grad_tile(x, grad_out, row_start, row_end, k, j, DT=DT, X_STRIDE={problem.dim_in}, "
                 f"X_OFF={off_in[p.i_in]}, G_STRIDE={problem.dim_out}, G_OFF={off_out[p.i_out]}, "
                 f"D={problem.irreps_in[p.i_in].ir_dim}, K={p.mul_in}, J={p.mul_out}, BR={tiles.rows}, BK={bk}, "
                 f"BJ={bj}, PRODUCT=\"{tiles.product}\")")
            code(f"tl.store(grad_w + split * {problem.weight_numel} + {p.weight_offset} + k[:, None] * {p.mul_out} "
                 f"+ j[None, :], {consts(p.path_weight)} * acc, mask=(k[:, None] < {p.mul_in} * live) & "
                 f"(j[None, :] < {p.mul_out}))")


def _emit_bias_grads(code, consts, problem: LinearProblem, tiles: _Tiles) -> None:
    off_out = irreps_offsets(problem.irreps_out)
    branch = _Branches(code, "b_base + ")
    for b, bj, blocks in _bias_branches(problem, tiles):
        with branch(blocks):
            code.comment(f"bias of irrep {b.i_out}: column sums of grad_out over this split's rows")
            code(f"j = block * {bj} + tl.arange(0, {bj})")
            code(f"acc = column_sum_tile(grad_out, row_start, row_end, j, DT=DT, G_STRIDE={problem.dim_out}, "
                 f"G_OFF={off_out[b.i_out]}, J={b.dim}, BR={tiles.rows}, BJ={bj})")
            code(f"tl.store(grad_b + split * {problem.bias_numel} + {b.bias_offset} + j, {consts(b.path_weight)} "
                 f"* acc, mask=j < {b.dim} * live)")


_FORWARD_ARGS = ["x", "weight", "bias", "out", "num_rows", "DT: tl.constexpr", "HAS_BIAS: tl.constexpr"]
_BACKWARD_ARGS = ["grad_out", "x", "weight", "grad_x", "grad_w", "grad_b", "num_rows", "rows_per_split",
                  "num_splits", "w_base", "b_base", "DT: tl.constexpr", "WANT_X: tl.constexpr",
                  "WANT_W: tl.constexpr", "WANT_B: tl.constexpr"]


def _source(problem: LinearProblem, kind: str, tiles: _Tiles) -> str:
    """Module text of the ``forward`` or ``backward`` kernel of ``problem`` with ``tiles``."""
    rows = tiles.rows
    code, body, consts = codegen.Source(), codegen.Source(), codegen.Constants()
    code(f"from {shared_tiles.__name__} import column_sum_tile, path_tile, weight_grad_tile  # noqa: F401")
    about = (f"{problem}: out = x @ W per path (plus the bias), one launch" if kind == "forward" else
             f"Gradients of {problem}: grad_x = grad_out @ W^T per path, grad_w and grad_b as wanted, one launch")
    codegen.jit_header(code, "linear", _FORWARD_ARGS if kind == "forward" else _BACKWARD_ARGS, about=about)
    code.depth = body.depth = 1
    body.comment("Program (row block, task): the task id picks one branch below (a destination irrep, a path or a "
                 "bias) and one block of its channels.")
    body("task = tl.program_id(1)")
    body(f"rows = tl.program_id(0) * {rows} + tl.arange(0, {rows})")
    body("row_ok = rows < num_rows")
    body("rows = rows.to(tl.int64)")
    if kind == "forward":
        _emit_apply(body, consts, problem, False, tiles, "x", "out")
    else:
        body.comment("Weight and bias gradients: program s sums the rows of split s into its own partial (torch "
                     "adds the partials in a fixed order: deterministic).")
        body("split = tl.program_id(0)")
        body("live = tl.where(split < num_splits, 1, 0)  # programs past the last split store nothing")
        body("row_start = split * rows_per_split")
        body("row_end = tl.minimum(row_start + rows_per_split, num_rows)")
        body("split = split.to(tl.int64)")
        sections = (("WANT_X", lambda c: _emit_apply(c, consts, problem, True, tiles, "grad_out", "grad_x")),
                    ("WANT_W", lambda c: _emit_weight_grads(c, consts, problem, tiles)),
                    ("WANT_B", lambda c: _emit_bias_grads(c, consts, problem, tiles)))
        for flag, emit in sections:
            section = codegen.Source()
            section.depth = 2
            emit(section)
            if section.lines:
                body(f"if {flag}:")
                body.lines.extend(section.lines)
    consts.emit(code)
    code.lines.extend(body.lines)
    return code.text()


@dataclass(frozen=True)
class _Plan:
    """Launch shape of one problem and tile variant: rows per program and task counts of each kind."""

    rows: int
    forward: int
    grad_x: int
    grad_w: int
    grad_b: int


_PLANS: dict = {}


def _plan(problem: LinearProblem, tiles: _Tiles) -> _Plan:
    key = (problem.key, tiles)
    if key not in _PLANS:
        tasks = [sum(branch[-1] for branch in branches) for branches in (
            _apply_branches(problem, False, tiles), _apply_branches(problem, True, tiles),
            _weight_branches(problem, tiles), _bias_branches(problem, tiles))]
        _PLANS[key] = _Plan(tiles.rows, *tasks)
    return _PLANS[key]


def _kernel(problem: LinearProblem, kind: str, tiles: _Tiles):
    return codegen.load_module(f"{problem.key}_{kind}_{tiles.name}", lambda: _source(problem, kind, tiles)).linear


def forward(problem: LinearProblem, x, weight, bias=None):
    """x [N, dim_in] -> [N, dim_out] (plus the bias on its scalar outputs when ``bias`` is given): one launch."""
    tiles = _tiles(x.dtype)
    plan = _plan(problem, tiles)
    x, weight = x.contiguous(), weight.contiguous()
    n = x.shape[0]
    out = new_output((n, problem.dim_out), x)
    if n and plan.forward:
        _kernel(problem, "forward", tiles)[(triton.cdiv(n, plan.rows), plan.forward)](
            x, weight, weight if bias is None else bias.contiguous(), out, n, DT=tl_dtype(x.dtype),
            HAS_BIAS=bias is not None, num_warps=tiles.warps)
    return out


def backward(problem: LinearProblem, grad_out, x, weight, want_x: bool, want_w: bool, want_b: bool):
    """(grad_x, grad_weight, grad_bias) of <grad_out, forward(x, weight, bias)>, each empty unless wanted: the
    wanted ones come from one launch (plus torch's sum over splits beyond ``ROWS_PER_SPLIT`` rows)."""
    tiles = _tiles(x.dtype)
    plan = _plan(problem, tiles)
    # x is read only for the weight gradient (without it, it may be a stand-in holding no memory)
    grad_out, weight = grad_out.contiguous(), weight.contiguous()
    x = x.contiguous() if want_w else x
    n = x.shape[0]
    splits = triton.cdiv(n, ROWS_PER_SPLIT)
    grad_x = new_output((n, problem.dim_in), x) if want_x else x.new_empty(0)
    partial = [(new_output((splits, size) if splits > 1 else (size,), x) if n else x.new_zeros(size)) if wanted
               else x.new_empty(0) for wanted, size in ((want_w, problem.weight_numel), (want_b, problem.bias_numel))]
    tasks = [plan.grad_x * want_x, plan.grad_w * want_w, plan.grad_b * want_b]
    if n and sum(tasks):
        grid = (max(triton.cdiv(n, plan.rows), splits) if want_x else splits, sum(tasks))
        _kernel(problem, "backward", tiles)[grid](
            grad_out, x, weight, grad_x, *partial, n, ROWS_PER_SPLIT, splits, tasks[0], tasks[0] + tasks[1],
            DT=tl_dtype(x.dtype), WANT_X=want_x, WANT_W=want_w, WANT_B=want_b, num_warps=tiles.warps)
    grad_w, grad_b = (p.sum(0) if p.dim() == 2 else p for p in partial)
    return grad_x, grad_w, grad_b
