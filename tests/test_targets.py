"""Tests for openmm_diffsim.targets: validation, readers and writers, resampling, trajectory targets."""

from __future__ import annotations

import mdtraj
import numpy as np
import pytest
import torch

from openmm_diffsim.observables import compute_rdf
from openmm_diffsim.targets import (
    Target,
    counting_weights,
    read_target,
    read_targets_npz,
    relative_weights,
    target_from_trajectory,
    write_rdf,
)

R = np.linspace(0.01, 1.0, 100)
G = 1.0 + 0.5 * np.sin(8.0 * R) * np.exp(-R)


# -- validation ------------------------------------------------------------------------


def test_target_holds_data_and_labels():
    target = Target(R, G, pair="A-B", state="liquid", weights=np.ones_like(R))
    assert target.pair == ("A", "B")
    assert target.label == "A-B@liquid"
    assert target.r.dtype == np.float64 and target.r_max == pytest.approx(1.0)
    r, g, w = target.as_tensors()
    assert isinstance(g, torch.Tensor) and g.dtype == torch.float64 and w.shape == (100,)


@pytest.mark.parametrize(
    "r, g, weights, message",
    [
        (R[::-1], G, None, "strictly increasing"),
        (np.r_[R[:5], R[4], R[6:]], G, None, "strictly increasing"),
        (R, np.r_[np.nan, G[1:]], None, "NaN"),
        (R, np.r_[-0.1, G[1:]], None, "non-negative"),
        (R[:3], G[:3], None, "too few points"),
        (R, G[:-1], None, "shape"),
        (R, G, -np.ones_like(R), "weights"),
        (R, G, np.zeros_like(R), "all zero"),
    ],
)
def test_target_rejects_bad_data(r, g, weights, message):
    with pytest.raises(ValueError, match=message):
        Target(r, g, weights=weights)


def test_validate_for_box_and_species():
    target = Target(R, G, pair=("A", "B"), state="hot")
    target.validate_for_box([2.5, 2.0, 3.0])  # half of 2.0 is 1.0: fits
    with pytest.raises(ValueError, match="half the shortest box edge.*hot"):
        target.validate_for_box([2.5, 1.9, 3.0])
    target.validate_for_box(np.diag([2.0, 2.0, 2.0]))  # box vectors work too
    target.validate_species(["A", "B", "C"])
    with pytest.raises(ValueError, match="species \\['B'\\] not among"):
        target.validate_species(["A", "C"])
    target.truncate(0.9).validate_for_box([1.9, 1.9, 1.9])


def test_resample_linear_and_outside_policies():
    target = Target(R, G, weights=np.linspace(1, 2, R.size))
    r_new = np.linspace(0.05, 0.95, 37)
    resampled = target.resample(r_new)
    np.testing.assert_allclose(resampled.g, np.interp(r_new, R, G))
    np.testing.assert_allclose(resampled.weights, np.interp(r_new, R, target.weights))
    # A linear g is reproduced exactly.
    line = Target(R, 2.0 * R).resample(r_new)
    np.testing.assert_allclose(line.g, 2.0 * r_new, rtol=1e-14)
    wide = np.linspace(0.0, 1.2, 13)
    with pytest.raises(ValueError, match="outside="):
        target.resample(wide)
    one = target.resample(wide, outside="one")
    assert one.g[0] == 0.0 and one.g[-1] == 1.0 and one.weights[-1] == 0.0
    edge = target.resample(wide, outside="edge")
    assert edge.g[-1] == pytest.approx(G[-1])


# -- files -----------------------------------------------------------------------------


def test_read_gromacs_xvg_with_comments_and_angstrom(tmp_path):
    path = tmp_path / "rdf.xvg"
    lines = [
        "# This file was created by gmx rdf",
        "#   :-) GROMACS - gmx rdf (-:",
        '@    title "Radial distribution"',
        '@    xaxis  label "r (nm)"',
        "@TYPE xy",
    ] + [f"  {r * 10:.6f}   {g:.8f}" for r, g in zip(R, G, strict=True)]
    path.write_text("\n".join(lines) + "\n")
    target = read_target(path, pair=("OW", "OW"), length_unit="angstrom", state="water")
    np.testing.assert_allclose(target.r, R, atol=1e-7)
    np.testing.assert_allclose(target.g, G, atol=1e-8)
    assert target.pair == ("OW", "OW") and target.state == "water" and target.weights is None


def test_read_comma_separated_three_columns_as_weights(tmp_path):
    path = tmp_path / "rdf.dat"
    weights = np.linspace(0.5, 1.5, R.size)
    np.savetxt(path, np.column_stack([R, G, weights]), delimiter=",", header="r, g, weights")
    target = read_target(path)
    np.testing.assert_allclose(target.weights, weights)
    two = read_target(path, columns=(0, 1))
    assert two.weights is None


def test_read_csv_with_header_and_column_names(tmp_path):
    path = tmp_path / "rdf.csv"
    rows = "\n".join(f"{g},{r * 10}" for r, g in zip(R, G, strict=True))
    path.write_text("g(r),r\n" + rows + "\n")
    target = read_target(path, length_unit="Angstrom")
    np.testing.assert_allclose(target.r, R)
    np.testing.assert_allclose(target.g, G)
    path2 = tmp_path / "many.csv"
    path2.write_text("dist,a,b,c\n" + "\n".join(f"{r},{g},{2 * g},{3 * g}" for r, g in zip(R, G, strict=True)))
    with pytest.raises(ValueError, match="columns="):
        read_target(path2)
    np.testing.assert_allclose(read_target(path2, columns=("dist", "c")).g, 3 * G)


def test_reader_errors(tmp_path):
    bad = tmp_path / "bad.dat"
    bad.write_text("r g\n0.1 1.0\n")
    with pytest.raises(ValueError, match="line 1"):
        read_target(bad)
    ragged = tmp_path / "ragged.dat"
    ragged.write_text("0.1 1.0\n0.2 1.0 3.0\n")
    with pytest.raises(ValueError, match="different numbers of columns"):
        read_target(ragged)
    with pytest.raises(FileNotFoundError):
        read_target(tmp_path / "missing.xvg")
    with pytest.raises(ValueError, match="length_unit"):
        read_target(bad, length_unit="furlong")
    decreasing = tmp_path / "decreasing.dat"
    np.savetxt(decreasing, np.column_stack([R[::-1], G]))
    with pytest.raises(ValueError, match="strictly increasing"):
        read_target(decreasing)


@pytest.mark.parametrize("suffix", [".xvg", ".dat", ".csv", ".npz"])
def test_write_then_read_round_trip(tmp_path, suffix):
    path = tmp_path / f"out{suffix}"
    weights = np.linspace(0.1, 1.0, R.size)
    write_rdf(path, torch.from_numpy(R), torch.from_numpy(G), pair=("A", "B"), state="s1", weights=weights)
    target = read_target(path)
    np.testing.assert_array_equal(target.r, R)
    np.testing.assert_array_equal(target.g, G)
    np.testing.assert_array_equal(target.weights, weights)
    assert target.pair == ("A", "B") and target.state == "s1"


@pytest.mark.parametrize("suffix", [".xvg", ".npz"])
def test_write_several_pairs_and_select_by_pair(tmp_path, suffix):
    path = tmp_path / f"partial{suffix}"
    g = np.stack([G, 2 * G, 3 * G])
    write_rdf(path, R, g, pair=[("A", "A"), ("A", "B"), "B-B"], state="mix")
    target = read_target(path, pair=("B", "A"))
    np.testing.assert_array_equal(target.g, 2 * G)
    assert target.pair == ("B", "A") and target.state == "mix"
    if suffix == ".npz":
        targets = read_targets_npz(path)
        assert [t.label for t in targets] == ["A-A@mix", "A-B@mix", "B-B@mix"]
        with pytest.raises(ValueError, match="choose one with pair="):
            read_target(path)
    with pytest.raises(ValueError, match="several RDFs need pair"):
        write_rdf(tmp_path / "x.npz", R, g)


# -- from trajectories -----------------------------------------------------------------


def lattice_trajectory(n_frames=4, seed=0):
    """Two-species trajectory with dyadic box edges (float32 volumes exact in mdtraj)."""
    rng = np.random.default_rng(seed)
    n = 64
    lengths = np.array([2.0, 2.25, 2.5, 2.0])[:n_frames]
    xyz = (rng.random((n_frames, n, 3)) * lengths[:, None, None]).astype(np.float32)
    topology = mdtraj.Topology()
    chain = topology.add_chain()
    for k in range(n):
        topology.add_atom("Ar" if k % 2 else "Kr", mdtraj.element.argon, topology.add_residue("X", chain))
    return mdtraj.Trajectory(
        xyz,
        topology,
        unitcell_lengths=np.repeat(lengths[:, None], 3, axis=1),
        unitcell_angles=np.full((n_frames, 3), 90.0),
    )


def test_target_from_trajectory_matches_mdtraj(tmp_path):
    traj = lattice_trajectory()
    # Seed 0 keeps every float32 distance clear of the 0.05 nm bin edges, so the
    # histograms agree bin for bin; chunk_frames=3 checks the pooling of chunks.
    for pair, selection in [(("Ar", "Ar"), ("name Ar", "name Ar")), (("Ar", "Kr"), ("name Ar", "name Kr"))]:
        pairs = traj.topology.select_pairs(*selection)
        _, g_ref = mdtraj.compute_rdf(traj, pairs, r_range=(0.0, 1.0), n_bins=20)
        target = target_from_trajectory(traj, pair=pair, r_range=(0.0, 1.0), n_bins=20, state="t", chunk_frames=3)
        np.testing.assert_allclose(target.g, g_ref, rtol=0, atol=1e-10)
        assert target.pair == pair and target.state == "t"
    # From files on disk, with a stride.
    traj[0].save_pdb(str(tmp_path / "top.pdb"))
    traj.save_dcd(str(tmp_path / "traj.dcd"))
    from_file = target_from_trajectory(
        tmp_path / "traj.dcd", top=str(tmp_path / "top.pdb"), pair="Ar-Ar", r_range=(0.0, 1.0), n_bins=20, stride=2
    )
    _, g_ref = mdtraj.compute_rdf(traj[::2], traj.topology.select_pairs("name Ar", "name Ar"), (0.0, 1.0), n_bins=20)
    np.testing.assert_allclose(from_file.g, g_ref, rtol=0, atol=1e-5)


def test_target_from_trajectory_smeared_uses_the_model_estimator():
    traj = lattice_trajectory()
    target = target_from_trajectory(traj, pair=("Ar", "Kr"), r_range=(0.0, 1.0), n_bins=25, smearing=0.02)
    species = torch.tensor([1 if atom.name == "Ar" else 0 for atom in traj.topology.atoms])
    _, g = compute_rdf(
        torch.from_numpy(traj.xyz.astype(np.float64)),
        torch.from_numpy(traj.unitcell_lengths.astype(np.float64)),
        (0.0, 1.0),
        25,
        0.02,
        species=species,
        pair=(0, 1),
    )
    np.testing.assert_allclose(target.g, g.numpy(), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="matches no atoms"):
        target_from_trajectory(traj, pair=("Ne", "Ne"))


# -- counting weights ------------------------------------------------------------------


def test_counting_weights_are_the_inverse_variance_of_a_sampled_rdf():
    """Dilute gas (analytic limit g = exp(-u/kT)): the per-bin variance of g estimated
    from independent frames of pair counts is ∝ g / r², so variance × weight is flat."""
    rng = np.random.default_rng(3)
    edges = np.linspace(0.0, 1.0, 51)
    r = 0.5 * (edges[1:] + edges[:-1])
    shell = edges[1:] ** 3 - edges[:-1] ** 3  # ∝ ideal-gas counts per bin
    g = np.exp(-((0.3 / r) ** 12))  # a soft wall: g from ~0 to 1
    mean_counts = 400.0 * shell / shell.sum() * g  # expected pair counts per frame
    frames = rng.poisson(mean_counts, size=(4000, r.size)) / (400.0 * shell / shell.sum())
    variance = frames.var(axis=0, ddof=1)
    np.testing.assert_allclose(frames.mean(0)[r > 0.3], g[r > 0.3], rtol=0.1)
    target = counting_weights(Target(r, g), g_floor=0.05)
    product = (variance * target.weights)[g > 0.05]
    # Flat to the variance's sampling error (~2 % per bin from 4000 frames), while the
    # variance itself varies sevenfold over these bins.
    assert variance[g > 0.05].max() / variance[g > 0.05].min() > 5
    assert product.std() / product.mean() < 0.08
    # Without the g factor (r² alone) it would not be flat.
    r2 = (variance * r**2)[g > 0.05]
    assert r2.std() / r2.mean() > 0.1


def test_counting_weights_floor_mean_and_errors():
    target = Target(R, G, pair="A-B", state="s", weights=np.ones_like(R))
    weighted = counting_weights(target, g_floor=0.9)
    expected = R**2 / np.maximum(G, 0.9)
    np.testing.assert_allclose(weighted.weights, expected / expected.mean())
    assert weighted.weights.mean() == pytest.approx(1.0)
    assert weighted.pair == ("A", "B") and weighted.state == "s"
    np.testing.assert_array_equal(target.weights, np.ones_like(R))  # the original is untouched
    core = Target(np.linspace(0.0, 1.0, 11), np.r_[np.zeros(4), np.ones(7)])
    assert counting_weights(core).weights[0] == 0.0 and np.all(np.isfinite(counting_weights(core).weights))
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="g_floor"):
            counting_weights(target, g_floor=bad)


def test_relative_weights_make_the_loss_the_squared_error_of_the_potential_of_mean_force():
    """w ∝ 1/g²: a change δ kT of w = -kT ln g (the model g·exp(-δ)) costs the same loss
    wherever it lies, at the wall's foot (g ≈ 0.15) or on the first peak (g ≈ 2.4);
    the uniform loss charges the peak (g_peak/g_wall)² ≈ 250 times more."""
    r = np.linspace(0.8, 2.5, 69)
    g = 1.0 + 1.4 * np.exp(-(((r - 1.0) / 0.08) ** 2)) - 0.85 * np.exp(-(((r - 0.8) / 0.05) ** 2))
    assert g.min() > 0.1  # every bin above the floor: the weights are exactly ∝ 1/g² there
    wall, peak = int(np.argmin(g)), int(np.argmax(g))
    weighted = relative_weights(Target(r, g))

    def losses(k, size=0.02):
        delta = np.zeros_like(r)
        delta[k] = size
        error = (g * np.exp(-delta) - g) ** 2
        return np.sum(weighted.weights * error) / weighted.weights.sum(), np.mean(error)

    (relative_wall, uniform_wall), (relative_peak, uniform_peak) = losses(wall), losses(peak)
    assert relative_peak == pytest.approx(relative_wall, rel=0.03)
    assert uniform_peak / uniform_wall == pytest.approx((g[peak] / g[wall]) ** 2, rel=0.03)
    assert uniform_peak / uniform_wall > 100
    # Up to a constant factor of the target, the loss is the mean of δ².
    delta = 0.03 * np.cos(7.0 * r)
    loss = np.sum(weighted.weights * (g * np.exp(-delta) - g) ** 2) / weighted.weights.sum()
    assert loss * np.mean(1.0 / g**2) == pytest.approx(np.mean(delta**2), rel=0.05)


def test_relative_weights_floor_mean_and_errors():
    target = Target(R, G, pair="A-B", state="s", weights=np.ones_like(R))
    weighted = relative_weights(target, g_floor=0.9)
    expected = 1.0 / np.maximum(G, 0.9) ** 2
    np.testing.assert_allclose(weighted.weights, expected / expected.mean())
    assert weighted.weights.mean() == pytest.approx(1.0)
    assert weighted.pair == ("A", "B") and weighted.state == "s"
    np.testing.assert_array_equal(target.weights, np.ones_like(R))  # the original is untouched
    core = Target(np.linspace(0.0, 1.0, 11), np.r_[np.zeros(4), np.ones(7)])
    weights = relative_weights(core).weights  # default floor 0.1: the core weighs 1/0.1² against 1
    assert np.all(np.isfinite(weights)) and weights[0] == pytest.approx(100.0 * weights[-1])
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="g_floor"):
            relative_weights(target, g_floor=bad)
