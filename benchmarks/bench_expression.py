"""The expression backend against the tabulated one and OpenMM's native NonbondedForce.

The demo's model (a soft-sphere prior plus a 27-knot cubic-spline correction,
set close to LJ: sigma 0.34 nm, epsilon 0.996 kJ/mol) at the demo's state
(argon, T = 120 K, rho* = 0.8, cutoff 1 nm, 10 fs Langevin steps), all in this
process on the platform the Sampler picks (CPU here). Prints, per N:

* MD steps/s of ``native`` (true LJ, NonbondedForce: the reference),
  ``tabulated`` and ``expression`` (the model), and their ratios to native;
* the energy and force of each model backend against ``torch`` (TorchForce,
  the model itself in float64) at one configuration;
* the hand-over cost of :meth:`Sampler.update_potential`.

    python benchmarks/bench_expression.py [--sizes 500 2000] [--steps 1000]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch  # before OpenMM: its plugins need libtorch
from bench_sampling import steps_per_second  # this folder is on sys.path when run as a script

from openmm_diffsim import demo
from openmm_diffsim.sampling import Sampler


def demo_model():
    """The demo's model with its spline set so that the sum is close to LJ (a converged fit)."""
    table = demo.demo_potential()
    prior, spline = table.pair_potentials[0].terms
    with torch.no_grad():
        knots = spline.knots.numpy()
        lj = 4 * demo.TRUE_EPSILON * ((demo.TRUE_SIGMA / knots) ** 12 - (demo.TRUE_SIGMA / knots) ** 6)
        spline.values.copy_(torch.as_tensor(lj - float(prior.epsilon) * (float(prior.sigma) / knots) ** 12))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 2000])
    parser.add_argument("--steps", type=int, default=1000)
    args = parser.parse_args()
    print(f"torch threads: {torch.get_num_threads()}")
    for n in args.sizes:
        state = demo.demo_state(n_particles=n)
        table = demo_model()
        native = Sampler(state, demo.true_table(), backend="native", timestep=demo.TIMESTEP, seed=0)
        native.minimize(200)
        native.equilibrate(500)
        positions = native.positions
        speed = {"native": steps_per_second(native, args.steps)}
        samplers = {}
        for backend in ("tabulated", "expression"):
            samplers[backend] = Sampler(
                state, table, backend=backend, positions=positions, timestep=demo.TIMESTEP, seed=0
            )
            speed[backend] = steps_per_second(samplers[backend], args.steps)
        print(f"\nN = {n} ({samplers['expression'].platform_name})")
        for backend, value in speed.items():
            print(f"  {backend:11s} {value:8.1f} steps/s   {value / speed['native']:.3f} x native")
        print(f"  expression / tabulated: {speed['expression'] / speed['tabulated']:.2f}")
        reference = Sampler(state, table, backend="torch", positions=positions, seed=0)
        e_ref, f_ref = reference.energy_and_forces()
        rms = float(np.sqrt(np.mean(np.sum(f_ref**2, axis=1))))
        for backend in ("tabulated", "expression"):
            check = Sampler(state, table, backend=backend, positions=positions, seed=0)
            energy, forces = check.energy_and_forces()
            print(
                f"  {backend:11s} vs torch: |dE|/|E| {abs(energy - e_ref) / abs(e_ref):.1e}, "
                f"max|dF|/rms|F| {np.abs(forces - f_ref).max() / rms:.1e}"
            )
            times = []
            for _ in range(3):
                check.update_potential(table)
                times.append(check.last_handover_seconds)
            print(f"  {backend:11s} hand-over {1e3 * min(times):.1f} ms ({check.last_handover_method})")


if __name__ == "__main__":
    main()
