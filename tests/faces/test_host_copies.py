"""Thermo rows and frames handed to the host by fastmlip.host_copies: the values the state gives, in step order."""
from __future__ import annotations

import pytest
import torch
from ase import units

from fastmlip import integrators
from fastmlip.host_copies import HostCopies


def _state(step: int, seed: int) -> integrators.State:
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.rand(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    return integrators.State(positions=rand(4, 3), momenta=rand(4, 3) - 0.5, masses=1 + rand(4, 1),
                             cell=torch.eye(3, dtype=torch.float64) * 5 + 0.1 * rand(3, 3),
                             energy=rand(()).to(torch.float32), forces=rand(4, 3), stress=rand(3, 3), step=step)


@pytest.mark.parametrize("npt", [False, True])
def test_rows_frames_and_progress_in_step_order(npt):
    thermo, frames, reported = [], [], []
    copies = HostCopies(thermo, timestep=2.0, npt=npt, write_frame=frames.append, progress=reported.append)
    states = [_state(step, seed=step + 1) for step in (0, 10, 20)]
    copies.add(states[0], frame=True, report=False)
    copies.add(states[1], frame=False)
    copies.add(states[2], frame=True)
    copies.drain()
    assert [row[:2] for row in thermo] == [[0, 0.0], [10, 20.0], [20, 40.0]]
    assert reported == [10, 20]  # the first row is the run's start: no progress call
    for row, state in zip(thermo, states):
        expected = [float(state.energy), float(integrators.kinetic_energy(state.momenta, state.masses)),
                    float(integrators.temperature(state.momenta, state.masses))]
        if npt:
            expected += [float(integrators.pressure(state)) / units.GPa, float(torch.linalg.det(state.cell).abs())]
        assert row[2:] == pytest.approx(expected, rel=1e-12)
    assert len(frames) == 2
    for frame, state in zip(frames, (states[0], states[2])):
        positions, momenta, forces, cell, energy = frame
        assert torch.equal(positions, state.positions) and torch.equal(forces, state.forces)
        assert torch.equal(momenta, state.momenta) and torch.equal(cell, state.cell) and energy == state.energy


@pytest.mark.gpu
def test_copies_from_the_gpu_equal_those_on_the_cpu():
    """On CUDA the rows and frames come through pinned buffers and an event; they equal the CPU's."""
    results = {}
    for device in ("cpu", "cuda"):
        thermo, frames = [], []
        copies = HostCopies(thermo, timestep=1.0, npt=True, write_frame=frames.append)
        for step in (0, 5):
            state = _state(step, seed=3 + step)
            state = integrators.State(**{k: v.to(device) if torch.is_tensor(v) else v
                                         for k, v in state.tensors().items()})
            copies.add(state, frame=True)
            copies.poll()
        copies.drain()
        results[device] = (thermo, frames)
    assert len(results["cuda"][0]) == len(results["cpu"][0]) == 2 and len(results["cuda"][1]) == 2
    for got, want in zip(results["cuda"][0], results["cpu"][0]):
        assert got == pytest.approx(want, rel=1e-12)  # one row at a time: approx takes no nested lists
    for got, want in zip(results["cuda"][1], results["cpu"][1]):
        assert all(g.device.type == "cpu" and torch.allclose(g, w, rtol=1e-12, atol=0) for g, w in zip(got, want))
