"""Triton kernels for MACE's symmetric contraction, generated per problem with the U nonzeros baked in.

Per output irrep (a "contraction") and channel, MACE's einsum chain is a polynomial in the node's features x:
    out[m] = sum_nu sum_{i_1..i_nu, p} U_nu[m, i_1..i_nu, p] W_nu[species, p] x_{i_1} ... x_{i_nu}
Because x_{i_1} ... x_{i_nu} is symmetric, U's nonzeros are folded onto sorted index tuples (monomials), which
halves the work for correlation 3. The kernels never build MACE's [N, C, M, L, L] intermediates: one program
owns a chunk of nodes of ONE species (nodes sorted by species, see :func:`.launch.species_chunks`) and a block of
channels (across lanes), loads that species' weights once, and evaluates the polynomial in registers node by node:

* forward: grid (chunk, channel block); out written by its owner, no atomics.
* x-gradient: grid (chunk, channel block); each node's gradient written by its owner.
* weight gradient: grid (chunk, channel block); per-chunk sums in registers, one atomic add each.

Each contraction's polynomial is cut into pieces (:func:`pieces`), one kernel each, launched in order; a piece
after the first adds to what the earlier ones stored. Small kernels compile in parallel (a whole MACE
contraction as one kernel took 21 s to compile) and the extra passes over x cost microseconds.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from ..descriptors import SymmetricContractionProblem
from . import codegen
from .launch import new_output, settings, species_chunks, tl_dtype


def _block_size(num_features: int) -> int:
    return max(1, min(settings().sc_block, 1 << (num_features - 1).bit_length()))


def polynomial(problem: SymmetricContractionProblem, index: int) -> dict:
    """{(nu, monomial): {(m, p): coefficient}} for contraction ``index``: U folded onto sorted index tuples."""
    spec, big_l = problem.contractions[index], problem.coupling_dim
    out = {}
    for nu, u in enumerate(spec.u_matrices, start=1):
        if not u.values:
            continue
        shape = (spec.ir_dim,) + (big_l,) * nu + (spec.num_params(nu),)
        folded = defaultdict(float)
        for flat, value in zip(u.flat_index, u.values):
            idx = np.unravel_index(flat, shape)
            folded[(tuple(sorted(int(i) for i in idx[1:1 + nu])), int(idx[0]), int(idx[-1]))] += value
        scale = max(abs(v) for v in u.values)
        for (mono, m, p), value in sorted(folded.items()):
            if abs(value) > 1e-14 * scale:
                out.setdefault((nu, mono), {})[(m, p)] = value
    return out


class _Monomials:
    """Emit products of x components once per node, reusing shorter products (x_i x_j before x_i x_j x_k)."""

    def __init__(self, src):
        self.src, self.seen = src, set()

    def __call__(self, mono: tuple) -> str:
        if len(mono) == 1:
            return f"x{mono[0]}"
        name = "x" + "_".join(str(i) for i in mono)
        if name not in self.seen:
            self.seen.add(name)
            self.src(f"{name} = {self(mono[:-1])} * x{mono[-1]}")
        return name


def _weight_ptrs(problem):
    return [f"w{t}" for t in range(len(problem.weight_names))]


def _weight_index(problem, index: int, nu: int) -> int:
    return sum(c.correlation for c in problem.contractions[:index]) + nu - 1


def _prologue(body, problem, block):
    body.comment(f"Each program owns one chunk of nodes of ONE species (starts[chunk]..starts[chunk+1] in "
                 f"species order) and {block} channels, one per lane.")
    body(f"lane = tl.arange(0, {block})")
    body("chunk = tl.program_id(0)")
    body(f"c = tl.program_id(1) * {block} + lane")
    body(f"cm = c < {problem.num_features}")
    body("start = tl.load(starts + chunk)")
    body("end = tl.load(starts + chunk + 1)")
    body("s = tl.load(species + tl.minimum(start, num_nodes - 1)).to(tl.int64)")


def _load_weights(body, problem, index, poly):
    """Load the species' weights this contraction's polynomial uses (once per chunk)."""
    used = sorted({(nu, p) for (nu, _), terms in poly.items() for _, p in terms})
    c_dim = problem.num_features
    body.comment("The species' weights this polynomial uses: loaded once, kept in registers for every node.")
    for nu, p in used:
        t = _weight_index(problem, index, nu)
        params = problem.contractions[index].num_params(nu)
        body(f"W{nu}_{p} = tl.load(w{t} + s * {params * c_dim} + {p * c_dim} + c, mask=cm, other=0.0)")


def _load_x(body, problem, poly):
    used = sorted({i for (_, mono) in poly for i in mono})
    big_l = problem.coupling_dim
    body("node = tl.load(order + i).to(tl.int64)")
    body.comment("This node's x components (the ones the polynomial reads), one register each per channel.")
    body(f"x_row = x + node * {problem.num_features * big_l} + c * {big_l}")
    for i in used:
        body(f"x{i} = tl.load(x_row + {i}, mask=cm, other=0.0)")


def _out_offsets(problem):
    offs, o = [], 0
    for spec in problem.contractions:
        offs.append(o)
        o += problem.num_features * spec.ir_dim
    return offs


# NOTE: MACE-MP-0-medium's 1o contraction has 1638 terms; as one kernel its x-gradient took 21 s to compile (one
# core, Triton 3.9), longer than a whole cold start may take. Pieces of at most this many terms compile in parallel
# in 2-4 s each; each extra piece re-reads x and read-modify-writes its output, a few microseconds at 4000 atoms.
PIECE_TERMS = 400

_PIECES: dict = {}


def pieces(problem, index: int) -> list:
    """Contraction ``index``'s polynomial cut into consecutive runs of monomials of at most ``PIECE_TERMS``
    terms each (at least one piece, possibly empty): each piece is a kernel of its own."""
    key = (problem.key, index, PIECE_TERMS)
    if key not in _PIECES:
        runs, run, size = [], {}, 0
        for mono, terms in polynomial(problem, index).items():
            if run and size + len(terms) > PIECE_TERMS:
                runs.append(run)
                run, size = {}, 0
            run[mono] = terms
            size += len(terms)
        _PIECES[key] = runs + [run] if run or not runs else runs
    return _PIECES[key]


def forward_source(problem, block, index: int, piece: int) -> str:
    """out[:, contraction index] = its polynomial, or += this piece of it (piece > 0)."""
    src, consts, body = codegen.Source(), codegen.Constants(), codegen.Source()
    codegen.jit_header(src, "sc_forward", ["x", "species", "order", "starts", *_weight_ptrs(problem), "out",
                                           "num_nodes", "DT: tl.constexpr"],
                       about=f"{problem}, output irrep {index}, piece {piece}: "
                       f"{'out = ' if piece == 0 else 'out += '}its polynomial in x")
    body.depth = 1
    _prologue(body, problem, block)
    spec, poly = problem.contractions[index], pieces(problem, index)[piece]
    _load_weights(body, problem, index, poly)
    body.comment("Node by node: each monomial of x once, then its terms added to the output components.")
    body("for i in range(start, end):")
    with body.indent():
        _load_x(body, problem, poly)
        row = f"out + node * {problem.dim_out} + {_out_offsets(problem)[index]} + c * {spec.ir_dim}"
        for m in range(spec.ir_dim):
            body(f"acc{m} = tl.zeros([{block}], DT)" if piece == 0 else
                 f"acc{m} = tl.load({row} + {m}, mask=cm, other=0.0)")
        monos = _Monomials(body)
        for (nu, mono), terms in poly.items():
            value = monos(mono)
            by_m = defaultdict(list)
            for (m, p), v in terms.items():
                by_m[m].append((consts(v), f"W{nu}_{p}"))
            for m, pairs in sorted(by_m.items()):
                body(f"acc{m} += ({codegen.linear_combination(pairs)}) * {value}")
        for m in range(spec.ir_dim):
            body(f"tl.store({row} + {m}, acc{m}, mask=cm)")
    with src.indent():
        consts.emit(src)
    src.lines.extend(body.lines)
    return src.text()


def grad_x_source(problem, block, index: int, piece: int) -> str:
    """d out / d x of one piece: per monomial, t = sum_m g_m sum_p U W_p, spread over its factors by the
    product rule. The first piece of the first contraction writes every component of grad_x, later pieces add
    to the components they touch."""
    src, consts, body = codegen.Source(), codegen.Constants(), codegen.Source()
    big_l = problem.coupling_dim
    codegen.jit_header(src, "sc_grad_x", ["x", "species", "order", "starts", *_weight_ptrs(problem), "grad_out",
                                          "grad_x", "num_nodes", "DT: tl.constexpr"],
                       about=f"{problem}, output irrep {index}, piece {piece}: its share of d out / d x")
    body.depth = 1
    _prologue(body, problem, block)
    first = index == 0 and piece == 0
    spec, poly = problem.contractions[index], pieces(problem, index)[piece]
    touched = sorted({k for (_, mono) in poly for k in mono})
    _load_weights(body, problem, index, poly)
    body.comment("Node by node: per monomial t = sum_m g_m sum_p U W_p, spread over its factors by the product "
                 "rule; the first piece writes every component of grad_x, later ones add.")
    body("for i in range(start, end):")
    with body.indent():
        if poly:
            _load_x(body, problem, poly)
        else:
            body("node = tl.load(order + i).to(tl.int64)")
        body(f"g_row = grad_out + node * {problem.dim_out} + {_out_offsets(problem)[index]} + c * {spec.ir_dim}")
        for m in sorted({m for terms in poly.values() for m, _ in terms}):
            body(f"g{m} = tl.load(g_row + {m}, mask=cm, other=0.0)")
        gx_row = f"grad_x + node * {problem.num_features * big_l} + c * {big_l}"
        for k in range(big_l) if first else touched:
            body(f"gx{k} = tl.zeros([{block}], DT)" if first else f"gx{k} = tl.load({gx_row} + {k}, mask=cm, other=0.0)")
        monos = _Monomials(body)
        for (nu, mono), terms in poly.items():
            by_m = defaultdict(list)
            for (m, p), v in terms.items():
                by_m[m].append((consts(v), f"W{nu}_{p}"))
            parts = [f"g{m} * ({codegen.linear_combination(pairs)})" for m, pairs in sorted(by_m.items())]
            body(f"t = {' + '.join(parts)}")
            factors = defaultdict(int)
            for a in range(len(mono)):
                factors[(mono[a], mono[:a] + mono[a + 1:])] += 1
            for (k, rest), count in sorted(factors.items()):
                scaled = "t" if count == 1 else f"{consts(float(count))} * t"
                body(f"gx{k} += {scaled}" if not rest else f"gx{k} += {scaled} * {monos(rest)}")
        for k in range(big_l) if first else touched:
            body(f"tl.store({gx_row} + {k}, gx{k}, mask=cm)")
    with src.indent():
        consts.emit(src)
    src.lines.extend(body.lines)
    return src.text()


def grad_w_source(problem, block, index: int, piece: int) -> str:
    """d out / d W_nu[s, p] of one piece: per chunk, sum over its nodes of sum_{m, monomial} g_m U x^monomial;
    one atomic add per weight (pieces add to the same zero-initialised gradient)."""
    src, consts, body = codegen.Source(), codegen.Constants(), codegen.Source()
    c_dim = problem.num_features
    grads = [f"gw{t}" for t in range(len(problem.weight_names))]
    codegen.jit_header(src, "sc_grad_w", ["x", "species", "order", "starts", "grad_out", *grads, "num_nodes",
                                          "DT: tl.constexpr"],
                       about=f"{problem}, output irrep {index}, piece {piece}: its share of d out / d W")
    body.depth = 1
    _prologue(body, problem, block)
    body(f"live = c < tl.where(start < end, {problem.num_features}, 0)")
    spec, poly = problem.contractions[index], pieces(problem, index)[piece]
    used = sorted({(nu, p) for (nu, _), terms in poly.items() for _, p in terms})
    body.comment("One accumulator per weight the piece uses, summed over the chunk's nodes in registers.")
    for nu, p in used:
        body(f"A{nu}_{p} = tl.zeros([{block}], DT)")
    body("for i in range(start, end):")
    with body.indent():
        _load_x(body, problem, poly)
        body(f"g_row = grad_out + node * {problem.dim_out} + {_out_offsets(problem)[index]} + c * {spec.ir_dim}")
        for m in range(spec.ir_dim):
            body(f"g{m} = tl.load(g_row + {m}, mask=cm, other=0.0)")
        monos = _Monomials(body)
        for (nu, mono), terms in poly.items():
            value = monos(mono)
            by_p = defaultdict(list)
            for (m, p), v in terms.items():
                by_p[p].append((consts(v), f"g{m}"))
            for p, pairs in sorted(by_p.items()):
                body(f"A{nu}_{p} += ({codegen.linear_combination(pairs)}) * {value}")
    body.comment("One atomic add per weight and chunk: other chunks of the species add to the same weights.")
    for nu, p in used:
        t = _weight_index(problem, index, nu)
        params = spec.num_params(nu)
        body(f"tl.atomic_add(gw{t} + s * {params * c_dim} + {p * c_dim} + c, A{nu}_{p}, mask=live)")
    with src.indent():
        consts.emit(src)
    src.lines.extend(body.lines)
    return src.text()


_SOURCES = {"forward": (forward_source, "sc_forward"), "grad_x": (grad_x_source, "sc_grad_x"),
            "grad_w": (grad_w_source, "sc_grad_w")}


def _kernel(problem, variant, block, index, piece):
    build, name = _SOURCES[variant]
    module = codegen.load_module(f"{problem.key}_sc_{variant}_c{index}_p{piece}of{PIECE_TERMS}_b{block}",
                                 lambda: build(problem, block, index, piece))
    return getattr(module, name)


def _launch_pieces(problem, variant, grid, args, dtype, block):
    """One launch per (contraction, piece), in order: later pieces add to what earlier ones wrote. Empty pieces
    only launch where they must write zeros (an empty contraction's output, the first x-gradient piece)."""
    for index in range(len(problem.contractions)):
        for piece, poly in enumerate(pieces(problem, index)):
            writes_zeros = variant == "forward" or (variant == "grad_x" and index == piece == 0)
            if not poly and not writes_zeros:
                continue
            _kernel(problem, variant, block, index, piece)[grid](*args, DT=tl_dtype(dtype),
                                                                 num_warps=max(1, min(4, block // 32)))


def _prepared(problem, x, species):
    order, sorted_species, starts = species_chunks(species, problem.num_elements, settings().sc_nodes_per_program)
    block = _block_size(problem.num_features)
    grid = (starts.shape[0] - 1, -(-problem.num_features // block))
    return order, sorted_species, starts, block, grid


def forward(problem: SymmetricContractionProblem, x, species, weights):
    """[N, C, L] features, species [N], weights in ``problem.weight_names`` order -> [N, dim_out]."""
    tl_dtype(x.dtype)
    x, weights = x.contiguous(), [w.contiguous() for w in weights]
    n = x.shape[0]
    out = new_output((n, problem.dim_out), x)
    if n == 0:
        return out
    order, sorted_species, starts, block, grid = _prepared(problem, x, species)
    _launch_pieces(problem, "forward", grid, (x, sorted_species, order, starts, *weights, out, n), x.dtype, block)
    return out


def backward(problem: SymmetricContractionProblem, grad_out, x, species, weights, want_x: bool, want_w: bool):
    """(grad_x or empty, [grad_w or empty per weight]) of <grad_out, forward(x, species, weights)>."""
    tl_dtype(x.dtype)
    grad_out, x, weights = grad_out.contiguous(), x.contiguous(), [w.contiguous() for w in weights]
    n = x.shape[0]
    grad_x = x.new_empty(0)
    grad_ws = [w.new_empty(0) for w in weights]
    if want_x:
        grad_x = new_output(x.shape, x)
    if want_w:
        grad_ws = [torch.zeros_like(w) for w in weights]
    if n == 0:
        return grad_x.zero_() if want_x else grad_x, grad_ws
    order, sorted_species, starts, block, grid = _prepared(problem, x, species)
    if want_x:
        _launch_pieces(problem, "grad_x", grid, (x, sorted_species, order, starts, *weights, grad_out, grad_x, n),
                       x.dtype, block)
    if want_w:
        _launch_pieces(problem, "grad_w", grid, (x, sorted_species, order, starts, grad_out, *grad_ws, n),
                       x.dtype, block)
    return grad_x, grad_ws
