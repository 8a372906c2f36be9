"""Cost of a particle selection and excluded pairs in the TorchForce (issue #9).

LJ fluid as in ``bench_torchforce.py`` (sigma = 0.34 nm, rho* = 0.8, cutoff
1.0 nm, CPU platform). The particles are strung into chains of 10 in lattice
order and the bonded neighbours are excluded (1-2, optionally 1-3), which is
what ``add_pair_potential(..., exclusions="bonds")`` does for a bead-spring
polymer. Rounds alternate the variants so that drift on a shared machine hits
all of them; the best (and median) steps/s and the ratio of the best to the
plain all-particle TorchForce are printed.

    python benchmarks/bench_exclusions.py [--sizes 1000 4000] [--steps 100] [--rounds 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import openmm as mm
import torch  # noqa: F401  (load libtorch before OpenMM's plugins)

import openmm_diffsim as od
from openmm_diffsim.sampling import create_tabulated_force
from openmm_diffsim.systems import lattice_positions
from openmm_diffsim.torchforce import create_base_system

SIGMA, EPSILON, MASS, CUTOFF = 0.34, 0.996, 39.948, 1.0


def chain_exclusions(n: int, length: int = 10, bond_cutoff: int = 1) -> np.ndarray:
    pairs = []
    for start in range(0, n - length + 1, length):
        for k in range(length):
            for d in range(1, bond_cutoff + 1):
                if k + d < length:
                    pairs.append((start + k, start + k + d))
    return np.array(pairs, dtype=np.int64)


def system_with(n, box, force):
    system = create_base_system(n, MASS, [box] * 3, CUTOFF)
    system.addForce(force)
    return system


def make_variants(table, n, bonds, bonds13, half):
    """Force factories: a fresh force per measurement (a System owns its forces)."""
    species = np.zeros(n, dtype=np.int64)
    return {
        "TorchForce, all particles": lambda: od.create_torch_force(table, ["Ar"] * n),
        "TorchForce, 1-2 exclusions": lambda: od.create_torch_force(table, ["Ar"] * n, exclusions=bonds),
        "TorchForce, 1-2 + 1-3 exclusions": lambda: od.create_torch_force(table, ["Ar"] * n, exclusions=bonds13),
        "TorchForce, half the particles": lambda: od.create_torch_force(
            table, ["Ar"] * half.size, atoms=half, n_particles=n
        ),
        "tabulated, all particles": lambda: create_tabulated_force(table, species),
        "tabulated, 1-2 exclusions": lambda: create_tabulated_force(table, species, exclusions=bonds),
    }


def steps_per_second(system, positions, steps, threads=None):
    integrator = mm.LangevinMiddleIntegrator(120.0, 1.0, 0.002)
    properties = {} if threads is None else {"Threads": str(threads)}
    context = mm.Context(system, integrator, mm.Platform.getPlatformByName("CPU"), properties)
    context.setPositions(positions)
    context.setVelocitiesToTemperature(120.0, 1)
    integrator.step(20)  # warm up: TorchScript profiling runs, neighbour lists
    context.getState(getEnergy=True)
    start = time.perf_counter()
    integrator.step(steps)
    context.getState(getEnergy=True)
    return steps / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch and OpenMM CPU threads (steadier on a busy machine)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    table = od.PairTable(["Ar"], od.LennardJones(SIGMA, EPSILON), cutoff=CUTOFF, cutoff_mode="truncate")
    print(f"torch threads: {torch.get_num_threads()}")
    for n in args.sizes:
        box = (n / (0.8 / SIGMA**3)) ** (1 / 3)
        positions = lattice_positions(n, [box] * 3, rng=np.random.default_rng(0))
        bonds = chain_exclusions(n, 10, 1)
        bonds13 = chain_exclusions(n, 10, 2)
        variants = make_variants(table, n, bonds, bonds13, np.arange(0, n, 2))
        # One throwaway run: the first TorchScript module in a process pays one-off costs.
        steps_per_second(system_with(n, box, variants["TorchForce, all particles"]()), positions, 10, args.threads)
        results = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, make in variants.items():
                results[name].append(steps_per_second(system_with(n, box, make()), positions, args.steps, args.threads))
        # Interference on a shared machine only slows a run down: compare the best rounds.
        reference = max(results["TorchForce, all particles"])
        print(f"\nN = {n}, box = {box:.3f} nm, {len(bonds)} 1-2 / {len(bonds13)} 1-2+1-3 excluded pairs")
        for name, values in results.items():
            best, median = max(values), statistics.median(values)
            print(f"  {name:34s} best {best:8.1f} steps/s (median {median:8.1f})  {best / reference:6.3f} x all")


if __name__ == "__main__":
    main()
