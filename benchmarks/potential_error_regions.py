"""Where the error of a learned u(r) lies: the repulsive wall or beyond it.

Reads the final potentials (``checkpoint.pt``) that ``paper_experiments.py``
saved in ``<output>/<case>/<method>/[seed-<k>/]`` and splits the u(r) error of
``paper_experiments.potential_error`` (in k_B T, where g_target > 0.1, the
constant offset removed over that whole region) into two parts:

``wall``
    the resolved bins on the rising edge of the first peak, below the first
    r where g_target reaches 1;
``beyond``
    every resolved bin from there to the cutoff.

It also reports the removed ``offset`` (mean of u_learned - u_true over the
resolved bins) and the ``uncentred`` rms with it kept: both potentials are
shifted to zero at the cutoff, so the offset is a real error (a step of u at
r_c), and near a critical point the RDF is more sensitive to it than to any
local one.

IBI corrects every bin by the log-ratio of its own g(r); a Newton step on
the RDF loss weighs the wall bins by their small absolute change of g(r).
This script measures what that does to each part. ::

    python benchmarks/potential_error_regions.py benchmarks/results/paper morse-5.5-0.44-rho0.5 ibi imc-grow

Prints one row per run and writes ``<output>/<case>_u_error_regions.json``;
``--plot FILE`` also draws each run's centred error against r (one colour per
method, one line per seed, the initial guess dashed), where a table of rms
values hides which bins carry the error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import paper_experiments as pe  # noqa: E402  (the experiments' cases, targets and error measure)


def region_masks(train_states) -> Dict[str, np.ndarray]:
    """Per pair-type index: boolean masks over the target grid, ``resolved``, ``wall`` and ``beyond``."""
    r = np.asarray(train_states[0].targets[0].r)
    resolved = np.zeros(r.shape, dtype=bool)
    wall = np.zeros(r.shape, dtype=bool)
    for state in train_states:
        for target in state.targets:
            g = np.asarray(target.g)
            resolved |= g > 0.1
            first_peak = np.nonzero(g >= 1.0)[0]
            edge = r[first_peak[0]] if first_peak.size else np.inf
            wall |= (g > 0.1) & (r < edge)
    resolved &= r < pe.CUTOFF
    wall &= resolved
    return {"resolved": resolved, "wall": wall, "beyond": resolved & ~wall}


def error_by_region(table, truth, train_states) -> Dict[str, float]:
    """rms of (u - u_true)/kT over the resolved bins, the wall bins and the bins beyond, first pair type.

    The offset is removed over all resolved bins, as in ``paper_experiments.potential_error``.
    """
    masks = region_masks(train_states)
    r = np.asarray(train_states[0].targets[0].r)
    region, diff = pe.potential_difference(table, truth, train_states, 0)
    if not np.array_equal(region, masks["resolved"]):
        raise ValueError("the resolved bins differ from paper_experiments.potential_error's (more than one pair type?)")
    # Both potentials are shifted to zero at the cutoff, so the offset is physical:
    # a level of the whole resolved range against u(r_c), i.e. a step at the
    # cutoff, which near a critical point moves g(r) more than any local error.
    offset = float(diff.mean())
    uncentred = float(np.sqrt(np.mean(diff**2)))
    diff = diff - offset
    full = np.full(r.shape, np.nan)
    full[region] = diff
    out = {name: float(np.sqrt(np.mean(full[mask] ** 2))) for name, mask in masks.items() if mask.any()}
    out["offset"] = offset
    out["uncentred"] = uncentred
    out["wall_bins"] = int(masks["wall"].sum())
    out["worst_wall_kT"] = float(np.nanmax(np.abs(full[masks["wall"]]))) if masks["wall"].any() else None
    return out


def centred_profile(table, truth, train_states) -> tuple:
    """(r, diff): the resolved bins (nm) and (u - u_true)/kT on them, offset removed, first pair type."""
    r = np.asarray(train_states[0].targets[0].r)
    region, diff = pe.potential_difference(table, truth, train_states, 0)
    return r[region], diff - diff.mean()


def plot_profiles(path: Path, profiles: Dict[str, List[tuple]], title: str) -> Path:
    """Centred u(r) error against r: one colour per method, one line per run; ``"initial"`` dashed."""
    from openmm_diffsim.plotting import _pyplot, _save

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (method, runs) in enumerate(profiles.items()):
        style = dict(color="0.4", linestyle="--") if method == "initial" else dict(color=colours[k % len(colours)])
        for n, (r, diff) in enumerate(runs):
            ax.plot(r, diff, lw=1.2, alpha=0.85, label=method if n == 0 else None, **style)
    ax.axhline(0.0, color="black", lw=0.6)
    ax.set_xlabel("r (nm)")
    ax.set_ylabel("(u - u_true)/kT, offset removed")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", help="the paper_experiments.py output folder")
    parser.add_argument("case")
    parser.add_argument("methods", nargs="+")
    parser.add_argument("--plot", default=None, metavar="FILE", help="also plot each run's centred error against r")
    args = parser.parse_args(argv)
    output = Path(args.output)
    cases = pe.all_cases(pe.SCALES["reduced"]["n"])
    if args.case not in cases:
        parser.error(f"unknown case {args.case!r}")
    case = cases[args.case]
    if len(case["truth"]().pair_keys()) != 1:
        parser.error("one pair type only (the binary cases are not split)")
    # The targets the runs were trained on: never simulate new ones here.
    try:
        pe.attach_targets(args.case, case, "reduced", output / "targets", None, simulate_missing=False)
    except FileNotFoundError as exc:
        parser.error(str(exc))
    truth, train_states = case["truth"](), case["train"]
    masks = region_masks(train_states)
    r = np.asarray(train_states[0].targets[0].r)
    print(f"{args.case}: wall bins r = {np.round(r[masks['wall']], 3).tolist()}, beyond: {masks['beyond'].sum()} bins")
    # The start the runs were trained from, as their results.json records it.
    results_file = output / "results.json"
    recorded = json.loads(results_file.read_text()).get(args.case, {}) if results_file.exists() else {}
    initial = pe.initial_table(train_states, pe.results_guess(recorded) if recorded else "deconvolved")
    results = {"initial": [error_by_region(initial, truth, train_states)]}
    profiles = {"initial": [centred_profile(initial, truth, train_states)]}
    for method in args.methods:
        results[method], profiles[method] = [], []
        found = pe.run_files(output, args.case, method)
        if not found:
            parser.error(f"no checkpoint of {method} in {output / args.case / method}")
        for _, path in found:
            table = torch.load(path, weights_only=False)["table"]
            results[method].append(error_by_region(table, truth, train_states))
            profiles[method].append(centred_profile(table, truth, train_states))
    print(
        f"{'run':24s} {'resolved':>9s} {'wall':>7s} {'beyond':>7s} {'worst wall':>10s}"
        f" {'offset':>7s} {'uncentred':>9s}  (kT)"
    )
    for method, rows in results.items():
        for k, row in enumerate(rows):
            label = method if len(rows) == 1 else f"{method} seed {k + 1}"
            parts = (
                f"{row['resolved']:9.3f} {row['wall']:7.3f} {row['beyond']:7.3f} {row['worst_wall_kT']:10.2f}"
                f" {row['offset']:+7.3f} {row['uncentred']:9.3f}"
            )
            print(f"{label:24s} {parts}")
        if len(rows) > 1:
            keys = ("resolved", "wall", "beyond", "uncentred")
            mean = {key: float(np.mean([row[key] for row in rows])) for key in keys}
            print(
                f"{method + ' mean':24s} {mean['resolved']:9.3f} {mean['wall']:7.3f} {mean['beyond']:7.3f}"
                f" {'':10s} {'':7s} {mean['uncentred']:9.3f}"
            )
    out = output / f"{args.case}_u_error_regions.json"
    out.write_text(json.dumps(results, indent=1))
    print(f"written {out}")
    if args.plot:
        title = f"{args.case}: where the u(r) error lies (final potentials)"
        print(f"written {plot_profiles(Path(args.plot), profiles, title)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
