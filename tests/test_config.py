"""Tests for the TOML run configuration (openmm_diffsim.config)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import tomllib
import torch

from openmm_diffsim.config import (
    ConfigError,
    build_potential,
    build_table,
    example_config,
    load_config,
    parse_config,
)
from openmm_diffsim.potentials import (
    WCA,
    CubicSpline,
    LennardJones,
    ModifiedMorse,
    NeuralCorrection,
    PotentialSum,
    SoftSphere,
    Yukawa,
)
from openmm_diffsim.systems import MOLAR_GAS_CONSTANT


def _base() -> dict:
    """A small valid two-species configuration as a dict (what tomllib returns)."""
    return {
        "potential": {
            "species": ["Ar", "Kr"],
            "cutoff": 0.9,
            "pairs": {
                "Ar-Ar": {"type": "lennard-jones", "sigma": 0.34, "epsilon": 0.996},
                "Ar-Kr": {"type": "wca", "sigma": 0.35, "epsilon": 1.2},
                "Kr-Kr": {"type": "soft-sphere", "sigma": 0.36, "epsilon": 1.0, "exponent": 10},
            },
        },
        "state": [
            {
                "name": "mix",
                "counts": [100, 50],
                "masses": {"Ar": 39.948, "Kr": 83.8},
                "temperature": 120.0,
                "box": [2.5, 2.5, 2.5],
            }
        ],
        "training": {"method": "rollout", "learning_rate": 0.02, "max_epochs": 7},
        "sampling": {"timestep": 0.004, "interval": 20, "n_snapshots": 10, "equilibration": 0, "platform": "CPU"},
        "estimator": {"n_bins": 80, "smearing": 0.01},
        "output": {"directory": "out", "plot_every": 0},
    }


def test_example_config_round_trip(tmp_path):
    path = tmp_path / "argon.toml"
    path.write_text(example_config())
    config = load_config(path)
    table = config.table
    assert table.species == ["Ar"]
    assert table.cutoff == 1.0 and table.cutoff_mode == "shift"
    potential = table.pair_potentials[0]
    assert isinstance(potential, PotentialSum)
    prior, spline = potential.terms
    assert isinstance(prior, SoftSphere) and isinstance(spline, CubicSpline)
    # The spline starts at zero, so u(r) is the fixed soft-sphere prior, shifted at the cutoff.
    r = np.linspace(0.3, 0.95, 7)
    u, _ = table.evaluate(r, "Ar-Ar")
    expected = 0.996 * (0.3 / r) ** 12 - 0.996 * (0.3 / 1.0) ** 12
    np.testing.assert_allclose(u, expected, rtol=1e-10, atol=1e-12)
    # The prior is fixed, the spline values train.
    assert not any(p.requires_grad for p in prior.parameters())
    assert spline.values.requires_grad
    assert spline.knots.shape == (60,)
    assert float(spline.knots[0]) == pytest.approx(0.25) and float(spline.knots[-1]) == pytest.approx(1.0)

    (state,) = config.states
    assert state.name == "liquid" and state.counts == [500] and state.masses == [39.948]
    # T* = 1.2 and rho* = 0.8 for sigma = 0.34 nm, epsilon = 0.996 kJ/mol.
    assert state.temperature * MOLAR_GAS_CONSTANT / 0.996 == pytest.approx(1.2, rel=2e-3)
    assert state.density * 0.34**3 == pytest.approx(0.8, rel=2e-3)
    assert 0.5 * min(state.box) > table.cutoff
    assert config.method == "reweighting"
    assert config.trainer["estimator"] == "reweighting"
    assert config.trainer["boltzmann_initial_guess"] is True  # spline initial = "boltzmann"
    assert config.trainer["snapshot_interval"] == 50
    assert config.trainer["equilibration_steps"] == 1000
    assert config.trainer["sampler_options"]["timestep"] == 0.002
    assert config.output_dir == tmp_path / "argon-run"
    assert config.export["formats"] == ["torchscript", "openmm-xml", "tabulated-xml"]
    (spec,) = config.target_specs[0]
    assert spec.pair == ("Ar", "Ar") and spec.reference["type"] == "lennard-jones"
    assert config.pending_reference_targets() == [spec]


def test_base_config_maps_sections_to_trainer(tmp_path):
    config = parse_config(_base(), tmp_path)
    assert config.table.pair_names == ["Ar-Ar", "Ar-Kr", "Kr-Kr"]
    assert isinstance(config.table.pair_potentials[1], WCA)
    assert config.states[0].masses == [39.948, 83.8]
    assert config.trainer == {
        "learning_rate": 0.02,
        "max_epochs": 7,
        "n_snapshots": 10,
        "snapshot_interval": 20,
        "equilibration_steps": 0,
        "sampler_options": {"platform": "CPU", "timestep": 0.004},
        "estimator_options": {"n_bins": 80, "smearing": 0.01},
        "plot_every": 0,
        "output_dir": tmp_path / "out",
        "estimator": "rollout",
    }
    assert config.sampler_options == {"platform": "CPU", "timestep": 0.004}
    assert config.state("mix") is config.states[0]
    assert config.states[0].energy is None
    data = _base()
    data["state"][0]["energy"] = -4.5
    assert parse_config(data, tmp_path).states[0].energy == -4.5
    with pytest.raises(ConfigError, match="no state named 'mx'.*did you mean 'mix'"):
        config.state("mx")


def _set(path: str, value):
    """A modifier that sets a dotted key path (list indices as integers) in the base dict."""

    def modify(data):
        keys = [int(k) if k.isdigit() else k for k in path.split("/")]
        node = data
        for k in keys[:-1]:
            node = node[k]
        if value is _DELETE:
            del node[keys[-1]]
        else:
            node[keys[-1]] = value
        return data

    return modify


_DELETE = object()

BROKEN = [
    (_set("state/0/temperture", 100.0), r"state\[0\]\.temperture: unknown key \(did you mean 'temperature'\?\)"),
    (_set("state/0/temperature", "hot"), r"state\[0\]\.temperature: must be a number, got a string 'hot'"),
    (_set("state/0/temperature", -3), r"state\[0\]\.temperature: must be positive, got -3"),
    (
        _set("state/0/target", [{"file": "missing.dat", "pair": "Ar-Ar"}]),
        r"state\[0\]\.target\[0\]\.file: target file not found: .*missing\.dat",
    ),
    (
        _set("potential/pairs/Ar-Ar/type", "lenard-jones"),
        r"potential\.pairs\.\"Ar-Ar\"\.type: must be one of .* \(did you mean 'lennard-jones'\?\)",
    ),
    (_set("state/0/counts", {"Ar": 100, "Xe": 50}), r"state\[0\]\.counts: unknown species 'Xe'"),
    (
        _set("state/0/box", [1.5, 1.5, 1.5]),
        r"potential\.cutoff: 0\.9 nm exceeds half the shortest box edge of state\[0\]",
    ),
    (_set("potential/pairs/Ar-Kr", _DELETE), r"potential\.pairs: no potential given for pair type\(s\) Ar-Kr"),
    (
        _set("potential/pairs/Ar-Xe", {"type": "wca", "sigma": 0.3, "epsilon": 1.0}),
        r"potential\.pairs\.\"Ar-Xe\": unknown species 'Xe'",
    ),
    (_set("training/method", "reweigting"), r"training\.method: .*\(did you mean 'reweighting'\?\)"),
    (_set("trainig", {"max_epochs": 3}), r"^trainig: unknown key \(did you mean 'training'\?\)"),
    (_set("state/0/density", 10.0), r"state\[0\]: give exactly one of box \(nm\) or density"),
    (
        _set("export", {"formats": ["lamps"]}),
        r"export\.formats\[0\]: unknown format 'lamps' \(did you mean 'lammps'\?\)",
    ),
    (_set("training/max_epochs", True), r"training\.max_epochs: must be an integer, got a boolean True"),
    (_set("training/max_epochs", 2.5), r"training\.max_epochs: must be an integer, got a number 2\.5"),
    (
        _set("potential/pairs/Ar-Ar", {"type": "spline", "knots": 3, "r_min": 0.3}),
        r"potential\.pairs\.\"Ar-Ar\"\.knots: a cubic spline needs at least 4 knots, got 3",
    ),
    (
        _set("potential/pairs/Ar-Ar", {"type": "spline", "knots": 20}),
        r"potential\.pairs\.\"Ar-Ar\"\.r_min: required key is missing",
    ),
    (
        _set(
            "potential/pairs/Kr-Kr",
            {"type": "neural", "prior": {"type": "wca", "sigma": 0.3, "epsilom": 1.0}},
        ),
        r"potential\.pairs\.\"Kr-Kr\"\.prior\.epsilom: unknown key \(did you mean 'epsilon'\?\)",
    ),
    (_set("potential/cutoff_mode", "switch"), r"potential\.switch_distance: required with cutoff_mode = \"switch\""),
    (_set("state/0/masses", [39.948]), r"state\[0\]\.masses: must give one value per species"),
    (_set("state/0/species", ["Ar", "Xr"]), r"state\[0\]\.species: unknown species 'Xr'.*did you mean 'Kr'"),
    (_set("sampling/integrator", "verlet"), r"sampling\.integrator: must be one of 'langevin', 'nose-hoover'"),
    (_set("potential/pairs/Ar-Ar/sigma", -0.34), r"potential\.pairs\.\"Ar-Ar\"\.sigma: must be positive, got -0\.34"),
    (_set("state", []), r"^state: need at least one state point"),
    (_set("state/0/weight", -1), r"state\[0\]\.weight: must be non-negative, got -1"),
    (_set("state/0/energy", "low"), r"state\[0\]\.energy: must be a number, got a string 'low'"),
    (_set("training/imc_pool", 0), r"training\.imc_pool: must be positive, got 0"),
    (_set("training/imc_pool_radius", -0.1), r"training\.imc_pool_radius: must be positive, got -0\.1"),
    (_set("training/imc_max_cap", 0), r"training\.imc_max_cap: must be positive, got 0"),
    (_set("training/imc_check_last", 1), r"training\.imc_check_last: must be true or false, got an integer 1"),
    (
        _set("estimator", {"bin_weighting": "poisson"}),
        r"estimator\.bin_weighting: must be one of uniform, counting, relative, got 'poisson'",
    ),
]


@pytest.mark.parametrize(("modify", "message"), BROKEN, ids=[m for _, m in BROKEN])
def test_malformed_config_names_the_key(tmp_path, modify, message):
    data = modify(copy.deepcopy(_base()))
    with pytest.raises(ConfigError, match=message):
        parse_config(data, tmp_path)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_invalid_toml_and_missing_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[potential\nspecies = ['Ar']\n")
    with pytest.raises(ConfigError, match="bad.toml: not valid TOML"):
        load_config(path)
    with pytest.raises(ConfigError, match="configuration file not found"):
        load_config(tmp_path / "nope.toml")


def test_target_paths_are_relative_to_the_config_folder(tmp_path, monkeypatch):
    targets = pytest.importorskip("openmm_diffsim.targets")
    folder = tmp_path / "project"
    (folder / "data").mkdir(parents=True)
    r = np.linspace(0.01, 1.0, 50)
    g = 1.0 + np.exp(-((r - 0.38) ** 2) / 0.002)
    targets.write_rdf(folder / "data" / "ar.dat", r, g, pair=("Ar", "Ar"))
    # The same data in Angstrom in another column order.
    np.savetxt(folder / "data" / "kr_angstrom.dat", np.column_stack([g, 10 * r]))
    data = _base()
    data["state"][0]["target"] = [
        {"file": "data/ar.dat", "pair": "Ar-Ar"},
        {"file": "data/kr_angstrom.dat", "pair": ["Kr", "Kr"], "columns": [1, 0], "length_unit": "angstrom"},
    ]
    data["output"]["directory"] = "runs/one"
    (folder / "run.toml").write_text(_to_toml(data))
    monkeypatch.chdir(tmp_path)  # somewhere else: paths must not depend on the working directory
    config = load_config(folder / "run.toml")
    ar, kr = config.states[0].targets
    assert ar.pair == ("Ar", "Ar") and kr.pair == ("Kr", "Kr")
    np.testing.assert_allclose(ar.r, r, rtol=1e-12)
    np.testing.assert_allclose(kr.r, r, rtol=1e-12)
    np.testing.assert_allclose(kr.g, g, rtol=1e-12)
    assert ar.state == "mix"
    assert config.output_dir == folder / "runs" / "one"
    assert config.trainer["output_dir"] == folder / "runs" / "one"
    assert config.export["directory"] == folder / "runs" / "one" / "export"


def _to_toml(data: dict) -> str:
    """A minimal TOML writer for the test configurations (tables, arrays of tables, scalars, arrays)."""

    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v + '"'
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f'"{k}" = {value(x)}' for k, x in v.items()) + "}"
        return repr(v)

    lines = []

    def table(name, body):
        scalars = {k: v for k, v in body.items() if not isinstance(v, dict) and not _is_table_array(v)}
        lines.append(f"[{name}]")
        lines.extend(f'"{k}" = {value(v)}' for k, v in scalars.items())
        for k, v in body.items():
            if isinstance(v, dict):
                table(f'{name}."{k}"', v)
            elif _is_table_array(v):
                for item in v:
                    array_table(f'{name}."{k}"', item)

    def array_table(name, body):
        lines.append(f"[[{name}]]")
        for k, v in body.items():
            if not _is_table_array(v):
                lines.append(f'"{k}" = {value(v)}')
        for k, v in body.items():
            if _is_table_array(v):
                for item in v:
                    array_table(f"{name}.{k}", item)

    for key, body in data.items():
        if isinstance(body, list):
            for item in body:
                array_table(key, item)
        else:
            table(key, body)
    return "\n".join(lines) + "\n"


def _is_table_array(v) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def test_toml_writer_round_trips_the_base_config():
    assert tomllib.loads(_to_toml(_base())) == _base()


@pytest.mark.parametrize(
    ("spec", "reference"),
    [
        ({"type": "lennard-jones", "sigma": 0.34, "epsilon": 0.996}, LennardJones(0.34, 0.996)),
        ({"type": "wca", "sigma": 0.34, "epsilon": 0.996}, WCA(0.34, 0.996)),
        ({"type": "soft-sphere", "sigma": 0.3, "epsilon": 2.0, "exponent": 9}, SoftSphere(0.3, 2.0, 9.0)),
        ({"type": "yukawa", "amplitude": -3.0, "kappa": 2.5}, Yukawa(-3.0, 2.5)),
        (
            {"type": "modified-morse", "a": 5.5, "phi": -0.3, "sigma": 0.4, "epsilon": 1.5},
            ModifiedMorse(5.5, -0.3, 0.4, 1.5),
        ),
        (
            {"type": "spline", "knots": [0.3, 0.4, 0.6, 0.8, 1.0], "values": [5.0, -1.0, -0.2, -0.05, 0.0]},
            CubicSpline([0.3, 0.4, 0.6, 0.8, 1.0], [5.0, -1.0, -0.2, -0.05, 0.0]),
        ),
        ({"type": "neural", "n_basis": 8, "hidden": [6], "seed": 3}, NeuralCorrection(1.0, 8, (6,), 3)),
    ],
    ids=lambda x: x["type"] if isinstance(x, dict) else "",
)
def test_build_potential_matches_constructor(spec, reference):
    built = build_potential(spec, cutoff=1.0)
    assert type(built) is type(reference)
    r = torch.linspace(0.32, 0.99, 30, dtype=torch.float64)
    with torch.no_grad():
        u, du = built.energy_and_derivative(r)
        u_ref, du_ref = reference.energy_and_derivative(r)
    torch.testing.assert_close(u, u_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(du, du_ref, rtol=1e-12, atol=1e-12)
    assert all(p.requires_grad for p in built.parameters())


def test_build_potential_prior_and_trainable_flags():
    spec = {"type": "lennard-jones", "sigma": 0.34, "epsilon": 0.996, "trainable": False}
    assert not any(p.requires_grad for p in build_potential(spec).parameters())
    spec = {
        "type": "neural",
        "n_basis": 8,
        "hidden": [4],
        "prior": {"type": "wca", "sigma": 0.34, "epsilon": 0.996, "trainable": True},
    }
    built = build_potential(spec)
    assert isinstance(built, PotentialSum)
    prior, network = built.terms
    assert isinstance(prior, WCA) and isinstance(network, NeuralCorrection)
    assert all(p.requires_grad for p in built.parameters())
    with pytest.raises(ConfigError, match=r"potential\.prior\.prior: unknown key"):
        build_potential(
            {
                "type": "wca",
                "sigma": 0.3,
                "epsilon": 1.0,
                "prior": {"type": "wca", "sigma": 0.3, "epsilon": 1.0, "prior": {}},
            }
        )


def test_spline_knot_count_and_range_default_to_cutoff():
    spline = build_potential({"type": "spline", "knots": 11, "r_min": 0.2}, cutoff=0.7)
    np.testing.assert_allclose(spline.knots.numpy(), np.linspace(0.2, 0.7, 11))
    np.testing.assert_array_equal(spline.values.detach().numpy(), np.zeros(11))
    with pytest.raises(ConfigError, match=r"potential\.r_max: spline reaches 1\.2 nm, beyond the cutoff 0\.7 nm"):
        build_potential({"type": "spline", "knots": 11, "r_min": 0.2, "r_max": 1.2}, cutoff=0.7)


def test_build_table_switch_and_pair_order():
    table = build_table(
        {
            "species": ["B", "A"],
            "cutoff": 1.0,
            "cutoff_mode": "switch",
            "switch_distance": 0.8,
            "pairs": {
                "A-A": {"type": "wca", "sigma": 0.3, "epsilon": 1.0},
                "A-B": {"type": "yukawa", "amplitude": 1.0, "kappa": 1.0},
                "B-B": {"type": "lennard-jones", "sigma": 0.34, "epsilon": 0.996},
            },
        }
    )
    assert table.pair_names == ["B-B", "B-A", "A-A"]
    assert isinstance(table.pair_potentials[0], LennardJones)
    assert isinstance(table.pair_potentials[1], Yukawa)
    assert table.cutoff_mode == "switch" and table.switch_distance == 0.8
    with pytest.raises(ConfigError, match=r'potential\.pairs\."A-B": pair B-A given twice'):
        build_table(
            {
                "species": ["B", "A"],
                "cutoff": 1.0,
                "pairs": {
                    "B-A": {"type": "wca", "sigma": 0.3, "epsilon": 1.0},
                    "A-B": {"type": "wca", "sigma": 0.3, "epsilon": 1.0},
                    "A-A": {"type": "wca", "sigma": 0.3, "epsilon": 1.0},
                    "B-B": {"type": "wca", "sigma": 0.3, "epsilon": 1.0},
                },
            }
        )


def test_counts_masses_accept_tables_and_scalars(tmp_path):
    data = _base()
    data["state"][0]["counts"] = {"Kr": 50, "Ar": 100}
    data["state"][0]["masses"] = 40.0
    state = parse_config(data, tmp_path).states[0]
    assert state.counts == [100, 50] and state.masses == [40.0, 40.0]
    data["state"][0]["species"] = ["Kr"]
    data["state"][0]["counts"] = [64]
    state = parse_config(data, tmp_path).states[0]
    assert state.species == ["Kr"] and state.n_particles == 64


def test_boltzmann_initial_conflicts_with_explicit_false(tmp_path):
    data = _base()
    data["potential"]["pairs"]["Ar-Ar"] = {"type": "spline", "knots": 10, "r_min": 0.3, "initial": "boltzmann"}
    assert parse_config(data, tmp_path).trainer["boltzmann_initial_guess"] is True
    data["training"]["boltzmann_initial_guess"] = False
    with pytest.raises(ConfigError, match=r"training\.boltzmann_initial_guess"):
        parse_config(data, tmp_path)


def test_ibi_method_is_parsed_but_not_a_trainer_estimator(tmp_path):
    data = _base()
    data["training"]["method"] = "ibi"
    config = parse_config(data, tmp_path)
    assert config.method == "ibi" and "estimator" not in config.trainer
    with pytest.raises(ConfigError, match="not run by the Trainer"):
        config.make_trainer()


def test_make_trainer_accepts_the_configured_keywords(tmp_path):
    training = pytest.importorskip("openmm_diffsim.training")
    targets = pytest.importorskip("openmm_diffsim.targets")
    r = np.linspace(0.005, 1.0, 100)
    targets.write_rdf(tmp_path / "ar.dat", r, 1.0 + 0 * r, pair="Ar-Ar")
    data = _base()
    data["state"][0]["target"] = [{"file": "ar.dat", "pair": "Ar-Ar"}]
    data["training"].update(optimizer="sgd", lr_schedule="cosine", max_retries=2, clip_norm=5.0)
    data["sampling"]["reequilibration"] = 15
    config = parse_config(data, tmp_path)
    trainer = config.make_trainer(progress=False)
    assert isinstance(trainer, training.Trainer)
    assert trainer.options["optimizer"] == "sgd" and trainer.options["lr_schedule"] == "cosine"
    assert trainer.options["reequilibration_steps"] == 15 and trainer.options["snapshot_interval"] == 20
    assert trainer.options["estimator_options"] == {"n_bins": 80, "smearing": 0.01}
    assert trainer.estimator_name == "rollout"


def test_reference_target_is_simulated_once_and_cached(tmp_path, monkeypatch):
    """resolve_targets runs reference_rdfs for the state, writes the cache, and reuses it."""
    sampling = pytest.importorskip("openmm_diffsim.sampling")
    pytest.importorskip("openmm_diffsim.targets")
    calls = []

    def fake_reference_rdfs(state, table, **kwargs):
        calls.append((state.name, table, kwargs))
        r = np.linspace(0.005, 1.0, 100)
        g = np.stack([1.0 + 0.1 * k + 0 * r for k in range(3)])
        return r, g, None

    monkeypatch.setattr(sampling, "reference_rdfs", fake_reference_rdfs)
    data = _base()
    data["state"][0]["target"] = [
        {"pair": "Kr-Ar", "reference": {"type": "lennard-jones", "sigma": 0.3, "epsilon": 1.1}},
    ]
    config = parse_config(data, tmp_path)
    assert config.states[0].targets == []
    config.resolve_targets(n_snapshots=3, interval=5, equilibration_steps=0)
    (target,) = config.states[0].targets
    assert target.pair == ("Kr", "Ar")
    np.testing.assert_allclose(target.g, 1.1)  # the Ar-Kr row (pair type 1)
    ((name, table, kwargs),) = calls
    assert name == "mix" and kwargs["n_snapshots"] == 3 and kwargs["platform"] == "CPU"
    assert all(isinstance(p, LennardJones) for p in table.pair_potentials)
    assert (tmp_path / "out" / "targets" / "mix_Kr-Ar.dat").is_file()
    # A second configuration object reads the cache instead of simulating again.
    again = parse_config(data, tmp_path)
    again.resolve_targets()
    assert len(calls) == 1
    np.testing.assert_allclose(again.states[0].targets[0].g, 1.1)
    assert again.pending_reference_targets() == []


def test_reference_potential_is_validated_at_load(tmp_path):
    data = _base()
    data["state"][0]["target"] = [{"pair": "Ar-Ar", "reference": {"type": "lennard-jones", "sigma": 0.3}}]
    with pytest.raises(ConfigError, match=r"state\[0\]\.target\[0\]\.reference\.epsilon: required key is missing"):
        parse_config(data, tmp_path)
    data["state"][0]["target"] = [{"pair": "Ar-Ar"}]
    with pytest.raises(ConfigError, match=r"state\[0\]\.target\[0\]: give exactly one of file"):
        parse_config(data, tmp_path)


def test_documented_example_is_the_example_config():
    from pathlib import Path

    doc = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
    if not doc.is_file():
        pytest.skip("docs/configuration.md not present")
    text = doc.read_text()
    block = text.split("```toml\n", 1)[1].split("```", 1)[0]
    assert block == example_config()


def test_imc_check_last_reaches_the_trainer(tmp_path):
    data = copy.deepcopy(_base())
    assert "imc_check_last" not in parse_config(data, tmp_path).trainer  # the Trainer's default (true) applies
    data["training"]["imc_check_last"] = False
    assert parse_config(data, tmp_path).trainer["imc_check_last"] is False


@pytest.mark.parametrize("name, bad", [("imc_noise_shrink", "yes"), ("imc_line_search", 1)])
def test_imc_switches_reach_the_trainer(tmp_path, name, bad):
    data = copy.deepcopy(_base())
    assert name not in parse_config(data, tmp_path).trainer  # the Trainer's default (false) applies
    data["training"][name] = True
    assert parse_config(data, tmp_path).trainer[name] is True
    data["training"][name] = bad
    with pytest.raises(ConfigError, match=name):
        parse_config(data, tmp_path)


def test_imc_level_fraction_reaches_the_trainer(tmp_path):
    data = copy.deepcopy(_base())
    assert "imc_level_fraction" not in parse_config(data, tmp_path).trainer  # the Trainer's default (None) applies
    data["training"]["imc_level_fraction"] = 0.1
    assert parse_config(data, tmp_path).trainer["imc_level_fraction"] == 0.1
    data["training"]["imc_level_fraction"] = 0
    with pytest.raises(ConfigError, match=r"training\.imc_level_fraction: must be positive"):
        parse_config(data, tmp_path)


def test_imc_ibi_prior_reaches_the_trainer(tmp_path):
    data = copy.deepcopy(_base())
    assert "imc_ibi_prior" not in parse_config(data, tmp_path).trainer  # the Trainer's default (0) applies
    data["training"]["imc_ibi_prior"] = 0.01
    assert parse_config(data, tmp_path).trainer["imc_ibi_prior"] == 0.01
    data["training"]["imc_ibi_prior"] = -0.1
    with pytest.raises(ConfigError, match=r"training\.imc_ibi_prior: must be non-negative"):
        parse_config(data, tmp_path)
