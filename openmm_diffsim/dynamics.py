"""Differentiable molecular dynamics in PyTorch: integrators, batched rollouts, adjoint gradients.

Short rollouts seeded from OpenMM snapshots are the seed paper's DiffSim
gradient: the loss (an RDF averaged over frames) is differentiated through
the integrator with respect to the pair potential's parameters.

* :class:`PairForces` -- forces of ``B`` replicas (``(B, N, 3)`` tensors) from a
  :class:`~openmm_diffsim.potentials.PairTable`, with a Verlet list that is
  rebuilt without grad when a particle has moved more than half the skin.
  Distances are recomputed with grad at every evaluation, so forces are
  differentiable with respect to positions and parameters.
* Integrators: :class:`VelocityVerlet` (NVE), :class:`NoseHooverChain` (NVT,
  Martyna–Tuckerman–Klein chain with a palindromic Trotter splitting) and
  :class:`LangevinBAOAB` (NVT, reparametrised noise regenerated from a seed).
* :func:`rollout` -- run ``n_steps`` and record frames; under autograd this is
  backpropagation through time.
* :func:`rollout_gradient` -- loss and parameter gradient of a frame-averaged
  observable, by ``"backprop"`` or ``"adjoint"``.

Splitting
---------
Every step has the form ``N K D K N`` (``N``: thermostat half step, identity
for NVE and BAOAB; ``K``: half kick with the force at the current positions;
``D``: drift, ``A O A`` for BAOAB). The rollout is evaluated in *segments*
that begin with a force evaluation, ``S_k = K N N K D`` with one force
``F(x_k)``, so that each segment holds exactly one force evaluation. Both
gradient methods run the same segments, so they agree to round-off.

Adjoint memory law
------------------
The adjoint keeps the ``F`` recorded frames (positions, ``F·B·N·3``
numbers; with ``keep_observable_graphs`` also the graphs of their
observables, ``O(F·B·pairs)``), the initial state, one state every
``checkpoint_every`` steps (none if ``None``), and the autograd graph of a
single step and of a single frame's observable. Peak memory is therefore
``O(B·N·(F + n_steps/checkpoint_every)) + O(one step)``: independent of the
number of steps for a fixed number of frames and without checkpoints. Backprop keeps the
graph of every step: ``O(n_steps·B·pairs)``.

Backward states are rebuilt by running the integrator backward in time
(every sub-step is inverted exactly: ``Φ_{-dt} = Φ_dt^{-1}``; for Langevin the
noise of each step is regenerated from the seed). Round-off in the reversal
grows with the Lyapunov exponent; checkpoints bound it and the largest
deviation seen at a checkpoint is reported as ``reversal_error``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from .neighbors import box_lengths, neighbor_pairs, pair_displacements
from .potentials import PairTable

__all__ = [
    "NonFiniteError",
    "PairForces",
    "Integrator",
    "VelocityVerlet",
    "NoseHooverChain",
    "LangevinBAOAB",
    "make_integrator",
    "RolloutState",
    "Rollout",
    "rollout",
    "rollout_gradient",
    "maxwell_boltzmann_velocities",
    "kinetic_energy",
    "BOLTZMANN",
]

#: Molar gas constant in kJ/mol/K (k_B in OpenMM's units).
BOLTZMANN = 8.31446261815324e-3

Thermostat = Tuple[Tensor, ...]


class NonFiniteError(RuntimeError):
    """A rollout or gradient produced NaN or infinite numbers (energies, forces or gradients)."""


# -- forces -------------------------------------------------------------------------------


class PairForces:
    """Forces on ``B`` replicas of one system from a :class:`PairTable`.

    The replicas share species and box; their pair lists are concatenated
    with index offsets so that one call of ``table.energy_and_forces``
    evaluates all of them.

    Parameters
    ----------
    table : PairTable
        The model (its parameters receive gradients).
    species : array_like, shape (N,) int
        Species index (into ``table.species``) of every particle.
    box : array_like or Tensor, shape (3,) or (3, 3)
        Rectangular box, nm.
    skin : float
        Verlet skin in nm. The list holds pairs within ``cutoff + skin`` and
        is rebuilt (without grad) when any particle has moved more than
        ``skin / 2`` since the last build, forward or backward in time.

    Attributes
    ----------
    builds : int
        Number of pair-list builds so far.
    evaluations : int
        Number of force evaluations so far.
    """

    def __init__(self, table: PairTable, species, box, skin: float = 0.1):
        if not isinstance(table, PairTable):
            raise TypeError(f"table must be a PairTable, got {type(table).__name__}")
        species_t = torch.as_tensor(np.asarray(species), dtype=torch.long).reshape(-1)
        if species_t.numel() < 2:
            raise ValueError("a rollout needs at least two particles")
        if int(species_t.min()) < 0 or int(species_t.max()) >= len(table.species):
            raise ValueError(f"species indices must lie in 0..{len(table.species) - 1} for species {table.species}")
        box_t = box if isinstance(box, Tensor) else torch.as_tensor(np.asarray(box, dtype=np.float64))
        self.lengths = box_lengths(box_t.detach().to(torch.float64))
        if bool((self.lengths < 2.0 * table.cutoff).any()):
            raise ValueError(
                f"cutoff {table.cutoff} nm is larger than half the shortest box edge {float(self.lengths.min()) / 2} nm"
            )
        if skin < 0:
            raise ValueError(f"skin must be non-negative, got {skin}")
        self.table = table
        self.species = species_t
        self.n_particles = int(species_t.numel())
        self.skin = float(skin)
        self.builds = 0
        self.evaluations = 0
        self._reference: Optional[Tensor] = None
        self._pairs: Optional[Tuple[Tensor, Tensor]] = None
        self._replica_pairs: List[Tuple[Tensor, Tensor]] = []
        self._image_shift: Optional[Tensor] = None
        self._pair_types: Optional[Tensor] = None
        # Fixed periodic images are exact while listed pairs stay closer than half the box.
        self._fixed_images = bool(table.cutoff + 2.0 * self.skin < 0.5 * float(self.lengths.min()))

    def _check_shape(self, positions: Tensor) -> None:
        if positions.dim() != 3 or positions.shape[1] != self.n_particles or positions.shape[2] != 3:
            raise ValueError(f"positions must have shape (B, {self.n_particles}, 3), got {tuple(positions.shape)}")

    def pairs(self, positions: Tensor) -> Tuple[Tensor, Tensor]:
        """Concatenated half pair list of all replicas for ``positions`` (B, N, 3)."""
        self._check_shape(positions)
        x = positions.detach()
        rebuild = self._reference is None or self._reference.shape != x.shape or self._reference.dtype != x.dtype
        if not rebuild:
            moved = x - self._reference
            rebuild = float((moved * moved).sum(-1).max()) > (0.5 * self.skin) ** 2
        if rebuild:
            lengths = self.lengths.to(x.dtype)
            found_i, found_j, per_replica = [], [], []
            for b in range(x.shape[0]):
                i, j = neighbor_pairs(x[b], lengths, self.table.cutoff + self.skin)
                per_replica.append((i, j))
                found_i.append(i + b * self.n_particles)
                found_j.append(j + b * self.n_particles)
            i, j = torch.cat(found_i), torch.cat(found_j)
            flat = x.reshape(-1, 3)
            # Until the next rebuild no particle moves more than skin/2, so each
            # listed pair keeps its periodic image as long as its separation stays
            # below half the box: fix the image shift now, skip rounding per step.
            self._image_shift = lengths * torch.round((flat[j] - flat[i]) / lengths)
            self._pair_types = self.table.pair_types(
                self.species[i % self.n_particles], self.species[j % self.n_particles]
            )
            self._pairs = (i, j)
            self._replica_pairs = per_replica
            self._reference = x.clone()
            self.builds += 1
        return self._pairs

    def __call__(self, positions: Tensor) -> Tensor:
        """Forces (B, N, 3) in kJ/mol/nm, differentiable w.r.t. positions and parameters.

        Uses ``table.energy_and_derivative`` (the package's one pair-energy
        definition, cutoff applied) on the listed pairs; pairs of the skin
        beyond the cutoff get zero force from it.

        Raises
        ------
        NonFiniteError
            If any force component is NaN or infinite.
        """
        i, j = self.pairs(positions)
        flat = positions.reshape(-1, 3)
        if self._fixed_images:
            dr = flat[j] - flat[i] - self._image_shift
        else:
            dr = pair_displacements(flat, i, j, self.lengths.to(positions.dtype))
        r = torch.sqrt((dr * dr).sum(1))
        _, du = self.table.energy_and_derivative(r, self._pair_types)
        # Force on j is -du/dr * dr/r, on i the opposite.
        f_pair = (du / r).unsqueeze(1) * dr
        forces = torch.zeros_like(flat).index_add(0, i, f_pair).index_add(0, j, -f_pair)
        self.evaluations += 1
        if not bool(torch.isfinite(forces.detach()).all()):
            raise NonFiniteError("non-finite forces in the rollout (particles overlapping or the potential diverged)")
        return forces.reshape(positions.shape)

    def energies(self, positions: Tensor) -> Tensor:
        """Potential energy of every replica, shape (B,), kJ/mol."""
        self.pairs(positions)
        lengths = self.lengths.to(positions.dtype)
        out = []
        for b, (i, j) in enumerate(self._replica_pairs):
            energy, _ = self.table.energy_and_forces(positions[b], lengths, self.species, i, j, False)
            out.append(energy)
        return torch.stack(out)


# -- integrators --------------------------------------------------------------------------


def kinetic_energy(velocities: Tensor, masses: Tensor) -> Tensor:
    """Kinetic energy per replica, shape (B,), kJ/mol, for velocities (B, N, 3) and masses (N,) amu."""
    return 0.5 * (masses.reshape(1, -1, 1) * velocities * velocities).sum((1, 2))


def maxwell_boltzmann_velocities(
    masses, temperature: float, n_replicas: int, seed: int = 0, dtype: torch.dtype = torch.float64
) -> Tensor:
    """Velocities (B, N, 3) in nm/ps from the Maxwell–Boltzmann distribution, centre-of-mass motion removed."""
    masses_t = torch.as_tensor(np.asarray(masses, dtype=np.float64))
    generator = torch.Generator().manual_seed(int(seed))
    sigma = torch.sqrt(BOLTZMANN * float(temperature) / masses_t).reshape(1, -1, 1)
    v = torch.randn((n_replicas, masses_t.shape[0], 3), generator=generator, dtype=torch.float64) * sigma
    momentum = (masses_t.reshape(1, -1, 1) * v).sum(1, keepdim=True) / masses_t.sum()
    return (v - momentum).to(dtype)


class Integrator:
    """Base class: a time-reversible splitting ``N K D K N`` (see the module docstring).

    Subclasses override the thermostat half step ``N`` and the drift ``D``;
    each must be exactly inverted by running it with ``-dt`` (``N``) or by
    :meth:`undrift` (``D``).

    Parameters
    ----------
    timestep : float
        Time step in ps.
    """

    name = "base"

    def __init__(self, timestep: float):
        timestep = float(timestep)
        if not math.isfinite(timestep) or timestep <= 0:
            raise ValueError(f"timestep must be a positive number of ps, got {timestep}")
        self.timestep = timestep

    def initial_thermostat(self, n_replicas: int, n_particles: int, dtype: torch.dtype) -> Thermostat:
        """Thermostat variables at the start of a rollout (empty for NVE)."""
        return ()

    def thermostat_half(
        self, v: Tensor, thermostat: Thermostat, masses: Tensor, dt: float
    ) -> Tuple[Tensor, Thermostat]:
        """Thermostat propagation over ``dt / 2`` (``dt`` signed; ``-dt`` inverts ``dt``)."""
        return v, thermostat

    def drift(self, x: Tensor, v: Tensor, masses: Tensor, step: int) -> Tuple[Tensor, Tensor]:
        """Force-free middle of step ``step``: positions over a full ``dt``."""
        return x + self.timestep * v, v

    def undrift(self, x: Tensor, v: Tensor, masses: Tensor, step: int) -> Tuple[Tensor, Tensor]:
        """Exact inverse of :meth:`drift`."""
        return x - self.timestep * v, v

    def thermostat_energy(self, thermostat: Thermostat, n_particles: int) -> Tensor:
        """Energy of the thermostat variables per replica (for the conserved quantity), kJ/mol."""
        return torch.zeros(())


class VelocityVerlet(Integrator):
    """Velocity Verlet, NVE. ``timestep`` in ps."""

    name = "nve"


class NoseHooverChain(Integrator):
    """Nosé–Hoover chain thermostat (NVT), Martyna–Tuckerman–Klein splitting.

    The chain half step is a palindrome of exact sub-flows, so the whole
    step is time-reversible: running it with ``-dt`` undoes it.

    Parameters
    ----------
    timestep : float
        ps.
    temperature : float
        K.
    relaxation_time : float
        Thermostat period τ in ps; masses ``Q_1 = N_f k T τ²``, ``Q_i = k T τ²``.
    chain_length : int
        Number of thermostats M in the chain.
    n_constraints : int
        Degrees of freedom removed from ``3 N`` (3 for zero total momentum).
    """

    name = "nose-hoover"

    def __init__(
        self,
        timestep: float,
        temperature: float,
        relaxation_time: float = 0.1,
        chain_length: int = 3,
        n_constraints: int = 3,
    ):
        super().__init__(timestep)
        temperature = float(temperature)
        if not math.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"temperature must be positive (K), got {temperature}")
        if not relaxation_time > 0:
            raise ValueError(f"relaxation_time must be positive (ps), got {relaxation_time}")
        if int(chain_length) < 1:
            raise ValueError(f"chain_length must be at least 1, got {chain_length}")
        self.temperature = temperature
        self.kT = BOLTZMANN * temperature
        self.relaxation_time = float(relaxation_time)
        self.chain_length = int(chain_length)
        self.n_constraints = int(n_constraints)

    def _dof_and_masses(self, n_particles: int) -> Tuple[float, List[float]]:
        n_dof = float(3 * n_particles - self.n_constraints)
        tau2 = self.relaxation_time**2
        return n_dof, [n_dof * self.kT * tau2] + [self.kT * tau2] * (self.chain_length - 1)

    def initial_thermostat(self, n_replicas: int, n_particles: int, dtype: torch.dtype) -> Thermostat:
        zeros = torch.zeros(n_replicas, dtype=dtype)
        # (ξ_1..ξ_M, v_ξ1..v_ξM), each (B,)
        return tuple(zeros.clone() for _ in range(2 * self.chain_length))

    def thermostat_half(
        self, v: Tensor, thermostat: Thermostat, masses: Tensor, dt: float
    ) -> Tuple[Tensor, Thermostat]:
        m = self.chain_length
        n_dof, q = self._dof_and_masses(v.shape[1])
        xi = list(thermostat[:m])
        vxi = list(thermostat[m:])
        delta = 0.5 * dt
        kT = self.kT
        twice_kinetic = (masses.reshape(1, -1, 1) * v * v).sum((1, 2))

        def force_on(i: int) -> Tensor:
            if i == 0:
                return (twice_kinetic - n_dof * kT) / q[0]
            return (q[i - 1] * vxi[i - 1] * vxi[i - 1] - kT) / q[i]

        def update(i: int) -> None:
            if i < m - 1:
                scale = torch.exp(-0.25 * delta * vxi[i + 1])
                vxi[i] = (vxi[i] * scale + 0.5 * delta * force_on(i)) * scale
            else:
                vxi[i] = vxi[i] + 0.5 * delta * force_on(i)

        for i in reversed(range(m)):
            update(i)
        scale = torch.exp(-delta * vxi[0])
        v = v * scale.reshape(-1, 1, 1)
        twice_kinetic = twice_kinetic * scale * scale
        xi = [xi[i] + delta * vxi[i] for i in range(m)]
        for i in range(m):
            update(i)
        return v, tuple(xi) + tuple(vxi)

    def thermostat_energy(self, thermostat: Thermostat, n_particles: int) -> Tensor:
        m = self.chain_length
        n_dof, q = self._dof_and_masses(n_particles)
        xi, vxi = thermostat[:m], thermostat[m:]
        energy = n_dof * self.kT * xi[0]
        for i in range(m):
            energy = energy + 0.5 * q[i] * vxi[i] * vxi[i]
            if i > 0:
                energy = energy + self.kT * xi[i]
        return energy


class LangevinBAOAB(Integrator):
    """Langevin dynamics, BAOAB splitting (NVT), with reparametrised noise.

    The noise of step ``k`` is drawn from a generator seeded with
    ``(seed, k)``, so it is a fixed function of the seed: gradients flow
    through the deterministic part, and the backward pass of the adjoint
    regenerates the same noise instead of storing it.

    Parameters
    ----------
    timestep : float
        ps.
    temperature : float
        K.
    friction : float
        Collision rate γ in 1/ps.
    seed : int
        Noise seed.
    """

    name = "langevin"

    def __init__(self, timestep: float, temperature: float, friction: float = 1.0, seed: int = 0):
        super().__init__(timestep)
        temperature = float(temperature)
        if not math.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"temperature must be positive (K), got {temperature}")
        if not friction > 0:
            raise ValueError(f"friction must be positive (1/ps), got {friction}")
        self.temperature = temperature
        self.kT = BOLTZMANN * temperature
        self.friction = float(friction)
        self.seed = int(seed)
        self.c1 = math.exp(-self.friction * self.timestep)
        self.c2 = math.sqrt(1.0 - self.c1 * self.c1)

    def noise(self, step: int, shape, dtype: torch.dtype, masses: Tensor) -> Tensor:
        """The scaled noise ``c2 sqrt(kT/m) ξ_k`` of step ``step``, shape (B, N, 3)."""
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + int(step)) % (2**63 - 1))
        xi = torch.randn(tuple(shape), generator=generator, dtype=torch.float64).to(dtype)
        return self.c2 * torch.sqrt(self.kT / masses).reshape(1, -1, 1).to(dtype) * xi

    def drift(self, x: Tensor, v: Tensor, masses: Tensor, step: int) -> Tuple[Tensor, Tensor]:
        half = 0.5 * self.timestep
        x = x + half * v
        v = self.c1 * v + self.noise(step, v.shape, v.dtype, masses)
        return x + half * v, v

    def undrift(self, x: Tensor, v: Tensor, masses: Tensor, step: int) -> Tuple[Tensor, Tensor]:
        half = 0.5 * self.timestep
        x = x - half * v
        v = (v - self.noise(step, v.shape, v.dtype, masses)) / self.c1
        return x - half * v, v


def make_integrator(
    name: str,
    timestep: float,
    temperature: Optional[float] = None,
    seed: int = 0,
    **options,
) -> Integrator:
    """An integrator by name: ``"nve"`` (velocity Verlet), ``"nose-hoover"`` or ``"langevin"``."""
    key = str(name).lower().replace("_", "-")
    if key in ("nve", "verlet", "velocity-verlet"):
        return VelocityVerlet(timestep)
    if temperature is None and key in ("nose-hoover", "nvt", "nhc", "langevin", "baoab"):
        raise ValueError(f"integrator {name!r} needs a temperature (K)")
    if key in ("nose-hoover", "nvt", "nhc"):
        return NoseHooverChain(timestep, temperature, **options)
    if key in ("langevin", "baoab"):
        return LangevinBAOAB(timestep, temperature, seed=seed, **options)
    raise ValueError(f"integrator must be 'nve', 'nose-hoover' or 'langevin', got {name!r}")


# -- rollouts -----------------------------------------------------------------------------


@dataclass
class RolloutState:
    """Dynamical state of ``B`` replicas.

    Attributes
    ----------
    positions : Tensor, shape (B, N, 3)
        nm.
    velocities : Tensor, shape (B, N, 3)
        nm/ps.
    thermostat : tuple of Tensor
        Integrator-specific extra variables (Nosé–Hoover: ξ_i and v_ξi, each (B,)).
    """

    positions: Tensor
    velocities: Tensor
    thermostat: Thermostat = ()

    def detach(self) -> RolloutState:
        return RolloutState(
            self.positions.detach(), self.velocities.detach(), tuple(t.detach() for t in self.thermostat)
        )


@dataclass
class Rollout:
    """Result of :func:`rollout`.

    Attributes
    ----------
    frames : list of Tensor, each (B, N, 3)
        Positions after steps ``record_every, 2 record_every, ...`` (nm).
    final : RolloutState
        State after the last step (full step: velocities at the positions).
    steps_run : int
    force_evaluations : int
    """

    frames: List[Tensor]
    final: RolloutState
    steps_run: int
    force_evaluations: int


class _Engine:
    """Segment arithmetic shared by rollouts and both gradient methods."""

    def __init__(self, forces: PairForces, masses: Tensor, integrator: Integrator):
        self.forces = forces
        self.masses = masses
        self.inverse_masses = (1.0 / masses).reshape(1, -1, 1)
        self.integrator = integrator
        self.half = 0.5 * integrator.timestep

    def segment(self, x, v, thermostat, force, step: int):
        """``K N`` (closing step ``step - 1``) then ``N K D`` (step ``step``), one force ``F(x_step)``."""
        integrator, masses, dt = self.integrator, self.masses, self.integrator.timestep
        kick = self.half * force * self.inverse_masses
        if step > 0:
            v = v + kick
            v, thermostat = integrator.thermostat_half(v, thermostat, masses, dt)
        v, thermostat = integrator.thermostat_half(v, thermostat, masses, dt)
        v = v + kick
        x, v = integrator.drift(x, v, masses, step)
        return x, v, thermostat

    def unsegment_tail(self, v, thermostat, force, step: int):
        """Given the undrifted velocity and ``F(x_step)``, undo ``K N N K`` (step > 0)."""
        integrator, masses, dt = self.integrator, self.masses, self.integrator.timestep
        kick = self.half * force * self.inverse_masses
        v = v - kick
        v, thermostat = integrator.thermostat_half(v, thermostat, masses, -dt)
        v, thermostat = integrator.thermostat_half(v, thermostat, masses, -dt)
        return v - kick, thermostat

    def finish(self, x, v, thermostat, force):
        v = v + self.half * force * self.inverse_masses
        v, thermostat = self.integrator.thermostat_half(v, thermostat, self.masses, self.integrator.timestep)
        return RolloutState(x, v, thermostat)


def _prepare(forces: PairForces, masses, integrator: Integrator, positions: Tensor, velocities: Tensor, thermostat):
    if not isinstance(positions, Tensor) or not positions.is_floating_point():
        raise TypeError("positions must be a floating-point tensor (B, N, 3)")
    if positions.dim() == 2:
        positions = positions.unsqueeze(0)
    if velocities.dim() == 2:
        velocities = velocities.unsqueeze(0)
    forces._check_shape(positions)
    if velocities.shape != positions.shape:
        raise ValueError(f"velocities {tuple(velocities.shape)} must match positions {tuple(positions.shape)}")
    velocities = velocities.to(positions.dtype)
    if not bool(torch.isfinite(positions).all()) or not bool(torch.isfinite(velocities).all()):
        raise ValueError("initial positions or velocities contain NaN or infinite values")
    masses_t = torch.as_tensor(np.asarray(masses, dtype=np.float64)).reshape(-1)
    if masses_t.shape[0] != positions.shape[1]:
        raise ValueError(f"masses has {masses_t.shape[0]} entries but there are {positions.shape[1]} particles")
    if not bool((masses_t > 0).all()):
        raise ValueError("masses must be positive (amu)")
    engine = _Engine(forces, masses_t.to(positions.dtype), integrator)
    if thermostat is None:
        thermostat = integrator.initial_thermostat(positions.shape[0], positions.shape[1], positions.dtype)
    return engine, positions, velocities, tuple(thermostat)


def _check_counts(n_steps: int, record_every: int) -> None:
    if int(n_steps) != n_steps or n_steps < 1:
        raise ValueError(f"n_steps must be a positive integer, got {n_steps}")
    if int(record_every) != record_every or record_every < 1:
        raise ValueError(f"record_every must be a positive integer, got {record_every}")
    if record_every > n_steps:
        raise ValueError(f"record_every ({record_every}) exceeds n_steps ({n_steps}): no frame would be recorded")


def rollout(
    forces: PairForces,
    masses,
    integrator: Integrator,
    positions: Tensor,
    velocities: Tensor,
    n_steps: int,
    record_every: int = 1,
    thermostat: Optional[Thermostat] = None,
) -> Rollout:
    """Integrate ``B`` replicas for ``n_steps`` and record positions every ``record_every`` steps.

    Differentiable: with grad enabled, the frames depend on the table's
    parameters through every force evaluation (backpropagation through time).

    Parameters
    ----------
    forces : PairForces
    masses : array_like, shape (N,)
        amu.
    integrator : Integrator
    positions, velocities : Tensor, shape (B, N, 3) or (N, 3)
        Initial state (nm, nm/ps); the dtype of ``positions`` is used throughout.
    n_steps, record_every : int
    thermostat : tuple of Tensor, optional
        Initial thermostat variables (default: at rest).

    Raises
    ------
    NonFiniteError
        If forces or positions become non-finite; the message names the step.
    """
    _check_counts(n_steps, record_every)
    engine, x, v, th = _prepare(forces, masses, integrator, positions, velocities, thermostat)
    start = forces.evaluations
    frames: List[Tensor] = []
    for step in range(int(n_steps)):
        f = _forces_at(forces, x, step)
        x, v, th = engine.segment(x, v, th, f, step)
        if (step + 1) % record_every == 0:
            frames.append(x)
    final = engine.finish(x, v, th, _forces_at(forces, x, n_steps))
    return Rollout(frames, final, int(n_steps), forces.evaluations - start)


def _forces_at(forces: PairForces, x: Tensor, step: int) -> Tensor:
    try:
        return forces(x)
    except NonFiniteError as exc:
        raise NonFiniteError(f"step {step}: {exc}") from None


@dataclass
class GradientResult:
    """Loss, parameter gradients and diagnostics of :func:`rollout_gradient`."""

    loss: float
    gradients: List[Optional[Tensor]]
    observable: Tensor
    diagnostics: Dict[str, float] = field(default_factory=dict)


def rollout_gradient(
    forces: PairForces,
    masses,
    integrator: Integrator,
    positions: Tensor,
    velocities: Tensor,
    n_steps: int,
    record_every: int,
    observable: Callable[[Tensor], Tensor],
    loss: Callable[[Tensor], Tensor],
    parameters: Sequence[Tensor],
    method: str = "backprop",
    checkpoint_every: Optional[int] = 50,
    keep_observable_graphs: bool = False,
) -> GradientResult:
    """Gradient of ``loss(mean over frames of observable(frame))`` with respect to ``parameters``.

    Parameters
    ----------
    forces, masses, integrator, positions, velocities, n_steps, record_every
        As in :func:`rollout`.
    observable : callable
        ``observable(positions (B, N, 3)) -> Tensor`` of one frame (e.g. the
        replica-averaged RDFs, shape (T, n_bins)); differentiable in positions.
    loss : callable
        ``loss(mean_observable) -> Tensor ()``.
    parameters : sequence of Tensor
        The tensors to differentiate with respect to (e.g. ``table.parameters()``).
    method : {"backprop", "adjoint"}
        ``backprop`` keeps the graph of the whole rollout; ``adjoint`` rebuilds
        states by integrating backward and keeps one step's graph (module
        docstring for the memory law).
    checkpoint_every : int or None
        Adjoint only: store the state every this many steps and restart the
        backward reconstruction from it (bounds reversal round-off). ``None``:
        no checkpoints, memory independent of ``n_steps``.
    keep_observable_graphs : bool
        Adjoint only: keep each frame's observable graph from the forward pass
        (faster: no second pair search per frame) instead of recomputing it in
        the backward pass (less memory: only the frame positions are kept).

    Returns
    -------
    GradientResult
        ``gradients`` aligned with ``parameters`` (None where unused);
        diagnostics: ``steps_run``, ``force_evaluations``, ``pair_list_builds``,
        ``reversal_error`` (adjoint, nm, largest deviation at a checkpoint).

    Raises
    ------
    NonFiniteError
        Non-finite forces during the rollout, or a non-finite loss or gradient.
    """
    _check_counts(n_steps, record_every)
    parameters = list(parameters)
    if method == "backprop":
        result = _backprop(
            forces, masses, integrator, positions, velocities, n_steps, record_every, observable, loss, parameters
        )
    elif method == "adjoint":
        if checkpoint_every is not None and (int(checkpoint_every) != checkpoint_every or checkpoint_every < 1):
            raise ValueError(f"checkpoint_every must be a positive integer or None, got {checkpoint_every}")
        result = _adjoint(
            forces,
            masses,
            integrator,
            positions,
            velocities,
            n_steps,
            record_every,
            observable,
            loss,
            parameters,
            checkpoint_every,
            keep_observable_graphs,
        )
    else:
        raise ValueError(f"method must be 'backprop' or 'adjoint', got {method!r}")
    if not math.isfinite(result.loss):
        raise NonFiniteError(f"the rollout loss is not finite ({result.loss})")
    for p, g in zip(parameters, result.gradients, strict=False):
        if g is not None and not bool(torch.isfinite(g).all()):
            raise NonFiniteError(f"non-finite gradient for a parameter of shape {tuple(p.shape)}")
    return result


def _backprop(forces, masses, integrator, positions, velocities, n_steps, record_every, observable, loss, parameters):
    builds = forces.builds
    with torch.enable_grad():
        run = rollout(forces, masses, integrator, positions.detach(), velocities.detach(), n_steps, record_every)
        mean = torch.stack([observable(frame) for frame in run.frames]).mean(0)
        value = loss(mean)
        if not bool(torch.isfinite(value.detach())):
            raise NonFiniteError(f"the rollout loss is not finite ({float(value)})")
        wanted = [p for p in parameters if p.requires_grad]
        grads = torch.autograd.grad(value, wanted, allow_unused=True) if wanted else ()
    by_id = {id(p): g for p, g in zip(wanted, grads, strict=False)}
    return GradientResult(
        float(value.detach()),
        [by_id.get(id(p)) for p in parameters],
        mean.detach(),
        {
            "steps_run": float(run.steps_run),
            "force_evaluations": float(run.force_evaluations),
            "pair_list_builds": float(forces.builds - builds),
        },
    )


def _adjoint(
    forces,
    masses,
    integrator,
    positions,
    velocities,
    n_steps,
    record_every,
    observable,
    loss,
    parameters,
    checkpoint_every,
    keep_observable_graphs,
):
    evaluations, builds = forces.evaluations, forces.builds
    wanted = [p for p in parameters if p.requires_grad]
    with torch.no_grad():
        engine, x, v, th = _prepare(forces, masses, integrator, positions.detach(), velocities.detach(), None)
        start = RolloutState(x, v, th)
        checkpoints: Dict[int, RolloutState] = {}
        # Per recorded frame: positions and observable (with its graph to the
        # positions if keep_observable_graphs, else recomputed in the backward pass).
        frames: Dict[int, Tuple[Tensor, Tensor]] = {}
        for step in range(int(n_steps)):
            if checkpoint_every is not None and step > 0 and step % checkpoint_every == 0:
                checkpoints[step] = RolloutState(x, v, th)
            f = _forces_at(forces, x, step)
            x, v, th = engine.segment(x, v, th, f, step)
            if (step + 1) % record_every == 0:
                if keep_observable_graphs:
                    with torch.enable_grad():
                        leaf = x.detach().requires_grad_(True)
                        frames[step + 1] = (leaf, observable(leaf))
                else:
                    frames[step + 1] = (x, observable(x))
        if not bool(torch.isfinite(x).all()) or not bool(torch.isfinite(v).all()):
            raise NonFiniteError(f"the rollout became non-finite by step {n_steps}")
    with torch.enable_grad():
        mean = torch.stack([obs.detach() for _, obs in frames.values()]).mean(0).requires_grad_(True)
        value = loss(mean)
        (cotangent,) = torch.autograd.grad(value, mean)
    if not bool(torch.isfinite(value.detach())):
        raise NonFiniteError(f"the rollout loss is not finite ({float(value)})")
    cotangent = cotangent / len(frames)

    grads: List[Optional[Tensor]] = [None] * len(wanted)
    a_x = torch.zeros_like(x)
    a_v = torch.zeros_like(v)
    a_th = [torch.zeros_like(t) for t in th]
    reversal_error = 0.0
    for step in reversed(range(int(n_steps))):
        # (x, v, th) is the output of segment `step`; add the frame's direct contribution.
        if (step + 1) in frames:
            leaf, obs = frames.pop(step + 1)  # frees the frame's graph once used
            if not keep_observable_graphs:
                with torch.enable_grad():
                    leaf = leaf.detach().requires_grad_(True)
                    obs = observable(leaf)
            # The observable may depend on θ directly (e.g. the virial pressure
            # through u'), not only through the positions.
            frame_grads = torch.autograd.grad(obs, [leaf] + wanted, cotangent, allow_unused=True)
            a_x = a_x + _or_zeros(frame_grads[0], leaf)
            for k, g in enumerate(frame_grads[1:]):
                if g is not None:
                    grads[k] = g if grads[k] is None else grads[k] + g
        with torch.no_grad():
            x_prev, v_mid = integrator.undrift(x, v, engine.masses, step)
        stored = start if step == 0 else checkpoints.get(step)
        if stored is not None:
            reversal_error = max(reversal_error, float((x_prev - stored.positions).abs().max()))
            x_prev = stored.positions
        with torch.enable_grad():
            x_leaf = x_prev.detach().requires_grad_(True)
            f = _forces_at(forces, x_leaf, step)
            if stored is not None:
                v_prev, th_prev = stored.velocities, stored.thermostat
            else:
                with torch.no_grad():
                    v_prev, th_prev = engine.unsegment_tail(v_mid, th, f.detach(), step)
            v_leaf = v_prev.detach().requires_grad_(True)
            th_leaf = tuple(t.detach().requires_grad_(True) for t in th_prev)
            x_out, v_out, th_out = engine.segment(x_leaf, v_leaf, th_leaf, f, step)
            outputs = [x_out, v_out] + list(th_out)
            cotangents = [a_x, a_v] + a_th
            inputs = [x_leaf, v_leaf] + list(th_leaf) + wanted
            result = torch.autograd.grad(outputs, inputs, cotangents, allow_unused=True)
        a_x = _or_zeros(result[0], x_leaf)
        a_v = _or_zeros(result[1], v_leaf)
        a_th = [_or_zeros(g, t) for g, t in zip(result[2 : 2 + len(th_leaf)], th_leaf, strict=False)]
        for k, g in enumerate(result[2 + len(th_leaf) :]):
            if g is not None:
                grads[k] = g if grads[k] is None else grads[k] + g
        x, v, th = x_prev.detach(), v_prev.detach(), tuple(t.detach() for t in th_prev)
    by_id = {id(p): g for p, g in zip(wanted, grads, strict=False)}
    return GradientResult(
        float(value.detach()),
        [by_id.get(id(p)) for p in parameters],
        mean.detach(),
        {
            "steps_run": float(n_steps),
            "force_evaluations": float(forces.evaluations - evaluations),
            "pair_list_builds": float(forces.builds - builds),
            "reversal_error": reversal_error,
        },
    )


def _or_zeros(grad: Optional[Tensor], like: Tensor) -> Tensor:
    return torch.zeros_like(like) if grad is None else grad
