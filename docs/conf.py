"""Sphinx configuration of the regops documentation site (built by scripts/docs.sh; warnings are errors).

The Markdown pages are read by MyST; the API reference (docs/api/, generated at build time from the public
namespaces' ``__all__``) by autodoc with napoleon's Google style; the benchmark tables from
benchmarks/results/**.json (docs/_ext/regops_docs.py).
"""

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))
sys.path.insert(1, str(HERE.parent))  # benchmarks.harness draws the benchmark plots
# Importing regops here (autodoc does) must not initialise CUDA or compile anything.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import regops  # noqa: E402

project = "regops"
author = "the regops authors"
copyright = "the regops authors"
release = regops.__version__
version = ".".join(release.split("+")[0].split(".")[:2])

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "regops_docs",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_ext", "_generated", "Thumbs.db", ".DS_Store"]

# `name` in a docstring (plain backticks, readable in help()) links to the object where Sphinx knows it.
default_role = "py:obj"
myst_enable_extensions = ["dollarmath", "amsmath", "deflist"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options: dict[str, bool] = {}
autodoc_inherit_docstrings = False
autoclass_content = "both"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
add_module_names = True

html_theme = "alabaster"
html_title = f"regops {release}"
html_theme_options = {"description": "Fused, memory-light regularization ops for PyTorch", "fixed_sidebar": True}
html_static_path: list[str] = []
