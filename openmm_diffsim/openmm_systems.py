"""Bring a learned pair potential into an ordinary OpenMM script.

Users who already have an ``openmm.app.Simulation`` (their own ``System``,
``Topology`` and reporters) add the learned potential with one call, in the
style of openmm-ml's ``createMixedSystem``::

    from openmm_diffsim.openmm_systems import add_pair_potential

    add_pair_potential(system, topology, table, atoms="resname POL", exclusions="bonds")
    simulation = app.Simulation(topology, system, integrator)

The pair potential acts on a chosen set of particles (by default all),
whose species are read from the ``Topology`` (atom name, element or residue
name) and must be species of the :class:`~openmm_diffsim.potentials.PairTable`.
Pairs joined by up to ``bond_cutoff`` bonds of the Topology are excluded
(``exclusions="bonds"``), like ``CustomNonbondedForce.createExclusionsFromBonds``.
The system's other forces are left untouched.

:class:`PairSelection` records which particles, which species and which
excluded pairs; :func:`select_particles` builds it from a Topology. The
trainer's view of such a system is a :class:`SimulationStatePoint` (see
:meth:`openmm_diffsim.sampling.Sampler.from_simulation`).
"""

from __future__ import annotations

import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .potentials import PairTable
from .systems import StatePoint

__all__ = [
    "PairSelection",
    "bonded_pairs",
    "nonbonded_exclusion_conflict",
    "check_periodic_box",
    "degrees_of_freedom",
    "simulation_state_point",
    "SimulationStatePoint",
    "select_particles",
    "add_pair_potential",
    "create_pair_force",
    "SPECIES_SOURCES",
    "PAIR_FORCE_BACKENDS",
]

#: Topology attributes that can name a particle's species.
SPECIES_SOURCES = ("name", "element", "residue")

#: How :func:`add_pair_potential` puts the potential into the System.
PAIR_FORCE_BACKENDS = ("torch", "tabulated")

SpeciesSource = Union[str, Callable[[Any], Optional[str]], Sequence[Optional[str]]]
AtomSelection = Union[None, str, Callable[[Any], bool], Sequence[int]]
ExclusionSpec = Union[None, str, Sequence[Tuple[int, int]], np.ndarray]


@dataclass(frozen=True)
class PairSelection:
    """The particles of a System a pair potential acts on, their species and excluded pairs.

    Attributes
    ----------
    atoms : numpy.ndarray, shape (M,), int64
        System indices of the selected particles, increasing.
    species : tuple of str, length M
        Species name of each selected particle.
    exclusions : numpy.ndarray, shape (E, 2), int64
        Excluded pairs as System indices, ``i < j``, sorted and unique.
    n_particles : int
        Number of particles in the System.
    """

    atoms: np.ndarray
    species: Tuple[str, ...]
    exclusions: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), dtype=np.int64))
    n_particles: int = 0

    def __post_init__(self):
        atoms = np.asarray(self.atoms, dtype=np.int64).reshape(-1)
        n = int(self.n_particles) if self.n_particles else (int(atoms.max()) + 1 if atoms.size else 0)
        if atoms.size < 2:
            raise ValueError(f"a pair potential needs at least two particles, got {atoms.size}")
        if np.any(np.diff(atoms) <= 0) or atoms[0] < 0 or atoms[-1] >= n:
            raise ValueError(f"atoms must be increasing, distinct particle indices in 0..{n - 1}")
        species = tuple(str(s) for s in self.species)
        if len(species) != atoms.size:
            raise ValueError(f"species names {len(species)} particles but atoms {atoms.size}")
        pairs = np.asarray(self.exclusions, dtype=np.int64).reshape(-1, 2)
        pairs = np.unique(np.sort(pairs, axis=1), axis=0) if pairs.size else np.zeros((0, 2), dtype=np.int64)
        if pairs.size:
            selected = np.zeros(n, dtype=bool)
            selected[atoms] = True
            bad = (pairs[:, 0] == pairs[:, 1]) | (pairs.min(1) < 0) | (pairs.max(1) >= n)
            bad |= ~selected[np.clip(pairs, 0, n - 1)].all(1)
            if bad.any():
                a, b = pairs[np.argmax(bad)]
                raise ValueError(f"exclusion ({a}, {b}) must pair two distinct selected particles")
        object.__setattr__(self, "atoms", atoms)
        object.__setattr__(self, "species", species)
        object.__setattr__(self, "exclusions", pairs)
        object.__setattr__(self, "n_particles", n)

    @property
    def n_selected(self) -> int:
        """Number of selected particles M."""
        return int(self.atoms.size)

    @property
    def covers_all(self) -> bool:
        """True if every particle of the System is selected."""
        return self.n_selected == self.n_particles

    def local_exclusions(self) -> np.ndarray:
        """Excluded pairs as indices into :attr:`atoms`, shape (E, 2), ``i < j``."""
        local = np.full(self.n_particles, -1, dtype=np.int64)
        local[self.atoms] = np.arange(self.n_selected)
        return local[self.exclusions].reshape(-1, 2)

    def species_indices(self, table: PairTable) -> np.ndarray:
        """Species index (into ``table.species``) of each selected particle, shape (M,).

        Raises
        ------
        ValueError
            If a species is not in the table, naming the particle.
        """
        out = np.empty(self.n_selected, dtype=np.int64)
        for k, (atom, name) in enumerate(zip(self.atoms, self.species, strict=True)):
            if name not in table.species:
                raise ValueError(
                    f"particle {atom} has species {name!r}, which the potential does not define; "
                    f"potential species: {table.species}"
                )
            out[k] = table.species.index(name)
        return out


# -- building a selection ---------------------------------------------------------------------


def _atom_label(atom, source: str) -> Optional[str]:
    if source == "name":
        return atom.name
    if source == "residue":
        return atom.residue.name
    return None if atom.element is None else atom.element.symbol


def _describe(atom) -> str:
    return f"particle {atom.index} (atom {atom.name!r} in residue {atom.residue.name!r} {atom.residue.id})"


def _labels(topology, n_particles: int, species_from: SpeciesSource) -> Tuple[List[Optional[str]], List[str]]:
    """A species label per particle, and a description per particle for error messages."""
    atoms = list(topology.atoms()) if topology is not None else None
    if isinstance(species_from, str):
        if species_from not in SPECIES_SOURCES:
            raise ValueError(
                f"species_from must be one of {SPECIES_SOURCES}, a callable or a list of names, got {species_from!r}"
            )
        if atoms is None:
            raise ValueError(f"species_from={species_from!r} reads the Topology, but topology is None")
        return [_atom_label(a, species_from) for a in atoms], [_describe(a) for a in atoms]
    if callable(species_from):
        if atoms is None:
            raise ValueError("a callable species_from needs a Topology")
        labels = [species_from(a) for a in atoms]
        return [None if s is None else str(s) for s in labels], [_describe(a) for a in atoms]
    labels = [None if s is None else str(s) for s in species_from]
    if len(labels) != n_particles:
        raise ValueError(f"species_from lists {len(labels)} species but the System has {n_particles} particles")
    described = [_describe(a) for a in atoms] if atoms is not None else [f"particle {k}" for k in range(n_particles)]
    return labels, described


def _selected_atoms(topology, n_particles: int, atoms: AtomSelection) -> np.ndarray:
    if atoms is None:
        return np.arange(n_particles, dtype=np.int64)
    if isinstance(atoms, str):
        if topology is None:
            raise ValueError("a selection string needs a Topology")
        import mdtraj

        try:
            chosen = mdtraj.Topology.from_openmm(topology).select(atoms)
        except Exception as exc:  # noqa: BLE001 - mdtraj raises several types for a bad expression
            raise ValueError(f"could not parse the atom selection {atoms!r}: {exc}") from exc
    elif callable(atoms):
        if topology is None:
            raise ValueError("a callable atom selection needs a Topology")
        chosen = [a.index for a in topology.atoms() if atoms(a)]
    else:
        chosen = np.asarray(atoms)
        if chosen.size and not np.issubdtype(chosen.dtype, np.integer):
            raise TypeError(f"atoms must be particle indices, a selection string or a callable, got {chosen.dtype}")
    chosen = np.asarray(chosen, dtype=np.int64).reshape(-1)
    if chosen.size == 0:
        raise ValueError(f"the atom selection {atoms!r} selects no particle")
    if chosen.min() < 0 or chosen.max() >= n_particles:
        raise ValueError(f"atoms must be particle indices in 0..{n_particles - 1}")
    if np.unique(chosen).size != chosen.size:
        raise ValueError("atoms lists a particle more than once")
    return np.sort(chosen)


def bonded_pairs(topology, bond_cutoff: int = 1, atoms: Optional[np.ndarray] = None) -> np.ndarray:
    """Pairs of particles joined by at most ``bond_cutoff`` bonds of the Topology.

    Paths may run through any particle; only pairs with both ends in ``atoms``
    (default: all) are returned, as with
    ``CustomNonbondedForce.createExclusionsFromBonds``.

    Parameters
    ----------
    topology : openmm.app.Topology
        Supplies the bonds.
    bond_cutoff : int
        1: bonded pairs (1-2); 2: also 1-3 pairs; 3: also 1-4 pairs.
    atoms : array_like of int, optional
        Only pairs of these particles.

    Returns
    -------
    numpy.ndarray, shape (E, 2), int64
        Pairs ``i < j`` of particle indices, sorted.
    """
    if int(bond_cutoff) != bond_cutoff or bond_cutoff < 1:
        raise ValueError(f"bond_cutoff must be a positive integer (1: 1-2 pairs, 2: 1-3, ...), got {bond_cutoff}")
    n = topology.getNumAtoms()
    neighbours: List[List[int]] = [[] for _ in range(n)]
    for bond in topology.bonds():
        a, b = bond[0].index, bond[1].index
        neighbours[a].append(b)
        neighbours[b].append(a)
    wanted = np.zeros(n, dtype=bool)
    wanted[np.arange(n) if atoms is None else np.asarray(atoms, dtype=np.int64)] = True
    pairs = set()
    for start in np.nonzero(wanted)[0]:
        if not neighbours[start]:
            continue
        depth = {int(start): 0}
        queue = deque([int(start)])
        while queue:
            here = queue.popleft()
            if depth[here] == bond_cutoff:
                continue
            for nxt in neighbours[here]:
                if nxt not in depth:
                    depth[nxt] = depth[here] + 1
                    queue.append(nxt)
                    if wanted[nxt] and nxt > start:
                        pairs.add((int(start), nxt))
    if not pairs:
        return np.zeros((0, 2), dtype=np.int64)
    return np.array(sorted(pairs), dtype=np.int64)


def select_particles(
    topology,
    table: Optional[PairTable] = None,
    *,
    n_particles: Optional[int] = None,
    species_from: SpeciesSource = "name",
    species_map: Optional[Mapping[str, str]] = None,
    atoms: AtomSelection = None,
    exclusions: ExclusionSpec = "bonds",
    bond_cutoff: int = 1,
) -> PairSelection:
    """Which particles a pair potential acts on, with their species and excluded pairs.

    Parameters
    ----------
    topology : openmm.app.Topology or None
        Names, residues, elements and bonds. May be None only when
        ``species_from`` is a list, ``atoms`` are indices and ``exclusions``
        is not ``"bonds"``.
    table : PairTable, optional
        If given, every selected species must be one of ``table.species``.
    n_particles : int, optional
        Particles in the System (default: atoms in the Topology; checked
        against it).
    species_from : {"name", "element", "residue"}, callable, or sequence of str
        The species label of each particle: its atom name, element symbol or
        residue name; ``callable(atom) -> str or None``; or one label per
        System particle (None for "no species").
    species_map : mapping of str to str, optional
        Translates labels to the table's species names, e.g.
        ``{"C1": "A", "C2": "A"}``. With a map, a selected particle whose label
        is not a key is an error.
    atoms : None, str, callable or sequence of int
        The particles the potential acts on: all (None), an mdtraj selection
        (``"resname POL and name B"``), ``callable(atom) -> bool``, or indices.
    exclusions : str, None or array_like of int, shape (E, 2)
        ``"bonds"``: pairs joined by at most ``bond_cutoff`` Topology bonds;
        ``"none"`` or None: no exclusions; or an explicit list of System-index
        pairs (both ends selected).
    bond_cutoff : int
        For ``exclusions="bonds"``: 1 excludes bonded pairs, 2 also 1-3
        pairs, 3 also 1-4 pairs.

    Returns
    -------
    PairSelection

    Raises
    ------
    ValueError
        A selected particle without a species, a species the table does not
        know, a selection that matches nothing, bad exclusions.
    """
    if n_particles is None:
        if topology is not None:
            n_particles = topology.getNumAtoms()
        elif not isinstance(species_from, str) and not callable(species_from):
            n_particles = len(species_from)
        else:
            raise ValueError("give a Topology or n_particles")
    n_particles = int(n_particles)
    if topology is not None and topology.getNumAtoms() != n_particles:
        raise ValueError(f"the Topology has {topology.getNumAtoms()} atoms but the System {n_particles} particles")
    labels, described = _labels(topology, n_particles, species_from)
    chosen = _selected_atoms(topology, n_particles, atoms)
    names = []
    for k in chosen:
        label = labels[k]
        if label is not None and species_map is not None:
            if label not in species_map:
                raise ValueError(
                    f"{described[k]} has no species: its label {label!r} is not in species_map "
                    f"({sorted(species_map)}); restrict the particles with atoms=..."
                )
            label = str(species_map[label])
        if label is None:
            raise ValueError(
                f"{described[k]} has no species (species_from={species_from!r} gives none); "
                "restrict the particles with atoms=... or name them with species_from/species_map"
            )
        if table is not None and label not in table.species:
            raise ValueError(
                f"{described[k]} has species {label!r}, which the potential does not define; "
                f"potential species: {table.species}. Map names with species_map or select particles with atoms=..."
            )
        names.append(label)
    if isinstance(exclusions, str):
        if exclusions == "bonds":
            if topology is None:
                raise ValueError("exclusions='bonds' reads the Topology's bonds, but topology is None")
            pairs = bonded_pairs(topology, bond_cutoff, chosen)
        elif exclusions == "none":
            pairs = np.zeros((0, 2), dtype=np.int64)
        else:
            raise ValueError(f"exclusions must be 'bonds', 'none', None or a list of pairs, got {exclusions!r}")
    elif exclusions is None:
        pairs = np.zeros((0, 2), dtype=np.int64)
    else:
        pairs = np.asarray(exclusions, dtype=np.int64)
        if pairs.size and (pairs.ndim != 2 or pairs.shape[1] != 2):
            raise ValueError(f"exclusions must be a list of (i, j) pairs, got shape {pairs.shape}")
    return PairSelection(chosen, tuple(names), pairs.reshape(-1, 2), n_particles)


# -- adding the force -----------------------------------------------------------------------------


def _orthorhombic_lengths(vectors, where: str) -> np.ndarray:
    box = np.array([[float(c) for c in (v.value_in_unit_system(_md()) if hasattr(v, "unit") else v)] for v in vectors])
    lengths = np.diag(box).copy()
    if np.any(np.abs(box - np.diag(lengths)) > 1e-9 * np.abs(lengths).max()):
        raise ValueError(f"{where}: triclinic boxes are not supported yet; the box vectors must be diagonal")
    return lengths


def _md():
    from openmm import unit

    return unit.md_unit_system


def check_periodic_box(system, topology, table: PairTable) -> np.ndarray:
    """The System's box edge lengths (nm), after checking it suits ``table``.

    Raises
    ------
    ValueError
        If neither the System nor the Topology is periodic, the box is
        triclinic, or the cutoff exceeds half the shortest edge (of the
        System's box or the Topology's).
    """
    periodic_topology = topology is not None and topology.getPeriodicBoxVectors() is not None
    if not periodic_topology and not system.usesPeriodicBoundaryConditions():
        raise ValueError(
            "the System is not periodic: the learned pair potential needs a periodic box. Set "
            "topology.setPeriodicBoxVectors(...) and system.setDefaultPeriodicBoxVectors(...)"
        )
    lengths = _orthorhombic_lengths(system.getDefaultPeriodicBoxVectors(), "System")
    checks = [("the System's default box", lengths)]
    if periodic_topology:
        checks.append(("the Topology's box", _orthorhombic_lengths(topology.getPeriodicBoxVectors(), "Topology")))
    for where, edges in checks:
        if 2.0 * table.cutoff > float(edges.min()):
            raise ValueError(
                f"the cutoff {table.cutoff:.4g} nm exceeds half the shortest edge of {where} "
                f"({float(edges.min()):.4g} nm); use a larger box or a shorter cutoff"
            )
    return lengths


def create_pair_force(
    table: PairTable,
    selection: PairSelection,
    backend: str = "torch",
    *,
    skin: float = 0.1,
    tabulate: Union[bool, str] = "auto",
    table_points: Optional[int] = None,
):
    """The OpenMM force for ``table`` acting on ``selection`` (not yet added to a System).

    Parameters
    ----------
    table : PairTable
        The pair potential.
    selection : PairSelection
        Particles, species and excluded pairs.
    backend : {"torch", "tabulated"}
        ``torch``: openmm-torch ``TorchForce`` running
        :class:`~openmm_diffsim.energy.PairEnergy` (the model itself;
        ``tabulate`` as in :func:`~openmm_diffsim.torchforce.create_torch_force`).
        ``tabulated``: ``CustomNonbondedForce`` with cubic-spline tables of u(r),
        an interaction group for the selection and ``addExclusion`` per pair.
    skin : float
        Verlet skin (nm) of the TorchForce.
    tabulate : bool or "auto"
        TorchForce only.
    table_points : int, optional
        Knots per pair type of the tabulated backend.
    """
    if not isinstance(table, PairTable):
        raise TypeError(f"table must be a PairTable, got {type(table).__name__}")
    if backend not in PAIR_FORCE_BACKENDS:
        raise ValueError(f"backend must be one of {PAIR_FORCE_BACKENDS}, got {backend!r}")
    species = selection.species_indices(table)
    if backend == "torch":
        from .torchforce import create_torch_force

        return create_torch_force(
            table,
            species,
            skin=skin,
            tabulate=tabulate,
            atoms=selection.atoms,
            n_particles=selection.n_particles,
            exclusions=selection.exclusions,
        )
    from .sampling import DEFAULT_TABLE_POINTS, create_tabulated_force

    return create_tabulated_force(
        table,
        species,
        DEFAULT_TABLE_POINTS if table_points is None else int(table_points),
        atoms=selection.atoms,
        n_particles=selection.n_particles,
        exclusions=selection.exclusions,
    )


def nonbonded_exclusion_conflict(system, exclusions) -> Optional[str]:
    """Why a ``CustomNonbondedForce`` with ``exclusions`` cannot join ``system``, or None.

    OpenMM's CPU, CUDA and OpenCL platforms require every nonbonded force
    (``NonbondedForce`` exceptions, ``CustomNonbondedForce`` exclusions) of a
    System to exclude the same pairs ("All Forces must have identical
    exclusions" when the Context is made). The TorchForce backend is not
    subject to this. An earlier openmm-diffsim pair force is ignored.

    Parameters
    ----------
    system : openmm.System
        The System the force would join.
    exclusions : array_like of int, shape (E, 2)
        The pairs the new force would exclude.
    """
    import openmm

    from .sampling import _FORCE_NAME

    ours = {(min(a, b), max(a, b)) for a, b in np.asarray(exclusions, dtype=np.int64).reshape(-1, 2).tolist()}
    for k, force in enumerate(system.getForces()):
        if isinstance(force, openmm.NonbondedForce):
            kind, count = "exceptions", force.getNumExceptions()
            pairs = (force.getExceptionParameters(e)[:2] for e in range(count))
        elif isinstance(force, openmm.CustomNonbondedForce) and force.getName() != _FORCE_NAME:
            kind, count = "exclusions", force.getNumExclusions()
            pairs = (force.getExclusionParticles(e) for e in range(count))
        else:
            continue
        theirs = {(min(a, b), max(a, b)) for a, b in pairs}
        if theirs != ours:
            return (
                f"force {k} ({type(force).__name__}) has {len(theirs)} {kind}, which differ from the "
                f"{len(ours)} excluded pairs of the learned potential"
            )
    return None


def _has_bond_terms(system) -> bool:
    import openmm

    for force in system.getForces():
        if isinstance(force, (openmm.HarmonicBondForce, openmm.CustomBondForce)) and force.getNumBonds() > 0:
            return True
    return False


def add_pair_potential(
    system,
    topology,
    table: PairTable,
    *,
    species_from: SpeciesSource = "name",
    species_map: Optional[Mapping[str, str]] = None,
    atoms: AtomSelection = None,
    exclusions: ExclusionSpec = "bonds",
    bond_cutoff: int = 1,
    backend: str = "torch",
    skin: float = 0.1,
    tabulate: Union[bool, str] = "auto",
    table_points: Optional[int] = None,
    force_group: Optional[int] = None,
) -> int:
    """Add the learned pair potential to an existing ``System``, next to its other forces.

    Parameters
    ----------
    system : openmm.System
        Modified in place: one force is added, nothing else changes.
    topology : openmm.app.Topology
        Names the particles' species and supplies the bonds for exclusions.
    table : PairTable
        The pair potential (copied: later training does not change the force).
    species_from, species_map, atoms, exclusions, bond_cutoff
        As for :func:`select_particles`.
    backend : {"torch", "tabulated"}
        See :func:`create_pair_force`.
    skin, tabulate, table_points
        See :func:`create_pair_force`.
    force_group : int, optional
        Force group of the new force (default: OpenMM's, 0).

    Returns
    -------
    int
        Index of the new force in the System.

    Raises
    ------
    ValueError
        Non-periodic System, triclinic box, cutoff above half the box,
        particles without a species or with a species the table does not
        know, Topology and System of different sizes, bad exclusions.

    Examples
    --------
    >>> index = add_pair_potential(system, topology, table, atoms="resname POL",
    ...                            exclusions="bonds", bond_cutoff=2)  # doctest: +SKIP
    """
    if not isinstance(table, PairTable):
        raise TypeError(f"table must be a PairTable, got {type(table).__name__}")
    if backend not in PAIR_FORCE_BACKENDS:
        raise ValueError(f"backend must be one of {PAIR_FORCE_BACKENDS}, got {backend!r}")
    check_periodic_box(system, topology, table)
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
    if (
        isinstance(exclusions, str)
        and exclusions == "bonds"
        and topology.getNumBonds() == 0
        and _has_bond_terms(system)
    ):
        warnings.warn(
            "exclusions='bonds' but the Topology has no bonds, while the System has bond forces: no pair is "
            "excluded. Add the bonds to the Topology (topology.addBond) or pass exclusions explicitly.",
            stacklevel=2,
        )
    if backend == "tabulated":
        conflict = nonbonded_exclusion_conflict(system, selection.exclusions)
        if conflict is not None:
            raise ValueError(
                f"backend 'tabulated' adds a CustomNonbondedForce, and OpenMM's CPU, CUDA and OpenCL platforms need "
                f"every nonbonded force of a System to exclude the same pairs: {conflict}. Use backend='torch', "
                "or give exclusions that match"
            )
    force = create_pair_force(table, selection, backend, skin=skin, tabulate=tabulate, table_points=table_points)
    if force_group is not None:
        force.setForceGroup(int(force_group))
    return system.addForce(force)


# -- the trainer's view of a user's system -------------------------------------------------------------


@dataclass(repr=False)
class SimulationStatePoint(StatePoint):
    """A state point made of the selected particles of a user's ``Simulation``.

    Built by :meth:`openmm_diffsim.sampling.Sampler.from_simulation`. It
    behaves as a :class:`~openmm_diffsim.systems.StatePoint` for the
    estimators and the trainer, with the particles in System order (not
    grouped by species) and the learned potential's excluded pairs.

    Parameters
    ----------
    name, species, counts, masses, temperature, box, targets, weight
        As for :class:`~openmm_diffsim.systems.StatePoint`.
    particle_species_index : array_like of int, shape (M,)
        Index into ``species`` of each selected particle, in System order.
    particle_mass_values : array_like of float, shape (M,)
        Mass of each selected particle in amu (``masses`` holds the mean per species).
    exclusions : array_like of int, shape (E, 2)
        Pairs of selected particles (indices 0..M-1) the pair potential skips.
    system_atoms : array_like of int, shape (M,)
        System index of each selected particle.
    atom_names, residue_names, element_symbols : list of str
        For :meth:`topology`; element symbols may be empty strings.
    bonds : array_like of int, shape (B, 2)
        Topology bonds between selected particles (indices 0..M-1).

    Notes
    -----
    RDFs count every pair of selected particles, excluded (bonded) pairs
    included, as :class:`~openmm_diffsim.reporters.RDFReporter` and
    ``mdtraj.compute_rdf`` do; the energies used for reweighting skip the
    excluded pairs, as the force does. The system's other forces are fixed,
    so they cancel in the reweighting weights.
    """

    particle_species_index: Any = None
    particle_mass_values: Any = None
    exclusions: Any = None
    system_atoms: Any = None
    atom_names: Any = None
    residue_names: Any = None
    element_symbols: Any = None
    bonds: Any = None

    def __post_init__(self):
        super().__post_init__()
        n = self.n_particles
        self.particle_species_index = np.asarray(self.particle_species_index, dtype=np.int64).reshape(-1)
        if self.particle_species_index.shape != (n,):
            raise ValueError(f"state {self.name!r}: particle_species_index must have {n} entries")
        if np.any(np.bincount(self.particle_species_index, minlength=self.n_species) != np.asarray(self.counts)):
            raise ValueError(f"state {self.name!r}: particle_species_index does not match counts {self.counts}")
        self.particle_mass_values = np.asarray(self.particle_mass_values, dtype=np.float64).reshape(-1)
        if self.particle_mass_values.shape != (n,):
            raise ValueError(f"state {self.name!r}: particle_mass_values must have {n} entries")
        self.exclusions = np.asarray(
            np.zeros((0, 2)) if self.exclusions is None else self.exclusions, dtype=np.int64
        ).reshape(-1, 2)
        if self.exclusions.size and (self.exclusions.min() < 0 or self.exclusions.max() >= n):
            raise ValueError(f"state {self.name!r}: exclusions must be local indices in 0..{n - 1}")
        self.system_atoms = np.arange(n) if self.system_atoms is None else np.asarray(self.system_atoms, np.int64)
        self.bonds = np.asarray(np.zeros((0, 2)) if self.bonds is None else self.bonds, dtype=np.int64).reshape(-1, 2)
        species_names = [self.species[k] for k in self.particle_species_index]
        self.atom_names = species_names if self.atom_names is None else [str(a) for a in self.atom_names]
        self.residue_names = species_names if self.residue_names is None else [str(a) for a in self.residue_names]
        self.element_symbols = [""] * n if self.element_symbols is None else [str(a) for a in self.element_symbols]

    def particle_species(self) -> np.ndarray:
        """Species index (into ``self.species``) of every selected particle, shape (M,), System order."""
        return self.particle_species_index.copy()

    def particle_masses(self) -> np.ndarray:
        """Mass of every selected particle, shape (M,), float64, amu."""
        return self.particle_mass_values.copy()

    def topology(self):
        """An ``openmm.app.Topology`` of the selected particles (names, residues, elements, bonds, box)."""
        from openmm import app, unit

        topology = app.Topology()
        chain = topology.addChain()
        atoms = []
        for name, residue_name, symbol in zip(self.atom_names, self.residue_names, self.element_symbols, strict=True):
            residue = topology.addResidue(residue_name, chain)
            element = None
            if symbol:
                try:
                    element = app.Element.getBySymbol(symbol)
                except KeyError:
                    element = None
            atoms.append(topology.addAtom(name, element, residue))
        for a, b in self.bonds:
            topology.addBond(atoms[a], atoms[b])
        topology.setPeriodicBoxVectors([tuple(row) for row in self.box_vectors] * unit.nanometer)
        return topology

    def initial_positions(self, *args, **kwargs) -> np.ndarray:
        raise TypeError(
            f"state {self.name!r} belongs to a user's Simulation: its configurations come from that Simulation"
        )

    def __repr__(self) -> str:
        return (
            f"SimulationStatePoint({self.name!r}, species={self.species}, counts={self.counts}, "
            f"T={self.temperature:.4g} K, box={'x'.join(f'{b:.4g}' for b in self.box)} nm, "
            f"{len(self.exclusions)} excluded pair(s), {len(self.targets)} target(s), weight={self.weight})"
        )


def simulation_state_point(
    selection: PairSelection,
    table: PairTable,
    topology,
    masses: np.ndarray,
    box_lengths: np.ndarray,
    *,
    name: str,
    temperature: float,
    targets: Sequence = (),
    weight: float = 1.0,
) -> SimulationStatePoint:
    """The :class:`SimulationStatePoint` of ``selection`` (species ordered as in ``table``).

    Parameters
    ----------
    selection : PairSelection
        The learned potential's particles.
    table : PairTable
        Orders the species.
    topology : openmm.app.Topology or None
        For names and bonds of the selected particles.
    masses : array_like, shape (N,)
        Masses of all System particles in amu.
    box_lengths : array_like, shape (3,)
        Box edges in nm.
    name, temperature, targets, weight
        As for :class:`~openmm_diffsim.systems.StatePoint`.
    """
    table_index = selection.species_indices(table)
    present = sorted(set(table_index.tolist()))
    species = [table.species[k] for k in present]
    local = {k: n for n, k in enumerate(present)}
    index = np.array([local[k] for k in table_index], dtype=np.int64)
    masses = np.asarray(masses, dtype=np.float64)[selection.atoms]
    if np.any(masses <= 0):
        bad = selection.atoms[np.argmax(masses <= 0)]
        raise ValueError(f"particle {bad} is massless (a virtual site?): it cannot carry the learned pair potential")
    counts = np.bincount(index, minlength=len(species))
    mean_masses = [float(masses[index == k].mean()) for k in range(len(species))]
    atom_names = residue_names = element_symbols = None
    bonds = np.zeros((0, 2), dtype=np.int64)
    if topology is not None:
        all_atoms = list(topology.atoms())
        chosen = [all_atoms[k] for k in selection.atoms]
        atom_names = [a.name for a in chosen]
        residue_names = [a.residue.name for a in chosen]
        element_symbols = ["" if a.element is None else a.element.symbol for a in chosen]
        local_of = np.full(selection.n_particles, -1, dtype=np.int64)
        local_of[selection.atoms] = np.arange(selection.n_selected)
        pairs = [(local_of[b[0].index], local_of[b[1].index]) for b in topology.bonds()]
        bonds = np.array([p for p in pairs if p[0] >= 0 and p[1] >= 0], dtype=np.int64).reshape(-1, 2)
    return SimulationStatePoint(
        name=name,
        species=species,
        counts=[int(c) for c in counts],
        masses=mean_masses,
        temperature=float(temperature),
        box=[float(b) for b in box_lengths],
        targets=list(targets),
        weight=float(weight),
        particle_species_index=index,
        particle_mass_values=masses,
        exclusions=selection.local_exclusions(),
        system_atoms=selection.atoms,
        atom_names=atom_names,
        residue_names=residue_names,
        element_symbols=element_symbols,
        bonds=bonds,
    )


def _free_force_group(system) -> Optional[int]:
    """The highest force group no force of ``system`` uses, or None."""
    used = {force.getForceGroup() for force in system.getForces()}
    for group in range(31, -1, -1):
        if group not in used:
            return group
    return None


def degrees_of_freedom(system) -> int:
    """3 × (particles with mass) − constraints − 3 if a ``CMMotionRemover`` is present."""
    import openmm

    n_massive = sum(1 for k in range(system.getNumParticles()) if system.getParticleMass(k)._value > 0)
    dof = 3 * n_massive - system.getNumConstraints()
    if any(isinstance(f, openmm.CMMotionRemover) for f in system.getForces()):
        dof -= 3
    return max(dof, 1)
