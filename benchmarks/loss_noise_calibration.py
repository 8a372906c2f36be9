"""How well does ``ReweightingEstimator.residual_noise`` predict the scatter of a training loss?

Samples the *true* potential of one of the seed paper's states (benchmarks/paper_experiments.py)
the way an IMC epoch does (1000 re-equilibration steps, then 100 frames every 50 steps), many times
in a row, and records for each sample its RDF loss against the state's target and the noise
estimate from its own frames with 20, 10, 5, 4 and 2 blocks. Every sample has the exact potential,
so every difference between their losses is sampling noise: what the IMC undo
(``imc_reject_factor``) has to tell apart from an overshoot. The script also counts how often the
undo rule "fresh loss > f x max(reference loss, noise)" would fire between two such samples.

    python benchmarks/loss_noise_calibration.py --case lj --samples 12
    python benchmarks/loss_noise_calibration.py --case morse-5.5-0.44-rho0.5 --samples 12

Targets come from ``<targets>/reduced_<family>_<state>.npz`` as paper_experiments.py caches them
(simulated here when missing). Writes ``<output>/noise_<case>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch  # noqa: F401  (torch before openmm)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import paper_experiments as paper  # noqa: E402

from openmm_diffsim.gradients import ReweightingEstimator  # noqa: E402
from openmm_diffsim.sampling import Sampler  # noqa: E402

BLOCKS = (20, 10, 5, 4, 2)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", default="lj", help="a single-state case of paper_experiments.py")
    parser.add_argument("--samples", type=int, default=12, help="100-frame samples of the true potential")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--targets", default="benchmarks/results/paper/targets", help="paper_experiments' cache")
    parser.add_argument("--output", default="benchmarks/results/noise")
    parser.add_argument("--platform", default=None)
    args = parser.parse_args(argv)
    if args.samples < 2:
        parser.error(f"--samples needs at least 2, got {args.samples}")
    cases = paper.all_cases(paper.SCALES["reduced"]["n"])
    if args.case not in cases or len(cases[args.case]["train"]) != 1:
        parser.error(f"--case takes a single-state case of paper_experiments.py, got {args.case!r}")
    case = cases[args.case]
    paper.attach_targets(args.case, case, "reduced", Path(args.targets), args.platform)
    state, truth = case["train"][0], case["truth"]()
    sampler = Sampler(state, truth, platform=args.platform, seed=args.seed, **paper.SAMPLER)
    sampler.minimize()
    sampler.equilibrate(5000)
    samples = []
    for k in range(args.samples):
        sampler.equilibrate(1000)
        snapshots = sampler.run(100, 50)
        estimator = ReweightingEstimator(**paper.RDF_GRID)
        estimator.reset(truth, snapshots, state)
        rho, _ = estimator.residuals(truth, state, state.targets)
        loss = float(rho.detach() @ rho.detach())
        noise = {b: estimator.residual_noise(state, state.targets, n_blocks=b) for b in BLOCKS}
        samples.append(dict(loss=loss, noise=noise))
        print(f"sample {k + 1:3d}: loss {loss:.2e}  noise " + " ".join(f"{b}:{v:.2e}" for b, v in noise.items()))
    losses = np.array([s["loss"] for s in samples])
    summary = {
        "case": args.case,
        "samples": samples,
        "loss_mean": float(losses.mean()),
        "loss_sd": float(losses.std(ddof=1)),
        "loss_min": float(losses.min()),
        "loss_max": float(losses.max()),
        "noise_mean": {b: float(np.mean([s["noise"][b] for s in samples])) for b in BLOCKS},
        # How often "fresh > f x max(reference, noise(10 blocks))" fires between two exact samples.
        "spurious_undo_rate": {
            f: float(
                np.mean(
                    [
                        samples[j]["loss"] > f * max(samples[i]["loss"], samples[j]["noise"][10])
                        for i in range(len(samples))
                        for j in range(len(samples))
                        if i != j
                    ]
                )
            )
            for f in (2, 3, 4, 5)
        },
    }
    print(
        f"loss of the exact potential: mean {summary['loss_mean']:.2e}, sd {summary['loss_sd']:.2e}, "
        f"range {summary['loss_min']:.2e}-{summary['loss_max']:.2e}"
    )
    for b, v in summary["noise_mean"].items():
        print(f"  residual_noise with {b:2d} blocks: mean {v:.2e} (mean loss / it = {summary['loss_mean'] / v:.1f})")
    for f, rate in summary["spurious_undo_rate"].items():
        print(f"  undo rule with factor {f}: fires between {100 * rate:.0f}% of pairs of exact samples")
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    (output / f"noise_{args.case}.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
