"""Edge radial features as a problem: a Bessel basis times a cutoff envelope, as MACE and SevenNet compute them.

Both frameworks turn each edge length r into ``prefactor * sin(w_n r) / r * envelope(r)`` (n = 1..num_basis):
MACE's ``RadialEmbeddingBlock`` (``BesselBasis`` x ``PolynomialCutoff``, which is zero beyond r_max) and
SevenNet's ``EdgeEmbedding`` (``BesselBasis`` with trainable w x ``PolynomialCutoff`` or ``XPLORCutoff``, neither
cut to zero beyond the cutoff). The problem holds the envelope's constants, read from the loaded modules; the
frequencies w stay the module's tensor and are passed in (trainable in SevenNet).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .irreps import with_key


@dataclass(frozen=True)
class Envelope:
    """``polynomial``: 1 - c0 u^p + c1 u^(p+1) - c2 u^(p+2), u = r / cutoff (times [r < cutoff] if ``hard``);
    ``xplor``: 1 for r < r_on, else (rc^2 - r^2)^2 (rc^2 + 2 r^2 - 3 r_on^2) / (rc^2 - r_on^2)^3."""

    kind: str
    cutoff: float
    p: int = 0
    hard: bool = False
    r_on: float = 0.0

    @property
    def polynomial_coefficients(self) -> tuple:
        p = float(self.p)
        return (p + 1.0) * (p + 2.0) / 2.0, p * (p + 2.0), p * (p + 1.0) / 2.0


@dataclass(frozen=True)
class RadialBasisProblem:
    """``prefactor * sin(w_n r) / r * envelope(r)`` for n < num_basis; the frequencies w are an input, not a
    constant (SevenNet trains them)."""

    num_basis: int
    prefactor: float
    envelope: Envelope
    key: str = field(default="", compare=False)

    def __str__(self) -> str:
        return f"RadialBasis(bessel x{self.num_basis}, {self.envelope.kind} envelope, cutoff {self.envelope.cutoff})"


def radial_basis_problem(num_basis: int, prefactor: float, envelope: Envelope) -> RadialBasisProblem:
    """The keyed problem; ValueError for an envelope the formulas do not cover."""
    if envelope.kind not in ("polynomial", "xplor"):
        raise ValueError(f"unknown envelope {envelope.kind!r}")
    if envelope.kind == "polynomial" and envelope.p < 1:
        raise ValueError(f"polynomial envelope needs an integer p >= 1, got {envelope.p}")
    if envelope.kind == "xplor" and not 0.0 <= envelope.r_on < envelope.cutoff:
        raise ValueError(f"XPLOR envelope needs 0 <= r_on < cutoff, got {envelope.r_on}, {envelope.cutoff}")
    return with_key(RadialBasisProblem(int(num_basis), float(prefactor), envelope))
