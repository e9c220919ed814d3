"""Real spherical harmonics in plain torch, identical to ``e3nn.o3.spherical_harmonics`` (any l, tested to 6).

Each Y^l is a fixed combination of monomials of the vector's components, with the exact coefficients of
:func:`fastmlip.descriptors.spherical_harmonics.monomial_coefficients` (component normalisation; the others
rescale). The gradient of Y^l is a linear map of Y^(l-1) (derivatives of harmonic polynomials are harmonic),
which is how the ops write their backward without leaving the family.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch import Tensor

from ..descriptors import NORMALIZE_EPS, SH_NORMALIZATIONS, monomial_coefficients, parse_irreps
from . import device_constant


@functools.lru_cache(maxsize=None)
def gradient_matrices(l: int) -> np.ndarray:
    """D [2l+1, 2l-1, 3] with d Y^l_i / d v_k = sum_j D[i, j, k] Y^(l-1)_j (component-normalised)."""
    exps, coeffs = monomial_coefficients(l)
    known_exps, known_coeffs = monomial_coefficients(l - 1)
    all_exps = [(a, b, l - 1 - a - b) for a in range(l) for b in range(l - a)]
    row = {e: r for r, e in enumerate(all_exps)}
    low_coeffs = np.zeros((len(all_exps), 2 * l - 1))
    low_coeffs[[row[tuple(e)] for e in known_exps.tolist()]] = known_coeffs
    out = np.zeros((2 * l + 1, 2 * l - 1, 3))
    for k in range(3):
        deriv = np.zeros((len(all_exps), 2 * l + 1))
        for e, c in zip(exps.tolist(), coeffs):
            if e[k]:
                lowered = list(e)
                lowered[k] -= 1
                deriv[row[tuple(lowered)]] += e[k] * c
        solution, *_ = np.linalg.lstsq(low_coeffs, deriv, rcond=None)
        if not np.allclose(low_coeffs @ solution, deriv, rtol=0, atol=1e-11):
            raise AssertionError(f"derivative of Y^{l} is not in the span of Y^{l - 1}")
        out[:, :, k] = solution.T
    return out


def _constant(name: str, l: int, build, dtype: torch.dtype, device: torch.device) -> Tensor:
    return device_constant((name, l), lambda dt, dev: torch.as_tensor(build(l), dtype=dt, device=dev), dtype, device)


def polynomials(lmax: int, vectors: Tensor) -> Tensor:
    """Component-normalised Y^0..Y^lmax of the raw (unnormalised) vectors [E, 3] -> [E, (lmax+1)^2]."""
    powers = [torch.ones_like(vectors)]
    for _ in range(lmax):
        powers.append(powers[-1] * vectors)
    powers = torch.stack(powers, dim=1)  # [E, lmax+1, 3]
    out = []
    for l in range(lmax + 1):
        exps = _constant("exponents", l, lambda l: monomial_coefficients(l)[0], torch.int64, vectors.device)
        coeffs = _constant("coefficients", l, lambda l: monomial_coefficients(l)[1], vectors.dtype, vectors.device)
        monomials = powers[:, exps[:, 0], 0] * powers[:, exps[:, 1], 1] * powers[:, exps[:, 2], 2]
        out.append(monomials @ coeffs)
    return torch.cat(out, dim=1)


def polynomials_backward(lmax: int, grad_out: Tensor, low: Tensor | None) -> Tensor:
    """d<grad_out, polynomials(lmax, v)>/dv given ``low`` = polynomials(lmax - 1, v) (None for lmax = 0)."""
    if lmax == 0:
        return grad_out.new_zeros(grad_out.shape[0], 3)
    grad = None
    for l in range(1, lmax + 1):
        d = _constant("gradient", l, gradient_matrices, grad_out.dtype, grad_out.device)
        term = torch.einsum("ni,ijk,nj->nk", grad_out[:, l * l:(l + 1) ** 2], d, low[:, (l - 1) ** 2:l * l])
        grad = term if grad is None else grad + term
    return grad


def normalize_backward(grad_unit: Tensor, vectors: Tensor) -> Tensor:
    """d <grad_unit, F.normalize(v)> / d v: (g - u (u.g)) / |v|, or g / eps where |v| <= eps (clamped)."""
    norm = vectors.norm(dim=1, keepdim=True)
    unit = vectors / norm.clamp_min(NORMALIZE_EPS)
    tangent = grad_unit - unit * (unit * grad_unit).sum(1, keepdim=True)
    return torch.where(norm > NORMALIZE_EPS, tangent, grad_unit) / norm.clamp_min(NORMALIZE_EPS)


def degrees(ls, input_parity: int | None = None) -> tuple:
    """e3nn's reading of ``l``: an int is one degree, a list its degrees, irreps their degrees (parity-checked).

    Returns (degrees, input parity): pseudovector input (1e) is inferred, as e3nn does, from an odd l with p = +1.
    """
    if isinstance(ls, bool):
        raise ValueError("degrees must be an int, a list of ints or irreps, not a bool")
    if isinstance(ls, int):
        out, parity = [ls], input_parity or -1
    elif isinstance(ls, (list, tuple)) and all(isinstance(l, int) and not isinstance(l, bool) for l in ls):
        out, parity = list(ls), input_parity or -1
    else:
        irreps = parse_irreps(str(ls) if not isinstance(ls, (list, tuple)) else ls)
        if input_parity is None:
            input_parity = 1 if any(m.l % 2 == 1 and m.p == 1 for m in irreps) else -1
        out, parity = [], input_parity
        for m in irreps:
            if m.p != input_parity ** m.l:
                raise ValueError(f"irreps {ls} ask for l = {m.l} with parity {m.p}, inconsistent with input parity "
                                 f"{input_parity} (expected {input_parity ** m.l})")
            out.extend([m.l] * m.mul)
    if not out or any(l < 0 for l in out):
        raise ValueError(f"spherical harmonics need at least one non-negative degree, got {ls!r}")
    return tuple(out), parity


def select_and_normalize(sh: Tensor, ls: tuple, normalization: str) -> Tensor:
    """Pick degrees ``ls`` out of the component-normalised Y^0..Y^lmax and apply e3nn's output normalisation."""
    if normalization not in SH_NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {SH_NORMALIZATIONS}, got {normalization!r}")
    if list(ls) != list(range(max(ls) + 1)):
        sh = torch.cat([sh[:, l * l:(l + 1) ** 2] for l in ls], dim=1)
    if normalization == "integral":
        sh = sh / math.sqrt(4 * math.pi)
    elif normalization == "norm":
        sh = sh / torch.cat([torch.full((2 * l + 1,), math.sqrt(2 * l + 1), dtype=sh.dtype, device=sh.device)
                             for l in ls])
    return sh


def spherical_harmonics(ls, vectors: Tensor, normalize: bool, normalization: str = "integral") -> Tensor:
    """``e3nn.o3.spherical_harmonics(ls, vectors, normalize, normalization)`` for vectors [..., 3]."""
    degs, _ = degrees(ls)
    flat = vectors.reshape(-1, 3)
    if normalize:
        flat = torch.nn.functional.normalize(flat, dim=-1)
    out = select_and_normalize(polynomials(max(degs), flat), degs, normalization)
    return out.reshape(*vectors.shape[:-1], out.shape[-1])
