"""Accept ``openmm.unit`` quantities at the API edge; work in OpenMM's units inside.

OpenMM's default units: nm, ps, kJ/mol, K, amu (dalton), e.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["to_float", "to_array", "strip_unit"]


def strip_unit(value, unit_name: str | None = None):
    """Return ``value`` as a plain number if it is a Quantity, unchanged otherwise.

    With ``unit_name`` (an ``openmm.unit`` attribute such as ``"nanometer"`` or
    ``"bar"``) the value is expressed in that unit and incompatible units raise;
    without it, in OpenMM's default unit system.
    """
    if hasattr(value, "value_in_unit_system"):
        from openmm import unit

        if unit_name is not None:
            target = getattr(unit, unit_name)
            if not value.unit.is_compatible(target):
                raise ValueError(f"expected a quantity compatible with {unit_name}, got unit {value.unit}")
            # Named units (bar, angstrom, ...) are honoured as named.
            return value.value_in_unit(target)
        return value.value_in_unit_system(unit.md_unit_system)
    return value


def to_float(value, name: str, unit_name: str | None = None) -> float:
    """A finite float in OpenMM units from a number or Quantity; the error names ``name``."""
    value = strip_unit(value, unit_name)
    try:
        out = float(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a number or an openmm.unit quantity, got {value!r}") from exc
    if not math.isfinite(out):
        raise ValueError(f"{name} must be finite, got {out}")
    return out


def to_array(value, name: str, unit_name: str | None = None) -> np.ndarray:
    """A float64 array in OpenMM units from an array, list of Vec3 or Quantity."""
    value = _strip_nested(value, unit_name)
    try:
        out = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be numeric, got {type(value).__name__}") from exc
    return out


def _strip_nested(value, unit_name: str | None):
    """Strip units from a Quantity or from the items of (nested) lists and tuples of them."""
    value = strip_unit(value, unit_name)
    if isinstance(value, (list, tuple)):
        return [_strip_nested(item, unit_name) for item in value]
    return value
