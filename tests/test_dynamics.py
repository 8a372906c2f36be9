"""Differentiable integrators and rollout gradients (openmm_diffsim.dynamics)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import openmm_diffsim as od
from openmm_diffsim import dynamics as dyn
from openmm_diffsim.observables import compute_rdf

SIGMA, EPSILON, MASS, TEMPERATURE = 0.34, 0.996, 39.948, 120.0


def lattice(n: int, edge: float, seed: int, jitter: float = 0.01) -> np.ndarray:
    cells = int(np.ceil((n / 4) ** (1 / 3)))
    base = np.array([[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    grid = np.array([[i, j, k] for i in range(cells) for j in range(cells) for k in range(cells)])
    sites = (grid[:, None, :] + base[None]).reshape(-1, 3)[:n] * (edge / cells)
    return sites + np.random.default_rng(seed).normal(scale=jitter, size=sites.shape)


def lj_table(cutoff=0.8, mode="switch", sigma=SIGMA, epsilon=EPSILON):
    switch = cutoff - 0.1 if mode == "switch" else None
    return od.PairTable(["A"], od.LennardJones(sigma, epsilon), cutoff=cutoff, cutoff_mode=mode, switch_distance=switch)


def small_system(n=64, replicas=2, dtype=torch.float64, cutoff=0.8, mode="switch", seed=0):
    edge = (n / (0.8 / SIGMA**3)) ** (1 / 3)
    edge = max(edge, 2.0 * cutoff + 1e-6)
    table = lj_table(cutoff, mode)
    masses = np.full(n, MASS)
    x0 = torch.tensor(np.stack([lattice(n, edge, seed + s) for s in range(replicas)]), dtype=dtype)
    v0 = dyn.maxwell_boltzmann_velocities(masses, TEMPERATURE, replicas, seed=seed + 7, dtype=dtype)
    forces = dyn.PairForces(table, np.zeros(n, dtype=int), np.full(3, edge), skin=0.1)
    return table, forces, masses, x0, v0, edge


def rdf_objective(edge, cutoff=0.8, n_bins=40):
    box = torch.full((3,), edge, dtype=torch.float64)
    target = torch.linspace(0.0, 1.5, n_bins, dtype=torch.float64)

    def observable(frame):
        return compute_rdf(frame, box, (0.0, cutoff), n_bins, 0.02)[1]

    def loss(g):
        return ((g - target) ** 2).mean()

    return observable, loss


def test_forces_match_openmm_and_energy_is_conserved():
    """Velocity Verlet positions equal a NumPy Verlet driven by OpenMM's own LJ forces."""
    import openmm as mm

    n = 64
    table, forces, masses, x0, v0, edge = small_system(n, replicas=1)
    system = mm.System()
    for m in masses:
        system.addParticle(float(m))
    system.setDefaultPeriodicBoxVectors(mm.Vec3(edge, 0, 0), mm.Vec3(0, edge, 0), mm.Vec3(0, 0, edge))
    nb = mm.NonbondedForce()
    nb.setNonbondedMethod(mm.NonbondedForce.CutoffPeriodic)
    nb.setCutoffDistance(0.8)
    nb.setUseSwitchingFunction(True)
    nb.setSwitchingDistance(0.7)
    nb.setUseDispersionCorrection(False)
    for _ in range(n):
        nb.addParticle(0.0, SIGMA, EPSILON)
    system.addForce(nb)
    context = mm.Context(system, mm.VerletIntegrator(0.001), mm.Platform.getPlatformByName("Reference"))

    def openmm_forces(x):
        context.setPositions(x)
        state = context.getState(getForces=True, getEnergy=True)
        return np.asarray(state.getForces(asNumpy=True)._value), state.getPotentialEnergy()._value

    dt, steps = 0.002, 20
    x, v = x0[0].numpy().copy(), v0[0].numpy().copy()
    f, _ = openmm_forces(x)
    for _ in range(steps):
        v = v + 0.5 * dt * f / masses[:, None]
        x = x + dt * v
        f, _ = openmm_forces(x)
        v = v + 0.5 * dt * f / masses[:, None]
    with torch.no_grad():
        run = dyn.rollout(forces, masses, dyn.VelocityVerlet(dt), x0, v0, steps, record_every=10)
    assert len(run.frames) == 2
    np.testing.assert_allclose(run.final.positions[0].numpy(), x, atol=1e-9)
    np.testing.assert_allclose(run.final.velocities[0].numpy(), v, atol=1e-7)

    with torch.no_grad():
        run = dyn.rollout(forces, masses, dyn.VelocityVerlet(dt), x0, v0, 300, record_every=100)
        m = torch.tensor(masses)
        e0 = forces.energies(x0) + dyn.kinetic_energy(v0, m)
        e1 = forces.energies(run.final.positions) + dyn.kinetic_energy(run.final.velocities, m)
    # Total energy drift far below kT (~1 kJ/mol) for a 64-particle system.
    assert float((e1 - e0).abs().max()) < 0.05
    assert forces.builds >= 2  # particles moved far enough to rebuild the Verlet list


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_batched_forces_equal_table_energy_and_forces(dtype):
    """The rollout force kernel (fixed periodic images, batched replicas) equals table.energy_and_forces."""
    table = od.PairTable(
        ["A", "B"],
        {
            ("A", "A"): od.LennardJones(SIGMA, EPSILON),
            ("A", "B"): od.SoftSphere(0.3, 1.0),
            ("B", "B"): od.WCA(0.3, 1.0),
        },
        cutoff=0.8,
        cutoff_mode="shift",
    )
    n, edge = 64, 2.0
    species = np.arange(n) % 2
    x = torch.tensor(np.stack([lattice(n, edge, s, jitter=0.02) for s in range(3)]), dtype=dtype)
    x[1] += edge  # unwrapped positions in another periodic image
    forces = dyn.PairForces(table, species, np.full(3, edge), skin=0.1)
    got = forces(x)
    species_t = torch.as_tensor(species)
    lengths = torch.full((3,), edge, dtype=dtype)
    for b in range(3):
        i, j = od.neighbor_pairs(x[b], lengths, 0.8)
        _, expected = table.energy_and_forces(x[b], lengths, species_t, i, j)
        torch.testing.assert_close(got[b], expected, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-4)
    energies = forces.energies(x)
    for b in range(3):
        expected_energy = od.potential_energy(table, x[b], lengths, species_t).detach()
        assert float(energies[b].detach()) == pytest.approx(float(expected_energy), rel=1e-5)


def test_nose_hoover_conserves_extended_energy_and_thermostats():
    n = 64
    table, forces, masses, x0, v0, _ = small_system(n, replicas=2)
    integrator = dyn.NoseHooverChain(0.002, TEMPERATURE, relaxation_time=0.1, chain_length=3)
    m = torch.tensor(masses)
    with torch.no_grad():
        run = dyn.rollout(forces, masses, integrator, x0, v0 * 2.0, 600, record_every=600)
        th0 = integrator.initial_thermostat(2, n, torch.float64)
        e0 = forces.energies(x0) + dyn.kinetic_energy(v0 * 2.0, m) + integrator.thermostat_energy(th0, n)
        final = run.final
        e1 = forces.energies(final.positions) + dyn.kinetic_energy(final.velocities, m)
        e1 = e1 + integrator.thermostat_energy(final.thermostat, n)
        physical = forces.energies(final.positions) + dyn.kinetic_energy(final.velocities, m)
        physical = physical - forces.energies(x0) - dyn.kinetic_energy(v0 * 2.0, m)
    assert float((e1 - e0).abs().max()) < 0.2  # kJ/mol
    assert float(physical.abs().min()) > 10.0  # while the thermostat moves the physical energy a lot
    # Started at 4x the kinetic energy, the chain pulls the temperature back to 120 K.
    v = final.velocities
    temperature = 2 * dyn.kinetic_energy(v, m) / ((3 * n - 3) * dyn.BOLTZMANN)
    assert torch.all((temperature > 60.0) & (temperature < 200.0))


def test_thermostat_half_step_is_inverted_by_negative_timestep():
    integrator = dyn.NoseHooverChain(0.002, TEMPERATURE, chain_length=4)
    generator = torch.Generator().manual_seed(3)
    v = torch.randn(3, 20, 3, generator=generator, dtype=torch.float64)
    th = tuple(torch.randn(3, generator=generator, dtype=torch.float64) for _ in range(8))
    masses = torch.full((20,), MASS, dtype=torch.float64)
    v1, th1 = integrator.thermostat_half(v, th, masses, 0.002)
    v2, th2 = integrator.thermostat_half(v1, th1, masses, -0.002)
    assert float((v1 - v).abs().max()) > 1e-6
    torch.testing.assert_close(v2, v, rtol=0, atol=1e-13)
    for a, b in zip(th2, th, strict=False):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)


def test_langevin_samples_temperature_and_reuses_noise():
    n = 64
    table, forces, masses, x0, v0, _ = small_system(n, replicas=2)
    integrator = dyn.LangevinBAOAB(0.004, TEMPERATURE, friction=10.0, seed=11)
    m = torch.tensor(masses)
    with torch.no_grad():
        run = dyn.rollout(forces, masses, integrator, x0, v0 * 0.1, 400, record_every=400)
        again = dyn.rollout(forces, masses, integrator, x0, v0 * 0.1, 400, record_every=400)
        temperature = 2 * dyn.kinetic_energy(run.final.velocities, m) / (3 * n * dyn.BOLTZMANN)
    torch.testing.assert_close(run.final.positions, again.final.positions, rtol=0, atol=0)
    assert float(temperature.mean()) == pytest.approx(TEMPERATURE, rel=0.25)
    x, v = integrator.drift(x0, v0, torch.tensor(masses), 5)
    xb, vb = integrator.undrift(x, v, torch.tensor(masses), 5)
    torch.testing.assert_close(xb, x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(vb, v0, rtol=0, atol=1e-12)


def _loss_at(table, forces, masses, x0, v0, steps, edge):
    observable, loss = rdf_objective(edge)
    with torch.no_grad():
        run = dyn.rollout(forces, masses, dyn.VelocityVerlet(0.002), x0, v0, steps, record_every=5)
        g = torch.stack([observable(f) for f in run.frames]).mean(0)
        return float(loss(g))


def test_backprop_gradient_matches_finite_differences():
    table, forces, masses, x0, v0, edge = small_system(n=32, replicas=1)
    observable, loss = rdf_objective(edge)
    steps = 20
    result = dyn.rollout_gradient(
        forces, masses, dyn.VelocityVerlet(0.002), x0, v0, steps, 5, observable, loss, list(table.parameters())
    )
    potential = table.pair_potentials[0]
    for name, grad, step in (("sigma", result.gradients[0], 1e-6), ("epsilon", result.gradients[1], 1e-5)):
        parameter = getattr(potential, name)
        with torch.no_grad():
            original = float(parameter)
            parameter.fill_(original + step)
            up = _loss_at(table, forces, masses, x0, v0, steps, edge)
            parameter.fill_(original - step)
            down = _loss_at(table, forces, masses, x0, v0, steps, edge)
            parameter.fill_(original)
        fd = (up - down) / (2 * step)
        assert abs(fd) > 1e-6
        assert float(grad) == pytest.approx(fd, rel=1e-4), name
    assert result.loss == pytest.approx(_loss_at(table, forces, masses, x0, v0, steps, edge), rel=1e-12)


@pytest.mark.parametrize(
    "integrator",
    [dyn.VelocityVerlet(0.002), dyn.NoseHooverChain(0.002, TEMPERATURE), dyn.LangevinBAOAB(0.002, TEMPERATURE, seed=3)],
    ids=lambda i: i.name,
)
def test_adjoint_equals_backprop(integrator):
    table, forces, masses, x0, v0, edge = small_system(n=64, replicas=2, mode="shift")
    observable, loss = rdf_objective(edge)
    params = list(table.parameters())
    common = (forces, masses, integrator, x0, v0, 40, 10, observable, loss, params)
    backprop = dyn.rollout_gradient(*common, method="backprop")
    adjoint = dyn.rollout_gradient(*common, method="adjoint", checkpoint_every=None)
    checkpointed = dyn.rollout_gradient(*common, method="adjoint", checkpoint_every=15)
    assert adjoint.loss == pytest.approx(backprop.loss, rel=1e-12)
    for other in (adjoint, checkpointed):
        for a, b in zip(other.gradients, backprop.gradients, strict=False):
            assert float(b.abs()) > 0
            assert float((a - b).abs() / b.abs()) < 1e-6
    # Without checkpoints the backward integration must still land on the start.
    assert adjoint.diagnostics["reversal_error"] < 1e-9
    assert adjoint.diagnostics["force_evaluations"] == 2 * 40


def test_float32_rollout_gradient_is_close_to_float64():
    table, forces, masses, x0, v0, edge = small_system(n=64, replicas=1)
    observable, loss = rdf_objective(edge)
    params = list(table.parameters())
    ref = dyn.rollout_gradient(forces, masses, dyn.VelocityVerlet(0.002), x0, v0, 30, 10, observable, loss, params)
    forces32 = dyn.PairForces(table, np.zeros(64, dtype=int), np.full(3, edge), skin=0.1)
    for method in ("backprop", "adjoint"):
        low = dyn.rollout_gradient(
            forces32,
            masses,
            dyn.VelocityVerlet(0.002),
            x0.float(),
            v0.float(),
            30,
            10,
            observable,
            loss,
            params,
            method=method,
        )
        for a, b in zip(low.gradients, ref.gradients, strict=False):
            assert float((a - b).abs() / b.abs()) < 1e-3


def test_overlap_raises_nonfinite_error_naming_the_step():
    table, forces, masses, x0, v0, edge = small_system(n=32, replicas=1)
    x_bad = x0.clone()
    x_bad[0, 1] = x_bad[0, 0]  # two particles on top of each other: infinite force
    with pytest.raises(dyn.NonFiniteError, match="step 0"):
        dyn.rollout(forces, masses, dyn.VelocityVerlet(0.002), x_bad, v0, 5)
    observable, loss = rdf_objective(edge)
    with pytest.raises(dyn.NonFiniteError):
        dyn.rollout_gradient(
            forces,
            masses,
            dyn.VelocityVerlet(0.002),
            x_bad,
            v0,
            5,
            5,
            observable,
            loss,
            list(table.parameters()),
            method="adjoint",
        )


def test_bad_inputs_are_rejected():
    table = lj_table(0.8)
    with pytest.raises(ValueError, match="half the shortest box edge"):
        dyn.PairForces(table, np.zeros(10, dtype=int), np.full(3, 1.2))
    forces = dyn.PairForces(table, np.zeros(10, dtype=int), np.full(3, 2.0))
    x = torch.rand(1, 10, 3, dtype=torch.float64) * 2.0
    v = torch.zeros_like(x)
    with pytest.raises(ValueError, match="masses"):
        dyn.rollout(forces, np.full(9, MASS), dyn.VelocityVerlet(0.002), x, v, 2)
    with pytest.raises(ValueError, match="shape"):
        dyn.rollout(forces, np.full(10, MASS), dyn.VelocityVerlet(0.002), x[:, :5], v[:, :5], 2)
    with pytest.raises(ValueError, match="record_every"):
        dyn.rollout(forces, np.full(10, MASS), dyn.VelocityVerlet(0.002), x, v, 2, record_every=5)
    with pytest.raises(ValueError, match="timestep"):
        dyn.VelocityVerlet(-0.001)
    with pytest.raises(ValueError, match="temperature"):
        dyn.make_integrator("langevin", 0.002)
    with pytest.raises(ValueError, match="integrator"):
        dyn.make_integrator("leapfrog", 0.002, 100.0)
    with pytest.raises(ValueError, match="method"):
        dyn.rollout_gradient(forces, np.full(10, MASS), dyn.VelocityVerlet(0.002), x, v, 2, 1, None, None, [], "sgd")
