"""OpenMM sampler: run the current pair potential at a state point, collect snapshots.

:class:`Sampler` wraps an ``openmm.app.Simulation`` for one
:class:`~openmm_diffsim.systems.StatePoint` and one
:class:`~openmm_diffsim.potentials.PairTable`. It minimises, equilibrates and
runs production, returning :class:`Snapshots` (positions, velocities, boxes,
potential energies) every ``interval`` steps. After the trainer changes the
potential, :meth:`Sampler.update_potential` hands the new parameters to the
live simulation, which continues from its last positions, velocities and box.

Backends (how the pair potential enters OpenMM):

``"torch"``
    openmm-torch ``TorchForce`` running the TorchScript
    :class:`~openmm_diffsim.energy.PairEnergy` module: the model itself.
``"tabulated"``
    ``CustomNonbondedForce`` with one ``Continuous1DFunction`` spline of u(r)
    per pair type, tabulated from the PairTable (its cutoff convention
    included). Forces are the derivative of OpenMM's spline of u. New
    parameters go in through ``updateParametersInContext``.
``"expression"``
    ``CustomNonbondedForce`` whose energy is the PairTable's own closed form
    (analytic potentials, cubic splines as one cubic per interval, sums;
    cutoff convention included), which OpenMM compiles to machine code:
    exact, and on the CPU ~2.2x faster than ``"tabulated"`` for the demo's
    spline model. Not for neural potentials. New parameters rebuild the force.
``"native"``
    OpenMM's ``NonbondedForce``: only for tables whose pair potentials are all
    :class:`~openmm_diffsim.potentials.LennardJones` with Lorentz–Berthelot
    mixing and ``truncate`` or ``switch`` cutoffs. A reference, not a model.

``"auto"`` picks per platform from :data:`DEFAULT_BACKEND` (measured with
``benchmarks/bench_sampling.py``): ``"expression"`` on the CPU where the table
has a closed form (:func:`has_closed_form`) with at most
:data:`MAX_EXPRESSION_KNOTS` spline knots, else ``"tabulated"``.

:meth:`Sampler.from_simulation` wraps a user's own ``openmm.app.Simulation``
instead: the learned force is added for selected particles (with excluded
pairs) next to the System's other forces, which stay fixed.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .potentials import (
    CubicSpline,
    LennardJones,
    PairPotential,
    PairTable,
    PotentialSum,
    combine_expressions,
    split_expression,
)
from .systems import StatePoint
from .units import to_array, to_float

__all__ = [
    "Sampler",
    "Snapshots",
    "SnapshotTensors",
    "SamplingError",
    "reference_rdfs",
    "create_tabulated_force",
    "create_expression_force",
    "create_native_lj_force",
    "choose_platform",
    "DEFAULT_BACKEND",
    "MAX_EXPRESSION_KNOTS",
    "has_closed_form",
    "PLATFORM_ORDER",
    "BACKENDS",
]

logger = logging.getLogger(__name__)

#: Platforms tried in this order when none is named.
PLATFORM_ORDER = ("CUDA", "OpenCL", "CPU")

BACKENDS = ("torch", "tabulated", "native", "expression")

#: Backend that ``backend="auto"`` uses on each platform.
#:
#: CPU/Reference: ``expression`` (the table's own closed form, compiled by
#: OpenMM) for every table that has one, else ``tabulated``. Measured on the
#: demo's model (soft sphere + 27-knot spline, N = 500, rho* = 0.8, cutoff
#: 1 nm, 2-core CPU, docs/sampling.md): expression 386 MD steps/s, tabulated
#: 176 (the tabulated function call is the cost: a plain LJ expression runs
#: ~640), torch slower still; energies agree with TorchForce to ~1e-7
#: relative. Earlier (``benchmarks/bench_sampling.py``, LJ at rho* = 0.8): the
#: tabulated CustomNonbondedForce ran 1.3-4x faster than TorchForce for LJ and
#: ~100x faster for a neural potential (which has no closed form, so it stays
#: tabulated). CUDA/OpenCL: not measured here; OpenMM's custom nonbonded
#: kernel is its own optimised GPU pair loop, so ``tabulated`` stays until a
#: GPU measurement says otherwise. Change this dict (or pass ``backend=``) to
#: override.
DEFAULT_BACKEND: Dict[str, str] = {
    "CUDA": "tabulated",
    "OpenCL": "tabulated",
    "CPU": "expression",
    "Reference": "expression",
}


def _pair_expressions(table: PairTable) -> List[str]:
    """Each pair type's OpenMM expression, or ValueError naming the first pair that has none."""
    expressions = []
    for k, potential in enumerate(table.pair_potentials):
        try:
            expressions.append(potential.openmm_expression())
        except NotImplementedError as exc:
            raise ValueError(
                f"backend 'expression' needs a closed form for every pair; pair {table.pair_names[k]}: {exc}. "
                "Use backend 'tabulated' or 'torch'."
            ) from None
    return expressions


def has_closed_form(table: PairTable) -> bool:
    """Whether every pair potential of ``table`` has an OpenMM expression (backend ``expression``)."""
    try:
        _pair_expressions(table)
    except ValueError:
        return False
    return True


#: ``"auto"`` takes the expression backend only for tables with at most this
#: many spline knots in all (every pair type's expression is evaluated for
#: every pair). Measured on the demo system (soft sphere + one spline, N = 500,
#: 2-core CPU): 27 knots 466 MD steps/s against 153 tabulated, 54 knots 270
#: against 177, 100 knots 151 against 164.
MAX_EXPRESSION_KNOTS = 64


def _spline_knots(potential: PairPotential) -> int:
    """Knots of the cubic splines in ``potential`` (sums searched through)."""
    if isinstance(potential, PotentialSum):
        return sum(_spline_knots(term) for term in potential.terms)
    return int(potential.knots.numel()) if isinstance(potential, CubicSpline) else 0


def _auto_backend(platform_name: str, table: PairTable) -> str:
    backend = DEFAULT_BACKEND.get(platform_name, "tabulated")
    if backend == "expression":
        # Count knots first: it is cheap, and a long spline is not worth writing out.
        knots = sum(_spline_knots(potential) for potential in table.pair_potentials)
        if knots > MAX_EXPRESSION_KNOTS or not has_closed_form(table):
            return "tabulated"
    return backend


#: Mixed precision is OpenMM's recommended default for MD on GPUs.
_DEFAULT_PROPERTIES: Dict[str, Dict[str, str]] = {
    "CUDA": {"Precision": "mixed"},
    "OpenCL": {"Precision": "mixed"},
}

#: Default number of knots in the tabulated u(r) (error measured in docs/sampling.md).
DEFAULT_TABLE_POINTS = 4096
#: The tabulated spline starts where u(r) first drops below this (kJ/mol) and
#: continues linearly inward: such energies are never visited in sampling.
DEFAULT_TABLE_ENERGY_CAP = 1.0e5

_FORCE_NAME = "openmm-diffsim pair potential"


class SamplingError(RuntimeError):
    """Sampling failed: NaN, exploding energy or an OpenMM error.

    Attributes
    ----------
    state_name : str
        Name of the state point being sampled.
    step : int
        MD step (``Sampler.total_steps``) at which the failure was detected;
        the fault happened at or before it, after the previous check.
    reason : str
        What was detected.
    """

    def __init__(self, state_name: str, step: int, reason: str):
        self.state_name = state_name
        self.step = int(step)
        self.reason = reason
        super().__init__(f"sampling state {state_name!r} failed at step {step}: {reason}")


# -- snapshots ----------------------------------------------------------------------------


class SnapshotTensors(NamedTuple):
    """Snapshots as torch tensors (see :meth:`Snapshots.to_torch`)."""

    positions: torch.Tensor
    velocities: torch.Tensor
    boxes: torch.Tensor
    potential_energies: torch.Tensor
    steps: torch.Tensor
    species: torch.Tensor


@dataclass
class Snapshots:
    """Configurations sampled at one state point.

    Attributes
    ----------
    positions : numpy.ndarray, shape (F, N, 3), float64
        Positions in nm, not wrapped into the box.
    velocities : numpy.ndarray, shape (F, N, 3), float64
        Velocities in nm/ps.
    boxes : numpy.ndarray, shape (F, 3, 3), float64
        Periodic box vectors (rows) in nm.
    potential_energies : numpy.ndarray, shape (F,), float64
        Potential energy in kJ/mol from the sampling backend.
    steps : numpy.ndarray, shape (F,), int64
        MD step (``Sampler.total_steps``) of each frame.
    state : StatePoint
        The state point sampled; ``state.particle_species()`` gives the species.
    """

    positions: np.ndarray
    velocities: np.ndarray
    boxes: np.ndarray
    potential_energies: np.ndarray
    steps: np.ndarray
    state: StatePoint

    def __len__(self) -> int:
        return int(self.positions.shape[0])

    def __getitem__(self, index) -> Snapshots:
        if isinstance(index, (int, np.integer)):
            index = slice(int(index), int(index) + 1 if int(index) != -1 else None)
        return Snapshots(
            self.positions[index],
            self.velocities[index],
            self.boxes[index],
            self.potential_energies[index],
            self.steps[index],
            self.state,
        )

    @property
    def n_particles(self) -> int:
        return int(self.positions.shape[1])

    def to_torch(self, dtype: torch.dtype = torch.float64, device=None) -> SnapshotTensors:
        """The arrays as tensors (floats in ``dtype``), plus the species index per particle (N,) int64."""
        return SnapshotTensors(
            torch.as_tensor(self.positions, dtype=dtype, device=device),
            torch.as_tensor(self.velocities, dtype=dtype, device=device),
            torch.as_tensor(self.boxes, dtype=dtype, device=device),
            torch.as_tensor(self.potential_energies, dtype=dtype, device=device),
            torch.as_tensor(self.steps, dtype=torch.long, device=device),
            torch.as_tensor(self.state.particle_species(), dtype=torch.long, device=device),
        )

    def to_mdtraj(self, timestep: float = 0.002):
        """An ``mdtraj.Trajectory`` of the frames (time in ps from ``steps * timestep``)."""
        import mdtraj

        lengths = np.stack([np.diag(b) for b in self.boxes]) if len(self) else np.zeros((0, 3))
        return mdtraj.Trajectory(
            self.positions.astype(np.float32),
            mdtraj.Topology.from_openmm(self.state.topology()),
            time=self.steps * float(timestep),
            unitcell_lengths=lengths,
            unitcell_angles=np.full((len(self), 3), 90.0),
        )

    @staticmethod
    def concatenate(parts: Sequence[Snapshots]) -> Snapshots:
        """Join snapshot sets of the same state point along the frame axis."""
        parts = list(parts)
        if not parts:
            raise ValueError("need at least one Snapshots object to concatenate")
        state = parts[0].state
        for p in parts[1:]:
            if p.state.name != state.name or p.n_particles != parts[0].n_particles:
                raise ValueError("can only concatenate snapshots of the same state point")
        return Snapshots(
            np.concatenate([p.positions for p in parts]),
            np.concatenate([p.velocities for p in parts]),
            np.concatenate([p.boxes for p in parts]),
            np.concatenate([p.potential_energies for p in parts]),
            np.concatenate([p.steps for p in parts]),
            state,
        )


# -- platforms ------------------------------------------------------------------------------


def _openmm():
    from .torchforce import _import_openmm

    return _import_openmm()


def available_platforms() -> List[str]:
    """Names of the OpenMM platforms that loaded in this process."""
    openmm = _openmm()
    return [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())]


def choose_platform(platform: Optional[str] = None) -> str:
    """The platform to run on: ``platform`` if given, else CUDA, then OpenCL, then CPU.

    Raises
    ------
    ValueError
        If the named platform is not available.
    """
    names = available_platforms()
    if platform is not None:
        if hasattr(platform, "getName"):
            platform = platform.getName()
        if platform not in names:
            raise ValueError(f"OpenMM platform {platform!r} is not available here; available: {names}")
        return platform
    for name in PLATFORM_ORDER:
        if name in names:
            return name
    return "Reference"


# -- forces ------------------------------------------------------------------------------------


def _check_species(table: PairTable, state: StatePoint) -> np.ndarray:
    """Map state species names to table species indices; clear error on mismatch."""
    missing = [s for s in state.species if s not in table.species]
    if missing:
        raise ValueError(
            f"state {state.name!r} has species {missing} that the potential does not define; "
            f"potential species: {table.species}, state species: {state.species}"
        )
    return np.array([table.species.index(s) for s in state.species], dtype=np.int64)


def _check_cutoff(table: PairTable, lengths: np.ndarray, name: str) -> None:
    if 2.0 * table.cutoff > float(np.min(lengths)):
        raise ValueError(
            f"state {name!r}: cutoff {table.cutoff:.4g} nm is more than half the shortest box edge "
            f"{float(np.min(lengths)):.4g} nm; use more particles, a larger box or a shorter cutoff"
        )


def _table_grid_start(table: PairTable, energy_cap: float, n_scan: int = 20000) -> float:
    """Smallest r where every pair type's u(r) is finite and below ``energy_cap`` (and stays so outward)."""
    r = np.linspace(table.cutoff * 1e-3, table.cutoff, n_scan)
    bad = np.zeros(r.shape, dtype=bool)
    for k in range(table.n_pair_types):
        u, du = table.evaluate(r, k)
        bad |= ~np.isfinite(u) | ~np.isfinite(du) | (u > energy_cap)
    if bad[-2]:
        raise ValueError(f"u(r) exceeds {energy_cap} kJ/mol or is not finite just inside the cutoff")
    last_bad = np.nonzero(bad)[0]
    return float(r[last_bad[-1] + 1]) if last_bad.size else float(r[0])


def _tabulate_pairs(table: PairTable, r_min: float, n_points: int) -> Tuple[List[np.ndarray], List[float], List[float]]:
    """u(r) on the knots of every pair type, and du/dr at r_min and at the last knot."""
    r = np.linspace(r_min, table.cutoff, n_points)
    # The last knot takes the left limit at the cutoff (nonzero for 'truncate'):
    # OpenMM drops pairs at r >= cutoff itself.
    r_eval = r.copy()
    r_eval[-1] = table.cutoff * (1.0 - 1e-12)
    values, slopes, end_slopes = [], [], []
    for k in range(table.n_pair_types):
        u, du = table.evaluate(r_eval, k)
        if not (np.all(np.isfinite(u)) and np.isfinite(du[0]) and np.isfinite(du[-1])):
            raise ValueError(
                f"u(r) of pair {table.pair_names[k]} is not finite on the table grid "
                f"[{r_min:.4g}, {table.cutoff:.4g}] nm"
            )
        values.append(u)
        slopes.append(float(du[0]))
        end_slopes.append(float(du[-1]))
    return values, slopes, end_slopes


#: Knots that continue each pair type's segment of the merged table past both
#: of its ends. OpenMM's spline is natural (u'' = 0 at the ends) and the
#: segments meet with a jump (u near the cutoff, then u near r_min, up to the
#: energy cap); the error of both decays by 2 - sqrt(3) ~ 0.27 per knot, so
#: 32 knots leave < 1e-18 of it on [r_min, r_c].
_TABLE_PADDING = 32


@dataclass(frozen=True)
class _MergedTable:
    """Every pair type's u(r) in one ``Continuous1DFunction``: pair type k at x = r + k * span."""

    values: List[float]  # (n_types * (n_points + 2 * _TABLE_PADDING),) kJ/mol
    x_start: float  # nm, first knot (r_min - padding)
    x_end: float  # nm, last knot
    span: float  # nm, offset between consecutive pair types' segments
    slopes: List[float]  # (n_types,) kJ/mol/nm, du/dr at r_min (linear continuation inward)


def _join_segments(
    segments: List[np.ndarray], spacing: float, low_slopes: Sequence[float], high_slopes: Sequence[float]
) -> Tuple[np.ndarray, float]:
    """Concatenate per-pair-type knot values (each of the same length, on the same uniform grid) into one table.

    Each segment is first continued linearly (C1, with the given slopes in
    kJ/mol/nm) by ``_TABLE_PADDING`` knots on both sides, which keeps the
    jump to the next segment and the natural spline's end condition out of
    the segment's own range. Returns the values, shape
    (n_types * (segment length + 2 * _TABLE_PADDING),), and the span (nm)
    between the start of consecutive segments: pair type k sits at
    x = r + k * span.
    """
    outward = spacing * np.arange(1, _TABLE_PADDING + 1)
    padded = [
        np.concatenate([u[0] - low * outward[::-1], u, u[-1] + high * outward])
        for u, low, high in zip(segments, low_slopes, high_slopes, strict=True)
    ]
    return np.concatenate(padded), float(spacing * padded[0].size)


def _merged_table(table: PairTable, r_min: float, n_points: int) -> _MergedTable:
    """The knots of :func:`create_tabulated_force`'s single spline table (see :class:`_MergedTable`)."""
    values, slopes, end_slopes = _tabulate_pairs(table, r_min, n_points)
    spacing = (table.cutoff - r_min) / (n_points - 1)
    # The slope at r_min continues the force below r_min the same way.
    merged, span = _join_segments(values, spacing, slopes, end_slopes)
    x_start = r_min - _TABLE_PADDING * spacing
    return _MergedTable(
        values=merged.tolist(),
        x_start=float(x_start),
        x_end=float(x_start + spacing * (merged.size - 1)),
        span=span,
        slopes=slopes,
    )


def _same_pair_type(table: PairTable, k: int, parameter: str = "odiff_species") -> str:
    """An expression in the particles' species parameters: 1 if the pair is of type ``k``, else 0.

    Arithmetic rather than a ``Discrete2DFunction``: a tabulated function is a
    call out of OpenMM's compiled expression, which costs time.
    """
    type_matrix = table.type_matrix.numpy()
    a, b = (int(i) for i in np.argwhere(np.triu(type_matrix == k))[0])
    same = f"delta({parameter}1-{a})*delta({parameter}2-{b})"
    if a != b:
        same += f"+delta({parameter}1-{b})*delta({parameter}2-{a})"
    return same


def _pair_type_expression(table: PairTable, parameter: str = "odiff_species") -> str:
    """The pair's type index (0 .. n_pair_types - 1) from the per-particle species ``parameter``."""
    if table.n_pair_types == 1:
        return "0"
    return "+".join(f"{k}*({_same_pair_type(table, k, parameter)})" for k in range(1, table.n_pair_types))


def create_tabulated_force(
    table: PairTable,
    particle_species,
    n_points: int = DEFAULT_TABLE_POINTS,
    r_min: Optional[float] = None,
    energy_cap: float = DEFAULT_TABLE_ENERGY_CAP,
    *,
    atoms=None,
    n_particles: Optional[int] = None,
    exclusions=None,
):
    """A ``CustomNonbondedForce`` that evaluates ``table`` from a cubic-spline table.

    Each pair type's u(r) lies on ``n_points`` uniform knots over
    [r_min, cutoff], with the table's cutoff convention applied (shift/switch
    included; for ``truncate`` the last knot is the left limit of u at the
    cutoff). All pair types share one ``Continuous1DFunction`` ``odiff_u``:
    pair type k is read at r + k * span, its segment padded on both sides
    with a linear continuation (so neither the spline's natural end condition
    nor the next segment reaches into [r_min, cutoff]). One spline lookup
    per pair, whatever the number of pair types: a mixture's three pair types
    sample 2.25–2.7× faster than with one function each, all evaluated for every
    pair (docs/sampling.md). Below ``r_min`` the energy continues linearly
    with the table's slope at ``r_min`` (global parameters
    ``odiff_slope<k>``), so overlapping particles are still pushed apart.
    Particle parameter ``odiff_species`` is the species index; the pair type
    follows from it by arithmetic.

    Parameters
    ----------
    table : PairTable
        The potential.
    particle_species : array_like of int, shape (N,) (or (M,) with ``atoms``)
        Species index (into ``table.species``) of every particle the
        potential acts on.
    n_points : int
        Knots per pair type on [r_min, cutoff].
    r_min : float, optional
        Start of the table in nm; by default where u(r) first drops below
        ``energy_cap`` for all pair types.
    energy_cap : float
        kJ/mol, see ``r_min``.
    atoms : array_like of int, shape (M,), optional
        System indices of the particles the potential acts on; with fewer
        than ``n_particles`` an interaction group restricts the force to them.
    n_particles : int, optional
        Particles in the System (every one must be added to the force);
        default ``len(particle_species)``.
    exclusions : array_like of int, shape (E, 2), optional
        Pairs of System indices that do not interact (``addExclusion``).

    Returns
    -------
    openmm.CustomNonbondedForce
        With periodic cutoff at ``table.cutoff`` and no long-range correction.
    """
    openmm = _openmm()
    n_points = int(n_points)
    if n_points < 16:
        raise ValueError(f"n_points must be at least 16, got {n_points}")
    if r_min is None:
        r_min = _table_grid_start(table, energy_cap)
    if not 0 < r_min < table.cutoff:
        raise ValueError(f"r_min must lie in (0, cutoff={table.cutoff}), got {r_min}")
    merged = _merged_table(table, r_min, n_points)
    n_types = table.n_pair_types
    # Nested select: pair type k picks slope k. Pair types are exact small integers.
    slope = f"odiff_slope{n_types - 1}"
    for k in range(n_types - 2, -1, -1):
        slope = f"select(pt - {k}, {slope}, odiff_slope{k})"
    if n_types > 1:
        pair_type = _pair_type_expression(table)
        expression = f"odiff_u(rr + {merged.span!r}*pt) + ({slope})*(r - rr); rr = max(r, {r_min!r}); pt = {pair_type}"
    else:
        expression = f"odiff_u(rr) + odiff_slope0*(r - rr); rr = max(r, {r_min!r})"
    force = openmm.CustomNonbondedForce(expression)
    force.setName(_FORCE_NAME)
    force.addPerParticleParameter("odiff_species")
    force.addTabulatedFunction("odiff_u", openmm.Continuous1DFunction(merged.values, merged.x_start, merged.x_end))
    for k in range(n_types):
        force.addGlobalParameter(f"odiff_slope{k}", merged.slopes[k])
    force.setNonbondedMethod(openmm.CustomNonbondedForce.CutoffPeriodic)
    force.setCutoffDistance(table.cutoff)
    force.setUseLongRangeCorrection(False)
    force.setUseSwitchingFunction(False)
    return _add_particles(force, particle_species, atoms, n_particles, exclusions)


def create_expression_force(
    table: PairTable,
    particle_species,
    *,
    atoms=None,
    n_particles: Optional[int] = None,
    exclusions=None,
):
    """A ``CustomNonbondedForce`` whose energy is the table's own closed-form expression.

    Every pair potential must have one (:meth:`PairPotential.openmm_expression`:
    the analytic potentials, :class:`~openmm_diffsim.potentials.CubicSpline`
    and sums of them; not a neural network). The cutoff convention is part
    of the expression (``shift``: minus u(r_c); ``switch``: times OpenMM's
    switching polynomial), so the force is the model itself, not a table of it.
    OpenMM compiles the expression to machine code; on the CPU platform this
    runs the demo's spline model ~2.4× faster than ``create_tabulated_force``
    (docs/sampling.md). Several pair types are chosen per pair from the
    particles' species parameter. Arguments and return as in
    :func:`create_tabulated_force`.
    """
    openmm = _openmm()
    rc = table.cutoff
    terms = _pair_expressions(table)
    if table.cutoff_mode == "shift":
        with torch.no_grad():
            u_cut = table._at_cutoff(torch.zeros(1, dtype=torch.float64)).tolist()
        for k, expression in enumerate(terms):
            main, definitions = split_expression(expression)
            terms[k] = "; ".join([f"({main})-({u_cut[k]!r})", *definitions])
    energy = terms[-1]
    # Pair type k from the two species parameters by arithmetic (_same_pair_type).
    for k in range(len(terms) - 2, -1, -1):
        energy = combine_expressions([terms[k], energy], f"select({_same_pair_type(table, k)},{{0}},{{1}})")
    if table.cutoff_mode == "switch":
        width = rc - table.switch_distance
        main, definitions = split_expression(energy)
        energy = "; ".join(
            [
                f"({main})*(1-odiff_x^3*(10-15*odiff_x+6*odiff_x^2))",
                f"odiff_x=min(max((r-{table.switch_distance!r})/{width!r},0),1)",
                *definitions,
            ]
        )
    force = openmm.CustomNonbondedForce(energy)
    force.setName(_FORCE_NAME)
    force.addPerParticleParameter("odiff_species")
    force.setNonbondedMethod(openmm.CustomNonbondedForce.CutoffPeriodic)
    force.setCutoffDistance(rc)
    force.setUseLongRangeCorrection(False)
    force.setUseSwitchingFunction(False)
    return _add_particles(force, particle_species, atoms, n_particles, exclusions)


def _add_particles(force, particle_species, atoms, n_particles, exclusions):
    """Add every System particle to ``force`` (parameter: species index), an interaction group and exclusions."""
    particle_species = np.asarray(particle_species, dtype=np.int64).reshape(-1)
    if atoms is None:
        n_total = particle_species.size if n_particles is None else int(n_particles)
        if n_total != particle_species.size:
            raise ValueError(
                f"particle_species lists {particle_species.size} particles but n_particles is {n_total}: give atoms"
            )
        atoms = np.arange(n_total)
    else:
        if n_particles is None:
            raise ValueError("atoms needs n_particles (the number of particles in the System)")
        n_total = int(n_particles)
        atoms = np.asarray(atoms, dtype=np.int64).reshape(-1)
        if atoms.size != particle_species.size:
            raise ValueError(f"atoms lists {atoms.size} particles but particle_species {particle_species.size}")
        if atoms.size and (atoms.min() < 0 or atoms.max() >= n_total or np.unique(atoms).size != atoms.size):
            raise ValueError(f"atoms must be distinct particle indices in 0..{n_total - 1}")
    # Every System particle must be in the force; those outside `atoms` get
    # species 0 and are kept out by the interaction group.
    all_species = np.zeros(n_total, dtype=np.int64)
    all_species[atoms] = particle_species
    for s in all_species:
        force.addParticle([float(s)])
    if atoms.size < n_total:
        selected = [int(a) for a in atoms]
        force.addInteractionGroup(selected, selected)
    if exclusions is not None:
        pairs = np.asarray(exclusions, dtype=np.int64).reshape(-1, 2)
        # OpenMM rejects a pair excluded twice.
        pairs = np.unique(np.sort(pairs, axis=1), axis=0)
        inside = np.zeros(n_total, dtype=bool)
        inside[atoms] = True
        for a, b in pairs:
            if not (0 <= a < n_total and 0 <= b < n_total) or a == b or not (inside[a] and inside[b]):
                raise ValueError(f"exclusion ({a}, {b}) must pair two distinct particles the potential acts on")
            force.addExclusion(int(a), int(b))
    return force


def _lj_parameters(table: PairTable) -> List[Tuple[float, float]]:
    """Per-species (sigma, epsilon) if the table is plain LJ with Lorentz-Berthelot mixing, else ValueError."""
    for key, pot in zip(table.pair_keys(), table.pair_potentials, strict=True):
        if type(pot) is not LennardJones:
            raise ValueError(
                f"backend 'native' needs LennardJones for every pair; pair {key} is {type(pot).__name__}. "
                "Use backend 'tabulated' or 'torch'."
            )
    if table.cutoff_mode == "shift":
        raise ValueError(
            "backend 'native' (NonbondedForce) cannot shift LJ at the cutoff; use cutoff_mode 'truncate' or "
            "'switch', or backend 'tabulated'/'torch'"
        )
    per_species = []
    for s in range(len(table.species)):
        pot = table.pair_potentials[table.pair_index((table.species[s], table.species[s]))]
        per_species.append((float(pot.sigma.detach()), float(pot.epsilon.detach())))
    for key, pot in zip(table.pair_keys(), table.pair_potentials, strict=True):
        (sa, ea), (sb, eb) = (per_species[table.species.index(k)] for k in key)
        if not (
            math.isclose(float(pot.sigma.detach()), 0.5 * (sa + sb), rel_tol=1e-9)
            and math.isclose(float(pot.epsilon.detach()), math.sqrt(ea * eb), rel_tol=1e-9)
        ):
            raise ValueError(
                f"backend 'native' needs Lorentz-Berthelot mixing; pair {key} has sigma {float(pot.sigma)}, "
                f"epsilon {float(pot.epsilon)}"
            )
    return per_species


def create_native_lj_force(table: PairTable, particle_species):
    """OpenMM's ``NonbondedForce`` for an all-LennardJones table (LB mixing, truncate or switch)."""
    openmm = _openmm()
    per_species = _lj_parameters(table)
    force = openmm.NonbondedForce()
    force.setName(_FORCE_NAME)
    force.setNonbondedMethod(openmm.NonbondedForce.CutoffPeriodic)
    force.setCutoffDistance(table.cutoff)
    force.setUseDispersionCorrection(False)
    if table.cutoff_mode == "switch":
        force.setUseSwitchingFunction(True)
        force.setSwitchingDistance(table.switch_distance)
    for s in np.asarray(particle_species, dtype=np.int64):
        sigma, epsilon = per_species[int(s)]
        force.addParticle(0.0, sigma, epsilon)
    return force


def _structure_signature(table: PairTable):
    """Everything about a table except parameter values: equal signatures can share a scripted module."""
    parts = [tuple(table.species), table.cutoff, table.cutoff_mode, table.switch_distance]
    for name, module in table.named_modules():
        attrs = tuple(
            sorted(
                (k, v) for k, v in vars(module).items() if not k.startswith("_") and isinstance(v, (int, float, str))
            )
        )
        parts.append((name, type(module).__name__, attrs))
    parts.extend((k, tuple(v.shape), v.dtype) for k, v in table.state_dict().items())
    return tuple(parts)


def _simulation_temperature(simulation, temperature) -> float:
    """The sampling temperature of a user's Simulation (K), from its integrator or thermostat."""
    openmm = _openmm()
    found = None
    integrator = simulation.integrator
    if hasattr(integrator, "getTemperature"):
        found = integrator.getTemperature()
    else:
        for force in simulation.system.getForces():
            if isinstance(force, openmm.AndersenThermostat):
                found = force.getDefaultTemperature()
    found = None if found is None else to_float(found, "temperature", "kelvin")
    if temperature is None:
        if found is None:
            raise ValueError(
                f"cannot tell the temperature of the Simulation ({type(integrator).__name__} has none): "
                "pass temperature= (K)"
            )
        return found
    value = to_float(temperature, "temperature", "kelvin")
    if found is not None and not math.isclose(value, found, rel_tol=1e-6):
        raise ValueError(
            f"temperature {value} K disagrees with the Simulation's {found} K: "
            "reweighting needs the temperature that is sampled"
        )
    if not value > 0:
        raise ValueError(f"temperature must be positive (K), got {value}")
    return value


def _choose_force_group(system, integrator, force_group) -> Tuple[int, Optional[set]]:
    """(group of the learned force, groups whose energy is the learned force's alone or None)."""
    openmm = _openmm()
    from .openmm_systems import _free_force_group

    used = {force.getForceGroup() for force in system.getForces()}
    if force_group == "auto":
        if isinstance(integrator, openmm.CustomIntegrator):
            return 0, None if 0 in used else {0}
        group = _free_force_group(system)
        return (0, None) if group is None else (group, {group})
    if isinstance(force_group, (int, np.integer)) and 0 <= int(force_group) <= 31:
        return int(force_group), None if int(force_group) in used else {int(force_group)}
    raise ValueError(f"force_group must be 'auto' or an integer in 0..31, got {force_group!r}")


# -- the sampler -------------------------------------------------------------------------------------


class Sampler:
    """Molecular dynamics of one state point with the current pair potential.

    Parameters
    ----------
    state : StatePoint
        Composition, temperature and box. Its species names must appear in
        ``table.species``.
    table : PairTable
        The pair potential.
    backend : {"auto", "torch", "tabulated", "native"}
        How the potential enters OpenMM (module docstring); ``auto`` uses
        :data:`DEFAULT_BACKEND` for the chosen platform.
    platform : str, optional
        OpenMM platform name; by default CUDA, then OpenCL, then CPU.
    integrator : {"langevin", "nose-hoover"}
        ``LangevinMiddleIntegrator`` or ``NoseHooverIntegrator`` (chain of 3).
    timestep : float or Quantity
        ps.
    friction : float or Quantity
        Langevin friction, or Nosé–Hoover collision frequency, in 1/ps.
    seed : int, optional
        Makes runs reproducible: initial configuration, velocities and the
        Langevin noise. ``None`` draws a random seed (recorded as ``.seed``).
    positions : array_like (N, 3) or Quantity, optional
        Start configuration in nm; by default an fcc lattice.
    reporters : sequence
        OpenMM reporters (``app.DCDReporter``, ``app.StateDataReporter``, ...)
        called during every MD step run by this sampler.
    skin : float
        Verlet skin (nm) of the TorchForce neighbor list.
    platform_properties : dict, optional
        OpenMM platform properties (default: mixed precision on GPUs).
    table_points : int
        Knots per pair type for the tabulated backend.
    check_interval : int
        During :meth:`equilibrate`, check for NaN/explosion every this many steps.
    max_temperature_factor : float
        Kinetic temperature above this multiple of the target counts as an explosion.

    Attributes
    ----------
    platform_name : str
        The platform that runs (also logged at INFO level).
    backend : str
        The backend that runs.
    total_steps : int
        MD steps run so far.
    last_handover_seconds : float
        Wall time of the last :meth:`update_potential`.
    last_handover_method : str
        ``"in place"`` (``updateParametersInContext``) or ``"rebuild"`` (new
        force, ``Context.reinitialize``) for the last hand-over.
    n_system_particles : int
        Particles in the OpenMM System (more than ``state.n_particles`` when
        the potential acts on a selection, see :meth:`from_simulation`).
    owns_simulation : bool
        False for a user's Simulation wrapped by :meth:`from_simulation`.
    """

    def __init__(
        self,
        state: StatePoint,
        table: PairTable,
        backend: str = "auto",
        platform: Optional[str] = None,
        integrator: str = "langevin",
        timestep=0.002,
        friction=1.0,
        seed: Optional[int] = None,
        positions=None,
        reporters: Sequence = (),
        skin: float = 0.1,
        platform_properties: Optional[Dict[str, str]] = None,
        table_points: int = DEFAULT_TABLE_POINTS,
        check_interval: int = 1000,
        max_temperature_factor: float = 10.0,
    ):
        _openmm()  # fail early with an install hint

        if not isinstance(state, StatePoint):
            raise TypeError(f"state must be a StatePoint, got {type(state).__name__}")
        if not isinstance(table, PairTable):
            raise TypeError(f"table must be a PairTable, got {type(table).__name__}")
        if backend not in ("auto",) + BACKENDS:
            raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
        if integrator not in ("langevin", "nose-hoover"):
            raise ValueError(f"integrator must be 'langevin' or 'nose-hoover', got {integrator!r}")
        self.state = state
        self.seed = int(seed) if seed is not None else int(np.random.SeedSequence().entropy % (2**31 - 1))
        self.skin = float(skin)
        self.table_points = int(table_points)
        self.check_interval = int(check_interval)
        if self.check_interval < 1:
            raise ValueError("check_interval must be at least 1")
        self.max_temperature_factor = float(max_temperature_factor)
        self.timestep = to_float(timestep, "timestep", "picosecond")
        self.friction = to_float(friction, "friction")
        if self.timestep <= 0:
            raise ValueError(f"timestep must be positive (ps), got {self.timestep}")
        if self.friction <= 0:
            raise ValueError(f"friction must be positive (1/ps), got {self.friction}")
        self._table_species = _check_species(table, state)
        _check_cutoff(table, state.box_lengths, state.name)
        self._particle_species = self._table_species[state.particle_species()]
        # The sampler's own System: the potential acts on every particle, no
        # exclusions; from_simulation() sets these for a user's System.
        self._atoms: Optional[np.ndarray] = None
        self._exclusions: Optional[np.ndarray] = None
        self.n_system_particles = state.n_particles
        self._degrees_of_freedom = 3 * state.n_particles
        self._force_group = 0
        self._energy_groups: Optional[set] = None
        self.owns_simulation = True

        if backend == "native":
            _lj_parameters(table)  # fail early with the reason
        if backend == "expression":
            _pair_expressions(table)  # fail early with the reason
        if positions is None:
            positions = state.initial_positions("lattice", min_distance=self._overlap_distance(table), seed=self.seed)
        positions = to_array(positions, "positions", "nanometer")
        if positions.shape != (state.n_particles, 3):
            raise ValueError(f"positions must have shape ({state.n_particles}, 3), got {positions.shape}")
        if not np.all(np.isfinite(positions)):
            raise ValueError("positions contain NaN or infinite values")
        self.integrator_name = integrator
        self.table = copy.deepcopy(table)

        # A named platform must work; an automatic choice falls through to the
        # next platform if a Context cannot be made (e.g. OpenCL without a device).
        if platform is not None:
            candidates = [choose_platform(platform)]
        else:
            available = available_platforms()
            candidates = [name for name in PLATFORM_ORDER if name in available] or ["Reference"]
        failures = []
        for name in candidates:
            try:
                self._create_simulation(name, backend, platform_properties)
                break
            except Exception as exc:  # noqa: BLE001 - collected and reported below
                failures.append(f"{name} ({self.backend}): {exc}")
                logger.warning("state %r: could not create an OpenMM context on %s: %s", state.name, name, exc)
        else:
            raise RuntimeError("could not create an OpenMM context: " + "; ".join(failures))
        self.context = self.simulation.context
        self.context.setPositions(positions)
        self.context.setVelocitiesToTemperature(state.temperature, self.seed)
        for reporter in reporters:
            self.simulation.reporters.append(reporter)
        self.total_steps = 0
        self.last_handover_seconds = 0.0
        self.last_handover_method = ""
        logger.info(
            "Sampler for state %r: %d particles, platform %s, backend %s, integrator %s",
            state.name,
            state.n_particles,
            self.platform_name,
            self.backend,
            integrator,
        )

    @classmethod
    def from_simulation(
        cls,
        simulation,
        table: PairTable,
        *,
        name: str = "simulation",
        targets: Sequence = (),
        weight: float = 1.0,
        temperature=None,
        species_from="name",
        species_map=None,
        atoms=None,
        exclusions="bonds",
        bond_cutoff: int = 1,
        backend: str = "auto",
        skin: float = 0.1,
        table_points: int = DEFAULT_TABLE_POINTS,
        force_group: Union[str, int] = "auto",
        check_interval: int = 1000,
        max_temperature_factor: float = 10.0,
    ) -> Sampler:
        """A sampler that runs a user's own ``openmm.app.Simulation`` with the learned pair potential.

        The learned force is added to ``simulation.system`` (an earlier
        openmm-diffsim pair force in it is replaced) for the selected
        particles, with the excluded pairs, and the Context is reinitialised
        keeping positions, velocities and box. Every other force, the
        integrator and the reporters stay as the user made them; only the
        pair potential changes when :meth:`update_potential` hands over new
        parameters. The sampler's :attr:`state` is a
        :class:`~openmm_diffsim.openmm_systems.SimulationStatePoint` describing
        the selected particles, to be given to the
        :class:`~openmm_diffsim.training.Trainer` with the sampler
        (``Trainer(table, [sampler.state], samplers=[sampler])``).

        Parameters
        ----------
        simulation : openmm.app.Simulation
            The user's simulation; its System must be periodic (rectangular box).
        table : PairTable
            The pair potential to run (copied).
        name : str
            Name of the state point (logs, checkpoints, losses).
        targets : sequence of Target
            RDF targets of the selected particles' species pairs. Target and
            model RDFs count every pair of selected particles, excluded
            (bonded) pairs included, as :class:`~openmm_diffsim.reporters.RDFReporter` does.
        weight : float
            Weight of the state in the training loss.
        temperature : float or Quantity, optional
            K. Read from the integrator (or an ``AndersenThermostat``) when
            not given; must agree with it when both are present.
        species_from, species_map, atoms, exclusions, bond_cutoff
            Which particles the potential acts on, their species and the
            excluded pairs, as for
            :func:`~openmm_diffsim.openmm_systems.add_pair_potential`.
        backend : {"auto", "torch", "tabulated"}
            How the potential enters OpenMM (module docstring); ``auto`` uses
            :data:`DEFAULT_BACKEND` for the Simulation's platform.
        skin, table_points, check_interval, max_temperature_factor
            As for :class:`Sampler`.
        force_group : "auto" or int
            Force group of the learned force. ``"auto"`` takes a group no
            other force uses (so snapshots record the learned force's energy
            alone), except with a ``CustomIntegrator`` (e.g. multiple time
            stepping, which integrates listed groups only), where group 0 is kept.

        Returns
        -------
        Sampler
            Whose :attr:`Snapshots.positions` hold the selected particles only
            (System order), and whose ``potential_energies`` are those of the
            learned force when it has a force group of its own (else the
            total potential energy).

        Raises
        ------
        ValueError
            Non-periodic or triclinic box, cutoff above half the box,
            particles without a species or with unknown species, an unknown
            temperature, backend ``"native"``.
        """
        _openmm()  # fails early with an install hint
        from openmm import app

        from .openmm_systems import (
            check_periodic_box,
            degrees_of_freedom,
            nonbonded_exclusion_conflict,
            select_particles,
            simulation_state_point,
        )

        if not isinstance(simulation, app.Simulation):
            raise TypeError(f"simulation must be an openmm.app.Simulation, got {type(simulation).__name__}")
        if not isinstance(table, PairTable):
            raise TypeError(f"table must be a PairTable, got {type(table).__name__}")
        if backend not in ("auto", "torch", "tabulated", "expression"):
            raise ValueError(
                f"backend must be 'auto', 'torch', 'tabulated' or 'expression' for a user's Simulation, got {backend!r}"
                + (" (the native NonbondedForce cannot be restricted to a selection)" if backend == "native" else "")
            )
        system, context, topology = simulation.system, simulation.context, simulation.topology
        ours = [k for k, f in enumerate(system.getForces()) if f.getName() == _FORCE_NAME]
        if len(ours) > 1:
            raise ValueError(f"the System has {len(ours)} openmm-diffsim pair forces; keep at most one")
        check_periodic_box(system, topology, table)
        box = np.asarray(context.getState().getPeriodicBoxVectors(asNumpy=True)._value, dtype=np.float64)
        lengths = np.diag(box).copy()
        if np.any(np.abs(box - np.diag(lengths)) > 1e-9 * lengths.max()):
            raise ValueError("triclinic boxes are not supported yet: the Context's box vectors must be diagonal")
        _check_cutoff(table, lengths, name)
        selection = select_particles(
            topology,
            table,
            n_particles=system.getNumParticles(),
            species_from=species_from,
            species_map=species_map,
            atoms=atoms,
            exclusions=exclusions,
            bond_cutoff=bond_cutoff,
        )
        masses = np.array([system.getParticleMass(k)._value for k in range(system.getNumParticles())])
        state = simulation_state_point(
            selection,
            table,
            topology,
            masses,
            lengths,
            name=name,
            temperature=_simulation_temperature(simulation, temperature),
            targets=targets,
            weight=weight,
        )

        self = cls.__new__(cls)
        self.state = state
        self.seed = None
        self.skin = float(skin)
        self.table_points = int(table_points)
        self.check_interval = int(check_interval)
        if self.check_interval < 1:
            raise ValueError("check_interval must be at least 1")
        self.max_temperature_factor = float(max_temperature_factor)
        integrator = simulation.integrator
        self.timestep = float(integrator.getStepSize()._value) if hasattr(integrator, "getStepSize") else math.nan
        self.friction = float(integrator.getFriction()._value) if hasattr(integrator, "getFriction") else math.nan
        self.integrator_name = type(integrator).__name__
        self.table = copy.deepcopy(table)
        self._table_species = _check_species(table, state)
        self._particle_species = self._table_species[state.particle_species()]
        self._atoms = selection.atoms
        self._exclusions = selection.exclusions if len(selection.exclusions) else None
        self.n_system_particles = selection.n_particles
        self._degrees_of_freedom = degrees_of_freedom(system)
        self.owns_simulation = False
        self.platform_name = context.getPlatform().getName()
        self.backend = _auto_backend(self.platform_name, self.table) if backend == "auto" else backend
        if self.backend in ("tabulated", "expression") and self.platform_name != "Reference":
            conflict = nonbonded_exclusion_conflict(system, selection.exclusions)
            if conflict is not None and backend == "auto":
                logger.info("state %r: using the torch backend: %s", name, conflict)
                self.backend = "torch"
            elif conflict is not None:
                raise ValueError(
                    f"backend {self.backend!r} adds a CustomNonbondedForce, and the {self.platform_name} platform "
                    f"needs every nonbonded force of a System to exclude the same pairs: {conflict}. "
                    "Use backend='torch' (or 'auto'), or give exclusions that match"
                )
        self._scripted = None
        self._signature = None
        self._table_r_min = None
        if ours:
            system.removeForce(ours[0])
        self._force_group, self._energy_groups = _choose_force_group(system, integrator, force_group)
        self.system = system
        self.simulation = simulation
        self.integrator = integrator
        self.context = context
        self._force_index = system.addForce(self._build_force(self.table))
        context.reinitialize(preserveState=True)
        self.total_steps = 0
        self.last_handover_seconds = 0.0
        self.last_handover_method = ""
        logger.info(
            "Sampler for a user's Simulation %r: %d of %d particles, %d excluded pairs, platform %s, backend %s",
            name,
            selection.n_selected,
            selection.n_particles,
            len(selection.exclusions),
            self.platform_name,
            self.backend,
        )
        return self

    def _locate_force(self) -> int:
        """Index of the learned force in the System (a user may have added or removed other forces)."""
        if self.owns_simulation:
            return self._force_index
        ours = [k for k, f in enumerate(self.system.getForces()) if f.getName() == _FORCE_NAME]
        if len(ours) != 1:
            raise RuntimeError(
                f"state {self.state.name!r}: expected one openmm-diffsim pair force in the System, found {len(ours)}"
            )
        return ours[0]

    # -- force construction and hand-over ---------------------------------------------------------

    def _create_simulation(self, platform_name: str, backend: str, platform_properties) -> None:
        openmm = _openmm()
        from openmm import app

        state = self.state
        self.platform_name = platform_name
        self.backend = _auto_backend(platform_name, self.table) if backend == "auto" else backend
        properties = dict(_DEFAULT_PROPERTIES.get(platform_name, {}))
        properties.update(platform_properties or {})
        self._scripted = None
        self._signature = None
        self._table_r_min: Optional[float] = None
        system = openmm.System()
        for m in state.particle_masses():
            system.addParticle(float(m))
        system.setDefaultPeriodicBoxVectors(*(openmm.Vec3(*row) for row in state.box_vectors))
        self._force_index = system.addForce(self._build_force(self.table))
        self.system = system
        if self.integrator_name == "langevin":
            self.integrator = openmm.LangevinMiddleIntegrator(state.temperature, self.friction, self.timestep)
            self.integrator.setRandomNumberSeed(self.seed)
        else:
            self.integrator = openmm.NoseHooverIntegrator(state.temperature, self.friction, self.timestep)
        self.simulation = app.Simulation(
            state.topology(), system, self.integrator, openmm.Platform.getPlatformByName(platform_name), properties
        )

    def _overlap_distance(self, table: PairTable) -> float:
        """Distance below which some pair energy exceeds 50 kT: a lattice start must not go below it."""
        r = np.linspace(table.cutoff * 1e-3, table.cutoff, 4000)
        limit = 50.0 * self.state.kT
        worst = 0.0
        for k in range(table.n_pair_types):
            u, _ = table.evaluate(r, k)
            above = np.nonzero(~np.isfinite(u) | (u > limit))[0]
            if above.size:
                worst = max(worst, float(r[min(above[-1] + 1, r.size - 1)]))
        return worst if worst > 0 else None

    def _build_force(self, table: PairTable):
        force = self._make_force(table)
        force.setForceGroup(self._force_group)
        return force

    def _make_force(self, table: PairTable):
        selection = dict(atoms=self._atoms, n_particles=self.n_system_particles, exclusions=self._exclusions)
        if self.backend == "torch":
            from .torchforce import _has_network, _import_openmmtorch, script_energy_module

            openmmtorch = _import_openmmtorch()
            if _has_network(table):
                # As create_torch_force(tabulate="auto"): the network as a fine spline.
                table = table.tabulated()
            signature = _structure_signature(table)
            if self._scripted is not None and signature == self._signature:
                # Same structure: copy parameter values into the scripted module
                # instead of scripting again (saves most of the hand-over).
                self._scripted.table.load_state_dict(table.state_dict())
            else:
                self._scripted = script_energy_module(table, self._particle_species, skin=self.skin, **selection)
                self._signature = signature
            force = openmmtorch.TorchForce(self._scripted)
            force.setOutputsForces(True)
            force.setUsesPeriodicBoundaryConditions(True)
            force.setName(_FORCE_NAME)
            force.setProperty("useCUDAGraphs", "false")
            return force
        if self.backend == "tabulated":
            if self._table_r_min is None:
                self._table_r_min = _table_grid_start(table, DEFAULT_TABLE_ENERGY_CAP)
            return create_tabulated_force(
                table, self._particle_species, self.table_points, r_min=self._table_r_min, **selection
            )
        if self.backend == "expression":
            return create_expression_force(table, self._particle_species, **selection)
        return create_native_lj_force(table, self._particle_species)

    def update_potential(self, table: PairTable) -> None:
        """Use new potential parameters from the next step on, keeping positions, velocities and box.

        ``tabulated``: new spline values through ``updateParametersInContext``
        (same grid; the Context is rebuilt only if the cutoff or species
        change). ``torch``: a new ``TorchForce`` (openmm-torch freezes the
        module) and ``Context.reinitialize(preserveState=True)``; the scripted
        module is reused when only parameter values changed. ``native``:
        per-particle LJ parameters through ``updateParametersInContext``.
        Wall time goes to ``last_handover_seconds``.
        """
        if not isinstance(table, PairTable):
            raise TypeError(f"table must be a PairTable, got {type(table).__name__}")
        start = time.perf_counter()
        table_species = _check_species(table, self.state)
        _check_cutoff(table, np.diag(self.box), self.state.name)
        same_layout = (
            list(table.species) == list(self.table.species)
            and table.cutoff == self.table.cutoff
            and np.array_equal(table_species, self._table_species)
        )
        new_table = copy.deepcopy(table)
        self._force_index = self._locate_force()
        force = self.system.getForce(self._force_index)
        updated_in_place = False
        if same_layout and self.backend == "tabulated":
            # The cutoff convention is baked into the values, so only the grid must match.
            try:
                merged = _merged_table(new_table, self._table_r_min, self.table_points)
            except ValueError:
                merged = None  # u(r) no longer finite on the old grid: rebuild with a new grid start
            if merged is not None:
                force.getTabulatedFunction(0).setFunctionParameters(merged.values, merged.x_start, merged.x_end)
                for k in range(new_table.n_pair_types):
                    force.setGlobalParameterDefaultValue(k, merged.slopes[k])
                    self.context.setParameter(f"odiff_slope{k}", merged.slopes[k])
                force.updateParametersInContext(self.context)
                updated_in_place = True
        elif same_layout and self.backend == "native":
            per_species = _lj_parameters(new_table)
            switch_unchanged = new_table.cutoff_mode == self.table.cutoff_mode and (
                new_table.switch_distance == self.table.switch_distance
            )
            if switch_unchanged:
                for n, s in enumerate(self._particle_species):
                    sigma, epsilon = per_species[int(s)]
                    force.setParticleParameters(n, 0.0, sigma, epsilon)
                force.updateParametersInContext(self.context)
                updated_in_place = True
        if not updated_in_place:
            self._table_species = table_species
            self._particle_species = table_species[self.state.particle_species()]
            if self.backend == "tabulated":
                self._table_r_min = None
            self.system.removeForce(self._force_index)
            self._force_index = self.system.addForce(self._build_force(new_table))
            self.context.reinitialize(preserveState=True)
        self.table = new_table
        self.last_handover_method = "in place" if updated_in_place else "rebuild"
        self.last_handover_seconds = time.perf_counter() - start
        logger.debug("state %r: potential hand-over took %.4f s", self.state.name, self.last_handover_seconds)

    # -- running --------------------------------------------------------------------------------------

    def _fail(self, reason: str) -> SamplingError:
        logger.error("state %r, step %d: %s", self.state.name, self.total_steps, reason)
        return SamplingError(self.state.name, self.total_steps, reason)

    def _step(self, steps: int) -> None:
        try:
            self.simulation.step(int(steps))
        except Exception as exc:  # OpenMMException (NaN coordinates), TorchForce errors
            self.total_steps += int(steps)
            raise self._fail(f"OpenMM raised {type(exc).__name__}: {exc}") from exc
        self.total_steps += int(steps)

    def _checked_state(self, velocities: bool = True):
        state = self.context.getState(getPositions=True, getVelocities=velocities, getEnergy=True)
        energy = state.getPotentialEnergy()._value
        kinetic = state.getKineticEnergy()._value
        positions = np.asarray(state.getPositions(asNumpy=True)._value, dtype=np.float64)
        if not math.isfinite(energy):
            raise self._fail(f"potential energy is {energy}")
        if not np.all(np.isfinite(positions)):
            raise self._fail("positions contain NaN or infinite values")
        kinetic_temperature = 2.0 * kinetic / (self._degrees_of_freedom * self.state.kT / self.state.temperature)
        if not math.isfinite(kinetic) or kinetic_temperature > self.max_temperature_factor * self.state.temperature:
            raise self._fail(
                f"exploding: kinetic temperature {kinetic_temperature:.4g} K vs target {self.state.temperature:.4g} K "
                f"(potential energy {energy:.6g} kJ/mol); try a smaller timestep or minimize first"
            )
        return state, energy, positions

    def minimize(self, max_iterations: int = 1000, tolerance: float = 10.0) -> float:
        """Local energy minimisation (L-BFGS); returns the final potential energy in kJ/mol.

        ``tolerance`` is the RMS force criterion in kJ/mol/nm.
        """
        openmm = _openmm()
        try:
            openmm.LocalEnergyMinimizer.minimize(self.context, float(tolerance), int(max_iterations))
        except Exception as exc:
            raise self._fail(f"energy minimisation failed: {exc}") from exc
        _, energy, _ = self._checked_state(velocities=False)
        return energy

    def equilibrate(self, steps: int) -> None:
        """Run ``steps`` MD steps without collecting snapshots, checking every ``check_interval`` steps."""
        steps = int(steps)
        if steps < 0:
            raise ValueError(f"steps must be non-negative, got {steps}")
        while steps > 0:
            chunk = min(steps, self.check_interval)
            self._step(chunk)
            self._checked_state(velocities=False)
            steps -= chunk

    def run(self, n_snapshots: int, interval: int) -> Snapshots:
        """Production: ``n_snapshots`` frames, one every ``interval`` MD steps.

        Returns
        -------
        Snapshots
            Frames taken after steps ``interval, 2 interval, ...`` counted from now.

        Raises
        ------
        SamplingError
            On NaN or exploding energies, naming the state and step.
        """
        n_snapshots, interval = int(n_snapshots), int(interval)
        if n_snapshots < 1 or interval < 1:
            raise ValueError(f"n_snapshots and interval must be positive, got {n_snapshots}, {interval}")
        n = self.state.n_particles
        positions = np.empty((n_snapshots, n, 3))
        velocities = np.empty((n_snapshots, n, 3))
        boxes = np.empty((n_snapshots, 3, 3))
        energies = np.empty(n_snapshots)
        steps = np.empty(n_snapshots, dtype=np.int64)
        for f in range(n_snapshots):
            self._step(interval)
            state, energy, pos = self._checked_state()
            v = state.getVelocities(asNumpy=True)._value
            if self._atoms is not None:
                pos, v = pos[self._atoms], np.asarray(v)[self._atoms]
            if self._energy_groups is not None:
                # Only the learned force's energy: the fixed forces cancel in reweighting.
                pair_state = self.context.getState(getEnergy=True, groups=self._energy_groups)
                energy = pair_state.getPotentialEnergy()._value
            positions[f] = pos
            velocities[f] = v
            boxes[f] = state.getPeriodicBoxVectors(asNumpy=True)._value
            energies[f] = energy
            steps[f] = self.total_steps
        return Snapshots(positions, velocities, boxes, energies, steps, self.state)

    # -- current state -----------------------------------------------------------------------------------

    @property
    def positions(self) -> np.ndarray:
        """Current positions of all System particles, (N, 3) float64 nm."""
        state = self.context.getState(getPositions=True)
        return np.array(state.getPositions(asNumpy=True)._value, dtype=np.float64)

    @property
    def velocities(self) -> np.ndarray:
        """Current velocities of all System particles, (N, 3) float64 nm/ps."""
        state = self.context.getState(getVelocities=True)
        return np.array(state.getVelocities(asNumpy=True)._value, dtype=np.float64)

    @property
    def box(self) -> np.ndarray:
        """Current box vectors (rows), (3, 3) float64 nm."""
        state = self.context.getState()
        return np.array(state.getPeriodicBoxVectors(asNumpy=True)._value, dtype=np.float64)

    def energy_and_forces(self) -> Tuple[float, np.ndarray]:
        """Potential energy (kJ/mol) and forces ((N, 3) float64 kJ/mol/nm) of the current configuration."""
        state = self.context.getState(getEnergy=True, getForces=True)
        return float(state.getPotentialEnergy()._value), np.array(state.getForces(asNumpy=True)._value)

    def set_state(self, positions, velocities=None, box=None) -> None:
        """Replace the current configuration (nm), velocities (nm/ps) and box (nm)."""
        openmm = _openmm()
        if box is not None:
            box = to_array(box, "box", "nanometer")
            box = np.diag(box) if box.shape == (3,) else box
            _check_cutoff(self.table, np.diag(box), self.state.name)
            self.context.setPeriodicBoxVectors(*(openmm.Vec3(*row) for row in box))
        positions = to_array(positions, "positions", "nanometer")
        if positions.shape != (self.n_system_particles, 3) or not np.all(np.isfinite(positions)):
            raise ValueError(f"positions must be finite with shape ({self.n_system_particles}, 3)")
        self.context.setPositions(positions)
        if velocities is not None:
            self.context.setVelocities(to_array(velocities, "velocities"))

    def __repr__(self) -> str:
        return (
            f"Sampler(state={self.state.name!r}, backend={self.backend!r}, platform={self.platform_name!r}, "
            f"integrator={self.integrator_name!r}, steps={self.total_steps})"
        )


def _trainer_samplers(samplers, states, estimator) -> Dict[str, Sampler]:
    """Check the pre-built samplers given to the Trainer; returns them keyed by state name."""
    from .openmm_systems import SimulationStatePoint

    by_name = {s.name: s for s in states}
    if samplers is None:
        samplers = {}
    elif not hasattr(samplers, "items"):
        listed = list(samplers)
        for sampler in listed:
            if not isinstance(sampler, Sampler):
                raise TypeError(f"samplers must be Sampler objects, got {type(sampler).__name__}")
        samplers = {sampler.state.name: sampler for sampler in listed}
    checked: Dict[str, Sampler] = {}
    for name, sampler in samplers.items():
        if not isinstance(sampler, Sampler):
            raise TypeError(f"samplers must be Sampler objects, got {type(sampler).__name__}")
        if name not in by_name:
            raise ValueError(f"sampler for {name!r} names no state point; states: {sorted(by_name)}")
        if sampler.state is not by_name[name]:
            raise ValueError(
                f"the sampler for {name!r} samples a different state object: pass states=[sampler.state, ...]"
            )
        checked[name] = sampler
    from .gradients import RolloutEstimator

    if isinstance(estimator, str):
        uses_rollouts = estimator in ("rollout", "adjoint", "hybrid")
    else:
        uses_rollouts = isinstance(estimator, RolloutEstimator)
    for state in states:
        if not isinstance(state, SimulationStatePoint):
            continue
        if state.name not in checked:
            raise ValueError(
                f"state {state.name!r} belongs to a user's Simulation: pass its sampler "
                "(Trainer(..., samplers=[sampler]))"
            )
        if uses_rollouts:
            raise ValueError(
                f"state {state.name!r} is sampled by a user's Simulation, whose other forces (bonds, ...) the "
                "torch rollouts cannot integrate: use the 'reweighting' estimator"
            )
    return checked


# -- reference data -----------------------------------------------------------------------------------------


def reference_rdfs(
    state: StatePoint,
    potential: Union[PairTable, str] = "lj-native",
    *,
    backend: str = "auto",
    platform: Optional[str] = None,
    n_snapshots: int = 100,
    interval: int = 50,
    equilibration: int = 5000,
    r_range: Optional[Tuple[float, float]] = None,
    n_bins: int = 100,
    smearing: Optional[float] = None,
    seed: Optional[int] = None,
    timestep=0.002,
    sigma=0.34,
    epsilon=0.996,
    cutoff=1.0,
):
    """Simulate a known potential at ``state`` and return its partial RDFs.

    For tests, examples and benchmarks: the reference structure a trained
    potential should reproduce.

    Parameters
    ----------
    state : StatePoint
        State to simulate.
    potential : PairTable or "lj-native"
        A PairTable (run with ``backend``), or ``"lj-native"``: OpenMM's
        ``NonbondedForce`` with one LJ (``sigma`` nm, ``epsilon`` kJ/mol,
        truncated at ``cutoff`` nm) for every species pair.
    backend, platform, timestep, seed
        As for :class:`Sampler`.
    n_snapshots, interval, equilibration : int
        Production frames, MD steps between frames, MD steps before production
        (after a minimisation).
    r_range : (float, float), optional
        RDF range in nm; default (0, half the shortest box edge).
    n_bins : int
        Number of RDF bins.
    smearing : float, optional
        Gaussian smearing width in nm passed to
        :func:`openmm_diffsim.observables.compute_partial_rdfs`.

    Returns
    -------
    r : numpy.ndarray, shape (n_bins,)
        Bin centres in nm.
    g : numpy.ndarray, shape (n_pair_types, n_bins)
        Partial RDFs in pair-type order (0,0), (0,1), ... of ``state.species``.
    snapshots : Snapshots
        The production frames.
    """
    if isinstance(potential, str):
        if potential != "lj-native":
            raise ValueError(f"potential must be a PairTable or 'lj-native', got {potential!r}")
        if len(state.species) == 1:
            pots = LennardJones(sigma, epsilon)
        else:
            pots = {
                (a, b): LennardJones(sigma, epsilon) for i, a in enumerate(state.species) for b in state.species[i:]
            }
        potential = PairTable(state.species, pots, cutoff=cutoff, cutoff_mode="truncate")
        backend = "native"
    sampler = Sampler(state, potential, backend=backend, platform=platform, timestep=timestep, seed=seed)
    sampler.minimize()
    sampler.equilibrate(equilibration)
    snapshots = sampler.run(n_snapshots, interval)
    if r_range is None:
        r_range = (0.0, 0.5 * float(state.box_lengths.min()))
    from .observables import compute_partial_rdfs

    r, g = compute_partial_rdfs(
        torch.as_tensor(snapshots.positions),
        torch.as_tensor(snapshots.boxes),
        torch.as_tensor(state.particle_species()),
        state.n_species,
        r_range,
        n_bins,
        smearing,
    )
    return np.asarray(torch.as_tensor(r).detach()), np.asarray(torch.as_tensor(g).detach()), snapshots
