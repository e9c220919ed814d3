"""Thermo rows and trajectory frames on their way from the device to the host, without waiting for them.

``float(tensor)`` or ``tensor.cpu()`` on a CUDA tensor waits for the GPU to finish everything queued before it,
and the GPU then idles while the host queues the next steps. :class:`HostCopies` instead queues each thermo row
and frame as one copy into pinned host memory behind the steps that made it, and hands it over (to the thermo
list, the trajectory writer and the progress callback, in step order) once it has arrived: at the next point where
the run waits for the GPU anyway, or when :meth:`HostCopies.drain` is asked for everything (before a restart file
is written, and at the end). On a CPU the copies are the tensors themselves and are handed over at once.
"""
from __future__ import annotations

from collections import deque

import torch
from ase import units

from . import integrators


def thermo_values(state: integrators.State, npt: bool) -> torch.Tensor:
    """epot, ekin (eV), temperature (K), and under NPT pressure (eV/A^3) and volume (A^3), as one device vector."""
    values = [state.energy.to(torch.float64), integrators.kinetic_energy(state.momenta, state.masses),
              integrators.temperature(state.momenta, state.masses)]
    if npt:
        values += [integrators.pressure(state), torch.linalg.det(state.cell).abs()]
    return torch.stack([v.reshape(()).to(torch.float64) for v in values])


class HostCopies:
    """The run's thermo rows (``thermo``: a list of ``[step, time_fs, epot, ekin, temperature(, pressure,
    volume)]``, pressure in GPa) and frames (``write_frame(state_on_host)``, or None) as they arrive.
    ``progress(step)``: called once each row has arrived."""

    def __init__(self, thermo: list, timestep: float, npt: bool, write_frame=None, progress=None):
        self.thermo, self.timestep, self.npt = thermo, timestep, npt
        self.write_frame, self.progress = write_frame, progress
        self.pending = deque()  # (step, event or None, host values, host frame tensors or None, report)

    def add(self, state: integrators.State, frame: bool, report: bool = True) -> None:
        """Queue the thermo row (and the frame, if ``frame``) of ``state`` for the host; ``report``: call
        ``progress`` when it arrives."""
        values = thermo_values(state, self.npt)
        tensors = (state.positions, state.momenta, state.forces, state.cell, state.energy) if frame else ()
        event = None
        if values.is_cuda:
            values = _pinned_copy(values)
            tensors = tuple(_pinned_copy(t) for t in tensors)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(state.positions.device))  # where the copies were queued
        self.pending.append((state.step, event, values, tensors or None, report))
        self.poll()

    def poll(self) -> None:
        """Hand over, in step order, the rows and frames whose copies have arrived."""
        while self.pending and (self.pending[0][1] is None or self.pending[0][1].query()):
            step, _, values, tensors, report = self.pending.popleft()
            self._hand_over(step, values, tensors, report)

    def drain(self) -> None:
        """Wait for every queued copy and hand it over."""
        while self.pending:
            step, event, values, tensors, report = self.pending.popleft()
            if event is not None:
                event.synchronize()
            self._hand_over(step, values, tensors, report)

    def _hand_over(self, step, values, tensors, report) -> None:
        row = [step, step * self.timestep, *values.tolist()]
        if self.npt:
            row[-2] = row[-2] / units.GPa
        self.thermo.append(row)
        if tensors is not None and self.write_frame is not None:
            self.write_frame(tensors)
        if report and self.progress is not None:
            self.progress(step)


def _pinned_copy(tensor: torch.Tensor) -> torch.Tensor:
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host
