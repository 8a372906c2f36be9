"""Total pair energy and forces of a configuration, for OpenMM and for training.

:func:`pair_energy_and_forces` is the one energy definition: the TorchForce
module (:class:`PairEnergy`), the differentiable rollouts and the sampler's
checks all call it. Forces are assembled from the closed-form du/dr of the
potentials, so they are exact, cheap and differentiable with respect to the
potential's parameters.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .neighbors import VerletList, box_lengths, neighbor_pairs
from .potentials import PairTable

__all__ = ["pair_energy_and_forces", "potential_energy", "PairEnergy"]


def pair_energy_and_forces(
    table: PairTable,
    positions: Tensor,
    lengths: Tensor,
    species: Tensor,
    pair_i: Tensor,
    pair_j: Tensor,
    compute_forces: bool = True,
) -> Tuple[Tensor, Tensor]:
    """Energy and forces of a configuration from a pair list.

    Parameters
    ----------
    table : PairTable
        The pair potentials.
    positions : Tensor, shape (N, 3)
        Positions in nm (float32 or float64).
    lengths : Tensor, shape (3,)
        Rectangular box edge lengths in nm.
    species : Tensor, shape (N,) int64
        Species index of every particle.
    pair_i, pair_j : Tensor, shape (P,)
        Candidate pairs (e.g. a Verlet list); pairs beyond the cutoff contribute zero.
    compute_forces : bool
        If False the returned forces are an empty tensor.

    Returns
    -------
    energy : Tensor, shape ()
        Potential energy in kJ/mol.
    forces : Tensor, shape (N, 3)
        Forces in kJ/mol/nm.
    """
    return table.energy_and_forces(positions, lengths, species, pair_i, pair_j, compute_forces)


def potential_energy(table: PairTable, positions: Tensor, box: Tensor, species: Tensor) -> Tensor:
    """Potential energy of one configuration (kJ/mol), differentiable in positions and parameters.

    Builds a fresh pair list; for repeated calls use :class:`PairEnergy` or a
    :class:`~openmm_diffsim.neighbors.VerletList`.
    """
    lengths = box_lengths(box.to(positions.dtype))
    i, j = neighbor_pairs(positions, lengths, table.cutoff)
    return pair_energy_and_forces(table, positions, lengths, species, i, j, compute_forces=False)[0]


class PairEnergy(torch.nn.Module):
    """TorchScript energy module for openmm-torch: ``forward(positions, boxvectors)``.

    Returns ``(energy, forces)`` so the ``TorchForce`` is built with
    ``setOutputsForces(True)`` and no autograd pass runs per step. Keeps a
    Verlet list between calls; accepts float32 (CUDA single/mixed) and float64
    (CPU/Reference) positions, unwrapped or wrapped.

    The pair potential may act on a subset of the System's particles
    (``atoms``) and skip listed pairs (``exclusions``, e.g. bonded
    neighbours), so it can sit next to a user's other forces. Without either,
    the module runs exactly the all-particle code path.

    Parameters
    ----------
    table : PairTable
        The pair potentials and cutoff.
    species : sequence of int, length M
        Species index (into ``table.species``) of every particle the potential
        acts on: all N particles of the System, or the M particles in ``atoms``.
    skin : float
        Verlet skin in nm.
    atoms : sequence of int, length M, optional
        System indices of the particles the potential acts on (distinct, any
        order). Default: particles 0..M-1.
    n_particles : int, optional
        Number of particles in the System (the length of ``positions`` that
        OpenMM passes in). Required with ``atoms``; default M.
    exclusions : array_like of int, shape (E, 2), optional
        Pairs of System indices (both in ``atoms``) that do not interact.

    Attributes
    ----------
    n_particles : int
        Particles in the System (rows of ``positions`` and of the forces).
    n_selected : int
        Particles the potential acts on (M).
    """

    def __init__(
        self,
        table: PairTable,
        species,
        skin: float = 0.1,
        atoms=None,
        n_particles: Optional[int] = None,
        exclusions=None,
    ):
        super().__init__()
        species_t = torch.as_tensor(species, dtype=torch.long).reshape(-1)
        if species_t.numel() == 0:
            raise ValueError("species must list at least one particle")
        if int(species_t.min()) < 0 or int(species_t.max()) >= len(table.species):
            raise ValueError(
                f"species indices must lie in 0..{len(table.species) - 1} for species {table.species}, "
                f"got range {int(species_t.min())}..{int(species_t.max())}"
            )
        n_selected = int(species_t.numel())
        atoms_t, n_system = _check_atoms(atoms, n_particles, n_selected)
        excluded_keys = _exclusion_keys(exclusions, atoms_t, n_system)
        self.table = table
        self.register_buffer("species", species_t)
        self.neighbors = VerletList(table.cutoff, skin)
        self.n_particles = n_system
        self.n_selected = n_selected
        # Both flags are fixed at construction: with neither set, forward() is
        # the plain all-particle path (no gathers, no pair filtering).
        self.uses_subset = not (n_system == n_selected and bool((atoms_t == torch.arange(n_selected)).all()))
        self.uses_exclusions = int(excluded_keys.numel()) > 0
        self.register_buffer("atoms", atoms_t)
        # Excluded pairs as sorted keys i * M + j (local indices, i < j). The
        # Verlet list is filtered once per rebuild, never per step.
        self.register_buffer("excluded_keys", excluded_keys)
        self.register_buffer("filtered_i", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("filtered_j", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("filtered_build", torch.full((), -1, dtype=torch.long), persistent=False)

    def forward(self, positions: Tensor, boxvectors: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        if positions.dim() != 2 or positions.shape[1] != 3:
            raise ValueError("positions must have shape (N, 3)")
        if positions.shape[0] != self.n_particles:
            raise ValueError(
                "number of positions does not match the species array (or n_particles) given to PairEnergy: "
                + str(positions.shape[0])
                + " vs "
                + str(self.n_particles)
            )
        if boxvectors is None:
            raise ValueError("PairEnergy needs periodic box vectors (use setUsesPeriodicBoundaryConditions(True))")
        if not bool(torch.isfinite(positions).all()):
            raise ValueError("positions contain NaN or infinite values")
        lengths = box_lengths(boxvectors.to(positions.dtype))
        if bool((lengths < 2.0 * self.table.cutoff).any()):
            raise ValueError(
                "cutoff "
                + str(self.table.cutoff)
                + " nm is larger than half the shortest box edge "
                + str(float(lengths.min()))
                + " nm"
            )
        # openmm-torch hands in positions with requires_grad=True; forces are
        # computed in closed form, and recording a graph would cost ~5x.
        positions = positions.detach()
        species = self.species.to(positions.device)
        if not self.uses_subset and not self.uses_exclusions:
            i, j = self.neighbors(positions, lengths)
            return self.table.energy_and_forces(positions, lengths, species, i, j, True)
        selected = positions
        if self.uses_subset:
            selected = positions.index_select(0, self.atoms.to(positions.device))
        i, j = self.neighbors(selected, lengths)
        if self.uses_exclusions:
            i, j = self._without_exclusions(i, j)
        energy, forces = self.table.energy_and_forces(selected, lengths, species, i, j, True)
        if self.uses_subset:
            forces = torch.zeros_like(positions).index_copy(0, self.atoms.to(positions.device), forces)
        return energy, forces

    def _without_exclusions(self, i: Tensor, j: Tensor) -> Tuple[Tensor, Tensor]:
        builds = self.neighbors.builds
        if bool(self.filtered_build != builds) or self.filtered_i.device != i.device:
            keys = self.excluded_keys.to(i.device)
            keep = torch.logical_not(torch.isin(i * self.n_selected + j, keys))
            self.filtered_i = i[keep]
            self.filtered_j = j[keep]
            self.filtered_build = builds.clone()
        return self.filtered_i, self.filtered_j


def _check_atoms(atoms, n_particles: Optional[int], n_selected: int) -> Tuple[Tensor, int]:
    """Validate the particle selection; returns (atoms (M,) int64, number of System particles)."""
    if atoms is None:
        n_system = n_selected if n_particles is None else int(n_particles)
        if n_system != n_selected:
            raise ValueError(
                f"species lists {n_selected} particles but n_particles is {n_system}: "
                "give atoms (which particles the potential acts on)"
            )
        return torch.arange(n_selected, dtype=torch.long), n_system
    if n_particles is None:
        raise ValueError("atoms needs n_particles (the number of particles in the System)")
    n_system = int(n_particles)
    atoms_t = torch.as_tensor(atoms, dtype=torch.long).reshape(-1)
    if atoms_t.numel() != n_selected:
        raise ValueError(f"atoms lists {atoms_t.numel()} particles but species {n_selected}")
    if int(atoms_t.min()) < 0 or int(atoms_t.max()) >= n_system:
        raise ValueError(f"atoms must be particle indices in 0..{n_system - 1}")
    if int(torch.unique(atoms_t).numel()) != n_selected:
        raise ValueError("atoms must not repeat a particle")
    return atoms_t, n_system


def _exclusion_keys(exclusions, atoms: Tensor, n_system: int) -> Tensor:
    """Excluded pairs as sorted unique keys ``a * M + b`` of local indices a < b."""
    if exclusions is None:
        return torch.zeros(0, dtype=torch.long)
    pairs = torch.as_tensor(exclusions, dtype=torch.long)
    if pairs.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    if pairs.dim() != 2 or pairs.shape[1] != 2:
        raise ValueError(f"exclusions must have shape (E, 2), got {tuple(pairs.shape)}")
    if int(pairs.min()) < 0 or int(pairs.max()) >= n_system:
        raise ValueError(f"exclusions must be particle indices in 0..{n_system - 1}")
    local = torch.full((n_system,), -1, dtype=torch.long)
    local[atoms] = torch.arange(atoms.numel())
    a, b = local[pairs[:, 0]], local[pairs[:, 1]]
    outside = torch.nonzero((a < 0) | (b < 0)).reshape(-1)
    if outside.numel():
        k = int(outside[0])
        raise ValueError(
            f"exclusion ({int(pairs[k, 0])}, {int(pairs[k, 1])}) names a particle the potential does not act on"
        )
    if bool((a == b).any()):
        raise ValueError("an exclusion pairs a particle with itself")
    n = atoms.numel()
    return torch.unique(torch.minimum(a, b) * n + torch.maximum(a, b))
