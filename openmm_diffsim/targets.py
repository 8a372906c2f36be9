"""Target RDFs: reading, validating, resampling and writing.

A :class:`Target` is one g(r) for one species pair at one state point. It is
read from text (two or three columns, whitespace or comma separated, ``#``
and ``@`` comment lines as in GROMACS ``.xvg``), CSV with a header, ``.npz``,
or computed from an mdtraj trajectory with the package's own RDF estimator.
:func:`write_rdf` writes the same formats, so RDFs recorded by the package
read back unchanged.

Lengths are in nm inside; ``length_unit="angstrom"`` converts on reading.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = [
    "Target",
    "MIN_TARGET_POINTS",
    "read_target",
    "read_targets_npz",
    "target_from_trajectory",
    "write_rdf",
    "counting_weights",
    "COUNTING_G_FLOOR",
    "relative_weights",
    "RELATIVE_G_FLOOR",
    "BIN_WEIGHTINGS",
]

#: Fewest points a target may have.
MIN_TARGET_POINTS = 5

_LENGTH_FACTORS = {"nm": 1.0, "nanometer": 1.0, "angstrom": 0.1, "a": 0.1, "å": 0.1, "ang": 0.1}
_R_NAMES = ("r", "r_nm", "r(nm)", "r [nm]", "r (nm)", "distance", "x")
_G_NAMES = ("g", "g_r", "g(r)", "rdf", "gr", "y")
_WEIGHT_NAMES = ("weight", "weights", "w")
_TEXT_SUFFIXES = (".xvg", ".dat", ".txt", ".rdf", "")

PairSpec = Union[str, Sequence[str]]


def _parse_pair(pair: PairSpec) -> Tuple[str, str]:
    if isinstance(pair, str):
        parts = pair.split("-")
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"pair name must look like 'A-B', got {pair!r}")
        return parts[0], parts[1]
    try:
        a, b = pair
    except (TypeError, ValueError) as exc:
        raise ValueError(f"pair must be two species names, e.g. ('A', 'B') or 'A-B', got {pair!r}") from exc
    return str(a), str(b)


@dataclass
class Target:
    """A target g(r) for one species pair at one state point.

    Parameters
    ----------
    r : array_like, shape (M,)
        Radii in nm, strictly increasing (bin centres for histograms).
    g : array_like, shape (M,)
        g(r), finite and non-negative.
    pair : (str, str) or "A-B"
        Species names of the pair.
    state : str, optional
        Name of the state point the target belongs to.
    weights : array_like, shape (M,), optional
        Non-negative per-point weights for the loss.

    Raises
    ------
    ValueError
        r not strictly increasing or not finite, NaN or negative g, fewer than
        :data:`MIN_TARGET_POINTS` points, mismatched shapes, bad weights.
    """

    r: np.ndarray
    g: np.ndarray
    pair: Tuple[str, str] = ("A", "A")
    state: Optional[str] = None
    weights: Optional[np.ndarray] = field(default=None)

    def __post_init__(self):
        self.r = _to_numpy(self.r, "r")
        self.g = _to_numpy(self.g, "g")
        self.pair = _parse_pair(self.pair)
        if self.state is not None:
            self.state = str(self.state)
        where = f"target {self.label}"
        if self.r.ndim != 1:
            raise ValueError(f"{where}: r must be 1-D, got shape {self.r.shape}")
        if self.g.shape != self.r.shape:
            raise ValueError(f"{where}: g has shape {self.g.shape} but r has shape {self.r.shape}")
        if self.r.size < MIN_TARGET_POINTS:
            raise ValueError(f"{where}: too few points ({self.r.size}); a target needs at least {MIN_TARGET_POINTS}")
        if not np.all(np.isfinite(self.r)):
            raise ValueError(f"{where}: r contains NaN or infinite values")
        if np.any(self.r < 0):
            raise ValueError(f"{where}: r must be non-negative, got minimum {self.r.min()}")
        steps = np.diff(self.r)
        if not np.all(steps > 0):
            bad = int(np.argmax(steps <= 0))
            raise ValueError(
                f"{where}: r must be strictly increasing, but r[{bad}] = {self.r[bad]} >= r[{bad + 1}] = "
                f"{self.r[bad + 1]}"
            )
        if np.any(np.isnan(self.g)):
            raise ValueError(f"{where}: g contains NaN at {int(np.isnan(self.g).sum())} point(s)")
        if not np.all(np.isfinite(self.g)):
            raise ValueError(f"{where}: g contains infinite values")
        if np.any(self.g < 0):
            bad = int(np.argmax(self.g < 0))
            raise ValueError(f"{where}: g must be non-negative, got g = {self.g[bad]} at r = {self.r[bad]} nm")
        if self.weights is not None:
            self.weights = _to_numpy(self.weights, "weights")
            if self.weights.shape != self.r.shape:
                raise ValueError(f"{where}: weights have shape {self.weights.shape} but r has shape {self.r.shape}")
            if not np.all(np.isfinite(self.weights)) or np.any(self.weights < 0):
                raise ValueError(f"{where}: weights must be finite and non-negative")
            if not np.any(self.weights > 0):
                raise ValueError(f"{where}: weights are all zero")

    @property
    def label(self) -> str:
        """``"A-B"`` or ``"A-B@state"``."""
        name = f"{self.pair[0]}-{self.pair[1]}"
        return name if self.state is None else f"{name}@{self.state}"

    @property
    def r_max(self) -> float:
        """Largest radius in nm."""
        return float(self.r[-1])

    def validate_for_box(self, box_lengths) -> None:
        """Check that the target's r range fits the state's box.

        Parameters
        ----------
        box_lengths : array_like, shape (3,) or (F, 3), or (3, 3) box vectors
            Box edge lengths in nm (several frames: the smallest is used).

        Raises
        ------
        ValueError
            If r extends beyond half the shortest box edge, where the
            minimum-image RDF is no longer the bulk g(r).
        """
        from .units import strip_unit

        lengths = np.asarray(strip_unit(box_lengths, "nanometer"), dtype=np.float64)
        if lengths.shape == (3, 3):
            lengths = np.diagonal(lengths)
        if lengths.size == 0 or not np.all(np.isfinite(lengths)) or np.any(lengths <= 0):
            raise ValueError(f"box lengths must be positive and finite, got {lengths}")
        half = 0.5 * float(lengths.min())
        if self.r_max > half * (1 + 1e-12):
            raise ValueError(
                f"target {self.label}: r reaches {self.r_max:.6g} nm, beyond half the shortest box edge "
                f"({half:.6g} nm){'' if self.state is None else f' of state {self.state!r}'}; "
                "use a larger box or truncate the target (Target.truncate)"
            )

    def validate_species(self, species: Sequence[str]) -> None:
        """Check that both species of the pair are known.

        Raises
        ------
        ValueError
            If a species name of the pair is not in ``species``.
        """
        known = [str(s) for s in species]
        missing = [name for name in self.pair if name not in known]
        if missing:
            raise ValueError(
                f"target {self.label}: species {sorted(set(missing))} not among the model's species {known}"
            )

    def resample(self, r_new, outside: str = "error") -> Target:
        """Linear interpolation of g (and weights) onto new radii.

        Parameters
        ----------
        r_new : array_like, shape (K,)
            New radii in nm, strictly increasing (e.g. the model's bin centres).
        outside : {"error", "zero", "edge", "one"}
            Radii outside the target's range: raise, use g = 0, hold the end
            values, or use g = 0 below / g = 1 above the range. Weights
            outside the range are set to 0 except with ``"error"``.

        Returns
        -------
        Target
        """
        r_new = _to_numpy(r_new, "r_new")
        if outside not in ("error", "zero", "edge", "one"):
            raise ValueError(f"outside must be 'error', 'zero', 'edge' or 'one', got {outside!r}")
        tolerance = 1e-9 * max(1.0, self.r_max)
        below = r_new < self.r[0] - tolerance
        above = r_new > self.r[-1] + tolerance
        if outside == "error" and (below.any() or above.any()):
            raise ValueError(
                f"target {self.label} covers {self.r[0]:.6g}..{self.r_max:.6g} nm but resampling asks for "
                f"{r_new.min():.6g}..{r_new.max():.6g} nm; pass outside='zero', 'edge' or 'one', or use "
                "observables.smear_target for histogram targets"
            )
        g = np.interp(r_new, self.r, self.g)
        if outside == "zero":
            g = np.where(below | above, 0.0, g)
        elif outside == "one":
            g = np.where(below, 0.0, np.where(above, 1.0, g))
        weights = None
        if self.weights is not None:
            weights = np.interp(r_new, self.r, self.weights)
            weights = np.where(below | above, 0.0, weights)
        return Target(r_new, g, self.pair, self.state, weights)

    def truncate(self, r_max: float) -> Target:
        """The part of the target with r <= r_max (nm)."""
        keep = self.r <= r_max
        weights = None if self.weights is None else self.weights[keep]
        return Target(self.r[keep], self.g[keep], self.pair, self.state, weights)

    def as_tensors(self, dtype=None, device=None):
        """``(r, g, weights)`` as torch tensors (float64 by default; weights may be None)."""
        import torch

        dtype = dtype or torch.float64
        weights = None if self.weights is None else torch.as_tensor(self.weights, dtype=dtype, device=device)
        return (
            torch.as_tensor(self.r, dtype=dtype, device=device),
            torch.as_tensor(self.g, dtype=dtype, device=device),
            weights,
        )


#: Per-bin weightings of the RDF loss for targets without weights of their own
#: (estimator option ``bin_weighting``): the plain mean squared error,
#: :func:`counting_weights` or :func:`relative_weights`.
BIN_WEIGHTINGS = ("uniform", "counting", "relative")

#: Default floor of g in :func:`relative_weights` (the potential-error region of
#: the experiments: below it a bin's relative error is mostly counting noise).
RELATIVE_G_FLOOR = 0.1

#: Default floor of g in :func:`counting_weights` (where the target is smaller, the
#: model's own counts set the noise, so the target's near-zero variance is not trusted).
COUNTING_G_FLOOR = 0.05


def counting_weights(target: Target, g_floor: float = COUNTING_G_FLOOR) -> Target:
    """The target with inverse-variance weights of pair counting: w(r) ∝ r² / max(g(r), g_floor).

    A histogram bin at r holds ~ρ g(r) 4πr² Δr pair counts per particle, and
    its variance is that of a count: var g(r) ∝ g(r) / r². The uniform mean
    squared error therefore weights the first peak (g ≈ 2.5, the noisiest
    bins in absolute terms) as much as the repulsive wall (g ≈ 0.01-0.2),
    whose bins are tens of times less noisy; a potential whose core is too
    soft by 1-5 kT then misses the wall bins by 5-60 standard errors while
    its uniform RDF error is within noise (docs/training.md). With these
    weights the loss is a χ² of the counting model, up to a constant factor.

    Parameters
    ----------
    target : Target
        The target; an existing ``weights`` array is replaced.
    g_floor : float
        Smallest g used in the variance (positive): below it the model's
        counts, not the target's, set the noise, and the weights stay finite
        in the core where g = 0.

    Returns
    -------
    Target
        A copy with ``weights`` of shape (M,), mean 1 over the points (zero
        at r = 0).

    Raises
    ------
    ValueError
        If ``g_floor`` is not a positive finite number.
    """
    g = np.maximum(target.g, _check_g_floor(g_floor))
    return _with_weights(target, target.r**2 / g)  # not all zero: r is strictly increasing and non-negative


def _check_g_floor(g_floor: float) -> float:
    g_floor = float(g_floor)
    if not np.isfinite(g_floor) or g_floor <= 0:
        raise ValueError(f"g_floor must be a positive number, got {g_floor}")
    return g_floor


def _with_weights(target: Target, weights: np.ndarray) -> Target:
    """A copy of ``target`` carrying ``weights`` normalised to mean 1."""
    return Target(target.r.copy(), target.g.copy(), target.pair, target.state, weights / weights.mean())


def relative_weights(target: Target, g_floor: float = RELATIVE_G_FLOOR) -> Target:
    """The target with weights w(r) ∝ 1 / max(g(r), g_floor)²: the loss on relative errors of g.

    With these weights each bin counts by its relative error Δg/g, which is
    Δ ln g, the change of the potential of mean force w(r) = -kT ln g(r) in
    units of kT. A potential wrong by Δu at the repulsive wall changes g there
    by about g Δu/kT: small in absolute terms where g is small, so the
    uniform loss (and the counting weights, ∝ r²/g) let the large, slow
    fluctuations of the first peak near a phase boundary outweigh it.
    Iterative Boltzmann inversion corrects every bin by its own ln(g/g_target);
    these weights give a Newton step the same scale. The cost: relative
    errors of the low-g bins are noisier than the counting model weights them.

    Parameters
    ----------
    target : Target
        The target; an existing ``weights`` array is replaced.
    g_floor : float
        Smallest g used (positive): the bins below it, the wall's foot and the
        excluded core, all weigh 1/g_floor², so the weights stay finite where
        g = 0 and the noisiest relative errors do not dominate.

    Returns
    -------
    Target
        A copy with ``weights`` of shape (M,), mean 1 over the points.

    Raises
    ------
    ValueError
        If ``g_floor`` is not a positive finite number.
    """
    return _with_weights(target, 1.0 / np.maximum(target.g, _check_g_floor(g_floor)) ** 2)


def _to_numpy(value, name: str) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    try:
        return np.array(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be numeric, got {type(value).__name__}") from exc


def _length_factor(length_unit: str) -> float:
    key = str(length_unit).strip().lower()
    if key not in _LENGTH_FACTORS:
        raise ValueError(f"length_unit must be 'nm' or 'angstrom', got {length_unit!r}")
    return _LENGTH_FACTORS[key]


# -- reading ---------------------------------------------------------------------------


def _read_text_table(path: str) -> Tuple[np.ndarray, Dict[str, str], List[str]]:
    """Numeric rows of a text file, ``key: value`` header metadata and column names if declared."""
    rows: List[List[float]] = []
    meta: Dict[str, str] = {}
    with open(path, encoding="utf-8") as handle:
        for number, raw in enumerate(handle, start=1):
            line = raw.strip()
            if not line:
                continue
            if line[0] in "#@":
                body = line[1:].strip()
                if ":" in body and line[0] == "#":
                    key, _, value = body.partition(":")
                    meta[key.strip().lower()] = value.strip()
                continue
            fields = [f for f in line.replace(",", " ").split() if f]
            try:
                rows.append([float(f) for f in fields])
            except ValueError as exc:
                raise ValueError(
                    f"{path}, line {number}: cannot read numbers from {line!r} "
                    "(comment lines must start with '#' or '@'; use a .csv suffix for files with a header)"
                ) from exc
    if not rows:
        raise ValueError(f"{path}: no data rows")
    widths = {len(row) for row in rows}
    if len(widths) != 1:
        raise ValueError(f"{path}: rows have different numbers of columns {sorted(widths)}")
    names = meta.get("columns", "").split()
    return np.array(rows, dtype=np.float64), meta, names


def _read_csv_table(path: str) -> Tuple[np.ndarray, Dict[str, str], List[str]]:
    meta: Dict[str, str] = {}
    with open(path, encoding="utf-8", newline="") as handle:
        lines = []
        for raw in handle:
            stripped = raw.strip()
            if stripped.startswith("#") or stripped.startswith("@"):
                body = stripped[1:].strip()
                if ":" in body:
                    key, _, value = body.partition(":")
                    meta[key.strip().lower()] = value.strip()
                continue
            if stripped:
                lines.append(raw)
    reader = csv.reader(lines)
    try:
        header = [name.strip() for name in next(reader)]
    except StopIteration:
        raise ValueError(f"{path}: empty CSV file") from None
    rows = []
    for number, row in enumerate(reader, start=2):
        try:
            rows.append([float(x) for x in row])
        except ValueError as exc:
            raise ValueError(f"{path}: non-numeric value in data row {number}: {row}") from exc
    if not rows:
        raise ValueError(f"{path}: no data rows after the header")
    if {len(row) for row in rows} != {len(header)}:
        raise ValueError(f"{path}: data rows do not all have {len(header)} columns like the header {header}")
    return np.array(rows, dtype=np.float64), meta, header


def _find_column(names: List[str], candidates: Sequence[str]) -> Optional[int]:
    lowered = [n.strip().lower() for n in names]
    for candidate in candidates:
        if candidate in lowered:
            return lowered.index(candidate)
    return None


def _choose_columns(
    data: np.ndarray, names: List[str], columns, pair: Optional[Tuple[str, str]], path: str
) -> Tuple[int, int, Optional[int]]:
    n_columns = data.shape[1]
    if columns is not None:
        columns = list(columns)
        if len(columns) not in (2, 3):
            raise ValueError(f"columns must name 2 or 3 columns (r, g[, weights]), got {columns!r}")
        indices = []
        for column in columns:
            if isinstance(column, str):
                if column not in names:
                    raise ValueError(f"{path}: no column named {column!r}; columns are {names}")
                indices.append(names.index(column))
            else:
                index = int(column)
                if not -n_columns <= index < n_columns:
                    raise ValueError(f"{path}: column {index} out of range; the file has {n_columns} columns")
                indices.append(index % n_columns)
        return indices[0], indices[1], indices[2] if len(indices) == 3 else None
    if names and len(names) == n_columns:
        r_col = _find_column(names, _R_NAMES)
        g_col = None
        if pair is not None:
            g_col = _find_column(names, (f"{pair[0]}-{pair[1]}".lower(), f"{pair[1]}-{pair[0]}".lower()))
        if g_col is None:
            g_col = _find_column(names, _G_NAMES)
        w_col = _find_column(names, _WEIGHT_NAMES)
        if r_col is not None and g_col is not None:
            return r_col, g_col, w_col
        if n_columns > 3:
            raise ValueError(
                f"{path}: cannot tell which columns hold r and g among {names}; pass columns=(r, g) "
                "or the pair matching a column name"
            )
    if n_columns == 2:
        return 0, 1, None
    if n_columns == 3:
        return 0, 1, 2
    raise ValueError(
        f"{path}: {n_columns} columns; expected r, g and optionally weights. Pass columns=(r_index, g_index)"
    )


def read_target(
    path: Union[str, os.PathLike],
    pair: Optional[PairSpec] = None,
    columns: Optional[Sequence[Union[int, str]]] = None,
    length_unit: str = "nm",
    state: Optional[str] = None,
) -> Target:
    """Read one target RDF from a file.

    Formats by suffix:

    * ``.npz``: arrays ``r``, ``g`` (1-D, or 2-D with a ``pairs`` array of
      ``"A-B"`` names; ``pair`` picks the row), optional ``weights``,
      ``pair``/``pairs``, ``state`` (as written by :func:`write_rdf`).
    * ``.csv``: a header row naming the columns (``r``, ``g``, ``weights``, or
      a pair name like ``A-B``), comma separated.
    * anything else (``.xvg``, ``.dat``, ``.txt``): whitespace- or
      comma-separated numbers, lines starting with ``#`` or ``@`` skipped.
      Two columns are r, g; a third column is per-point weights.

    Parameters
    ----------
    path : str or path
        File to read.
    pair : (str, str) or "A-B", optional
        Species pair of the target. Default: the pair stored in the file,
        else ``("A", "A")``. Also selects the column or row of files that hold
        several pairs.
    columns : sequence of 2 or 3 ints or names, optional
        Columns holding r, g and optionally weights.
    length_unit : {"nm", "angstrom"}
        Unit of r in the file; converted to nm.
    state : str, optional
        State-point name. Default: the state stored in the file, if any.

    Returns
    -------
    Target
    """
    path = os.fspath(path)
    factor = _length_factor(length_unit)
    wanted = None if pair is None else _parse_pair(pair)
    suffix = os.path.splitext(path)[1].lower()
    if not os.path.exists(path):
        raise FileNotFoundError(f"target file not found: {path}")
    if suffix == ".npz":
        targets = read_targets_npz(path, length_unit=length_unit, state=state)
        if wanted is None:
            if len(targets) > 1:
                raise ValueError(
                    f"{path} holds {len(targets)} pairs {[t.label for t in targets]}; choose one with pair="
                )
            return targets[0]
        for target in targets:
            if target.pair in (wanted, wanted[::-1]):
                return Target(target.r, target.g, wanted, target.state, target.weights)
        if len(targets) == 1 and not _npz_has_pair(path):
            return Target(targets[0].r, targets[0].g, wanted, targets[0].state, targets[0].weights)
        raise ValueError(f"{path}: no target for pair {wanted}; it holds {[t.label for t in targets]}")
    if suffix == ".csv":
        data, meta, names = _read_csv_table(path)
    else:
        data, meta, names = _read_text_table(path)
    stored_pair = _parse_pair(meta["pair"]) if "pair" in meta else None
    r_col, g_col, w_col = _choose_columns(data, names, columns, wanted or stored_pair, path)
    weights = data[:, w_col] if w_col is not None else None
    return Target(
        data[:, r_col] * factor,
        data[:, g_col],
        pair=wanted or stored_pair or ("A", "A"),
        state=state if state is not None else meta.get("state"),
        weights=weights,
    )


def _npz_has_pair(path: str) -> bool:
    with np.load(path, allow_pickle=False) as data:
        return "pair" in data.files or "pairs" in data.files


def read_targets_npz(
    path: Union[str, os.PathLike], length_unit: str = "nm", state: Optional[str] = None
) -> List[Target]:
    """Read every target stored in an ``.npz`` file.

    Keys: ``r`` (M,), ``g`` (M,) or (T, M), optional ``weights`` (same shape
    as g), ``pair`` (``"A-B"``) or ``pairs`` (T names), ``state``.

    Returns
    -------
    list of Target
    """
    path = os.fspath(path)
    factor = _length_factor(length_unit)
    with np.load(path, allow_pickle=False) as data:
        missing = [key for key in ("r", "g") if key not in data.files]
        if missing:
            raise ValueError(f"{path}: missing array(s) {missing}; found {data.files}")
        r = np.asarray(data["r"], dtype=np.float64) * factor
        g = np.asarray(data["g"], dtype=np.float64)
        weights = np.asarray(data["weights"], dtype=np.float64) if "weights" in data.files else None
        stored_state = str(data["state"]) if "state" in data.files and str(data["state"]) else None
        if "pairs" in data.files:
            pairs = [str(p) for p in np.atleast_1d(data["pairs"])]
        elif "pair" in data.files:
            pairs = [str(data["pair"])]
        else:
            pairs = ["A-A"]
    state = state if state is not None else stored_state
    g2 = np.atleast_2d(g)
    if g2.ndim != 2 or g2.shape[0] != len(pairs):
        raise ValueError(f"{path}: g has shape {g.shape} but {len(pairs)} pair name(s) {pairs}")
    w2 = None if weights is None else np.broadcast_to(weights, g2.shape)
    return [Target(r, g2[k], _parse_pair(pairs[k]), state, None if w2 is None else w2[k]) for k in range(len(pairs))]


def target_from_trajectory(
    traj_or_path,
    top=None,
    pair: PairSpec = ("A", "A"),
    r_range=(0.0, 1.0),
    n_bins: int = 100,
    *,
    selections: Optional[Tuple[str, str]] = None,
    smearing: float = 0.0,
    state: Optional[str] = None,
    stride: int = 1,
    chunk_frames: int = 100,
) -> Target:
    """Reference RDF of a trajectory, with the same estimator as the model.

    Parameters
    ----------
    traj_or_path : mdtraj.Trajectory or path
        Trajectory (or a file mdtraj can load, with ``top``).
    top : str or mdtraj.Topology, optional
        Topology for loading from a path.
    pair : (str, str) or "A-B"
        Species names; particles of species X are selected with
        ``"name X"`` unless ``selections`` is given.
    r_range : (float, float)
        Radius range in nm.
    n_bins : int
        Number of bins.
    selections : (str, str), optional
        mdtraj selection strings for the two species.
    smearing : float
        Gaussian sigma in nm (0: plain histogram, mdtraj's estimator).
    state : str, optional
        State-point name for the target.
    stride : int
        Use every ``stride``-th frame.
    chunk_frames : int
        Frames per RDF call (bounds memory); counts are pooled exactly.

    Returns
    -------
    Target
        Bin centres and g(r), averaged over frames as ``mdtraj.compute_rdf``.
    """
    import mdtraj
    import torch

    from .observables import compute_rdf

    names = _parse_pair(pair)
    traj = traj_or_path
    if not isinstance(traj, mdtraj.Trajectory):
        traj = mdtraj.load(os.fspath(traj_or_path), top=top, stride=stride)
    elif stride != 1:
        traj = traj[::stride]
    if traj.unitcell_lengths is None:
        raise ValueError("the trajectory has no periodic box; an RDF target needs one")
    if not np.allclose(traj.unitcell_angles, 90.0):
        raise ValueError("only rectangular boxes are supported (unit cell angles must be 90 degrees)")
    selections = selections or (f"name {names[0]}", f"name {names[1]}")
    first = traj.topology.select(selections[0])
    second = traj.topology.select(selections[1])
    for selection, atoms in zip(selections, (first, second), strict=True):
        if atoms.size == 0:
            raise ValueError(f"selection {selection!r} matches no atoms")
    same = np.array_equal(first, second)
    if same:
        atoms, species, select = first, np.zeros(first.size, dtype=np.int64), None
    else:
        if np.intersect1d(first, second).size:
            raise ValueError(f"selections {selections} overlap without being equal; make them disjoint or identical")
        atoms = np.concatenate([first, second])
        species = np.concatenate([np.zeros(first.size, dtype=np.int64), np.ones(second.size, dtype=np.int64)])
        select = (0, 1)

    # Pool counts exactly across chunks: g_chunk * sum(1/V_chunk) is proportional to the counts.
    inverse_volumes = 1.0 / np.prod(traj.unitcell_lengths.astype(np.float64), axis=1)
    pooled = None
    for begin in range(0, traj.n_frames, max(1, int(chunk_frames))):
        end = min(begin + int(chunk_frames), traj.n_frames)
        positions = torch.from_numpy(traj.xyz[begin:end][:, atoms].astype(np.float64))
        lengths = torch.from_numpy(traj.unitcell_lengths[begin:end].astype(np.float64))
        with torch.no_grad():
            r, g = compute_rdf(
                positions,
                lengths,
                r_range,
                n_bins,
                smearing,
                species=torch.from_numpy(species) if select else None,
                pair=select,
            )
        part = g.numpy() * inverse_volumes[begin:end].sum()
        pooled = part if pooled is None else pooled + part
    return Target(r.numpy(), pooled / inverse_volumes.sum(), names, state)


# -- writing ---------------------------------------------------------------------------


def write_rdf(
    path: Union[str, os.PathLike],
    r,
    g,
    pair: Optional[Union[PairSpec, Sequence[PairSpec]]] = None,
    state: Optional[str] = None,
    weights=None,
    comment: Optional[str] = None,
) -> None:
    """Write one or several RDFs on a common r grid.

    Parameters
    ----------
    path : str or path
        ``.npz`` for NumPy archives; anything else (``.xvg``, ``.dat``) is
        text with ``#`` header lines (``.xvg`` also gets GROMACS ``@`` axis
        labels). ``.csv`` gets a comma-separated header row.
    r : array or Tensor, shape (M,)
        Radii in nm.
    g : array or Tensor, shape (M,) or (T, M)
        g(r); several rows need ``pair`` as a list of T pairs.
    pair : pair or list of pairs, optional
        Species pair(s), e.g. ``("A", "B")`` or ``"A-B"``.
    state : str, optional
        State-point name stored in the file.
    weights : array, shape (M,), optional
        Per-point weights (single RDF only in text files).
    comment : str, optional
        Free text for the header.

    Notes
    -----
    Files read back with :func:`read_target` / :func:`read_targets_npz`.
    """
    path = os.fspath(path)
    r = _to_numpy(r, "r").reshape(-1)
    g = _to_numpy(g, "g")
    single = g.ndim == 1
    g2 = np.atleast_2d(g)
    if g2.ndim != 2 or g2.shape[1] != r.size:
        raise ValueError(f"g must have shape ({r.size},) or (T, {r.size}), got {g.shape}")
    if pair is None:
        pairs = [("A", "A")] if single else None
        if pairs is None:
            raise ValueError("several RDFs need pair=[(a, b), ...], one per row of g")
    elif single:
        pairs = [_parse_pair(pair)]
    else:
        pairs = [_parse_pair(p) for p in pair]
    if len(pairs) != g2.shape[0]:
        raise ValueError(f"{len(pairs)} pair name(s) for {g2.shape[0]} RDF(s)")
    names = [f"{a}-{b}" for a, b in pairs]
    if weights is not None:
        weights = _to_numpy(weights, "weights")
        if weights.shape not in (r.shape, g2.shape) and not (single and weights.shape == g.shape):
            raise ValueError(f"weights must have shape {r.shape} or {g2.shape}, got {weights.shape}")
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".npz":
        arrays = {"r": r, "g": g if single else g2, "state": np.array(state or "")}
        if single:
            arrays["pair"] = np.array(names[0])
        else:
            arrays["pairs"] = np.array(names)
        if weights is not None:
            arrays["weights"] = weights
        np.savez(path, **arrays)
        return
    if weights is not None and not (single and weights.shape == r.shape):
        raise ValueError("text files hold weights for a single RDF only; use .npz for several")
    columns = ["r"] + (["g"] if single else names) + (["weights"] if weights is not None else [])
    table = np.column_stack([r] + list(g2) + ([weights] if weights is not None else []))
    if suffix == ".csv":
        with open(path, "w", encoding="utf-8", newline="") as handle:
            handle.write("# openmm-diffsim RDF, r in nm\n")
            if single:
                handle.write(f"# pair: {names[0]}\n")
            if state:
                handle.write(f"# state: {state}\n")
            writer = csv.writer(handle)
            writer.writerow(columns)
            for row in table:
                writer.writerow([repr(float(x)) for x in row])
        return
    lines = ["# openmm-diffsim RDF, r in nm"]
    if comment:
        lines += [f"# {line}" for line in str(comment).splitlines()]
    if single:
        lines.append(f"# pair: {names[0]}")
    if state:
        lines.append(f"# state: {state}")
    lines.append("# columns: " + " ".join(columns))
    if suffix == ".xvg":
        lines += ['@    title "Radial distribution"', '@    xaxis  label "r (nm)"', '@    yaxis  label "g(r)"']
        lines += [f'@ s{k} legend "{name}"' for k, name in enumerate(columns[1:])]
    body = "\n".join(" ".join(f"{x:.17g}" for x in row) for row in table)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n" + body + "\n")
