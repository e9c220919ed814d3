"""When a step's convolutions must recompute their weights in chunks to fit the device's memory.

A step keeps, per convolution layer, an E x ``weight_numel`` tensor of radial weights for the backward, and the
backward makes one more of the same size: on large systems these are most of the step's memory (docs/memory.md);
none where the convolution's kernels read the weights from a radial table. :func:`chunk_edges_for` compares that
with what the device has free and, where it does not fit with room to spare, returns the chunk size (edges) at
which :func:`fastmlip.chunk_convolutions` keeps every weight tensor small. The faces (calculator, MD engine) ask
before each eager step.
"""
from __future__ import annotations

from typing import Optional

import torch

# Of the free memory, the share the kept radial weights and the backward's gradient of the widest of them may take
# before the convolutions chunk; the rest is for everything else a step holds (features, harmonics, the Verlet list,
# the backward's other transients).
KEEP_SHARE = 0.5
# Of the free memory, the share one chunk's weights and their gradient may take.
CHUNK_SHARE = 0.125
MIN_CHUNK_EDGES = 4096


def convolutions(model) -> list:
    """The fused convolutions of an accelerated model (the modules with a ``chunk_edges`` setting), in order."""
    return [module for module in model.modules() if hasattr(type(module), "chunk_edges")]


def conv_weight_widths(model) -> list:
    """Radial weights per edge that each fused convolution of an accelerated model keeps for its backward, in
    module order: its weight_numel, or 0 where its kernels read the weights from a radial table already built
    (FASTMLIP_RADIAL_TABLE=conv; :func:`fastmlip.patches.e3nn_modules.weights_kept_per_edge`)."""
    from fastmlip.patches.e3nn_modules import weights_kept_per_edge

    return [module.problem.weight_numel if weights_kept_per_edge(module.radial_net) else 0
            for module in convolutions(model)]


def free_bytes(device: torch.device) -> int:
    """Memory a step can still take on ``device``: free on the device plus what torch's allocator holds unused."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def chunk_edges_for(widths, num_edges: int, itemsize: int, available: int) -> Optional[int]:
    """None when keeping every layer's radial weights (``widths``: weight_numel per layer) for ``num_edges`` edges,
    plus the gradient the backward makes of the widest, fits in ``KEEP_SHARE`` of ``available`` bytes; otherwise
    the edges per chunk that keep one chunk's weights and their gradient within ``CHUNK_SHARE`` of it (at least
    ``MIN_CHUNK_EDGES``).

    The gradient counts: MACE-medium-like's second layer (1792 weights per edge) kept 67 GiB of weights at 131k Cu
    atoms, under half of an H200, and its 49 GiB gradient then did not fit."""
    if not any(widths) or num_edges == 0:
        return None
    needed = num_edges * (sum(widths) + max(widths)) * itemsize
    if needed <= KEEP_SHARE * available:
        return None
    per_edge = 2 * max(widths) * itemsize
    return max(MIN_CHUNK_EDGES, int(CHUNK_SHARE * available // per_edge))
