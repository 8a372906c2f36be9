"""Pair potentials: closed-form derivatives, limits, splines, the neural correction, PairTable."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from openmm_diffsim import (
    WCA,
    CubicSpline,
    LennardJones,
    ModifiedMorse,
    NeuralCorrection,
    PairTable,
    PotentialSum,
    SoftSphere,
    Yukawa,
    potential_energy,
    tabulate,
)
from openmm_diffsim.energy import PairEnergy


def all_potentials():
    knots = np.linspace(0.25, 1.2, 20)
    return {
        "lj": LennardJones(0.34, 1.0),
        "wca": WCA(0.34, 1.0),
        "soft_sphere": SoftSphere(0.32, 1.5, 9.0),
        "yukawa": Yukawa(2.0, 3.0),
        "morse_soft": ModifiedMorse(a=5.5, phi=0.44, sigma=0.4, epsilon=1.2),
        "morse_hard": ModifiedMorse(a=4.0, phi=-1.5, sigma=0.4, epsilon=0.8),
        "morse_log": ModifiedMorse(a=5.0, phi=0.0, sigma=0.4, epsilon=1.0),
        "spline": CubicSpline(knots, np.exp(-3 * knots) * np.cos(7 * knots)),
        "neural": NeuralCorrection(cutoff=1.1, n_basis=12, hidden=(16, 16), seed=3),
        "sum": PotentialSum([SoftSphere(0.3, 1.0, 12.0), NeuralCorrection(cutoff=1.1, n_basis=8, hidden=(8,), seed=1)]),
    }


# Avoid WCA's kink at 2^(1/6) sigma and the spline's end knots in finite differences.
R_GRID = torch.linspace(0.28, 1.05, 157, dtype=torch.float64)


@pytest.mark.parametrize("name", sorted(all_potentials()))
def test_derivative_matches_autograd_and_finite_differences(name):
    pot = all_potentials()[name]
    r = R_GRID.clone()
    if name == "wca":
        r = r[(r - 0.34 * 2 ** (1 / 6)).abs() > 1e-3]
    r.requires_grad_(True)
    u, du = pot.energy_and_derivative(r)
    (du_auto,) = torch.autograd.grad(u.sum(), r)
    scale = float(du.detach().abs().max())
    assert scale > 0
    torch.testing.assert_close(du, du_auto, rtol=1e-10, atol=1e-10 * scale)
    h = 1e-6
    with torch.no_grad():
        du_fd = (pot(r + h) - pot(r - h)) / (2 * h)
    torch.testing.assert_close(du.detach(), du_fd, rtol=1e-6, atol=1e-6 * scale)
    torch.testing.assert_close(pot(r), u)  # forward == energy_and_derivative[0]


@pytest.mark.parametrize("name", sorted(all_potentials()))
def test_table_derivative_with_every_cutoff_mode(name):
    pot = all_potentials()[name]
    for mode in ("truncate", "shift", "switch"):
        table = PairTable(["X"], pot, cutoff=1.0, cutoff_mode=mode, switch_distance=0.8 if mode == "switch" else None)
        r = R_GRID[(R_GRID < 0.995) & ((R_GRID - 0.34 * 2 ** (1 / 6)).abs() > 1e-3)].clone().requires_grad_(True)
        u, du = table.energy_and_derivative(r, torch.zeros_like(r, dtype=torch.long))
        (du_auto,) = torch.autograd.grad(u.sum(), r)
        torch.testing.assert_close(du, du_auto, rtol=1e-9, atol=1e-9 * float(du.detach().abs().max()))


def test_lennard_jones_closed_form():
    pot = LennardJones(0.34, 1.0)
    r_min = 0.34 * 2 ** (1 / 6)
    u, du = (t.detach() for t in pot.energy_and_derivative(torch.tensor([0.34, r_min], dtype=torch.float64)))
    assert abs(float(u[0])) < 1e-12
    assert float(u[1]) == pytest.approx(-1.0, rel=1e-12)
    assert abs(float(du[1])) < 1e-10


def test_wca_is_shifted_lennard_jones_inside_and_zero_outside():
    r = torch.linspace(0.3, 0.8, 101, dtype=torch.float64)
    rc = 0.34 * 2 ** (1 / 6)
    u = WCA(0.34, 1.0)(r)
    lj = LennardJones(0.34, 1.0)(r) + 1.0
    inside = r < rc
    torch.testing.assert_close(u[inside], lj[inside])
    assert torch.all(u[~inside] == 0)
    assert torch.all(u >= -1e-12)


@pytest.mark.parametrize("phi", [0.44, 1e-12, -1.5])
def test_modified_morse_minimum_at_sigma(phi):
    sigma, epsilon = 0.4, 1.3
    pot = ModifiedMorse(a=5.0, phi=phi, sigma=sigma, epsilon=epsilon)
    r = torch.linspace(0.3, 0.7, 4001, dtype=torch.float64)
    u, du = pot.energy_and_derivative(r)
    k = int(torch.argmin(u))
    assert float(r[k]) == pytest.approx(sigma, abs=2e-4)
    u_s, du_s = pot.energy_and_derivative(torch.tensor([sigma], dtype=torch.float64))
    assert float(u_s.detach()) == pytest.approx(-epsilon, rel=1e-12)
    assert abs(float(du_s.detach())) < 1e-10


def test_modified_morse_phi_negative_decays_to_zero():
    pot = ModifiedMorse(a=4.0, phi=-1.5, sigma=0.4, epsilon=0.8)
    r = torch.tensor([5.0, 50.0, 500.0], dtype=torch.float64)
    u = pot(r).detach()
    assert abs(float(u[-1])) < 1e-4 * 0.8
    assert torch.all(u.abs().diff() < 0)  # monotone approach to 0
    # u - 0 ~ x^phi at large x: the tail decays as a power law r^phi.
    assert float(u[2] / u[1]) == pytest.approx(10.0**-1.5, rel=0.02)
    # Without the offset A the phi<0 form would tend to a nonzero constant.
    phi, a = -1.5, 4.0
    t_inf = a / phi
    raw_limit = math.exp(2 * t_inf) - 2 * math.exp(t_inf)
    assert abs(raw_limit) > 1e-3


def test_modified_morse_phi_to_zero_is_continuous():
    r = torch.linspace(0.3, 1.0, 50, dtype=torch.float64)
    u0 = ModifiedMorse(a=5.0, phi=0.0, sigma=0.4)(r)
    u_small = ModifiedMorse(a=5.0, phi=1e-6, sigma=0.4)(r)
    torch.testing.assert_close(u0, u_small, rtol=1e-4, atol=1e-5)


def test_potentials_accept_openmm_quantities():
    from openmm import unit

    pot = LennardJones(3.4 * unit.angstrom, 1.0 * unit.kilojoule_per_mole)
    assert float(pot.sigma.detach()) == pytest.approx(0.34)
    table = PairTable(["X"], pot, cutoff=9.0 * unit.angstrom)
    assert table.cutoff == pytest.approx(0.9)


# -- cubic spline ---------------------------------------------------------------------


def smooth(r):
    return np.exp(-2.0 * r) * np.sin(5.0 * r)


def test_spline_passes_through_knots_and_converges_at_fourth_order():
    errors = []
    r_fine = np.linspace(0.4, 1.4, 2001)  # away from the natural end conditions
    for n_knots in (41, 81):
        knots = np.linspace(0.2, 1.6, n_knots)
        spline = CubicSpline(knots, smooth(knots), trainable=False)
        u_knots, _ = spline.energy_and_derivative(torch.tensor(knots))
        np.testing.assert_allclose(u_knots.numpy(), smooth(knots), rtol=0, atol=1e-14)
        with torch.no_grad():
            u = spline(torch.tensor(r_fine)).numpy()
        errors.append(np.abs(u - smooth(r_fine)).max())
    assert errors[0] < 1e-5
    assert 10.0 < errors[0] / errors[1] < 24.0  # h^4: halving h divides the error by ~16


def test_spline_derivative_and_linear_continuation():
    knots = np.linspace(0.2, 1.6, 30)
    spline = CubicSpline(knots, smooth(knots))
    r = torch.linspace(0.05, 1.8, 400, dtype=torch.float64)
    u, du = spline.energy_and_derivative(r)
    h = 1e-6
    with torch.no_grad():
        fd = (spline(r + h) - spline(r - h)) / (2 * h)
    torch.testing.assert_close(du.detach(), fd, rtol=1e-6, atol=1e-6)
    below = r < 0.2
    u0, du0 = spline.energy_and_derivative(torch.tensor([0.2], dtype=torch.float64))
    torch.testing.assert_close(u[below].detach(), (u0 + du0 * (r[below] - 0.2)).detach())
    assert torch.all(du[below].detach() == du0.detach())


def test_spline_gradient_wrt_knot_values():
    knots = np.linspace(0.2, 1.6, 12)
    spline = CubicSpline(knots, smooth(knots))
    r = torch.tensor([0.23, 0.5, 0.77, 1.01, 1.4, 1.7, 0.1], dtype=torch.float64)

    def energy_and_slope(values):
        spline.values.data.copy_(values)
        u, du = spline.energy_and_derivative(r)
        return (u * torch.arange(1, 8) + du).sum()

    values = spline.values.detach().clone()
    out = energy_and_slope(values)
    (grad,) = torch.autograd.grad(out, spline.values)
    h = 1e-6
    fd = torch.zeros_like(values)
    with torch.no_grad():
        for k in range(values.numel()):
            plus, minus = values.clone(), values.clone()
            plus[k] += h
            minus[k] -= h
            fd[k] = (energy_and_slope(plus) - energy_and_slope(minus)) / (2 * h)
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-7)


def test_spline_rejects_bad_knots():
    with pytest.raises(ValueError, match="increasing"):
        CubicSpline([0.1, 0.3, 0.2, 0.4], [0, 0, 0, 0])
    with pytest.raises(ValueError, match="at least 4"):
        CubicSpline([0.1, 0.2, 0.3], [0, 0, 0])
    with pytest.raises(ValueError, match="finite"):
        CubicSpline([0.1, 0.2, 0.3, 0.4], [0, np.nan, 0, 0])
    with pytest.raises(ValueError, match="equal length"):
        CubicSpline([0.1, 0.2, 0.3, 0.4], [0, 0, 0])


# -- neural correction -----------------------------------------------------------------


def test_neural_correction_vanishes_at_cutoff_and_has_weight_gradients():
    net = NeuralCorrection(cutoff=1.0, n_basis=16, hidden=(32, 32), seed=0)
    with torch.no_grad():  # make the output O(1) so the checks are meaningful
        net.layers[-1].weight.mul_(100.0)
    r = torch.tensor([0.999999, 1.0, 1.2], dtype=torch.float64)
    u, du = (x.detach() for x in net.energy_and_derivative(r))
    assert abs(float(u[0])) < 1e-12 and abs(float(du[0])) < 1e-6
    assert float(u[1]) == 0.0 and float(du[1]) == 0.0 and float(u[2]) == 0.0
    r_in = torch.linspace(0.2, 0.9, 50, dtype=torch.float64)
    u_in, du_in = net.energy_and_derivative(r_in)
    assert float(u_in.detach().abs().max()) > 1e-2
    loss = (u_in**2).sum() + (du_in**2).sum()
    grads = torch.autograd.grad(loss, list(net.parameters()))
    assert len(grads) == 2 * len(net.layers)
    for g in grads:
        assert torch.isfinite(g).all() and float(g.abs().max()) > 0


def test_neural_correction_is_seeded():
    r = torch.linspace(0.2, 0.9, 10, dtype=torch.float64)
    a = NeuralCorrection(cutoff=1.0, n_basis=8, hidden=(8,), seed=7)(r)
    b = NeuralCorrection(cutoff=1.0, n_basis=8, hidden=(8,), seed=7)(r)
    c = NeuralCorrection(cutoff=1.0, n_basis=8, hidden=(8,), seed=8)(r)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_tabulated_table_reproduces_neural_potential():
    prior = SoftSphere(0.3, 1.0, 12.0)
    net = NeuralCorrection(cutoff=1.0, n_basis=16, hidden=(32, 32), seed=0)
    with torch.no_grad():  # correction of ~1 kJ/mol, comparable to the prior's tail
        net.layers[-1].weight.mul_(2000.0)
    table = PairTable(["X"], PotentialSum([prior, net]), cutoff=1.0, cutoff_mode="shift")
    fast = table.tabulated(r_min=0.2, n_points=2000)
    r = np.linspace(0.25, 0.999, 3000)
    u, du = table.evaluate(r)
    u_tab, du_tab = fast.evaluate(r)
    energy_error = np.abs(u_tab - u).max()
    force_error = np.abs(du_tab - du).max()
    # Measured: 5e-9 kJ/mol and 4e-5 kJ/mol/nm (1e-7 of the largest du/dr) with
    # 2000 knots on [0.2, 1.0] nm (h = 4e-4 nm); u spans 0..10 kJ/mol here.
    assert np.abs(u).max() > 1.0
    assert energy_error < 1e-7, energy_error
    assert force_error < 1e-6 * np.abs(du).max(), force_error
    assert isinstance(fast.pair_potentials[0], CubicSpline)
    assert fast.cutoff_mode == "shift" and fast.cutoff == 1.0


def test_tabulate_rejects_bad_range():
    with pytest.raises(ValueError, match="r_min"):
        tabulate(LennardJones(), 0.5, 0.2)
    with pytest.raises(ValueError, match="not finite"):
        tabulate(Yukawa(1.0, 1.0), 1e-320, 1.0, 10)


# -- PairTable --------------------------------------------------------------------------


def test_cutoff_modes_continuity():
    pot = LennardJones(0.34, 1.0).requires_grad_(False)  # values only
    rc = 0.9
    below = torch.tensor([rc - 1e-9], dtype=torch.float64)
    types = torch.zeros(1, dtype=torch.long)
    raw_u, raw_du = pot.energy_and_derivative(below)
    truncate = PairTable(["X"], pot, cutoff=rc, cutoff_mode="truncate")
    u, du = truncate.energy_and_derivative(below, types)
    torch.testing.assert_close(u, raw_u)  # truncate: jump at r_c
    shift = PairTable(["X"], pot, cutoff=rc, cutoff_mode="shift")
    u, du = shift.energy_and_derivative(below, types)
    assert abs(float(u)) < 1e-9 and float(du) == pytest.approx(float(raw_du), rel=1e-6)
    switch = PairTable(["X"], pot, cutoff=rc, cutoff_mode="switch", switch_distance=0.7)
    u, du = switch.energy_and_derivative(below, types)
    assert abs(float(u)) < 1e-12 and abs(float(du)) < 1e-9
    inner = torch.tensor([0.5, 0.69], dtype=torch.float64)
    torch.testing.assert_close(switch(inner, torch.zeros(2, dtype=torch.long)), pot(inner))
    beyond = torch.tensor([rc, rc + 0.1], dtype=torch.float64)
    for table in (truncate, shift, switch):
        u, du = table.energy_and_derivative(beyond, torch.zeros(2, dtype=torch.long))
        assert torch.all(u == 0) and torch.all(du == 0)


def test_pair_table_dispatches_by_pair_type():
    pots = {("A", "A"): LennardJones(0.3, 1.0), ("A", "B"): Yukawa(2.0, 3.0), ("B", "B"): WCA(0.35, 0.5)}
    table = PairTable(["A", "B"], pots, cutoff=1.0, cutoff_mode="truncate")
    assert table.n_pair_types == 3 and table.pair_keys() == [("A", "A"), ("A", "B"), ("B", "B")]
    r = torch.tensor([0.35, 0.36, 0.37, 0.38, 0.39, 0.4], dtype=torch.float64)
    pair_type = torch.tensor([2, 0, 1, 1, 0, 2])
    u = table(r, pair_type)
    expected = torch.stack([pots[table.pair_keys()[int(k)]](r[n : n + 1])[0] for n, k in enumerate(pair_type)])
    torch.testing.assert_close(u, expected)
    si, sj = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1])
    assert table.pair_types(si, sj).tolist() == [0, 1, 1, 2]


def test_pair_table_bad_input():
    lj = LennardJones()
    with pytest.raises(ValueError, match="unknown species 'C'"):
        PairTable(["A", "B"], {("A", "A"): lj, ("A", "C"): WCA(), ("B", "B"): WCA()})
    with pytest.raises(ValueError, match="no potential given for pair type"):
        PairTable(["A", "B"], {("A", "A"): lj, ("B", "B"): WCA()})
    with pytest.raises(ValueError, match="given twice"):
        PairTable(["A", "B"], {("A", "A"): lj, ("A", "B"): WCA(), ("B", "A"): WCA(), ("B", "B"): WCA()})
    with pytest.raises(ValueError, match="mapping"):
        PairTable(["A", "B"], lj)
    with pytest.raises(ValueError, match="unique"):
        PairTable(["A", "A"], lj)
    with pytest.raises(ValueError, match="cutoff_mode"):
        PairTable(["A"], lj, cutoff_mode="smooth")
    with pytest.raises(ValueError, match="switch_distance"):
        PairTable(["A"], lj, cutoff=1.0, cutoff_mode="switch")
    with pytest.raises(ValueError, match="switch_distance"):
        PairTable(["A"], lj, cutoff=1.0, cutoff_mode="switch", switch_distance=1.2)
    with pytest.raises(ValueError, match="cutoff"):
        PairTable(["A"], lj, cutoff=-1.0)
    with pytest.raises(TypeError, match="PairPotential"):
        PairTable(["A"], {("A", "A"): "lj"})
    table = PairTable(["A", "B"], {("A", "A"): lj, ("A", "B"): WCA(), ("B", "B"): WCA()})
    with pytest.raises(ValueError, match="unknown species 'Z'"):
        table.pair_index(("A", "Z"))
    with pytest.raises(ValueError, match="out of range"):
        table.pair_index(5)
    with pytest.raises(ValueError, match="A-B"):
        table.pair_index("AB")


@pytest.mark.parametrize(
    "make",
    [
        lambda: LennardJones(float("nan"), 1.0),
        lambda: LennardJones(0.34, float("inf")),
        lambda: SoftSphere(0.3, 1.0, float("nan")),
        lambda: Yukawa(float("inf"), 1.0),
        lambda: ModifiedMorse(a=float("nan")),
        lambda: PairTable(["X"], LennardJones(), cutoff=float("nan")),
    ],
)
def test_non_finite_parameters_raise(make):
    with pytest.raises(ValueError, match="finite"):
        make()


# -- energy of a configuration ------------------------------------------------------------


def brute_force_energy(table, positions, lengths):
    n = len(positions)
    d = positions[:, None, :] - positions[None, :, :]
    d -= lengths * np.round(d / lengths)
    r = np.sqrt((d**2).sum(-1))[np.triu_indices(n, 1)]
    u, _ = table.evaluate(np.where(r < table.cutoff, r, table.cutoff))
    return u[r < table.cutoff].sum()


def test_potential_energy_matches_brute_force_and_is_periodic():
    rng = np.random.default_rng(4)
    lengths = np.array([2.2, 2.4, 2.6])
    grid = np.stack(np.meshgrid(*[np.arange(5)] * 3, indexing="ij"), -1).reshape(-1, 3)
    positions = (grid + 0.5) * lengths / 5 + rng.normal(0, 0.03, grid.shape)
    table = PairTable(["X"], LennardJones(0.34, 1.0), cutoff=1.0, cutoff_mode="switch", switch_distance=0.8)
    table.requires_grad_(False)  # energies only
    species = torch.zeros(len(positions), dtype=torch.long)
    box = torch.diag(torch.tensor(lengths))
    e = float(potential_energy(table, torch.tensor(positions), box, species))
    assert e == pytest.approx(brute_force_energy(table, positions, lengths), rel=1e-10)
    moved = positions + rng.integers(-2, 3, positions.shape) * lengths
    moved[7] = positions[7] + np.array([10.0, -10.0, 30.0]) * lengths  # far outside the box
    assert float(potential_energy(table, torch.tensor(moved), box, species)) == pytest.approx(e, rel=1e-10)


def test_pair_energy_module_rejects_bad_species_and_box():
    table = PairTable(["X"], LennardJones(), cutoff=0.9)
    with pytest.raises(ValueError, match="species indices"):
        PairEnergy(table, [0, 1, 0])
    with pytest.raises(ValueError, match="at least one"):
        PairEnergy(table, [])
    module = PairEnergy(table, [0] * 8)
    x = torch.rand(8, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="triclinic"):
        module(x, torch.tensor([[3.0, 0, 0], [1.0, 3.0, 0], [0, 0, 3.0]], dtype=torch.float64))
    with pytest.raises(ValueError, match="half the shortest box edge"):
        module(x, torch.diag(torch.tensor([3.0, 3.0, 1.5], dtype=torch.float64)))
    with pytest.raises(ValueError, match="periodic box"):
        module(x, None)


def test_combined_openmm_expressions_keep_shared_definitions_once():
    from openmm_diffsim.potentials import combine_expressions, split_expression

    knots = np.linspace(0.3, 0.9, 7)
    a = CubicSpline(knots, np.linspace(1.0, 0.0, 7))
    b = CubicSpline(knots, np.linspace(0.0, 2.0, 7))
    main, definitions = split_expression(PotentialSum([a, b, LennardJones(0.3, 1.0)]).openmm_expression())
    assert len(definitions) == 7  # the knots' intermediates, once
    assert main.count("select(") == 2 * 7
    with pytest.raises(ValueError, match="two different OpenMM definitions of 'x'"):
        combine_expressions(["x+1; x=r", "x; x=2*r"], "({0})+({1})")
