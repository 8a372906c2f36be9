"""Pair potentials u(r) as TorchScript-able ``torch.nn.Module`` objects.

Every potential maps pair distances ``r`` (nm) to energies (kJ/mol) and also
returns the radial derivative ``du/dr`` in closed form, so forces never need a
second autograd pass and stay differentiable with respect to the parameters.

* analytic: :class:`LennardJones`, :class:`WCA`, :class:`SoftSphere`,
  :class:`Yukawa`, :class:`ModifiedMorse`;
* tabulated: :class:`CubicSpline` through trainable knot values;
* neural: :class:`NeuralCorrection` (network on a smooth radial basis with a
  smooth cutoff), usually summed with a repulsive prior via :class:`PotentialSum`;
* :class:`PairTable` dispatches per species pair and applies the cutoff
  convention (truncate, shift or switch). It is the object the rest of the
  package trains, samples and exports.

All parameters are ``float64`` ``nn.Parameter`` objects; evaluation follows
the dtype of ``r`` (float32 or float64).
"""

from __future__ import annotations

import hashlib
import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from .units import to_float

__all__ = [
    "PairPotential",
    "LennardJones",
    "WCA",
    "SoftSphere",
    "Yukawa",
    "ModifiedMorse",
    "CubicSpline",
    "NeuralCorrection",
    "PotentialSum",
    "PairTable",
    "CUTOFF_MODES",
    "tabulate",
]

CUTOFF_MODES = ("truncate", "shift", "switch")


def _parameter(value: float) -> nn.Parameter:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"potential parameter must be finite, got {value}")
    return nn.Parameter(torch.tensor(value, dtype=torch.float64))


def _value(tensor: Tensor) -> float:
    """A parameter's current value as a Python float (no autograd warning)."""
    return float(tensor.detach())


def _as_float(value, name: str) -> float:
    """A finite float in OpenMM units from a number or ``openmm.unit`` quantity."""
    return to_float(value, name)


class PairPotential(nn.Module):
    """Base class: a radial pair potential u(r) for one pair type.

    Subclasses implement :meth:`energy_and_derivative`. ``forward(r)`` returns
    u(r) in kJ/mol for distances ``r`` in nm (any shape).
    """

    def energy_and_derivative(self, r: Tensor) -> Tuple[Tensor, Tensor]:
        raise NotImplementedError

    def forward(self, r: Tensor) -> Tensor:
        return self.energy_and_derivative(r)[0]

    def openmm_expression(self) -> str:
        """An OpenMM custom-force expression in ``r`` for this potential, if one exists."""
        raise NotImplementedError(f"{type(self).__name__} has no closed-form OpenMM expression")


class LennardJones(PairPotential):
    """u(r) = 4 ε [(σ/r)^12 - (σ/r)^6].

    Parameters
    ----------
    sigma : float or Quantity
        Length scale σ in nm.
    epsilon : float or Quantity
        Well depth ε in kJ/mol.
    """

    def __init__(self, sigma=0.34, epsilon=0.996):
        super().__init__()
        self.sigma = _parameter(_as_float(sigma, "sigma"))
        self.epsilon = _parameter(_as_float(epsilon, "epsilon"))

    def energy_and_derivative(self, r: Tensor) -> Tuple[Tensor, Tensor]:
        s2 = (self.sigma / r) ** 2
        s6 = s2 * s2 * s2
        s12 = s6 * s6
        u = 4.0 * self.epsilon * (s12 - s6)
        du = 4.0 * self.epsilon * (6.0 * s6 - 12.0 * s12) / r
        return u, du

    def openmm_expression(self) -> str:
        return f"4*{_value(self.epsilon)!r}*(({_value(self.sigma)!r}/r)^12-({_value(self.sigma)!r}/r)^6)"


class WCA(PairPotential):
    """Weeks–Chandler–Andersen: LJ shifted up by ε and cut at 2^(1/6) σ.

    Parameters
    ----------
    sigma : float or Quantity
        Length scale σ in nm.
    epsilon : float or Quantity
        Energy scale ε in kJ/mol.
    """

    def __init__(self, sigma=0.34, epsilon=0.996):
        super().__init__()
        self.sigma = _parameter(_as_float(sigma, "sigma"))
        self.epsilon = _parameter(_as_float(epsilon, "epsilon"))

    def energy_and_derivative(self, r: Tensor) -> Tuple[Tensor, Tensor]:
        s2 = (self.sigma / r) ** 2
        s6 = s2 * s2 * s2
        s12 = s6 * s6
        inside = r < self.sigma * 2.0 ** (1.0 / 6.0)
        u = torch.where(inside, 4.0 * self.epsilon * (s12 - s6) + self.epsilon, torch.zeros_like(r))
        du = torch.where(inside, 4.0 * self.epsilon * (6.0 * s6 - 12.0 * s12) / r, torch.zeros_like(r))
        return u, du

    def openmm_expression(self) -> str:
        s, e = _value(self.sigma), _value(self.epsilon)
        return f"step({s * 2.0 ** (1.0 / 6.0)!r}-r)*(4*{e!r}*(({s!r}/r)^12-({s!r}/r)^6)+{e!r})"


class SoftSphere(PairPotential):
    """u(r) = ε (σ/r)^n.

    Parameters
    ----------
    sigma : float or Quantity
        Length scale σ in nm.
    epsilon : float or Quantity
        Energy scale ε in kJ/mol.
    exponent : float
        The power n (dimensionless, trainable).
    """

    def __init__(self, sigma=0.34, epsilon=0.996, exponent: float = 12.0):
        super().__init__()
        self.sigma = _parameter(_as_float(sigma, "sigma"))
        self.epsilon = _parameter(_as_float(epsilon, "epsilon"))
        self.exponent = _parameter(exponent)

    def energy_and_derivative(self, r: Tensor) -> Tuple[Tensor, Tensor]:
        u = self.epsilon * torch.pow(self.sigma / r, self.exponent)
        return u, -self.exponent * u / r

    def openmm_expression(self) -> str:
        return f"{_value(self.epsilon)!r}*({_value(self.sigma)!r}/r)^{_value(self.exponent)!r}"


class Yukawa(PairPotential):
    """Screened Coulomb: u(r) = A exp(-κ r) / r.

    Parameters
    ----------
    amplitude : float
        A in kJ/mol·nm.
    kappa : float
        Inverse screening length κ in 1/nm.
    """

    def __init__(self, amplitude: float = 1.0, kappa: float = 1.0):
        super().__init__()
        self.amplitude = _parameter(_as_float(amplitude, "amplitude"))
        self.kappa = _parameter(_as_float(kappa, "kappa"))

    def energy_and_derivative(self, r: Tensor) -> Tuple[Tensor, Tensor]:
        u = self.amplitude * torch.exp(-self.kappa * r) / r
        return u, -u * (self.kappa + 1.0 / r)

    def openmm_expression(self) -> str:
        return f"{_value(self.amplitude)!r}*exp(-{_value(self.kappa)!r}*r)/r"


class ModifiedMorse(PairPotential):
    """The seed paper's modified Morse family (Wang et al., JCP 158, 044113).

    With x = r/σ and t = a (1 - x^φ)/φ::

        u(r) = ε [exp(2t) - 2 exp(t) - A] / (1 + A)

    where A = 0 for φ ≥ 0 and A = exp(2a/φ) - 2 exp(a/φ) for φ < 0, so that the
    minimum is -ε at r = σ and, for φ < 0, u → 0 at large r. As φ → 0 the
    family tends to t = -a ln x.

    Parameters
    ----------
    a : float
        Stiffness (dimensionless).
    phi : float
        Shape exponent φ (dimensionless); φ > 0 soft, φ < 0 hard.
    sigma : float or Quantity
        Position of the minimum in nm.
    epsilon : float or Quantity
        Well depth in kJ/mol.
    """

    def __init__(self, a: float = 5.5, phi: float = 0.44, sigma=1.0, epsilon=1.0):
        super().__init__()
        self.a = _parameter(a)
        self.phi = _parameter(phi)
        self.sigma = _parameter(_as_float(sigma, "sigma"))
        self.epsilon = _parameter(_as_float(epsilon, "epsilon"))

    def _offset(self) -> Tensor:
        phi = self.phi
        safe_phi = torch.where(phi < 0, phi, -torch.ones_like(phi))
        negative = torch.exp(2.0 * self.a / safe_phi) - 2.0 * torch.exp(self.a / safe_phi)
        return torch.where(phi < 0, negative, torch.zeros_like(phi))

    def energy_and_derivative(self, r: Tensor) -> Tuple[Tensor, Tensor]:
        x = r / self.sigma
        phi = self.phi
        small = torch.abs(phi) < 1e-8
        safe_phi = torch.where(small, torch.ones_like(phi), phi)
        y = torch.pow(x, safe_phi)
        t = torch.where(small, -self.a * torch.log(x), self.a * (1.0 - y) / safe_phi)
        dt_dx = torch.where(small, -self.a / x, -self.a * y / x)
        offset = self._offset()
        e1 = torch.exp(t)
        scale = self.epsilon / (1.0 + offset)
        u = scale * (e1 * e1 - 2.0 * e1 - offset)
        du = scale * (2.0 * e1 * e1 - 2.0 * e1) * dt_dx / self.sigma
        return u, du

    def openmm_expression(self) -> str:
        a, phi, s, e = _value(self.a), _value(self.phi), _value(self.sigma), _value(self.epsilon)
        offset = _value(self._offset())
        t = f"(-{a!r}*log(r/{s!r}))" if abs(phi) < 1e-8 else f"({a!r}*(1-(r/{s!r})^{phi!r})/{phi!r})"
        return f"{e!r}*(exp(2*{t})-2*exp({t})-{offset!r})/(1+{offset!r})"


class CubicSpline(PairPotential):
    """Natural cubic spline through trainable knot values.

    Knot second derivatives are a fixed linear map of the knot values
    (precomputed), so evaluation is cheap and differentiable with respect to
    the values. Outside the knot range the spline continues linearly with its
    end slopes, which keeps energies and forces finite and continuous.

    Parameters
    ----------
    knots : array_like, shape (K,)
        Strictly increasing knot positions in nm, K ≥ 4.
    values : array_like, shape (K,)
        u at the knots in kJ/mol (trainable).
    trainable : bool
        Whether ``values`` is an ``nn.Parameter``.
    """

    def __init__(self, knots, values, trainable: bool = True):
        super().__init__()
        knots_np = np.asarray(knots, dtype=np.float64)
        values_np = np.asarray(values, dtype=np.float64)
        if knots_np.ndim != 1 or knots_np.shape != values_np.shape:
            raise ValueError(
                "knots and values must be 1-D arrays of equal length, "
                f"got shapes {knots_np.shape} and {values_np.shape}"
            )
        if knots_np.size < 4:
            raise ValueError(f"a cubic spline needs at least 4 knots, got {knots_np.size}")
        if not np.all(np.isfinite(knots_np)) or not np.all(np.isfinite(values_np)):
            raise ValueError("spline knots and values must be finite")
        if not np.all(np.diff(knots_np) > 0):
            raise ValueError("spline knots must be strictly increasing")
        self.register_buffer("knots", torch.from_numpy(knots_np))
        values_t = torch.from_numpy(values_np.copy())
        if trainable:
            self.values = nn.Parameter(values_t)
        else:
            self.register_buffer("values", values_t)
        self.register_buffer("second_derivative_map", torch.from_numpy(_natural_spline_matrix(knots_np)))
        self.trainable = bool(trainable)
        # A frozen spline (e.g. a tabulated network with thousands of knots)
        # keeps its second derivatives instead of a K x K product per call.
        self.register_buffer("frozen_second_derivatives", torch.mv(self.second_derivative_map, values_t))
        # Frozen splines on uniform knots (the production form of any potential,
        # see `tabulate`) evaluate from per-interval cubic coefficients: one
        # gather of a (K-1, 4) table instead of four.
        self.register_buffer(
            "frozen_coefficients", self._interval_coefficients(values_t, self.frozen_second_derivatives)
        )
        spacing = np.diff(knots_np)
        self.uniform = bool(np.allclose(spacing, spacing[0], rtol=1e-10, atol=0.0))
        self.first_knot = float(knots_np[0])
        self.last_knot = float(knots_np[-1])
        self.spacing = float(spacing[0])
        self.fast_path = self.uniform and not self.trainable

    @torch.jit.unused
    def _interval_coefficients(self, y: Tensor, m: Tensor) -> Tensor:
        # u(t) = c0 + c1 t + c2 t^2 + c3 t^3 on each interval, t = (r - r_k)/h.
        h = self.knots[1:] - self.knots[:-1]
        h2 = h * h / 6.0
        c0 = y[:-1]
        c1 = (y[1:] - y[:-1]) - h2 * (2.0 * m[:-1] + m[1:])
        c2 = 3.0 * h2 * m[:-1]
        c3 = h2 * (m[1:] - m[:-1])
        return torch.stack([c0, c1, c2, c3], dim=1).contiguous()

    def energy_and_derivative(self, r: Tensor) -> Tuple[Tensor, Tensor]:
        if self.fast_path:
            return self._frozen_uniform(r)
        knots = self.knots.to(r.dtype)
        y = self.values.to(r.dtype)
        if self.trainable:
            m = torch.mv(self.second_derivative_map.to(r.dtype), y)
        else:
            m = self.frozen_second_derivatives.to(r.dtype)
        n_intervals = knots.shape[0] - 1
        rc = torch.clamp(r, self.first_knot, self.last_knot)
        if self.uniform:
            # Uniform knots: interval and offset straight from r, no search or gathers.
            x = (rc - self.first_knot) * (1.0 / self.spacing)
            k = torch.clamp(torch.floor(x).long(), 0, n_intervals - 1)
            b = x - k.to(r.dtype)
            h = torch.full_like(r, self.spacing)
        else:
            k = torch.searchsorted(knots, rc.contiguous(), right=True) - 1
            k = torch.clamp(k, 0, n_intervals - 1)
            r0 = knots[k]
            h = knots[k + 1] - r0
            b = (rc - r0) / h
        a = 1.0 - b
        y0 = y[k]
        y1 = y[k + 1]
        m0 = m[k]
        m1 = m[k + 1]
        h2 = h * h / 6.0
        u = a * y0 + b * y1 + ((a * a * a - a) * m0 + (b * b * b - b) * m1) * h2
        du = (y1 - y0) / h + (-(3.0 * a * a - 1.0) * m0 + (3.0 * b * b - 1.0) * m1) * h / 6.0
        # Linear continuation outside the knot range.
        u = u + du * (r - rc)
        return u, du

    def openmm_expression(self) -> str:
        """The spline as an exact OpenMM expression: one cubic per interval, chosen by nested ``select``.

        Each interval's cubic is a Horner polynomial in ``d = r - r_k`` (a
        named intermediate per knot, which OpenMM's compiler evaluates once:
        measured 1.4x faster than inlining it); outside the knots the spline
        continues linearly, as :meth:`energy_and_derivative` does. OpenMM
        compiles such an expression to machine code, which evaluates faster
        than a tabulated function (docs/sampling.md). The intermediates are
        named after a hash of the knots, so splines on other knots in one
        expression do not clash (``combine_expressions`` keeps identical ones once).
        """
        with torch.no_grad():
            y = self.values.detach().to(torch.float64)
            if self.trainable:
                m = torch.mv(self.second_derivative_map, y)
            else:
                m = self.frozen_second_derivatives.to(torch.float64)
            coefficients = self._interval_coefficients(y, m).tolist()
            ends = torch.tensor([self.first_knot, self.last_knot], dtype=torch.float64)
            u_end, du_end = self.energy_and_derivative(ends)
        knots = [float(k) for k in self.knots]
        tag = hashlib.sha1(np.asarray(knots).tobytes()).hexdigest()[:8]
        names = [f"odiff_d{tag}_{k}" for k in range(len(knots))]
        expression = f"{float(u_end[0])!r}+({float(du_end[0])!r})*{names[0]}"
        for k, (c0, c1, c2, c3) in enumerate(coefficients):
            h = knots[k + 1] - knots[k]
            d = names[k]
            piece = f"{c0!r}+{d}*(({c1 / h!r})+{d}*(({c2 / h**2!r})+{d}*({c3 / h**3!r})))"
            expression = f"select(step({d}),{piece},{expression})"
        expression = f"select(step({names[-1]}),{float(u_end[1])!r}+({float(du_end[1])!r})*{names[-1]},{expression})"
        definitions = "; ".join(f"{name}=r-{knot!r}" for name, knot in zip(names, knots, strict=True))
        return f"{expression}; {definitions}"

    def _frozen_uniform(self, r: Tensor) -> Tuple[Tensor, Tensor]:
        rc = torch.clamp(r, self.first_knot, self.last_knot)
        x = (rc - self.first_knot) * (1.0 / self.spacing)
        k = torch.clamp(torch.floor(x).long(), 0, self.frozen_coefficients.shape[0] - 1)
        t = x - k.to(r.dtype)
        c = self.frozen_coefficients.to(r.dtype).index_select(0, k)
        c0 = c[:, 0]
        c1 = c[:, 1]
        c2 = c[:, 2]
        c3 = c[:, 3]
        u = c0 + t * (c1 + t * (c2 + t * c3))
        du = (c1 + t * (2.0 * c2 + 3.0 * t * c3)) * (1.0 / self.spacing)
        return u + du * (r - rc), du


def _natural_spline_matrix(knots: np.ndarray) -> np.ndarray:
    """Matrix M with m = M y: second derivatives of the natural cubic spline."""
    k = knots.size
    h = np.diff(knots)
    a = np.zeros((k, k))
    rhs = np.zeros((k, k))
    a[0, 0] = 1.0
    a[-1, -1] = 1.0
    for i in range(1, k - 1):
        a[i, i - 1] = h[i - 1] / 6.0
        a[i, i] = (h[i - 1] + h[i]) / 3.0
        a[i, i + 1] = h[i] / 6.0
        rhs[i, i - 1] = 1.0 / h[i - 1]
        rhs[i, i] = -1.0 / h[i - 1] - 1.0 / h[i]
        rhs[i, i + 1] = 1.0 / h[i]
    return np.linalg.solve(a, rhs)


class NeuralCorrection(PairPotential):
    """A network on a smooth radial basis, switched off smoothly at ``cutoff``.

    u(r) = f_c(r) · MLP(φ(r)) where φ are Gaussian radial basis functions on
    [0, cutoff] and f_c(r) = (1 - (r/r_c)^2)^3 for r < r_c (zero beyond), so u
    and du/dr vanish continuously at the cutoff. du/dr is propagated in
    forward mode through the network (no second autograd pass), which keeps
    it differentiable with respect to the weights.

    Parameters
    ----------
    cutoff : float or Quantity
        Range of the correction in nm.
    n_basis : int
        Number of Gaussian basis functions.
    hidden : sequence of int
        Hidden layer widths.
    seed : int, optional
        Seed for the initial weights (reproducible runs).
    """

    def __init__(self, cutoff=1.0, n_basis: int = 32, hidden: Sequence[int] = (64, 64), seed: Optional[int] = 0):
        super().__init__()
        cutoff = _as_float(cutoff, "cutoff")
        if cutoff <= 0:
            raise ValueError("cutoff must be positive")
        if n_basis < 2:
            raise ValueError("n_basis must be at least 2")
        self.cutoff = cutoff
        generator = torch.Generator().manual_seed(int(seed)) if seed is not None else None
        self.register_buffer("centers", torch.linspace(0.0, cutoff, n_basis, dtype=torch.float64))
        self.width = float(cutoff / (n_basis - 1))
        widths = [n_basis] + [int(h) for h in hidden] + [1]
        layers: List[nn.Linear] = []
        for fan_in, fan_out in zip(widths[:-1], widths[1:], strict=True):
            layer = nn.Linear(fan_in, fan_out, dtype=torch.float64)
            bound = 1.0 / math.sqrt(fan_in)
            with torch.no_grad():
                layer.weight.copy_(
                    (torch.rand(fan_out, fan_in, generator=generator, dtype=torch.float64) * 2 - 1) * bound
                )
                layer.bias.copy_((torch.rand(fan_out, generator=generator, dtype=torch.float64) * 2 - 1) * bound)
            layers.append(layer)
        # Small last layer: training starts close to the prior.
        with torch.no_grad():
            layers[-1].weight.mul_(0.01)
            layers[-1].bias.zero_()
        self.layers = nn.ModuleList(layers)
        self.n_layers = len(layers)

    def energy_and_derivative(self, r: Tensor) -> Tuple[Tensor, Tensor]:
        shape = r.shape
        x = r.reshape(-1, 1)
        centers = self.centers.to(r.dtype)
        z = (x - centers) / self.width
        h = torch.exp(-0.5 * z * z)  # (P, B)
        dh = -z / self.width * h
        for index, layer in enumerate(self.layers):
            w = layer.weight.to(r.dtype)
            b = layer.bias.to(r.dtype)
            pre = torch.nn.functional.linear(h, w, b)
            dpre = torch.nn.functional.linear(dh, w)
            if index < self.n_layers - 1:
                sig = torch.sigmoid(pre)
                h = pre * sig
                dh = dpre * sig * (1.0 + pre * (1.0 - sig))
            else:
                h = pre
                dh = dpre
        g = h.reshape(shape)
        dg = dh.reshape(shape)
        inside = r < self.cutoff
        q = 1.0 - (r / self.cutoff) ** 2
        fc = torch.where(inside, q * q * q, torch.zeros_like(r))
        dfc = torch.where(inside, -6.0 * r / (self.cutoff * self.cutoff) * q * q, torch.zeros_like(r))
        return g * fc, dg * fc + g * dfc


class PotentialSum(PairPotential):
    """Sum of pair potentials, e.g. a repulsive prior plus a learned correction."""

    def __init__(self, terms: Sequence[PairPotential]):
        super().__init__()
        if len(terms) == 0:
            raise ValueError("PotentialSum needs at least one term")
        self.terms = nn.ModuleList(list(terms))

    def energy_and_derivative(self, r: Tensor) -> Tuple[Tensor, Tensor]:
        u = torch.zeros_like(r)
        du = torch.zeros_like(r)
        for term in self.terms:
            ui, dui = term.energy_and_derivative(r)
            u = u + ui
            du = du + dui
        return u, du

    def openmm_expression(self) -> str:
        return combine_expressions([term.openmm_expression() for term in self.terms], "({0})+({1})")


PairKey = Tuple[str, str]


def split_expression(expression: str) -> Tuple[str, List[str]]:
    """An OpenMM expression ``"main; a=...; b=..."`` as ``(main, [definitions])``."""
    parts = [part.strip() for part in expression.split(";")]
    return parts[0], [part for part in parts[1:] if part]


def combine_expressions(expressions: Sequence[str], template: str) -> str:
    """Join OpenMM expressions pairwise with ``template`` (``"({0})+({1})"``), their definitions once at the end.

    Identical definitions (the same spline knots in two terms) are kept once;
    two different definitions of one name are an error.
    """
    mains: List[str] = []
    definitions: Dict[str, str] = {}
    for expression in expressions:
        main, extra = split_expression(expression)
        mains.append(main)
        for definition in extra:
            name = definition.split("=", 1)[0].strip()
            if definitions.get(name, definition) != definition:
                raise ValueError(f"two different OpenMM definitions of {name!r}")
            definitions[name] = definition
    combined = mains[0]
    for main in mains[1:]:
        combined = template.format(combined, main)
    return "; ".join([combined, *definitions.values()])


class PairTable(nn.Module):
    """Pair potentials per species pair, with a cutoff convention.

    This is the package's model: one object defines u(r) for every pair type
    and is used unchanged by the OpenMM force, the differentiable rollouts,
    reweighting and export.

    Parameters
    ----------
    species : sequence of str
        Species names; their order defines species indices 0..S-1.
    potentials : PairPotential or mapping
        Either one potential for every pair (single species or shared), or a
        mapping from ``(a, b)`` species-name pairs to potentials. Each unordered
        pair must be given once; ``(a, b)`` and ``(b, a)`` are the same type.
    cutoff : float or Quantity
        Cutoff distance in nm.
    cutoff_mode : {"truncate", "shift", "switch"}
        ``truncate``: u(r) for r < r_c, else 0 (OpenMM's plain cutoff).
        ``shift``: u(r) - u(r_c), continuous energy.
        ``switch``: u(r) S(r) with OpenMM's switching polynomial between
        ``switch_distance`` and r_c, continuous energy and force.
    switch_distance : float or Quantity, optional
        Start of the switch (nm), required for ``switch``.

    Notes
    -----
    Pair types are numbered in the order (0,0), (0,1), ..., (0,S-1), (1,1), ...
    """

    def __init__(
        self,
        species: Sequence[str],
        potentials: Union[PairPotential, Mapping[PairKey, PairPotential]],
        cutoff=1.0,
        cutoff_mode: str = "shift",
        switch_distance=None,
    ):
        super().__init__()
        species = [str(s) for s in species]
        if len(species) == 0:
            raise ValueError("PairTable needs at least one species")
        if len(set(species)) != len(species):
            raise ValueError(f"species names must be unique, got {species}")
        cutoff = _as_float(cutoff, "cutoff")
        if cutoff <= 0:
            raise ValueError("cutoff must be positive")
        if cutoff_mode not in CUTOFF_MODES:
            raise ValueError(f"cutoff_mode must be one of {CUTOFF_MODES}, got {cutoff_mode!r}")
        if cutoff_mode == "switch":
            if switch_distance is None:
                raise ValueError("cutoff_mode='switch' needs switch_distance")
            switch_distance = _as_float(switch_distance, "switch_distance")
            if not 0 < switch_distance < cutoff:
                raise ValueError(f"switch_distance must lie in (0, cutoff={cutoff}), got {switch_distance}")
        else:
            switch_distance = cutoff
        self.species: List[str] = species
        self.cutoff = cutoff
        self.cutoff_mode = cutoff_mode
        self.switch_distance = float(switch_distance)
        keys: List[PairKey] = []
        for a in range(len(species)):
            for b in range(a, len(species)):
                keys.append((species[a], species[b]))
        self.pair_names = [f"{a}-{b}" for a, b in keys]
        type_matrix = torch.zeros(len(species), len(species), dtype=torch.long)
        for k, (a, b) in enumerate(keys):
            ia, ib = species.index(a), species.index(b)
            type_matrix[ia, ib] = k
            type_matrix[ib, ia] = k
        self.register_buffer("type_matrix", type_matrix)
        modules: List[PairPotential] = []
        if isinstance(potentials, PairPotential):
            if len(keys) > 1:
                # One shared module object would tie parameters across pair types,
                # which is rarely intended: ask for a mapping instead.
                raise ValueError(
                    f"{len(species)} species need a mapping from species pairs to potentials "
                    f"(pairs: {', '.join(self.pair_names)})"
                )
            modules = [potentials]
        else:
            given: Dict[PairKey, PairPotential] = {}
            for key, pot in dict(potentials).items():
                if not (isinstance(key, tuple) and len(key) == 2):
                    raise ValueError(f"pair keys must be (species, species) tuples, got {key!r}")
                a, b = str(key[0]), str(key[1])
                for name in (a, b):
                    if name not in species:
                        raise ValueError(f"unknown species {name!r} in pair {key!r}; known species: {species}")
                if not isinstance(pot, PairPotential):
                    raise TypeError(f"potential for pair {key!r} must be a PairPotential, got {type(pot).__name__}")
                canonical = (a, b) if species.index(a) <= species.index(b) else (b, a)
                if canonical in given:
                    raise ValueError(f"pair {canonical} given twice")
                given[canonical] = pot
            missing = [f"{a}-{b}" for a, b in keys if (a, b) not in given]
            if missing:
                raise ValueError(f"no potential given for pair type(s): {', '.join(missing)}")
            modules = [given[key] for key in keys]
        self.pair_potentials = nn.ModuleList(modules)
        self.n_pair_types = len(keys)

    # -- evaluation -----------------------------------------------------------------

    def pair_types(self, species_i: Tensor, species_j: Tensor) -> Tensor:
        """Pair-type index for each pair from species indices, shape (P,)."""
        return self.type_matrix[species_i, species_j]

    def _raw(self, r: Tensor, pair_type: Tensor) -> Tuple[Tensor, Tensor]:
        if self.n_pair_types == 1:
            return self.pair_potentials[0].energy_and_derivative(r)
        u = torch.zeros_like(r)
        du = torch.zeros_like(r)
        for k, pot in enumerate(self.pair_potentials):
            sel = torch.nonzero(pair_type == k).squeeze(1)
            if sel.shape[0] > 0:
                uk, duk = pot.energy_and_derivative(r[sel])
                u = u.index_put((sel,), uk)
                du = du.index_put((sel,), duk)
        return u, du

    def _at_cutoff(self, like: Tensor) -> Tensor:
        values: List[Tensor] = []
        rc = torch.full((1,), self.cutoff, dtype=like.dtype, device=like.device)
        for pot in self.pair_potentials:
            values.append(pot.energy_and_derivative(rc)[0])
        return torch.cat(values)

    def energy_and_derivative(self, r: Tensor, pair_type: Tensor) -> Tuple[Tensor, Tensor]:
        """Pair energies u(r) (kJ/mol) and du/dr (kJ/mol/nm) with the cutoff applied.

        Parameters
        ----------
        r : Tensor, shape (P,)
            Pair distances in nm (positive).
        pair_type : Tensor, shape (P,) int64
            Pair-type index of each pair.
        """
        u, du = self._within_cutoff(r, pair_type)
        inside = r < self.cutoff
        zero = torch.zeros_like(r)
        return torch.where(inside, u, zero), torch.where(inside, du, zero)

    def _within_cutoff(self, r: Tensor, pair_type: Tensor) -> Tuple[Tensor, Tensor]:
        # u and du/dr with the shift or switch applied, valid for r < cutoff
        # (callers that already selected such pairs skip the final mask).
        u, du = self._raw(r, pair_type)
        if self.cutoff_mode == "shift":
            if self.n_pair_types == 1:
                u = u - self._at_cutoff(r)
            else:
                u = u - self._at_cutoff(r)[pair_type]
        elif self.cutoff_mode == "switch":
            width = self.cutoff - self.switch_distance
            x = torch.clamp((r - self.switch_distance) / width, 0.0, 1.0)
            s = 1.0 - x * x * x * (10.0 - 15.0 * x + 6.0 * x * x)
            ds = -30.0 * x * x * (1.0 - x) * (1.0 - x) / width
            du = du * s + u * ds
            u = u * s
        return u, du

    def forward(self, r: Tensor, pair_type: Tensor) -> Tensor:
        return self.energy_and_derivative(r, pair_type)[0]

    @torch.jit.export
    def energy_and_forces(
        self,
        positions: Tensor,
        lengths: Tensor,
        species: Tensor,
        pair_i: Tensor,
        pair_j: Tensor,
        compute_forces: bool = True,
    ) -> Tuple[Tensor, Tensor]:
        """Total energy (kJ/mol) and forces (N, 3) (kJ/mol/nm) of a configuration from a pair list.

        See :func:`openmm_diffsim.energy.pair_energy_and_forces`.
        """
        # 1-D gathers/scatters and per-component arithmetic: on CPU these are
        # several times faster than the (P, 3) forms (measured, benchmarks/).
        dr = positions.index_select(0, pair_j) - positions.index_select(0, pair_i)
        dr = dr - lengths * torch.round(dr * (1.0 / lengths))
        r2 = dr[:, 0] * dr[:, 0] + dr[:, 1] * dr[:, 1] + dr[:, 2] * dr[:, 2]
        # Evaluate only pairs inside the cutoff: the skin typically adds 30-60 %.
        inside = torch.nonzero(r2 < self.cutoff * self.cutoff).squeeze(1)
        dr = dr.index_select(0, inside)
        pi = pair_i.index_select(0, inside)
        pj = pair_j.index_select(0, inside)
        r = torch.sqrt(r2.index_select(0, inside))
        if self.n_pair_types == 1:
            pair_type = torch.zeros_like(pi)
        else:
            pair_type = self.pair_types(species.index_select(0, pi), species.index_select(0, pj))
        u, du = self._within_cutoff(r, pair_type)
        energy = u.sum()
        if not compute_forces:
            return energy, torch.zeros(0, 3, dtype=positions.dtype, device=positions.device)
        # Force on j is -du/dr * dr/r, on i the opposite; scattered into the
        # flattened (3N,) force array.
        f_pair = ((du / r).unsqueeze(1) * dr).reshape(-1)
        components = torch.arange(3, device=positions.device)
        slot_i = (pi * 3).unsqueeze(1) + components
        slot_j = (pj * 3).unsqueeze(1) + components
        forces = torch.zeros(positions.shape[0] * 3, dtype=positions.dtype, device=positions.device)
        forces = forces.index_add(0, slot_i.reshape(-1), f_pair).index_add(0, slot_j.reshape(-1), f_pair, alpha=-1)
        forces = forces.view(positions.shape[0], 3)
        return energy, forces

    # -- convenience (Python only) --------------------------------------------------

    @torch.jit.unused
    def pair_keys(self) -> List[PairKey]:
        """Species-name pairs in pair-type order."""
        s = self.species
        return [(s[a], s[b]) for a in range(len(s)) for b in range(a, len(s))]

    @torch.jit.unused
    def pair_index(self, pair: Union[str, PairKey, int]) -> int:
        """Index of a pair type given as ``(a, b)``, ``"a-b"`` or an int."""
        if isinstance(pair, int):
            if not 0 <= pair < self.n_pair_types:
                raise ValueError(f"pair type {pair} out of range 0..{self.n_pair_types - 1}")
            return pair
        if isinstance(pair, str):
            parts = pair.split("-")
            if len(parts) != 2:
                raise ValueError(f"pair name must look like 'A-B', got {pair!r}")
            pair = (parts[0], parts[1])
        a, b = pair
        for name in (a, b):
            if name not in self.species:
                raise ValueError(f"unknown species {name!r}; known species: {self.species}")
        return int(self.type_matrix[self.species.index(a), self.species.index(b)])

    @torch.jit.unused
    def evaluate(self, r, pair: Union[str, PairKey, int] = 0) -> Tuple[np.ndarray, np.ndarray]:
        """u(r) and du/dr on a grid for one pair type, as NumPy arrays (kJ/mol, kJ/mol/nm)."""
        k = self.pair_index(pair)
        r_t = torch.as_tensor(np.asarray(r, dtype=np.float64))
        with torch.no_grad():
            u, du = self.energy_and_derivative(r_t, torch.full_like(r_t, k, dtype=torch.long))
        return u.numpy(), du.numpy()

    @torch.jit.unused
    def tabulated(self, r_min: float = 0.05, n_points: int = 2000) -> PairTable:
        """A copy with every pair potential replaced by a fine cubic spline.

        Keeps the cutoff convention, so the spline reproduces the raw u(r)
        and the table applies shift or switch as before. Use it to run a
        neural potential in production without paying for the network.
        """
        return PairTable(
            self.species,
            {
                key: tabulate(pot, r_min, self.cutoff, n_points)
                for key, pot in zip(self.pair_keys(), self.pair_potentials, strict=True)
            },
            cutoff=self.cutoff,
            cutoff_mode=self.cutoff_mode,
            switch_distance=self.switch_distance if self.cutoff_mode == "switch" else None,
        )


def tabulate(potential: PairPotential, r_min: float, r_max: float, n_points: int = 2000) -> CubicSpline:
    """Fit a (frozen) natural cubic spline through ``potential`` on a uniform grid.

    Parameters
    ----------
    potential : PairPotential
        The potential to tabulate.
    r_min, r_max : float
        Grid range in nm. Below ``r_min`` the spline continues linearly.
    n_points : int
        Number of knots.
    """
    if not 0 < r_min < r_max:
        raise ValueError(f"need 0 < r_min < r_max, got {r_min}, {r_max}")
    n_points = int(n_points)
    if n_points < 4:
        raise ValueError(f"n_points must be at least 4, got {n_points}")
    # A natural spline has u'' = 0 at its ends; a few knots past r_max keep that
    # artefact out of [r_min, r_max] (the raw potential is defined beyond the cutoff).
    spacing = (r_max - r_min) / (n_points - 1)
    grid = torch.linspace(r_min, r_max + 16 * spacing, n_points + 16, dtype=torch.float64)
    with torch.no_grad():
        values = potential(grid)
    if not bool(torch.isfinite(values).all()):
        raise ValueError("potential is not finite on the tabulation grid; raise r_min")
    return CubicSpline(grid.numpy(), values.numpy(), trainable=False)
