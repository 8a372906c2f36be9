"""Gradient estimators of the RDF loss behind one interface.

An estimator is called as ``estimator(table, state, snapshots, targets,
loss_weight)``: it returns an :class:`EstimatorResult` (loss, per-pair RDF
RMSE, diagnostics) and *adds* the gradient of its loss to ``p.grad`` of every
parameter of ``table``. A rejected estimate (non-finite numbers) leaves the
gradients untouched and says why in ``diagnostics``.

* :class:`ReweightingEstimator` -- DiffTRe-style: ensemble averages over
  OpenMM snapshots with Boltzmann weights
  ``w_i ∝ exp(-β [U_θ(x_i) - U_θ0(x_i)])``. Positions do not change under
  reweighting, so the per-snapshot observables are computed once and the
  gradient flows only through the weights. Energies of a pair potential are
  linear functionals of each snapshot's pair-distance histogram; they are
  re-evaluated in O(histogram nodes) per snapshot (cubic Hermite
  quadrature on a fine grid, error checked against exact energies at reset).
* :class:`RolloutEstimator` -- the seed paper's DiffSim: short differentiable
  rollouts (:mod:`openmm_diffsim.dynamics`) seeded from snapshots, the RDF
  averaged over frames, gradients by backpropagation or by the adjoint
  (memory independent of rollout length).

The loss of a state is ``state.weight * loss_weight * Σ_targets
rdf_loss(g_model, g_target, target.weights)`` (plus an optional pressure
term, see the estimators). Targets must lie on the estimator's bins (bin centres
of ``r_range`` / ``n_bins``); other grids are interpolated with
:meth:`Target.resample`. Smear an external histogram target with
:func:`~openmm_diffsim.observables.smear_target` first, so model and target
see the same kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Protocol, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from .dynamics import (
    NonFiniteError,
    PairForces,
    make_integrator,
    maxwell_boltzmann_velocities,
    rollout_gradient,
)
from .neighbors import box_lengths, neighbor_pairs, pair_displacements
from .observables import (
    BAR_PER_KJ_PER_MOL_NM3,
    _PartialRDFGrid,
    compute_partial_rdfs,
    rdf_bin_edges,
    rdf_loss,
)
from .potentials import PairTable
from .targets import BIN_WEIGHTINGS, counting_weights, relative_weights

__all__ = [
    "EstimatorResult",
    "Estimator",
    "ReweightingEstimator",
    "RolloutEstimator",
    "clip_gradients",
    "fisher_metric",
    "NonFiniteError",
]


@dataclass
class EstimatorResult:
    """What an estimator returns (the gradient itself goes into ``p.grad``).

    Attributes
    ----------
    loss : float
        The state's weighted loss whose gradient was accumulated (NaN if rejected).
    rdf_rmse : dict
        RMS difference between model and target g(r) per target, keyed ``"A-B"``.
    diagnostics : dict
        Always: ``n_eff``, ``n_eff_fraction``, ``needs_resample``, ``steps_run``,
        ``grad_norm``, ``rejected`` (bool) and ``reason`` (str, empty if
        accepted); plus estimator-specific entries.
    r : numpy.ndarray, shape (n_bins,)
        Bin centres in nm.
    rdfs : dict
        Model g(r) per target key, numpy arrays (n_bins,).
    """

    loss: float
    rdf_rmse: Dict[str, float]
    diagnostics: Dict[str, Any]
    r: np.ndarray = field(default_factory=lambda: np.zeros(0))
    rdfs: Dict[str, np.ndarray] = field(default_factory=dict)


class Estimator(Protocol):
    """Callable interface shared by the estimators."""

    def __call__(self, table: PairTable, state, snapshots, targets, loss_weight: float = 1.0) -> EstimatorResult: ...


def clip_gradients(parameters, max_norm: float) -> float:
    """Scale gradients so their total 2-norm is at most ``max_norm``.

    Parameters
    ----------
    parameters : iterable of Tensor
        Parameters whose ``.grad`` are clipped in place (None grads are skipped).
    max_norm : float
        Largest allowed total norm (positive).

    Returns
    -------
    float
        The total norm before clipping.

    Raises
    ------
    NonFiniteError
        If any gradient is NaN or infinite (nothing is modified).
    """
    max_norm = float(max_norm)
    if not math.isfinite(max_norm) or max_norm <= 0:
        raise ValueError(f"max_norm must be a positive number, got {max_norm}")
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    norm = float(torch.sqrt(sum((g.detach().double() ** 2).sum() for g in grads)))
    if not math.isfinite(norm):
        raise NonFiniteError("non-finite gradient: refusing to clip or apply it")
    if norm > max_norm:
        scale = max_norm / (norm + 1e-12)
        for g in grads:
            g.mul_(scale)
    return norm


# -- shared pieces ---------------------------------------------------------------------------


@dataclass
class _PreparedTarget:
    key: str
    row: int  # pair-type index in the table (row of compute_partial_rdfs)
    g: Tensor
    weights: Optional[Tensor]


def _particle_species(table: PairTable, state) -> np.ndarray:
    from .torchforce import species_indices

    return species_indices(table, state.particle_species_names())


def _check_bin_weighting(bin_weighting: str) -> str:
    if bin_weighting not in BIN_WEIGHTINGS:
        raise ValueError(f"bin_weighting must be one of {BIN_WEIGHTINGS}, got {bin_weighting!r}")
    return bin_weighting


def _prepare_targets(
    table: PairTable, targets, r: np.ndarray, outside: str, bin_weighting: str = "uniform"
) -> List[_PreparedTarget]:
    targets = list(targets)
    if not targets:
        raise ValueError("no targets given: the RDF loss needs at least one Target")
    prepared = []
    seen: Dict[str, int] = {}
    for target in targets:
        for name in ("pair", "r", "g"):
            if not hasattr(target, name):
                raise TypeError(f"targets must be Target objects with .pair, .r and .g, got {type(target).__name__}")
        row = table.pair_index(tuple(target.pair))
        if np.asarray(target.r).shape != r.shape or not np.allclose(target.r, r, rtol=0.0, atol=1e-9):
            target = target.resample(r, outside=outside)
        if bin_weighting == "counting" and target.weights is None:
            target = counting_weights(target)
        elif bin_weighting == "relative" and target.weights is None:
            target = relative_weights(target)
        key = f"{target.pair[0]}-{target.pair[1]}"
        if key in seen:
            seen[key] += 1
            key = f"{key}#{seen[key]}"
        else:
            seen[key] = 0
        weights = None if target.weights is None else torch.as_tensor(np.asarray(target.weights), dtype=torch.float64)
        prepared.append(_PreparedTarget(key, row, torch.as_tensor(np.asarray(target.g), dtype=torch.float64), weights))
    return prepared


def _bin_weights(target: _PreparedTarget) -> Tensor:
    """The target's bin weights normalised to sum 1 (uniform when it has none), as the residuals use them."""
    n_bins = target.g.shape[0]
    if target.weights is None:
        return torch.full((n_bins,), 1.0 / n_bins, dtype=torch.float64)
    return target.weights / target.weights.sum()


def _rdf_loss_terms(g_model: Tensor, targets: List[_PreparedTarget]) -> Tensor:
    return sum(rdf_loss(g_model[k], t.g, t.weights) for k, t in enumerate(targets))


def _rdf_rows(values: Tensor, targets: List[_PreparedTarget], scale: float) -> Tensor:
    """RDF rows of a residual-like vector: ``values[..., k, :]`` per target k, times ``sqrt(scale w_b)``, concatenated.

    ``values`` has the targets on its second-to-last axis and the bins on
    the last; leading axes (blocks of frames, say) are kept.
    """
    return torch.cat([torch.sqrt(scale * _bin_weights(t)) * values[..., k, :] for k, t in enumerate(targets)], dim=-1)


def _rmse(g_model: Tensor, targets: List[_PreparedTarget]) -> Dict[str, float]:
    g = g_model.detach()
    return {t.key: float(torch.sqrt(((g[k] - t.g) ** 2).mean())) for k, t in enumerate(targets)}


def _accumulate(parameters: List[Tensor], grads: Sequence[Optional[Tensor]]) -> float:
    """Check every gradient, then add them to ``p.grad``; returns their total norm."""
    total = 0.0
    for g in grads:
        if g is not None:
            if not bool(torch.isfinite(g).all()):
                raise NonFiniteError("non-finite gradient")
            total += float((g.double() ** 2).sum())
    for p, g in zip(parameters, grads, strict=False):
        if g is None:
            continue
        g = g.to(p.dtype)
        p.grad = g.clone() if p.grad is None else p.grad + g
    return math.sqrt(total)


def _rejected(reason: str, extra: Dict[str, Any]) -> EstimatorResult:
    diagnostics = {
        "n_eff": float("nan"),
        "n_eff_fraction": float("nan"),
        "needs_resample": False,
        "steps_run": 0,
        "grad_norm": float("nan"),
        "rejected": True,
        "reason": reason,
    }
    diagnostics.update(extra)
    return EstimatorResult(float("nan"), {}, diagnostics)


def _check_on_nonfinite(value: str) -> str:
    if value not in ("reject", "raise"):
        raise ValueError(f"on_nonfinite must be 'reject' or 'raise', got {value!r}")
    return value


def _check_grid(r_range, n_bins, smearing) -> Tuple[Tuple[float, float], int, float]:
    edges = rdf_bin_edges(r_range, n_bins)
    smearing = 0.0 if smearing is None else float(smearing)
    if smearing < 0 or not math.isfinite(smearing):
        raise ValueError(f"smearing must be a non-negative number of nm, got {smearing}")
    return (float(edges[0]), float(edges[-1])), int(edges.shape[0] - 1), smearing


def _excluded_keys(state, n_particles: int) -> Optional[Tensor]:
    """Pairs the state's pair force skips, as keys ``i * N + j`` (i < j), or None.

    A :class:`~openmm_diffsim.openmm_systems.SimulationStatePoint` (a user's
    System) lists them in ``state.exclusions``, shape (E, 2), local indices.
    """
    pairs = getattr(state, "exclusions", None)
    if pairs is None or len(pairs) == 0:
        return None
    pairs = torch.as_tensor(np.asarray(pairs, dtype=np.int64)).reshape(-1, 2)
    if int(pairs.min()) < 0 or int(pairs.max()) >= n_particles:
        raise ValueError(f"state {state.name!r}: exclusions must be particle indices in 0..{n_particles - 1}")
    return torch.unique(torch.minimum(pairs[:, 0], pairs[:, 1]) * n_particles + torch.maximum(pairs[:, 0], pairs[:, 1]))


def _check_pressure_state(state) -> None:
    if getattr(state, "system_atoms", None) is not None:
        raise ValueError(
            f"state {state.name!r} is a user's Simulation: its pressure involves the System's other forces, "
            "which the estimator does not see; use pressure_weight=0"
        )


# -- reweighting -----------------------------------------------------------------------------


class ReweightingEstimator:
    """DiffTRe-style reweighting of OpenMM snapshots.

    Parameters
    ----------
    r_range : (float, float)
        RDF range in nm.
    n_bins : int
        RDF bins.
    smearing : float
        Gaussian smearing of the RDF in nm (same kernel as the targets).
    n_eff_threshold : float
        ``needs_resample`` is set when ``N_eff / N`` falls below this.
    histogram_bin_width : float
        Node spacing (nm) of the per-snapshot pair-distance histograms used
        to re-evaluate energies.
    pressure_weight : float
        Weight of ``(⟨P⟩ - state.pressure)^2`` (bar^2) in the loss; 0 disables it.
    energy_weight : float
        Weight of ``(⟨U⟩/N - state.energy)^2`` ((kJ/mol)^2) in the loss, ⟨U⟩/N
        the mean pair potential energy per particle; 0 disables it.
    energy_method : {"auto", "histogram", "exact"}
        ``histogram``: U_θ from the fine histograms, O(nodes) per snapshot.
        ``exact``: U_θ from the stored pair distances, O(pairs) per snapshot.
        ``auto``: histogram if, at :meth:`reset`, its energies agree with
        the exact ones to ``energy_tolerance`` (in kT) on every snapshot.
    energy_tolerance : float
        Largest allowed ``|U_hist - U_exact| / kT`` for ``auto``.
    target_outside : str
        ``outside`` argument of :meth:`Target.resample` for off-grid targets.
    bin_weighting : {"uniform", "counting", "relative"}
        Per-bin weights of the RDF loss for targets that carry none:
        ``"uniform"`` (the mean squared error), ``"counting"``, the inverse
        variance of pair counting, w ∝ r² / max(g, 0.05)
        (:func:`~openmm_diffsim.targets.counting_weights`), which weights the
        repulsive wall by its small noise rather than its small g, or
        ``"relative"``, w ∝ 1 / max(g, 0.1)² (relative errors of g, as
        iterative Boltzmann inversion weighs them;
        :func:`~openmm_diffsim.targets.relative_weights`).
    on_nonfinite : {"reject", "raise"}
        What to do with non-finite weights, losses or gradients.

    Notes
    -----
    Energies: every pair at distance r in node interval [r_k, r_k+1]
    contributes cubic-Hermite weights to ``u(r_k), u'(r_k), u(r_k+1),
    u'(r_k+1)``; summed per snapshot and pair type these give
    ``U(x) = Σ_k W0_k u(r_k) + W1_k u'(r_k)`` with error ~ h^4 u''''/384 per
    pair (h = node spacing). The same weights give the virial with ``r u'``.

    A state from a user's ``Simulation``
    (:class:`~openmm_diffsim.openmm_systems.SimulationStatePoint`) lists the
    pairs its force skips (``state.exclusions``, e.g. bonded neighbours):
    energies leave them out, exactly as the force does, while the RDFs count
    every pair of the selected particles, as the target recorded by
    :class:`~openmm_diffsim.reporters.RDFReporter` does. The System's other
    forces are fixed and cancel in the weights.
    """

    def __init__(
        self,
        r_range=(0.0, 1.0),
        n_bins: int = 100,
        smearing: float = 0.01,
        n_eff_threshold: float = 0.5,
        histogram_bin_width: float = 0.0005,
        pressure_weight: float = 0.0,
        energy_weight: float = 0.0,
        energy_method: str = "auto",
        energy_tolerance: float = 1e-3,
        target_outside: str = "error",
        on_nonfinite: str = "reject",
        bin_weighting: str = "uniform",
    ):
        self.r_range, self.n_bins, self.smearing = _check_grid(r_range, n_bins, smearing)
        if not 0.0 <= float(n_eff_threshold) <= 1.0:
            raise ValueError(f"n_eff_threshold must lie in [0, 1], got {n_eff_threshold}")
        if not float(histogram_bin_width) > 0:
            raise ValueError(f"histogram_bin_width must be positive (nm), got {histogram_bin_width}")
        for name, value in (("pressure_weight", pressure_weight), ("energy_weight", energy_weight)):
            if not (float(value) >= 0 and math.isfinite(float(value))):
                raise ValueError(f"{name} must be a non-negative number, got {value}")
        if energy_method not in ("auto", "histogram", "exact"):
            raise ValueError(f"energy_method must be 'auto', 'histogram' or 'exact', got {energy_method!r}")
        self.n_eff_threshold = float(n_eff_threshold)
        self.histogram_bin_width = float(histogram_bin_width)
        self.pressure_weight = float(pressure_weight)
        self.energy_weight = float(energy_weight)
        self.energy_method = energy_method
        self.energy_tolerance = float(energy_tolerance)
        self.target_outside = target_outside
        self.on_nonfinite = _check_on_nonfinite(on_nonfinite)
        self.bin_weighting = _check_bin_weighting(bin_weighting)
        edges = rdf_bin_edges(self.r_range, self.n_bins)
        self.r = (0.5 * (edges[1:] + edges[:-1])).numpy()
        self._snapshots = None
        self._table = None
        self.method_used: Optional[str] = None

    # -- precomputation ---------------------------------------------------------------

    def reset(self, table: PairTable, snapshots, state=None) -> None:
        """Take the table's current parameters as θ0 (those that sampled ``snapshots``) and precompute.

        Per snapshot: the smeared partial RDFs, the fine pair-distance
        histograms (Hermite weights) per pair type, exact energies at θ0 and,
        for ``energy_method="exact"``, the pair distances.
        """
        if not isinstance(table, PairTable):
            raise TypeError(f"table must be a PairTable, got {type(table).__name__}")
        state = snapshots.state if state is None else state
        positions = torch.as_tensor(np.asarray(snapshots.positions, dtype=np.float64))
        if positions.dim() != 3 or positions.shape[0] < 1:
            raise ValueError(f"snapshots.positions must have shape (F, N, 3) with F >= 1, got {tuple(positions.shape)}")
        n_frames, n_particles = positions.shape[0], positions.shape[1]
        if not bool(torch.isfinite(positions).all()):
            raise ValueError("snapshot positions contain NaN or infinite values")
        boxes = torch.as_tensor(np.asarray(snapshots.boxes, dtype=np.float64))
        if boxes.dim() == 2:
            boxes = boxes.unsqueeze(0).expand(n_frames, *boxes.shape)
        lengths = torch.stack([box_lengths(b) for b in boxes])
        if bool((lengths < 2.0 * table.cutoff).any()):
            raise ValueError(
                f"cutoff {table.cutoff} nm exceeds half the shortest box edge {float(lengths.min()) / 2} nm"
            )
        species = torch.as_tensor(_particle_species(table, state))
        if species.shape[0] != n_particles:
            raise ValueError(f"state {state.name!r} has {species.shape[0]} particles but snapshots have {n_particles}")
        excluded = _excluded_keys(state, n_particles)

        n_types = table.n_pair_types
        # Put a node exactly on the cutoff: u may jump there (truncation).
        n_intervals = max(1, int(round(table.cutoff / self.histogram_bin_width)))
        h = table.cutoff / n_intervals
        n_nodes = n_intervals + 1
        w0 = torch.zeros(n_frames, n_types * n_nodes, dtype=torch.float64)
        w1 = torch.zeros_like(w0)
        exact = torch.zeros(n_frames, dtype=torch.float64)
        pair_r: List[Tensor] = []
        pair_t: List[Tensor] = []
        pair_frame: List[Tensor] = []
        rdfs = []
        rdf_grid = _PartialRDFGrid(species, len(table.species), self.r_range, self.n_bins, self.smearing)
        with torch.no_grad():
            for s in range(n_frames):
                x = positions[s]
                # One pair search serves the RDFs and the energies.
                i, j = neighbor_pairs(x, lengths[s], max(table.cutoff, rdf_grid.search_reach(lengths[s : s + 1])))
                r = torch.sqrt((pair_displacements(x, i, j, lengths[s]) ** 2).sum(1))
                rdfs.append(rdf_grid.rdfs(r, i, j, lengths[s : s + 1])[1])
                inside = r < table.cutoff
                i, j, r = i[inside], j[inside], r[inside]
                if excluded is not None:
                    # Pairs the force skips (e.g. bonded neighbours) carry no pair energy;
                    # the RDFs above still count them, as the target's do.
                    keep = ~torch.isin(i * n_particles + j, excluded)
                    i, j, r = i[keep], j[keep], r[keep]
                types = table.pair_types(species[i], species[j])
                exact[s] = table.energy_and_forces(x, lengths[s], species, i, j, False)[0]
                if self.energy_method != "histogram":
                    pair_r.append(r)
                    pair_t.append(types)
                    pair_frame.append(torch.full_like(i, s))
                t = r / h
                node = torch.clamp(torch.floor(t).long(), 0, n_nodes - 2)
                f = t - node
                f2, f3 = f * f, f * f * f
                base = types * n_nodes + node
                w0[s].index_add_(0, base, 2 * f3 - 3 * f2 + 1).index_add_(0, base + 1, -2 * f3 + 3 * f2)
                w1[s].index_add_(0, base, h * (f3 - 2 * f2 + f)).index_add_(0, base + 1, h * (f3 - f2))
        active = torch.nonzero((w0 != 0).any(0) | (w1 != 0).any(0)).squeeze(1)
        self._w0 = w0[:, active].contiguous()
        self._w1 = w1[:, active].contiguous()
        node_index = active % n_nodes
        self._node_type = active // n_nodes
        # Evaluate the top node just inside the cutoff, where u is the limit from below.
        self._node_r = torch.clamp(node_index.to(torch.float64) * h, max=table.cutoff * (1.0 - 1e-12))
        if self.energy_method != "histogram":
            self._pair_r = torch.cat(pair_r)
            self._pair_t = torch.cat(pair_t)
            self._pair_frame = torch.cat(pair_frame)
        self._rdfs = torch.stack(rdfs)  # (F, n_types, n_bins)
        self._volumes = lengths.prod(1)
        self._n_particles = n_particles
        self._snapshots = snapshots
        self._table = table
        self._beta = float(state.beta)

        hist_energy, _ = self._histogram_energy_and_virial(table, need_virial=False)
        hist_energy = hist_energy.detach()
        self.histogram_energy_error = float((hist_energy - exact).abs().max()) * self._beta
        if self.energy_method == "auto":
            self.method_used = "histogram" if self.histogram_energy_error <= self.energy_tolerance else "exact"
            if self.method_used == "histogram":
                del self._pair_r, self._pair_t, self._pair_frame
        else:
            self.method_used = self.energy_method
        self._reference_energy = hist_energy if self.method_used == "histogram" else exact
        self.energy_mismatch = float("nan")
        reported = getattr(snapshots, "potential_energies", None)
        if reported is not None and np.size(reported) == n_frames:
            # The sampler's energies may differ by a constant (e.g. a long-range correction).
            diff = np.asarray(reported, dtype=np.float64) - exact.numpy()
            self.energy_mismatch = float(np.abs(diff - diff.mean()).max())

    def _node_values(self, table: PairTable, need_second: bool) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        r = self._node_r.clone().requires_grad_(need_second)
        u, du = table.energy_and_derivative(r, self._node_type)
        d2u = None
        if need_second:
            (d2u,) = torch.autograd.grad(du.sum(), r, create_graph=True)
        return u, du, d2u

    def _energy_and_virial(self, table: PairTable, need_virial: bool) -> Tuple[Tensor, Optional[Tensor]]:
        """Per-snapshot pair energy (and Σ r u'(r)) at the table's parameters, by the method chosen at :meth:`reset`."""
        if self.method_used == "histogram":
            return self._histogram_energy_and_virial(table, need_virial)
        return self._exact_energy_and_virial(table, need_virial)

    def _histogram_energy_and_virial(self, table: PairTable, need_virial: bool) -> Tuple[Tensor, Optional[Tensor]]:
        with torch.enable_grad():
            u, du, d2u = self._node_values(table, need_virial)
        energy = self._w0 @ u + self._w1 @ du
        virial = None
        if need_virial:
            r = self._node_r
            # Σ_pairs r u'(r) with f = r u', f' = u' + r u''
            virial = self._w0 @ (r * du) + self._w1 @ (du + r * d2u)
        return energy, virial

    def _exact_energy_and_virial(self, table: PairTable, need_virial: bool) -> Tuple[Tensor, Optional[Tensor]]:
        u, du = table.energy_and_derivative(self._pair_r, self._pair_t)
        n_frames = self._w0.shape[0]
        energy = torch.zeros(n_frames, dtype=torch.float64).index_add(0, self._pair_frame, u)
        virial = None
        if need_virial:
            virial = torch.zeros(n_frames, dtype=torch.float64).index_add(0, self._pair_frame, self._pair_r * du)
        return energy, virial

    # -- estimate ------------------------------------------------------------------------

    def __call__(self, table: PairTable, state, snapshots, targets, loss_weight: float = 1.0) -> EstimatorResult:
        """Reweighted RDF loss; adds its gradient to ``p.grad`` of ``table.parameters()``.

        Reuses the precomputed data while ``snapshots`` (and ``table``) are
        the same objects as at the last :meth:`reset`; otherwise resets with
        the table's current parameters as θ0.
        """
        if snapshots is not self._snapshots or table is not self._table:
            self.reset(table, snapshots, state)
        beta = float(state.beta)
        targets_prepared = _prepare_targets(table, targets, self.r, self.target_outside, self.bin_weighting)
        rows = [t.row for t in targets_prepared]
        parameters = [p for p in table.parameters() if p.requires_grad]
        self._check_thermodynamic_targets(state)
        scale = float(state.weight) * float(loss_weight)
        with torch.enable_grad():
            energy, virial = self._energy_and_virial(table, self.pressure_weight > 0)
            log_w = -beta * (energy - self._reference_energy)
            weights = torch.softmax(log_w, 0)  # log-sum-exp, float64
            g_model = torch.einsum("s,stb->tb", weights, self._rdfs[:, rows])
            loss = _rdf_loss_terms(g_model, targets_prepared) * scale
            terms = self._thermodynamic_terms(state, weights, energy, virial)
            for _, term_weight, value, target in terms:
                loss = loss + term_weight * scale * (value - target) ** 2
        with torch.no_grad():
            w = weights.detach()
            entropy = -(w * torch.log(torch.clamp(w, min=1e-300))).sum()
            n_eff = float(torch.exp(entropy))
        n_frames = w.shape[0]
        diagnostics: Dict[str, Any] = {
            "n_eff": n_eff,
            "n_eff_fraction": n_eff / n_frames,
            "needs_resample": bool(n_eff / n_frames < self.n_eff_threshold),
            "steps_run": 0,
            "n_snapshots": n_frames,
            "energy_method": self.method_used,
            "histogram_energy_error_kT": self.histogram_energy_error,
            "energy_mismatch": self.energy_mismatch,
            "max_delta_u_kT": float((log_w.detach()).abs().max()),
            "rejected": False,
            "reason": "",
        }
        for name, _, value, _ in terms:
            diagnostics[name] = float(value.detach())
        if not bool(torch.isfinite(loss.detach())) or not bool(torch.isfinite(w).all()):
            return self._reject(
                "non-finite reweighting weights or loss (energies diverged at the new parameters)", diagnostics
            )
        grads = torch.autograd.grad(loss, parameters, allow_unused=True) if parameters else []
        try:
            diagnostics["grad_norm"] = _accumulate(parameters, grads)
        except NonFiniteError as exc:
            return self._reject(str(exc), diagnostics)
        return EstimatorResult(
            float(loss.detach()),
            _rmse(g_model, targets_prepared),
            diagnostics,
            self.r.copy(),
            {t.key: g_model[k].detach().numpy().copy() for k, t in enumerate(targets_prepared)},
        )

    def residuals(self, table: PairTable, state, targets, loss_weight: float = 1.0) -> Tuple[Tensor, float]:
        """Residual vector ρ(θ) of the reweighted loss, with ``ρ·ρ`` equal to the loss.

        Differentiable with respect to the table's parameters; uses the data
        precomputed at the last :meth:`reset` (call the estimator or ``reset``
        first). For Gauss–Newton steps: the Jacobian of ρ is
        ``-β cov(observable, ∂U/∂θ)``, the inverse Monte Carlo matrix.

        Returns
        -------
        rho : Tensor, shape (M,)
            Weighted RDF differences (then the pressure and the energy differences, if used).
        n_eff_fraction : float
            N_eff / N of the reweighting weights at the current parameters.
        """
        if self._snapshots is None:
            raise RuntimeError("call reset(table, snapshots) or the estimator first")
        beta = float(state.beta)
        targets_prepared = _prepare_targets(table, targets, self.r, self.target_outside, self.bin_weighting)
        rows = [t.row for t in targets_prepared]
        self._check_thermodynamic_targets(state)
        scale = float(state.weight) * float(loss_weight)
        energy, virial = self._energy_and_virial(table, self.pressure_weight > 0)
        weights = torch.softmax(-beta * (energy - self._reference_energy), 0)
        g_model = torch.einsum("s,stb->tb", weights, self._rdfs[:, rows])
        parts = [_rdf_rows(g_model - torch.stack([t.g for t in targets_prepared]), targets_prepared, scale)]
        for _, term_weight, value, target in self._thermodynamic_terms(state, weights, energy, virial):
            parts.append((math.sqrt(term_weight * scale) * (value - target)).reshape(1))
        with torch.no_grad():
            w = weights.detach()
            n_eff = float(torch.exp(-(w * torch.log(torch.clamp(w, min=1e-300))).sum())) / w.shape[0]
        return torch.cat(parts), n_eff

    def sample_rdfs(self, targets) -> List[Tuple[tuple, np.ndarray, np.ndarray]]:
        """The snapshots' own RDF beside each target, frames weighted equally, on the estimator's grid.

        For a fresh sample, drawn at the current parameters, this is the RDF
        the residuals compare with the target before any reweighting (what
        IBI's correction ``kT ln(g/g_target)`` reads).

        Parameters
        ----------
        targets : list of Target
            The RDF targets (resampled onto the grid ``self.r``, in nm, as the loss does).

        Returns
        -------
        list of (pair, g_sample, g_target)
            Per target: its pair of species names and two arrays of shape (n_bins,).
        """
        if self._snapshots is None:
            raise RuntimeError("call reset(table, snapshots) or the estimator first")
        prepared = _prepare_targets(self._table, targets, self.r, self.target_outside, self.bin_weighting)
        mean = self._rdfs.mean(0)
        return [
            (tuple(target.pair), mean[t.row].numpy().copy(), t.g.numpy().copy())
            for target, t in zip(targets, prepared, strict=True)
        ]

    def frame_energies(self, table: PairTable) -> Tensor:
        """Per-snapshot pair energy (kJ/mol) at the table's current parameters, shape (F,), float64, no gradient.

        Computed as the reweighting weights are (histogram or exact pair sums,
        whichever :meth:`reset` chose).
        """
        if self._snapshots is None:
            raise RuntimeError("call reset(table, snapshots) or the estimator first")
        with torch.no_grad():
            energy, _ = self._energy_and_virial(table, False)
        return energy.detach().to(torch.float64)

    def residual_curvature(
        self, state, targets, energy_before: Tensor, energy_after: Tensor, loss_weight: float = 1.0
    ) -> Tensor:
        """Second derivative in t of the RDF rows of the reweighted residuals along a parameter change.

        Along ``U_t = U_before + t (U_after - U_before)`` the reweighted mean
        of a per-frame observable A is ``⟨A e^{-tβΔU}⟩ / ⟨e^{-tβΔU}⟩`` (means
        under the weights at ``U_before``). Its first derivative at t = 0 is
        ``-β cov(A, ΔU)``, the IMC Jacobian times the change; its second is
        the joint third cumulant ``β² ⟨(A - ⟨A⟩)(ΔU - ⟨ΔU⟩)²⟩``, which this
        returns for the RDF rows. It is exact for the sample at hand (no
        expansion), so it is the curvature a second-order model of the
        residuals needs, read from the same frames as the Jacobian: near a
        critical point the RDF responds to an added attraction far more
        than linearly, which a Newton step alone cannot see.

        Parameters
        ----------
        state : StatePoint
            The state of the snapshots (its β and ``weight``, as in :meth:`residuals`).
        targets : list of Target
            The RDF targets; their pairs and bin weights.
        energy_before, energy_after : Tensor, shape (F,)
            Per-snapshot pair energies (kJ/mol) at the two parameter sets, e.g.
            from :meth:`frame_energies` before and after a step.
        loss_weight : float
            Extra factor on this state's loss, as in :meth:`residuals`.

        Returns
        -------
        Tensor, shape (M_rdf,), float64
            ``d²ρ/dt²`` at t = 0 for the RDF rows of ρ (those come first in
            :meth:`residuals`, before any pressure or energy rows).
        """
        if self._snapshots is None:
            raise RuntimeError("call reset(table, snapshots) or the estimator first")
        n_frames = self._rdfs.shape[0]
        before = torch.as_tensor(energy_before, dtype=torch.float64)
        after = torch.as_tensor(energy_after, dtype=torch.float64)
        for name, value in (("energy_before", before), ("energy_after", after)):
            if value.shape != (n_frames,):
                raise ValueError(
                    f"{name} must have shape ({n_frames},) (one energy per snapshot), got {tuple(value.shape)}"
                )
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"{name} contains NaN or infinite values")
        beta = float(state.beta)
        weights = torch.softmax(-beta * (before - self._reference_energy), 0)
        change = beta * (after - before)
        change = change - weights @ change
        targets_prepared = _prepare_targets(self._table, targets, self.r, self.target_outside, self.bin_weighting)
        rows = [t.row for t in targets_prepared]
        frames = self._rdfs[:, rows].to(torch.float64)  # (F, n_targets, n_bins)
        centred = frames - torch.einsum("s,stb->tb", weights, frames)
        third = torch.einsum("s,stb->tb", weights * change**2, centred)
        scale = float(state.weight) * float(loss_weight)
        return _rdf_rows(third, targets_prepared, scale)

    def residual_noise(self, state, targets, loss_weight: float = 1.0, n_blocks: int = 10) -> float:
        """Expected part of ``ρ·ρ`` that is sampling noise, at the snapshots' own parameters (RDF rows).

        A loss measured on a finite sample is its bias plus the variance of
        the sample-mean RDF: ``E[ρ·ρ] = |bias|² + Σ_k s Σ_b w_b Var(ḡ_kb)``.
        This returns the second term, with ``Var(ḡ)`` from the means of
        ``n_blocks`` consecutive blocks of frames (block averaging, so frames
        correlated within a block do not count as independent). It lets a
        caller tell a loss that rose from one that merely scattered: two
        samples of an exact potential differ in loss by about this much.

        Parameters
        ----------
        state : StatePoint
            The state the snapshots were drawn at (its ``weight`` scales the loss, as in :meth:`residuals`).
        targets : list of Target
            The RDF targets; only their pairs and bin weights matter here.
        loss_weight : float
            Extra factor on this state's loss, as in :meth:`residuals`.
        n_blocks : int
            Number of blocks (at least 2; fewer when there are fewer frames).

        Returns
        -------
        float
            The noise part of the loss (dimensionless, like ``ρ·ρ``); NaN with fewer than 2 frames.
        """
        deviations = self.residual_block_deviations(state, targets, loss_weight, n_blocks)
        blocks = deviations.shape[0]
        if blocks < 2:
            return float("nan")
        # Σ_b d_b² / (B (B - 1)): the variance of the mean of the blocks, weighted like the loss.
        return float((deviations**2).sum()) / (blocks * (blocks - 1))

    def residual_block_deviations(self, state, targets, loss_weight: float = 1.0, n_blocks: int = 5) -> Tensor:
        """Deviations of block-mean residuals from the sample's mean residual (RDF rows), for step noise.

        Splits the frames into ``n_blocks`` consecutive blocks and returns, per
        block, the RDF rows of ρ computed from that block's mean RDF minus
        those from the mean over all blocks, in the units of ρ
        (``sqrt(s w_b) Δg``). The covariance of the sample-mean residual is then
        ``Σ_b d_b d_bᵀ / (B (B - 1))``, so that a caller can carry the sampling
        noise through any linear map of ρ (the noise of a Newton step, say).
        Frames are weighted equally: the snapshots are taken to be drawn at the
        current parameters, as for a fresh sample.

        Parameters
        ----------
        state : StatePoint
            The state the snapshots were drawn at (its ``weight`` scales ρ, as in :meth:`residuals`).
        targets : list of Target
            The RDF targets; their pairs and bin weights.
        loss_weight : float
            Extra factor on this state's loss, as in :meth:`residuals`.
        n_blocks : int
            Number of blocks (at least 2; fewer when there are fewer frames).

        Returns
        -------
        Tensor, shape (B, M_rdf), float64
            One row per block; M_rdf is the number of RDF rows of ρ (those come
            first in :meth:`residuals`, before any pressure or energy rows).
            Shape (0, M_rdf) with fewer than 2 frames.
        """
        if self._snapshots is None:
            raise RuntimeError("call reset(table, snapshots) or the estimator first")
        if isinstance(n_blocks, bool) or not isinstance(n_blocks, (int, np.integer)) or n_blocks < 2:
            raise ValueError(f"n_blocks must be an integer of at least 2, got {n_blocks!r}")
        targets_prepared = _prepare_targets(self._table, targets, self.r, self.target_outside, self.bin_weighting)
        n_rows = sum(t.g.shape[0] for t in targets_prepared)
        n_frames = self._rdfs.shape[0]
        blocks = min(int(n_blocks), n_frames)
        if blocks < 2:
            return torch.zeros(0, n_rows, dtype=torch.float64)
        size = n_frames // blocks  # the earliest frames are dropped when the blocks do not divide them
        rows = [t.row for t in targets_prepared]
        frames = self._rdfs[-blocks * size :, rows]  # (blocks * size, n_targets, n_bins)
        means = frames.reshape(blocks, size, *frames.shape[1:]).mean(1)
        scale = float(state.weight) * float(loss_weight)
        deviations = means - means.mean(0, keepdim=True)  # (B, n_targets, n_bins)
        return _rdf_rows(deviations, targets_prepared, scale).to(torch.float64)

    def _check_thermodynamic_targets(self, state) -> None:
        if self.pressure_weight > 0:
            _check_pressure_state(state)
            if getattr(state, "pressure", None) is None:
                raise ValueError(f"pressure_weight > 0 but state {state.name!r} has no target pressure")
        if self.energy_weight > 0 and getattr(state, "energy", None) is None:
            raise ValueError(f"energy_weight > 0 but state {state.name!r} has no target energy")

    def _thermodynamic_terms(self, state, weights: Tensor, energy: Tensor, virial: Optional[Tensor]):
        """``(name, weight, reweighted mean, target)`` of the pressure (bar) and energy (kJ/mol per particle) terms."""
        terms = []
        if self.pressure_weight > 0:
            kinetic = self._n_particles / float(state.beta) / self._volumes
            per_snapshot = (kinetic - virial / (3.0 * self._volumes)) * BAR_PER_KJ_PER_MOL_NM3
            terms.append(("pressure", self.pressure_weight, (weights * per_snapshot).sum(), float(state.pressure)))
        if self.energy_weight > 0:
            mean_energy = (weights * energy).sum() / self._n_particles
            terms.append(("energy", self.energy_weight, mean_energy, float(state.energy)))
        return terms

    def _reject(self, reason: str, diagnostics: Dict[str, Any]) -> EstimatorResult:
        if self.on_nonfinite == "raise":
            raise NonFiniteError(reason)
        diagnostics = dict(diagnostics, rejected=True, reason=reason, grad_norm=float("nan"))
        return EstimatorResult(float("nan"), {}, diagnostics, self.r.copy(), {})

    def weights(self, table: PairTable, state) -> Tensor:
        """Normalised snapshot weights (F,) at the table's current parameters (no grad)."""
        if self._snapshots is None:
            raise RuntimeError("call reset(table, snapshots) or the estimator first")
        return torch.softmax(-float(state.beta) * (self.frame_energies(table) - self._reference_energy), 0)


def fisher_metric(table: PairTable, state, snapshots, histogram_bin_width: float = 0.0005) -> Tensor:
    """Fisher information of the Boltzmann distribution in the table's trainable parameters.

    ``M = β² cov(∂U/∂θ, ∂U/∂θ)`` over the snapshots, U the pair energy of a
    snapshot: the metric of the family p_θ(x) ∝ exp(-β U_θ(x)) (the Hessian of
    the relative entropy). Preconditioning a loss gradient with it
    (``optimizer="natural"`` in :class:`~openmm_diffsim.training.Trainer`)
    turns a change of the RDF residual at r into a change of u(r) near r,
    much as iterative Boltzmann inversion does, whatever the parametrisation.
    Only the snapshots' statistics enter; no RDF is reweighted.

    Parameters
    ----------
    table : PairTable
        The model; ``M`` is over its parameters with ``requires_grad``, in
        ``table.parameters()`` order, flattened.
    state : StatePoint
        The state the snapshots sample (its temperature, species, exclusions).
    snapshots : Snapshots
        At least two configurations sampled with the table's current parameters.
    histogram_bin_width : float
        Node spacing (nm) of the per-snapshot pair-distance histograms that
        give U_θ (as in :class:`ReweightingEstimator`).

    Returns
    -------
    Tensor, shape (P, P), float64
        In (1/parameter unit)², e.g. (mol/kJ)² for spline values.
    """
    n_frames = len(np.asarray(snapshots.positions))
    if n_frames < 2:
        raise ValueError(f"fisher_metric needs at least two snapshots (a covariance), got {n_frames}")
    params = [p for p in table.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the table has no trainable parameters")
    estimator = ReweightingEstimator(histogram_bin_width=histogram_bin_width)
    estimator.reset(table, snapshots, state)
    with torch.enable_grad():
        energy, _ = estimator._energy_and_virial(table, False)
        derivatives = _jacobian(energy, params)
    if not bool(torch.isfinite(derivatives).all()):
        raise NonFiniteError("non-finite energy derivatives in fisher_metric")
    centred = derivatives - derivatives.mean(0)
    beta = float(state.beta)
    return beta * beta * (centred.T @ centred) / (n_frames - 1)


def _flat_gradient(output: Tensor, params) -> Tensor:
    """Gradient of a scalar with respect to ``params``, flattened into one row (zeros where unused)."""
    grads = torch.autograd.grad(output, params, retain_graph=True, allow_unused=True)
    return torch.cat(
        [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params, strict=True)]
    )


def _jacobian(outputs: Tensor, params) -> Tensor:
    """Rows ``d outputs[k] / d params``, shape (len(outputs), n_params), detached float64; one backward pass per row."""
    if outputs.shape[0] == 0:
        return torch.zeros(0, sum(p.numel() for p in params), dtype=torch.float64)
    return torch.stack([_flat_gradient(outputs[k], params) for k in range(outputs.shape[0])]).detach().to(torch.float64)


# -- rollouts --------------------------------------------------------------------------------


class _FrameThermodynamics:
    """Virial pressure (bar) and pair energy per particle (kJ/mol) of a rollout frame, averaged over replicas.

    ``P = N k T / V - Σ_pairs r u'(r) / (3 V)`` with the kinetic part from the
    state temperature, and ``U / N = Σ_pairs u(r) / N``: the conventions of
    :class:`ReweightingEstimator`, so both estimators fit the same quantities.
    Both depend on θ through the positions and directly through u and u';
    backprop and the adjoint see both paths. Returns the requested ones, in
    the order (pressure, energy), as a float64 vector, or per replica
    (shape (B, terms)) with ``per_replica``.
    """

    def __init__(
        self,
        table: PairTable,
        species: Tensor,
        lengths: Tensor,
        beta: float,
        pressure: bool,
        energy: bool,
        per_replica: bool = False,
    ):
        self.per_replica = per_replica
        self.table = table
        self.species = species
        self.lengths = lengths  # (3,) nm: a 1-D box is never mistaken for per-frame lengths
        self.volume = float(lengths.prod())
        self.n_particles = species.shape[0]
        self.kinetic = self.n_particles / beta / self.volume * BAR_PER_KJ_PER_MOL_NM3
        self.pressure = pressure
        self.energy = energy

    def __call__(self, frame: Tensor) -> Tensor:
        pressures, energies = [], []
        lengths = self.lengths.to(frame.dtype)
        for replica in frame:  # (B, N, 3)
            i, j = neighbor_pairs(replica, lengths, self.table.cutoff)
            r = torch.sqrt((pair_displacements(replica, i, j, lengths) ** 2).sum(1))
            u, du = self.table.energy_and_derivative(r, self.table.pair_types(self.species[i], self.species[j]))
            pressures.append(-(r * du).sum().to(torch.float64) / (3.0 * self.volume))
            energies.append(u.sum().to(torch.float64) / self.n_particles)
        out = []
        if self.pressure:
            out.append(self.kinetic + torch.stack(pressures) * BAR_PER_KJ_PER_MOL_NM3)
        if self.energy:
            out.append(torch.stack(energies))
        per_replica = torch.stack(out, dim=1)  # (B, terms)
        return per_replica if self.per_replica else per_replica.mean(0)


class RolloutEstimator:
    """Differentiable rollouts seeded from snapshots (the seed paper's DiffSim).

    Each call picks ``n_replicas`` snapshots (positions and velocities),
    integrates them together for ``n_steps``, averages the smeared RDFs of
    the frames recorded every ``record_every`` steps over frames and
    replicas, and differentiates the loss with respect to the table's
    parameters. With ``pressure_weight > 0`` the loss gains
    ``pressure_weight * (⟨P⟩ - state.pressure)^2`` (bar^2), ⟨P⟩ the virial
    pressure ``N k T / V - Σ r u'(r) / (3 V)`` (kinetic part from
    ``state.temperature``, as in :class:`ReweightingEstimator`) averaged over
    the recorded frames and replicas; its gradient flows through the rollout
    and through u' directly. ``energy_weight > 0`` adds
    ``energy_weight * (⟨U⟩/N - state.energy)^2`` ((kJ/mol)^2) the same way.

    Parameters
    ----------
    n_steps : int
        Rollout length.
    record_every : int
        Frame interval (frames at steps record_every, 2 record_every, ...).
    timestep : float
        ps.
    integrator : {"nve", "nose-hoover", "langevin"}
        Velocity Verlet, Nosé–Hoover chain or Langevin BAOAB (at ``state.temperature``).
    n_replicas : int
        Snapshots integrated at once (batched).
    adjoint : bool
        Use the adjoint (backward integration, memory independent of
        ``n_steps``) instead of backpropagation through the rollout.
    dtype : torch.dtype
        Precision of the rollout (float64 recommended for the adjoint).
    r_range, n_bins, smearing
        RDF grid and Gaussian smearing (nm).
    skin : float
        Verlet skin in nm.
    seed : int
        Seeds the choice of snapshots, missing velocities and Langevin noise
        (each call advances it).
    checkpoint_every : int or None
        Adjoint checkpoints (see :func:`~openmm_diffsim.dynamics.rollout_gradient`).
    integrator_options : dict, optional
        Extra keyword arguments of the integrator (``relaxation_time``,
        ``chain_length``, ``friction``).
    pressure_weight : float
        Weight of ``(⟨P⟩ - state.pressure)^2`` (bar^2) in the loss; 0 disables it.
    energy_weight : float
        Weight of ``(⟨U⟩/N - state.energy)^2`` ((kJ/mol)^2) in the loss; 0 disables it.
    target_outside : str
        ``outside`` argument of :meth:`Target.resample` for off-grid targets.
    bin_weighting : {"uniform", "counting", "relative"}
        Per-bin weights of the RDF loss, as in :class:`ReweightingEstimator`.
    on_nonfinite : {"reject", "raise"}
        Non-finite forces, loss or gradients: report a rejected estimate, or raise
        :class:`NonFiniteError`.
    score_correction : bool
        Add the derivative through the snapshots' own distribution. The
        rollouts start from samples of ``exp(-U_θ/kT)``, which moves with θ;
        backpropagation through the rollout alone misses that, and sees only
        the short-time response of the RDF (docs/gradients.md). The missing
        part is ``-β cov(s, ∂U/∂θ(x₀))`` over the replicas, ``s`` each
        replica's frame-averaged observables contracted with the loss's
        gradient and ``x₀`` its starting configuration. With it, the gradient
        is unbiased for the equilibrium loss at any rollout length (at
        length 0 it would be the reweighting gradient). Needs at least 2
        replicas; its noise falls with their number.
    """

    def __init__(
        self,
        n_steps: int = 100,
        record_every: int = 10,
        timestep: float = 0.002,
        integrator: str = "nve",
        n_replicas: int = 4,
        adjoint: bool = False,
        dtype: torch.dtype = torch.float64,
        r_range=(0.0, 1.0),
        n_bins: int = 100,
        smearing: float = 0.01,
        skin: float = 0.1,
        seed: int = 0,
        checkpoint_every: Optional[int] = 50,
        integrator_options: Optional[Dict[str, Any]] = None,
        pressure_weight: float = 0.0,
        energy_weight: float = 0.0,
        target_outside: str = "error",
        on_nonfinite: str = "reject",
        score_correction: bool = False,
        bin_weighting: str = "uniform",
    ):
        if int(n_steps) != n_steps or n_steps < 1:
            raise ValueError(f"n_steps must be a positive integer, got {n_steps}")
        if int(record_every) != record_every or not 1 <= record_every <= n_steps:
            raise ValueError(f"record_every must be an integer in 1..n_steps, got {record_every}")
        if int(n_replicas) != n_replicas or n_replicas < 1:
            raise ValueError(f"n_replicas must be a positive integer, got {n_replicas}")
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        for name, value in (("pressure_weight", pressure_weight), ("energy_weight", energy_weight)):
            if not (float(value) >= 0 and math.isfinite(float(value))):
                raise ValueError(f"{name} must be a non-negative number, got {value}")
        make_integrator(integrator, timestep, 1.0, **(integrator_options or {}))  # validate early
        self.n_steps = int(n_steps)
        self.record_every = int(record_every)
        self.timestep = float(timestep)
        self.integrator = integrator
        self.n_replicas = int(n_replicas)
        self.adjoint = bool(adjoint)
        self.dtype = dtype
        self.r_range, self.n_bins, self.smearing = _check_grid(r_range, n_bins, smearing)
        self.skin = float(skin)
        self.seed = int(seed)
        self.checkpoint_every = checkpoint_every
        self.integrator_options = dict(integrator_options or {})
        self.pressure_weight = float(pressure_weight)
        self.energy_weight = float(energy_weight)
        self.target_outside = target_outside
        self.on_nonfinite = _check_on_nonfinite(on_nonfinite)
        self.bin_weighting = _check_bin_weighting(bin_weighting)
        if not isinstance(score_correction, bool):
            raise TypeError(f"score_correction must be True or False, got {score_correction!r}")
        if score_correction and self.n_replicas < 2:
            raise ValueError("score_correction needs n_replicas >= 2 (it is a covariance over the replicas)")
        self.score_correction = score_correction
        edges = rdf_bin_edges(self.r_range, self.n_bins)
        self.r = (0.5 * (edges[1:] + edges[:-1])).numpy()
        self.calls = 0

    def _choose(self, n_snapshots: int) -> np.ndarray:
        if n_snapshots < 1:
            raise ValueError("snapshots are empty: a rollout needs at least one starting configuration")
        rng = np.random.default_rng((self.seed, self.calls))
        if n_snapshots <= self.n_replicas:
            return np.arange(n_snapshots)
        return np.sort(rng.choice(n_snapshots, self.n_replicas, replace=False))

    def _score_term(self, table, species, box, positions, per_replica, loss, parameters, state) -> Tensor:
        """``-β cov(s, ∂U/∂θ(x₀))`` over the replicas, flat over ``parameters`` (float64).

        ``s_b = ρ · Ā_b``: replica b's frame-averaged observables ``Ā_b`` (rows
        of ``per_replica``, shape (B, K)) contracted with ``ρ``, the loss's
        gradient with respect to their replica mean; ``x₀`` the replica's
        starting positions. This is the part of ``d E[loss] / dθ`` that comes
        from the starting configurations being Boltzmann samples of θ.
        """
        with torch.enable_grad():
            mean = per_replica.detach().mean(0, keepdim=True).requires_grad_(True)
            (rho,) = torch.autograd.grad(loss(mean), mean)
        from .energy import potential_energy

        contracted = per_replica.detach() @ rho[0]  # (B,)
        with torch.enable_grad():
            energies = torch.stack([potential_energy(table, x, box, species) for x in positions])
            derivatives = _jacobian(energies, parameters)  # (B, n_params)
        n = derivatives.shape[0]
        centred = contracted - contracted.mean()
        return -float(state.beta) * (centred @ (derivatives - derivatives.mean(0))) / (n - 1)

    def __call__(self, table: PairTable, state, snapshots, targets, loss_weight: float = 1.0) -> EstimatorResult:
        """Rollout RDF loss; adds its gradient to ``p.grad`` of ``table.parameters()``."""
        if not isinstance(table, PairTable):
            raise TypeError(f"table must be a PairTable, got {type(table).__name__}")
        if getattr(state, "system_atoms", None) is not None:
            raise ValueError(
                f"state {state.name!r} samples a user's Simulation whose other forces (bonds, ...) torch "
                "rollouts cannot integrate; use the reweighting estimator for it"
            )
        use_pressure, use_energy = self.pressure_weight > 0, self.energy_weight > 0
        if use_pressure and getattr(state, "pressure", None) is None:
            raise ValueError(f"pressure_weight > 0 but state {state.name!r} has no target pressure")
        if use_energy and getattr(state, "energy", None) is None:
            raise ValueError(f"energy_weight > 0 but state {state.name!r} has no target energy")
        targets_prepared = _prepare_targets(table, targets, self.r, self.target_outside, self.bin_weighting)
        rows = [t.row for t in targets_prepared]
        chosen = self._choose(len(snapshots.positions))
        if self.score_correction and len(chosen) < 2:
            raise ValueError(f"score_correction needs at least 2 snapshots to start replicas from, got {len(chosen)}")
        call_seed = self.seed * 7919 + self.calls
        self.calls += 1
        positions = torch.as_tensor(np.asarray(snapshots.positions)[chosen], dtype=self.dtype)
        boxes = np.asarray(snapshots.boxes, dtype=np.float64)[chosen]
        if not np.allclose(boxes, boxes[0], rtol=1e-12, atol=0.0):
            raise ValueError("rollout replicas must share one box: the chosen snapshots have different boxes")
        box = boxes[0]
        species = _particle_species(table, state)
        masses = state.particle_masses()
        velocities = getattr(snapshots, "velocities", None)
        if velocities is None or not np.any(np.asarray(velocities)[chosen]):
            velocities = maxwell_boltzmann_velocities(masses, state.temperature, len(chosen), call_seed, self.dtype)
        else:
            velocities = torch.as_tensor(np.asarray(velocities)[chosen], dtype=self.dtype)
        forces = PairForces(table, species, box, self.skin)
        integrator = make_integrator(
            self.integrator, self.timestep, state.temperature, seed=call_seed, **self.integrator_options
        )
        species_t = torch.as_tensor(species)
        n_species = len(table.species)
        box_t = torch.as_tensor(box)
        scale = float(state.weight) * float(loss_weight)

        parameters = [p for p in table.parameters() if p.requires_grad]
        # (name, weight, target) of the thermodynamic terms, in the order _FrameThermodynamics returns them.
        terms = [("pressure", self.pressure_weight, state.pressure)] if use_pressure else []
        terms += [("energy", self.energy_weight, state.energy)] if use_energy else []
        thermodynamics = None
        # The score correction needs each replica's own observables.
        per_replica = self.score_correction
        if terms:
            thermodynamics = _FrameThermodynamics(
                table, species_t, box_lengths(box_t), state.beta, use_pressure, use_energy, per_replica
            )
        n_rdf = len(rows) * self.n_bins

        def rdfs(frame: Tensor) -> Tensor:
            _, g = compute_partial_rdfs(frame, box_t, species_t, n_species, self.r_range, self.n_bins, self.smearing)
            return g[rows]

        def observable(frame: Tensor) -> Tensor:
            if per_replica:
                # (B, T * n_bins + len(terms)): per replica, the RDFs, then pressure and/or energy.
                out = torch.stack([rdfs(frame[b : b + 1]).reshape(-1).to(torch.float64) for b in range(frame.shape[0])])
                return out if thermodynamics is None else torch.cat([out, thermodynamics(frame)], dim=1)
            if thermodynamics is None:
                return rdfs(frame)
            # One flat vector per frame, (T * n_bins + len(terms),): the RDFs, then pressure and/or energy.
            return torch.cat([rdfs(frame).reshape(-1).to(torch.float64), thermodynamics(frame)])

        def split(mean: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
            if per_replica:
                mean = mean.mean(0)
                return mean[:n_rdf].reshape(len(rows), self.n_bins), (mean[n_rdf:] if thermodynamics else None)
            if thermodynamics is None:
                return mean, None
            return mean[:n_rdf].reshape(len(rows), self.n_bins), mean[n_rdf:]

        def loss(mean: Tensor) -> Tensor:
            g_mean, thermo_mean = split(mean)
            value = _rdf_loss_terms(g_mean, targets_prepared) * scale
            for k, (_, weight, target) in enumerate(terms):
                value = value + weight * scale * (thermo_mean[k] - float(target)) ** 2
            return value

        base = {"n_eff": float(len(chosen)), "n_eff_fraction": 1.0, "needs_resample": False, "n_replicas": len(chosen)}
        try:
            result = rollout_gradient(
                forces,
                masses,
                integrator,
                positions,
                velocities,
                self.n_steps,
                self.record_every,
                observable,
                loss,
                parameters,
                method="adjoint" if self.adjoint else "backprop",
                checkpoint_every=self.checkpoint_every,
            )
            gradients = list(result.gradients)
            if self.score_correction:
                score = self._score_term(table, species_t, box_t, positions, result.observable, loss, parameters, state)
                pathwise_norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in gradients if g is not None))
                offset = 0
                for k, p in enumerate(parameters):
                    piece = score[offset : offset + p.numel()].reshape(p.shape)
                    offset += p.numel()
                    gradients[k] = piece if gradients[k] is None else gradients[k] + piece.to(gradients[k].dtype)
            grad_norm = _accumulate(parameters, gradients)
        except NonFiniteError as exc:
            if self.on_nonfinite == "raise":
                raise
            rejected = _rejected(f"{exc}", dict(base, n_eff=float("nan"), n_eff_fraction=float("nan")))
            rejected.r = self.r.copy()
            return rejected
        g_model, thermo_model = split(result.observable)
        diagnostics: Dict[str, Any] = dict(base)
        diagnostics.update(result.diagnostics)
        diagnostics.update(
            {"steps_run": int(result.diagnostics["steps_run"]), "grad_norm": grad_norm, "rejected": False, "reason": ""}
        )
        for k, (name, _, _) in enumerate(terms):
            diagnostics[name] = float(thermo_model[k])
        if self.score_correction:
            diagnostics["pathwise_grad_norm"] = pathwise_norm
            diagnostics["score_grad_norm"] = float(score.norm())
        return EstimatorResult(
            result.loss,
            _rmse(g_model, targets_prepared),
            diagnostics,
            self.r.copy(),
            {t.key: g_model[k].numpy().copy() for k, t in enumerate(targets_prepared)},
        )
