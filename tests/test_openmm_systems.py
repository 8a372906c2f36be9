"""The learned pair potential inside a user's own OpenMM System and Simulation.

References are independent: OpenMM's NonbondedForce / CustomNonbondedForce
with the same exclusions, OpenMM's own createExclusionsFromBonds, brute-force
NumPy sums, and OpenMM energies for the reweighting weights.
"""

import math
import sys
import warnings
from pathlib import Path

import numpy as np
import openmm
import pytest
import torch
from openmm import app, unit

import openmm_diffsim as od
from openmm_diffsim.gradients import ReweightingEstimator, RolloutEstimator
from openmm_diffsim.openmm_systems import (
    PairSelection,
    SimulationStatePoint,
    add_pair_potential,
    bonded_pairs,
    create_pair_force,
    select_particles,
)
from openmm_diffsim.reporters import RDFReporter
from openmm_diffsim.sampling import Sampler
from openmm_diffsim.targets import Target, read_target
from openmm_diffsim.training import Trainer

CUTOFF = 0.9
BOND_LENGTH, BOND_K = 0.38, 2000.0
SIGMA = {"B": 0.34, "S": 0.36}
EPSILON = {"B": 1.0, "S": 0.8}


def polymer_system(n_chains=6, length=8, n_solvent=30, box=2.2, seed=0, bond_forces=True):
    """Bead-spring chains (residue POL, atoms B) and solvent beads (residue SOL, atoms S).

    Returns the Topology, a System holding only the harmonic bonds, the
    positions (nm) and the bonds. Positions are random walks with no two
    beads closer than 0.3 nm.
    """
    rng = np.random.default_rng(seed)
    topology = app.Topology()
    chain = topology.addChain()
    system = openmm.System()
    positions, bonds = [], []

    def free(p):
        if not positions:
            return True
        d = np.array(positions) - p
        d -= box * np.round(d / box)
        return np.min((d * d).sum(1)) > 0.3**2

    for _ in range(n_chains):
        residue = topology.addResidue("POL", chain)
        previous = None
        for k in range(length):
            for _ in range(10000):
                if k == 0:
                    p = rng.uniform(0, box, 3)
                else:
                    v = rng.normal(size=3)
                    p = positions[-1] + BOND_LENGTH * v / np.linalg.norm(v)
                if free(p):
                    break
            else:
                raise RuntimeError("could not place a bead")
            positions.append(p)
            atom = topology.addAtom("B", app.Element.getBySymbol("C"), residue)
            system.addParticle(40.0)
            if previous is not None:
                topology.addBond(previous, atom)
                bonds.append((previous.index, atom.index))
            previous = atom
    for _ in range(n_solvent):
        residue = topology.addResidue("SOL", chain)
        for _ in range(10000):
            p = rng.uniform(0, box, 3)
            if free(p):
                break
        positions.append(p)
        topology.addAtom("S", app.Element.getBySymbol("O"), residue)
        system.addParticle(20.0)
    vectors = np.eye(3) * box
    topology.setPeriodicBoxVectors(vectors * unit.nanometer)
    system.setDefaultPeriodicBoxVectors(*(openmm.Vec3(*row) for row in vectors))
    if bond_forces:
        harmonic = openmm.HarmonicBondForce()
        harmonic.setUsesPeriodicBoundaryConditions(True)
        for a, b in bonds:
            harmonic.addBond(a, b, BOND_LENGTH, BOND_K)
        system.addForce(harmonic)
    return topology, system, np.array(positions), bonds


def lj_mixture_table(mode="truncate", cutoff=CUTOFF):
    """B/S Lennard-Jones with Lorentz-Berthelot mixing, so NonbondedForce is an exact reference."""

    def lj(a, b):
        return od.LennardJones(0.5 * (SIGMA[a] + SIGMA[b]), math.sqrt(EPSILON[a] * EPSILON[b]))

    pots = {("B", "B"): lj("B", "B"), ("B", "S"): lj("B", "S"), ("S", "S"): lj("S", "S")}
    return od.PairTable(["B", "S"], pots, cutoff=cutoff, cutoff_mode=mode)


def energy_and_forces(system, positions, groups=None):
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(positions)
    state = context.getState(getEnergy=True, getForces=True, **({} if groups is None else {"groups": groups}))
    return state.getPotentialEnergy()._value, np.array(state.getForces(asNumpy=True)._value)


def assert_same(a, b, energy_rtol, force_tol):
    (ea, fa), (eb, fb) = a, b
    assert ea == pytest.approx(eb, rel=energy_rtol, abs=1e-9)
    scale = np.sqrt(np.mean(np.sum(fb**2, axis=1)))
    assert np.abs(fa - fb).max() <= force_tol * scale


# Spline tables: energies to ~1e-7, forces to ~1e-5 of their rms (docs/sampling.md).
TOLERANCE = {"torch": (1e-10, 1e-9), "tabulated": (2e-6, 2e-4)}


def with_native_lj(system, topology, exclusions, selected=None):
    """The same System plus OpenMM's NonbondedForce; unselected particles get epsilon 0."""
    system = openmm.XmlSerializer.clone(system)
    force = openmm.NonbondedForce()
    force.setNonbondedMethod(openmm.NonbondedForce.CutoffPeriodic)
    force.setCutoffDistance(CUTOFF)
    force.setUseDispersionCorrection(False)
    force.setUseSwitchingFunction(False)
    for atom in topology.atoms():
        on = selected is None or atom.index in selected
        force.addParticle(0.0, SIGMA[atom.name], EPSILON[atom.name] if on else 0.0)
    for i, j in exclusions:
        force.addException(int(i), int(j), 0.0, 1.0, 0.0)
    system.addForce(force)
    return system


# -- add_pair_potential against OpenMM's own forces -------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "tabulated"])
@pytest.mark.parametrize("bond_cutoff", [1, 2])
def test_bonds_plus_learned_force_equal_bonds_plus_nonbonded_force(backend, bond_cutoff):
    topology, system, positions, bonds = polymer_system()
    table = lj_mixture_table("truncate")
    learned = openmm.XmlSerializer.clone(system)
    index = add_pair_potential(learned, topology, table, backend=backend, bond_cutoff=bond_cutoff, force_group=3)
    assert index == 1 and learned.getNumForces() == 2
    assert learned.getForce(0).getNumBonds() == len(bonds)  # the bonds are untouched

    exclusions = [(a, b) for a, b in bonds]
    if bond_cutoff == 2:
        chains = {}
        for a, b in bonds:
            chains.setdefault(a, []).append(b)
        exclusions += [(a, chains[b][0]) for a, b in bonds if b in chains]
    reference = with_native_lj(system, topology, exclusions)
    energy_rtol, force_tol = TOLERANCE[backend]
    assert_same(energy_and_forces(learned, positions), energy_and_forces(reference, positions), energy_rtol, force_tol)
    # The learned force alone equals the NonbondedForce alone.
    learned_only = energy_and_forces(learned, positions, groups={3})
    reference.getForce(1).setForceGroup(3)
    assert_same(learned_only, energy_and_forces(reference, positions, groups={3}), energy_rtol, force_tol)
    assert abs(learned_only[0]) > 1.0  # a real test: the pair energy is not negligible


@pytest.mark.parametrize("backend", ["torch", "tabulated"])
def test_shifted_potential_on_a_subset_equals_custom_nonbonded_force(backend):
    topology, system, positions, bonds = polymer_system()
    table = lj_mixture_table("shift")
    learned = openmm.XmlSerializer.clone(system)
    add_pair_potential(learned, topology, table, atoms="resname POL", bond_cutoff=2, backend=backend)

    reference = openmm.XmlSerializer.clone(system)
    sigma, epsilon = SIGMA["B"], EPSILON["B"]
    shift = 4 * epsilon * ((sigma / CUTOFF) ** 12 - (sigma / CUTOFF) ** 6)
    force = openmm.CustomNonbondedForce(f"4*{epsilon}*(({sigma}/r)^12 - ({sigma}/r)^6) - {shift!r}")
    force.setNonbondedMethod(openmm.CustomNonbondedForce.CutoffPeriodic)
    force.setCutoffDistance(CUTOFF)
    for _ in range(system.getNumParticles()):
        force.addParticle([])
    polymer = [a.index for a in topology.atoms() if a.residue.name == "POL"]
    force.addInteractionGroup(polymer, polymer)
    force.createExclusionsFromBonds(bonds, 2)
    reference.addForce(force)
    result = energy_and_forces(learned, positions)
    assert_same(result, energy_and_forces(reference, positions), *TOLERANCE[backend])
    solvent = [a.index for a in topology.atoms() if a.residue.name == "SOL"]
    np.testing.assert_allclose(result[1][solvent], 0.0, atol=1e-12)  # no force on unselected particles


def test_subset_energy_equals_brute_force_sum():
    topology, system, positions, bonds = polymer_system(n_chains=3, length=6, n_solvent=20, box=2.0)
    table = lj_mixture_table("shift", cutoff=0.8)
    selected = [a.index for a in topology.atoms() if a.residue.name == "POL" or a.index % 2 == 0]
    learned = openmm.System()
    for k in range(system.getNumParticles()):
        learned.addParticle(system.getParticleMass(k))
    learned.setDefaultPeriodicBoxVectors(*system.getDefaultPeriodicBoxVectors())
    add_pair_potential(learned, topology, table, atoms=selected, exclusions=bonds[:5])
    energy, _ = energy_and_forces(learned, positions)
    names = [a.name for a in topology.atoms()]
    excluded = {tuple(sorted(p)) for p in bonds[:5]}
    expected = 0.0
    for n, i in enumerate(selected):
        for j in selected[n + 1 :]:
            if (i, j) in excluded:
                continue
            d = positions[j] - positions[i]
            r = np.linalg.norm(d - 2.0 * np.round(d / 2.0))
            if r < 0.8:
                expected += table.evaluate([r], (names[i], names[j]))[0][0]
    assert energy == pytest.approx(expected, rel=1e-10)


# -- selections -----------------------------------------------------------------------------------


@pytest.mark.parametrize("bond_cutoff", [1, 2, 3])
def test_bonded_pairs_equal_openmm_create_exclusions_from_bonds(bond_cutoff):
    topology, _, _, bonds = polymer_system(n_chains=3, length=7, n_solvent=5)
    # A branch makes the graph more than a line.
    atoms = list(topology.atoms())
    topology.addBond(atoms[2], atoms[9])
    bonds = bonds + [(2, 9)]
    force = openmm.CustomNonbondedForce("0")
    for _ in atoms:
        force.addParticle([])
    force.createExclusionsFromBonds(bonds, bond_cutoff)
    reference = {tuple(sorted(force.getExclusionParticles(k))) for k in range(force.getNumExclusions())}
    assert {tuple(p) for p in bonded_pairs(topology, bond_cutoff).tolist()} == reference


def test_species_sources_and_selections():
    topology, _, _, _ = polymer_system(n_chains=2, length=4, n_solvent=3)
    table = od.PairTable(["C", "O"], {("C", "C"): od.WCA(), ("C", "O"): od.WCA(), ("O", "O"): od.WCA()})
    by_element = select_particles(topology, table, species_from="element")
    assert by_element.species == ("C",) * 8 + ("O",) * 3 and by_element.covers_all
    by_residue = select_particles(topology, species_from="residue", species_map={"POL": "C", "SOL": "O"})
    assert by_residue.species == by_element.species
    by_name = select_particles(topology, species_from="name", atoms="resname POL and index > 1")
    np.testing.assert_array_equal(by_name.atoms, np.arange(2, 8))
    callable_ = select_particles(topology, species_from=lambda a: a.name.lower(), atoms=lambda a: a.name == "S")
    assert callable_.species == ("s",) * 3 and callable_.exclusions.shape == (0, 2)
    listed = select_particles(None, species_from=["X"] * 11, atoms=[10, 0, 5], exclusions=[(5, 0)])
    np.testing.assert_array_equal(listed.atoms, [0, 5, 10])
    np.testing.assert_array_equal(listed.exclusions, [[0, 5]])
    np.testing.assert_array_equal(listed.local_exclusions(), [[0, 1]])
    polymer = select_particles(topology, atoms="resname POL", bond_cutoff=2)
    # Two linear chains of 4: 3 + 2 (1-2 and 1-3) pairs each.
    assert len(polymer.exclusions) == 10


def test_bad_input_gets_clear_errors():
    topology, system, _, _ = polymer_system(n_chains=2, length=4, n_solvent=4)
    table = lj_mixture_table()
    with pytest.raises(ValueError, match="does not define"):
        add_pair_potential(system, topology, od.PairTable(["B"], od.WCA()))
    with pytest.raises(ValueError, match="has no species"):
        add_pair_potential(system, topology, table, species_map={"B": "B"})
    with pytest.raises(ValueError, match="particle 8 .*has no species"):
        add_pair_potential(system, topology, table, species_from=lambda atom: "B" if atom.name == "B" else None)
    with pytest.raises(ValueError, match="species 'C', which the potential does not define"):
        add_pair_potential(system, topology, table, species_from="element")
    with pytest.raises(ValueError, match="half the shortest edge"):
        add_pair_potential(system, topology, lj_mixture_table(cutoff=1.2))
    with pytest.raises(ValueError, match="selects no particle"):
        add_pair_potential(system, topology, table, atoms="resname XYZ")
    with pytest.raises(ValueError, match="atom selection"):
        add_pair_potential(system, topology, table, atoms="resname and (")
    with pytest.raises(ValueError, match="exclusion"):
        add_pair_potential(system, topology, table, atoms="resname POL", exclusions=[(0, 9)])
    with pytest.raises(ValueError, match="bond_cutoff"):
        add_pair_potential(system, topology, table, bond_cutoff=0)
    with pytest.raises(ValueError, match="backend"):
        add_pair_potential(system, topology, table, backend="native")
    with pytest.raises(ValueError, match="exclusions must be"):
        add_pair_potential(system, topology, table, exclusions="angles")
    bigger = openmm.XmlSerializer.clone(system)
    bigger.addParticle(1.0)
    with pytest.raises(ValueError, match="Topology has 12 atoms but the System 13"):
        add_pair_potential(bigger, topology, table)
    triclinic = openmm.XmlSerializer.clone(system)
    triclinic.setDefaultPeriodicBoxVectors(openmm.Vec3(2.2, 0, 0), openmm.Vec3(0.5, 2.2, 0), openmm.Vec3(0, 0, 2.2))
    with pytest.raises(ValueError, match="triclinic"):
        add_pair_potential(triclinic, topology, table)
    topology.setPeriodicBoxVectors(None)
    gas = openmm.XmlSerializer.clone(system)
    gas.getForce(0).setUsesPeriodicBoundaryConditions(False)
    with pytest.raises(ValueError, match="not periodic"):
        add_pair_potential(gas, topology, table)
    assert system.getNumForces() == 1  # failed calls add nothing


def test_warns_when_topology_lacks_the_bonds_of_the_system():
    topology, system, _, _ = polymer_system(n_chains=2, length=4, n_solvent=0)
    bare = app.Topology()
    chain = bare.addChain()
    for atom in topology.atoms():
        bare.addAtom(atom.name, atom.element, bare.addResidue("POL", chain))
    bare.setPeriodicBoxVectors(topology.getPeriodicBoxVectors())
    with pytest.warns(UserWarning, match="no bonds"):
        add_pair_potential(system, bare, od.PairTable(["B"], od.WCA(), cutoff=0.5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        add_pair_potential(system, bare, od.PairTable(["B"], od.WCA(), cutoff=0.5), exclusions=None)


def test_tabulated_backend_refuses_exclusions_that_other_nonbonded_forces_do_not_share():
    """OpenMM's CPU/CUDA/OpenCL platforms need identical exclusions in all nonbonded forces."""
    topology, system, positions, bonds = polymer_system(n_chains=2, length=4, n_solvent=8)
    charges = openmm.NonbondedForce()
    charges.setNonbondedMethod(openmm.NonbondedForce.CutoffPeriodic)
    charges.setCutoffDistance(CUTOFF)
    for atom in topology.atoms():
        charges.addParticle(0.1 if atom.name == "S" else 0.0, 0.3, 0.0)
    system.addForce(charges)
    table = lj_mixture_table()
    with pytest.raises(ValueError, match="exclude the same pairs: force 1 \\(NonbondedForce\\) has 0 exceptions"):
        add_pair_potential(openmm.XmlSerializer.clone(system), topology, table, backend="tabulated")
    # What the check prevents: OpenMM's own error when the Context is made.
    unchecked = openmm.XmlSerializer.clone(system)
    selection = select_particles(topology, table)
    unchecked.addForce(create_pair_force(table, selection, "tabulated"))
    with pytest.raises(Exception, match="identical exclusions"):
        openmm.Context(unchecked, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("CPU"))
    # Matching exclusions, or the TorchForce, are fine.
    for a, b in bonds:
        charges.addException(a, b, 0.0, 1.0, 0.0)
    add_pair_potential(openmm.XmlSerializer.clone(system), topology, table, backend="tabulated")
    charges.addException(8, 9, 0.0, 1.0, 0.0)
    add_pair_potential(openmm.XmlSerializer.clone(system), topology, table, backend="torch")
    simulation = user_simulation(system, topology, positions, platform="CPU")
    assert Sampler.from_simulation(simulation, table, backend="auto").backend == "torch"
    with pytest.raises(ValueError, match="exclude the same pairs"):
        Sampler.from_simulation(simulation, table, backend="tabulated")


def test_pair_selection_validates():
    with pytest.raises(ValueError, match="at least two"):
        PairSelection(np.array([0]), ("A",), n_particles=3)
    with pytest.raises(ValueError, match="increasing"):
        PairSelection(np.array([2, 1]), ("A", "A"), n_particles=3)
    with pytest.raises(ValueError, match="two distinct selected"):
        PairSelection(np.array([0, 1]), ("A", "A"), np.array([[0, 2]]), n_particles=3)
    table = od.PairTable(["A"], od.WCA())
    selection = PairSelection(np.array([0, 2]), ("A", "B"), n_particles=3)
    with pytest.raises(ValueError, match="particle 2 has species 'B'"):
        create_pair_force(table, selection, "tabulated")


# -- training from a user's Simulation ----------------------------------------------------------------


def user_simulation(system, topology, positions, platform="Reference", temperature=120.0, seed=1):
    integrator = openmm.LangevinMiddleIntegrator(temperature, 5.0, 0.004)
    integrator.setRandomNumberSeed(seed)
    simulation = app.Simulation(
        topology, openmm.XmlSerializer.clone(system), integrator, openmm.Platform.getPlatformByName(platform)
    )
    simulation.context.setPositions(positions)
    simulation.context.setVelocitiesToTemperature(temperature, seed)
    return simulation


@pytest.mark.parametrize("backend", ["torch", "tabulated"])
def test_sampler_from_simulation_adds_replaces_and_updates_only_the_pair_force(backend):
    topology, system, positions, bonds = polymer_system()
    table = lj_mixture_table("shift")
    # The user already put a (different) learned force in: it is replaced, not doubled.
    # (tabulated: XmlSerializer.clone of a TorchForce crashes with openmm-torch 1.5, see docs/export.md)
    add_pair_potential(
        system, topology, lj_mixture_table("truncate"), atoms="resname SOL", exclusions=None, backend="tabulated"
    )
    simulation = user_simulation(system, topology, positions)
    sampler = Sampler.from_simulation(simulation, table, atoms="resname POL", bond_cutoff=2, backend=backend)
    assert simulation.system.getNumForces() == 2
    assert isinstance(sampler.state, SimulationStatePoint)
    assert sampler.state.species == ["B"] and sampler.state.n_particles == 48
    assert len(sampler.state.exclusions) == 6 * (7 + 6)

    def expected(t):
        reference = openmm.XmlSerializer.clone(system)
        reference.removeForce(1)
        add_pair_potential(reference, topology, t, atoms="resname POL", bond_cutoff=2, backend=backend)
        return energy_and_forces(reference, sampler.positions)

    assert_same(sampler.energy_and_forces(), expected(table), *TOLERANCE[backend])
    stronger = lj_mixture_table("shift")
    stronger.pair_potentials[0].epsilon.data.fill_(1.7)
    sampler.update_potential(stronger)
    assert_same(sampler.energy_and_forces(), expected(stronger), *TOLERANCE[backend])
    bond_force = simulation.system.getForce(0)
    assert bond_force.getNumBonds() == len(bonds)
    assert bond_force.getBondParameters(3)[2:] == [
        BOND_LENGTH * unit.nanometer,
        BOND_K * unit.kilojoule_per_mole / unit.nanometer**2,
    ]


def test_snapshots_of_a_user_simulation_hold_the_selection_and_its_pair_energy():
    topology, system, positions, _ = polymer_system()
    simulation = user_simulation(system, topology, positions)
    table = lj_mixture_table("shift")
    sampler = Sampler.from_simulation(simulation, table, name="melt", atoms="resname POL", backend="tabulated")
    sampler.minimize()
    snapshots = sampler.run(3, 10)
    assert snapshots.positions.shape == (3, 48, 3) and snapshots.state is sampler.state
    np.testing.assert_array_equal(snapshots.steps, [10, 20, 30])
    assert simulation.currentStep == 30  # the user's Simulation ran (its reporters would too)
    full = sampler.positions
    np.testing.assert_allclose(snapshots.positions[-1], full[:48])
    learned = openmm.XmlSerializer.clone(system)
    for k in range(learned.getNumForces()):
        learned.getForce(k).setForceGroup(0)
    add_pair_potential(learned, topology, table, atoms="resname POL", backend="tabulated", force_group=7)
    assert snapshots.potential_energies[-1] == pytest.approx(energy_and_forces(learned, full, {7})[0], rel=1e-9)
    trajectory = snapshots.to_mdtraj()
    assert trajectory.n_atoms == 48 and trajectory.topology.n_bonds == 42


def test_from_simulation_temperature_and_errors():
    topology, system, positions, _ = polymer_system(n_chains=2, length=4, n_solvent=8)
    table = lj_mixture_table()
    simulation = user_simulation(system, topology, positions, temperature=150.0)
    assert Sampler.from_simulation(simulation, table).state.temperature == pytest.approx(150.0)
    with pytest.raises(ValueError, match="disagrees"):
        Sampler.from_simulation(simulation, table, temperature=120.0)
    with pytest.raises(ValueError, match="native"):
        Sampler.from_simulation(simulation, table, backend="native")
    verlet = app.Simulation(topology, openmm.XmlSerializer.clone(system), openmm.VerletIntegrator(0.002))
    verlet.context.setPositions(positions)
    with pytest.raises(ValueError, match="pass temperature"):
        Sampler.from_simulation(verlet, table)
    assert Sampler.from_simulation(verlet, table, temperature=100 * unit.kelvin).state.temperature == 100.0
    with pytest.raises(TypeError, match="Simulation"):
        Sampler.from_simulation(system, table)


def test_reweighting_energies_with_exclusions_equal_openmm_energy_differences():
    topology, system, positions, _ = polymer_system()
    table = lj_mixture_table("shift")
    simulation = user_simulation(system, topology, positions)
    sampler = Sampler.from_simulation(simulation, table, atoms="resname POL", bond_cutoff=2, backend="tabulated")
    sampler.minimize()
    snapshots = sampler.run(8, 25)
    trial = lj_mixture_table("shift")
    trial.pair_potentials[0].epsilon.data.fill_(1.3)
    trial.pair_potentials[0].sigma.data.fill_(0.35)

    def openmm_pair_energies(t):
        learned = openmm.XmlSerializer.clone(system)
        add_pair_potential(learned, topology, t, atoms="resname POL", bond_cutoff=2, force_group=5)
        context = openmm.Context(learned, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("CPU"))
        full = sampler.positions.copy()
        out = []
        for frame in snapshots.positions:
            full[:48] = frame
            context.setPositions(full)
            out.append(context.getState(getEnergy=True, groups={5}).getPotentialEnergy()._value)
        return np.array(out)

    delta = openmm_pair_energies(trial) - openmm_pair_energies(table)
    expected = torch.softmax(torch.as_tensor(-sampler.state.beta * delta), 0).numpy()
    assert np.ptp(delta) * sampler.state.beta > 0.5  # the weights are far from uniform
    for method in ("exact", "histogram"):
        estimator = ReweightingEstimator((0.0, 1.0), 50, energy_method=method)
        estimator.reset(table, snapshots)
        assert estimator.energy_mismatch < 1e-6  # snapshots store the learned force's energy
        np.testing.assert_allclose(estimator.weights(trial, sampler.state).numpy(), expected, rtol=1e-4, atol=1e-9)
    # Ignoring the exclusions would count the bonded pairs: a different answer.
    plain = SimulationStatePoint(**{**vars(sampler.state), "exclusions": None, "density": None})
    estimator = ReweightingEstimator((0.0, 1.0), 50, energy_method="exact")
    estimator.reset(table, snapshots[:], plain)
    assert np.abs(estimator.weights(trial, plain).numpy() - expected).max() > 1e-3


def test_model_rdf_of_a_user_simulation_equals_its_rdf_reporter(tmp_path):
    """Target and model count the same pairs (bonded pairs included)."""
    topology, system, positions, _ = polymer_system()
    simulation = user_simulation(system, topology, positions)
    sampler = Sampler.from_simulation(simulation, lj_mixture_table("shift"), atoms="resname POL")
    sampler.minimize()
    reporter = RDFReporter(
        tmp_path / "rdf.dat", 10, atoms=list(range(48)), r_range=(0.0, 1.0), n_bins=50, smearing=0.01
    )
    simulation.reporters.append(reporter)
    snapshots = sampler.run(5, 10)
    target = Target(reporter.r, np.ones(50), ("B", "B"))
    result = ReweightingEstimator((0.0, 1.0), 50, smearing=0.01)(sampler.table, sampler.state, snapshots, [target])
    np.testing.assert_allclose(result.rdfs["B-B"], reporter.g[0], rtol=1e-10, atol=1e-12)
    assert reporter.g[0][np.argmin(np.abs(reporter.r - BOND_LENGTH))] > 5  # the bond peak is in both


def test_trainer_learns_from_a_user_simulation_and_keeps_other_forces_fixed(tmp_path):
    topology, system, positions, bonds = polymer_system(n_chains=5, length=8, n_solvent=0, box=1.8)
    reference = od.PairTable(["B"], od.LennardJones(0.34, 1.0), cutoff=0.8, cutoff_mode="shift")
    recorded = user_simulation(system, topology, positions, platform="CPU", temperature=300.0)
    add_pair_potential(recorded.system, topology, reference, backend="tabulated")
    recorded.context.reinitialize(preserveState=True)
    recorded.minimizeEnergy()
    recorded.step(500)
    recorded.reporters.append(RDFReporter(tmp_path / "rdf.dat", 20, r_range=(0.0, 0.8), n_bins=80, smearing=0.01))
    recorded.step(2500)
    target = read_target(tmp_path / "rdf.dat", pair=("B", "B"))

    lj = od.LennardJones(0.30, 1.0)
    lj.epsilon.requires_grad_(False)
    model = od.PairTable(["B"], lj, cutoff=0.8, cutoff_mode="shift")
    simulation = user_simulation(system, topology, positions, platform="CPU", temperature=300.0, seed=2)
    sampler = Sampler.from_simulation(simulation, model, name="melt", targets=[target], backend="tabulated")
    trainer = Trainer(
        model,
        [sampler.state],
        "reweighting",
        samplers=[sampler],
        learning_rate=0.01,
        max_epochs=8,
        n_snapshots=30,
        snapshot_interval=15,
        equilibration_steps=500,
        # A high threshold resamples often: the trainer hands parameters to the user's Simulation.
        estimator_options=dict(r_range=(0.0, 0.8), n_bins=80, smearing=0.01, n_eff_threshold=0.9),
        progress=False,
    )
    history = trainer.fit()
    sigma = float(lj.sigma.detach())
    # From 0.30 nm toward the reference 0.34 nm; measured over ten seeds: 0.334-0.359 nm.
    assert abs(sigma - 0.34) < 0.5 * abs(0.30 - 0.34), sigma
    assert min(record["loss"] for record in history[1:]) < history[0]["loss"]
    assert trainer.samplers["melt"] is sampler
    assert float(sampler.table.pair_potentials[0].sigma.detach()) != 0.30  # new parameters reached the Simulation
    assert float(lj.epsilon) == 1.0
    bond_force = simulation.system.getForce(0)
    assert bond_force.getNumBonds() == len(bonds)
    for k in range(len(bonds)):
        assert (
            bond_force.getBondParameters(k)[2]._value == BOND_LENGTH
            and bond_force.getBondParameters(k)[3]._value == BOND_K
        )
    assert simulation.system.getNumForces() == 2


def test_trainer_rejects_rollouts_and_missing_samplers_for_user_simulations():
    topology, system, positions, _ = polymer_system(n_chains=2, length=4, n_solvent=8)
    table = lj_mixture_table()
    target = Target(ReweightingEstimator((0.0, 0.9), 50).r, np.ones(50), ("B", "B"))
    sampler = Sampler.from_simulation(user_simulation(system, topology, positions), table, targets=[target])
    for estimator in ("rollout", "adjoint", "hybrid", RolloutEstimator()):
        with pytest.raises(ValueError, match="reweighting"):
            Trainer(table, [sampler.state], estimator, samplers=[sampler])
    Trainer(table, [sampler.state], ReweightingEstimator((0.0, 0.9), 50), samplers=[sampler])
    with pytest.raises(ValueError, match="pass its sampler"):
        Trainer(table, [sampler.state], "reweighting")
    copy_of_state = SimulationStatePoint(**{**vars(sampler.state), "density": None})
    with pytest.raises(ValueError, match="different state object"):
        Trainer(table, [copy_of_state], "reweighting", samplers={"simulation": sampler})
    with pytest.raises(ValueError, match="pressure"):
        estimator = ReweightingEstimator((0.0, 0.9), 50, pressure_weight=1.0)
        sampler.minimize()
        estimator(table, sampler.state, sampler.run(2, 5), [target])


def test_user_simulation_runs_resume_with_their_sampler(tmp_path):
    topology, system, positions, _ = polymer_system(n_chains=2, length=4, n_solvent=8)
    table = lj_mixture_table()
    target = Target(ReweightingEstimator((0.0, 0.9), 45).r, np.ones(45), ("B", "B"))
    options = dict(max_epochs=1, n_snapshots=4, snapshot_interval=5, equilibration_steps=10, progress=False)
    options["estimator_options"] = dict(r_range=(0.0, 0.9), n_bins=45)
    sampler = Sampler.from_simulation(user_simulation(system, topology, positions), table, targets=[target])
    Trainer(table, [sampler.state], "reweighting", samplers=[sampler], output_dir=tmp_path, **options).fit()
    with pytest.raises(ValueError, match="pass its sampler"):
        Trainer.resume(tmp_path)
    with pytest.raises(ValueError, match="reweighting"):
        RolloutEstimator()(table, sampler.state, sampler.run(2, 5), [target])
    again = Sampler.from_simulation(user_simulation(system, topology, positions), table, targets=[target])
    resumed = Trainer.resume(tmp_path, samplers=[again], max_epochs=2)
    assert resumed.epoch == 1 and resumed.states[0] is again.state
    resumed.fit()
    assert resumed.epoch == 2 and resumed.samplers[again.state.name] is again


# -- examples ---------------------------------------------------------------------------------------------

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("name", ["openmm_run_exported", "openmm_fit_recorded_rdf", "openmm_cg_polymer"])
def test_example_runs_quickly(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(EXAMPLES))
    module = __import__(name)
    try:
        summary = module.main(["--quick", "--output", str(tmp_path / "out")])
    finally:
        sys.modules.pop(name, None)
    assert summary and all(np.isfinite(v) for v in summary.values() if isinstance(v, float))
