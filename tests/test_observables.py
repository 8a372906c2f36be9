"""Tests for openmm_diffsim.observables: RDFs against mdtraj and numpy, pressure against finite differences."""

from __future__ import annotations

import math

import mdtraj
import numpy as np
import pytest
import torch
from scipy.special import erf

from openmm_diffsim.energy import potential_energy
from openmm_diffsim.observables import (
    BAR_PER_KJ_PER_MOL_NM3,
    compute_partial_rdfs,
    compute_rdf,
    configurational_pressure,
    kinetic_pressure,
    rdf_bin_edges,
    rdf_loss,
    smear_target,
    virial_pressure,
)
from openmm_diffsim.potentials import LennardJones, PairTable


def random_trajectory(n_frames=3, n_particles=60, seed=0, box=2.0, vary_box=True):
    """Random two-species trajectory with (optionally) a different cubic box per frame."""
    rng = np.random.default_rng(seed)
    lengths = box * (1.0 + (0.125 * np.arange(n_frames) if vary_box else np.zeros(n_frames)))
    xyz = (rng.random((n_frames, n_particles, 3)) * lengths[:, None, None]).astype(np.float32)
    species = np.array([0 if k % 3 else 1 for k in range(n_particles)])
    topology = mdtraj.Topology()
    chain = topology.add_chain()
    for k in range(n_particles):
        name = "A" if species[k] == 0 else "B"
        topology.add_atom(name, mdtraj.element.argon, topology.add_residue("X", chain))
    traj = mdtraj.Trajectory(
        xyz,
        topology,
        unitcell_lengths=np.repeat(lengths[:, None], 3, axis=1),
        unitcell_angles=np.full((n_frames, 3), 90.0),
    )
    return traj, torch.from_numpy(species)


def exact_distances(traj, pairs):
    """Minimum-image distances in float64 from the trajectory's float32 coordinates."""
    xyz = traj.xyz.astype(np.float64)
    lengths = traj.unitcell_lengths.astype(np.float64)[:, None, :]
    d = xyz[:, pairs[:, 1]] - xyz[:, pairs[:, 0]]
    d -= lengths * np.round(d / lengths)
    return np.sqrt((d * d).sum(-1))


def clear_of_edges(traj, edges, margin=2e-6):
    """True if no pair distance lies within float32 round-off of a bin edge."""
    d = exact_distances(traj, traj.topology.select_pairs("all", "all")).ravel()
    return np.abs(d[:, None] - np.asarray(edges)[None, :]).min() > margin


def trajectory_clear_of_edges(edges, seed, **kwargs):
    # mdtraj works in float32: a distance within round-off of a bin edge may
    # land in the neighbouring bin. Take the first seed (deterministically)
    # whose distances all keep clear of the edges.
    for attempt in range(seed, seed + 50):
        traj, species = random_trajectory(seed=attempt, **kwargs)
        if clear_of_edges(traj, edges):
            return traj, species
    raise RuntimeError("no trajectory clear of the bin edges")


def positions_and_box(traj):
    return torch.from_numpy(traj.xyz.astype(np.float64)), torch.from_numpy(traj.unitcell_lengths.astype(np.float64))


@pytest.mark.parametrize("r_range, n_bins", [((0.0, 1.0), 40), ((0.25, 0.95), 35)])
def test_histogram_matches_mdtraj(r_range, n_bins):
    traj, species = trajectory_clear_of_edges(rdf_bin_edges(r_range, n_bins).numpy(), seed=1)
    positions, box = positions_and_box(traj)
    for pair, selection in [(None, ("all", "all")), ((0, 0), ("name A", "name A")), ((0, 1), ("name A", "name B"))]:
        pairs = traj.topology.select_pairs(*selection)
        r_ref, g_ref = mdtraj.compute_rdf(traj, pairs, r_range=r_range, n_bins=n_bins)
        r, g = compute_rdf(positions, box, r_range, n_bins, smearing=0, species=species, pair=pair)
        np.testing.assert_allclose(r.numpy(), r_ref, rtol=0, atol=1e-12)
        np.testing.assert_allclose(g.numpy(), g_ref, rtol=0, atol=1e-10)
        assert g_ref.max() > 0.5  # the comparison is not vacuous


def test_single_frame_and_bin_width_match_mdtraj():
    traj, _ = trajectory_clear_of_edges(rdf_bin_edges((0.0, 1.0), bin_width=0.04).numpy(), seed=1, n_frames=1)
    positions, box = positions_and_box(traj)
    pairs = traj.topology.select_pairs("all", "all")
    _, g_ref = mdtraj.compute_rdf(traj, pairs, r_range=(0.0, 1.0), bin_width=0.04)
    _, g = compute_rdf(positions[0], box[0], (0.0, 1.0), smearing=None, bin_width=0.04)
    np.testing.assert_allclose(g.numpy(), g_ref, rtol=0, atol=1e-10)


def smeared_reference(traj, pairs, edges, sigma):
    """Independent numpy smeared RDF from mdtraj's distances' float64 twins."""
    d = exact_distances(traj, pairs).ravel()
    cdf = 0.5 * erf((edges[None, :] - d[:, None]) / (sigma * math.sqrt(2.0)))
    counts = (cdf[:, 1:] - cdf[:, :-1]).sum(0)
    shells = 4.0 / 3.0 * np.pi * (edges[1:] ** 3 - edges[:-1] ** 3)
    return counts / (len(pairs) * np.sum(1.0 / traj.unitcell_volumes.astype(np.float64)) * shells)


def test_smeared_rdf_matches_numpy_and_smeared_mdtraj_histogram():
    traj, species = random_trajectory(seed=2)
    positions, box = positions_and_box(traj)
    sigma, r_range, n_bins = 0.03, (0.1, 0.9), 32
    edges = rdf_bin_edges(r_range, n_bins).numpy()
    for pair, selection in [(None, ("all", "all")), ((0, 1), ("name A", "name B"))]:
        pairs = traj.topology.select_pairs(*selection)
        r, g = compute_rdf(positions, box, r_range, n_bins, smearing=sigma, species=species, pair=pair)
        np.testing.assert_allclose(g.numpy(), smeared_reference(traj, pairs, edges, sigma), rtol=0, atol=1e-10)
        # mdtraj's fine histogram convolved with the same kernel (to the fine bin width).
        r_fine, g_fine = mdtraj.compute_rdf(traj, pairs, r_range=(0.0, 1.2), n_bins=2400)
        g_conv = smear_target(r_fine, g_fine, sigma, r_range, n_bins).numpy()
        np.testing.assert_allclose(g.numpy(), g_conv, rtol=0, atol=2e-3)


def test_smeared_rdf_gradient_matches_finite_differences():
    traj, species = random_trajectory(n_frames=2, n_particles=20, seed=3, box=1.6)
    positions = torch.from_numpy(traj.xyz.astype(np.float64)).requires_grad_(True)
    box = torch.from_numpy(traj.unitcell_lengths.astype(np.float64))
    assert torch.autograd.gradcheck(
        lambda x: compute_rdf(x, box, (0.1, 0.8), 14, smearing=0.04)[1],
        (positions,),
        eps=1e-6,
        atol=1e-6,
        fast_mode=True,
    )
    assert torch.autograd.gradcheck(
        lambda x: compute_partial_rdfs(x, box, species[:20], 2, (0.1, 0.8), 14, smearing=0.04)[1],
        (positions,),
        eps=1e-6,
        atol=1e-6,
        fast_mode=True,
    )


def test_float32_positions_give_float32_gradients_close_to_float64():
    traj, _ = random_trajectory(n_frames=1, seed=4)
    x64 = torch.from_numpy(traj.xyz[0].astype(np.float64)).requires_grad_(True)
    x32 = torch.from_numpy(traj.xyz[0]).requires_grad_(True)
    box = torch.tensor(traj.unitcell_lengths[0], dtype=torch.float64)
    g64 = compute_rdf(x64, box, (0.0, 1.0), 25, 0.03)[1]
    g32 = compute_rdf(x32, box, (0.0, 1.0), 25, 0.03)[1]
    assert g32.dtype == torch.float64
    np.testing.assert_allclose(g32.detach().numpy(), g64.detach().numpy(), atol=1e-5)
    (g64 * g64).sum().backward()
    (g32 * g32).sum().backward()
    assert x32.grad.dtype == torch.float32
    np.testing.assert_allclose(x32.grad.numpy(), x64.grad.numpy(), rtol=1e-3, atol=1e-3)


def test_cell_list_path_matches_all_pairs_numpy():
    # Big enough box for the cell list (>= 3 cells of the search radius) and N >= 64.
    rng = np.random.default_rng(5)
    length, n = 4.2, 400
    x = rng.random((n, 3)) * length
    d = x[None] - x[:, None]
    d -= length * np.round(d / length)
    dist = np.sqrt((d * d).sum(-1))[np.triu_indices(n, 1)]
    edges = rdf_bin_edges((0.0, 1.2), 60).numpy()
    counts = np.histogram(dist, bins=edges)[0]
    shells = 4.0 / 3.0 * np.pi * np.diff(edges**3)
    g_ref = counts / (dist.size / length**3 * shells)
    _, g = compute_rdf(torch.from_numpy(x), torch.full((3,), length, dtype=torch.float64), (0.0, 1.2), 60, smearing=0.0)
    np.testing.assert_allclose(g.numpy(), g_ref, rtol=0, atol=1e-10)
    # Smeared, including pairs just beyond r_max that leak into the last bins.
    sigma = 0.02
    cdf = 0.5 * erf((edges[None, :] - dist[:, None]) / (sigma * math.sqrt(2)))
    g_ref = (cdf[:, 1:] - cdf[:, :-1]).sum(0) / (dist.size / length**3 * shells)
    _, g = compute_rdf(
        torch.from_numpy(x), torch.full((3,), length, dtype=torch.float64), (0.0, 1.2), 60, smearing=sigma
    )
    np.testing.assert_allclose(g.numpy(), g_ref, rtol=0, atol=1e-10)


def test_partial_rdfs_equal_single_pair_calls_and_order():
    traj, species = random_trajectory(seed=6)
    positions, box = positions_and_box(traj)
    three = species.clone()
    three[:6] = 2
    r, g = compute_partial_rdfs(positions, box, three, 3, (0.0, 1.0), 20, smearing=0.02)
    assert g.shape == (6, 20)
    order = [(0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2)]
    for row, pair in enumerate(order):
        _, g_pair = compute_rdf(positions, box, (0.0, 1.0), 20, 0.02, species=three, pair=pair)
        np.testing.assert_allclose(g[row].numpy(), g_pair.numpy(), rtol=1e-12, atol=1e-12)
    # An absent species gives zero rows rather than NaN.
    _, g4 = compute_partial_rdfs(positions, box, species, 3, (0.0, 1.0), 20, smearing=0.02)
    assert torch.all(g4[[2, 4, 5]] == 0) and torch.isfinite(g4).all()


def test_rdf_input_errors():
    x = torch.rand(10, 3)
    with pytest.raises(ValueError, match="species"):
        compute_rdf(x, torch.ones(3), pair=(0, 1))
    with pytest.raises(ValueError, match="triclinic"):
        compute_rdf(x, torch.tensor([[1.0, 0, 0], [0.3, 1, 0], [0, 0, 1]]))
    with pytest.raises(ValueError, match="r_range"):
        compute_rdf(x, torch.ones(3), r_range=(0.5, 0.2))
    with pytest.raises(ValueError, match="smearing"):
        compute_rdf(x, torch.ones(3), smearing=-0.1)
    with pytest.raises(ValueError, match="frames"):
        compute_rdf(torch.rand(2, 10, 3), torch.ones(3, 3, 3) * torch.eye(3))
    with pytest.raises(ValueError, match="no particle pairs"):
        compute_rdf(x, torch.ones(3), species=torch.zeros(10, dtype=torch.long), pair=(0, 1))
    with pytest.raises(ValueError, match="NaN"):
        compute_rdf(torch.full((10, 3), float("nan")), torch.ones(3))


def test_smear_target_rebinning_and_reach():
    # g(r) = 1 stays 1 under exact rebinning. Smeared, the pair density r^2
    # becomes r^2 + sigma^2 (away from r = 0), so bin k holds
    # 1 + sigma^2 * width / ((e1^3 - e0^3) / 3).
    r = np.arange(0.0025, 1.5, 0.005)
    flat = smear_target(r, np.ones_like(r), 0.0, (0.0, 1.0), 50).numpy()
    np.testing.assert_allclose(flat, 1.0, rtol=1e-12)
    sigma = 0.02
    edges = rdf_bin_edges((0.0, 1.0), 50).numpy()
    expected = 1.0 + sigma**2 * np.diff(edges) / (np.diff(edges**3) / 3.0)
    smeared = smear_target(r, np.ones_like(r), sigma, (0.0, 1.0), 50).numpy()
    np.testing.assert_allclose(smeared[10:], expected[10:], rtol=1e-8)
    inside = r < 1.0
    with pytest.raises(ValueError, match="beyond"):
        smear_target(r[inside], np.ones(int(inside.sum())), sigma, (0.0, 1.0), 50)
    extended = smear_target(r[inside], np.ones(int(inside.sum())), sigma, (0.0, 1.0), 50, beyond="one").numpy()
    np.testing.assert_allclose(extended[10:], expected[10:], rtol=1e-8)


def test_rdf_loss():
    g_model = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    g_target = np.array([1.0, 1.0, 1.0])
    assert rdf_loss(g_model, g_target).item() == pytest.approx(5.0 / 3.0)
    assert rdf_loss(g_model, g_target, weights=[0.0, 1.0, 1.0]).item() == pytest.approx(2.5)
    rdf_loss(g_model, g_target).backward()
    np.testing.assert_allclose(g_model.grad.numpy(), [0.0, 2.0 / 3.0, 4.0 / 3.0])
    with pytest.raises(ValueError, match="same shape"):
        rdf_loss(g_model, np.ones(4))
    with pytest.raises(ValueError, match="all be zero"):
        rdf_loss(g_model, g_target, weights=np.zeros(3))


# -- pressure --------------------------------------------------------------------------


def lj_mixture(cutoff=0.9):
    return PairTable(
        ["A", "B"],
        {
            ("A", "A"): LennardJones(0.34, 0.99),
            ("A", "B"): LennardJones(0.36, 0.8),
            ("B", "B"): LennardJones(0.38, 1.2),
        },
        cutoff=cutoff,
        cutoff_mode="shift",
    )


def dense_configuration(n=120, length=2.3, seed=7):
    rng = np.random.default_rng(seed)
    side = int(np.ceil(n ** (1 / 3)))
    grid = np.stack(np.meshgrid(*[np.arange(side)] * 3, indexing="ij"), -1).reshape(-1, 3)[:n]
    x = (grid + 0.5) * (length / side) + rng.normal(scale=0.02, size=(n, 3))
    return torch.from_numpy(x), torch.full((3,), length, dtype=torch.float64), torch.from_numpy(rng.integers(0, 2, n))


def test_configurational_pressure_is_minus_volume_derivative_of_energy():
    table = lj_mixture()
    x, box, species = dense_configuration()
    pressure = configurational_pressure(table, x, box, species, unit="kJ/mol/nm^3").item()
    h = 1e-5
    with torch.no_grad():
        up = potential_energy(table, x * (1 + h), box * (1 + h), species)
        down = potential_energy(table, x * (1 - h), box * (1 - h), species)
    volume = float(box.prod())
    # dU/dV = dU/dlambda / (3 V) at lambda = 1.
    expected = -float(up - down) / (2 * h) / (3 * volume)
    assert abs(float(pressure)) > 1.0
    assert float(pressure) == pytest.approx(expected, rel=1e-6)
    in_bar = configurational_pressure(table, x, box, species).item()
    assert float(in_bar) == pytest.approx(float(pressure) * 16.6053906717, rel=1e-9)


def test_pressure_is_differentiable_in_parameters():
    table = lj_mixture()
    x, box, species = dense_configuration()
    epsilon = table.pair_potentials[1].epsilon
    pressure = virial_pressure(table, x, box, species, temperature=300.0)
    (grad,) = torch.autograd.grad(pressure, epsilon)
    h = 1e-6
    with torch.no_grad():
        epsilon += h
        up = virial_pressure(table, x, box, species, temperature=300.0)
        epsilon -= 2 * h
        down = virial_pressure(table, x, box, species, temperature=300.0)
        epsilon += h
    assert float(grad) == pytest.approx(float(up - down) / (2 * h), rel=1e-6)


def test_kinetic_pressure_matches_ideal_gas_in_si_units():
    n, temperature, length = 1000, 300.0, 5.0
    volume_m3 = (length * 1e-9) ** 3
    expected_bar = n * 1.380649e-23 * temperature / volume_m3 / 1e5
    box = torch.full((3,), length, dtype=torch.float64)
    assert float(kinetic_pressure(n, box, temperature=temperature)) == pytest.approx(expected_bar, rel=1e-9)
    # From velocities: 2 K / (3 V).
    rng = np.random.default_rng(0)
    masses = np.full(n, 39.948)
    v = rng.normal(size=(n, 3))
    kinetic_energy = 0.5 * (masses[:, None] * v * v).sum()
    from_v = kinetic_pressure(n, box, velocities=torch.from_numpy(v), masses=masses)
    assert float(from_v) == pytest.approx(2 * kinetic_energy / (3 * length**3) * BAR_PER_KJ_PER_MOL_NM3, rel=1e-12)
    with pytest.raises(ValueError, match="either temperature or velocities"):
        kinetic_pressure(n, box)


def test_virial_pressure_batches_frames_and_checks_inputs():
    table = lj_mixture()
    x, box, species = dense_configuration()
    frames = torch.stack([x, x * 1.01])
    boxes = torch.stack([box, box * 1.01])
    batch = virial_pressure(table, frames, boxes, species, temperature=120.0)
    assert batch.shape == (2,)
    for k in range(2):
        single = virial_pressure(table, frames[k], boxes[k], species, temperature=120.0)
        assert batch[k].item() == pytest.approx(single.item(), rel=1e-12)
    names = ["A" if s == 0 else "B" for s in species.tolist()]
    assert configurational_pressure(table, x, box, names).item() == pytest.approx(
        configurational_pressure(table, x, box, species).item(), rel=1e-12
    )
    with pytest.raises(ValueError, match="unknown species"):
        configurational_pressure(table, x, box, ["C"] * len(names))
    with pytest.raises(ValueError, match="half the shortest box edge"):
        configurational_pressure(table, x * 0.5, box * 0.5, species)


def test_smeared_rdf_jacobian_runs_batched_under_vmap():
    """The histogram's backward is out-of-place, so Jacobians by is_grads_batched work and agree row by row."""
    from openmm_diffsim.observables import compute_partial_rdfs

    rng = np.random.default_rng(0)
    box = torch.tensor([1.2, 1.2, 1.2], dtype=torch.float64)
    x = torch.tensor(rng.uniform(0, 1.2, size=(1, 30, 3)), dtype=torch.float64, requires_grad=True)
    species = torch.zeros(30, dtype=torch.long)
    _, g = compute_partial_rdfs(x, box, species, 1, (0.0, 0.6), 20, 0.02)
    g = g.reshape(-1)
    eye = torch.eye(g.numel(), dtype=g.dtype)
    (batched,) = torch.autograd.grad(g, x, grad_outputs=eye, is_grads_batched=True, retain_graph=True)
    rows = torch.stack([torch.autograd.grad(g[k], x, retain_graph=True)[0] for k in range(g.numel())])
    assert float(rows.abs().max()) > 0
    torch.testing.assert_close(batched, rows, rtol=1e-12, atol=1e-12)
