"""What one Newton step would do to each region of a learned u(r), with and without the curvature penalty.

Resumes a trainer that ``paper_experiments.py`` saved (``<output>/<case>/<method>/[seed-<k>/]``),
draws one fresh sample of ``--frames`` frames at its potential, solves the IMC Newton step
``(JᵀJ + λ diag JᵀJ + s C) δ = -Jᵀρ`` for several penalty weights s (``imc_smoothing``,
``C`` the curvature matrix scaled to the trace of JᵀJ, as the trainer does), and prints the u(r)
error against the truth, split into the repulsive wall and the bins beyond it
(``potential_error_regions.py``), after the full step and after half of it. Nothing is saved
back. With ``imc_noise_shrink`` in mind it also prints the shrink factor of each step. ::

    python benchmarks/newton_step_regions.py benchmarks/results/paper morse-5.5-0.44-rho0.7 imc-grow \\
        --seed-folder seed-2 --frames 400

The step is that of the trainer's own settings (bin weights, damping) but for the penalty weight
and without the cap on the change of u(r); the sample is one draw, and near a phase boundary
two draws differ by far more than their own block noise (docs/training.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import paper_experiments as pe  # noqa: E402
import potential_error_regions as regions  # noqa: E402

from openmm_diffsim.training import Trainer, _damped_solve, _noise_shrink  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", help="the paper_experiments.py output folder")
    parser.add_argument("case")
    parser.add_argument("method")
    parser.add_argument("--seed-folder", default="", help="e.g. seed-2 for a run of several seeds")
    parser.add_argument("--frames", type=int, default=100, help="frames of the fresh sample (every 50 steps)")
    parser.add_argument("--smoothing", type=float, nargs="+", default=[0.1, 0.03, 0.01, 0.0])
    args = parser.parse_args(argv)
    if args.frames < 2:
        parser.error(f"--frames needs at least 2, got {args.frames}")
    if any(not w >= 0 for w in args.smoothing):
        parser.error("--smoothing takes non-negative weights")
    output = Path(args.output)
    cases = pe.all_cases(pe.SCALES["reduced"]["n"])
    if args.case not in cases:
        parser.error(f"unknown case {args.case!r}")
    case = cases[args.case]
    pe.attach_targets(args.case, case, "reduced", output / "targets", None)
    truth, states = case["truth"](), case["train"]
    folder = output / args.case / args.method / args.seed_folder
    if not (folder / "checkpoint.pt").exists():
        parser.error(f"no checkpoint in {folder}")
    trainer = Trainer.resume(folder, n_snapshots=args.frames, progress=False)
    trainer.output_dir = None  # a diagnosis: nothing is written back
    trainer.snapshots.clear()
    trainer._measure_states(trainer._new_record())
    before = regions.error_by_region(trainer.table, truth, states)
    print(f"{args.case} {args.method} {args.seed_folder}: fresh sample of {args.frames} frames")
    print(f"{'step':28s} {'resolved':>9s} {'wall':>7s} {'beyond':>7s}  (rms, kT)   shrink")
    print(f"{'none (the saved potential)':28s} {before['resolved']:9.3f} {before['wall']:7.3f} {before['beyond']:7.3f}")
    rows = trainer._residual_rows()
    jtj, jtr, _ = trainer._normal_equations(rows)
    noise = trainer._jtr_noise_covariance(rows)
    metric = trainer._potential_metric()
    curvature = trainer._curvature_matrix()
    start = trainer._flat_parameters().clone()
    damping = trainer.options["imc_damping"]
    for weight in args.smoothing:
        penalty = None if weight == 0 else weight * float(torch.trace(jtj)) / float(torch.trace(curvature)) * curvature
        step = _damped_solve(jtj, jtr, damping, penalty)
        shrink = _noise_shrink(step, noise, jtj, damping, penalty, metric)["shrink"]
        for fraction in (1.0, 0.5):
            trainer._set_flat_parameters(start + fraction * step)
            e = regions.error_by_region(trainer.table, truth, states)
            label = f"smoothing {weight:g}, {'full' if fraction == 1 else 'half'} step"
            print(f"{label:28s} {e['resolved']:9.3f} {e['wall']:7.3f} {e['beyond']:7.3f}   {shrink:.2f}")
        trainer._set_flat_parameters(start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
