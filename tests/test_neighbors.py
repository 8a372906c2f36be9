"""Periodic pair search against a brute-force NumPy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from openmm_diffsim.neighbors import (
    VerletList,
    _cell_pairs,
    box_lengths,
    minimum_image,
    neighbor_pairs,
    pair_displacements,
)


def brute_force_pairs(positions: np.ndarray, lengths: np.ndarray, cutoff: float) -> set:
    """All pairs i < j with minimum-image distance below cutoff (O(N^2) NumPy)."""
    d = positions[None, :, :] - positions[:, None, :]
    d -= lengths * np.round(d / lengths)
    r2 = (d**2).sum(-1)
    i, j = np.nonzero(np.triu(r2 < cutoff**2, 1))
    return set(zip(i.tolist(), j.tolist(), strict=True))


def as_pair_set(i: torch.Tensor, j: torch.Tensor) -> set:
    assert i.dtype == torch.long and j.dtype == torch.long and i.shape == j.shape
    assert bool((i < j).all()), "half list must have i < j"
    pairs = list(zip(i.tolist(), j.tolist(), strict=True))
    assert len(pairs) == len(set(pairs)), "duplicate pairs"
    return set(pairs)


# (n particles, box lengths, cutoff): the first three go through the all-pairs fallback
# (too few particles / fewer than 4 cells along an axis), the rest through the cell list.
CASES = [
    (40, [2.0, 2.0, 2.0], 0.8),
    (300, [2.0, 3.5, 3.5], 0.9),
    (300, [2.7, 2.7, 2.7], 0.9),  # exactly 3 cells per axis
    (500, [3.1, 4.3, 5.2], 0.75),
    (600, [3.6, 3.6, 4.0], 0.9),  # exactly 4 cells per axis
    (800, [4.0, 4.0, 4.0], 0.6),
]


@pytest.mark.parametrize("wrapped", [True, False])
@pytest.mark.parametrize("n, lengths, cutoff", CASES)
def test_neighbor_pairs_match_brute_force(n, lengths, cutoff, wrapped):
    rng = np.random.default_rng(n)
    lengths = np.asarray(lengths)
    positions = rng.uniform(0, 1, (n, 3)) * lengths
    if not wrapped:
        # Unwrapped trajectories: whole-box offsets, including far-away images.
        positions = positions + rng.integers(-5, 6, (n, 3)) * lengths
    expected = brute_force_pairs(positions, lengths, cutoff)
    assert len(expected) > 0
    for dtype in (torch.float64, torch.float32):
        x = torch.tensor(positions, dtype=dtype)
        for box in (torch.tensor(lengths, dtype=dtype), torch.diag(torch.tensor(lengths, dtype=dtype))):
            i, j = neighbor_pairs(x, box, cutoff)
            found = as_pair_set(i, j)
            if dtype == torch.float64:
                assert found == expected
            else:
                # float32 may flip only pairs within round-off of the cutoff.
                diff = np.array(sorted(found ^ expected), dtype=np.int64).reshape(-1, 2)
                d = positions[diff[:, 1]] - positions[diff[:, 0]]
                d -= lengths * np.round(d / lengths)
                tolerance = 1e-6 * max(1.0, np.abs(positions).max()) * 8
                assert np.all(np.abs(np.linalg.norm(d, axis=1) - cutoff) < tolerance)
                assert len(found) > 0.99 * len(expected)


def test_neighbor_pairs_cell_list_agrees_with_fallback_on_clustered_input():
    """Uneven cell occupancy (a dense cluster plus a dilute gas) exercises the padding logic."""
    rng = np.random.default_rng(11)
    lengths = np.array([4.0, 4.0, 4.0])
    cluster = rng.normal(1.0, 0.15, (200, 3))
    gas = rng.uniform(0, 4.0, (150, 3))
    positions = np.concatenate([cluster, gas])
    i, j = neighbor_pairs(torch.tensor(positions), torch.tensor(lengths), 0.8)
    assert as_pair_set(i, j) == brute_force_pairs(positions, lengths, 0.8)


def test_cell_list_with_three_cells_per_axis():
    """The cell list stays right at its smallest size (3 cells), which neighbor_pairs leaves to all-pairs."""
    rng = np.random.default_rng(3)
    lengths = np.array([2.7, 2.8, 3.0])
    positions = rng.uniform(0, 1, (300, 3)) * lengths
    i, j = _cell_pairs(torch.tensor(positions), torch.tensor(lengths), 0.9, torch.tensor([3, 3, 3]))
    assert as_pair_set(i, j) == brute_force_pairs(positions, lengths, 0.9)


def test_neighbor_pairs_is_torchscript_compatible():
    scripted = torch.jit.script(neighbor_pairs)
    rng = np.random.default_rng(2)
    positions = rng.uniform(0, 3.0, (200, 3))
    i, j = scripted(torch.tensor(positions), torch.tensor([3.0, 3.0, 3.0], dtype=torch.float64), 0.9)
    assert as_pair_set(i, j) == brute_force_pairs(positions, np.array([3.0] * 3), 0.9)


def test_minimum_image_and_displacements():
    lengths = torch.tensor([2.0, 3.0, 4.0], dtype=torch.float64)
    d = torch.tensor([[1.9, -2.9, 7.9], [0.2, 0.3, -0.4]], dtype=torch.float64)
    m = minimum_image(d, lengths)
    torch.testing.assert_close(m, torch.tensor([[-0.1, 0.1, -0.1], [0.2, 0.3, -0.4]], dtype=torch.float64))
    assert bool((m.abs() <= lengths / 2).all())
    positions = torch.tensor([[0.1, 0.1, 0.1], [1.9, 2.9, 3.9]], dtype=torch.float64)
    dr = pair_displacements(positions, torch.tensor([0]), torch.tensor([1]), lengths)
    torch.testing.assert_close(dr, torch.tensor([[-0.2, -0.2, -0.2]], dtype=torch.float64))


def test_box_lengths_validation():
    torch.testing.assert_close(box_lengths(torch.diag(torch.tensor([1.0, 2.0, 3.0]))), torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="triclinic"):
        box_lengths(torch.tensor([[3.0, 0, 0], [0.5, 3.0, 0], [0, 0, 3.0]]))
    with pytest.raises(ValueError, match="positive"):
        box_lengths(torch.tensor([3.0, 0.0, 3.0]))
    with pytest.raises(ValueError, match="NaN"):
        box_lengths(torch.tensor([3.0, float("nan"), 3.0]))
    with pytest.raises(ValueError, match="shape"):
        box_lengths(torch.ones(2, 2))


def test_verlet_list_rebuilds_only_when_needed_along_random_walk():
    rng = np.random.default_rng(5)
    lengths = np.array([3.0, 3.0, 3.0])
    cutoff, skin = 0.8, 0.2
    positions = rng.uniform(0, 3.0, (250, 3))
    verlet = VerletList(cutoff, skin)
    box = torch.tensor(lengths, dtype=torch.float64)
    reference = None
    builds = 0
    for step in range(60):
        x = torch.tensor(positions)
        i, j = verlet(x, box)
        # Expected rebuild rule: first call, or someone moved > skin/2 since the last build.
        if reference is None or np.sqrt(((positions - reference) ** 2).sum(1)).max() > skin / 2:
            builds += 1
            reference = positions.copy()
        assert int(verlet.builds) == builds, step
        # Pairs within the cutoff: identical to a fresh search.
        as_pair_set(i, j)
        d = positions[j.numpy()] - positions[i.numpy()]
        d -= lengths * np.round(d / lengths)
        within = {
            (a, b)
            for (a, b), r in zip(zip(i.tolist(), j.tolist(), strict=True), np.linalg.norm(d, axis=1), strict=True)
            if r < cutoff
        }
        assert within == brute_force_pairs(positions, lengths, cutoff), step
        positions = positions + rng.normal(0, 0.012, positions.shape)  # unwrapped random walk
    assert 3 <= builds < 60  # it did rebuild, but not every step


def test_verlet_list_rebuilds_on_box_or_size_change():
    rng = np.random.default_rng(6)
    positions = torch.tensor(rng.uniform(0, 3.0, (100, 3)))
    verlet = VerletList(0.8, 0.2)
    verlet(positions, torch.tensor([3.0, 3.0, 3.0], dtype=torch.float64))
    verlet(positions, torch.tensor([3.0, 3.0, 3.0], dtype=torch.float64))
    assert int(verlet.builds) == 1
    verlet(positions * 1.01, torch.tensor([3.03, 3.03, 3.03], dtype=torch.float64))
    assert int(verlet.builds) == 2
    verlet(positions[:50], torch.tensor([3.0, 3.0, 3.0], dtype=torch.float64))
    assert int(verlet.builds) == 3


def test_verlet_list_bad_arguments():
    with pytest.raises(ValueError, match="cutoff"):
        VerletList(0.0)
    with pytest.raises(ValueError, match="skin"):
        VerletList(1.0, -0.1)
