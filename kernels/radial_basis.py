"""Triton kernels for edge radial features, prefactor * sin(w r) / r * envelope(r): one launch each way.

One program per block of edges, the basis across a padded power-of-two axis; the envelope (polynomial with its
integer power unrolled into multiplications, or XPLOR) and the prefactor are baked in per problem, the
frequencies w are loaded (they are the module's tensor, trainable in SevenNet). The backward returns d/dr only.
"""
from __future__ import annotations

import triton

from ..descriptors import Envelope, RadialBasisProblem
from . import codegen
from .launch import new_output, settings, tl_dtype


def _powers(code, base: str, top: int) -> None:
    """{base}_1 .. {base}_{top} as successive products."""
    code(f"{base}_1 = {base}")
    for k in range(2, top + 1):
        code(f"{base}_{k} = {base}_{k - 1} * {base}")


def _emit_envelope(code, consts, env: Envelope, derivative: bool) -> None:
    """``env`` (and ``env_slope`` if ``derivative``) at r [BLOCK]."""
    if env.kind == "polynomial":
        c0, c1, c2 = (consts(c) for c in env.polynomial_coefficients)
        p = env.p
        code.comment(f"Polynomial envelope in u = r / cutoff, its powers up to {p + 2} by repeated multiplication.")
        code(f"u = r * {consts(1.0 / env.cutoff)}")
        _powers(code, "u", p + 2)
        code(f"env = 1.0 - {c0} * u_{p} + {c1} * u_{p + 1} - {c2} * u_{p + 2}")
        if derivative:
            low = f"u_{p - 1}" if p > 1 else "1.0"
            code(f"env_slope = (-{c0} * {consts(float(p))} * {low} + {c1} * {consts(float(p + 1))} * u_{p} - "
                 f"{c2} * {consts(float(p + 2))} * u_{p + 1}) * {consts(1.0 / env.cutoff)}")
        if env.hard:
            code(f"inside = r < {consts(env.cutoff)}")
            code("env = tl.where(inside, env, 0.0)")
            if derivative:
                code("env_slope = tl.where(inside, env_slope, 0.0)")
        return
    on_sq, cut_sq = env.r_on * env.r_on, env.cutoff * env.cutoff
    inv_cube = consts(1.0 / (cut_sq - on_sq) ** 3)
    code.comment("XPLOR envelope: 1 below r_on, a smooth switch to 0 at the cutoff above it.")
    code("r_sq = r * r")
    code(f"gap = {consts(cut_sq)} - r_sq")
    code(f"rise = {consts(cut_sq)} + 2.0 * r_sq - {consts(3.0 * on_sq)}")
    code(f"below = r < {consts(env.r_on)}")
    code(f"env = tl.where(below, 1.0, gap * gap * rise * {inv_cube})")
    if derivative:
        code(f"env_slope = tl.where(below, 0.0, 4.0 * r * gap * (gap - rise) * {inv_cube})")


def _source(problem: RadialBasisProblem, kind: str, block: int) -> str:
    code, body, consts = codegen.Source(), codegen.Source(), codegen.Constants()
    args = (["lengths", "frequencies", "out", "num_edges", "DT: tl.constexpr"] if kind == "forward" else
            ["grad_out", "lengths", "frequencies", "grad_lengths", "num_edges", "DT: tl.constexpr"])
    about = (f"{problem}: out [E, {problem.num_basis}] from the edge lengths [E]" if kind == "forward" else
             f"d/dr of sum_n grad_out[e, n] * {problem}[e, n], per edge length [E]")
    codegen.jit_header(code, f"radial_basis_{kind}", args, about=about)
    code.depth = body.depth = 1
    n, width = problem.num_basis, max(2, triton.next_power_of_2(problem.num_basis))
    body.comment(f"Each program owns {block} edges (rows) and the whole basis across a padded axis of {width}; "
                 "masked edges read a length of 1 (no division by zero).")
    body(f"e = tl.program_id(0).to(tl.int64) * {block} + tl.arange(0, {block})")
    body("ok = e < num_edges")
    body(f"k = tl.arange(0, {width})")
    body("r = tl.load(lengths + e, mask=ok, other=1.0)")
    body.comment("The frequencies are an input (trainable in SevenNet), loaded once per program.")
    body(f"w = tl.load(frequencies + k, mask=k < {n}, other=0.0)")
    body.comment("Bessel functions sin(w r) / r for every (edge, n) of the tile.")
    body("wr = w[None, :] * r[:, None]")
    body("bessel = tl.sin(wr) / r[:, None]")
    _emit_envelope(body, consts, problem.envelope, derivative=kind == "backward")
    tile_mask = f"ok[:, None] & (k[None, :] < {n})"
    if kind == "forward":
        body(f"tl.store(out + e[:, None] * {n} + k[None, :], {consts(problem.prefactor)} * bessel * env[:, None], "
             f"mask={tile_mask})")
    else:
        body.comment("d/dr of each (edge, n) term by the product rule, summed over n in registers: one value per "
                     "edge, stored once.")
        body(f"g = tl.load(grad_out + e[:, None] * {n} + k[None, :], mask={tile_mask}, other=0.0)")
        body("slope = (w[None, :] * tl.cos(wr) - bessel) / r[:, None]")
        body(f"grad = {consts(problem.prefactor)} * tl.sum(g * (slope * env[:, None] + bessel * env_slope[:, None]), "
             f"axis=1)")
        body("tl.store(grad_lengths + e, grad, mask=ok)")
    consts.emit(code)
    code.lines.extend(body.lines)
    return code.text()


def _launch(problem: RadialBasisProblem, kind: str, args, num_edges: int, dtype) -> None:
    block = settings().radial_block
    module = codegen.load_module(f"{problem.key}_radial_{kind}_b{block}", lambda: _source(problem, kind, block))
    getattr(module, f"radial_basis_{kind}")[(triton.cdiv(num_edges, block),)](
        *args, num_edges, DT=tl_dtype(dtype), num_warps=4)


def forward(problem: RadialBasisProblem, lengths, frequencies):
    """lengths [E] -> [E, num_basis]."""
    tl_dtype(lengths.dtype)
    lengths, frequencies = lengths.contiguous(), frequencies.contiguous()
    out = new_output((lengths.shape[0], problem.num_basis), lengths)
    if lengths.shape[0]:
        _launch(problem, "forward", (lengths, frequencies, out), lengths.shape[0], lengths.dtype)
    return out


def backward(problem: RadialBasisProblem, grad_out, lengths, frequencies):
    """d <grad_out, forward(lengths, frequencies)> / d lengths -> [E]."""
    tl_dtype(lengths.dtype)
    grad_out, lengths, frequencies = grad_out.contiguous(), lengths.contiguous(), frequencies.contiguous()
    grad = new_output((lengths.shape[0],), lengths)
    if lengths.shape[0]:
        _launch(problem, "backward", (grad_out, lengths, frequencies, grad), lengths.shape[0], lengths.dtype)
    return grad
