"""Tests for the figures (openmm_diffsim.plotting): each writes a non-empty PNG of the expected size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib import image as mpimg

from openmm_diffsim.plotting import plot_loss, plot_potentials, plot_rdfs, plot_time_to_accuracy
from openmm_diffsim.potentials import WCA, LennardJones, PairTable, Yukawa


def _check_png(path, width: int, height: int):
    assert path.is_file() and path.stat().st_size > 2000
    pixels = mpimg.imread(path)
    assert pixels.shape[:2] == (height, width)
    assert pixels.shape[2] in (3, 4)
    # Something was drawn: the image is not a single colour.
    assert float(pixels[..., :3].std()) > 0.01
    return pixels


def _rdf(r, peak):
    return 1.0 + np.exp(-((r - peak) ** 2) / 0.002) * (r > 0.25)


def test_plot_rdfs_one_panel_per_pair(tmp_path):
    r = np.linspace(0.0, 1.0, 100)
    model = {"A-A": _rdf(r, 0.38), ("A", "B"): torch.as_tensor(_rdf(r, 0.4)), "B-B": _rdf(r, 0.42)}
    target = {"A-A": (r, _rdf(r, 0.37)), "A-B": (r[::2], _rdf(r[::2], 0.41))}
    path = plot_rdfs(tmp_path / "sub" / "rdf.png", r, model, target, title="epoch 3")
    # Three panels in one row of 4.2 x 3.4 inches at 100 dpi.
    _check_png(path, 1260, 340)
    two = plot_rdfs(tmp_path / "two.png", r, {"A-A": _rdf(r, 0.38)}, {"C-C": (r, _rdf(r, 0.5))})
    _check_png(two, 840, 340)


def test_plot_rdfs_rejects_mismatched_shapes(tmp_path):
    r = np.linspace(0.0, 1.0, 100)
    with pytest.raises(ValueError, match="model RDF A-A has shape"):
        plot_rdfs(tmp_path / "x.png", r, {"A-A": r[:50]})
    with pytest.raises(ValueError, match="target A-A: r has shape"):
        plot_rdfs(tmp_path / "x.png", r, {}, {"A-A": (r, r[:10])})
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_rdfs(tmp_path / "x.png", r, {}, {})


def test_plot_potentials_with_reference_and_kT(tmp_path):
    table = PairTable(
        ["A", "B"],
        {
            ("A", "A"): LennardJones(0.34, 0.996),
            ("A", "B"): WCA(0.34, 0.996),
            ("B", "B"): Yukawa(2.0, 3.0),
        },
        cutoff=1.0,
        cutoff_mode="shift",
    )
    r_ref = np.linspace(0.3, 1.0, 50)
    u_ref = 4 * 0.996 * ((0.34 / r_ref) ** 12 - (0.34 / r_ref) ** 6)
    path = plot_potentials(
        tmp_path / "u.png",
        table,
        r_min=0.3,
        reference={"A-A": u_ref, "B-A": WCA(0.34, 0.996)},
        kT=1.0,
        r_ref=r_ref,
        title="potentials",
    )
    _check_png(path, 1320, 340)
    with pytest.raises(ValueError, match="pass its grid as r_ref"):
        plot_potentials(tmp_path / "u.png", table, reference={"A-A": u_ref})
    with pytest.raises(ValueError, match="not a pair type of the table"):
        plot_potentials(tmp_path / "u.png", table, reference={"C-C": u_ref}, r_ref=r_ref)
    with pytest.raises(ValueError, match="need 0 < r_min < r_max"):
        plot_potentials(tmp_path / "u.png", table, r_min=1.2)


def test_plot_loss_draws_rmse_panel_when_recorded(tmp_path):
    history = [
        {"epoch": k, "loss": 1.0 / (k + 1), "rdf_rmse": {"liquid": 0.3 / (k + 1), "gas": 0.1 / (k + 1)}}
        for k in range(6)
    ]
    _check_png(plot_loss(tmp_path / "loss.png", history), 1000, 360)
    # The Trainer's form: RMSE per state and target pair.
    nested = [{"epoch": k, "loss": 1.0 / (k + 1), "rdf_rmse": {"liquid": {"A-A": 0.1, "A-B": 0.2}}} for k in range(3)]
    _check_png(plot_loss(tmp_path / "nested.png", nested), 1000, 360)
    only_loss = [{"epoch": k, "loss": 2.0**-k} for k in range(4)]
    _check_png(plot_loss(tmp_path / "loss1.png", only_loss), 500, 360)
    with pytest.raises(ValueError, match="history is empty"):
        plot_loss(tmp_path / "x.png", [])
    with pytest.raises(ValueError, match=r"history\[1\] has no 'loss' entry"):
        plot_loss(tmp_path / "x.png", [{"epoch": 0, "loss": 1.0}, {"epoch": 1}])


def test_plot_time_to_accuracy(tmp_path):
    curves = {
        "reweighting": (np.array([1.0, 2.0, 4.0, 8.0]), np.array([0.3, 0.1, 0.05, 0.02])),
        "rollout": ([1.5, 3.0, 6.0], [0.3, 0.2, 0.08]),
    }
    path = plot_time_to_accuracy(tmp_path / "tta.png", curves, xlabel="MD steps", log_x=True, threshold=0.05)
    _check_png(path, 550, 400)
    with pytest.raises(ValueError, match=r"curves\['bad'\]: x has shape"):
        plot_time_to_accuracy(tmp_path / "x.png", {"bad": ([1, 2], [1])}, xlabel="s")


def test_plot_time_to_accuracy_spread_bands(tmp_path):
    x = np.array([1.0, 2.0, 4.0])
    y = np.array([0.3, 0.1, 0.05])
    plain = plot_time_to_accuracy(tmp_path / "plain.png", {"ibi": (x, y)})
    banded = plot_time_to_accuracy(tmp_path / "band.png", {"ibi": (x, y)}, spread={"ibi": (x, 0.5 * y, 2.0 * y)})
    _check_png(banded, 550, 400)
    # The band is drawn: the two images differ.
    assert np.abs(mpimg.imread(plain) - mpimg.imread(banded)).max() > 0.1
    with pytest.raises(ValueError, match="spread\\['imc'\\] has no curve"):
        plot_time_to_accuracy(tmp_path / "x.png", {"ibi": (x, y)}, spread={"imc": (x, y, y)})
    with pytest.raises(ValueError, match="low exceeds high"):
        plot_time_to_accuracy(tmp_path / "x.png", {"ibi": (x, y)}, spread={"ibi": (x, 2 * y, y)})
    with pytest.raises(ValueError, match="must be a triple"):
        plot_time_to_accuracy(tmp_path / "x.png", {"ibi": (x, y)}, spread={"ibi": (x, y)})
