"""What a framework patch module provides: the one contract the faces (``fastmlip.api``, the calculator, convert,
lammps, warmup) and the self-check program against.

A framework patch is a module (``fastmlip.patches.sevenn``, ``fastmlip.patches.mace``), not a class: the faces
hold the module itself and call its functions, so :class:`Framework` describes a module (PEP 544 allows modules
as protocol implementations). Every member is present in every patch; a capability a framework lacks is still
an explicit member with a neutral answer (MACE has no pretrained names: :func:`resolve` finds only files), so no
face probes a patch with ``getattr``.

Edge convention of every ``edge_i``/``edge_j``/``shifts`` argument: ASE's "ijS" neighbour list, the edge
vector of edge k being ``positions[edge_j[k]] - positions[edge_i[k]] + shifts[k] @ cell``; each patch maps it
onto its framework's own sender/receiver order.
"""
from __future__ import annotations

from typing import Optional, Protocol, runtime_checkable


@runtime_checkable
class Framework(Protocol):
    FRAMEWORK: str
    """The framework's short name ("sevenn", "mace"), as ``model_info(model)["framework"]`` reports it."""

    # --- files and names ---------------------------------------------------------------------------------------

    def can_load(self, path) -> bool:
        """Whether ``path`` (a file path or a pretrained name) is this framework's, told without unpickling."""

    def read_checkpoint(self, path):
        """A look inside ``path`` that runs no code from it: ValueError with a one-line reason (``"{path}: ..."``)
        when it is not this framework's file; what it returns otherwise is the framework's own business."""

    def pretrained_checkpoints(self) -> dict:
        """{name: path} of the pretrained checkpoints present in this installation (nothing is downloaded)."""

    def resolve(self, path_or_name) -> Optional[str]:
        """The file to read for ``path_or_name``: itself when it is a file, the checkpoint of a pretrained name;
        None when it is neither."""

    def load(self, path, device=None, dtype=None, trusted: bool = False):
        """The framework's own model in eval mode with frozen parameters; runs code from the file only when
        ``trusted`` (else :class:`fastmlip.patches.files.UntrustedFileError`). The model carries the file's
        fastmlip marker in ``model.__dict__["_fastmlip_file"]`` (``format == "fast"``: accelerate it)."""

    def save_converted(self, source_path, target_path, *, to: str, dtype: str, check: Optional[dict], reference,
                       trusted: bool = False):
        """Write ``source_path``'s model to ``target_path`` as an ordinary file of the framework, with (``to="fast"``)
        or without (``"e3nn"``) the fastmlip marker, and check what was written against ``reference`` (the loaded,
        restored model); ValueError when it differs."""

    # --- models ------------------------------------------------------------------------------------------------

    def handles(self, model) -> bool:
        """Whether ``model`` is this framework's model (cheap: no slow framework import for foreign models)."""

    def model_info(self, model) -> dict:
        """{"framework", "cutoff" (A), "atomic_numbers" (sorted list), "modals" (names of the modals or heads to
        choose from; [] for a single one), "dtype", "device"}."""

    def message_passing_layers(self, model) -> int:
        """How many times features cross an edge before the energy is read out (the receptive field is this many
        cutoffs): LAMMPS ghost atoms must reach that far."""

    def compute(self, model, positions, cell, pbc, numbers, edge_i, edge_j, shifts, *, compute_stress=True,
                modal=None, edge_mask=None, validated=False) -> dict:
        """{"energy", "energies" (per atom), "forces", "stress" (3x3, None where not periodic or not asked)} of
        one structure, as the framework's own calculator computes them. ``validated``: the caller checked the
        species on the host, so nothing waits for the device; ``edge_mask``: which edges exist, the others
        contribute exactly zero (needs :meth:`mask_obstacle` to be None)."""

    def compute_edges(self, model, numbers, edge_i, edge_j, vectors, *, modal=None, num_local=None) -> dict:
        """{"energies" [N], "energy", "edge_gradient" [E, 3]}: per-atom energies and the gradient of the first
        ``num_local`` atoms' energy by the edge vectors, for callers that hold edges as vectors (LAMMPS)."""

    def energy_module(self, model, modal=None):
        """An ``nn.Module`` of the accelerated model mapping ``(numbers [N], edge_i [E], edge_j [E], vectors [E, 3],
        edge_mask [E])`` (ASE "ijS" edges, vectors in the model's dtype, mask 1/0; where the module has a
        ``species_table()``, each atom's index into it instead of its atomic number) to ``(energies [N],
        differentiated [N], *sorted)``: the per-atom terms forces differentiate, then the six tensors of the
        :class:`fastmlip.graph.SortedEdges` its convolutions sorted the edges into (its ``RECEIVERS`` attribute
        says which of ``edge_i``/``edge_j`` they took as dst), for the forces to reuse: what ``fastmlip convert
        --to exported`` exports (:mod:`fastmlip.patches.exported`). ValueError for a model it cannot describe so."""

    # --- acceleration ------------------------------------------------------------------------------------------

    def plan(self, model) -> tuple:
        """([(qualified name, factory)], {qualified name: reason}): what :meth:`accelerate` swaps, and what stays
        as it is and why."""

    def accelerate(self, model, *, strict: bool = False) -> list:
        """Swap the planned modules in place (same parameter and buffer objects); returns the names left as they
        were. ``strict``: ValueError and the model untouched when anything would be left."""

    def restore(self, model) -> int:
        """Put every original module back, bit for bit; returns how many were restored."""

    def is_accelerated(self, model) -> bool:
        """Whether :meth:`accelerate` swapped anything in ``model`` (and :meth:`restore` has not undone it)."""

    def mask_obstacle(self, model) -> Optional[str]:
        """Why ``compute(..., edge_mask=...)`` cannot be used with this model, None if it can."""

    def capture_obstacle(self, model) -> Optional[str]:
        """Why a step of this model cannot be captured as a CUDA graph (:mod:`fastmlip.cuda_graph`), None if it
        can."""
