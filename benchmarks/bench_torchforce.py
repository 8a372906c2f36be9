"""Speed of the TorchForce pair potential against OpenMM's own forces (issue: foundation).

LJ fluid, sigma = 0.34 nm, epsilon = 0.996 kJ/mol, reduced density 0.8, cutoff
1.0 nm, CPU platform. Prints steps/s of OpenMM's native NonbondedForce, a
tabulated CustomNonbondedForce and our TorchForce (analytic LJ and a neural
potential evaluated as a fine spline), and the ratios to native, all measured
in this process.

    python benchmarks/bench_torchforce.py [--sizes 1000 4000] [--steps 200]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import openmm as mm
import torch  # noqa: F401  (load libtorch before OpenMM's plugins)

import openmm_diffsim as od
from openmm_diffsim.sampling import create_native_lj_force
from openmm_diffsim.systems import lattice_positions
from openmm_diffsim.torchforce import create_base_system

SIGMA, EPSILON, MASS, CUTOFF = 0.34, 0.996, 39.948, 1.0


def native_system(n, box):
    """OpenMM's own NonbondedForce for the same LJ potential (the reference)."""
    table = od.PairTable(["Ar"], od.LennardJones(SIGMA, EPSILON), cutoff=CUTOFF, cutoff_mode="truncate")
    system = create_base_system(n, MASS, [box] * 3, CUTOFF)
    system.addForce(create_native_lj_force(table, np.zeros(n, dtype=np.int64)))
    return system


def tabulated_system(n, box, table):
    system = native_system(n, box)
    system.removeForce(0)
    r = np.linspace(0.0, CUTOFF, 2001)
    r_safe = np.maximum(r, 0.05)
    u, _ = table.evaluate(r_safe)
    force = mm.CustomNonbondedForce("u_table(r)")
    force.addTabulatedFunction("u_table", mm.Continuous1DFunction(u.tolist(), 0.0, CUTOFF))
    force.setNonbondedMethod(mm.CustomNonbondedForce.CutoffPeriodic)
    force.setCutoffDistance(CUTOFF)
    for _ in range(n):
        force.addParticle([])
    system.addForce(force)
    return system


def steps_per_second(system, positions, steps, platform="CPU"):
    integrator = mm.LangevinMiddleIntegrator(120.0, 1.0, 0.002)
    context = mm.Context(system, integrator, mm.Platform.getPlatformByName(platform))
    context.setPositions(positions)
    context.setVelocitiesToTemperature(120.0, 1)
    integrator.step(20)  # warm up: JIT, neighbor lists
    context.getState(getEnergy=True)
    start = time.perf_counter()
    integrator.step(steps)
    context.getState(getEnergy=True)
    return steps / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000])
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    lj = od.PairTable(["Ar"], od.LennardJones(SIGMA, EPSILON), cutoff=CUTOFF, cutoff_mode="truncate")
    neural = od.PairTable(
        ["Ar"],
        od.PotentialSum([od.LennardJones(SIGMA, EPSILON), od.NeuralCorrection(CUTOFF, seed=0)]),
        cutoff=CUTOFF,
        cutoff_mode="shift",
    )
    print(f"torch threads: {torch.get_num_threads()}")
    for n in args.sizes:
        density = 0.8 / SIGMA**3
        box = (n / density) ** (1 / 3)
        positions = lattice_positions(n, [box] * 3, rng=rng)
        results = {}
        results["native NonbondedForce"] = steps_per_second(native_system(n, box), positions, args.steps)
        results["tabulated CustomNonbondedForce"] = steps_per_second(
            tabulated_system(n, box, lj), positions, args.steps
        )
        results["TorchForce LJ (analytic)"] = steps_per_second(
            od.create_system(lj, ["Ar"] * n, MASS, [box] * 3), positions, args.steps
        )
        # Default: a network is evaluated as a 2000-knot spline inside the module.
        results["TorchForce neural (spline)"] = steps_per_second(
            od.create_system(neural, ["Ar"] * n, MASS, [box] * 3), positions, args.steps
        )
        results["TorchForce neural (network)"] = steps_per_second(
            od.create_system(neural, ["Ar"] * n, MASS, [box] * 3, tabulate=False), positions, max(10, args.steps // 10)
        )
        native = results["native NonbondedForce"]
        print(f"\nN = {n}, box = {box:.3f} nm")
        for name, value in results.items():
            print(f"  {name:32s} {value:9.1f} steps/s   {value / native:6.3f} x native")


if __name__ == "__main__":
    main()
