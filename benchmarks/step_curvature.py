"""How far along a first IMC step the loss keeps falling: linear and second-order models against fresh samples.

Draws one sample at the experiments' initial guess (the Boltzmann inversion of the training
targets) with an IMC method's settings, takes that method's capped Newton step (without
``imc_line_search``), and prints the loss along it, at fractions t of the step, as

- the linear model ``|ρ + t Jδ|²`` the Newton step trusts,
- the second-order model ``|ρ + t Jδ + ½ t² ρ''|²`` that ``imc_line_search`` minimises
  (ρ'' from ``ReweightingEstimator.residual_curvature``, the same frames),
- the sample reweighted to ``θ + tδ`` (with its N_eff; it collapses for steps that matter),

and, for the fractions given by ``--fresh``, the loss of a fresh sample drawn there (the truth
the models predict). Near a critical point the linear model overshoots::

    python benchmarks/step_curvature.py benchmarks/results/paper lj imc-prior --seed 2 --fresh 0.5 1

The targets are read from (or simulated into) ``<output>/targets``, as ``paper_experiments.py`` does.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import paper_experiments as pe  # noqa: E402
from newton_step_regions import initial_trainer  # noqa: E402

FRACTIONS = (0.25, 0.5, 0.75, 1.0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", help="the paper_experiments.py output folder (its targets/ are used)")
    parser.add_argument("case")
    parser.add_argument("method", help="an imc method of paper_experiments.py (its settings, the search off)")
    parser.add_argument("--seed", type=int, default=1, help="sampling seed")
    parser.add_argument("--frames", type=int, default=100, help="frames of the sample (every 50 steps)")
    parser.add_argument("--fresh", type=float, nargs="*", default=[0.5, 1.0], help="fractions to sample afresh")
    args = parser.parse_args(argv)
    if args.frames < 2:
        parser.error(f"--frames needs at least 2, got {args.frames}")
    if any(not 0.0 < t <= 2.0 for t in args.fresh):
        parser.error("--fresh takes fractions in (0, 2]")
    cases = pe.all_cases(pe.SCALES["reduced"]["n"])
    if args.case not in cases:
        parser.error(f"unknown case {args.case!r}")
    if args.method not in pe.METHOD_SETTINGS or not args.method.startswith("imc"):
        parser.error(f"need an imc method of paper_experiments.py, got {args.method!r}")
    case = cases[args.case]
    pe.attach_targets(args.case, case, "reduced", Path(args.output) / "targets", None)
    trainer = initial_trainer(args.method, case["train"], args.frames, args.seed)
    trainer.options["imc_line_search"] = False  # the whole capped step; the models judge it below
    trainer._initialise()
    loss0, _ = trainer._measure_states(trainer._new_record())
    rows = trainer._residual_rows()
    start = trainer._flat_parameters().clone()
    before = {s.name: trainer.reweighting[s.name].frame_energies(trainer.table) for s in trainer.states}
    record = trainer._imc_step()  # moves the parameters; keeps the estimators' frames
    step = trainer._flat_parameters() - start
    print(
        f"{args.case} {args.method}, seed {args.seed}: loss {loss0:.3e} on {args.frames} frames at the initial guess;"
        f" the capped step moves u(r) by {record['max_change_kT']:.3f} kT"
    )
    # Per state: ρ, Jδ and ½ρ'' along the whole step, as imc_line_search reads them.
    terms = trainer._line_terms(rows, before, step)
    print(f"{'t':>5s} {'linear':>10s} {'2nd order':>10s} {'reweighted':>10s} {'N_eff':>6s}")
    for t in FRACTIONS:
        linear = sum(float((rho + t * first) @ (rho + t * first)) for rho, first, _ in terms)
        quadratic = sum(
            float((rho + t * first + t * t * half) @ (rho + t * first + t * t * half)) for rho, first, half in terms
        )
        trainer._set_flat_parameters(start + t * step)
        reweighted, n_eff = 0.0, float("inf")
        for state in trainer.states:
            estimator = trainer.reweighting[state.name]
            rho_t, fraction = estimator.residuals(trainer.table, state, state.targets)
            reweighted += float(rho_t.detach() @ rho_t.detach())
            n_eff = min(n_eff, fraction * args.frames)
        print(f"{t:5.2f} {linear:10.3e} {quadratic:10.3e} {reweighted:10.3e} {n_eff:6.1f}")
    for t in args.fresh:
        trainer._set_flat_parameters(start + t * step)
        trainer.snapshots.clear()
        fresh, _ = trainer._measure_states(trainer._new_record())
        print(f"{t:5.2f} fresh sample: {fresh:.3e} ({fresh / loss0:.2f}x the loss at the initial guess)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
