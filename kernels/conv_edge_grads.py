"""What the convolution's backward sender walk (:mod:`fastmlip.kernels.conv`) writes per edge, as generated source.

Per edge of a source node's walk, with s_j[u] = sum C x[u] grad_out[dst, u] (the CG block transposed):

* ``w``: the weight gradient gw[e, u, v] = sum_j y[v, j] s_j[u], stored per channel (each belongs to one program).
* ``y``: this channel block's share of the edge-attribute gradient, sum over the block's u of w[u, v] s_j[u].
* ``r`` and ``s``, when the weights are a table read at the edge's length, w = scale * f(r)
  (:mod:`fastmlip.ops.radial_table`): instead of storing gw, the walk dots it with f'(r) (for d/dr, times the
  scale) and with f(r) (for d/d scale), interpolated from the table's four rows where gw is made. The weight
  gradient, as large as the weights, then never goes to memory and back.

Everything summed over the block's channels is stored as one partial row per (edge, channel block), the edge
attributes' columns first, then d/dr, then d/d scale (:func:`partial_columns`); the caller adds the channel blocks
up in a fixed order, so results are deterministic.
"""
from __future__ import annotations

from collections import defaultdict

from . import codegen

TABLE_ARGS = ["lengths", "table", "segments", "scale", "num_knots"]  # after the kernel's sizes, in this order
TABLE_CONSTEXPRS = ["SEGMENTS: tl.constexpr", "SCALED: tl.constexpr"]
TABLE_IMPORT = "from fastmlip.kernels.radial_table import hermite_slope_weights, hermite_weights, table_interval"


def partial_columns(edge: str, dim_in2: int) -> dict:
    """Column of each per-edge sum in a partial row: 'y' -> the first of dim_in2, then 'r', then 's'."""
    columns, width = {}, 0
    for name, size in (("y", dim_in2), ("r", 1), ("s", 1)):
        if name in edge:
            columns[name] = width
            width += size
    columns["width"] = width
    return columns


def emit(body, consts, group, r, edge, block, strides, n_cb, lanes):
    """The per-edge gradients ``edge`` (a subset of 'wyrs') of the r-th edge slot of a loop step, from the loads
    the walk made for its x-gradient (g = the gathered grad_out[dst], n = the row's own x). With edge lanes a slot
    is a column of edges, and the sums run along its rows."""
    _, _, dim_in2, n_w = strides
    columns = partial_columns(edge, dim_in2)
    if r == 0:
        body.comment("This edge's gradients from the loads above: " + ", ".join(
            {"w": "gw per channel", "y": "this block's share of gy", "r": "d/dr", "s": "d/d scale"}[name]
            for name in "wyrs" if name in edge) + ".")
    if lanes > 1:
        mask, valid, tile = f"m_{r}", f", mask=v_{r}", f"[{lanes}, {block}]"
    else:
        mask, valid, tile = ("m", "", f"[{block}]") if r == 0 else (f"m_{r}", f", mask=p + {r} < end", f"[{block}]")
    for name in "rs":
        if name in edge:
            body(f"grad_{name}_{r} = tl.zeros({tile}, DT)")
    q = set()
    for ti, t in enumerate(group):
        js = path_sums(body, consts, t, ti, lambda a, b: f"g{t.in_off + a}_{r} * n{t.out_off + b}")
        for v in range(t.mul2):
            column = f"{t.w_off + v} + u * {t.mul2}"
            dot = " + ".join(f"y{t.y_off + v * t.y_d + j}_{r} * s{ti}_{j}" for j in js)
            if "w" in edge:
                body(f"tl.store(gw + e_{r} * {n_w} + {column}, {dot or f'tl.zeros({tile}, DT)'}, mask={mask})")
            if ("r" in edge or "s" in edge) and dot:  # through the table: d/dr, d/d scale
                body(f"gw_{r} = {dot}")
                if "r" in edge:
                    body(f"grad_r_{r} += gw_{r} * slope{t.w_off + v}_{r}")
                if "s" in edge:
                    body(f"grad_s_{r} += gw_{r} * value{t.w_off + v}_{r}")
            if "y" in edge:
                for j in js:
                    idx = t.y_off + v * t.y_d + j
                    body(f"q{idx} {'+=' if idx in q else '='} w{t.w_off + v}_{r} * s{ti}_{j}")
                    q.add(idx)
    row = f"gy + (e_{r} * {n_cb} + blk) * {columns['width']}"
    if "y" in edge:
        for idx in range(dim_in2):
            value = _lane_sum(f"q{idx}", lanes) if idx in q else consts(0.0)
            body(f"tl.store({row} + {columns['y'] + idx}, {value}{valid})")
    if "r" in edge:
        body(f"d_r_{r} = {_lane_sum(f'grad_r_{r}', lanes)}")
        body(f"d_r_{r} = d_r_{r} * scale_{r}")
        body.comment("Outside the table f is its end value: no slope.")
        body(f"tl.store({row} + {columns['r']}, tl.where(inside_{r}, d_r_{r}, 0.0){valid})")
    if "s" in edge:
        body(f"tl.store({row} + {columns['s']}, {_lane_sum(f'grad_s_{r}', lanes)}{valid})")


def path_sums(body, consts, term, ti: int, product) -> list:
    """Emit s{ti}_j = sum over the term's CG nonzeros (a, j, b) of C * ``product(a, b)`` (the gathered component a
    times the row's component b, as the caller names them) for each j the term reaches; returns those j, sorted."""
    by_j = defaultdict(list)
    for a, j, b, c in term.nonzeros:
        by_j[j].append((consts(c), product(a, b)))
    for j, pairs in sorted(by_j.items()):
        body(f"s{ti}_{j} = {codegen.linear_combination(pairs)}")
    return sorted(by_j)


def _lane_sum(name: str, lanes: int) -> str:
    return f"tl.sum({name}, 1, keep_dims=True)" if lanes > 1 else f"tl.sum({name}, 0)"


def emit_table_loads(body, group, r, reads: str, valid: str, mask: str, n_w: int):
    """What the r-th edge slot reads from the table, with the edge's other loads (their latencies overlap):
    where its length falls (the interval's first row: f and f' at the left knot, then at the right one, ``n_w``
    columns each), the four rows of each of the group's weight columns, and from them per column, as ``reads``
    asks: ``w`` the weight scale * f(r) (instead of a load from memory), ``s`` f(r), ``r`` f'(r); and the
    edge's scale (1 unless SCALED)."""
    if r == 0:
        body.comment("The edge's interval in the table, and per weight column the cubic Hermite interpolation of "
                     "its four rows: " + ", ".join({"w": "the weight", "s": "f(r)", "r": "f'(r)"}[name]
                                                  for name in "wsr" if name in reads) + ".")
    body(f"length_{r} = tl.load(lengths + e_{r}{valid})")
    body(f"knot_{r}, t_{r}, inv_step_{r}, inside_{r} = table_interval(length_{r}, segments, num_knots - 1, "
         f"SEGMENTS)")
    body(f"rows_{r} = table + knot_{r} * {2 * n_w}")
    body("if SCALED:")
    with body.indent():
        body(f"scale_{r} = tl.load(scale + e_{r}{valid})")
    body("else:")
    with body.indent():
        body(f"scale_{r} = 1.0")
    values = "w" in reads or "s" in reads
    if values:
        body(f"hv0_{r}, hs0_{r}, hv1_{r}, hs1_{r} = hermite_weights(t_{r}, 1.0 / inv_step_{r})")
    if "r" in reads:
        body(f"dv0_{r}, ds0_{r}, dv1_{r}, ds1_{r} = hermite_slope_weights(t_{r}, inv_step_{r})")
    for t in group:
        for v in range(t.mul2):
            c = t.w_off + v
            for k in range(4):
                body(f"row{k} = tl.load(rows_{r} + {c + k * n_w} + u * {t.mul2}, mask={mask}, other=0.0)")
            if values:
                body(f"value{c}_{r} = hv0_{r} * row0 + hs0_{r} * row1 + hv1_{r} * row2 + hs1_{r} * row3")
            if "w" in reads:
                body(f"w{c}_{r} = value{c}_{r} * scale_{r}")
            if "r" in reads:
                body(f"slope{c}_{r} = dv0_{r} * row0 + ds0_{r} * row1 + dv1_{r} * row2 + ds1_{r} * row3")
