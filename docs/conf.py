"""Sphinx configuration for openmm-diffsim (MyST Markdown + NumPy docstrings)."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "openmm-diffsim"
author = "openmm-diffsim developers"
copyright = "2026, openmm-diffsim developers"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
myst_enable_extensions = ["dollarmath", "colon_fence"]
napoleon_numpy_docstring = True
napoleon_google_docstring = False
# "path" in parameter types means any os.PathLike, not a class of this package.
napoleon_preprocess_types = True
napoleon_type_aliases = {"path": "os.PathLike", "array_like": "numpy.typing.ArrayLike"}
autodoc_member_order = "bysource"
autodoc_typehints = "none"
autodoc_default_options = {"members": True, "show-inheritance": True}
exclude_patterns = ["_build"]
suppress_warnings = ["myst.header"]
nitpicky = False
try:
    import sphinx_rtd_theme  # noqa: F401

    html_theme = "sphinx_rtd_theme"
except ImportError:  # pragma: no cover
    html_theme = "alabaster"
