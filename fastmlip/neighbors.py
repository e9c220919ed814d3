"""Neighbour lists in pure torch with exactly ASE's edge set.

An edge ``(i, j, S)`` means that atom ``j`` translated by the integer lattice
shift ``S`` lies within ``cutoff`` of atom ``i``::

    D = positions[j] - positions[i] + S @ cell,   |D| < cutoff,

excluding ``i == j`` with ``S == 0`` unless ``self_interaction``. This is the
meaning of ``ase.neighborlist.neighbor_list("ijS", atoms, cutoff)``, so a model
sees the same graph whether it is fed by ASE or by this module. ``S`` refers to
the positions exactly as given (not wrapped), and is always 0 along
non-periodic axes.

Distances are tested in the dtype of ``positions``; ASE works in float64, so
with float32 input a pair within float32 rounding of the cutoff may differ.

Everything runs on the device of ``positions``. Host syncs are limited to what
sizes the loops and outputs: the cell (3x3), one batch of per-axis statistics,
and the sizes of the image-point, candidate and final edge lists.
"""

from __future__ import annotations

import math

import numpy as np
import torch

# Dense all-pairs beats binning while N * n_points stays below this (measured:
# CPU crossover near 3e4; on an H200 all-pairs still wins at 4000 atoms, where
# launches and syncs, not arithmetic, set the time).
ALL_PAIRS_MAX_CANDIDATES = {"cpu": 1 << 15, "cuda": 1 << 22}
# Cell-list bins are search_radius / BINS_PER_CUTOFF wide: smaller bins, fewer wasted candidates.
BINS_PER_CUTOFF = 2
METHODS = ("auto", "all_pairs", "cell_list")


@torch.no_grad()
def neighbor_list(positions, cell, pbc, cutoff, *, self_interaction=False, method="auto"):
    """Return ``(i, j, S)``: int64 ``[E]``, ``[E]``, ``[E, 3]``, sorted by i, then j, then S.

    Atoms are wrapped into the cell and their periodic images within reach of
    the cell are listed as extra points. ``method`` then picks how candidate
    (atom, point) pairs are found: ``"all_pairs"`` (dense, cheap for small
    systems), ``"cell_list"`` (O(N) binning) or ``"auto"`` (all-pairs while
    ``N * n_points`` is within the device's ``ALL_PAIRS_MAX_CANDIDATES``).
    Both give the identical result: they only propose candidates, and one
    shared exact test with the caller's positions decides the edges.

    ``cell`` rows are lattice vectors; it may be ``None`` or zeros when no axis
    is periodic (the system is then treated as a molecule in a bounding box).
    Runs without autograd: compute ``D`` from the returned ``S`` for forces.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    positions, cell_host, pbc, cutoff = _validate(positions, cell, pbc, cutoff)
    device, n_atoms = positions.device, positions.shape[0]
    if n_atoms == 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty.clone(), torch.zeros(0, 3, dtype=torch.long, device=device)

    basis, heights = binning_basis(cell_host, pbc)
    # float64 for binning so that rounding can never move an atom out of reach.
    frac = positions.double() @ torch.linalg.inv(basis).to(device)
    stats = torch.cat([
        torch.isfinite(positions).all().double().reshape(1),
        positions.abs().amax().double().reshape(1),
        frac.amin(0),
        frac.amax(0),
    ]).tolist()  # the one sync for all per-axis geometry
    if not stats[0]:
        bad = (~torch.isfinite(positions)).any(1).nonzero().flatten().tolist()
        raise ValueError(f"positions contain NaN or inf at atom indices {bad}")
    frac_min, frac_max = stats[2:5], stats[5:8]

    # Candidates are searched with a slightly larger radius so that float
    # rounding in the final test can never accept a pair the search missed.
    eps = torch.finfo(positions.dtype).eps
    search_radius = cutoff * (1 + 1e-6) + 8 * eps * (stats[1] + cutoff)
    image_range = [math.ceil(search_radius / heights[c]) if pbc[c] else 0 for c in range(3)]

    periodic = torch.tensor(pbc, device=device)
    unwrap = torch.where(periodic, frac.floor(), 0.0)  # lattice shift that wraps each atom
    frac_wrapped = frac - unwrap
    # Fractional box that holds every point within reach of a wrapped atom.
    lower = [-search_radius / heights[c] if pbc[c] else frac_min[c] for c in range(3)]
    upper = [1 + search_radius / heights[c] if pbc[c] else frac_max[c] for c in range(3)]
    point_frac, point_atom, point_image = _periodic_images(frac_wrapped, image_range, lower, upper)

    if method == "auto":
        limit = ALL_PAIRS_MAX_CANDIDATES.get(device.type, ALL_PAIRS_MAX_CANDIDATES["cpu"])
        fits = n_atoms * point_atom.shape[0] <= limit
        method = "all_pairs" if fits else "cell_list"
    basis = basis.to(device)
    if method == "all_pairs":
        i, point = _all_pairs_candidates(frac_wrapped @ basis, point_frac @ basis, search_radius)
    else:
        i, point = _cell_list_candidates(
            frac_wrapped, point_frac, basis, heights, lower, upper, search_radius)
    j, image = point_atom[point], point_image[point]

    # Shift relative to the caller's (unwrapped) positions, as ASE reports it.
    unwrap = unwrap.long()
    shift = image + unwrap[i] - unwrap[j]
    cell_device = cell_host.to(device=device, dtype=positions.dtype)
    keep = within_cutoff(positions, cell_device, i, j, shift, cutoff)
    if not self_interaction:
        keep &= (i != j) | (shift != 0).any(1)
    kept = keep.nonzero().flatten()
    i, j, shift, image = i[kept], j[kept], shift[kept], image[kept]
    order = _lexicographic_order(i, j, image, image_range, n_atoms)
    return i[order], j[order], shift[order]


def within_cutoff(positions, cell, i, j, shift, cutoff):
    """Mask of edges with |D| < cutoff, computed as ASE does so borderline pairs agree.

    ``S @ cell`` is spelled out elementwise: a float32 matmul may run in TF32
    on GPUs, whose rounding would move edges across the cutoff.
    """
    shift = shift.to(positions.dtype)
    translation = shift[:, :1] * cell[0] + shift[:, 1:2] * cell[1] + shift[:, 2:] * cell[2]
    distance_vector = positions[j] - positions[i] + translation
    return (distance_vector * distance_vector).sum(1).sqrt() < cutoff


def wrap_basis(cell, pbc) -> torch.Tensor:
    """[3, 3] float64 with ``positions @ basis`` = fractional coordinates along the periodic cell vectors (zero
    along the others), for :func:`compact_positions`. A pseudo-inverse, so a cell with zero vectors on its
    non-periodic axes works too."""
    basis = torch.linalg.pinv(torch.as_tensor(cell, dtype=torch.float64).reshape(3, 3).cpu())
    basis[:, [not periodic for periodic in pbc]] = 0.0
    return basis


def compact_positions(positions, cell, basis, edge_i, edge_j, shifts):
    """(positions, shifts) moved next to the origin without changing any edge vector.

    Atom 0 goes to the origin and the others are wrapped into the cell along periodic axes, the edges' shifts
    adjusted to match; all in float64, so a float32 copy of the result keeps full precision however far from the
    origin the atoms are (unwrapped trajectories, translated crystals). No device->host reads (CUDA graphs).
    """
    positions = positions - positions[:1]
    image = torch.floor(positions @ basis)
    positions = positions - image @ cell
    image = image.to(shifts.dtype)
    return positions, shifts + image[edge_j] - image[edge_i]


class VerletList:
    """Neighbour list with a skin: rebuilt only when an atom moved more than skin / 2.

    The list is built for ``cutoff + skin``. While every atom stays within
    ``skin / 2`` of where it was at the last build, no pair can have closed in
    by more than ``skin``, so filtering the cached edges to ``|D| < cutoff``
    gives exactly what a fresh build would (same edges, same order). A changed
    periodic cell (a barostat's step) keeps the list too while the strain and
    the displacements together cannot have closed a pair in by ``skin``.

    Displacements are measured from the positions the caller passes. Pass
    unwrapped positions: wrapping an atom back into the cell looks like a jump
    across the box and triggers a (correct but needless) rebuild.
    """

    def __init__(self, cutoff, skin, *, self_interaction=False, method="auto"):
        if not (math.isfinite(skin) and skin >= 0):
            raise ValueError(f"skin must be a non-negative finite number, got {skin}")
        self.cutoff = _validate_cutoff(cutoff)
        self.skin = float(skin)
        self.self_interaction = self_interaction
        self.method = method
        self.rebuilds = 0
        self._reference = None  # (positions, cell, pbc) of the last build
        self._edges = None

    @torch.no_grad()
    def update(self, positions, cell, pbc):
        """Return ``(i, j, S)`` for ``cutoff`` at ``positions``, rebuilding only if needed."""
        positions, cell_host, pbc, _ = _validate(positions, cell, pbc, self.cutoff)
        self._refresh(positions, cell_host, pbc)
        i, j, shift = self._edges
        cell_device = cell_host.to(device=positions.device, dtype=positions.dtype)
        keep = within_cutoff(positions, cell_device, i, j, shift, self.cutoff).nonzero().flatten()
        return i[keep].long(), j[keep].long(), shift[keep].long()

    @torch.no_grad()
    def candidates(self, positions, cell, pbc):
        """``(i, j, S, rebuilt)``: every pair within ``cutoff + skin`` at the last build, rebuilt only if needed.

        The exact list at ``positions`` is the subset that passes ``within_cutoff``; a caller that needs fixed
        shapes (a CUDA graph) masks the other pairs instead of dropping them. Kept compact (``i``, ``j`` int32,
        ``S`` int16: 14 bytes a pair instead of 40), as a step holds them throughout; :meth:`update` returns int64.
        """
        positions, cell_host, pbc, _ = _validate(positions, cell, pbc, self.cutoff)
        rebuilt = self._refresh(positions, cell_host, pbc)
        return (*self._edges, rebuilt)

    def _refresh(self, positions, cell_host, pbc) -> bool:
        """Rebuild the cached ``cutoff + skin`` list if needed; return whether it was rebuilt."""
        if not self._needs_rebuild(positions, cell_host, pbc):
            return False
        i, j, shift = neighbor_list(positions, cell_host, pbc, self.cutoff + self.skin,
                                    self_interaction=self.self_interaction, method=self.method)
        if positions.shape[0] >= 2**31 or (shift.numel() and int(shift.abs().max()) >= 2**15):
            raise ValueError("more than 2**31 atoms or a lattice shift beyond 2**15 cells: not supported")
        self._edges = (i.int(), j.int(), shift.to(torch.int16))
        self._reference = (positions.detach().clone(), cell_host, pbc)
        self.rebuilds += 1
        return True

    def reference_positions(self) -> torch.Tensor:
        """The positions of the last build, from which :meth:`stale` measures how far atoms moved."""
        return self._reference[0]

    def reference(self):
        """``(positions, cell)`` of the last build (None before the first), for :meth:`restore`."""
        return None if self._reference is None else self._reference[:2]

    @torch.no_grad()
    def restore(self, positions, cell, pbc) -> None:
        """The list as it was built at ``positions`` and ``cell`` (a restart's :meth:`reference`): a resumed run
        holds the candidates the interrupted one held, so steps that pad or mask them sum what it summed."""
        positions, cell_host, pbc, _ = _validate(positions, cell, pbc, self.cutoff)
        if self._reference is not None and torch.equal(self._reference[0], positions) and \
                torch.equal(self._reference[1], cell_host) and self._reference[2] == pbc:
            return
        self._reference = None
        self._refresh(positions, cell_host, pbc)

    @torch.no_grad()
    def stale(self, positions) -> torch.Tensor:
        """Device bool: whether some atom moved more than skin/2 since the last build (the rebuild test of
        :meth:`candidates` for an unchanged cell), without reading it back to the host."""
        reference = self._reference[0]
        moved = (positions.detach() - reference).norm(dim=1).amax()
        return ~(moved <= self.skin / 2)  # NaN counts as moved

    def _needs_rebuild(self, positions, cell_host, pbc):
        if self._reference is None:
            return True
        reference, reference_cell, reference_pbc = self._reference
        if (reference.shape != positions.shape or reference.dtype != positions.dtype
                or reference.device != positions.device or reference_pbc != pbc):
            return True
        if torch.equal(reference_cell, cell_host):
            moved = (positions.detach() - reference).norm(dim=1).amax()
            return not bool(moved <= self.skin / 2)  # NaN also rebuilds, and then raises
        return not self._holds_under_strain(positions, cell_host)

    def _holds_under_strain(self, positions, cell_host) -> bool:
        """Whether the list still holds every pair after the cell changed (a barostat's step), for a fully periodic
        cell. With g = (C0^-1 C), a pair's vector is D = (D0 + d) g, where D0 is its vector at the build and d the
        atoms' fractional displacement seen in the build's cell C0: |D| >= (|D0| - 2 max|d|) sigma_min(g). A
        pair left out had |D0| >= cutoff + skin, so the list holds while (cutoff + skin - 2 max|d|) sigma_min(g)
        >= cutoff."""
        reference, reference_cell, pbc = self._reference
        if not all(pbc) or abs(float(torch.linalg.det(reference_cell))) < 1e-12:
            return False
        strain = torch.linalg.solve(reference_cell, cell_host)  # C0^-1 C
        cell = cell_host.to(device=positions.device, dtype=torch.float64)
        reference_basis = reference_cell.to(device=positions.device, dtype=torch.float64)
        fractional = torch.linalg.solve(cell.T, positions.detach().to(torch.float64).T).T
        reference_fractional = torch.linalg.solve(reference_basis.T, reference.to(torch.float64).T).T
        moved = ((fractional - reference_fractional) @ reference_basis).norm(dim=1).amax()
        shrink = float(torch.linalg.svdvals(strain).min())
        return bool((self.cutoff + self.skin - 2 * moved) * shrink >= self.cutoff)


def _validate_cutoff(cutoff):
    cutoff = float(cutoff)
    if not (math.isfinite(cutoff) and cutoff > 0):
        raise ValueError(f"cutoff must be a positive finite number, got {cutoff}")
    return cutoff


def _validate(positions, cell, pbc, cutoff):
    """Normalise inputs: positions tensor [N, 3], cell float64 CPU [3, 3], pbc 3 bools."""
    positions = torch.as_tensor(positions)
    if positions.ndim != 2 or positions.shape[1] != 3:
        raise ValueError(f"positions must have shape [N, 3], got {list(positions.shape)}")
    if not positions.is_floating_point():
        raise ValueError(f"positions must be a floating point tensor, got {positions.dtype}")
    cutoff = _validate_cutoff(cutoff)

    if isinstance(pbc, bool):
        pbc = (pbc,) * 3
    pbc = tuple(bool(p) for p in torch.as_tensor(pbc).flatten().tolist())
    if len(pbc) != 3:
        raise ValueError(f"pbc must have 3 entries, got {len(pbc)}")

    if cell is None:
        if any(pbc):
            raise ValueError(f"pbc is {pbc} but no cell was given")
        cell = torch.zeros(3, 3, dtype=torch.float64)
    elif isinstance(cell, torch.Tensor):
        cell = cell.detach().to(device="cpu", dtype=torch.float64)
    else:
        cell = torch.as_tensor(np.asarray(cell, dtype=np.float64))
    if cell.shape != (3, 3):
        raise ValueError(f"cell must have shape [3, 3], got {list(cell.shape)}")
    if not torch.isfinite(cell).all():
        raise ValueError("cell contains NaN or inf")
    return positions, cell, pbc, cutoff


def binning_basis(cell, pbc):
    """Periodic cell vectors completed by an orthonormal complement, and each axis' height.

    Non-periodic axes never get a shift, so any vectors spanning the rest of
    space will do; orthonormal ones make the fractional coordinate along them
    plain Angstrom (height 1). The height of a periodic axis is the distance
    between the two cell faces it crosses, which sets how many images reach.
    """
    periodic_axes = [c for c in range(3) if pbc[c]]
    for c in periodic_axes:
        if cell[c].norm() < 1e-8:
            raise ValueError(
                f"pbc is True along axis {c} but cell vector {c} is zero or degenerate: "
                f"{cell[c].tolist()}")
    basis = torch.eye(3, dtype=torch.float64)
    if periodic_axes:
        lattice = cell[periodic_axes]
        _, singular_values, right_vectors = torch.linalg.svd(lattice, full_matrices=True)
        if singular_values.min() < 1e-8 * singular_values.max():
            raise ValueError(
                f"pbc is True along axes {periodic_axes} but their cell vectors are "
                f"degenerate (linearly dependent): {lattice.tolist()}")
        basis[periodic_axes] = lattice
        basis[[c for c in range(3) if not pbc[c]]] = right_vectors[len(periodic_axes):]
    heights = (1 / torch.linalg.inv(basis).norm(dim=0)).tolist()
    return basis, heights


def _image_grid(ranges, device):
    """All integer vectors with |v_c| <= ranges[c], as a [K, 3] int64 tensor."""
    axes = [torch.arange(-r, r + 1, device=device) for r in ranges]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)


def _periodic_images(frac_wrapped, image_range, lower, upper):
    """Every lattice image of every atom inside the fractional box [lower, upper].

    Returns fractional coordinates, atom index and integer image of each point;
    image 0 of every atom is among them.
    """
    device = frac_wrapped.device
    image = _image_grid(image_range, device)
    shifted = frac_wrapped[None, :, :] + image[:, None, :].double()  # [images, N, 3]
    lower = torch.tensor(lower, device=device, dtype=torch.float64)
    upper = torch.tensor(upper, device=device, dtype=torch.float64)
    inside = ((shifted >= lower) & (shifted <= upper)).all(-1)
    image_index, atom = inside.nonzero(as_tuple=True)  # sync: number of points
    return shifted[image_index, atom], atom, image[image_index]


def _all_pairs_candidates(atoms, points, search_radius):
    """Every (atom, point) pair closer than the search radius (Cartesian inputs)."""
    delta = points[None, :, :] - atoms[:, None, :]
    return ((delta * delta).sum(-1) < search_radius**2).nonzero(as_tuple=True)


def _cell_list_candidates(frac_wrapped, point_frac, basis, heights, lower, upper, search_radius):
    """(atom, point) pairs in nearby bins, pre-filtered by Cartesian distance.

    Points are binned over the fractional box [lower, upper] with bins about
    ``search_radius / BINS_PER_CUTOFF`` wide (smaller bins, fewer wasted
    candidates). The bin grid is padded by ``reach`` empty bins per side, so a
    neighbour bin is always the atom's bin plus a constant linear offset.
    """
    device, n_atoms = frac_wrapped.device, frac_wrapped.shape[0]
    length = [upper[c] - lower[c] for c in range(3)]
    n_bins = [max(1, int(BINS_PER_CUTOFF * length[c] * heights[c] / search_radius))
              for c in range(3)]
    while math.prod(n_bins) > max(64, 4 * point_frac.shape[0]):  # sparse: cap memory at O(N)
        widest = max(range(3), key=lambda c: n_bins[c])
        n_bins[widest] = max(1, n_bins[widest] // 2)
    # How many bins away a neighbour can sit.
    reach = [min(math.ceil(search_radius * n_bins[c] / (length[c] * heights[c])), n_bins[c] - 1)
             if n_bins[c] > 1 else 0 for c in range(3)]
    padded = [n_bins[c] + 2 * reach[c] for c in range(3)]
    strides = torch.tensor([1, padded[0], padded[0] * padded[1]], device=device)
    scale = torch.tensor([n_bins[c] / length[c] if length[c] > 0 else 0.0 for c in range(3)],
                         device=device, dtype=torch.float64)
    lower = torch.tensor(lower, device=device, dtype=torch.float64)
    first_bin = torch.zeros(3, dtype=torch.long, device=device)
    last_bin = torch.tensor(n_bins, device=device) - 1
    padding = torch.tensor(reach, device=device)

    def bin_of(frac):
        xyz = ((frac - lower) * scale).floor().long().clamp(min=first_bin, max=last_bin)
        return ((xyz + padding) * strides).sum(1)

    point_bin = bin_of(point_frac)
    points_by_bin = torch.argsort(point_bin, stable=True)
    points_per_bin = torch.bincount(point_bin, minlength=math.prod(padded))
    bin_start = points_per_bin.cumsum(0) - points_per_bin

    # One slot per (atom, neighbour bin), atom-major.
    offsets = _image_grid(reach, device)
    neighbour_bin = (bin_of(frac_wrapped)[:, None] + (offsets * strides).sum(1)).flatten()
    points_in_slot = points_per_bin[neighbour_bin]

    # Expand each slot into one candidate per point of its bin. Coordinates are
    # kept as separate columns: contiguous 1-D gathers are the fast path.
    n_candidates = int(points_in_slot.sum())  # sync: size of the candidate list
    slot = torch.repeat_interleave(points_in_slot, output_size=n_candidates)
    slot_first = bin_start[neighbour_bin] - (points_in_slot.cumsum(0) - points_in_slot)
    sorted_point = slot_first.index_select(0, slot) + torch.arange(n_candidates, device=device)
    candidates_per_atom = points_in_slot.view(n_atoms, -1).sum(1)
    atom_xyz = (frac_wrapped @ basis).T.contiguous()
    point_xyz = (point_frac[points_by_bin] @ basis).T.contiguous()
    distance_squared = 0
    for c in range(3):
        delta = (point_xyz[c].index_select(0, sorted_point)
                 - atom_xyz[c].repeat_interleave(candidates_per_atom, output_size=n_candidates))
        distance_squared = distance_squared + delta * delta
    close = (distance_squared < search_radius**2).nonzero().flatten()
    i = torch.div(slot[close], offsets.shape[0], rounding_mode="floor")
    return i, points_by_bin[sorted_point[close]]


def _lexicographic_order(i, j, image, image_range, n_atoms):
    """Permutation sorting edges by (i, j, S), identical for every search method.

    For fixed (i, j), S and the wrapped-frame image differ by a constant, so
    ordering by the image (bounded by ``image_range``) is ordering by S.
    """
    radix = [2 * r + 1 for r in image_range]
    image_code = ((image[:, 0] + image_range[0]) * radix[1]
                  + image[:, 1] + image_range[1]) * radix[2] + image[:, 2] + image_range[2]
    if n_atoms * n_atoms * math.prod(radix) >= 2**63:
        raise ValueError(f"{n_atoms} atoms with {math.prod(radix)} images overflow the sort key")
    key = (i * n_atoms + j) * math.prod(radix) + image_code
    return torch.argsort(key)
