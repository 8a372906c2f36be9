"""RDFReporter against the package's RDF function on the same frames."""

import numpy as np
import openmm
import pytest
import torch
from openmm import app, unit

from openmm_diffsim.observables import compute_partial_rdfs
from openmm_diffsim.reporters import RDFReporter
from openmm_diffsim.targets import read_target, read_targets_npz


class FrameRecorder:
    """Stores positions and boxes at the same steps as the RDF reporter."""

    def __init__(self, interval):
        self.interval = interval
        self.positions = []
        self.boxes = []

    def describeNextReport(self, simulation):
        return (self.interval - simulation.currentStep % self.interval, True, False, False, False, False)

    def report(self, simulation, state):
        self.positions.append(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer))
        self.boxes.append(np.diag(state.getPeriodicBoxVectors(asNumpy=True).value_in_unit(unit.nanometer)))


def binary_simulation(barostat=False, n=160, box=2.6, seed=1):
    topology = app.Topology()
    chain = topology.addChain()
    rng = np.random.default_rng(seed)
    names = ["Ar" if k % 4 else "Kr" for k in range(n)]
    for name in names:
        residue = topology.addResidue("ARG" if name == "Ar" else "KRY", chain)
        topology.addAtom(name, app.Element.getBySymbol(name), residue)
    topology.setPeriodicBoxVectors(np.eye(3) * box)
    system = openmm.System()
    system.setDefaultPeriodicBoxVectors(*(openmm.Vec3(*row) for row in np.eye(3) * box))
    force = openmm.NonbondedForce()
    force.setNonbondedMethod(openmm.NonbondedForce.CutoffPeriodic)
    force.setCutoffDistance(0.9)
    for name in names:
        system.addParticle(39.9 if name == "Ar" else 83.8)
        force.addParticle(0.0, 0.34 if name == "Ar" else 0.36, 1.0)
    system.addForce(force)
    if barostat:
        system.addForce(openmm.MonteCarloBarostat(400.0, 120.0, 2))
    integrator = openmm.LangevinMiddleIntegrator(120.0, 1.0, 0.004)
    integrator.setRandomNumberSeed(seed)
    simulation = app.Simulation(topology, system, integrator, openmm.Platform.getPlatformByName("Reference"))
    cells = int(np.ceil(n ** (1 / 3)))
    grid = np.stack(np.meshgrid(*[np.arange(cells)] * 3, indexing="ij"), -1).reshape(-1, 3)[:n]
    simulation.context.setPositions(grid * (box / cells) + rng.normal(scale=0.01, size=(n, 3)))
    simulation.minimizeEnergy(maxIterations=50)
    return simulation, names


@pytest.mark.parametrize("barostat", [False, True])
def test_reporter_equals_rdf_function_on_the_same_frames(tmp_path, barostat):
    simulation, names = binary_simulation(barostat=barostat)
    reporter = RDFReporter(tmp_path / "rdf.dat", 10, r_range=(0.0, 1.0), n_bins=50, smearing=0.01)
    recorder = FrameRecorder(10)
    simulation.reporters += [reporter, recorder]
    simulation.step(60)
    assert reporter.n_frames == 6 and reporter.species_names == ["Ar", "Kr"]
    species = torch.as_tensor([0 if s == "Ar" else 1 for s in names])
    r, g = compute_partial_rdfs(
        torch.as_tensor(np.array(recorder.positions)),
        torch.as_tensor(np.array(recorder.boxes)),
        species,
        2,
        (0.0, 1.0),
        50,
        0.01,
    )
    if barostat:
        assert np.ptp(np.array(recorder.boxes)[:, 0]) > 0  # the volume did change
    np.testing.assert_allclose(reporter.g, g.numpy(), rtol=1e-10, atol=1e-12)
    back = read_target(tmp_path / "rdf.dat", pair=("Ar", "Kr"))
    np.testing.assert_allclose(back.g, g.numpy()[1], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(back.r, r.numpy(), rtol=1e-12)


def test_reporter_selection_residue_names_and_npz(tmp_path):
    simulation, names = binary_simulation()
    argon = [k for k, s in enumerate(names) if s == "Ar"]
    reporter = RDFReporter(tmp_path / "rdf.npz", 5, species_from="residue", atoms=argon, n_bins=40, r_range=(0, 1))
    simulation.reporters.append(reporter)
    simulation.step(10)
    assert reporter.species_names == ["ARG"] and reporter.pair_names == ["ARG-ARG"]
    targets = read_targets_npz(tmp_path / "rdf.npz")
    assert len(targets) == 1 and targets[0].pair == ("ARG", "ARG")
    assert targets[0].g.max() > 1.0


def test_reporter_bad_input(tmp_path):
    with pytest.raises(ValueError, match="reportInterval"):
        RDFReporter(tmp_path / "x.dat", 0)
    with pytest.raises(ValueError, match="species_from"):
        RDFReporter(tmp_path / "x.dat", 5, species_from="mass")
    simulation, names = binary_simulation()
    simulation.reporters.append(RDFReporter(tmp_path / "x.dat", 5, species=names[:-1]))
    with pytest.raises(ValueError, match="159 particles but the System has 160"):
        simulation.step(5)
    simulation, _ = binary_simulation()
    simulation.reporters.append(RDFReporter(tmp_path / "y.dat", 5, r_range=(0.0, 1.5)))
    with pytest.raises(ValueError, match="half the shortest box edge"):
        simulation.step(5)
