"""What one Newton step would do to each region of a learned u(r), with and without the curvature penalty.

Resumes a trainer that ``paper_experiments.py`` saved (``<output>/<case>/<method>/[seed-<k>/]``),
draws one fresh sample of ``--frames`` frames at its potential, solves the IMC Newton step
``(JᵀJ + λ diag JᵀJ + s C) δ = -Jᵀρ`` for several penalty weights s (``imc_smoothing``,
``C`` the curvature matrix scaled to the trace of JᵀJ, as the trainer does), and prints the u(r)
error against the truth, split into the repulsive wall and the bins beyond it
(``potential_error_regions.py``), after the full step, after half of it and after the step cut
to the trainer's cap (``max_potential_change``, the whole step scaled). Nothing is saved
back. With ``imc_noise_shrink`` in mind it also prints the shrink factor of each step. ::

    python benchmarks/newton_step_regions.py benchmarks/results/paper morse-5.5-0.44-rho0.7 imc-grow \\
        --seed-folder seed-2 --frames 400

The step is that of the trainer's own settings (bin weights, damping) but for the penalty weight,
and unshrunk (the shrink factor is printed beside it); the sample is one draw, and near a phase boundary
two draws differ by far more than their own block noise (docs/training.md). With ``--initial``
the sample is drawn at the experiments' initial guess instead (the first step of every fit)::

    python benchmarks/newton_step_regions.py benchmarks/results/paper lj imc-shrink-light --initial --frames 400

``offset`` is the level of u(r) - u_true over the resolved range against u(r_c) (both are
shifted to zero at the cutoff; ``potential_error_regions.py``); ``max change`` the largest
change of u(r) where g > 0.05, which the trainer's cap bounds.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import paper_experiments as pe  # noqa: E402
import potential_error_regions as regions  # noqa: E402

from openmm_diffsim.training import Trainer, _damped_solve, _largest_change, _noise_shrink  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", help="the paper_experiments.py output folder")
    parser.add_argument("case")
    parser.add_argument("method")
    parser.add_argument("--seed-folder", default="", help="e.g. seed-2 for a run of several seeds")
    parser.add_argument("--frames", type=int, default=100, help="frames of the fresh sample (every 50 steps)")
    parser.add_argument("--smoothing", type=float, nargs="+", default=[0.1, 0.03, 0.01, 0.0])
    parser.add_argument(
        "--initial",
        action="store_true",
        help="start from every method's initial guess (Boltzmann inversion of the targets) with METHOD's settings "
        "instead of a saved run: the first step of a fit",
    )
    parser.add_argument("--seed", type=int, default=1, help="sampling seed with --initial")
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
    if args.initial:
        if args.seed_folder:
            parser.error("--initial starts from the initial guess, not from a saved run: drop --seed-folder")
        if args.method not in pe.METHOD_SETTINGS or not args.method.startswith("imc"):
            parser.error(f"--initial needs an imc method of paper_experiments.py, got {args.method!r}")
        trainer = initial_trainer(args.method, states, args.frames, args.seed)
    else:
        folder = output / args.case / args.method / args.seed_folder
        if not (folder / "checkpoint.pt").exists():
            parser.error(f"no checkpoint in {folder}")
        trainer = Trainer.resume(folder, n_snapshots=args.frames, progress=False)
    trainer.output_dir = None  # a diagnosis: nothing is written back
    trainer.snapshots.clear()
    trainer._measure_states(trainer._new_record())
    before = regions.error_by_region(trainer.table, truth, states)
    start_label = "the initial guess" if args.initial else "the saved potential"
    print(f"{args.case} {args.method} {args.seed_folder}: fresh sample of {args.frames} frames at {start_label}")
    print(f"{'step':34s} {'resolved':>9s} {'wall':>7s} {'beyond':>7s} {'offset':>7s}  (kT)   shrink  max change")
    print(f"{'none (' + start_label + ')':34s} {row(before)}")
    rows = trainer._residual_rows()
    jtj, jtr, _ = trainer._normal_equations(rows)
    noise = trainer._jtr_noise_covariance(rows)
    metric = trainer._potential_metric()
    start = trainer._flat_parameters().clone()
    before_grid = trainer._potential_on_target_grid()
    cap = float(trainer.options["max_potential_change"])
    damping = trainer.options["imc_damping"]
    for weight in args.smoothing:
        trainer.options["imc_smoothing"] = weight  # the trainer's own penalty at this weight
        penalty = trainer._smoothing_penalty(jtj)
        step = _damped_solve(jtj, jtr, damping, penalty)
        shrink = _noise_shrink(step, noise, jtj, damping, penalty, metric)["shrink"]
        trainer._set_flat_parameters(start + step)
        largest = _largest_change(before_grid, trainer._potential_on_target_grid())
        # The trainer's cap: the whole step scaled until u(r) moves by at most the cap where g > 0.05.
        capped = min(1.0, cap / largest) if largest > 0 else 1.0
        for fraction, name in ((1.0, "full"), (0.5, "half"), (capped, f"capped to {cap:g} kT")):
            trainer._set_flat_parameters(start + fraction * step)
            e = regions.error_by_region(trainer.table, truth, states)
            label = f"smoothing {weight:g}, {name} step"
            print(f"{label:34s} {row(e)}   {shrink:6.2f}  {fraction * largest:6.3f}")
        trainer._set_flat_parameters(start)
    return 0


def row(e) -> str:
    return f"{e['resolved']:9.3f} {e['wall']:7.3f} {e['beyond']:7.3f} {e['offset']:+7.3f}"


def initial_trainer(method: str, states, frames: int, seed: int) -> Trainer:
    """A trainer at the experiments' initial guess with ``method``'s settings and ``frames`` frames per sample."""
    settings = copy.deepcopy(pe.METHOD_SETTINGS[method])
    estimator_options = dict(pe.RDF_GRID)
    estimator_options.update(settings.pop("estimator_options", {}))
    settings["n_snapshots"] = frames
    table = pe.initial_table(states)
    return Trainer(
        table,
        states,
        "reweighting",
        max_epochs=1,
        equilibration_steps=1000,
        sampler_options=dict(pe.SAMPLER),
        estimator_options=estimator_options,
        seed=seed,
        progress=False,
        **settings,
    )


if __name__ == "__main__":
    sys.exit(main())
