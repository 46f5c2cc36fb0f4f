"""Sphinx configuration: builds offline (no intersphinx), warnings are errors in CI (-W)."""

import importlib.util
import os
import sys

sys.path.insert(0, os.path.abspath("../src"))

import clreg

project = "clreg"
author = "clreg developers"
copyright = "2026, clreg developers"
version = release = clreg.__version__

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.mathjax", "sphinx.ext.viewcode"]
autodoc_member_order = "bysource"
# the integrations' frameworks are optional extras: documented from stand-ins where not installed
autodoc_mock_imports = [m for m in ("lightning", "transformers", "peft") if importlib.util.find_spec(m) is None]
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
nitpicky = False
suppress_warnings = ["ref.python"]
exclude_patterns = ["_build"]
html_theme = "alabaster"
html_static_path: list[str] = []
