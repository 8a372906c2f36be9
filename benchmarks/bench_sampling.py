"""Sampler backends: speed, agreement and parameter hand-over cost (issue: state points and sampler).

LJ fluid (sigma 0.34 nm, epsilon 0.996 kJ/mol, argon mass) at rho* = 0.8,
T* = 1.2, cutoff 1.0 nm, and the same LJ plus a NeuralCorrection (shifted
cutoff). For each size N this prints, all measured in this process on the
platform the Sampler picks (CPU here):

* MD steps/s of the ``native`` (NonbondedForce), ``tabulated``
  (CustomNonbondedForce splines) and ``torch`` (TorchForce) backends, and
  their ratios to native;
* energy and force agreement of ``tabulated`` against ``torch`` (the model
  itself): relative energy difference and max |dF| / rms |F|;
* the hand-over cost of :meth:`Sampler.update_potential` per backend, against
  the time of a typical sampling run (``--snapshots`` x ``--interval`` steps).

    python benchmarks/bench_sampling.py [--sizes 1000 4000] [--steps 200]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch  # before OpenMM: its plugins need libtorch

import openmm_diffsim as od
from openmm_diffsim.sampling import DEFAULT_BACKEND, Sampler
from openmm_diffsim.systems import StatePoint, reduced_lj_units

SIGMA, EPSILON, MASS, CUTOFF = 0.34, 0.996, 39.948, 1.0


def lj_table(epsilon=EPSILON):
    return od.PairTable(["Ar"], od.LennardJones(SIGMA, epsilon), cutoff=CUTOFF, cutoff_mode="truncate")


def neural_table(bias=0.0):
    correction = od.NeuralCorrection(CUTOFF, seed=0)
    with torch.no_grad():
        correction.layers[-1].bias.fill_(bias)
    return od.PairTable(
        ["Ar"], od.PotentialSum([od.LennardJones(SIGMA, EPSILON), correction]), cutoff=CUTOFF, cutoff_mode="shift"
    )


def steps_per_second(sampler: Sampler, steps: int, repeats: int = 3) -> float:
    """Best of ``repeats`` timings: on a shared machine, the least disturbed one."""
    sampler.equilibrate(20)  # warm up: JIT, neighbor lists
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        sampler.equilibrate(steps)
        best = max(best, steps / (time.perf_counter() - start))
    return best


def agreement(state, table, positions):
    torch_sampler = Sampler(state, table, backend="torch", positions=positions, seed=1)
    tab_sampler = Sampler(state, table, backend="tabulated", positions=positions, seed=1)
    e_t, f_t = torch_sampler.energy_and_forces()
    e_s, f_s = tab_sampler.energy_and_forces()
    rms = np.sqrt(np.mean(np.sum(f_t**2, axis=1)))
    return abs(e_s - e_t) / abs(e_t), np.abs(f_s - f_t).max() / rms


def handover_seconds(sampler: Sampler, tables, repeats: int) -> float:
    times = []
    for k in range(repeats):
        sampler.update_potential(tables[k % 2])
        sampler.equilibrate(2)  # the first steps pay any lazy re-initialisation
        times.append(sampler.last_handover_seconds)  # min below: least disturbed by other load
    return float(np.min(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--snapshots", type=int, default=100, help="frames in a typical sampling run")
    parser.add_argument("--interval", type=int, default=50, help="steps between frames in a typical run")
    args = parser.parse_args()
    units = reduced_lj_units(SIGMA, EPSILON, MASS)
    print(f"torch threads: {torch.get_num_threads()}; DEFAULT_BACKEND = {DEFAULT_BACKEND}")
    for n in args.sizes:
        state = StatePoint(
            "LJ",
            ["Ar"],
            [n],
            [MASS],
            units.temperature_from_reduced(1.2),
            density=units.density_from_reduced(0.8),
        )
        native = Sampler(state, lj_table(), backend="native", seed=0)
        native.minimize(200)
        native.equilibrate(500)
        positions = native.positions
        print(f"\nN = {n}, box = {state.box_lengths[0]:.3f} nm, platform {native.platform_name}")

        speed = {"native": steps_per_second(native, args.steps)}
        samplers = {}
        for backend in ("tabulated", "torch"):
            samplers[backend] = Sampler(state, lj_table(), backend=backend, positions=positions, seed=0)
            speed[backend] = steps_per_second(samplers[backend], args.steps)
        neural = Sampler(state, neural_table(), backend="torch", positions=positions, seed=0)
        speed["torch (neural net)"] = steps_per_second(neural, max(10, args.steps // 10), repeats=1)
        neural_tab = Sampler(state, neural_table(), backend="tabulated", positions=positions, seed=0)
        speed["tabulated (neural net)"] = steps_per_second(neural_tab, args.steps)
        print("  speed (MD steps/s):")
        for name, value in speed.items():
            print(f"    {name:24s} {value:9.1f}   {value / speed['native']:6.3f} x native")

        print("  tabulated vs torch (same configuration):")
        for name, table in (("LJ truncate", lj_table()), ("LJ + neural, shift", neural_table(0.2))):
            de, df = agreement(state, table, positions)
            print(f"    {name:20s} |dE|/|E| = {de:.2e}   max|dF|/rms|F| = {df:.2e}")

        run_steps = args.snapshots * args.interval
        print(f"  hand-over (update_potential) vs a {args.snapshots} x {args.interval}-step run:")
        for backend, sampler, tables in (
            ("native", native, (lj_table(1.1), lj_table())),
            ("tabulated", samplers["tabulated"], (lj_table(1.1), lj_table())),
            ("torch", samplers["torch"], (lj_table(1.1), lj_table())),
            ("tabulated (neural)", neural_tab, (neural_table(0.2), neural_table(0.0))),
            ("torch (neural)", neural, (neural_table(0.2), neural_table(0.0))),
        ):
            seconds = handover_seconds(sampler, tables, 5)
            base = "torch" if backend.startswith("torch") else backend.split()[0]
            run_seconds = run_steps / speed[base if "neural" not in backend else f"{base} (neural net)"]
            share = seconds / run_seconds
            print(f"    {backend:20s} {1e3 * seconds:8.1f} ms   {share:.2e} of the run ({run_seconds:.1f} s)")


if __name__ == "__main__":
    main()
