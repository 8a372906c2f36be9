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


def summary(rows: List[Dict[str, float]], key: str) -> Dict[str, Optional[float]]:
    values = np.array([row[key] for row in rows])
    se = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else None
    return {"mean": float(values.mean()), "se": se, "min": float(values.min()), "max": float(values.max())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("case")
    parser.add_argument("methods", nargs="+")
    parser.add_argument("--output", nargs="+", required=True, help="paper_experiments.py output folder(s)")
    parser.add_argument("--repeats", type=int, default=4, help="evaluation runs per potential (default 4)")
    parser.add_argument("--truth-repeats", type=int, default=None, help="runs of the truth (default 2 × repeats)")
    parser.add_argument("--scale", default="reduced", choices=sorted(pe.SCALES))
    parser.add_argument("--platform", default=None)
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

    runs: Dict[str, List[tuple]] = {}
    for method in args.methods:
        runs[method] = []
        for output in outputs:
            found = pe.final_checkpoints(output, args.case, method)
            if not found:
                parser.error(f"no checkpoint of {method} in {output / args.case / method}")
            runs[method].extend(found)
        indices = [index for index, _ in runs[method]]
        if len(set(indices)) != len(indices):
            parser.error(f"{method}: two runs with the same seed index across the output folders")

    results: Dict[str, object] = {"case": args.case, "repeats": args.repeats, "outputs": [str(p) for p in outputs]}
    print(f"{args.case}: truth, {truth_repeats} runs", flush=True)
    results["truth"] = reevaluate(truth, states, truth_repeats, REEVALUATION_SEED, args.scale, args.platform)
    print(f"    single {results['truth']['single']:.4f}, pooled {results['truth']['pooled']:.4f}", flush=True)
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
