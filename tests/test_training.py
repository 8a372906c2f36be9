"""Trainer: loop, rollback on blow-ups, atomic checkpoints, resume, initial guess."""

import functools
import json
import math

import numpy as np
import pytest
import torch

import openmm_diffsim as od
from openmm_diffsim.sampling import SamplingError
from openmm_diffsim.systems import StatePoint
from openmm_diffsim.targets import Target
from openmm_diffsim.training import Trainer, TrainingError, boltzmann_inversion, fit_table_to_curve

SIGMA, EPSILON, MASS = 0.34, 0.996, 39.948
N = 64
CUTOFF = 0.75


def lj_rdf_target():
    """A cheap, smooth LJ-like target: dilute-gas g(r) = exp(-u/kT) of the true potential."""
    r = np.linspace(0.005, 0.745, 75)
    kT = 0.0083144626 * 150.0
    table = od.PairTable(["Ar"], od.LennardJones(SIGMA, EPSILON), cutoff=CUTOFF, cutoff_mode="shift")
    u, _ = table.evaluate(np.maximum(r, 0.2))
    return Target(r, np.exp(-u / kT), pair=("Ar", "Ar"), state="gas")


@functools.lru_cache(maxsize=1)
def simulated_lj_target():
    """RDF of the true LJ potential at the small state (simulated once per session)."""
    from openmm_diffsim.sampling import reference_rdfs

    r, g, _ = reference_rdfs(
        small_state(),
        "lj-native",
        sigma=SIGMA,
        epsilon=EPSILON,
        cutoff=CUTOFF,
        n_snapshots=400,
        interval=20,
        equilibration=2000,
        r_range=(0.0, 0.75),
        n_bins=75,
        smearing=0.01,
        seed=11,
    )
    return Target(r, g[0], pair=("Ar", "Ar"), state="gas")


def small_state(target=None):
    targets = [target if target is not None else lj_rdf_target()]
    return StatePoint(
        name="gas",
        species=["Ar"],
        counts=[N],
        masses=[MASS],
        temperature=150.0,
        box=[1.6, 1.6, 1.6],
        targets=targets,
    )


def model_table(sigma=0.32):
    return od.PairTable(["Ar"], od.LennardJones(sigma, EPSILON), cutoff=CUTOFF, cutoff_mode="shift")


def quick_trainer(tmp_path=None, table=None, state=None, **overrides):
    options = dict(
        learning_rate=0.01,
        learning_rate_scales={"sigma": 0.2},
        max_epochs=3,
        n_snapshots=6,
        snapshot_interval=10,
        equilibration_steps=50,
        estimator_options=dict(r_range=(0.0, 0.75), n_bins=75, smearing=0.01),
        progress=False,
        plot_every=0,
        seed=3,
    )
    options.update(overrides)
    table = model_table() if table is None else table
    state = small_state() if state is None else state
    return Trainer(table, [state], "reweighting", output_dir=tmp_path, **options)


def test_fit_runs_logs_and_checkpoints(tmp_path):
    trainer = quick_trainer(tmp_path)
    history = trainer.fit()
    assert len(history) == 3
    assert all(np.isfinite(h["loss"]) for h in history)
    assert trainer.md_steps > 0
    lines = (tmp_path / "log.jsonl").read_text().strip().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1, 2]
    assert (tmp_path / "checkpoint.pt").exists()
    assert (tmp_path / "plots" / "loss.png").stat().st_size > 1000
    # The parameter moved (the gradient reached the optimiser).
    assert trainer.table.pair_potentials[0].sigma.item() != pytest.approx(0.32, abs=1e-9)


def test_resume_continues_from_checkpoint(tmp_path):
    trainer = quick_trainer(tmp_path, max_epochs=2)
    trainer.fit()
    sigma_saved = trainer.table.pair_potentials[0].sigma.item()
    resumed = Trainer.resume(tmp_path, max_epochs=4)
    assert resumed.epoch == 2
    assert resumed.table.pair_potentials[0].sigma.item() == sigma_saved
    assert len(resumed.history) == 2
    resumed.fit()
    assert resumed.epoch == 4
    lines = (tmp_path / "log.jsonl").read_text().strip().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1, 2, 3]
    assert resumed.md_steps > trainer.md_steps


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    trainer = quick_trainer(tmp_path, max_epochs=1)
    trainer.fit()
    before = (tmp_path / "checkpoint.pt").read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint()
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    monkeypatch.undo()
    Trainer.resume(tmp_path)  # still loads


def test_sampling_blow_up_is_rolled_back(tmp_path, monkeypatch):
    from openmm_diffsim import sampling

    trainer = quick_trainer(tmp_path, max_epochs=2)
    original_run = sampling.Sampler.run
    calls = {"n": 0}

    def failing_run(self, n_snapshots, interval):
        calls["n"] += 1
        if calls["n"] == 2:
            raise SamplingError(self.state.name, 123, "energy is NaN")
        return original_run(self, n_snapshots, interval)

    monkeypatch.setattr(sampling.Sampler, "run", failing_run)
    # Force a fresh sample every epoch so the second epoch hits the failure.
    monkeypatch.setattr(trainer.reweighting["gas"], "n_eff_threshold", 1.01)
    history = trainer.fit()
    events = [e for h in history for e in h["events"]]
    assert len(events) == 1 and events[0]["event"] == "rollback"
    assert "energy is NaN" in events[0]["reason"]
    assert trainer.learning_rate == pytest.approx(0.005)
    assert len(history) == 2


def test_repeated_failures_raise(tmp_path, monkeypatch):
    from openmm_diffsim import sampling

    trainer = quick_trainer(tmp_path, max_epochs=2, max_retries=2)

    def always_fail(self, n_snapshots, interval):
        raise SamplingError(self.state.name, 7, "temperature exploded")

    monkeypatch.setattr(sampling.Sampler, "run", always_fail)
    with pytest.raises(TrainingError, match="temperature exploded"):
        trainer.fit()


def test_nonfinite_gradient_never_reaches_parameters(tmp_path, monkeypatch):
    trainer = quick_trainer(tmp_path, max_epochs=1, max_retries=1)
    estimator = trainer.reweighting["gas"]
    original = type(estimator).__call__

    def poisoned(self, table, *args, **kwargs):
        result = original(self, table, *args, **kwargs)
        for p in table.parameters():
            if p.grad is not None:
                p.grad.fill_(float("nan"))
        return result

    monkeypatch.setattr(type(estimator), "__call__", poisoned)
    sigma_before = trainer.table.pair_potentials[0].sigma.item()
    with pytest.raises(TrainingError, match="non-finite"):
        trainer.fit()
    assert trainer.table.pair_potentials[0].sigma.item() == sigma_before


def test_bad_inputs_name_the_problem():
    state = small_state()
    with pytest.raises(ValueError, match="estimator must be one of"):
        Trainer(model_table(), [state], "newton")
    with pytest.raises(ValueError, match="no targets"):
        Trainer(model_table(), [StatePoint("x", ["Ar"], [N], [MASS], 150.0, box=[1.6] * 3)])
    wrong = Target(np.linspace(0.01, 0.7, 20), np.ones(20), pair=("Ne", "Ne"))
    with pytest.raises(ValueError, match="Ne"):
        Trainer(model_table(), [small_state(wrong)])
    with pytest.raises(ValueError, match="learning_rate_scales"):
        Trainer(model_table(), [state], learning_rate_scales={"nonexistent": 2.0})
    with pytest.raises(ValueError, match="unknown estimator option"):
        Trainer(model_table(), [state], estimator_options={"bins": 10})
    with pytest.raises(ValueError, match="unique"):
        Trainer(model_table(), [state, small_state()])


def test_boltzmann_inversion_recovers_dilute_potential():
    # Dilute gas: g = exp(-u/kT), so -kT ln g is u itself.
    target = lj_rdf_target()
    kT = 0.0083144626 * 150.0
    r, u = boltzmann_inversion(target.r, target.g, kT, g_min=1e-3)
    table = od.PairTable(
        ["Ar"],
        od.CubicSpline(np.linspace(0.3, 0.75, 25), np.zeros(25)),
        cutoff=CUTOFF,
        cutoff_mode="shift",
    )
    keep = r > 0.31
    rms = fit_table_to_curve(table, ("Ar", "Ar"), r[keep], u[keep] - u[keep][-1])
    assert rms < 0.02 * kT
    truth, _ = model_table(SIGMA).evaluate(r[keep])
    model, _ = table.evaluate(r[keep])
    assert np.max(np.abs(model - truth)) < 0.05 * kT


@pytest.mark.slow
def test_reweighting_training_recovers_sigma(tmp_path):
    target = simulated_lj_target()
    trainer = Trainer(
        model_table(0.32),
        [small_state(target)],
        "reweighting",
        output_dir=tmp_path,
        learning_rate=0.01,
        learning_rate_scales={"sigma": 0.1},
        max_epochs=40,
        n_snapshots=40,
        snapshot_interval=20,
        equilibration_steps=500,
        estimator_options=dict(r_range=(0.0, 0.75), n_bins=75, smearing=0.01),
        progress=False,
        plot_every=0,
        seed=5,
    )
    trainer.fit()
    sigma = trainer.table.pair_potentials[0].sigma.item()
    assert abs(sigma - SIGMA) < 0.01  # started 0.02 away; sampling noise of 64 particles
    assert trainer.history[-1]["loss"] < 0.2 * trainer.history[0]["loss"]


def test_gauss_newton_steps_reduce_the_reweighted_loss(tmp_path):
    trainer = quick_trainer(tmp_path, optimizer="gauss-newton", max_epochs=3, n_snapshots=12)
    history = trainer.fit()
    steps = [h["gauss_newton"] for h in history]
    assert all(s["reweighted_loss_after"] <= s["reweighted_loss_before"] for s in steps)
    assert any(s["accepted"] for s in steps)
    accepted = [s for s in steps if s["accepted"]]
    assert all(s["reweighted_loss_after"] < s["reweighted_loss_before"] for s in accepted)
    with pytest.raises(ValueError, match="gauss-newton"):
        Trainer(model_table(), [small_state()], "rollout", optimizer="gauss-newton")


def test_imc_takes_capped_newton_steps_from_fresh_samples(tmp_path):
    limit = 0.05
    trainer = quick_trainer(tmp_path, optimizer="imc", max_epochs=3, n_snapshots=12, max_potential_change=limit)
    state = trainer.states[0]
    target = state.targets[0]
    r = np.asarray(target.r)
    r = r[(np.asarray(target.g) > 0.05) & (r < CUTOFF)]
    changes = []

    def record_change(t, record):
        u_now = t.table.evaluate(r)[0] / state.kT
        if changes or hasattr(record_change, "u"):
            changes.append(np.abs(u_now - record_change.u).max())
        record_change.u = u_now

    record_change.u = trainer.table.evaluate(r)[0] / state.kT
    trainer.callbacks.append(record_change)
    history = trainer.fit()
    steps = [h["imc"] for h in history]
    # Every epoch samples afresh, and the step is capped in u(r) as measured independently.
    assert all(all(h["resampled"].values()) for h in history)
    # Every fresh sample after a hand-over discards the re-equilibration steps.
    options = trainer.options
    expected = options["equilibration_steps"] + 3 * options["n_snapshots"] * options["snapshot_interval"]
    assert trainer.md_steps == expected + 2 * options["reequilibration_steps"]
    assert all(s["max_change_kT"] <= limit + 1e-9 for s in steps)
    assert max(changes) <= limit + 1e-6
    assert max(changes) > 0.5 * limit  # far from the target the cap binds
    # Each fresh sample sees a smaller RDF error than the one before.
    losses = [s["loss_before"] for s in steps]
    assert losses[2] < losses[1] < losses[0]
    with pytest.raises(ValueError, match="imc"):
        Trainer(model_table(), [small_state()], "rollout", optimizer="imc")
    with pytest.raises(ValueError, match="max_potential_change"):
        quick_trainer(optimizer="imc", max_potential_change=0.0)


def test_a_rolled_back_imc_step_retries_with_a_smaller_cap(tmp_path):
    trainer = quick_trainer(tmp_path, optimizer="imc", max_epochs=2, n_snapshots=12, max_potential_change=0.05)
    calls = []
    original = trainer._epoch

    def failing_once():
        if not calls:
            calls.append("failed")
            raise SamplingError("gas", 7, "exploding (injected)")
        return original()

    trainer._epoch = failing_once
    history = trainer.fit()
    assert history[0]["events"] and "injected" in history[0]["events"][0]["reason"]
    # The learning rate was halved, and the IMC cap with it.
    assert all(h["imc"]["max_change_kT"] <= 0.025 + 1e-9 for h in history)
    assert max(h["imc"]["max_change_kT"] for h in history) > 0.02


def test_average_last_returns_the_mean_of_the_last_iterates(tmp_path):
    trainer = quick_trainer(tmp_path, max_epochs=4, average_last=3)
    iterates = []
    trainer.callbacks.append(
        lambda t, record: iterates.append(np.array([p.item() for p in t.table.parameters() if p.requires_grad]))
    )
    trainer.fit()
    final = np.array([p.item() for p in trainer.table.parameters() if p.requires_grad])
    np.testing.assert_allclose(final, np.mean(iterates[-3:], axis=0), rtol=1e-12)
    assert not np.allclose(final, iterates[-1])
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert len(saved["recent_parameters"]) == 3
    assert saved["table"].pair_potentials[0].sigma.item() == pytest.approx(final[0], rel=1e-12)


@pytest.mark.slow
def test_gauss_newton_recovers_sigma(tmp_path):
    target = simulated_lj_target()
    table = model_table(0.32)
    # With epsilon free too, sigma and epsilon trade off along a shallow valley
    # at this state and noisy steps wander along it; sigma alone is well posed.
    table.pair_potentials[0].epsilon.requires_grad_(False)
    trainer = Trainer(
        table,
        [small_state(target)],
        "reweighting",
        optimizer="gauss-newton",
        max_epochs=20,
        n_snapshots=40,
        snapshot_interval=20,
        equilibration_steps=500,
        estimator_options=dict(r_range=(0.0, 0.75), n_bins=75, smearing=0.01),
        progress=False,
        plot_every=0,
        seed=5,
        callbacks=[lambda t, record: sigmas.append(t.table.pair_potentials[0].sigma.item())],
    )
    sigmas = []
    trainer.fit()
    # Each step fits 40 frames of 64 particles: average the last iterates over
    # that noise (it starts 0.02 nm away).
    assert abs(np.mean(sigmas[-8:]) - SIGMA) < 0.005
    assert trainer.history[-1]["loss"] < 0.3 * trainer.history[0]["loss"]


@pytest.mark.parametrize("estimator", ["rollout", "adjoint", "hybrid"])
def test_rollout_family_estimators_train_through_the_trainer(tmp_path, estimator):
    options = dict(r_range=(0.0, 0.75), n_bins=75, smearing=0.01, n_steps=10, record_every=5, n_replicas=2)
    trainer = Trainer(
        model_table(),
        [small_state()],
        estimator,
        output_dir=tmp_path,
        learning_rate=0.01,
        learning_rate_scales={"sigma": 0.2},
        max_epochs=2,
        n_snapshots=4,
        snapshot_interval=10,
        equilibration_steps=50,
        estimator_options=options,
        progress=False,
        plot_every=0,
        seed=2,
    )
    history = trainer.fit()
    assert len(history) == 2 and all(np.isfinite(h["loss"]) for h in history)
    assert trainer.rollout_steps >= 10
    assert trainer.table.pair_potentials[0].sigma.item() != pytest.approx(0.32, abs=1e-9)


def test_resampling_one_state_keeps_the_other_states_gradient(tmp_path, monkeypatch):
    """A discarded estimate (too few effective samples) must not wipe earlier states' gradients."""
    second = small_state()
    second.name = "gas-2"
    trainer = Trainer(
        model_table(),
        [small_state(), second],
        "reweighting",
        output_dir=tmp_path,
        max_epochs=2,
        n_snapshots=6,
        snapshot_interval=10,
        equilibration_steps=50,
        progress=False,
        plot_every=0,
        estimator_options=dict(r_range=(0.0, 0.75), n_bins=75, smearing=0.01),
        seed=3,
    )
    sigma = trainer.table.pair_potentials[0].sigma
    estimator_type = type(trainer.reweighting["gas"])
    original = estimator_type.__call__
    log = []  # (state, call number, grad of sigma before, after)

    def spy(self, table, state, *args, **kwargs):
        before = None if sigma.grad is None else sigma.grad.clone()
        result = original(self, table, state, *args, **kwargs)
        log.append((state.name, before, sigma.grad.clone()))
        if state.name == "gas-2" and trainer.epoch == 1 and sum(1 for e in log if e[0] == "gas-2") == 2:
            result.diagnostics["needs_resample"] = True  # pretend its snapshots are used up
        return result

    monkeypatch.setattr(estimator_type, "__call__", spy)
    seen = []
    monkeypatch.setattr(trainer.optimizer, "step", lambda: seen.append(sigma.grad.clone()))
    trainer.fit()
    epoch2 = log[-3:]  # gas, gas-2 (discarded), gas-2 (fresh snapshots)
    assert [e[0] for e in epoch2] == ["gas", "gas-2", "gas-2"]
    first = epoch2[0][2]
    fresh_contribution = epoch2[2][2] - epoch2[2][1]
    assert float(first.abs()) > 0
    torch.testing.assert_close(epoch2[2][1], first)  # state 1's gradient survived the discard
    torch.testing.assert_close(seen[-1], first + fresh_contribution)


def prior_plus_spline(knots):
    prior = od.SoftSphere(0.32, 1.0, 12)
    prior.requires_grad_(False)
    return od.PairTable(
        ["Ar"],
        od.PotentialSum([prior, od.CubicSpline(knots, np.zeros_like(knots))]),
        cutoff=CUTOFF,
        cutoff_mode="shift",
    )


def test_gauss_newton_refuses_a_step_that_digs_a_well_into_the_core(tmp_path):
    knots = np.linspace(0.29, 0.74, 16)
    table = prior_plus_spline(knots)
    trainer = Trainer(table, [small_state()], "reweighting", optimizer="gauss-newton", progress=False)
    push = torch.zeros(len(knots), dtype=torch.float64)
    push[0] = 200.0  # lowers the first knot by ~200 kJ/mol: a well below r_wall
    trainer._residual_jacobian = lambda: (torch.eye(len(knots), dtype=torch.float64), push, 1.0)
    # Every trial "improves" the loss with plenty of N_eff: only the core check can refuse it.
    trainer._residuals = lambda: (torch.zeros(1, dtype=torch.float64), 1.0)
    trainer.reweighting = {"gas": type("E", (), {"n_eff_threshold": 0.5})()}
    step = trainer._gauss_newton_step()
    spline = table.pair_potentials[0].terms[1]
    assert step["accepted"]  # a damped (shorter) trial passed
    assert float(spline.values[0].detach()) < 0.0
    assert not trainer._has_core_hole(trainer._wall_grids())
    # With the check bypassed the first (least damped) trial would have been taken, well and all.
    unguarded = Trainer(
        prior_plus_spline(knots), [small_state()], "reweighting", optimizer="gauss-newton", progress=False
    )
    unguarded._residual_jacobian, unguarded._residuals = trainer._residual_jacobian, trainer._residuals
    unguarded.reweighting = trainer.reweighting
    unguarded._has_core_hole = lambda grids: False
    unguarded._gauss_newton_step()
    assert Trainer._has_core_hole(unguarded, unguarded._wall_grids())


def test_imc_step_never_digs_a_well_into_the_excluded_core(tmp_path):
    """A Newton step that would bend the spline into a well where g(r) = 0 is shortened until it does not."""
    knots = np.linspace(0.29, 0.74, 16)
    table = prior_plus_spline(knots)
    trainer = Trainer(
        table,
        [small_state()],
        "reweighting",
        optimizer="imc",
        max_potential_change=1e3,  # the cap does not bind: only the core check can shorten the step
        imc_damping=1e-9,
        progress=False,
        output_dir=tmp_path,
    )
    walls = trainer._wall_grids()
    assert len(walls) == 1 and 0.25 < walls[0][1][-1] < 0.32
    assert not trainer._has_core_hole(walls)
    # A step that lowers the first knot by 200 kJ/mol (the spline then continues inward with a rising slope).
    push = torch.zeros(len(knots), dtype=torch.float64)
    push[0] = 200.0
    trainer._residual_jacobian = lambda: (torch.eye(len(knots), dtype=torch.float64), push, 1.0)
    spline = table.pair_potentials[0].terms[1]
    with torch.no_grad():
        spline.values[0] -= 200.0
    assert trainer._has_core_hole(walls)  # the full step would leave a well below r_wall
    with torch.no_grad():
        spline.values[0] += 200.0
    step = trainer._imc_step()
    assert step["core_hole_shrinks"] > 0
    assert 0 < step["step_scale"] < 1
    assert float(spline.values[0].detach()) < -1.0  # the knot still moved, part of the way
    assert not trainer._has_core_hole(walls)
    r = np.linspace(0.5 * walls[0][1][-1], walls[0][1][-1], 200)
    u, _ = table.evaluate(r)
    assert u.min() >= u[-1] - 1e-6


def _pair_energies(table, snapshots):
    from openmm_diffsim.energy import potential_energy

    species = torch.zeros(np.asarray(snapshots.positions).shape[1], dtype=torch.long)
    return np.array(
        [
            float(potential_energy(table, torch.as_tensor(x), torch.as_tensor(box), species))
            for x, box in zip(np.asarray(snapshots.positions), np.asarray(snapshots.boxes), strict=True)
        ]
    )


def test_fisher_metric_is_the_covariance_of_energy_derivatives_by_finite_differences():
    from openmm_diffsim.gradients import fisher_metric
    from openmm_diffsim.sampling import Sampler

    state = small_state()
    table = model_table(0.33)
    sampler = Sampler(state, table, seed=4)
    sampler.minimize()
    sampler.equilibrate(200)
    snapshots = sampler.run(20, 20)
    metric = fisher_metric(table, state, snapshots)
    assert metric.shape == (2, 2)
    # Independent: ∂U/∂θ per snapshot by central differences of the exact pair energies.
    lj = table.pair_potentials[0]
    derivatives = []
    for param in (lj.sigma, lj.epsilon):
        h = 1e-6 * float(param.detach())
        with torch.no_grad():
            param += h
            up = _pair_energies(table, snapshots)
            param -= 2 * h
            down = _pair_energies(table, snapshots)
            param += h
        derivatives.append((up - down) / (2 * h))
    d = np.array(derivatives).T
    expected = state.beta**2 * np.cov(d, rowvar=False)
    np.testing.assert_allclose(metric.numpy(), expected, rtol=1e-4)
    assert np.all(np.linalg.eigvalsh(metric.numpy()) > 0)
    with pytest.raises(ValueError, match="two snapshots"):
        fisher_metric(table, state, snapshots[:1])


def test_natural_step_solves_the_damped_fisher_system_and_moves_u_by_the_learning_rate(tmp_path):
    from openmm_diffsim.gradients import fisher_metric

    step_kT = 0.04
    trainer = quick_trainer(tmp_path, optimizer="natural", learning_rate=step_kT, n_snapshots=16, imc_damping=0.1)
    state = trainer.states[0]
    trainer._initialise()
    trainer._state_gradient(state, fresh_needed=True)
    params = trainer._trainable()
    grad = torch.cat([p.grad.reshape(-1) for p in params]).double()
    before = torch.cat([p.detach().reshape(-1) for p in params]).clone()
    metric = fisher_metric(trainer.table, state, trainer.snapshots[state.name])
    expected = -torch.linalg.solve(metric + 0.1 * torch.diag(torch.diagonal(metric)), grad)
    r = np.asarray(state.targets[0].r)
    r = r[(np.asarray(state.targets[0].g) > 0.05) & (r < CUTOFF)]
    u0 = trainer.table.evaluate(r)[0] / state.kT
    info = trainer._natural_step(1.0)
    moved = torch.cat([p.detach().reshape(-1) for p in params]) - before
    cosine = float(moved @ expected / (moved.norm() * expected.norm()))
    assert cosine > 1 - 1e-9
    measured = np.abs(trainer.table.evaluate(r)[0] / state.kT - u0).max()
    # u is not linear in σ: rescaling a unit step to the learning rate lands within 1 %, never above it.
    assert measured == pytest.approx(step_kT, rel=1e-2) and measured <= step_kT * (1 + 1e-6)
    assert info["max_change_kT"] == pytest.approx(measured, rel=1e-9)


def test_rollouts_with_natural_steps_recover_sigma(tmp_path):
    """The rollout family with Fisher-preconditioned steps walks σ from 0.32 to 0.34 nm."""
    table = model_table(0.32)
    table.pair_potentials[0].epsilon.requires_grad_(False)  # see test_gauss_newton_recovers_sigma
    sigmas = []
    trainer = Trainer(
        table,
        [small_state(simulated_lj_target())],
        "rollout",
        optimizer="natural",
        learning_rate=1.0,
        max_epochs=6,
        n_snapshots=16,
        snapshot_interval=20,
        equilibration_steps=300,
        estimator_options=dict(
            r_range=(0.0, 0.75), n_bins=75, smearing=0.01, n_steps=50, record_every=10, n_replicas=4
        ),
        output_dir=tmp_path,
        progress=False,
        plot_every=0,
        seed=5,
        callbacks=[lambda t, record: sigmas.append(t.table.pair_potentials[0].sigma.item())],
    )
    history = trainer.fit()
    steps = [h["natural"] for h in history]
    # The first step is scaled to the learning rate (shortened if u, not linear in σ, then moves more).
    assert steps[0]["adapted"] == "first" and 0.5 < steps[0]["max_change_kT"] <= 1.0 + 1e-6
    assert all(s["max_change_kT"] <= s["fraction"] * (1.0 + 1e-6) for s in steps)
    # The step fraction grows after a step that lowered the loss and halves after one that raised it.
    for k in range(1, len(steps)):
        rose = history[k]["loss"] > history[k - 1]["loss"]
        assert steps[k]["adapted"] == ("halved" if rose else "grown")
    # The first steps walk σ towards the truth; six of them cover the 0.02 nm to within 15 %.
    assert 0.32 < sigmas[0] < sigmas[1] < sigmas[2] < SIGMA + 0.002, sigmas
    # The last iterates scatter by ~0.003 nm around the truth: judge their mean (as average_last would).
    assert abs(np.mean(sigmas[-3:]) - SIGMA) < 0.003, sigmas
    assert history[-1]["loss"] < 0.3 * history[0]["loss"]
    assert trainer.rollout_steps == 6 * 50
    # The step fraction and the last loss survive a checkpoint, so a resumed run takes the same next step.
    resumed = Trainer.resume(tmp_path)
    assert resumed._natural_fraction == trainer._natural_fraction == steps[-1]["fraction"]
    assert resumed._natural_last_loss == history[-1]["loss"]


def test_imc_smoothing_penalises_the_curvature_of_a_step_not_smooth_ramps():
    knots = np.linspace(0.29, 0.74, 16)
    table = prior_plus_spline(knots)
    state = small_state()
    trainer = Trainer(table, [state], "reweighting", optimizer="imc", imc_smoothing=0.1, progress=False)
    curvature = trainer._curvature_matrix()
    assert curvature.shape == (16, 16)
    torch.testing.assert_close(curvature, curvature.T)
    # Independently: the squared second differences of δu/kT on the target grid
    # from the wall (first g > 1e-3) to the cutoff, refined twofold (knots
    # alternating at the bins' spacing nearly vanish at the bin centres), with
    # δu from moving the knots.
    target = state.targets[0]
    r = np.asarray(target.r)
    r_grid = r[np.nonzero(np.asarray(target.g) > 1e-3)[0][0] - 3 :]  # three points into the core
    r_grid = r_grid[r_grid < CUTOFF]
    r_grid = np.linspace(r_grid[0], r_grid[-1], 2 * (r_grid.size - 1) + 1)
    spline = table.pair_potentials[0].terms[1]
    u0 = table.evaluate(r_grid)[0]

    def penalty_by_hand(step):
        with torch.no_grad():
            spline.values += step
        du = (table.evaluate(r_grid)[0] - u0) / state.kT
        with torch.no_grad():
            spline.values -= step
        return float(np.sum(np.diff(du, 2) ** 2))

    ramp = torch.tensor(0.3 + 2.0 * knots)  # knot values linear in r: u changes by a straight line
    wiggle = torch.tensor((-1.0) ** np.arange(16))
    for step in (ramp, wiggle, torch.linspace(-1.0, 2.0, 16, dtype=torch.float64) ** 2):
        assert float(step @ curvature @ step) == pytest.approx(penalty_by_hand(step), rel=1e-6, abs=1e-12)
    assert float(ramp @ curvature @ ramp) < 1e-10 * float(wiggle @ curvature @ wiggle)
    # Knots at the bin edges, alternating: the spline nearly vanishes at the bin
    # centres, so on them alone this step cost 0.14 x the trace of the matrix;
    # between them it is seen (3.0 x).
    fine = Trainer(prior_plus_spline(np.arange(0.27, 0.7401, 0.01)), [state], "reweighting", optimizer="imc")
    n_fine = sum(p.numel() for p in fine._trainable())
    alternating = torch.tensor((-1.0) ** np.arange(n_fine), dtype=torch.float64)
    fine_curvature = fine._curvature_matrix()
    assert float(alternating @ fine_curvature @ alternating) > 2.0 * float(torch.trace(fine_curvature))
    # The penalty is scaled to the curvature of the loss (trace) by imc_smoothing.
    jtj = torch.diag(torch.linspace(1.0, 5.0, 16, dtype=torch.float64))
    penalty = trainer._smoothing_penalty(jtj)
    assert float(torch.trace(penalty)) == pytest.approx(0.1 * float(torch.trace(jtj)))
    unsmoothed = Trainer(prior_plus_spline(knots), [state], "reweighting", optimizer="imc", progress=False)
    assert unsmoothed._smoothing_penalty(jtj) is None
    with pytest.raises(ValueError, match="imc_smoothing"):
        Trainer(prior_plus_spline(knots), [state], "reweighting", optimizer="imc", imc_smoothing=-1.0)


def test_imc_roughness_smooths_the_correction_where_the_data_are_blind_and_leaves_the_prior_free():
    from openmm_diffsim.training import _damped_solve

    knots = np.arange(0.29, 0.705, 0.01)
    table = prior_plus_spline(knots)
    prior, spline = table.pair_potentials[0].terms
    prior.sigma.requires_grad_(True)  # trainable, as in the demo: the prior may carry the wall
    state = small_state()
    trainer = Trainer(table, [state], "reweighting", optimizer="imc", imc_roughness=0.01, progress=False)
    target = state.targets[0]
    r = np.asarray(target.r)
    r_grid = r[np.nonzero(np.asarray(target.g) > 1e-3)[0][0] - 3 :]  # three points into the core, as the smoothing
    r_grid = r_grid[r_grid < CUTOFF]
    centres = r_grid[(r_grid > knots[0] + 0.05) & (r_grid < knots[-1] - 0.05)]
    r_grid = np.linspace(r_grid[0], r_grid[-1], 2 * r_grid.size - 1)  # refined twofold
    with torch.no_grad():
        spline.values.copy_(torch.as_tensor(0.5 + 2.0 * knots + 0.1 * (-1.0) ** np.arange(knots.size)))

    def fourth_differences(r_points):
        return np.diff(spline.energy_and_derivative(torch.as_tensor(r_points))[0].detach().numpy() / state.kT, 4)

    # The knots alternate by 0.1 kJ/mol: between them (on the bin centres) the
    # spline hardly shows it; on the twofold grid it does.
    assert np.abs(fourth_differences(centres)).max() < 0.01 < 0.2 < np.abs(fourth_differences(r_grid)).max()
    w_matrix, w = trainer._correction_roughness()
    # Independently: fourth differences of the spline term alone (not the prior) on the grid, in kT.
    by_hand = fourth_differences(r_grid)
    np.testing.assert_allclose(w.numpy(), by_hand, rtol=1e-9, atol=1e-10)
    # Its Jacobian: nothing for σ (the prior is free), and the spline's own (linear) response.
    assert w_matrix.shape == (by_hand.size, 1 + knots.size)
    assert float(w_matrix[:, 0].abs().max()) == 0.0
    for k in (0, 7, 20):
        with torch.no_grad():
            spline.values[k] += 1.0
        moved = trainer._correction_roughness()[1]
        with torch.no_grad():
            spline.values[k] -= 1.0
        np.testing.assert_allclose((moved - w).numpy(), w_matrix[:, 1 + k].numpy(), atol=1e-9)
    # A step whose data see only cubics in r (near the fourth differences' null
    # space) removes the alternation of the knots and keeps the straight line.
    visible = torch.zeros(4, 1 + knots.size, dtype=torch.float64)
    for power in range(4):
        visible[power, 1:] = torch.as_tensor((knots - knots.mean()) / np.ptp(knots)) ** power
    jtj = visible.T @ visible
    penalty, rhs, before = trainer._roughness_penalty(jtj, None, torch.zeros(1 + knots.size, dtype=torch.float64))
    assert before == pytest.approx(float(w @ w))
    assert float(torch.trace(penalty)) == pytest.approx(0.01 * float(torch.trace(jtj)))
    step = _damped_solve(jtj, rhs, 1e-9, penalty)
    assert abs(float(step[0])) < 1e-12
    with torch.no_grad():
        spline.values += step[1:]
    # What is left of the alternation is a smooth (cubic) remainder of its overlap with the visible cubics.
    change = spline.values.detach().numpy() - (0.5 + 2.0 * knots)
    assert np.abs(change).max() < 0.03
    assert np.abs(change - np.polyval(np.polyfit(knots, change, 3), knots)).max() < 2e-3
    assert float(trainer._correction_roughness()[1].norm()) < 1e-3 * float(w.norm())
    # Off by default; a negative weight is refused.
    assert Trainer(prior_plus_spline(knots), [state], "reweighting", optimizer="imc").options["imc_roughness"] == 0.0
    with pytest.raises(ValueError, match="imc_roughness"):
        Trainer(prior_plus_spline(knots), [state], "reweighting", optimizer="imc", imc_roughness=-0.1)


def test_imc_undoes_a_step_that_overshot_and_retakes_it_with_half_the_cap(tmp_path):
    trainer = quick_trainer(tmp_path, optimizer="imc", imc_reject_factor=2.0, max_potential_change=0.5)
    jtj = torch.eye(2, dtype=torch.float64)
    jtr = torch.tensor([-0.01, 0.005], dtype=torch.float64)  # sigma +0.01 nm: the cap sets the length
    losses = iter([1.0, 5.0, 0.9])
    trainer._residual_jacobian = lambda: (jtj, jtr, next(losses))
    trainer._loss_noise = lambda: 0.0
    start = trainer._flat_parameters()
    first = trainer._imc_step()
    after_first = trainer._flat_parameters()
    assert not first["undone"] and first["cap_kT"] == pytest.approx(0.5)
    assert 0.3 < first["max_change_kT"] <= 0.5 * (1 + 1e-9)  # shortened to the cap (u is not linear in σ)
    # The fresh sample's loss is 5x the last one: back to the start, the same step, half as long.
    second = trainer._imc_step()
    assert second["undone"] and second["cap_kT"] == pytest.approx(0.5 * first["max_change_kT"])
    assert 0.6 * second["cap_kT"] < second["max_change_kT"] <= second["cap_kT"] * (1 + 1e-9)
    retaken = trainer._flat_parameters() - start
    taken = after_first - start
    assert float(retaken @ taken / (retaken.norm() * taken.norm())) > 0.999
    assert float(retaken.norm()) < 0.7 * float(taken.norm())
    # A kept step lets the cap grow back by 1.5x.
    third = trainer._imc_step()
    assert not third["undone"] and third["cap_kT"] == pytest.approx(1.5 * second["cap_kT"])
    # The state to undo the last step survives a checkpoint.
    trainer.save_checkpoint()
    resumed = Trainer.resume(tmp_path)
    assert resumed._imc_last["loss"] == 0.9 and resumed._imc_last["limit"] == pytest.approx(third["cap_kT"])
    assert resumed._imc_last["moved"] == pytest.approx(third["max_change_kT"])
    with pytest.raises(ValueError, match="imc_reject_factor"):
        quick_trainer(tmp_path, optimizer="imc", imc_reject_factor=1.0)


def test_imc_undo_restarts_sampling_from_the_configurations_the_step_was_computed_from(tmp_path):
    trainer = quick_trainer(tmp_path, optimizer="imc", imc_reject_factor=2.0, max_potential_change=0.5)
    jtj = torch.eye(2, dtype=torch.float64)
    jtr = torch.tensor([-0.01, 0.005], dtype=torch.float64)
    losses = iter([1.0, 5.0])
    trainer._residual_jacobian = lambda: (jtj, jtr, next(losses))
    trainer._loss_noise = lambda: 0.0

    def configuration(value):
        return {"positions": np.full((4, 3), value), "velocities": np.full((4, 3), -value), "box": np.eye(3)}

    class LiveSampler:
        def set_state(self, positions, velocities, box):
            self.state = (positions, velocities, box)

    name = trainer.states[0].name
    trainer._sampler_states = {name: configuration(1.0)}  # the sample the first step is computed from
    trainer._imc_step()
    # The next sample, drawn with the overshooting step, ended somewhere else.
    trainer._sampler_states = {name: configuration(2.0)}
    trainer.samplers[name] = live = LiveSampler()
    assert trainer._imc_step()["undone"]
    np.testing.assert_array_equal(trainer._sampler_states[name]["positions"], 1.0)
    np.testing.assert_array_equal(live.state[0], 1.0)
    np.testing.assert_array_equal(live.state[1], -1.0)


def test_imc_keeps_the_step_after_two_undos_and_takes_its_loss_as_the_reference(tmp_path):
    """A reference loss that samples at a quarter of the step still miss by the factor was an outlier."""
    trainer = quick_trainer(tmp_path, optimizer="imc", imc_reject_factor=2.0, max_potential_change=0.5)
    jtj = torch.eye(2, dtype=torch.float64)
    jtr = torch.tensor([-0.01, 0.005], dtype=torch.float64)
    # A lucky first sample (0.1), then the loss the parameters really have (~1).
    losses = iter([0.1, 1.0, 1.1, 0.9, 1.0, 5.0, 1.5])
    trainer._residual_jacobian = lambda: (jtj, jtr, next(losses))
    trainer._loss_noise = lambda: 0.0
    steps = [trainer._imc_step() for _ in range(7)]
    assert [s["undone"] for s in steps] == [False, True, True, False, False, True, False]
    assert [s["rebased"] for s in steps] == [False, False, False, True, False, False, False]
    assert steps[2]["cap_kT"] == pytest.approx(0.5 * steps[1]["max_change_kT"])
    # The kept step's loss (0.9) is the reference: 1.0 is within the factor, 5.0 is undone,
    # and 1.5 after one undo is kept on its merit, which resets the count.
    assert trainer._imc_last["undos"] == 0
    trainer.save_checkpoint()
    assert Trainer.resume(tmp_path)._imc_last["undos"] == 0


def test_imc_keeps_a_step_whose_loss_rose_only_as_far_as_sampling_noise_reaches(tmp_path):
    """A fresh loss above twice the last but below twice its own noise is scatter, not an overshoot."""
    trainer = quick_trainer(tmp_path, optimizer="imc", imc_reject_factor=2.0, max_potential_change=0.5)
    jtj = torch.eye(2, dtype=torch.float64)
    jtr = torch.tensor([-0.01, 0.005], dtype=torch.float64)
    losses = iter([0.3, 1.0, 1.3, 4.0])
    noises = iter([0.6, 0.6, 0.6])
    trainer._residual_jacobian = lambda: (jtj, jtr, next(losses))
    trainer._loss_noise = lambda: next(noises)
    steps = [trainer._imc_step() for _ in range(4)]
    # 1.0 > 2 x 0.3 but < 2 x 0.6: kept. 1.3 after 1.0: kept. 4.0 > 2 x max(1.3, 0.6): undone.
    assert [s["undone"] for s in steps] == [False, False, False, True]
    assert steps[0]["loss_noise"] is None and steps[3]["loss_noise"] == 0.6
    # No noise estimate (NaN: a one-frame sample): the loss alone decides.
    trainer = quick_trainer(tmp_path, optimizer="imc", imc_reject_factor=2.0, max_potential_change=0.5)
    losses = iter([1.0, 3.0])
    trainer._residual_jacobian = lambda: (jtj, jtr, next(losses))
    trainer._loss_noise = lambda: float("nan")
    assert [trainer._imc_step()["undone"] for _ in range(2)] == [False, True]


def _imc_fit_with_checked_loss(tmp_path, check, **options):
    """An IMC fit of two epochs whose third measurement (the final check) goes through ``check``.

    Returns the trainer, the parameters before and after the last step, and the MD steps of the epochs.
    """
    trainer = quick_trainer(
        tmp_path, optimizer="imc", imc_reject_factor=2.0, max_potential_change=0.5, max_epochs=2, **options
    )
    measure, calls = trainer._measure_states, []

    def measured(record):
        calls.append(record)
        total, results = measure(record)
        return check(total, results) if len(calls) == 3 else (total, results)

    trainer._measure_states = measured
    seen = {}

    def remember(run, record):
        seen["after"] = run._flat_parameters().clone()
        seen["before"] = run._imc_last["parameters"].clone()
        seen["md_steps"] = run.md_steps

    trainer.callbacks.append(remember)
    trainer.fit()
    return trainer, seen, len(calls)


def test_imc_final_check_undoes_a_last_step_that_overshot(tmp_path):
    """No epoch samples the last IMC step: one more sample judges it, by the epochs' rule."""
    trainer, seen, calls = _imc_fit_with_checked_loss(tmp_path, lambda total, results: (100.0 * total, results))
    assert calls == 3
    check = trainer.history[-1]["final_check"]
    assert check["undone"] and not check["rebased"] and check["error"] is None
    assert check["loss"] > 2.0 * check["loss_before"]
    assert check["md_steps"] == trainer.md_steps - seen["md_steps"] > 0
    # Back to the parameters the last step started from; the step is gone.
    torch.testing.assert_close(trainer._flat_parameters(), seen["before"])
    assert not torch.allclose(seen["after"], seen["before"])
    assert trainer._imc_last is None and not trainer.snapshots
    # Logged and checkpointed: the checkpoint holds the restored potential.
    last_line = json.loads((tmp_path / "log.jsonl").read_text().strip().splitlines()[-1])
    assert last_line["final_check"]["undone"] is True
    resumed = Trainer.resume(tmp_path)
    torch.testing.assert_close(resumed._flat_parameters(), seen["before"])
    assert resumed.md_steps == trainer.md_steps and resumed._imc_last is None


def test_imc_final_check_keeps_a_good_last_step_once_and_its_sample(tmp_path):
    trainer, seen, calls = _imc_fit_with_checked_loss(tmp_path, lambda total, results: (total, results))
    check = trainer.history[-1]["final_check"]
    assert not check["undone"] and check["error"] is None and check["md_steps"] > 0
    torch.testing.assert_close(trainer._flat_parameters(), seen["after"])
    assert trainer._imc_last["checked"] and trainer.snapshots  # a continued fit starts from this sample
    # The check's loss is that of the returned potential: it may be the best.
    assert trainer.best_loss <= check["loss"]
    # Fitting again without new epochs judges nothing twice.
    steps = trainer.md_steps
    trainer.fit()
    assert trainer.md_steps == steps
    # A continued fit uses the check's sample for its next step instead of drawing another.
    trainer.options["max_epochs"] = 3
    trainer.fit()
    assert trainer.history[2]["resampled"] == {trainer.states[0].name: False}


def test_imc_final_check_undoes_a_last_step_whose_sample_failed(tmp_path):
    def blow_up(total, results):
        raise SamplingError("gas", 123, "the potential blew up")

    trainer, seen, _ = _imc_fit_with_checked_loss(tmp_path, blow_up)
    check = trainer.history[-1]["final_check"]
    assert check["undone"] and check["loss"] is None and "blew up" in check["error"]
    torch.testing.assert_close(trainer._flat_parameters(), seen["before"])


def test_imc_final_check_is_off_without_an_undo_rule_or_when_asked(tmp_path):
    for options in (dict(imc_check_last=False, imc_reject_factor=2.0), dict(imc_reject_factor=None)):
        trainer = quick_trainer(tmp_path, optimizer="imc", max_potential_change=0.5, max_epochs=2, **options)
        trainer.fit()
        assert "final_check" not in trainer.history[-1]
        assert trainer.md_steps == trainer.history[-1]["md_steps"]
    with pytest.raises(ValueError, match="imc_check_last"):
        quick_trainer(tmp_path, optimizer="imc", imc_reject_factor=2.0, imc_check_last="yes")


def test_best_state_is_the_potential_whose_sample_gave_the_best_loss(tmp_path):
    """An epoch's loss is measured before its step: the best state is the potential sampled, not the one after."""
    trainer = quick_trainer(tmp_path, max_epochs=4)
    epoch, sampled = trainer._epoch, []

    def remembering_epoch():
        sampled.append(trainer._flat_parameters().clone())
        return epoch()

    trainer._epoch = remembering_epoch
    trainer.fit()
    best = int(np.argmin([h["loss"] for h in trainer.history]))
    assert trainer.best_loss == trainer.history[best]["loss"]
    flat = torch.cat([v.reshape(-1) for k, v in trainer.best_state.items() if k.endswith(("sigma", "epsilon"))])
    torch.testing.assert_close(flat.to(sampled[best].dtype), sampled[best])


def test_imc_cap_grows_past_max_potential_change_while_the_linear_model_holds(tmp_path):
    """imc_max_cap: a capped step whose fresh loss fell by >= half the predicted drop lets the cap grow 1.5x."""

    def run(**options):
        trainer = quick_trainer(tmp_path, optimizer="imc", imc_reject_factor=2.0, max_potential_change=0.5, **options)
        jtj = torch.eye(2, dtype=torch.float64)
        jtr = torch.tensor([-0.02, 0.01], dtype=torch.float64)  # beyond every cap here
        loss = [1.0]
        trainer._residual_jacobian = lambda: (jtj, jtr, loss[0])
        trainer._loss_noise = lambda: 0.0
        steps = [trainer._imc_step()]
        # The fresh samples fall by 90 %, 90 %, then 10 % of the drop the model predicted.
        for fraction in (0.9, 0.9, 0.1):
            predicted = trainer._imc_last["predicted_drop"]
            assert predicted > 0 and trainer._imc_last["capped"]
            loss[0] -= fraction * predicted
            steps.append(trainer._imc_step())
        return steps

    grown = run(imc_max_cap=1.0)
    assert [s["cap_kT"] for s in grown] == pytest.approx([0.5, 0.75, 1.0, 0.5])
    assert [s["model_ratio"] for s in grown[1:]] == pytest.approx([0.9, 0.9, 0.1])
    assert not any(s["undone"] for s in grown)
    # Each step is shortened to its cap (u is not linear in sigma: to 0.6-1 of it), past
    # max_potential_change once the cap grew.
    for step in grown:
        assert step["step_scale"] < 1 and step["core_hole_shrinks"] == 0
        assert 0.55 * step["cap_kT"] < step["max_change_kT"] <= step["cap_kT"] * (1 + 1e-9)
    assert grown[2]["max_change_kT"] > 0.5
    # Without imc_max_cap the cap stays at max_potential_change.
    assert [s["cap_kT"] for s in run()] == pytest.approx([0.5] * 4)
    with pytest.raises(ValueError, match="imc_max_cap needs imc_reject_factor"):
        quick_trainer(tmp_path, optimizer="imc", imc_max_cap=1.0)
    with pytest.raises(ValueError, match="imc_max_cap"):
        quick_trainer(tmp_path, optimizer="imc", imc_reject_factor=2.0, imc_max_cap=-1.0)
    with pytest.raises(ValueError, match="below max_potential_change"):
        quick_trainer(tmp_path, optimizer="imc", imc_reject_factor=2.0, max_potential_change=0.5, imc_max_cap=0.4)


def test_imc_with_smoothing_fits_a_spline_to_a_simulated_rdf(tmp_path):
    """Smoothed IMC steps with almost no damping improve u(r) of a spline started at the Boltzmann inversion."""
    target = simulated_lj_target()
    knots = np.concatenate([np.arange(0.29, 0.405, 0.01), np.arange(0.43, 0.75, 0.04)])
    state = small_state(target)
    trainer = quick_trainer(
        tmp_path,
        table=prior_plus_spline(knots),
        state=state,
        learning_rate_scales=None,
        optimizer="imc",
        imc_damping=1e-6,
        imc_smoothing=0.1,
        max_potential_change=0.5,
        boltzmann_initial_guess=True,
        max_epochs=4,
        n_snapshots=200,
        snapshot_interval=20,
        equilibration_steps=500,
        seed=5,
    )
    r = np.asarray(target.r)
    region = (np.asarray(target.g) > 0.1) & (r < CUTOFF - 0.01)
    truth = model_table(SIGMA).evaluate(r[region])[0] / state.kT

    def u_error():
        diff = trainer.table.evaluate(r[region])[0] / state.kT - truth
        return float(np.sqrt(np.mean((diff - diff.mean()) ** 2)))

    errors = []
    trainer.callbacks.append(lambda t, record: errors.append(u_error()))
    trainer._initialise()
    initial_error = u_error()
    history = trainer.fit()
    losses = [h["imc"]["loss_before"] for h in history]
    assert all(np.isfinite(losses))
    # 64 particles: every sample's RDF is noisy (the loss soon sits at its noise
    # level), so judge the potential itself, over the run. Sampling on two CPU
    # threads is not bitwise reproducible: the mean error over the run was
    # 0.43-0.52 of the initial one in six local runs and 0.70 in one CI run
    # (one noisy step to 0.93), so ask for a clear improvement at the best
    # epoch and a lasting one at the end, not for the mean. From the inversion
    # through the estimator's kernel (a closer start) the best epoch was at
    # 0.26-0.46 and the last at 0.28-0.74 of the start in 15 local runs, and the
    # last at 0.86 in one CI run: the end only has to stay below the start.
    assert min(errors) < 0.6 * initial_error
    assert errors[-1] < initial_error


def test_imc_damps_a_step_that_no_length_keeps_out_of_the_core():
    from openmm_diffsim.training import _damped_solve

    knots = np.linspace(0.29, 0.74, 16)
    trainer = Trainer(
        prior_plus_spline(knots), [small_state()], "reweighting", optimizer="imc", imc_damping=1e-6, progress=False
    )
    jtj = torch.diag(torch.logspace(-8, 0, 16, dtype=torch.float64))
    jtr = torch.ones(16, dtype=torch.float64)
    trainer._residual_jacobian = lambda: (jtj, jtr, 1.0)
    tried = []

    def refuse_twice(step, limit):
        tried.append(step.clone())
        return (0.0, 0.0, 30) if len(tried) < 3 else (0.1, 1.0, 0)

    trainer._move_within = refuse_twice
    record = trainer._imc_step()
    assert record["damping"] == pytest.approx(1e-2)  # 1e-6, then 1e-3, then 1e-2
    for step, damping in zip(tried, (1e-6, 1e-3, 1e-2), strict=True):
        torch.testing.assert_close(step, _damped_solve(jtj, jtr, damping))
    assert record["step_scale"] == 1.0 and record["core_hole_shrinks"] == 60
    # A step no damping makes safe is not taken, and the search ends.
    tried.clear()
    trainer._move_within = lambda step, limit: tried.append(step) or (0.0, 0.0, 30)
    record = trainer._imc_step()
    assert record["step_scale"] == 0.0 and record["damping"] == pytest.approx(1.0) and len(tried) == 5


def _linear_model_rows(trainer, matrix, optimum, jacobian_errors):
    """Replace the sampled residual rows by a linear model ρ(θ) = A (θ - θ*) with a noisy Jacobian per call."""
    errors = iter(jacobian_errors)

    def rows():
        theta = trainer._flat_parameters().to(torch.float64)
        return {"gas": (matrix @ (theta - optimum), matrix + next(errors))}

    trainer._residual_rows = rows


def test_imc_pool_steps_from_the_mean_with_the_pooled_jacobian(tmp_path):
    """Two samples whose Jacobian errors cancel: the pooled step lands on the optimum, a lone step does not."""
    generator = torch.Generator().manual_seed(0)
    matrix = torch.randn(6, 2, generator=generator, dtype=torch.float64)
    error = 0.3 * torch.randn(6, 2, generator=generator, dtype=torch.float64)
    landed = {}
    for pool in (1, 2):
        trainer = quick_trainer(
            tmp_path / str(pool),
            optimizer="imc",
            imc_pool=pool,
            imc_pool_radius=1e3,
            imc_damping=1e-12,
            max_potential_change=1e3,
            n_snapshots=7,
        )
        optimum = trainer._flat_parameters().to(torch.float64) + torch.tensor([0.01, -0.05], dtype=torch.float64)
        _linear_model_rows(trainer, matrix, optimum, [error, -error])
        first = trainer._imc_step()
        second = trainer._imc_step()
        assert "pooled_samples" not in first  # one sample: nothing to pool
        landed[pool] = (trainer._flat_parameters().to(torch.float64) - optimum, second)
    offset, second = landed[2]
    assert second["pooled_samples"] == 2 and second["pooled_frames"] == 14
    assert float(offset.abs().max()) < 1e-8
    # Without the pool, the second step carries its own Jacobian's error.
    assert float(landed[1][0].abs().max()) > 1e-4
    assert "pooled_samples" not in landed[1][1]


def test_imc_pool_drops_samples_beyond_the_radius_and_keeps_at_most_imc_pool(tmp_path):
    generator = torch.Generator().manual_seed(1)
    matrix = torch.randn(6, 2, generator=generator, dtype=torch.float64)
    errors = [0.1 * torch.randn(6, 2, generator=generator, dtype=torch.float64) for _ in range(4)]
    trainer = quick_trainer(tmp_path, optimizer="imc", imc_pool=2, imc_pool_radius=1e3, max_potential_change=1e3)
    optimum = trainer._flat_parameters().to(torch.float64) + torch.tensor([0.002, -0.01], dtype=torch.float64)
    _linear_model_rows(trainer, matrix, optimum, errors)
    records = [trainer._imc_step() for _ in range(3)]
    assert [r.get("pooled_samples") for r in records] == [None, 2, 2]
    # The pool survives a checkpoint.
    trainer.save_checkpoint()
    resumed = Trainer.resume(tmp_path)
    assert len(resumed._imc_pool) == 2
    for saved, kept in zip(resumed._imc_pool, trainer._imc_pool, strict=True):
        torch.testing.assert_close(saved["rows"]["gas"][1], kept["rows"]["gas"][1])
        torch.testing.assert_close(saved["parameters"], kept["parameters"])
    # A sample drawn farther than the radius (in u(r), kT) from the current u(r) leaves the pool.
    trainer.options["imc_pool_radius"] = 1e-9
    assert "pooled_samples" not in trainer._imc_step()
    assert len(trainer._imc_pool) == 1


def test_noise_shrink_predicts_the_noise_of_a_damped_newton_step_and_shortens_a_noisy_one():
    """Monte Carlo check of _noise_shrink: residuals ρ = ρ_true + ε with a known noise covariance.

    The trace formula must match the scatter of the solved steps (in the
    metric), and the shrunk step must land closer to the noiseless step than
    the full one where noise dominates, and keep nearly its full length where
    the signal does (positive-part James–Stein).
    """
    from openmm_diffsim.training import _damped_solve, _noise_shrink

    rng = np.random.default_rng(4)
    n_rows, n_params = 40, 6
    jac = torch.as_tensor(rng.normal(size=(n_rows, n_params)))
    root = torch.as_tensor(rng.normal(size=(n_rows, n_rows))) * 0.05
    noise_cov = root @ root.T  # covariance of ε
    jtj = jac.T @ jac
    penalty = 0.1 * torch.eye(n_params, dtype=torch.float64)
    metric_root = torch.as_tensor(rng.normal(size=(20, n_params)))
    metric = metric_root.T @ metric_root
    jtr_cov = jac.T @ noise_cov @ jac
    results = {}
    for label, scale in (("noise", 0.0), ("signal", 100.0)):
        rho_true = scale * torch.as_tensor(rng.normal(size=n_rows)) * 0.05
        exact = _damped_solve(jtj, jac.T @ rho_true, 1e-3, penalty)
        full_errors, shrunk_errors, ratios = [], [], []
        for _ in range(400):
            rho = rho_true + root @ torch.as_tensor(rng.normal(size=n_rows))
            step = _damped_solve(jtj, jac.T @ rho, 1e-3, penalty)
            found = _noise_shrink(step, jtr_cov, jtj, 1e-3, penalty, metric)
            assert 0.0 <= found["shrink"] <= 1.0
            error = step - exact
            full_errors.append(float(error @ metric @ error))
            shrunk = found["shrink"] * step - exact
            shrunk_errors.append(float(shrunk @ metric @ shrunk))
            ratios.append(found["step_noise"] * float(step @ metric @ step))  # E|δ_noise|², the same every draw
        results[label] = (np.mean(full_errors), np.mean(shrunk_errors), ratios[0], found["shrink"])
        # The predicted noise of a step is the measured scatter of the steps about the noiseless one.
        assert np.std(ratios) < 1e-9 * ratios[0]
        assert 0.85 < np.mean(full_errors) / ratios[0] < 1.15
    full, shrunk, _, _ = results["noise"]
    assert shrunk < 0.5 * full  # pure noise: shrinking removes most of the error the step would write
    full, shrunk, _, last_shrink = results["signal"]
    assert shrunk < 1.02 * full and last_shrink > 0.95  # strong signal: the step stays nearly whole
    # No noise estimate or a zero step: the step as it is.
    zero = torch.zeros(n_params, dtype=torch.float64)
    assert _noise_shrink(zero, jtr_cov, jtj, 1e-3, penalty, metric)["shrink"] == 1.0
    assert _noise_shrink(step, torch.zeros_like(jtr_cov), jtj, 1e-3, penalty, metric)["shrink"] == 1.0


def test_imc_noise_shrink_scales_the_step_by_the_noise_of_the_sample(tmp_path):
    trainer = quick_trainer(
        tmp_path, optimizer="imc", imc_noise_shrink=True, max_epochs=2, n_snapshots=12, max_potential_change=0.05
    )
    history = trainer.fit()
    for record in history:
        step = record["imc"]
        assert 0.0 <= step["shrink"] <= 1.0 and step["step_noise"] >= 0.0
    # The plumbing: a sample whose noise swamps the step leaves u(r) where it is; no noise, the plain step.
    for covariance, expected in ((1e6, 0.0), (0.0, 1.0)):
        t = quick_trainer(tmp_path / f"c{covariance}", optimizer="imc", imc_noise_shrink=True, n_snapshots=12)
        t._jtr_noise_covariance = lambda rows, c=covariance: c * torch.eye(2, dtype=torch.float64)  # σ, ε
        plain = quick_trainer(tmp_path / f"p{covariance}", optimizer="imc", n_snapshots=12)
        jtj = torch.eye(2, dtype=torch.float64)
        jtr = torch.tensor([-0.01, 0.005], dtype=torch.float64)
        for each in (t, plain):
            each._residual_rows = lambda: {}
            each._normal_equations = lambda rows, jtj=jtj, jtr=jtr: (jtj, jtr, 1.0)
            each._residual_jacobian = lambda jtj=jtj, jtr=jtr: (jtj, jtr, 1.0)
        before = t._flat_parameters()
        shrunk = t._imc_step()
        plain_step = plain._imc_step()
        assert shrunk["shrink"] == pytest.approx(expected, abs=1e-6)
        if expected == 0.0:
            assert shrunk["max_change_kT"] == 0.0
            assert torch.equal(t._flat_parameters(), before)
        else:
            assert shrunk["max_change_kT"] == pytest.approx(plain_step["max_change_kT"], rel=1e-9)
    # The noise behind an undone step's system is kept with it (and survives a checkpoint).
    t = quick_trainer(tmp_path / "undo", optimizer="imc", imc_noise_shrink=True, imc_reject_factor=2.0)
    t._residual_rows = lambda: {}
    t._normal_equations = lambda rows: (jtj, jtr, 1.0)
    t._jtr_noise_covariance = lambda rows: 1e-9 * torch.eye(2, dtype=torch.float64)
    t._loss_noise = lambda: 0.0
    t._imc_step()
    assert torch.equal(t._imc_last["noise_cov"], 1e-9 * torch.eye(2, dtype=torch.float64))
    (tmp_path / "undo").mkdir()
    t.save_checkpoint()
    assert torch.equal(Trainer.resume(tmp_path / "undo")._imc_last["noise_cov"], t._imc_last["noise_cov"])
    # An overshoot (loss 10x) retakes the step from its own system and noise, not the fresh sample's:
    # the fresh noise here would shrink the step to nothing, the kept one leaves it whole.
    t._normal_equations = lambda rows: (jtj, jtr, 10.0)
    t._jtr_noise_covariance = lambda rows: 1e6 * torch.eye(2, dtype=torch.float64)
    retaken = t._imc_step()
    assert retaken["undone"] and retaken["shrink"] > 0.99 and retaken["max_change_kT"] > 0
    # Refused: a non-boolean, and pooling (a pooled step has its own noise).
    with pytest.raises(ValueError, match="imc_noise_shrink must be True or False"):
        quick_trainer(optimizer="imc", imc_noise_shrink=1)
    with pytest.raises(ValueError, match="imc_pool"):
        quick_trainer(optimizer="imc", imc_noise_shrink=True, imc_pool=2)


def test_imc_pool_runs_in_training_and_bad_values_are_refused(tmp_path):
    trainer = quick_trainer(
        tmp_path, optimizer="imc", imc_pool=3, max_epochs=3, n_snapshots=12, max_potential_change=0.02
    )
    history = trainer.fit()
    pooled = [h["imc"].get("pooled_frames") for h in history]
    assert pooled == [None, 24, 36]
    assert all(np.isfinite(h["imc"]["pooled_loss"]) for h in history[1:])
    for value in (0, 1.5, True):
        with pytest.raises(ValueError, match="imc_pool must be a positive integer"):
            quick_trainer(optimizer="imc", imc_pool=value)
    for value in (0.0, float("nan")):
        with pytest.raises(ValueError, match="imc_pool_radius"):
            quick_trainer(optimizer="imc", imc_pool=2, imc_pool_radius=value)


def test_bound_level_removes_the_excess_level_with_the_least_change_of_u():
    """_bound_level: the levels land on ±bound, by the step nearest the given one in the metric."""
    from openmm_diffsim.training import _bound_level

    rng = np.random.default_rng(7)
    n = 8
    root = torch.as_tensor(rng.normal(size=(n, n)))
    metric = root @ root.T + 0.5 * torch.eye(n, dtype=torch.float64)  # G, symmetric positive definite
    full = torch.as_tensor(rng.normal(size=n))  # the step as solved
    rows = torch.as_tensor(rng.normal(size=(2, n)))  # A: two levels
    wanted = float((rows @ full).abs().max())
    bound = 0.3 * wanted
    step, reported, bounded = _bound_level(full, metric, rows, bound)
    assert bounded and reported == pytest.approx(wanted)
    levels = rows @ step
    torch.testing.assert_close(levels, (rows @ full).clamp(-bound, bound))
    # Optimality (KKT): G (δ - δ₀) lies in the span of the rows.
    moved = metric @ (step - full)
    coefficients = torch.linalg.lstsq(rows.T, moved.unsqueeze(1)).solution
    torch.testing.assert_close(rows.T @ coefficients.squeeze(1), moved, atol=1e-8, rtol=1e-8)

    def distance(d):
        return float((d - full) @ metric @ (d - full))

    # Any other step with the same levels lies further from the given one.
    null = torch.linalg.svd(rows).Vh[2:]  # directions that leave both levels alone
    for _ in range(20):
        other = step + null.T @ torch.as_tensor(rng.normal(size=n - 2)) * 0.1
        torch.testing.assert_close(rows @ other, levels)
        assert distance(other) > distance(step)
    # Within the bound (or with no rows) the step is returned as it was.
    same, _, bounded = _bound_level(full, metric, rows, 2.0 * wanted)
    assert not bounded and torch.equal(same, full)
    assert _bound_level(full, metric, rows[:0], 0.0)[0] is full


def test_imc_level_fraction_bounds_the_level_of_the_step_and_keeps_the_wall_correction(tmp_path):
    knots = np.linspace(0.29, 0.74, 16)
    kT = float(small_state().kT)

    def trainer(**extra):
        options = dict(optimizer="imc", max_potential_change=0.5, imc_damping=1e-6, progress=False)
        return Trainer(prior_plus_spline(knots), [small_state()], "reweighting", **{**options, **extra})

    bounded, plain = trainer(imc_level_fraction=0.1), trainer()
    whole = trainer(max_potential_change=5.0)  # the same step, uncapped
    # _level_rows is the derivative of the mean of u/kT over the bins where g > 0.05 (finite difference).
    rows = bounded._level_rows()
    assert rows.shape == (1, len(knots))
    target = bounded.states[0].targets[0]
    r = np.asarray(target.r)
    grid = r[(np.asarray(target.g) > 0.05) & (r > 0) & (r < CUTOFF)]

    def level(t):
        return float(np.mean(t.table.evaluate(grid, 0)[0])) / kT

    delta = torch.as_tensor(np.random.default_rng(2).normal(size=len(knots))) * 0.01
    start = level(bounded)
    bounded._set_flat_parameters(bounded._flat_parameters() + delta)
    assert level(bounded) - start == pytest.approx(float(rows[0] @ delta), rel=1e-6, abs=1e-12)
    bounded._set_flat_parameters(bounded._flat_parameters() - delta)
    # A Newton system whose full step lowers every knot but the last (near the cutoff, against which
    # u is shifted) by 0.4 kT and the innermost three by 0.4 kT more: a level change of about 0.4 kT,
    # bounded to 0.1 x 0.5 = 0.05 kT.
    wanted = -0.4 * kT * torch.ones(len(knots), dtype=torch.float64)
    wanted[-1] = 0.0
    wanted[:3] -= 0.4 * kT
    jtj = torch.eye(len(knots), dtype=torch.float64)
    for t in (bounded, plain, whole):
        t._residual_jacobian = lambda: (jtj, -jtj @ wanted, 1.0)
    before = level(bounded)
    u_before = bounded.table.evaluate(grid, 0)[0]
    record = bounded._imc_step()
    plain_record = plain._imc_step()
    whole._imc_step()
    # The excess left as a near-uniform shift of u(r) over the level's bins (away from the
    # cutoff, against which u is shifted): the shape of the step is kept (here the model,
    # JᵀJ = 1, weighs every knot alike, as the change of u(r) does).
    removed = (whole.table.evaluate(grid, 0)[0] - bounded.table.evaluate(grid, 0)[0]) / kT
    inner = removed[grid < 0.6]
    assert inner.mean() < -0.2 and inner.std() < 0.1 * abs(inner.mean())
    # The wall's move against the rest is the uncapped step's.
    wall_move = {}
    for name, t in (("bounded", bounded), ("whole", whole)):
        change = (t.table.evaluate(grid, 0)[0] - u_before) / kT
        wall_move[name] = change[0] - change[grid < 0.6].mean()
    # (Within a quarter: the least change of u(r) tapers into the core below the first bin.)
    assert wall_move["whole"] < -0.2 and wall_move["bounded"] == pytest.approx(wall_move["whole"], rel=0.25)
    assert record["level_bounded"] and record["level_wanted_kT"] > 0.3
    # Bounded to 0.05 kT, then the whole step shortened by the 0.5 kT cap on the change of u(r).
    assert record["level_kT"] == pytest.approx(0.05 * record["step_scale"], rel=1e-6)
    assert abs(level(bounded) - before) == pytest.approx(record["level_kT"], rel=1e-6)
    assert abs(level(plain) - before) > 0.2 and "level_kT" not in plain_record
    # The innermost knots' extra drop (the "wall" here) is still taken: the bound removed the uniform part.
    spline = bounded.table.pair_potentials[0].terms[1].values.detach()
    assert float(spline[:3].mean() - spline[3:-1].mean()) < -0.3 * kT
    assert not bounded._has_core_hole(bounded._wall_grids())
    # Bad values are refused; the configuration file takes it.
    for bad in (0.0, 1.5, float("nan"), True, "0.1"):
        with pytest.raises(ValueError, match="imc_level_fraction"):
            trainer(imc_level_fraction=bad)
    (tmp_path / "ckpt").mkdir()
    bounded.output_dir = tmp_path / "ckpt"
    bounded.save_checkpoint()
    assert Trainer.resume(tmp_path / "ckpt").options["imc_level_fraction"] == 0.1


def test_imc_level_bound_does_not_move_the_excess_into_the_wall(tmp_path):
    """Where the data barely see the wall knots, the Newton model as the measure would hold the mean
    level by raising the wall; the least change of u(r) (the trainer's measure) leaves the wall in place."""
    from openmm_diffsim.training import _bound_level, _damped_system

    knots = np.linspace(0.29, 0.74, 16)
    kT = float(small_state().kT)
    trainer = Trainer(
        prior_plus_spline(knots),
        [small_state()],
        "reweighting",
        optimizer="imc",
        max_potential_change=5.0,
        imc_damping=1e-6,
        imc_level_fraction=0.02,
        progress=False,
    )
    diagonal = torch.ones(len(knots), dtype=torch.float64)
    diagonal[:3] = 1e-4  # the wall knots: the data barely see them
    jtj = torch.diag(diagonal)
    wanted = -0.4 * kT * torch.ones(len(knots), dtype=torch.float64)
    wanted[-1] = 0.0
    trainer._residual_jacobian = lambda: (jtj, -jtj @ wanted, 1.0)
    rows = trainer._level_rows()
    record = trainer._imc_step()
    assert record["level_bounded"] and record["step_scale"] == 1.0
    change = trainer.table.pair_potentials[0].terms[1].values.detach()  # the knots started at zero

    def wall_lift(step):
        return float(step[:3].mean() - step[3:-1].mean()) / kT

    # The model alone, for contrast: the excess (0.4 - 0.1 kT) piled into the three wall knots.
    system = _damped_system(jtj, 1e-6)
    newton_only = _bound_level(wanted, system, rows, record["level_kT"])[0]
    assert wall_lift(newton_only) > 1.0
    assert abs(wall_lift(change)) < 0.25  # measured: -0.17 kT (the shift tapers into the core), against 2.25


class _FakeSample:
    """Stands in for a state's reweighting estimator: a sampled RDF beside the target, on its grid."""

    def __init__(self, state, log_ratio):
        target = state.targets[0]
        self.r = np.asarray(target.r, dtype=float)
        self.g_target = np.asarray(target.g, dtype=float)
        self.g_sample = self.g_target * np.exp(log_ratio(self.r))

    def sample_rdfs(self, targets):
        return [(("Ar", "Ar"), self.g_sample.copy(), self.g_target.copy())]


def _u_over_kT_jacobian(trainer, grid, kT):
    """∂(u(r)/kT)/∂θ on ``grid`` by central differences of the table's own evaluate (independent of autograd)."""
    start = trainer._flat_parameters().clone()
    columns = []
    for k in range(start.numel()):
        shifted = []
        for sign in (1.0, -1.0):
            trial = start.clone()
            trial[k] += sign * 1e-4
            trainer._set_flat_parameters(trial)
            shifted.append(np.asarray(trainer.table.evaluate(grid, 0)[0], dtype=float) / kT)
        columns.append((shifted[0] - shifted[1]) / 2e-4)
    trainer._set_flat_parameters(start)
    return np.stack(columns, axis=1)


def test_imc_ibi_prior_follows_ibi_at_the_wall_where_the_data_are_blind_and_newton_where_they_see():
    from openmm_diffsim.ibi import ibi_update

    knots = np.linspace(0.29, 0.74, 16)
    state = small_state()
    kT = float(state.kT)
    cutoff = CUTOFF

    # The sample over-populates the target by a smooth ln(g/g_target) that vanishes at the cutoff:
    # IBI's correction raises u(r) by up to ~0.3 kT at the wall.
    def log_ratio(r):
        return 0.3 * np.clip(1.0 - r / cutoff, 0.0, None) ** 2 / (1.0 - 0.3 / cutoff) ** 2

    def trainer(jtj, jtr, ratio=log_ratio, **extra):
        options = dict(optimizer="imc", max_potential_change=5.0, imc_damping=1e-6, progress=False)
        t = Trainer(prior_plus_spline(knots), [state], "reweighting", **{**options, **extra})
        t.reweighting = {state.name: _FakeSample(state, ratio)}
        t._residual_jacobian = lambda: (jtj, jtr, 1.0)
        return t

    fake = _FakeSample(state, log_ratio)
    # The wall: g_target > 0.05 below the first r where it reaches 1 (the dilute-gas target peaks above 1).
    first_peak = fake.r[np.nonzero(fake.g_target >= 1.0)[0][0]]
    wall = (fake.g_target > 0.05) & (fake.r > 0) & (fake.r < first_peak)
    beyond = (fake.g_target > 0.05) & (fake.r >= first_peak) & (fake.r < cutoff)
    assert wall.sum() >= 3 and beyond.sum() > 20
    grid = fake.r[wall]
    correction = ibi_update(fake.r, fake.g_sample, fake.g_target, kT)[wall] / kT  # IBI's own, in kT
    assert correction.min() > 0.2
    n = len(knots)
    blind_jtj, no_data = 1e-10 * torch.eye(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)

    # Data blind to every knot: the step takes IBI's correction on the wall bins.
    blind = trainer(blind_jtj, no_data, imc_ibi_prior=1e6)
    jacobian = _u_over_kT_jacobian(blind, grid, kT)
    before = blind._flat_parameters().clone()
    u_before = np.asarray(blind.table.evaluate(grid, 0)[0]) / kT
    record = blind._imc_step()
    taken = (blind._flat_parameters() - before).numpy()
    np.testing.assert_allclose(jacobian @ taken, correction, atol=2e-3)  # the autograd rows agree with these
    moved = np.asarray(blind.table.evaluate(grid, 0)[0]) / kT - u_before
    np.testing.assert_allclose(moved, correction, atol=2e-3)
    assert record["ibi_prior_share"] == pytest.approx(1.0, abs=1e-6) and record["step_scale"] == 1.0
    # Beyond the wall IBI's ratio is not read: a sample off the target only there moves nothing.
    far = trainer(blind_jtj, no_data, ratio=lambda r: 0.3 * (r >= first_peak) * (r < cutoff), imc_ibi_prior=1e6)
    start = far._flat_parameters().clone()
    assert far._imc_step()["max_change_kT"] < 1e-6 and torch.allclose(far._flat_parameters(), start)

    # The data see every knot but the three innermost (the wall) and want no change anywhere but a
    # -0.2 kT move of knots 6-9. With a light prior (0.01) the seen knots keep the Newton step
    # and the wall takes IBI's correction instead of staying put.
    diagonal = torch.ones(n, dtype=torch.float64)
    diagonal[:3] = 1e-8
    jtj = torch.diag(diagonal)
    wanted = torch.zeros(n, dtype=torch.float64)
    wanted[6:10] = -0.2 * kT
    plain, pulled = trainer(jtj, -jtj @ wanted), trainer(jtj, -jtj @ wanted, imc_ibi_prior=0.01)
    steps = {}
    for name, t in (("plain", plain), ("pulled", pulled)):
        start = t._flat_parameters().clone()
        steps[name] = (t, t._imc_step(), (t._flat_parameters() - start).numpy())
    plain_step, pulled_step = steps["plain"][2], steps["pulled"][2]
    np.testing.assert_allclose(plain_step, wanted.numpy(), atol=1e-6)
    np.testing.assert_allclose(pulled_step[3:], wanted.numpy()[3:], atol=0.02 * kT)
    # On the wall bins below the third knot (nearer the fourth, a pinned one, the spline bends
    # down to it) the data's blind directions follow the prior alone: IBI's correction.
    rows = grid < knots[2]
    assert rows.sum() >= 2
    pulled_wall = (jacobian @ pulled_step)[rows]
    assert np.abs(pulled_wall - correction[rows]).max() < 0.15 * correction[rows].max()
    assert np.abs(jacobian @ plain_step)[rows].max() < 0.01
    assert 0.0 < steps["pulled"][1]["ibi_prior_share"] and "ibi_prior_share" not in steps["plain"][1]


def test_imc_ibi_prior_is_left_out_of_the_noise_shrinkage_and_kept_for_an_undo(tmp_path):
    knots = np.linspace(0.29, 0.74, 16)
    state = small_state()
    n = len(knots)
    jtj = torch.eye(n, dtype=torch.float64)
    jtr = 0.01 * torch.ones(n, dtype=torch.float64)

    def trainer(**extra):
        options = dict(
            optimizer="imc", max_potential_change=5.0, imc_damping=1e-6, imc_noise_shrink=True, progress=False
        )
        t = Trainer(prior_plus_spline(knots), [state], "reweighting", **{**options, **extra})
        t.reweighting = {state.name: _FakeSample(state, lambda r: -0.2 * (r < 0.5))}
        t._residual_rows = lambda: {}
        t._normal_equations = lambda rows: (jtj, jtr, 1.0)
        t._jtr_noise_covariance = lambda rows: 1e6 * torch.eye(n, dtype=torch.float64)  # noise swamps the data
        t._potential_metric = lambda: torch.eye(n, dtype=torch.float64)
        return t

    plain, pulled = trainer(), trainer(imc_ibi_prior=0.1)
    assert plain._imc_step()["max_change_kT"] == 0.0  # the data's step shrunk to nothing
    record = pulled._imc_step()
    assert record["shrink"] == pytest.approx(0.0, abs=1e-9)
    assert record["max_change_kT"] > 0.05 and record["ibi_prior_share"] == pytest.approx(1.0, abs=1e-9)

    # The prior behind a step is kept with it (and survives a checkpoint); an undo retakes the step
    # from that prior, not from IBI's correction of the overshooting potential's sample.
    t = trainer(imc_ibi_prior=0.1, imc_reject_factor=2.0, output_dir=tmp_path)
    t._loss_noise = lambda: 0.0
    t._imc_step()
    kept = t._imc_last["prior"]
    t.save_checkpoint()
    restored = Trainer.resume(tmp_path)._imc_last["prior"]
    assert all(torch.equal(a, b) for a, b in zip(kept, restored, strict=True))

    def refuse(limit):
        raise AssertionError("an undo must not read IBI's correction off the overshooting sample")

    t._ibi_prior = refuse
    t._normal_equations = lambda rows: (jtj, jtr, 10.0)  # the fresh loss rose tenfold: undone
    retaken = t._imc_step()
    assert retaken["undone"] and retaken["max_change_kT"] > 0
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="imc_ibi_prior"):
            trainer(imc_ibi_prior=bad)


def test_imc_ibi_prior_runs_in_a_fit_on_the_sampled_rdf(tmp_path):
    trainer = quick_trainer(tmp_path, optimizer="imc", imc_ibi_prior=0.01, imc_noise_shrink=True, max_epochs=2)
    # The snapshots' own RDF is what the reweighted RDF is at the sample's parameters (equal weights).
    trainer._measure_states(trainer._new_record())
    estimator = trainer.reweighting[trainer.states[0].name]
    pair, g_sample, g_target = estimator.sample_rdfs(trainer.states[0].targets)[0]
    state = trainer.states[0]
    result = estimator(trainer.table, state, trainer.snapshots[state.name], state.targets)
    np.testing.assert_allclose(g_sample, result.rdfs["Ar-Ar"], rtol=1e-9, atol=1e-12)
    assert pair == ("Ar", "Ar") and g_target.shape == g_sample.shape == estimator.r.shape
    for p in trainer.table.parameters():
        p.grad = None
    history = trainer.fit()
    for record in history:
        # The prior's part of the step against the whole (above 1 where the data's part opposes it).
        assert math.isfinite(record["imc"]["ibi_prior_share"]) and record["imc"]["ibi_prior_share"] >= 0.0
    assert np.isfinite(history[-1]["loss"])


class _CurvedSample:
    """Stands in for a state's reweighting estimator: a fixed curvature of the residuals along any step."""

    def __init__(self, curvature):
        self.curvature = curvature
        self.energy_calls = 0

    def frame_energies(self, table):
        self.energy_calls += 1
        return torch.zeros(4, dtype=torch.float64)

    def residual_curvature(self, state, targets, energy_before, energy_after, loss_weight=1.0):
        return self.curvature.clone()


def test_imc_line_search_stops_at_the_minimum_of_the_second_order_model(tmp_path):
    """Residuals ρ = -δ*, J = I: the Newton step is δ*. With curvature ρ'' = 2δ* along it the model is
    ρ(t) = δ*(t² + t - 1), zero at t = (√5 - 1)/2; without curvature it is the Newton step; with a
    large one the floor (IMC_LINE_SEARCH_MIN) holds."""
    from openmm_diffsim.training import IMC_LINE_SEARCH_MIN

    knots = np.linspace(0.29, 0.74, 16)
    state = small_state()
    n = len(knots)
    wanted = torch.full((n,), 0.1 * float(state.kT), dtype=torch.float64)  # raise u(r): no well in the core

    def trainer(curvature, **extra):
        options = dict(optimizer="imc", max_potential_change=5.0, imc_damping=1e-9, progress=False)
        t = Trainer(prior_plus_spline(knots), [state], "reweighting", **{**options, **extra})
        t.reweighting = {state.name: _CurvedSample(curvature)}
        t._residual_rows = lambda: {state.name: (-wanted.clone(), torch.eye(n, dtype=torch.float64))}
        return t

    def step(t):
        start = t._flat_parameters().clone()
        record = t._imc_step()
        return record, t._flat_parameters() - start

    golden = (math.sqrt(5.0) - 1.0) / 2.0
    record, taken = step(trainer(2.0 * wanted, imc_line_search=True))
    assert record["line_scale"] == pytest.approx(golden, abs=0.006)
    torch.testing.assert_close(taken, record["line_scale"] * wanted, rtol=1e-6, atol=1e-9)
    assert record["line_model_loss"] < 1e-3 * record["line_model_loss_full"]  # full step: |δ*|² (t=1: ρ = δ*)
    assert record["line_model_loss_full"] == pytest.approx(float(wanted @ wanted), rel=1e-6)
    full_record, full = step(trainer(2.0 * wanted))  # the option off: the whole Newton step
    torch.testing.assert_close(full, wanted, rtol=1e-6, atol=1e-9)
    assert "line_scale" not in full_record
    # The largest change of u(r) is that of the shortened step.
    assert record["max_change_kT"] == pytest.approx(record["line_scale"] * full_record["max_change_kT"], rel=1e-3)
    # No curvature: the linear model's minimum is the Newton step itself.
    flat, flat_taken = step(trainer(torch.zeros(n, dtype=torch.float64), imc_line_search=True))
    assert flat["line_scale"] == 1.0
    torch.testing.assert_close(flat_taken, wanted, rtol=1e-6, atol=1e-9)
    # A curvature that would put the minimum near zero is held at the floor.
    steep, _ = step(trainer(200.0 * wanted, imc_line_search=True))
    assert steep["line_scale"] == pytest.approx(IMC_LINE_SEARCH_MIN)


def test_imc_line_search_skips_a_retaken_step_and_runs_in_a_fit(tmp_path):
    from openmm_diffsim.training import IMC_LINE_SEARCH_MIN

    knots = np.linspace(0.29, 0.74, 16)
    state = small_state()
    n = len(knots)
    wanted = torch.full((n,), 0.1 * float(state.kT), dtype=torch.float64)
    t = Trainer(
        prior_plus_spline(knots),
        [state],
        "reweighting",
        optimizer="imc",
        max_potential_change=5.0,
        imc_damping=1e-9,
        imc_reject_factor=2.0,
        imc_line_search=True,
        progress=False,
    )
    sample = _CurvedSample(2.0 * wanted)
    t.reweighting = {state.name: sample}
    loss = {"value": float(wanted @ wanted)}
    t._residual_rows = lambda: {
        state.name: (
            -wanted.clone() * math.sqrt(loss["value"] / float(wanted @ wanted)),
            torch.eye(n, dtype=torch.float64),
        )
    }
    t._loss_noise = lambda: 0.0
    assert 0.6 < t._imc_step()["line_scale"] < 0.63
    # The fresh loss rose tenfold: undone, and retaken from the earlier sample's system, which the
    # current frames (those of the overshooting step) cannot curve: no search.
    loss["value"] *= 10.0
    calls = sample.energy_calls
    retaken = t._imc_step()
    assert retaken["undone"] and "line_scale" not in retaken and sample.energy_calls == calls

    fit = quick_trainer(tmp_path, optimizer="imc", imc_line_search=True, imc_noise_shrink=True, max_epochs=2)
    for record in fit.fit():
        if record["imc"]["max_change_kT"] > 0:
            assert IMC_LINE_SEARCH_MIN <= record["imc"]["line_scale"] <= 1.0
            assert record["imc"]["line_model_loss"] <= record["imc"]["line_model_loss_full"] + 1e-15
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="imc_line_search"):
            quick_trainer(optimizer="imc", imc_line_search=bad)
