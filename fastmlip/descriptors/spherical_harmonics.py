"""e3nn's real spherical harmonics as a problem, and the exact polynomial coefficients of each Y^l.

Each Y^l is built from the textbook closed form (Legendre part times Re/Im (X + iY)^m, no Condon-Shortley phase)
as exact monomial coefficients, in e3nn's axes: e3nn's (x, y, z) are the textbook (Y, Z, X), so e3nn's polar
axis is y. Component normalisation (|Y^l|^2 = 2l+1 on the sphere) is the base; the others rescale. The kernels
bake these coefficients in and the reference multiplies by them, so both compute the same polynomials.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

from .irreps import Irreps, MulIrrep, parse_irreps, with_key

SH_NORMALIZATIONS = ("integral", "component", "norm")
NORMALIZE_EPS = 1e-12  # torch.nn.functional.normalize's default: v / max(|v|, eps)


@dataclass(frozen=True)
class SphericalHarmonicsProblem:
    """e3nn's ``SphericalHarmonics``: degrees ``ls`` (in output order) of a vector (input_parity -1) or pseudovector."""

    ls: tuple
    normalize: bool
    normalization: str
    input_parity: int = -1
    key: str = field(default="", compare=False)

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
    return with_key(SphericalHarmonicsProblem(tuple(int(l) for l in module._ls_list), bool(module.normalize),
                                              str(module.normalization), parity))


def _textbook_terms(l: int, m: int) -> dict:
    """Y_lm / normalisation as {(a, b, c): Fraction} over textbook X^a Y^b Z^c (|Y_lm| up to a sqrt factor)."""
    am = abs(m)
    legendre = {}
    for k in range((l - am) // 2 + 1):
        c = Fraction((-1) ** k * math.comb(l, k) * math.comb(2 * l - 2 * k, l) * math.factorial(l - 2 * k),
                     2 ** l * math.factorial(l - 2 * k - am))
        for i in range(k + 1):  # r^(2k) = (X^2 + Y^2 + Z^2)^k
            for j in range(k - i + 1):
                key = (2 * i, 2 * j, 2 * (k - i - j) + l - 2 * k - am)
                legendre[key] = legendre.get(key, 0) + c * (math.factorial(k) // (
                    math.factorial(i) * math.factorial(j) * math.factorial(k - i - j)))
    azimuthal = {}
    for p in range(am + 1):  # Re / Im of (X + iY)^|m|: terms X^p (iY)^(|m|-p)
        q = am - p
        phase = (0, 1, 0, -1)[q % 4] if m < 0 else (1, 0, -1, 0)[q % 4]
        if phase:
            azimuthal[(p, q, 0)] = phase * math.comb(am, p)
    out = {}
    for (a1, b1, c1), v1 in legendre.items():
        for (a2, b2, c2), v2 in azimuthal.items():
            key = (a1 + a2, b1 + b2, c1 + c2)
            out[key] = out.get(key, 0) + v1 * v2
    return {k: v for k, v in out.items() if v != 0}


@functools.lru_cache(maxsize=None)
def monomial_coefficients(l: int) -> tuple:
    """(exponents [K, 3] over e3nn's x, y, z; coefficients [K, 2l+1]) of the component-normalised Y^l."""
    columns = []
    for m in range(-l, l + 1):
        scale = (2 * l + 1) * Fraction(math.factorial(l - abs(m)), math.factorial(l + abs(m))) * (2 if m else 1)
        terms = _textbook_terms(l, m)
        # textbook (X, Y, Z) = e3nn (z, x, y): exponent of e3nn x is textbook Y's, of y is Z's, of z is X's
        columns.append({(b, c, a): float(v) * math.sqrt(scale) for (a, b, c), v in terms.items()})
    exponents = sorted({e for col in columns for e in col})
    coeffs = np.array([[col.get(e, 0.0) for col in columns] for e in exponents])
    return np.array(exponents, dtype=np.int64).reshape(-1, 3), coeffs
