"""Triton kernels for the fused convolution (gather -> weighted "uvu" tensor product -> scatter-sum).

Two generated kernel shapes cover forward and backward:

* aggregate: one program per (row, block of channels) walks that row's edges one per loop step, channels
  across lanes, one register accumulator per output component, a single store at the end (no atomics). The
  forward is this with row = destination node (edges sorted by dst, ``dst_ptr``). The backward with edges
  listed by source (``src_perm``/``src_ptr``) is the same shape with roles swapped, the "sender" walk (row =
  source node, the CG block transposed, grad_out gathered from dst): besides accumulating the x-gradient it
  writes each edge's weight gradient and its channel block's share of the edge_attr gradient, so every input is
  read once. Without CSR offsets the same body runs over chunks of edges in any order and atomically adds each
  edge's contribution.
* edge: one program per chunk of edges, looping over every channel block; it writes the per-edge gradients
  (edge_attr: a sum over channels, reduced in registers; weights: one value per channel) with no scatter. Only
  the backward over unsorted edges uses it.

Channels of a path are the in1 multiplicity u ("uvu": out[u] = sum_v w[u, v] C(x[u], y[v])); paths with the
same multiplicity share one channel-block range, so one program loads x once for all of them. Every constant is
baked into the generated source (see :mod:`fastmlip.kernels.codegen`). Nothing of size E x dim_out is ever
materialised.
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass

import torch

from ..descriptors import TensorProductProblem, iter_paths
from . import codegen, conv_edge_grads
from .launch import dtype_name, new_output, settings, tl_dtype

MAX_MUL_IN2 = 8
MAX_FUSED_GATHER = 128  # see _fused_backward_fits
COMPILE_SECONDS: dict = {}
RESOURCES: dict = {}  # kernel label -> (registers per thread, spilled bytes), as the compiler reports them


@dataclass(frozen=True)
class _Term:
    """One path as a kernel sees it: gathered block -> accumulated block, coupled through y and w."""

    mul: int
    in_off: int
    in_d: int
    out_off: int
    out_d: int
    y_off: int
    y_d: int
    mul2: int
    w_off: int
    nonzeros: tuple  # (a, j, b, coefficient): a indexes the gathered block, b the accumulated one


def _terms(problem: TensorProductProblem, transpose: bool) -> list:
    """Forward terms (x -> out), or with ``transpose`` the x-gradient's (grad_out -> gx, C[i,j,k] read as [k,j,i])."""
    terms = []
    for path, o1, o2, oo, (a, b, c) in iter_paths(problem):
        nz = tuple((k, j, i, v * path.path_weight) if transpose else (i, j, k, v * path.path_weight)
                   for i, j, k, v in path.cg.nonzeros)
        blocks = ((oo, c.ir_dim, o1, a.ir_dim) if transpose else (o1, a.ir_dim, oo, c.ir_dim))
        terms.append(_Term(a.mul, *blocks, o2, b.ir_dim, b.mul, path.weight_offset, nz))
    return terms


def _groups(terms) -> list:
    """Terms keyed by channel multiplicity (largest first): each group is one range of channel blocks."""
    by_mul = defaultdict(list)
    for t in terms:
        by_mul[t.mul].append(t)
    return [(mul, by_mul[mul]) for mul in sorted(by_mul, reverse=True)]


def _blocks(mul: int, block: int) -> int:
    return -(-mul // block)


def _block_size(problem: TensorProductProblem) -> int:
    largest = max([p.weight_shape[0] for p in problem.paths] or [1])
    return max(1, min(settings().conv_block, 1 << (largest - 1).bit_length()))


def _warps(block: int, lanes: int = 1) -> int:
    return settings().conv_warps or max(1, min(4, lanes * block // 32))


class _Loads:
    """Emit each masked channel-vector load once, at its first use inside a channel block."""

    def __init__(self, src, prefix, row):
        self.src, self.prefix, self.row, self.seen = src, prefix, row, set()

    def __call__(self, off: int, d: int, comp: int) -> str:
        name = f"{self.prefix}{off + comp}"
        if name not in self.seen:
            self.seen.add(name)
            self.src(f"{name} = tl.load({self.row} + {off + comp} + u * {d}, mask=m, other=0.0)")
        return name


def _edge_slots(body, r, lanes):
    """(edge index, index mask, lane mask) of the r-th edge slot of a loop step: one edge (``lanes`` 1), or a
    column of ``lanes`` consecutive edges, one per row of a [lanes, block] tile (masked off past the row's end)."""
    if lanes > 1:
        body(f"slot_{r} = p + {r * lanes} + edge_lane")
        body(f"v_{r} = slot_{r} < end")
        body(f"m_{r} = m & v_{r}")
        return f"slot_{r}", f", mask=v_{r}, other=0", f"m_{r}"
    if r == 0:
        return "p", "", "m"
    # a vector comparison: the interpreter cannot combine a vector mask with a scalar one
    body(f"m_{r} = m & (lane * 0 + (p + {r}) < end)")
    return f"p + {r}", f", mask=p + {r} < end, other=0", f"m_{r}"


def _emit_edge_loads(body, group, r, mode, in_stride, y_stride, w_stride, lanes, load_y=True, load_w=True,
                     table_reads=""):
    """Loads for the r-th edge slot of an unrolled loop step (see :func:`_edge_slots`); ``table_reads``: what the
    slot reads from a radial table (:func:`fastmlip.kernels.conv_edge_grads.emit_table_loads`; with 'w' the
    weights come from there, not from memory)."""
    if r == 0:
        body.comment("Per edge: the gathered row's channel vectors, the edge's attributes (one scalar each) and "
                     "its per-channel weights.")
    index, valid, mask = _edge_slots(body, r, lanes)
    body(f"e_{r} = tl.load(perm + {index}{valid}).to(tl.int64)" if mode == "csr_perm" else f"e_{r} = {index}")
    body(f"g_row_{r} = inp + tl.load(gather + e_{r}{valid}).to(tl.int64) * {in_stride}")
    g_needed = sorted({(t.in_off, t.in_d, a) for t in group for a, _, _, _ in t.nonzeros})
    for off, d, a in g_needed:
        body(f"g{off + a}_{r} = tl.load(g_row_{r} + {off + a} + u * {d}, mask={mask}, other=0.0)")
    y_needed = sorted({t.y_off + v * t.y_d + j for t in group for v in range(t.mul2) for _, j, _, _ in t.nonzeros})
    for idx in y_needed if load_y else ():
        body(f"y{idx}_{r} = tl.load(y + e_{r} * {y_stride} + {idx}{valid})")
    for t in group if load_w and "w" not in table_reads else ():
        for v in range(t.mul2):
            body(f"w{t.w_off + v}_{r} = tl.load(w + e_{r} * {w_stride} + {t.w_off + v} + u * {t.mul2}, mask={mask}, "
                 f"other=0.0)")
    if table_reads:
        conv_edge_grads.emit_table_loads(body, group, r, table_reads, valid, mask, w_stride)


def _emit_accumulate(body, consts, group, r):
    """acc[b] += w[v] * sum_a (sum_j C[a, j, b] y[v, j]) g[a] for the r-th edge of a loop step."""
    if r == 0:
        body.comment("acc[b] += w[v] * sum_a (sum_j C[a, j, b] y[v, j]) g[a], the CG block's nonzeros unrolled.")
    for t in group:
        for v in range(t.mul2):
            by_b = defaultdict(lambda: defaultdict(list))
            for a, j, b, c in t.nonzeros:
                by_b[b][a].append((consts(c), f"y{t.y_off + v * t.y_d + j}_{r}"))
            for b, by_a in sorted(by_b.items()):
                parts = [f"({codegen.linear_combination(pairs)}) * g{t.in_off + a}_{r}"
                         for a, pairs in sorted(by_a.items())]
                body(f"acc{t.out_off + b} += w{t.w_off + v}_{r} * ({' + '.join(parts)})")


def _aggregate_source(terms, block, mode, strides, accumulate=True, edge="", about="", split=False,
                      table_weights=False) -> str:
    """mode: 'csr' (rows own contiguous edges), 'csr_perm' (rows own edges listed by perm), 'atomic'.

    ``edge`` (a subset of 'wyrs'; transposed terms, mode 'csr_perm': the backward's sender walk) also writes those
    per-edge gradients (:mod:`fastmlip.kernels.conv_edge_grads`), reusing the loads of the x-gradient and the row's
    x block, loaded once per program; ``accumulate`` False drops the x-gradient itself. ``split`` (row-owned modes):
    ``num_parts`` programs share a row, each walking ``num_chunk`` of its edges (the last one the rest), and each
    stores its own partial row of ``out`` [num_parts, rows, ...] (summed by the caller). ``table_weights``
    (row-owned modes): the weights are interpolated from a radial table at each edge's length, not loaded.
    """
    in_stride, out_stride, y_stride, w_stride = strides
    n_cb = _n_channel_blocks(terms, block)
    src, consts = codegen.Source(), codegen.Constants()
    args = ["inp", "y", "w", "gather", "scatter", "ptr", "perm", "out"]
    args += ["node", "gy", "gw"] if mode == "csr_perm" else []
    table_reads = ("w" if table_weights else "") + "".join(name for name in "rs" if name in edge)
    table = bool(table_reads)
    args += ["num_edges"] + (["num_parts", "num_chunk"] if split else [])
    args += conv_edge_grads.TABLE_ARGS if table else []
    args += ["EPP: tl.constexpr", "DT: tl.constexpr"] + (conv_edge_grads.TABLE_CONSTEXPRS if table else [])
    codegen.jit_header(src, "aggregate", args, about=about, imports=[conv_edge_grads.TABLE_IMPORT] if table else [])
    body = codegen.Source()
    body.depth = 1
    out_row = "row"
    if mode == "atomic":
        body.comment("Each program owns EPP edges (in any order) and one channel block; each edge's contribution "
                     "is added atomically to its row.")
        body("start = tl.program_id(0).to(tl.int64) * EPP")
        body("end = tl.minimum(start + EPP, num_edges)")
    elif split:
        body.comment("num_parts programs share one row (and one channel block): part k walks the row's edges "
                     "from k * num_chunk on, num_chunk of them (the last part all the rest), with the sums in "
                     "registers, and stores its partial row once at the end (no atomics). The parts' bounds sit at "
                     "fixed offsets from the row's start, so absent edges (sorted last) change no part's sum.")
        body("row = tl.program_id(0).to(tl.int64) // num_parts")
        body("part = tl.program_id(0).to(tl.int64) % num_parts")
        body("row_start = tl.load(ptr + row).to(tl.int64)")
        body("row_end = tl.load(ptr + row + 1).to(tl.int64)")
        body("start = tl.minimum(row_start + part * num_chunk, row_end)")
        body("end = tl.where(part == num_parts - 1, row_end, tl.minimum(start + num_chunk, row_end))")
        out_row = "(part * (tl.num_programs(0) // num_parts) + row)"
    else:
        body.comment("Each program owns one row and one channel block: it walks the row's edges ptr[row] to "
                     "ptr[row + 1] with the sums in registers and stores once at the end (no atomics).")
        body("row = tl.program_id(0).to(tl.int64)")
        body("start = tl.load(ptr + row).to(tl.int64)")
        body("end = tl.load(ptr + row + 1).to(tl.int64)")
    first = 0
    for gi, (mul, group) in enumerate(_groups(terms)):
        nb = _blocks(mul, block)
        body(f"{'if' if gi == 0 else 'elif'} blk < {first + nb}:")
        with body.indent():
            body.comment(f"Paths of {mul} channels (channel blocks {first} to {first + nb - 1}): they share each "
                         "edge's loads.")
            body(f"u = (blk - {first}) * {block} + lane")
            body(f"m = u < {mul}")
            outs = sorted({(t.out_off, t.out_d, b) for t in group for _, _, b, _ in t.nonzeros})
            if edge:
                body.comment("The row's own x block, loaded once for every edge's gradients.")
            for off, d, b in outs if edge else ():
                body(f"n{off + b} = tl.load(node + row * {out_stride} + {off + b} + u * {d}, mask=m, other=0.0)")
            unroll, stages, lanes = (1, 0, 1) if mode == "atomic" else _edge_loop_settings(mode == "csr_perm")
            if accumulate and mode != "atomic":
                tile = f"[{lanes}, {block}]" if lanes > 1 else f"[{block}]"
                for off, _, b in outs:
                    body(f"acc{off + b} = tl.zeros({tile}, DT)")
            step = unroll * lanes
            loop = f"tl.range(start, end, {step}, num_stages={stages})" if stages else f"range(start, end, {step})"
            if unroll > 1:
                body.comment(f"{unroll} edge slots per step, every load first: their latencies overlap.")
            if lanes > 1:
                body.comment(f"A slot is {lanes} consecutive edges, one per row of the tile (their warps run side by "
                             "side); the rows are summed once, after the loop.")
            body(f"for p in {loop}:")
            with body.indent():
                for r in range(unroll):
                    _emit_edge_loads(body, group, r, mode, in_stride, y_stride, w_stride, lanes,
                                     load_y=accumulate or any(name in edge for name in "wrs"),
                                     load_w=accumulate or "y" in edge, table_reads=table_reads)
                if mode == "atomic":
                    for off, _, b in outs:
                        body(f"acc{off + b} = tl.zeros([{block}], DT)")
                for r in range(unroll):
                    if accumulate:
                        _emit_accumulate(body, consts, group, r)
                    if edge:
                        conv_edge_grads.emit(body, consts, group, r, edge, block, strides, n_cb, lanes)
                if mode == "atomic":
                    body(f"s_row = out + tl.load(scatter + e_0).to(tl.int64) * {out_stride}")
                    for off, d, b in outs:
                        body(f"tl.atomic_add(s_row + {off + b} + u * {d}, acc{off + b}, mask=m)")
            if accumulate and mode != "atomic":
                for off, d, b in outs:
                    total = f"tl.sum(acc{off + b}, 0)" if lanes > 1 else f"acc{off + b}"
                    body(f"tl.store(out + {out_row} * {out_stride} + {off + b} + u * {d}, {total}, mask=m)")
        first += nb
    with src.indent():
        src.comment(f"Channels across {block} lanes; program axis 1 is the channel block, which picks the "
                    "group of paths below.")
        src(f"lane = tl.arange(0, {block})")
        if mode != "atomic" and settings().conv_edge_lanes > 1:
            src(f"edge_lane = tl.arange(0, {settings().conv_edge_lanes})[:, None]")
        src("blk = tl.program_id(1)")
        consts.emit(src)
    src.lines.extend(body.lines)
    return src.text()


def _edge_source(terms, block, want_y, want_w, dims, about="") -> str:
    """Per-edge gradients: gy[e, v, j] = sum_u w[u,v] s_j[u], gw[e, u, v] = sum_j y[v, j] s_j[u], where
    s_j[u] = path_weight * sum_{i,k} C[i,j,k] x[src, u, i] grad_out[dst, u, k]."""
    dim_in1, dim_in2, dim_out, n_w = dims
    src, consts = codegen.Source(), codegen.Constants()
    codegen.jit_header(src, "edge_grads", ["x", "y", "w", "g", "src", "dst", "gy", "gw", "num_edges",
                                           "EPP: tl.constexpr", "DT: tl.constexpr"], about=about)
    body = codegen.Source()
    body.depth = 1
    body.comment("Each program owns EPP edges (in any order); per edge it loops over every channel block, so "
                 "each edge's gradients are written once, by this program.")
    body("start = tl.program_id(0).to(tl.int64) * EPP")
    body("end = tl.minimum(start + EPP, num_edges)")
    body("for e in range(start, end):")
    with body.indent():
        body(f"x_row = x + tl.load(src + e).to(tl.int64) * {dim_in1}")
        body(f"g_row = g + tl.load(dst + e).to(tl.int64) * {dim_out}")
        body(f"y_row = y + e * {dim_in2}")
        body(f"w_row = w + e * {n_w}")
        if want_w:
            for idx in range(dim_in2):
                body(f"y{idx} = tl.load(y_row + {idx})")
        if want_y:
            for idx in range(dim_in2):
                body(f"q{idx} = tl.zeros([{block}], DT)")
        body.comment("s_j[u] = sum C x[src, u] grad_out[dst, u] per path; gy sums w * s over the channels in "
                     "registers, gw is y . s per channel.")
        for mul, group in _groups(terms):
            body(f"for cb in range(0, {_blocks(mul, block)}):")
            with body.indent():
                body(f"u = cb * {block} + lane")
                body(f"m = u < {mul}")
                load_x, load_g = _Loads(body, "x", "x_row"), _Loads(body, "g", "g_row")
                for ti, t in enumerate(group):
                    js = conv_edge_grads.path_sums(body, consts, t, ti, lambda i, k, t=t: (
                        f"{load_x(t.in_off, t.in_d, i)} * {load_g(t.out_off, t.out_d, k)}"))
                    for v in range(t.mul2):
                        if want_y:
                            body(f"wv = tl.load(w_row + {t.w_off + v} + u * {t.mul2}, mask=m, other=0.0)")
                            for j in js:
                                body(f"q{t.y_off + v * t.y_d + j} += wv * s{ti}_{j}")
                        if want_w:
                            dot = " + ".join(f"y{t.y_off + v * t.y_d + j} * s{ti}_{j}" for j in js)
                            dot = dot or f"tl.zeros([{block}], DT)"
                            body(f"tl.store(gw + e * {n_w} + {t.w_off + v} + u * {t.mul2}, {dot}, mask=m)")
        if want_y:
            for idx in range(dim_in2):
                body(f"tl.store(gy + e * {dim_in2} + {idx}, tl.sum(q{idx}, 0))")
    with src.indent():
        src.comment(f"Channels across {block} lanes.")
        src(f"lane = tl.arange(0, {block})")
        consts.emit(src)
    src.lines.extend(body.lines)
    return src.text()


def _check_supported(problem: TensorProductProblem) -> None:
    for p in problem.paths:
        if p.mode != "uvu" or not p.has_weight:
            raise ValueError(f"Triton fused conv supports weighted 'uvu' paths only, got {p.mode!r} in {problem}")
        if p.weight_shape[1] > MAX_MUL_IN2:
            raise ValueError(f"Triton fused conv unrolls the edge-attribute multiplicity and supports at most "
                             f"{MAX_MUL_IN2}; {problem} has a path with {p.weight_shape[1]}")


_PLANS: dict = {}


def _row_owned(variant: str) -> bool:
    return not (variant.startswith("edge") or variant.endswith("atomic"))


def _edge_loop_settings(sender: bool) -> tuple:
    """(unroll, stages, edge lanes) of the row-owned kernels' edge loop (``sender``: the backward's walk)."""
    tuning = settings()
    unroll = tuning.conv_backward_unroll if sender and tuning.conv_backward_unroll else tuning.conv_unroll
    return unroll, tuning.conv_stages, tuning.conv_edge_lanes


def _edge_loop(variant: str, separator: str) -> str:
    """The row-owned kernels' edge-loop settings as part of a name ("" for the per-edge and atomic kernels)."""
    if not _row_owned(variant):
        return ""
    unroll, stages, lanes = _edge_loop_settings(variant.startswith("sender"))
    return f"{separator}u{unroll}{separator}s{stages}" + (f"{separator}l{lanes}" if lanes > 1 else "")


_ABOUT = {
    "fwd_csr": "out[n] = sum over the edges into n of TP(x[src], y, w); rows own their edges (sorted by dst)",
    "fwd_atomic": "out[dst] += TP(x[src], y, w) per edge, atomically (edges in any order)",
    "gx_atomic": "grad_x[src] += TP^T(grad_out[dst], y, w) per edge, atomically (edges in any order)",
    "sender": "the backward walked by source node (edges sorted by src): grad_x, and per edge grad_y / grad_w",
    "fwdt_csr": "out[n] = sum over the edges into n of TP(x[src], y, w), w read from a radial table at the edge's "
                "length; rows own their edges (sorted by dst)",
    "sendert": "the backward walked by source node, weights read from a radial table: grad_x, and per edge grad_y "
               "and d/dr",
    "edge": "per-edge gradients grad_y / grad_w (edges in any order)",
}


def _kernel(problem, variant, block):
    """The kernel for (problem, variant): its source is generated once per process and setting."""
    dims = (problem.dim_in1, problem.dim_in2, problem.dim_out, problem.weight_numel)
    split = variant.endswith("_split")
    base = variant.removesuffix("_split")
    about = f"{problem} [{variant}]: {_ABOUT.get(base) or _ABOUT[base.split('_')[0]]}"
    about += "; a row's edges shared by several programs" if split else ""
    if variant.startswith("edge"):
        return codegen.load_module(f"{problem.key}_{variant}_b{block}", lambda: _edge_source(
            _terms(problem, False), block, "y" in variant[5:], "w" in variant[5:], dims, about)).edge_grads
    # fwd_csr, fwd_atomic, gx_atomic, sender_<wanted subset of "xywrs">; fwdt_csr, sendert_...: weights from a table
    kind, rest = base.split("_", 1)
    table_weights = kind in ("fwdt", "sendert")
    kind = kind.removesuffix("t") if table_weights else kind
    sender = kind == "sender"
    mode = "csr_perm" if sender else rest
    transpose = kind != "fwd"
    in_stride, out_stride = (problem.dim_out, problem.dim_in1) if transpose else (problem.dim_in1, problem.dim_out)
    strides = (in_stride, out_stride, problem.dim_in2, problem.weight_numel)
    return codegen.load_module(f"{problem.key}_{variant}_b{block}{_edge_loop(variant, '_')}", lambda: _aggregate_source(
        _terms(problem, transpose), block, mode, strides, accumulate=not sender or "x" in rest,
        edge=rest.replace("x", "") if sender else "", about=about, split=split,
        table_weights=table_weights)).aggregate


def _launch(problem, variant, grid, args, dtype, block, constexprs=None):
    kernel = _kernel(problem, variant, block)
    warps = _warps(block, settings().conv_edge_lanes if _row_owned(variant) else 1)
    label = f"{problem.key}/{variant}/b{block}{_edge_loop(variant, '/')}/w{warps}/{dtype_name(dtype)}"
    first = label not in COMPILE_SECONDS
    t0 = time.perf_counter()
    compiled = kernel[grid](*args, EPP=settings().conv_edges_per_program, DT=tl_dtype(dtype), num_warps=warps,
                            **(constexprs or {}))
    if first:
        if args[0].is_cuda:
            torch.cuda.synchronize(args[0].device)
        COMPILE_SECONDS[label] = time.perf_counter() - t0
        RESOURCES[label] = (getattr(compiled, "n_regs", None), getattr(compiled, "n_spills", None))


def compile_report() -> dict:
    """Seconds each kernel's first call took (code generation + Triton compile + one run), by kernel label."""
    return dict(COMPILE_SECONDS)


def resource_report() -> dict:
    """(registers per thread, spilled bytes) of each compiled kernel, by kernel label (None in the interpreter)."""
    return dict(RESOURCES)


def _covers(terms, dim: int) -> bool:
    """Whether the terms' outputs cover every column (else uncovered columns must start at zero)."""
    covered = {t.out_off + u * t.out_d + b for t in terms for u in range(t.mul) for _, _, b, _ in t.nonzeros}
    return len(covered) == dim


def _n_channel_blocks(terms, block):
    return sum(_blocks(mul, block) for mul, _ in _groups(terms))


def _plan(problem, kind, out_dim):
    """(block, channel blocks, whether the kernel writes every output column), computed once per problem."""
    block = _block_size(problem)
    key = (problem.key, kind, block)
    if key not in _PLANS:
        terms = _terms(problem, kind == "gx")
        _PLANS[key] = (block, _n_channel_blocks(terms, block), _covers(terms, out_dim))
    return _PLANS[key]


def _split_parts(num_rows: int) -> int:
    """Programs per row of the row-owned kernels: 0 where rows are never split (the kernels without the split),
    else ``conv_split_parts`` below ``conv_split_rows`` rows and 1 above (one kernel for every size: what the dry
    run before the first step records is what every later step launches)."""
    tuning = settings()
    if not tuning.conv_split_rows:
        return 0
    return tuning.conv_split_parts if num_rows < tuning.conv_split_rows else 1


def _launch_rows(problem, variant, parts, num_rows, n_cb, args, dtype, block, tail=(), constexprs=None) -> None:
    """A row-owned kernel: one program per (row, channel block), or with ``parts`` (:func:`_split_parts`) that many
    per row through the split kernel, whose output holds ``parts`` partial rows (:func:`_split_sum`). ``tail``:
    the arguments after the sizes."""
    if parts:
        _launch(problem, f"{variant}_split", (num_rows * parts, n_cb),
                args + (parts, settings().conv_split_edges) + tail, dtype, block, constexprs)
    else:
        _launch(problem, variant, (num_rows, n_cb), args + tail, dtype, block, constexprs)


def _split_sum(out: torch.Tensor, parts: int) -> torch.Tensor:
    """The rows of a row-owned kernel's output: with ``parts``, its [parts * rows, ...] partial rows added in a
    fixed order."""
    if parts <= 1:
        return out
    return out.view(parts, -1, out.shape[1]).sum(0)


def _aggregate(problem, kind, inp, y, w, gather, scatter, ptr, num_rows, out_dim):
    block, n_cb, covers = _plan(problem, kind, out_dim)
    n_edges = y.shape[0]
    dummy = gather
    if ptr is not None:
        parts = _split_parts(num_rows)
        out = new_output((max(parts, 1) * num_rows, out_dim), inp, written_everywhere=covers)
        if num_rows and n_cb:
            _launch_rows(problem, f"{kind}_csr", parts, num_rows, n_cb, (inp, y, w, gather, dummy, ptr, dummy, out,
                                                                          n_edges), inp.dtype, block)
        return _split_sum(out, parts)
    out = inp.new_zeros(num_rows, out_dim)
    if n_edges and n_cb:
        grid = (-(-n_edges // settings().conv_edges_per_program), n_cb)
        _launch(problem, f"{kind}_atomic", grid, (inp, y, w, gather, scatter, dummy, dummy, out, n_edges),
                inp.dtype, block)
    return out


def forward(problem, x, edge_attr, w, src, dst, dst_ptr, num_nodes):
    """out[n] = sum over edges into n of TP(x[src], edge_attr, w); deterministic when ``dst_ptr`` is given."""
    _check_supported(problem)
    tl_dtype(x.dtype)
    x, edge_attr, w = x.contiguous(), edge_attr.contiguous(), w.contiguous()
    if _few_rows(num_nodes):
        dst_ptr = None
    return _aggregate(problem, "fwd", x, edge_attr, w, src, dst, dst_ptr, num_nodes, problem.dim_out)


def _table_arguments(table) -> tuple:
    """The trailing arguments and the constexprs of a kernel that reads ``table`` (lengths, values, segments,
    scale or None)."""
    lengths, values, segments, scale = table
    return ((lengths, values, segments.contiguous(), lengths if scale is None else scale, values.shape[0]),
            {"SEGMENTS": segments.shape[1], "SCALED": scale is not None})


def _few_rows(num_nodes: int) -> bool:
    """Whether receiver- and sender-owned programs would be too few here (``conv_atomic_rows``)."""
    return num_nodes < settings().conv_atomic_rows


def _sender_backward(problem, grad_out, x, y, w, dst, src_perm, src_ptr, want, table=None, table_weights=False):
    """The ``want``ed gradients (a subset of 'xywrs') in one walk per (source node, channel block) over the node's
    edges: x[row] is loaded once, grad_out[dst], y and w once per edge, and each (edge, channel) of gw belongs to
    one program (no atomics). 'r' and 's' (d/dr and d/d scale of weights w = scale * f(r) read from ``table``,
    (lengths, values, segments, scale or None)) take the place of gw; with ``table_weights`` the walk reads the
    weights from there too (``w`` is not read). What sums over channels comes as one
    partial row per channel block (:func:`fastmlip.kernels.conv_edge_grads.partial_columns`), added up here in a
    fixed order (deterministic). Returns (gx, those sums [E, columns], gw); unwanted ones empty."""
    block, n_cb, covers = _plan(problem, "gx", problem.dim_in1)
    n_nodes, n_edges = x.shape[0], y.shape[0]
    parts = _split_parts(n_nodes)
    per_edge = want.replace("x", "").replace("w", "")
    width = conv_edge_grads.partial_columns(per_edge, problem.dim_in2)["width"]
    gx = new_output((max(parts, 1) * n_nodes, x.shape[1]), x, written_everywhere=covers) if "x" in want \
        else x.new_empty(0)
    partial = new_output((n_edges, n_cb, width), y) if width else y.new_empty(0)
    gw = new_output(w.shape, w) if "w" in want else w.new_empty(0)
    tail, constexprs = _table_arguments(table) if table is not None else ((), None)
    if n_cb and (("x" in want and n_nodes) or (n_edges and want.replace("x", ""))):
        variant = ("sendert_" if table_weights else "sender_") + "".join(name for name in "xywrs" if name in want)
        _launch_rows(problem, variant, parts, n_nodes, n_cb,
                     (grad_out, y, x if table_weights else w, dst, dst, src_ptr, src_perm, gx if "x" in want else x, x,
                      partial if width else x, gw if "w" in want else x, n_edges), x.dtype, block, tail, constexprs)
    return _split_sum(gx, parts) if "x" in want else gx, partial.sum(1) if width else partial, gw


def _fused_backward_fits(problem) -> bool:
    """Whether one sender walk can also make gy/gw without spilling: each lane holds a group's gathered grad_out
    components next to x, w and the accumulators. Measured on an H100: mace-large (71 gathered) runs 1.7x faster
    fused, nequip-benzene (312, 354 B spilled) 1.6x slower, so above ``MAX_FUSED_GATHER`` gy/gw get their own
    per-edge kernel."""
    key = (problem.key, "fits")
    if key not in _PLANS:
        _PLANS[key] = all(len({(t.in_off, a) for t in group for a, _, _, _ in t.nonzeros}) <= MAX_FUSED_GATHER
                          for _, group in _groups(_terms(problem, True)))
    return _PLANS[key]


def _edge_backward(problem, x, edge_attr, w, grad_out, src, dst, want_y, want_w):
    """gy, gw by a per-edge kernel that gathers x[src] and grad_out[dst] (any edge order)."""
    gy = new_output(edge_attr.shape, edge_attr) if want_y else x.new_empty(0)
    gw = new_output(w.shape, w) if want_w else x.new_empty(0)
    n_edges = edge_attr.shape[0]
    if n_edges and (want_y or want_w):
        variant = "edge_" + ("y" if want_y else "") + ("w" if want_w else "")
        _launch(problem, variant, (-(-n_edges // settings().conv_edges_per_program),),
                (x, edge_attr, w, grad_out, src, dst, gy if want_y else x, gw if want_w else x, n_edges),
                x.dtype, _block_size(problem))
    return gy, gw


def _sender_walk(x, src_perm, src_ptr) -> bool:
    """Whether the backward can walk the edges by source node (they come sorted so, and rows are not too few)."""
    return src_perm is not None and src_ptr is not None and not _few_rows(x.shape[0])


def backward(problem, grad_out, x, edge_attr, w, src, dst, dst_ptr, src_perm, src_ptr, want):
    """(gx, gy, gw) of <grad_out, forward(...)>; deterministic when ``src_perm``/``src_ptr`` are given (one fused
    sender-owned kernel, or for very wide problems a sender-owned gx and a per-edge gy/gw kernel), else an atomic
    x-gradient and the per-edge kernel."""
    _check_supported(problem)
    tl_dtype(x.dtype)
    grad_out, x, edge_attr, w = (t.contiguous() for t in (grad_out, x, edge_attr, w))
    if _sender_walk(x, src_perm, src_ptr):
        if _fused_backward_fits(problem) or not (want[1] or want[2]):
            wanted = "".join(name for name, flag in zip("xyw", want) if flag)
            return _sender_backward(problem, grad_out, x, edge_attr, w, dst, src_perm, src_ptr, wanted)
        gx = _sender_backward(problem, grad_out, x, edge_attr, w, dst, src_perm, src_ptr, "x")[0] if want[0] \
            else x.new_empty(0)
    elif want[0]:
        gx = _aggregate(problem, "gx", grad_out, edge_attr, w, dst, src, None, x.shape[0], problem.dim_in1)
    else:
        gx = x.new_empty(0)  # distinct: a custom op's outputs may not alias each other
    return (gx, *_edge_backward(problem, x, edge_attr, w, grad_out, src, dst, want[1], want[2]))
