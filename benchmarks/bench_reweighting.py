"""Cost of the reweighting estimator's per-sample work against the OpenMM MD that produced the sample.

Every IMC / reweighting step draws a fresh sample and then runs
``ReweightingEstimator.reset`` (pair search, RDFs, pair-distance histograms,
exact energies) and one Jacobian. This script times both for one sample and
prints their ratio to the OpenMM time of the sample's MD (same process,
same potential, expression backend on the CPU platform), for

* the demo system (N = 500 argon-like LJ at ρ* = 0.8, RDF to 1 nm: the box
  holds two cells of the cutoff per axis, so pairs come from the all-pairs search), and
* the seed paper's LJ case (N = 256 at ρ* = 0.3, σ = 1 nm, cutoff 2.5 nm:
  three cells per axis, where the all-pairs search is also the faster one).

    python benchmarks/bench_reweighting.py [--frames 100] [--interval 50]
"""

# ruff: noqa: I001  (torch must load before OpenMM's plugins)
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import openmm_diffsim as od
from openmm_diffsim.gradients import ReweightingEstimator, _jacobian
from openmm_diffsim.sampling import Sampler
from openmm_diffsim.systems import StatePoint
from openmm_diffsim.targets import Target

MOLAR_GAS_CONSTANT = 8.31446261815324e-3


def systems():
    sigma, epsilon = 0.34, 0.996
    demo_state = StatePoint(
        "demo", ["Ar"], [500], [39.948], temperature=120.0, density=0.8 / sigma**3
    )  # the demo's state point
    demo_table = od.PairTable(["Ar"], od.LennardJones(sigma, epsilon), cutoff=1.0, cutoff_mode="shift")
    paper_state = StatePoint("paper-lj", ["A"], [256], [1.0], temperature=1.2 / MOLAR_GAS_CONSTANT, density=0.3)
    paper_table = od.PairTable(["A"], od.LennardJones(1.0, 1.0), cutoff=2.5, cutoff_mode="shift")
    return [
        ("demo (N=500, rho*=0.8)", demo_state, demo_table, dict(r_range=(0.0, 1.0), n_bins=100, smearing=0.01), 0.01),
        (
            "paper LJ (N=256, rho*=0.3)",
            paper_state,
            paper_table,
            dict(r_range=(0.0, 2.5), n_bins=100, smearing=0.02),
            0.005,
        ),
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--interval", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"{'system':<28} {'MD (s)':>8} {'reset (s)':>10} {'Jacobian (s)':>13} {'(reset + J) / MD':>17}")
    for name, state, table, grid, timestep in systems():
        sampler = Sampler(state, table, platform="CPU", timestep=timestep, seed=1)
        sampler.minimize()
        sampler.equilibrate(1000)
        start = time.perf_counter()
        snapshots = sampler.run(args.frames, args.interval)
        md = time.perf_counter() - start
        r = ReweightingEstimator(**grid).r
        target = Target(r, np.ones(len(r)), pair=(state.species[0], state.species[0]))
        estimator = ReweightingEstimator(**grid, bin_weighting="counting")
        start = time.perf_counter()
        estimator.reset(table, snapshots, state)
        reset = time.perf_counter() - start
        params = [p for p in table.parameters() if p.requires_grad]
        start = time.perf_counter()
        with torch.enable_grad():
            rho, _ = estimator.residuals(table, state, [target])
            _jacobian(rho, params)  # as the Trainer's IMC step takes it
        jacobian = time.perf_counter() - start
        print(f"{name:<28} {md:8.2f} {reset:10.2f} {jacobian:13.2f} {(reset + jacobian) / md:17.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
