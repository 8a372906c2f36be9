"""Iterative Boltzmann inversion (openmm_diffsim.ibi): the update, pressure ramp, runs, resume, config and CLI."""

import functools
import json
import math

import numpy as np
import pytest
import torch

from openmm_diffsim.ibi import (
    IBI,
    boltzmann_knot_values,
    deconvolved_inversion,
    deconvolved_knot_values,
    ibi_update,
    pressure_ramp,
    pressure_ramp_amplitude,
    spline_table_from_targets,
)
from openmm_diffsim.potentials import CubicSpline, LennardJones, PairTable, PotentialSum, SoftSphere
from openmm_diffsim.systems import MOLAR_GAS_CONSTANT, StatePoint
from openmm_diffsim.targets import Target, write_rdf

# Reduced LJ units with sigma = 1 nm, epsilon = 1 kJ/mol, m = 1 amu (tau = 1 ps).
T_REDUCED = 1.2
TEMPERATURE = T_REDUCED / MOLAR_GAS_CONSTANT
CUTOFF = 1.9
N = 64
RDF_GRID = dict(r_range=(0.0, CUTOFF), n_bins=50, smearing=0.04)
SAMPLER = dict(platform="CPU", timestep=0.005)
TRAINER_KEYS = {
    "epoch",
    "state_losses",
    "rdf_rmse",
    "n_eff",
    "resampled",
    "events",
    "loss",
    "grad_norm",
    "learning_rate",
    "md_steps",
    "rollout_steps",
    "epoch_md_steps",
    "epoch_seconds",
    "wall_time",
}


def lj_state(targets=(), name="lj", density=0.6, pressure=None):
    return StatePoint(
        name, ["A"], [N], [1.0], temperature=TEMPERATURE, density=density, pressure=pressure, targets=list(targets)
    )


def true_table():
    return PairTable(["A"], LennardJones(1.0, 1.0), cutoff=CUTOFF, cutoff_mode="shift")


@functools.lru_cache(maxsize=1)
def simulated_target():
    """g(r) of the true LJ potential at rho* = 0.6, T* = 1.2, 64 particles (simulated once)."""
    from openmm_diffsim.sampling import reference_rdfs

    r, g, _ = reference_rdfs(
        lj_state(),
        true_table(),
        n_snapshots=200,
        interval=20,
        equilibration=1000,
        seed=5,
        **RDF_GRID,
        **SAMPLER,
    )
    return Target(r, g[0], pair=("A", "A"), state="lj")


def wrong_spline_table(sigma=1.08, epsilon=0.5):
    """A spline table holding a clearly wrong LJ (too wide, too shallow) on the IBI knots."""
    knots = np.linspace(0.85, CUTOFF, 12)
    values = LennardJones(sigma, epsilon)(torch.as_tensor(knots)).detach().numpy()
    return PairTable(["A"], CubicSpline(knots, values - values[-1]), cutoff=CUTOFF, cutoff_mode="shift")


def quick_ibi(table, states, tmp_path=None, **overrides):
    options = dict(
        mixing=1.0,
        max_epochs=3,
        n_snapshots=30,
        snapshot_interval=20,
        equilibration_steps=300,
        sampler_options=SAMPLER,
        estimator_options=RDF_GRID,
        progress=False,
        plot_every=0,
        seed=2,
    )
    options.update(overrides)
    return IBI(table, states, output_dir=tmp_path, **options)


# -- the update ------------------------------------------------------------------------------------------


def test_update_equals_the_formula_where_both_rdfs_are_resolved():
    r = np.linspace(0.05, 2.0, 80)
    g_target = 1.0 + 0.5 * np.sin(3 * r) ** 2
    g_model = 1.0 + 0.3 * np.cos(2 * r) ** 2
    kT = 1.7
    du = ibi_update(r, g_model, g_target, kT, mixing=0.4, smoothing=0, max_update=None)
    np.testing.assert_allclose(du, 0.4 * kT * np.log(g_model / g_target), rtol=1e-13, atol=1e-15)
    # Identical RDFs: no update.
    assert np.all(ibi_update(r, g_target, g_target, kT, smoothing=2) == 0.0)


def test_zero_rdf_regions_give_finite_updates_with_the_right_sign():
    r = np.linspace(0.0, 2.0, 101)
    g_target = np.where(r < 0.9, 0.0, 1.0)
    g_model = np.where(r < 0.8, 0.0, np.where(r < 0.9, 0.5, 1.2))  # the model's core is too soft
    kT, g_min = 1.0, 1e-3
    du = ibi_update(r, g_model, g_target, kT, mixing=1.0, g_min=g_min, smoothing=0, max_update=None)
    assert np.all(np.isfinite(du))
    penetrating = (r >= 0.8) & (r < 0.9)
    # Model finds particles where the target has none: g_target is clamped to g_min, u goes up.
    np.testing.assert_allclose(du[penetrating], kT * np.log(0.5 / g_min))
    # Both zero (the core): continued from the first defined bin, so the core moves with it.
    np.testing.assert_allclose(du[r < 0.8], du[np.argmax(penetrating)])
    np.testing.assert_allclose(du[r >= 0.9], kT * np.log(1.2))
    # The opposite case (model core too wide) pulls u down.
    du2 = ibi_update(r, g_target, g_model, kT, g_min=g_min, smoothing=0, max_update=None)
    assert np.all(du2[penetrating] < 0)
    with pytest.raises(ValueError, match="both below g_min"):
        ibi_update(r, np.zeros_like(r), np.zeros_like(r), kT)


def test_smoothing_spreads_a_spike_and_keeps_smooth_updates():
    r = np.linspace(0.5, 2.0, 31)
    g_target = np.ones_like(r)
    g_model = np.ones_like(r)
    g_model[15] = math.e  # a one-bin spike of +1 kT
    raw = ibi_update(r, g_model, g_target, 1.0, smoothing=0, max_update=None)
    smooth = ibi_update(r, g_model, g_target, 1.0, smoothing=1, max_update=None)
    np.testing.assert_allclose(smooth[14:17], [0.25, 0.5, 0.25])
    assert smooth.sum() == pytest.approx(raw.sum())  # the filter conserves the update's sum
    # A linear update (away from the ends) is unchanged by the (1, 2, 1)/4 filter.
    linear = np.exp(0.1 * r)
    du = ibi_update(r, linear, g_target, 1.0, smoothing=3, max_update=None)
    np.testing.assert_allclose(du[3:-3], 0.1 * r[3:-3], rtol=1e-12)


def test_max_update_caps_the_step_in_kT():
    r = np.linspace(0.5, 2.0, 20)
    du = ibi_update(r, np.full(20, 10.0), np.ones(20), 2.0, smoothing=0, max_update=0.5)
    np.testing.assert_allclose(du, 1.0)  # 0.5 kT with kT = 2 kJ/mol


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(g_model=np.ones(5)), "equal length"),
        (dict(kT=-1.0), "kT must be positive"),
        (dict(mixing=0.0), "mixing"),
        (dict(smoothing=1.5), "smoothing"),
        (dict(g_target=-np.ones(10)), "non-negative"),
        (dict(max_update=-1.0), "max_update"),
    ],
)
def test_update_rejects_bad_input(kwargs, message):
    args = dict(r=np.linspace(0.1, 1, 10), g_model=np.ones(10), g_target=np.ones(10), kT=1.0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        ibi_update(**args)


# -- pressure correction ----------------------------------------------------------------------------------


def test_pressure_ramp_shape_and_amplitude_sign_and_size():
    r = np.array([0.0, 0.5, 1.0, 1.5])
    np.testing.assert_allclose(pressure_ramp(r, 1.0, -0.3), [-0.3, -0.15, 0.0, 0.0])
    kT, volume, cutoff, sum_r = 2.5, 27.0, 1.0, 400.0
    from openmm_diffsim.observables import BAR_PER_KJ_PER_MOL_NM3

    response = sum_r / (3 * volume * cutoff) * BAR_PER_KJ_PER_MOL_NM3
    # Too high a pressure: an attractive (negative) ramp that closes the gap to first order.
    small = 0.05 * kT * response
    a = pressure_ramp_amplitude(100.0 + small, 100.0, sum_r, volume, cutoff, kT)
    assert a == pytest.approx(-0.05 * kT)
    assert pressure_ramp_amplitude(100.0 - small, 100.0, sum_r, volume, cutoff, kT) == pytest.approx(0.05 * kT)
    # Large gaps are clipped to 0.1 kT (Reith et al. 2003).
    assert pressure_ramp_amplitude(1e6, 0.0, sum_r, volume, cutoff, kT) == pytest.approx(-0.1 * kT)
    assert pressure_ramp_amplitude(-1e6, 0.0, sum_r, volume, cutoff, kT, max_ramp=0.2) == pytest.approx(0.2 * kT)
    with pytest.raises(ValueError, match="sum_r"):
        pressure_ramp_amplitude(1.0, 0.0, 0.0, volume, cutoff, kT)


def test_ramp_response_matches_the_virial_pressure_of_the_ramped_potential():
    """ΔP = A Σr / (3 V r_c) at fixed configurations, against observables.configurational_pressure."""
    from openmm_diffsim.ibi import _pressure_and_sum_r
    from openmm_diffsim.observables import configurational_pressure, virial_pressure
    from openmm_diffsim.sampling import Snapshots

    state = lj_state()
    rng = np.random.default_rng(0)
    positions = np.stack([state.initial_positions("lattice", seed=k) for k in range(3)])
    positions += rng.normal(scale=0.05, size=positions.shape)
    boxes = np.repeat(state.box_vectors[None], 3, axis=0)
    snapshots = Snapshots(positions, np.zeros_like(positions), boxes, np.zeros(3), np.arange(3), state)
    base = true_table()
    amplitude = 0.2
    knots = np.linspace(0.5, CUTOFF, 8)
    ramp = CubicSpline(knots, pressure_ramp(knots, CUTOFF, amplitude), trainable=False)
    ramped = PairTable(["A"], PotentialSum([LennardJones(1.0, 1.0), ramp]), cutoff=CUTOFF, cutoff_mode="shift")
    p0 = configurational_pressure(base, torch.as_tensor(positions), boxes, state.particle_species()).mean()
    p1 = configurational_pressure(ramped, torch.as_tensor(positions), boxes, state.particle_species()).mean()
    pressure, sum_r = _pressure_and_sum_r(base, snapshots, state)
    from openmm_diffsim.observables import BAR_PER_KJ_PER_MOL_NM3

    expected = amplitude * sum_r / (3 * state.volume * CUTOFF) * BAR_PER_KJ_PER_MOL_NM3
    assert float((p1 - p0).detach()) == pytest.approx(expected, rel=1e-9)
    reference = virial_pressure(
        base, torch.as_tensor(positions), boxes, state.particle_species(), temperature=TEMPERATURE
    ).mean()
    assert pressure == pytest.approx(float(reference.detach()), rel=1e-9)


# -- the potential representation -----------------------------------------------------------------------


def test_boltzmann_knot_values_invert_and_extrapolate_a_repulsive_core():
    r = np.linspace(0.01, 2.0, 200)
    kT = 1.2
    u_true = LennardJones(1.0, 1.0)(torch.as_tensor(r)).detach().numpy()
    g = np.exp(-u_true / kT)  # dilute gas: g = exp(-u/kT)
    knots = np.linspace(0.8, 2.0, 25)
    values = boltzmann_knot_values(r, g, kT, knots, g_min=1e-2)
    resolved = knots >= r[np.argmax(g > 1e-2)]
    u_knots = LennardJones(1.0, 1.0)(torch.as_tensor(knots)).detach().numpy()
    np.testing.assert_allclose(values[resolved], (u_knots - u_knots[-1])[resolved], atol=0.02)
    core = ~resolved
    assert core.any() and np.all(np.diff(values[core]) < 0)  # steeply repulsive inward
    assert values[core][0] > values[resolved][0]


def dilute_estimate(smearing, n_bins=100, r_max=2.5, kT=1.2):
    """The RDF estimator's expectation for a dilute LJ gas, g = exp(-u/kT), on its bins (independent of ibi.py)."""
    from openmm_diffsim.observables import smear_target

    fine = np.linspace(0.0005, r_max + 0.2 - 0.0005, int(round((r_max + 0.2) / 0.001)))
    u = LennardJones(1.0, 1.0)(torch.as_tensor(np.maximum(fine, 0.5))).detach().numpy()
    g = smear_target(fine, np.exp(-u / kT), smearing, (0.0, r_max), n_bins, beyond="one").numpy()
    edges = np.linspace(0.0, r_max, n_bins + 1)
    return 0.5 * (edges[1:] + edges[:-1]), g


def wall_errors(r, g, values, knots, kT=1.2):
    """(u_spline - u_true)/kT at the bins with g > 0.1, offset removed (mean 0 over them)."""
    spline = CubicSpline(knots, values, trainable=False)
    region = (g > 0.1) & (r <= knots[-1])
    with torch.no_grad():
        fitted = spline.energy_and_derivative(torch.as_tensor(r[region]))[0].numpy()
        truth = LennardJones(1.0, 1.0)(torch.as_tensor(np.append(r[region], knots[-1]))).numpy()
    diff = (fitted - truth[:-1]) / kT
    return diff - diff.mean()


@pytest.mark.parametrize("smearing", [0.02, 0.0])
def test_inversion_through_the_estimators_kernel_recovers_a_dilute_gas_potential(smearing):
    """Through the kernel the wall is as close as a spline through the true u at its knots; plainly, 0.4 kT soft."""
    kT = 1.2
    r, g = dilute_estimate(smearing)
    knots = np.arange(r[np.argmax(g > 1e-2)], 2.5 + 1e-9, 0.05)
    exact = LennardJones(1.0, 1.0)(torch.as_tensor(knots)).detach().numpy()
    limit = np.abs(wall_errors(r, g, exact, knots)).max()  # the representation's own error (0.15 kT)
    through = wall_errors(r, g, boltzmann_knot_values(r, g, kT, knots, smearing=smearing), knots)
    assert np.abs(through).max() < limit
    assert np.sqrt(np.mean(through**2)) < 0.03
    if smearing:
        plain = wall_errors(r, g, boltzmann_knot_values(r, g, kT, knots), knots)
        assert plain.min() < -0.3  # the check can fail: a smeared RDF inverted plainly is too soft at the wall
    r_valid, u = deconvolved_inversion(r, g, kT, smearing, cutoff=2.5)
    truth = LennardJones(1.0, 1.0)(torch.as_tensor(r_valid)).detach().numpy()
    shown = g[(r <= 2.5) & (g > 1e-2)] > 0.1
    np.testing.assert_allclose(u[shown] / kT, (truth - truth[-1])[shown] / kT, atol=limit)


def test_inversion_through_the_kernel_on_a_fine_rdf_grid():
    """1000 bins of 0.0025 (0.02 smearing = 8 bins): a coarser quadrature per bin keeps the grid at
    4000 points, and the wall is still as close as a spline through the true u at the knots."""
    kT = 1.2
    r, g = dilute_estimate(0.02, n_bins=1000)
    knots = np.arange(r[np.argmax(g > 1e-2)], 2.5 + 1e-9, 0.05)
    exact = LennardJones(1.0, 1.0)(torch.as_tensor(knots)).detach().numpy()
    through = wall_errors(r, g, boltzmann_knot_values(r, g, kT, knots, smearing=0.02), knots)
    assert np.abs(through).max() < np.abs(wall_errors(r, g, exact, knots)).max()
    assert np.sqrt(np.mean(through**2)) < 0.03


def test_inversion_through_the_kernel_does_not_amplify_the_noise_of_the_bins():
    """1% noise per bin moves the deconvolved knots about as much as the plain inversion (a pointwise inverse
    of the kernel, 0.8 bins wide, would amplify bin-to-bin noise ~20x)."""
    kT = 1.2
    r, g = dilute_estimate(0.02)
    knots = np.arange(r[np.argmax(g > 1e-2)], 2.5 + 1e-9, 0.05)
    moved = {None: [], 0.02: []}
    for seed in range(8):
        noisy = g * (1.0 + 0.01 * np.random.default_rng(seed).standard_normal(g.size))
        for smearing in moved:
            clean = boltzmann_knot_values(r, g, kT, knots, smearing=smearing)
            change = boltzmann_knot_values(r, noisy, kT, knots, smearing=smearing) - clean
            moved[smearing].append(np.sqrt(np.mean(change**2)))
    # Measured: 0.8-1.6x per seed, 1.3x on average.
    assert np.mean(moved[0.02]) < 1.6 * np.mean(moved[None])


def test_inversion_through_the_kernel_rejects_what_it_cannot_invert():
    kT = 1.2
    r, g = dilute_estimate(0.02)
    knots = np.arange(0.9, 2.5 + 1e-9, 0.05)
    values = boltzmann_knot_values(r, g, kT, knots)
    with pytest.raises(ValueError, match="smearing must be a non-negative"):
        deconvolved_knot_values(r, g, kT, knots, values, -0.01)
    with pytest.raises(ValueError, match="uniform"):
        deconvolved_knot_values(np.append(r[:-1], r[-1] + 0.01), g, kT, knots, values, 0.02)
    with pytest.raises(ValueError, match="below r = 0"):
        deconvolved_knot_values(r - 0.02, g, kT, knots, values, 0.02)
    with pytest.raises(ValueError, match="at least 4 bins"):
        deconvolved_knot_values(r, np.where(r < 2.45, 0.0, g), kT, knots, values, 0.02)


@pytest.mark.parametrize("method", ["trainer", "ibi"])
def test_initial_guesses_invert_through_the_estimators_kernel(method):
    """Trainer's and IBI's Boltzmann guesses read the smearing off their estimator: the wall of a dilute gas
    comes out near as close as its spline allows, where the plain inversion of the same estimate is 0.3+ kT soft."""
    from openmm_diffsim.training import Trainer

    kT = 1.2
    r, g = dilute_estimate(0.02)
    state = StatePoint(
        "gas", ["A"], [N], [1.0], temperature=kT / MOLAR_GAS_CONSTANT, density=0.01, targets=[Target(r, g, ("A", "A"))]
    )
    knots = np.linspace(r[np.argmax(g > 0.05)], 2.5, 33)
    table = PairTable(["A"], CubicSpline(knots, np.zeros_like(knots)), cutoff=2.5, cutoff_mode="shift")
    estimator_options = dict(r_range=(0.0, 2.5), n_bins=100, smearing=0.02)
    common = dict(boltzmann_initial_guess=True, estimator_options=estimator_options, progress=False)
    runner = (
        Trainer(table, [state], "reweighting", plot_every=0, **common)
        if method == "trainer"
        else IBI(table, [state], **common)
    )
    runner._initialise() if method == "trainer" else runner._apply_boltzmann_guess()
    spline = runner.table.pair_potentials[0]
    errors = wall_errors(r, g, spline.values.detach().numpy(), knots)
    exact = LennardJones(1.0, 1.0)(torch.as_tensor(knots)).detach().numpy()
    limit = np.abs(wall_errors(r, g, exact, knots)).max()  # the spline through the truth: 0.10 kT
    assert np.abs(errors).max() < 1.5 * limit
    plain = wall_errors(r, g, boltzmann_knot_values(r, g, kT, knots), knots)
    assert plain.min() < -0.3 and errors.min() > -0.1


def test_spline_table_from_targets_averages_states_and_needs_every_pair():
    target = simulated_target()
    a = lj_state([target], "a")
    b = lj_state([Target(target.r, target.g, ("A", "A"))], "b")
    b.weight = 3.0
    table = spline_table_from_targets([a, b], CUTOFF, knot_spacing=0.1)
    spline = table.pair_potentials[0]
    assert isinstance(spline, CubicSpline) and spline.trainable
    assert spline.knots[-1].item() == pytest.approx(CUTOFF)
    # Identical targets: the weighted average is the single-state inversion.
    single = spline_table_from_targets([a], CUTOFF, knot_spacing=0.1)
    np.testing.assert_allclose(spline.values.detach(), single.pair_potentials[0].values.detach(), atol=1e-12)
    binary = StatePoint("ab", ["A", "B"], [32, 32], [1.0, 1.0], temperature=TEMPERATURE, density=0.6)
    binary.targets = [target]
    with pytest.raises(ValueError, match="no target for pair A-B"):
        spline_table_from_targets([binary], CUTOFF)


def test_ibi_rejects_bad_input():
    state = lj_state([simulated_target()])
    with pytest.raises(ValueError, match="trainable CubicSpline"):
        quick_ibi(true_table(), [state])
    with pytest.raises(ValueError, match="short of the cutoff"):
        quick_ibi(wrong_spline_table(), [state], estimator_options=dict(r_range=(0.0, 1.0), n_bins=50))
    with pytest.raises(ValueError, match="unknown estimator option"):
        quick_ibi(wrong_spline_table(), [state], estimator_options=dict(n_steps=10))
    with pytest.raises(ValueError, match="no targets"):
        quick_ibi(wrong_spline_table(), [lj_state()])
    with pytest.raises(ValueError, match="mixing"):
        quick_ibi(wrong_spline_table(), [state], mixing=-1.0)
    with pytest.raises(TypeError, match="PairTable"):
        quick_ibi("table", [state])
    # A spline on a fixed prior is fine; two trainable splines in one pair are ambiguous.
    prior = SoftSphere(0.9, 1.0, 12.0)
    knots = np.linspace(0.85, CUTOFF, 8)
    ok = PairTable(["A"], PotentialSum([prior, CubicSpline(knots, np.zeros(8))]), cutoff=CUTOFF)
    quick_ibi(ok, [state])
    two = PairTable(
        ["A"], PotentialSum([CubicSpline(knots, np.zeros(8)), CubicSpline(knots, np.zeros(8))]), cutoff=CUTOFF
    )
    with pytest.raises(ValueError, match="exactly one"):
        quick_ibi(two, [state])


# -- several pairs and states without MD ---------------------------------------------------------------------


def test_pairs_update_from_their_own_rdf_and_states_average_by_weight(tmp_path):
    """The assembly of updates, with the sampler replaced by designed RDFs."""
    grid = dict(r_range=(0.0, 2.0), n_bins=40, smearing=0.02)
    r = np.linspace(0.025, 1.975, 40)
    knots = np.linspace(0.6, 2.0, 8)
    splines = {p: CubicSpline(knots, np.zeros(8)) for p in [("A", "A"), ("A", "B"), ("B", "B")]}
    table = PairTable(["A", "B"], splines, cutoff=2.0, cutoff_mode="shift")
    flat = np.ones_like(r)
    targets = [Target(r, flat, p) for p in [("A", "A"), ("A", "B"), ("B", "B")]]
    s1 = StatePoint("s1", ["A", "B"], [50, 50], [1.0, 1.0], temperature=100.0, box=[5.0] * 3, targets=targets)
    s2 = StatePoint("s2", ["A", "B"], [50, 50], [1.0, 1.0], temperature=200.0, box=[5.0] * 3, targets=targets)
    s2.weight = 3.0
    run = IBI(
        table,
        [s1, s2],
        mixing=0.5,
        max_epochs=1,
        estimator_options=grid,
        smoothing=0,
        max_update=None,
        progress=False,
        output_dir=tmp_path,
    )
    bump = np.exp(-(((r - 1.0) / 0.2) ** 2))  # a smooth bump (zero at the cutoff)
    # Pair rows: A-A 0, A-B 1, B-B 2. s1: A-A over-populated, A-B under; s2: A-A under.
    designed = {
        "s1": np.stack([1 + 0.5 * bump, 1 - 0.3 * bump, flat]),
        "s2": np.stack([1 - 0.2 * bump, flat, flat]),
    }
    run._sample = lambda state: state.name
    run.sampled_rdfs = lambda snapshots, state: designed[snapshots]
    (record,) = run.fit()
    assert set(record) >= TRAINER_KEYS
    assert record["md_steps"] == 0 and set(record["rdf_rmse"]) == {"s1", "s2"}

    def expected(row):
        parts = [
            w * ibi_update(r, designed[s.name][row], flat, s.kT, 0.5, smoothing=0, max_update=None)
            for w, s in ((1.0, s1), (3.0, s2))
        ]
        du = sum(parts) / 4.0
        return np.interp(knots, r, du - du[-1])

    for row, pair in enumerate(["A-A", "A-B", "B-B"]):
        values = table.pair_potentials[table.pair_index(pair)].values.detach().numpy()
        np.testing.assert_allclose(values, expected(row), atol=1e-12)
    assert np.abs(table.pair_potentials[0].values.detach().numpy()).max() > 0.05
    assert np.all(table.pair_potentials[2].values.detach().numpy() == 0.0)
    # Nearly flat splines (no wall above 50 kJ/mol anywhere) still plot.
    assert (tmp_path / "plots" / "potential.png").stat().st_size > 1000


# -- runs ---------------------------------------------------------------------------------------------------------


def test_tiny_run_reduces_the_rdf_error_and_writes_trainer_outputs(tmp_path):
    state = lj_state([simulated_target()])
    run = quick_ibi(wrong_spline_table(), [state], tmp_path, max_epochs=6, plot_every=3)
    history = run.fit()
    losses = [h["loss"] for h in history]
    assert min(losses[-2:]) < 0.3 * losses[0], losses
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(6))
    assert all(set(r) >= TRAINER_KEYS for r in records)
    steps = [r["md_steps"] for r in records]
    assert steps == sorted(steps) and steps[0] >= 300 + 30 * 20
    # Every iteration after the first re-equilibrates for two snapshot intervals, like the trainer.
    assert steps[1] - steps[0] == 30 * 20 + 2 * 20
    assert records[-1]["rdf_rmse"]["lj"]["A-A"] == pytest.approx(math.sqrt(losses[-1]), rel=1e-9)
    for name in ("loss.png", "potential.png", "rdf_lj.png"):
        assert (tmp_path / "plots" / name).stat().st_size > 1000
    # The result exports like any other table.
    from openmm_diffsim.export import write_lammps_table

    assert write_lammps_table(run.table, tmp_path / "u.table", r_min=0.8, r_max=CUTOFF, n=200).exists()


def test_resume_continues_the_run(tmp_path):
    state = lj_state([simulated_target()])
    first = quick_ibi(wrong_spline_table(), [state], tmp_path, max_epochs=2)
    first.fit()
    values = first.table.pair_potentials[0].values.detach().clone()
    resumed = IBI.resume(tmp_path, max_epochs=3)
    assert resumed.epoch == 2 and resumed.md_steps == first.md_steps
    torch.testing.assert_close(resumed.table.pair_potentials[0].values.detach(), values)
    history = resumed.fit()
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert history[2]["md_steps"] > first.md_steps
    # Resumed samplers start from the saved configuration: no second equilibration.
    assert history[2]["epoch_md_steps"] == 30 * 20 + 2 * 20
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 3
    with pytest.raises(ValueError, match="unknown option"):
        IBI.resume(tmp_path, learning_rate=0.1)
    with pytest.raises(FileNotFoundError):
        IBI.resume(tmp_path / "nowhere")
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an openmm-diffsim IBI checkpoint"):
        IBI.resume(tmp_path / "other.pt")


def test_pressure_correction_runs_and_logs_the_ramp(tmp_path):
    state = lj_state([simulated_target()], pressure=0.0)
    run = quick_ibi(wrong_spline_table(), [state], tmp_path, max_epochs=1, pressure_correction=True)
    (record,) = run.fit()
    ramp = record["ibi"]["pressure_ramp"]
    assert abs(ramp) <= 0.1 * state.kT + 1e-12
    # The sampled pressure of a liquid at rho* = 0.6, T* = 1.2 with a too-shallow well is positive.
    assert record["ibi"]["pressure"]["lj"] > 0 and ramp < 0


# -- configuration and command line ---------------------------------------------------------------------------

CONFIG = """
[potential]
species = ["A"]
cutoff = {cutoff}

[potential.pairs."A-A"]
type = "spline"
knots = 12
r_min = 0.85
initial = "boltzmann"

[[state]]
name = "lj"
counts = [{n}]
masses = [1.0]
temperature = {temperature}
density = 0.6

[[state.target]]
pair = "A-A"
file = "target.dat"

[training]
method = "ibi"
max_epochs = 2
seed = 1
progress = false

[sampling]
platform = "CPU"
timestep = 0.005
n_snapshots = 20
interval = 20
equilibration = 200

[estimator]
r_range = [0.0, {cutoff}]
n_bins = 50
smearing = 0.04

[ibi]
mixing = 0.8
smoothing = 1
max_update = 0

[output]
directory = "run"
plot_every = 0

[export]
formats = ["torchscript", "lammps"]
"""


def _write_config(tmp_path, text=None):
    target = simulated_target()
    write_rdf(tmp_path / "target.dat", target.r, target.g, pair=("A", "A"), state="lj")
    path = tmp_path / "ibi.toml"
    text = text or CONFIG.format(cutoff=CUTOFF, n=N, temperature=TEMPERATURE)
    path.write_text(text)
    return path


def test_config_parses_the_ibi_table_and_rejects_misplaced_options(tmp_path):
    from openmm_diffsim.config import ConfigError, load_config

    path = _write_config(tmp_path)
    config = load_config(path)
    assert config.method == "ibi"
    assert config.ibi == {"mixing": 0.8, "smoothing": 1, "max_update": None}
    text = path.read_text()
    for bad, message in [
        (text.replace("mixing = 0.8", "mixng = 0.8"), "did you mean 'mixing'"),
        (text.replace("mixing = 0.8", "mixing = -1"), "ibi.mixing: must be positive"),
        (text.replace('method = "ibi"', 'method = "reweighting"'), "only applies to method"),
        (text.replace("n_bins = 50", "n_bins = 50\nn_steps = 3"), "estimator.n_steps: unknown option"),
    ]:
        path.write_text(bad)
        with pytest.raises(ConfigError, match=message):
            load_config(path)


def test_cli_fit_runs_ibi_resumes_and_exports(tmp_path, capsys):
    from openmm_diffsim.cli import load_table, main

    path = _write_config(tmp_path)
    assert main(["fit", str(path)]) == 0
    out = capsys.readouterr().out
    assert "IBI iteration" in out
    run_dir = tmp_path / "run"
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert len(records) == 2 and set(records[0]) >= TRAINER_KEYS
    assert (run_dir / "export" / "model.pt").exists() and (run_dir / "export" / "pair_table.lammps").exists()
    table = load_table(run_dir)  # the checkpoint holds the table like the trainer's
    assert isinstance(table.pair_potentials[0], CubicSpline)
    # The initial guess was the Boltzmann inversion, not the zero spline.
    assert records[0]["rdf_rmse"]["lj"]["A-A"] < 0.2
    # A gradient-method key is not an error (the example configuration has one), but it is reported.
    path.write_text(path.read_text().replace("seed = 1", "seed = 1\nlearning_rate = 0.1"))
    assert main(["fit", str(path), "--resume", "--max-epochs", "3"]) == 0
    assert "learning_rate not used by method 'ibi'" in capsys.readouterr().out
    assert len((run_dir / "log.jsonl").read_text().splitlines()) == 3


def test_cli_fit_ibi_with_an_analytic_potential_is_a_clear_error(tmp_path, capsys):
    from openmm_diffsim.cli import main

    text = CONFIG.format(cutoff=CUTOFF, n=N, temperature=TEMPERATURE).replace(
        'type = "spline"\nknots = 12\nr_min = 0.85\ninitial = "boltzmann"',
        'type = "lennard-jones"\nsigma = 1.0\nepsilon = 1.0',
    )
    path = _write_config(tmp_path, text)
    assert main(["fit", str(path)]) == 2
    err = capsys.readouterr().err
    assert "trainable CubicSpline" in err and "Traceback" not in err


# -- slow: recovery ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ibi_recovers_the_lennard_jones_potential(tmp_path):
    """256 particles at rho* = 0.6, T* = 1.2: u(r) within 0.15 kT rms of the truth where g > 0.1."""
    from openmm_diffsim.sampling import reference_rdfs

    n = 256
    state = StatePoint("lj", ["A"], [n], [1.0], temperature=TEMPERATURE, density=0.6)
    grid = dict(r_range=(0.0, 2.5), n_bins=100, smearing=0.02)
    truth = PairTable(["A"], LennardJones(1.0, 1.0), cutoff=2.5, cutoff_mode="shift")
    r, g, _ = reference_rdfs(state, truth, n_snapshots=300, interval=50, equilibration=3000, seed=1, **grid, **SAMPLER)
    state.targets = [Target(r, g[0], ("A", "A"))]
    table = spline_table_from_targets([state], 2.5, knot_spacing=0.05)
    run = IBI(
        table,
        [state],
        mixing=0.5,
        max_epochs=15,
        n_snapshots=60,
        snapshot_interval=50,
        equilibration_steps=2000,
        sampler_options=SAMPLER,
        estimator_options=grid,
        progress=False,
        output_dir=tmp_path,
    )
    history = run.fit()
    assert history[-1]["rdf_rmse"]["lj"]["A-A"] < 0.5 * history[0]["rdf_rmse"]["lj"]["A-A"]
    region = (g[0] > 0.1) & (r < 2.5)
    u_model, _ = table.evaluate(r[region])
    u_true, _ = truth.evaluate(r[region])
    diff = (u_model - u_true) / state.kT
    diff -= diff.mean()
    assert np.sqrt(np.mean(diff**2)) < 0.15
