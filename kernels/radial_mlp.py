"""Triton kernels for e3nn's FullyConnectedNet (the radial MLP): one launch forward, one backward.

Why: as e3nn modules every layer is a weight divide, a matmul, an activation and a scale (twice that backward),
on [edges, 64] tiles so small in an MD step that launches cost the time. Here one program owns a block of edges
and runs every layer: hidden activations stay in registers, widths padded to powers of two (at least 16, tl.dot's
minimum) with masked weight loads, the last layer in column blocks stored once each. float32 products are
IEEE by default (``FASTMLIP_DOT_PRECISION``, see :func:`.launch.dot_precision`). Layer scales, the
activation and e3nn's normalisation constants are baked in per problem (:mod:`.codegen`).

The backward walks the last layer's column blocks once for G = grad_out @ W^T (first, so only G and its tiles
are live in that loop; on an H200 this order did not change its time, ~4x the forward with IEEE dots), then
recomputes the forward's pre-activations (cheaper than storing [E, 64] per layer), takes the per-edge row-scale
gradient as <h, G> (no second pass over the output; with an activated last layer, from the recomputed outputs)
and propagates G back to the input.
"""
from __future__ import annotations

import triton

from ..descriptors import RadialMLPProblem
from . import codegen
from .launch import dot_precision, new_output, settings, tl_dtype

_COLUMNS = 64  # last-layer columns per block


def _pad(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _weight_args(problem: RadialMLPProblem) -> list:
    return [f"w{i}" for i in range(len(problem.layers))]


def _emit_weight(code, i: int, layer, transpose: bool) -> None:
    """``W{i}`` [padded in, padded out] with zeros outside the real widths; ``transpose``: then ``tl.trans`` it (on
    an H200 as fast as loading W^T through strided pointers)."""
    p_in, p_out = _pad(layer.dim_in), _pad(layer.dim_out)
    code(f"W{i} = tl.load(w{i} + tl.arange(0, {p_in})[:, None] * {layer.dim_out} + tl.arange(0, {p_out})[None, :], "
         f"mask=(tl.arange(0, {p_in})[:, None] < {layer.dim_in}) & (tl.arange(0, {p_out})[None, :] < "
         f"{layer.dim_out}), other=0.0)")
    if transpose:
        code(f"W{i} = tl.trans(W{i})")


def _emit_hidden(code, consts, problem: RadialMLPProblem, precision: str) -> None:
    """h0 = x tile, then a{i} (pre-activation) and h{i+1} for every layer but the last."""
    p0 = _pad(problem.dim_in)
    code.comment("The rows' inputs as one tile, then every hidden layer on it: activations stay in registers, "
                 "widths padded to powers of two (at least 16, tl.dot's minimum) with zeros.")
    code(f"k0 = tl.arange(0, {p0})")
    code(f"h0 = tl.load(x + rows[:, None] * {problem.dim_in} + k0[None, :], "
         f"mask=row_ok[:, None] & (k0[None, :] < {problem.dim_in}), other=0.0)")
    for i, layer in enumerate(problem.layers[:-1]):
        _emit_weight(code, i, layer, transpose=False)
        code(f"a{i} = tl.dot(h{i}, W{i}, input_precision=\"{precision}\") * {consts(layer.scale)}")
        value = codegen.activation(code, layer.act, f"a{i}", consts, False) if layer.act is not None else f"a{i}"
        code(f"h{i + 1} = {codegen.times(value, layer.out_scale, consts)}")


def _column_span(problem: RadialMLPProblem, groups: int) -> int:
    """Last-layer columns per program when ``groups`` programs share each block of rows (whole column blocks)."""
    blocks = -(-problem.dim_out // _COLUMNS)
    return -(-blocks // max(1, min(groups, blocks))) * _COLUMNS


def _forward_source(problem: RadialMLPProblem, rows: int, precision: str, span: int) -> str:
    code, body, consts = codegen.Source(), codegen.Source(), codegen.Constants()
    codegen.jit_header(code, "radial_mlp_forward", ["x", *_weight_args(problem), "row_scale", "has_scale", "out",
                                                    "num_rows", "DT: tl.constexpr"], flags=["has_scale"],
                       about=f"{problem}: out [E, {problem.dim_out}] = net(x) * row_scale (when has_scale)")
    code.depth = body.depth = 1
    last, n = len(problem.layers) - 1, problem.dim_out
    layer = problem.layers[-1]
    body.comment(f"Each program owns {rows} rows (edges) and runs every layer on them; program axis 1 picks "
                 f"which {span} of the last layer's {n} columns it writes (the hidden layers are recomputed per "
                 "column group: cheaper than fewer programs in flight).")
    body(f"rows = tl.program_id(0) * {rows} + tl.arange(0, {rows})")
    body("row_ok = rows < num_rows")
    body("rows = rows.to(tl.int64)")
    _emit_hidden(body, consts, problem, precision)
    body("scaled = row_ok & (rows * 0 + has_scale != 0)  # a vector mask: the interpreter rejects a scalar one")
    body("factor = tl.load(row_scale + rows, mask=scaled, other=1.0)  # 1 without a scale")
    p_in = _pad(layer.dim_in)
    body.comment(f"The last layer in blocks of {_COLUMNS} output columns, each scaled and stored once.")
    body(f"first_col = tl.program_id(1) * {span}")
    body(f"for col0 in range(first_col, tl.minimum(first_col + {span}, {n}), {_COLUMNS}):")
    with body.indent():
        body(f"cols = col0 + tl.arange(0, {_COLUMNS})")
        body(f"W = tl.load(w{last} + tl.arange(0, {p_in})[:, None] * {n} + cols[None, :], "
             f"mask=(tl.arange(0, {p_in})[:, None] < {layer.dim_in}) & (cols[None, :] < {n}), other=0.0)")
        body(f"y = tl.dot(h{last}, W, input_precision=\"{precision}\") * {consts(layer.scale)}")
        if layer.act is not None:
            value = codegen.activation(body, layer.act, "y", consts, False)
            body(f"y = {codegen.times(value, layer.out_scale, consts)}")
        body("y = y * factor[:, None]")
        body(f"tl.store(out + rows[:, None] * {n} + cols[None, :], y, mask=row_ok[:, None] & (cols[None, :] < {n}))")
    consts.emit(code)
    code.lines.extend(body.lines)
    return code.text()


def _backward_source(problem: RadialMLPProblem, rows: int, precision: str) -> str:
    code, body, consts = codegen.Source(), codegen.Source(), codegen.Constants()
    codegen.jit_header(code, "radial_mlp_backward", [
        "grad_out", "x", *_weight_args(problem), "row_scale", "has_scale", "grad_x", "grad_scale", "num_rows",
        "DT: tl.constexpr", "WANT_X: tl.constexpr", "WANT_SCALE: tl.constexpr"], flags=["has_scale"],
        about=f"Gradients of <grad_out, {problem}(x) * row_scale> with respect to x and row_scale, as wanted")
    code.depth = body.depth = 1
    last, n = len(problem.layers) - 1, problem.dim_out
    layer = problem.layers[-1]
    p_in = _pad(layer.dim_in)
    body.comment(f"Each program owns {rows} rows (edges) and walks the layers backwards on them.")
    body(f"rows = tl.program_id(0) * {rows} + tl.arange(0, {rows})")
    body("row_ok = rows < num_rows")
    body("rows = rows.to(tl.int64)")
    if layer.act is not None:  # the loop below needs h{last}
        _emit_hidden(body, consts, problem, precision)
    body.comment(f"G = grad_out @ W_last^T, over blocks of {_COLUMNS} output columns: only G and one block's tiles "
                 "are live in this loop.")
    body(f"G = tl.zeros([{rows}, {p_in}], DT)")
    if layer.act is not None:
        body(f"scale_acc = tl.zeros([{rows}], DT)")
    body(f"for col0 in range(0, {n}, {_COLUMNS}):")
    with body.indent():
        body(f"cols = col0 + tl.arange(0, {_COLUMNS})")
        body(f"g = tl.load(grad_out + rows[:, None] * {n} + cols[None, :], "
             f"mask=row_ok[:, None] & (cols[None, :] < {n}), other=0.0)")
        body(f"W = tl.load(w{last} + tl.arange(0, {p_in})[:, None] * {n} + cols[None, :], "
             f"mask=(tl.arange(0, {p_in})[:, None] < {layer.dim_in}) & (cols[None, :] < {n}), other=0.0)")
        body("Wt = tl.trans(W)")
        if layer.act is not None:  # the output is act(pre): recompute pre for act' and the row-scale gradient
            body(f"pre = tl.dot(h{last}, W, input_precision=\"{precision}\") * {consts(layer.scale)}")
            value = codegen.activation(body, layer.act, "pre", consts, False)
            body(f"scale_acc += tl.sum(g * {codegen.times(value, layer.out_scale, consts)}, axis=1)")
            slope = codegen.activation(body, layer.act, "pre", consts, True)
            body(f"g = g * {codegen.times(slope, layer.out_scale, consts)}")
        body(f"G += tl.dot(g, Wt, input_precision=\"{precision}\")")
    body(f"G = G * {consts(layer.scale)}")
    if layer.act is None:  # recomputed after the loop, so the loop keeps only G and its tiles in registers
        _emit_hidden(body, consts, problem, precision)
    body.comment("The row-scale gradient is <h, G> per row (or, with an activated last layer, summed in the loop).")
    body("if WANT_SCALE:")
    scale_grad = "scale_acc" if layer.act is not None else f"tl.sum(h{last} * G, axis=1)"
    body(f"    tl.store(grad_scale + rows, {scale_grad}, mask=row_ok)")
    body("scaled = row_ok & (rows * 0 + has_scale != 0)  # a vector mask: the interpreter rejects a scalar one")
    body("G = G * tl.load(row_scale + rows, mask=scaled, other=1.0)[:, None]  # 1 without a scale")
    body.comment("Back through the hidden layers, with the pre-activations recomputed above, to the input tile.")
    body("if WANT_X:")
    with body.indent():
        for i in reversed(range(last)):
            hidden = problem.layers[i]
            if hidden.act is not None:
                slope = codegen.activation(body, hidden.act, f"a{i}", consts, True)
                body(f"G = G * {codegen.times(slope, hidden.out_scale, consts)}")
            _emit_weight(body, i, hidden, transpose=True)
            body(f"G = tl.dot(G, W{i}, input_precision=\"{precision}\") * {consts(hidden.scale)}")
        body(f"tl.store(grad_x + rows[:, None] * {problem.dim_in} + k0[None, :], G, "
             f"mask=row_ok[:, None] & (k0[None, :] < {problem.dim_in}))")
    consts.emit(code)
    code.lines.extend(body.lines)
    return code.text()


def _kernel(problem: RadialMLPProblem, kind: str, rows: int, precision: str, span: int = 0):
    """The forward's kernel writes ``span`` columns a program (its name says so where that is not all of them)."""
    if kind == "forward":
        span_name = f"_c{span}" if span < problem.dim_out else ""
        module = codegen.load_module(f"{problem.key}_mlp_{kind}_r{rows}{span_name}_{precision}",
                                     lambda: _forward_source(problem, rows, precision, span))
    else:
        module = codegen.load_module(f"{problem.key}_mlp_{kind}_r{rows}_{precision}",
                                     lambda: _backward_source(problem, rows, precision))
    return getattr(module, f"radial_mlp_{kind}")


def forward(problem: RadialMLPProblem, x, weights, row_scale=None):
    """FullyConnectedNet(x) [E, dim_out], times ``row_scale`` [E] per row if given: one launch."""
    dt = tl_dtype(x.dtype)
    rows = settings().mlp_rows
    span = _column_span(problem, settings().mlp_column_groups)
    x = x.contiguous()
    weights = [w.contiguous() for w in weights]
    out = new_output((x.shape[0], problem.dim_out), x)
    if x.shape[0]:
        grid = (triton.cdiv(x.shape[0], rows), triton.cdiv(problem.dim_out, span))
        _kernel(problem, "forward", rows, dot_precision(x.dtype), span)[grid](
            x, *weights, x if row_scale is None else row_scale.contiguous(), int(row_scale is not None), out,
            x.shape[0], DT=dt, num_warps=4)
    return out


def backward(problem: RadialMLPProblem, grad_out, x, weights, row_scale, want_x: bool, want_scale: bool):
    """(grad_x, grad_row_scale) of <grad_out, forward(x, weights, row_scale)>, each empty unless wanted."""
    dt = tl_dtype(x.dtype)
    rows = settings().mlp_backward_rows
    want_scale = want_scale and row_scale is not None
    x, grad_out = x.contiguous(), grad_out.contiguous()
    weights = [w.contiguous() for w in weights]
    grad_x = new_output(tuple(x.shape), x) if want_x else x.new_empty(0)
    grad_scale = new_output((x.shape[0],), x) if want_scale else x.new_empty(0)
    if x.shape[0] and (want_x or want_scale):
        _kernel(problem, "backward", rows, dot_precision(x.dtype))[(triton.cdiv(x.shape[0], rows),)](
            grad_out, x, *weights, x if row_scale is None else row_scale.contiguous(), int(row_scale is not None),
            grad_x, grad_scale, x.shape[0], DT=dt, WANT_X=want_x, WANT_SCALE=want_scale, num_warps=4)
    return grad_x, grad_scale

