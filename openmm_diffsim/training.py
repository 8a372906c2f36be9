"""The trainer: alternate OpenMM sampling and gradient estimation to fit a pair potential.

One :class:`Trainer` fits one :class:`~openmm_diffsim.potentials.PairTable`
to RDF targets at one or more state points (temperatures, densities,
compositions), sharing the potential between them. Each epoch it

1. samples every state point with OpenMM (only when the estimator needs new
   snapshots: always for rollouts, when the effective sample size drops for
   reweighting),
2. asks the estimator for the state's loss and accumulates the gradient,
3. checks the gradient, clips it and takes one optimiser step,
4. logs, checkpoints (atomically) and plots.

A step that makes sampling or the loss non-finite is rolled back, the learning
rate is reduced and the event is logged; a run killed at any point resumes from
its last checkpoint with :meth:`Trainer.resume`.

In a ``torch.distributed`` process group of several processes (``torchrun``,
see :mod:`openmm_diffsim.distributed`) :meth:`Trainer.fit` splits the state
points between the processes, sums their gradients and takes the same step
everywhere; only rank 0 prints and writes. Every random stream is seeded per
state, so the result equals one process's.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .potentials import CubicSpline, NeuralCorrection, PairPotential, PairTable, PotentialSum

__all__ = ["Trainer", "TrainingError", "boltzmann_inversion", "fit_table_to_curve", "ESTIMATORS"]

logger = logging.getLogger("openmm_diffsim.training")

ESTIMATORS = ("reweighting", "rollout", "adjoint", "hybrid")
OPTIMIZERS = ("adam", "sgd", "gauss-newton", "imc", "natural")
CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "log.jsonl"


class TrainingError(RuntimeError):
    """Training cannot continue (e.g. repeated blow-ups after rolling back)."""


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def atomic_torch_save(obj: Any, path: Union[str, Path]) -> None:
    """``torch.save`` to a temporary file, fsync, then rename over ``path``.

    A run killed mid-write leaves the previous file intact.
    """
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    _atomic_write_bytes(Path(path), buffer.getvalue())


def boltzmann_inversion(r: np.ndarray, g: np.ndarray, kT: float, g_min: float = 1e-3) -> tuple:
    """u0(r) = -kT ln g(r) where g is resolved.

    Parameters
    ----------
    r, g : numpy.ndarray, shape (n,)
        Target RDF (nm, dimensionless).
    kT : float
        Thermal energy in kJ/mol.
    g_min : float
        Bins with g below this are dropped (u undefined there).

    Returns
    -------
    r_valid, u : numpy.ndarray
        Distances (nm) and potential of mean force (kJ/mol) on the kept bins.
    """
    r = np.asarray(r, dtype=np.float64)
    g = np.asarray(g, dtype=np.float64)
    keep = g > g_min
    if keep.sum() < 4:
        raise ValueError("Boltzmann inversion needs at least 4 bins with g(r) > g_min")
    return r[keep], -kT * np.log(g[keep])


def fit_table_to_curve(
    table: PairTable,
    pair,
    r: np.ndarray,
    u: np.ndarray,
    weights: Optional[np.ndarray] = None,
    iterations: int = 200,
) -> float:
    """Least-squares fit of one pair type's u(r) to a curve (in place, L-BFGS).

    Only that pair type's parameters change. Returns the final RMS error (kJ/mol).
    """
    k = table.pair_index(pair)
    module = table.pair_potentials[k]
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"pair {table.pair_names[k]} has no trainable parameters to fit")
    r_t = torch.as_tensor(np.asarray(r, dtype=np.float64))
    u_t = torch.as_tensor(np.asarray(u, dtype=np.float64))
    w_t = torch.ones_like(u_t) if weights is None else torch.as_tensor(np.asarray(weights, dtype=np.float64))
    pair_type = torch.full_like(r_t, k, dtype=torch.long)
    optimizer = torch.optim.LBFGS(params, lr=0.5, max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        model = table.energy_and_derivative(r_t, pair_type)[0]
        loss = (w_t * (model - u_t) ** 2).sum() / w_t.sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        model = table.energy_and_derivative(r_t, pair_type)[0]
        return float(torch.sqrt(((model - u_t) ** 2).mean()))


def check_fit_inputs(table: PairTable, states: Sequence, fitter: str) -> List:
    """Check a potential and its state points before a fit; returns the states as a list.

    Shared by :class:`Trainer` and :class:`~openmm_diffsim.ibi.IBI`: a
    PairTable, at least one StatePoint, unique names, every state with
    targets whose species the table knows.
    """
    from .systems import StatePoint

    if not isinstance(table, PairTable):
        raise TypeError(f"table must be a PairTable, got {type(table).__name__}")
    states = list(states)
    if not states:
        raise ValueError(f"{fitter} needs at least one state point")
    names = [s.name for s in states]
    if len(set(names)) != len(names):
        raise ValueError(f"state point names must be unique, got {names}")
    for s in states:
        if not isinstance(s, StatePoint):
            raise TypeError(f"states must be StatePoint objects, got {type(s).__name__}")
        if not s.targets:
            raise ValueError(f"state point {s.name!r} has no targets to fit")
        for t in s.targets:
            for species in t.pair:
                if species not in table.species:
                    raise ValueError(
                        f"state {s.name!r}: target pair {t.pair} names species {species!r}, "
                        f"which the potential does not have (species: {table.species})"
                    )
    return states


class Trainer:
    """Fit a pair potential to RDF targets at several state points.

    Parameters
    ----------
    table : PairTable
        The potential to train (modified in place).
    states : sequence of StatePoint
        State points with their ``targets`` and loss ``weight``.
    estimator : {"reweighting", "rollout", "adjoint", "hybrid"} or Estimator
        Gradient estimator. ``hybrid`` uses a rollout gradient on fresh
        snapshots and reweighting while they stay usable.
    learning_rate : float
        Initial learning rate.
    optimizer : {"adam", "sgd", "gauss-newton", "imc"}
        Optimiser. ``gauss-newton`` (reweighting only) takes Levenberg–Marquardt
        steps with the exact Jacobian of the reweighted RDFs (the inverse
        Monte Carlo matrix) under an N_eff trust region; ``imc`` (reweighting
        only) takes one damped Newton step with that Jacobian per fresh sample,
        capped in potential change (inverse Monte Carlo). Both ignore
        ``learning_rate``. ``natural`` (any estimator) preconditions the
        gradient with the Fisher metric of the Boltzmann distribution
        (:func:`~openmm_diffsim.gradients.fisher_metric`, damped by
        ``imc_damping``) and steps so that u(r) changes by ``learning_rate``
        kT where g(r) > 0.05 (under ``lr_schedule``): the optimiser the
        rollout estimators need.
    max_epochs : int
        Number of optimiser steps.
    n_snapshots, snapshot_interval : int
        Snapshots per sampling run and MD steps between them.
    equilibration_steps : int
        MD steps before the first sampling run of each state.
    reequilibration_steps : int, optional
        MD steps discarded after each parameter hand-over (default: two
        snapshot intervals).
    sampler_options : dict, optional
        Passed to :class:`~openmm_diffsim.sampling.Sampler` (backend, platform,
        timestep, friction, integrator, ...).
    estimator_options : dict, optional
        Passed to the estimator (r_range, n_bins, smearing, n_steps, ...).
    clip_norm : float, optional
        Clip the total gradient norm.
    target_loss : float, optional
        Stop when the total loss falls below this.
    plateau_patience : int, optional
        Stop when the best loss has not improved by 1 % for this many epochs.
    lr_schedule : {"constant", "cosine"}
        Learning-rate schedule over ``max_epochs``.
    learning_rate_scales : dict, optional
        Multipliers of the learning rate for parameters whose name (as in
        ``table.named_parameters()``) equals or ends with the key, e.g.
        ``{"sigma": 0.02}`` when σ (nm) trains next to energies (kJ/mol).
    output_dir : str or Path, optional
        Where checkpoints, the JSON-lines log and plots go. Nothing is written without it.
    checkpoint_every, plot_every : int
        Epoch intervals (0 disables plots except at the end).
    seed : int
        Seeds the samplers and estimators.
    progress : bool
        Print one line per epoch.
    boltzmann_initial_guess : bool
        Fit u0(r) = -kT ln g_target(r) into the potential before training,
        inverted through the estimator's bins and smearing
        (:func:`~openmm_diffsim.ibi.deconvolved_inversion`; plain with a
        custom estimator that has no RDF grid).
    max_retries : int
        Consecutive rolled-back steps tolerated before giving up.
    callbacks : sequence of callables
        Called as ``callback(trainer, record)`` after every epoch.
    samplers : mapping of state name to Sampler, or sequence of Sampler, optional
        Pre-built samplers to use instead of building one per state, e.g.
        :meth:`Sampler.from_simulation <openmm_diffsim.sampling.Sampler.from_simulation>`
        on a user's own ``Simulation``; each must sample the very state object
        in ``states`` (``states=[sampler.state]``). Only the pair potential is
        trained; the Simulation's other forces stay fixed. Such states need
        the ``reweighting`` estimator (torch rollouts cannot integrate the
        other forces), and :meth:`resume` cannot rebuild them.
    average_last : int
        If > 1, the final parameters are the mean of the last ``average_last``
        iterates (iterate averaging against the noise of the last steps).
    imc_damping : float
        ``optimizer="imc"`` or ``"natural"``: Tikhonov damping λ of the Newton step, relative to
        the diagonal of ``JᵀJ`` (of the Fisher metric for ``natural``); larger
        is steadier against sampling noise.
    imc_smoothing : float
        ``optimizer="imc"`` or ``"natural"``: weight of a penalty on the
        curvature of the step's change of u(r) (squared second differences of
        δu/kT on each target's grid, from three points below where g(r) first
        exceeds 1e-3 up to the cutoff), relative to ``JᵀJ`` (trace-normalised). Unlike ``imc_damping`` it
        leaves smooth changes free (in a dense liquid the direction g(r)
        sees least is a smooth ramp across the first shells, which diagonal
        damping holds back) and damps the noisy wiggles, mostly at the wall
        where g(r) is small. 0 (default) turns it off; with it on, a small
        ``imc_damping`` (1e-6) is enough. See docs/training.md.
    imc_roughness : float
        ``optimizer="imc"``: weight ν of a penalty on the roughness of the
        learned correction itself (squared fourth differences of the spline or
        neural terms' u(r)/kT on the same grid), relative to ``JᵀJ``
        (trace-normalised). Where ``imc_smoothing`` keeps each step from adding
        wiggles, this removes those already there (from the start or the
        noise of earlier steps) in directions the data cannot see, such as an
        alternation of the wall knots that a smeared g(r) averages out; an
        analytic prior (soft sphere) is left free to carry the steep wall.
        0 (default) turns it off. See docs/training.md.
    imc_reject_factor : float or None
        ``optimizer="imc"``: undo a step after which the freshly sampled loss
        exceeds this factor times the loss before it (a linearised step that
        overshot, e.g. across a phase boundary) and this factor times its own
        sampling noise (block averages of the fresh sample; logged as
        ``loss_noise``): near convergence losses scatter by more than a
        factor of two between samples of one potential, which is no reason
        to undo a step. The parameters go back, the next sample starts from
        the configurations the step was computed from (not from what the
        overshooting potential made of the fluid), and the same Newton step
        is taken again, capped at half the change of u(r)
        the undone step made; after a step that is kept, the cap grows 1.5×
        back towards ``max_potential_change``. After ``IMC_MAX_UNDOS`` (2)
        undos in a row the next step is kept whatever its loss, which becomes
        the reference (logged as ``rebased``): a loss that steps of a quarter
        of the length still cannot reach came from an outlying sample.
        None (default): every step is kept.
    imc_check_last : bool
        ``optimizer="imc"`` with ``imc_reject_factor``: when training ends,
        draw one more sample to judge the last step, which no epoch has
        sampled yet, and undo it by the same rule if it overshot (logged as
        ``final_check`` in the last epoch's record; its MD steps and time
        count in ``md_steps`` and ``wall_time``). The returned potential is
        then always one whose fresh loss was measured. True (default); False
        returns the last step unjudged and saves the sample.
    imc_noise_shrink : bool
        ``optimizer="imc"``: shorten each Newton step δ by the factor
        ``max(0, 1 - E|δ_noise|²/|δ|²)``, where ``E|δ_noise|²`` is the part of
        the step's length that the sample's own noise accounts for: the
        covariance of the residuals, from the means of ``IMC_SHRINK_BLOCKS``
        (5) consecutive blocks of frames, carried through the step's linear
        solve (logged as ``shrink`` and ``step_noise``). Far from the answer
        the step is mostly signal and stays whole; at the noise floor a full
        Newton step is mostly the sample's noise, which it would write into
        u(r), and the factor falls towards 0 (positive-part James–Stein
        shrinkage). Not with ``imc_pool > 1`` (a pooled step has its own noise).
        False (default).
    imc_pool : int
        ``optimizer="imc"``: pool the residuals and Jacobians of up to this
        many recent samples into each Newton step (a linear model fitted to
        all of them, stepping from their mean parameters), instead of using
        the fresh sample alone; 1 (default) does not pool. Near convergence
        this gives each step the noise of all pooled frames. See docs/training.md.
    imc_pool_radius : float
        ``optimizer="imc"`` with ``imc_pool > 1``: a sample drawn where u(r)
        differed from the current u(r) by more than this (kT, where a target
        has g > 0.05) leaves the pool (the linear model no longer holds
        across such a step). Default 0.25.
    max_potential_change : float
        ``optimizer="imc"``: the largest change of u(r) per step, in kT (of the
        coldest state), where a target has g(r) > 0.05; halved with every
        rolled-back step, as the learning rate is.
    imc_max_cap : float or None
        ``optimizer="imc"`` with ``imc_reject_factor``: let the cap on the
        change of u(r) grow past ``max_potential_change``, up to this many kT,
        while the linear model holds: after a step that the cap shortened and
        after which the fresh loss fell by at least half the drop the Newton
        system predicted, the cap grows 1.5× (logged as ``model_ratio``).
        Any other kept step brings the cap back to ``max_potential_change``;
        an overshoot is undone as usual. At least ``max_potential_change``;
        None (default): the cap never exceeds ``max_potential_change``. See
        docs/training.md.
    imc_level_fraction : float or None
        ``optimizer="imc"``: bound the step's change of the level of u(r), the
        mean of u(r)/kT (cutoff convention applied, so against u(r_c) when
        shifted) over the bins where a target of that pair type has
        g(r) > 0.05, to this fraction of the step's cap on the change of u(r)
        (``max_potential_change``, or the grown or halved cap of
        ``imc_max_cap`` and of an undo). A step that would move the level
        further loses the excess as the least change of u(r) that removes
        it, a uniform shift over those bins, so the rest of the step keeps its
        shape and the wall is corrected as the step would have it (the Newton
        system as the measure of "least" would put the excess into the wall,
        which the data see least). Logged as ``level_wanted_kT`` and
        ``level_kT``; for ``imc_max_cap`` a step the bound shortened counts
        as one the cap shortened. Near a critical point the RDF
        responds to the level (a uniform attraction) far more than linearly:
        from the Boltzmann-inversion guess at the LJ state of the paper's first
        experiment the Newton step moved it 2.6 times the correction it needed.
        The bound removed that overshoot there, but where the level must move
        far it holds the fit back (docs/experiments.md). In (0, 1]; None
        (default): no bound beyond the cap. See docs/training.md.
    imc_ibi_prior : float
        ``optimizer="imc"``: weight ν of a pull of each step towards IBI's
        correction of the same sample, ``kT ln(g_sample(r)/g_target(r))``
        (clipped to the step's cap), on the repulsive wall: the bins where a
        target has g(r) > 0.05 below the first r where it reaches 1. The step
        minimises ``|ρ + Jδ|² + ν' |Bδ - d|²`` (plus the other penalties), B
        the change of u(r)/kT on those bins, d IBI's correction there,
        ν' = ν trace(JᵀJ)/trace(BᵀB). Where the data pin a direction down the
        Newton step decides it; where they barely see it (the wall beside a
        first peak that fluctuates slowly near coexistence) IBI's bin-by-bin
        correction does (there a change of u(r) shows up nearly one for one
        in -kT ln g(r)), instead of nothing. Beyond the wall the data decide alone:
        pulled there too, u(r) took up IBI's reading of the first peak's
        fluctuations (docs/experiments.md). With ``imc_noise_shrink`` only
        the data's part of the step is shrunk.
        Logged as ``ibi_prior_share``, the length of the prior's part of the
        step's change of u(r) on the wall over that of the whole step (above
        1 where the data's part opposes it). 0 (default) turns it off. See
        docs/training.md.
    imc_line_search : bool
        ``optimizer="imc"``: after the step δ is capped, shorten it to the t
        in [``IMC_LINE_SEARCH_MIN`` (0.25), 1] that minimises a second-order
        model of the loss along it, ``|ρ + t Jδ + ½ t² ρ''|²``, where ρ'' is
        the curvature of the reweighted residuals along δ read from the
        same sample (the joint third cumulant of the RDF and the energy
        change, :meth:`~openmm_diffsim.gradients.ReweightingEstimator.residual_curvature`;
        the pressure and energy rows are taken as linear). No MD is spent.
        Near a critical point the RDF responds to an added attraction far
        more than linearly and a Newton step overshoots: from the
        Boltzmann-inversion guess at the LJ state of the paper's first
        experiment the fresh loss after the full (capped) step was 10-30
        times the loss before it, after half of it 0.17-0.25 times (four
        samples, ``benchmarks/step_curvature.py``), and the model put the
        minimum at 0.25-0.5 of the step on each. A step
        retaken after an undo (solved from an earlier sample) and a pooled
        step are not searched. Logged as ``line_scale`` (t) and
        ``line_model_loss`` (the model's loss at t). False (default).
    """

    def __init__(
        self,
        table: PairTable,
        states: Sequence,
        estimator: Union[str, Any] = "reweighting",
        *,
        learning_rate: float = 0.01,
        optimizer: str = "adam",
        max_epochs: int = 50,
        n_snapshots: int = 50,
        snapshot_interval: int = 50,
        equilibration_steps: int = 1000,
        reequilibration_steps: Optional[int] = None,
        sampler_options: Optional[Dict[str, Any]] = None,
        estimator_options: Optional[Dict[str, Any]] = None,
        clip_norm: Optional[float] = None,
        target_loss: Optional[float] = None,
        plateau_patience: Optional[int] = None,
        lr_schedule: str = "constant",
        learning_rate_scales: Optional[Dict[str, float]] = None,
        output_dir: Optional[Union[str, Path]] = None,
        checkpoint_every: int = 1,
        plot_every: int = 10,
        seed: int = 0,
        progress: bool = True,
        boltzmann_initial_guess: bool = False,
        max_retries: int = 5,
        callbacks: Sequence[Callable] = (),
        samplers: Optional[Any] = None,
        imc_damping: float = 0.01,
        max_potential_change: float = 0.5,
        average_last: int = 0,
        imc_smoothing: float = 0.0,
        imc_roughness: float = 0.0,
        imc_reject_factor: Optional[float] = None,
        imc_pool: int = 1,
        imc_pool_radius: float = 0.25,
        imc_max_cap: Optional[float] = None,
        imc_check_last: bool = True,
        imc_noise_shrink: bool = False,
        imc_level_fraction: Optional[float] = None,
        imc_ibi_prior: float = 0.0,
        imc_line_search: bool = False,
    ):
        states = check_fit_inputs(table, states, "Trainer")
        if isinstance(estimator, str) and estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS} or an Estimator object, got {estimator!r}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        if optimizer in ("gauss-newton", "imc") and estimator != "reweighting":
            raise ValueError(f"optimizer={optimizer!r} needs the 'reweighting' estimator (it uses its Jacobian)")
        for name, value in (("imc_damping", imc_damping), ("max_potential_change", max_potential_change)):
            if not (math.isfinite(float(value)) and float(value) > 0):
                raise ValueError(f"{name} must be a positive number, got {value}")
        for name, value in (
            ("imc_smoothing", imc_smoothing),
            ("imc_roughness", imc_roughness),
            ("imc_ibi_prior", imc_ibi_prior),
        ):
            if not (math.isfinite(float(value)) and float(value) >= 0):
                raise ValueError(f"{name} must be a non-negative number, got {value}")
        if imc_reject_factor is not None and not (
            math.isfinite(float(imc_reject_factor)) and float(imc_reject_factor) > 1
        ):
            raise ValueError(f"imc_reject_factor must be a number above 1 (or None), got {imc_reject_factor}")
        if isinstance(imc_pool, bool) or int(imc_pool) != imc_pool or imc_pool < 1:
            raise ValueError(f"imc_pool must be a positive integer (1: no pooling), got {imc_pool!r}")
        if not isinstance(imc_check_last, bool):
            raise ValueError(f"imc_check_last must be True or False, got {imc_check_last!r}")
        if not isinstance(imc_noise_shrink, bool):
            raise ValueError(f"imc_noise_shrink must be True or False, got {imc_noise_shrink!r}")
        if not isinstance(imc_line_search, bool):
            raise ValueError(f"imc_line_search must be True or False, got {imc_line_search!r}")
        if imc_noise_shrink and int(imc_pool) > 1:
            raise ValueError("imc_noise_shrink cannot be combined with imc_pool > 1 (a pooled step has its own noise)")
        if imc_level_fraction is not None and not (
            isinstance(imc_level_fraction, (int, float))
            and not isinstance(imc_level_fraction, bool)
            and math.isfinite(float(imc_level_fraction))
            and 0 < float(imc_level_fraction) <= 1
        ):
            raise ValueError(f"imc_level_fraction must be a number in (0, 1] (or None), got {imc_level_fraction!r}")
        if not (math.isfinite(float(imc_pool_radius)) and float(imc_pool_radius) > 0):
            raise ValueError(f"imc_pool_radius must be a positive number (kT), got {imc_pool_radius}")
        if imc_max_cap is not None:
            if not (math.isfinite(float(imc_max_cap)) and float(imc_max_cap) > 0):
                raise ValueError(f"imc_max_cap must be a positive number (kT) or None, got {imc_max_cap}")
            if imc_reject_factor is None:
                # A grown cap is safe only because an overshoot is undone.
                raise ValueError("imc_max_cap needs imc_reject_factor (the undo of an overshoot)")
            if float(imc_max_cap) < float(max_potential_change):
                raise ValueError(
                    f"imc_max_cap ({imc_max_cap} kT) is below max_potential_change ({max_potential_change} kT):"
                    " the cap could never grow"
                )
        if lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}")
        for name, value in (("learning_rate", learning_rate),):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be positive, got {value}")
        for name, value in (
            ("max_epochs", max_epochs),
            ("n_snapshots", n_snapshots),
            ("snapshot_interval", snapshot_interval),
        ):
            if int(value) < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if equilibration_steps < 0:
            raise ValueError(f"equilibration_steps must be >= 0, got {equilibration_steps}")
        if not list(p for p in table.parameters() if p.requires_grad):
            raise ValueError("the potential has no trainable parameters")

        self.table = table
        self.states = states
        self.estimator_name = estimator if isinstance(estimator, str) else type(estimator).__name__
        self._custom_estimator = None if isinstance(estimator, str) else estimator
        self.options: Dict[str, Any] = dict(
            learning_rate=float(learning_rate),
            optimizer=optimizer,
            imc_damping=float(imc_damping),
            imc_smoothing=float(imc_smoothing),
            imc_roughness=float(imc_roughness),
            imc_reject_factor=None if imc_reject_factor is None else float(imc_reject_factor),
            imc_pool=int(imc_pool),
            imc_pool_radius=float(imc_pool_radius),
            imc_max_cap=None if imc_max_cap is None else float(imc_max_cap),
            imc_check_last=imc_check_last,
            imc_noise_shrink=imc_noise_shrink,
            imc_level_fraction=None if imc_level_fraction is None else float(imc_level_fraction),
            imc_ibi_prior=float(imc_ibi_prior),
            imc_line_search=imc_line_search,
            max_potential_change=float(max_potential_change),
            average_last=int(average_last),
            max_epochs=int(max_epochs),
            n_snapshots=int(n_snapshots),
            snapshot_interval=int(snapshot_interval),
            equilibration_steps=int(equilibration_steps),
            reequilibration_steps=(
                2 * int(snapshot_interval) if reequilibration_steps is None else int(reequilibration_steps)
            ),
            sampler_options=dict(sampler_options or {}),
            estimator_options=dict(estimator_options or {}),
            clip_norm=clip_norm,
            target_loss=target_loss,
            plateau_patience=plateau_patience,
            lr_schedule=lr_schedule,
            learning_rate_scales={str(k): float(v) for k, v in (learning_rate_scales or {}).items()},
            checkpoint_every=int(checkpoint_every),
            plot_every=int(plot_every),
            seed=int(seed),
            progress=bool(progress),
            boltzmann_initial_guess=bool(boltzmann_initial_guess),
            max_retries=int(max_retries),
        )
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.callbacks = list(callbacks)
        from .sampling import _trainer_samplers

        # Not in self.options: a live Simulation is neither JSON nor checkpoint material.
        self._given_samplers = _trainer_samplers(samplers, states, estimator)
        self.history: List[Dict[str, Any]] = []
        self._recent_parameters: List[torch.Tensor] = []
        self.averaged_epoch: Optional[int] = None
        self.epoch = 0
        self.md_steps = 0
        self.rollout_steps = 0
        self.wall_time = 0.0
        self.best_loss = math.inf
        self.best_epoch = -1
        self.best_state: Optional[Dict[str, torch.Tensor]] = None
        self.learning_rate = float(learning_rate)
        self._learning_rate_now = float(learning_rate)  # after the schedule
        self.samplers: Dict[str, Any] = {}
        self.snapshots: Dict[str, Any] = {}
        self._sampler_states: Dict[str, Dict[str, Any]] = {}
        self._initialised = False
        self._lm_damping = 1.0
        self._natural_fraction: Optional[float] = None  # optimizer="natural": step fraction f
        self._natural_last_loss: Optional[float] = None
        # optimizer="imc" with imc_reject_factor: the last step taken (parameters
        # before it, its Newton system, loss and cap), to undo it.
        self._imc_last: Optional[Dict[str, Any]] = None
        # optimizer="imc" with imc_pool > 1: the recent samples' residual rows
        # (per state), Jacobians and parameters (see _pooled_system).
        self._imc_pool: List[Dict[str, Any]] = []
        self._build_estimators()
        self.optimizer = self._make_optimizer()

    # -- construction -------------------------------------------------------------------

    def _trainable(self) -> List[torch.nn.Parameter]:
        return [p for p in self.table.parameters() if p.requires_grad]

    def _param_groups(self) -> List[Dict[str, Any]]:
        """One optimiser group per learning-rate scale (parameters in different units)."""
        scales = self.options["learning_rate_scales"]
        groups: Dict[float, List[torch.nn.Parameter]] = {}
        matched = set()
        for name, p in self.table.named_parameters():
            if not p.requires_grad:
                continue
            scale = 1.0
            for pattern, value in scales.items():
                if name == pattern or name.endswith("." + pattern):
                    scale = float(value)
                    matched.add(pattern)
            groups.setdefault(scale, []).append(p)
        unmatched = set(scales) - matched
        if unmatched:
            names = [n for n, p in self.table.named_parameters() if p.requires_grad]
            raise ValueError(
                f"learning_rate_scales names no trainable parameter: {sorted(unmatched)}; "
                f"trainable parameters: {', '.join(names)}"
            )
        return [{"params": ps, "lr": self.learning_rate * scale, "scale": scale} for scale, ps in groups.items()]

    def _make_optimizer(self):
        groups = self._param_groups()
        if self.options["optimizer"] in ("adam", "gauss-newton", "imc", "natural"):
            # Gauss-Newton steps are taken by the trainer; the Adam object only
            # keeps checkpoints uniform.
            return torch.optim.Adam(groups, lr=self.learning_rate)
        return torch.optim.SGD(groups, lr=self.learning_rate, momentum=0.9)

    def _build_estimators(self) -> None:
        import inspect

        from .gradients import ReweightingEstimator, RolloutEstimator

        opts = dict(self.options["estimator_options"])
        accepted = {
            cls: set(inspect.signature(cls.__init__).parameters) - {"self"}
            for cls in (ReweightingEstimator, RolloutEstimator)
        }
        for key in opts:
            if not any(key in names for names in accepted.values()):
                known = sorted(set().union(*accepted.values()))
                raise ValueError(f"unknown estimator option {key!r}; known options: {', '.join(known)}")
        if isinstance(opts.get("dtype"), str):
            opts["dtype"] = {"float32": torch.float32, "float64": torch.float64}[opts["dtype"]]
        reweight_opts = {k: v for k, v in opts.items() if k in accepted[ReweightingEstimator]}
        rollout_opts = {k: v for k, v in opts.items() if k in accepted[RolloutEstimator]}
        rollout_opts.pop("adjoint", None)
        rollout_opts.setdefault("seed", self.options["seed"])
        self.reweighting = None
        self.rollout = None
        name = self.estimator_name
        if self._custom_estimator is not None:
            self.rollout = self._custom_estimator
        if name in ("reweighting", "hybrid"):
            self.reweighting = {s.name: ReweightingEstimator(**reweight_opts) for s in self.states}
        self.rollouts: Dict[str, Any] = {}
        if name in ("rollout", "adjoint", "hybrid"):
            # One estimator (one random stream) per state, seeded like the
            # samplers: a state's rollouts then do not depend on which other
            # states ran before it, or on which process (distributed.py).
            base_seed = int(rollout_opts.pop("seed"))
            self.rollouts = {
                s.name: RolloutEstimator(adjoint=(name == "adjoint"), seed=base_seed + 1000 * k, **rollout_opts)
                for k, s in enumerate(self.states)
            }
            self.rollout = self.rollouts[self.states[0].name]

    def _rollout_estimator(self, state):
        return self.rollout if self._custom_estimator is not None else self.rollouts[state.name]

    # -- sampling -----------------------------------------------------------------------

    def _sampler(self, state):
        from .sampling import Sampler

        sampler = self.samplers.get(state.name)
        if sampler is not None:
            return sampler
        saved = self._sampler_states.get(state.name)
        sampler = self._given_samplers.get(state.name)
        if sampler is None:
            index = [s.name for s in self.states].index(state.name)
            options = dict(self.options["sampler_options"])
            sampler = Sampler(state, self.table, seed=self.options["seed"] + 1000 * index + self.epoch, **options)
        if saved is not None:
            sampler.set_state(saved["positions"], saved["velocities"], saved["box"])
        else:
            sampler.minimize()
            sampler.equilibrate(self.options["equilibration_steps"])
            self.md_steps += self.options["equilibration_steps"]
        self.samplers[state.name] = sampler
        return sampler

    def _sample(self, state):
        sampler = self._sampler(state)
        before = sampler.total_steps
        sampler.update_potential(self.table)
        # Discard steps after every hand-over but the first: key on "sampled
        # before" (saved configuration), not on held snapshots, which the
        # IMC and Gauss-Newton steps clear to force a fresh sample.
        if self.options["reequilibration_steps"] > 0 and state.name in self._sampler_states:
            sampler.equilibrate(self.options["reequilibration_steps"])
        snapshots = sampler.run(self.options["n_snapshots"], self.options["snapshot_interval"])
        self.md_steps += sampler.total_steps - before
        self.snapshots[state.name] = snapshots
        self._sampler_states[state.name] = {
            "positions": sampler.positions,
            "velocities": sampler.velocities,
            "box": sampler.box,
        }
        return snapshots

    # -- one epoch ----------------------------------------------------------------------

    def _state_gradient(self, state, fresh_needed: bool):
        """Accumulate one state's gradient; returns (result, resampled)."""
        name = self.estimator_name
        resampled = False
        if name in ("rollout", "adjoint") or self._custom_estimator is not None:
            snapshots = self._sample(state)
            rollout = self._rollout_estimator(state)
            result = rollout(self.table, state, snapshots, state.targets, loss_weight=state.weight)
            return result, True
        reweighting = self.reweighting[state.name]
        if fresh_needed or state.name not in self.snapshots:
            snapshots = self._sample(state)
            reweighting.reset(self.table, snapshots)
            resampled = True
            if name == "hybrid":
                rollout = self._rollout_estimator(state)
                result = rollout(self.table, state, snapshots, state.targets, loss_weight=state.weight)
                return result, resampled
        snapshots = self.snapshots[state.name]
        # Other states' gradients are already accumulated: keep them if this
        # state's estimate has to be discarded.
        before = [None if p.grad is None else p.grad.clone() for p in self._trainable()]
        result = reweighting(self.table, state, snapshots, state.targets, loss_weight=state.weight)
        if result.diagnostics.get("needs_resample") and not resampled:
            # Too few effective samples: discard this estimate and sample afresh.
            for p, g in zip(self._trainable(), before, strict=True):
                p.grad = g
            return self._state_gradient(state, True)
        return result, resampled

    def _epoch(self) -> Dict[str, Any]:
        from .gradients import NonFiniteError, clip_gradients

        start = time.perf_counter()
        steps_before = self.md_steps
        self.optimizer.zero_grad(set_to_none=True)
        record = self._new_record()
        total, results = self._measure_states(record)
        for p in self._trainable():
            if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                raise NonFiniteError("non-finite gradient")
        clip = self.options["clip_norm"]
        grad_norm = clip_gradients(self._trainable(), clip) if clip else _grad_norm(self._trainable())
        if self.options["optimizer"] == "gauss-newton":
            record["gauss_newton"] = self._gauss_newton_step()
        elif self.options["optimizer"] == "imc":
            record["imc"] = self._imc_step()
        elif self.options["optimizer"] == "natural":
            record["natural"] = self._natural_step(total)
        else:
            self.optimizer.step()
        if self._dist is not None:
            from . import distributed

            # Same gradients give the same step everywhere; rank 0's values
            # settle any last-bit difference between machines.
            distributed.broadcast_parameters(self._trainable())
        for p in self._trainable():
            if not bool(torch.isfinite(p).all()):
                raise NonFiniteError("optimiser step produced non-finite parameters")
        record["loss"] = total
        record["grad_norm"] = grad_norm
        record["learning_rate"] = self.learning_rate
        record["md_steps"] = self.md_steps
        record["rollout_steps"] = self.rollout_steps
        record["epoch_md_steps"] = self.md_steps - steps_before
        record["epoch_seconds"] = time.perf_counter() - start
        self._last_results = results
        return record

    def _new_record(self) -> Dict[str, Any]:
        return {"epoch": self.epoch, "state_losses": {}, "rdf_rmse": {}, "n_eff": {}, "resampled": {}, "events": []}

    def _measure_states(self, record: Dict[str, Any]) -> Tuple[float, Dict[str, Any]]:
        """Every state's loss and gradient at the current parameters (sampling where needed).

        Fills ``record`` (losses, RDF RMSEs, N_eff, resampling, pressure and
        energy per state) and returns the total loss and the per-state results.
        """
        from .gradients import NonFiniteError

        if self._dist is not None:
            return self._distributed_states(record)
        total, results = 0.0, {}
        for state in self.states:
            result, resampled = self._state_gradient(state, fresh_needed=False)
            if result.diagnostics.get("rejected"):
                raise NonFiniteError(f"state {state.name!r}: {result.diagnostics.get('reason', 'rejected')}")
            if not math.isfinite(result.loss):
                raise NonFiniteError(f"state {state.name!r}: loss is not finite")
            results[state.name] = result
            total += result.loss
            _record_state(record, state.name, result, resampled)
            # Torch rollout steps are counted apart from OpenMM MD steps.
            self.rollout_steps += int(result.diagnostics.get("steps_run", 0) or 0)
        return total, results

    # -- several processes (see distributed.py) -------------------------------------------

    # Set by fit(): None in one process, else {"rank", "world_size", "parts", "owner"}.
    _dist: Optional[Dict[str, Any]] = None

    def _setup_distributed(self) -> None:
        from . import distributed

        if not distributed.is_distributed():
            self._dist = None
            return
        size = distributed.world_size()
        parts = distributed.partition([distributed.state_cost(s) for s in self.states], size)
        owner = {self.states[i].name: k for k, part in enumerate(parts) for i in part}
        self._dist = {"rank": distributed.rank(), "world_size": size, "parts": parts, "owner": owner}
        if size > len(self.states) and self._is_main():
            logger.warning(
                "%d processes for %d state point(s): ranks %d-%d hold no state and stay idle "
                "(replicas of a state are not split between processes)",
                size,
                len(self.states),
                len(self.states),
                size - 1,
            )
        if self._custom_estimator is not None:
            logger.warning(
                "a custom estimator runs on %d processes: its results match one process only if its "
                "randomness depends on the state, not on how many states it saw before",
                size,
            )

    def _is_main(self) -> bool:
        """Whether this process writes files and prints (rank 0, or the only process)."""
        return self._dist is None or self._dist["rank"] == 0

    def _gather_for_checkpoint(self) -> None:
        """Give every rank the per-state data that only the state's owner has (for a complete checkpoint)."""
        from . import distributed

        if self._dist is None:
            return
        here = [s.name for s in self._states_here()]
        mine = {
            "sampler_states": {name: self._sampler_states[name] for name in here if name in self._sampler_states},
            "rollout_calls": {name: self.rollouts[name].calls for name in here if name in self.rollouts},
            # The IMC pool's entries are alike on every rank but for the residual rows of its own states.
            "imc_pool_rows": [{name: e["rows"][name] for name in here if name in e["rows"]} for e in self._imc_pool],
        }
        for part in distributed.all_gather_objects(mine):
            self._sampler_states.update(part["sampler_states"])
            for name, calls in part["rollout_calls"].items():
                self.rollouts[name].calls = calls
            for entry, rows in zip(self._imc_pool, part["imc_pool_rows"], strict=True):
                entry["rows"].update(rows)

    def _states_here(self) -> List[Any]:
        """The state points this process samples (all of them in one process)."""
        if self._dist is None:
            return self.states
        return [self.states[i] for i in self._dist["parts"][self._dist["rank"]]]

    def _distributed_states(self, record: Dict[str, Any]):
        """This rank's states, then one exchange: losses, records, step counts, failures, gradients.

        Returns the total loss and the results of all states, both as one
        process would have them. A failure on any rank raises the same error
        on every rank (the first failing state in state order wins, as in one
        process), so all ranks roll back together and none waits forever.
        """
        from . import distributed
        from .gradients import NonFiniteError
        from .sampling import SamplingError

        index = {s.name: k for k, s in enumerate(self.states)}
        calls_before = {name: getattr(est, "calls", None) for name, est in self.rollouts.items()}
        start = time.perf_counter()
        done = []  # (state index, result, resampled, MD steps, rollout steps)
        failure = None  # (state index, kind, message, extra, exception)
        for state in self._states_here():
            k = index[state.name]
            md_before = self.md_steps
            try:
                result, resampled = self._state_gradient(state, fresh_needed=False)
                if result.diagnostics.get("rejected"):
                    raise NonFiniteError(f"state {state.name!r}: {result.diagnostics.get('reason', 'rejected')}")
                if not math.isfinite(result.loss):
                    raise NonFiniteError(f"state {state.name!r}: loss is not finite")
            except SamplingError as exc:
                failure = (k, "sampling", str(exc), (exc.state_name, exc.step, exc.reason), exc)
            except (NonFiniteError, FloatingPointError) as exc:
                failure = (k, type(exc).__name__, str(exc), None, exc)
            except Exception as exc:  # noqa: BLE001 - every rank must hear of it, or the others hang
                failure = (k, "fatal", f"{type(exc).__name__}: {exc}", None, exc)
            steps = self.md_steps - md_before
            self.md_steps = md_before
            if failure is not None:
                done.append((k, None, False, steps, 0))
                break
            done.append((k, result, resampled, steps, int(result.diagnostics.get("steps_run", 0) or 0)))
        seconds = time.perf_counter() - start
        own_failure = failure
        payload = {
            "done": done,
            "failure": None if failure is None else failure[:4],
            "seconds": seconds,
        }
        gathered = distributed.all_gather_objects(payload)
        entries = {entry[0]: entry for part in gathered for entry in part["done"]}
        failures = [(part["failure"], r) for r, part in enumerate(gathered) if part["failure"] is not None]
        fatal = [(f, r) for f, r in failures if f[1] == "fatal"]
        first = min((f[0] for f, _ in failures), default=len(self.states))
        # Count the work one process would have done: the states up to the first failure.
        self.md_steps += sum(entries[k][3] for k in entries if k <= first)
        self.rollout_steps += sum(entries[k][4] for k in entries if k < first)
        if fatal:
            (k, _, message, _), r = fatal[0]
            if own_failure is not None and own_failure[1] == "fatal":
                raise own_failure[4]
            raise RuntimeError(f"rank {r} failed on state {self.states[k].name!r}: {message}")
        if failures:
            for name, calls in calls_before.items():
                # States past the failure would not have run in one process.
                if calls is not None and index[name] > first:
                    self.rollouts[name].calls = calls
            (k, kind, message, extra), _ = min(failures, key=lambda item: item[0][0])
            if own_failure is not None and own_failure[0] == k:
                raise own_failure[4]
            if kind == "sampling":
                raise SamplingError(*extra)
            raise (FloatingPointError if kind == "FloatingPointError" else NonFiniteError)(message)
        total = 0.0
        results = {}
        for k, state in enumerate(self.states):
            _, result, resampled, _, _ = entries[k]
            results[state.name] = result
            total += result.loss
            _record_state(record, state.name, result, resampled)
        record["rank_seconds"] = [part["seconds"] for part in gathered]
        distributed.all_reduce_gradients(self._trainable())
        return total, results

    def _residuals(self):
        parts = []
        n_eff = 1.0
        for state in self._states_here():
            rho, fraction = self.reweighting[state.name].residuals(self.table, state, state.targets, 1.0)
            parts.append(rho)
            n_eff = min(n_eff, fraction)
        if not parts:  # a rank without states (more ranks than states)
            return torch.zeros(0, dtype=torch.float64), n_eff
        return torch.cat(parts), n_eff

    def _reduce_residual_sums(self, *values):
        """Sum tensors (J^T J, J^T r, r.r) over ranks: each rank holds its states' rows of r and J."""
        from . import distributed

        if self._dist is None:
            return values
        flat = torch.cat([torch.as_tensor(v, dtype=torch.float64).reshape(-1) for v in values])
        flat = distributed.all_reduce(flat)
        out, offset = [], 0
        for v in values:
            n = torch.as_tensor(v).numel()
            out.append(flat[offset : offset + n].reshape(torch.as_tensor(v).shape))
            offset += n
        return out

    def _residual_rows(self) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
        """Per state of this process: its reweighted residuals ρ (detached, float64) and their Jacobian."""
        from .gradients import _jacobian

        params = self._trainable()
        rows = {}
        with torch.enable_grad():
            for state in self._states_here():
                rho, _ = self.reweighting[state.name].residuals(self.table, state, state.targets, 1.0)
                jac = _jacobian(rho, params)
                rows[state.name] = (rho.detach().to(torch.float64), jac.to(torch.float64))
        return rows

    def _normal_equations(self, rows: Dict[str, Tuple[torch.Tensor, torch.Tensor]]):
        """``JᵀJ``, ``Jᵀρ`` and ``ρ·ρ`` of per-state residual rows (summed over states and ranks)."""
        n_params = sum(p.numel() for p in self._trainable())
        jtj = torch.zeros(n_params, n_params, dtype=torch.float64)
        jtr = torch.zeros(n_params, dtype=torch.float64)
        loss0 = 0.0
        for rho, jac in rows.values():
            jtj = jtj + jac.T @ jac
            jtr = jtr + jac.T @ rho
            loss0 += float(rho @ rho)
        if self._dist is not None:
            jtj, jtr, loss0 = self._reduce_residual_sums(jtj, jtr, loss0)
            loss0 = float(loss0)
        return jtj, jtr, loss0

    def _loss_noise(self) -> float:
        """The sampling-noise part of the current snapshots' loss, summed over states (and ranks).

        See :meth:`~openmm_diffsim.gradients.ReweightingEstimator.residual_noise`.
        """
        noise = sum(
            self.reweighting[state.name].residual_noise(state, state.targets, 1.0) for state in self._states_here()
        )
        if self._dist is not None:
            noise = float(self._reduce_residual_sums(float(noise))[0])
        return float(noise)

    def _jtr_noise_covariance(self, rows: Dict[str, Tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Covariance of ``Jᵀρ`` from the sample's noise in ρ (summed over states and ranks).

        ``Σ_b (Jᵀd_b)(Jᵀd_b)ᵀ / (B (B - 1))`` with ``d_b`` the block-mean
        residual deviations (:meth:`~openmm_diffsim.gradients.ReweightingEstimator.residual_block_deviations`,
        ``IMC_SHRINK_BLOCKS`` blocks; the pressure and energy rows count as
        noiseless). The noise of J itself is left out.
        """
        n_params = sum(p.numel() for p in self._trainable())
        covariance = torch.zeros(n_params, n_params, dtype=torch.float64)
        for state in self._states_here():
            rho, jac = rows[state.name]
            deviations = self.reweighting[state.name].residual_block_deviations(
                state, state.targets, 1.0, n_blocks=IMC_SHRINK_BLOCKS
            )
            blocks = deviations.shape[0]
            if blocks < 2:
                continue
            padded = torch.zeros(blocks, rho.numel(), dtype=torch.float64)
            padded[:, : deviations.shape[1]] = deviations
            projected = padded @ jac  # (B, n_params): Jᵀd_b per block
            covariance = covariance + projected.T @ projected / (blocks * (blocks - 1))
        if self._dist is not None:
            covariance = self._reduce_residual_sums(covariance)[0]
        return covariance

    def _pair_energy(self, pair, r: torch.Tensor) -> torch.Tensor:
        """u(r) of one pair type (kJ/mol), differentiable in the parameters: the whole potential, prior included."""
        return self.table.energy_and_derivative(r, torch.full_like(r, self.table.pair_index(pair), dtype=torch.long))[0]

    def _coldest_kT(self) -> float:
        """k_B T of the coldest state (kJ/mol): the unit of every u(r)/kT the IMC step measures."""
        return min(float(s.kT) for s in self.states)

    def _energy_rows(self, pair, r: np.ndarray) -> torch.Tensor:
        """``∂(u(r)/kT)/∂θ`` at the points ``r`` (nm) of one pair type, shape (len(r), n_params), kT the coldest."""
        from .gradients import _jacobian

        grid = torch.as_tensor(r, dtype=torch.float64)
        with torch.enable_grad():
            return _jacobian(self._pair_energy(pair, grid).to(torch.float64) / self._coldest_kT(), self._trainable())

    def _level_rows(self) -> torch.Tensor:
        """Rows ``∂ℓ_k/∂θ``, shape (K, n_params): ℓ_k the level of u(r)/kT of pair type k.

        The level is the mean of u(r)/kT (cutoff convention applied) over the
        bins where a target of that pair type has g(r) > 0.05, pooled over the
        states (kT of the coldest). Recomputed every step: an analytic prior's
        σ makes the rows depend on the parameters. Pair types no target
        resolves have no row.
        """
        grids: Dict[tuple, List[np.ndarray]] = {}
        for pair, r in self._target_grids():
            grids.setdefault(self.table.pair_keys()[self.table.pair_index(pair)], []).append(r)
        # The level is linear in u, so its row is the mean of the points' rows.
        rows = [self._energy_rows(pair, np.unique(np.concatenate(parts))).mean(0) for pair, parts in grids.items()]
        if not rows:
            return torch.zeros(0, sum(p.numel() for p in self._trainable()), dtype=torch.float64)
        return torch.stack(rows)

    def _potential_metric(self) -> torch.Tensor:
        """``BᵀB``, B the Jacobian of u(r)/kT on the smoothing grids: |δ|² in it is the squared change of u(r)."""
        found = self._grid_differences(self._pair_energy, order=0)
        if found is None:
            n_params = sum(p.numel() for p in self._trainable())
            return torch.eye(n_params, dtype=torch.float64)
        return found[0].T @ found[0]

    def _ibi_prior(self, limit: float) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """``imc_ibi_prior``: ``BᵀB`` and ``Bᵀd`` of the current samples, or None (no bin to take them on).

        B (rows ∂(u(r)/kT)/∂θ, kT of the coldest state) and d (IBI's full
        correction ``kT_s ln(g_sample/g_target)`` in that kT, clipped to
        ±``limit``) are taken on each target's wall: the bins where
        g_target > 0.05, inside the cutoff and below the first r where
        g_target reaches 1 (all of them where it never does), on the
        estimator's grid, rows scaled by the square root of the state's
        weight; summed over states (and ranks).
        """
        from .ibi import ibi_update

        kT_min = self._coldest_kT()
        n_params = sum(p.numel() for p in self._trainable())
        matrix = torch.zeros(n_params, n_params, dtype=torch.float64)
        rhs = torch.zeros(n_params, dtype=torch.float64)
        for state in self._states_here():
            estimator = self.reweighting[state.name]
            r = np.asarray(estimator.r, dtype=float)
            scale = math.sqrt(float(state.weight))
            for pair, g_sample, g_target in estimator.sample_rdfs(state.targets):
                keep = (g_target > 0.05) & (r > 0) & (r < self.table.cutoff)
                peak = np.nonzero(g_target >= 1.0)[0]
                if peak.size:
                    # The wall only: beyond it IBI's ratio carries the first peak's slow
                    # fluctuations, which the pull wrote into u(r) (Morse at rho* = 0.5: beyond
                    # the wall 0.053 kT off with every bin pulled, 0.016 with the wall alone).
                    keep &= r < r[peak[0]]
                if not keep.any():
                    continue
                correction = ibi_update(r, g_sample, g_target, float(state.kT))[keep] / kT_min
                correction = np.clip(correction, -limit, limit)
                rows = scale * self._energy_rows(pair, r[keep])
                matrix = matrix + rows.T @ rows
                rhs = rhs + rows.T @ (scale * torch.as_tensor(correction, dtype=torch.float64))
        if self._dist is not None:
            matrix, rhs = self._reduce_residual_sums(matrix, rhs)
        if not float(torch.trace(matrix)) > 0:
            return None
        return matrix, rhs

    def _residual_jacobian(self):
        """``JᵀJ``, ``Jᵀρ`` and ``ρ·ρ`` of the reweighted residuals (summed over ranks)."""
        return self._normal_equations(self._residual_rows())

    def _pooled_system(self, rows) -> Optional[Dict[str, Any]]:
        """Add this sample to the IMC pool and return the pooled Newton system, or None (nothing to pool).

        A Newton step from one sample of n frames carries that sample's noise
        twice: in the residual ρ and in the Jacobian J, whose noise inflates
        ``JᵀJ`` and so shortens the step along the directions the data see
        weakly. Near convergence the recent samples were drawn at parameters
        θ_k close to each other, where the linear model ``ρ_k + J (θ - θ_k)``
        holds for all of them; its least-squares solution over the pool is
        ``θ = θ̄ - (J̄ᵀJ̄)⁻¹ J̄ᵀ ρ̄``, with θ̄, ρ̄ and J̄ the frame-weighted
        means of the samples' parameters, residuals and Jacobians. The step is
        then taken from θ̄ with all pooled frames' noise. Samples drawn where
        u(r) differed from the current one by more than ``imc_pool_radius`` kT
        (where a target has g > 0.05) are dropped, so the pool holds only the
        samples of the last, small steps; at most ``imc_pool`` samples are kept.
        """
        size = self.options["imc_pool"]
        if size < 2:
            return None
        u_now = self._potential_on_target_grid()
        entry = {
            "parameters": self._flat_parameters(),
            "u": u_now,
            "frames": int(self.options["n_snapshots"]),
            "rows": {name: (rho.clone(), jac.clone()) for name, (rho, jac) in rows.items()},
        }
        radius = self.options["imc_pool_radius"]

        def near(old) -> bool:
            return _largest_change(old["u"], u_now) <= radius

        self._imc_pool = [old for old in self._imc_pool if near(old)] + [entry]
        del self._imc_pool[:-size]
        if len(self._imc_pool) < 2:
            return None
        weights = torch.tensor([float(e["frames"]) for e in self._imc_pool], dtype=torch.float64)
        weights = weights / weights.sum()
        theta = sum(w * e["parameters"].to(torch.float64) for w, e in zip(weights, self._imc_pool, strict=True))
        pooled = {}
        for name in rows:
            rho = sum(w * e["rows"][name][0] for w, e in zip(weights, self._imc_pool, strict=True))
            jac = sum(w * e["rows"][name][1] for w, e in zip(weights, self._imc_pool, strict=True))
            pooled[name] = (rho, jac)
        jtj, jtr, loss = self._normal_equations(pooled)
        return {
            "parameters": theta,
            "jtj": jtj,
            "jtr": jtr,
            "loss": loss,
            "samples": len(self._imc_pool),
            "frames": sum(e["frames"] for e in self._imc_pool),
        }

    def _gauss_newton_step(self) -> Dict[str, Any]:
        """One Levenberg–Marquardt step on the reweighted residuals (inverse Monte Carlo).

        The Jacobian of the reweighted RDFs is exact for the current snapshots;
        a trial step is accepted when the reweighted loss drops, N_eff/N
        stays above the estimator's threshold and u(r) has no well inside the
        excluded core (see :meth:`_has_core_hole`), otherwise the damping grows.
        """
        params = self._trainable()
        jtj, jtr, loss0 = self._residual_jacobian()
        threshold = min(est.n_eff_threshold for est in self.reweighting.values())
        walls = self._wall_grids()
        damping = self._lm_damping
        start = [p.detach().clone() for p in params]
        accepted = False
        loss1 = loss0
        for _ in range(12):
            step = _damped_solve(jtj, jtr, damping)
            offset = 0
            with torch.no_grad():
                for p, p0 in zip(params, start, strict=True):
                    n = p.numel()
                    p.copy_(p0 + step[offset : offset + n].reshape(p.shape).to(p.dtype))
                    offset += n
                trial, n_eff = self._residuals()
            loss1 = float(trial @ trial)
            if self._dist is not None:
                from . import distributed

                loss1 = float(self._reduce_residual_sums(loss1)[0])
                n_eff = float(distributed.all_reduce(torch.tensor([n_eff], dtype=torch.float64), op="min")[0])
            if math.isfinite(loss1) and loss1 < loss0 and n_eff >= threshold and not self._has_core_hole(walls):
                accepted = True
                damping = max(damping / 3.0, 1e-6)
                break
            damping *= 4.0
        if not accepted:
            with torch.no_grad():
                for p, p0 in zip(params, start, strict=True):
                    p.copy_(p0)
            # New snapshots come next: the damping that failed on these says
            # little about them (left large, it would freeze the parameters).
            damping = 1.0
        if not accepted or n_eff < 0.5 * (1.0 + threshold):
            # The snapshots are (nearly) used up: sample afresh next epoch
            # rather than creep along the trust-region boundary.
            self.snapshots.clear()
        self._lm_damping = damping
        return {
            "accepted": accepted,
            "damping": damping,
            "reweighted_loss_before": loss0,
            "reweighted_loss_after": loss1,
        }

    def _target_grids(self) -> List[tuple]:
        """Per target with any: (pair, r), the bins where its g(r) > 0.05 inside the cutoff.

        Where the caps of the IMC step (``max_potential_change``,
        ``imc_level_fraction``) and the pool radius measure u(r).
        """
        grids = []
        for state in self.states:
            for target in state.targets:
                r = np.asarray(target.r, dtype=float)
                keep = (np.asarray(target.g) > 0.05) & (r > 0) & (r < self.table.cutoff)
                if keep.any():
                    grids.append((tuple(target.pair), r[keep]))
        return grids

    def _potential_on_target_grid(self) -> List[np.ndarray]:
        """u(r)/kT on :meth:`_target_grids` (kT of the coldest state)."""
        kT = self._coldest_kT()
        with torch.no_grad():
            return [
                np.asarray(self.table.evaluate(r, pair=pair)[0], dtype=float) / kT for pair, r in self._target_grids()
            ]

    def _target_walls(self) -> List[tuple]:
        """Per target: (pair, r_wall, bin width), r_wall the first r where g_target > 1e-3."""
        walls = []
        for state in self.states:
            for target in state.targets:
                r = np.asarray(target.r, dtype=float)
                seen = np.nonzero((np.asarray(target.g) > 1e-3) & (r > 0))[0]
                if seen.size:
                    width = float(np.min(np.diff(r))) if r.size > 1 else float(self.table.cutoff)
                    walls.append((tuple(target.pair), float(r[seen[0]]), width))
        return walls

    def _wall_grids(self) -> List[tuple]:
        """Per target pair: (pair, r grid from r_wall / 2 to r_wall), r_wall as in :meth:`_target_walls`."""
        return [(pair, np.linspace(0.5 * r_wall, r_wall, 64)) for pair, r_wall, _ in self._target_walls()]

    def _has_core_hole(self, grids) -> bool:
        """True if u(r) somewhere inside the excluded core (below r_wall) is lower than u(r_wall), or not finite.

        Data never constrain u(r) where g(r) = 0: a step may bend the spline
        there into a well that sampling falls into (the state explodes
        thousands of steps later). A core at least as high as its edge cannot trap.
        """
        with torch.no_grad():
            for pair, r in grids:
                u, _ = self.table.evaluate(r, pair=pair)
                u = np.asarray(u, dtype=float)
                if not np.all(np.isfinite(u)) or float(u.min()) < float(u[-1]) - 1e-9 * max(1.0, abs(float(u[-1]))):
                    return True
        return False

    def _smoothing_grids(self) -> List[tuple]:
        """Per target pair: (pair, r), the grid the smoothing penalties act on.

        From three grid points below the first r where a target of that pair
        has g(r) > 1e-3 up to the cutoff, spaced like the finest target grid
        of the pair.
        """
        spans: Dict[tuple, List[float]] = {}
        for pair, r_wall, width in self._target_walls():
            lo, dr = spans.get(pair, [np.inf, np.inf])
            spans[pair] = [min(lo, r_wall), min(dr, width)]
        grids = []
        for pair, (lo, width) in spans.items():
            # A few points into the excluded core tie the knots there (which the
            # data do not see) smoothly to the step above the wall, so the
            # step does not bend them into a well; not further in, where an
            # analytic prior's wall is so steep that its curvature would
            # swamp the penalty of every other parameter.
            lo = max(lo - _CORE_POINTS * width, 0.5 * width)
            n_points = int(np.ceil((self.table.cutoff - lo) / width - 1e-9))  # every point below the cutoff
            grids.append((pair, torch.as_tensor(lo + width * np.arange(n_points), dtype=torch.float64)))
        return grids

    def _grid_differences(self, values, order: int, refine: int = 1) -> Optional[tuple]:
        """``order``-th differences of ``values(pair, r)`` / kT on the smoothing grids, with their Jacobian.

        ``values(pair, r)`` returns u(r) (kJ/mol) of the part of the potential
        to smooth, or None to skip the pair; the grids (:meth:`_smoothing_grids`)
        are refined ``refine``-fold, kT is the coldest state's. Returns
        ``(D, d)``, shapes (K, n_params) and (K,), or None when no pair has
        more than ``order`` points. Recomputed every step (an analytic prior's
        σ makes the rows depend on the parameters); one backward pass per row.
        """
        from .gradients import _jacobian

        params = self._trainable()
        kT = self._coldest_kT()
        rows, differences = [], []
        for pair, r in self._smoothing_grids():
            if refine > 1 and r.numel() > 1:
                r = torch.linspace(float(r[0]), float(r[-1]), refine * (r.numel() - 1) + 1, dtype=torch.float64)
            if r.numel() <= order:  # a wall at the cutoff: nothing to smooth
                continue
            with torch.enable_grad():
                u = values(pair, r)
                if u is None:
                    continue
                d = torch.diff(u.to(torch.float64) / kT, n=order)
                rows.append(_jacobian(d, params))
            differences.append(d.detach())
        if not rows:
            return None
        return torch.cat(rows), torch.cat(differences)

    def _curvature_matrix(self) -> torch.Tensor:
        """``Σ (D₂B)ᵀ(D₂B)``: squared second differences of δu/kT per unit parameter step.

        ``B`` is the Jacobian of u(r)/kT on each target pair's smoothing grid
        (:meth:`_smoothing_grids`) refined twofold; ``D₂`` takes second
        differences along it (0.1 s for the demo's table). On the bin centres
        alone, a spline whose knots alternate (knots spaced like the bins)
        vanishes at every point, so that step went unpenalised, and a smeared
        g(r) does not see it either: noise drove it, knot by knot, to ±0.05-0.1
        kT in the demo's first shell (docs/training.md, E36, E37).
        """

        found = self._grid_differences(self._pair_energy, order=2, refine=2)
        if found is None:
            n_params = sum(p.numel() for p in self._trainable())
            return torch.zeros(n_params, n_params, dtype=torch.float64)
        d2b = found[0]
        return d2b.T @ d2b

    def _correction_roughness(self) -> Optional[tuple]:
        """Fourth differences ``w`` of the learned corrections' u(r)/kT and their Jacobian ``W``.

        The corrections are the :class:`CubicSpline` and :class:`NeuralCorrection`
        terms of each pair's potential (all of it if it is one such term); an
        analytic prior (soft sphere, ...) is left out, so it is free to carry
        the steep wall while the correction stays smooth. Taken on
        :meth:`_smoothing_grids` refined twofold: on bin centres alone, an
        alternation of knots spaced like the bins would fall between the
        points. Returns ``(W, w)``, shapes (K, n_params) and (K,), or None when
        no pair has a correction.
        """

        def corrections(pair, r):
            terms = _correction_terms(self.table.pair_potentials[self.table.pair_index(pair)])
            return sum(term.energy_and_derivative(r)[0] for term in terms) if terms else None

        return self._grid_differences(corrections, order=4, refine=2)

    def _smoothing_penalty(self, curvature_of_loss: torch.Tensor) -> Optional[torch.Tensor]:
        """``imc_smoothing`` × the curvature matrix, scaled to the trace of ``JᵀJ`` (or the metric); None when off."""
        weight = self.options.get("imc_smoothing", 0.0)
        if weight <= 0:
            return None
        matrix = self._curvature_matrix()
        trace = float(torch.trace(matrix))
        if not trace > 0:
            return None
        return weight * float(torch.trace(curvature_of_loss)) / trace * matrix

    def _roughness_penalty(self, jtj: torch.Tensor, penalty: Optional[torch.Tensor], jtr: torch.Tensor) -> tuple:
        """Add ``imc_roughness`` ν to the Newton system: ``ν' WᵀW`` to the matrix, ``ν' Wᵀw`` to ``Jᵀρ``.

        The step then minimises ``|ρ + Jδ|² + ν' |w + Wδ|²`` (plus the other
        penalties): the fourth differences ``w`` of the learned correction
        itself (:meth:`_correction_roughness`), not of the step, are pulled
        towards zero, ν' = ν trace(JᵀJ) / trace(WᵀW). Returns the new penalty,
        the new right-hand side and ``|w|²`` before the step.
        """
        found = self._correction_roughness()
        if found is None:
            return penalty, jtr, None
        w_matrix, w = found
        trace = float(torch.trace(w_matrix.T @ w_matrix))
        if not trace > 0:
            return penalty, jtr, float(w @ w)
        weight = self.options["imc_roughness"] * float(torch.trace(jtj)) / trace
        extra = weight * (w_matrix.T @ w_matrix)
        penalty = extra if penalty is None else penalty + extra
        return penalty, jtr + weight * (w_matrix.T @ w), float(w @ w)

    def _move_within(self, step: torch.Tensor, limit: float, normalise: bool = False) -> tuple:
        """Move the parameters by ``scale * step``, u(r) changing by at most ``limit`` kT.

        The change is measured where a target has g(r) > 0.05; ``scale`` starts
        at 1 (or, with ``normalise``, at the value that makes the change equal
        ``limit``) and shrinks until the change obeys the limit and the core
        has no well (:meth:`_has_core_hole`). Returns ``(change_kT, scale,
        core_hole_shrinks)``; a step that cannot be made safe is not taken.
        """
        params = self._trainable()
        start = [p.detach().clone() for p in params]
        before = self._potential_on_target_grid()

        def move(scale: float) -> None:
            offset = 0
            with torch.no_grad():
                for p, p0 in zip(params, start, strict=True):
                    n = p.numel()
                    p.copy_(p0 + scale * step[offset : offset + n].reshape(p.shape).to(p.dtype))
                    offset += n

        def change() -> float:
            return _largest_change(before, self._potential_on_target_grid())

        walls = self._wall_grids()
        scale = 1.0
        move(scale)
        moved = change()
        if normalise and math.isfinite(moved) and moved > 0:
            scale = limit / moved
            move(scale)
            moved = change()
        # u(r) is not linear in every parameter (σ of an analytic prior): shorten
        # until the measured change obeys the cap, and the core stays without a well.
        hole_shrinks = 0
        for _ in range(30):
            capped = math.isfinite(moved) and moved <= limit * (1.0 + 1e-9)
            if capped and not self._has_core_hole(walls):
                break
            if not capped:
                scale *= 0.9 * limit / moved if math.isfinite(moved) and moved > 0 else 0.1
            else:
                hole_shrinks += 1
                scale *= 0.5
            move(scale)
            moved = change()
        else:
            move(0.0)
            moved = 0.0
            scale = 0.0
        return moved, scale, hole_shrinks

    def _natural_step(self, loss: float) -> Dict[str, Any]:
        """One natural-gradient step: the loss gradient preconditioned with the Fisher metric.

        Solves ``(M + λ diag M) δ = -∇L`` with ``M`` the Fisher information of
        the Boltzmann distribution (:func:`~openmm_diffsim.gradients.fisher_metric`,
        summed over the states' current snapshots, λ = ``imc_damping``), and
        scales δ so that u(r) changes by ``f * learning_rate`` kT where a
        target has g(r) > 0.05 (the learning rate under ``lr_schedule``; less
        while the core would have a well): f = 1 at first, halved after a step
        that raised the (freshly estimated) loss, grown 1.2× up to 1 after one
        that lowered it. ``loss`` is this epoch's loss, at the current parameters. The
        gradient may come from any estimator: with rollouts it is the
        preconditioner a short rollout's gradient needs (its raw direction
        barely lowers the loss; docs/gradients.md).
        """
        from .gradients import fisher_metric

        params = self._trainable()
        metric = None
        for state in self._states_here():
            snapshots = self.snapshots.get(state.name)
            if snapshots is None:
                raise RuntimeError(f"no snapshots of state {state.name!r} for the natural-gradient metric")
            m = float(state.weight) * fisher_metric(self.table, state, snapshots)
            metric = m if metric is None else metric + m
        n_params = sum(p.numel() for p in params)
        if metric is None:
            metric = torch.zeros(n_params, n_params, dtype=torch.float64)
        if self._dist is not None:
            (metric,) = self._reduce_residual_sums(metric)
        grad = torch.cat(
            [(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1).to(torch.float64) for p in params]
        )
        direction = _damped_solve(metric, grad, self.options["imc_damping"], self._smoothing_penalty(metric))
        # The metric fixes the direction, not the length: a short rollout sees
        # only part of the equilibrium response, and the RDF, pressure and
        # energy terms want factors orders of magnitude apart. Every step is
        # therefore scaled to move u(r) by a fraction f of the (scheduled)
        # learning rate in kT: f = 1 at first, halved after a step that raised
        # the (freshly estimated) loss, grown 1.2x (to at most 1) after one that lowered it.
        if self._natural_fraction is None or self._natural_last_loss is None:
            fraction, adapted = 1.0, "first"
        elif loss > self._natural_last_loss:
            fraction, adapted = 0.5 * self._natural_fraction, "halved"
        else:
            fraction, adapted = min(1.0, 1.2 * self._natural_fraction), "grown"
        moved, scale, hole_shrinks = self._move_within(direction, fraction * self._learning_rate_now, normalise=True)
        self._natural_fraction = fraction
        self._natural_last_loss = float(loss)
        return {
            "max_change_kT": moved,
            "fraction": fraction,
            "step_scale": scale,
            "adapted": adapted,
            "core_hole_shrinks": hole_shrinks,
        }

    def _line_search(
        self,
        rows: Dict[str, Tuple[torch.Tensor, torch.Tensor]],
        energies_before: Dict[str, torch.Tensor],
        start: torch.Tensor,
    ) -> Dict[str, float]:
        """``imc_line_search``: move back along the step just taken to the minimum of a second-order model.

        The step is ``θ - start``; per state, ``rows`` holds the residuals ρ
        and their Jacobian J at ``start`` and ``energies_before`` the frames'
        energies there. The model ``Σ |ρ + t Jδ + ½ t² ρ''|²`` (ρ'' on the RDF
        rows from :meth:`~openmm_diffsim.gradients.ReweightingEstimator.residual_curvature`,
        0 on the others) is a quartic in t, minimised over
        ``IMC_LINE_SEARCH_POINTS`` fractions in [``IMC_LINE_SEARCH_MIN``, 1].
        A shorter step that would dig a well into the core is not taken.
        Returns ``{"line_scale": t, "line_model_loss": model at t, "line_model_loss_full": model at 1}``.
        """
        taken = self._flat_parameters() - start
        coefficients = torch.zeros(5, dtype=torch.float64)  # of t^0 .. t^4
        for rho, first, half_second in self._line_terms(rows, energies_before, taken):
            coefficients = coefficients + torch.stack(
                [
                    rho @ rho,
                    2.0 * rho @ first,
                    first @ first + 2.0 * rho @ half_second,
                    2.0 * first @ half_second,
                    half_second @ half_second,
                ]
            )
        if self._dist is not None:
            (coefficients,) = self._reduce_residual_sums(coefficients)
        fractions = torch.linspace(IMC_LINE_SEARCH_MIN, 1.0, IMC_LINE_SEARCH_POINTS, dtype=torch.float64)
        model = sum(c * fractions**k for k, c in enumerate(coefficients))
        best = int(torch.argmin(model))
        fraction = float(fractions[best])
        if fraction < 1.0:
            self._set_flat_parameters(start + fraction * taken)
            if self._has_core_hole(self._wall_grids()):
                self._set_flat_parameters(start + taken)  # the capped step was checked; keep it whole
                fraction, best = 1.0, len(fractions) - 1
        return {
            "line_scale": fraction,
            "line_model_loss": float(model[best]),
            "line_model_loss_full": float(model[-1]),
        }

    def _line_terms(
        self,
        rows: Dict[str, Tuple[torch.Tensor, torch.Tensor]],
        energies_before: Dict[str, torch.Tensor],
        taken: torch.Tensor,
    ) -> List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per state of this process, ``(ρ, Jδ, ½ρ'')`` of the model ``ρ + t Jδ + ½ t² ρ''`` along the step ``taken``.

        ``rows`` and ``energies_before`` are at the step's start, the table at
        its end; ρ'' is 0 on the pressure and energy rows.
        """
        terms = []
        for state in self._states_here():
            rho, jac = rows[state.name]
            estimator = self.reweighting[state.name]
            half_second = torch.zeros_like(rho)
            curvature = estimator.residual_curvature(
                state, state.targets, energies_before[state.name], estimator.frame_energies(self.table), 1.0
            )
            half_second[: curvature.numel()] = 0.5 * curvature
            terms.append((rho, jac @ taken.to(jac.dtype), half_second))
        return terms

    def _restore_configurations(self, states: Optional[Dict[str, Dict[str, Any]]]) -> None:
        """Continue sampling from ``states`` (positions, velocities, box per state name)."""
        for name, saved in (states or {}).items():
            self._sampler_states[name] = copy.deepcopy(saved)
            sampler = self.samplers.get(name)
            if sampler is not None:
                sampler.set_state(saved["positions"], saved["velocities"], saved["box"])

    def _imc_overshot(self, loss: float, last: Dict[str, Any]) -> Tuple[bool, float]:
        """``imc_reject_factor``: did the step ``last`` overshoot, judged by the fresh ``loss``? Also the noise.

        A loss near its sampling noise scatters by a factor of two or more
        between samples of the same potential (few independent directions in
        a smeared RDF): only a loss that also exceeds the factor times its own
        noise says the step overshot.
        """
        noise = self._loss_noise()
        # NaN (a sample of one frame has no block variance): judge by the loss alone.
        floor = noise if math.isfinite(noise) else 0.0
        return loss > self.options["imc_reject_factor"] * max(last["loss"], floor), noise

    def _undo_imc_step(self, last: Dict[str, Any]) -> None:
        """Back to the parameters the step ``last`` started from, and to the configurations its sample ended in."""
        self._set_flat_parameters(last["parameters"])
        self._restore_configurations(last.get("sampler_states"))

    def _check_last_imc_step(self) -> None:
        """``imc_check_last``: judge the last IMC step by a fresh sample, and undo it if it overshot.

        Every other step is judged by the sample the next epoch draws; the
        last has none. The rule is the epoch's (:meth:`_imc_overshot`, kept
        after ``IMC_MAX_UNDOS`` undos in a row); a sample that fails (the
        potential blew up) counts as an overshoot. A kept step keeps its
        sample, so a continued fit starts from it without sampling again.
        Logged as ``final_check`` in the last epoch's record.
        """
        from .gradients import NonFiniteError
        from .sampling import SamplingError

        last = self._imc_last
        if (
            self.options["optimizer"] != "imc"
            or self.options.get("imc_reject_factor") is None
            or not self.options.get("imc_check_last", True)
            or last is None
            or last.get("checked")
            or not self.history
        ):
            return
        start = time.perf_counter()
        steps_before = self.md_steps
        self.optimizer.zero_grad(set_to_none=True)
        record = self._new_record()
        loss = noise = failure = None
        overshot = rebased = False
        try:
            loss, results = self._measure_states(record)
            overshot, noise = self._imc_overshot(loss, last)
        except (SamplingError, NonFiniteError, FloatingPointError) as exc:
            failure = str(exc)
        self.optimizer.zero_grad(set_to_none=True)  # the check's gradients are no step
        if overshot and last.get("undos", 0) >= IMC_MAX_UNDOS:
            rebased = True  # as in an epoch: the reference was the outlier
        undone = failure is not None or (overshot and not rebased)
        if undone:
            self._undo_imc_step(last)
            self.snapshots.clear()
            if failure is not None:
                self.samplers.clear()  # rebuilt from the restored configurations
            if self.options["average_last"] > 1 and self._recent_parameters:
                self._recent_parameters.pop()  # the iterate that overshot is no result
            # A continued fit starts from the restored parameters with a first
            # step's cap: there is no kept step to grow it from.
            self._imc_last = None
        else:
            last["checked"] = True
            self._last_results = results
            if loss < self.best_loss:
                self.best_loss = loss
                self.best_state = copy.deepcopy(self.table.state_dict())
        seconds = time.perf_counter() - start
        self.wall_time += seconds
        check = {
            "loss": loss,
            "loss_before": float(last["loss"]),
            "loss_noise": noise,
            "undone": undone,
            "rebased": rebased,
            "error": failure,
            "md_steps": self.md_steps - steps_before,
            "seconds": seconds,
        }
        self.history[-1]["final_check"] = check
        if self.options["progress"] and self._is_main():
            measured = f"sampling failed ({failure})" if failure else f"fresh loss {loss:.3e}"
            verdict = "undone" if undone else ("kept (rebased)" if rebased else "kept")
            print(f"  final check of the last step: {measured} after {last['loss']:.3e}: {verdict}")

    def _imc_step(self) -> Dict[str, Any]:
        """One inverse Monte Carlo step: a damped Newton step, then fresh snapshots.

        Solves ``(JᵀJ + λ diag(JᵀJ)) δ = -Jᵀρ`` with the exact linear response
        ``J = -β cov(g, ∂U/∂θ)`` of the current snapshots (λ = ``imc_damping``)
        and shortens δ so that u(r) moves by at most ``max_potential_change``
        kT wherever a target has g(r) > 0.05, and further while u(r) would have
        a well inside the excluded core (below where g_target first exceeds
        1e-3; see :meth:`_has_core_hole`). The snapshots are then discarded:
        unlike ``gauss-newton`` (which reuses snapshots inside an N_eff trust
        region, suited to small systems), every step starts from a fresh sample,
        which suits large systems where reweighting tolerates only tiny steps.
        If no length of the step keeps the core free of a well, it is
        recomputed with ten times the damping (at least 1e-3, at most 1;
        logged as ``damping``) instead of being refused, which would leave
        the next sample to propose the same step. With ``imc_reject_factor``,
        a fresh loss above that factor times the last one undoes the last
        step first (logged as ``undone``, the cap as ``cap_kT``). With
        ``imc_line_search`` the capped step is then shortened to the minimum
        of a second-order model of the loss along it (:meth:`_line_search`).
        """
        shrink_noise = self.options.get("imc_noise_shrink", False)
        line_search = self.options.get("imc_line_search", False)
        rows = self._residual_rows() if self.options["imc_pool"] > 1 or shrink_noise or line_search else None
        jtj, jtr, loss0 = self._residual_jacobian() if rows is None else self._normal_equations(rows)
        noise_cov = self._jtr_noise_covariance(rows) if shrink_noise else None
        # A rolled-back step halves the learning rate; the IMC step (which has
        # none) shrinks its cap by the same factor, so a retry is not the same step.
        limit = self.options["max_potential_change"] * self.learning_rate / self.options["learning_rate"]
        undone = rebased = False
        undos = 0
        model_ratio = None
        factor = self.options.get("imc_reject_factor")
        last = self._imc_last
        noise = None
        if factor is not None and last is not None:
            overshot, noise = self._imc_overshot(loss0, last)
            if overshot and last.get("undos", 0) >= IMC_MAX_UNDOS:
                # The step was retaken at a quarter of its length or less and the
                # fresh loss still exceeds the reference: the reference sample was
                # the outlier (a fluid near coexistence scatters tenfold in loss
                # between 100-frame samples), not the step. Keep it; its loss is
                # the new reference.
                rebased = True
            elif overshot:
                # The last step overshot: back to where it started, the same
                # Newton system, capped at half the change the step made (often
                # below its cap, which halving would leave the step as it was).
                # The fresh sample only judged the step.
                self._undo_imc_step(last)
                jtj, jtr, loss0 = last["jtj"], last["jtr"], last["loss"]
                noise_cov = last.get("noise_cov") if shrink_noise else None
                limit, undone = 0.5 * (last.get("moved") or last["limit"]), True
                undos = last.get("undos", 0) + 1
                # The pooled samples led to the overshoot; start the pool afresh.
                self._imc_pool = []
            else:
                ceiling = limit
                grown_cap = self.options.get("imc_max_cap")
                predicted = last.get("predicted_drop")
                if predicted is not None and predicted > 0:
                    model_ratio = (last["loss"] - loss0) / predicted
                    if grown_cap is not None and last.get("capped") and model_ratio >= 0.5:
                        # The cap, not the model, held the last step back, and the
                        # fresh sample fell as the model said: trust it further.
                        ceiling = max(limit, grown_cap * self.learning_rate / self.options["learning_rate"])
                limit = min(ceiling, 1.5 * last["limit"])
        pool = None if undone or rows is None else self._pooled_system(rows)
        if pool is not None:
            start = self._flat_parameters()
            self._set_flat_parameters(pool["parameters"])
            if self._has_core_hole(self._wall_grids()):
                # The mean of the pooled parameters digs a well (u is not linear
                # in every parameter): step from the current ones, unpooled.
                self._set_flat_parameters(start)
                pool = None
            else:
                jtj, jtr = pool["jtj"], pool["jtr"]
        prior = None
        if self.options.get("imc_ibi_prior", 0.0) > 0:
            # IBI's correction read off the sample the step is solved from: on an
            # undo that is the earlier sample, not the one the overshoot drew.
            prior = last.get("prior") if undone else self._ibi_prior(limit)
        if factor is not None:
            self._imc_last = {
                "parameters": self._flat_parameters().clone(),
                # Where the sample behind this step ended, drawn before the step:
                # an undo starts the next sample there, not in whatever the
                # overshooting potential made of the fluid (a droplet, say).
                "sampler_states": copy.deepcopy(self._sampler_states),
                "jtj": jtj.clone(),
                "jtr": jtr.clone(),
                "loss": float(loss0),
                "limit": float(limit),
                "undos": undos,
                **({} if noise_cov is None else {"noise_cov": noise_cov.clone()}),
                **({} if prior is None else {"prior": (prior[0].clone(), prior[1].clone())}),
            }
        data_jtj, data_jtr = jtj, jtr  # the linear model of the data, before any penalty joins it
        penalty = self._smoothing_penalty(jtj)
        roughness = None
        if self.options.get("imc_roughness", 0.0) > 0:
            penalty, jtr, roughness = self._roughness_penalty(jtj, penalty, jtr)
        prior_rhs = None
        if prior is not None:
            # ν' |Bδ - d|² joins the system: ν' BᵀB to the matrix, -ν' Bᵀd to Jᵀρ;
            # kept apart as its own solve so the noise shrinkage judges the data's part alone.
            weight = self.options["imc_ibi_prior"] * float(torch.trace(jtj)) / float(torch.trace(prior[0]))
            penalty = weight * prior[0] if penalty is None else penalty + weight * prior[0]
            prior_rhs = -weight * prior[1]
        damping = self.options["imc_damping"]
        before = self._flat_parameters()
        metric = self._potential_metric() if noise_cov is not None else None
        shrink: Dict[str, float] = {}
        prior_log: Dict[str, float] = {}

        level_fraction = self.options.get("imc_level_fraction")
        level_rows = level_metric = None
        if level_fraction is not None:
            level_rows = self._level_rows()
            level_metric = metric if metric is not None else self._potential_metric()
        level: Dict[str, Any] = {}

        def solve(damping: float) -> torch.Tensor:
            step = _damped_solve(jtj, jtr, damping, penalty)
            if noise_cov is not None:
                shrink.update(_noise_shrink(step, noise_cov, jtj, damping, penalty, metric))
                step = shrink["shrink"] * step
            if prior_rhs is not None:
                towards_ibi = _damped_solve(jtj, prior_rhs, damping, penalty)
                whole = step + towards_ibi
                length = float(whole @ prior[0] @ whole)
                share = math.sqrt(float(towards_ibi @ prior[0] @ towards_ibi) / length) if length > 0 else 0.0
                prior_log["ibi_prior_share"] = share
                step = whole
            if level_rows is not None:
                # The excess level leaves as the least change of u(r) (a uniform shift): the
                # Newton system as the metric would move it into the wall, which the data
                # see least, and hold the mean by lowering u(r) elsewhere (measured on LJ:
                # walls 0.03-0.17 kT off over three seeds; with the change of u(r) added to
                # it, 0.04-0.14; with the change of u(r) alone, 0.01-0.02 and, on other
                # targets, 0.06-0.12; docs/experiments.md).
                step, wanted, bounded = _bound_level(step, level_metric, level_rows, level_fraction * limit)
                level.update(level_wanted_kT=wanted, level_bounded=bounded)
            return step

        # The search reads the curvature off the sample the step was solved from:
        # not after an undo (an earlier sample's system) nor for a pooled step.
        search = line_search and not undone and pool is None
        if search:
            energies_before = {s.name: self.reweighting[s.name].frame_energies(self.table) for s in self._states_here()}
            grid_before = self._potential_on_target_grid()
        step = solve(damping)
        moved, scale, hole_shrinks = self._move_within(step, limit)
        # No length of this step keeps the core free of a well: the knots the
        # data do not see moved too far. Refusing it would leave the next
        # sample to propose the same step again, so damp more instead.
        while scale == 0.0 and hole_shrinks > 0 and damping < _FALLBACK_DAMPING_MAX:
            damping = max(10.0 * damping, _FALLBACK_DAMPING_MIN)
            step = solve(damping)
            moved, scale, more = self._move_within(step, limit)
            hole_shrinks += more
        line: Dict[str, float] = {}
        if search and moved > 0.0:
            line = self._line_search(rows, energies_before, before)
            if line["line_scale"] < 1.0:
                moved = _largest_change(grid_before, self._potential_on_target_grid())
        if self._imc_last is not None and factor is not None:
            self._imc_last["moved"] = float(moved)
            # What the linear model of the data (penalties left out) expects the
            # step to remove from the loss: -(2 δ·Jᵀρ + δᵀJᵀJδ).
            delta = self._flat_parameters() - before
            self._imc_last["predicted_drop"] = float(-(2.0 * delta @ data_jtr + delta @ data_jtj @ delta))
            # The cap alone (on the change of u(r), or on its level) shortened it.
            self._imc_last["capped"] = bool((scale < 1.0 or level.get("level_bounded")) and hole_shrinks == 0)
        if level_rows is not None:
            taken = self._flat_parameters() - before
            level["level_kT"] = float((level_rows @ taken.to(level_rows.dtype)).abs().max())
        self.snapshots.clear()
        return {
            "max_change_kT": moved,
            "step_scale": scale,
            "loss_before": loss0,
            "core_hole_shrinks": hole_shrinks,
            "damping": damping,
            **({} if roughness is None else {"roughness": roughness}),
            **shrink,
            **prior_log,
            **line,
            **level,
            **(
                {}
                if factor is None
                else {
                    "undone": undone,
                    "rebased": rebased,
                    "cap_kT": limit,
                    "loss_noise": noise,
                    "model_ratio": model_ratio,
                }
            ),
            **(
                {}
                if pool is None
                else {"pooled_samples": pool["samples"], "pooled_frames": pool["frames"], "pooled_loss": pool["loss"]}
            ),
        }

    # -- main loop ----------------------------------------------------------------------

    def _initialise(self) -> None:
        if self._initialised:
            return
        self._initialised = True
        if self.options["boltzmann_initial_guess"] and self.epoch == 0:
            self._apply_boltzmann_guess()
        if self.output_dir is not None and self._is_main():
            self.output_dir.mkdir(parents=True, exist_ok=True)

    def _apply_boltzmann_guess(self) -> None:
        from .gradients import _prepare_targets
        from .ibi import deconvolved_inversion

        estimator = self._grid_estimator()
        for state in self.states:
            for target in state.targets:
                if estimator is None:
                    r, u = boltzmann_inversion(target.r, target.g, state.kT, g_min=0.05)
                    inside = r < self.table.cutoff
                    r, u = r[inside], u[inside] - u[inside][-1]
                else:
                    # Through the estimator's kernel, on its bins: -kT ln g of a
                    # smeared RDF puts the repulsive wall too soft (ibi.boltzmann_knot_values).
                    g = _prepare_targets(self.table, [target], estimator.r, estimator.target_outside)[0].g.numpy()
                    cutoff = np.nextafter(self.table.cutoff, 0.0)
                    r, u = deconvolved_inversion(estimator.r, g, state.kT, estimator.smearing, cutoff, g_min=0.05)
                # Continue the inverted wall a few bins into the core along its
                # own slope: fitted to the resolved bins alone, a spline may
                # extrapolate inwards into a well that sampling falls into and
                # that no later step may leave (see _has_core_hole).
                width = r[1] - r[0]
                slope = min((u[1] - u[0]) / width, 0.0)
                core = r[0] - width * np.arange(_CORE_POINTS, 0, -1)
                core = core[core > 0]
                r, u = np.concatenate([core, r]), np.concatenate([u[0] + slope * (core - r[0]), u])
                rms = fit_table_to_curve(self.table, target.pair, r, u)
                logger.info("Boltzmann-inversion initial guess for %s: rms %.3g kJ/mol", "-".join(target.pair), rms)
            break  # one state's guess is enough; the pair potential is shared

    def _grid_estimator(self):
        """An estimator whose RDF grid and smearing the targets are compared on, or None (a custom one without them)."""
        estimators = list((self.reweighting or {}).values()) + list(self.rollouts.values())
        if self._custom_estimator is not None:
            estimators.append(self._custom_estimator)
        for estimator in estimators:
            if all(hasattr(estimator, name) for name in ("r", "smearing", "target_outside")):
                return estimator
        return None

    def _set_learning_rate(self) -> None:
        base = self.learning_rate
        if self.options["lr_schedule"] == "cosine":
            frac = self.epoch / max(1, self.options["max_epochs"])
            base = self.learning_rate * 0.5 * (1 + math.cos(math.pi * frac))
            base = max(base, 0.05 * self.learning_rate)
        self._learning_rate_now = base
        for group in self.optimizer.param_groups:
            group["lr"] = base * group.get("scale", 1.0)

    def _good_state(self) -> Dict[str, Any]:
        return {
            "table": copy.deepcopy(self.table.state_dict()),
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "sampler_states": copy.deepcopy(self._sampler_states),
        }

    def _roll_back(self, good: Dict[str, Any], reason: str) -> Dict[str, Any]:
        self.table.load_state_dict(good["table"])
        self.optimizer.load_state_dict(good["optimizer"])
        self._sampler_states = copy.deepcopy(good["sampler_states"])
        self.samplers.clear()  # rebuilt from the last good configurations
        self.snapshots.clear()
        old = self.learning_rate
        self.learning_rate *= 0.5
        event = {"epoch": self.epoch, "event": "rollback", "reason": reason, "learning_rate": [old, self.learning_rate]}
        logger.warning(
            "epoch %d rolled back (%s); learning rate %.3g -> %.3g", self.epoch, reason, old, self.learning_rate
        )
        if self.options["progress"] and self._is_main():
            print(f"  ! epoch {self.epoch}: {reason}; rolled back, learning rate {old:.3g} -> {self.learning_rate:.3g}")
        return event

    def fit(self) -> List[Dict[str, Any]]:
        """Run training until ``max_epochs``, the target loss or a plateau.

        Inside an initialised process group of more than one process (see
        :func:`openmm_diffsim.distributed.init`) each process samples its
        share of the state points; the history, parameters and checkpoint
        are those of one process. Callbacks run on every process.

        Returns
        -------
        list of dict
            The per-epoch history (also written to ``log.jsonl``).
        """
        from .gradients import NonFiniteError
        from .sampling import SamplingError

        self._setup_distributed()
        self._initialise()
        if self._dist is not None:
            from . import distributed

            # Every rank must start from the same parameters (e.g. a network
            # initialised at random in each process): rank 0's win.
            distributed.broadcast_parameters(self._trainable())
        retries = 0
        pending_events: List[Dict[str, Any]] = []
        if self.options["progress"] and self.epoch == 0 and self._is_main():
            print(
                f"openmm-diffsim: training {sum(p.numel() for p in self._trainable())} parameters on "
                f"{len(self.states)} state point(s) with the {self.estimator_name} estimator"
            )
        if self.options["progress"] and self._dist is not None and self._is_main():
            split = "; ".join(
                f"rank {k}: {', '.join(self.states[i].name for i in part) or '(idle)'}"
                for k, part in enumerate(self._dist["parts"])
            )
            print(f"openmm-diffsim: {self._dist['world_size']} processes; {split}")
        while self.epoch < self.options["max_epochs"]:
            self._set_learning_rate()
            good = self._good_state()
            start = time.perf_counter()
            try:
                record = self._epoch()
            except (SamplingError, NonFiniteError, FloatingPointError) as exc:
                retries += 1
                self.wall_time += time.perf_counter() - start
                pending_events.append(self._roll_back(good, str(exc)))
                if retries > self.options["max_retries"]:
                    self._write_log()
                    raise TrainingError(
                        f"training failed {retries} times in a row at epoch {self.epoch}; last error: {exc}"
                    ) from exc
                continue
            retries = 0
            self.wall_time += time.perf_counter() - start
            record["wall_time"] = self.wall_time
            record["events"] = pending_events
            pending_events = []
            self.history.append(record)
            if record["loss"] < self.best_loss * 0.99:
                self.best_epoch = self.epoch
            if record["loss"] < self.best_loss:
                self.best_loss = record["loss"]
                # The loss is that of the potential sampled in this epoch, before its step.
                self.best_state = good["table"]
            self.epoch += 1
            if self.options["average_last"] > 1:
                if record.get("imc", {}).get("undone") and self._recent_parameters:
                    self._recent_parameters.pop()  # the iterate that overshot is no result
                self._recent_parameters.append(self._flat_parameters())
                del self._recent_parameters[: -self.options["average_last"]]
            self._report(record)
            for callback in self.callbacks:
                callback(self, record)
            if self.output_dir is not None:
                self._write_log()
                if self.options["checkpoint_every"] and self.epoch % self.options["checkpoint_every"] == 0:
                    self._gather_for_checkpoint()  # collective: every rank, same epochs
                    if self._is_main():
                        self.save_checkpoint()
                if self.options["plot_every"] and self.epoch % self.options["plot_every"] == 0 and self._is_main():
                    self.plot()
            if self._should_stop(record):
                break
        self._check_last_imc_step()
        self._average_recent_iterates()
        if self.output_dir is not None:
            self._write_log()
            self._gather_for_checkpoint()
            if self._is_main():
                self.save_checkpoint()
                self.plot()
        return self.history

    def _flat_parameters(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1).clone() for p in self._trainable()])

    def _set_flat_parameters(self, flat: torch.Tensor) -> None:
        offset = 0
        with torch.no_grad():
            for p in self._trainable():
                n = p.numel()
                p.copy_(flat[offset : offset + n].reshape(p.shape).to(p.dtype))
                offset += n

    def _average_recent_iterates(self) -> None:
        """Replace the parameters by the mean of the last ``average_last`` iterates.

        Near convergence, noisy steps (IMC steps above all) scatter the
        iterates around the solution; their mean has less of that noise.
        """
        recent = self._recent_parameters
        if self.options["average_last"] < 2 or len(recent) < 2 or self.averaged_epoch == self.epoch:
            return
        self._set_flat_parameters(torch.stack(recent).mean(0))
        self.averaged_epoch = self.epoch
        if self.options["progress"] and self._is_main():
            print(f"  final potential: mean of the last {len(recent)} iterates")

    def _should_stop(self, record) -> bool:
        target = self.options["target_loss"]
        if target is not None and record["loss"] < target:
            if self.options["progress"] and self._is_main():
                print(f"  reached target loss {target:g}")
            return True
        patience = self.options["plateau_patience"]
        if patience and self.epoch - 1 - self.best_epoch >= patience:
            if self.options["progress"] and self._is_main():
                print(f"  loss plateaued for {patience} epochs")
            return True
        return False

    def _report(self, record) -> None:
        if not self.options["progress"] or not self._is_main():
            return
        parts = [f"epoch {record['epoch'] + 1:4d}/{self.options['max_epochs']}", f"loss {record['loss']:.3e}"]
        for name, rmse in record["rdf_rmse"].items():
            for pair, value in rmse.items():
                parts.append(f"rmse[{name}:{pair}] {value:.4f}")
        for name, value in record.get("pressure", {}).items():
            parts.append(f"P[{name}] {value:.0f} bar")
        for name, value in record.get("energy", {}).items():
            parts.append(f"U/N[{name}] {value:.4f} kJ/mol")
        n_eff = [v for v in record["n_eff"].values() if v is not None]
        if n_eff:
            parts.append(f"N_eff {min(n_eff):.2f}")
        rate = record["epoch_md_steps"] / record["epoch_seconds"] if record["epoch_seconds"] > 0 else 0.0
        parts.append(f"{record['epoch_seconds']:.1f} s")
        if record["epoch_md_steps"]:
            parts.append(f"{rate:.0f} MD steps/s")
        print("  ".join(parts), flush=True)

    # -- persistence ---------------------------------------------------------------------

    def _write_log(self) -> None:
        if self.output_dir is None or not self._is_main():
            return
        lines = "".join(json.dumps(_jsonable(r)) + "\n" for r in self.history)
        _atomic_write_bytes(self.output_dir / LOG_NAME, lines.encode())

    def checkpoint(self) -> Dict[str, Any]:
        """Everything needed to resume, as a dict."""
        return {
            "format": "openmm-diffsim-checkpoint-1",
            "table": self.table,
            "states": self.states,
            "estimator": self.estimator_name if self._custom_estimator is None else self._custom_estimator,
            "options": self.options,
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
            "md_steps": self.md_steps,
            "rollout_steps": self.rollout_steps,
            "wall_time": self.wall_time,
            "history": self.history,
            "learning_rate": self.learning_rate,
            "best_loss": self.best_loss,
            "best_epoch": self.best_epoch,
            "best_state": self.best_state,
            "sampler_states": self._sampler_states,
            "rollout_calls": {name: est.calls for name, est in self.rollouts.items()},
            "recent_parameters": self._recent_parameters,
            "averaged_epoch": self.averaged_epoch,
            "natural_fraction": self._natural_fraction,
            "natural_last_loss": self._natural_last_loss,
            "imc_last": self._imc_last,
            "imc_pool": self._imc_pool,
            "torch_rng": torch.get_rng_state(),
        }

    def save_checkpoint(self, path: Optional[Union[str, Path]] = None) -> Path:
        """Write the checkpoint atomically (default ``output_dir/checkpoint.pt``)."""
        if path is None:
            if self.output_dir is None:
                raise ValueError("no output_dir given: pass a checkpoint path")
            path = self.output_dir / CHECKPOINT_NAME
        path = Path(path)
        atomic_torch_save(self.checkpoint(), path)
        return path

    @classmethod
    def resume(cls, output_dir: Union[str, Path], samplers: Optional[Any] = None, **overrides) -> Trainer:
        """Rebuild a trainer from ``output_dir/checkpoint.pt`` (or a checkpoint file).

        ``overrides`` replace saved options (e.g. ``max_epochs`` to train longer).
        ``samplers`` (as in the constructor) re-attaches states that sample a
        user's ``Simulation``: each sampler's state replaces the saved state of
        the same name, and the run continues from the sampler's current
        configuration.
        """
        path = Path(output_dir)
        if path.is_dir():
            path = path / CHECKPOINT_NAME
        if not path.exists():
            raise FileNotFoundError(f"no checkpoint at {path}")
        try:
            data = torch.load(path, weights_only=False)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means a broken file
            raise ValueError(f"checkpoint {path} could not be read: {exc}") from exc
        if not isinstance(data, dict) or data.get("format") != "openmm-diffsim-checkpoint-1":
            raise ValueError(f"{path} is not an openmm-diffsim checkpoint")
        options = dict(data["options"])
        options.setdefault("imc_check_last", True)  # checkpoints written before the option existed
        options.setdefault("imc_noise_shrink", False)
        options.setdefault("imc_line_search", False)
        unknown = set(overrides) - set(options)
        if unknown:
            raise ValueError(f"unknown option(s) to override: {sorted(unknown)}")
        options.update(overrides)
        learning_rate = options.pop("learning_rate")
        states = list(data["states"])
        if samplers is not None:
            given = list(samplers.values()) if hasattr(samplers, "items") else list(samplers)
            names = [st.name for st in states]
            for sampler in given:
                name = getattr(getattr(sampler, "state", None), "name", None)
                if name not in names:
                    raise ValueError(f"sampler for {name!r} names no state of the checkpoint; states: {names}")
                states[names.index(name)] = sampler.state
        trainer = cls(
            data["table"],
            states,
            data["estimator"],
            learning_rate=learning_rate,
            output_dir=path.parent,
            samplers=samplers,
            **options,
        )
        trainer.optimizer.load_state_dict(data["optimizer"])
        trainer.epoch = data["epoch"]
        trainer.md_steps = data["md_steps"]
        trainer.rollout_steps = data.get("rollout_steps", 0)
        trainer.wall_time = data["wall_time"]
        trainer.history = data["history"]
        trainer.learning_rate = data["learning_rate"]
        trainer.best_loss = data["best_loss"]
        trainer.best_epoch = data["best_epoch"]
        trainer.best_state = data["best_state"]
        trainer._sampler_states = data["sampler_states"]
        for name in trainer._given_samplers:
            # A user's Simulation continues from its own configuration.
            trainer._sampler_states.pop(name, None)
        trainer._recent_parameters = list(data.get("recent_parameters", []))
        trainer.averaged_epoch = data.get("averaged_epoch")
        trainer._natural_fraction = data.get("natural_fraction")
        trainer._natural_last_loss = data.get("natural_last_loss")
        trainer._imc_last = data.get("imc_last")
        trainer._imc_pool = list(data.get("imc_pool", []))
        for name, calls in data.get("rollout_calls", {}).items():
            if name in trainer.rollouts:
                trainer.rollouts[name].calls = int(calls)
        torch.set_rng_state(data["torch_rng"])
        trainer._initialised = False
        return trainer

    # -- outputs ---------------------------------------------------------------------------

    def plot(self) -> List[Path]:
        """Write RDF, potential and loss plots to ``output_dir/plots``; returns the paths."""
        if self.output_dir is None or not self.history:
            return []
        from . import plotting

        folder = self.output_dir / "plots"
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        results = getattr(self, "_last_results", {})
        for state in self.states:
            result = results.get(state.name)
            if result is None or not len(result.r):
                continue
            target = {"-".join(t.pair): (np.asarray(t.r), np.asarray(t.g)) for t in state.targets}
            written.append(
                plotting.plot_rdfs(folder / f"rdf_{state.name}.png", result.r, result.rdfs, target, title=state.name)
            )
        written.append(
            plotting.plot_potentials(
                folder / "potential.png",
                self.table,
                r_min=_plot_r_min(self.table) or 0.1 * self.table.cutoff,  # soft cores never pass the wall
                r_max=self.table.cutoff,
                kT=self.states[0].kT,
            )
        )
        written.append(plotting.plot_loss(folder / "loss.png", self.history))
        return written


def _record_state(record: Dict[str, Any], name: str, result, resampled: bool) -> None:
    """One state's loss, RDF RMSEs, N_eff, resampling and pressure/energy into an epoch's record."""
    record["state_losses"][name] = result.loss
    record["rdf_rmse"][name] = dict(result.rdf_rmse)
    record["n_eff"][name] = result.diagnostics.get("n_eff_fraction")
    record["resampled"][name] = resampled
    for key in ("pressure", "energy"):
        if result.diagnostics.get(key) is not None:
            record.setdefault(key, {})[name] = float(result.diagnostics[key])


def _plot_r_min(table: PairTable) -> float:
    r = np.linspace(0.01, table.cutoff, 2000)
    highest = np.full_like(r, -np.inf)
    for k in range(table.n_pair_types):
        u, _ = table.evaluate(r, k)
        highest = np.maximum(highest, np.where(np.isfinite(u), u, np.inf))
    above = np.nonzero(highest > 20.0 * 2.494)[0]
    return float(r[above[-1]]) if len(above) else 0.0


#: ``imc_reject_factor``: undos in a row after which the next step is kept
#: (retaken at 1/2, then 1/4 of its change of u(r), a step that still "overshoots"
#: was judged against an outlying reference loss).
IMC_MAX_UNDOS = 2
#: ``imc_noise_shrink``: blocks of frames behind the noise estimate of a Newton
#: step. Five blocks of a 100-frame sample span 1000 MD steps each: near a
#: phase boundary the slow fluctuations outlast shorter blocks, whose
#: variance then undercounts the noise (4x at 10 blocks, docs/training.md).
IMC_SHRINK_BLOCKS = 5
#: ``imc_line_search``: the shortest fraction of a step the search may keep, and
#: the number of fractions it compares (evenly spaced from that to 1). The third
#: cumulant of a 100-frame sample is noisy: the floor keeps a step whose curvature
#: was misread from shrinking to nothing.
IMC_LINE_SEARCH_MIN = 0.25
IMC_LINE_SEARCH_POINTS = 76

# imc: a step that cannot keep the core free of a well is recomputed with
# damping raised tenfold (from at least the first value) up to the second.
_FALLBACK_DAMPING_MIN = 1e-3
_FALLBACK_DAMPING_MAX = 1.0

# Grid points below the wall (first g > 1e-3) covered by the imc_smoothing
# penalty, and bins by which the Boltzmann-inversion guess continues the wall
# into the core.
_CORE_POINTS = 3


def _correction_terms(potential: PairPotential) -> List[PairPotential]:
    """The learned (spline or neural) terms of a pair potential: itself, or those of a :class:`PotentialSum`."""
    learned = (CubicSpline, NeuralCorrection)
    if isinstance(potential, learned):
        return [potential]
    if isinstance(potential, PotentialSum):
        return [term for term in potential.terms if isinstance(term, learned)]
    return []


def _damped_system(matrix: torch.Tensor, damping: float, penalty: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``A + λ diag A + R``, the matrix of the damped Newton step (see :func:`_damped_solve`)."""
    diag = torch.diagonal(matrix).clone()
    diag = torch.clamp(diag, min=1e-12 * float(diag.max()) + 1e-300)
    system = matrix + damping * torch.diag(diag)
    if penalty is not None:
        system = system + penalty.to(system.dtype)
    return system


def _damped_solve(
    matrix: torch.Tensor, rhs: torch.Tensor, damping: float, penalty: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``δ`` solving ``(A + λ diag A + R) δ = -b``: the Levenberg–Marquardt / damped Newton step.

    The diagonal is floored at 1e-12 of its largest entry, so a parameter the
    data do not touch gets a tiny, not an infinite, penalty. ``R`` is an
    optional extra penalty (the smoothing of ``imc_smoothing``).
    """
    return -torch.linalg.solve(_damped_system(matrix, damping, penalty), rhs)


def _largest_change(before: List[np.ndarray], after: List[np.ndarray]) -> float:
    """Largest |after - before| over the grids of :meth:`Trainer._potential_on_target_grid` (0 if none)."""
    return max((float(np.abs(a - b).max()) for a, b in zip(after, before, strict=True)), default=0.0)


def _bound_level(step: torch.Tensor, metric: torch.Tensor, rows: torch.Tensor, bound: float) -> tuple:
    """``imc_level_fraction``: the step with each level change ``rows @ step`` held within ±``bound`` kT.

    Where the step δ₀ would move a level ℓ_k = a_k·θ further than ``bound``,
    it is replaced by the step nearest to it in ``metric`` G whose levels are
    clipped to ±bound: ``δ = δ₀ + G⁻¹Aᵀ (A G⁻¹Aᵀ)⁺ (c - A δ₀)``, G with a
    ridge of 1e-9 of its mean diagonal (parameters G does not see). The
    trainer passes BᵀB, B the Jacobian of u(r)/kT on the smoothing grids:
    the excess then leaves as the least change of u(r), a uniform shift over
    the level's bins, and the rest of the step keeps its shape.
    Returns ``(step, largest wanted |level change| in kT, whether it was bounded)``.
    """
    if rows.shape[0] == 0:
        return step, 0.0, False
    rows = rows.to(step.dtype)
    levels = rows @ step
    wanted = float(levels.abs().max())
    if wanted <= bound:
        return step, wanted, False
    clipped = levels.clamp(-bound, bound)
    metric = metric.to(step.dtype)
    ridge = 1e-9 * float(torch.diagonal(metric).mean()) + 1e-300
    g_inv_at = torch.linalg.solve(metric + ridge * torch.eye(metric.shape[0], dtype=step.dtype), rows.T)
    multipliers = torch.linalg.pinv(rows @ g_inv_at) @ (clipped - levels)
    return step + g_inv_at @ multipliers, wanted, True


def _noise_shrink(
    step: torch.Tensor,
    jtr_covariance: torch.Tensor,
    matrix: torch.Tensor,
    damping: float,
    penalty: Optional[torch.Tensor],
    metric: torch.Tensor,
) -> Dict[str, float]:
    """``imc_noise_shrink``: the factor ``max(0, 1 - E|δ_noise|²/|δ|²)`` for the step δ, and the ratio.

    δ = -M⁻¹ Jᵀρ is linear in ρ, so the sample's noise puts ``M⁻¹ C M⁻¹``
    into δ's covariance (C that of Jᵀρ); ``E|δ_noise|²`` is its trace in
    ``metric`` (lengths of the change of u(r), not of the parameters).
    Returns ``{"shrink": factor, "step_noise": E|δ_noise|²/|δ|²}``.
    """
    system = _damped_system(matrix, damping, penalty)
    inverse_c = torch.linalg.solve(system, jtr_covariance)
    step_covariance = torch.linalg.solve(system, inverse_c.T)  # M⁻¹ C M⁻¹ (M, C symmetric)
    noise = float(torch.trace(metric @ step_covariance))
    length = float(step @ metric @ step)
    if not (math.isfinite(noise) and math.isfinite(length)) or length <= 0:
        # Nothing to judge by (a zero step, or no noise estimate): the step as it is.
        return {"shrink": 1.0, "step_noise": float("nan")}
    ratio = noise / length
    return {"shrink": max(0.0, 1.0 - ratio), "step_noise": ratio}


def _grad_norm(params) -> float:
    total = 0.0
    for p in params:
        if p.grad is not None:
            total += float((p.grad.detach().double() ** 2).sum())
    return math.sqrt(total)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)
