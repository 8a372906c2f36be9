"""State points, initial configurations, topologies and reduced LJ units."""

import math

import mdtraj
import numpy as np
import openmm
import pytest
import torch  # noqa: F401  (before OpenMM: openmm-torch plugins need libtorch)
from openmm import unit

from openmm_diffsim.systems import (
    MOLAR_GAS_CONSTANT,
    StatePoint,
    lattice_positions,
    random_positions,
    reduced_lj_units,
)

ARGON = reduced_lj_units(0.34, 0.996, 39.948)


def _min_pair_distance(positions, lengths):
    """Smallest minimum-image pair distance, computed by mdtraj (independent of our code)."""
    n = len(positions)
    top = mdtraj.Topology()
    chain = top.add_chain()
    for _ in range(n):
        top.add_atom("X", mdtraj.element.argon, top.add_residue("X", chain))
    traj = mdtraj.Trajectory(
        positions[None].astype(np.float32), top, unitcell_lengths=np.asarray(lengths)[None], unitcell_angles=[[90] * 3]
    )
    pairs = np.array([(i, j) for i in range(n) for j in range(i + 1, n)])
    return float(mdtraj.compute_distances(traj, pairs, periodic=True).min())


def _state(**kwargs):
    args = dict(
        name="liquid",
        species=["Ar"],
        counts=[100],
        masses=[39.948],
        temperature=120.0,
        density=20.0,
    )
    args.update(kwargs)
    return StatePoint(**args)


# -- StatePoint -----------------------------------------------------------------------


def test_density_defines_cubic_box():
    state = _state(counts=[125], density=15.625)
    np.testing.assert_allclose(state.box_lengths, [2.0, 2.0, 2.0], rtol=1e-12)
    assert state.n_particles == 125
    assert state.volume == pytest.approx(8.0)


def test_box_defines_density_and_accepts_quantities():
    state = _state(
        counts=[8],
        density=None,
        box=[2.0, 2.0, 20.0] * unit.angstrom,
        temperature=300 * unit.kelvin,
        masses=40 * unit.dalton,
        pressure=1 * unit.atmosphere,
    )
    np.testing.assert_allclose(state.box_lengths, [0.2, 0.2, 2.0])
    assert state.density == pytest.approx(8 / (0.2 * 0.2 * 2.0))
    assert state.pressure == pytest.approx(1.01325)
    assert state.masses == [40.0]


def test_kT_and_beta_match_openmm_constants():
    state = _state(temperature=300.0)
    kT = (unit.BOLTZMANN_CONSTANT_kB * unit.AVOGADRO_CONSTANT_NA * 300 * unit.kelvin).value_in_unit(
        unit.kilojoule_per_mole
    )
    assert state.kT == pytest.approx(kT, rel=1e-9)
    assert state.beta == pytest.approx(1 / kT, rel=1e-9)
    assert MOLAR_GAS_CONSTANT == pytest.approx(
        unit.MOLAR_GAS_CONSTANT_R.value_in_unit(unit.kilojoule_per_mole / unit.kelvin)
    )


def test_particle_species_and_masses_per_species():
    state = _state(species=["A", "B"], counts=[3, 2], masses=[10.0, 20.0])
    np.testing.assert_array_equal(state.particle_species(), [0, 0, 0, 1, 1])
    np.testing.assert_array_equal(state.particle_masses(), [10, 10, 10, 20, 20])
    assert state.particle_species().dtype == np.int64
    assert state.particle_species_names() == ["A", "A", "A", "B", "B"]


def test_single_mass_applies_to_all_species():
    state = _state(species=["A", "B"], counts=[3, 2], masses=12.0)
    assert state.masses == [12.0, 12.0]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(box=[3.0, 3.0, 3.0]), "exactly one of box"),
        (dict(density=None), "exactly one of box"),
        (dict(counts=[10, 10]), "one number per species"),
        (dict(counts=[-1]), "non-negative integers"),
        (dict(counts=[2.5]), "non-negative integers"),
        (dict(masses=[1.0, 2.0]), "one value"),
        (dict(masses=[-1.0]), "positive"),
        (dict(temperature=-5.0), "temperature must be positive"),
        (dict(density=-1.0), "density must be positive"),
        (dict(density=None, box=[1.0, 1.0]), "shape"),
        (dict(density=None, box=[[1, 0.1, 0], [0, 1, 0], [0, 0, 1]]), "triclinic"),
        (dict(species=["A", "A"], counts=[1, 1], masses=1.0), "unique"),
        (dict(weight=-1.0), "weight"),
        (dict(counts=[1]), "at least two particles"),
    ],
)
def test_bad_state_points_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _state(**kwargs)


def test_species_must_be_a_list():
    with pytest.raises(TypeError, match="list of names"):
        _state(species="Ar")


def test_targets_and_weight_are_stored():
    targets = [object(), object()]
    state = _state(targets=targets, weight=2.5)
    assert state.targets == targets and state.targets is not targets
    assert state.weight == 2.5


# -- topology ---------------------------------------------------------------------------------


def test_topology_round_trips_through_mdtraj_and_pdb(tmp_path):
    state = _state(species=["Ar", "Xx"], counts=[4, 3], masses=[39.948, 20.0], density=None, box=[2.0, 2.5, 3.0])
    topology = state.topology()
    atoms = list(topology.atoms())
    assert [a.name for a in atoms] == ["Ar"] * 4 + ["Xx"] * 3
    assert atoms[0].element.symbol == "Ar"
    assert atoms[-1].element is None  # not an element symbol
    vectors = topology.getPeriodicBoxVectors().value_in_unit(unit.nanometer)
    np.testing.assert_allclose([vectors[i][i] for i in range(3)], [2.0, 2.5, 3.0])
    positions = state.initial_positions(seed=0)
    path = tmp_path / "start.pdb"
    with open(path, "w") as handle:
        openmm.app.PDBFile.writeFile(topology, positions * unit.nanometer, handle)
    traj = mdtraj.load(str(path))
    assert traj.n_atoms == 7
    np.testing.assert_allclose(traj.xyz[0], positions, atol=2e-4)  # PDB keeps 3 decimals in angstrom
    np.testing.assert_allclose(traj.unitcell_lengths[0], [2.0, 2.5, 3.0], atol=1e-3)


# -- initial configurations ------------------------------------------------------------------------


@pytest.mark.parametrize("n, lengths", [(108, [2.0, 2.0, 2.0]), (150, [2.0, 2.4, 3.1]), (37, [1.5, 1.5, 1.5])])
def test_lattice_positions_fill_box_without_overlap(n, lengths):
    positions = lattice_positions(n, lengths, rng=np.random.default_rng(1))
    assert positions.shape == (n, 3)
    assert np.all(positions >= 0) and np.all(positions < np.asarray(lengths))
    # Overlap-free: nearest distance close to the ideal fcc spacing of this density.
    ideal = (4 * np.prod(lengths) / n) ** (1 / 3) / math.sqrt(2)
    assert _min_pair_distance(positions, lengths) > 0.6 * ideal


def test_lattice_start_meets_min_distance_and_rejects_too_dense():
    state = _state(counts=[256], density=ARGON.density_from_reduced(1.0))
    positions = state.initial_positions("lattice", min_distance=0.9 * 0.34, seed=3)
    assert _min_pair_distance(positions, state.box_lengths) >= 0.9 * 0.34
    dense = _state(counts=[256], density=ARGON.density_from_reduced(2.5))
    with pytest.raises(ValueError, match="too high|close-packing"):
        dense.initial_positions("lattice", min_distance=0.34)


def test_random_positions_respect_min_distance_and_are_reproducible():
    lengths = np.array([2.0, 2.0, 2.0])
    a = random_positions(150, lengths, 0.3, rng=np.random.default_rng(7))
    b = random_positions(150, lengths, 0.3, rng=np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    assert _min_pair_distance(a, lengths) >= 0.3 - 1e-6


def test_impossible_packing_is_a_clear_error():
    with pytest.raises(ValueError, match="close-packing"):
        random_positions(1000, [2.0, 2.0, 2.0], 0.3)
    with pytest.raises(ValueError, match="random insertion placed only"):
        random_positions(260, [2.0, 2.0, 2.0], 0.3, rng=np.random.default_rng(0), max_attempts=50)
    with pytest.raises(ValueError, match="needs min_distance"):
        _state().initial_positions("random")
    with pytest.raises(ValueError, match="method"):
        _state().initial_positions("grid")


# -- reduced units -------------------------------------------------------------------------------


def test_reduced_units_match_openmm_unit_arithmetic():
    sigma = 0.34 * unit.nanometer
    epsilon = 0.996 * unit.kilojoule_per_mole
    mass = 39.948 * unit.dalton
    kB = unit.BOLTZMANN_CONSTANT_kB * unit.AVOGADRO_CONSTANT_NA
    assert ARGON.temperature_from_reduced(1.5) == pytest.approx((1.5 * epsilon / kB).value_in_unit(unit.kelvin))
    tau = (sigma * unit.sqrt(mass / epsilon)).value_in_unit(unit.picosecond)
    assert ARGON.time == pytest.approx(tau, rel=1e-12)
    assert ARGON.time_from_reduced(2.0) == pytest.approx(2 * tau)
    pressure = (epsilon / unit.AVOGADRO_CONSTANT_NA / sigma**3).value_in_unit(unit.bar)
    assert ARGON.pressure_from_reduced(1.0) == pytest.approx(pressure, rel=1e-9)
    assert ARGON.density_from_reduced(0.8) == pytest.approx(0.8 / 0.34**3)
    # Textbook argon: epsilon / k_B = 119.8 K, tau ~ 2.15 ps.
    assert ARGON.temperature_from_reduced(1.0) == pytest.approx(119.8, abs=0.1)
    assert ARGON.time == pytest.approx(2.15, abs=0.01)


@pytest.mark.parametrize(
    "forward, backward, value",
    [
        ("density_from_reduced", "density_to_reduced", 0.85),
        ("temperature_from_reduced", "temperature_to_reduced", 0.72),
        ("pressure_from_reduced", "pressure_to_reduced", 2.3),
        ("time_from_reduced", "time_to_reduced", 0.005),
        ("energy_from_reduced", "energy_to_reduced", -6.1),
        ("length_from_reduced", "length_to_reduced", 2.5),
    ],
)
def test_reduced_unit_round_trips(forward, backward, value):
    assert getattr(ARGON, backward)(getattr(ARGON, forward)(value)) == pytest.approx(value, rel=1e-12)


def test_reduced_units_accept_quantities_and_reject_bad_values():
    units = reduced_lj_units(3.4 * unit.angstrom, 0.996 * unit.kilojoule_per_mole, 39.948 * unit.dalton)
    assert units.sigma == pytest.approx(0.34)
    with pytest.raises(ValueError, match="sigma must be positive"):
        reduced_lj_units(-0.34, 1.0, 1.0)
    assert ARGON.box_for(500, 0.8) ** 3 == pytest.approx(500 / ARGON.density_from_reduced(0.8))
