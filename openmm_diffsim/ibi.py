"""Iterative Boltzmann inversion (IBI): the classic baseline, on the trainer's sampler and RDF estimator.

IBI (Soper 1996; Reith, Pütz & Müller-Plathe, J. Comput. Chem. 24, 1624, 2003)
refines a tabulated pair potential from target RDFs by

    U_{n+1}(r) = U_n(r) + α k_B T ln(g_n(r) / g_target(r))

where g_n is the RDF sampled with U_n. :class:`IBI` runs it on exactly the
pieces the gradient methods use, so the comparison is on equal terms:

* sampling: :class:`~openmm_diffsim.sampling.Sampler` (same backend, platform,
  integrator, hand-over, re-equilibration and MD-step accounting as
  :class:`~openmm_diffsim.training.Trainer`);
* g_n: :func:`~openmm_diffsim.observables.compute_partial_rdfs` with the
  estimator grid (``r_range``, ``n_bins``, ``smearing``), targets put on that
  grid the way the estimators do;
* the potential: a :class:`~openmm_diffsim.potentials.PairTable` whose pair
  potentials are (or contain) a trainable
  :class:`~openmm_diffsim.potentials.CubicSpline`; the update is added to the
  spline's knot values, so the result trains, samples and exports like any
  other table;
* outputs: ``log.jsonl`` records with the trainer's keys (``rdf_rmse``,
  ``md_steps``, ``wall_time``, ...), an atomic ``checkpoint.pt`` with
  :meth:`IBI.resume`, and the same plots.

Details of the update (all in :func:`ibi_update`):

* **g ≈ 0.** Where only one of g_n, g_target is below ``g_min`` it is clamped
  to ``g_min`` (a finite push in the right direction, no log(0)); where both
  are, the update is undefined and the nearest defined value is continued
  (so the repulsive core moves with the first resolved bin and keeps its shape).
  Below the first knot the spline continues linearly: that is the core's
  extrapolation.
* **Smoothing.** ``smoothing`` passes of a (1, 2, 1)/4 filter over the update,
  which damps the bin-to-bin noise of ln(g_n/g_target).
* **Cap.** ``max_update`` bounds the magnitude of ΔU per iteration (in k_B T).
* **Several states and pairs.** Every pair type is updated from its own
  partial RDF; the updates of several state points are averaged with the
  states' weights (each with its own k_B T).
* **Pressure.** Optionally the ramp ΔU_P(r) = A (1 - r/r_c) of Reith et al.
  (2003, eq. 8) is added to every pair type, with A from the pressure
  difference (see :func:`pressure_ramp_amplitude`).

Inverse Monte Carlo (Lyubartsev & Laaksonen 1995) is the Newton step with the
covariance of pair histograms; in this package it is
``Trainer(table, states, "reweighting", optimizer="gauss-newton")`` on a
spline table: a Levenberg–Marquardt step with the exact Jacobian of the
reweighted RDFs, which is the IMC matrix.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .potentials import CubicSpline, PairTable, PotentialSum

__all__ = [
    "IBI",
    "ibi_update",
    "pressure_ramp",
    "pressure_ramp_amplitude",
    "boltzmann_knot_values",
    "deconvolved_knot_values",
    "deconvolved_inversion",
    "spline_table_from_targets",
    "run_from_config",
    "CHECKPOINT_FORMAT",
]

logger = logging.getLogger("openmm_diffsim.ibi")

CHECKPOINT_FORMAT = "openmm-diffsim-ibi-checkpoint-1"
CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "log.jsonl"
#: Largest pressure ramp amplitude per iteration, in k_B T (Reith et al. 2003 use abs(A) <= 0.1 k_B T).
DEFAULT_MAX_RAMP = 0.1


# -- the update --------------------------------------------------------------------------------------


def _smooth(values: np.ndarray, passes: int) -> np.ndarray:
    out = np.asarray(values, dtype=np.float64)
    for _ in range(passes):
        padded = np.pad(out, 1, mode="edge")
        out = 0.25 * padded[:-2] + 0.5 * padded[1:-1] + 0.25 * padded[2:]
    return out


def ibi_update(
    r,
    g_model,
    g_target,
    kT: float,
    mixing: float = 1.0,
    g_min: float = 1e-3,
    smoothing: int = 0,
    max_update: Optional[float] = None,
) -> np.ndarray:
    """One IBI correction ΔU(r) = α k_B T ln(g_model(r) / g_target(r)), made safe.

    Parameters
    ----------
    r : array_like, shape (M,)
        Bin centres in nm (strictly increasing).
    g_model, g_target : array_like, shape (M,)
        RDF sampled with the current potential and the target, same bins.
    kT : float
        k_B T in kJ/mol.
    mixing : float
        α, the fraction of the full correction applied (0 < α).
    g_min : float
        RDF values at or below this count as zero. Where exactly one of the
        two RDFs is "zero" it is clamped to ``g_min``; where both are, the
        update is continued from the nearest bin where it is defined.
    smoothing : int
        Passes of a (1, 2, 1)/4 filter over the update (0: none).
    max_update : float, optional
        Largest magnitude of ΔU in units of k_B T (applied after smoothing).

    Returns
    -------
    numpy.ndarray, shape (M,)
        ΔU in kJ/mol; positive where the model over-populates (g_model > g_target).

    Raises
    ------
    ValueError
        Mismatched shapes, negative or non-finite RDFs, bad parameters, or
        both RDFs below ``g_min`` everywhere.
    """
    r = np.asarray(r, dtype=np.float64)
    g_model = np.asarray(g_model, dtype=np.float64)
    g_target = np.asarray(g_target, dtype=np.float64)
    if r.ndim != 1 or g_model.shape != r.shape or g_target.shape != r.shape:
        raise ValueError(
            f"r, g_model and g_target must be 1-D of equal length, got shapes {r.shape}, {g_model.shape}, "
            f"{g_target.shape}"
        )
    if r.size < 2 or not np.all(np.diff(r) > 0):
        raise ValueError("r must be strictly increasing with at least 2 bins")
    for name, g in (("g_model", g_model), ("g_target", g_target)):
        if not np.all(np.isfinite(g)) or np.any(g < 0):
            raise ValueError(f"{name} must be finite and non-negative")
    if not (math.isfinite(kT) and kT > 0):
        raise ValueError(f"kT must be positive (kJ/mol), got {kT}")
    if not (math.isfinite(mixing) and mixing > 0):
        raise ValueError(f"mixing (alpha) must be positive, got {mixing}")
    if not (math.isfinite(g_min) and g_min > 0):
        raise ValueError(f"g_min must be positive, got {g_min}")
    if int(smoothing) != smoothing or smoothing < 0:
        raise ValueError(f"smoothing must be a non-negative number of filter passes, got {smoothing}")
    if max_update is not None and not (math.isfinite(max_update) and max_update > 0):
        raise ValueError(f"max_update must be positive (k_B T) or None, got {max_update}")
    defined = (g_model > g_min) | (g_target > g_min)
    if not defined.any():
        raise ValueError(f"g_model and g_target are both below g_min = {g_min} everywhere: nothing to invert")
    du = np.zeros_like(r)
    du[defined] = kT * np.log(np.maximum(g_model[defined], g_min) / np.maximum(g_target[defined], g_min))
    index = np.arange(r.size)
    # np.interp holds the end values: the core below the first defined bin
    # takes that bin's update, gaps inside are bridged linearly.
    du = np.interp(index, index[defined], du[defined])
    du = mixing * _smooth(du, int(smoothing))
    if max_update is not None:
        du = np.clip(du, -max_update * kT, max_update * kT)
    return du


def pressure_ramp(r, cutoff: float, amplitude: float) -> np.ndarray:
    """The pressure-correction ramp ΔU_P(r) = A (1 - r/r_c) for r < r_c, else 0 (kJ/mol).

    Reith, Pütz & Müller-Plathe, J. Comput. Chem. 24, 1624 (2003), eq. 8.
    A > 0 is repulsive and raises the pressure; A < 0 lowers it.
    """
    r = np.asarray(r, dtype=np.float64)
    if not cutoff > 0:
        raise ValueError(f"cutoff must be positive (nm), got {cutoff}")
    return np.where(r < cutoff, amplitude * (1.0 - r / cutoff), 0.0)


def pressure_ramp_amplitude(
    pressure: float,
    target_pressure: float,
    sum_r: float,
    volume: float,
    cutoff: float,
    kT: float,
    max_ramp: float = DEFAULT_MAX_RAMP,
    factor: float = 1.0,
) -> float:
    """Amplitude A (kJ/mol) of the pressure ramp that closes ``factor`` of the pressure gap.

    The ramp changes every pair force by -dΔU_P/dr = A/r_c, so at fixed
    configurations the virial pressure P = N k_B T/V - Σ_pairs r u'(r) / (3V)
    changes by

        ΔP = A ⟨Σ_{pairs, r<r_c} r⟩ / (3 V r_c),

    and A = -factor (P - P_target) 3 V r_c / ⟨Σ r⟩. This first-order estimate
    ignores the structural response, so A is clipped to ±``max_ramp`` k_B T as
    in Reith et al. (2003), who keep abs(A) ≤ 0.1 k_B T per iteration.

    Parameters
    ----------
    pressure, target_pressure : float
        Sampled and target pressure in bar.
    sum_r : float
        ⟨Σ r_ij⟩ over pairs inside the cutoff, averaged over snapshots (nm).
    volume : float
        Box volume in nm^3.
    cutoff : float
        r_c in nm.
    kT : float
        k_B T in kJ/mol.
    max_ramp : float
        Clip the magnitude of A to this many k_B T.
    factor : float
        Fraction of the first-order correction to apply.

    Returns
    -------
    float
        A in kJ/mol (negative when the pressure is too high).
    """
    from .observables import BAR_PER_KJ_PER_MOL_NM3

    for name, value in (("sum_r", sum_r), ("volume", volume), ("cutoff", cutoff), ("kT", kT)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be positive, got {value}")
    if not (math.isfinite(pressure) and math.isfinite(target_pressure)):
        raise ValueError(f"pressures must be finite, got {pressure} and {target_pressure} bar")
    response = sum_r / (3.0 * volume * cutoff) * BAR_PER_KJ_PER_MOL_NM3  # bar per kJ/mol of A
    amplitude = -factor * (pressure - target_pressure) / response
    limit = max_ramp * kT
    return float(np.clip(amplitude, -limit, limit))


# -- the potential representation -------------------------------------------------------------------


def _spline_of(potential) -> Tuple[CubicSpline, Any]:
    """The trainable spline inside a pair potential and the fixed rest (None, or the other terms)."""
    if isinstance(potential, CubicSpline):
        if not potential.trainable:
            raise ValueError("IBI needs a trainable CubicSpline (trainable=True) for every pair type")
        return potential, None
    if isinstance(potential, PotentialSum):
        splines = [t for t in potential.terms if isinstance(t, CubicSpline) and t.trainable]
        if len(splines) == 1:
            rest = [t for t in potential.terms if t is not splines[0]]
            return splines[0], rest
    raise ValueError(
        f"IBI updates a tabulated potential: every pair type must be a trainable CubicSpline, or a "
        f"PotentialSum with exactly one, got {type(potential).__name__}; build one with "
        "openmm_diffsim.ibi.spline_table_from_targets"
    )


def _rest_energy(rest, r: np.ndarray) -> np.ndarray:
    if not rest:
        return np.zeros_like(r)
    r_t = torch.as_tensor(r)
    with torch.no_grad():
        return sum(term.energy_and_derivative(r_t)[0] for term in rest).numpy()


def boltzmann_knot_values(r, g, kT: float, knots, g_min: float = 1e-2, smearing: Optional[float] = None) -> np.ndarray:
    """Boltzmann inversion u0 = -k_B T ln g(r) on spline knots, with a repulsive core.

    Parameters
    ----------
    r, g : array_like, shape (M,)
        Target RDF (nm, dimensionless).
    kT : float
        k_B T in kJ/mol.
    knots : array_like, shape (K,)
        Knot positions in nm.
    g_min : float
        Bins with g ≤ g_min are not inverted. Knots below the first inverted
        bin continue the inversion linearly with the slope of its first three
        points, made at least 1 k_B T per bin steep (a repulsive core); knots
        beyond the last hold its value.
    smearing : float, optional
        The Gaussian smearing (nm) of the RDF estimator that produced ``g``,
        on bins centred on ``r`` (uniform): the knot values are then those of
        the natural spline whose exp(-u/k_B T), put through that estimator's
        kernel and bins, matches ``g`` on the inverted bins (least squares in
        ln g, Gauss–Newton from the plain inversion; see
        :func:`deconvolved_knot_values`). ``-k_B T ln g`` of a smeared RDF is
        too soft at the wall (with 0.02σ smearing on 0.025σ bins, by 0.7 k_B T
        where g = 0.1, in the dilute limit); 0 removes the bin averaging alone.
        None (default): the plain inversion.

    Returns
    -------
    numpy.ndarray, shape (K,)
        u0 at the knots in kJ/mol, shifted so that the last knot is 0.
    """
    r = np.asarray(r, dtype=np.float64)
    g = np.asarray(g, dtype=np.float64)
    knots = np.asarray(knots, dtype=np.float64)
    keep = g > g_min
    if keep.sum() < 4:
        raise ValueError(f"Boltzmann inversion needs at least 4 bins with g(r) > {g_min}")
    r_valid, u_valid = r[keep], -kT * np.log(g[keep])
    values = np.interp(knots, r_valid, u_valid)
    slope = float(np.polyfit(r_valid[:3], u_valid[:3], 1)[0])
    spacing = float(np.median(np.diff(r)))
    slope = min(slope, -kT / spacing)
    core = knots < r_valid[0]
    values[core] = u_valid[0] + slope * (knots[core] - r_valid[0])
    if smearing is not None:
        values = deconvolved_knot_values(r, g, kT, knots, values, smearing, g_min)
    return values - values[-1]


#: deconvolved_knot_values: quadrature points per RDF bin, Gauss–Newton iterations at most,
#: and the largest change of a knot value (in k_B T) at which the iteration stops.
_DECONVOLUTION_SUBDIVISION = 8
_DECONVOLUTION_ITERATIONS = 50
_DECONVOLUTION_TOLERANCE = 1e-6
#: deconvolved_knot_values: at most this many grid points per RDF (fewer points per bin on fine grids).
_DECONVOLUTION_POINTS = 4000


def deconvolved_knot_values(r, g, kT: float, knots, values, smearing: float, g_min: float = 1e-2) -> np.ndarray:
    """Knot values of a natural spline u(r) whose RDF estimate, in the dilute limit, is ``g``.

    The RDF estimator (:func:`~openmm_diffsim.observables.compute_rdf`) bins
    pair distances and, with a smearing width, spreads each over a Gaussian;
    the expected estimate of a fluid whose pair distribution is exp(-w/k_B T)
    is that function put through the same kernel and bins
    (:func:`~openmm_diffsim.observables.smear_target`). Boltzmann inversion of
    the estimate itself mistakes this blur for structure: on a steep wall it
    shifts pairs inwards and softens u. This finds the knot values θ that
    minimise Σ_k (ln S[exp(-u_θ/k_B T)]_k - ln g_k)² over the bins with
    g > ``g_min`` inside the last knot (Gauss–Newton with step halving), where
    S is the estimator's kernel on a grid of 8 points per bin (2-8 on RDF grids
    of more than 500 bins, at most 4000 in all). The spline,
    not the bins, carries the unknowns, so with a knot every two bins the
    inversion does not amplify the bins' own noise; the result is w(r), the
    potential of mean force, as plain inversion means it to be.

    Parameters
    ----------
    r, g : array_like, shape (M,)
        Estimated RDF on uniform bins centred on ``r`` (nm, dimensionless).
    kT : float
        k_B T in kJ/mol.
    knots : array_like, shape (K,)
        Knot positions in nm; below the first the spline continues linearly,
        beyond the last u is held (g beyond the cutoff does not matter).
    values : array_like, shape (K,)
        Starting knot values in kJ/mol (the plain inversion).
    smearing : float
        The estimator's Gaussian width in nm (0: bins alone).
    g_min : float
        Bins with g ≤ g_min are left out of the fit.

    Returns
    -------
    numpy.ndarray, shape (K,)
        Knot values in kJ/mol (not shifted).
    """
    r = np.asarray(r, dtype=np.float64)
    g = np.asarray(g, dtype=np.float64)
    knots = np.asarray(knots, dtype=np.float64)
    theta = np.array(values, dtype=np.float64)
    if not (math.isfinite(float(smearing)) and smearing >= 0):
        raise ValueError(f"smearing must be a non-negative number of nm, got {smearing}")
    width = np.diff(r)
    if r.size < 2 or not np.allclose(width, width[0], rtol=1e-6, atol=0.0) or width[0] <= 0:
        raise ValueError("deconvolving the estimator's kernel needs the RDF on uniform, increasing bins")
    width = float(width[0])
    low, high = r[0] - 0.5 * width, r[-1] + 0.5 * width
    if low < -1e-9 * width:
        raise ValueError(f"RDF bins centred on r start below r = 0 (first edge {low:.6g} nm)")
    low = max(low, 0.0)
    fit = (g > g_min) & (r <= knots[-1])
    if fit.sum() < 4:
        raise ValueError(f"deconvolution needs at least 4 bins with g(r) > {g_min} inside the last knot")
    # Quadrature grid (cells of a fraction of a bin, fewer on very fine RDF grids to bound
    # memory): from a bin and 8 smearing widths below the first fitted bin's lower edge (that
    # bin's kernel sees nothing further in) to as far beyond the last edge, u held there.
    subdivision = int(np.clip(_DECONVOLUTION_POINTS // r.size, 2, _DECONVOLUTION_SUBDIVISION))
    step = width / subdivision
    reach = 8.0 * smearing + width
    first = int(np.floor((max(low, r[fit][0] - 0.5 * width - reach) - low) / step))
    last = int(np.ceil((high + reach - low) / step))
    cells = low + step * np.arange(first, last + 1)
    fine = 0.5 * (cells[1:] + cells[:-1])
    # u on the grid is linear in the knot values: A[i, j] = spline of the j-th unit vector at fine[i].
    inside = torch.as_tensor(np.minimum(fine, knots[-1]))
    design = np.empty((fine.size, knots.size))
    for j in range(knots.size):
        unit = np.zeros(knots.size)
        unit[j] = 1.0
        with torch.no_grad():
            design[:, j] = CubicSpline(knots, unit, trainable=False).energy_and_derivative(inside)[0].numpy()
    # The estimator's expected g in bin k of a pair density exp(-u/kT) (compute_rdf's
    # normalisation): sum over cells of exp(-u_j/kT) V_j P(k | r_j) / V_k, with P the
    # Gaussian's share of bin k for a pair at the cell's centre (the bin itself for 0 smearing).
    edges = low + width * np.arange(r.size + 1)
    bin_low, bin_high = edges[:-1][fit], edges[1:][fit]
    if smearing > 0:
        scale = torch.as_tensor(1.0 / (smearing * math.sqrt(2.0)), dtype=torch.float64)
        centres = torch.as_tensor(fine)[None, :]
        upper = torch.special.erf((torch.as_tensor(bin_high)[:, None] - centres) * scale)
        lower = torch.special.erf((torch.as_tensor(bin_low)[:, None] - centres) * scale)
        share = (0.5 * (upper - lower)).numpy()
    else:
        share = ((fine[None, :] >= bin_low[:, None]) & (fine[None, :] < bin_high[:, None])).astype(np.float64)
    cell_volumes = cells[1:] ** 3 - cells[:-1] ** 3
    kernel = share * cell_volumes[None, :] / (bin_high**3 - bin_low**3)[:, None]  # (fitted bins, grid points)
    log_g = np.log(g[fit])

    def residual(theta):
        boltzmann = np.exp(-np.clip(design @ theta / kT, -50.0, 700.0))
        estimate = np.maximum(kernel @ boltzmann, 1e-300)
        return np.log(estimate) - log_g, boltzmann, estimate

    rho, boltzmann, estimate = residual(theta)
    loss = float(rho @ rho)
    for _ in range(_DECONVOLUTION_ITERATIONS):
        jacobian = -(kernel * boltzmann) @ design / (kT * estimate[:, None])
        normal = jacobian.T @ jacobian
        # A whisper of ridge keeps knots no fitted bin sees where they are.
        ridge = 1e-9 * float(np.max(np.diag(normal))) * np.eye(knots.size)
        delta = np.linalg.solve(normal + ridge, -jacobian.T @ rho)
        for _halving in range(20):
            trial = theta + delta
            rho_t, boltzmann_t, estimate_t = residual(trial)
            if float(rho_t @ rho_t) <= loss:
                break
            delta = 0.5 * delta
        else:
            break  # no step lowers the misfit: at its minimum to round-off
        theta, rho, boltzmann, estimate, loss = trial, rho_t, boltzmann_t, estimate_t, float(rho_t @ rho_t)
        if np.max(np.abs(delta)) < _DECONVOLUTION_TOLERANCE * kT:
            break
    return theta


def deconvolved_inversion(r, g, kT: float, smearing: float, cutoff: float, g_min: float = 1e-2) -> tuple:
    """Boltzmann inversion through the estimator's kernel, as a curve on the resolved bins.

    :func:`boltzmann_knot_values` with ``smearing`` on a spline with a knot
    every two bins from the first bin with g > ``g_min`` to the last inside
    ``cutoff``, evaluated on those bins: for initial guesses of potentials
    that are not splines (the trainer fits its table to this curve).

    Parameters
    ----------
    r, g : array_like, shape (M,)
        Estimated RDF on uniform bins centred on ``r`` (nm, dimensionless).
    kT : float
        k_B T in kJ/mol.
    smearing : float
        The estimator's Gaussian width in nm.
    cutoff : float
        Last distance of the curve in nm.
    g_min : float
        Bins with g ≤ g_min are left out.

    Returns
    -------
    r_valid, u : numpy.ndarray
        Bin centres (nm) with g > g_min inside the cutoff, and u there (kJ/mol), 0 at the last.
    """
    r = np.asarray(r, dtype=np.float64)
    g = np.asarray(g, dtype=np.float64)
    keep = (g > g_min) & (r <= cutoff)
    if keep.sum() < 4:
        raise ValueError(f"Boltzmann inversion needs at least 4 bins with g(r) > {g_min} inside the cutoff")
    r_valid = r[keep]
    width = float(np.median(np.diff(r)))
    knots = np.arange(r_valid[0], r_valid[-1] + 0.5 * width, 2.0 * width)
    if knots[-1] < r_valid[-1] - 1e-9 * width:
        knots = np.append(knots, r_valid[-1])
    if knots.size < 4:
        raise ValueError("the resolved range of the RDF is too short for a spline with a knot every two bins")
    values = boltzmann_knot_values(r, g, kT, knots, g_min, smearing)
    with torch.no_grad():
        u = CubicSpline(knots, values, trainable=False).energy_and_derivative(torch.as_tensor(r_valid))[0].numpy()
    return r_valid, u - u[-1]


def spline_table_from_targets(
    states: Sequence,
    cutoff: float,
    knot_spacing: Optional[float] = None,
    r_min: Optional[float] = None,
    cutoff_mode: str = "shift",
    species: Optional[Sequence[str]] = None,
    g_min: float = 1e-2,
    smearing: Optional[float] = None,
) -> PairTable:
    """A table of trainable cubic splines initialised by Boltzmann inversion of the targets.

    The representation IBI updates (and the experiments give every method).
    Each pair type's u0(r) is the state-weight average of -k_B T ln g_target
    over the states that have a target for it.

    Parameters
    ----------
    states : sequence of StatePoint
        States with ``targets``.
    cutoff : float
        Cutoff in nm; the last knot sits on it.
    knot_spacing : float, optional
        Knot spacing in nm (default: cutoff / 50).
    r_min : float, optional
        First knot in nm (default: the smallest r where any target of the pair
        exceeds ``g_min``); below it the spline continues linearly.
    cutoff_mode : {"truncate", "shift", "switch"}
        The table's cutoff convention (see :class:`~openmm_diffsim.potentials.PairTable`).
    species : sequence of str, optional
        Species order (default: the union of the states' species, in order).
    g_min : float
        Threshold below which g counts as unresolved.
    smearing : float, optional
        The Gaussian smearing (nm) of the estimator that produced the targets
        (the trainer's ``estimator_options["smearing"]``): invert through its
        kernel (see :func:`boltzmann_knot_values`), which puts the repulsive
        wall where the targets' fluid has it. None: plain inversion.

    Returns
    -------
    PairTable

    Raises
    ------
    ValueError
        A pair type without any target, or a target that never exceeds ``g_min``.
    """
    states = list(states)
    if not states:
        raise ValueError("need at least one state point with targets")
    if species is None:
        species = []
        for state in states:
            species.extend(s for s in state.species if s not in species)
    species = [str(s) for s in species]
    if knot_spacing is None:
        knot_spacing = cutoff / 50.0
    if not knot_spacing > 0:
        raise ValueError(f"knot_spacing must be positive (nm), got {knot_spacing}")
    keys = [(species[a], species[b]) for a in range(len(species)) for b in range(a, len(species))]
    potentials = {}
    for a, b in keys:
        found = [
            (state, t) for state in states for t in state.targets if {tuple(t.pair), (t.pair[1], t.pair[0])} & {(a, b)}
        ]
        if not found:
            raise ValueError(f"no target for pair {a}-{b} in any state: cannot Boltzmann-invert it")
        if r_min is None:
            starts = []
            for _, t in found:
                above = np.nonzero(np.asarray(t.g) > g_min)[0]
                if above.size == 0:
                    raise ValueError(f"target {t.label} never exceeds g_min = {g_min}")
                starts.append(float(np.asarray(t.r)[above[0]]))
            first = min(starts)
        else:
            first = float(r_min)
        if not 0 < first < cutoff:
            raise ValueError(f"first knot {first} nm must lie in (0, cutoff={cutoff})")
        n = max(4, int(round((cutoff - first) / knot_spacing)) + 1)
        knots = np.linspace(first, cutoff, n)
        total = sum(state.weight for state, _ in found)
        if total <= 0:
            total = float(len(found))
            weights = [1.0] * len(found)
        else:
            weights = [state.weight for state, _ in found]
        values = sum(
            w * boltzmann_knot_values(t.r, t.g, state.kT, knots, g_min, smearing)
            for w, (state, t) in zip(weights, found, strict=True)
        )
        potentials[(a, b)] = CubicSpline(knots, values / total)
    return PairTable(species, potentials, cutoff=cutoff, cutoff_mode=cutoff_mode)


# -- sampling helpers -------------------------------------------------------------------------------


def _pressure_and_sum_r(table: PairTable, snapshots, state) -> Tuple[float, float]:
    """Mean virial pressure (bar, no tail correction) and ⟨Σ r_ij⟩ over pairs inside the cutoff (nm)."""
    from .gradients import _particle_species
    from .neighbors import neighbor_pairs, pair_displacements
    from .observables import BAR_PER_KJ_PER_MOL_NM3

    species = torch.as_tensor(_particle_species(table, state))
    pressures, sums = [], []
    with torch.no_grad():
        for x_np, box in zip(snapshots.positions, snapshots.boxes, strict=True):
            x = torch.as_tensor(x_np)
            lengths = torch.as_tensor(np.diag(box).copy())
            i, j = neighbor_pairs(x, lengths, table.cutoff)
            r = torch.sqrt((pair_displacements(x, i, j, lengths) ** 2).sum(1))
            inside = r < table.cutoff
            r = r[inside]
            _, du = table.energy_and_derivative(r, table.pair_types(species[i[inside]], species[j[inside]]))
            volume = float(lengths.prod())
            pressure = state.n_particles * state.kT / volume - float((r * du).sum()) / (3.0 * volume)
            pressures.append(pressure * BAR_PER_KJ_PER_MOL_NM3)
            sums.append(float(r.sum()))
    return float(np.mean(pressures)), float(np.mean(sums))


# -- the IBI run --------------------------------------------------------------------------------------


class IBI:
    """Iterative Boltzmann inversion of one or more state points, with the trainer's outputs.

    Parameters
    ----------
    table : PairTable
        Every pair type a trainable :class:`~openmm_diffsim.potentials.CubicSpline`
        (or a :class:`~openmm_diffsim.potentials.PotentialSum` holding exactly one,
        e.g. on a fixed prior); modified in place. See :func:`spline_table_from_targets`.
    states : sequence of StatePoint
        State points with ``targets``; ``weight`` weighs their updates, and
        ``pressure`` (bar) is the target of the optional pressure correction.
    mixing : float
        α in U += α k_B T ln(g_n/g_target).
    max_epochs : int
        Number of IBI iterations (one update each).
    n_snapshots, snapshot_interval, equilibration_steps, reequilibration_steps
        As for :class:`~openmm_diffsim.training.Trainer`.
    sampler_options : dict, optional
        Passed to :class:`~openmm_diffsim.sampling.Sampler`.
    estimator_options : dict, optional
        The RDF grid shared with the gradient estimators: ``r_range`` (nm,
        default ``(0, cutoff)``), ``n_bins`` (100), ``smearing`` (nm, 0.01),
        ``target_outside`` ("error"). Other keys are an error.
    g_min, smoothing, max_update
        See :func:`ibi_update` (``max_update`` in k_B T).
    pressure_correction : bool
        Add the ramp of :func:`pressure_ramp_amplitude` for states with a
        target ``pressure``.
    pressure_max_ramp, pressure_factor : float
        Its clip (k_B T) and the fraction of the first-order correction.
    boltzmann_initial_guess : bool
        Set the splines to the Boltzmann inversion of the targets before the
        first iteration (minus any fixed prior), through the estimator's bins
        and smearing (:func:`boltzmann_knot_values`).
    target_loss, plateau_patience
        Stopping rules as for the trainer (on the sampled RDF loss).
    output_dir : str or Path, optional
        Checkpoint, ``log.jsonl`` and plots; nothing is written without it.
    checkpoint_every, plot_every : int
        Iteration intervals (0 disables plots except at the end).
    seed : int
        Seeds the samplers.
    progress : bool
        Print one line per iteration.
    max_retries : int
        Consecutive failed iterations (sampling blew up) tolerated; each rolls
        the potential back and halves α.
    callbacks : sequence of callables
        Called as ``callback(ibi, record)`` after every iteration.
    """

    def __init__(
        self,
        table: PairTable,
        states: Sequence,
        *,
        mixing: float = 0.5,
        max_epochs: int = 30,
        n_snapshots: int = 50,
        snapshot_interval: int = 50,
        equilibration_steps: int = 1000,
        reequilibration_steps: Optional[int] = None,
        sampler_options: Optional[Dict[str, Any]] = None,
        estimator_options: Optional[Dict[str, Any]] = None,
        g_min: float = 1e-3,
        smoothing: int = 1,
        max_update: Optional[float] = 1.0,
        pressure_correction: bool = False,
        pressure_max_ramp: float = DEFAULT_MAX_RAMP,
        pressure_factor: float = 1.0,
        boltzmann_initial_guess: bool = False,
        target_loss: Optional[float] = None,
        plateau_patience: Optional[int] = None,
        output_dir: Optional[Union[str, Path]] = None,
        checkpoint_every: int = 1,
        plot_every: int = 10,
        seed: int = 0,
        progress: bool = True,
        max_retries: int = 5,
        callbacks: Sequence[Callable] = (),
    ):
        from .training import check_fit_inputs

        states = check_fit_inputs(table, states, "IBI")
        for s in states:
            if pressure_correction and s.pressure is None:
                logger.info("state %r has no target pressure: no pressure correction from it", s.name)
        self._splines = [_spline_of(p) for p in table.pair_potentials]
        for name, value in (("mixing", mixing), ("pressure_max_ramp", pressure_max_ramp)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be positive, got {value}")
        for name, value in (("max_epochs", max_epochs), ("n_snapshots", n_snapshots)):
            if int(value) < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if int(snapshot_interval) < 1:
            raise ValueError(f"snapshot_interval must be at least 1, got {snapshot_interval}")
        if equilibration_steps < 0:
            raise ValueError(f"equilibration_steps must be >= 0, got {equilibration_steps}")
        estimator_options = dict(estimator_options or {})
        unknown = set(estimator_options) - {"r_range", "n_bins", "smearing", "target_outside"}
        if unknown:
            raise ValueError(
                f"unknown estimator option(s) for IBI: {sorted(unknown)}; IBI uses r_range, n_bins, smearing, "
                "target_outside"
            )
        r_range = tuple(estimator_options.get("r_range", (0.0, table.cutoff)))
        from .gradients import _check_grid

        r_range, n_bins, smearing = _check_grid(
            r_range, estimator_options.get("n_bins", 100), estimator_options.get("smearing", 0.01)
        )
        bin_width = (r_range[1] - r_range[0]) / n_bins
        if r_range[1] < table.cutoff - bin_width:
            raise ValueError(
                f"the RDF grid ends at {r_range[1]} nm, short of the cutoff {table.cutoff} nm: IBI would not "
                "know how to update u(r) there; widen r_range"
            )
        # Validate the update's parameters once, here, with a dummy call.
        ibi_update([0.0, 1.0], [1.0, 1.0], [1.0, 1.0], 1.0, mixing, g_min, smoothing, max_update)
        self.table = table
        self.states = states
        self.options: Dict[str, Any] = dict(
            mixing=float(mixing),
            max_epochs=int(max_epochs),
            n_snapshots=int(n_snapshots),
            snapshot_interval=int(snapshot_interval),
            equilibration_steps=int(equilibration_steps),
            reequilibration_steps=(
                2 * int(snapshot_interval) if reequilibration_steps is None else int(reequilibration_steps)
            ),
            sampler_options=dict(sampler_options or {}),
            estimator_options=dict(
                r_range=r_range,
                n_bins=n_bins,
                smearing=smearing,
                target_outside=estimator_options.get("target_outside", "error"),
            ),
            g_min=float(g_min),
            smoothing=int(smoothing),
            max_update=None if max_update is None else float(max_update),
            pressure_correction=bool(pressure_correction),
            pressure_max_ramp=float(pressure_max_ramp),
            pressure_factor=float(pressure_factor),
            boltzmann_initial_guess=bool(boltzmann_initial_guess),
            target_loss=target_loss,
            plateau_patience=plateau_patience,
            checkpoint_every=int(checkpoint_every),
            plot_every=int(plot_every),
            seed=int(seed),
            progress=bool(progress),
            max_retries=int(max_retries),
        )
        edges = np.linspace(r_range[0], r_range[1], n_bins + 1)
        self.r = 0.5 * (edges[1:] + edges[:-1])
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.callbacks = list(callbacks)
        self.history: List[Dict[str, Any]] = []
        self.epoch = 0
        self.md_steps = 0
        self.rollout_steps = 0
        self.wall_time = 0.0
        self.best_loss = math.inf
        self.best_epoch = -1
        self.mixing = float(mixing)
        self.samplers: Dict[str, Any] = {}
        self._sampled: set = set()
        self._sampler_states: Dict[str, Dict[str, Any]] = {}
        self._last_rdfs: Dict[str, Dict[str, np.ndarray]] = {}
        self._initialised = False
        targeted = {self.table.pair_index(tuple(t.pair)) for s in states for t in s.targets}
        for k, name in enumerate(self.table.pair_names):
            if k not in targeted:
                logger.warning("pair %s has no target in any state: IBI leaves it unchanged", name)

    # -- initial guess ------------------------------------------------------------------------------

    def _apply_boltzmann_guess(self) -> None:
        from .gradients import _prepare_targets

        g_min = max(self.options["g_min"], 1e-2)
        for k, (spline, rest) in enumerate(self._splines):
            found = [(s, t) for s in self.states for t in s.targets if self.table.pair_index(tuple(t.pair)) == k]
            if not found:
                continue
            knots = spline.knots.numpy()
            weights = np.array([max(s.weight, 0.0) for s, _ in found])
            if weights.sum() <= 0:
                weights = np.ones(len(found))
            # Inverted through the estimator's kernel, on its grid (the targets put on it as for the loss).
            opts = self.options["estimator_options"]
            on_grid = [_prepare_targets(self.table, [t], self.r, opts["target_outside"])[0].g.numpy() for _, t in found]
            u0 = sum(
                w * boltzmann_knot_values(self.r, g, s.kT, knots, g_min, opts["smearing"])
                for w, (s, _), g in zip(weights, found, on_grid, strict=True)
            )
            u0 = u0 / weights.sum()
            with torch.no_grad():
                spline.values.copy_(torch.as_tensor(u0 - _rest_energy(rest, knots)))

    # -- sampling (as Trainer._sampler / Trainer._sample) ------------------------------------------------

    def _sampler(self, state):
        from .sampling import Sampler

        sampler = self.samplers.get(state.name)
        if sampler is not None:
            return sampler
        index = [s.name for s in self.states].index(state.name)
        saved = self._sampler_states.get(state.name)
        sampler = Sampler(
            state, self.table, seed=self.options["seed"] + 1000 * index + self.epoch, **self.options["sampler_options"]
        )
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
        if self.options["reequilibration_steps"] > 0 and state.name in self._sampled:
            sampler.equilibrate(self.options["reequilibration_steps"])
        snapshots = sampler.run(self.options["n_snapshots"], self.options["snapshot_interval"])
        self.md_steps += sampler.total_steps - before
        self._sampled.add(state.name)
        self._sampler_states[state.name] = {
            "positions": sampler.positions,
            "velocities": sampler.velocities,
            "box": sampler.box,
        }
        return snapshots

    def sampled_rdfs(self, snapshots, state) -> np.ndarray:
        """Partial RDFs of ``snapshots`` on the estimator grid, shape (pair types, n_bins)."""
        from .gradients import _particle_species
        from .observables import compute_partial_rdfs

        opts = self.options["estimator_options"]
        with torch.no_grad():
            _, g = compute_partial_rdfs(
                torch.as_tensor(np.asarray(snapshots.positions)),
                torch.as_tensor(np.asarray(snapshots.boxes)),
                torch.as_tensor(_particle_species(self.table, state)),
                len(self.table.species),
                opts["r_range"],
                opts["n_bins"],
                opts["smearing"],
            )
        return g.numpy()

    # -- one iteration ----------------------------------------------------------------------------------

    def _epoch(self) -> Dict[str, Any]:
        from .gradients import _prepare_targets
        from .observables import rdf_loss

        start = time.perf_counter()
        steps_before = self.md_steps
        record: Dict[str, Any] = {
            "epoch": self.epoch,
            "state_losses": {},
            "rdf_rmse": {},
            "n_eff": {},
            "resampled": {},
            "events": [],
        }
        n_types = self.table.n_pair_types
        updates: List[List[Tuple[float, np.ndarray]]] = [[] for _ in range(n_types)]
        ramps: List[Tuple[float, float]] = []
        pressures: Dict[str, float] = {}
        total = 0.0
        last_rdfs: Dict[str, Dict[str, np.ndarray]] = {}
        for state in self.states:
            snapshots = self._sample(state)
            g = self.sampled_rdfs(snapshots, state)
            if not np.all(np.isfinite(g)):
                raise FloatingPointError(f"state {state.name!r}: the sampled RDF is not finite")
            prepared = _prepare_targets(
                self.table, state.targets, self.r, self.options["estimator_options"]["target_outside"]
            )
            loss = 0.0
            rmse: Dict[str, float] = {}
            rdfs: Dict[str, np.ndarray] = {}
            for t in prepared:
                g_model = torch.as_tensor(g[t.row])
                loss += float(rdf_loss(g_model, t.g, t.weights))
                rmse[t.key] = float(torch.sqrt(((g_model - t.g) ** 2).mean()))
                rdfs[t.key] = g[t.row].copy()
                du = ibi_update(
                    self.r,
                    g[t.row],
                    t.g.numpy(),
                    state.kT,
                    self.mixing,
                    self.options["g_min"],
                    self.options["smoothing"],
                    self.options["max_update"],
                )
                updates[t.row].append((state.weight, du))
            loss *= state.weight
            total += loss
            record["state_losses"][state.name] = loss
            record["rdf_rmse"][state.name] = rmse
            record["n_eff"][state.name] = None
            record["resampled"][state.name] = True
            last_rdfs[state.name] = rdfs
            if self.options["pressure_correction"] and state.pressure is not None:
                pressure, sum_r = _pressure_and_sum_r(self.table, snapshots, state)
                pressures[state.name] = pressure
                amplitude = pressure_ramp_amplitude(
                    pressure,
                    float(state.pressure),
                    sum_r,
                    state.volume,
                    self.table.cutoff,
                    state.kT,
                    self.options["pressure_max_ramp"],
                    self.options["pressure_factor"],
                )
                ramps.append((state.weight, amplitude))
        if not math.isfinite(total):
            raise FloatingPointError("the RDF loss is not finite")
        record["loss"] = total
        update_rms, update_max, amplitude = self._apply(updates, ramps)
        record["grad_norm"] = None  # IBI has no gradient; see "ibi" for the size of the update
        record["learning_rate"] = self.mixing
        record["md_steps"] = self.md_steps
        record["rollout_steps"] = self.rollout_steps
        record["epoch_md_steps"] = self.md_steps - steps_before
        record["epoch_seconds"] = time.perf_counter() - start
        record["ibi"] = {
            "update_rms": update_rms,
            "update_max": update_max,
            "pressure": pressures,
            "pressure_ramp": amplitude,
        }
        self._last_rdfs = last_rdfs
        return record

    def _apply(self, updates, ramps) -> Tuple[float, float, Optional[float]]:
        """Add the weighted updates (and the ramp) to the knots; returns rms and largest ΔU (kJ/mol) and A."""
        amplitude = None
        if ramps:
            weights = np.array([w for w, _ in ramps])
            values = np.array([a for _, a in ramps])
            amplitude = float((weights * values).sum() / weights.sum()) if weights.sum() > 0 else float(values.mean())
        squares, count, largest = 0.0, 0, 0.0
        with torch.no_grad():
            for k, (spline, _) in enumerate(self._splines):
                knots = spline.knots.numpy()
                delta = np.zeros_like(knots)
                if updates[k]:
                    weights = np.array([w for w, _ in updates[k]])
                    if weights.sum() <= 0:
                        weights = np.ones_like(weights)
                    du = sum(w * d for w, (_, d) in zip(weights, updates[k], strict=True)) / weights.sum()
                    # Hold u at the cutoff: the update's constant part moves nothing physical.
                    du = du - np.interp(self.table.cutoff, self.r, du)
                    delta += np.interp(knots, self.r, du)
                if amplitude is not None:
                    delta += pressure_ramp(knots, self.table.cutoff, amplitude)
                if not np.all(np.isfinite(delta)):
                    raise FloatingPointError(f"non-finite IBI update for pair {self.table.pair_names[k]}")
                spline.values.add_(torch.as_tensor(delta, dtype=spline.values.dtype))
                squares += float((delta**2).sum())
                count += delta.size
                largest = max(largest, float(np.abs(delta).max()))
        return math.sqrt(squares / max(count, 1)), largest, amplitude

    # -- main loop ------------------------------------------------------------------------------------

    def _good_state(self) -> Dict[str, Any]:
        return {"table": copy.deepcopy(self.table.state_dict()), "sampler_states": copy.deepcopy(self._sampler_states)}

    def _roll_back(self, good: Dict[str, Any], reason: str) -> Dict[str, Any]:
        self.table.load_state_dict(good["table"])
        self._sampler_states = copy.deepcopy(good["sampler_states"])
        self.samplers.clear()
        old = self.mixing
        self.mixing *= 0.5
        logger.warning("IBI iteration %d rolled back (%s); mixing %.3g -> %.3g", self.epoch, reason, old, self.mixing)
        if self.options["progress"]:
            print(f"  ! iteration {self.epoch}: {reason}; rolled back, mixing {old:.3g} -> {self.mixing:.3g}")
        return {"epoch": self.epoch, "event": "rollback", "reason": reason, "learning_rate": [old, self.mixing]}

    def fit(self) -> List[Dict[str, Any]]:
        """Run IBI iterations until ``max_epochs``, the target loss or a plateau.

        Returns
        -------
        list of dict
            Per-iteration records (also written to ``log.jsonl``), with the
            trainer's keys; ``loss`` and ``rdf_rmse`` are those of the
            potential *before* the iteration's update (the one that was sampled).
        """
        from .sampling import SamplingError
        from .training import TrainingError

        if not self._initialised:
            self._initialised = True
            if self.options["boltzmann_initial_guess"] and self.epoch == 0:
                self._apply_boltzmann_guess()
            if self.output_dir is not None:
                self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.options["progress"] and self.epoch == 0:
            print(
                f"openmm-diffsim: iterative Boltzmann inversion of {self.table.n_pair_types} pair type(s) on "
                f"{len(self.states)} state point(s), mixing {self.mixing:g}"
            )
        retries = 0
        pending: List[Dict[str, Any]] = []
        while self.epoch < self.options["max_epochs"]:
            good = self._good_state()
            start = time.perf_counter()
            try:
                record = self._epoch()
            except (SamplingError, FloatingPointError) as exc:
                retries += 1
                self.wall_time += time.perf_counter() - start
                pending.append(self._roll_back(good, str(exc)))
                if retries > self.options["max_retries"]:
                    self._write_log()
                    raise TrainingError(
                        f"IBI failed {retries} times in a row at iteration {self.epoch}; last error: {exc}"
                    ) from exc
                continue
            retries = 0
            self.wall_time += time.perf_counter() - start
            record["wall_time"] = self.wall_time
            record["events"] = pending
            pending = []
            self.history.append(record)
            if record["loss"] < self.best_loss * 0.99:
                self.best_epoch = self.epoch
            self.best_loss = min(self.best_loss, record["loss"])
            self.epoch += 1
            self._report(record)
            for callback in self.callbacks:
                callback(self, record)
            if self.output_dir is not None:
                self._write_log()
                if self.options["checkpoint_every"] and self.epoch % self.options["checkpoint_every"] == 0:
                    self.save_checkpoint()
                if self.options["plot_every"] and self.epoch % self.options["plot_every"] == 0:
                    self.plot()
            if self._should_stop(record):
                break
        if self.output_dir is not None:
            self._write_log()
            self.save_checkpoint()
            self.plot()
        return self.history

    def _should_stop(self, record) -> bool:
        target = self.options["target_loss"]
        if target is not None and record["loss"] < target:
            if self.options["progress"]:
                print(f"  reached target loss {target:g}")
            return True
        patience = self.options["plateau_patience"]
        if patience and self.epoch - 1 - self.best_epoch >= patience:
            if self.options["progress"]:
                print(f"  loss plateaued for {patience} iterations")
            return True
        return False

    def _report(self, record) -> None:
        if not self.options["progress"]:
            return
        parts = [f"iteration {record['epoch'] + 1:4d}/{self.options['max_epochs']}", f"loss {record['loss']:.3e}"]
        for name, rmse in record["rdf_rmse"].items():
            for pair, value in rmse.items():
                parts.append(f"rmse[{name}:{pair}] {value:.4f}")
        parts.append(f"|dU|max {record['ibi']['update_max']:.3g} kJ/mol")
        if record["ibi"]["pressure_ramp"] is not None:
            parts.append(f"ramp {record['ibi']['pressure_ramp']:+.3g} kJ/mol")
        parts.append(f"{record['epoch_seconds']:.1f} s")
        print("  ".join(parts), flush=True)

    # -- persistence --------------------------------------------------------------------------------------

    def _write_log(self) -> None:
        from .training import _atomic_write_bytes, _jsonable

        if self.output_dir is None:
            return
        lines = "".join(json.dumps(_jsonable(r)) + "\n" for r in self.history)
        _atomic_write_bytes(self.output_dir / LOG_NAME, lines.encode())

    def checkpoint(self) -> Dict[str, Any]:
        """Everything needed to resume, as a dict (the table under ``"table"``, as the trainer's)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "table": self.table,
            "states": self.states,
            "options": self.options,
            "epoch": self.epoch,
            "md_steps": self.md_steps,
            "wall_time": self.wall_time,
            "history": self.history,
            "mixing": self.mixing,
            "best_loss": self.best_loss,
            "best_epoch": self.best_epoch,
            "sampler_states": self._sampler_states,
            "sampled": sorted(self._sampled),
        }

    def save_checkpoint(self, path: Optional[Union[str, Path]] = None) -> Path:
        """Write the checkpoint atomically (default ``output_dir/checkpoint.pt``)."""
        from .training import atomic_torch_save

        if path is None:
            if self.output_dir is None:
                raise ValueError("no output_dir given: pass a checkpoint path")
            path = self.output_dir / CHECKPOINT_NAME
        path = Path(path)
        atomic_torch_save(self.checkpoint(), path)
        return path

    @classmethod
    def resume(cls, output_dir: Union[str, Path], **overrides) -> IBI:
        """Rebuild an IBI run from ``output_dir/checkpoint.pt`` (or a checkpoint file).

        ``overrides`` replace saved options (e.g. ``max_epochs`` to iterate longer).
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
        if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not an openmm-diffsim IBI checkpoint")
        options = dict(data["options"])
        unknown = set(overrides) - set(options)
        if unknown:
            raise ValueError(f"unknown option(s) to override: {sorted(unknown)}")
        options.update(overrides)
        run = cls(data["table"], data["states"], output_dir=path.parent, **options)
        run.epoch = data["epoch"]
        run.md_steps = data["md_steps"]
        run.wall_time = data["wall_time"]
        run.history = data["history"]
        run.mixing = data["mixing"] if "mixing" not in overrides else float(overrides["mixing"])
        run.best_loss = data["best_loss"]
        run.best_epoch = data["best_epoch"]
        run._sampler_states = data["sampler_states"]
        run._sampled = set(data["sampled"])
        # A resumed run never re-applies the initial guess.
        run._initialised = False
        run.options["boltzmann_initial_guess"] = run.options["boltzmann_initial_guess"] and run.epoch == 0
        return run

    # -- outputs ------------------------------------------------------------------------------------------

    def plot(self) -> List[Path]:
        """RDF, potential and loss plots in ``output_dir/plots`` (as the trainer's); returns the paths."""
        if self.output_dir is None or not self.history:
            return []
        from . import plotting

        folder = self.output_dir / "plots"
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        for state in self.states:
            rdfs = self._last_rdfs.get(state.name)
            if not rdfs:
                continue
            target = {"-".join(t.pair): (np.asarray(t.r), np.asarray(t.g)) for t in state.targets}
            written.append(plotting.plot_rdfs(folder / f"rdf_{state.name}.png", self.r, rdfs, target, title=state.name))
        written.append(
            plotting.plot_potentials(
                folder / "potential.png",
                self.table,
                r_min=self._plot_r_min(),
                r_max=self.table.cutoff,
                kT=self.states[0].kT,
            )
        )
        written.append(plotting.plot_loss(folder / "loss.png", self.history))
        return written

    def _plot_r_min(self) -> float:
        """Where the wall passes 50 kJ/mol, or (a soft linear core never does) just inside the first knot."""
        from .training import _plot_r_min

        r_min = _plot_r_min(self.table)
        if r_min > 0:
            return r_min
        return 0.9 * min(float(spline.knots[0]) for spline, _ in self._splines)


# -- configuration entry point --------------------------------------------------------------------------

#: Keys of ``RunConfig.trainer`` that IBI takes (the rest belong to the gradient methods).
_TRAINER_KEYS = (
    "max_epochs",
    "n_snapshots",
    "snapshot_interval",
    "equilibration_steps",
    "reequilibration_steps",
    "sampler_options",
    "estimator_options",
    "target_loss",
    "plateau_patience",
    "output_dir",
    "checkpoint_every",
    "plot_every",
    "seed",
    "progress",
    "boltzmann_initial_guess",
    "max_retries",
)


def run_from_config(config, resume: bool = False, max_epochs: Optional[int] = None) -> IBI:
    """Run IBI as a :class:`~openmm_diffsim.config.RunConfig` with ``method = "ibi"`` says, then export.

    The ``[ibi]`` table (``config.ibi``) gives the IBI options (``mixing``,
    ``smoothing``, ``g_min``, ``max_update``, ``pressure_correction``, ...);
    ``[training]``, ``[sampling]``, ``[estimator]`` (``r_range``, ``n_bins``,
    ``smearing``) and ``[output]`` mean what they mean for the trainer.
    Formats in ``[export] formats`` are written to the export folder.

    Parameters
    ----------
    config : RunConfig
        With ``method == "ibi"``.
    resume : bool
        Continue from ``output_dir/checkpoint.pt``.
    max_epochs : int, optional
        Override the number of iterations.

    Returns
    -------
    IBI
        The finished run (``.table`` is the result).
    """
    from .config import ConfigError

    if config.method != "ibi":
        raise ConfigError(f"training.method: run_from_config runs 'ibi', got {config.method!r}")
    unused = sorted(k for k in config.trainer if k not in _TRAINER_KEYS and k != "estimator")
    if unused:
        # Valid keys of the gradient methods (e.g. the example's learning_rate): say so, then go on.
        message = f"training: {', '.join(unused)} not used by method 'ibi' (its step size is [ibi] mixing)"
        logger.warning(message)
        print(f"note: {message}")
    overrides = {} if max_epochs is None else {"max_epochs": int(max_epochs)}
    if resume:
        run = IBI.resume(config.output_dir, **overrides)
    else:
        pending = config.pending_reference_targets()
        if pending:
            print(f"simulating {len(pending)} reference target(s) (cached in {config.output_dir / 'targets'}) ...")
        config.resolve_targets()
        kwargs = {k: v for k, v in config.trainer.items() if k in _TRAINER_KEYS}
        kwargs.update(getattr(config, "ibi", None) or {})
        kwargs.update(overrides)
        try:
            run = IBI(config.table, config.states, **kwargs)
        except ValueError as exc:
            raise ConfigError(f"ibi: {exc}") from exc
    start = time.perf_counter()
    history = run.fit()
    if history:
        print(
            f"finished {len(history)} IBI iteration(s) in {time.perf_counter() - start:.1f} s; "
            f"last sampled loss {history[-1]['loss']:.4g}"
        )
    formats = config.export["formats"]
    if formats:
        from .cli import _default_export_name, export_table

        state = config.state(config.export["state"])
        directory = Path(config.export["directory"])
        for fmt in formats:
            written = export_table(
                run.table,
                fmt,
                directory / _default_export_name(fmt),
                state=state,
                r_min=config.export["r_min"],
                dr=config.export["dr"],
                n_points=config.export["n_points"],
            )
            print(f"exported {fmt}: {', '.join(str(p) for p in written)}")
    print(f"results in {config.output_dir}")
    return run
