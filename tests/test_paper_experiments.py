"""Tests for the bookkeeping of benchmarks/paper_experiments.py: seed averaging and the time-to-accuracy goal.

The experiments themselves take minutes to hours; these check, on made-up curves, the arithmetic that
decides the issue's goal, so that a wrong mean or a wrong crossing cannot pass unnoticed.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "paper_experiments.py"


def load_script(name: str):
    """A script of benchmarks/ as a module (they are not a package)."""
    spec = importlib.util.spec_from_file_location(name, SCRIPT.parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def paper():
    return load_script("paper_experiments")


def dilute_lj_state(pe):
    """A small state at T* = 1.2 whose target is the dilute-gas g(r) = exp(-u/kT) of the experiments' LJ."""
    from openmm_diffsim.systems import StatePoint
    from openmm_diffsim.targets import Target

    truth = pe.lj_table()
    kT = pe.kelvin(1.2) * pe.MOLAR_GAS_CONSTANT
    r = np.linspace(0.0125, 2.4875, 100)
    g = np.exp(-np.asarray(truth.evaluate(np.maximum(r, 0.5), 0)[0]) / kT)
    return StatePoint(
        "gas", ["A"], [64], [1.0], temperature=pe.kelvin(1.2), density=0.05, targets=[Target(r, g, ("A", "A"))]
    )


def entry(rmse, u, steps, seconds, final_u=None):
    """A method's entry with a curve through (steps, seconds, rmse, u) points after epochs 0, 1, 2, ..."""
    curve = [
        dict(epoch=k, md_steps=n, rollout_replica_steps=0, wall_time=t, cpu_time=t, train_rmse=e, u_rms_kT=v)
        for k, (e, v, n, t) in enumerate(zip(rmse, u, steps, seconds, strict=True))
    ]
    return dict(
        epochs=len(rmse) - 1,
        train_rmse=rmse[-1],
        train_mean_abs=rmse[-1] / 2,
        test_rmse=None,
        test_mean_abs=None,
        per_state={"s": {"rmse": rmse[-1], "mean_abs": rmse[-1] / 2}},
        u_error={"rms_kT": u[-1] if final_u is None else final_u, "max_kT": 3 * u[-1]},
        md_steps=steps[-1],
        rollout_replica_steps=0,
        wall_time=seconds[-1],
        cpu_time=seconds[-1],
        curve=curve,
    )


def test_aggregate_seeds_means_spread_and_bands(paper):
    a = entry([0.1, 0.05, 0.02], [0.5, 0.2, 0.1], [0, 100, 200], [0.0, 1.0, 2.0])
    b = entry([0.1, 0.03, 0.04], [0.5, 0.3, 0.2], [0, 100, 200], [0.0, 3.0, 4.0])
    out = paper.aggregate_seeds([a, b])
    assert out["train_rmse"] == pytest.approx(0.03)
    assert out["u_error"]["rms_kT"] == pytest.approx(0.15)
    assert out["sd"]["train_rmse"] == pytest.approx(np.std([0.02, 0.04], ddof=1))
    assert out["test_rmse"] is None  # no test states: no made-up number
    assert out["per_state"]["s"]["rmse"] == pytest.approx(0.03)
    middle = out["curve"][1]
    assert middle["train_rmse"] == pytest.approx(0.04) and middle["wall_time"] == pytest.approx(2.0)
    assert (middle["train_rmse_min"], middle["train_rmse_max"]) == (0.03, 0.05)
    assert (middle["u_rms_kT_min"], middle["u_rms_kT_max"]) == (0.2, 0.3)
    assert out["seeds"] == [a, b]
    shorter = entry([0.1, 0.05], [0.5, 0.2], [0, 100], [0.0, 1.0])
    with pytest.raises(ValueError, match="different epochs"):
        paper.aggregate_seeds([a, shorter])
    with pytest.raises(ValueError, match="at least 2 runs"):
        paper.aggregate_seeds([a])


def test_goal_needs_fewer_steps_less_time_and_a_better_potential(paper):
    ibi = entry([0.1, 0.05, 0.03, 0.02], [0.5, 0.3, 0.1, 0.05], [0, 100, 200, 300], [0.0, 10.0, 20.0, 30.0])
    fast = entry([0.1, 0.02, 0.02], [0.5, 0.04, 0.03], [0, 150, 300], [0.0, 12.0, 24.0])
    goal = paper.time_to_accuracy_goal({"ibi": ibi, "imc": fast})
    assert goal["ibi_final_rmse"] == 0.02 and goal["ibi_steps_to_it"] == 300 and goal["ibi_best_u_rms_kT"] == 0.05
    assert goal["methods"]["imc"]["steps_to_it"] == 150 and goal["goal_met_by"] == ["imc"]
    # A potential no better than IBI's best along its whole curve fails, however fast.
    worse_u = entry([0.1, 0.02, 0.02], [0.5, 0.06, 0.05], [0, 150, 300], [0.0, 12.0, 24.0])
    assert paper.time_to_accuracy_goal({"ibi": ibi, "imc": worse_u})["goal_met_by"] == []
    # Fewer steps but more wall time fails.
    slow = entry([0.1, 0.02, 0.02], [0.5, 0.04, 0.03], [0, 150, 300], [0.0, 31.0, 40.0])
    assert paper.time_to_accuracy_goal({"ibi": ibi, "imc": slow})["goal_met_by"] == []


def test_case_goal_per_seed_and_on_the_mean_curves(paper):
    ibi_1 = entry([0.1, 0.05, 0.02], [0.5, 0.3, 0.05], [0, 100, 200], [0.0, 10.0, 20.0])
    ibi_2 = entry([0.1, 0.04, 0.04], [0.5, 0.3, 0.06], [0, 100, 200], [0.0, 10.0, 20.0])
    imc_1 = entry([0.1, 0.02, 0.02], [0.5, 0.04, 0.04], [0, 50, 100], [0.0, 5.0, 10.0])  # meets it on seed 1
    imc_2 = entry([0.1, 0.05, 0.05], [0.5, 0.04, 0.04], [0, 50, 100], [0.0, 5.0, 10.0])  # never reaches 0.04
    methods = {"ibi": paper.aggregate_seeds([ibi_1, ibi_2]), "imc": paper.aggregate_seeds([imc_1, imc_2])}
    goal = paper.case_goal(methods)
    assert goal["per_seed_goal_met_by"] == [["imc"], []]
    # The mean curves: IBI ends at 0.03, imc reaches 0.035 at best, so not met on the means either.
    assert goal["ibi_final_rmse"] == pytest.approx(0.03)
    assert goal["methods"]["imc"]["reaches_ibi_rmse"] is False and goal["goal_met_by"] == []
    # Single-seed entries: no per-seed part.
    assert "per_seed" not in paper.case_goal({"ibi": ibi_1, "imc": imc_1})


def test_plot_title_says_what_the_curves_average(paper):
    one = entry([0.1, 0.05], [0.5, 0.2], [0, 100], [0.0, 1.0])
    three = paper.aggregate_seeds([one, one, one])
    assert paper._seed_label({"ibi": one, "imc": one}) == ""
    assert "mean of 3 seeds" in paper._seed_label({"ibi": three, "imc": three})
    # A method kept from a single-seed invocation: the title must not claim three seeds for it.
    assert "mean of" not in paper._seed_label({"ibi": three, "imc": one})


def test_run_case_refuses_a_non_positive_seed_count(paper, tmp_path):
    case = paper.all_cases(16)["lj"]
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="seeds must be a positive integer"):
            paper.run_case("lj", case, ["ibi"], "quick", tmp_path, None, seeds=bad)


def test_run_case_refuses_a_first_seed_below_the_first(paper, tmp_path):
    case = paper.all_cases(16)["lj"]
    for bad in (paper.FIRST_TRAINING_SEED - 1, 0, 12.0, True):
        with pytest.raises(ValueError, match="first_seed must be an integer"):
            paper.run_case("lj", case, ["ibi"], "quick", tmp_path, None, seeds=2, first_seed=bad)


def test_a_later_first_seed_moves_every_seed_on(paper, tmp_path, monkeypatch):
    """Training, noise-floor and evaluation seeds and the seed folders of --first-seed 14 are those of
    the 4th and 5th runs of an invocation from the first seed: independent of seeds 11-13."""
    evaluated, trained = [], []
    monkeypatch.setattr(paper, "attach_targets", lambda *args, **kwargs: ({}, {}))
    monkeypatch.setattr(paper, "spline_table_from_targets", lambda *args, **kwargs: "initial")
    monkeypatch.setattr(paper, "potential_error", lambda *args: {"rms_kT": 0.1})
    monkeypatch.setattr(paper, "case_goal", lambda methods: None)
    monkeypatch.setattr(
        paper, "evaluate_states", lambda table, states, scale, seed, platform, *rest: evaluated.append(seed) or {}
    )

    def fake_train_and_evaluate(method, initial, truth, train, test, scale, folder, seed_index, initial_rmse, **kw):
        trained.append((seed_index, folder.name))
        return {"train_rmse": 0.1, "test_rmse": None, "u_error": {"rms_kT": 0.1}, "md_steps": 0, "wall_time": 0.0}

    monkeypatch.setattr(paper, "train_and_evaluate", fake_train_and_evaluate)
    monkeypatch.setattr(paper, "aggregate_seeds", lambda runs: runs[0])
    case = paper.all_cases(16)["lj"]
    result = paper.run_case("lj", case, ["ibi"], "quick", tmp_path, None, seeds=2, first_seed=14)
    stride = paper.SEED_STRIDE
    assert trained == [(3, "seed-4"), (4, "seed-5")]
    # The noise floor (training, test states) per seed, then the initial guess per seed.
    noise = [7000 + 3 * stride, 7100 + 3 * stride, 7000 + 4 * stride, 7100 + 4 * stride]
    assert evaluated == noise + [8000 + 3 * stride, 8000 + 4 * stride]
    assert result["first_seed"] == 14 and result["n_seeds"] == 2
    # One run from a later seed still gets its own seed folder (it must not overwrite seed 11's layout).
    trained.clear()
    paper.run_case("lj", case, ["ibi"], "quick", tmp_path, None, seeds=1, first_seed=12)
    assert trained == [(1, "seed-2")]


@pytest.fixture(scope="module")
def regions():
    return load_script("potential_error_regions")


def test_potential_error_split_into_wall_and_beyond(regions):
    """The wall is the resolved rising edge below g = 1; both parts recombine into the script's own measure."""
    from types import SimpleNamespace

    pe = regions.pe
    truth = pe.lj_table()
    kT = 1.2
    r = np.linspace(0.0125, 2.4875, 100)
    u, _ = truth.evaluate(np.maximum(r, 0.5), 0)
    g = np.exp(-np.asarray(u) / kT)  # dilute gas: 1 at r = σ, above 1 in the well
    state = SimpleNamespace(kT=kT, targets=[SimpleNamespace(r=r, g=g, pair=("A", "A"))])
    masks = regions.region_masks([state])
    edge = r[np.nonzero(g >= 1.0)[0][0]]
    np.testing.assert_array_equal(masks["wall"], (g > 0.1) & (r < edge))
    np.testing.assert_array_equal(masks["beyond"], (g > 0.1) & (r >= edge) & (r < pe.CUTOFF))
    assert 2 <= masks["wall"].sum() <= 6 and masks["beyond"].sum() > 50
    # The truth itself, or the truth shifted by a constant: no error anywhere.
    same = regions.error_by_region(truth, truth, [state])
    assert same["resolved"] == same["wall"] == same["beyond"] == 0.0
    # Another potential: the resolved rms is the script's u(r) error, and the parts recombine into it.
    other = pe.PairTable(["A"], pe.LennardJones(1.02, 0.9), cutoff=pe.CUTOFF, cutoff_mode="shift")
    split = regions.error_by_region(other, truth, [state])
    assert split["resolved"] == pytest.approx(pe.potential_error(other, truth, [state])["rms_kT"], rel=1e-12)
    n_wall, n_beyond = masks["wall"].sum(), masks["beyond"].sum()
    recombined = np.sqrt((n_wall * split["wall"] ** 2 + n_beyond * split["beyond"] ** 2) / (n_wall + n_beyond))
    assert recombined == pytest.approx(split["resolved"], rel=1e-12)
    # The plotted profile is the same centred error, bin by bin.
    r_resolved, profile = regions.centred_profile(other, truth, [state])
    np.testing.assert_array_equal(r_resolved, r[masks["resolved"]])
    assert np.sqrt(np.mean(profile**2)) == pytest.approx(split["resolved"], rel=1e-9)
    assert abs(profile.mean()) < 1e-12
    assert split["wall"] > split["beyond"] > 0  # a changed σ moves the steep wall most
    # The removed offset is the mean difference, and the uncentred rms recombines it with the centred one.
    diff = (other.evaluate(r[masks["resolved"]], 0)[0] - truth.evaluate(r[masks["resolved"]], 0)[0]) / kT
    assert split["offset"] == pytest.approx(float(np.mean(diff)), rel=1e-12) and split["offset"] != 0.0
    assert split["uncentred"] ** 2 == pytest.approx(split["resolved"] ** 2 + split["offset"] ** 2, rel=1e-10)
    whole = pe.potential_error(other, truth, [state])
    assert whole["uncentred_rms_kT"] == pytest.approx(split["uncentred"], rel=1e-12)
    assert whole["offset_kT"] == pytest.approx(split["offset"], rel=1e-12)
    assert split["worst_wall_kT"] >= split["wall"]


def test_potential_error_profiles_are_plotted(regions, tmp_path):
    r = np.linspace(0.8, 2.4, 20)
    profiles = {"initial": [(r, 0.1 * np.sin(r))], "ibi": [(r, 0.02 * r), (r, -0.02 * r)]}
    path = regions.plot_profiles(tmp_path / "sub" / "profile.png", profiles, "a title")
    assert path.exists() and path.stat().st_size > 1000


def fake_trainer(on_epoch, records=None):
    """A stand-in for Trainer in ``train``: each of ``max_epochs`` epochs calls ``on_epoch(options)``,
    then the callbacks with that epoch's record (``records[k]``, or an empty one)."""

    class FakeTrainer:
        def __init__(self, table, states, estimator, callbacks, max_epochs, **options):
            self.options, self.callbacks, self.max_epochs = dict(options), callbacks, max_epochs
            self.table, self.epoch, self.history = table, 0, []
            self.md_steps = self.rollout_steps = 0
            self.wall_time = 0.0

        def fit(self):
            for k in range(self.max_epochs):
                on_epoch(self.options)
                record = records[k] if records is not None else {}
                self.epoch += 1
                self.history.append(record)
                for callback in self.callbacks:
                    callback(self, record)

    return FakeTrainer


def test_polish_schedule_changes_the_options_after_its_epoch(paper, tmp_path, monkeypatch):
    """imc-polish: the trainer's options switch to the POLISH values once `after_epoch` epochs are done."""
    seen = []
    monkeypatch.setattr(
        paper, "Trainer", fake_trainer(lambda options: seen.append((options["n_snapshots"], options["imc_smoothing"])))
    )
    schedule = paper.POLISH["imc-polish"]
    epochs = schedule["after_epoch"] + 2
    paper.train("imc-polish", object(), [], epochs, tmp_path, seed=1, platform=None, points=3)
    before = (paper.METHOD_SETTINGS["imc-polish"]["n_snapshots"], paper.METHOD_SETTINGS["imc-polish"]["imc_smoothing"])
    after = (schedule["n_snapshots"], schedule["imc_smoothing"])
    assert before != after
    assert seen == [before] * schedule["after_epoch"] + [after] * 2
    # Other methods keep their settings throughout.
    seen.clear()
    paper.train("imc-grow", object(), [], 8, tmp_path, seed=1, platform=None, points=3)
    assert set(seen) == {before}


def test_late_samples_grow_once_a_samples_loss_nears_its_noise(paper, tmp_path, monkeypatch):
    """imc-line-late: 100-frame samples until an epoch's loss falls below 3x its block noise, then 300."""
    seen = []
    # (loss, block noise) of each epoch; the first epoch has no noise yet (no step to judge).
    records = [
        {"loss": 1e-3},
        {"loss": 1e-3, "imc": {"loss_noise": 1e-4}},
        {"loss": 2e-4, "imc": {"loss_noise": float("nan")}},
        {"loss": 2e-4, "imc": {"loss_noise": 1e-4}},
        {"loss": 1e-3, "imc": {"loss_noise": 1e-4}},
    ]
    monkeypatch.setattr(paper, "Trainer", fake_trainer(lambda options: seen.append(options["n_snapshots"]), records))
    paper.train("imc-line-late", object(), [], len(records), tmp_path, seed=1, platform=None, points=2)
    assert paper.METHOD_SETTINGS["imc-line-late"]["n_snapshots"] == 100
    assert seen == [100, 100, 100, 100, 300]
    seen.clear()
    paper.train("imc-line", object(), [], len(records), tmp_path, seed=1, platform=None, points=2)
    assert seen == [100] * 5


def test_imc_then_ibi_hands_the_first_steps_potential_to_ibi_and_adds_up_the_costs(paper, tmp_path, monkeypatch):
    """imc-then-ibi: one epoch of imc-line (its last step not re-checked), then IBI for the remaining
    epochs from the potential that step left; the curve and the run count both phases' epochs, MD steps
    and wall time."""
    calls = []

    def fake(kind, steps, seconds):
        class Fake:
            def __init__(self, table, states, *estimator, callbacks, max_epochs, **options):
                calls.append(dict(kind=kind, table=table, estimator=estimator, max_epochs=max_epochs, **options))
                self.table, self.callbacks, self.max_epochs = (
                    dict(table, by=[*table["by"], kind]),
                    callbacks,
                    max_epochs,
                )
                self.options, self.epoch, self.history = options, 0, []
                self.md_steps = self.rollout_steps = 0
                self.wall_time = 0.0

            def fit(self):
                for _ in range(self.max_epochs):
                    self.epoch += 1
                    self.md_steps += steps
                    self.wall_time += seconds
                    self.history.append({})
                    for callback in self.callbacks:
                        callback(self, {})

        return Fake

    monkeypatch.setattr(paper, "Trainer", fake("imc", 5000, 2.0))
    monkeypatch.setattr(paper, "IBI", fake("ibi", 2600, 1.0))
    start = {"by": []}
    epochs = paper.SCALES["reduced"]["epochs"]["imc-then-ibi"]
    assert epochs == paper.SCALES["reduced"]["epochs"]["ibi"]
    run, saved = paper.train("imc-then-ibi", start, [], epochs, tmp_path, seed=3, platform=None, points=epochs)
    first, then = calls
    line = paper.METHOD_SETTINGS["imc-line"]
    assert first["kind"] == "imc" and first["estimator"] == ("reweighting",) and first["max_epochs"] == 1
    assert first["optimizer"] == "imc" and first["imc_line_search"] is line["imc_line_search"] is True
    assert first["imc_check_last"] is False and first["n_snapshots"] == line["n_snapshots"]
    assert first["output_dir"] == tmp_path / "first-steps" and first["seed"] == 3
    assert then["kind"] == "ibi" and then["estimator"] == () and then["max_epochs"] == epochs - 1
    assert then["table"] == {"by": ["imc"]} and then["output_dir"] == tmp_path
    assert all(then[key] == value for key, value in paper.METHOD_SETTINGS["ibi"].items())
    assert "optimizer" not in then and start == {"by": []}
    # The curve's epochs count both phases, and so do its costs.
    points = paper.curve_epochs(epochs, epochs)
    assert points[0] == 1 and 2 in points and points[-1] == epochs
    assert [p["epoch"] for p in saved] == points
    assert [p["md_steps"] for p in saved] == [5000 + 2600 * (k - 1) for k in points]
    assert [p["wall_time"] for p in saved] == pytest.approx([2.0 + 1.0 * (k - 1) for k in points])
    assert saved[0]["table"] == {"by": ["imc"]} and saved[-1]["table"] == {"by": ["imc", "ibi"]}
    assert (run.epoch, run.md_steps, run.wall_time) == (epochs, 5000 + 2600 * (epochs - 1), 2.0 + epochs - 1)
    # With the pressure and energy as targets the first phase fits them in its loss, IBI by its ramp.
    calls.clear()
    weights = {"pressure_weight": 0.017, "energy_weight": 0.53}
    paper.train("imc-then-ibi", start, [], 3, tmp_path, seed=3, platform=None, points=2, thermo=weights)
    first, then = calls
    assert first["estimator_options"]["pressure_weight"] == 0.017 and "pressure_correction" not in first
    assert then["pressure_correction"] is True and "pressure_weight" not in then["estimator_options"]
    # A budget no longer than the first phase is refused before anything runs.
    calls.clear()
    with pytest.raises(ValueError, match="imc-then-ibi hands over to IBI after 1 epoch"):
        paper.train("imc-then-ibi", start, [], 1, tmp_path, seed=3, platform=None, points=1)
    assert calls == []


def test_newton_step_regions_initial_trainer_is_the_first_step_of_a_fit(paper):
    """--initial: a trainer at the experiments' initial guess with the method's settings and the asked frames."""
    module = load_script("newton_step_regions")
    pe = module.pe
    state = dilute_lj_state(pe)
    trainer = module.initial_trainer("imc-shrink-light", [state], frames=37, seed=3)
    settings = pe.METHOD_SETTINGS["imc-shrink-light"]
    assert trainer.options["n_snapshots"] == 37 and trainer.options["optimizer"] == "imc"
    assert trainer.options["imc_smoothing"] == settings["imc_smoothing"] == 0.01
    assert trainer.options["imc_noise_shrink"] is True
    guess = pe.initial_table([state])
    grid = np.linspace(0.9, 2.45, 40)
    np.testing.assert_allclose(trainer.table.evaluate(grid, 0)[0], guess.evaluate(grid, 0)[0], rtol=0, atol=1e-12)


def test_initial_table_inverts_through_the_estimators_kernel_unless_asked_not_to(paper):
    """The default start is the deconvolved inversion (a steeper wall than the plain one); bad names are refused."""
    state = dilute_lj_state(paper)
    deconvolved, plain = paper.initial_table([state]), paper.initial_table([state], "plain")
    reference = paper.spline_table_from_targets([state], paper.CUTOFF, knot_spacing=paper.KNOT_SPACING)
    grid = np.linspace(0.9, 2.45, 40)
    np.testing.assert_allclose(plain.evaluate(grid, 0)[0], reference.evaluate(grid, 0)[0], rtol=0, atol=1e-12)
    r = np.asarray(state.targets[0].r)
    wall = r[(np.asarray(state.targets[0].g) > 0.1)][:2]
    assert np.all(deconvolved.evaluate(wall, 0)[0] > plain.evaluate(wall, 0)[0])
    with pytest.raises(ValueError, match="guess must be one of"):
        paper.initial_table([state], "smooth")
    assert paper.results_guess({}) == "plain" and paper.results_guess({"initial_guess": "deconvolved"}) == "deconvolved"


def test_main_refuses_to_mix_guesses_in_one_results_file(paper, tmp_path):
    """Methods kept from an earlier invocation must share the new runs' start: a plain-guess results.json
    (no initial_guess key) is refused with --guess deconvolved before anything is simulated."""
    (tmp_path / "results.json").write_text(json.dumps({"lj": {"methods": {}}}))
    with pytest.raises(SystemExit):
        paper.main(["--cases", "lj", "--methods", "ibi", "--quick", "--output", str(tmp_path)])
    assert not (tmp_path / "targets").exists()


class Constructed(Exception):
    """Raised by a runner's ``fit`` (monkeypatched): carries the runner ``train`` built."""


def built_runner(paper, monkeypatch, method, state, folder, **options):
    """The Trainer or IBI that ``paper.train`` constructs for ``method``, stopped before it fits."""

    def stop(self):
        raise Constructed(self)

    monkeypatch.setattr(paper.Trainer, "fit", stop)
    monkeypatch.setattr(paper.IBI, "fit", stop)
    table = paper.spline_table_from_targets([state], paper.CUTOFF, knot_spacing=paper.KNOT_SPACING)
    with pytest.raises(Constructed) as built:
        paper.train(method, table, [state], 2, folder, seed=1, platform=None, points=2, **options)
    return built.value.args[0]


def test_a_variant_of_a_methods_settings_keeps_the_methods_runner(paper, screen, monkeypatch, tmp_path):
    """train(settings=...): what imc_variant_screen.py passes; the method's name still picks IBI or the Trainer."""
    state = dilute_lj_state(paper)
    ibi = built_runner(
        paper, monkeypatch, "ibi", state, tmp_path / "ibi", settings=screen.variant_settings("ibi", {"mixing": 0.3})
    )
    assert isinstance(ibi, paper.IBI) and ibi.options["mixing"] == 0.3
    variant = screen.variant_settings("gauss-newton", {"n_snapshots": 7})
    newton = built_runner(paper, monkeypatch, "gauss-newton", state, tmp_path / "gn", settings=variant)
    assert isinstance(newton, paper.Trainer) and newton.options["optimizer"] == "gauss-newton"
    assert newton.options["n_snapshots"] == 7 and paper.METHOD_SETTINGS["gauss-newton"]["n_snapshots"] == 50


def test_every_method_settings_are_accepted_by_its_runner(paper, monkeypatch, tmp_path):
    """Each method's settings, as ``train`` passes them, construct a real Trainer or IBI (no option left stale)."""
    state = dilute_lj_state(paper)
    assert set(paper.METHOD_SETTINGS) <= set(paper.METHODS) | {"imc"}
    for method in paper.METHODS:
        run = built_runner(paper, monkeypatch, method, state, tmp_path / method)
        # A HANDOVER method's first runner is the first phase's.
        first = paper.HANDOVER.get(method)
        settings = dict(paper.METHOD_SETTINGS[first["method"]], **first["overrides"]) if first else {}
        settings = settings or paper.METHOD_SETTINGS.get(method, {})
        settings = {k: v for k, v in settings.items() if k != "estimator_options"}
        for key, value in settings.items():
            if key in run.options:
                assert run.options[key] == value, (method, key)
    # The phase after the handover is a real IBI with the method's settings.
    assert set(paper.HANDOVER) == {"imc-then-ibi"}
    monkeypatch.setattr(paper.Trainer, "fit", lambda self: setattr(self, "epoch", 1))
    with pytest.raises(Constructed) as built:
        table = paper.spline_table_from_targets([state], paper.CUTOFF, knot_spacing=paper.KNOT_SPACING)
        paper.train("imc-then-ibi", table, [state], 2, tmp_path / "handover", seed=1, platform=None, points=2)
    then = built.value.args[0]
    assert isinstance(then, paper.IBI) and then.options["max_epochs"] == 1
    for key, value in paper.METHOD_SETTINGS["imc-then-ibi"].items():
        assert then.options[key] == value, key


def test_thermo_targets_reach_every_runner(paper, monkeypatch, tmp_path):
    """--thermo: IBI adds its pressure ramp, the estimators get the weights, the states their targets."""
    state = dilute_lj_state(paper)
    state.pressure, state.energy = 2.8, -1.9
    weights = {"pressure_weight": 0.017, "energy_weight": 0.53}
    for method in ("ibi", "imc-prior", "reweighting", "rollout"):
        run = built_runner(paper, monkeypatch, method, state, tmp_path / method, thermo=weights)
        if method == "ibi":
            assert run.options["pressure_correction"] is True
        else:
            options = run.options["estimator_options"]
            assert options["pressure_weight"] == 0.017 and options["energy_weight"] == 0.53
        run = built_runner(paper, monkeypatch, method, state, tmp_path / f"{method}-plain")
        if method == "ibi":
            assert run.options["pressure_correction"] is False
        else:
            assert "pressure_weight" not in run.options["estimator_options"]
    statistics = dict(g_variance=0.02, n_bins=100, pressure_variance=0.5, energy_variance=0.01)
    assert paper.thermo_weights(statistics) == pytest.approx({"pressure_weight": 4e-4, "energy_weight": 0.02})
    double = dict(statistics, pressure_variance=0.25, energy_variance=0.005)
    assert paper.thermo_options({"a": statistics, "b": double}) == (
        pytest.approx({"pressure_weight": 6e-4, "energy_weight": 0.03})
    )


def test_thermodynamic_targets_are_the_truths_and_weigh_noise_like_an_rdf_bin(paper):
    """Pressure and energy of the frames against the package's own observables; weights from block variances."""
    import torch

    from openmm_diffsim.energy import potential_energy
    from openmm_diffsim.observables import compute_partial_rdfs, virial_pressure
    from openmm_diffsim.sampling import Sampler
    from openmm_diffsim.systems import StatePoint

    truth = paper.lj_table()
    state = StatePoint("liquid", ["A"], [128], [1.0], temperature=paper.kelvin(1.2), density=0.5)
    sampler = Sampler(state, truth, seed=3, timestep=paper.SAMPLER["timestep"])
    sampler.minimize()
    sampler.equilibrate(500)
    frames = sampler.run(40, 20)
    out = paper.thermodynamic_targets(state, truth, frames)
    positions, boxes = torch.as_tensor(frames.positions), torch.as_tensor(frames.boxes)
    species = torch.as_tensor(state.particle_species())
    with torch.no_grad():
        pressure = virial_pressure(truth, positions, boxes, species, temperature=state.temperature).numpy()
        energy = [float(potential_energy(truth, x, b, species)) / 128 for x, b in zip(positions, boxes, strict=True)]
    assert out["pressure"] == pytest.approx(pressure.mean(), rel=1e-12)
    assert out["energy"] == pytest.approx(np.mean(energy), rel=1e-12)
    # Ten blocks of four frames.
    g = np.stack(
        [
            compute_partial_rdfs(positions[b : b + 4], boxes[b : b + 4], species, 1, **paper.RDF_GRID)[1]
            for b in range(0, 40, 4)
        ]
    )
    p_blocks = pressure.reshape(10, 4).mean(1)
    u_blocks = np.reshape(energy, (10, 4)).mean(1)
    assert out["g_variance"] == pytest.approx(g.var(axis=0, ddof=1).mean(), rel=1e-9)
    assert out["pressure_variance"] == pytest.approx(p_blocks.var(ddof=1), rel=1e-9)
    assert out["energy_variance"] == pytest.approx(u_blocks.var(ddof=1), rel=1e-9)
    assert out["pressure_error"] == pytest.approx(p_blocks.std(ddof=1) / np.sqrt(10), rel=1e-9)
    assert out["n_bins"] == g.shape[-1] == paper.RDF_GRID["n_bins"] and out["energy"] < 0
    # Each number weighs like one RDF bin against its noise.
    weights = paper.thermo_weights(out)
    assert weights["pressure_weight"] == pytest.approx(
        g.var(axis=0, ddof=1).mean() / (g.shape[-1] * p_blocks.var(ddof=1)), rel=1e-9
    )
    assert weights["energy_weight"] == pytest.approx(
        g.var(axis=0, ddof=1).mean() / (g.shape[-1] * u_blocks.var(ddof=1)), rel=1e-9
    )
    # Bad input: too few frames, or frames that do not sample the state (one configuration repeated).
    with pytest.raises(ValueError, match="at least 10 target frames"):
        paper.thermodynamic_targets(state, truth, sampler.run(5, 10))
    frozen = sampler.run(10, 10)
    frozen.positions[:] = frozen.positions[0]
    with pytest.raises(
        ValueError, match="state 'liquid': the (pressure|energy) variance over 10 blocks .* do not sample the state"
    ):
        paper.thermodynamic_targets(state, truth, frozen)


def test_target_cache_gains_thermodynamic_targets_without_losing_its_rdfs(paper, tmp_path):
    """RDF-only targets, then --thermo on the same cache: one extra run of the truth, then none."""
    from openmm_diffsim.systems import StatePoint

    def case():
        state = StatePoint("liquid", ["A"], [64], [1.0], temperature=paper.kelvin(1.2), density=0.5)
        return {"truth": paper.lj_table, "train": [state], "test": [], "family": "lj"}

    plain = case()
    spent, statistics = paper.attach_targets("lj", plain, "quick", tmp_path, None)
    (file,) = tmp_path.glob("*.npz")
    assert set(spent) == {"liquid"} and statistics == {}
    assert set(np.load(file)) == {"r", "g"} and getattr(plain["train"][0], "pressure", None) is None
    g = np.load(file)["g"]

    thermo = case()
    spent, statistics = paper.attach_targets("lj", thermo, "quick", tmp_path, None, thermo=True)
    assert set(spent) == {"liquid (thermo)"}  # the RDFs were read, the statistics simulated
    stored = np.load(file)
    np.testing.assert_array_equal(stored["g"], g)
    assert set(paper.THERMO_KEYS) <= set(stored) and statistics["liquid"]["pressure"] == stored["pressure"]
    state = thermo["train"][0]
    assert state.pressure == statistics["liquid"]["pressure"] and state.energy < 0
    np.testing.assert_array_equal(state.targets[0].g, g[0])
    assert not list(tmp_path.glob("*.tmp"))  # written atomically, nothing left behind

    again = case()
    spent, repeated = paper.attach_targets("lj", again, "quick", tmp_path, None, thermo=True)
    assert spent == {} and repeated == statistics


@pytest.fixture(scope="module")
def screen():
    return load_script("imc_variant_screen")


def test_screen_reads_overrides_as_json_and_merges_estimator_options(screen, paper):
    overrides = screen.parse_overrides(
        ["imc_ibi_prior=0.1", "imc_line_search=false", 'estimator_options={"bin_weighting": "relative"}']
    )
    assert overrides == {
        "imc_ibi_prior": 0.1,
        "imc_line_search": False,
        "estimator_options": {"bin_weighting": "relative"},
    }
    settings = screen.variant_settings("imc-counting", overrides)
    assert settings["imc_ibi_prior"] == 0.1 and settings["imc_line_search"] is False
    # Merged into the method's own estimator options (imc-counting weights by counting: replaced by the key).
    assert settings["estimator_options"] == {"bin_weighting": "relative"}
    assert paper.METHOD_SETTINGS["imc-counting"]["estimator_options"] == {"bin_weighting": "counting"}
    assert (
        screen.variant_settings("rollout", {"estimator_options": {"n_steps": 50}})["estimator_options"]["n_replicas"]
        == 4
    )


def test_screen_names_bad_overrides(screen):
    with pytest.raises(ValueError, match="KEY=VALUE"):
        screen.parse_overrides(["imc_ibi_prior"])
    with pytest.raises(ValueError, match="JSON object"):
        screen.parse_overrides(["estimator_options=3"])
    with pytest.raises(ValueError, match="unknown method"):
        screen.variant_settings("imc-nonsense", {})


def test_screen_refuses_a_file_that_is_not_its_own(screen, tmp_path):
    assert screen.read_rows(tmp_path / "none.json") == []
    bad = tmp_path / "screen.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not a screen file"):
        screen.read_rows(bad)
    bad.write_text('{"a": 1}')
    with pytest.raises(ValueError, match="no list of rows"):
        screen.read_rows(bad)
    # The command line stops before any target or fit (nothing simulated into --targets), as it
    # does for a mixture case.
    targets = tmp_path / "targets"
    with pytest.raises(SystemExit):
        screen.main(["--case", "lj", "--output", str(tmp_path), "--targets", str(targets)])
    with pytest.raises(SystemExit):
        screen.main(["--case", "binary-x0.5", "--output", str(tmp_path / "other"), "--targets", str(targets)])
    assert not targets.exists() and not (tmp_path / "other").exists()


@pytest.fixture(scope="module")
def reevaluation():
    return load_script("reevaluate_final")


def test_reevaluation_averages_single_runs_and_pools_g(reevaluation, monkeypatch):
    """``single`` is the mean of the runs' RMSEs, ``pooled`` the RMSE of their mean g; fresh seeds per run."""
    from types import SimpleNamespace

    pe = reevaluation.pe
    r = np.linspace(0.0125, 2.4875, 100)
    target = np.ones_like(r)
    state = SimpleNamespace(name="s", targets=[SimpleNamespace(r=r, g=target, pair=("A", "A"))])
    # Run j misses the target by +0.1 and -0.1 alternately: each run's RMSE is 0.1, their mean g is exact.
    offsets = iter([0.1, -0.1, 0.1, -0.1])
    seeds = []

    def fake(state, table, protocol, seed, platform, snapshots=False):
        seeds.append(seed)
        return r, (target + next(offsets))[None, :], None

    monkeypatch.setattr(pe, "simulate_rdfs", fake)
    row = reevaluation.reevaluate("table", [state], 4, seed=123, scale="reduced", platform=None)
    assert row["single"] == pytest.approx(0.1) and row["single_se"] == pytest.approx(0.0, abs=1e-12)
    assert row["single_runs"] == pytest.approx([0.1] * 4)
    assert row["pooled"] == pytest.approx(0.0, abs=1e-12)
    assert seeds == [123 + j * pe.REPEAT_STRIDE for j in range(4)]
    with pytest.raises(ValueError, match="at least 2"):
        reevaluation.reevaluate("table", [state], 1, seed=1, scale="reduced", platform=None)
    # A blown-up re-simulation is named, not averaged.
    monkeypatch.setattr(pe, "simulate_rdfs", lambda *a, **k: (r, np.full((1, r.size), np.nan), None))
    with pytest.raises(ValueError, match="re-simulation at s .*non-finite g"):
        reevaluation.reevaluate("table", [state], 2, seed=1, scale="reduced", platform=None)


def test_run_files_of_seed_folders_and_single_runs(paper, tmp_path):
    for k in (4, 5):
        (tmp_path / "case" / "ibi" / f"seed-{k}").mkdir(parents=True)
        (tmp_path / "case" / "ibi" / f"seed-{k}" / "checkpoint.pt").write_bytes(b"")
    (tmp_path / "case" / "imc").mkdir(parents=True)
    (tmp_path / "case" / "imc" / "checkpoint.pt").write_bytes(b"")
    found = paper.run_files(tmp_path, "case", "ibi")
    assert [(i, p.parent.name) for i, p in found] == [(3, "seed-4"), (4, "seed-5")]
    assert [i for i, _ in paper.run_files(tmp_path, "case", "imc")] == [0]
    assert paper.run_files(tmp_path, "case", "missing") == []
    (tmp_path / "case" / "ibi" / "seed-x").mkdir()
    (tmp_path / "case" / "ibi" / "seed-x" / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="seed-x is not a seed folder"):
        paper.run_files(tmp_path, "case", "ibi")


def test_analyses_of_trained_runs_never_simulate_new_targets(paper, reevaluation, tmp_path, capsys):
    case = paper.all_cases(16)["lj"]
    with pytest.raises(FileNotFoundError, match="no cached targets of lj: .*quick_lj_rho0.3.npz"):
        paper.attach_targets("lj", case, "quick", tmp_path, None, simulate_missing=False)
    assert not any(tmp_path.iterdir())
    with pytest.raises(SystemExit):
        reevaluation.main(["lj", "ibi", "--output", str(tmp_path)])
    assert "no cached targets of lj" in capsys.readouterr().err


def test_repeated_evaluations_average_fresh_runs_and_keep_the_first_runs_seed(paper, monkeypatch):
    """``repeats`` re-simulations per state (the first with the one-run seed), their errors averaged."""
    from types import SimpleNamespace

    r = np.linspace(0.0125, 2.4875, 100)
    target = np.ones_like(r)
    states = [SimpleNamespace(name=n, targets=[SimpleNamespace(r=r, g=target, pair=("A", "A"))]) for n in "ab"]
    seeds = []

    def fake(state, table, protocol, seed, platform, snapshots=False):
        seeds.append(seed)
        miss = 0.01 * (len(seeds))  # every run misses by another constant
        return r, (target + miss)[None, :], None

    monkeypatch.setattr(paper, "simulate_rdfs", fake)
    once = paper.evaluate_states("table", states, "reduced", 50, None)
    assert seeds == [50, 51] and once["a"]["rmse"] == pytest.approx(0.01) and "rmse_runs" not in once["a"]
    seeds.clear()
    thrice = paper.evaluate_states("table", states, "reduced", 50, None, repeats=3)
    stride = paper.REPEAT_STRIDE
    assert seeds == [50, 50 + stride, 50 + 2 * stride, 51, 51 + stride, 51 + 2 * stride]
    assert thrice["a"]["rmse_runs"] == pytest.approx([0.01, 0.02, 0.03])
    assert thrice["a"]["rmse"] == pytest.approx(0.02) and thrice["b"]["rmse"] == pytest.approx(0.05)
    assert thrice["a"]["mean_abs"] == pytest.approx(0.02)
    assert thrice["a"]["pooled_rmse"] == pytest.approx(0.02) and "pooled_rmse" not in once["a"]
    # Means over seeds average the errors and join the runs.
    joined = paper._mean_per_state([thrice, thrice])
    assert joined["a"]["rmse"] == pytest.approx(0.02) and len(joined["a"]["rmse_runs"]) == 6
    with pytest.raises(ValueError, match="repeats must be a positive integer"):
        paper.evaluate_states("table", states, "reduced", 50, None, repeats=0)


def test_main_refuses_to_mix_evaluation_repeats_in_one_results_file(paper, tmp_path, capsys):
    (tmp_path / "results.json").write_text(json.dumps({"lj": {"initial_guess": "deconvolved", "methods": {}}}))
    with pytest.raises(SystemExit):
        paper.main(["--cases", "lj", "--methods", "ibi", "--output", str(tmp_path), "--evaluation-repeats", "4"])
    assert "evaluated with 1 run(s) per evaluation, not --evaluation-repeats 4" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        paper.main(["--cases", "lj", "--output", str(tmp_path), "--evaluation-repeats", "0"])
    assert "--evaluation-repeats takes a positive integer" in capsys.readouterr().err


def test_curve_potentials_round_trip_and_name_what_is_wrong(paper, tmp_path):
    import torch

    saved = [
        dict(epoch=e, md_steps=100 * e, rollout_replica_steps=0, wall_time=float(e), cpu_time=2.0 * e, table=t)
        for e, t in ((1, paper.lj_table()), (3, paper.morse_table(5.5, 0.44)))
    ]
    path = paper.save_curve_potentials(tmp_path / "case" / "ibi" / "seed-2", saved)
    assert path == tmp_path / "case" / "ibi" / "seed-2" / paper.CURVE_POTENTIALS
    assert paper.run_files(tmp_path, "case", "ibi", paper.CURVE_POTENTIALS) == [(1, path)]
    assert paper.run_files(tmp_path, "case", "ibi") == []  # no final checkpoint written here
    loaded = paper.load_curve_potentials(path)
    assert [p["epoch"] for p in loaded] == [1, 3] and loaded[1]["md_steps"] == 300
    r = np.linspace(0.9, 2.4, 7)
    assert np.allclose(loaded[1]["table"].evaluate(r, 0)[0], saved[1]["table"].evaluate(r, 0)[0])
    bad = tmp_path / "bad.pt"
    for points, message in (
        ([], "no list of curve points"),
        ([dict(saved[0], table="spline")], "holds a str, not a PairTable"),
        ([{k: v for k, v in saved[0].items() if k != "wall_time"}], "curve point 0 lacks wall_time"),
        ([saved[1], saved[0]], "epochs are not increasing"),
    ):
        torch.save(points, bad)
        with pytest.raises(ValueError, match=message):
            paper.load_curve_potentials(bad)


def rows_of(single, pooled, u, steps, seconds):
    """Re-simulated curve rows (initial guess first) as reevaluate_final --curves makes them."""
    return [
        dict(epoch=k, md_steps=n, rollout_replica_steps=0, wall_time=t, cpu_time=t, single=a, pooled=b, u_rms_kT=v)
        for k, (a, b, v, n, t) in enumerate(zip(single, pooled, u, steps, seconds, strict=True))
    ]


def test_curve_goals_decide_the_goal_on_each_statistic(reevaluation):
    """The same re-simulated curves can meet the goal on the mean of one-run errors and miss it pooled."""
    ibi = rows_of([0.1, 0.05, 0.04], [0.09, 0.03, 0.02], [0.2, 0.05, 0.04], [0, 100, 200], [0.0, 10.0, 20.0])
    imc = rows_of([0.1, 0.03, 0.03], [0.09, 0.025, 0.025], [0.2, 0.03, 0.02], [0, 50, 100], [0.0, 5.0, 10.0])
    u = {"rms_kT": 0.02, "max_kT": 0.05}
    goals = reevaluation.curve_goals({"ibi": [{"rows": ibi, "u_error": u}], "imc-line": [{"rows": imc, "u_error": u}]})
    single, pooled = goals["single"]["goal"], goals["pooled"]["goal"]
    assert single["ibi_final_rmse"] == 0.04 and single["ibi_steps_to_it"] == 200
    assert single["methods"]["imc-line"]["steps_to_it"] == 50 and single["goal_met_by"] == ["imc-line"]
    assert pooled["ibi_final_rmse"] == 0.02 and pooled["goal_met_by"] == []
    assert goals["single"]["methods"]["imc-line"]["curve"][1]["train_rmse"] == 0.03
    # Two runs per method: the mean curves decide, each run its own per-seed goal.
    twice = reevaluation.curve_goals(
        {"ibi": [{"rows": ibi, "u_error": u}] * 2, "imc-line": [{"rows": imc, "u_error": u}] * 2}
    )
    assert twice["single"]["goal"]["per_seed_goal_met_by"] == [["imc-line"], ["imc-line"]]
    with pytest.raises(ValueError, match="statistic must be one of"):
        reevaluation.curve_entry(ibi, u, "median")


def test_reevaluate_curves_from_saved_potentials(reevaluation, tmp_path, monkeypatch, capsys):
    """--curves re-simulates every saved potential and the initial guess with fresh seeds and decides
    the goal on them: here IMC's potentials fit better and sooner, which one-run noise hides."""
    import copy

    pe = reevaluation.pe
    case = pe.all_cases(pe.SCALES["quick"]["n"])["lj"]
    kT = pe.kelvin(1.2) * pe.MOLAR_GAS_CONSTANT
    r = np.linspace(0.0125, 2.4875, 100)
    truth = pe.lj_table()
    g = np.exp(-np.asarray(truth.evaluate(np.maximum(r, 0.5), 0)[0]) / kT)
    (tmp_path / "targets").mkdir()
    for state in case["train"] + case["test"]:
        pe.save_targets(tmp_path / "targets" / f"quick_lj_{state.name}.npz", {"r": r, "g": g[None, :]})
    (tmp_path / "results.json").write_text(json.dumps({"lj": {"initial_guess": "plain", "methods": {}}}))

    def table_missing_by(miss):
        table = copy.deepcopy(truth)
        table.fake_miss = miss
        return table

    # IBI's potentials miss the target by 0.05 then 0.02; IMC's by 0.03 then 0.01, at half the cost.
    for method, misses, cost in (("ibi", (0.05, 0.02), 100), ("imc-line", (0.03, 0.01), 50)):
        for seed in (1, 2):
            saved = [
                dict(
                    epoch=k + 1,
                    md_steps=cost * (k + 1),
                    rollout_replica_steps=0,
                    wall_time=float(cost * (k + 1)),
                    cpu_time=0.0,
                    table=table_missing_by(miss),
                )
                for k, miss in enumerate(misses)
            ]
            pe.save_curve_potentials(tmp_path / "lj" / method / f"seed-{seed}", saved)
    seeds = []

    def fake(state, table, protocol, seed, platform, snapshots=False):
        # Every run misses by the potential's own error, plus run-to-run noise of +-0.005.
        seeds.append(seed)
        noise = 0.005 if (seed // pe.REPEAT_STRIDE) % 2 == 0 else -0.005
        return r, (g + getattr(table, "fake_miss", 0.08) + noise)[None, :], None

    monkeypatch.setattr(pe, "simulate_rdfs", fake)
    argv = ["lj", "ibi", "imc-line", "--output", str(tmp_path), "--scale", "quick", "--repeats", "2", "--curves"]
    assert reevaluation.main(argv) == 0
    out = json.loads((tmp_path / "lj_curve_reevaluation.json").read_text())
    assert out["initial_guess"] == "plain" and out["repeats"] == 2
    rows = out["curves"]["imc-line"][1]["rows"]
    assert [row["epoch"] for row in rows] == [0, 1, 2] and rows[2]["md_steps"] == 100
    assert rows[2]["single"] == pytest.approx(0.01) and rows[2]["pooled"] == pytest.approx(0.01)
    assert rows[0]["single"] == pytest.approx(0.08)  # the initial guess carries no marker
    for statistic in ("single", "pooled"):
        goal = out["goal"][statistic]
        assert goal["ibi_final_rmse"] == pytest.approx(0.02) and goal["ibi_steps_to_it"] == 200
        assert goal["methods"]["imc-line"]["steps_to_it"] == 100
        assert (tmp_path / f"reevaluated-2-{statistic}" / "lj_time_to_accuracy_steps.png").exists()
    # Fresh seeds, apart from the evaluations' own (7000-9199 per seed index): the truth (4 runs by
    # default), the initial guess, then point k of seed index i, the same for every method.
    runs = [pe.REPEAT_STRIDE * j for j in range(2)]
    expected = [5000 + j for j in runs + [pe.REPEAT_STRIDE * j for j in (2, 3)]] + [5500 + j for j in runs]
    for _method in ("ibi", "imc-line"):
        for i in (0, 1):
            expected += [6000 + 10 * (k + 1) + pe.SEED_STRIDE * i + j for k in (0, 1) for j in runs]
    assert seeds == expected
    assert "goal on the re-simulated curves (single)" in capsys.readouterr().out
    # A folder without curve potentials is named.
    with pytest.raises(SystemExit):
        reevaluation.main(["lj", "rollout", "--output", str(tmp_path), "--scale", "quick", "--curves"])
    assert "no curve_potentials.pt of rollout" in capsys.readouterr().err
    # A malformed curve file, or a folder that does not say its start, is named before anything is simulated.
    seeds.clear()
    (tmp_path / "lj" / "ibi" / "seed-2" / pe.CURVE_POTENTIALS).write_bytes(b"not a torch file")
    with pytest.raises(SystemExit):
        reevaluation.main(argv)
    err = capsys.readouterr().err
    assert "seed-2" in err and "not a curve potentials file" in err and seeds == []
    pe.save_curve_potentials(tmp_path / "lj" / "ibi" / "seed-2", [])
    with pytest.raises(SystemExit):
        reevaluation.main(argv)
    assert "holds no list of curve points" in capsys.readouterr().err and seeds == []
    pe.save_curve_potentials(tmp_path / "lj" / "ibi" / "seed-2", saved)
    (tmp_path / "results.json").unlink()
    with pytest.raises(SystemExit):
        reevaluation.main(argv)
    assert "does not say which guess lj started from" in capsys.readouterr().err and seeds == []
