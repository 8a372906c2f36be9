"""Learn argon's pair potential from its RDF with the Python API, then run MD with it.

The same case as ``openmm-diffsim demo``, spelled out: a target RDF file, a
state point, a potential with a repulsive prior and a trainable spline, the
trainer, and the learned potential used in a plain OpenMM simulation.

    python examples/learn_argon.py [--epochs 150] [--output argon-run]
"""

from __future__ import annotations

import argparse

import numpy as np
import openmm
from openmm import unit

import openmm_diffsim as od
from openmm_diffsim.demo import demo_target_path
from openmm_diffsim.systems import StatePoint
from openmm_diffsim.targets import read_target
from openmm_diffsim.training import Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--output", default="argon-run")
    args = parser.parse_args()

    target = read_target(demo_target_path(), pair=("Ar", "Ar"))
    state = StatePoint(
        name="argon-liquid",
        species=["Ar"],
        counts=[500],
        masses=[39.948 * unit.dalton],
        temperature=120.0 * unit.kelvin,
        density=0.8 / 0.34**3,
        targets=[target],
    )

    prior = od.SoftSphere(sigma=0.32, epsilon=1.0, exponent=12)
    prior.epsilon.requires_grad_(False)  # train the wall position only
    prior.exponent.requires_grad_(False)
    knots = np.concatenate([np.arange(0.29, 0.405, 0.01), np.arange(0.44, 1.0001, 0.04)])
    correction = od.CubicSpline(knots, np.zeros_like(knots))
    table = od.PairTable(["Ar"], od.PotentialSum([prior, correction]), cutoff=1.0, cutoff_mode="shift")

    trainer = Trainer(
        table,
        [state],
        "reweighting",
        learning_rate=0.05,
        learning_rate_scales={"sigma": 0.02},
        max_epochs=args.epochs,
        n_snapshots=40,
        snapshot_interval=50,
        estimator_options=dict(r_range=(0.0, 1.0), n_bins=100, smearing=0.01),
        output_dir=args.output,
    )
    trainer.fit()

    # The learned potential in an ordinary OpenMM simulation.
    system = od.create_system(table, ["Ar"] * state.n_particles, 39.948, state.box_lengths)
    integrator = openmm.LangevinMiddleIntegrator(120.0, 1.0, 0.002)
    context = openmm.Context(system, integrator)
    context.setPositions(state.initial_positions(seed=1))
    openmm.LocalEnergyMinimizer.minimize(context)
    integrator.step(1000)
    energy = context.getState(getEnergy=True).getPotentialEnergy()
    print(f"potential energy after 1000 steps with the learned potential: {energy}")


if __name__ == "__main__":
    main()
