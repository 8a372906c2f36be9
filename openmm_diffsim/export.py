"""Export a trained :class:`~openmm_diffsim.potentials.PairTable` for production use.

* :func:`save_torchscript` — a TorchScript file (the table, or the full
  :class:`~openmm_diffsim.energy.PairEnergy` module that ``TorchForce`` runs);
* :func:`torchforce_system_xml` / :func:`load_system_xml` — an OpenMM
  ``System`` XML with the module embedded in its ``TorchForce``;
* :func:`tabulated_force`, :func:`tabulated_system`,
  :func:`tabulated_system_xml` — a plain OpenMM ``CustomNonbondedForce``
  built from cubic-spline tables: no torch needed to run it;
* :func:`write_gromacs_tables`, :func:`write_lammps_table` — tables for other
  MD engines.

All tables hold u(r) *with the table's cutoff convention applied* (truncate,
shift or switch), so every exported form runs the same model as training.
Units: nm, kJ/mol, kJ/mol/nm everywhere, LAMMPS tables included (convert
for your LAMMPS ``units``; see :func:`write_lammps_table`).

OpenMM and openmm-torch are imported lazily.
"""

from __future__ import annotations

import copy
import io
import json
import os
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import List, Optional, Tuple, Union

import numpy as np
import torch

from .potentials import PairTable
from .sampling import _TABLE_PADDING, _join_segments, _pair_type_expression
from .torchforce import (
    _import_openmm,
    _import_openmmtorch,
    create_base_system,
    create_system,
    script_energy_module,
    species_indices,
)

__all__ = [
    "save_torchscript",
    "torchforce_system_xml",
    "load_system_xml",
    "tabulated_force",
    "tabulated_system",
    "tabulated_system_xml",
    "write_gromacs_tables",
    "write_lammps_table",
]

PathLike = Union[str, os.PathLike]

#: Name of the JSON record stored inside exported TorchScript files.
METADATA_FILE = "openmm_diffsim.json"

#: Pair energy (kJ/mol) above which tables switch to linear continuation by default.
DEFAULT_ENERGY_CAP = 1.0e5


def _metadata(table: PairTable) -> dict:
    return {
        "species": list(table.species),
        "pair_names": list(table.pair_names),
        "cutoff_nm": table.cutoff,
        "cutoff_mode": table.cutoff_mode,
        "switch_distance_nm": table.switch_distance if table.cutoff_mode == "switch" else None,
        "energy_unit": "kJ/mol",
        "length_unit": "nm",
    }


def _frozen_copy(table: PairTable) -> PairTable:
    table = copy.deepcopy(table)
    for p in table.parameters():
        p.requires_grad_(False)
    return table


# -- TorchScript -----------------------------------------------------------------------


def save_torchscript(table: PairTable, path: PathLike, species=None, skin: float = 0.1) -> Path:
    """Save ``table`` as a TorchScript file.

    Parameters
    ----------
    table : PairTable
        The model. It is copied and frozen; later training does not touch the file.
    path : str or PathLike
        Output file (conventionally ``.pt``).
    species : sequence of str or int, length N, optional
        Species of each particle. Without it the file holds the scripted
        :class:`PairTable`: ``forward(r, pair_type) -> u`` with ``r`` (P,) in nm
        and ``pair_type`` (P,) int64, plus ``energy_and_derivative(r, pair_type)``.
        With it the file holds the full
        :class:`~openmm_diffsim.energy.PairEnergy` module,
        ``forward(positions (N, 3) nm, box (3, 3) nm) -> (energy kJ/mol, forces (N, 3) kJ/mol/nm)``,
        ready for ``openmmtorch.TorchForce``; its ``.table`` attribute is the
        scripted pair table.
    skin : float
        Verlet skin (nm) of the energy module.

    Returns
    -------
    Path
        The file written. A JSON record (species, pair names, cutoff
        convention, units) is stored in it as the extra file
        ``openmm_diffsim.json``; read it with
        ``torch.jit.load(path, _extra_files={"openmm_diffsim.json": ""})``.
    """
    path = Path(path)
    if species is None:
        module = torch.jit.script(_frozen_copy(table))
    else:
        module = script_energy_module(table, species, skin=skin)
    metadata = _metadata(table)
    if species is not None:
        metadata["n_particles"] = len(species)
    torch.jit.save(module, str(path), _extra_files={METADATA_FILE: json.dumps(metadata)})
    return path


# -- OpenMM System XML with a TorchForce ---------------------------------------------------


def torchforce_system_xml(
    table: PairTable, species, masses, box, path: PathLike, skin: float = 0.1
) -> Tuple[Path, Path]:
    """Write an OpenMM ``System`` with the model as a ``TorchForce`` to XML.

    openmm-torch (≥ 1.4) embeds the TorchScript module in the XML
    (``encodedFileContents``, hex), so the XML is self-contained. The same
    module is also written next to it as ``<path stem>.pt``.

    Parameters
    ----------
    table, species, masses, box, skin
        As for :func:`~openmm_diffsim.torchforce.create_system`.
    path : str or PathLike
        Output XML file.

    Returns
    -------
    xml_path, module_path : Path

    Notes
    -----
    With the openmm-torch 1.5 wheels, ``XmlSerializer.deserialize`` of a
    ``TorchForce`` crashes the process (segmentation fault, seen with OpenMM
    8.6.1 / torch 2.9.1). Load the file with :func:`load_system_xml`, which
    rebuilds the ``TorchForce`` from the embedded module in Python and
    deserializes everything else with ``XmlSerializer``.
    """
    openmm = _import_openmm()
    path = Path(path)
    system = create_system(table, species, masses, box, skin=skin)
    path.write_text(openmm.XmlSerializer.serialize(system))
    module_path = save_torchscript(table, path.with_suffix(".pt"), species=species, skin=skin)
    return path, module_path


def _torch_force_from_node(node: ElementTree.Element, base_directory: Path):
    openmmtorch = _import_openmmtorch()
    encoded = node.get("encodedFileContents", "")
    if encoded:
        module = torch.jit.load(io.BytesIO(bytes.fromhex(encoded)))
    else:
        file_name = node.get("file", "")
        if not file_name:
            raise ValueError("TorchForce element has neither an embedded module nor a file name")
        module_path = Path(file_name)
        if not module_path.is_absolute():
            module_path = base_directory / module_path
        module = torch.jit.load(str(module_path))
    force = openmmtorch.TorchForce(module)
    force.setForceGroup(int(node.get("forceGroup", "0")))
    force.setUsesPeriodicBoundaryConditions(node.get("usesPeriodic", "0") == "1")
    force.setOutputsForces(node.get("outputsForces", "0") == "1")
    for child in node:
        if child.tag == "GlobalParameters":
            for parameter in child:
                force.addGlobalParameter(parameter.get("name"), float(parameter.get("default")))
        elif child.tag == "ParameterDerivatives":
            for parameter in child:
                force.addEnergyParameterDerivative(parameter.get("name"))
        elif child.tag == "Properties":
            for prop in child:
                force.setProperty(prop.get("name"), prop.get("value"))
    if node.get("name"):
        force.setName(node.get("name"))
    return force


def load_system_xml(path: PathLike):
    """Load an OpenMM ``System`` XML, rebuilding any ``TorchForce`` in Python.

    Works around a crash of openmm-torch 1.5's XML deserializer: every
    ``<Force type="TorchForce">`` element is rebuilt from its embedded
    TorchScript module (or its ``file`` attribute, relative to the XML's
    folder), every other force goes through ``openmm.XmlSerializer``. Force
    order and force groups are preserved.

    Parameters
    ----------
    path : str or PathLike
        A file written by :func:`torchforce_system_xml`,
        :func:`tabulated_system_xml` or ``XmlSerializer.serialize``.

    Returns
    -------
    openmm.System
    """
    openmm = _import_openmm()
    path = Path(path)
    root = ElementTree.fromstring(path.read_text())
    if root.tag != "System":
        raise ValueError(f"{path} does not hold an OpenMM System (root element <{root.tag}>)")
    forces_node = root.find("Forces")
    force_nodes = list(forces_node) if forces_node is not None else []
    if forces_node is not None:
        for node in force_nodes:
            forces_node.remove(node)
    system = openmm.XmlSerializer.deserialize(ElementTree.tostring(root, encoding="unicode"))
    for node in force_nodes:
        if node.get("type") == "TorchForce":
            force = _torch_force_from_node(node, path.parent)
        else:
            force = openmm.XmlSerializer.deserialize(ElementTree.tostring(node, encoding="unicode"))
        system.addForce(force)
    return system


# -- tabulated CustomNonbondedForce --------------------------------------------------------


def _pair_energy(table: PairTable, r: np.ndarray, pair_type: int) -> Tuple[np.ndarray, np.ndarray]:
    """u(r), du/dr with the cutoff convention; the grid point at r_c gets the value just inside."""
    r_eval = np.where(r >= table.cutoff, np.nextafter(table.cutoff, 0.0), r)
    u, du = table.evaluate(r_eval, pair_type)
    outside = r > table.cutoff
    return np.where(outside, 0.0, u), np.where(outside, 0.0, du)


#: Extra spline knots beyond each end of an OpenMM table (see :func:`tabulated_force`).
_SPLINE_PADDING = 16


def _continued_pair_energy(table: PairTable, r: np.ndarray, pair_type: int) -> np.ndarray:
    """u(r) with the cutoff convention, continued smoothly past r_c (for spline padding only).

    truncate: the raw potential; shift: raw - raw(r_c); switch: 0 (the switch
    polynomial makes u vanish at r_c with two zero derivatives).
    """
    inside = r < table.cutoff
    u = np.zeros_like(r)
    with np.errstate(all="ignore"):
        u[inside] = table.evaluate(r[inside], pair_type)[0]
        if table.cutoff_mode != "switch" and (~inside).any():
            potential = table.pair_potentials[pair_type]
            with torch.no_grad():
                raw = potential(torch.as_tensor(np.append(r[~inside], table.cutoff))).numpy()
            u[~inside] = raw[:-1] - (raw[-1] if table.cutoff_mode == "shift" else 0.0)
    return u


def _auto_r_min(table: PairTable, energy_cap: float) -> float:
    """Smallest r (nm) at which every pair type's |u| is at most ``energy_cap``."""
    grid = np.linspace(1e-3 * table.cutoff, table.cutoff, 20001)
    r_min = float(grid[0])
    with np.errstate(all="ignore"):
        for k in range(table.n_pair_types):
            u, du = _pair_energy(table, grid, k)
            bad = ~(np.isfinite(u) & np.isfinite(du) & (np.abs(u) <= energy_cap))
            if bad.any():
                last_bad = np.nonzero(bad)[0].max()
                if last_bad + 1 >= grid.size - 1:
                    raise ValueError(
                        f"pair type {table.pair_names[k]}: |u| exceeds {energy_cap} kJ/mol up to the cutoff"
                    )
                r_min = max(r_min, float(grid[last_bad + 1]))
    return float(r_min)


def _check_r_min(table: PairTable, r_min: Optional[float], energy_cap: float) -> float:
    if r_min is None:
        return _auto_r_min(table, energy_cap)
    r_min = float(r_min)
    if not 0.0 < r_min < table.cutoff:
        raise ValueError(f"r_min must lie in (0, cutoff={table.cutoff}) nm, got {r_min}")
    return r_min


def tabulated_force(
    table: PairTable,
    species,
    n_points: int = 4000,
    r_min: Optional[float] = None,
    energy_cap: float = DEFAULT_ENERGY_CAP,
):
    """An OpenMM ``CustomNonbondedForce`` reproducing ``table`` from a spline table.

    Each pair type's u(r), with the table's cutoff convention already
    applied, lies on a uniform grid of ``n_points`` knots over
    ``[r_min, cutoff]`` in one ``Continuous1DFunction`` ``u`` (OpenMM's
    natural cubic spline): pair type k is read at r + k * span, so each pair
    costs one spline lookup whatever the number of pair types (2.25-2.7x
    faster MD for a binary mixture than one function per pair type,
    docs/sampling.md). The pair type follows from the particles'
    per-particle parameter ``species`` (the species index) by arithmetic.
    Below ``r_min`` the energy continues linearly with the slope at
    ``r_min`` (finite forces for overlapping particles). No torch is needed
    to run the force.

    Parameters
    ----------
    table : PairTable
        The model.
    species : sequence of str or int, length N
        Species of each particle, by name or index.
    n_points : int
        Knots per pair type. The interpolation error falls as h⁴
        (h = (cutoff - r_min) / (n_points - 1)).
    r_min : float, optional
        Start of the tables (nm). By default the smallest distance at which
        every pair type's ``|u|`` is below ``energy_cap``.
    energy_cap : float
        kJ/mol; only used to choose ``r_min``.

    Returns
    -------
    openmm.CustomNonbondedForce
        ``CutoffPeriodic`` with cutoff ``table.cutoff``, no switching function
        and no long-range correction (the switch, if any, is in the table).
    """
    openmm = _import_openmm()
    n_points = int(n_points)
    if n_points < 4:
        raise ValueError(f"n_points must be at least 4, got {n_points}")
    index = species_indices(table, species)
    r_min = _check_r_min(table, r_min, energy_cap)
    # OpenMM's spline is natural (u'' = 0 at both ends), which u does not obey
    # at r_min or r_c. Padding knots beyond both ends, filled with the smooth
    # continuation of u, keep that end error out of [r_min, r_c]: it decays by
    # a factor ~0.27 per knot.
    spacing = (table.cutoff - r_min) / (n_points - 1)
    # Below r_min u grows steeply: pad no further down than r_min / 2.
    low_padding = min(_SPLINE_PADDING, int(0.5 * r_min / spacing))
    grid = r_min + spacing * np.arange(-low_padding, n_points + _SPLINE_PADDING)
    segments = []
    starts, slopes = [], []
    for k in range(table.n_pair_types):
        u = _continued_pair_energy(table, grid, k)
        if not np.all(np.isfinite(u)):
            raise ValueError(
                f"pair type {table.pair_names[k]}: u(r) is not finite on [{r_min}, {table.cutoff}] nm "
                "(or just below r_min); raise r_min"
            )
        segments.append(u)
        u_min, du_min = _pair_energy(table, np.array([r_min]), k)
        starts.append(float(u_min[0]))
        slopes.append(float(du_min[0]))
    # Every pair type in one table, read at r + k * span (one spline lookup per pair, not one per pair type:
    # OpenMM evaluates every branch of an expression), each segment continued linearly past its padding.
    values, span = _join_segments(
        segments,
        spacing,
        [(u[1] - u[0]) / spacing for u in segments],
        [(u[-1] - u[-2]) / spacing for u in segments],
    )
    x_start = float(grid[0] - spacing * _TABLE_PADDING)
    x_end = float(x_start + spacing * (values.size - 1))
    n_types = table.n_pair_types
    # Below r_min: linear with the pair type's slope at r_min (select: a if x != 0 else b).
    u0, slope = repr(starts[-1]), repr(slopes[-1])
    for k in range(n_types - 2, -1, -1):
        u0 = f"select(pair_type-{k}, {u0}, {starts[k]!r})"
        slope = f"select(pair_type-{k}, {slope}, {slopes[k]!r})"
    expression = f"select(step({r_min!r}-r), {u0}+({slope})*(r-{r_min!r}), u(r+{span!r}*pair_type))"
    expression += f"; pair_type={_pair_type_expression(table, 'species')}"
    force = openmm.CustomNonbondedForce(expression)
    force.addTabulatedFunction("u", openmm.Continuous1DFunction(values.tolist(), x_start, x_end))
    force.addPerParticleParameter("species")
    for s in index:
        force.addParticle([float(s)])
    force.setNonbondedMethod(openmm.CustomNonbondedForce.CutoffPeriodic)
    force.setCutoffDistance(table.cutoff)
    force.setUseSwitchingFunction(False)
    force.setUseLongRangeCorrection(False)
    force.setName("openmm-diffsim tabulated pair potential")
    return force


def _base_system(n: int, masses, box, cutoff: float):
    return create_base_system(n, masses, box, cutoff)


def tabulated_system(table: PairTable, species, masses, box, **force_options):
    """An OpenMM ``System`` whose only force is :func:`tabulated_force`.

    Parameters
    ----------
    table, species, masses, box
        As for :func:`~openmm_diffsim.torchforce.create_system`.
    **force_options
        ``n_points``, ``r_min``, ``energy_cap`` for :func:`tabulated_force`.
    """
    system = _base_system(len(species), masses, box, table.cutoff)
    system.addForce(tabulated_force(table, species, **force_options))
    return system


def tabulated_system_xml(table: PairTable, species, masses, box, path: PathLike, **force_options) -> Path:
    """Write :func:`tabulated_system` as OpenMM XML (loads with plain ``XmlSerializer``)."""
    openmm = _import_openmm()
    path = Path(path)
    path.write_text(openmm.XmlSerializer.serialize(tabulated_system(table, species, masses, box, **force_options)))
    return path


# -- tables for other engines ------------------------------------------------------------


def _table_on_grid(table: PairTable, r: np.ndarray, k: int, r_min: float) -> Tuple[np.ndarray, np.ndarray]:
    """u and -du/dr on ``r`` with linear continuation below ``r_min``."""
    u, du = _pair_energy(table, np.maximum(r, r_min), k)
    below = r < r_min
    u = np.where(below, u + du * (r - r_min), u)
    if not (np.all(np.isfinite(u)) and np.all(np.isfinite(du))):
        raise ValueError(f"pair type {table.pair_names[k]}: u(r) is not finite on the table grid; raise r_min")
    return u, -du


def write_gromacs_tables(
    table: PairTable,
    directory: PathLike,
    r_max: float,
    dr: float = 0.002,
    r_min: Optional[float] = None,
    energy_cap: float = DEFAULT_ENERGY_CAP,
    prefix: str = "table",
) -> List[Path]:
    """Write GROMACS user tables ``table_A_B.xvg`` (one per pair type) and ``table.xvg``.

    GROMACS tabulated non-bonded interactions use
    V(r) = q_i q_j f(r) + C6 g(r) + C12 h(r); a table file holds seven
    columns ``r  f  -f'  g  -g'  h  -h'``. The full pair potential goes in the
    repulsion column **h** (with -du/dr in -h'); f and g are zero. In the
    topology give every pair C6 = 0 and C12 = 1 (e.g. ``[ nonbond_params ]``
    with c6 0, c12 1 under combination rule 1) and zero charges.

    Parameters
    ----------
    table : PairTable
        The model.
    directory : str or PathLike
        Output folder (created if missing).
    r_max : float
        Last table distance in nm; GROMACS wants r_c + ``table-extension``
        (default 1 nm). Must be ≥ the cutoff.
    dr : float
        Spacing in nm (GROMACS recommends 0.002 for single, 0.0005 for double precision).
    r_min : float, optional
        Below this distance (nm) u continues linearly (GROMACS tables start at
        r = 0). By default chosen as in :func:`tabulated_force`.
    energy_cap : float
        kJ/mol, for the default ``r_min``.
    prefix : str
        File prefix (the ``mdrun -table`` name without ``.xvg``).

    Returns
    -------
    list of Path
        ``<prefix>_<A>_<B>.xvg`` for every pair type in pair-type order, then
        ``<prefix>.xvg``: the single pair type for one species, otherwise zeros
        (GROMACS requires it; list every species pair in ``energygrp-table``).

    Notes
    -----
    Energy-group tables need the ``group`` cut-off scheme (GROMACS ≤ 2019).
    mdp: ``cutoff-scheme = group``, ``vdwtype = user``, ``coulombtype = user``,
    ``energygrps = A B``, ``energygrp-table = A A A B B B``.
    """
    r_max, dr = float(r_max), float(dr)
    if not np.isfinite(dr) or dr <= 0:
        raise ValueError(f"dr must be positive, got {dr}")
    if not np.isfinite(r_max) or r_max < table.cutoff:
        raise ValueError(f"r_max must be at least the cutoff {table.cutoff} nm, got {r_max}")
    r_min = _check_r_min(table, r_min, energy_cap)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    n = int(round(r_max / dr)) + 1
    r = np.arange(n) * dr
    zeros = np.zeros_like(r)
    written: List[Path] = []

    def write(path: Path, h: np.ndarray, minus_dh: np.ndarray, title: str) -> None:
        header = (
            f"# {title}\n# openmm-diffsim export: cutoff {table.cutoff} nm ({table.cutoff_mode}); "
            f"u(r) in column h (6), -du/dr in column -h' (7); kJ/mol, nm\n"
            "# r  f  -f'  g  -g'  h  -h'\n"
        )
        data = np.column_stack([r, zeros, zeros, zeros, zeros, h, minus_dh])
        np.savetxt(path, data, fmt="%.10e", header=header.rstrip("\n"), comments="")
        written.append(path)

    for k, (a, b) in enumerate(table.pair_keys()):
        u, force = _table_on_grid(table, r, k, r_min)
        write(directory / f"{prefix}_{a}_{b}.xvg", u, force, f"pair {a}-{b}")
    if table.n_pair_types == 1:
        u, force = _table_on_grid(table, r, 0, r_min)
        write(directory / f"{prefix}.xvg", u, force, "default table (the only pair type)")
    else:
        write(directory / f"{prefix}.xvg", zeros, zeros, "default table: zero (every pair has its own table)")
    return written


def write_lammps_table(
    table: PairTable,
    path: PathLike,
    r_min: float,
    r_max: float,
    n: int = 2000,
) -> Path:
    """Write a LAMMPS ``pair_style table`` file, one section per pair type.

    Each section::

        A_B
        N 2000 R 0.05 1.0

        1 0.05 <u> <-du/dr>
        ...

    Keywords are ``<A>_<B>`` in pair-type order. Values are in nm, kJ/mol and
    kJ/mol/nm; convert (or use matching LAMMPS ``units``) before use, e.g.
    for ``units real`` multiply r by 10 and energies by 1/4.184.
    Use ``pair_style table spline <n>`` and ``pair_coeff i j file A_B <cutoff>``.

    Parameters
    ----------
    table : PairTable
        The model.
    path : str or PathLike
        Output file.
    r_min, r_max : float
        Table range in nm, 0 < r_min < r_max; r_max ≥ the cutoff.
    n : int
        Points per section (≥ 2).
    """
    r_min, r_max, n = float(r_min), float(r_max), int(n)
    if not (np.isfinite(r_min) and np.isfinite(r_max) and 0.0 < r_min < r_max):
        raise ValueError(f"need 0 < r_min < r_max, got r_min={r_min}, r_max={r_max}")
    if r_max < table.cutoff:
        raise ValueError(f"r_max must be at least the cutoff {table.cutoff} nm, got {r_max}")
    if n < 2:
        raise ValueError(f"n must be at least 2, got {n}")
    path = Path(path)
    r = np.linspace(r_min, r_max, n)
    lines = [
        f"# openmm-diffsim export: species {' '.join(table.species)}; cutoff {table.cutoff} nm "
        f"({table.cutoff_mode}); r in nm, energy in kJ/mol, force in kJ/mol/nm",
        "",
    ]
    for k, (a, b) in enumerate(table.pair_keys()):
        u, du = _pair_energy(table, r, k)
        if not (np.all(np.isfinite(u)) and np.all(np.isfinite(du))):
            raise ValueError(f"pair type {a}-{b}: u(r) is not finite on [{r_min}, {r_max}] nm; raise r_min")
        lines += [f"{a}_{b}", f"N {n} R {r_min!r} {r_max!r}", ""]
        lines += [
            f"{i + 1} {ri:.10e} {ui:.10e} {fi:.10e}" for i, (ri, ui, fi) in enumerate(zip(r, u, -du, strict=True))
        ]
        lines.append("")
    path.write_text("\n".join(lines))
    return path
