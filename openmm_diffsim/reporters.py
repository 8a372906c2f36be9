"""OpenMM reporters: record partial RDFs during any ``openmm.app.Simulation``.

:class:`RDFReporter` follows OpenMM's reporter protocol (``describeNextReport``
and ``report``), so it is added to ``simulation.reporters`` like a
``DCDReporter``. It accumulates the partial RDFs of every species pair with
:func:`openmm_diffsim.observables.compute_partial_rdfs` and keeps its file
current (rewritten atomically at every report) in the format that
:func:`openmm_diffsim.targets.read_target` and ``read_targets_npz`` read, so
the recorded RDF can be a training target directly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

__all__ = ["RDFReporter"]

SPECIES_SOURCES = ("name", "element", "residue")


class RDFReporter:
    """Accumulate partial RDFs every ``reportInterval`` steps and write them to ``file``.

    Parameters
    ----------
    file : str or path
        Output file. ``.npz`` for a NumPy archive, anything else (``.dat``,
        ``.xvg``, ``.csv``) for text; see :func:`openmm_diffsim.targets.write_rdf`.
    reportInterval : int
        MD steps between frames.
    species : sequence of str, optional
        Species name of every particle (length = number of particles in the
        System). By default taken from the Topology (``species_from``).
    species_from : {"name", "element", "residue"}
        Topology attribute that names a particle's species when ``species`` is
        not given: atom name, element symbol, or residue name.
    atoms : sequence of int, optional
        Only these particles enter the RDFs (e.g. the coarse-grained beads of
        one kind of molecule). Default: all particles.
    r_range : (float, float)
        RDF range in nm; the upper end must stay below half the shortest box edge.
    n_bins : int
        Number of bins.
    smearing : float
        Gaussian smearing width in nm (0 for a plain histogram, as mdtraj).

    Notes
    -----
    Frames are combined exactly as ``mdtraj.compute_rdf`` combines them: with
    a changing box (barostat) the histogram is normalised by the sum over
    frames of 1/V, not by averaging per-frame g(r).
    """

    def __init__(
        self,
        file: Union[str, os.PathLike],
        reportInterval: int,
        species: Optional[Sequence[str]] = None,
        species_from: str = "name",
        atoms: Optional[Sequence[int]] = None,
        r_range: Tuple[float, float] = (0.0, 1.0),
        n_bins: int = 100,
        smearing: float = 0.0,
    ):
        if int(reportInterval) != reportInterval or reportInterval < 1:
            raise ValueError(f"reportInterval must be a positive integer, got {reportInterval}")
        if species_from not in SPECIES_SOURCES:
            raise ValueError(f"species_from must be one of {SPECIES_SOURCES}, got {species_from!r}")
        r_min, r_max = (float(r_range[0]), float(r_range[1]))
        if not 0.0 <= r_min < r_max:
            raise ValueError(f"r_range must satisfy 0 <= r_min < r_max, got {r_range}")
        if int(n_bins) != n_bins or n_bins < 2:
            raise ValueError(f"n_bins must be an integer >= 2, got {n_bins}")
        if smearing is None or smearing < 0:
            raise ValueError(f"smearing must be >= 0 nm, got {smearing}")
        self._path = Path(file)
        self._interval = int(reportInterval)
        self._species_given = None if species is None else [str(s) for s in species]
        self._species_from = species_from
        self._atoms = None if atoms is None else np.asarray(atoms, dtype=np.int64)
        self.r_range = (r_min, r_max)
        self.n_bins = int(n_bins)
        self.smearing = float(smearing)
        self.species_names: List[str] = []
        self._species_index: Optional[torch.Tensor] = None
        self._weighted_sum: Optional[np.ndarray] = None  # Σ_f g_f / V_f
        self._inverse_volume_sum = 0.0  # Σ_f 1 / V_f
        self.n_frames = 0
        self.r: Optional[np.ndarray] = None

    # -- OpenMM's reporter protocol --------------------------------------------------

    def describeNextReport(self, simulation):
        """Steps until the next report and what it needs (positions, wrapped or not is irrelevant)."""
        steps = self._interval - simulation.currentStep % self._interval
        return (steps, True, False, False, False, False)

    def report(self, simulation, state) -> None:
        """Add the current frame and rewrite the file."""
        from .observables import compute_partial_rdfs

        if self._species_index is None:
            self._setup(simulation)
        positions = np.asarray(state.getPositions(asNumpy=True).value_in_unit_system(_md()), dtype=np.float64)
        box = np.asarray(state.getPeriodicBoxVectors(asNumpy=True).value_in_unit_system(_md()), dtype=np.float64)
        if not np.all(np.isfinite(positions)):
            raise ValueError(f"RDFReporter: positions are not finite at step {simulation.currentStep}")
        lengths = np.diag(box).copy()
        if np.any(np.abs(box - np.diag(lengths)) > 1e-12 * lengths.max()):
            raise ValueError("RDFReporter: triclinic boxes are not supported yet")
        if self.r_range[1] > 0.5 * lengths.min():
            raise ValueError(
                f"RDFReporter: r_max {self.r_range[1]} nm exceeds half the shortest box edge "
                f"({0.5 * lengths.min():.4f} nm) at step {simulation.currentStep}"
            )
        if self._atoms is not None:
            positions = positions[self._atoms]
        r, g = compute_partial_rdfs(
            torch.as_tensor(positions),
            torch.as_tensor(lengths),
            self._species_index,
            len(self.species_names),
            self.r_range,
            self.n_bins,
            self.smearing,
        )
        volume = float(np.prod(lengths))
        g = g.detach().numpy()
        self._weighted_sum = g / volume if self._weighted_sum is None else self._weighted_sum + g / volume
        self._inverse_volume_sum += 1.0 / volume
        self.n_frames += 1
        self.r = r.detach().numpy()
        self.write()

    # -- results -------------------------------------------------------------------------

    @property
    def pair_names(self) -> List[str]:
        """Species pairs in row order of :attr:`g` ("A-A", "A-B", ...)."""
        s = self.species_names
        return [f"{s[a]}-{s[b]}" for a in range(len(s)) for b in range(a, len(s))]

    @property
    def g(self) -> np.ndarray:
        """The accumulated partial RDFs, shape (n_pair_types, n_bins)."""
        if self._weighted_sum is None:
            raise RuntimeError("RDFReporter has recorded no frame yet")
        return self._weighted_sum / self._inverse_volume_sum

    def write(self, path: Optional[Union[str, os.PathLike]] = None) -> Path:
        """Write the accumulated RDFs (atomically) to ``path`` (default: the reporter's file)."""
        from .targets import write_rdf

        path = Path(path) if path is not None else self._path
        tmp = path.with_name(path.name + ".tmp" + path.suffix)
        pairs = [tuple(name.split("-", 1)) for name in self.pair_names]
        g = self.g
        write_rdf(
            tmp,
            self.r,
            g if len(pairs) > 1 else g[0],
            pair=pairs if len(pairs) > 1 else pairs[0],
            comment=f"openmm-diffsim RDFReporter: {self.n_frames} frames every {self._interval} steps, "
            f"smearing {self.smearing} nm",
        )
        os.replace(tmp, path)
        return path

    # -- setup -----------------------------------------------------------------------------

    def _setup(self, simulation) -> None:
        n_system = simulation.system.getNumParticles()
        if self._species_given is not None:
            names = self._species_given
            if len(names) != n_system:
                raise ValueError(f"RDFReporter: species lists {len(names)} particles but the System has {n_system}")
        else:
            names = []
            for atom in simulation.topology.atoms():
                if self._species_from == "name":
                    names.append(atom.name)
                elif self._species_from == "element":
                    if atom.element is None:
                        raise ValueError(f"RDFReporter: atom {atom.index} has no element; use species_from='name'")
                    names.append(atom.element.symbol)
                else:
                    names.append(atom.residue.name)
            if len(names) != n_system:
                raise ValueError(f"RDFReporter: the Topology has {len(names)} atoms but the System {n_system}")
        if self._atoms is not None:
            if self._atoms.size == 0 or self._atoms.min() < 0 or self._atoms.max() >= n_system:
                raise ValueError(f"RDFReporter: atoms must be indices in 0..{n_system - 1}")
            names = [names[i] for i in self._atoms]
        for name in names:
            if "-" in name:
                raise ValueError(f"RDFReporter: species name {name!r} contains '-', which pair names use")
        self.species_names = sorted(set(names))
        lookup = {name: k for k, name in enumerate(self.species_names)}
        self._species_index = torch.as_tensor([lookup[n] for n in names], dtype=torch.long)


def _md():
    from openmm import unit

    return unit.md_unit_system
