"""Exported forms of a PairTable give the same energies and forces as the torch module."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch  # before openmm: openmm-torch's kernels need libtorch

from openmm_diffsim import (
    LennardJones,
    ModifiedMorse,
    NeuralCorrection,
    PairTable,
    PotentialSum,
    SoftSphere,
    Yukawa,
    create_system,
)
from openmm_diffsim.export import (
    METADATA_FILE,
    load_system_xml,
    save_torchscript,
    tabulated_force,
    tabulated_system,
    tabulated_system_xml,
    torchforce_system_xml,
    write_gromacs_tables,
    write_lammps_table,
)
from openmm_diffsim.torchforce import _import_openmm, _import_openmmtorch

openmm = _import_openmm()
_import_openmmtorch()


def perturbed_lattice(n_side, spacing, jitter, seed=0):
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n_side)] * 3, indexing="ij"), -1).reshape(-1, 3)
    return (grid + 0.5) * spacing + rng.normal(0.0, jitter, grid.shape), np.full(3, n_side * spacing)


def energy_forces(system, positions, platform="Reference"):
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName(platform))
    context.setPositions(positions)
    state = context.getState(getEnergy=True, getForces=True)
    energy = state.getPotentialEnergy().value_in_unit(openmm.unit.kilojoule_per_mole)
    forces = state.getForces(asNumpy=True).value_in_unit(openmm.unit.kilojoule_per_mole / openmm.unit.nanometer)
    return energy, np.asarray(forces)


def binary_table(mode):
    net = NeuralCorrection(cutoff=0.9, n_basis=12, hidden=(16,), seed=2)
    with torch.no_grad():
        net.layers[-1].weight.mul_(300.0)
    return PairTable(
        ["A", "B"],
        {
            ("A", "A"): LennardJones(0.34, 1.0),
            ("A", "B"): PotentialSum([SoftSphere(0.3, 1.0, 12.0), net]),
            ("B", "B"): ModifiedMorse(a=5.5, phi=0.44, sigma=0.38, epsilon=1.2),
        },
        cutoff=0.9,
        cutoff_mode=mode,
        switch_distance=0.75 if mode == "switch" else None,
    )


@pytest.fixture(scope="module")
def mixture():
    positions, lengths = perturbed_lattice(6, 0.4, 0.04, seed=3)
    names = list(np.random.default_rng(4).choice(["A", "B"], size=len(positions)))
    return positions, lengths, names


@pytest.mark.parametrize("mode", ["truncate", "shift", "switch"])
def test_tabulated_system_matches_torch_module(mode, mixture):
    positions, lengths, names = mixture
    table = binary_table(mode)
    e_ref, f_ref = energy_forces(create_system(table, names, 39.9, lengths, tabulate=False), positions)
    e, f = energy_forces(tabulated_system(table, names, 39.9, lengths, n_points=4000), positions)
    assert abs(e_ref) > 10.0
    # Measured with 4000 knots: ~1e-10 relative energy, ~1e-8 of the largest force.
    assert abs(e - e_ref) < 1e-8 * abs(e_ref)
    np.testing.assert_allclose(f, f_ref, rtol=0, atol=1e-6 * np.abs(f_ref).max())
    # Coarser tables are worse: the comparison has teeth.
    e_coarse, _ = energy_forces(tabulated_system(table, names, 39.9, lengths, n_points=60), positions)
    assert abs(e_coarse - e_ref) > abs(e - e_ref)


def test_tabulated_force_pair_types_and_overlap():
    """Per-pair-type dispatch, and linear continuation below r_min for overlapping particles."""
    table = binary_table("shift")
    lengths = np.full(3, 3.0)
    for pair, names in ((0, ["A", "A"]), (1, ["A", "B"]), (1, ["B", "A"]), (2, ["B", "B"])):
        for r in (0.05, 0.31, 0.52, 0.8999, 0.95):
            positions = np.array([[1.0, 1.0, 1.0], [1.0 + r, 1.0, 1.0]])
            system = tabulated_system(table, names, 39.9, lengths, n_points=4000, r_min=0.2)
            assert system.getForce(0).getNumTabulatedFunctions() == 1  # every pair type in one table
            e, f = energy_forces(system, positions)
            if r < 0.2:
                u0, du0 = table.evaluate(np.array([0.2]), pair)
                expected, slope = u0[0] + du0[0] * (r - 0.2), du0[0]
            else:
                u, du = table.evaluate(np.array([r]), pair)
                expected, slope = u[0], du[0]
            assert e == pytest.approx(expected, rel=1e-6, abs=1e-9)
            assert f[1, 0] == pytest.approx(-slope, rel=1e-5, abs=1e-7)
            assert f[0, 0] == pytest.approx(-f[1, 0])


def test_tabulated_system_xml_round_trip(tmp_path, mixture):
    positions, lengths, names = mixture
    table = binary_table("switch")
    path = tabulated_system_xml(table, names, 39.9, lengths, tmp_path / "tabulated.xml")
    reloaded = openmm.XmlSerializer.deserialize(path.read_text())
    e, f = energy_forces(reloaded, positions)
    e_direct, f_direct = energy_forces(tabulated_system(table, names, 39.9, lengths), positions)
    assert e == e_direct
    np.testing.assert_array_equal(f, f_direct)
    e_cpu, _ = energy_forces(reloaded, positions, "CPU")  # CPU platform: single precision pair terms
    assert e_cpu == pytest.approx(e, rel=1e-4)


def test_torchforce_xml_reloads_with_embedded_module(tmp_path, mixture):
    positions, lengths, names = mixture
    table = binary_table("shift")
    xml_path, module_path = torchforce_system_xml(table, names, 39.9, lengths, tmp_path / "system.xml")
    assert module_path == tmp_path / "system.pt" and module_path.exists()
    text = xml_path.read_text()
    assert 'type="TorchForce"' in text and "encodedFileContents=" in text
    module_path.unlink()  # the XML alone must be enough
    system = load_system_xml(xml_path)
    assert system.getNumParticles() == len(names) and system.getNumForces() == 1
    e, f = energy_forces(system, positions)
    e_ref, f_ref = energy_forces(create_system(table, names, 39.9, lengths), positions)
    assert e == pytest.approx(e_ref, rel=1e-12)
    np.testing.assert_allclose(f, f_ref, rtol=0, atol=1e-10 * np.abs(f_ref).max())
    box = system.getDefaultPeriodicBoxVectors()
    assert box[0][0].value_in_unit(openmm.unit.nanometer) == pytest.approx(lengths[0])


def test_load_system_xml_keeps_other_forces_and_order(tmp_path, mixture):
    positions, lengths, names = mixture
    table = binary_table("truncate")
    system = create_system(table, names, 39.9, lengths)
    system.addForce(tabulated_force(table, names))
    system.getForce(1).setForceGroup(3)
    path = tmp_path / "two.xml"
    path.write_text(openmm.XmlSerializer.serialize(system))
    loaded = load_system_xml(path)
    kinds = [openmm.XmlSerializer.serialize(loaded.getForce(k)) for k in range(2)]
    assert 'type="TorchForce"' in kinds[0] and 'type="CustomNonbondedForce"' in kinds[1]
    assert loaded.getForce(1).getForceGroup() == 3
    e, _ = energy_forces(loaded, positions)
    e_one, _ = energy_forces(create_system(table, names, 39.9, lengths), positions)
    assert e == pytest.approx(2 * e_one, rel=1e-6)
    with pytest.raises(ValueError, match="does not hold an OpenMM System"):
        bad = tmp_path / "force.xml"
        bad.write_text(openmm.XmlSerializer.serialize(tabulated_force(table, names)))
        load_system_xml(bad)


def test_save_torchscript_table_and_energy_module(tmp_path, mixture):
    positions, lengths, names = mixture
    table = binary_table("switch")
    path = save_torchscript(table, tmp_path / "table.pt")
    extra = {METADATA_FILE: ""}
    loaded = torch.jit.load(str(path), _extra_files=extra)
    metadata = json.loads(extra[METADATA_FILE])
    assert metadata["pair_names"] == ["A-A", "A-B", "B-B"] and metadata["cutoff_mode"] == "switch"
    r = torch.linspace(0.25, 1.0, 200, dtype=torch.float64)
    pair_type = torch.arange(200) % 3
    with torch.no_grad():
        torch.testing.assert_close(loaded(r, pair_type), table(r, pair_type), rtol=0, atol=0)
        u, du = loaded.energy_and_derivative(r, pair_type)
        u_ref, du_ref = table.energy_and_derivative(r, pair_type)
    torch.testing.assert_close(du, du_ref, rtol=0, atol=0)

    energy_path = save_torchscript(table, tmp_path / "energy.pt", species=names)
    module = torch.jit.load(str(energy_path))
    e, f = module(torch.tensor(positions), torch.diag(torch.tensor(lengths)))
    e_ref, f_ref = energy_forces(create_system(table, names, 39.9, lengths, tabulate=False), positions)
    assert float(e) == pytest.approx(e_ref, rel=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(module.table(r, pair_type), table(r, pair_type), rtol=0, atol=0)


def test_gromacs_tables_round_trip(tmp_path):
    table = binary_table("shift")
    files = write_gromacs_tables(table, tmp_path / "gmx", r_max=1.9, dr=0.002, r_min=0.2)
    assert [p.name for p in files] == ["table_A_A.xvg", "table_A_B.xvg", "table_B_B.xvg", "table.xvg"]
    for k, path in enumerate(files[:3]):
        data = np.loadtxt(path, comments=("#", "@"))
        assert data.shape == (951, 7)
        r = data[:, 0]
        np.testing.assert_allclose(r, np.arange(951) * 0.002, atol=1e-12)
        assert np.all(data[:, 1:5] == 0)  # f, g unused: the potential is in h
        u, du = table.evaluate(np.clip(r, 0.2, 0.9 - 1e-12), k)
        inside = (r >= 0.2) & (r < 0.9)
        np.testing.assert_allclose(data[inside, 5], u[inside], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(data[inside, 6], -du[inside], rtol=1e-9, atol=1e-12)
        assert np.all(data[r > 0.9, 5:] == 0)
        below = r < 0.2
        np.testing.assert_allclose(data[below, 5], u[below] + du[below] * (r[below] - 0.2), rtol=1e-9)
        # -h' really is minus the derivative of h (central differences on the grid).
        mid = (r[1:-1] > 0.3) & inside[2:] & inside[:-2]
        fd = -(data[2:, 5] - data[:-2, 5]) / (2 * 0.002)
        np.testing.assert_allclose(fd[mid], data[1:-1, 6][mid], rtol=1e-3, atol=1e-3 * np.abs(du).max())
    default = np.loadtxt(files[3], comments=("#", "@"))
    assert np.all(default[:, 1:] == 0)


def test_lammps_table_round_trip(tmp_path):
    table = binary_table("switch")
    path = write_lammps_table(table, tmp_path / "pair.table", r_min=0.2, r_max=1.0, n=801)
    sections = {}
    lines = iter(path.read_text().splitlines())
    for line in lines:
        if not line.strip() or line.startswith("#"):
            continue
        keyword = line.strip()
        header = next(lines).split()
        assert header[0] == "N" and header[2] == "R"
        n, lo, hi = int(header[1]), float(header[3]), float(header[4])
        assert next(lines).strip() == ""
        rows = np.array([next(lines).split() for _ in range(n)], dtype=float)
        np.testing.assert_array_equal(rows[:, 0], np.arange(1, n + 1))
        np.testing.assert_allclose(rows[:, 1], np.linspace(lo, hi, n), rtol=1e-10)
        sections[keyword] = rows
    assert list(sections) == ["A_A", "A_B", "B_B"]
    for k, rows in enumerate(sections.values()):
        r = rows[:, 1]
        u, du = table.evaluate(np.minimum(r, 0.9 - 1e-12), k)
        inside = r < 0.9
        np.testing.assert_allclose(rows[inside, 2], u[inside], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(rows[inside, 3], -du[inside], rtol=1e-9, atol=1e-12)
        assert np.all(rows[~inside, 2:] == 0)


def test_export_bad_input(tmp_path):
    table = binary_table("shift")
    with pytest.raises(ValueError, match="unknown species 'C'"):
        tabulated_force(table, ["A", "C"])
    with pytest.raises(ValueError, match="unknown species"):
        torchforce_system_xml(table, ["A", "X"], 39.9, [3.0] * 3, tmp_path / "x.xml")
    with pytest.raises(ValueError, match="r_min"):
        tabulated_force(table, ["A", "B"], r_min=1.5)
    with pytest.raises(ValueError, match="n_points"):
        tabulated_force(table, ["A", "B"], n_points=2)
    with pytest.raises(ValueError, match="half the shortest box edge"):
        tabulated_system(table, ["A", "B"], 39.9, [1.5, 3.0, 3.0])
    with pytest.raises(ValueError, match="triclinic"):
        tabulated_system(table, ["A", "B"], 39.9, [[3.0, 0, 0], [1.0, 3.0, 0], [0, 0, 3.0]])
    with pytest.raises(ValueError, match="r_max"):
        write_gromacs_tables(table, tmp_path, r_max=0.5)
    with pytest.raises(ValueError, match="dr"):
        write_gromacs_tables(table, tmp_path, r_max=2.0, dr=0.0)
    with pytest.raises(ValueError, match="r_min < r_max"):
        write_lammps_table(table, tmp_path / "t", r_min=1.2, r_max=1.0)
    with pytest.raises(ValueError, match="r_min < r_max"):
        write_lammps_table(table, tmp_path / "t", r_min=0.0, r_max=1.0)
    with pytest.raises(ValueError, match="r_max"):
        write_lammps_table(table, tmp_path / "t", r_min=0.1, r_max=0.5)
    with pytest.raises(ValueError, match="not finite"):
        write_lammps_table(PairTable(["A"], Yukawa(1.0, 1.0), cutoff=0.9), tmp_path / "t", 1e-320, 1.0)
