"""``fastmlip lammps MODEL -o FILE``: a MACE or SevenNet model as a LAMMPS ``pair_style mliap unified`` potential.

LAMMPS (built with ML-IAP and Python support) unpickles FILE and calls ``compute_forces(data)`` each step with a
full neighbour list as edges: ``pair_i``, ``pair_j`` (LAMMPS atom indices, owned atoms first, then ghosts) and
``rij = x[j] - x[i]``. The file holds no weights and no code: only where the model is (a path or a pretrained
name), the SHA-256 it had when the file was written, whether the user trusted it then, and the options. Each
MPI rank loads the model through :func:`fastmlip.load` on its first step and accelerates it in place.

Message passing across ranks is exact through ghost atoms: with ``pair_style mliap unified FILE 1`` LAMMPS also
builds neighbour lists for ghost atoms, and with ``comm_modify cutoff`` at least layers x cutoff + skin every atom
within message-passing reach of a rank's own atoms is present there. Each rank evaluates the model on that
neighbourhood (edges pruned to what its own atoms' energies depend on), counts only its own atoms' energies, and
hands LAMMPS dE/d(rij) per edge: LAMMPS adds the forces on ghosts back to their owners and tallies the virial.
"""
from __future__ import annotations

import os
import pickle
import sys

FORMAT = 1
# LAMMPS's default neighbour skin in metal units (the `neighbor` command); ghosts must reach this much further.
DEFAULT_SKIN = 2.0
# Environment variables in which MPI launchers give a rank's index on its node, to spread ranks over the GPUs.
LOCAL_RANK_VARIABLES = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID", "PMI_LOCAL_RANK")
# Above this many elements the pair_coeff line is not guessed: the user names the element of each atom type.
MAX_ELEMENTS_SHOWN = 8


class LammpsError(ValueError):
    """A reason to stop, shown as one line."""


def message_passing_layers(patch, model) -> int:
    """How many times features cross an edge before the energy is read out: atoms that many cutoffs away still
    move a local atom's energy, so ghosts must reach that far."""
    layers = patch.message_passing_layers(model)
    if layers < 1:
        raise LammpsError(f"fastmlip cannot tell how many message-passing layers this {patch.FRAMEWORK} model has")
    return layers


def receptive_field(pair_i, pair_j, local, num_atoms: int, layers: int):
    """(atoms, pairs): boolean masks of the atoms the ``local`` atoms' energies depend on (at most ``layers``
    edges away) and of the pairs that carry messages into them (one end at most ``layers - 1`` edges away).

    Features of an atom ``k`` edges away matter only up to layer ``layers - k``, and those depend on atoms one
    edge further out, so the rest of the ghost shell (and its truncated neighbour lists) changes nothing."""
    import torch

    hops = torch.full((num_atoms,), layers + 1, dtype=torch.long, device=pair_i.device)
    hops[local] = 0
    for hop in range(1, layers + 1):
        reached = pair_j[hops[pair_i] == hop - 1]
        hops[reached] = hops[reached].clamp(max=hop)
    return hops <= layers, torch.minimum(hops[pair_i], hops[pair_j]) < layers


def _resolve(source: str):
    """(patch, file path) for a model path or a pretrained name."""
    from . import api

    patch = api.patch_for_file(source)
    return patch, patch.resolve(source) or source


def _rank_device(device: str):
    """The torch device for this rank: "auto" and a bare "cuda" put each rank of a node on its own GPU."""
    import torch

    from . import api

    resolved = api.resolve_device(device)
    if resolved.type == "cuda" and resolved.index is None:
        local_rank = next((int(os.environ[name]) for name in LOCAL_RANK_VARIABLES if name in os.environ), 0)
        resolved = torch.device("cuda", local_rank % torch.cuda.device_count())
    return resolved


class LammpsPotential:
    """What ``pair_style mliap unified`` loads: the contract of ``lammps.mliap.mliap_unified_abc.MLIAPUnified``
    (element_types, ndescriptors, nparams, rcutfac, interface, compute_forces), without importing LAMMPS.

    Pickles as its description only; the model is loaded on the first step, in the process that runs it.
    ``rcutfac`` is half the cutoff: LAMMPS's pair cutoff is twice it (every element radius is 1)."""

    def __init__(self, source: str, sha256: str, trusted: bool, elements, cutoff: float, layers: int,
                 dtype=None, device: str = "auto", modal=None):
        self.__setstate__({"format": FORMAT, "source": source, "sha256": sha256, "trusted": bool(trusted),
                           "elements": list(elements), "cutoff": float(cutoff), "layers": int(layers),
                           "dtype": dtype, "device": device, "modal": modal})

    def __getstate__(self) -> dict:
        return dict(self.spec)

    def __setstate__(self, state: dict) -> None:
        if state.get("format") != FORMAT:
            raise LammpsError(f"this potential file has format {state.get('format')!r}; this fastmlip reads "
                              f"format {FORMAT}: write it again with `fastmlip lammps`")
        self.spec = dict(state)
        self.element_types = list(state["elements"])
        self.ndescriptors = 1
        self.nparams = 1
        self.rcutfac = 0.5 * state["cutoff"]
        self.interface = None  # set by LAMMPS when it connects the potential
        self._model = self._patch = None

    def ghost_cutoff(self, skin: float = DEFAULT_SKIN) -> float:
        """The ``comm_modify cutoff`` that makes message passing across ranks exact."""
        return self.spec["layers"] * self.spec["cutoff"] + skin

    def load(self):
        """The accelerated model on this rank's device, from the file checked against the recorded SHA-256."""
        from . import api
        from .patches.files import file_sha256

        spec = self.spec
        patch, path = _resolve(spec["source"])
        actual = file_sha256(path) if os.path.isfile(path) else None
        if actual != spec["sha256"]:
            raise LammpsError(f"{path}: the model file changed since `fastmlip lammps` wrote this potential (SHA-256 "
                              f"{actual}, was {spec['sha256']}); write the potential again")
        model = api.load(spec["source"], device=_rank_device(spec["device"]), dtype=spec["dtype"],
                         trusted=spec["trusted"])
        for parameter in model.parameters():  # forces come from edge gradients, never from weight gradients
            parameter.requires_grad_(False)
        model.eval()
        if not patch.is_accelerated(model):
            api.accelerate(model)
        self._model, self._patch = model, patch
        return model

    def compute_forces(self, data) -> None:
        """Per-atom energies, the energy of this rank's atoms and dE/d(rij) per pair, handed to LAMMPS."""
        import numpy as np
        import torch

        model = self._model if self._model is not None else self.load()
        num_listed = int(data.nlistatoms)
        if num_listed == 0:
            data.energy = 0.0
            return
        device = self._patch.model_info(model)["device"]
        elements = torch.as_tensor(np.array(data.elems), dtype=torch.long, device=device)
        pair_i = torch.as_tensor(np.array(data.pair_i), dtype=torch.long, device=device)
        pair_j = torch.as_tensor(np.array(data.pair_j), dtype=torch.long, device=device)
        rij = torch.as_tensor(np.array(data.rij), dtype=torch.float64, device=device)
        local = torch.as_tensor(np.array(data.iatoms)[:num_listed], dtype=torch.long, device=device)

        atoms, pairs = receptive_field(pair_i, pair_j, local, elements.numel(), self.spec["layers"])
        atoms[local] = False
        order = torch.cat([local, atoms.nonzero().flatten()])  # this rank's atoms first, as compute_edges counts
        if bool((elements[order] < 0).any()):
            raise LammpsError("atom types mapped to NULL in pair_coeff are not supported by fastmlip potentials")
        renumber = torch.full_like(elements, -1)
        renumber[order] = torch.arange(order.numel(), device=device)
        numbers = self._atomic_numbers(device)[elements[order]]
        out = self._patch.compute_edges(model, numbers, renumber[pair_i[pairs]], renumber[pair_j[pairs]],
                                        rij[pairs], modal=self.spec["modal"], num_local=num_listed)

        energies = out["energies"][:num_listed].to(torch.float64).cpu().numpy()
        data.eatoms = np.ascontiguousarray(energies)
        data.energy = float(energies.sum())
        if pair_i.numel():
            gradient = torch.zeros_like(rij)
            gradient[pairs] = out["edge_gradient"].to(torch.float64)
            data.update_pair_forces(np.ascontiguousarray(gradient.cpu().numpy()))

    def compute_descriptors(self, data) -> None:
        """Nothing to do: the model reads edges, not descriptors."""

    def compute_gradients(self, data) -> None:
        """Nothing to do: :meth:`compute_forces` does it all."""

    def _atomic_numbers(self, device):
        import torch
        from ase.data import atomic_numbers

        return torch.tensor([atomic_numbers[symbol] for symbol in self.element_types], device=device)


def _probe(patch, model, cutoff: float, number: int, modal) -> None:
    """Evaluate a dimer from edge vectors, so that a model (or modal) LAMMPS could not run fails here, not there."""
    import torch

    vectors = torch.tensor([[0.5 * cutoff, 0.0, 0.0], [-0.5 * cutoff, 0.0, 0.0]], dtype=torch.float64)
    patch.compute_edges(model, torch.tensor([number, number]), torch.tensor([0, 1]), torch.tensor([1, 0]),
                        vectors, modal=modal)


def _checked_device(device: str) -> str:
    """``device`` as LAMMPS will resolve it (the GPU need not be on the machine that writes the file)."""
    import torch

    if device == "auto":
        return device
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        raise LammpsError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N")
    return str(parsed)


def write_potential(model: str, output: str, *, dtype=None, device: str = "auto", modal=None, trusted=False,
                    sha256=None, elements=None) -> LammpsPotential:
    """Write the LAMMPS potential for ``model`` (a path or a pretrained name) to ``output`` and return it.

    ``trusted``/``sha256``: as for :func:`fastmlip.load`; what was trusted here is trusted in LAMMPS only while
    the file keeps the SHA-256 it has now. ``elements`` (of the atom types, for pair_coeff) are checked against
    the model before anything is written. ``output`` is written atomically and is never the model file."""
    from ase.data import chemical_symbols

    from . import api
    from .calculator import Calculator
    from .convert import _refuse_bad_output, write_atomically
    from .patches.files import file_sha256

    if output.endswith((".pt", ".pth")):
        raise LammpsError(f"{output}: LAMMPS opens .pt/.pth files with torch.load, which refuses this potential; "
                          "use another suffix (e.g. .mliap)")
    patch, path = _resolve(model)
    _refuse_bad_output(path, output)
    trusted = api.trust(path, trusted, sha256)
    dtype = str(api.resolve_dtype(dtype)).replace("torch.", "") if dtype else None
    device = _checked_device(device)
    source = os.path.abspath(model) if os.path.isfile(model) else model  # as LAMMPS will load it
    loaded = api.load(source, device="cpu", dtype=dtype, trusted=trusted)
    info = patch.model_info(loaded)
    modal = Calculator._select_modal(modal, None, list(info.get("modals") or []))
    numbers = list(info["atomic_numbers"])
    known = [chemical_symbols[z] for z in numbers]
    unknown = [symbol for symbol in elements or () if symbol not in known]
    if unknown:
        raise LammpsError(f"element(s) {' '.join(unknown)} unknown to this model; it knows: {' '.join(known)}")
    _probe(patch, loaded, info["cutoff"], numbers[0], modal)
    potential = LammpsPotential(source, file_sha256(path), trusted, known,
                                info["cutoff"], message_passing_layers(patch, loaded),
                                dtype=dtype or str(info["dtype"]).replace("torch.", ""), device=device, modal=modal)

    def dump(temp_path):
        with open(temp_path, "wb") as stream:
            pickle.dump(potential, stream, protocol=4)

    write_atomically(output, dump)
    return potential


def input_lines(potential: LammpsPotential, path: str, elements=None, skin: float = DEFAULT_SKIN) -> list:
    """The pair_style, pair_coeff and comm_modify lines for an input deck (units metal, newton on)."""
    spec = potential.spec
    known = potential.element_types
    if elements:
        coeff = " ".join(elements)
    elif len(known) <= MAX_ELEMENTS_SHOWN:
        coeff = " ".join(known)
    else:
        coeff = "ELEMENT_OF_TYPE_1 ELEMENT_OF_TYPE_2 ...  # give --elements; this model knows " + " ".join(known)
    return [f"pair_style mliap unified {path} 1",
            f"pair_coeff * * {coeff}",
            (f"comm_modify cutoff {potential.ghost_cutoff(skin):g}  # >= {spec['layers']} layers x "
             f"{spec['cutoff']:g} A cutoff + {skin:g} A neighbor skin: exact message passing across MPI ranks")]


def add_arguments(parser) -> None:
    from .cli import add_trust_arguments

    parser.add_argument("model", metavar="MODEL", help="model file or pretrained name (e.g. 7net-0)")
    parser.add_argument("-o", "--output", metavar="FILE", required=True,
                        help="potential file to write (for pair_style mliap unified FILE 1; not .pt/.pth)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default=None,
                        help="precision LAMMPS runs the model in (default: the model's)")
    parser.add_argument("--device", default="auto",
                        help="device in LAMMPS: auto (each rank on a GPU of its node, else CPU), cpu, cuda, cuda:N")
    parser.add_argument("--modal", "--head", dest="modal", default=None,
                        help="SevenNet modal or MACE head to run")
    parser.add_argument("--elements", nargs="+", metavar="SYMBOL", default=None,
                        help="element of each LAMMPS atom type, in type order (for the printed pair_coeff line)")
    parser.add_argument("--skin", type=float, default=DEFAULT_SKIN,
                        help=f"neighbor skin of the run in A (default: {DEFAULT_SKIN:g}, LAMMPS's in metal units)")
    add_trust_arguments(parser)


def run(args) -> int:
    from .patches.files import one_line

    try:
        if args.skin < 0:
            raise LammpsError(f"--skin must be >= 0, got {args.skin:g}")
        potential = write_potential(args.model, args.output, dtype=args.dtype, device=args.device,
                                    modal=args.modal, trusted=args.trust, sha256=args.sha256,
                                    elements=args.elements)
    except (ValueError, TypeError, OSError) as exc:
        print(f"fastmlip lammps: error: {one_line(exc)}", file=sys.stderr)
        return 2
    spec = potential.spec
    lines = input_lines(potential, args.output, args.elements, args.skin)
    print(f"# wrote {args.output}: {args.model}, {spec['layers']} message-passing layers, cutoff {spec['cutoff']:g} A, "
          f"{spec['dtype']} on {spec['device']}; for LAMMPS with ML-IAP + Python, units metal, newton on")
    print("\n".join(lines))
    return 0
