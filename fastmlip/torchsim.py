"""``fastmlip.torchsim.Model``: an accelerated MACE or SevenNet model as a TorchSim ``ModelInterface``.

TorchSim (``torch-sim-atomistic``, Python >= 3.12) runs batched MD and relaxations of many systems at once and
asks its model for energies, forces and stresses of a whole ``SimState``. This model answers from fastmlip's
batched path (:func:`fastmlip.batch.evaluate_tensors`): one neighbour search and one model call per state,
on the model's device, nothing copied to the host.
"""
from __future__ import annotations

import torch
from torch_sim.models.interface import ModelInterface

from .batch import evaluate_tensors
from .calculator import Calculator


class Model(ModelInterface):
    """``Model(model, device="auto", dtype="float32", compute_stress=True, **calculator_options)``; ``model`` is
    anything :class:`fastmlip.Calculator` takes (a name such as "7net-0", a file, a loaded or accelerated model,
    a Calculator), accelerated and self-checked as the calculator does."""

    def __init__(self, model="7net-0", *, device="auto", dtype="float32", compute_stress: bool = True,
                 compute_forces: bool = True, **calculator_options):
        super().__init__()
        self.calculator = model if isinstance(model, Calculator) else Calculator(
            model, device=device, dtype=dtype, cuda_graph=False, **calculator_options)
        self._device = self.calculator.device
        self._dtype = self.calculator.dtype
        self._compute_stress, self._compute_forces = compute_stress, compute_forces
        self._memory_scales_with = "n_atoms_x_density"

    def forward(self, state, **kwargs) -> dict:
        """``energy`` [n_systems], ``forces`` [n_atoms, 3] and ``stress`` [n_systems, 3, 3] (eV/A^3, positive
        when the system pulls its cell inwards) in the state's dtype."""
        sizes = torch.bincount(state.system_idx, minlength=state.n_systems)
        pbc = tuple(bool(p) for p in torch.as_tensor(state.pbc).reshape(-1).expand(3).tolist())
        properties = ("energy",) + (("forces",) if self.compute_forces else ()) + \
            (("stress",) if self.compute_stress else ())
        out = evaluate_tensors(self.calculator, state.positions.detach().to(torch.float64),
                               state.atomic_numbers, sizes, state.row_vector_cell.detach().to(torch.float64),
                               [pbc] * state.n_systems, properties)
        return {key: value.to(state.positions.dtype) for key, value in out.items() if key != "energies"}
