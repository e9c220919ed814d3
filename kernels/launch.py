"""What every kernel family shares at launch time: the settings, the Triton dtype, output tensors, species chunks.

Settings. The ``FASTMLIP_*`` tuning variables are read from the environment once, on first use, into one
:class:`Settings` (:func:`settings`); ``fastmlip info`` lists them. Kernel sources and plans are cached under
names that include the values they depend on, so :func:`use_settings` (tests, tuning sweeps) switches them
cleanly for the duration of a block. ``FASTMLIP_BACKEND`` and ``FASTMLIP_CACHE`` are not tuning: they are read on
every use (:mod:`fastmlip.ops.dispatch`, :func:`fastmlip.kernels.codegen.cache_root`).

Outputs. A kernel that writes every element of an output gets it uninitialised (:func:`new_output`); with
:data:`POISON_OUTPUTS` set (the tests do) it starts as NaN instead, so an element a kernel forgets shows up.

Triton itself is imported only where a launch needs it, so ``fastmlip info`` and the settings work without it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..memo import derived

DOT_PRECISIONS = ("ieee", "tf32x3")
RADIAL_TABLES = ("auto", "off", "edges", "lengths", "conv")
TABLE_GRADIENTS = ("walk", "table")


def _setting(env: str, default, tunes: str):
    return field(default=default, metadata={"env": env, "tunes": tunes})


@dataclass(frozen=True)
class Settings:
    """The tuning variables, by field; each field's metadata names its environment variable and what it tunes."""

    conv_block: int = _setting(
        "FASTMLIP_CONV_BLOCK", 32,
        "channel lanes per fused-convolution program (capped by the widest path's multiplicity)")
    conv_unroll: int = _setting(
        "FASTMLIP_CONV_UNROLL", 2,
        "edges per loop step of the convolution's row-owned kernels: their loads are in flight together (2 "
        "against 1: aggregate 1.3x faster for SevenNet-0 and MACE-medium-like at 216 atoms on an H200)")
    conv_backward_unroll: int = _setting(
        "FASTMLIP_CONV_BACKWARD_UNROLL", 0,
        "edges per loop step of the convolution's sender-side backward (0: as FASTMLIP_CONV_UNROLL). That kernel is "
        "the slowest to compile (SevenNet-0's widest layer, sm_90, Triton 3.6: 7.3 s at 2, 3.0 s at 1, mostly "
        "Triton's coalescing pass), so its unroll bounds a cold start")
    conv_stages: int = _setting(
        "FASTMLIP_CONV_STAGES", 0,
        "software-pipelining depth of the convolution's row-owned edge loop (0: a plain loop)")
    conv_edge_lanes: int = _setting(
        "FASTMLIP_CONV_EDGE_LANES", 1,
        "edges side by side in the convolution's row-owned kernels: a [lanes, channels] tile per edge slot, one "
        "warp per row, summed once per program (more warps per program where rows are few; 1: one edge a slot). "
        "Above 1 a row's sum order depends on where its edges sit, so masked placeholder edges change the last "
        "bits (restarted runs then repeat the uninterrupted one to rounding, not bit for bit)")
    conv_warps: int = _setting(
        "FASTMLIP_CONV_WARPS", 0,
        "warps per convolution program (0: one per 32 channel lanes, 1 to 4)")
    conv_atomic_rows: int = _setting(
        "FASTMLIP_CONV_ATOMIC_ROWS", 0,
        "below this many nodes the convolution runs its edge-chunk kernels (atomic adds) even where edges come "
        "sorted: 216 receivers walking their edges are 216 x channel-block programs of one warp, ~10% occupancy "
        "measured on an H200 (0: never)")
    conv_split_rows: int = _setting(
        "FASTMLIP_CONV_SPLIT_ROWS", 0,
        "below this many rows (receivers, or senders in the backward) the convolution's row-owned kernels share "
        "each row among FASTMLIP_CONV_SPLIT_PARTS programs and add their partial rows after (more warps in flight "
        "where rows are few; 0: never). Parts start at fixed offsets from a row's start, so absent edges, sorted "
        "last, change no bit")
    conv_split_parts: int = _setting(
        "FASTMLIP_CONV_SPLIT_PARTS", 4,
        "programs per row where FASTMLIP_CONV_SPLIT_ROWS splits rows")
    conv_split_edges: int = _setting(
        "FASTMLIP_CONV_SPLIT_EDGES", 12,
        "edges of a row each split part walks (the last part takes the rest)")
    conv_edges_per_program: int = _setting(
        "FASTMLIP_CONV_EDGES_PER_PROGRAM", 4,
        "edges per program of the convolution's per-edge kernels (edge gradients, atomic scatter)")
    sc_block: int = _setting(
        "FASTMLIP_SC_BLOCK", 32,
        "channel lanes per symmetric-contraction program (capped by the channel count)")
    sc_nodes_per_program: int = _setting(
        "FASTMLIP_SC_NODES_PER_PROGRAM", 16,
        "nodes of one species per symmetric-contraction program")
    species_linear_nodes: int = _setting(
        "FASTMLIP_SPECIES_LINEAR_NODES", 16,
        "nodes of one species per species-linear program (the rows of its matmul tile)")
    gate_rows: int = _setting(
        "FASTMLIP_GATE_ROWS", 16,
        "node rows per gate program")
    mlp_rows: int = _setting(
        "FASTMLIP_MLP_ROWS", 32,
        "edges per radial-MLP forward program (64 measured 1.8-2.1x slower at 216 atoms on an H200)")
    mlp_column_groups: int = _setting(
        "FASTMLIP_MLP_COLUMN_GROUPS", 1,
        "programs that share one block of radial-MLP forward rows, each writing a share of the last layer's "
        "columns (more programs in flight where edges are few; each recomputes the hidden layers)")
    mlp_backward_rows: int = _setting(
        "FASTMLIP_MLP_BACKWARD_ROWS", 64,
        "edges per radial-MLP backward program (64 against 32: 1.7x faster for SevenNet-0, 3.5x for "
        "MACE-medium-like at 216 atoms on an H200, where at 32 MACE's used 255 registers a thread and spilled)")
    mlp_fused_max_rows: Optional[int] = _setting(
        "FASTMLIP_MLP_FUSED_MAX_ROWS", None,
        "edges up to which a CUDA radial MLP runs the fused kernels (more: e3nn's own matmuls; unset: no limit)")
    dot_precision: str = _setting(
        "FASTMLIP_DOT_PRECISION", "tf32x3",
        "float32 tl.dot of the radial MLP and the linears: ieee (exact float32) or tf32x3 (tensor cores)")
    radial_table: str = _setting(
        "FASTMLIP_RADIAL_TABLE", "auto",
        "float32 radial MLPs over a Bessel basis read from a table in the edge length (cubic Hermite, knots picked "
        "to 1e-6 of the largest slope) instead of computed: off, edges (the table's kernel walks the edges in "
        "their order), lengths (sorted by length: one sort a pass, table rows shared by neighbouring programs), "
        "conv (the convolution's kernels read the table where they use a weight: no weights in memory) or auto "
        "(conv where the convolution runs as fastmlip's kernels, off on the reference backend)")
    table_gradient: str = _setting(
        "FASTMLIP_TABLE_GRADIENT", "walk",
        "where d/dr of convolution weights read from a radial table (edges, lengths) is made: walk (the "
        "convolution's backward walk "
        "dots each weight gradient with the table's slope where it makes it: no weight gradient in memory, four "
        "table rows a weight read from L2 in the walk's order) or table (the weight gradient stored, then read by "
        "the table's backward in its walking order, where edges sorted by length share rows)")
    linear_rows: int = _setting(
        "FASTMLIP_LINEAR_ROWS", 16,
        "node rows per o3.Linear program (the M of its matmul tile)")
    linear_block: int = _setting(
        "FASTMLIP_LINEAR_BLOCK", 64,
        "output channels per float32 o3.Linear program at most (the N of its matmul tile)")
    linear_k: int = _setting(
        "FASTMLIP_LINEAR_K", 64,
        "input channels per float32 o3.Linear matmul step at most (the K of its matmul tile)")
    linear_warps: int = _setting(
        "FASTMLIP_LINEAR_WARPS", 4,
        "warps per o3.Linear program")
    linear_stack: int = _setting(
        "FASTMLIP_LINEAR_STACK", 1,
        "1: an o3.Linear program takes every component of an l > 0 irrep in one tile (rows x components)")
    radial_block: int = _setting(
        "FASTMLIP_RADIAL_BLOCK", 128,
        "edges per radial-basis program")
    sh_block: int = _setting(
        "FASTMLIP_SH_BLOCK", 128,
        "edges per spherical-harmonics program")
    compile_workers: Optional[int] = _setting(
        "FASTMLIP_COMPILE_WORKERS", None,
        "processes that compile kernels ahead of a run (unset: one per core, at most 32)")

    def __post_init__(self):
        if self.dot_precision not in DOT_PRECISIONS:
            raise ValueError(f"FASTMLIP_DOT_PRECISION={self.dot_precision!r}: expected one of "
                             f"{', '.join(DOT_PRECISIONS)}")
        if self.radial_table not in RADIAL_TABLES:
            raise ValueError(f"FASTMLIP_RADIAL_TABLE={self.radial_table!r}: expected one of {', '.join(RADIAL_TABLES)}")
        if self.table_gradient not in TABLE_GRADIENTS:
            raise ValueError(f"FASTMLIP_TABLE_GRADIENT={self.table_gradient!r}: expected one of "
                             f"{', '.join(TABLE_GRADIENTS)}")
        if self.conv_edge_lanes < 1 or self.conv_edge_lanes & (self.conv_edge_lanes - 1):
            raise ValueError(f"FASTMLIP_CONV_EDGE_LANES={self.conv_edge_lanes!r}: expected a power of two")
        if self.conv_split_parts < 1 or self.conv_split_edges < 1:
            raise ValueError("FASTMLIP_CONV_SPLIT_PARTS and FASTMLIP_CONV_SPLIT_EDGES: expected positive integers")
        if self.mlp_column_groups < 1:
            raise ValueError(f"FASTMLIP_MLP_COLUMN_GROUPS={self.mlp_column_groups!r}: expected a positive integer")
        if self.compile_workers is not None and self.compile_workers < 1:
            raise ValueError(f"FASTMLIP_COMPILE_WORKERS={self.compile_workers!r}: expected a positive integer")


def _parsed(setting: dataclasses.Field, raw: str):
    if setting.name in ("dot_precision", "radial_table", "table_gradient"):
        return raw.lower()
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{setting.metadata['env']}={raw!r}: expected an integer") from None


def read_settings(environ=None) -> Settings:
    """The settings that ``environ`` (default ``os.environ``) asks for; unset or empty variables keep defaults."""
    environ = os.environ if environ is None else environ
    values = {}
    for setting in dataclasses.fields(Settings):
        raw = environ.get(setting.metadata["env"], "").strip()
        if raw:
            values[setting.name] = _parsed(setting, raw)
    return Settings(**values)


_current: Optional[Settings] = None


def settings() -> Settings:
    """The settings in force: read from the environment at first use, then kept (launches are hot paths)."""
    global _current
    if _current is None:
        _current = read_settings()
    return _current


@contextlib.contextmanager
def use_settings(**changes):
    """Within the block, the settings in force with ``changes`` (field names, e.g. ``conv_block=2``)."""
    global _current
    previous = settings()
    _current = dataclasses.replace(previous, **changes)
    try:
        yield _current
    finally:
        _current = previous


def describe_settings() -> list:
    """(variable, value in force, default, what it tunes) per setting, for ``fastmlip info``."""
    current = settings()
    return [(s.metadata["env"], getattr(current, s.name), s.default, s.metadata["tunes"])
            for s in dataclasses.fields(Settings)]


def dot_precision(dtype) -> str:
    """``input_precision`` of float32 ``tl.dot`` in generated kernels (``FASTMLIP_DOT_PRECISION``).

    ieee: exact float32 products on CUDA cores. tf32x3 (the default): three TF32 tensor-core products per fp32
    product, about float32 accuracy at several times the throughput on Hopper; every fp32 model test passes under
    it on an H200 and SevenNet-0 steps take 2.30 instead of 3.41 ms at 216 atoms (docs/md.md). The interpreter
    computes either exactly. float64 is always ieee.
    """
    return settings().dot_precision if dtype == torch.float32 else "ieee"


def product_mode(dtype) -> str:
    """``PRODUCT`` of :func:`fastmlip.kernels.tiles.tile_product`: the float32 ``tl.dot`` precision, or ``fma``
    (broadcast products) for float64."""
    return settings().dot_precision if dtype == torch.float32 else "fma"


_TL_DTYPES = {torch.float32: "float32", torch.float64: "float64"}


def tl_dtype(dtype):
    """The Triton dtype every kernel's ``DT`` constexpr takes; TypeError for anything but float32 and float64."""
    import triton.language as tl

    if dtype not in _TL_DTYPES:
        raise TypeError(f"Triton kernels support float32 and float64, got {dtype}")
    return getattr(tl, _TL_DTYPES[dtype])


def dtype_name(dtype) -> str:
    """``float32`` or ``float64``, for kernel labels."""
    return _TL_DTYPES[dtype]


POISON_OUTPUTS = False  # tests set this: outputs the kernels must fully overwrite start as NaN, not garbage


def new_output(shape, like: torch.Tensor, written_everywhere: bool = True) -> torch.Tensor:
    """An output of ``like``'s dtype and device for a kernel to fill.

    Where the kernel writes every element it starts uninitialised (no fill launch), or NaN while
    :data:`POISON_OUTPUTS` is set; where it writes only some (others must read as zero) it starts as zeros.
    """
    if not written_everywhere:
        return like.new_zeros(shape)
    return like.new_full(shape, float("nan")) if POISON_OUTPUTS else like.new_empty(shape)


def species_chunks(species, num_species: int, chunk: int):
    """Nodes sorted by species and cut into chunks of at most ``chunk`` nodes of one species, without a host sync.

    Returns (order [N] int64, sorted species [N] int64, starts [G + 1] int64): chunk g is sorted positions
    starts[g]..starts[g+1]; G = ceil(N / chunk) + num_species bounds the count, surplus chunks are empty (start N).
    The symmetric contraction and the species-indexed linear give each program one chunk, so it loads ONE
    species' weights. A model passes the same species tensor to every layer, forward and backward: the result is
    kept on that tensor (15 launches per call otherwise, seven calls per MACE step).
    """
    return derived(species, ("species_chunks", num_species, chunk),
                   lambda: _species_chunks(species, num_species, chunk))


def _species_chunks(species, num_species: int, chunk: int):
    n = species.shape[0]
    sorted_species, order = torch.sort(species.long(), stable=True)
    position = torch.arange(n, device=species.device)
    # a chunk opens at the first node of each species run and then every `chunk` nodes within the run
    run_first = torch.searchsorted(sorted_species, sorted_species, right=False)
    opens = ((position - run_first) % chunk) == 0
    chunk_id = torch.cumsum(opens.long(), 0) - 1
    num_chunks = -(-n // chunk) + num_species
    # scatter each opening position to its chunk id; positions that open nothing go to a spare slot past the end
    starts = torch.full((num_chunks + 2,), n, dtype=torch.int64, device=species.device)
    starts.scatter_(0, torch.where(opens, chunk_id, num_chunks + 1), position)
    return order, sorted_species, starts[:num_chunks + 1].contiguous()
