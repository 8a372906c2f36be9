"""The seed paper's experiments, every method on the same sampler: one script regenerates the table.

Wang, Wu, Dietschreit & Gómez-Bombarelli, J. Chem. Phys. 158, 044113 (2023),
redone with openmm-diffsim. Reduced LJ units are realised as σ = 1 nm,
ε = 1 kJ/mol, m = 1 amu (so τ = 1 ps and T = T* ε / R); cutoff 2.5σ, energies
shifted to zero there.

Experiments (``--cases``; ``all`` runs every case):

``lj``
    Lennard-Jones recovery and transfer: train at ρ* = 0.3, T* = 1.2; test at
    ρ* = 0.5 and 0.7.
``morse-<a>-<phi>-rho<ρ>`` / ``morse-<a>-<phi>-joint``
    The modified Morse family (a, φ) = (4.5, 1.52), (5.5, 0.44), (6.5, -0.45)
    at T* = 1: learned from one density (tested at the other three of 0.3,
    0.5, 0.7, 0.9), or jointly from all four.
``binary-x<x1>`` / ``binary-joint``
    Binary LJ mixture σ11 = 0.9, σ22 = 1.1, σ12 = 1.0, ε = 1, ρ* = 0.8,
    T* = 1.2, x1 = 0.25, 0.5, 0.75, all three partial RDFs: one composition
    (tested on the other two) or all three jointly.
``temps-T<T>`` / ``temps-joint``
    LJ at ρ* = 0.8 with RDFs at T* = 1.0, 1.5, 2.0: one temperature or all
    three jointly, tested at T* = 2.5.

Methods (``--methods``): ``reweighting``, ``rollout``, ``adjoint`` (the
:class:`~openmm_diffsim.training.Trainer` estimators, Adam), ``gauss-newton``
(Levenberg–Marquardt on reweighted RDFs inside an N_eff trust region), ``imc``
(inverse Monte Carlo: ``optimizer="imc"``, one capped Newton step per fresh
sample), ``imc-smooth`` (the same with ``imc_smoothing`` in place of most of
the damping), ``imc-steady`` (``imc-smooth`` with damping 1e-4), ``imc-trust``
(``imc-smooth`` that undoes a step after which the loss doubled,
``imc_reject_factor``), ``imc-counting`` (``imc-steady`` with counting
weights), ``imc-pool`` (``imc-counting`` whose steps pool the last samples,
``imc_pool``), ``imc-grow`` (``imc-trust`` whose cap grows up to 2 kT while
the fresh losses fall as predicted, ``imc_max_cap``), ``imc-cautious``
(``imc-grow`` with its cap starting at 0.25 kT), ``imc-relative``
(``imc-grow`` on relative errors of g, ``bin_weighting="relative"``), later
variants described where METHOD_SETTINGS defines them (``imc-then-ibi``: one
``imc-line`` step, then IBI, ``HANDOVER``) and ``ibi``
(:class:`~openmm_diffsim.ibi.IBI`). Methods not run keep their earlier results
in ``results.json``. ``--seeds K`` trains and evaluates every method K times
and reports means, standard deviations and the goal per seed; ``--first-seed S``
starts those runs at training seed S (default 11), to add independent seeds to an
earlier invocation in another output folder. Every method starts from the same
potential: cubic splines (knots every 0.05σ from where the target first
exceeds g = 0.01 to the cutoff) set to the Boltzmann inversion of the training
targets through the estimator's kernel (``--guess deconvolved``, the default;
``--guess plain`` for -kT ln g itself, the start of the runs before it),
samples with the same OpenMM sampler (tabulated backend, Langevin,
dt = 0.005τ, friction 1/τ) and computes g(r) with the same estimator (100 bins
on 0-2.5σ, Gaussian smearing 0.02σ).

Targets are simulated by the project from the true potentials (cached in
``<output>/targets``). Every learned potential — the final one and the ones
saved along the way for the time-to-accuracy curves — is re-simulated with one
fixed protocol (another seed) and compared with the targets: RDF RMSE and
mean |Δg| on training and test states (averaged over states and pairs), the
error of u(r) against the truth in k_B T where g_target > 0.1 (constant offset
removed), the MD steps and the training wall time. The truth re-simulated with
the same protocol gives the noise floor of the RDF error.

    python benchmarks/paper_experiments.py --scale reduced --cases lj morse-5.5-0.44-rho0.5
    python benchmarks/paper_experiments.py --scale full --cases all           # the whole table
    python benchmarks/paper_experiments.py --quick --cases lj                 # smoke test

``--thermo`` adds the truth's virial pressure and mean pair energy per
particle (from the target run, or from an extra run of the truth where the
cached targets predate the option) to every training state: the
reweighting-based methods fit them next to the RDFs (``pressure_weight``,
``energy_weight``, each set so that the term weighs like one RDF bin against
its noise: the per-bin variance of g over the number of bins times the
variance of P or U/N, over blocks of the target run), the rollout methods
the same terms from their rollouts, IBI
adds its pressure ramp (``pressure_correction``). Use another ``--output``
for such runs: their rows replace the RDF-only ones of the same case.

``--evaluation-repeats J`` averages every evaluation at the training states
(noise floor, initial guess, curve points, final potential) over J
re-simulations, the first with the one-run seed: near a coexistence line one
run's RDF error scatters by as much as the methods differ. The results
record J; a results folder of another J refuses the run.
``reevaluate_final.py`` does the same afterwards for the final potentials
of an earlier invocation, and with ``--curves`` for every potential saved
along its curves.

Writes ``<output>/results.json``, ``<output>/results.md`` (the table),
``<output>/<case>/<method>/`` (log.jsonl, checkpoint, plots, and the
potentials saved along the curve with their costs, ``curve_potentials.pt``) and
``<output>/<case>_time_to_accuracy_{wall,steps}.png``. Results of cases already
in ``results.json`` are kept unless the case is run again.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch  # noqa: F401  (torch before openmm)

from openmm_diffsim.energy import potential_energy
from openmm_diffsim.ibi import IBI, spline_table_from_targets
from openmm_diffsim.observables import compute_partial_rdfs, virial_pressure
from openmm_diffsim.potentials import LennardJones, ModifiedMorse, PairTable
from openmm_diffsim.sampling import reference_rdfs
from openmm_diffsim.systems import MOLAR_GAS_CONSTANT, StatePoint
from openmm_diffsim.targets import Target
from openmm_diffsim.training import Trainer, _atomic_write_bytes, atomic_torch_save

CUTOFF = 2.5  # sigma
RDF_GRID = dict(r_range=(0.0, CUTOFF), n_bins=100, smearing=0.02)
SAMPLER = dict(timestep=0.005, friction=1.0)
KNOT_SPACING = 0.05
MORSE_SHAPES = {"4.5-1.52": (4.5, 1.52), "5.5-0.44": (5.5, 0.44), "6.5--0.45": (6.5, -0.45)}
MORSE_DENSITIES = (0.3, 0.5, 0.7, 0.9)
BINARY_FRACTIONS = (0.25, 0.5, 0.75)
TEMPS_TRAIN = (1.0, 1.5, 2.0)
TEMPS_TEST = 2.5
TEMPS_DENSITY = 0.8
METHODS = (
    "reweighting",
    "rollout",
    "adjoint",
    "gauss-newton",
    "imc",
    "imc-smooth",
    "imc-steady",
    "imc-trust",
    "imc-counting",
    "imc-pool",
    "imc-grow",
    "imc-cautious",
    "imc-relative",
    "imc-shrink",
    "imc-shrink-cautious",
    "imc-shrink-unsmoothed",
    "imc-shrink-light",
    "imc-level",
    "imc-prior",
    "imc-line",
    "imc-wall",
    "imc-polish",
    "imc-line-late",
    "imc-then-ibi",
    "ibi",
)

#: Protocols per scale. target/evaluation: (frames, MD steps between frames, equilibration steps).
SCALES: Dict[str, Dict[str, Any]] = {
    "quick": dict(
        n=256,
        target=(40, 50, 1000),
        evaluation=(20, 50, 500),
        epochs={"ibi": 2, "reweighting": 2, "imc": 2, "rollout": 1, "adjoint": 1, "gauss-newton": 2},
        curve_points=2,
    ),
    "reduced": dict(
        n=256,
        target=(300, 50, 5000),
        # 60 frames after 1000 steps scattered the truth's own RDF error 0.013-0.044 (LJ) from run to run.
        evaluation=(200, 50, 2000),
        epochs={"ibi": 15, "reweighting": 20, "imc": 8, "rollout": 8, "adjoint": 3, "gauss-newton": 8},
        curve_points=3,
    ),
    "full": dict(
        n=500,
        target=(1000, 50, 10000),
        evaluation=(300, 50, 5000),
        epochs={"ibi": 60, "reweighting": 150, "imc": 30, "rollout": 60, "adjoint": 60, "gauss-newton": 40},
        curve_points=10,
    ),
}
# Every IMC variant takes as many steps as imc; imc-then-ibi (HANDOVER below) as many as IBI, its first
# steps included.
for _scale in SCALES.values():
    _scale["epochs"].update({m: _scale["epochs"]["imc"] for m in METHODS if m.startswith("imc-")})
    _scale["epochs"]["imc-then-ibi"] = _scale["epochs"]["ibi"]

#: Per-method settings (same for every case). Snapshot budgets per epoch:
#: IBI / reweighting / gauss-newton 50 frames every 50 steps, imc 100; rollouts 4 seeds every 200 steps.
METHOD_SETTINGS: Dict[str, Dict[str, Any]] = {
    "ibi": dict(mixing=0.5, smoothing=1, n_snapshots=50, snapshot_interval=50),
    # Adam moves every knot by ~lr per step: 0.05 kJ/mol overshot near the first
    # peak (measured: RMSE 0.05 -> 0.23 at the third step), so 0.02 with a cosine decay.
    "reweighting": dict(learning_rate=0.02, lr_schedule="cosine", n_snapshots=50, snapshot_interval=50),
    "gauss-newton": dict(optimizer="gauss-newton", n_snapshots=50, snapshot_interval=50),
    # Inverse Monte Carlo: one capped Newton step per fresh sample of twice IBI's
    # size (the linear response needs a larger sample than IBI's ratio of RDFs).
    "imc": dict(optimizer="imc", n_snapshots=100, snapshot_interval=50, imc_damping=1e-3, max_potential_change=0.5),
    # Smoothing (a curvature penalty on the step) in place of most of the
    # damping: the step follows smooth directions the RDF sees weakly and
    # keeps noise out of the wall knots (docs/training.md). Measured: better
    # u(r) on LJ, unstable on the Morse case at rho* = 0.5 (docs/experiments.md).
    "imc-smooth": dict(
        optimizer="imc",
        n_snapshots=100,
        snapshot_interval=50,
        imc_damping=1e-6,
        imc_smoothing=0.1,
        max_potential_change=0.5,
    ),
    "rollout": dict(
        learning_rate=0.02,
        lr_schedule="cosine",
        n_snapshots=4,
        snapshot_interval=200,
        estimator_options=dict(n_steps=100, record_every=10, n_replicas=4, timestep=0.005),
    ),
}
METHOD_SETTINGS["adjoint"] = copy.deepcopy(METHOD_SETTINGS["rollout"])
# Between imc and imc-smooth: the smoothing, with enough damping (1e-4) to hold
# back the noisiest directions of a 100-frame step (the Morse case).
METHOD_SETTINGS["imc-steady"] = dict(METHOD_SETTINGS["imc-smooth"], imc_damping=1e-4)
# imc-smooth that undoes a step after which the fresh sample's loss doubled
# (an overshoot near a phase boundary) and retakes it with half the cap.
METHOD_SETTINGS["imc-trust"] = dict(METHOD_SETTINGS["imc-smooth"], imc_reject_factor=2.0)
# imc-steady with the RDF loss weighted by the inverse variance of pair counting
# (targets.counting_weights): the wall bins, tens of times less noisy than the
# first peak, count accordingly (the demo's default, docs/training.md).
METHOD_SETTINGS["imc-counting"] = dict(METHOD_SETTINGS["imc-steady"], estimator_options=dict(bin_weighting="counting"))
# imc-counting whose Newton steps pool the last samples (up to 4) drawn within
# 0.25 kT of the current u(r): near convergence each step carries the noise of
# all pooled frames rather than of one sample (docs/training.md).
METHOD_SETTINGS["imc-pool"] = dict(METHOD_SETTINGS["imc-counting"], imc_pool=4)
# imc-trust whose cap may grow 1.5x per step up to 2 kT while the fresh losses
# fall as the Newton system predicts: far from the answer the cap, not the
# step, set the pace (three temperatures at once: six capped steps).
METHOD_SETTINGS["imc-grow"] = dict(METHOD_SETTINGS["imc-trust"], imc_max_cap=2.0)
# imc-grow whose cap starts at 0.25 kT: on the LJ state near its critical point
# the first step at 0.45 kT raised the loss 8-50x in all 7 runs (undone and
# retaken at ~0.2 kT, which held); the cap grows as before where steps succeed.
METHOD_SETTINGS["imc-cautious"] = dict(METHOD_SETTINGS["imc-grow"], max_potential_change=0.25)
# imc-grow with the RDF bins weighted by 1/g² (relative errors, as IBI corrects
# them): near a phase boundary the first peak's slow fluctuations outweighed the
# repulsive wall, which every imc-* fit of the seed runs left 0.1-0.4 kT too soft.
METHOD_SETTINGS["imc-relative"] = dict(METHOD_SETTINGS["imc-grow"], estimator_options=dict(bin_weighting="relative"))
# imc-grow whose Newton steps are shortened by the share of their length that the
# sample's own noise accounts for (imc_noise_shrink): at the noise floor a full
# step writes a 100-frame sample's noise into u(r), which drifted 0.04 -> 0.14 kT
# over three steps on the dense liquid at T* = 1.5 (docs/experiments.md).
METHOD_SETTINGS["imc-shrink"] = dict(METHOD_SETTINGS["imc-grow"], imc_noise_shrink=True)
# The same shrinkage on imc-cautious (first cap 0.25 kT): the small first step
# against the first-step overshoot near the LJ critical point, the shrinkage
# against the late ones (a 0.22 kT step near the noise floor raised the loss 40x).
METHOD_SETTINGS["imc-shrink-cautious"] = dict(METHOD_SETTINGS["imc-cautious"], imc_noise_shrink=True)
# imc-shrink without the curvature penalty (or with a tenth of it): the noise
# shrinkage, not the penalty, keeps a 100-frame sample's noise out of u(r). The
# penalty, scaled to the first peak's data, held the wall 0.13-0.16 kT off on
# Morse at rho* = 0.7 where unpenalised steps got within 0.03-0.08 kT, and it
# keeps the step from fitting the target as closely as IBI does.
METHOD_SETTINGS["imc-shrink-unsmoothed"] = dict(METHOD_SETTINGS["imc-shrink"], imc_smoothing=0.0)
METHOD_SETTINGS["imc-shrink-light"] = dict(METHOD_SETTINGS["imc-shrink"], imc_smoothing=0.01)
# imc-shrink-light whose steps move the level of u(r) (its mean over the resolved
# bins, against u(r_c)) by at most a tenth of the cap (imc_level_fraction): from
# the Boltzmann-inversion guess at the LJ state near its critical point the Newton
# step moved that level 2.6x the correction it needed, and 4 of 6 first steps of
# imc-shrink-light there overshot (docs/experiments.md).
METHOD_SETTINGS["imc-level"] = dict(METHOD_SETTINGS["imc-shrink-light"], imc_level_fraction=0.1)
# imc-shrink-light whose steps are pulled at the repulsive wall (weight 0.01 of the
# data) towards IBI's correction kT ln(g/g_target) of the same sample (imc_ibi_prior):
# near coexistence (Morse at rho* = 0.5) the wall's signal drowns in the first peak's
# slow fluctuations and every three-seed imc-* fit left it 0.1-0.5 kT too soft, where
# IBI, which corrects each bin by its own ratio of g, got within 0.04-0.1
# (docs/experiments.md).
METHOD_SETTINGS["imc-prior"] = dict(METHOD_SETTINGS["imc-shrink-light"], imc_ibi_prior=0.01)
# imc-prior whose steps are shortened to the minimum of a second-order model of the
# loss along them, the curvature read off the same sample (imc_line_search): from the
# Boltzmann-inversion guess at the LJ state near its critical point the full first
# step raised the fresh loss 10-30x, half of it lowered it 4-6x (four samples,
# step_curvature.py).
METHOD_SETTINGS["imc-line"] = dict(METHOD_SETTINGS["imc-prior"], imc_line_search=True)
# imc-line whose pull towards IBI's correction at the wall weighs ten times more
# (0.1 of the data's trace): near coexistence (Morse at rho* = 0.5) every imc-line
# fit still left the wall bin at r = 0.81 sigma (g = 0.14) 0.12-0.46 kT too soft,
# within 0.06 kT beyond it. With 0.1 six seeds ended 0.02-0.24 kT soft there and tied
# IBI in RDF error and u(r) (docs/experiments.md, "A heavier pull at the wall"). All from
# the plain inversion: from the inversion through the estimator's kernel the wall starts
# right and imc-line got it within 0.03-0.06 kT, while this pull, towards IBI's overshoot
# there, did worse (docs/experiments.md, "Inverting through the estimator's kernel").
METHOD_SETTINGS["imc-wall"] = dict(METHOD_SETTINGS["imc-line"], imc_ibi_prior=0.1)
# imc-grow whose last two steps each take 400 frames and no curvature penalty
# (POLISH below): scaled to the trace of JᵀJ, which the first peak dominates, the
# penalty outweighs the wall's data. Three 400-frame Newton steps on Morse at
# rho* = 0.7 each fixed the wall (0.16 -> 0.03-0.08 kT) only without it; from
# 100 frames the unpenalised step scattered (0.06-0.27 kT).
METHOD_SETTINGS["imc-polish"] = dict(METHOD_SETTINGS["imc-grow"])
#: Option changes made after the given number of epochs (the trainer reads them every step).
POLISH: Dict[str, Dict[str, Any]] = {"imc-polish": dict(after_epoch=6, n_snapshots=400, imc_smoothing=0.0)}
# imc-line whose samples grow to 300 frames once a sample's loss is within 3x its own block noise
# (LATE_SAMPLES below): with every curve point re-simulated six times, imc-line on LJ levelled off at
# an RDF error of 0.015-0.016 from 21 300 MD steps on, its late 100-frame samples at 1-3x their noise,
# while IBI went on down to 0.0125 (docs/experiments.md, "Re-simulating the curves").
METHOD_SETTINGS["imc-line-late"] = dict(METHOD_SETTINGS["imc-line"])
#: Frames per sample from the epoch after the first whose loss fell below noise_ratio x its block noise.
#: The demo grows its samples on an absolute loss (demo._grow_samples), tuned to its one state; this
#: screen's ratio to the sample's own noise needs no tuning per state. Kept, it belongs in the Trainer.
LATE_SAMPLES: Dict[str, Dict[str, Any]] = {"imc-line-late": dict(noise_ratio=3.0, n_snapshots=300)}
# IBI after the first Newton step of imc-line (HANDOVER below). With every curve point re-simulated six
# times, imc-line's first step on LJ took the RDF error from 0.064 to 0.037 in 6 000 MD steps, where IBI
# needed about 10 000, but its later 100-frame steps scattered (0.013-0.068) while IBI's small, averaging
# updates went steadily down to 0.0125 (docs/experiments.md, "Re-simulating the curves").
METHOD_SETTINGS["imc-then-ibi"] = dict(METHOD_SETTINGS["ibi"])
#: Methods whose first ``epochs`` are another method's (its settings with ``overrides``); the rest of
#: their epochs are IBI with the method's own METHOD_SETTINGS, from where the first steps left u(r).
#: The first phase does not re-check its last step (imc_check_last): IBI's first sample follows at once.
HANDOVER: Dict[str, Dict[str, Any]] = {
    "imc-then-ibi": dict(method="imc-line", epochs=1, overrides=dict(imc_check_last=False)),
}


# -- cases ---------------------------------------------------------------------------------------------------


def kelvin(reduced_temperature: float) -> float:
    return reduced_temperature / MOLAR_GAS_CONSTANT  # epsilon = 1 kJ/mol


def one_species_state(name: str, n: int, density: float, temperature: float) -> StatePoint:
    return StatePoint(name, ["A"], [n], [1.0], temperature=kelvin(temperature), density=density)


def binary_state(name: str, n: int, x1: float) -> StatePoint:
    n1 = int(round(x1 * n))
    return StatePoint(name, ["A", "B"], [n1, n - n1], [1.0, 1.0], temperature=kelvin(1.2), density=0.8)


def lj_table() -> PairTable:
    return PairTable(["A"], LennardJones(1.0, 1.0), cutoff=CUTOFF, cutoff_mode="shift")


def morse_table(a: float, phi: float) -> PairTable:
    return PairTable(["A"], ModifiedMorse(a, phi, 1.0, 1.0), cutoff=CUTOFF, cutoff_mode="shift")


def binary_table() -> PairTable:
    pots = {("A", "A"): LennardJones(0.9, 1.0), ("A", "B"): LennardJones(1.0, 1.0), ("B", "B"): LennardJones(1.1, 1.0)}
    return PairTable(["A", "B"], pots, cutoff=CUTOFF, cutoff_mode="shift")


def all_cases(n: int) -> Dict[str, Dict[str, Any]]:
    """Every case: truth, training states, test states (fresh StatePoint objects)."""
    cases: Dict[str, Dict[str, Any]] = {}
    cases["lj"] = dict(
        family="lj",
        truth=lj_table,
        train=[one_species_state("rho0.3", n, 0.3, 1.2)],
        test=[one_species_state("rho0.5", n, 0.5, 1.2), one_species_state("rho0.7", n, 0.7, 1.2)],
    )
    for label, (a, phi) in MORSE_SHAPES.items():
        states = {rho: one_species_state(f"rho{rho}", n, rho, 1.0) for rho in MORSE_DENSITIES}
        for rho in MORSE_DENSITIES:
            cases[f"morse-{label}-rho{rho}"] = dict(
                family=f"morse{label}",
                truth=lambda a=a, phi=phi: morse_table(a, phi),
                train=[copy.deepcopy(states[rho])],
                test=[copy.deepcopy(states[d]) for d in MORSE_DENSITIES if d != rho],
            )
        cases[f"morse-{label}-joint"] = dict(
            family=f"morse{label}",
            truth=lambda a=a, phi=phi: morse_table(a, phi),
            train=[copy.deepcopy(states[d]) for d in MORSE_DENSITIES],
            test=[],
        )
    binary = {x: binary_state(f"x{x}", n, x) for x in BINARY_FRACTIONS}
    for x in BINARY_FRACTIONS:
        cases[f"binary-x{x}"] = dict(
            family="binary",
            truth=binary_table,
            train=[copy.deepcopy(binary[x])],
            test=[copy.deepcopy(binary[y]) for y in BINARY_FRACTIONS if y != x],
        )
    cases["binary-joint"] = dict(
        family="binary", truth=binary_table, train=[copy.deepcopy(s) for s in binary.values()], test=[]
    )
    temps = {t: one_species_state(f"T{t}", n, TEMPS_DENSITY, t) for t in TEMPS_TRAIN}
    test_t = one_species_state(f"T{TEMPS_TEST}", n, TEMPS_DENSITY, TEMPS_TEST)
    for t in TEMPS_TRAIN:
        cases[f"temps-T{t}"] = dict(
            family="temps", truth=lj_table, train=[copy.deepcopy(temps[t])], test=[copy.deepcopy(test_t)]
        )
    cases["temps-joint"] = dict(
        family="temps", truth=lj_table, train=[copy.deepcopy(s) for s in temps.values()], test=[copy.deepcopy(test_t)]
    )
    return cases


# -- targets and evaluation ---------------------------------------------------------------------------------------


def simulate_rdfs(state: StatePoint, table: PairTable, protocol, seed: int, platform: Optional[str], snapshots=False):
    """Partial RDFs of ``table`` at ``state`` by ``protocol``: (r, g), or (r, g, snapshots) with ``snapshots``."""
    frames, interval, equilibration = protocol
    r, g, frames_run = reference_rdfs(
        state,
        table,
        n_snapshots=frames,
        interval=interval,
        equilibration=equilibration,
        seed=seed,
        platform=platform,
        timestep=SAMPLER["timestep"],  # reference_rdfs uses the sampler's default friction, 1/ps = 1/tau
        **RDF_GRID,
    )
    return (r, g, frames_run) if snapshots else (r, g)


#: Blocks of the target run over which the noise of g, P and U/N is estimated (``--thermo``).
THERMO_BLOCKS = 10


def frame_observables(table: PairTable, state: StatePoint, snapshots) -> tuple:
    """Per-frame virial pressure (F,) in bar and pair energy per particle (F,) in kJ/mol of ``table``."""
    positions = torch.as_tensor(snapshots.positions)
    boxes = torch.as_tensor(snapshots.boxes)
    species = torch.as_tensor(state.particle_species())
    with torch.no_grad():
        pressure = virial_pressure(table, positions, boxes, species, temperature=state.temperature).numpy()
        energy = [float(potential_energy(table, x, b, species)) for x, b in zip(positions, boxes, strict=True)]
    return pressure, np.asarray(energy) / state.n_particles


def thermodynamic_targets(state: StatePoint, truth: PairTable, snapshots) -> Dict[str, float]:
    """The truth's virial pressure (bar) and mean pair energy per particle (kJ/mol) over ``snapshots``, their
    standard errors, and the variances of block means behind :func:`thermo_weights`.

    Returns ``pressure``, ``energy``, ``pressure_error``, ``energy_error``,
    ``g_variance`` (per-bin variance of g, averaged over bins and pair types),
    ``pressure_variance``, ``energy_variance`` (all of block means over
    ``THERMO_BLOCKS`` blocks) and ``n_bins``. The cache keeps these, not the
    weights, so that the weighting can change without new targets.
    """
    if len(snapshots.positions) < THERMO_BLOCKS:
        raise ValueError(f"--thermo needs at least {THERMO_BLOCKS} target frames, got {len(snapshots.positions)}")
    pressure, energy = frame_observables(truth, state, snapshots)
    size = len(pressure) // THERMO_BLOCKS
    blocks = [slice(b * size, (b + 1) * size) for b in range(THERMO_BLOCKS)]
    positions, boxes = torch.as_tensor(snapshots.positions), torch.as_tensor(snapshots.boxes)
    species = torch.as_tensor(state.particle_species())
    with torch.no_grad():
        g_blocks = torch.stack(
            [compute_partial_rdfs(positions[b], boxes[b], species, state.n_species, **RDF_GRID)[1] for b in blocks]
        ).numpy()  # (blocks, pair types, bins)
    variances = {
        "g_variance": float(g_blocks.var(axis=0, ddof=1).mean()),
        "pressure_variance": float(np.var([pressure[b].mean() for b in blocks], ddof=1)),
        "energy_variance": float(np.var([energy[b].mean() for b in blocks], ddof=1)),
    }
    for name, series in (("pressure_variance", pressure), ("energy_variance", energy)):
        # The denominators of thermo_weights; round-off alone (identical frames) leaves ~1e-30 of the mean^2.
        value = variances[name]
        if not (np.isfinite(value) and value > 1e-20 * max(float(series.mean()) ** 2, 1.0)):
            raise ValueError(
                f"state {state.name!r}: the {name.replace('_', ' ')} over {THERMO_BLOCKS} blocks of the target "
                f"frames is {value:.3g}; the frames do not sample the state (too few, or identical)"
            )
    return {
        "pressure": float(pressure.mean()),
        "energy": float(energy.mean()),
        "pressure_error": float(np.sqrt(variances["pressure_variance"] / THERMO_BLOCKS)),
        "energy_error": float(np.sqrt(variances["energy_variance"] / THERMO_BLOCKS)),
        **variances,
        "n_bins": int(g_blocks.shape[-1]),
    }


def thermo_weights(statistics: Dict[str, float]) -> Dict[str, float]:
    """``pressure_weight`` and ``energy_weight`` that make each term weigh like one RDF bin against its noise.

    A sample of n frames has a per-bin variance of g of v_g / n and a
    variance of its mean pressure of v_P / n. An RDF row's loss is the mean
    of (g - g_target)^2 over its B bins, so ``pressure_weight`` =
    v_g / (B v_P) gives (P - P_target)^2 the weight of one bin relative to
    its noise, as an inverse-variance (chi^2) fit would, whatever n;
    likewise ``energy_weight``. (Weighing each number like a whole row,
    v_g / v_P, let the precise energy outweigh the RDFs a hundredfold: on
    the binary mixture at x1 = 0.25 IMC then matched U/N to 0.2 kJ/mol with
    a potential 0.95 kT rms from the truth.)
    """
    per_bin = statistics["g_variance"] / statistics["n_bins"]
    return {
        "pressure_weight": per_bin / statistics["pressure_variance"],
        "energy_weight": per_bin / statistics["energy_variance"],
    }


def pair_keys(state: StatePoint) -> List[tuple]:
    s = state.species
    return [(s[a], s[b]) for a in range(len(s)) for b in range(a, len(s))]


#: What the target cache keeps per training state for ``--thermo`` (:func:`thermodynamic_targets`).
THERMO_KEYS = (
    "pressure",
    "energy",
    "pressure_error",
    "energy_error",
    "g_variance",
    "pressure_variance",
    "energy_variance",
    "n_bins",
)


def attach_targets(
    case_name: str,
    case,
    scale: str,
    cache: Path,
    platform: Optional[str],
    thermo: bool = False,
    simulate_missing: bool = True,
) -> tuple:
    """Simulate (or read cached) target RDFs of every state.

    ``simulate_missing=False`` (scripts that analyse potentials trained on
    the cached targets) raises FileNotFoundError instead of simulating new
    targets those potentials never saw.

    Returns the seconds spent simulating (per state) and, with ``thermo``,
    the truth's :func:`thermodynamic_targets` per training state (else an
    empty dict); those states also get ``pressure`` and ``energy``. The
    statistics come from the target run, or from an extra run of the truth
    (same protocol, another seed) when the cached targets have none.
    """
    truth = case["truth"]()
    spent: Dict[str, float] = {}
    statistics: Dict[str, Dict[str, float]] = {}
    n_train = len(case["train"])
    files = [cache / f"{scale}_{case['family']}_{state.name}.npz" for state in case["train"] + case["test"]]
    if not simulate_missing:
        missing = [str(file) for file in files if not file.exists()]
        if missing:
            raise FileNotFoundError(f"no cached targets of {case_name}: {', '.join(missing)}")
    for k, (state, file) in enumerate(zip(case["train"] + case["test"], files, strict=True)):
        want_thermo = thermo and k < n_train
        if file.exists():
            stored = dict(np.load(file))
        else:
            start = time.perf_counter()
            r, g, frames = simulate_rdfs(
                state, truth, SCALES[scale]["target"], seed=1000 + k, platform=platform, snapshots=True
            )
            spent[state.name] = time.perf_counter() - start
            stored = {"r": r, "g": g}
            if want_thermo:
                stored.update(thermodynamic_targets(state, truth, frames))
            cache.mkdir(parents=True, exist_ok=True)
            save_targets(file, stored)
        if want_thermo and not all(key in stored for key in THERMO_KEYS):
            # Targets cached before --thermo (or before these statistics): an independent run of the truth.
            start = time.perf_counter()
            _, _, frames = simulate_rdfs(
                state, truth, SCALES[scale]["target"], seed=2000 + k, platform=platform, snapshots=True
            )
            spent[f"{state.name} (thermo)"] = time.perf_counter() - start
            stored.update(thermodynamic_targets(state, truth, frames))
            save_targets(file, stored)
        if want_thermo:
            statistics[state.name] = {key: float(stored[key]) for key in THERMO_KEYS}
            state.pressure, state.energy = statistics[state.name]["pressure"], statistics[state.name]["energy"]
        r, g = stored["r"], stored["g"]
        state.targets = [Target(r, g[row], pair, state.name) for row, pair in enumerate(pair_keys(state))]
    return spent, statistics


def save_targets(file: Path, arrays: Dict[str, Any]) -> None:
    """Write a target cache file atomically: an interrupted rewrite leaves the earlier targets intact."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    _atomic_write_bytes(file, buffer.getvalue())


def thermo_options(statistics: Dict[str, Dict[str, float]]) -> Dict[str, float]:
    """``pressure_weight`` and ``energy_weight`` for the estimator: :func:`thermo_weights`, averaged over states."""
    weights = [thermo_weights(values) for values in statistics.values()]
    return {key: float(np.mean([w[key] for w in weights])) for key in ("pressure_weight", "energy_weight")}


def rdf_errors(state: StatePoint, g: np.ndarray) -> Dict[str, float]:
    """RMSE and mean |Δg| of simulated partial RDFs against the state's targets (averaged over pairs)."""
    rmse, mae = [], []
    for row, target in enumerate(state.targets):
        diff = g[row] - target.g
        rmse.append(float(np.sqrt(np.mean(diff**2))))
        mae.append(float(np.mean(np.abs(diff))))
    return {"rmse": float(np.mean(rmse)), "mean_abs": float(np.mean(mae))}


#: Seeds of the j-th repeat of an evaluation are offset by j * REPEAT_STRIDE (j = 0: the one-run seeds).
REPEAT_STRIDE = 1_000_000


def evaluate_states(
    table, states, scale: str, seed: int, platform: Optional[str], repeats: int = 1
) -> Dict[str, Dict[str, float]]:
    """RDF errors of ``table`` re-simulated at each state; where a state has a target pressure (``--thermo``),
    also ``pressure_error`` (bar) and ``energy_error`` (kJ/mol per particle) of the re-simulation.

    ``repeats`` > 1 re-simulates each state that many times (seeds ``seed + j * REPEAT_STRIDE``; the
    first is the one-run evaluation) and reports the mean of the runs' errors, each run's RMSE under
    ``rmse_runs`` and the RMSE of g(r) averaged over the runs under ``pooled_rmse``: near a
    coexistence line one run's error scatters by as much as methods differ. A re-simulation whose
    g(r) is not finite raises ValueError.
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
    out = {}
    for k, state in enumerate(states):
        runs, g_sum = [], 0.0
        for j in range(repeats):
            _, g, frames = simulate_rdfs(
                state,
                table,
                SCALES[scale]["evaluation"],
                seed=seed + k + REPEAT_STRIDE * j,
                platform=platform,
                snapshots=True,
            )
            if not np.all(np.isfinite(g)):
                raise ValueError(
                    f"the re-simulation at {state.name} (seed {seed + k + REPEAT_STRIDE * j}) gave a non-finite g(r)"
                )
            g_sum = g_sum + np.asarray(g, dtype=np.float64)
            errors = rdf_errors(state, g)
            if getattr(state, "pressure", None) is not None:
                pressure, energy = frame_observables(table, state, frames)
                errors["pressure_error"] = float(pressure.mean()) - state.pressure
                errors["energy_error"] = float(energy.mean()) - state.energy
            runs.append(errors)
        out[state.name] = {key: float(np.mean([run[key] for run in runs])) for key in runs[0]}
        if repeats > 1:
            out[state.name]["rmse_runs"] = [run["rmse"] for run in runs]
            out[state.name]["pooled_rmse"] = rdf_errors(state, g_sum / repeats)["rmse"]
    return out


def potential_difference(table: PairTable, truth: PairTable, train_states, k: int):
    """(region, diff): the bins of the RDF grid where g_target > 0.1 at any training state for pair type ``k``
    (inside the cutoff), and (u_learned - u_true)/kT on them, offset kept."""
    kT = float(np.mean([s.kT for s in train_states]))
    pair = truth.pair_keys()[k]
    r = np.asarray(train_states[0].targets[0].r)
    resolved = np.zeros(r.shape, dtype=bool)
    for state in train_states:
        for t in state.targets:
            if {tuple(t.pair), tuple(reversed(t.pair))} & {pair}:
                resolved |= np.asarray(t.g) > 0.1
    region = resolved & (r < CUTOFF)
    diff = (table.evaluate(r[region], k)[0] - truth.evaluate(r[region], k)[0]) / kT
    return region, np.asarray(diff, dtype=float)


def potential_error(table: PairTable, truth: PairTable, train_states) -> Dict[str, float]:
    """u(r) error against the truth in k_B T, where g_target > 0.1 at any training state, offset removed per pair.

    ``uncentred_rms_kT`` keeps the offset: both potentials are shifted to zero
    at the cutoff, so a level of the whole resolved range against u(r_c) is a
    real error (a step at the cutoff), to which the RDF near a critical point
    is more sensitive than to any local one; ``offset_kT`` is that level
    (largest in magnitude over the pair types).
    """
    rms, worst, uncentred, offsets = [], [], [], []
    for k in range(len(truth.pair_keys())):
        diff = potential_difference(table, truth, train_states, k)[1]
        uncentred.append(float(np.sqrt(np.mean(diff**2))))
        offsets.append(float(diff.mean()))
        diff = diff - diff.mean()
        rms.append(float(np.sqrt(np.mean(diff**2))))
        worst.append(float(np.abs(diff).max()))
    return {
        "rms_kT": float(np.mean(rms)),
        "max_kT": float(np.max(worst)),
        "uncentred_rms_kT": float(np.mean(uncentred)),
        "offset_kT": max(offsets, key=abs),
    }


def mean_of(errors: Dict[str, Dict[str, float]], key: str) -> Optional[float]:
    values = [e[key] for e in errors.values()]
    return float(np.mean(values)) if values else None


#: Boltzmann-inversion guesses every method starts from: through the estimator's kernel (the default since
#: the Boltzmann guess learned it), or plain -kT ln g of the smeared targets (every run before it; 0.85 kT too
#: soft at the Morse wall, docs/experiments.md "Inverting through the estimator's kernel").
GUESSES = ("deconvolved", "plain")


def initial_table(states, guess: str = "deconvolved") -> PairTable:
    """The spline table every method starts from: Boltzmann inversion of the states' targets (``guess``)."""
    if guess not in GUESSES:
        raise ValueError(f"guess must be one of {GUESSES}, got {guess!r}")
    smearing = RDF_GRID["smearing"] if guess == "deconvolved" else None
    return spline_table_from_targets(states, CUTOFF, knot_spacing=KNOT_SPACING, smearing=smearing)


def results_guess(case_result: Dict[str, Any]) -> str:
    """The guess a case's results started from (results without the key predate the choice: plain)."""
    return case_result.get("initial_guess", "plain")


# -- training -------------------------------------------------------------------------------------------------------


def curve_epochs(max_epochs: int, points: int) -> List[int]:
    """Epoch counts after which the potential is saved for the time-to-accuracy curve."""
    grid = np.unique(np.round(np.geomspace(1, max_epochs, max(points, 2))).astype(int))
    return sorted(set(int(e) for e in grid) | {max_epochs})


def train(
    method: str,
    table: PairTable,
    states,
    epochs: int,
    output: Path,
    seed: int,
    platform,
    points: int,
    thermo: Optional[Dict[str, float]] = None,
    settings: Optional[Dict[str, Any]] = None,
):
    """Train with one method; returns (runner, saved potentials along the way).

    ``settings`` replaces the method's METHOD_SETTINGS (a variant of it, as
    imc_variant_screen.py runs); the method's name still picks IBI or the
    Trainer, its estimator and any POLISH schedule. For a HANDOVER method
    they are the settings of its IBI phase; its first phase keeps HANDOVER's.

    ``thermo`` (``pressure_weight``, ``energy_weight``; the states carry the
    targets) fits the pressure and energy too: IBI by its pressure ramp, the
    other methods by those loss terms.
    """
    handover = HANDOVER.get(method)
    if handover is not None and not 0 < handover["epochs"] < epochs:
        raise ValueError(
            f"{method} hands over to IBI after {handover['epochs']} epoch(s) of {handover['method']}: it needs "
            f"more epochs than that, got {epochs}"
        )
    is_ibi = method == "ibi" or handover is not None  # IBI runs the method (or its second phase)
    settings, estimator_options = _runner_settings(
        METHOD_SETTINGS[method] if settings is None else settings, thermo, is_ibi
    )
    sampler_options = dict(SAMPLER)
    if platform:
        sampler_options["platform"] = platform
    saves = set(curve_epochs(epochs, points))
    saved: List[Dict[str, Any]] = []
    # CPU time of this process (all threads, OpenMM's included): on a shared
    # machine a steadier cost measure than wall time.
    cpu_start = time.process_time()

    polish = dict(POLISH.get(method, {}))
    polish_after = polish.pop("after_epoch", None)

    late = LATE_SAMPLES.get(method)
    # Epochs, MD steps and wall time of a HANDOVER method's first phase, added to the second's.
    before = dict(epoch=0, md_steps=0, wall_time=0.0)

    def keep(run, record):
        epoch = run.epoch + before["epoch"]
        if polish_after is not None and run.epoch == polish_after:
            run.options.update(polish)
        if late is not None and run.options["n_snapshots"] != late["n_snapshots"]:
            noise = (record.get("imc") or {}).get("loss_noise")
            if noise is not None and np.isfinite(noise) and record.get("loss", np.inf) < late["noise_ratio"] * noise:
                run.options["n_snapshots"] = late["n_snapshots"]
        if epoch in saves:
            replicas = estimator_options.get("n_replicas", 0)
            saved.append(
                dict(
                    epoch=epoch,
                    md_steps=run.md_steps + before["md_steps"],
                    rollout_replica_steps=run.rollout_steps * replicas,
                    wall_time=run.wall_time + before["wall_time"],
                    cpu_time=time.process_time() - cpu_start,
                    table=copy.deepcopy(run.table),
                )
            )

    common = dict(
        max_epochs=epochs,
        equilibration_steps=1000,
        sampler_options=sampler_options,
        estimator_options=estimator_options,
        output_dir=output,
        plot_every=0,
        seed=seed,
        progress=True,
        callbacks=[keep],
    )
    if handover is not None:
        first_settings, first_estimator = _runner_settings(
            dict(METHOD_SETTINGS[handover["method"]], **handover["overrides"]), thermo, ibi=False
        )
        first = Trainer(
            table,
            states,
            "reweighting",
            **dict(
                common,
                max_epochs=handover["epochs"],
                estimator_options=first_estimator,
                output_dir=Path(output) / "first-steps",
            ),
            **first_settings,
        )
        _fit(first)
        before.update(epoch=first.epoch, md_steps=first.md_steps, wall_time=first.wall_time)
        print(f"    handed over to IBI after {first.epoch} epoch(s) of {handover['method']}")
        run = IBI(first.table, states, **dict(common, max_epochs=epochs - first.epoch), **settings)
    elif method == "ibi":
        run = IBI(table, states, **common, **settings)
    else:
        estimator = "reweighting" if method.startswith("imc") or method == "gauss-newton" else method
        run = Trainer(table, states, estimator, **common, **settings)
    _fit(run)
    # The run's counters cover both phases of a HANDOVER method.
    run.epoch += before["epoch"]
    run.md_steps += before["md_steps"]
    run.wall_time += before["wall_time"]
    run.cpu_time = time.process_time() - cpu_start
    check = run.history[-1].get("final_check") if run.history else None
    if check is not None and saved and saved[-1]["epoch"] == run.epoch:
        # Trainer(imc_check_last): the last step was judged by one more sample
        # (and undone if it overshot). The final point is what fit() returned,
        # at what it cost.
        saved[-1].update(
            md_steps=run.md_steps, wall_time=run.wall_time, cpu_time=run.cpu_time, table=copy.deepcopy(run.table)
        )
    return run, saved


def _runner_settings(settings: Dict[str, Any], thermo: Optional[Dict[str, float]], ibi: bool) -> tuple:
    """(runner keywords, estimator options) of one method's settings: the RDF grid with the settings'
    ``estimator_options``; with ``thermo`` IBI gets its pressure ramp, the Trainer the loss weights."""
    settings = copy.deepcopy(settings)
    estimator_options = dict(RDF_GRID)
    estimator_options.update(settings.pop("estimator_options", {}))
    if thermo is not None:
        if ibi:
            settings["pressure_correction"] = True
        else:
            estimator_options.update(thermo)
    return settings, estimator_options


def _fit(run) -> None:
    try:
        run.fit()
    except ValueError as exc:
        # Trainer.plot() after the last epoch (log and checkpoint already written)
        # fails when u(r) never passes 50 kJ/mol above r = 0.01 (a soft spline core).
        if "r_min" not in str(exc):
            raise
        print(f"    (final plot skipped: {exc})")


# -- one case ----------------------------------------------------------------------------------------------------


#: Evaluation seeds of the i-th training seed are offset by i * SEED_STRIDE (i = 0: the single-seed seeds).
SEED_STRIDE = 10000
#: Training seed of the first run; the i-th of ``--seeds`` uses FIRST_TRAINING_SEED + i.
FIRST_TRAINING_SEED = 11


def run_files(output: Path, case: str, method: str, filename: str = "checkpoint.pt") -> List[tuple]:
    """(seed index, path) of every ``filename`` of ``method``'s runs in one output folder: one per
    ``seed-<i+1>`` folder, or the single-seed run's (index 0); empty when there is none. The final
    potentials are ``checkpoint.pt``, the potentials along the curve CURVE_POTENTIALS."""
    folder = Path(output) / case / method
    found = []
    for path in sorted(folder.glob(f"seed-*/{filename}")):
        number = path.parent.name[len("seed-") :]
        if not number.isdigit() or int(number) < 1:
            raise ValueError(f"{path.parent} is not a seed folder of paper_experiments.py (seed-1, seed-2, ...)")
        found.append((int(number) - 1, path))
    if not found and (folder / filename).exists():
        found.append((0, folder / filename))
    return sorted(found)


#: Name of the file in each run folder holding the potentials saved along the time-to-accuracy curve.
CURVE_POTENTIALS = "curve_potentials.pt"


def save_curve_potentials(folder: Path, saved: List[Dict[str, Any]]) -> Path:
    """Write the potentials saved along one run's curve (:func:`train`'s list: epoch, costs, table) to
    ``folder/curve_potentials.pt``, atomically."""
    path = Path(folder) / CURVE_POTENTIALS
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save([dict(point) for point in saved], path)
    return path


def load_curve_potentials(path: Path) -> List[Dict[str, Any]]:
    """The points of :func:`save_curve_potentials`, checked: each has an epoch, the costs of
    CURVE_COST_KEYS and a table, in increasing epochs."""
    try:
        points = torch.load(path, weights_only=False)
    except Exception as exc:  # noqa: BLE001 - torch.load raises many kinds on a damaged file
        raise ValueError(f"{path} is not a curve potentials file that torch can read: {exc}") from exc
    if not isinstance(points, list) or not points:
        raise ValueError(f"{path} holds no list of curve points")
    for k, point in enumerate(points):
        missing = [key for key in ("epoch", "table", *CURVE_COST_KEYS) if key not in point]
        if missing:
            raise ValueError(f"{path}: curve point {k} lacks {', '.join(missing)}")
        if not isinstance(point["table"], PairTable):
            raise ValueError(f"{path}: curve point {k} holds a {type(point['table']).__name__}, not a PairTable")
    epochs = [point["epoch"] for point in points]
    if epochs != sorted(set(epochs)):
        raise ValueError(f"{path}: the curve's epochs are not increasing: {epochs}")
    return points


def run_case(
    name: str,
    case,
    methods,
    scale: str,
    output: Path,
    platform: Optional[str],
    seeds: int = 1,
    thermo: bool = False,
    first_seed: int = FIRST_TRAINING_SEED,
    guess: str = "deconvolved",
    evaluation_repeats: int = 1,
) -> Dict[str, Any]:
    """Every method on one case; with ``seeds`` > 1 each method is trained and evaluated ``seeds`` times
    (training seeds ``first_seed``, ``first_seed + 1``, ..., evaluation seeds offset by SEED_STRIDE) and
    the entry holds the means, the per-seed entries under ``"seeds"``. A ``first_seed`` above
    FIRST_TRAINING_SEED continues an earlier invocation's seeds with independent ones (training,
    noise-floor and evaluation seeds all move on). ``thermo``: fit the truth's pressure and energy too
    (:func:`attach_targets`, :func:`train`). ``guess``: the start of every method (:func:`initial_table`).
    ``evaluation_repeats``: re-simulations averaged in every evaluation at the training states (the noise
    floor, the initial guess, every curve point; :func:`evaluate_states`); the test states get one."""
    if guess not in GUESSES:
        raise ValueError(f"guess must be one of {GUESSES}, got {guess!r}")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be a positive integer, got {seeds!r}")
    if isinstance(evaluation_repeats, bool) or not isinstance(evaluation_repeats, int) or evaluation_repeats < 1:
        raise ValueError(f"evaluation_repeats must be a positive integer, got {evaluation_repeats!r}")
    if isinstance(first_seed, bool) or not isinstance(first_seed, int) or first_seed < FIRST_TRAINING_SEED:
        raise ValueError(f"first_seed must be an integer of at least {FIRST_TRAINING_SEED}, got {first_seed!r}")
    indices = [first_seed - FIRST_TRAINING_SEED + i for i in range(seeds)]
    # One run without a seed folder: the layout of single-seed invocations from the first seed.
    seed_folders = seeds > 1 or first_seed != FIRST_TRAINING_SEED
    spec = SCALES[scale]
    print(f"\n=== {name}: train {[s.name for s in case['train']]}, test {[s.name for s in case['test']]} ===")
    target_seconds, thermo_targets = attach_targets(name, case, scale, output / "targets", platform, thermo=thermo)
    truth = case["truth"]()
    train_states, test_states = case["train"], case["test"]
    initial = initial_table(train_states, guess)
    result: Dict[str, Any] = {
        "train_states": [s.name for s in train_states],
        "test_states": [s.name for s in test_states],
        "n_particles": train_states[0].n_particles,
        "target_seconds": target_seconds,
        "n_seeds": seeds,
        "first_seed": first_seed,
        "initial_guess": guess,
        "evaluation_repeats": evaluation_repeats,
        "methods": {},
    }
    if thermo_targets:
        result["thermo"] = {"targets": thermo_targets, "options": thermo_options(thermo_targets)}
    # The noise floor: the truth re-simulated with the evaluation protocol (once per seed, J times at the
    # training states with evaluation_repeats = J).
    noise_runs = [
        (
            evaluate_states(truth, train_states, scale, 7000 + SEED_STRIDE * i, platform, evaluation_repeats),
            evaluate_states(truth, test_states, scale, 7100 + SEED_STRIDE * i, platform),
        )
        for i in indices
    ]
    result["noise"] = {
        "train_rmse": _mean([mean_of(train, "rmse") for train, _ in noise_runs]),
        "test_rmse": _mean([mean_of(test, "rmse") for _, test in noise_runs]),
        "per_state": _mean_per_state([{**train, **test} for train, test in noise_runs]),
    }
    if seeds > 1:
        result["noise"]["train_rmse_seeds"] = [mean_of(train, "rmse") for train, _ in noise_runs]
    initial_rmse = [
        mean_of(
            evaluate_states(initial, train_states, scale, 8000 + SEED_STRIDE * i, platform, evaluation_repeats),
            "rmse",
        )
        for i in indices
    ]
    result["initial"] = {
        "train_rmse": _mean(initial_rmse),
        "u_error": potential_error(initial, truth, train_states),
    }
    for method in methods:
        epochs = spec["epochs"][method]
        runs = []
        for n, i in enumerate(indices):
            label = f" (seed {n + 1} of {seeds}, training seed {FIRST_TRAINING_SEED + i})" if seed_folders else ""
            print(f"--- {name} / {method}: {epochs} epochs{label}")
            folder = output / name / method / f"seed-{i + 1}" if seed_folders else output / name / method
            runs.append(
                train_and_evaluate(
                    method,
                    initial,
                    truth,
                    train_states,
                    test_states,
                    scale,
                    folder,
                    seed_index=i,
                    initial_rmse=initial_rmse[n],
                    platform=platform,
                    thermo=result["thermo"]["options"] if thermo_targets else None,
                    evaluation_repeats=evaluation_repeats,
                )
            )
        entry = runs[0] if seeds == 1 else aggregate_seeds(runs)
        result["methods"][method] = entry
        spread = f" (mean of {seeds} seeds)" if seeds > 1 else ""
        print(
            f"    {method}{spread}: train RMSE {entry['train_rmse']:.4f}, test RMSE "
            f"{entry['test_rmse'] if entry['test_rmse'] is None else round(entry['test_rmse'], 4)}, "
            f"u rms {entry['u_error']['rms_kT']:.3f} kT, {entry['md_steps']} MD steps, {entry['wall_time']:.0f} s"
        )
    result["goal"] = case_goal(result["methods"])
    return result


def train_and_evaluate(
    method: str,
    initial: PairTable,
    truth: PairTable,
    train_states,
    test_states,
    scale: str,
    folder: Path,
    seed_index: int,
    initial_rmse: float,
    platform: Optional[str],
    thermo: Optional[Dict[str, float]] = None,
    evaluation_repeats: int = 1,
) -> Dict[str, Any]:
    """One training run from ``initial`` and the re-simulation of its saved potentials: one method's entry
    (training-state evaluations averaged over ``evaluation_repeats`` runs)."""
    spec = SCALES[scale]
    offset = SEED_STRIDE * seed_index
    run, saved = train(
        method,
        copy.deepcopy(initial),
        train_states,
        spec["epochs"][method],
        folder,
        seed=FIRST_TRAINING_SEED + seed_index,
        platform=platform,
        points=spec["curve_points"],
        thermo=thermo,
    )
    # Every saved potential with its cost, so that the curve can be re-simulated later
    # (benchmarks/reevaluate_final.py --curves) without training again.
    save_curve_potentials(folder, saved)
    curve = [
        dict(
            epoch=0,
            md_steps=0,
            rollout_replica_steps=0,
            wall_time=0.0,
            cpu_time=0.0,
            train_rmse=initial_rmse,
            u_rms_kT=potential_error(initial, truth, train_states)["rms_kT"],
        )
    ]
    final_train = evaluate_states(run.table, train_states, scale, 9000 + offset, platform, evaluation_repeats)
    final_test = evaluate_states(run.table, test_states, scale, 9100 + offset, platform)
    for k, point in enumerate(saved):
        # The last saved potential is the final one: reuse its evaluation.
        last = point["epoch"] == run.epoch
        errors = (
            final_train
            if last
            else evaluate_states(
                point["table"], train_states, scale, 8000 + 100 * k + offset, platform, evaluation_repeats
            )
        )
        curve.append(
            dict(
                {key: point[key] for key in ("epoch", "md_steps", "rollout_replica_steps", "wall_time", "cpu_time")},
                train_rmse=mean_of(errors, "rmse"),
                train_mean_abs=mean_of(errors, "mean_abs"),
                u_rms_kT=potential_error(point["table"], truth, train_states)["rms_kT"],
            )
        )
    return {
        "epochs": run.epoch,
        "seed": FIRST_TRAINING_SEED + seed_index,
        "train_rmse": mean_of(final_train, "rmse"),
        "train_mean_abs": mean_of(final_train, "mean_abs"),
        "test_rmse": mean_of(final_test, "rmse"),
        "test_mean_abs": mean_of(final_test, "mean_abs"),
        "per_state": {**final_train, **final_test},
        "u_error": potential_error(run.table, truth, train_states),
        "md_steps": run.md_steps,
        "rollout_replica_steps": saved[-1]["rollout_replica_steps"] if saved else 0,
        "wall_time": run.wall_time,
        "cpu_time": run.cpu_time,
        "curve": curve,
    }


def _mean(values) -> Optional[float]:
    """Mean of numbers; None when there are none or any is None (a case without test states)."""
    values = list(values)
    if not values or any(v is None for v in values):
        return None
    return float(np.mean(values))


def _mean_per_state(runs: List[Dict[str, Dict[str, Any]]]) -> Dict[str, Dict[str, Any]]:
    """Per state, the mean of each error over the runs; lists (``rmse_runs``) are joined, not averaged."""
    return {
        state: {
            key: (
                [value for run in runs for value in run[state][key]]
                if isinstance(runs[0][state][key], list)
                else _mean(run[state][key] for run in runs)
            )
            for key in runs[0][state]
        }
        for state in runs[0]
    }


CURVE_COST_KEYS = ("md_steps", "rollout_replica_steps", "wall_time", "cpu_time")
CURVE_ERROR_KEYS = ("train_rmse", "train_mean_abs", "u_rms_kT")


def aggregate_seeds(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """One entry from several seeds' entries of one method: means, standard deviations, curve bands.

    The curves are averaged point by point, so every seed must save its potentials after the same
    epochs. Each averaged curve point also holds the lowest and highest error over the seeds
    (``train_rmse_min``, ``train_rmse_max``, ...). The seeds' own entries are kept under ``"seeds"``.
    """
    if len(runs) < 2:
        raise ValueError(f"aggregate_seeds needs at least 2 runs, got {len(runs)}")
    grids = [[p["epoch"] for p in run["curve"]] for run in runs]
    if any(grid != grids[0] for grid in grids):
        raise ValueError(f"the seeds saved their potentials after different epochs: {grids}")
    out: Dict[str, Any] = {
        key: _mean(run[key] for run in runs)
        for key in ("train_rmse", "train_mean_abs", "test_rmse", "test_mean_abs", "wall_time", "cpu_time")
    }
    out["epochs"] = max(run["epochs"] for run in runs)
    out["md_steps"] = int(round(float(np.mean([run["md_steps"] for run in runs]))))
    out["rollout_replica_steps"] = int(round(float(np.mean([run["rollout_replica_steps"] for run in runs]))))
    out["u_error"] = {key: _mean(run["u_error"][key] for run in runs) for key in runs[0]["u_error"]}
    out["per_state"] = _mean_per_state([run["per_state"] for run in runs])
    out["sd"] = {
        "train_rmse": float(np.std([run["train_rmse"] for run in runs], ddof=1)),
        "u_rms_kT": float(np.std([run["u_error"]["rms_kT"] for run in runs], ddof=1)),
    }
    curve = []
    for j, epoch in enumerate(grids[0]):
        points = [run["curve"][j] for run in runs]
        point: Dict[str, Any] = {"epoch": epoch}
        for key in CURVE_COST_KEYS + CURVE_ERROR_KEYS:
            if all(key in p and p[key] is not None for p in points):
                values = [float(p[key]) for p in points]
                point[key] = float(np.mean(values))
                if key in CURVE_ERROR_KEYS:
                    point[f"{key}_min"], point[f"{key}_max"] = min(values), max(values)
        curve.append(point)
    out["curve"] = curve
    out["seeds"] = runs
    return out


def case_goal(methods: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The time-to-accuracy goal on the (seed-averaged) curves, and, with seeds, on each seed's own runs."""
    goal = time_to_accuracy_goal(methods)
    if goal is None:
        return None
    counts = {len(entry.get("seeds", [])) for entry in methods.values()}
    if len(counts) == 1 and counts != {0}:
        (n,) = counts
        per_seed = [time_to_accuracy_goal({m: e["seeds"][i] for m, e in methods.items()}) for i in range(n)]
        goal["per_seed_goal_met_by"] = [g["goal_met_by"] for g in per_seed]
        goal["per_seed"] = per_seed
    return goal


def _first_reaching(curve, level: float, key: str) -> Optional[Dict[str, Any]]:
    for point in curve:
        if point[key] is not None and point[key] <= level:
            return point
    return None


def time_to_accuracy_goal(methods: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """Does a gradient method reach IBI's final RDF error sooner, and a u(r) error IBI never reaches?"""
    if "ibi" not in methods:
        return None
    ibi = methods["ibi"]
    level = ibi["train_rmse"]
    ibi_point = _first_reaching(ibi["curve"], level, "train_rmse") or ibi["curve"][-1]
    ibi_best_u = min(p["u_rms_kT"] for p in ibi["curve"])
    out: Dict[str, Any] = {
        "ibi_final_rmse": level,
        "ibi_steps_to_it": total_steps(ibi_point),
        "ibi_seconds_to_it": ibi_point["wall_time"],
        "ibi_best_u_rms_kT": ibi_best_u,
        "methods": {},
    }
    for name, entry in methods.items():
        if name == "ibi":
            continue
        point = _first_reaching(entry["curve"], level, "train_rmse")
        best_u = min(p["u_rms_kT"] for p in entry["curve"])
        out["methods"][name] = {
            "reaches_ibi_rmse": point is not None,
            "steps_to_it": None if point is None else total_steps(point),
            "seconds_to_it": None if point is None else point["wall_time"],
            "fewer_steps": point is not None and total_steps(point) < out["ibi_steps_to_it"],
            "less_time": point is not None and point["wall_time"] < out["ibi_seconds_to_it"],
            "best_u_rms_kT": best_u,
            "better_u_than_ibi": best_u < ibi_best_u,
        }
        m = out["methods"][name]
        m["goal_met"] = bool(m["fewer_steps"] and m["less_time"] and m["better_u_than_ibi"])
    out["goal_met_by"] = [n for n, m in out["methods"].items() if m["goal_met"]]
    return out


def total_steps(point) -> int:
    return int(point["md_steps"] + point.get("rollout_replica_steps", 0))


# -- outputs ----------------------------------------------------------------------------------------------------


def plot_case(name: str, result: Dict[str, Any], output: Path, note: str = "") -> List[Path]:
    """The time-to-accuracy and potential-error plots of one case against wall time, CPU time and MD
    steps; ``note`` is added to the titles (e.g. how the curve points were evaluated)."""
    from openmm_diffsim.plotting import plot_time_to_accuracy

    methods = result["methods"]
    threshold = methods["ibi"]["train_rmse"] if "ibi" in methods else None
    written = []
    for axis, label, key in (
        ("wall", "training wall time (s)", lambda p: p["wall_time"]),
        ("cpu", "training CPU time (s, all threads)", lambda p: p["cpu_time"]),
        ("steps", "MD steps (OpenMM + rollout replica steps)", total_steps),
    ):
        curves = {
            m: (np.array([key(p) for p in e["curve"]], dtype=float), np.array([p["train_rmse"] for p in e["curve"]]))
            for m, e in methods.items()
        }
        averaged = _seed_label(methods)
        written.append(
            plot_time_to_accuracy(
                output / f"{name}_time_to_accuracy_{axis}.png",
                curves,
                xlabel=label,
                ylabel="RDF RMSE at the training state(s), re-simulated",
                threshold=threshold,
                title=f"{name}: RDF error vs cost{averaged}{note}\n(dotted: IBI's final error)",
                spread=_bands(methods, key, "train_rmse"),
            )
        )
        u_curves = {
            m: (np.array([key(p) for p in e["curve"]], dtype=float), np.array([p["u_rms_kT"] for p in e["curve"]]))
            for m, e in methods.items()
        }
        written.append(
            plot_time_to_accuracy(
                output / f"{name}_potential_error_{axis}.png",
                u_curves,
                xlabel=label,
                ylabel="u(r) rms error vs truth (kT)",
                title=f"{name}: potential error vs cost{averaged}{note}",
                spread=_bands(methods, key, "u_rms_kT"),
            )
        )
    return written


def _seed_label(methods: Dict[str, Any]) -> str:
    """Title line saying what the curves average: methods kept from other invocations may differ in seeds."""
    counts = {len(e.get("seeds", [])) or 1 for e in methods.values()}
    if counts == {1}:
        return ""
    if len(counts) == 1:
        return f"\nmean of {counts.pop()} seeds (band: lowest to highest)"
    # Two short lines: one line of this length overran the 5.5-inch figure.
    return "\nseed means where run with several seeds\n(band: lowest to highest seed)"


def _bands(methods, cost, error: str) -> Dict[str, tuple]:
    """Lowest-to-highest error bands of the seed-averaged curves (methods run with one seed have none)."""
    bands = {}
    for m, e in methods.items():
        if all(f"{error}_min" in p for p in e["curve"]):
            x = np.array([cost(p) for p in e["curve"]], dtype=float)
            low = np.array([p[f"{error}_min"] for p in e["curve"]])
            high = np.array([p[f"{error}_max"] for p in e["curve"]])
            bands[m] = (x, low, high)
    return bands


def _fmt(value, digits=4):
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(results: Dict[str, Any], scale_notes: Dict[str, Any]) -> str:
    lines = [
        "| case | method | train RMSE | train mean abs dg | test RMSE | test mean abs dg | u rms (kT) | u max (kT) "
        "| OpenMM MD steps | rollout replica steps | wall time (s) | CPU time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, result in results.items():
        noise = result["noise"]
        lines.append(
            f"| {name} | truth (noise floor) | {_fmt(noise['train_rmse'])} | | {_fmt(noise['test_rmse'])} "
            "| | | | | | | |"
        )
        init = result["initial"]
        lines.append(
            f"| {name} | initial (Boltzmann inversion) | {_fmt(init['train_rmse'])} | | | "
            f"| {_fmt(init['u_error']['rms_kT'], 3)} | | 0 | 0 | 0 | 0 |"
        )
        for method, e in result["methods"].items():
            sd = e.get("sd", {})
            seeds = f" (mean of {len(e['seeds'])} seeds)" if "seeds" in e else ""
            train = _fmt(e["train_rmse"]) + (f" ± {sd['train_rmse']:.4f}" if sd else "")
            u_rms = _fmt(e["u_error"]["rms_kT"], 3) + (f" ± {sd['u_rms_kT']:.3f}" if sd else "")
            lines.append(
                f"| {name} | {method}{seeds} | {train} | {_fmt(e['train_mean_abs'])} | {_fmt(e['test_rmse'])} "
                f"| {_fmt(e['test_mean_abs'])} | {u_rms} | {_fmt(e['u_error']['max_kT'], 3)} "
                f"| {e['md_steps']} | {e['rollout_replica_steps']} | {e['wall_time']:.0f} | {e['cpu_time']:.0f} |"
            )
    lines.append("")
    lines.append("Rows of several seeds: mean ± standard deviation over the seeds.")
    lines.append("")
    lines.append(f"Settings: {json.dumps(scale_notes)}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="reduced")
    parser.add_argument("--quick", action="store_true", help="same as --scale quick (a smoke test)")
    parser.add_argument("--cases", nargs="+", default=["lj"], help="case names, or 'all'")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--output", default="benchmarks/results/paper", help="output folder")
    parser.add_argument("--platform", default=None, help="OpenMM platform (default: fastest)")
    parser.add_argument("--epochs", nargs="+", default=[], metavar="METHOD=N", help="override epochs per method")
    parser.add_argument(
        "--curve-points",
        type=int,
        default=None,
        metavar="N",
        help="potentials saved (and re-simulated) per method along the time-to-accuracy curve "
        "(default: the scale's; more points place the crossing of IBI's final error more exactly)",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=1,
        metavar="K",
        help="train and evaluate every method K times (training seeds 11, 12, ...; evaluation seeds offset too) "
        "and report the means, the spread and the goal per seed",
    )
    parser.add_argument(
        "--first-seed",
        type=int,
        default=FIRST_TRAINING_SEED,
        metavar="S",
        help=f"training seed of the first of the K runs (default {FIRST_TRAINING_SEED}); a later one adds "
        "independent seeds to an earlier invocation's (use another --output: the results of a case are replaced)",
    )
    parser.add_argument(
        "--guess",
        choices=GUESSES,
        default="deconvolved",
        help="the Boltzmann-inversion start of every method: through the estimator's kernel (default) or plain "
        "-kT ln g of the smeared targets (the runs before the kernel was inverted; use another --output)",
    )
    parser.add_argument(
        "--evaluation-repeats",
        type=int,
        default=1,
        metavar="J",
        help="average every evaluation at the training states over J re-simulations (default 1); near a "
        "coexistence line one run's RDF error scatters by as much as methods differ (use another --output)",
    )
    parser.add_argument(
        "--thermo",
        action="store_true",
        help="fit the truth's pressure and pair energy at the training states too (IBI: its pressure ramp); "
        "use another --output than for RDF-only runs",
    )
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds takes a positive integer, got {args.seeds}")
    if args.first_seed < FIRST_TRAINING_SEED:
        parser.error(f"--first-seed takes an integer of at least {FIRST_TRAINING_SEED}, got {args.first_seed}")
    if args.evaluation_repeats < 1:
        parser.error(f"--evaluation-repeats takes a positive integer, got {args.evaluation_repeats}")
    scale = "quick" if args.quick else args.scale
    for item in args.epochs:
        method, _, value = item.partition("=")
        if method not in METHODS or not value.isdigit():
            parser.error(f"--epochs takes METHOD=N with METHOD in {METHODS}, got {item!r}")
        SCALES[scale]["epochs"][method] = int(value)
    if args.curve_points is not None:
        if args.curve_points < 2:
            parser.error(f"--curve-points takes an integer of at least 2, got {args.curve_points}")
        SCALES[scale]["curve_points"] = args.curve_points
    cases = all_cases(SCALES[scale]["n"])
    names = list(cases) if args.cases == ["all"] else args.cases
    unknown = [n for n in names if n not in cases]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; cases: {', '.join(cases)}")
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    results_file = output / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    for name in names:
        # Methods not rerun keep their earlier results: only if they started where the new ones will.
        if name in results and results_guess(results[name]) != args.guess:
            parser.error(
                f"{results_file} holds {name} from the {results_guess(results[name])} guess, not --guess "
                f"{args.guess}: use another --output (or --guess {results_guess(results[name])})"
            )
        recorded = results.get(name, {}).get("evaluation_repeats", 1)
        if name in results and recorded != args.evaluation_repeats:
            parser.error(
                f"{results_file} holds {name} evaluated with {recorded} run(s) per evaluation, not "
                f"--evaluation-repeats {args.evaluation_repeats}: use another --output"
            )
    settings = {
        "scale": scale,
        **{k: v for k, v in SCALES[scale].items()},
        "methods": METHOD_SETTINGS,
        "schedules": POLISH,
        "late_samples": LATE_SAMPLES,
        "rdf_grid": RDF_GRID,
        "sampler": SAMPLER,
        "knot_spacing": KNOT_SPACING,
        "seeds": args.seeds,
        "first_seed": args.first_seed,
        "initial_guess": args.guess,
        "evaluation_repeats": args.evaluation_repeats,
        "thermo": args.thermo,
    }
    for name in names:
        previous = results.get(name, {}).get("methods", {})
        results[name] = run_case(
            name,
            cases[name],
            args.methods,
            scale,
            output,
            args.platform,
            seeds=args.seeds,
            thermo=args.thermo,
            first_seed=args.first_seed,
            guess=args.guess,
            evaluation_repeats=args.evaluation_repeats,
        )
        # Methods not run this time keep their earlier results (same targets, same protocol).
        kept = {m: e for m, e in previous.items() if m not in args.methods}
        if kept:
            results[name]["methods"] = {**kept, **results[name]["methods"]}
            results[name]["goal"] = case_goal(results[name]["methods"])
        results[name]["settings"] = settings
        # Atomically: the file holds the cases and methods of earlier invocations too.
        _atomic_write_bytes(results_file, json.dumps(results, indent=1).encode())
        plot_case(name, results[name], output)
        _atomic_write_bytes(output / "results.md", markdown_table(results, settings).encode())
        goal = results[name]["goal"]
        if goal:
            print(f"time-to-accuracy goal for {name}: met by {goal['goal_met_by'] or 'no method'}")
            if "per_seed_goal_met_by" in goal:
                print(f"    per seed: {goal['per_seed_goal_met_by']}")
            for method, m in goal["methods"].items():
                print(f"    {method}: {m}")
    print(f"results in {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
