"""Run MD in an ordinary OpenMM script with an exported openmm-diffsim potential.

The potential comes from a file: a TorchScript export
(``openmm-diffsim export --format torchscript``, or ``potential.pt`` in the
demo's ``export/`` folder), a training checkpoint or a pickled PairTable. One
call adds it to the script's own System; everything else is plain OpenMM: a
Topology, a Langevin integrator, a Simulation, and reporters (OpenMM's
StateDataReporter and DCDReporter, and openmm-diffsim's RDFReporter).

    python examples/openmm_run_exported.py [--potential demo-output/export/potential.pt] [--steps 2000]

Without ``--potential`` a Lennard-Jones argon table is exported first, as a
stand-in for a trained one. Measured: 62 s wall (54 s CPU) on the 2-core
development machine while other jobs ran; ``--quick`` takes a few seconds.
``--backend tabulated`` runs the same model several times faster on CPUs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch  # noqa: F401  (import torch before OpenMM creates contexts: openmm-torch needs libtorch)

# isort: split
import numpy as np
import openmm
from openmm import app, unit

import openmm_diffsim as od
from openmm_diffsim import export
from openmm_diffsim.cli import load_table
from openmm_diffsim.openmm_systems import add_pair_potential
from openmm_diffsim.reporters import RDFReporter
from openmm_diffsim.systems import lattice_positions

ARGON_MASS = 39.948  # amu
NUMBER_DENSITY = 21.0  # particles/nm^3, liquid argon near 120 K


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--potential", type=Path, help="exported potential (.pt) or checkpoint")
    parser.add_argument("--particles", type=int, default=500)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--backend", choices=["torch", "tabulated"], default="torch")
    parser.add_argument("--output", type=Path, default=Path("openmm-run"))
    parser.add_argument("--quick", action="store_true", help="tiny system, few steps (for tests)")
    args = parser.parse_args(argv)
    if args.quick:
        args.particles, args.steps = 128, 200
    args.output.mkdir(parents=True, exist_ok=True)

    potential = args.potential
    if potential is None:
        stand_in = od.PairTable(["Ar"], od.LennardJones(0.34, 0.996), cutoff=0.9, cutoff_mode="shift")
        potential = export.save_torchscript(stand_in, args.output / "potential.pt")
    table = load_table(potential)
    if len(table.species) != 1:
        raise SystemExit(f"this example builds a one-component fluid; {potential} has species {table.species}")
    name = table.species[0]

    # -- the user's own OpenMM setup ------------------------------------------------------------
    n = args.particles
    edge = (n / NUMBER_DENSITY) ** (1.0 / 3.0)
    topology = app.Topology()
    chain = topology.addChain()
    for _ in range(n):
        topology.addAtom(name, app.Element.getBySymbol("Ar"), topology.addResidue("AR", chain))
    topology.setPeriodicBoxVectors(np.eye(3) * edge * unit.nanometer)
    system = openmm.System()
    for _ in range(n):
        system.addParticle(ARGON_MASS)
    system.setDefaultPeriodicBoxVectors(*(openmm.Vec3(*row) for row in np.eye(3) * edge))
    system.addForce(openmm.CMMotionRemover())

    # -- the one openmm-diffsim call: the learned pair potential next to the other forces -------------
    add_pair_potential(system, topology, table, backend=args.backend)

    integrator = openmm.LangevinMiddleIntegrator(120 * unit.kelvin, 1 / unit.picosecond, 0.004 * unit.picosecond)
    simulation = app.Simulation(topology, system, integrator)
    simulation.context.setPositions(lattice_positions(n, [edge] * 3, rng=np.random.default_rng(0)))
    simulation.minimizeEnergy()
    simulation.context.setVelocitiesToTemperature(120 * unit.kelvin, 1)
    interval = max(1, args.steps // 20)
    rdf = RDFReporter(args.output / "rdf.dat", interval, r_range=(0.0, min(1.0, edge / 2)), n_bins=100, smearing=0.01)
    simulation.reporters += [
        app.StateDataReporter(
            str(args.output / "state.csv"), interval, step=True, potentialEnergy=True, temperature=True, speed=True
        ),
        app.StateDataReporter(sys.stdout, max(interval, args.steps // 5), step=True, temperature=True, speed=True),
        app.DCDReporter(str(args.output / "trajectory.dcd"), interval),
        rdf,
    ]
    simulation.step(args.steps)

    state = simulation.context.getState(getEnergy=True)
    summary = {
        "potential_energy_per_particle": state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole) / n,
        "rdf_peak_position": float(rdf.r[np.argmax(rdf.g[0])]),
        "rdf_peak_height": float(rdf.g[0].max()),
        "frames": rdf.n_frames,
    }
    print(
        f"{n} particles, {args.steps} steps with {potential}: U/N = {summary['potential_energy_per_particle']:.3f} "
        f"kJ/mol, g(r) peak {summary['rdf_peak_height']:.2f} at {summary['rdf_peak_position']:.3f} nm; "
        f"files in {args.output}/"
    )
    return summary


if __name__ == "__main__":
    main()
