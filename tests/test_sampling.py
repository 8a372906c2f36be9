"""OpenMM sampler: backends, hand-over, snapshots, faults and reference RDFs."""

import io
import logging

import mdtraj
import numpy as np
import pytest
import torch
from openmm import app, unit

import openmm_diffsim as od
from openmm_diffsim.sampling import (
    DEFAULT_BACKEND,
    MAX_EXPRESSION_KNOTS,
    Sampler,
    SamplingError,
    Snapshots,
    choose_platform,
    reference_rdfs,
)
from openmm_diffsim.systems import StatePoint, reduced_lj_units

SIGMA, EPSILON, MASS = 0.34, 0.996, 39.948
ARGON = reduced_lj_units(SIGMA, EPSILON, MASS)
CUTOFF = 0.85


def lj_state(n=108, name="LJ liquid", rho=0.8, t=1.2):
    return StatePoint(
        name,
        ["Ar"],
        [n],
        [MASS],
        ARGON.temperature_from_reduced(t),
        density=ARGON.density_from_reduced(rho),
    )


def lj_table(mode="truncate", sigma=SIGMA, epsilon=EPSILON, cutoff=CUTOFF):
    return od.PairTable(
        ["Ar"],
        od.LennardJones(sigma, epsilon),
        cutoff=cutoff,
        cutoff_mode=mode,
        switch_distance=0.7 if mode == "switch" else None,
    )


def mixture_table(bias=0.0, cutoff=CUTOFF):
    correction = od.NeuralCorrection(cutoff, n_basis=8, hidden=(8,), seed=1)
    with torch.no_grad():
        correction.layers[-1].bias.fill_(bias)
    return od.PairTable(
        ["A", "B"],
        {
            ("A", "A"): od.PotentialSum([od.LennardJones(0.34, 1.0), correction]),
            ("A", "B"): od.SoftSphere(0.32, 0.8, 12.0),
            ("B", "B"): od.LennardJones(0.30, 0.7),
        },
        cutoff=cutoff,
        cutoff_mode="shift",
    )


def mixture_state(name="mixture"):
    return StatePoint(name, ["A", "B"], [70, 50], [40.0, 20.0], 150.0, density=18.0)


@pytest.fixture(scope="module")
def lj_configuration():
    """A melted LJ configuration (108 particles) from OpenMM's own NonbondedForce."""
    sampler = Sampler(lj_state(), lj_table(), backend="native", seed=11)
    sampler.minimize(100)
    sampler.equilibrate(300)
    return sampler.positions


def _energy_forces(state, table, backend, positions):
    return Sampler(state, table, backend=backend, positions=positions, seed=0).energy_and_forces()


def _assert_same(a, b, energy_rtol, force_tol):
    (ea, fa), (eb, fb) = a, b
    assert ea == pytest.approx(eb, rel=energy_rtol)
    rms = np.sqrt(np.mean(np.sum(fb**2, axis=1)))
    assert np.abs(fa - fb).max() < force_tol * rms


# -- backends agree -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["truncate", "switch"])
def test_backends_agree_with_native_lj(lj_configuration, mode):
    state, table = lj_state(), lj_table(mode)
    native = _energy_forces(state, table, "native", lj_configuration)
    torch_force = _energy_forces(state, table, "torch", lj_configuration)
    tabulated = _energy_forces(state, table, "tabulated", lj_configuration)
    expression = _energy_forces(state, table, "expression", lj_configuration)
    assert native[0] < -100  # a dense liquid, not an empty box
    # TorchForce is the model in float64; OpenMM's CPU platform computes nonbonded
    # forces in float32 (|dE|/|E| ~ 2e-8, max|dF| ~ 1e-6 rms|F|). The table is a
    # 4096-knot spline of u: measured |dE|/|E| ~ 3e-8, max|dF| ~ 2e-5 rms|F|.
    _assert_same(torch_force, native, 1e-6, 2e-5)
    _assert_same(tabulated, native, 1e-6, 2e-4)
    _assert_same(tabulated, torch_force, 1e-6, 2e-4)
    # The expression backend is the model's own formula, in OpenMM's float32 kernels.
    _assert_same(expression, torch_force, 1e-6, 2e-5)


def spline_mixture_table(mode="shift"):
    """Two species whose pairs are closed forms: soft sphere + spline, LJ, spline alone (trainable values)."""
    knots = np.concatenate([np.arange(0.27, 0.4, 0.01), np.arange(0.44, 0.8, 0.04)])
    rng = np.random.default_rng(5)

    def spline(scale):
        return od.CubicSpline(knots, scale * rng.normal(size=knots.size))

    return od.PairTable(
        ["A", "B"],
        {
            ("A", "A"): od.PotentialSum([od.SoftSphere(0.32, 1.0, 12.0), spline(0.3)]),
            ("A", "B"): od.LennardJones(0.32, 0.9),
            ("B", "B"): od.PotentialSum([od.SoftSphere(0.30, 1.0, 12.0), spline(0.2), od.LennardJones(0.3, 0.2)]),
        },
        cutoff=CUTOFF,
        cutoff_mode=mode,
        switch_distance=0.7 if mode == "switch" else None,
    )


@pytest.mark.parametrize("mode", ["truncate", "shift", "switch"])
def test_expression_force_is_the_table_for_every_pair_type_and_cutoff_convention(mode):
    """Two particles at distances across the knots, below the first and past the last knot, and past the cutoff."""
    table = spline_mixture_table(mode)
    distances = np.array([0.262, 0.27, 0.305, 0.335, 0.5, 0.71, 0.79, 0.81, CUTOFF - 1e-4, CUTOFF + 1e-4])
    for species, pair in (([2, 0], 0), ([1, 1], 1), ([0, 2], 2)):
        state = StatePoint("pair", ["A", "B"], species, [40.0, 40.0], 100.0, box=[2.0, 2.0, 2.0])
        # Reference platform: double precision, so the formula is checked, not float32 rounding.
        sampler = Sampler(state, table, backend="expression", platform="Reference", positions=np.zeros((2, 3)), seed=0)
        energies, forces = [], []
        for r in distances:
            sampler.set_state(np.array([[0.5, 0.5, 0.5], [0.5 + r, 0.5, 0.5]]))
            e, f = sampler.energy_and_forces()
            energies.append(e)
            forces.append(f[1, 0])
        u, du = table.evaluate(distances, pair)
        np.testing.assert_allclose(energies, u, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(forces, -du, rtol=1e-9, atol=1e-8)
        assert energies[-1] == 0.0 and abs(energies[0]) > 1.0


@pytest.mark.parametrize("mode", ["truncate", "shift", "switch"])
def test_tabulated_force_holds_every_pair_type_in_one_table(mode):
    """Each pair type's segment of the merged spline, up to both of its ends, and past them."""
    table = spline_mixture_table(mode)
    for species, pair in (([2, 0], 0), ([1, 1], 1), ([0, 2], 2)):
        state = StatePoint("pair", ["A", "B"], species, [40.0, 40.0], 100.0, box=[2.0, 2.0, 2.0])
        # Reference platform: double precision, so the table is checked, not float32 rounding.
        sampler = Sampler(state, table, backend="tabulated", platform="Reference", positions=np.zeros((2, 3)), seed=0)
        force = sampler.system.getForce(sampler._locate_force())
        assert force.getNumTabulatedFunctions() == 1
        r_min = sampler._table_r_min
        inside = np.array([r_min + 1e-7, 0.305, 0.335, 0.5, 0.71, 0.79, 0.81, CUTOFF - 1e-5, CUTOFF - 1e-7])
        outside = np.array([0.5 * r_min, CUTOFF + 1e-7, 0.95])
        energies, forces = [], []
        for r in np.concatenate([inside, outside]):
            sampler.set_state(np.array([[0.5, 0.5, 0.5], [0.5 + r, 0.5, 0.5]]))
            e, f = sampler.energy_and_forces()
            energies.append(e)
            forces.append(f[1, 0])
        u, du = table.evaluate(inside, pair)
        # Measured: |dE| <= 2e-8 |u| + 1e-10 kJ/mol; |dF| <= 1.5e-5 kJ/mol/nm away from r_min, where u's
        # curvature (u ~ 1e5 kJ/mol) against the linear continuation below costs 2.4e-3 relative.
        np.testing.assert_allclose(energies[: inside.size], u, rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(forces[1 : inside.size], -du[1:], rtol=1e-7, atol=1e-4)
        assert forces[0] == pytest.approx(-du[0], rel=5e-3)
        # Below r_min: the linear continuation; past the cutoff: nothing.
        u_min, du_min = table.evaluate(np.array([r_min]), pair)
        assert energies[inside.size] == pytest.approx(u_min[0] + du_min[0] * (outside[0] - r_min), rel=1e-9)
        assert forces[inside.size] == pytest.approx(-du_min[0], rel=1e-9)
        assert energies[-2:] == [0.0, 0.0] and forces[-2:] == [0.0, 0.0]


def test_expression_backend_is_the_cpu_default_where_a_closed_form_exists():
    state = mixture_state()
    table = spline_mixture_table()
    sampler = Sampler(state, table, platform="CPU", seed=3)
    assert sampler.backend == "expression" == DEFAULT_BACKEND["CPU"]
    sampler.minimize(50)
    sampler.equilibrate(100)
    positions = sampler.positions
    torch_force = _energy_forces(state, table, "torch", positions)
    # float32 cubics in d = r - r_k: measured max|dF| ~ 2e-5 rms|F| (the tabulated backend's bound is 2e-4).
    _assert_same(sampler.energy_and_forces(), torch_force, 1e-6, 1e-4)
    # Past MAX_EXPRESSION_KNOTS spline knots the expression is no faster than the table: auto takes the table.
    knots = np.linspace(0.27, 0.8, MAX_EXPRESSION_KNOTS + 1)
    many = od.PairTable(["A"], od.CubicSpline(knots, np.exp(-20 * (knots - 0.27))), cutoff=CUTOFF)
    assert Sampler(lj_state(), lj_table(), platform="CPU", seed=0).backend == "expression"
    assert Sampler(StatePoint("a", ["A"], [100], [40.0], 150.0, density=18.0), many, platform="CPU").backend == (
        "tabulated"
    )
    # A neural potential has no closed form: auto falls back to the table, and asking for it is refused.
    assert Sampler(state, mixture_table(), platform="CPU", seed=3).backend == "tabulated"
    with pytest.raises(ValueError, match="backend 'expression' needs a closed form.*pair A-A"):
        Sampler(state, mixture_table(), backend="expression", platform="CPU", seed=3)


def test_backends_agree_for_mixture_with_neural_potential():
    state, table = mixture_state(), mixture_table(bias=0.3)
    start = Sampler(state, table, backend="tabulated", seed=3)
    start.minimize(50)
    start.equilibrate(100)
    positions = start.positions
    torch_force = _energy_forces(state, table, "torch", positions)
    tabulated = _energy_forces(state, table, "tabulated", positions)
    _assert_same(tabulated, torch_force, 1e-6, 2e-4)
    # Independent of both OpenMM paths: the table evaluated in PyTorch.
    reference = od.potential_energy(
        table, torch.tensor(positions), torch.tensor(state.box_vectors), torch.tensor(state.particle_species())
    )
    assert torch_force[0] == pytest.approx(float(reference.detach()), rel=1e-9)


def test_native_backend_rejects_what_it_cannot_represent():
    with pytest.raises(ValueError, match="cannot shift"):
        Sampler(lj_state(), lj_table("shift"), backend="native")
    with pytest.raises(ValueError, match="LennardJones for every pair"):
        Sampler(mixture_state(), mixture_table(), backend="native")


@pytest.mark.parametrize("mode", ["truncate", "shift", "switch"])
def test_tabulated_force_reproduces_table_and_cutoff_convention(mode):
    table = lj_table(mode)
    state = StatePoint("pair", ["Ar"], [2], [MASS], 100.0, box=[2.0, 2.0, 2.0])
    sampler = Sampler(state, table, backend="tabulated", positions=np.zeros((2, 3)) + 0.5, seed=0)
    distances = np.array([0.3, 0.33, 0.38, 0.5, 0.69, 0.72, CUTOFF - 1e-4, CUTOFF + 1e-4, 0.95])
    energies, forces = [], []
    for r in distances:
        sampler.set_state(np.array([[0.5, 0.5, 0.5], [0.5 + r, 0.5, 0.5]]))
        e, f = sampler.energy_and_forces()
        energies.append(e)
        forces.append(f[1, 0])  # force on particle 1 along +x is -du/dr
    u, du = table.evaluate(distances)
    # float32 arithmetic in OpenMM's CPU kernels: ~2e-6 relative at steep parts of u.
    np.testing.assert_allclose(energies, u, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(forces, -du, rtol=1e-4, atol=1e-3)
    if mode == "truncate":
        assert abs(energies[-3]) > 1e-3  # u jumps to zero at the cutoff, as in OpenMM's plain cutoff
    assert energies[-2] == 0.0 and energies[-1] == 0.0
    # Below the table start the energy keeps rising linearly: overlaps stay repulsive and finite.
    sampler.set_state(np.array([[0.5, 0.5, 0.5], [0.52, 0.5, 0.5]]))
    e_close, f_close = sampler.energy_and_forces()
    assert np.isfinite(e_close) and e_close > 1e4 and f_close[1, 0] > 0


# -- hand-over -------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["tabulated", "torch", "native", "expression"])
def test_hand_over_equals_fresh_context(backend):
    state = lj_state()
    sampler = Sampler(state, lj_table("switch"), backend=backend, seed=4)
    sampler.minimize(50)
    sampler.run(2, 25)
    positions, velocities, box = sampler.positions, sampler.velocities, sampler.box
    new_table = lj_table("switch", sigma=0.35, epsilon=1.3)
    sampler.update_potential(new_table)
    np.testing.assert_array_equal(sampler.positions, positions)
    np.testing.assert_array_equal(sampler.velocities, velocities)
    np.testing.assert_array_equal(sampler.box, box)
    fresh = Sampler(state, new_table, backend=backend, positions=positions, seed=9)
    # torch: float64, identical. OpenMM's float32 kernels: summation order may differ.
    energy_rtol, force_tol = (1e-12, 1e-10) if backend == "torch" else (1e-7, 1e-5)
    _assert_same(sampler.energy_and_forces(), fresh.energy_and_forces(), energy_rtol, force_tol)
    # And it is really the new potential, not the old one.
    old = Sampler(state, lj_table("switch"), backend=backend, positions=positions, seed=9)
    assert abs(old.energy_and_forces()[0] - fresh.energy_and_forces()[0]) > 10.0
    assert sampler.last_handover_seconds < 5.0
    # OpenMM 8.6 updates tabulated functions and LJ parameters in a live Context; TorchForce needs a rebuild.
    # The expression backend bakes the parameters into the formula: a new force.
    assert sampler.last_handover_method == ("rebuild" if backend in ("torch", "expression") else "in place")
    snapshots = sampler.run(2, 25)
    np.testing.assert_array_equal(snapshots.steps, [75, 100])
    assert sampler.total_steps == 100


@pytest.mark.parametrize("backend", ["tabulated", "torch"])
def test_hand_over_of_neural_mixture_and_new_cutoff(backend):
    state = mixture_state()
    sampler = Sampler(state, mixture_table(), backend=backend, seed=2)
    sampler.minimize(50)
    sampler.equilibrate(20)
    positions = sampler.positions
    for new_table, method in ((mixture_table(bias=0.5), "in place"), (mixture_table(bias=0.5, cutoff=0.8), "rebuild")):
        sampler.update_potential(new_table)
        assert sampler.last_handover_method == ("rebuild" if backend == "torch" else method)
        fresh = Sampler(state, new_table, backend=backend, positions=positions, seed=1)
        energy_rtol, force_tol = (1e-12, 1e-10) if backend == "torch" else (1e-7, 1e-5)
        _assert_same(sampler.energy_and_forces(), fresh.energy_and_forces(), energy_rtol, force_tol)


def test_hand_over_rejects_mismatched_potential():
    sampler = Sampler(lj_state(), lj_table(), backend="tabulated", seed=0)
    with pytest.raises(ValueError, match="does not define"):
        sampler.update_potential(mixture_table())
    with pytest.raises(ValueError, match="half the shortest box edge"):
        sampler.update_potential(lj_table(cutoff=1.2))


# -- runs, snapshots, reproducibility ------------------------------------------------------------------------


def test_snapshots_shapes_steps_and_conversions():
    state = lj_state()
    sampler = Sampler(state, lj_table(), backend="tabulated", seed=1)
    sampler.equilibrate(10)
    snaps = sampler.run(3, 10)
    assert isinstance(snaps, Snapshots) and len(snaps) == 3
    assert snaps.positions.shape == (3, 108, 3) and snaps.positions.dtype == np.float64
    assert snaps.velocities.shape == (3, 108, 3)
    assert snaps.boxes.shape == (3, 3, 3)
    np.testing.assert_allclose(snaps.boxes[0], state.box_vectors)
    np.testing.assert_array_equal(snaps.steps, [20, 30, 40])
    assert sampler.total_steps == 40
    np.testing.assert_array_equal(snaps.positions[-1], sampler.positions)
    # Recorded energies are the backend's energies of the recorded frames.
    check = Sampler(state, lj_table(), backend="native", positions=snaps.positions[1], seed=0)
    assert snaps.potential_energies[1] == pytest.approx(check.energy_and_forces()[0], rel=1e-6)
    tensors = snaps.to_torch(torch.float32)
    assert tensors.positions.dtype == torch.float32 and tensors.positions.shape == (3, 108, 3)
    assert tensors.species.dtype == torch.long and tensors.species.shape == (108,)
    assert tensors.steps.tolist() == [20, 30, 40]
    traj = snaps.to_mdtraj()
    assert traj.n_frames == 3 and traj.n_atoms == 108
    np.testing.assert_allclose(traj.unitcell_lengths[0], state.box_lengths, rtol=1e-6)
    both = Snapshots.concatenate([snaps, snaps[1:]])
    assert len(both) == 5 and both.steps.tolist() == [20, 30, 40, 30, 40]
    assert len(snaps[0]) == 1


@pytest.mark.parametrize("integrator", ["langevin", "nose-hoover"])
def test_same_seed_reproduces_run(integrator):
    def run(seed):
        sampler = Sampler(lj_state(), lj_table(), backend="tabulated", integrator=integrator, seed=seed)
        return sampler.run(2, 20).positions

    a, b, c = run(5), run(5), run(6)
    # Same up to round-off: the CPU platform's threads sum float32 forces in varying order (~1e-11 nm).
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-7)
    assert np.abs(a - c).max() > 1e-3


@pytest.mark.parametrize("integrator", ["langevin", "nose-hoover"])
def test_thermostats_hold_temperature(integrator):
    state = lj_state()
    sampler = Sampler(state, lj_table(), backend="tabulated", integrator=integrator, friction=5.0, seed=8)
    sampler.minimize(100)
    sampler.equilibrate(500)
    snaps = sampler.run(40, 25)
    kinetic = 0.5 * MASS * (snaps.velocities**2).sum(axis=(1, 2))
    temperature = 2 * kinetic.mean() / (3 * state.n_particles * od.systems.MOLAR_GAS_CONSTANT)
    assert temperature == pytest.approx(state.temperature, rel=0.1)


def test_timestep_and_friction_accept_quantities():
    sampler = Sampler(
        lj_state(),
        lj_table(),
        backend="tabulated",
        timestep=1.0 * unit.femtosecond,
        friction=2.0 / unit.picosecond,
        seed=0,
    )
    assert sampler.timestep == pytest.approx(0.001)
    assert sampler.integrator.getStepSize().value_in_unit(unit.picosecond) == pytest.approx(0.001)
    assert sampler.integrator.getFriction().value_in_unit(unit.picosecond**-1) == pytest.approx(2.0)


# -- platforms and reporters ----------------------------------------------------------------------------------


def test_platform_choice_override_and_log(caplog):
    with caplog.at_level(logging.INFO, logger="openmm_diffsim.sampling"):
        sampler = Sampler(lj_state(), lj_table(), seed=0)
    expected = choose_platform()
    assert sampler.platform_name == expected == sampler.context.getPlatform().getName()
    assert expected in ("CUDA", "OpenCL", "CPU")
    assert sampler.backend == DEFAULT_BACKEND[expected]
    assert f"platform {expected}" in caplog.text
    reference = Sampler(lj_state(), lj_table(), platform="Reference", backend="torch", seed=0)
    assert reference.platform_name == "Reference" == reference.context.getPlatform().getName()
    with pytest.raises(ValueError, match="not available"):
        Sampler(lj_state(), lj_table(), platform="NoSuchPlatform")


def test_openmm_reporters_write_dcd_and_state_data(tmp_path):
    state = lj_state()
    path = tmp_path / "traj.dcd"
    log = io.StringIO()
    reporters = (
        app.DCDReporter(str(path), 5),
        app.StateDataReporter(log, 10, step=True, potentialEnergy=True, temperature=True),
    )
    sampler = Sampler(state, lj_table(), backend="tabulated", reporters=reporters, seed=0)
    snaps = sampler.run(2, 10)
    del sampler, reporters  # closes the DCD file
    traj = mdtraj.load_dcd(str(path), top=mdtraj.Topology.from_openmm(state.topology()))
    assert traj.n_frames == 4
    np.testing.assert_allclose(traj.xyz[-1], snaps.positions[-1], atol=1e-4)
    lines = [line for line in log.getvalue().splitlines() if not line.startswith("#")]
    assert len(lines) == 2
    assert float(lines[-1].split(",")[1]) == pytest.approx(snaps.potential_energies[-1], rel=1e-5)


# -- faults and bad input --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["tabulated", "torch"])
def test_overlap_blow_up_raises_sampling_error_with_state_and_step(backend):
    state = lj_state(name="broken state")
    positions = state.initial_positions(seed=0)
    positions[1] = positions[0] + [0.02, 0.0, 0.0]
    sampler = Sampler(state, lj_table(), backend=backend, positions=positions, seed=0)
    sampler.equilibrate(0)
    with pytest.raises(SamplingError) as info:
        sampler.run(3, 10)
    assert info.value.state_name == "broken state"
    assert info.value.step == 10
    assert "broken state" in str(info.value) and "step 10" in str(info.value)


def test_nan_energy_is_caught():
    state = lj_state(name="nan state")
    sampler = Sampler(state, lj_table(), backend="tabulated", seed=0)
    positions = sampler.positions
    positions[3] = np.nan
    with pytest.raises(ValueError, match="finite"):
        sampler.set_state(positions)
    sampler.context.setPositions(positions)  # bypass the check, as a diverged integrator would
    with pytest.raises(SamplingError, match="nan state"):
        sampler.equilibrate(5)


def test_bad_sampler_input_gets_clear_errors():
    state = lj_state()
    with pytest.raises(ValueError, match="half the shortest box edge"):
        Sampler(state, lj_table(cutoff=1.2))
    with pytest.raises(ValueError, match=r"species \['Ar'\].*does not define"):
        Sampler(state, mixture_table())
    with pytest.raises(ValueError, match="backend"):
        Sampler(state, lj_table(), backend="gpu")
    with pytest.raises(ValueError, match="integrator"):
        Sampler(state, lj_table(), integrator="verlet")
    with pytest.raises(ValueError, match="shape"):
        Sampler(state, lj_table(), positions=np.zeros((5, 3)))
    with pytest.raises(ValueError, match="timestep"):
        Sampler(state, lj_table(), timestep=-0.001)
    with pytest.raises(TypeError, match="PairTable"):
        Sampler(state, "lj")
    too_dense = lj_state(rho=3.0)
    with pytest.raises(ValueError, match="too high|close-packing"):
        Sampler(too_dense, lj_table(cutoff=0.55))


# -- reference RDFs ---------------------------------------------------------------------------------------------


def _rdf_distance(g_a, g_b):
    return float(np.abs(g_a - g_b).max())


def test_sampled_lj_rdf_matches_native_nonbonded_force():
    """The default backend's LJ fluid has OpenMM NonbondedForce's g(r), within sampling error.

    256 particles, 2000 + 40 x 50 steps per run. max |dg| over 0.02 nm bins
    between independent seeds, measured: 0.04-0.08 (tabulated vs native and
    native vs native); sigma 2 % larger gives 0.26, 4 % larger 0.55.
    """
    state = lj_state(n=256, rho=0.8, t=1.2)
    kwargs = dict(n_snapshots=40, interval=50, equilibration=2000, r_range=(0.0, 1.1), n_bins=55)
    r, g_native, snaps = reference_rdfs(
        state, "lj-native", sigma=SIGMA, epsilon=EPSILON, cutoff=CUTOFF, seed=1, **kwargs
    )
    assert g_native.shape == (1, 55) and r.shape == (55,) and len(snaps) == 40
    _, g_model, _ = reference_rdfs(state, lj_table("truncate"), seed=2, **kwargs)
    wider = lj_table("truncate", sigma=1.04 * SIGMA)
    _, g_wider, _ = reference_rdfs(state, wider, backend="native", seed=2, **kwargs)
    assert g_native[0].max() > 2.0  # a liquid's first peak
    np.testing.assert_allclose(g_native[0, r < 0.28], 0.0)
    assert _rdf_distance(g_model, g_native) < 0.2
    assert _rdf_distance(g_wider, g_native) > 0.4


@pytest.mark.slow
def test_torchforce_lj_rdf_matches_native_nonbonded_force():
    state = lj_state(n=500, rho=0.8, t=1.2)
    table = lj_table("truncate")
    kwargs = dict(n_snapshots=100, interval=50, equilibration=3000, r_range=(0.0, 1.1), n_bins=55)
    _, g_native, _ = reference_rdfs(state, table, backend="native", seed=1, **kwargs)
    _, g_torch, _ = reference_rdfs(state, table, backend="torch", seed=2, **kwargs)
    assert _rdf_distance(g_torch, g_native) < 0.12


# -- pre-built samplers in the trainer (issue #9) -----------------------------------------------------


def test_trainer_runs_a_prebuilt_sampler_and_checks_it():
    from openmm_diffsim.targets import Target
    from openmm_diffsim.training import Trainer

    state = lj_state(n=108)
    r = np.linspace(0.005, 0.845, 85)
    state.targets = [Target(r, np.ones_like(r), ("Ar", "Ar"))]
    sampler = Sampler(state, lj_table(), backend="tabulated", seed=4)
    table = lj_table()
    options = dict(
        max_epochs=1,
        n_snapshots=3,
        snapshot_interval=10,
        equilibration_steps=20,
        estimator_options=dict(r_range=(0.0, 0.85), n_bins=85),
        progress=False,
    )
    trainer = Trainer(table, [state], "reweighting", samplers=[sampler], **options)
    trainer.fit()
    assert trainer.samplers[state.name] is sampler and sampler.total_steps == 20 + 30
    # An ordinary state point may still use rollouts with a pre-built sampler.
    Trainer(table, [state], "rollout", samplers={state.name: sampler}, **options)
    with pytest.raises(ValueError, match="names no state point"):
        Trainer(table, [state], samplers={"elsewhere": sampler}, **options)
    other = lj_state(n=108)
    other.targets = state.targets
    with pytest.raises(ValueError, match="different state object"):
        Trainer(table, [other], samplers=[sampler], **options)
    with pytest.raises(TypeError, match="Sampler objects"):
        Trainer(table, [state], samplers=["not a sampler"], **options)
