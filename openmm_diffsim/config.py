"""TOML run configuration: one file describes a whole training run.

A configuration names the model (``[potential]``), the state points and
their targets (``[[state]]`` with ``[[state.target]]``), the method and its
settings (``[training]``, ``[sampling]``, ``[estimator]``), where results go
(``[output]``) and what to export at the end (``[export]``).
:func:`load_config` reads and validates it into a :class:`RunConfig`;
:func:`example_config` returns a complete, commented example (the argon
demo), which ``openmm-diffsim init`` writes.

Validation is strict on purpose: an unknown key is an error (with a
"did you mean" suggestion), so a typo never silently falls back to a
default. Every :class:`ConfigError` message starts with the key path, e.g.
``state[1].temperature: must be positive, got -3``.

Relative file paths (targets, output directory) are relative to the folder
holding the configuration file. Units are OpenMM's: nm, ps, kJ/mol, K, amu,
bar.
"""

from __future__ import annotations

import difflib
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .potentials import (
    CUTOFF_MODES,
    WCA,
    CubicSpline,
    LennardJones,
    ModifiedMorse,
    NeuralCorrection,
    PairPotential,
    PairTable,
    PotentialSum,
    SoftSphere,
    Yukawa,
)

__all__ = [
    "ConfigError",
    "RunConfig",
    "TargetSpec",
    "METHODS",
    "ESTIMATOR_METHODS",
    "EXPORT_FORMATS",
    "POTENTIAL_TYPES",
    "load_config",
    "parse_config",
    "build_potential",
    "build_table",
    "example_config",
]

#: Training methods a configuration can name.
METHODS = ("reweighting", "rollout", "adjoint", "hybrid", "ibi")
#: Methods run by :class:`~openmm_diffsim.training.Trainer` (the rest are baselines).
ESTIMATOR_METHODS = ("reweighting", "rollout", "adjoint", "hybrid")
#: Formats ``[export] formats`` may list (see :mod:`openmm_diffsim.export`).
EXPORT_FORMATS = ("torchscript", "openmm-xml", "tabulated-xml", "gromacs", "lammps")
LENGTH_UNITS = ("nm", "angstrom")
SPLINE_INITIAL = ("zero", "boltzmann")


class ConfigError(ValueError):
    """A malformed run configuration; the message starts with the offending key path."""


# -- TOML ---------------------------------------------------------------------------------


def _toml_module():
    if sys.version_info >= (3, 11):
        import tomllib

        return tomllib
    try:  # pragma: no cover - Python 3.10 only
        import tomli
    except ImportError as exc:  # pragma: no cover
        raise ImportError(
            "reading TOML configurations on Python 3.10 needs the 'tomli' package: pip install tomli "
            "(Python >= 3.11 has it built in as tomllib)"
        ) from exc
    return tomli  # pragma: no cover


# -- typed access to one table with unknown-key detection -----------------------------------


_MISSING = object()


def _kind_name(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class _Section:
    """One TOML table: typed getters that name the key path, and a check for leftovers."""

    def __init__(self, data: Any, path: str):
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: must be a table, got {_kind_name(data)}")
        self.data = data
        self.path = path
        self.used: set = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def error(self, name: str, message: str) -> ConfigError:
        return ConfigError(f"{self.key(name)}: {message}")

    def has(self, name: str) -> bool:
        return name in self.data

    def raw(self, name: str, default: Any = _MISSING) -> Any:
        self.used.add(name)
        if name in self.data:
            return self.data[name]
        if default is _MISSING:
            # A misspelt required key is reported as the typo, not as a missing key.
            for other in self.data:
                if other not in self.used and difflib.get_close_matches(str(other), [name], n=1, cutoff=0.6):
                    raise ConfigError(f"{self.key(other)}: unknown key (did you mean {name!r}?)")
            raise ConfigError(f"{self.key(name)}: required key is missing")
        return default

    def number(
        self,
        name: str,
        default: Any = _MISSING,
        *,
        positive: bool = False,
        non_negative: bool = False,
        integer: bool = False,
    ) -> Any:
        if name not in self.data and default is not _MISSING:
            self.used.add(name)
            return default
        value = self.raw(name)
        return _check_number(self.key(name), value, positive=positive, non_negative=non_negative, integer=integer)

    def string(self, name: str, default: Any = _MISSING, choices: Optional[Sequence[str]] = None) -> Any:
        if name not in self.data and default is not _MISSING:
            self.used.add(name)
            return default
        value = self.raw(name)
        if not isinstance(value, str):
            raise self.error(name, f"must be a string, got {_kind_name(value)} {value!r}")
        if choices is not None and value not in choices:
            raise self.error(
                name,
                f"must be one of {', '.join(map(repr, choices))}, got {value!r}{_did_you_mean(value, choices)}",
            )
        return value

    def boolean(self, name: str, default: Any = _MISSING) -> Any:
        if name not in self.data and default is not _MISSING:
            self.used.add(name)
            return default
        value = self.raw(name)
        if not isinstance(value, bool):
            raise self.error(name, f"must be true or false, got {_kind_name(value)} {value!r}")
        return value

    def section(self, name: str, default: Any = _MISSING) -> Optional[_Section]:
        value = self.raw(name, default)
        if value is None:
            return None
        return _Section(value, self.key(name))

    def finish(self, extra_allowed: Sequence[str] = ()) -> None:
        """Raise for keys nobody asked for (typos), with the closest known key."""
        known = sorted(self.used | set(extra_allowed))
        for name in self.data:
            if name not in self.used and name not in extra_allowed:
                raise ConfigError(f"{self.key(name)}: unknown key{_suggest(name, known)}")


def _suggest(name: str, known: Sequence[str], listing: bool = True) -> str:
    """`` (did you mean 'x'?)`` for the closest known name, else (with ``listing``) the known keys."""
    # Species names are short: "Xr" vs "Kr" scores 0.5.
    cutoff = 0.5 if len(str(name)) <= 3 else 0.6
    close = difflib.get_close_matches(str(name), list(known), n=1, cutoff=cutoff)
    if close:
        return f" (did you mean {close[0]!r}?)"
    if known and listing:
        return f"; known keys: {', '.join(known)}"
    return ""


def _did_you_mean(name: str, known: Sequence[str]) -> str:
    return _suggest(name, known, listing=False)


def _check_number(
    path: str, value: Any, *, positive: bool = False, non_negative: bool = False, integer: bool = False
) -> Union[int, float]:
    if integer:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: must be an integer, got {_kind_name(value)} {value!r}")
    elif not _is_number(value):
        raise ConfigError(f"{path}: must be a number, got {_kind_name(value)} {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{path}: must be finite, got {value}")
    if positive and value <= 0:
        raise ConfigError(f"{path}: must be positive, got {value}")
    if non_negative and value < 0:
        raise ConfigError(f"{path}: must be non-negative, got {value}")
    return int(value) if integer else float(value)


def _number_list(path: str, value: Any, *, positive: bool = False, length: Optional[int] = None) -> List[float]:
    if not isinstance(value, list):
        raise ConfigError(f"{path}: must be an array of numbers, got {_kind_name(value)} {value!r}")
    if length is not None and len(value) != length:
        raise ConfigError(f"{path}: must have {length} entries, got {len(value)}")
    return [_check_number(f"{path}[{k}]", v, positive=positive) for k, v in enumerate(value)]


def _pair_from(path: str, value: Any, species: Sequence[str]) -> Tuple[str, str]:
    """A species pair from ``"A-B"`` or ``["A", "B"]``, checked against ``species``."""
    if isinstance(value, str):
        parts = value.split("-")
    elif isinstance(value, list):
        parts = value
    else:
        raise ConfigError(f'{path}: must be a pair like "A-B" or ["A", "B"], got {_kind_name(value)} {value!r}')
    if len(parts) != 2 or not all(isinstance(p, str) and p for p in parts):
        raise ConfigError(f'{path}: must name two species like "A-B" or ["A", "B"], got {value!r}')
    for name in parts:
        if name not in species:
            raise ConfigError(
                f"{path}: unknown species {name!r}{_did_you_mean(name, species)}; known species: {list(species)}"
            )
    return parts[0], parts[1]


# -- potentials -------------------------------------------------------------------------------


def _analytic(cls: type, parameters: Dict[str, Tuple[float, bool]]) -> Callable:
    """A builder for an analytic potential: ``{name: (default, must_be_positive)}``."""

    def build(section: _Section, cutoff: float) -> PairPotential:
        kwargs = {}
        for name, (default, positive) in parameters.items():
            kwargs[name] = section.number(name, default, positive=positive)
        return cls(**kwargs)

    build.parameters = tuple(parameters)  # type: ignore[attr-defined]
    return build


def _build_spline(section: _Section, cutoff: float) -> PairPotential:
    knots = section.raw("knots", 50)
    r_max = section.number("r_max", cutoff, positive=True)
    initial = section.string("initial", "zero", choices=SPLINE_INITIAL)
    if isinstance(knots, list):
        if section.has("r_min"):
            raise section.error("r_min", "give either r_min with an integer knots, or knots as a list of positions")
        positions = np.asarray(_number_list(section.key("knots"), knots, positive=True))
        if positions.size < 4:
            raise section.error("knots", f"a cubic spline needs at least 4 knots, got {positions.size}")
        if not np.all(np.diff(positions) > 0):
            raise section.error("knots", "knot positions must be strictly increasing")
    else:
        n = _check_number(section.key("knots"), knots, integer=True)
        if n < 4:
            raise section.error("knots", f"a cubic spline needs at least 4 knots, got {n}")
        r_min = section.number("r_min", positive=True)
        if not r_min < r_max:
            raise section.error("r_min", f"must be below r_max = {r_max} nm, got {r_min}")
        positions = np.linspace(r_min, r_max, n)
    if positions[-1] > cutoff + 1e-12:
        raise section.error(
            "r_max" if not isinstance(knots, list) else "knots",
            f"spline reaches {positions[-1]} nm, beyond the cutoff {cutoff} nm",
        )
    values = section.raw("values", None)
    if values is not None:
        if initial != "zero" and section.has("initial"):
            raise section.error("values", f"give either values or initial = {initial!r}, not both")
        values = np.asarray(_number_list(section.key("values"), values, length=positions.size))
    else:
        # "boltzmann" values are filled in by the trainer from the targets
        # (Trainer(boltzmann_initial_guess=True)); start from zero here.
        values = np.zeros_like(positions)
    return CubicSpline(positions, values, trainable=True)


def _build_neural(section: _Section, cutoff: float) -> PairPotential:
    n_basis = section.number("n_basis", 32, integer=True)
    if n_basis < 2:
        raise section.error("n_basis", f"must be at least 2, got {n_basis}")
    hidden = section.raw("hidden", [64, 64])
    if not isinstance(hidden, list) or not all(
        isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in hidden
    ):
        raise section.error("hidden", f"must be an array of positive integers (layer widths), got {hidden!r}")
    seed = section.raw("seed", 0)
    if seed is not None:
        seed = _check_number(section.key("seed"), seed, integer=True)
    return NeuralCorrection(cutoff=cutoff, n_basis=n_basis, hidden=tuple(hidden), seed=seed)


#: Registry: ``type`` name in ``[potential.pairs."A-B"]`` -> builder(section, cutoff).
POTENTIAL_TYPES: Dict[str, Callable[[_Section, float], PairPotential]] = {
    "lennard-jones": _analytic(LennardJones, {"sigma": (_MISSING, True), "epsilon": (_MISSING, True)}),
    "wca": _analytic(WCA, {"sigma": (_MISSING, True), "epsilon": (_MISSING, True)}),
    "soft-sphere": _analytic(
        SoftSphere, {"sigma": (_MISSING, True), "epsilon": (_MISSING, True), "exponent": (12.0, True)}
    ),
    "yukawa": _analytic(Yukawa, {"amplitude": (_MISSING, False), "kappa": (_MISSING, True)}),
    "modified-morse": _analytic(
        ModifiedMorse,
        {"a": (_MISSING, True), "phi": (_MISSING, False), "sigma": (_MISSING, True), "epsilon": (_MISSING, True)},
    ),
    "spline": _build_spline,
    "neural": _build_neural,
}


def _potential_from_section(section: _Section, cutoff: float, allow_prior: bool = True) -> PairPotential:
    kind = section.string("type", choices=tuple(POTENTIAL_TYPES))
    trainable = section.boolean("trainable", True if allow_prior else False)
    potential = POTENTIAL_TYPES[kind](section, cutoff)
    prior_section = section.section("prior", None) if allow_prior else None
    section.finish()
    if not trainable:
        potential.requires_grad_(False)
    if prior_section is not None:
        # Priors (usually a repulsive wall under a spline or network) are fixed by default.
        prior = _potential_from_section(prior_section, cutoff, allow_prior=False)
        potential = PotentialSum([prior, potential])
    return potential


def build_potential(spec: Mapping[str, Any], cutoff: float = 1.0, path: str = "potential") -> PairPotential:
    """Build one pair potential from its configuration table.

    Parameters
    ----------
    spec : mapping
        A ``[potential.pairs."A-B"]`` table: ``type`` (one of
        :data:`POTENTIAL_TYPES`), its parameters, optional ``trainable``
        (default true) and optional ``prior`` (a table of the same form,
        fixed unless it says ``trainable = true``), which is added to the
        potential via :class:`~openmm_diffsim.potentials.PotentialSum`.
    cutoff : float
        Cutoff in nm (the spline's default ``r_max``, the network's cutoff).
    path : str
        Key path used in error messages.

    Raises
    ------
    ConfigError
        Naming the key path and the problem.

    Examples
    --------
    >>> pot = build_potential({"type": "lennard-jones", "sigma": 0.34, "epsilon": 0.996})
    """
    try:
        return _potential_from_section(_Section(dict(spec), path), float(cutoff))
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def _table_from_section(section: _Section) -> PairTable:
    species = section.raw("species")
    if not isinstance(species, list) or not species or not all(isinstance(s, str) and s for s in species):
        raise section.error("species", f"must be a non-empty array of species names, got {species!r}")
    if len(set(species)) != len(species):
        raise section.error("species", f"species names must be unique, got {species}")
    for name in species:
        if "-" in name:
            raise section.error("species", f"species names may not contain '-' (pairs are written 'A-B'), got {name!r}")
    cutoff = section.number("cutoff", positive=True)
    mode = section.string("cutoff_mode", "shift", choices=CUTOFF_MODES)
    switch = section.number("switch_distance", None, positive=True)
    if mode == "switch":
        if switch is None:
            raise section.error("switch_distance", 'required with cutoff_mode = "switch"')
        if not switch < cutoff:
            raise section.error("switch_distance", f"must be below the cutoff {cutoff} nm, got {switch}")
    elif switch is not None:
        raise section.error("switch_distance", f'only used with cutoff_mode = "switch" (cutoff_mode is {mode!r})')
    pairs = section.section("pairs")
    potentials: Dict[Tuple[str, str], PairPotential] = {}
    for name in pairs.data:
        pairs.used.add(name)
        key = _pair_from(pairs.key(f'"{name}"'), name, species)
        a, b = key
        canonical = (a, b) if species.index(a) <= species.index(b) else (b, a)
        if canonical in potentials:
            raise pairs.error(f'"{name}"', f"pair {canonical[0]}-{canonical[1]} given twice")
        potentials[canonical] = _potential_from_section(_Section(pairs.data[name], pairs.key(f'"{name}"')), cutoff)
    expected = [(species[i], species[j]) for i in range(len(species)) for j in range(i, len(species))]
    missing = [f"{a}-{b}" for a, b in expected if (a, b) not in potentials]
    if missing:
        raise section.error("pairs", f"no potential given for pair type(s) {', '.join(missing)}")
    section.finish()
    try:
        return PairTable(species, potentials, cutoff=cutoff, cutoff_mode=mode, switch_distance=switch)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{section.path}: {exc}") from exc


def build_table(spec: Mapping[str, Any], path: str = "potential") -> PairTable:
    """Build the :class:`~openmm_diffsim.potentials.PairTable` from a ``[potential]`` table.

    Parameters
    ----------
    spec : mapping
        ``species`` (array of names), ``cutoff`` (nm), ``cutoff_mode``
        (``"truncate"``, ``"shift"`` (default) or ``"switch"``),
        ``switch_distance`` (nm, with ``"switch"``) and ``pairs``: one table
        per unordered species pair, keyed ``"A-B"`` (see :func:`build_potential`).
    path : str
        Key path used in error messages.

    Raises
    ------
    ConfigError
        Naming the key path and the problem.
    """
    return _table_from_section(_Section(dict(spec), path))


def _uses_boltzmann_initial(spec: Mapping[str, Any]) -> bool:
    pairs = spec.get("pairs", {}) if isinstance(spec, Mapping) else {}
    return any(isinstance(p, Mapping) and p.get("initial") == "boltzmann" for p in pairs.values())


# -- states and targets -----------------------------------------------------------------------


@dataclass
class TargetSpec:
    """A target as written in the configuration (before or instead of reading it).

    Attributes
    ----------
    path : str
        Key path (``state[0].target[1]``), for messages.
    pair : (str, str)
        Species pair.
    file : Path or None
        Target file (absolute), for file targets.
    columns : (int, int)
        Columns holding r and g(r).
    length_unit : {"nm", "angstrom"}
        Unit of the r column.
    reference : dict or None
        A potential table (as in ``[potential.pairs]``) to simulate for the
        target instead of reading a file (synthetic-data runs, the demo).
    """

    path: str
    pair: Tuple[str, str]
    file: Optional[Path] = None
    columns: Tuple[int, int] = (0, 1)
    length_unit: str = "nm"
    reference: Optional[Dict[str, Any]] = None


def _per_species(path: str, value: Any, species: Sequence[str], *, integer: bool, positive: bool) -> List[Any]:
    """Per-species values from an array (in species order), a table {name = value} or (non-integer) a scalar."""
    if isinstance(value, dict):
        for name in value:
            if name not in species:
                raise ConfigError(
                    f"{path}: unknown species {name!r}{_did_you_mean(name, species)}; state species: {list(species)}"
                )
        missing = [s for s in species if s not in value]
        if missing:
            raise ConfigError(f"{path}: no value for species {', '.join(missing)}")
        return [_check_number(f"{path}.{s}", value[s], integer=integer, positive=positive) for s in species]
    if isinstance(value, list):
        if len(value) != len(species):
            raise ConfigError(f"{path}: must give one value per species {list(species)}, got {len(value)} values")
        return [_check_number(f"{path}[{k}]", v, integer=integer, positive=positive) for k, v in enumerate(value)]
    if not integer and _is_number(value):
        return [_check_number(path, value, positive=positive)] * len(species)
    raise ConfigError(
        f"{path}: must be an array with one value per species or a table {{name = value}}, "
        f"got {_kind_name(value)} {value!r}"
    )


def _target_spec(section: _Section, species: Sequence[str], base_dir: Path, cutoff: float) -> TargetSpec:
    default_pair = [species[0], species[0]] if len(species) == 1 else _MISSING
    pair = _pair_from(section.key("pair"), section.raw("pair", default_pair), species)
    has_file, has_reference = section.has("file"), section.has("reference")
    if has_file == has_reference:
        raise ConfigError(
            f"{section.path}: give exactly one of file (a target RDF) or reference (a potential to simulate)"
        )
    spec = TargetSpec(path=section.path, pair=pair)
    if has_file:
        name = section.string("file")
        file = Path(name).expanduser()
        if not file.is_absolute():
            file = base_dir / file
        if not file.is_file():
            raise section.error("file", f"target file not found: {file}")
        spec.file = file
        columns = section.raw("columns", [0, 1])
        if (
            not isinstance(columns, list)
            or len(columns) != 2
            or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in columns)
        ):
            raise section.error("columns", f"must be two non-negative column indices [r, g], got {columns!r}")
        spec.columns = (columns[0], columns[1])
        spec.length_unit = section.string("length_unit", "nm", choices=LENGTH_UNITS)
    else:
        reference = section.raw("reference")
        if not isinstance(reference, dict):
            raise section.error(
                "reference", f'must be a potential table like {{type = "lennard-jones", ...}}, got {reference!r}'
            )
        # Validate now (the simulation itself runs later, in RunConfig.resolve_targets).
        build_potential(reference, cutoff, section.key("reference"))
        spec.reference = dict(reference)
    section.finish()
    return spec


def _state_from_section(
    section: _Section, index: int, table: PairTable, base_dir: Path
) -> Tuple[Any, List[TargetSpec]]:
    from .systems import StatePoint

    name = section.string("name", f"state{index}")
    species = section.raw("species", list(table.species))
    if not isinstance(species, list) or not species or not all(isinstance(s, str) for s in species):
        raise section.error("species", f"must be a non-empty array of species names, got {species!r}")
    for s in species:
        if s not in table.species:
            raise section.error(
                "species",
                f"unknown species {s!r}{_did_you_mean(s, table.species)}; the potential defines {table.species}",
            )
    counts = _per_species(section.key("counts"), section.raw("counts"), species, integer=True, positive=False)
    if any(c < 0 for c in counts):
        raise section.error("counts", f"must be non-negative, got {counts}")
    if sum(counts) < 2:
        raise section.error("counts", f"need at least two particles in all, got {counts}")
    masses = _per_species(section.key("masses"), section.raw("masses"), species, integer=False, positive=True)
    temperature = section.number("temperature", positive=True)
    has_box, has_density = section.has("box"), section.has("density")
    if has_box == has_density:
        raise ConfigError(f"{section.path}: give exactly one of box (nm) or density (particles/nm^3)")
    box = density = None
    if has_box:
        raw_box = section.raw("box")
        box = (
            [float(_check_number(section.key("box"), raw_box, positive=True))] * 3
            if _is_number(raw_box)
            else (_number_list(section.key("box"), raw_box, positive=True, length=3))
        )
    else:
        density = section.number("density", positive=True)
    pressure = section.number("pressure", None)
    energy = section.number("energy", None)
    weight = section.number("weight", 1.0, non_negative=True)
    raw_targets = section.raw("target", [])
    if not isinstance(raw_targets, list):
        raise section.error("target", "must be an array of tables: write [[state.target]]")
    section.finish()
    try:
        state = StatePoint(
            name,
            species,
            counts,
            masses,
            temperature,
            box=box,
            density=density,
            pressure=pressure,
            weight=weight,
            energy=energy,
        )
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{section.path}: {exc}") from exc
    half = 0.5 * min(state.box)
    if table.cutoff > half:
        raise ConfigError(
            f"potential.cutoff: {table.cutoff} nm exceeds half the shortest box edge of {section.path} "
            f"({name!r}, box {'x'.join(f'{b:.4g}' for b in state.box)} nm): at most {half:.4g} nm, "
            "or use more particles"
        )
    targets = [
        _target_spec(_Section(t, f"{section.path}.target[{k}]"), species, base_dir, table.cutoff)
        for k, t in enumerate(raw_targets)
    ]
    return state, targets


def _read_target(spec: TargetSpec, state: Any) -> Any:
    from . import targets as targets_module

    try:
        return targets_module.read_target(
            spec.file, pair=spec.pair, columns=spec.columns, length_unit=spec.length_unit, state=state.name
        )
    except (ValueError, TypeError, OSError) as exc:
        raise ConfigError(f"{spec.path}.file: cannot read {spec.file}: {exc}") from exc


# -- the run configuration ----------------------------------------------------------------------


@dataclass
class RunConfig:
    """A validated run configuration.

    Attributes
    ----------
    table : PairTable
        The initial model.
    states : list of StatePoint
        State points, with file targets already read into ``state.targets``.
    trainer : dict
        Keyword arguments for :class:`~openmm_diffsim.training.Trainer`
        (everything after ``table, states``), including ``estimator`` for
        the gradient-based methods and ``output_dir``.
    method : str
        One of :data:`METHODS`.
    output_dir : Path
        Where checkpoints, logs and plots go (absolute).
    export : dict
        ``formats`` (list of :data:`EXPORT_FORMATS`), ``directory`` (Path),
        ``state`` (name of the state whose composition, masses and box are used
        for system XML), ``r_min`` (nm or None: automatic), ``dr`` (nm, GROMACS
        spacing), ``n_points`` (LAMMPS).
    target_specs : list of list of TargetSpec
        The targets per state as written in the file.
    path : Path or None
        The configuration file.
    ibi : dict
        Keyword arguments for :class:`~openmm_diffsim.ibi.IBI` from ``[ibi]``
        (``method = "ibi"`` only).
    """

    table: PairTable
    states: list
    trainer: Dict[str, Any]
    method: str
    output_dir: Path
    export: Dict[str, Any]
    target_specs: List[List[TargetSpec]] = field(default_factory=list)
    path: Optional[Path] = None
    ibi: Dict[str, Any] = field(default_factory=dict)

    @property
    def sampler_options(self) -> Dict[str, Any]:
        """Keyword arguments for :class:`~openmm_diffsim.sampling.Sampler` from ``[sampling]``."""
        return dict(self.trainer.get("sampler_options") or {})

    def state(self, name: str) -> Any:
        """The state point called ``name``."""
        names = [s.name for s in self.states]
        if name not in names:
            raise ConfigError(f"state: no state named {name!r}{_did_you_mean(name, names)}; states: {names}")
        return self.states[names.index(name)]

    def pending_reference_targets(self) -> List[TargetSpec]:
        """Targets to be simulated from a reference potential that are not resolved yet."""
        return [
            spec
            for state, specs in zip(self.states, self.target_specs, strict=True)
            for spec in specs
            if spec.reference is not None and not _has_target(state, spec)
        ]

    def resolve_targets(
        self, n_snapshots: int = 200, interval: int = 50, equilibration_steps: int = 5000, n_bins: int = 200
    ) -> None:
        """Simulate ``reference`` targets with their potential and attach them to the states.

        Each reference potential runs once per state with the state's
        composition through :func:`openmm_diffsim.sampling.reference_rdfs`
        (RDF up to half the shortest box edge, no smearing); the RDFs are
        cached as text files in ``output_dir/targets`` and read back on later
        runs, so a resumed or repeated run trains against the same target.
        """
        from . import sampling
        from . import targets as targets_module

        cache = self.output_dir / "targets"
        options = {k: v for k, v in self.sampler_options.items() if k in ("backend", "platform", "timestep")}
        seed = self.trainer.get("seed")
        for state, specs in zip(self.states, self.target_specs, strict=True):
            for spec in specs:
                if spec.reference is None or _has_target(state, spec):
                    continue
                file = cache / (f"{state.name}_{spec.pair[0]}-{spec.pair[1]}.dat".replace(" ", "_").replace("/", "_"))
                if not file.is_file():
                    r, g, _ = sampling.reference_rdfs(
                        state,
                        self._reference_table(spec),
                        n_snapshots=n_snapshots,
                        interval=interval,
                        equilibration=equilibration_steps,
                        n_bins=n_bins,
                        seed=seed,
                        **options,
                    )
                    row = _state_pair_index(state.species, spec.pair)
                    cache.mkdir(parents=True, exist_ok=True)
                    targets_module.write_rdf(
                        file, r, g[row], pair=spec.pair, state=state.name, comment=f"reference: {spec.reference}"
                    )
                target = targets_module.read_target(file, pair=spec.pair, state=state.name)
                target._spec_path = spec.path
                state.targets.append(target)

    def _reference_table(self, spec: TargetSpec) -> PairTable:
        """A table like the model's but with the reference potential for every pair type."""
        table = self.table
        potentials = {
            key: build_potential(spec.reference, table.cutoff, f"{spec.path}.reference") for key in table.pair_keys()
        }
        return PairTable(
            table.species,
            potentials,
            cutoff=table.cutoff,
            cutoff_mode=table.cutoff_mode,
            switch_distance=table.switch_distance if table.cutoff_mode == "switch" else None,
        )

    def make_trainer(self, **overrides: Any) -> Any:
        """A :class:`~openmm_diffsim.training.Trainer` from this configuration (``overrides`` win)."""
        if self.method not in ESTIMATOR_METHODS:
            raise ConfigError(f"training.method: {self.method!r} is not run by the Trainer")
        from .training import Trainer

        kwargs = dict(self.trainer)
        kwargs.update(overrides)
        return Trainer(self.table, self.states, **kwargs)


def _has_target(state: Any, spec: TargetSpec) -> bool:
    return any(getattr(t, "_spec_path", None) == spec.path for t in state.targets)


def _state_pair_index(species: Sequence[str], pair: Tuple[str, str]) -> int:
    """Row of ``pair`` in pair-type order (0,0), (0,1), ... of ``species``."""
    a, b = sorted((species.index(pair[0]), species.index(pair[1])))
    n = len(species)
    return a * n - a * (a - 1) // 2 + (b - a)


_TRAINING_KEYS = {
    "learning_rate": dict(positive=True),
    "max_epochs": dict(integer=True, positive=True),
    "clip_norm": dict(positive=True),
    "target_loss": dict(non_negative=True),
    "plateau_patience": dict(integer=True, positive=True),
    "seed": dict(integer=True),
    "max_retries": dict(integer=True, non_negative=True),
    "imc_damping": dict(positive=True),
    "imc_smoothing": dict(non_negative=True),
    "imc_roughness": dict(non_negative=True),
    "imc_reject_factor": dict(positive=True),
    "imc_pool": dict(integer=True, positive=True),
    "imc_pool_radius": dict(positive=True),
    "imc_max_cap": dict(positive=True),
    "imc_level_fraction": dict(positive=True),
    "imc_ibi_prior": dict(non_negative=True),
    "max_potential_change": dict(positive=True),
    "average_last": dict(integer=True, non_negative=True),
}
_SAMPLING_TRAINER_KEYS = {
    "n_snapshots": "n_snapshots",
    "interval": "snapshot_interval",
    "equilibration": "equilibration_steps",
    "reequilibration": "reequilibration_steps",
}
# As accepted by openmm_diffsim.sampling.Sampler (not imported here: a config loads without OpenMM).
_INTEGRATORS = ("langevin", "nose-hoover")
_BACKENDS = ("auto", "torch", "tabulated", "native", "expression")


def _estimator_options(section: Optional[_Section], method: str) -> Dict[str, Any]:
    """``[estimator]`` as keyword arguments; checked against the estimator's signature when it is importable."""
    if section is None:
        return {}
    options = {}
    for name, value in section.data.items():
        section.used.add(name)
        if name in ("r_range",):
            value = tuple(_number_list(section.key(name), value, length=2))
        options[name] = value
    allowed = _estimator_parameters(method)
    if allowed is not None:
        for name in options:
            if name not in allowed:
                raise ConfigError(
                    f"{section.key(name)}: unknown option for the {method} estimator{_suggest(name, sorted(allowed))}"
                )
    for name in ("n_bins", "n_steps", "record_every", "n_replicas"):
        if name in options:
            _check_number(section.key(name), options[name], integer=True, positive=True)
    for name in ("smearing", "timestep"):
        if name in options:
            _check_number(section.key(name), options[name], positive=True)
    if "bin_weighting" in options:
        from .targets import BIN_WEIGHTINGS

        if options["bin_weighting"] not in BIN_WEIGHTINGS:
            raise ConfigError(
                f"{section.key('bin_weighting')}: must be one of {', '.join(BIN_WEIGHTINGS)}, "
                f"got {options['bin_weighting']!r}"
            )
    return options


def _ibi_options(section: Optional[_Section], method: str) -> Dict[str, Any]:
    """``[ibi]`` as keyword arguments of :class:`~openmm_diffsim.ibi.IBI`."""
    if section is None:
        return {}
    if method != "ibi":
        raise ConfigError(f'ibi: the [ibi] table only applies to method = "ibi" (training.method is {method!r})')
    options: Dict[str, Any] = {}
    for name in ("mixing", "g_min", "pressure_max_ramp", "pressure_factor"):
        value = section.number(name, None, positive=True)
        if value is not None:
            options[name] = value
    smoothing = section.number("smoothing", None, integer=True, non_negative=True)
    if smoothing is not None:
        options["smoothing"] = smoothing
    max_update = section.number("max_update", None, non_negative=True)
    if max_update is not None:
        options["max_update"] = max_update if max_update > 0 else None  # 0: no cap
    pressure = section.boolean("pressure_correction", None)
    if pressure is not None:
        options["pressure_correction"] = pressure
    section.finish()
    return options


def _estimator_parameters(method: str) -> Optional[set]:
    """Keyword names the method's estimator accepts, or None if that cannot be told here."""
    import inspect

    try:
        from . import gradients
    except ImportError:
        return None
    classes = {
        "reweighting": ["ReweightingEstimator"],
        "rollout": ["RolloutEstimator"],
        "adjoint": ["RolloutEstimator"],
        "hybrid": ["ReweightingEstimator", "RolloutEstimator"],
    }.get(method, [])
    if method == "ibi":
        # IBI computes g(r) with the estimators' grid (openmm_diffsim.ibi.IBI).
        return {"r_range", "n_bins", "smearing", "target_outside"}
    names: set = set()
    for class_name in classes:
        cls = getattr(gradients, class_name, None)
        if cls is None:
            return None
        parameters = inspect.signature(cls).parameters.values()
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            return None
        names.update(p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    return names or None


def parse_config(
    data: Union[str, Mapping[str, Any]], base_dir: Union[str, Path] = ".", *, read_targets: bool = True
) -> RunConfig:
    """Validate a configuration given as TOML text or an already-parsed mapping.

    Parameters
    ----------
    data : str or mapping
        TOML text, or the dict ``tomllib`` produced.
    base_dir : str or Path
        Folder that relative paths are relative to.
    read_targets : bool
        Read target files into the states (default). With False the files are
        only checked to exist.

    Raises
    ------
    ConfigError
        For any malformed entry, naming its key path.
    """
    if isinstance(data, str):
        try:
            data = _toml_module().loads(data)
        except Exception as exc:  # tomllib.TOMLDecodeError
            raise ConfigError(f"not valid TOML: {exc}") from exc
    base_dir = Path(base_dir).expanduser().resolve()
    root = _Section(dict(data), "")

    potential_spec = root.raw("potential")
    table = _table_from_section(_Section(potential_spec, "potential"))

    raw_states = root.raw("state")
    if not isinstance(raw_states, list) or not raw_states:
        raise ConfigError("state: need at least one state point, written as [[state]] tables")
    states, target_specs = [], []
    for k, raw in enumerate(raw_states):
        state, specs = _state_from_section(_Section(raw, f"state[{k}]"), k, table, base_dir)
        states.append(state)
        target_specs.append(specs)
    names = [s.name for s in states]
    for k, name in enumerate(names):
        if names.index(name) != k:
            raise ConfigError(f"state[{k}].name: state name {name!r} is used twice")

    trainer: Dict[str, Any] = {}
    training = root.section("training", {})
    method = training.string("method", "reweighting", choices=METHODS)
    for name, checks in _TRAINING_KEYS.items():
        value = training.number(name, None, **checks)
        if value is not None:
            trainer[name] = value
    for name, choices in (
        ("optimizer", ("adam", "sgd", "gauss-newton", "imc", "natural")),
        ("lr_schedule", ("constant", "cosine")),
    ):
        value = training.string(name, None, choices=choices)
        if value is not None:
            trainer[name] = value
    for name in ("boltzmann_initial_guess", "progress", "imc_check_last", "imc_noise_shrink", "imc_line_search"):
        value = training.boolean(name, None)
        if value is not None:
            trainer[name] = value
    training.finish()
    ibi_options = _ibi_options(root.section("ibi", None), method)
    if _uses_boltzmann_initial(potential_spec):
        if trainer.get("boltzmann_initial_guess") is False:
            raise ConfigError(
                "training.boltzmann_initial_guess: false contradicts a spline with "
                'initial = "boltzmann" in [potential.pairs]'
            )
        trainer["boltzmann_initial_guess"] = True

    sampling = root.section("sampling", {})
    sampler_options: Dict[str, Any] = {}
    for key, name in _SAMPLING_TRAINER_KEYS.items():
        value = sampling.number(key, None, integer=True, positive=key in ("n_snapshots", "interval"), non_negative=True)
        if value is not None:
            trainer[name] = value
    backend = sampling.string("backend", None, choices=_BACKENDS)
    platform = sampling.string("platform", None)
    integrator = sampling.string("integrator", None, choices=_INTEGRATORS)
    timestep = sampling.number("timestep", None, positive=True)
    friction = sampling.number("friction", None, positive=True)
    for name, value in (
        ("backend", backend),
        ("platform", platform),
        ("integrator", integrator),
        ("timestep", timestep),
        ("friction", friction),
    ):
        if value is not None:
            sampler_options[name] = value
    sampling.finish()
    if sampler_options:
        trainer["sampler_options"] = sampler_options

    estimator = _estimator_options(root.section("estimator", None), method)
    if estimator:
        trainer["estimator_options"] = estimator

    output = root.section("output", {})
    directory = Path(output.string("directory", "diffsim-run")).expanduser()
    output_dir = directory if directory.is_absolute() else base_dir / directory
    for name in ("plot_every", "checkpoint_every"):
        value = output.number(name, None, integer=True, non_negative=True)
        if value is not None:
            trainer[name] = value
    output.finish()
    trainer["output_dir"] = output_dir
    if method in ESTIMATOR_METHODS:
        trainer["estimator"] = method

    export_section = root.section("export", {})
    formats = export_section.raw("formats", [])
    if not isinstance(formats, list) or not all(isinstance(f, str) for f in formats):
        raise export_section.error("formats", f"must be an array of format names, got {formats!r}")
    for k, name in enumerate(formats):
        if name not in EXPORT_FORMATS:
            raise ConfigError(
                f"export.formats[{k}]: unknown format {name!r}{_did_you_mean(name, EXPORT_FORMATS)}; "
                f"formats: {', '.join(EXPORT_FORMATS)}"
            )
    export_dir = Path(export_section.string("directory", str(output_dir / "export"))).expanduser()
    export_state = export_section.string("state", states[0].name)
    if export_state not in names:
        raise export_section.error(
            "state", f"no state named {export_state!r}{_did_you_mean(export_state, names)}; states: {names}"
        )
    export = {
        "formats": list(formats),
        "directory": export_dir if export_dir.is_absolute() else base_dir / export_dir,
        "state": export_state,
        "r_min": export_section.number("r_min", None, positive=True),
        "dr": export_section.number("dr", 0.002, positive=True),
        "n_points": export_section.number("n_points", 2000, integer=True, positive=True),
    }
    if export["r_min"] is not None and export["r_min"] >= table.cutoff:
        raise export_section.error("r_min", f"must be below the cutoff {table.cutoff} nm, got {export['r_min']}")
    export_section.finish()
    root.finish()

    if read_targets:
        for state, specs in zip(states, target_specs, strict=True):
            for spec in specs:
                if spec.file is not None:
                    target = _read_target(spec, state)
                    target._spec_path = spec.path
                    state.targets.append(target)
    return RunConfig(
        table=table,
        states=states,
        trainer=trainer,
        method=method,
        output_dir=output_dir,
        export=export,
        target_specs=target_specs,
        ibi=ibi_options,
    )


def load_config(path: Union[str, Path], *, read_targets: bool = True) -> RunConfig:
    """Read and validate a TOML run configuration.

    Parameters
    ----------
    path : str or Path
        The ``.toml`` file. Relative paths inside it are relative to its folder.
    read_targets : bool
        Read target files into the states (default True).

    Returns
    -------
    RunConfig

    Raises
    ------
    ConfigError
        For a missing file, invalid TOML or any malformed entry; the message
        names the key path (``state[1].temperature: must be positive, got -3``).

    Examples
    --------
    >>> config = load_config("argon.toml")            # doctest: +SKIP
    >>> trainer = config.make_trainer()               # doctest: +SKIP
    >>> history = trainer.fit()                       # doctest: +SKIP
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"configuration file not found: {path}")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc}") from exc
    try:
        data = _toml_module().loads(text)
    except Exception as exc:  # tomllib.TOMLDecodeError
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    config = parse_config(data, path.resolve().parent, read_targets=read_targets)
    config.path = path.resolve()
    return config


# -- the example ----------------------------------------------------------------------------------

_EXAMPLE = """\
# openmm-diffsim run configuration: learn the argon pair potential from its RDF.
#
# The demo case: liquid argon with the Lennard-Jones potential
# (sigma = 0.34 nm, epsilon = 0.996 kJ/mol, mass 39.948 amu) at T* = 1.2,
# rho* = 0.8. The target RDF is simulated from the true potential (see
# [[state.target]] below); a spline starting from the Boltzmann inversion of
# that RDF, on top of a fixed soft repulsive wall, learns it back.
#
# Units are OpenMM's: nm, ps, kJ/mol, K, amu, bar. Relative paths are
# relative to this file's folder. Unknown keys are errors, so typos are caught.

[potential]
species = ["Ar"]
cutoff = 1.0                 # nm; at most half the shortest box edge
cutoff_mode = "shift"        # "truncate" | "shift" | "switch" (then also switch_distance)

[potential.pairs."Ar-Ar"]
type = "spline"              # lennard-jones | wca | soft-sphere | yukawa | modified-morse | spline | neural
knots = 60                   # number of knots from r_min to r_max (or an array of positions)
r_min = 0.25                 # nm
r_max = 1.0                  # nm (defaults to the cutoff)
initial = "boltzmann"        # "zero" or "boltzmann" (-kT ln g from the first state's target)
# A fixed prior added to the learned part (trainable = true to train it too):
prior = { type = "soft-sphere", sigma = 0.3, epsilon = 0.996, exponent = 12 }

# Another choice, a neural correction on a repulsive prior:
# [potential.pairs."Ar-Ar"]
# type = "neural"
# n_basis = 32
# hidden = [64, 64]
# seed = 0
# prior = { type = "wca", sigma = 0.34, epsilon = 0.996 }

[[state]]
name = "liquid"
species = ["Ar"]
counts = [500]               # or a table: counts = { Ar = 500 }
masses = [39.948]            # amu (a single number applies to every species)
temperature = 143.8          # K   (T* = 1.2)
density = 20.36              # particles/nm^3 (rho* = 0.8); or box = [2.93, 2.93, 2.93] (nm)
# pressure = 1.0             # bar, adds a pressure term where the method supports it
# energy = -5.0              # kJ/mol per particle (pair energy), for an energy term
weight = 1.0                 # weight of this state in the loss

[[state.target]]
pair = "Ar-Ar"
# A target RDF from a file (two columns, r and g):
#   file = "argon_rdf.dat"
#   columns = [0, 1]
#   length_unit = "nm"       # or "angstrom"
# ... or, as here, simulated once from a reference potential (cached in the output folder):
reference = { type = "lennard-jones", sigma = 0.34, epsilon = 0.996 }

[training]
method = "reweighting"       # reweighting | rollout | adjoint | hybrid | ibi
learning_rate = 0.01
optimizer = "adam"           # "adam" | "sgd" | "natural" | "imc" | "gauss-newton" (the last two: reweighting only)
# imc_damping = 0.01         # imc: damping of the Newton step (relative to diag of J^T J)
# imc_smoothing = 0.1        # imc: penalty on the curvature of each step's change of u(r)
# imc_roughness = 0.01       # imc: penalty on the roughness of the learned correction itself
# max_potential_change = 0.5 # imc: largest change of u(r) per step, kT
# average_last = 4           # final potential = mean of the last 4 iterates
# lr_schedule = "constant"   # or "cosine"
max_epochs = 50
# clip_norm = 10.0           # clip the gradient norm
# target_loss = 1e-4         # stop when the loss falls below
# plateau_patience = 10      # stop after this many epochs without improvement
seed = 0

[sampling]
backend = "auto"             # OpenMM force used while sampling
# platform = "CPU"           # OpenMM platform (default: fastest available)
integrator = "langevin"
timestep = 0.002             # ps
friction = 1.0               # 1/ps
n_snapshots = 50             # snapshots per state and epoch
interval = 50                # MD steps between snapshots
equilibration = 1000         # MD steps before the first snapshot
# reequilibration = 100      # MD steps discarded after each parameter update (default 2 intervals)

[estimator]
# Options of the method's gradient estimator (openmm_diffsim.gradients), e.g.
# r_range = [0.0, 1.0]       # nm, RDF grid
# n_bins = 100
# smearing = 0.01            # nm, Gaussian smearing of model and target RDFs
# n_eff_threshold = 0.5      # reweighting: resample below this effective sample fraction

[output]
directory = "argon-run"      # checkpoints, history, plots
plot_every = 10              # epochs between plots (0: never)
checkpoint_every = 1         # epochs between checkpoints

[export]
formats = ["torchscript", "openmm-xml", "tabulated-xml"]   # also "gromacs", "lammps"
# directory = "argon-run/export"   # default: <output directory>/export
# state = "liquid"           # state whose composition, masses and box go into system XML
# r_min = 0.2                # nm, start of tables (default: where |u| drops below 1e5 kJ/mol)
# dr = 0.002                 # nm, GROMACS table spacing
# n_points = 2000            # LAMMPS table points
"""


def example_config() -> str:
    """A complete, commented example configuration (the argon demo) as TOML text."""
    return _EXAMPLE
