"""openmm-diffsim: learn pair potentials from structure by differentiable simulation on OpenMM."""

from .energy import PairEnergy, pair_energy_and_forces, potential_energy
from .neighbors import VerletList, neighbor_pairs
from .potentials import (
    WCA,
    CubicSpline,
    LennardJones,
    ModifiedMorse,
    NeuralCorrection,
    PairPotential,
    PairTable,
    PotentialSum,
    SoftSphere,
    Yukawa,
    tabulate,
)
from .torchforce import create_system, create_torch_force

# The OpenMM-facing and training layers import lazily (``openmm_diffsim.sampling``,
# ``.training``, ``.export``, ...); the names below resolve on first use so that
# ``import openmm_diffsim`` stays light.
_LAZY = {
    "StatePoint": "systems",
    "reduced_lj_units": "systems",
    "Sampler": "sampling",
    "Snapshots": "sampling",
    "SamplingError": "sampling",
    "reference_rdfs": "sampling",
    "compute_rdf": "observables",
    "compute_partial_rdfs": "observables",
    "virial_pressure": "observables",
    "Target": "targets",
    "read_target": "targets",
    "write_rdf": "targets",
    "ReweightingEstimator": "gradients",
    "RolloutEstimator": "gradients",
    "Trainer": "training",
    "RDFReporter": "reporters",
    "add_pair_potential": "openmm_systems",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'openmm_diffsim' has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = [
    "PairPotential",
    "LennardJones",
    "WCA",
    "SoftSphere",
    "Yukawa",
    "ModifiedMorse",
    "CubicSpline",
    "NeuralCorrection",
    "PotentialSum",
    "PairTable",
    "tabulate",
    "PairEnergy",
    "pair_energy_and_forces",
    "potential_energy",
    "VerletList",
    "neighbor_pairs",
    "create_torch_force",
    "create_system",
    *_LAZY,
]
