"""Thin adapter from a :class:`~openmm_diffsim.potentials.PairTable` to OpenMM.

OpenMM and openmm-torch are imported lazily so that the torch-only parts of
the package (potentials, RDFs, rollouts) work without them.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch

from .energy import PairEnergy
from .potentials import PairTable

__all__ = ["script_energy_module", "create_torch_force", "create_system", "create_base_system", "species_indices"]


def _import_openmm():
    try:
        import openmm
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("OpenMM is required here: pip install openmm") from exc
    return openmm


def _import_openmmtorch():
    try:
        import openmmtorch
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("openmm-torch is required here: pip install openmmtorch==1.5 'torch>=2.9,<2.10'") from exc
    _reload_torch_plugins()
    return openmmtorch


def _reload_torch_plugins() -> None:
    """Load openmm-torch's platform plugins again if OpenMM was imported before torch.

    OpenMM loads its plugins at import; the openmm-torch kernels need libtorch,
    which is only in the process once torch is imported. Without this, a Context
    fails with "does not support all required kernels".
    """
    openmm = _import_openmm()
    for failure in openmm.Platform.getPluginLoadFailures():
        if "OpenMMTorch" not in failure or not failure.startswith("Error loading library "):
            continue
        path = failure[len("Error loading library ") :].split(": ", 1)[0]
        try:
            openmm.Platform.loadPluginLibrary(path)
        except Exception:  # noqa: BLE001 - e.g. OpenCL/CUDA driver absent: that platform stays unavailable
            pass


def species_indices(table: PairTable, species: Sequence[Union[str, int]]) -> np.ndarray:
    """Map per-particle species (names or indices) to indices into ``table.species``.

    Raises
    ------
    ValueError
        For unknown names or out-of-range indices, naming the first offender.
    """
    out = np.empty(len(species), dtype=np.int64)
    for n, s in enumerate(species):
        if isinstance(s, (int, np.integer)):
            if not 0 <= int(s) < len(table.species):
                raise ValueError(f"particle {n}: species index {s} out of range for species {table.species}")
            out[n] = int(s)
        else:
            if str(s) not in table.species:
                raise ValueError(f"particle {n}: unknown species {s!r}; known species: {table.species}")
            out[n] = table.species.index(str(s))
    return out


def script_energy_module(
    table: PairTable,
    species,
    skin: float = 0.1,
    atoms=None,
    n_particles: Optional[int] = None,
    exclusions=None,
) -> torch.jit.ScriptModule:
    """TorchScript-compile a :class:`~openmm_diffsim.energy.PairEnergy` for ``table``.

    Parameters are copied (detached) so later training does not alter the
    scripted module. ``atoms``, ``n_particles`` and ``exclusions`` are passed
    to :class:`~openmm_diffsim.energy.PairEnergy`.
    """
    import copy

    table_copy = copy.deepcopy(table)
    for p in table_copy.parameters():
        p.requires_grad_(False)
    module = PairEnergy(
        table_copy,
        species_indices(table, species),
        skin=skin,
        atoms=atoms,
        n_particles=n_particles,
        exclusions=exclusions,
    )
    return torch.jit.script(module)


def create_torch_force(
    table: PairTable,
    species,
    skin: float = 0.1,
    path: Optional[str] = None,
    cuda_graphs: bool = False,
    tabulate: Union[bool, str] = "auto",
    *,
    atoms=None,
    n_particles: Optional[int] = None,
    exclusions=None,
):
    """An openmm-torch ``TorchForce`` evaluating ``table`` for the given particles.

    Parameters
    ----------
    table : PairTable
        Pair potentials.
    species : sequence of str or int, length N (or M with ``atoms``)
        Species of each particle, by name or index.
    skin : float
        Verlet skin in nm.
    path : str, optional
        Where to save the TorchScript file. By default the module is passed in
        memory (openmm-torch ≥ 1.4).
    tabulate : bool or "auto"
        Evaluate the potential as a fine cubic spline per pair type
        (:meth:`PairTable.tabulated`, 2000 knots; error ~1e-8 kJ/mol for smooth
        potentials) instead of its own expression. ``"auto"`` does so when the
        table contains a neural network, which would otherwise run on every
        pair every step (~50x slower at N = 4000).
    cuda_graphs : bool
        Ask openmm-torch to capture the module in CUDA graphs on the CUDA
        platform. Off by default: the Verlet list is rebuilt on data-dependent
        steps and changes size, which a captured graph cannot follow.
    atoms : sequence of int, length M, optional
        System indices of the particles the potential acts on; the others feel
        no force from it. Needs ``n_particles``.
    n_particles : int, optional
        Number of particles in the System (default: ``len(species)``).
    exclusions : array_like of int, shape (E, 2), optional
        Pairs of System indices that do not interact (e.g. bonded neighbours).
        :func:`openmm_diffsim.openmm_systems.add_pair_potential` builds
        ``atoms`` and ``exclusions`` from a ``Topology``.

    Returns
    -------
    openmmtorch.TorchForce
        Built with ``setOutputsForces(True)`` and periodic boundary conditions.
    """
    openmmtorch = _import_openmmtorch()
    if tabulate not in (True, False, "auto"):
        raise ValueError(f"tabulate must be True, False or 'auto', got {tabulate!r}")
    if tabulate is True or (tabulate == "auto" and _has_network(table)):
        table = table.tabulated()
    module = script_energy_module(
        table, species, skin=skin, atoms=atoms, n_particles=n_particles, exclusions=exclusions
    )
    if path is not None:
        module.save(path)
        force = openmmtorch.TorchForce(path)
    else:
        force = openmmtorch.TorchForce(module)
    force.setOutputsForces(True)
    force.setUsesPeriodicBoundaryConditions(True)
    force.setName("openmm-diffsim pair potential")
    # Only read by the CUDA platform; harmless elsewhere.
    force.setProperty("useCUDAGraphs", "true" if cuda_graphs else "false")
    return force


def _has_network(table: PairTable) -> bool:
    from .potentials import NeuralCorrection

    return any(isinstance(m, NeuralCorrection) for m in table.modules())


def create_system(
    table: PairTable,
    species,
    masses,
    box,
    skin: float = 0.1,
    tabulate="auto",
):
    """An OpenMM ``System`` whose only force is ``table`` as a ``TorchForce``.

    Parameters
    ----------
    table : PairTable
        Pair potentials.
    species : sequence of str or int, length N
        Species of each particle.
    masses : float or sequence of float
        Particle masses in amu (one value for all, or one per particle), or a
        Quantity.
    box : array_like (3,) or (3, 3), or Quantity
        Rectangular periodic box in nm.
    skin : float
        Verlet skin in nm.
    tabulate : bool or "auto"
        As for :func:`create_torch_force`.
    """
    system = create_base_system(len(species), masses, box, table.cutoff)
    system.addForce(create_torch_force(table, species, skin=skin, tabulate=tabulate))
    return system


def create_base_system(n_particles: int, masses, box, cutoff: float):
    """An OpenMM ``System`` with particles and a periodic box, and no forces yet.

    Parameters
    ----------
    n_particles : int
        Number of particles.
    masses : float, sequence of float, or Quantity
        Masses in amu (one for all particles, or one each).
    box : array_like (3,) or (3, 3), or Quantity
        Rectangular box (edge lengths or vectors) in nm.
    cutoff : float
        Interaction cutoff in nm, checked against half the shortest box edge.
    """
    openmm = _import_openmm()
    from .units import to_array

    masses_arr = to_array(masses, "masses", "dalton")
    if masses_arr.ndim > 1 or (masses_arr.ndim == 1 and masses_arr.size not in (1, n_particles)):
        raise ValueError(f"masses must be one value or one per particle ({n_particles}), got shape {masses_arr.shape}")
    masses_arr = np.broadcast_to(masses_arr.reshape(-1) if masses_arr.ndim else masses_arr, (n_particles,))
    if not np.all(np.isfinite(masses_arr)) or np.any(masses_arr <= 0):
        raise ValueError("masses must be positive and finite")
    box_arr = to_array(box, "box", "nanometer")
    if box_arr.shape == (3,):
        box_arr = np.diag(box_arr)
    if box_arr.shape != (3, 3):
        raise ValueError(f"box must have shape (3,) or (3, 3), got {box_arr.shape}")
    lengths = np.diag(box_arr)
    if np.any(np.abs(box_arr - np.diag(lengths)) > 0):
        raise ValueError("triclinic boxes are not supported yet: the box vectors must be diagonal")
    if np.any(lengths <= 0) or not np.all(np.isfinite(lengths)):
        raise ValueError("box edge lengths must be positive and finite")
    if 2 * cutoff > lengths.min():
        raise ValueError(f"cutoff {cutoff} nm is larger than half the shortest box edge {lengths.min()} nm")
    system = openmm.System()
    for m in masses_arr:
        system.addParticle(float(m))
    system.setDefaultPeriodicBoxVectors(*(openmm.Vec3(*row) for row in box_arr))
    return system
