"""Tests for the ``openmm-diffsim`` command (openmm_diffsim.cli)."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
import torch

from openmm_diffsim.cli import load_table, main
from openmm_diffsim.config import load_config
from openmm_diffsim.potentials import WCA, LennardJones, PairTable

SMALL_CONFIG = """
[potential]
species = ["Ar"]
cutoff = 0.7

[potential.pairs."Ar-Ar"]
type = "lennard-jones"
sigma = 0.34
epsilon = 0.996

[[state]]
name = "liquid"
counts = [64]
masses = [39.948]
temperature = 120.0
density = 20.0

[training]
method = "{method}"
max_epochs = 3

[sampling]
platform = "Reference"
n_snapshots = 4
interval = 10
equilibration = 20

[output]
directory = "run"

[export]
formats = {formats}
"""


def _write_config(tmp_path, method="reweighting", formats='["torchscript", "lammps"]', name="run.toml"):
    path = tmp_path / name
    path.write_text(SMALL_CONFIG.replace("{method}", method).replace("{formats}", formats))
    return path


def test_init_writes_a_parseable_config_and_refuses_to_overwrite(tmp_path, capsys):
    path = tmp_path / "new" / "argon.toml"
    assert main(["init", str(path)]) == 0
    config = load_config(path)
    assert config.table.species == ["Ar"] and config.states[0].name == "liquid"
    assert main(["init", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("openmm-diffsim: error: ") and "exists; pass --force" in err
    assert main(["init", "--force", str(path)]) == 0


def test_bad_config_exits_2_with_the_key_and_no_traceback(tmp_path, capsys):
    path = _write_config(tmp_path)
    path.write_text(path.read_text().replace("temperature = 120.0", "temperature = -3"))
    assert main(["fit", str(path)]) == 2
    err = capsys.readouterr().err
    assert "openmm-diffsim: error: state[0].temperature: must be positive, got -3" in err
    assert "Traceback" not in err
    with pytest.raises(Exception, match="must be positive"):
        main(["--debug", "fit", str(path)])
    with pytest.raises(Exception, match="must be positive"):
        main(["fit", str(path), "--debug"])


def test_usage_errors_exit_2(tmp_path, capsys):
    assert main(["frobnicate"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "missing.pt"), "--format", "lammps", "-o", str(tmp_path / "x")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert main(["export", "x.pt", "--format", "pdf", "-o", "y"]) == 2
    assert main(["--help"]) == 0


def test_ibi_reports_not_available(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "openmm_diffsim.ibi", None)  # import fails even once ibi.py exists
    path = _write_config(tmp_path, method="ibi")
    assert main(["fit", str(path)]) == 2
    assert "not available yet" in capsys.readouterr().err


def _trajectory(tmp_path, n_frames=4, seed=0):
    import mdtraj

    rng = np.random.default_rng(seed)
    top = mdtraj.Topology()
    chain = top.add_chain()
    for k in range(60):
        name = "Ar" if k < 36 else "Kr"
        residue = top.add_residue(name, chain)
        top.add_atom(name, mdtraj.element.get_by_symbol(name), residue)
    lengths = np.array([2.0, 2.2, 2.1])
    xyz = rng.uniform(0, 1, size=(n_frames, 60, 3)) * lengths
    traj = mdtraj.Trajectory(
        xyz.astype(np.float32),
        top,
        unitcell_lengths=np.tile(lengths, (n_frames, 1)),
        unitcell_angles=np.full((n_frames, 3), 90.0),
    )
    traj.save_dcd(str(tmp_path / "traj.dcd"))
    traj[0].save_pdb(str(tmp_path / "top.pdb"))
    return mdtraj.load(str(tmp_path / "traj.dcd"), top=str(tmp_path / "top.pdb"))


@pytest.mark.parametrize("pair", [("Ar", "Kr"), ("Ar", "Ar")])
def test_rdf_matches_mdtraj(tmp_path, pair):
    import mdtraj

    traj = _trajectory(tmp_path)
    out = tmp_path / "rdf.dat"
    argv = ["rdf", str(tmp_path / "traj.dcd"), "--top", str(tmp_path / "top.pdb"), "--pair", *pair]
    assert main(argv + ["--r-max", "0.9", "--bins", "45", "-o", str(out)]) == 0
    data = np.loadtxt(out)
    pairs = traj.topology.select_pairs(f"name {pair[0]}", f"name {pair[1]}")
    r_ref, g_ref = mdtraj.compute_rdf(traj, pairs, r_range=(0.0, 0.9), n_bins=45)
    np.testing.assert_allclose(data[:, 0], r_ref, rtol=1e-6)
    np.testing.assert_allclose(data[:, 1], g_ref, rtol=1e-5, atol=1e-8)
    assert f"# pair: {pair[0]}-{pair[1]}" in out.read_text()


def test_rdf_selection_and_errors(tmp_path, capsys):
    import mdtraj

    traj = _trajectory(tmp_path)
    out = tmp_path / "rdf.csv"
    dcd, top = str(tmp_path / "traj.dcd"), str(tmp_path / "top.pdb")
    assert main(["rdf", dcd, "--top", top, "--selection", "index 0 to 29", "--bins", "30", "-o", str(out)]) == 0
    pairs = traj.topology.select_pairs("index 0 to 29", "index 0 to 29")
    _, g_ref = mdtraj.compute_rdf(traj, pairs, r_range=(0.0, 1.0), n_bins=30)
    from openmm_diffsim.targets import read_target

    target = read_target(out)
    np.testing.assert_allclose(target.g, g_ref, rtol=1e-5, atol=1e-8)
    assert main(["rdf", dcd, "--top", top, "--pair", "Ar", "Xe", "-o", str(out)]) == 2
    assert "selection 'name Xe' matches no atoms" in capsys.readouterr().err
    assert main(["rdf", dcd, "--top", str(tmp_path / "nope.pdb"), "-o", str(out)]) == 2
    assert "no such topology" in capsys.readouterr().err


def _two_species_table():
    return PairTable(
        ["A", "B"],
        {("A", "A"): LennardJones(0.34, 0.996), ("A", "B"): WCA(0.3, 1.2), ("B", "B"): LennardJones(0.36, 0.8)},
        cutoff=0.9,
        cutoff_mode="shift",
    )


def test_export_saved_table_to_lammps_and_torchscript(tmp_path):
    pytest.importorskip("openmm_diffsim.export")
    table = _two_species_table()
    saved = tmp_path / "table.pt"
    torch.save(table, saved)
    lammps = tmp_path / "out" / "pair.table"
    argv = ["export", str(saved), "--format", "lammps", "--r-min", "0.25", "--n-points", "300", "-o", str(lammps)]
    assert main(argv) == 0
    text = lammps.read_text()
    for name in ("A_A", "A_B", "B_B"):
        assert f"\n{name}\n" in "\n" + text
    # Check the A-B section against the table itself.
    lines = text.splitlines()
    start = lines.index("A_B")
    rows = np.array([list(map(float, line.split())) for line in lines[start + 3 : start + 3 + 300]])
    u, du = table.evaluate(rows[:, 1], "A-B")
    np.testing.assert_allclose(rows[:, 2], u, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(rows[:, 3], -du, rtol=1e-6, atol=1e-9)

    script = tmp_path / "model.pt"
    assert main(["export", str(saved), "--format", "torchscript", "-o", str(script)]) == 0
    extra = {"openmm_diffsim.json": ""}
    module = torch.jit.load(str(script), _extra_files=extra)
    assert json.loads(extra["openmm_diffsim.json"])["species"] == ["A", "B"]
    r = torch.linspace(0.3, 0.85, 20, dtype=torch.float64)
    kinds = torch.tensor([0, 1, 2] * 6 + [0, 1])
    with torch.no_grad():
        torch.testing.assert_close(module(r, kinds), table(r, kinds), rtol=1e-12, atol=1e-12)

    # The TorchScript file loads back as a tabulated table with the same u(r).
    rebuilt = load_table(script)
    u_back, _ = rebuilt.evaluate(np.linspace(0.3, 0.85, 40), "B-B")
    u_true, _ = table.evaluate(np.linspace(0.3, 0.85, 40), "B-B")
    np.testing.assert_allclose(u_back, u_true, rtol=1e-5, atol=1e-6)


def test_export_state_dict_needs_config(tmp_path, capsys):
    pytest.importorskip("openmm_diffsim.export")
    config_path = _write_config(tmp_path)
    config = load_config(config_path)
    trained = config.table
    with torch.no_grad():
        trained.pair_potentials[0].epsilon.fill_(1.5)
    state_file = tmp_path / "checkpoint.pt"
    torch.save({"epoch": 3, "table_state": trained.state_dict()}, state_file)
    out = tmp_path / "gmx"
    assert main(["export", str(state_file), "--format", "gromacs", "-o", str(out)]) == 2
    assert "pass --config" in capsys.readouterr().err
    argv = ["export", str(state_file), "--format", "gromacs", "--config", str(config_path), "-o", str(out)]
    assert main(argv + ["--r-min", "0.2", "--dr", "0.002"]) == 0
    (xvg,) = [p for p in out.iterdir() if "Ar" in p.name]
    data = np.loadtxt(xvg, comments=("#", "@"))
    inside = (data[:, 0] > 0.3) & (data[:, 0] < 0.65)
    u, _ = PairTable(["Ar"], LennardJones(0.34, 1.5), cutoff=0.7).evaluate(data[inside, 0])
    np.testing.assert_allclose(data[inside, 5], u, rtol=1e-6, atol=1e-8)


def test_export_system_xml_uses_the_config_state(tmp_path):
    pytest.importorskip("openmm_diffsim.export")
    config_path = _write_config(tmp_path)
    torch.save(load_config(config_path).table, tmp_path / "table.pt")
    xml = tmp_path / "system.xml"
    argv = ["export", str(tmp_path / "table.pt"), "--format", "tabulated-xml", "--config", str(config_path)]
    assert main(argv + ["--state", "liquid", "-o", str(xml)]) == 0
    import openmm

    system = openmm.XmlSerializer.deserialize(xml.read_text())
    assert system.getNumParticles() == 64
    assert system.getParticleMass(0).value_in_unit(openmm.unit.dalton) == pytest.approx(39.948)
    assert main(["export", str(tmp_path / "table.pt"), "--format", "openmm-xml", "-o", str(xml)]) == 2


class _FakeTrainer:
    """Stands in for training.Trainer: records its arguments, returns a two-epoch history."""

    created: list = []

    def __init__(self, table, states, **kwargs):
        self.table, self.states, self.kwargs = table, states, kwargs
        _FakeTrainer.created.append(self)

    @classmethod
    def resume(cls, output_dir, **overrides):
        trainer = cls.created[-1]
        trainer.resumed_from = output_dir
        trainer.resume_overrides = overrides
        return trainer

    def fit(self):
        return [{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.25}]


def test_fit_builds_the_trainer_from_the_config_and_exports(tmp_path, monkeypatch, capsys):
    pytest.importorskip("openmm_diffsim.export")
    fake = types.ModuleType("openmm_diffsim.training")
    fake.Trainer = _FakeTrainer
    monkeypatch.setitem(sys.modules, "openmm_diffsim.training", fake)
    _FakeTrainer.created.clear()
    path = _write_config(tmp_path)
    assert main(["fit", str(path), "--max-epochs", "2", "--output", str(tmp_path / "elsewhere")]) == 0
    (trainer,) = _FakeTrainer.created
    assert trainer.kwargs["max_epochs"] == 2
    assert trainer.kwargs["estimator"] == "reweighting"
    assert trainer.kwargs["output_dir"] == tmp_path / "elsewhere"
    assert trainer.kwargs["snapshot_interval"] == 10
    assert trainer.kwargs["sampler_options"] == {"platform": "Reference"}
    assert [s.name for s in trainer.states] == ["liquid"]
    out = capsys.readouterr().out
    assert "final loss 0.25" in out
    assert (tmp_path / "elsewhere" / "export" / "model.pt").is_file()
    assert (tmp_path / "elsewhere" / "export" / "pair_table.lammps").is_file()
    argv = ["fit", str(path), "--resume", "--output", str(tmp_path / "elsewhere"), "--max-epochs", "5"]
    assert main(argv) == 0
    assert trainer.resumed_from == tmp_path / "elsewhere"
    assert trainer.resume_overrides == {"max_epochs": 5}


def test_demo_quick_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--output", str(out), "--quick"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 4 and summary["md_steps_training"] > 0
    assert np.isfinite(summary["final_loss"])
    # By default the demo fits the state's pressure and energy next to the RDF, and reports both.
    from openmm_diffsim import demo

    assert summary["pressure_target"] == demo.TARGET_PRESSURE and summary["energy_target"] == demo.TARGET_ENERGY
    assert np.isfinite(summary["pressure_last_sample"]) and -20.0 < summary["energy_last_sample"] < 5.0
    for name in ("potential.png", "potential_vs_truth.png", "loss.png", "rdf_argon-liquid.png"):
        assert (out / "plots" / name).stat().st_size > 1000
    # The exported tabulated system reproduces the learned potential's energy.
    import openmm

    from openmm_diffsim.demo import demo_state
    from openmm_diffsim.training import Trainer

    table = Trainer.resume(out).table
    state = demo_state()
    system = openmm.XmlSerializer.deserialize((out / "export" / "system_tabulated.xml").read_text())
    positions = state.initial_positions(seed=1)
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(positions)
    energy = context.getState(getEnergy=True).getPotentialEnergy().value_in_unit_system(openmm.unit.md_unit_system)
    from openmm_diffsim.energy import potential_energy

    expected = float(
        potential_energy(
            table,
            torch.as_tensor(positions),
            torch.as_tensor(state.box_lengths),
            torch.as_tensor(state.particle_species()),
        ).detach()
    )
    assert energy == pytest.approx(expected, rel=1e-5, abs=1e-3)


def test_sample_writes_trajectory_and_rdf(tmp_path):
    import mdtraj

    pytest.importorskip("openmm_diffsim.sampling")
    path = _write_config(tmp_path)
    dcd = tmp_path / "md" / "traj.dcd"
    argv = ["sample", str(path), "--state", "liquid", "--steps", "60", "--interval", "20", "--dcd", str(dcd)]
    assert main(argv + ["--equilibrate", "20", "--bins", "40", "--seed", "1"]) == 0
    traj = mdtraj.load(str(dcd), top=str(dcd.with_suffix(".pdb")))
    assert traj.n_frames == 3 and traj.n_atoms == 64
    data = np.loadtxt(tmp_path / "md" / "traj_rdf.dat")
    assert data.shape == (40, 2)
    # Same frames through mdtraj's estimator (float32 DCD: loose tolerance).
    _, g_ref = mdtraj.compute_rdf(
        traj, traj.topology.select_pairs("all", "all"), (0.0, data[-1, 0] + 0.5 * (data[1, 0] - data[0, 0])), n_bins=40
    )
    np.testing.assert_allclose(data[:, 1], g_ref, rtol=1e-3, atol=1e-3)


@pytest.mark.slow
def test_fit_end_to_end_with_the_real_trainer(tmp_path, capsys):
    """A two-epoch reweighting run on 64 particles against a simulated LJ target, then resume and export."""
    pytest.importorskip("openmm_diffsim.training")
    path = _write_config(tmp_path, formats='["tabulated-xml", "lammps"]')
    text = path.read_text().replace("epsilon = 0.996\n\n[[state]]", "epsilon = 0.9\n\n[[state]]")
    text = text.replace(
        "density = 20.0\n",
        'density = 20.0\n[[state.target]]\nreference = { type = "lennard-jones", sigma = 0.34, epsilon = 0.996 }\n',
    )
    text = text.replace("max_epochs = 3", "max_epochs = 2").replace('platform = "Reference"', 'platform = "CPU"')
    path.write_text(text + "\n[estimator]\nr_range = [0.0, 0.7]\nn_bins = 70\n")
    assert main(["fit", str(path)]) == 0
    run = tmp_path / "run"
    assert (run / "checkpoint.pt").is_file() and (run / "targets" / "liquid_Ar-Ar.dat").is_file()
    assert (run / "export" / "system_tabulated.xml").is_file()
    assert main(["fit", str(path), "--resume", "--max-epochs", "3"]) == 0
    assert "finished 3 epoch(s)" in capsys.readouterr().out
    table = load_table(run)
    assert float(table.pair_potentials[0].epsilon) != pytest.approx(0.9, abs=1e-6)


def test_demo_potential_error_removes_only_the_cutoff_convention():
    import openmm_diffsim as od
    from openmm_diffsim import demo
    from openmm_diffsim.targets import read_target

    target = read_target(demo.demo_target_path(), pair=("Ar", "Ar"))
    kT = demo.demo_state().kT
    # The truth itself, shifted instead of truncated: no error at all.
    shifted = od.PairTable(["Ar"], od.LennardJones(demo.TRUE_SIGMA, demo.TRUE_EPSILON), cutoff=1.0, cutoff_mode="shift")
    exact = demo.potential_error(shifted, target, kT)
    assert exact["u_max_error_kT"] < 1e-9 and exact["u_rms_error_kT"] < 1e-9
    # A 10 % deeper well: the error is 0.1 u_LJ(r) (shifted), computed here independently.
    deeper = od.PairTable(
        ["Ar"], od.LennardJones(demo.TRUE_SIGMA, 1.1 * demo.TRUE_EPSILON), cutoff=1.0, cutoff_mode="shift"
    )
    error = demo.potential_error(deeper, target, kT)
    r = np.asarray(target.r)
    r = r[(np.asarray(target.g) > 0.1) & (r < 1.0)]

    def lj(x):
        return 4 * demo.TRUE_EPSILON * ((demo.TRUE_SIGMA / x) ** 12 - (demo.TRUE_SIGMA / x) ** 6)

    expected = 0.1 * (lj(r) - lj(1.0)) / kT
    assert error["u_max_error_kT"] == pytest.approx(np.abs(expected).max(), rel=1e-6)
    assert error["u_rms_error_kT"] == pytest.approx(np.sqrt(np.mean(expected**2)), rel=1e-6)
    # Removing the best constant instead can only look better.
    assert error["u_rms_error_kT_mean_offset"] <= error["u_rms_error_kT"]


def test_demo_grows_the_imc_sample_only_for_its_last_steps():
    from types import SimpleNamespace

    from openmm_diffsim import demo

    def trainer_after(done, loss, **final):
        trainer = SimpleNamespace(options={"max_epochs": 10, "n_snapshots": 100, "progress": False})
        demo._grow_samples(trainer, {"epoch": done - 1, "loss": loss}, **final)
        return trainer.options["n_snapshots"]

    assert trainer_after(3, 1e-5) == 100  # converged early: still the small sample (bounded cost)
    assert trainer_after(7, 1e-5) == 600  # the last three steps take the large sample
    assert trainer_after(8, 1e-2) == 100  # far from the target: no growth
    assert trainer_after(7, 1e-5, final=400) == 400  # --final-snapshots


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(final_snapshots=0), "final_snapshots must be a positive integer"),
        (dict(final_snapshots=2.5), "final_snapshots must be a positive integer"),
        (dict(final_snapshots=400, optimizer="adam"), "final_snapshots applies to optimizer='imc' only"),
    ],
)
def test_demo_refuses_a_bad_final_sample_size(tmp_path, options, message):
    from openmm_diffsim import demo

    with pytest.raises(ValueError, match=message):
        demo.run_demo(tmp_path / "demo", quick=True, **options)
    assert not (tmp_path / "demo").exists()  # refused before anything ran or was written


def test_make_demo_target_writes_the_rdf_and_reports_pressure_and_energy(tmp_path, monkeypatch):
    from openmm_diffsim import demo
    from openmm_diffsim.targets import read_target

    monkeypatch.setattr(demo, "TARGET_PROTOCOL", dict(n_snapshots=20, interval=10, equilibration=200))
    path = tmp_path / "target.dat"
    out = demo.make_demo_target(path, seeds=(1, 2))
    assert out["g_per_seed"].shape == (2, demo.RDF_GRID["n_bins"])
    np.testing.assert_allclose(out["g"], out["g_per_seed"].mean(0))
    written = read_target(path, pair=("Ar", "Ar"))
    np.testing.assert_allclose(written.g, out["g"], rtol=1e-6, atol=1e-8)
    assert "LangevinMiddle 10 fs" in path.read_text().splitlines()[1]
    # The shipped target lies on the grid every fit and check of the demo uses.
    shipped = read_target(demo.demo_target_path(), pair=("Ar", "Ar"))
    np.testing.assert_allclose(shipped.r, written.r, atol=1e-12)
    # Short runs from a lattice: near, not at, the shipped targets (liquid argon at 120 K).
    for key, low, high in (("pressure", -2000.0, 3000.0), ("energy", -5.5, -4.0)):
        assert len(out[key]) == 2 and all(low < v < high for v in out[key])
        assert all(e > 0 for e in out[f"{key}_error"])
