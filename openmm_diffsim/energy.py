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

    Parameters
    ----------
    table : PairTable
        The pair potentials and cutoff.
    species : sequence of int
        Species index of every particle in the System (length N).
    skin : float
        Verlet skin in nm.
    """

    def __init__(self, table: PairTable, species, skin: float = 0.1):
        super().__init__()
        species_t = torch.as_tensor(species, dtype=torch.long).reshape(-1)
        if species_t.numel() == 0:
            raise ValueError("species must list at least one particle")
        if int(species_t.min()) < 0 or int(species_t.max()) >= len(table.species):
            raise ValueError(
                f"species indices must lie in 0..{len(table.species) - 1} for species {table.species}, "
                f"got range {int(species_t.min())}..{int(species_t.max())}"
            )
        self.table = table
        self.register_buffer("species", species_t)
        self.neighbors = VerletList(table.cutoff, skin)
        self.n_particles = int(species_t.numel())

    def forward(self, positions: Tensor, boxvectors: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        if positions.dim() != 2 or positions.shape[1] != 3:
            raise ValueError("positions must have shape (N, 3)")
        if positions.shape[0] != self.n_particles:
            raise ValueError(
                "number of positions does not match the species array given to PairEnergy: "
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
        i, j = self.neighbors(positions, lengths)
        return self.table.energy_and_forces(positions, lengths, species, i, j, True)
