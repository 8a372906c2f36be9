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
]
