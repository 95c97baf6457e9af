"""Sphinx configuration: the API reference from the docstrings (autodoc + napoleon, Google style) and the
Markdown guides (MyST). Build: ``python -m sphinx -W -b html docs /tmp/bnjax-docs`` (``pip install -e ".[docs]"``)."""

import bnjax

project = "bnjax"
author = "bnjax contributors"
copyright = "bnjax contributors"
release = bnjax.__version__
version = release

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "myst_parser"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
root_doc = "index"

autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
myst_heading_anchors = 3
# The guides link to files outside docs/ (the front page, the experiment's README), which read as links on
# GitHub and are not Sphinx documents; tests/test_readme.py checks that every relative link's file exists.
suppress_warnings = ["myst.xref_missing"]

html_theme = "alabaster"
html_title = f"bnjax {release}"
