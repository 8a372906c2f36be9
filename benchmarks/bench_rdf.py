"""Speed of the differentiable RDF against ``mdtraj.compute_rdf`` (issue: differentiable RDF).

LJ fluid, N = 4000, reduced density 0.8, sigma = 0.34 nm, reduced temperature
1.2, r <= 1.0 nm, 200 bins, 100 frames. Frames come from a short OpenMM run
(native NonbondedForce, CPU platform) melted from an fcc lattice. In one
process the script times

* ``mdtraj.compute_rdf`` over all pairs (plain histogram; its estimator),
* :func:`openmm_diffsim.observables.compute_rdf` as a plain histogram,
* the Gaussian-smeared RDF forward (no grad), and
* the smeared RDF forward + backward with respect to the positions,

and prints each time and its ratio to mdtraj.

    python benchmarks/bench_rdf.py [--frames 100] [--particles 4000] [--smearing 0.01]
"""

# ruff: noqa: I001  (torch must load before OpenMM's plugins)
from __future__ import annotations

import argparse
import time

import torch
import mdtraj
import numpy as np
import openmm as mm

from openmm_diffsim.observables import compute_rdf
from openmm_diffsim.systems import lattice_positions

SIGMA, EPSILON, MASS = 0.34, 0.996, 39.948
KB = 8.31446261815324e-3


def lj_fluid_frames(n: int, frames: int, interval: int, equilibration: int, seed: int = 1):
    """Frames (F, N, 3) of an LJ fluid in nm and the cubic box edge in nm."""
    box = (n / 0.8) ** (1 / 3) * SIGMA
    system = mm.System()
    system.setDefaultPeriodicBoxVectors(mm.Vec3(box, 0, 0), mm.Vec3(0, box, 0), mm.Vec3(0, 0, box))
    force = mm.NonbondedForce()
    force.setNonbondedMethod(mm.NonbondedForce.CutoffPeriodic)
    force.setCutoffDistance(2.5 * SIGMA)
    for _ in range(n):
        system.addParticle(MASS)
        force.addParticle(0.0, SIGMA, EPSILON)
    system.addForce(force)
    temperature = 1.2 * EPSILON / KB
    integrator = mm.LangevinMiddleIntegrator(temperature, 5.0, 0.005)
    integrator.setRandomNumberSeed(seed)
    context = mm.Context(system, integrator, mm.Platform.getPlatformByName("CPU"))
    context.setPositions(lattice_positions(n, [box] * 3, rng=np.random.default_rng(seed)))
    context.setVelocitiesToTemperature(temperature, seed)
    integrator.step(equilibration)
    xyz = []
    for _ in range(frames):
        integrator.step(interval)
        xyz.append(context.getState(getPositions=True).getPositions(asNumpy=True)._value)
    return np.array(xyz), box


def best_of(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--particles", type=int, default=4000)
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--bins", type=int, default=200)
    parser.add_argument("--r-max", type=float, default=1.0)
    parser.add_argument("--smearing", type=float, default=0.01, help="Gaussian sigma in nm")
    parser.add_argument("--interval", type=int, default=20, help="MD steps between frames")
    parser.add_argument("--equilibration", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    start = time.perf_counter()
    xyz, box = lj_fluid_frames(args.particles, args.frames, args.interval, args.equilibration)
    print(
        f"generated {args.frames} frames of N = {args.particles} (box {box:.3f} nm) "
        f"in {time.perf_counter() - start:.1f} s"
    )
    print(
        f"torch threads: {torch.get_num_threads()}, r <= {args.r_max} nm, {args.bins} bins, sigma = {args.smearing} nm"
    )

    topology = mdtraj.Topology()
    chain = topology.add_chain()
    for _ in range(args.particles):
        topology.add_atom("Ar", mdtraj.element.argon, topology.add_residue("AR", chain))
    traj = mdtraj.Trajectory(
        xyz.astype(np.float32),
        topology,
        unitcell_lengths=np.full((args.frames, 3), box),
        unitcell_angles=np.full((args.frames, 3), 90.0),
    )
    pairs = topology.select_pairs("all", "all")
    grid = dict(r_range=(0.0, args.r_max), n_bins=args.bins)
    positions = torch.from_numpy(xyz)
    lengths = torch.full((3,), box, dtype=torch.float64)

    def run_mdtraj():
        return mdtraj.compute_rdf(traj, pairs, **grid)

    def run_histogram():
        return compute_rdf(positions, lengths, smearing=0.0, **grid)

    def run_forward():
        with torch.no_grad():
            return compute_rdf(positions, lengths, smearing=args.smearing, **grid)

    def run_backward():
        leaf = positions.clone().requires_grad_(True)
        _, g = compute_rdf(leaf, lengths, smearing=args.smearing, **grid)
        (g * g).sum().backward()
        return leaf.grad

    timings = {}
    for name, function in [
        ("mdtraj", run_mdtraj),
        ("histogram", run_histogram),
        ("forward", run_forward),
        ("backward", run_backward),
    ]:
        timings[name] = best_of(function, args.repeats)
        print(f"  timed {name}: {timings[name]:.3f} s", flush=True)
    t_mdtraj, t_hist, t_forward, t_backward = (timings[k] for k in ("mdtraj", "histogram", "forward", "backward"))

    g_mdtraj = run_mdtraj()[1]
    g_ours = run_histogram()[1].numpy()
    print(f"max |g_ours - g_mdtraj| (histogram): {np.abs(g_ours - g_mdtraj).max():.2e}")
    print(f"{'estimator':42s} {'time (s)':>9s} {'vs mdtraj':>10s}")
    for name, seconds in [
        ("mdtraj.compute_rdf (histogram, all pairs)", t_mdtraj),
        ("compute_rdf, histogram", t_hist),
        ("compute_rdf, smeared, forward", t_forward),
        ("compute_rdf, smeared, forward + backward", t_backward),
    ]:
        print(f"{name:42s} {seconds:9.3f} {t_mdtraj / seconds:9.2f}x")
    print("(ratio > 1: faster than mdtraj)")


if __name__ == "__main__":
    main()
