"""Speed and memory of rollout gradients: backprop through time vs the adjoint (issue: gradient estimators).

LJ fluid (σ = 0.34 nm, ε = 0.996 kJ/mol, m = 39.948 amu, reduced density 0.8,
cutoff 1.0 nm, energy shifted, T = 120 K), NVE velocity Verlet with
dt = 0.002 ps. Loss: mean squared difference between a target and the RDF
(Gaussian-smeared, 100 bins on 0-1.0 nm, smearing 0.01 nm) averaged over the
frames every 10 steps of a 100-step rollout; gradient with respect to σ and ε.

Every configuration (N, dtype, method) runs in a fresh subprocess so that its
peak resident memory (``resource.getrusage(...).ru_maxrss``) is its own. For
each it prints forward steps/s (no grad), the wall time of one 100-step
forward+backward gradient, and the peak memory, with ratios to a widely used
JAX library measured on this machine type (2 cores), quoted from the issue
because JAX is not installed here. OpenMM's CPU platform with its native
NonbondedForce runs in the same process as an in-process reference for the
forward speed.

    python benchmarks/bench_gradients.py [--sizes 1000 4000] [--dtypes float32 float64]
                                         [--methods backprop adjoint adjoint-keep] [--threads 2]

``adjoint`` recomputes each frame's RDF in the backward pass (least memory);
``adjoint-keep`` keeps the frames' RDF graphs from the forward pass (faster).
On a shared machine, ``--threads 1`` avoids OpenMP oversubscription.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

SIGMA, EPSILON, MASS, CUTOFF, TEMPERATURE = 0.34, 0.996, 39.948, 1.0, 120.0
TIMESTEP, N_STEPS, RECORD_EVERY = 0.002, 100, 10
R_RANGE, N_BINS, SMEARING = (0.0, 1.0), 100, 0.01

# A widely used JAX library on this machine type (2 cores), from the issue:
# (N, dtype) -> forward steps/s, seconds per gradient, peak GB
REFERENCE = {
    (1000, "float32"): (332.0, 1.93, 2.8),
    (1000, "float64"): (None, 3.13, 4.6),
    (4000, "float32"): (78.0, 8.67, 8.6),
    (4000, "float64"): (None, 14.8, 15.7),
}


def fcc_positions(n: int, edge: float, seed: int = 0):
    import numpy as np

    from openmm_diffsim.systems import lattice_positions

    return lattice_positions(n, [edge] * 3, rng=np.random.default_rng(seed))


def worker(n: int, dtype_name: str, method: str, threads: int) -> dict:
    import resource

    import numpy as np
    import torch

    torch.set_num_threads(threads)
    import openmm_diffsim as od
    from openmm_diffsim import dynamics as dyn
    from openmm_diffsim.observables import compute_rdf

    dtype = getattr(torch, dtype_name)
    edge = (n / (0.8 / SIGMA**3)) ** (1 / 3)
    table = od.PairTable(["Ar"], od.LennardJones(SIGMA, EPSILON), cutoff=CUTOFF, cutoff_mode="shift")
    masses = np.full(n, MASS)
    forces = dyn.PairForces(table, np.zeros(n, dtype=int), np.full(3, edge), skin=0.1)
    x0 = torch.tensor(fcc_positions(n, edge)[None], dtype=dtype)
    v0 = dyn.maxwell_boltzmann_velocities(masses, TEMPERATURE, 1, seed=1, dtype=dtype)
    integrator = dyn.VelocityVerlet(TIMESTEP)
    box = torch.full((3,), edge, dtype=torch.float64)
    target = torch.ones(N_BINS, dtype=torch.float64)

    def observable(frame):
        return compute_rdf(frame, box, R_RANGE, N_BINS, SMEARING)[1]

    def loss(g):
        return ((g - target) ** 2).mean()

    # Melt the lattice a little and warm up (allocator, first pair lists).
    with torch.no_grad():
        run = dyn.rollout(forces, masses, integrator, x0, v0, 50, record_every=50)
        x0, v0 = run.final.positions, run.final.velocities
        start = time.perf_counter()
        dyn.rollout(forces, masses, integrator, x0, v0, N_STEPS, record_every=N_STEPS)
        forward = N_STEPS / (time.perf_counter() - start)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB -> GB
    start = time.perf_counter()
    result = dyn.rollout_gradient(
        forces,
        masses,
        integrator,
        x0,
        v0,
        N_STEPS,
        RECORD_EVERY,
        observable,
        loss,
        list(table.parameters()),
        method="backprop" if method == "backprop" else "adjoint",
        checkpoint_every=None,
        keep_observable_graphs=method == "adjoint-keep",
    )
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    return {
        "n": n,
        "dtype": dtype_name,
        "method": method,
        "forward_steps_per_s": forward,
        "gradient_s": seconds,
        "peak_gb": peak,
        "rss_before_gradient_gb": rss_before,
        "grad_sigma": float(result.gradients[0]),
        "grad_epsilon": float(result.gradients[1]),
        "pairs": int(forces.pairs(x0)[0].shape[0]),
    }


def openmm_steps_per_second(n: int, steps: int = 100) -> float:
    import torch  # noqa: F401, I001  (libtorch before OpenMM plugins)
    import openmm as mm

    edge = (n / (0.8 / SIGMA**3)) ** (1 / 3)
    system = mm.System()
    for _ in range(n):
        system.addParticle(MASS)
    system.setDefaultPeriodicBoxVectors(mm.Vec3(edge, 0, 0), mm.Vec3(0, edge, 0), mm.Vec3(0, 0, edge))
    nb = mm.NonbondedForce()
    nb.setNonbondedMethod(mm.NonbondedForce.CutoffPeriodic)
    nb.setCutoffDistance(CUTOFF)
    nb.setUseDispersionCorrection(False)
    for _ in range(n):
        nb.addParticle(0.0, SIGMA, EPSILON)
    system.addForce(nb)
    integrator = mm.VerletIntegrator(TIMESTEP)
    context = mm.Context(system, integrator, mm.Platform.getPlatformByName("CPU"))
    context.setPositions(fcc_positions(n, edge))
    context.setVelocitiesToTemperature(TEMPERATURE, 1)
    integrator.step(20)
    context.getState(getEnergy=True)
    start = time.perf_counter()
    integrator.step(steps)
    context.getState(getEnergy=True)
    return steps / (time.perf_counter() - start)


def _ratio(ours, reference, higher_is_better):
    if reference is None or ours is None:
        return "   n/a"
    value = ours / reference if higher_is_better else reference / ours
    return f"{value:6.2f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"], choices=["float32", "float64"])
    parser.add_argument(
        "--methods", nargs="+", default=["backprop", "adjoint"], choices=["backprop", "adjoint", "adjoint-keep"]
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", nargs=3, metavar=("N", "DTYPE", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if args.worker:
        n, dtype_name, method = args.worker
        print(json.dumps(worker(int(n), dtype_name, method, args.threads)))
        return

    rows = []
    for n in args.sizes:
        openmm_rate = openmm_steps_per_second(n)
        for dtype_name in args.dtypes:
            for method in args.methods:
                out = subprocess.run(
                    [sys.executable, __file__, "--worker", str(n), dtype_name, method, "--threads", str(args.threads)],
                    capture_output=True,
                    text=True,
                    check=False,
                )
                if out.returncode != 0:
                    print(f"N={n} {dtype_name} {method}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
                    continue
                row = json.loads(out.stdout.strip().splitlines()[-1])
                row["openmm_native_steps_per_s"] = openmm_rate
                rows.append(row)
                ref_fwd, ref_grad, ref_mem = REFERENCE.get((n, dtype_name), (None, None, None))
                print(
                    f"N={n:5d} {dtype_name} {method:8s}  forward {row['forward_steps_per_s']:7.1f} steps/s "
                    f"(x{_ratio(row['forward_steps_per_s'], ref_fwd, True)} JAX, "
                    f"x{row['forward_steps_per_s'] / openmm_rate:5.2f} OpenMM native {openmm_rate:.0f}/s)  "
                    f"gradient {row['gradient_s']:6.2f} s (JAX/ours {_ratio(row['gradient_s'], ref_grad, False)})  "
                    f"peak {row['peak_gb']:5.2f} GB (JAX/ours {_ratio(row['peak_gb'], ref_mem, False)})",
                    flush=True,
                )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
