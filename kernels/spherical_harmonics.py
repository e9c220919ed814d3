"""Triton kernels for real spherical harmonics Y^0..Y^lmax (component-normalised polynomials of the vectors,
normalised first when asked, exactly as ``torch.nn.functional.normalize``: v / max(|v|, 1e-12)).

Generated per lmax with every polynomial coefficient baked in (from
:func:`fastmlip.descriptors.monomial_coefficients`, the same exact coefficients the reference
uses). One program per block of edges, edges across lanes; powers of x, y, z once, each monomial once, each
output a fixed linear combination of monomials. The backward contracts the incoming gradient with the
coefficients per monomial first, then spreads it over the monomial's derivative (one pass, no Y^(l-1) buffer),
and through the normalisation: (g - u (u.g)) / |v| (g / eps where the norm is clamped).
"""
from __future__ import annotations

import torch

from ..descriptors import NORMALIZE_EPS, monomial_coefficients
from . import codegen
from .launch import new_output, settings, tl_dtype


class _Monomials:
    """x^a y^b z^c names, built from cached powers, each emitted once."""

    def __init__(self, src):
        self.src, self.seen = src, set()

    def power(self, axis: str, n: int) -> str:
        if n == 1:
            return f"v{axis}"
        name = f"{axis}{n}"
        if name not in self.seen:
            self.seen.add(name)
            self.src(f"{name} = {self.power(axis, n - 1)} * v{axis}")
        return name

    def __call__(self, exps) -> str:
        factors = [self.power(axis, int(n)) for axis, n in zip("xyz", exps) if n]
        if not factors:
            return "one"
        if len(factors) == 1:
            return factors[0]
        name = "m" + "_".join(str(int(n)) for n in exps)
        if name not in self.seen:
            self.seen.add(name)
            self.src(f"{name} = {' * '.join(factors)}")
        return name


def _start(src, name, args, block, normalize: bool, consts, about: str):
    """Kernel header and the loads; with ``normalize`` the vx, vy, vz the polynomials see are the unit vector
    (raw components in rx, ry, rz, 1 / max(|v|, eps) in inv_norm)."""
    codegen.jit_header(src, name, args, about=about)
    body = codegen.Source()
    body.depth = 1
    body.comment(f"Each program owns {block} edges, one per lane; lanes past the last edge load zeros and store "
                 "nothing.")
    body(f"e = tl.program_id(0).to(tl.int64) * {block} + tl.arange(0, {block})")
    body("mask = e < num_edges")
    body.comment("The edge vectors' components: three strided loads, kept in registers for the whole kernel.")
    prefix = "r" if normalize else "v"
    for k, axis in enumerate("xyz"):
        body(f"{prefix}{axis} = tl.load(vectors + e * 3 + {k}, mask=mask, other=0.0)")
    if normalize:
        body.comment("Normalised as torch.nn.functional.normalize does it: v / max(|v|, eps).")
        body("norm = tl.sqrt(rx * rx + ry * ry + rz * rz)")
        body(f"inv_norm = 1.0 / tl.maximum(norm, {consts(NORMALIZE_EPS)})")
        for axis in "xyz":
            body(f"v{axis} = r{axis} * inv_norm")
    body(f"one = tl.full([{block}], 1.0, DT)")
    return body


def forward_source(lmax: int, block: int, normalize: bool) -> str:
    """out[e] = Y^0..Y^lmax of edge e's vector (unit vector with ``normalize``), component-normalised."""
    src, consts = codegen.Source(), codegen.Constants()
    about = (f"Real spherical harmonics Y^0..Y^{lmax} (component normalisation) of each edge's "
             f"{'unit ' if normalize else ''}vector: out [E, {(lmax + 1) ** 2}].")
    body = _start(src, "sh_forward", ["vectors", "out", "num_edges", "DT: tl.constexpr"], block, normalize, consts,
                  about)
    body.comment("Each Y^l_m is a fixed combination of monomials x^a y^b z^c: every power and monomial is computed "
                 "once, at first use, and each output component is stored as soon as it is summed.")
    monos = _Monomials(body)
    dim = (lmax + 1) ** 2
    for l in range(lmax + 1):
        exps, coeffs = monomial_coefficients(l)
        body.comment(f"Y^{l}: out[:, {l * l}:{(l + 1) ** 2}]")
        for i in range(2 * l + 1):
            pairs = [(consts(coeffs[r, i]), monos(exps[r])) for r in range(len(exps)) if coeffs[r, i] != 0]
            value = codegen.linear_combination(pairs)
            body(f"tl.store(out + e * {dim} + {l * l + i}, {value}, mask=mask)")
    with src.indent():
        consts.emit(src)
    src.lines.extend(body.lines)
    return src.text()


def backward_source(lmax: int, block: int, normalize: bool) -> str:
    """grad_v[k] = sum_l sum_monomials (sum_i coeff[r, i] g[l, i]) * d(monomial_r)/d v_k (then through the
    normalisation)."""
    src, consts = codegen.Source(), codegen.Constants()
    about = (f"Gradient of sum_i grad_out[e, i] * Y_i (Y^0..Y^{lmax} of the {'unit ' if normalize else ''}vector) "
             "with respect to each edge's vector: grad_vectors [E, 3].")
    body = _start(src, "sh_backward", ["vectors", "grad_out", "grad_vectors", "num_edges", "DT: tl.constexpr"],
                  block, normalize, consts, about)
    monos = _Monomials(body)
    dim = (lmax + 1) ** 2
    body.comment("The gradient accumulates in registers; Y^0 is constant and contributes nothing.")
    for axis in "xyz":
        body(f"g{axis} = tl.zeros([{block}], DT)")
    for l in range(1, lmax + 1):
        exps, coeffs = monomial_coefficients(l)
        body.comment(f"Y^{l}: per monomial, first t = sum_i coefficient[i] * grad_out[i] (one value per edge), "
                     "then t times the monomial's derivative along x, y and z.")
        for i in range(2 * l + 1):
            body(f"go{i} = tl.load(grad_out + e * {dim} + {l * l + i}, mask=mask, other=0.0)")
        for r in range(len(exps)):
            pairs = [(consts(coeffs[r, i]), f"go{i}") for i in range(2 * l + 1) if coeffs[r, i] != 0]
            if not pairs:
                continue
            body(f"t = {codegen.linear_combination(pairs)}")
            for k, axis in enumerate("xyz"):
                power = int(exps[r][k])
                if power:
                    lowered = list(exps[r])
                    lowered[k] -= 1
                    scaled = "t" if power == 1 else f"{consts(float(power))} * t"
                    body(f"g{axis} += {scaled} * {monos(lowered)}")
    if normalize:
        body.comment("Back through the normalisation: the gradient's tangential part over |v| (g / eps where the "
                     "norm was clamped).")
        body("radial = vx * gx + vy * gy + vz * gz")
        body(f"tangential = norm > {consts(NORMALIZE_EPS)}")
        for axis in "xyz":
            body(f"g{axis} = tl.where(tangential, g{axis} - v{axis} * radial, g{axis}) * inv_norm")
    for k, axis in enumerate("xyz"):
        body(f"tl.store(grad_vectors + e * 3 + {k}, g{axis}, mask=mask)")
    with src.indent():
        consts.emit(src)
    src.lines.extend(body.lines)
    return src.text()


def _kernel(kind: str, lmax: int, block: int, normalize: bool):
    build = forward_source if kind == "forward" else backward_source
    name = f"spherical_harmonics_{kind}_l{lmax}_b{block}{'_unit' if normalize else ''}"
    module = codegen.load_module(name, lambda: build(lmax, block, normalize))
    return getattr(module, f"sh_{kind}")


def _launch(kind, lmax, normalize, args, num_edges, dtype):
    block = settings().sh_block
    grid = (-(-num_edges // block),)
    _kernel(kind, lmax, block, normalize)[grid](*args, num_edges, DT=tl_dtype(dtype),
                                                num_warps=max(1, min(4, block // 32)))


def forward(lmax: int, vectors: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """Component-normalised Y^0..Y^lmax of vectors [E, 3] (normalised first if asked) -> [E, (lmax + 1)^2]."""
    tl_dtype(vectors.dtype)
    vectors = vectors.contiguous()
    shape = (vectors.shape[0], (lmax + 1) ** 2)
    out = new_output(shape, vectors)
    if vectors.shape[0]:
        _launch("forward", lmax, normalize, (vectors, out), vectors.shape[0], vectors.dtype)
    return out


def backward(lmax: int, grad_out: torch.Tensor, vectors: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """d <grad_out, forward(lmax, vectors, normalize)> / d vectors -> [E, 3]."""
    tl_dtype(vectors.dtype)
    vectors, grad_out = vectors.contiguous(), grad_out.contiguous()
    out = new_output(vectors.shape, vectors)
    if vectors.shape[0]:
        _launch("backward", lmax, normalize, (vectors, grad_out, out), vectors.shape[0], vectors.dtype)
    return out
