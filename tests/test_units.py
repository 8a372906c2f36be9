"""openmm.unit quantities at the API edge."""

from pathlib import Path

import numpy as np
import pytest
from openmm import unit

from openmm_diffsim.units import to_array, to_float


def test_quantities_convert_to_the_named_unit():
    assert to_float(1.0 * unit.atmosphere, "pressure", "bar") == pytest.approx(1.01325)
    assert to_float(3.4 * unit.angstrom, "sigma", "nanometer") == pytest.approx(0.34)
    assert to_float(0.996 * unit.kilojoule_per_mole, "epsilon") == pytest.approx(0.996)
    assert to_float(2.0, "plain") == 2.0


def test_lists_of_quantities_and_quantity_arrays():
    masses = to_array([39.948 * unit.dalton, 4.0026 * unit.dalton], "masses", "dalton")
    np.testing.assert_allclose(masses, [39.948, 4.0026])
    box = to_array(np.array([30.0, 31.0, 32.0]) * unit.angstrom, "box", "nanometer")
    np.testing.assert_allclose(box, [3.0, 3.1, 3.2])
    mixed = to_array([1.0 * unit.angstrom, 0.2], "r", "nanometer")
    np.testing.assert_allclose(mixed, [0.1, 0.2])


def test_incompatible_or_bad_values_are_named():
    with pytest.raises(ValueError, match="compatible with dalton"):
        to_array([300.0 * unit.kelvin], "masses", "dalton")
    with pytest.raises(ValueError, match="temperature must be finite"):
        to_float(float("nan"), "temperature", "kelvin")
    with pytest.raises(TypeError, match="cutoff must be a number"):
        to_float("far", "cutoff")


def test_example_config_in_examples_is_current():
    from openmm_diffsim.config import example_config

    shipped = Path(__file__).resolve().parents[1] / "examples" / "argon.toml"
    assert shipped.read_text() == example_config()
