"""State points, initial configurations and reduced Lennard-Jones units.

A :class:`StatePoint` is one thermodynamic state a potential is trained
against: composition (species and counts), masses, temperature, the periodic
box (or a number density), an optional target pressure, its targets and its
weight in the loss. It builds an overlap-free initial configuration
(:func:`lattice_positions`, :func:`random_positions`) and an OpenMM
``Topology`` so trajectories can be written and read with standard tools.

Units are OpenMM's: nm, ps, kJ/mol, K, amu, bar. Reduced Lennard-Jones units
appear only through the explicit conversions of :class:`ReducedLJUnits`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, List, Optional

import numpy as np

from .units import to_array, to_float

__all__ = [
    "MOLAR_GAS_CONSTANT",
    "StatePoint",
    "ReducedLJUnits",
    "reduced_lj_units",
    "lattice_positions",
    "random_positions",
    "max_packing_fraction",
]

#: R = N_A k_B in kJ/(mol K) (CODATA 2018, exact), the k_B of OpenMM's units.
MOLAR_GAS_CONSTANT = 0.00831446261815324
_AVOGADRO = 6.02214076e23
#: 1 kJ/mol/nm^3 in bar.
_KJ_PER_MOL_NM3_IN_BAR = 1e3 / _AVOGADRO / 1e-27 / 1e5

#: Densest packing of equal spheres (fcc/hcp), pi / (3 sqrt 2).
max_packing_fraction = math.pi / (3.0 * math.sqrt(2.0))


@dataclass
class StatePoint:
    """One thermodynamic state: composition, temperature, box, targets.

    Give either ``box`` or ``density``; with ``density`` the box is the cube
    holding ``sum(counts)`` particles at that number density.

    Parameters
    ----------
    name : str
        Label used in logs, errors and checkpoints.
    species : list of str
        Species names; they must match names in the potential's
        :class:`~openmm_diffsim.potentials.PairTable` (checked by the sampler).
    counts : list of int
        Number of particles per species, same length as ``species``.
    masses : list of float or Quantity
        Mass per species in amu (a single number applies to all species).
    temperature : float or Quantity
        Temperature in K.
    box : array_like (3,) or (3, 3) or Quantity, optional
        Rectangular periodic box (edge lengths or diagonal box vectors) in nm.
    density : float or Quantity, optional
        Number density in particles/nm^3 (instead of ``box``; cubic box).
    pressure : float or Quantity, optional
        Target pressure in bar, for a pressure term in the loss. The sampler
        runs at constant volume regardless.
    targets : list
        Target objects (e.g. :class:`openmm_diffsim.targets.Target`) for this state.
    weight : float
        Weight of this state in the training loss (non-negative).
    energy : float or Quantity, optional
        Target mean pair potential energy per particle in kJ/mol (the energy of
        the learned pair potential alone, in the table's cutoff convention), for
        an energy term in the loss. In a dense liquid g(r) barely sees a smooth
        change of u(r) across the first shells that shifts this energy a lot.

    Examples
    --------
    >>> units = reduced_lj_units(sigma=0.34, epsilon=0.996, mass=39.948)
    >>> state = StatePoint("LJ liquid", ["Ar"], [500], [39.948],
    ...                    temperature=units.temperature_from_reduced(1.2),
    ...                    density=units.density_from_reduced(0.8))
    """

    name: str
    species: List[str]
    counts: List[int]
    masses: Any
    temperature: Any
    box: Any = None
    density: Any = None
    pressure: Any = None
    targets: list = field(default_factory=list)
    weight: float = 1.0
    energy: Any = None

    def __post_init__(self):
        self.name = str(self.name)
        if isinstance(self.species, str):
            raise TypeError(f"state {self.name!r}: species must be a list of names, got the string {self.species!r}")
        self.species = [str(s) for s in self.species]
        if len(self.species) == 0:
            raise ValueError(f"state {self.name!r}: needs at least one species")
        if len(set(self.species)) != len(self.species):
            raise ValueError(f"state {self.name!r}: species names must be unique, got {self.species}")
        counts = np.asarray(self.counts)
        if counts.shape != (len(self.species),):
            raise ValueError(
                f"state {self.name!r}: counts must give one number per species {self.species}, got {self.counts!r}"
            )
        if not np.all(np.equal(np.mod(counts, 1), 0)) or np.any(counts < 0):
            raise ValueError(f"state {self.name!r}: counts must be non-negative integers, got {self.counts!r}")
        self.counts = [int(c) for c in counts]
        if sum(self.counts) < 2:
            raise ValueError(f"state {self.name!r}: needs at least two particles, got counts {self.counts}")
        masses = np.atleast_1d(to_array(self.masses, "masses", "dalton"))
        if masses.size == 1:
            masses = np.repeat(masses, len(self.species))
        if masses.shape != (len(self.species),):
            raise ValueError(
                f"state {self.name!r}: masses must give one value (amu) per species {self.species}, got {self.masses!r}"
            )
        if not np.all(np.isfinite(masses)) or np.any(masses <= 0):
            raise ValueError(f"state {self.name!r}: masses must be positive and finite, got {masses.tolist()}")
        self.masses = [float(m) for m in masses]
        self.temperature = to_float(self.temperature, "temperature", "kelvin")
        if self.temperature <= 0:
            raise ValueError(f"state {self.name!r}: temperature must be positive (K), got {self.temperature}")
        if (self.box is None) == (self.density is None):
            raise ValueError(f"state {self.name!r}: give exactly one of box (nm) or density (particles/nm^3)")
        if self.density is not None:
            self.density = to_float(self.density, "density", None)
            if self.density <= 0:
                raise ValueError(f"state {self.name!r}: density must be positive (particles/nm^3), got {self.density}")
            edge = (self.n_particles / self.density) ** (1.0 / 3.0)
            self.box = [edge, edge, edge]
        box = to_array(self.box, "box", "nanometer")
        if box.shape == (3, 3):
            if np.any(np.abs(box - np.diag(np.diag(box))) > 0):
                raise ValueError(
                    f"state {self.name!r}: triclinic boxes are not supported; box vectors must be diagonal"
                )
            box = np.diag(box)
        if box.shape != (3,):
            raise ValueError(f"state {self.name!r}: box must have shape (3,) or (3, 3), got {box.shape}")
        if not np.all(np.isfinite(box)) or np.any(box <= 0):
            raise ValueError(f"state {self.name!r}: box edge lengths must be positive and finite, got {box.tolist()}")
        self.box = [float(b) for b in box]
        if self.density is None:
            self.density = self.n_particles / float(np.prod(box))
        if self.pressure is not None:
            if hasattr(self.pressure, "value_in_unit"):
                # Not strip_unit: OpenMM's md_unit_system has no bar (its pressure unit is kJ/mol/nm^3/N_A).
                from openmm import unit

                if not self.pressure.unit.is_compatible(unit.bar):
                    raise ValueError(
                        f"state {self.name!r}: pressure must be in pressure units, got {self.pressure.unit}"
                    )
                self.pressure = self.pressure.value_in_unit(unit.bar)
            self.pressure = to_float(self.pressure, "pressure")
        if self.energy is not None:
            self.energy = to_float(self.energy, f"state {self.name!r}: energy", "kilojoule_per_mole")
        self.targets = list(self.targets) if self.targets is not None else []
        self.weight = float(self.weight)
        if not math.isfinite(self.weight) or self.weight < 0:
            raise ValueError(f"state {self.name!r}: weight must be finite and non-negative, got {self.weight}")

    # -- derived quantities ----------------------------------------------------------

    @property
    def n_particles(self) -> int:
        """Total number of particles."""
        return int(sum(self.counts))

    @property
    def n_species(self) -> int:
        """Number of species."""
        return len(self.species)

    @property
    def box_lengths(self) -> np.ndarray:
        """Box edge lengths, shape (3,), float64, nm."""
        return np.asarray(self.box, dtype=np.float64)

    @property
    def box_vectors(self) -> np.ndarray:
        """Box vectors as rows, shape (3, 3), float64, nm."""
        return np.diag(self.box_lengths)

    @property
    def volume(self) -> float:
        """Box volume in nm^3."""
        return float(np.prod(self.box_lengths))

    @property
    def kT(self) -> float:
        """Thermal energy k_B T in kJ/mol."""
        return MOLAR_GAS_CONSTANT * self.temperature

    @property
    def beta(self) -> float:
        """Inverse thermal energy 1/(k_B T) in mol/kJ."""
        return 1.0 / self.kT

    def particle_species(self) -> np.ndarray:
        """Species index (into ``self.species``) of every particle, shape (N,), int64.

        Particles are ordered species by species: ``counts[0]`` of species 0,
        then ``counts[1]`` of species 1, and so on.
        """
        return np.repeat(np.arange(self.n_species, dtype=np.int64), self.counts)

    def particle_masses(self) -> np.ndarray:
        """Mass of every particle, shape (N,), float64, amu."""
        return np.asarray(self.masses, dtype=np.float64)[self.particle_species()]

    def particle_species_names(self) -> List[str]:
        """Species name of every particle, length N."""
        return [self.species[k] for k in self.particle_species()]

    def topology(self):
        """An ``openmm.app.Topology`` with one single-atom residue per particle.

        Atom and residue names are the species names; the element is set
        where the species name is an element symbol (``"Ar"``), so DCD/PDB
        files from the sampler open in mdtraj, VMD or PyMOL. Periodic box
        dimensions are set from the box.
        """
        from openmm import app, unit

        topology = app.Topology()
        chain = topology.addChain()
        for name in self.particle_species_names():
            residue = topology.addResidue(name[:4], chain)
            try:
                element = app.Element.getBySymbol(name)
            except KeyError:
                element = None
            topology.addAtom(name, element, residue)
        topology.setPeriodicBoxVectors([tuple(row) for row in self.box_vectors] * unit.nanometer)
        return topology

    def initial_positions(
        self,
        method: str = "lattice",
        min_distance: Optional[float] = None,
        seed: Optional[int] = None,
    ) -> np.ndarray:
        """An overlap-free starting configuration, shape (N, 3), float64, nm.

        Parameters
        ----------
        method : {"lattice", "random"}
            ``lattice``: fcc sites (species shuffled among them), works up to
            close packing. ``random``: uniform random insertion with a
            minimum distance, works up to packing fraction ~0.3.
        min_distance : float, optional
            Smallest allowed pair distance in nm. For ``lattice`` it is only
            checked; for ``random`` it is required.
        seed : int, optional
            Seed for the shuffle, jitter and insertion.

        Raises
        ------
        ValueError
            If ``min_distance`` cannot be met at this density.
        """
        rng = np.random.default_rng(seed)
        if method == "lattice":
            positions = lattice_positions(self.n_particles, self.box_lengths, min_distance=min_distance, rng=rng)
        elif method == "random":
            if min_distance is None:
                raise ValueError("method='random' needs min_distance (nm)")
            positions = random_positions(self.n_particles, self.box_lengths, min_distance, rng=rng)
        else:
            raise ValueError(f"method must be 'lattice' or 'random', got {method!r}")
        return positions

    def __repr__(self) -> str:
        box = "x".join(f"{b:.4g}" for b in self.box)
        return (
            f"StatePoint({self.name!r}, species={self.species}, counts={self.counts}, "
            f"T={self.temperature:.4g} K, box={box} nm, density={self.density:.4g}/nm^3, "
            f"{len(self.targets)} target(s), weight={self.weight})"
        )


# -- initial configurations -------------------------------------------------------------


def _check_packing(n: int, lengths: np.ndarray, min_distance: float) -> None:
    fraction = n * math.pi / 6.0 * min_distance**3 / float(np.prod(lengths))
    if fraction > max_packing_fraction:
        raise ValueError(
            f"{n} particles with minimum distance {min_distance:.4g} nm do not fit in a "
            f"{'x'.join(f'{x:.4g}' for x in lengths)} nm box: packing fraction {fraction:.3f} exceeds the "
            f"close-packing limit {max_packing_fraction:.3f}; lower the density or the minimum distance"
        )


def lattice_positions(
    n: int,
    box_lengths,
    min_distance: Optional[float] = None,
    rng: Optional[np.random.Generator] = None,
    jitter: float = 0.01,
) -> np.ndarray:
    """n particles on fcc lattice sites filling a rectangular box.

    The box is divided into nx × ny × nz cubic-ish cells (4 sites each) with
    4 nx ny nz ≥ n; when there are more sites than particles a random subset
    is used, so vacancies are spread evenly.

    Parameters
    ----------
    n : int
        Number of particles.
    box_lengths : array_like, shape (3,)
        Box edge lengths in nm.
    min_distance : float, optional
        Required smallest pair distance in nm (checked, not imposed).
    rng : numpy.random.Generator, optional
        For the site subset and the jitter.
    jitter : float
        Random displacement amplitude as a fraction of the nearest-site distance
        (breaks the lattice symmetry; kept small so no overlap is created).

    Returns
    -------
    numpy.ndarray, shape (n, 3), float64
        Positions in nm inside [0, L).

    Raises
    ------
    ValueError
        If the nearest-site distance is below ``min_distance``.
    """
    lengths = np.asarray(box_lengths, dtype=np.float64).reshape(3)
    rng = np.random.default_rng() if rng is None else rng
    if min_distance is not None:
        _check_packing(n, lengths, float(min_distance))
    # Cells as close to cubic as possible: cell edge from the volume per 4 sites.
    edge = (float(np.prod(lengths)) * 4.0 / n) ** (1.0 / 3.0)
    cells = np.maximum(1, np.round(lengths / edge)).astype(int)
    while 4 * int(np.prod(cells)) < n:
        # Grow the dimension with the longest cell edge.
        cells[np.argmax(lengths / cells)] += 1
    base = np.array([[0.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.5, 0.0, 0.5], [0.0, 0.5, 0.5]])
    grid = np.stack(np.meshgrid(*(np.arange(c) for c in cells), indexing="ij"), axis=-1).reshape(-1, 1, 3)
    sites = ((grid + base[None]).reshape(-1, 3) + 0.25) * (lengths / cells)
    cell_edges = lengths / cells
    # Nearest fcc neighbours sit half a face diagonal apart (two shortest cell edges).
    shortest = np.sort(cell_edges)
    spacing = 0.5 * math.hypot(shortest[0], shortest[1])
    # Jitter moves each site by at most sqrt(3) * jitter * spacing.
    if min_distance is not None and spacing * (1.0 - 2.0 * math.sqrt(3.0) * jitter) < min_distance:
        raise ValueError(
            f"lattice spacing {spacing:.4g} nm for {n} particles in a "
            f"{'x'.join(f'{x:.4g}' for x in lengths)} nm box is below the minimum distance {min_distance:.4g} nm: "
            "the density is too high for an overlap-free start"
        )
    if len(sites) > n:
        sites = sites[np.sort(rng.choice(len(sites), size=n, replace=False))]
    sites = sites + rng.uniform(-jitter, jitter, size=sites.shape) * spacing
    return np.mod(sites, lengths)


def random_positions(
    n: int,
    box_lengths,
    min_distance: float,
    rng: Optional[np.random.Generator] = None,
    max_attempts: int = 1000,
) -> np.ndarray:
    """n particles inserted uniformly at random, no pair closer than ``min_distance``.

    Random sequential insertion with a cell grid (O(N)). It jams near packing
    fraction 0.38; use :func:`lattice_positions` for dense states.

    Parameters
    ----------
    n : int
        Number of particles.
    box_lengths : array_like, shape (3,)
        Box edge lengths in nm.
    min_distance : float
        Smallest allowed pair distance (minimum image) in nm.
    rng : numpy.random.Generator, optional
        Random source.
    max_attempts : int
        Insertion trials per particle before giving up.

    Returns
    -------
    numpy.ndarray, shape (n, 3), float64
        Positions in nm inside [0, L).

    Raises
    ------
    ValueError
        If close packing makes the request impossible, or insertion fails.
    """
    lengths = np.asarray(box_lengths, dtype=np.float64).reshape(3)
    rng = np.random.default_rng() if rng is None else rng
    min_distance = float(min_distance)
    if min_distance <= 0:
        raise ValueError(f"min_distance must be positive, got {min_distance}")
    _check_packing(n, lengths, min_distance)
    if np.any(lengths < min_distance):
        raise ValueError(f"box edge {lengths.min():.4g} nm is shorter than min_distance {min_distance:.4g} nm")
    cells = np.maximum(1, np.floor(lengths / min_distance)).astype(int)
    cell_size = lengths / cells
    occupant: dict = {}
    positions = np.empty((n, 3))
    offsets = np.stack(np.meshgrid(*([np.arange(-1, 2)] * 3), indexing="ij"), axis=-1).reshape(-1, 3)
    d2 = min_distance * min_distance
    for k in range(n):
        for _ in range(max_attempts):
            trial = rng.uniform(0.0, 1.0, 3) * lengths
            cell = np.floor(trial / cell_size).astype(int) % cells
            neighbours = [j for off in offsets for j in occupant.get(tuple((cell + off) % cells), ())]
            if neighbours:
                dr = positions[neighbours] - trial
                dr -= lengths * np.round(dr / lengths)
                if np.min((dr * dr).sum(1)) < d2:
                    continue
            occupant.setdefault(tuple(cell), []).append(k)
            positions[k] = trial
            break
        else:
            raise ValueError(
                f"random insertion placed only {k} of {n} particles with minimum distance {min_distance:.4g} nm "
                f"(packing fraction {n * math.pi / 6 * min_distance**3 / np.prod(lengths):.3f}); "
                "use the lattice start for dense states"
            )
    return positions


# -- reduced Lennard-Jones units --------------------------------------------------------------


@dataclass(frozen=True)
class ReducedLJUnits:
    """Conversions between reduced Lennard-Jones units and OpenMM units.

    Reduced quantities are ρ* = ρσ³, T* = k_B T/ε, t* = t/τ with
    τ = σ √(m/ε), P* = Pσ³/ε, E* = E/ε, r* = r/σ.

    Parameters
    ----------
    sigma : float
        σ in nm.
    epsilon : float
        ε in kJ/mol.
    mass : float
        Particle mass in amu.
    """

    sigma: float
    epsilon: float
    mass: float

    def __post_init__(self):
        for name, unit_name in (("sigma", "nanometer"), ("epsilon", "kilojoule_per_mole"), ("mass", "dalton")):
            value = to_float(getattr(self, name), name, unit_name)
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
            object.__setattr__(self, name, value)

    @property
    def time(self) -> float:
        """The LJ time unit τ = σ √(m/ε) in ps (nm·√(amu·mol/kJ) is exactly 1 ps)."""
        return self.sigma * math.sqrt(self.mass / self.epsilon)

    def density_from_reduced(self, reduced_density: float) -> float:
        """ρ = ρ*/σ³ in particles/nm^3."""
        return float(reduced_density) / self.sigma**3

    def density_to_reduced(self, density: float) -> float:
        """ρ* = ρσ³ from particles/nm^3."""
        return float(density) * self.sigma**3

    def temperature_from_reduced(self, reduced_temperature: float) -> float:
        """T = T* ε / k_B in K."""
        return float(reduced_temperature) * self.epsilon / MOLAR_GAS_CONSTANT

    def temperature_to_reduced(self, temperature: float) -> float:
        """T* = k_B T / ε from K."""
        return float(temperature) * MOLAR_GAS_CONSTANT / self.epsilon

    def time_from_reduced(self, reduced_time: float) -> float:
        """t = t* τ in ps."""
        return float(reduced_time) * self.time

    def time_to_reduced(self, time: float) -> float:
        """t* = t / τ from ps."""
        return float(time) / self.time

    def energy_from_reduced(self, reduced_energy: float) -> float:
        """E = E* ε in kJ/mol."""
        return float(reduced_energy) * self.epsilon

    def energy_to_reduced(self, energy: float) -> float:
        """E* = E/ε from kJ/mol."""
        return float(energy) / self.epsilon

    def length_from_reduced(self, reduced_length: float) -> float:
        """r = r* σ in nm."""
        return float(reduced_length) * self.sigma

    def length_to_reduced(self, length: float) -> float:
        """r* = r/σ from nm."""
        return float(length) / self.sigma

    def pressure_from_reduced(self, reduced_pressure: float) -> float:
        """P = P* ε/σ³ in bar."""
        return float(reduced_pressure) * self.epsilon / self.sigma**3 * _KJ_PER_MOL_NM3_IN_BAR

    def pressure_to_reduced(self, pressure: float) -> float:
        """P* = Pσ³/ε from bar."""
        return float(pressure) / _KJ_PER_MOL_NM3_IN_BAR * self.sigma**3 / self.epsilon

    def box_for(self, n_particles: int, reduced_density: float) -> float:
        """Edge (nm) of the cube holding ``n_particles`` at reduced density ρ*."""
        return (n_particles / self.density_from_reduced(reduced_density)) ** (1.0 / 3.0)


def reduced_lj_units(sigma, epsilon, mass) -> ReducedLJUnits:
    """Reduced LJ unit conversions for σ (nm), ε (kJ/mol) and mass (amu).

    Examples
    --------
    >>> argon = reduced_lj_units(0.34, 0.996, 39.948)
    >>> round(argon.temperature_from_reduced(1.0), 1)   # K
    119.8
    >>> round(argon.time, 3)                            # ps
    2.15
    """
    return ReducedLJUnits(sigma, epsilon, mass)
