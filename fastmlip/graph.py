"""Edge bookkeeping shared by ops, patches and faces: edge vectors, sorting by receiver and CSR offsets."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SortedEdges:
    """Edges sorted by dst, with what the deterministic kernels need.

    ``order`` maps new edge positions to the caller's edge indices (apply it to per-edge tensors);
    ``dst_ptr`` are CSR offsets by dst; ``src_perm``/``src_ptr`` list the sorted edges grouped by src.
    """

    order: torch.Tensor
    src: torch.Tensor
    dst: torch.Tensor
    dst_ptr: torch.Tensor
    src_perm: torch.Tensor
    src_ptr: torch.Tensor

    def tensors(self) -> tuple:
        """The six tensors in field order (an exported program returns them; ``SortedEdges(*tensors)``)."""
        return self.order, self.src, self.dst, self.dst_ptr, self.src_perm, self.src_ptr


def csr_offsets(sorted_index: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """ptr[n] = first position whose index is >= n; a binary search, so no device->host sync (CUDA graphs)."""
    nodes = torch.arange(num_nodes + 1, dtype=sorted_index.dtype, device=sorted_index.device)
    return torch.searchsorted(sorted_index, nodes).to(torch.int64)


def sort_edges(src: torch.Tensor, dst: torch.Tensor, num_nodes: int, mask=None) -> SortedEdges:
    """The sorts take the narrowest integer keys that hold the node indices: a radix sort makes one digit pass
    over the edges per key byte (on CUDA the sorts were ~8 of a 216-atom MD step's ~260 kernels with int32). A
    symbolic node count (an exported program, one for every size) takes int32 keys: its range of atoms keeps
    ``2 * num_nodes + 1`` within them (see :data:`fastmlip.patches.exported.MAX_ATOMS`).

    ``mask`` ([E], 0 where an edge is absent: a captured step's padding and candidates beyond the cutoff): absent
    edges go last in their receiver's and their sender's group, so every sum meets the present edges grouped the
    same whatever else a step carries (a CUDA graph's padding depends on its capacity: restarts stay bitwise).
    """
    bound = num_nodes if mask is None else 2 * num_nodes + 1
    symbolic = isinstance(num_nodes, torch.SymInt)
    widths = (torch.int32, torch.int64) if symbolic else (torch.int16, torch.int32, torch.int64)
    keys = next(dtype for dtype in widths if bound <= torch.iinfo(dtype).max)
    dst_keys, src_keys = dst.to(keys), src.to(keys)
    if mask is not None:
        absent = (mask == 0).to(keys)
        dst_keys, src_keys = dst_keys * 2 + absent, src_keys * 2 + absent
    order = torch.argsort(dst_keys, stable=True)
    src_s, dst_s = src.index_select(0, order), dst.index_select(0, order)
    src_perm = torch.argsort(src_keys.index_select(0, order), stable=True)
    return SortedEdges(order, src_s, dst_s, csr_offsets(dst_s, num_nodes), src_perm,
                       csr_offsets(src_s.index_select(0, src_perm), num_nodes))


def edge_vectors(positions, cell, edge_i, edge_j, shifts) -> torch.Tensor:
    """``positions[j] - positions[i] + shifts @ cell`` per edge i -> j (ASE's "ijS"), in float64 whatever the
    inputs' dtype, so a model in float32 gets vectors rounded once, not positions rounded first."""
    positions64 = positions.detach().to(torch.float64)
    return (positions64.index_select(0, edge_j) - positions64.index_select(0, edge_i)
            + shifts.to(torch.float64) @ cell.to(torch.float64).reshape(3, 3))


def edge_stress(vectors: torch.Tensor, gradient: torch.Tensor, volume: torch.Tensor) -> torch.Tensor:
    """sym(vectors^T g) / volume with ``g = dE/dvectors``: the stress (dE/d(strain) / V) of an energy that sees
    the positions through the edge vectors only."""
    strain_derivative = vectors.detach().transpose(0, 1) @ gradient
    return 0.5 * (strain_derivative + strain_derivative.transpose(0, 1)) / volume
