"""Re-simulate the final potentials of ``paper_experiments.py`` several more times: the RDF error without
most of one evaluation's noise.

Near a coexistence line one evaluation (200 frames at the reduced scale)
scatters by as much as the differences between methods: the truth itself
missed its Morse (5.5, 0.44) ρ* = 0.5 target by 0.011–0.038 in six runs.
This script re-simulates every final potential (``checkpoint.pt`` in
``<output>/<case>/<method>/[seed-<k>/]``) and the truth ``--repeats`` more
times at the training states with the case's evaluation protocol and new
seeds, and reports for each potential

``single``
    the mean over the repeats of one run's RDF RMSE (the statistic of the
    time-to-accuracy goal, averaged), with its standard error;
``pooled``
    the RMSE of g(r) averaged over the repeats (``repeats`` × the frames of
    one evaluation), closer to the potential's expected RDF error;

and for each method the mean and standard error of both over its seeds.
Several output folders (``--output A B``, e.g. two invocations with
``--first-seed``) pool their seeds; their targets must be the same. ::

    python benchmarks/reevaluate_final.py morse-5.5-0.44-rho0.5 ibi imc-line --output runA runB --repeats 4

Writes ``<first output>/<case>_reevaluation.json``. It changes nothing in
``results.json``: the goal stays decided on the original evaluations.

``--curves`` re-simulates instead every potential saved along each run's
time-to-accuracy curve (``curve_potentials.pt``, written by
``paper_experiments.py`` since this release) and the initial guess,
``--repeats`` times each, and decides the time-to-accuracy goal
(``paper_experiments.case_goal``) on the re-simulated curves twice: with
each point's error the mean of the one-run RMSEs (``single``, the goal's
statistic) and with the pooled RMSE (``pooled``). The MD steps and wall
times are the training's own. It writes ``<first output>/<case>_curve_reevaluation.json``
and the re-simulated curves' plots under ``<first output>/reevaluated-<J>-<statistic>/``. ::

    python benchmarks/reevaluate_final.py morse-5.5-0.44-rho0.5 ibi imc-line --output run --repeats 6 --curves
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import paper_experiments as pe  # noqa: E402  (the experiments' cases, targets, protocol and error measure)

#: Seeds of the re-evaluations: apart from every seed paper_experiments.py uses (7000-9199 + stride multiples).
REEVALUATION_SEED = 5000
#: --curves: the initial guess's seed, and the base of curve point k of seed index i:
#: CURVE_SEED + CURVE_POINT_STRIDE (k + 1) + SEED_STRIDE i, plus the state's index; up to 99 points and
#: 10 states stay below the evaluations' 7000 (the final-only mode's potentials use 6000-6009 + ...).
INITIAL_SEED = 5500
CURVE_SEED = 6000
CURVE_POINT_STRIDE = 10
#: The two statistics of a re-simulated curve point the goal is decided on.
STATISTICS = ("single", "pooled")
STATISTIC_LABELS = {"single": "mean of one-run errors", "pooled": "error of the pooled g(r)"}


def reevaluate(table, states, repeats: int, seed: int, scale: str, platform: Optional[str]) -> Dict[str, Any]:
    """RDF errors of ``table`` over ``repeats`` (at least 2) fresh evaluation runs at ``states``
    (``paper_experiments.evaluate_states``, seeds ``seed + state index + j * REPEAT_STRIDE``).

    Returns ``single`` (mean over runs of the state-averaged RMSE), ``single_se``
    (its standard error), ``single_runs`` (the runs' values) and ``pooled``
    (RMSE of g averaged over the runs, averaged over states).
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 2:
        raise ValueError(f"repeats must be an integer of at least 2, got {repeats!r}")
    errors = pe.evaluate_states(table, states, scale, seed, platform, repeats)
    singles = np.mean([errors[state.name]["rmse_runs"] for state in states], axis=0)
    return {
        "single": float(singles.mean()),
        "single_se": float(singles.std(ddof=1) / np.sqrt(repeats)),
        "single_runs": [float(v) for v in singles],
        "pooled": float(np.mean([errors[state.name]["pooled_rmse"] for state in states])),
    }


def curve_entry(rows: List[Dict[str, Any]], u_error: Dict[str, float], statistic: str) -> Dict[str, Any]:
    """One run's re-simulated curve as a ``paper_experiments`` method entry, its RDF error the
    ``statistic`` (``single`` or ``pooled``) of each point; ``rows[0]`` is the initial guess and
    ``rows[-1]`` the final potential (``u_error`` its :func:`paper_experiments.potential_error`)."""
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
    curve = [
        dict(
            {key: row[key] for key in ("epoch", *pe.CURVE_COST_KEYS)},
            train_rmse=row[statistic],
            u_rms_kT=row["u_rms_kT"],
        )
        for row in rows
    ]
    final = rows[-1]
    return {
        "epochs": final["epoch"],
        "train_rmse": final[statistic],
        "train_mean_abs": None,
        "test_rmse": None,
        "test_mean_abs": None,
        "per_state": {},
        "u_error": dict(u_error),
        "md_steps": int(final["md_steps"]),
        "rollout_replica_steps": int(final["rollout_replica_steps"]),
        "wall_time": float(final["wall_time"]),
        "cpu_time": float(final["cpu_time"]),
        "curve": curve,
    }


def curve_goals(curves: Dict[str, List[Dict[str, Any]]]) -> Dict[str, Any]:
    """The goal on the re-simulated curves, per statistic: ``curves`` maps each method to its runs,
    each run ``{"rows": [...], "u_error": {...}}`` (rows as :func:`curve_entry` reads them).
    Several runs of a method are averaged point by point (``paper_experiments.aggregate_seeds``)."""
    out: Dict[str, Any] = {}
    for statistic in STATISTICS:
        methods = {}
        for method, runs in curves.items():
            entries = [curve_entry(run["rows"], run["u_error"], statistic) for run in runs]
            methods[method] = entries[0] if len(entries) == 1 else pe.aggregate_seeds(entries)
        out[statistic] = {"methods": methods, "goal": pe.case_goal(methods)}
    return out


def summary(rows: List[Dict[str, float]], key: str) -> Dict[str, Optional[float]]:
    values = np.array([row[key] for row in rows])
    se = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else None
    return {"mean": float(values.mean()), "se": se, "min": float(values.min()), "max": float(values.max())}


#: --curves: most curve points and states whose seeds stay below the evaluations' own (see CURVE_SEED).
MAX_CURVE_POINTS, MAX_STATES = 99, 10


def load_curves(runs: Dict[str, List[tuple]], n_states: int) -> Dict[str, List[tuple]]:
    """Every run's saved curve potentials (``paper_experiments.load_curve_potentials``), read and checked
    before anything is simulated: (seed index, path, points) per method."""
    if n_states > MAX_STATES:
        raise ValueError(f"{n_states} training states would reach the evaluations' own seeds (at most {MAX_STATES})")
    loaded: Dict[str, List[tuple]] = {}
    for method, paths in runs.items():
        loaded[method] = []
        for index, path in paths:
            points = pe.load_curve_potentials(path)
            if len(points) > MAX_CURVE_POINTS:
                raise ValueError(
                    f"{path}: {len(points)} curve points would reach the evaluations' own seeds "
                    f"(at most {MAX_CURVE_POINTS})"
                )
            loaded[method].append((index, path, points))
    return loaded


def reevaluate_curves(args, outputs, curves_in, guess: str, truth, states, results: Dict[str, Any]) -> int:
    """The ``--curves`` mode of :func:`main`: every saved curve potential (``curves_in``, from
    :func:`load_curves`) and the initial guess re-simulated ``args.repeats`` times, the goal decided on
    the re-simulated curves."""
    initial = pe.initial_table(states, guess)
    print(f"initial guess ({guess}), {args.repeats} runs", flush=True)
    start = reevaluate(initial, states, args.repeats, INITIAL_SEED, args.scale, args.platform)
    start.update(
        epoch=0,
        **{key: 0 for key in pe.CURVE_COST_KEYS},
        u_rms_kT=pe.potential_error(initial, truth, states)["rms_kT"],
    )
    results.update(initial_guess=guess, initial=start)
    curves: Dict[str, List[Dict[str, Any]]] = {}
    for method, loaded in curves_in.items():
        curves[method] = []
        for index, path, points in loaded:
            rows = [start]
            for k, point in enumerate(points):
                seed = CURVE_SEED + CURVE_POINT_STRIDE * (k + 1) + pe.SEED_STRIDE * index
                row = reevaluate(point["table"], states, args.repeats, seed, args.scale, args.platform)
                row.update(
                    {key: point[key] for key in ("epoch", *pe.CURVE_COST_KEYS)},
                    u_rms_kT=pe.potential_error(point["table"], truth, states)["rms_kT"],
                )
                rows.append(row)
                print(
                    f"{method} seed-{index + 1} epoch {point['epoch']} ({point['md_steps']} MD steps): "
                    f"single {row['single']:.4f} ± {row['single_se']:.4f}, pooled {row['pooled']:.4f}, "
                    f"u {row['u_rms_kT']:.4f} kT",
                    flush=True,
                )
            u_error = pe.potential_error(points[-1]["table"], truth, states)
            curves[method].append({"run": str(path), "seed_index": index, "rows": rows, "u_error": u_error})
    results["curves"] = curves
    goals = curve_goals(curves)
    results["goal"] = {statistic: goals[statistic]["goal"] for statistic in STATISTICS}
    for statistic in STATISTICS:
        goal = goals[statistic]["goal"]
        print(
            f"\ngoal on the re-simulated curves ({statistic}):",
            json.dumps(goal and {key: goal[key] for key in goal if key != "per_seed"}, indent=1),
        )
        folder = outputs[0] / f"reevaluated-{args.repeats}-{statistic}"
        folder.mkdir(parents=True, exist_ok=True)
        note = f"\neach point {args.repeats} re-simulations ({STATISTIC_LABELS[statistic]})"
        pe.plot_case(args.case, {"methods": goals[statistic]["methods"]}, folder, note)
    out = outputs[0] / f"{args.case}_curve_reevaluation.json"
    out.write_text(json.dumps(results, indent=1))
    print(f"written {out}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("case")
    parser.add_argument("methods", nargs="+")
    parser.add_argument("--output", nargs="+", required=True, help="paper_experiments.py output folder(s)")
    parser.add_argument("--repeats", type=int, default=4, help="evaluation runs per potential (default 4)")
    parser.add_argument("--truth-repeats", type=int, default=None, help="runs of the truth (default 2 × repeats)")
    parser.add_argument("--scale", default="reduced", choices=sorted(pe.SCALES))
    parser.add_argument("--platform", default=None)
    parser.add_argument(
        "--curves",
        action="store_true",
        help="re-simulate every potential saved along the curves (curve_potentials.pt) and decide the goal on them",
    )
    args = parser.parse_args(argv)
    if args.repeats < 2:
        parser.error(f"--repeats takes an integer of at least 2, got {args.repeats}")
    truth_repeats = 2 * args.repeats if args.truth_repeats is None else args.truth_repeats
    if truth_repeats < 2:
        parser.error(f"--truth-repeats takes an integer of at least 2, got {truth_repeats}")
    outputs = [Path(p) for p in args.output]
    cases = pe.all_cases(pe.SCALES[args.scale]["n"])
    if args.case not in cases:
        parser.error(f"unknown case {args.case!r}")
    case = cases[args.case]
    # The targets the runs were trained on: never simulate new ones here.
    try:
        pe.attach_targets(args.case, case, args.scale, outputs[0] / "targets", None, simulate_missing=False)
    except FileNotFoundError as exc:
        parser.error(str(exc))
    truth, states = case["truth"](), case["train"]
    reference = [np.asarray(t.g) for s in states for t in s.targets]
    for extra in outputs[1:]:
        other = pe.all_cases(pe.SCALES[args.scale]["n"])[args.case]
        try:
            pe.attach_targets(args.case, other, args.scale, extra / "targets", None, simulate_missing=False)
        except FileNotFoundError as exc:
            parser.error(str(exc))
        if any(
            not np.array_equal(a, np.asarray(t.g))
            for a, t in zip(reference, [t for s in other["train"] for t in s.targets], strict=True)
        ):
            parser.error(f"{extra} holds other targets than {outputs[0]}: its runs cannot be pooled")

    filename = pe.CURVE_POTENTIALS if args.curves else "checkpoint.pt"
    runs: Dict[str, List[tuple]] = {}
    for method in args.methods:
        runs[method] = []
        for output in outputs:
            found = pe.run_files(output, args.case, method, filename)
            if not found:
                parser.error(f"no {filename} of {method} in {output / args.case / method}")
            runs[method].extend(found)
        indices = [index for index, _ in runs[method]]
        if len(set(indices)) != len(indices):
            parser.error(f"{method}: two runs with the same seed index across the output folders")

    guesses = set()
    if args.curves:
        # Malformed or too long curve files are named before anything is simulated.
        try:
            curves_in = load_curves(runs, len(states))
        except (OSError, ValueError) as exc:
            parser.error(str(exc))
        for output in outputs:
            try:
                guesses.add(pe.results_guess(json.loads((output / "results.json").read_text())[args.case]))
            except (OSError, ValueError, KeyError) as exc:
                parser.error(f"{output / 'results.json'} does not say which guess {args.case} started from: {exc}")
        if len(guesses) > 1:
            parser.error(f"the output folders started {args.case} from different guesses: {sorted(guesses)}")

    results: Dict[str, object] = {"case": args.case, "repeats": args.repeats, "outputs": [str(p) for p in outputs]}
    print(f"{args.case}: truth, {truth_repeats} runs", flush=True)
    results["truth"] = reevaluate(truth, states, truth_repeats, REEVALUATION_SEED, args.scale, args.platform)
    print(f"    single {results['truth']['single']:.4f}, pooled {results['truth']['pooled']:.4f}", flush=True)
    if args.curves:
        return reevaluate_curves(args, outputs, curves_in, guesses.pop(), truth, states, results)
    for method, paths in runs.items():
        rows = []
        for index, path in paths:
            table = torch.load(path, weights_only=False)["table"]
            seed = REEVALUATION_SEED + 1000 + pe.SEED_STRIDE * index
            row = reevaluate(table, states, args.repeats, seed, args.scale, args.platform)
            row.update(run=str(path), seed_index=index)
            rows.append(row)
            print(
                f"{method} seed-{index + 1}: single {row['single']:.4f} ± {row['single_se']:.4f}, "
                f"pooled {row['pooled']:.4f}",
                flush=True,
            )
        results[method] = {"runs": rows, "single": summary(rows, "single"), "pooled": summary(rows, "pooled")}
    print(f"\n{'potential':12s} {'single (mean ± se)':>22s} {'pooled (mean ± se)':>22s}")
    print(f"{'truth':12s} {results['truth']['single']:22.4f} {results['truth']['pooled']:22.4f}")
    for method in runs:
        s, p = results[method]["single"], results[method]["pooled"]
        print(f"{method:12s} {s['mean']:13.4f} ± {s['se'] or 0:.4f} {p['mean']:13.4f} ± {p['se'] or 0:.4f}")
    out = outputs[0] / f"{args.case}_reevaluation.json"
    out.write_text(json.dumps(results, indent=1))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
