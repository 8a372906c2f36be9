"""How much of the equilibrium RDF loss a rollout gradient's step can remove.

The rollout family differentiates the RDF of short torch rollouts seeded from
snapshots; a fit needs the response of the *equilibrium* RDF. This script
measures, at one potential, what each gradient is worth as a step direction:

1. Sample the potential with OpenMM (the demo's state point) and build the
   linearised equilibrium loss from all snapshots by reweighting:
   ρ(θ + δ) ≈ ρ + J δ, J = −β cov(g, ∂U/∂θ) (the IMC Jacobian).
2. For each direction d: the fraction of the loss a step along d of the best
   length removes, (ρ·Jd)² / (|Jd|² |ρ|²). 1 is a perfect step, 0 a useless one.
3. Directions: the IMC Newton step (upper bound); the natural-gradient step
   (Fisher metric of the snapshots) of the reweighting gradient from each half
   of the snapshots (what reweighting delivers from half the sample); and the
   natural-gradient step of rollout gradients (adjoint), two independent
   batches of replicas per setting, each batch alone and both together.

Rollout settings are ``integrator:friction:steps:replicas:residual``:
``nve:0:100:4:own`` is the rollout estimator as the trainer runs it (its loss
on the rollout's own RDF); ``residual`` ``snap`` instead contracts the rollout
Jacobian with the residual of all snapshots (less noise in the residual, the
same Jacobian); ``lang:20:300:8:snap`` rolls out with Langevin friction
20/ps, whose common-noise trajectories do not diverge (a finite-difference
response grows smoothly with rollout length instead of turning into noise).

Usage::

    python benchmarks/rollout_directions.py                       # at the demo's Boltzmann-inversion start
    python benchmarks/rollout_directions.py --checkpoint RUN_DIR  # at a training run's last potential
    python benchmarks/rollout_directions.py --settings nve:0:100:4:own lang:20:300:8:snap
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from openmm_diffsim import demo
from openmm_diffsim.dynamics import PairForces, make_integrator, rollout_gradient
from openmm_diffsim.gradients import (
    ReweightingEstimator,
    _jacobian,
    _particle_species,
    _prepare_targets,
    fisher_metric,
)
from openmm_diffsim.observables import compute_partial_rdfs
from openmm_diffsim.sampling import Sampler, Snapshots
from openmm_diffsim.targets import read_target
from openmm_diffsim.training import Trainer

GRID = dict(r_range=(0.0, 1.0), n_bins=100, smearing=0.01)


def flat(grads) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads]).double()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default=None, help="a Trainer output folder (default: the demo's start)")
    parser.add_argument("--snapshots", type=int, default=400, help="OpenMM snapshots, every 50 steps")
    parser.add_argument("--damping", type=float, default=1e-3, help="λ of the natural step (M + λ diag M)")
    parser.add_argument(
        "--settings",
        nargs="+",
        default=["nve:0:100:4:own", "lang:20:100:8:snap", "lang:20:300:8:snap"],
        help="rollout settings integrator:friction:steps:replicas:residual (own | snap)",
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    target = read_target(demo.demo_target_path(), pair=("Ar", "Ar"))
    if args.checkpoint:
        trainer = Trainer.resume(args.checkpoint)
        table, state = trainer.table, trainer.states[0]
    else:
        state = demo.demo_state([target], pressure=None, energy=None)
        trainer = Trainer(
            demo.demo_potential(), [state], "reweighting", optimizer="imc", boltzmann_initial_guess=True, progress=False
        )
        trainer._initialise()
        table = trainer.table
    print("potential:", {k: v for k, v in demo.potential_error(table, target, state.kT).items() if "offset" not in k})
    params = [p for p in table.parameters() if p.requires_grad]

    sampler = Sampler(state, table, seed=11, timestep=demo.TIMESTEP)
    sampler.minimize()
    sampler.equilibrate(2000)
    start = time.perf_counter()
    snapshots = sampler.run(args.snapshots, 50)
    print(f"sampled {args.snapshots} snapshots in {time.perf_counter() - start:.0f} s")

    def jacobian_and_residual(snaps):
        estimator = ReweightingEstimator(**GRID, bin_weighting="counting")
        estimator.reset(table, snaps, state)
        with torch.enable_grad():
            rho, _ = estimator.residuals(table, state, [target])
            jacobian = _jacobian(rho, params)
        return jacobian, rho.detach()

    J, rho = jacobian_and_residual(snapshots)
    metric = fisher_metric(table, state, snapshots)

    def natural(gradient):
        return -torch.linalg.solve(metric + args.damping * torch.diag(torch.diagonal(metric)), gradient)

    def removed(direction) -> float:
        jd = J @ direction
        return float((rho @ jd) ** 2 / ((jd @ jd) * (rho @ rho)))

    jtj = J.T @ J
    newton = -torch.linalg.solve(jtj + 1e-3 * torch.diag(torch.diagonal(jtj)), J.T @ rho)
    print(f"equilibrium loss {float(rho @ rho):.3e}; fraction removed by the best step along:")
    print(f"  IMC Newton step (all snapshots)                       {removed(newton):.3f}")
    print(f"  natural step, reweighting gradient of all snapshots   {removed(natural(2 * J.T @ rho)):.3f}")
    halves = []
    for part in (slice(0, None, 2), slice(1, None, 2)):
        half = Snapshots(
            snapshots.positions[part],
            snapshots.velocities[part],
            snapshots.boxes[part],
            snapshots.potential_energies[part],
            snapshots.steps[part],
            snapshots.state,
        )
        J_half, rho_half = jacobian_and_residual(half)
        halves.append(removed(natural(2 * J_half.T @ rho_half)))
    print(f"  natural step, reweighting gradient of each half       {halves[0]:.3f}, {halves[1]:.3f}")

    prepared = _prepare_targets(table, [target], ReweightingEstimator(**GRID).r, "error", "counting")[0]
    bin_weights = prepared.weights / prepared.weights.sum()
    g_snapshots = rho / torch.sqrt(bin_weights) + prepared.g
    dloss_dg = 2 * bin_weights * (g_snapshots - prepared.g)
    species = _particle_species(table, state)
    box = np.asarray(snapshots.boxes)[0]
    box_t, species_t = torch.as_tensor(box), torch.as_tensor(species)

    def rdf(frame):
        return compute_partial_rdfs(frame, box_t, species_t, 1, **GRID)[1]

    rng = np.random.default_rng(5)
    positions, velocities = np.asarray(snapshots.positions), np.asarray(snapshots.velocities)
    print("  natural step, rollout gradient (adjoint), two batches of replicas: batch 1, batch 2, both")
    for setting in args.settings:
        integrator, friction, n_steps, replicas, residual = setting.split(":")
        friction, n_steps, replicas = float(friction), int(n_steps), int(replicas)
        if residual == "snap":

            def loss(mean):
                return (dloss_dg * mean[0]).sum()

        elif residual == "own":

            def loss(mean):
                return (bin_weights * (mean[0] - prepared.g) ** 2).sum()

        else:
            parser.error(f"residual must be 'own' or 'snap', got {residual!r} in {setting!r}")
        start = time.perf_counter()
        batches = []
        for batch in range(2):
            chosen = rng.choice(len(positions), replicas, replace=False)
            steps = (
                make_integrator("langevin", demo.TIMESTEP, state.temperature, seed=100 + batch, friction=friction)
                if integrator == "lang"
                else make_integrator("nve", demo.TIMESTEP)
            )
            result = rollout_gradient(
                PairForces(table, species, box, 0.1),
                state.particle_masses(),
                steps,
                torch.as_tensor(positions[chosen]),
                torch.as_tensor(velocities[chosen]),
                n_steps,
                10,
                rdf,
                loss,
                params,
                method="adjoint",
            )
            batches.append(flat(result.gradients))
        both = 0.5 * (batches[0] + batches[1])
        seconds = time.perf_counter() - start
        print(
            f"  {setting:<22} {removed(natural(batches[0])):.3f}, {removed(natural(batches[1])):.3f}, "
            f"{removed(natural(both)):.3f}   ({seconds:.0f} s)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
