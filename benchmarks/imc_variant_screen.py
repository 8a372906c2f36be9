"""Screen a variant of one of paper_experiments.py's methods by training alone: its u(r) error, no re-simulation.

Trains the method's settings, with ``--set`` overrides, from the Boltzmann-inversion guess on a case's
cached targets, once per training seed, and reports the final potential's u(r) error against the
truth (rms and maximum, centred as in paper_experiments.potential_error), its split into the wall
and the bins beyond (potential_error_regions.error_by_region) with the signed error of the first
resolved bin (where near coexistence the IMC fits lose to IBI), the undone steps and the MD steps.
One-species cases only, as potential_error_regions.py. A fit costs a few minutes on two cores; the
full comparison (RDF errors along the way, against IBI) is paper_experiments.py's. Writes
``<output>/screen.json`` (appended per run).

    python benchmarks/imc_variant_screen.py --case morse-5.5-0.44-rho0.5 --method imc-line \\
        --set imc_ibi_prior=0.1 --seeds 11 12 13 --targets benchmarks/results/paper/targets
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any, Dict, List

import torch  # noqa: F401  (torch before openmm)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import paper_experiments as paper  # noqa: E402
import potential_error_regions as regions  # noqa: E402


def parse_overrides(items: List[str]) -> Dict[str, Any]:
    """``KEY=VALUE`` pairs, each VALUE read as JSON (numbers, true/false, objects), else kept as text.

    ``estimator_options`` takes a JSON object that updates the method's own.
    """
    overrides: Dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set takes KEY=VALUE, got {item!r}")
        try:
            overrides[key] = json.loads(text)
        except json.JSONDecodeError:
            overrides[key] = text
    if "estimator_options" in overrides and not isinstance(overrides["estimator_options"], dict):
        raise ValueError(
            '--set estimator_options takes a JSON object, e.g. estimator_options=\'{"bin_weighting": "relative"}\''
        )
    return overrides


def variant_settings(method: str, overrides: Dict[str, Any]) -> Dict[str, Any]:
    """The method's METHOD_SETTINGS with ``overrides`` (estimator options merged, not replaced)."""
    if method not in paper.METHOD_SETTINGS:
        raise ValueError(f"unknown method {method!r}; methods: {', '.join(paper.METHOD_SETTINGS)}")
    settings = copy.deepcopy(paper.METHOD_SETTINGS[method])
    overrides = dict(overrides)
    estimator = overrides.pop("estimator_options", None)
    settings.update(overrides)
    if estimator:
        settings["estimator_options"] = {**settings.get("estimator_options", {}), **estimator}
    return settings


def read_rows(screen: Path) -> List[Dict[str, Any]]:
    """The rows already in ``screen`` (none if it does not exist); ValueError if it is not a screen file."""
    if not screen.exists():
        return []
    try:
        rows = json.loads(screen.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{screen} is not a screen file ({exc}); move it away or pick another --output") from exc
    if not isinstance(rows, list):
        raise ValueError(f"{screen} is not a screen file (no list of rows); move it away or pick another --output")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", default="morse-5.5-0.44-rho0.5", help="a case of paper_experiments.py")
    parser.add_argument("--method", default="imc-line", help="the method whose settings are varied")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="setting overrides (JSON values)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[paper.FIRST_TRAINING_SEED], help="training seeds")
    parser.add_argument("--targets", default="benchmarks/results/paper/targets", help="paper_experiments' cache")
    parser.add_argument("--output", default="benchmarks/results/screen")
    parser.add_argument("--platform", default=None)
    parser.add_argument("--guess", choices=paper.GUESSES, default="deconvolved", help="the start (paper_experiments)")
    args = parser.parse_args(argv)
    cases = paper.all_cases(paper.SCALES["reduced"]["n"])
    if args.case not in cases:
        parser.error(f"unknown case {args.case!r}")
    if len(cases[args.case]["truth"]().pair_keys()) != 1:
        parser.error(f"one pair type only (the wall split is per pair type), got {args.case!r}")
    try:
        overrides = parse_overrides(args.set)
        settings = variant_settings(args.method, overrides)
    except ValueError as exc:
        parser.error(str(exc))
    output = Path(args.output)
    screen = output / "screen.json"
    try:
        rows = read_rows(screen)  # before the targets and fits: a bad file would lose their minutes
    except ValueError as exc:
        parser.error(str(exc))
    label = args.method + "".join(f" {k}={json.dumps(v)}" for k, v in overrides.items())
    if args.guess != "deconvolved":
        label += f" ({args.guess} guess)"
    case = cases[args.case]
    paper.attach_targets(args.case, case, "reduced", Path(args.targets), args.platform)
    truth, states = case["truth"](), case["train"]
    initial = paper.initial_table(states, args.guess)
    epochs = paper.SCALES["reduced"]["epochs"][args.method]
    output.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        folder = output / args.case / label.replace(" ", "_").replace('"', "") / f"seed-{seed}"
        run, _ = paper.train(
            args.method, copy.deepcopy(initial), states, epochs, folder, seed, args.platform, 2, settings=settings
        )
        error = paper.potential_error(run.table, truth, states)
        split = regions.error_by_region(run.table, truth, states)
        first_bin = float(regions.centred_profile(run.table, truth, states)[1][0])
        undos = sum(1 for record in run.history if (record.get("imc") or {}).get("undone"))
        row = dict(
            case=args.case,
            variant=label,
            seed=seed,
            u_rms_kT=error["rms_kT"],
            u_max_kT=error["max_kT"],
            wall_rms_kT=split["wall"],
            beyond_rms_kT=split["beyond"],
            first_bin_kT=first_bin,
            undos=undos,
            md_steps=run.md_steps,
        )
        print(
            f"{label}, seed {seed}: u rms {row['u_rms_kT']:.4f} kT, max {row['u_max_kT']:.3f}, "
            f"wall {split['wall']:.3f} / beyond {split['beyond']:.3f} kT rms, first bin {first_bin:+.3f} kT, "
            f"{undos} undos, {run.md_steps} MD steps",
            flush=True,
        )
        rows.append(row)
        paper._atomic_write_bytes(screen, json.dumps(rows, indent=1).encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
