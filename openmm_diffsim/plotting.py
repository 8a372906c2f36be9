"""Figures for training runs: RDFs against targets, u(r), loss curves, time to accuracy.

matplotlib is imported lazily with the non-interactive Agg backend, so these
functions work on headless machines and inside training loops. Every function
writes one PNG and returns its path.

Units: r in nm, u in kJ/mol (optionally also in units of k_B T).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = ["plot_rdfs", "plot_potentials", "plot_loss", "plot_time_to_accuracy"]

PathLike = Union[str, os.PathLike]


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:  # pragma: no cover - matplotlib is a dependency
        raise ImportError("plotting needs matplotlib: pip install matplotlib") from exc
    # Agg: no display needed; switching is harmless when nothing is drawn yet.
    if matplotlib.get_backend().lower() != "agg":
        matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _array(value: Any, name: str) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    out = np.asarray(value, dtype=np.float64)
    if out.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {out.shape}")
    return out


def _grid(n_panels: int) -> Tuple[int, int]:
    columns = min(n_panels, 3)
    return math.ceil(n_panels / columns), columns


def _save(fig, path: PathLike) -> Path:
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _pair_label(key: Any) -> str:
    if isinstance(key, (tuple, list)) and len(key) == 2:
        return f"{key[0]}-{key[1]}"
    return str(key)


def plot_rdfs(
    path: PathLike,
    r,
    model: Mapping[Any, Any],
    target: Optional[Mapping[Any, Tuple[Any, Any]]] = None,
    title: Optional[str] = None,
) -> Path:
    """Model RDFs against targets, one panel per species pair.

    Parameters
    ----------
    path : str or path
        Output PNG.
    r : array_like, shape (M,)
        Radii of the model RDFs in nm.
    model : dict
        ``{pair: g}``, pair as ``"A-B"`` or ``("A", "B")``, g of shape (M,).
    target : dict, optional
        ``{pair: (r_target, g_target)}``; pairs also in ``model`` share its
        panel, other pairs get a panel of their own.
    title : str, optional
        Figure title (e.g. the state point and epoch).

    Returns
    -------
    Path
        The PNG written.
    """
    r = _array(r, "r")
    target = dict(target or {})
    model_curves = {_pair_label(k): _array(v, f"model[{k!r}]") for k, v in model.items()}
    for label, g in model_curves.items():
        if g.shape != r.shape:
            raise ValueError(f"model RDF {label} has shape {g.shape} but r has shape {r.shape}")
    target_curves = {}
    for key, value in target.items():
        target_curves[_pair_label(key)] = _curve(value, f"target {_pair_label(key)}", ("r", "g"))
    labels = list(model_curves) + [k for k in target_curves if k not in model_curves]
    if not labels:
        raise ValueError("nothing to plot: model and target are both empty")
    plt = _pyplot()
    rows, columns = _grid(len(labels))
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows), squeeze=False)
    for ax, label in zip(axes.flat, labels, strict=False):
        if label in target_curves:
            rt, gt = target_curves[label]
            ax.plot(rt, gt, color="black", lw=1.5, label="target")
        if label in model_curves:
            ax.plot(r, model_curves[label], color="tab:red", lw=1.2, ls="--", label="model")
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set_title(label)
        ax.set_xlabel("r (nm)")
        ax.set_ylabel("g(r)")
        ax.legend(frameon=False)
    for ax in list(axes.flat)[len(labels) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_potentials(
    path: PathLike,
    table,
    r_min: float = 0.2,
    r_max: Optional[float] = None,
    reference: Optional[Mapping[Any, Any]] = None,
    kT: Optional[float] = None,
    r_ref=None,
    n_points: int = 400,
    title: Optional[str] = None,
) -> Path:
    """The pair potentials u(r) of a table, one panel per pair type.

    Parameters
    ----------
    path : str or path
        Output PNG.
    table : PairTable
        The model; u(r) is evaluated with its cutoff convention.
    r_min, r_max : float
        Plot range in nm (``r_max`` defaults to the cutoff).
    reference : dict, optional
        ``{pair: u}`` true potentials in kJ/mol on ``r_ref``, drawn for comparison.
        Values may also be a ``PairPotential`` (evaluated on the plot grid).
    kT : float, optional
        k_B T in kJ/mol: adds a right-hand axis in units of k_B T.
    r_ref : array_like, shape (M,), optional
        Grid of ``reference`` arrays in nm.
    n_points : int
        Points on the plot grid.
    title : str, optional
        Figure title.

    Returns
    -------
    Path
        The PNG written.

    Notes
    -----
    The y range is clipped to [min u - 1, max(5 kT, 4 ``|min u|``)] (or a few
    kJ/mol without ``kT``) so the repulsive wall does not hide the well.
    """
    r_max = float(table.cutoff) if r_max is None else float(r_max)
    if not 0 < r_min < r_max:
        raise ValueError(f"need 0 < r_min < r_max, got r_min={r_min}, r_max={r_max}")
    if kT is not None and not kT > 0:
        raise ValueError(f"kT must be positive (kJ/mol), got {kT}")
    grid = np.linspace(r_min, r_max, int(n_points))
    reference = dict(reference or {})
    ref_curves: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}
    for key, value in reference.items():
        label = _pair_label(key)
        if hasattr(value, "energy_and_derivative"):
            import torch

            with torch.no_grad():
                u = value(torch.as_tensor(grid)).numpy()
            ref_curves[label] = (grid, u)
        else:
            if r_ref is None:
                raise ValueError(f"reference[{key!r}] is an array: pass its grid as r_ref")
            rr, u = _array(r_ref, "r_ref"), _array(value, f"reference[{key!r}]")
            if rr.shape != u.shape:
                raise ValueError(f"reference {label} has shape {u.shape} but r_ref has shape {rr.shape}")
            ref_curves[label] = (rr, u)
    names = list(table.pair_names)
    for label in ref_curves:
        if label not in names and "-".join(reversed(label.split("-"))) not in names:
            raise ValueError(f"reference pair {label!r} is not a pair type of the table ({', '.join(names)})")
    plt = _pyplot()
    rows, columns = _grid(len(names))
    fig, axes = plt.subplots(rows, columns, figsize=(4.4 * columns, 3.4 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        u, _ = table.evaluate(grid, name)
        curves = [u]
        ref = ref_curves.get(name) or ref_curves.get("-".join(reversed(name.split("-"))))
        if ref is not None:
            ax.plot(ref[0], ref[1], color="black", lw=1.5, label="reference")
            curves.append(ref[1][(ref[0] >= r_min) & (ref[0] <= r_max)])
        ax.plot(grid, u, color="tab:blue", lw=1.2, ls="--" if ref is not None else "-", label="model")
        finite = np.concatenate([c[np.isfinite(c)] for c in curves])
        low = float(finite.min()) if finite.size else -1.0
        scale = 5.0 * kT if kT is not None else 5.0
        high = max(scale, 4.0 * abs(low), 1.0)
        ax.set_ylim(low - 0.1 * (high - low) - 0.1, high)
        ax.axhline(0.0, color="grey", lw=0.5)
        ax.set_title(name)
        ax.set_xlabel("r (nm)")
        ax.set_ylabel("u(r) (kJ/mol)")
        if kT is not None:
            twin = ax.secondary_yaxis("right", functions=(lambda x, kT=kT: x / kT, lambda x, kT=kT: x * kT))
            twin.set_ylabel("u(r) / kT")
        ax.legend(frameon=False)
    for ax in list(axes.flat)[len(names) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_loss(path: PathLike, history: Sequence[Mapping[str, Any]], title: Optional[str] = None) -> Path:
    """Loss per epoch (log scale) and, where recorded, the RDF RMSE per state.

    Parameters
    ----------
    path : str or path
        Output PNG.
    history : list of dict
        Per-epoch records as returned by ``Trainer.fit()``: ``epoch`` and
        ``loss`` are required; ``rdf_rmse`` (``{state: rmse}`` or
        ``{state: {pair: rmse}}``) is drawn in a second panel when present.
    title : str, optional
        Figure title.

    Returns
    -------
    Path
        The PNG written.
    """
    history = list(history)
    if not history:
        raise ValueError("history is empty: nothing to plot")
    for k, record in enumerate(history):
        for key in ("epoch", "loss"):
            if key not in record:
                raise ValueError(f"history[{k}] has no {key!r} entry")
    epochs = np.array([float(h["epoch"]) for h in history])
    losses = np.array([float(h["loss"]) for h in history])
    rmse: Dict[str, list] = {}
    for h in history:
        for state, value in (h.get("rdf_rmse") or {}).items():
            # Either {state: rmse} or {state: {pair: rmse}} (one curve per target).
            per_target = value.items() if isinstance(value, Mapping) else [(None, value)]
            for pair, v in per_target:
                label = str(state) if pair is None else f"{state}: {pair}"
                rmse.setdefault(label, []).append((float(h["epoch"]), float(v)))
    plt = _pyplot()
    n_panels = 2 if rmse else 1
    fig, axes = plt.subplots(1, n_panels, figsize=(5.0 * n_panels, 3.6), squeeze=False)
    ax = axes[0, 0]
    positive = losses > 0
    ax.plot(epochs[positive], losses[positive], marker="o", ms=3, color="tab:blue")
    if positive.any():
        ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title("training loss")
    if rmse:
        ax = axes[0, 1]
        for state, points in rmse.items():
            x, y = np.array(points).T
            ax.plot(x, y, marker="o", ms=3, label=state)
        if all(v > 0 for points in rmse.values() for _, v in points):
            ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel("RDF RMSE")
        ax.set_title("RDF error per state")
        ax.legend(frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_time_to_accuracy(
    path: PathLike,
    curves: Mapping[str, Tuple[Any, Any]],
    xlabel: str = "wall time (s)",
    ylabel: str = "RDF RMSE",
    log_x: bool = False,
    threshold: Optional[float] = None,
    title: Optional[str] = None,
    spread: Optional[Mapping[str, Tuple[Any, Any, Any]]] = None,
) -> Path:
    """Error against cost (wall time, MD steps, ...) for several methods on one axis.

    Parameters
    ----------
    path : str or path
        Output PNG.
    curves : dict
        ``{method: (x, y)}``, x the cost and y the error (log scale when all positive).
    xlabel, ylabel : str
        Axis labels.
    log_x : bool
        Logarithmic cost axis.
    threshold : float, optional
        Draws the accuracy target as a horizontal line.
    title : str, optional
        Figure title.
    spread : dict, optional
        ``{method: (x, low, high)}``: a shaded band in the method's colour, e.g.
        the lowest and highest error over several seeds around their mean curve.

    Returns
    -------
    Path
        The PNG written.
    """
    if not curves:
        raise ValueError("curves is empty: nothing to plot")
    parsed = {}
    for method, value in curves.items():
        parsed[str(method)] = _curve(value, f"curves[{method!r}]", ("x", "y"))
    bands = {}
    for method, value in (spread or {}).items():
        if str(method) not in parsed:
            raise ValueError(f"spread[{method!r}] has no curve: methods are {sorted(parsed)}")
        try:
            x, low, high = value
        except (TypeError, ValueError) as exc:
            raise ValueError(f"spread[{method!r}] must be a triple (x, low, high)") from exc
        x, low = _curve((x, low), f"spread[{method!r}]", ("x", "low"))
        _, high = _curve((x, high), f"spread[{method!r}]", ("x", "high"))
        if np.any(low > high):
            raise ValueError(f"spread[{method!r}]: low exceeds high at some points")
        bands[str(method)] = (x, low, high)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.0))
    for method, (x, y) in parsed.items():
        (line,) = ax.plot(x, y, marker="o", ms=3, label=method)
        if method in bands:
            bx, low, high = bands[method]
            ax.fill_between(bx, low, high, color=line.get_color(), alpha=0.2, lw=0)
    if all(np.all(y > 0) for _, y in parsed.values()):
        ax.set_yscale("log")
    if log_x:
        ax.set_xscale("log")
    if threshold is not None:
        ax.axhline(float(threshold), color="grey", ls=":", lw=1.0, label="target accuracy")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(frameon=False)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def _curve(value, where: str, names=("x", "y")):
    """A pair of equal-shape 1-D arrays from ``value``; errors name ``where``."""
    try:
        x, y = value
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where} must be a pair ({names[0]}, {names[1]})") from exc
    x, y = _array(x, f"{where} {names[0]}"), _array(y, f"{where} {names[1]}")
    if x.shape != y.shape:
        raise ValueError(f"{where}: {names[0]} has shape {x.shape} but {names[1]} has shape {y.shape}")
    return x, y
