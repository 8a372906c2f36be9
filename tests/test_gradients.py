"""Gradient estimators: reweighting, rollouts, adjoint (openmm_diffsim.gradients)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import openmm_diffsim as od
from openmm_diffsim.gradients import (
    EstimatorResult,
    NonFiniteError,
    ReweightingEstimator,
    RolloutEstimator,
    clip_gradients,
)
from openmm_diffsim.observables import compute_rdf, virial_pressure
from openmm_diffsim.sampling import Sampler, Snapshots
from openmm_diffsim.systems import StatePoint
from openmm_diffsim.targets import Target

SIGMA, EPSILON, MASS, TEMPERATURE = 0.34, 0.996, 39.948, 120.0
GRID = dict(r_range=(0.0, 0.8), n_bins=40, smearing=0.02)


def bin_centres(r_range=(0.0, 0.8), n_bins=40):
    edges = np.linspace(r_range[0], r_range[1], n_bins + 1)
    return 0.5 * (edges[1:] + edges[:-1])


@pytest.fixture(scope="module")
def lj_samples():
    """Snapshots of a small LJ liquid from OpenMM (tabulated backend, CPU)."""
    state = StatePoint("lj", ["Ar"], [108], [MASS], temperature=TEMPERATURE, density=0.8 / SIGMA**3, pressure=100.0)
    table = od.PairTable(["Ar"], od.LennardJones(SIGMA, EPSILON), cutoff=0.8, cutoff_mode="shift")
    sampler = Sampler(state, table, backend="tabulated", platform="CPU", seed=5)
    sampler.equilibrate(500)
    snapshots = sampler.run(16, 25)
    return state, snapshots


def lj_table(sigma=SIGMA, epsilon=EPSILON):
    return od.PairTable(["Ar"], od.LennardJones(sigma, epsilon), cutoff=0.8, cutoff_mode="shift")


def flat_target(value=1.0, pair=("Ar", "Ar")):
    r = bin_centres()
    return Target(r, np.where(r > SIGMA, value, 0.0), pair=pair)


def set_parameters(table, **values):
    with torch.no_grad():
        for name, value in values.items():
            getattr(table.pair_potentials[0], name).fill_(value)


def assert_reweighted_gradient(estimator, table, state, snapshots, targets, grads, loss_weight=1.0, min_fd=1e-8):
    """``grads`` (sigma, epsilon) against central differences of the reweighted loss; returns the loss at the table.

    The same table and snapshots objects throughout: the estimator keeps θ0 and its precomputed data.
    """

    def loss_at(**values):
        saved = {name: float(getattr(table.pair_potentials[0], name).detach()) for name in values}
        set_parameters(table, **values)
        loss = estimator(table, state, snapshots, targets, loss_weight=loss_weight).loss
        set_parameters(table, **saved)
        return loss

    for name, step in (("sigma", 1e-6), ("epsilon", 1e-5)):
        value = float(getattr(table.pair_potentials[0], name).detach())
        fd = (loss_at(**{name: value + step}) - loss_at(**{name: value - step})) / (2 * step)
        assert abs(fd) > min_fd
        assert grads[name] == pytest.approx(fd, rel=1e-5), name
    return loss_at()


def test_reweighting_gradient_matches_finite_differences(lj_samples):
    state, snapshots = lj_samples
    table = lj_table()
    estimator = ReweightingEstimator(**GRID, histogram_bin_width=0.0005)
    estimator.reset(table, snapshots, state)
    targets = [flat_target(1.1)]
    # Move away from θ0 so the weights are not uniform.
    set_parameters(table, sigma=SIGMA * 1.003, epsilon=EPSILON * 0.97)
    result = estimator(table, state, snapshots, targets, loss_weight=2.0)
    assert isinstance(result, EstimatorResult)
    assert not result.diagnostics["rejected"]
    assert 0.3 < result.diagnostics["n_eff_fraction"] < 1.0
    grads = {name: float(getattr(table.pair_potentials[0], name).grad) for name in ("sigma", "epsilon")}

    assert_reweighted_gradient(estimator, table, state, snapshots, targets, grads, loss_weight=2.0, min_fd=1e-8)
    # Gradients accumulate: each call adds its gradient to p.grad.
    for p in table.parameters():
        p.grad = None
    estimator(table, state, snapshots, targets, loss_weight=2.0)
    estimator(table, state, snapshots, targets, loss_weight=2.0)
    assert float(table.pair_potentials[0].sigma.grad) == pytest.approx(2 * grads["sigma"], rel=1e-12)


def test_histogram_energies_match_exact_energies(lj_samples):
    state, snapshots = lj_samples
    table = lj_table()
    estimator = ReweightingEstimator(**GRID, energy_method="histogram")
    estimator.reset(table, snapshots, state)
    assert estimator.histogram_energy_error < 1e-6  # kT, at θ0
    assert estimator.energy_mismatch < 0.5  # kJ/mol against OpenMM's tabulated force
    exact_estimator = ReweightingEstimator(**GRID, energy_method="exact")
    exact_estimator.reset(table, snapshots, state)
    set_parameters(table, sigma=SIGMA * 1.01, epsilon=EPSILON * 1.1)
    hist_energy, _ = estimator._histogram_energy_and_virial(table, False)
    exact_energy = torch.stack(
        [
            od.potential_energy(table, torch.as_tensor(x), torch.as_tensor(b), torch.zeros(108, dtype=torch.long))
            for x, b in zip(snapshots.positions, snapshots.boxes, strict=False)
        ]
    )
    # |U_hist - U_exact| well below 1e-6 kT per snapshot at new parameters.
    assert float((hist_energy - exact_energy).detach().abs().max()) * state.beta < 1e-6
    w_hist = estimator.weights(table, state)
    w_exact = exact_estimator.weights(table, state)
    torch.testing.assert_close(w_hist, w_exact, rtol=1e-6, atol=1e-12)


def test_n_eff_and_resampling_flag(lj_samples):
    state, snapshots = lj_samples
    table = lj_table()
    estimator = ReweightingEstimator(**GRID, n_eff_threshold=0.5)
    result = estimator(table, state, snapshots, [flat_target()])
    assert result.diagnostics["n_eff"] == pytest.approx(len(snapshots), rel=1e-10)
    assert not result.diagnostics["needs_resample"]
    set_parameters(table, epsilon=EPSILON * 2.0)  # far from θ0: a few snapshots dominate
    result = estimator(table, state, snapshots, [flat_target()])
    assert result.diagnostics["n_eff_fraction"] < 0.5
    assert result.diagnostics["needs_resample"]
    w = estimator.weights(table, state)
    assert float(torch.exp(-(w * torch.log(w)).sum())) == pytest.approx(result.diagnostics["n_eff"], rel=1e-10)


def test_reweighted_rdf_at_reference_is_the_plain_average(lj_samples):
    state, snapshots = lj_samples
    table = lj_table()
    estimator = ReweightingEstimator(**GRID)
    target = flat_target()
    result = estimator(table, state, snapshots, [target])
    _, g = compute_rdf(torch.as_tensor(snapshots.positions), torch.as_tensor(snapshots.boxes), **GRID)
    np.testing.assert_allclose(result.rdfs["Ar-Ar"], g.numpy(), rtol=1e-10, atol=1e-12)
    rmse = math.sqrt(float(np.mean((g.numpy() - target.g) ** 2)))
    assert result.rdf_rmse["Ar-Ar"] == pytest.approx(rmse, rel=1e-10)
    assert result.loss == pytest.approx(rmse**2, rel=1e-10)


def two_species_table():
    """LJ A-A and A-B, soft-sphere B-B, cut at 0.8 nm."""
    return od.PairTable(
        ["A", "B"],
        {
            ("A", "A"): od.LennardJones(SIGMA, EPSILON),
            ("A", "B"): od.LennardJones(0.3, 0.8),
            ("B", "B"): od.SoftSphere(0.28, 1.0, 12.0),
        },
        cutoff=0.8,
    )


@pytest.mark.parametrize("r_range, smearing", [((0.0, 0.95), 0.02), ((0.1, 0.5), 0.0), ((0.0, 0.8), 0.01)])
def test_reweighting_rdfs_from_the_shared_pair_search_equal_compute_partial_rdfs(r_range, smearing):
    """reset() searches pairs once for energies and RDFs; its RDFs must equal compute_partial_rdfs frame by frame,
    whether the RDF reaches past the cutoff (0.95 + smearing) or stops short of it (0.5)."""
    from openmm_diffsim.observables import compute_partial_rdfs

    state = StatePoint("mix", ["A", "B"], [60, 40], [MASS, 20.0], temperature=TEMPERATURE, box=[2.2, 2.3, 2.4])
    table = two_species_table()
    rng = np.random.default_rng(4)
    positions = state.initial_positions("lattice", seed=0)[None] + rng.normal(scale=0.03, size=(3, 100, 3))
    boxes = np.repeat(state.box_vectors[None], 3, axis=0)
    zeros = np.zeros(3)
    snapshots = Snapshots(positions, np.zeros_like(positions), boxes, zeros, zeros.astype(np.int64), state)
    estimator = ReweightingEstimator(r_range=r_range, n_bins=30, smearing=smearing)
    estimator.reset(table, snapshots, state)
    species = torch.as_tensor(state.particle_species())
    for frame in range(3):
        _, g = compute_partial_rdfs(
            torch.as_tensor(positions[frame]), torch.as_tensor(boxes[frame]), species, 2, r_range, 30, smearing
        )
        assert float(g.abs().max()) > 0
        np.testing.assert_allclose(estimator._rdfs[frame].numpy(), g.numpy(), rtol=1e-12, atol=1e-12)


def exact_model_samples(n_batches: int, seed: int):
    """Independent batches of 50 frames (10 jiggled lattices, each repeated five times in a row), and a
    target that is the mean RDF of all batches: ~ the exact RDF, so each batch's residual is sampling noise.

    Returns ``(state, table, target, estimators)``, one reset ReweightingEstimator per batch, and the rng.
    """
    state = StatePoint("jiggle", ["Ar"], [100], [MASS], temperature=TEMPERATURE, box=[2.0] * 3)
    table = lj_table()
    lattice = state.initial_positions("lattice", seed=0)
    rng = np.random.default_rng(seed)
    unique, repeat = 10, 5
    batches = [
        (lattice + rng.normal(scale=0.05, size=(unique, 100, 3))).repeat(repeat, axis=0) for _ in range(n_batches)
    ]
    boxes = np.repeat(np.diag([2.0] * 3)[None], unique * repeat, axis=0)
    zeros = np.zeros(unique * repeat)
    _, g = compute_rdf(
        torch.as_tensor(np.concatenate(batches)), torch.as_tensor(np.tile(boxes, (n_batches, 1, 1))), **GRID
    )
    target = Target(bin_centres(), g.numpy(), pair=("Ar", "Ar"))
    estimators = []
    for positions in batches:
        snapshots = Snapshots(positions, np.zeros_like(positions), boxes, zeros, zeros.astype(np.int64), state)
        estimator = ReweightingEstimator(**GRID)
        estimator.reset(table, snapshots, state)
        estimators.append(estimator)
    return state, table, target, estimators, rng


def test_residual_noise_predicts_the_loss_of_an_exact_model_with_correlated_frames():
    """Independent frames, the target their exact mean: the RDF loss is pure sampling noise, which
    residual_noise predicts from one sample.

    Every frame is repeated five times in a row, so a per-frame variance would
    underestimate the noise fivefold; block averages must not.
    """
    state, table, target, estimators, _ = exact_model_samples(30, seed=12)
    losses, noises = [], []
    for estimator in estimators:
        rho, _ = estimator.residuals(table, state, [target])
        losses.append(float(rho.detach() @ rho.detach()))
        noises.append(estimator.residual_noise(state, [target]))
    # Each batch's own mean moved the target by 1/30 of its noise: E[loss] = (1 - 1/30) noise. Measured
    # over seeds: 0.75-0.99 with 20 batches; the variance of single frames would give 4-5.4.
    assert 0.65 < np.mean(losses) / np.mean(noises) < 1.5
    # By hand: the variance of the mean of 10 blocks of 5 frames, bins weighted 1/n_bins as in the loss.
    rdfs = estimators[-1]._rdfs[:, 0].numpy()
    block_means = rdfs.reshape(10, 5, -1).mean(1)
    by_hand = float((block_means.var(0, ddof=1) / 10).sum()) / rdfs.shape[1]
    assert noises[-1] == pytest.approx(by_hand, rel=1e-9)
    # Weighting the state scales it as it scales the loss; too few blocks is refused.
    assert estimators[-1].residual_noise(state, [target], loss_weight=3.0) == pytest.approx(3.0 * noises[-1])
    for bad in (1, 2.5, "ten", True):
        with pytest.raises(ValueError, match="n_blocks"):
            estimators[-1].residual_noise(state, [target], n_blocks=bad)


def test_residual_block_deviations_carry_the_sampling_noise_through_a_linear_map():
    """The block deviations are the block-mean residuals about their mean and predict the scatter of a
    projection of ρ: in the exact-model setting above, ρ of each batch is pure noise, and a fixed linear
    map a·ρ scatters between batches by what the deviations predict.
    """
    state, table, target, estimators, rng = exact_model_samples(20, seed=7)
    projection = torch.as_tensor(rng.normal(size=target.g.shape[0]))
    projected, predicted = [], []
    for estimator in estimators:
        rho, _ = estimator.residuals(table, state, [target])
        deviations = estimator.residual_block_deviations(state, [target], n_blocks=5)
        assert deviations.shape == (5, rho.numel()) and deviations.dtype == torch.float64
        projected.append(float(projection @ rho.detach().double()))
        predicted.append(float(((deviations @ projection) ** 2).sum()) / (5 * 4))
    # By hand for the last batch: block means of 10 frames about their mean, times sqrt(1/n_bins).
    rdfs = estimators[-1]._rdfs[:, 0].numpy()
    block_means = rdfs.reshape(5, 10, -1).mean(1)
    by_hand = (block_means - block_means.mean(0)) / np.sqrt(rdfs.shape[1])
    np.testing.assert_allclose(deviations.numpy(), by_hand, rtol=1e-9, atol=1e-12)
    # E[(a·ρ)²] over batches against the mean prediction (5 blocks of 10 frames: a noisy estimate each).
    assert 0.5 < np.mean(np.square(projected)) / np.mean(predicted) < 2.0
    assert estimators[-1].residual_block_deviations(state, [target], loss_weight=4.0, n_blocks=5) == pytest.approx(
        2.0 * deviations
    )
    with pytest.raises(ValueError, match="n_blocks"):
        estimators[-1].residual_block_deviations(state, [target], n_blocks=1)


def test_residual_curvature_is_the_second_derivative_of_the_reweighted_residuals(lj_samples):
    """Along ε (the LJ energy is linear in it) the reweighted residuals are ⟨A e^{-tβΔU}⟩/⟨e^{-tβΔU}⟩:
    residual_curvature must equal their second derivative in t, by central differences, also from
    parameters other than the snapshots' own (weights not uniform) and with bin weights."""
    state, snapshots = lj_samples
    table = lj_table()
    estimator = ReweightingEstimator(**GRID, bin_weighting="counting")
    estimator.reset(table, snapshots, state)
    targets = [flat_target(1.1)]
    start, change = EPSILON * 0.98, EPSILON * 0.05

    def residuals_at(t):
        set_parameters(table, epsilon=start + t * change)
        rho, _ = estimator.residuals(table, state, targets, loss_weight=2.0)
        return rho.detach().double()

    set_parameters(table, epsilon=start)
    before = estimator.frame_energies(table)
    set_parameters(table, epsilon=start + change)
    after = estimator.frame_energies(table)
    assert before.shape == (len(snapshots),) and not before.requires_grad
    assert float((after - before).std()) * state.beta > 0.1  # a change the weights feel
    curvature = estimator.residual_curvature(state, targets, before, after, loss_weight=2.0)

    def second_difference(h):
        return (residuals_at(h) - 2.0 * residuals_at(0.0) + residuals_at(-h)) / h**2

    # Richardson's extrapolation of two central differences (error O(h^4)) at a step long enough that
    # rounding (about 1e-16 |rho| / h^2: 1e-9 at h = 1e-3, which failed one bin at rtol 1e-4) stays far
    # below the tolerance.
    h = 2e-2
    by_differences = (4.0 * second_difference(h / 2) - second_difference(h)) / 3.0
    assert curvature.shape == by_differences.shape and float(by_differences.abs().max()) > 1e-4
    torch.testing.assert_close(curvature, by_differences, rtol=1e-4, atol=1e-6 * float(by_differences.abs().max()))
    # Bad energies name the problem.
    with pytest.raises(ValueError, match="energy_after must have shape"):
        estimator.residual_curvature(state, targets, before, after[:-1])
    with pytest.raises(ValueError, match="energy_before contains NaN"):
        estimator.residual_curvature(state, targets, torch.full_like(before, float("nan")), after)


def test_pressure_term_matches_virial_pressure(lj_samples):
    state, snapshots = lj_samples
    table = lj_table()
    estimator = ReweightingEstimator(**GRID, pressure_weight=1e-6)
    result = estimator(table, state, snapshots, [flat_target()])
    expected = virial_pressure(
        table,
        torch.as_tensor(snapshots.positions),
        torch.as_tensor(snapshots.boxes),
        [0] * 108,
        temperature=TEMPERATURE,
    ).mean()
    assert result.diagnostics["pressure"] == pytest.approx(float(expected.detach()), rel=1e-6)
    # The pressure term changes the gradient.
    plain = lj_table()
    ReweightingEstimator(**GRID)(plain, state, snapshots, [flat_target()])
    assert float(table.pair_potentials[0].epsilon.grad) != pytest.approx(float(plain.pair_potentials[0].epsilon.grad))


def dilute_snapshots(n_samples=3000, radius=0.8, edge=2.0):
    """Two particles, pair distance stratified so r^3 is uniform on [0, radius^3]."""
    u = (np.arange(n_samples) + 0.5) / n_samples
    r = radius * u ** (1.0 / 3.0)
    rng = np.random.default_rng(0)
    direction = rng.normal(size=(n_samples, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    positions = np.zeros((n_samples, 2, 3))
    positions[:, 0] = 0.5 * edge
    positions[:, 1] = 0.5 * edge + r[:, None] * direction
    state = StatePoint("dilute", ["Ar"], [2], [MASS], temperature=TEMPERATURE, box=[edge] * 3)
    boxes = np.repeat(np.diag([edge] * 3)[None], n_samples, axis=0)
    zeros = np.zeros(n_samples)
    return state, Snapshots(positions, np.zeros_like(positions), boxes, zeros, zeros.astype(np.int64), state)


def test_dilute_limit_matches_analytic_derivative_of_boltzmann_factor():
    """One pair: g(r) = C exp(-βu(r)) / Z(θ), Z = <exp(-βu)> over the sampled sphere."""
    from scipy.integrate import quad

    radius, edge = 0.8, 2.0
    state, snapshots = dilute_snapshots(radius=radius, edge=edge)
    beta = state.beta
    grid = dict(r_range=(0.0, 0.8), n_bins=80, smearing=0.002)
    table = lj_table(epsilon=0.0)  # θ0: ideal gas, the snapshots are its Boltzmann samples
    estimator = ReweightingEstimator(**grid, energy_method="histogram")
    estimator.reset(table, snapshots, state)
    set_parameters(table, epsilon=EPSILON)
    r = bin_centres((0.0, 0.8), 80)
    # Loss whose gradient is the sum of dg/dθ over the chosen bins: target = g - 1 there.
    bins = (r > 0.40) & (r < 0.75)
    weights = bins.astype(float)

    def u(rr, sigma, epsilon):
        lj = lambda x: 4 * epsilon * ((sigma / x) ** 12 - (sigma / x) ** 6)  # noqa: E731
        return lj(rr) - lj(0.8)

    def g_model(sigma, epsilon):
        z = quad(lambda x: 3 * x * x / radius**3 * math.exp(-beta * u(x, sigma, epsilon)), 1e-3, radius, limit=200)[0]
        volume_factor = edge**3 / (4.0 / 3.0 * math.pi * radius**3)
        return volume_factor * np.exp(-beta * u(r, sigma, epsilon)) / z

    analytic = {}
    for name, step in (("sigma", 1e-6), ("epsilon", 1e-6)):
        values = {"sigma": SIGMA, "epsilon": EPSILON}
        up, down = dict(values), dict(values)
        up[name] += step
        down[name] -= step
        analytic[name] = (g_model(**up) - g_model(**down)) / (2 * step)
    g_ref = g_model(SIGMA, EPSILON)
    result = estimator(table, state, snapshots, [Target(r, np.ones_like(r), pair=("Ar", "Ar"))], 0.0)
    g_est = result.rdfs["Ar-Ar"]
    np.testing.assert_allclose(g_est[bins], g_ref[bins], rtol=5e-3)
    target = Target(r, g_est + 1.0, pair=("Ar", "Ar"), weights=weights)
    for p in table.parameters():
        p.grad = None
    estimator(table, state, snapshots, [target])
    scale = -2.0 / weights.sum()  # d/dθ of Σ w (g - g_target)^2 / Σ w with g_target = g + 1
    for name in ("sigma", "epsilon"):
        expected = scale * float(analytic[name][bins].sum())
        got = float(getattr(table.pair_potentials[0], name).grad)
        assert got == pytest.approx(expected, rel=1e-2), name


def reweighted_loss_and_gradient(state, snapshots, bin_weighting, target):
    """Loss and (σ, ε) gradient of the reweighting estimator at σ = 0.345 with this bin weighting and target."""
    table = lj_table(sigma=0.345)
    estimator = ReweightingEstimator(**GRID, bin_weighting=bin_weighting)
    estimator.reset(lj_table(), snapshots, state)
    result = estimator(table, state, snapshots, [target])
    return result.loss, torch.stack([p.grad.clone() for p in table.parameters()])


def test_counting_bin_weighting_equals_explicit_counting_weights(lj_samples):
    """bin_weighting="counting" is the loss of the same target carrying counting_weights;
    a target with weights of its own keeps them; both estimators accept the option."""
    from openmm_diffsim.targets import counting_weights

    state, snapshots = lj_samples
    r = bin_centres()
    plain = Target(r, np.where(r > SIGMA, 1.1 + 0.3 * np.sin(10 * r), 0.0), pair=("Ar", "Ar"))
    own = Target(plain.r, plain.g, pair=("Ar", "Ar"), weights=np.linspace(1.0, 2.0, r.size))
    results = {
        key: reweighted_loss_and_gradient(state, snapshots, weighting, target)
        for key, weighting, target in (
            ("option", "counting", plain),
            ("explicit", "uniform", counting_weights(plain)),
            ("uniform", "uniform", plain),
            ("own+option", "counting", own),
            ("own", "uniform", own),
        )
    }
    assert results["option"][0] == pytest.approx(results["explicit"][0], rel=1e-12)
    torch.testing.assert_close(results["option"][1], results["explicit"][1], rtol=1e-10, atol=0)
    assert results["option"][0] != pytest.approx(results["uniform"][0], rel=0.05)
    assert results["own+option"][0] == pytest.approx(results["own"][0], rel=1e-12)
    rollout_losses = [
        RolloutEstimator(n_steps=2, record_every=1, n_replicas=2, seed=3, bin_weighting=weighting, **GRID)(
            lj_table(sigma=0.345), state, snapshots, [target]
        ).loss
        for weighting, target in (("counting", plain), ("uniform", counting_weights(plain)), ("uniform", plain))
    ]
    assert rollout_losses[0] == pytest.approx(rollout_losses[1], rel=1e-10)
    assert rollout_losses[0] != pytest.approx(rollout_losses[2], rel=0.05)
    for cls in (ReweightingEstimator, RolloutEstimator):
        with pytest.raises(ValueError, match="bin_weighting"):
            cls(bin_weighting="poisson")


def test_relative_bin_weighting_equals_explicit_relative_weights(lj_samples):
    """bin_weighting="relative" is the loss and gradient of the same target carrying relative_weights."""
    from openmm_diffsim.targets import relative_weights

    state, snapshots = lj_samples
    r = bin_centres()
    plain = Target(r, np.where(r > SIGMA, 1.1 + 0.3 * np.sin(10 * r), 0.0), pair=("Ar", "Ar"))
    results = {
        key: reweighted_loss_and_gradient(state, snapshots, weighting, target)
        for key, weighting, target in (
            ("option", "relative", plain),
            ("explicit", "uniform", relative_weights(plain)),
            ("counting", "counting", plain),
        )
    }
    assert results["option"][0] == pytest.approx(results["explicit"][0], rel=1e-12)
    torch.testing.assert_close(results["option"][1], results["explicit"][1], rtol=1e-10, atol=0)
    assert results["option"][0] != pytest.approx(results["counting"][0], rel=0.05)
    # The rollout estimator applies it too.
    rollout_losses = [
        RolloutEstimator(n_steps=2, record_every=1, n_replicas=2, seed=3, bin_weighting=weighting, **GRID)(
            lj_table(sigma=0.345), state, snapshots, [target]
        ).loss
        for weighting, target in (("relative", plain), ("uniform", relative_weights(plain)))
    ]
    assert rollout_losses[0] == pytest.approx(rollout_losses[1], rel=1e-10)


def test_rollout_estimator_adjoint_equals_backprop_and_accumulates(lj_samples):
    state, snapshots = lj_samples
    targets = [flat_target(1.1)]
    grads = {}
    for adjoint in (False, True):
        table = lj_table()
        estimator = RolloutEstimator(n_steps=20, record_every=5, n_replicas=2, adjoint=adjoint, seed=1, **GRID)
        result = estimator(table, state, snapshots, targets, loss_weight=1.0)
        assert not result.diagnostics["rejected"], result.diagnostics["reason"]
        assert result.diagnostics["steps_run"] == 20
        assert result.diagnostics["grad_norm"] > 0
        assert set(result.rdf_rmse) == {"Ar-Ar"}
        grads[adjoint] = torch.stack([p.grad.clone() for p in table.parameters()])
    rel = ((grads[True] - grads[False]).abs() / grads[False].abs()).max()
    assert float(rel) < 1e-6


ROLLOUT = dict(n_steps=20, record_every=5, n_replicas=2, seed=1, integrator="nve", dtype=torch.float64, **GRID)


def reference_rollout_frames(state, snapshots):
    """The frames ROLLOUT records from the snapshots it picks, integrated independently (no grad)."""
    from openmm_diffsim.dynamics import PairForces, make_integrator, rollout

    chosen = RolloutEstimator(**ROLLOUT)._choose(len(snapshots))
    box = torch.as_tensor(snapshots.boxes[0])
    with torch.no_grad():
        return rollout(
            PairForces(switched_lj_table(), [0] * 108, box),
            state.particle_masses(),
            make_integrator("nve", 0.002, TEMPERATURE),
            torch.as_tensor(snapshots.positions[chosen]),
            torch.as_tensor(snapshots.velocities[chosen]),
            20,
            5,
        ).frames


def assert_matches_central_differences(run, grads):
    """``grads`` (sigma, epsilon) against central differences of ``run(table).loss`` on switched LJ tables."""

    def loss_at(**values):
        probe = switched_lj_table()
        set_parameters(probe, **values)
        return run(probe).loss

    for name, value, step in (("sigma", SIGMA, 1e-6), ("epsilon", EPSILON, 1e-5)):
        fd = (loss_at(**{name: value + step}) - loss_at(**{name: value - step})) / (2 * step)
        assert abs(fd) > 1e-6
        assert grads[name] == pytest.approx(fd, rel=1e-5), name


def switched_lj_table(sigma=SIGMA, epsilon=EPSILON):
    # u' continuous at the cutoff: a pair crossing it does not make the virial jump (finite differences).
    return od.PairTable(["Ar"], od.LennardJones(sigma, epsilon), cutoff=0.8, cutoff_mode="switch", switch_distance=0.7)


def test_rollout_pressure_adjoint_equals_backprop(lj_samples):
    state, snapshots = lj_samples
    grads, pressures = {}, {}
    for adjoint in (False, True):
        table = lj_table()
        estimator = RolloutEstimator(**ROLLOUT, adjoint=adjoint, pressure_weight=1e-4)
        result = estimator(table, state, snapshots, [flat_target(1.1)])
        assert not result.diagnostics["rejected"], result.diagnostics["reason"]
        grads[adjoint] = torch.stack([p.grad.clone() for p in table.parameters()])
        pressures[adjoint] = result.diagnostics["pressure"]
    rel = ((grads[True] - grads[False]).abs() / grads[False].abs()).max()
    assert float(rel) < 1e-6
    assert pressures[True] == pytest.approx(pressures[False], rel=1e-12)
    # The pressure term dominates: without it the gradient is a different one.
    plain = lj_table()
    RolloutEstimator(**ROLLOUT)(plain, state, snapshots, [flat_target(1.1)])
    plain_grads = torch.stack([p.grad for p in plain.parameters()])
    assert float(((grads[False] - plain_grads).abs() / plain_grads.abs()).min()) > 0.5


def test_rollout_pressure_gradient_matches_finite_differences(lj_samples):

    state, snapshots = lj_samples
    targets = [flat_target(1.0)]

    def run(table):
        # A fresh estimator per call: same replicas, same (stored) velocities, deterministic NVE.
        return RolloutEstimator(**ROLLOUT, pressure_weight=1e-4)(table, state, snapshots, targets)

    table = switched_lj_table()
    result = run(table)
    assert not result.diagnostics["rejected"], result.diagnostics["reason"]
    # The reported pressure is the virial pressure (kinetic part from T) of the frames, averaged.
    box = torch.as_tensor(snapshots.boxes[0])
    frames = reference_rollout_frames(state, snapshots)
    with torch.no_grad():
        expected = torch.stack(
            [virial_pressure(table, frame, box, [0] * 108, temperature=TEMPERATURE).mean() for frame in frames]
        ).mean()
    assert result.diagnostics["pressure"] == pytest.approx(float(expected), rel=1e-10)
    grads = {name: float(getattr(table.pair_potentials[0], name).grad) for name in ("sigma", "epsilon")}
    assert_matches_central_differences(run, grads)


def test_rollout_pressure_needs_target_pressure(lj_samples):
    state, snapshots = lj_samples
    no_pressure = StatePoint("np", ["Ar"], [108], [MASS], TEMPERATURE, box=snapshots.state.box)
    estimator = RolloutEstimator(**ROLLOUT, pressure_weight=1.0)
    with pytest.raises(ValueError, match="no target pressure"):
        estimator(lj_table(), no_pressure, snapshots, [flat_target()])
    with pytest.raises(ValueError, match="pressure_weight"):
        RolloutEstimator(**ROLLOUT, pressure_weight=-1.0)


def test_rollout_estimator_on_two_species():
    state = StatePoint("mix", ["A", "B"], [40, 24], [MASS, 20.0], temperature=TEMPERATURE, box=[1.7] * 3)
    table = two_species_table()
    positions = state.initial_positions("lattice", seed=0)[None].repeat(2, axis=0)
    positions[1] += np.random.default_rng(1).normal(scale=0.005, size=positions[1].shape)
    boxes = np.repeat(state.box_vectors[None], 2, axis=0)
    zeros = np.zeros(2)
    snapshots = Snapshots(positions, np.zeros_like(positions), boxes, zeros, zeros.astype(np.int64), state)
    targets = [flat_target(pair=("A", "B")), flat_target(pair=("B", "B"))]
    estimator = RolloutEstimator(n_steps=10, record_every=5, n_replicas=2, integrator="langevin", **GRID)
    result = estimator(table, state, snapshots, targets)
    assert not result.diagnostics["rejected"], result.diagnostics["reason"]
    assert set(result.rdf_rmse) == {"A-B", "B-B"}
    assert float(table.pair_potentials[2].exponent.grad.abs()) > 0


def test_rollout_estimator_rejects_nonfinite_steps(lj_samples):
    state, snapshots = lj_samples
    table = lj_table(sigma=0.6)  # huge overlaps: forces overflow on the first step
    set_parameters(table, epsilon=1e300)
    estimator = RolloutEstimator(n_steps=5, record_every=5, n_replicas=1, **GRID)
    result = estimator(table, state, snapshots, [flat_target()])
    assert result.diagnostics["rejected"]
    assert "non-finite" in result.diagnostics["reason"]
    assert math.isnan(result.loss)
    assert all(p.grad is None for p in table.parameters())
    strict = RolloutEstimator(n_steps=5, record_every=5, n_replicas=1, on_nonfinite="raise", **GRID)
    with pytest.raises(NonFiniteError):
        strict(table, state, snapshots, [flat_target()])


def test_reweighting_rejects_nonfinite_parameters(lj_samples):
    state, snapshots = lj_samples
    table = lj_table()
    estimator = ReweightingEstimator(**GRID)
    estimator.reset(table, snapshots, state)
    set_parameters(table, epsilon=float("nan"))
    result = estimator(table, state, snapshots, [flat_target()])
    assert result.diagnostics["rejected"]
    assert all(p.grad is None for p in table.parameters())
    with pytest.raises(NonFiniteError):
        ReweightingEstimator(**GRID, on_nonfinite="raise")(table, state, snapshots, [flat_target()])


def test_clip_gradients():
    a = torch.nn.Parameter(torch.tensor([3.0, 0.0], dtype=torch.float64))
    b = torch.nn.Parameter(torch.tensor(4.0, dtype=torch.float64))
    a.grad = torch.tensor([3.0, 0.0], dtype=torch.float64)
    b.grad = torch.tensor(4.0, dtype=torch.float64)
    assert clip_gradients([a, b], 1.0) == pytest.approx(5.0)
    assert float(torch.sqrt((a.grad**2).sum() + b.grad**2)) == pytest.approx(1.0)
    assert clip_gradients([a, b], 10.0) == pytest.approx(1.0)  # below the limit: unchanged
    b.grad = torch.tensor(float("inf"), dtype=torch.float64)
    with pytest.raises(NonFiniteError):
        clip_gradients([a, b], 1.0)
    with pytest.raises(ValueError):
        clip_gradients([a], -1.0)


def test_targets_off_grid_are_resampled_and_bad_targets_rejected(lj_samples):
    state, snapshots = lj_samples
    table = lj_table()
    estimator = ReweightingEstimator(**GRID)
    fine_r = np.linspace(0.0, 0.8, 161)
    on_grid = estimator(table, state, snapshots, [flat_target()]).loss
    off_grid = Target(fine_r, np.where(fine_r > SIGMA, 1.0, 0.0), pair=("Ar", "Ar"))
    assert estimator(table, state, snapshots, [off_grid]).loss == pytest.approx(on_grid, rel=1e-12)
    with pytest.raises(ValueError, match="unknown species"):
        estimator(table, state, snapshots, [flat_target(pair=("Ar", "Xe"))])
    with pytest.raises(ValueError, match="no targets"):
        estimator(table, state, snapshots, [])
    with pytest.raises(ValueError, match="pressure"):
        ReweightingEstimator(**GRID, pressure_weight=1.0)(
            table,
            StatePoint("np", ["Ar"], [108], [MASS], TEMPERATURE, box=snapshots.state.box),
            snapshots,
            [flat_target()],
        )
    with pytest.raises(ValueError, match="record_every"):
        RolloutEstimator(n_steps=5, record_every=10)


# -- energy term -------------------------------------------------------------------------------


def with_energy(state, energy):
    return StatePoint(
        state.name, ["Ar"], [108], [MASS], TEMPERATURE, box=state.box, pressure=state.pressure, energy=energy
    )


def test_reweighting_energy_term_is_mean_pair_energy_and_has_exact_gradient(lj_samples):
    from openmm_diffsim.energy import potential_energy

    state, snapshots = lj_samples
    state = with_energy(state, -4.0)
    table = lj_table()
    estimator = ReweightingEstimator(**GRID, energy_weight=0.5)
    result = estimator(table, state, snapshots, [flat_target()])
    box = torch.as_tensor(snapshots.boxes[0])
    expected = np.mean(
        [
            float(potential_energy(table, torch.as_tensor(x), box, torch.zeros(108, dtype=torch.long)).detach()) / 108
            for x in snapshots.positions
        ]
    )
    assert result.diagnostics["energy"] == pytest.approx(expected, rel=1e-7)
    # The loss is the RDF term plus weight * (<U>/N - target)^2.
    plain = ReweightingEstimator(**GRID)(lj_table(), state, snapshots, [flat_target()])
    assert result.loss == pytest.approx(plain.loss + 0.5 * (expected + 4.0) ** 2, rel=1e-7)
    # Gradient of the reweighted loss (energy term included) against finite differences, away from θ0.
    set_parameters(table, sigma=SIGMA * 1.002, epsilon=EPSILON * 0.98)
    for p in table.parameters():
        p.grad = None
    estimator(table, state, snapshots, [flat_target()])
    grads = {name: float(getattr(table.pair_potentials[0], name).grad) for name in ("sigma", "epsilon")}
    loss = assert_reweighted_gradient(estimator, table, state, snapshots, [flat_target()], grads, min_fd=1e-6)
    # The residual vector of Gauss-Newton / IMC steps carries the same term: rho.rho is the loss.
    rho, _ = estimator.residuals(table, state, [flat_target()])
    assert float((rho @ rho).detach()) == pytest.approx(loss, rel=1e-10)
    assert rho.shape == (GRID["n_bins"] + 1,)


def test_energy_term_needs_target_energy_and_valid_weight(lj_samples):
    state, snapshots = lj_samples  # no target energy
    with pytest.raises(ValueError, match="no target energy"):
        ReweightingEstimator(**GRID, energy_weight=1.0)(lj_table(), state, snapshots, [flat_target()])
    with pytest.raises(ValueError, match="no target energy"):
        RolloutEstimator(**ROLLOUT, energy_weight=1.0)(lj_table(), state, snapshots, [flat_target()])
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="energy_weight"):
            ReweightingEstimator(**GRID, energy_weight=bad)
        with pytest.raises(ValueError, match="energy_weight"):
            RolloutEstimator(**ROLLOUT, energy_weight=bad)
    with pytest.raises(ValueError, match="energy must be finite"):
        with_energy(state, float("nan"))


def test_rollout_energy_gradient_matches_finite_differences_and_adjoint(lj_samples):
    from openmm_diffsim.energy import potential_energy

    state, snapshots = lj_samples
    state = with_energy(state, -4.0)
    targets = [flat_target(1.0)]

    def run(table, adjoint=False):
        return RolloutEstimator(**ROLLOUT, adjoint=adjoint, energy_weight=0.5, pressure_weight=1e-6)(
            table, state, snapshots, targets
        )

    table = switched_lj_table()
    result = run(table)
    assert not result.diagnostics["rejected"], result.diagnostics["reason"]
    box = torch.as_tensor(snapshots.boxes[0])
    species = torch.zeros(108, dtype=torch.long)
    frames = reference_rollout_frames(state, snapshots)
    with torch.no_grad():
        expected = np.mean([float(potential_energy(table, x, box, species)) / 108 for frame in frames for x in frame])
        expected_p = torch.stack(
            [virial_pressure(table, frame, box, [0] * 108, temperature=TEMPERATURE).mean() for frame in frames]
        ).mean()
    assert result.diagnostics["energy"] == pytest.approx(expected, rel=1e-10)
    assert result.diagnostics["pressure"] == pytest.approx(float(expected_p), rel=1e-10)
    grads = {name: float(getattr(table.pair_potentials[0], name).grad) for name in ("sigma", "epsilon")}
    adjoint_table = switched_lj_table()
    run(adjoint_table, adjoint=True)
    for name in grads:
        assert float(getattr(adjoint_table.pair_potentials[0], name).grad) == pytest.approx(grads[name], rel=1e-6)
    assert_matches_central_differences(run, grads)


def test_rollout_score_correction_adds_the_boltzmann_part_and_meets_reweighting_at_zero_length(lj_samples):
    """With the snapshots' own θ-dependence, a vanishing rollout's gradient is the reweighting gradient."""
    state, snapshots = lj_samples
    state = with_energy(state, -4.0)
    targets = [flat_target(1.1)]
    n = len(snapshots.positions)
    terms = dict(pressure_weight=1e-6, energy_weight=0.5)
    # One NVE step of 1e-5 ps: the frame is the snapshot to ~1e-6 nm.
    short = dict(n_steps=1, record_every=1, timestep=1e-5, n_replicas=n, seed=1, integrator="nve", **GRID, **terms)

    def gradient(estimator):
        table = lj_table(0.335, 1.05)
        result = estimator(table, state, snapshots, targets)
        assert not result.diagnostics["rejected"], result.diagnostics["reason"]
        return torch.stack([p.grad.double() for p in table.parameters()]), result

    plain, plain_result = gradient(RolloutEstimator(**short))
    corrected, result = gradient(RolloutEstimator(**short, score_correction=True))
    # The rollout part is unchanged (same replicas and steps); the score part is added to it.
    assert result.diagnostics["pathwise_grad_norm"] == pytest.approx(float(plain.norm()), rel=1e-9)
    assert result.loss == pytest.approx(plain_result.loss, rel=1e-9)
    score = corrected - plain
    assert float(score.norm()) == pytest.approx(result.diagnostics["score_grad_norm"], rel=1e-9)
    # Reweighting differentiates the same loss on the same snapshots: its
    # explicit part is the rollout's, its covariance (normalised by n, not n - 1) the score's.
    reweighted, _ = gradient(ReweightingEstimator(**GRID, **terms, energy_method="exact"))
    torch.testing.assert_close(plain + score * (n - 1) / n, reweighted, rtol=1e-3, atol=1e-9)
    assert float(score.norm()) > 0.5 * float(reweighted.norm())  # the score is not a small correction here
    with pytest.raises(ValueError, match="n_replicas >= 2"):
        RolloutEstimator(n_replicas=1, score_correction=True)
    # Fewer snapshots than two replicas need: a clear error, not a 0/0 covariance.
    with pytest.raises(ValueError, match="at least 2 snapshots"):
        RolloutEstimator(**short, score_correction=True)(lj_table(), state, snapshots[:1], targets)
    with pytest.raises(TypeError, match="score_correction"):
        RolloutEstimator(score_correction="yes")
