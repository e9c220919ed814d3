"""e3nn's ``nn.Gate`` as runs of columns.

A Gate cuts its input into scalars, gates and gated irreps (``Extract``, after e3nn sorted the irreps), applies
activations wrapped by ``normalize2mom`` (each object carries its own constant ``cst``), and multiplies each gated
irrep by its activated gate in an ``ElementwiseTensorProduct``. Everything is read from the loaded module: where
each column comes from, the activation objects, the product's path weights.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .activations import Activation, activation_of
from .irreps import with_key


@dataclass(frozen=True)
class ScalarRun:
    """out[:, dst + k] = act(x[:, src + k]) for k < width."""

    src: int
    dst: int
    width: int
    act: Activation


@dataclass(frozen=True)
class GatedRun:
    """out[:, dst + u*d + m] = coefficient * x[:, src + u*d + m] * act(x[:, gate_src + u]), u < mul, m < ir_dim."""

    gate_src: int
    src: int
    dst: int
    mul: int
    ir_dim: int
    coefficient: float
    act: Activation


@dataclass(frozen=True)
class GateProblem:
    """A Gate on x [N, dim_in]: every input column is read by exactly one run, every output column written once."""

    dim_in: int
    dim_out: int
    scalar_runs: tuple
    gated_runs: tuple
    key: str = field(default="", compare=False)

    @property
    def activations(self) -> tuple:
        return tuple(run.act for run in self.scalar_runs + self.gated_runs)

    @property
    def has_kernel(self) -> bool:
        return all(act.known for act in self.activations)

    def __str__(self) -> str:
        names = sorted({act.name for act in self.activations})
        return f"Gate({self.dim_in} -> {self.dim_out}, {'/'.join(names) or 'empty'})"


def _offsets(irreps) -> list:
    offsets, o = [], 0
    for mul_ir in irreps:
        offsets.append(o)
        o += mul_ir.dim
    return offsets


def _extracted_columns(extract) -> list:
    """Per output of an e3nn ``Extract``: the input column of each of its columns."""
    offsets = _offsets(extract.irreps_in)
    outputs = []
    for irreps_out, ins in zip(extract.irreps_outs, extract.instructions):
        columns = []
        for i_in in ins:
            columns.extend(range(offsets[i_in], offsets[i_in] + extract.irreps_in[i_in].dim))
        if len(columns) != irreps_out.dim:
            raise ValueError("Extract instructions do not match its output irreps")
        outputs.append(columns)
    return outputs


def _column_activations(activation) -> list:
    """One :class:`Activation` per scalar column of an e3nn ``nn.Activation`` (the same object for a whole path)."""
    acts = []
    for mul, (l, _), act in activation.paths:
        if act is not None and l != 0:
            raise ValueError("activation on a non-scalar irrep")
        acts.extend([activation_of(act)] * (mul * (2 * l + 1)))
    return acts


def _product_channels(mul) -> list:
    """(gated column, gate index, output column, ir_dim, coefficient) per gated irrep of the elementwise product.

    e3nn's specialised code computes x * g for 0 x 0 -> 0 and x * g / sqrt(2l+1) otherwise, times path_weight.
    """
    from e3nn.o3 import ElementwiseTensorProduct

    if type(mul) is not ElementwiseTensorProduct:
        raise ValueError(f"gate product is a {type(mul).__name__}, not e3nn's ElementwiseTensorProduct")
    if not mul._specialized_code:
        raise ValueError("elementwise product built without e3nn's specialised code (generic wigner_3j path)")
    off1, off2, off_out = _offsets(mul.irreps_in1), _offsets(mul.irreps_in2), _offsets(mul.irreps_out)
    channels = []
    for ins in mul.instructions:
        a, b, c = mul.irreps_in1[ins.i_in1], mul.irreps_in2[ins.i_in2], mul.irreps_out[ins.i_out]
        if ins.connection_mode != "uuu" or ins.has_weight or b.ir.l != 0 or a.ir.l != c.ir.l or not (
                a.mul == b.mul == c.mul):
            raise ValueError(f"gate product path {a} x {b} -> {c} ({ins.connection_mode}) is not a scalar gating")
        d = a.ir.dim
        coefficient = float(ins.path_weight) * (1.0 if d == 1 else 1.0 / math.sqrt(d))
        channels.extend((off1[ins.i_in1] + u * d, off2[ins.i_in2] + u, off_out[ins.i_out] + u * d, d, coefficient)
                        for u in range(a.mul))
    if sum(channel[3] for channel in channels) != mul.irreps_in1.dim or len(channels) != mul.irreps_in2.dim:
        raise ValueError("gate product does not use every gate and gated component exactly once")
    return channels


def _merged(items: list, follows) -> list:
    """Group consecutive items into runs while ``follows(previous, next)``."""
    runs = []
    for item in items:
        if runs and follows(runs[-1][-1], item):
            runs[-1].append(item)
        else:
            runs.append([item])
    return runs


def gate_problem(gate) -> GateProblem:
    """Describe an e3nn ``nn.Gate``; ValueError for anything the runs cannot express exactly."""
    from e3nn.nn import Activation as E3nnActivation
    from e3nn.nn import Extract, Gate

    if type(gate) is not Gate or type(gate.sc.cut) is not Extract or not all(
            type(a) is E3nnActivation for a in (gate.act_scalars, gate.act_gates)):
        raise ValueError(f"{type(gate).__name__} is not an e3nn Gate built from Extract and Activation")
    scalar_cols, gate_cols, gated_cols = _extracted_columns(gate.sc.cut)
    scalar_acts, gate_acts = _column_activations(gate.act_scalars), _column_activations(gate.act_gates)
    if len(scalar_acts) != len(scalar_cols) or len(gate_acts) != len(gate_cols):
        raise ValueError("activations do not cover the gate's scalars and gates")
    scalars = [(src, dst, act) for dst, (src, act) in enumerate(zip(scalar_cols, scalar_acts))]
    scalar_runs = tuple(ScalarRun(r[0][0], r[0][1], len(r), r[0][2]) for r in _merged(
        scalars, lambda a, b: b[0] == a[0] + 1 and b[1] == a[1] + 1 and b[2].function is a[2].function))
    channels = []
    if gate_cols:
        for src, u, dst, d, coefficient in _product_channels(gate.mul):
            if gated_cols[src:src + d] != list(range(gated_cols[src], gated_cols[src] + d)):
                raise ValueError("a gated irrep's components are not contiguous in the input")
            channels.append((gate_cols[u], gated_cols[src], len(scalar_cols) + dst, d, coefficient, gate_acts[u]))
    gated_runs = tuple(GatedRun(r[0][0], r[0][1], r[0][2], len(r), *r[0][3:]) for r in _merged(
        channels, lambda a, b: (b[0], b[1], b[2]) == (a[0] + 1, a[1] + a[3], a[2] + a[3]) and b[3:5] == a[3:5]
        and b[5].function is a[5].function))
    dim_in, dim_out = gate.irreps_in.dim, gate.irreps_out.dim
    read = sorted([c for r in scalar_runs for c in range(r.src, r.src + r.width)]
                  + [c for r in gated_runs for c in range(r.gate_src, r.gate_src + r.mul)]
                  + [c for r in gated_runs for c in range(r.src, r.src + r.mul * r.ir_dim)])
    written = sorted([c for r in scalar_runs for c in range(r.dst, r.dst + r.width)]
                     + [c for r in gated_runs for c in range(r.dst, r.dst + r.mul * r.ir_dim)])
    if read != list(range(dim_in)) or written != list(range(dim_out)):
        raise ValueError("gate layout does not read every input and write every output column exactly once")
    return with_key(GateProblem(dim_in, dim_out, scalar_runs, gated_runs))
