"""The TorchForce path against OpenMM's own forces.

Every analytic potential, run through ``create_system`` (openmm-torch
``TorchForce``), must give the energies and forces of OpenMM's native
``NonbondedForce`` / ``CustomNonbondedForce`` with the same expression and
cutoff convention.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch  # torch before openmm: openmm-torch's kernels need libtorch loaded

from openmm_diffsim import (
    WCA,
    LennardJones,
    ModifiedMorse,
    PairTable,
    SoftSphere,
    Yukawa,
    create_system,
)
from openmm_diffsim.torchforce import (
    _import_openmm,
    _import_openmmtorch,
    create_torch_force,
    script_energy_module,
    species_indices,
)

openmm = _import_openmm()
_import_openmmtorch()

CUTOFF = 0.9
SWITCH_DISTANCE = 0.75


def perturbed_lattice(n_side: int, spacing: float, jitter: float, seed: int = 0):
    """Simple-cubic lattice with Gaussian jitter: non-overlapping, liquid-like distances."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n_side)] * 3, indexing="ij"), -1).reshape(-1, 3)
    positions = (grid + 0.5) * spacing + rng.normal(0.0, jitter, grid.shape)
    return positions, np.full(3, n_side * spacing)


def context_energy_forces(system, positions, platform="Reference"):
    integrator = openmm.VerletIntegrator(0.001)
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName(platform))
    context.setPositions(positions)
    state = context.getState(getEnergy=True, getForces=True)
    energy = state.getPotentialEnergy().value_in_unit(openmm.unit.kilojoule_per_mole)
    forces = state.getForces(asNumpy=True).value_in_unit(openmm.unit.kilojoule_per_mole / openmm.unit.nanometer)
    del context, integrator
    return energy, np.asarray(forces)


def native_system(expression, n, lengths, cutoff_mode, cutoff=CUTOFF, switch_distance=SWITCH_DISTANCE):
    """CustomNonbondedForce with ``expression`` and the table's cutoff convention."""
    system = openmm.System()
    for _ in range(n):
        system.addParticle(39.9)
    system.setDefaultPeriodicBoxVectors(*(openmm.Vec3(*row) for row in np.diag(lengths)))
    if cutoff_mode == "shift":
        # Same expression evaluated at r_c: OpenMM's expression parser does the shift.
        at_cutoff = re.sub(r"\br\b", f"({cutoff!r})", expression)
        expression = f"({expression})-({at_cutoff})"
    force = openmm.CustomNonbondedForce(expression)
    force.setNonbondedMethod(openmm.CustomNonbondedForce.CutoffPeriodic)
    force.setCutoffDistance(cutoff)
    force.setUseLongRangeCorrection(False)
    if cutoff_mode == "switch":
        force.setUseSwitchingFunction(True)
        force.setSwitchingDistance(switch_distance)
    for _ in range(n):
        force.addParticle([])
    system.addForce(force)
    return system


def lj_nonbonded_system(sigmas, epsilons, lengths, cutoff=CUTOFF):
    """OpenMM NonbondedForce, plain cutoff, no dispersion correction, zero charges."""
    system = openmm.System()
    force = openmm.NonbondedForce()
    force.setNonbondedMethod(openmm.NonbondedForce.CutoffPeriodic)
    force.setCutoffDistance(cutoff)
    force.setUseDispersionCorrection(False)
    force.setUseSwitchingFunction(False)
    for s, e in zip(sigmas, epsilons, strict=True):
        system.addParticle(39.9)
        force.addParticle(0.0, float(s), float(e))
    system.setDefaultPeriodicBoxVectors(*(openmm.Vec3(*row) for row in np.diag(lengths)))
    system.addForce(force)
    return system


def assert_energy_forces_close(e, f, e_ref, f_ref, rtol):
    assert math.isfinite(e) and np.all(np.isfinite(f))
    assert abs(e - e_ref) <= rtol * max(abs(e_ref), 1.0), (e, e_ref)
    scale = np.abs(f_ref).max()
    assert scale > 0
    np.testing.assert_allclose(f, f_ref, rtol=0, atol=rtol * scale)


# Potentials with parameters chosen so that a lattice of spacing 0.4 nm samples
# their repulsive core, well and tail.
POTENTIALS = {
    "lj": lambda: LennardJones(0.34, 1.0),
    "wca": lambda: WCA(0.34, 1.0),
    "soft_sphere": lambda: SoftSphere(0.32, 1.5, 9.0),
    "yukawa": lambda: Yukawa(2.0, 3.0),
    "morse_soft": lambda: ModifiedMorse(a=5.5, phi=0.44, sigma=0.4, epsilon=1.2),
    "morse_hard": lambda: ModifiedMorse(a=4.0, phi=-1.5, sigma=0.4, epsilon=0.8),
}


@pytest.fixture(scope="module")
def configuration():
    return perturbed_lattice(6, 0.4, 0.04, seed=1)  # 216 particles, L = 2.4 nm


@pytest.mark.parametrize("mode", ["truncate", "shift", "switch"])
@pytest.mark.parametrize("name", sorted(POTENTIALS))
def test_torchforce_matches_custom_nonbonded(name, mode, configuration):
    positions, lengths = configuration
    potential = POTENTIALS[name]()
    table = PairTable(
        ["X"], potential, cutoff=CUTOFF, cutoff_mode=mode, switch_distance=SWITCH_DISTANCE if mode == "switch" else None
    )
    n = len(positions)
    e, f = context_energy_forces(create_system(table, ["X"] * n, 39.9, lengths), positions)
    e_ref, f_ref = context_energy_forces(native_system(potential.openmm_expression(), n, lengths, mode), positions)
    assert abs(e_ref) > 1.0  # the configuration actually probes the potential
    assert_energy_forces_close(e, f, e_ref, f_ref, rtol=1e-6)


def test_lennard_jones_matches_nonbonded_force(configuration):
    positions, lengths = configuration
    n = len(positions)
    table = PairTable(["Ar"], LennardJones(0.34, 1.0), cutoff=CUTOFF, cutoff_mode="truncate")
    e, f = context_energy_forces(create_system(table, ["Ar"] * n, 39.9, lengths), positions)
    e_ref, f_ref = context_energy_forces(lj_nonbonded_system([0.34] * n, [1.0] * n, lengths), positions)
    assert e_ref < -10.0
    assert_energy_forces_close(e, f, e_ref, f_ref, rtol=1e-6)


def test_cpu_platform(configuration):
    """CPU platform: TorchForce runs in float64 (as on Reference); native forces are single precision.

    OpenMM's CPU NonbondedForce/CustomNonbondedForce kernels compute pair
    terms in float32 (accumulating in double), so they agree with the double
    precision Reference result only to ~1e-5 relative; the TorchForce result
    must not depend on the platform at all.
    """
    positions, lengths = configuration
    n = len(positions)
    table = PairTable(["Ar"], LennardJones(0.34, 1.0), cutoff=CUTOFF, cutoff_mode="truncate")
    torch_system = create_system(table, ["Ar"] * n, 39.9, lengths)
    native = lj_nonbonded_system([0.34] * n, [1.0] * n, lengths)
    e_ref, f_ref = context_energy_forces(native, positions, "Reference")
    e_cpu, f_cpu = context_energy_forces(torch_system, positions, "CPU")
    e_torch_ref, f_torch_ref = context_energy_forces(torch_system, positions, "Reference")
    e_native_cpu, f_native_cpu = context_energy_forces(native, positions, "CPU")
    assert_energy_forces_close(e_cpu, f_cpu, e_torch_ref, f_torch_ref, rtol=1e-12)
    assert_energy_forces_close(e_cpu, f_cpu, e_ref, f_ref, rtol=1e-6)
    assert_energy_forces_close(e_native_cpu, f_native_cpu, e_cpu, f_cpu, rtol=1e-4)


def test_binary_mixture_matches_nonbonded_force():
    """Lorentz–Berthelot mixture; also pins the pair-type order (A-A, A-B, B-B)."""
    positions, lengths = perturbed_lattice(6, 0.4, 0.04, seed=2)
    n = len(positions)
    rng = np.random.default_rng(3)
    names = rng.choice(["A", "B"], size=n, p=[0.6, 0.4])
    sigma = {"A": 0.34, "B": 0.30}
    epsilon = {"A": 1.0, "B": 0.6}
    mixed = LennardJones(0.5 * (sigma["A"] + sigma["B"]), math.sqrt(epsilon["A"] * epsilon["B"]))
    table = PairTable(
        ["A", "B"],
        {
            ("B", "B"): LennardJones(sigma["B"], epsilon["B"]),
            ("B", "A"): mixed,  # reversed key: same unordered pair
            ("A", "A"): LennardJones(sigma["A"], epsilon["A"]),
        },
        cutoff=CUTOFF,
        cutoff_mode="truncate",
    )
    assert table.pair_names == ["A-A", "A-B", "B-B"]
    assert table.pair_index(("B", "A")) == table.pair_index("A-B") == 1
    assert table.pair_potentials[1] is mixed
    assert float(table.pair_potentials[2].sigma.detach()) == sigma["B"]
    np.testing.assert_array_equal(species_indices(table, list(names)), (names == "B").astype(int))
    e, f = context_energy_forces(create_system(table, list(names), 39.9, lengths), positions)
    native = lj_nonbonded_system([sigma[s] for s in names], [epsilon[s] for s in names], lengths)
    e_ref, f_ref = context_energy_forces(native, positions)
    assert_energy_forces_close(e, f, e_ref, f_ref, rtol=1e-6)
    # Swapping the species labels must change the answer (the test can see mistakes).
    swapped = np.where(names == "A", "B", "A")
    e_swapped, _ = context_energy_forces(create_system(table, list(swapped), 39.9, lengths), positions)
    assert abs(e_swapped - e_ref) > 1e-3 * abs(e_ref)


def test_float32_positions_match_float64(configuration):
    positions, lengths = configuration
    n = len(positions)
    table = PairTable(["X"], LennardJones(0.34, 1.0), cutoff=CUTOFF, cutoff_mode="switch", switch_distance=0.75)
    module = script_energy_module(table, [0] * n)
    box = torch.diag(torch.tensor(lengths))
    e64, f64 = module(torch.tensor(positions, dtype=torch.float64), box)
    module32 = script_energy_module(table, [0] * n)
    e32, f32 = module32(torch.tensor(positions, dtype=torch.float32), box.float())
    assert e32.dtype == torch.float32 and f32.dtype == torch.float32
    # float32 round-off: ~1e-7 per pair term, accumulated over ~10^4 pairs.
    assert abs(float(e32) - float(e64)) <= 1e-4 * abs(float(e64))
    scale = float(f64.abs().max())
    np.testing.assert_allclose(f32.double().numpy(), f64.numpy(), rtol=0, atol=1e-4 * scale)
    assert float((f32.double() - f64).abs().max()) > 0  # really computed in float32


def test_energy_invariant_under_translation_and_wrapping(configuration):
    positions, lengths = configuration
    n = len(positions)
    table = PairTable(["X"], LennardJones(0.34, 1.0), cutoff=CUTOFF, cutoff_mode="shift")
    system = create_system(table, ["X"] * n, 39.9, lengths)
    e0, f0 = context_energy_forces(system, positions)
    rng = np.random.default_rng(5)
    shifted = positions + rng.integers(-3, 4, size=(n, 3)) * lengths  # each particle by whole box vectors
    shifted[0] += np.array([7.0, -5.0, 11.0]) * lengths  # far outside the box
    wrapped = positions - lengths * np.floor(positions / lengths)
    translated = positions + np.array([0.37, -1.21, 5.5])  # rigid translation
    for other in (shifted, wrapped, translated):
        e, f = context_energy_forces(system, other)
        assert_energy_forces_close(e, f, e0, f0, rtol=1e-9)


def test_scripted_module_save_and_reload(tmp_path, configuration):
    positions, lengths = configuration
    n = len(positions)
    table = PairTable(["X"], ModifiedMorse(a=5.5, phi=0.44, sigma=0.4), cutoff=CUTOFF)
    module = script_energy_module(table, [0] * n)
    path = tmp_path / "pair_energy.pt"
    module.save(str(path))
    loaded = torch.jit.load(str(path))
    x = torch.tensor(positions)
    box = torch.diag(torch.tensor(lengths))
    e0, f0 = module(x, box)
    e1, f1 = loaded(x, box)
    assert float(e0) == float(e1)
    assert torch.equal(f0, f1)


def test_module_is_frozen_copy():
    """Training after the force is built must not alter the scripted module."""
    pot = LennardJones(0.34, 1.0)
    table = PairTable(["X"], pot, cutoff=CUTOFF)
    positions, lengths = perturbed_lattice(5, 0.4, 0.03)
    module = script_energy_module(table, [0] * len(positions))
    box = torch.diag(torch.tensor(lengths))
    e0 = float(module(torch.tensor(positions), box)[0])
    with torch.no_grad():
        pot.epsilon.mul_(2.0)
    assert float(module(torch.tensor(positions), box)[0]) == e0


# -- bad input ------------------------------------------------------------------------


def test_wrong_number_of_positions_raises():
    table = PairTable(["X"], LennardJones(0.34, 1.0), cutoff=CUTOFF)
    module = script_energy_module(table, [0] * 64)
    positions, lengths = perturbed_lattice(4, 0.5, 0.0)
    box = torch.diag(torch.tensor(lengths))
    with pytest.raises(Exception, match="does not match the species"):
        module(torch.tensor(positions[:-1]), box)


def test_cutoff_larger_than_half_box_raises():
    table = PairTable(["X"], LennardJones(0.34, 1.0), cutoff=1.0)
    with pytest.raises(ValueError, match="half the shortest box edge"):
        create_system(table, ["X"] * 10, 39.9, [1.9, 3.0, 3.0])


def test_triclinic_box_raises():
    table = PairTable(["X"], LennardJones(0.34, 1.0), cutoff=0.9)
    box = np.array([[3.0, 0.0, 0.0], [0.5, 3.0, 0.0], [0.0, 0.0, 3.0]])
    with pytest.raises(ValueError, match="triclinic"):
        create_system(table, ["X"] * 10, 39.9, box)


def test_bad_masses_raise():
    table = PairTable(["X"], LennardJones(0.34, 1.0), cutoff=0.9)
    with pytest.raises(ValueError, match="masses"):
        create_system(table, ["X"] * 3, [39.9, -1.0, 39.9], [3.0] * 3)


def test_unknown_species_raises():
    table = PairTable(["A", "B"], {("A", "A"): WCA(), ("A", "B"): WCA(), ("B", "B"): WCA()}, cutoff=0.9)
    with pytest.raises(ValueError, match="unknown species 'C'"):
        species_indices(table, ["A", "B", "C"])
    with pytest.raises(ValueError, match="out of range"):
        species_indices(table, [0, 1, 2])
    with pytest.raises(ValueError, match="unknown species"):
        create_system(table, ["A", "Q"], 39.9, [3.0] * 3)


def test_nan_positions_raise_in_module_and_context():
    positions, lengths = perturbed_lattice(4, 0.5, 0.02)
    n = len(positions)
    table = PairTable(["X"], LennardJones(0.34, 1.0), cutoff=0.9)
    module = script_energy_module(table, [0] * n)
    bad = positions.copy()
    bad[3, 1] = np.nan
    with pytest.raises(Exception, match="NaN"):
        module(torch.tensor(bad), torch.diag(torch.tensor(lengths)))
    system = create_system(table, ["X"] * n, 39.9, lengths)
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(bad)
    with pytest.raises(openmm.OpenMMException, match="NaN"):
        context.getState(getEnergy=True)


def test_neural_potential_runs_tabulated_in_torchforce_and_matches_network():
    import openmm

    from openmm_diffsim.energy import potential_energy
    from openmm_diffsim.potentials import NeuralCorrection, PotentialSum, SoftSphere

    torch.manual_seed(0)
    network = NeuralCorrection(0.9, n_basis=16, hidden=(16,), seed=4)
    with torch.no_grad():
        network.layers[-1].weight.mul_(100.0)  # a correction of a few kJ/mol, not ~0
    table = PairTable(["A"], PotentialSum([SoftSphere(0.3, 1.0, 12), network]), cutoff=0.9, cutoff_mode="shift")
    n, box = 120, 2.2
    rng = np.random.default_rng(3)
    grid = np.stack(np.meshgrid(*[np.arange(5)] * 3, indexing="ij"), -1).reshape(-1, 3)[:n]
    positions = grid * (box / 5) + rng.normal(scale=0.02, size=(n, 3))
    force = create_torch_force(table, ["A"] * n)
    system = openmm.System()
    for _ in range(n):
        system.addParticle(40.0)
    system.setDefaultPeriodicBoxVectors(*(openmm.Vec3(*row) for row in np.eye(3) * box))
    system.addForce(force)
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(positions)
    energy = context.getState(getEnergy=True).getPotentialEnergy().value_in_unit_system(openmm.unit.md_unit_system)
    exact = float(
        potential_energy(
            table,
            torch.as_tensor(positions),
            torch.full((3,), box, dtype=torch.float64),
            torch.zeros(n, dtype=torch.long),
        ).detach()
    )
    assert abs(exact) > 1.0
    assert energy == pytest.approx(exact, rel=1e-6)
    with pytest.raises(ValueError, match="tabulate"):
        create_torch_force(table, ["A"] * n, tabulate="sometimes")


# -- subsets and exclusions (a user's System, issue #9) ---------------------------------------


def _brute_force_energy(table, positions, lengths, species, atoms, excluded):
    """Σ u(r) over pairs of `atoms` within the cutoff, minus the excluded pairs (NumPy, minimum image)."""
    total = 0.0
    for a, i in enumerate(atoms):
        for j in atoms[a + 1 :]:
            if (i, j) in excluded:
                continue
            d = positions[j] - positions[i]
            r = float(np.linalg.norm(d - lengths * np.round(d / lengths)))
            if r < table.cutoff:
                total += table.evaluate([r], (table.species[species[i]], table.species[species[j]]))[0][0]
    return total


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_subset_and_exclusions_match_brute_force_and_finite_differences(dtype):
    positions, lengths = perturbed_lattice(5, 0.42, 0.04, seed=3)
    n = len(positions)
    pots = {("A", "A"): LennardJones(0.34, 1.0), ("A", "B"): SoftSphere(0.3, 0.5), ("B", "B"): Yukawa(2.0, 3.0)}
    table = PairTable(["A", "B"], pots, cutoff=CUTOFF, cutoff_mode="shift")
    rng = np.random.default_rng(0)
    atoms = np.sort(rng.choice(n, 80, replace=False))
    species = {int(i): int(rng.integers(2)) for i in atoms}
    neighbours = [(int(atoms[k]), int(atoms[k + 1])) for k in range(0, 60, 2)]  # close-ish pairs
    module = script_energy_module(
        table, [species[i] for i in atoms], atoms=atoms, n_particles=n, exclusions=[(j, i) for i, j in neighbours]
    )
    assert module.uses_subset and module.uses_exclusions
    x = torch.tensor(positions, dtype=dtype)
    box = torch.diag(torch.tensor(lengths, dtype=dtype))
    energy, forces = module(x, box)
    assert forces.shape == (n, 3) and forces.dtype == dtype
    expected = _brute_force_energy(table, positions, lengths, species, list(atoms), set(neighbours))
    rtol = 1e-10 if dtype == torch.float64 else 1e-4
    assert float(energy) == pytest.approx(expected, rel=rtol)
    outside = np.setdiff1d(np.arange(n), atoms)
    assert float(forces[outside].abs().max()) == 0.0
    if dtype == torch.float64:
        # Forces are -dE/dx: central differences on a few selected particles.
        h = 1e-6
        for k in atoms[:5]:
            for c in range(3):
                plus, minus = x.clone(), x.clone()
                plus[k, c] += h
                minus[k, c] -= h
                fd = -(float(module(plus, box)[0]) - float(module(minus, box)[0])) / (2 * h)
                assert float(forces[k, c]) == pytest.approx(fd, rel=1e-5, abs=1e-5)


def test_exclusions_follow_verlet_list_rebuilds():
    """Excluded pairs stay excluded when the list is rebuilt after particles move."""
    positions, lengths = perturbed_lattice(4, 0.5, 0.0)
    n = len(positions)
    table = PairTable(["X"], LennardJones(0.34, 1.0), cutoff=CUTOFF)
    excluded = [(0, 1), (0, 5), (2, 3)]
    module = script_energy_module(table, [0] * n, exclusions=excluded, skin=0.05)
    plain = script_energy_module(table, [0] * n, skin=0.05)
    assert not module.uses_subset and module.uses_exclusions
    assert not plain.uses_subset and not plain.uses_exclusions
    box = torch.diag(torch.tensor(lengths))
    rng = np.random.default_rng(1)
    for step in range(4):
        x = torch.tensor(positions + rng.normal(0, 0.02, positions.shape) * step)
        e, _ = module(x, box)
        expected = _brute_force_energy(table, x.numpy(), lengths, [0] * n, list(range(n)), set(excluded))
        assert float(e) == pytest.approx(expected, rel=1e-10)
        assert float(plain(x, box)[0]) != pytest.approx(float(e), rel=1e-6)  # the exclusions matter
    assert int(module.neighbors.builds) > 1 and int(module.filtered_build) == int(module.neighbors.builds)


def test_subset_and_exclusion_input_errors():
    table = PairTable(["X"], LennardJones(0.34, 1.0), cutoff=CUTOFF)
    with pytest.raises(ValueError, match="needs n_particles"):
        script_energy_module(table, [0] * 3, atoms=[0, 1, 2])
    with pytest.raises(ValueError, match="atoms lists 2 particles but species 3"):
        script_energy_module(table, [0] * 3, atoms=[0, 1], n_particles=5)
    with pytest.raises(ValueError, match="must not repeat"):
        script_energy_module(table, [0] * 3, atoms=[0, 1, 1], n_particles=5)
    with pytest.raises(ValueError, match="indices in 0..4"):
        script_energy_module(table, [0] * 3, atoms=[0, 1, 5], n_particles=5)
    with pytest.raises(ValueError, match="give atoms"):
        script_energy_module(table, [0] * 3, n_particles=5)
    with pytest.raises(ValueError, match="does not act on"):
        script_energy_module(table, [0] * 3, atoms=[0, 1, 2], n_particles=5, exclusions=[(0, 4)])
    with pytest.raises(ValueError, match="itself"):
        script_energy_module(table, [0] * 3, exclusions=[(1, 1)])
    with pytest.raises(ValueError, match=r"shape \(E, 2\)"):
        script_energy_module(table, [0] * 3, exclusions=[0, 1, 2])


def test_torch_force_on_a_subset_in_openmm_matches_the_module():
    positions, lengths = perturbed_lattice(4, 0.5, 0.03)
    n = len(positions)
    table = PairTable(["X"], LennardJones(0.34, 1.0), cutoff=CUTOFF, cutoff_mode="shift")
    atoms = list(range(0, n, 2))
    system = openmm.System()
    for _ in range(n):
        system.addParticle(39.9)
    system.setDefaultPeriodicBoxVectors(*(openmm.Vec3(*row) for row in np.diag(lengths)))
    system.addForce(create_torch_force(table, ["X"] * len(atoms), atoms=atoms, n_particles=n, exclusions=[(0, 2)]))
    energy, forces = context_energy_forces(system, positions)
    expected = _brute_force_energy(table, positions, lengths, [0] * n, atoms, {(0, 2)})
    assert energy == pytest.approx(expected, rel=1e-10)
    assert np.abs(forces[1::2]).max() == 0.0
