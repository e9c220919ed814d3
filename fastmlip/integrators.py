"""Molecular-dynamics integrators on device tensors, in ASE's units (Å, eV, amu, ASE time).

Each step is a handful of tensor operations on float64 positions and momenta, with random numbers from a
``torch.Generator`` on the same device: no host reads, so a run is reproducible from (state, generator state) and
a step can later be captured whole. Forces come from ``evaluate(positions, cell) -> (energy, forces, stress)``.

- :class:`VelocityVerlet` (NVE), the same arithmetic as ASE's ``VelocityVerlet``.
- :class:`Langevin` (NVT), BAOAB splitting (Leimkuhler & Matthews 2013), centre-of-mass momentum kept at zero.
- :class:`CSVR` (NVT), Bussi-Donadio-Parrinello stochastic velocity rescaling before each velocity-Verlet step,
  as ASE's ``Bussi``.
- :class:`CellRescaling` (NPT barostat, isotropic), stochastic cell rescaling (Bernetti & Bussi 2020) around any
  of the above.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Callable, Optional

import torch
from ase import units

from .memo import derived


@dataclass
class State:
    """Everything a step reads and writes; ``forces``, ``energy`` and ``stress`` belong to ``positions``."""

    positions: torch.Tensor  # [N, 3]
    momenta: torch.Tensor  # [N, 3]
    masses: torch.Tensor  # [N, 1]
    cell: torch.Tensor  # [3, 3]
    energy: torch.Tensor  # []
    forces: torch.Tensor  # [N, 3]
    stress: Optional[torch.Tensor]  # [3, 3] eV/A^3, ASE's sign (positive: the cell wants to shrink)
    step: int = 0

    def tensors(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def kinetic_energy(momenta, masses) -> torch.Tensor:
    return 0.5 * (momenta * momenta / masses).sum()


def degrees_of_freedom(num_atoms: int) -> int:
    """3N - 3: the integrators keep the centre of mass at rest."""
    return max(1, 3 * num_atoms - 3)


def temperature(momenta, masses) -> torch.Tensor:
    """Kinetic temperature in K."""
    return 2.0 * kinetic_energy(momenta, masses) / (degrees_of_freedom(len(masses)) * units.kB)


def pressure(state: State) -> torch.Tensor:
    """Instantaneous pressure in eV/A^3: the virial's (minus the stress trace) plus the kinetic term 2K/(3V)."""
    volume = torch.linalg.det(state.cell).abs()
    kinetic = 2.0 * kinetic_energy(state.momenta, state.masses) / (3.0 * volume)
    return -torch.diagonal(state.stress).sum() / 3.0 + kinetic


def _without_drift(momenta, masses):
    """Momenta with the centre-of-mass momentum removed (each atom loses its mass share)."""
    share = derived(masses, "mass_share", lambda: masses / masses.sum())
    return torch.addcmul(momenta, share, momenta.sum(0), value=-1.0)


# Each update is one fused operation (a launch per tensor op counts in a replayed step: 21 -> 9 for Langevin).
def _kick(momenta, forces, dt: float):
    """momenta + dt * forces (forces may be float32: the sum is formed in float64)."""
    return torch.add(momenta, forces, alpha=dt)


def _drift(positions, momenta, masses, dt: float):
    """positions + dt * momenta / masses."""
    return torch.addcdiv(positions, momenta, masses, value=dt)


Evaluate = Callable[[torch.Tensor, torch.Tensor], tuple]


class VelocityVerlet:
    """NVE: half kick, drift, new forces, half kick."""

    def __init__(self, timestep: float, evaluate: Evaluate):
        self.dt, self.evaluate = timestep, evaluate

    def drift_and_forces(self, state: State, momenta) -> State:
        positions = _drift(state.positions, momenta, state.masses, self.dt)
        energy, forces, stress = self.evaluate(positions, state.cell)
        momenta = _kick(momenta, forces, 0.5 * self.dt)
        return State(positions, momenta, state.masses, state.cell, energy, forces, stress, state.step + 1)

    def step(self, state: State, generator=None) -> State:
        return self.drift_and_forces(state, _kick(state.momenta, state.forces, 0.5 * self.dt))


class Langevin(VelocityVerlet):
    """NVT, BAOAB: half kick, half drift, exact Ornstein-Uhlenbeck on the momenta, half drift, new forces, half
    kick. ``friction`` in 1/(ASE time)."""

    def __init__(self, timestep: float, evaluate: Evaluate, temperature_K: float, friction: float):
        super().__init__(timestep, evaluate)
        self.kT = units.kB * temperature_K
        self.c1 = math.exp(-friction * timestep)

    def step(self, state: State, generator=None) -> State:
        masses = state.masses
        momenta = _kick(state.momenta, state.forces, 0.5 * self.dt)
        positions = _drift(state.positions, momenta, masses, 0.5 * self.dt)
        noise = torch.randn(momenta.shape, generator=generator, dtype=momenta.dtype, device=momenta.device)
        spread = derived(masses, ("langevin_spread", self.c1, self.kT),
                         lambda: math.sqrt((1.0 - self.c1 ** 2) * self.kT) * torch.sqrt(masses))
        momenta = _without_drift(torch.addcmul(self.c1 * momenta, spread, noise), masses)
        positions = _drift(positions, momenta, masses, 0.5 * self.dt)
        energy, forces, stress = self.evaluate(positions, state.cell)
        momenta = _kick(momenta, forces, 0.5 * self.dt)
        return State(positions, momenta, masses, state.cell, energy, forces, stress, state.step + 1)


class CSVR(VelocityVerlet):
    """NVT, Bussi stochastic velocity rescaling (time constant ``tau``, ASE time) before each velocity-Verlet
    step. The kinetic energy's distribution is canonical; the dynamics stay close to NVE."""

    def __init__(self, timestep: float, evaluate: Evaluate, temperature_K: float, tau: float):
        super().__init__(timestep, evaluate)
        self.kT = units.kB * temperature_K
        self.decay = math.exp(-timestep / tau)

    def step(self, state: State, generator=None) -> State:
        """alpha^2 = decay + s (R1^2 + sum Ri^2) + 2 R1 sqrt(decay s), s = (1 - decay) kT / (2 K), R ~ N(0, 1)
        per degree of freedom: Bussi's rescaling, in 13 tensor operations (each a launch of a replayed step)."""
        momenta = state.momenta
        ndof = degrees_of_freedom(len(state.masses))
        twice_kinetic = torch.dot(momenta.flatten(), (momenta / state.masses).flatten()).clamp_min(2e-300)
        scaling = twice_kinetic.reciprocal() * ((1.0 - self.decay) * self.kT)
        noise = torch.randn(ndof, generator=generator, dtype=momenta.dtype, device=momenta.device)
        cross = torch.sqrt(scaling * self.decay)
        alpha = torch.sqrt(torch.addcmul(scaling * torch.dot(noise, noise), noise[0], cross, value=2.0) + self.decay)
        return super().step(State(state.positions, alpha * momenta, state.masses, state.cell, state.energy,
                                  state.forces, state.stress, state.step))


class CellRescaling:
    """NPT around any thermostat: isotropic stochastic cell rescaling (Bernetti & Bussi 2020) before each step.

    ``pressure`` in eV/A^3, ``compressibility`` in A^3/eV (an estimate of the system's, which only sets how fast
    the volume relaxes), ``tau`` in ASE time. Positions and the cell scale by exp(eps/3), momenta by exp(-eps/3),
    driven by the pressure at the start of the step; the thermostat's step then evaluates forces and stress in
    the new cell (one evaluation per step; the first half kick uses the forces from before the small rescaling,
    as barostats that couple between force evaluations do).
    """

    def __init__(self, thermostat, temperature_K: float, pressure: float, compressibility: float, tau: float):
        self.thermostat = thermostat
        self.dt = thermostat.dt
        self.kT = units.kB * temperature_K
        self.target, self.beta, self.tau = pressure, compressibility, tau

    def step(self, state: State, generator=None) -> State:
        volume = torch.linalg.det(state.cell).abs()
        drive = -(self.beta / self.tau) * (self.target - pressure(state) - self.kT / volume) * self.dt
        noise = torch.randn((), generator=generator, dtype=volume.dtype, device=volume.device)
        eps = drive + torch.sqrt(2.0 * self.kT * self.beta * self.dt / (volume * self.tau)) * noise
        scale = torch.exp(eps / 3.0)
        scaled = State(state.positions * scale, state.momenta / scale, state.masses, state.cell * scale,
                       state.energy, state.forces, state.stress, state.step)
        return self.thermostat.step(scaled, generator)
