"""Time per epoch: two state points on two processes (torchrun, gloo) against one process.

Two LJ-fluid state points (σ = 0.34 nm, ε = 0.996 kJ/mol, m = 39.948 amu,
reduced density 0.8, cutoff 1.0 nm, energy shifted; T = 120 K and 150 K),
N particles each, trained from σ = 0.32 nm against a dilute-gas target with
the reweighting estimator. ``n_eff_threshold = 1`` makes every epoch sample
afresh (``n_snapshots`` × ``interval`` MD steps per state, OpenMM CPU platform,
tabulated force) and re-precompute the reweighting, which is the expensive
epoch; a reweighting-only epoch costs milliseconds either way.

The same training runs twice, each in fresh processes on the same cores:

* one process, OpenMM and torch on all ``--cores`` threads;
* ``torchrun --standalone --nproc-per-node 2``: one state per process, each on
  ``cores / 2`` threads (what :func:`openmm_diffsim.distributed.init` sets).

It prints the median wall time per epoch (first epoch, with context creation
and equilibration, left out), each rank's busy time, and the ratio. The two
runs compute the same parameters only if the OpenMM thread counts match
(force sums); here they differ on purpose, as a user would run them.

    python benchmarks/bench_distributed.py [--particles 1000] [--epochs 5] [--snapshots 20] [--interval 50]
                                           [--cores 2] [--also-half]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SIGMA, EPSILON, MASS, CUTOFF = 0.34, 0.996, 39.948, 1.0
TEMPERATURES = (120.0, 150.0)


def worker(args) -> None:
    import numpy as np
    import torch  # noqa: F401 - before openmm

    import openmm_diffsim as od
    from openmm_diffsim import distributed
    from openmm_diffsim.systems import StatePoint
    from openmm_diffsim.targets import Target
    from openmm_diffsim.training import Trainer

    distributed.init()
    rho = 0.8 / SIGMA**3
    r = np.linspace(0.005, 0.995, 100)
    truth = od.PairTable(["Ar"], od.LennardJones(SIGMA, EPSILON), cutoff=CUTOFF, cutoff_mode="shift")
    states = []
    for temperature in TEMPERATURES:
        u, _ = truth.evaluate(np.maximum(r, 0.2))
        target = Target(r, np.exp(-u / (0.0083144626 * temperature)), pair=("Ar", "Ar"))
        states.append(
            StatePoint(
                name=f"T{temperature:.0f}",
                species=["Ar"],
                counts=[args.particles],
                masses=[MASS],
                temperature=temperature,
                density=rho,
                targets=[target],
            )
        )
    table = od.PairTable(["Ar"], od.LennardJones(0.32, EPSILON), cutoff=CUTOFF, cutoff_mode="shift")
    trainer = Trainer(
        table,
        states,
        "reweighting",
        learning_rate=0.002,
        learning_rate_scales={"sigma": 0.2},
        max_epochs=args.epochs,
        n_snapshots=args.snapshots,
        snapshot_interval=args.interval,
        equilibration_steps=200,
        sampler_options={"platform": "CPU"},
        estimator_options={"r_range": (0.0, 1.0), "n_bins": 100, "smearing": 0.01, "n_eff_threshold": 1.0},
        progress=False,
        plot_every=0,
        seed=1,
    )
    history = trainer.fit()
    if distributed.is_main_process():
        result = {
            "world_size": distributed.world_size(),
            "epoch_seconds": [h["epoch_seconds"] for h in history],
            "rank_seconds": [h.get("rank_seconds") for h in history],
            "md_steps": trainer.md_steps,
            "sigma": float(trainer.table.pair_potentials[0].sigma),
            "torch_threads": __import__("torch").get_num_threads(),
        }
        Path(args.out).write_text(json.dumps(result))
    distributed.shutdown()


def run(command, env, out: Path) -> dict:
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--particles", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--snapshots", type=int, default=20)
    parser.add_argument("--interval", type=int, default=50)
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 2, help="cores shared by the processes")
    parser.add_argument(
        "--also-half", action="store_true", help="also time one process on cores/2 threads (what each rank gets)"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the first epoch is left out)")
    common = [
        __file__,
        "--worker",
        "--particles",
        str(args.particles),
        "--epochs",
        str(args.epochs),
        "--snapshots",
        str(args.snapshots),
        "--interval",
        str(args.interval),
    ]
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        one = Path(folder) / "one.json"
        env = dict(base, OPENMM_CPU_THREADS=str(args.cores), OMP_NUM_THREADS=str(args.cores))
        results["1 process"] = run([sys.executable] + common + ["--out", str(one)], env, one)
        per = max(1, args.cores // 2)
        if args.also_half:
            half = Path(folder) / "half.json"
            env = dict(base, OPENMM_CPU_THREADS=str(per), OMP_NUM_THREADS=str(per))
            results[f"1 process, {per} thr"] = run([sys.executable] + common + ["--out", str(half)], env, half)
        two = Path(folder) / "two.json"
        env = dict(base, OPENMM_CPU_THREADS=str(per), OMP_NUM_THREADS=str(per))
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        results["2 processes"] = run(torchrun + common + ["--out", str(two)], env, two)

    print(
        f"2 LJ states x {args.particles} particles, {args.snapshots} x {args.interval} MD steps per state and epoch, "
        f"{args.epochs} epochs (first left out), {args.cores} cores"
    )
    print(f"{'run':<18} {'s/epoch (median)':>17} {'busy s per rank (median)':>26} {'MD steps':>9}")
    medians = {}
    for name, result in results.items():
        times = result["epoch_seconds"][1:]
        medians[name] = statistics.median(times)
        busy = ""
        if result["rank_seconds"][0] is not None:
            per_rank = list(zip(*result["rank_seconds"][1:], strict=True))
            busy = " / ".join(f"{statistics.median(t):.2f}" for t in per_rank)
        print(f"{name:<18} {medians[name]:>17.2f} {busy:>26} {result['md_steps']:>9}")
    ratio = medians["2 processes"] / medians["1 process"]
    print(f"time per epoch, 2 processes / 1 process: {ratio:.2f} (speed-up {1 / ratio:.2f}x)")


if __name__ == "__main__":
    main()
