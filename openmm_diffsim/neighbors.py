"""Periodic pair search: cell lists, minimum image and a Verlet list with a skin.

Everything here is TorchScript-compatible so that the same code runs inside
openmm-torch's ``TorchForce``, in differentiable rollouts and in RDF estimators.

Conventions
-----------
* positions: ``(N, 3)`` tensor in nm, float32 or float64, wrapped or not.
* box: ``(3, 3)`` box vectors (rows) in nm, or ``(3,)`` edge lengths. Only
  rectangular boxes are supported; a triclinic box raises an error.
* pair lists are half lists ``(i, j)`` with ``i < j``, int64, shape ``(P,)``.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
from torch import Tensor

__all__ = [
    "box_lengths",
    "minimum_image",
    "pair_displacements",
    "neighbor_pairs",
    "VerletList",
]


def box_lengths(box: Tensor) -> Tensor:
    """Edge lengths of a rectangular periodic box.

    Parameters
    ----------
    box : Tensor, shape (3, 3) or (3,)
        Box vectors as rows (OpenMM convention), or edge lengths, in nm.

    Returns
    -------
    Tensor, shape (3,)
        Edge lengths in nm, same dtype as ``box``.

    Raises
    ------
    ValueError
        If the box is triclinic, not finite, or has a non-positive edge.
    """
    if box.dim() == 2:
        if box.shape[0] != 3 or box.shape[1] != 3:
            raise ValueError("box vectors must have shape (3, 3)")
        off_diagonal = box - torch.diag(torch.diagonal(box))
        if bool((off_diagonal.abs() > 1e-9 * box.abs().max()).any()):
            raise ValueError("triclinic boxes are not supported yet: the box vectors must be diagonal")
        lengths = torch.diagonal(box)
    elif box.dim() == 1 and box.shape[0] == 3:
        lengths = box
    else:
        raise ValueError("box must have shape (3, 3) (vectors) or (3,) (edge lengths)")
    if not bool(torch.isfinite(lengths).all()):
        raise ValueError("box contains NaN or infinite values")
    if bool((lengths <= 0).any()):
        raise ValueError("box edge lengths must be positive")
    return lengths


def minimum_image(displacements: Tensor, lengths: Tensor) -> Tensor:
    """Apply the minimum-image convention to displacement vectors.

    Parameters
    ----------
    displacements : Tensor, shape (..., 3)
        Raw displacement vectors in nm.
    lengths : Tensor, shape (3,)
        Box edge lengths in nm.

    Returns
    -------
    Tensor, shape (..., 3)
        Displacements shifted by whole box vectors so that each component lies in
        [-L/2, L/2].
    """
    return displacements - lengths * torch.round(displacements / lengths)


def pair_displacements(positions: Tensor, i: Tensor, j: Tensor, lengths: Tensor) -> Tensor:
    """Minimum-image displacement vectors ``r_j - r_i`` of listed pairs.

    Parameters
    ----------
    positions : Tensor, shape (N, 3)
        Positions in nm.
    i, j : Tensor, shape (P,)
        Pair indices.
    lengths : Tensor, shape (3,)
        Box edge lengths in nm.

    Returns
    -------
    Tensor, shape (P, 3)
    """
    return minimum_image(positions[j] - positions[i], lengths)


def _all_pairs(positions: Tensor, lengths: Tensor, cutoff: float) -> Tuple[Tensor, Tensor]:
    n = positions.shape[0]
    pairs = torch.triu_indices(n, n, 1, device=positions.device)
    i = pairs[0]
    j = pairs[1]
    dr = pair_displacements(positions, i, j, lengths)
    keep = (dr * dr).sum(1) < cutoff * cutoff
    return i[keep], j[keep]


def _cell_pairs(positions: Tensor, lengths: Tensor, cutoff: float, n_cells: Tensor) -> Tuple[Tensor, Tensor]:
    # Particles are binned into cells at least `cutoff` wide and laid out in a
    # dense (cells, max occupancy) table; each of the 13 half-shell neighbour
    # offsets (plus the cell itself) is then one dense block of distances. With
    # at least three cells per axis every unordered cell pair is visited once.
    device = positions.device
    n = positions.shape[0]
    wrapped = positions - lengths * torch.floor(positions / lengths)
    cell_size = lengths / n_cells.to(positions.dtype)
    cell3 = torch.floor(wrapped / cell_size).long()
    cell3 = torch.minimum(torch.clamp(cell3, min=0), n_cells - 1)
    stride = torch.stack([n_cells[1] * n_cells[2], n_cells[2], torch.ones_like(n_cells[2])])
    cell = (cell3 * stride).sum(1)
    total_cells = int((n_cells[0] * n_cells[1] * n_cells[2]).item())
    order = torch.argsort(cell)
    sorted_cell = cell[order]
    counts = torch.bincount(cell, minlength=total_cells)
    starts = torch.cumsum(counts, 0) - counts
    max_occupancy = int(counts.max().item())
    rank = torch.arange(n, device=device) - starts[sorted_cell]
    members = torch.full((total_cells, max_occupancy), -1, dtype=torch.long, device=device)
    members[sorted_cell, rank] = order
    cell_positions = torch.zeros(total_cells, max_occupancy, 3, dtype=positions.dtype, device=device)
    cell_positions[sorted_cell, rank] = wrapped[order]
    occupied = members >= 0

    ax = torch.arange(int(n_cells[0].item()), device=device)
    ay = torch.arange(int(n_cells[1].item()), device=device)
    az = torch.arange(int(n_cells[2].item()), device=device)
    all_cells3 = torch.cartesian_prod(ax, ay, az)  # row-major, matches `stride`
    same_cell_upper = torch.triu(torch.ones(max_occupancy, max_occupancy, dtype=torch.bool, device=device), 1)
    cutoff_sq = cutoff * cutoff
    found_i: List[Tensor] = []
    found_j: List[Tensor] = []
    for dx in range(0, 2):
        for dy in range(-1, 2):
            for dz in range(-1, 2):
                # Half shell: (0,0,0) and the offsets lexicographically after it.
                if dx == 0 and (dy < 0 or (dy == 0 and dz < 0)):
                    continue
                offset = torch.tensor([dx, dy, dz], device=device)
                neighbor = (((all_cells3 + offset) % n_cells) * stride).sum(1)
                d = cell_positions[neighbor].unsqueeze(1) - cell_positions.unsqueeze(2)  # (C, M, M, 3)
                d = d - lengths * torch.round(d / lengths)
                close = (d * d).sum(3) < cutoff_sq
                close = close & occupied.unsqueeze(2) & occupied[neighbor].unsqueeze(1)
                if dx == 0 and dy == 0 and dz == 0:
                    close = close & same_cell_upper
                hit = torch.nonzero(close)
                a = members[hit[:, 0], hit[:, 1]]
                b = members[neighbor[hit[:, 0]], hit[:, 2]]
                found_i.append(torch.minimum(a, b))
                found_j.append(torch.maximum(a, b))
    return torch.cat(found_i), torch.cat(found_j)


def neighbor_pairs(positions: Tensor, box: Tensor, cutoff: float) -> Tuple[Tensor, Tensor]:
    """All pairs closer than ``cutoff`` under periodic boundaries, in O(N).

    Uses a cell list when the box holds at least four cells of width
    ``cutoff`` along every axis, and an all-pairs search otherwise: with
    three per axis the cell list's 14 dense blocks compare more pairs than
    there are (measured: 256 particles in 27 cells, 11.3 ms against 2.5 ms
    all-pairs; 500 in 64 cells, 16 against 20 ms).

    Parameters
    ----------
    positions : Tensor, shape (N, 3)
        Positions in nm (wrapped or not).
    box : Tensor, shape (3, 3) or (3,)
        Rectangular box vectors or edge lengths in nm.
    cutoff : float
        Search radius in nm.

    Returns
    -------
    i, j : Tensor, shape (P,)
        Half pair list (int64) with ``i < j`` and minimum-image distance below
        ``cutoff``. Not sorted.
    """
    with torch.no_grad():
        lengths = box_lengths(box.to(positions.dtype))
        positions = positions.detach()
        n_cells = torch.floor(lengths / cutoff).long()
        if bool((n_cells < 4).any()) or positions.shape[0] < 64:
            return _all_pairs(positions, lengths, cutoff)
        return _cell_pairs(positions, lengths, cutoff, n_cells)


class VerletList(torch.nn.Module):
    """A pair list with a skin, rebuilt only when some particle moved more than skin/2.

    Holds its state in buffers so that a scripted copy inside openmm-torch keeps
    it between force evaluations. The list contains every pair within
    ``cutoff + skin``; callers still mask pairs beyond ``cutoff``.

    Parameters
    ----------
    cutoff : float
        Interaction cutoff in nm.
    skin : float
        Extra search radius in nm. Larger skins rebuild less often but carry
        more pairs.
    """

    def __init__(self, cutoff: float, skin: float = 0.1):
        super().__init__()
        if cutoff <= 0:
            raise ValueError("cutoff must be positive")
        if skin < 0:
            raise ValueError("skin must be non-negative")
        self.cutoff = float(cutoff)
        self.skin = float(skin)
        self.register_buffer("pair_i", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("pair_j", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("reference_positions", torch.zeros(0, 3, dtype=torch.float64), persistent=False)
        self.register_buffer("reference_lengths", torch.zeros(3, dtype=torch.float64), persistent=False)
        self.register_buffer("builds", torch.zeros((), dtype=torch.long), persistent=False)

    def needs_rebuild(self, positions: Tensor, lengths: Tensor) -> bool:
        if self.reference_positions.shape[0] != positions.shape[0]:
            return True
        if self.reference_positions.device != positions.device:
            return True
        if bool((self.reference_lengths.to(lengths.dtype) != lengths).any()):
            return True
        moved = positions.detach() - self.reference_positions.to(positions.dtype)
        max_sq = float((moved * moved).sum(1).max().item())
        return max_sq > (0.5 * self.skin) ** 2

    def forward(self, positions: Tensor, lengths: Tensor) -> Tuple[Tensor, Tensor]:
        """Return the current pair list ``(i, j)``, rebuilding it if needed."""
        if self.needs_rebuild(positions, lengths):
            i, j = neighbor_pairs(positions, lengths, self.cutoff + self.skin)
            self.pair_i = i
            self.pair_j = j
            self.reference_positions = positions.detach().clone().to(torch.float64)
            self.reference_lengths = lengths.detach().clone().to(torch.float64)
            self.builds += 1
        return self.pair_i, self.pair_j
