"""Irreps as plain tuples of (multiplicity, l, parity), and the content key every problem is found by."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass


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


def with_key(problem):
    """Attach a content hash: the name under which ops and kernel caches find the problem."""
    digest = hashlib.sha1(repr(problem).encode()).hexdigest()[:16]
    object.__setattr__(problem, "key", f"{type(problem).__name__}-{digest}")
    return problem
