"""Triton kernels for e3nn's Gate: one launch forward, one backward, generated per problem.

e3nn runs a Gate as an extract (three copies), one activation per irrep block, an elementwise tensor product and
a concatenation: a dozen small launches on [N, dim] node features. Here one program owns a block of rows and
walks every run of the problem (offsets, widths, activation constants baked in as literals), so x is read once
and the output written once. Gated runs load a [rows, channels, 2l+1] tile (2l+1 padded to a power of two), so
the backward sums each gate's 2l+1 products in registers: every input column is written by exactly one program,
no atomics, deterministic. Activations are the normalize2mom-scaled silu, sigmoid, tanh, abs or identity
(:data:`fastmlip.descriptors.KNOWN_ACTIVATIONS`); problems with any other never reach these kernels.
"""
from __future__ import annotations

import torch
import triton

from ..descriptors import GateProblem
from . import codegen
from .launch import new_output, settings, tl_dtype

_TILE = 128  # columns (scalars) or channels x padded components (gated) per tile


def _pow2(n: int) -> int:
    return max(2, triton.next_power_of_2(n))


def _chunks(total: int, size: int):
    return [(start, min(size, total - start)) for start in range(0, total, size)]


def _scalar_tiles(body, run, width: int):
    """Per chunk of a scalar run: (input offset, output offset) after emitting ``k``/``mask`` for it."""
    for start, count in _chunks(run.width, width):
        src, dst = run.src + start, run.dst + start
        body.comment(f"scalars: out[:, {dst}:{dst + count}] = act(x[:, {src}:{src + count}]), one [rows, {width}] "
                     "tile")
        body(f"k = tl.arange(0, {width})[None, :]")
        body(f"mask = row_ok[:, None] & (k < {count})")
        yield run.src + start, run.dst + start


def _gated_tiles(body, run):
    """Per chunk of gated channels: (gate offset, gated offset, output offset) after emitting the index tiles."""
    d, dp = run.ir_dim, _pow2(run.ir_dim)
    channels = min(_pow2(run.mul), max(2, _TILE // dp))
    for start, count in _chunks(run.mul, channels):
        src, dst, gate = run.src + start * d, run.dst + start * d, run.gate_src + start
        body.comment(f"gated irreps: out[:, {dst}:{dst + count * d}] from x[:, {src}:{src + count * d}] ({count} "
                     f"channels x {d} components) gated by x[:, {gate}:{gate + count}]; a [rows, {channels}, {dp}] "
                     "tile (padded to powers of two), each gate broadcast over its components")
        body(f"u = tl.arange(0, {channels})[None, :]")
        body(f"gmask = row_ok[:, None] & (u < {count})")
        body(f"m = tl.arange(0, {dp})[None, None, :]")
        body(f"comp = u[:, :, None] * {d} + m")
        body(f"cmask = gmask[:, :, None] & (m < {d})")
        yield run.gate_src + start, run.src + start * d, run.dst + start * d


def kernel_source(problem: GateProblem, kind: str, rows: int) -> str:
    """The module text of ``problem``'s ``forward`` or ``backward`` kernel, ``rows`` rows per program."""
    src, consts = codegen.Source(), codegen.Constants()
    args = ["x", "out", "num_rows", "DT: tl.constexpr"] if kind == "forward" else [
        "x", "grad_out", "grad_x", "num_rows", "DT: tl.constexpr"]
    about = (f"{problem}: out [N, {problem.dim_out}] from x [N, {problem.dim_in}]" if kind == "forward" else
             f"Gradient of {problem} with respect to x [N, {problem.dim_in}], given grad_out [N, {problem.dim_out}]")
    codegen.jit_header(src, f"gate_{kind}", args, about=about)
    body = codegen.Source()
    body.depth = 1
    body.comment(f"Each program owns {rows} rows and walks every run of columns: x is read once and every "
                 "output column written once, by this program alone (no atomics).")
    body(f"rows = tl.program_id(0).to(tl.int64) * {rows} + tl.arange(0, {rows})")
    body("row_ok = rows < num_rows")
    body(f"x_row = x + rows * {problem.dim_in}")
    if kind == "forward":
        body(f"out_row = out + rows * {problem.dim_out}")
        _forward_body(body, problem, consts)
    else:
        body(f"go_row = grad_out + rows * {problem.dim_out}")
        body(f"gx_row = grad_x + rows * {problem.dim_in}")
        _backward_body(body, problem, consts)
    with src.indent():
        consts.emit(src)
    src.lines.extend(body.lines)
    return src.text()


def _forward_body(body, problem: GateProblem, consts) -> None:
    for run in problem.scalar_runs:
        for src_off, dst_off in _scalar_tiles(body, run, min(_TILE, _pow2(run.width))):
            body(f"v = tl.load(x_row[:, None] + ({src_off} + k), mask=mask, other=0.0)")
            value = codegen.activation(body, run.act, "v", consts, False)
            body(f"tl.store(out_row[:, None] + ({dst_off} + k), {value}, mask=mask)")
    for run in problem.gated_runs:
        for gate_off, src_off, dst_off in _gated_tiles(body, run):
            body(f"v = tl.load(x_row[:, None] + ({gate_off} + u), mask=gmask, other=0.0)")
            body(f"a = {codegen.activation(body, run.act, 'v', consts, False)}")
            body.comment("out = y * act(gate), times the product's path weight")
            body(f"y = tl.load(x_row[:, None, None] + ({src_off} + comp), mask=cmask, other=0.0)")
            body(f"tl.store(out_row[:, None, None] + ({dst_off} + comp), "
                 f"{codegen.times('y * a[:, :, None]', run.coefficient, consts)}, mask=cmask)")


def _backward_body(body, problem: GateProblem, consts) -> None:
    for run in problem.scalar_runs:
        for src_off, dst_off in _scalar_tiles(body, run, min(_TILE, _pow2(run.width))):
            body(f"v = tl.load(x_row[:, None] + ({src_off} + k), mask=mask, other=0.0)")
            body(f"g = tl.load(go_row[:, None] + ({dst_off} + k), mask=mask, other=0.0)")
            slope = codegen.activation(body, run.act, "v", consts, True)
            body(f"tl.store(gx_row[:, None] + ({src_off} + k), g * ({slope}), mask=mask)")
    for run in problem.gated_runs:
        for gate_off, src_off, dst_off in _gated_tiles(body, run):
            body(f"v = tl.load(x_row[:, None] + ({gate_off} + u), mask=gmask, other=0.0)")
            body(f"a = {codegen.activation(body, run.act, 'v', consts, False)}")
            body(f"slope = {codegen.activation(body, run.act, 'v', consts, True)}")
            body.comment("The gated components' gradient is g * act(gate); a gate's is act'(gate) times the sum "
                         "of g * y over its components, reduced in registers.")
            body(f"g = tl.load(go_row[:, None, None] + ({dst_off} + comp), mask=cmask, other=0.0)")
            body(f"g = {codegen.times('g', run.coefficient, consts)}")
            body(f"y = tl.load(x_row[:, None, None] + ({src_off} + comp), mask=cmask, other=0.0)")
            body(f"tl.store(gx_row[:, None, None] + ({src_off} + comp), g * a[:, :, None], mask=cmask)")
            body(f"tl.store(gx_row[:, None] + ({gate_off} + u), tl.sum(g * y, axis=2) * slope, mask=gmask)")


def _launch(problem: GateProblem, kind: str, args, num_rows: int, dtype) -> None:
    rows = settings().gate_rows
    module = codegen.load_module(f"gate_{kind}_{problem.key}_r{rows}",
                                 lambda: kernel_source(problem, kind, rows))
    getattr(module, f"gate_{kind}")[(triton.cdiv(num_rows, rows),)](*args, num_rows, DT=tl_dtype(dtype),
                                                                     num_warps=4)


def forward(problem: GateProblem, x: torch.Tensor) -> torch.Tensor:
    """Gate(x) for x [N, dim_in] -> [N, dim_out]."""
    tl_dtype(x.dtype)
    x = x.contiguous()
    out = new_output((x.shape[0], problem.dim_out), x)
    if x.shape[0]:
        _launch(problem, "forward", (x, out), x.shape[0], x.dtype)
    return out


def backward(problem: GateProblem, grad_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """d <grad_out, forward(problem, x)> / d x -> [N, dim_in]."""
    tl_dtype(x.dtype)
    x, grad_out = x.contiguous(), grad_out.contiguous()
    grad_x = new_output(tuple(x.shape), x)
    if x.shape[0]:
        _launch(problem, "backward", (x, grad_out, grad_x), x.shape[0], x.dtype)
    return grad_x
