"""Sphinx configuration of the boftlab book: the executed notebooks, rendered with myst-nb and never re-executed.

``python docs/book/build_book.py`` assembles the source folder (this folder's pages, README.md, and the notebooks as
the tests executed them) and builds it with warnings as errors; see that file.
"""

from ipywidgets.embed import DEFAULT_EMBED_REQUIREJS_URL

project = "boftlab"
author = "boftlab contributors"
copyright = "boftlab contributors"

extensions = ["myst_nb"]
# the notebooks were executed by the test run (notebooks/conftest.py saves each one); the book only renders them
nb_execution_mode = "off"
# a cell's printed lines as one block, as Jupyter shows them
nb_merge_streams = True
# README.md is included into the landing page, not a page of its own
exclude_patterns = ["README.md"]
# "#section" links inside a page and across pages resolve to headings down to level 3 (a missing one is a warning)
myst_heading_anchors = 3
# a notebook's heading levels are its own (an exercise's H3 right under the title); the book fails on what breaks
suppress_warnings = ["myst.header"]
myst_enable_extensions = ["dollarmath", "amsmath"]
# a widget renders from its saved state in the reader's browser (no kernel: it shows what the run drew), with the
# embedding script of the installed ipywidgets (myst-nb's default is ipywidgets 7's)
nb_ipywidgets_js = {
    "https://cdnjs.cloudflare.com/ajax/libs/require.js/2.3.4/require.min.js": {"crossorigin": "anonymous"},
    DEFAULT_EMBED_REQUIREJS_URL: {"data-jupyter-widgets-cdn": "https://cdn.jsdelivr.net/npm/", "crossorigin": "anonymous"},
}

html_theme = "alabaster"
html_title = "boftlab"
html_theme_options = {
    "description": "Structured parameter-efficient fine-tuning, taught and reproduced.",
    "github_user": "boftlab",
    "github_repo": "boftlab",
    "github_button": False,
    "extra_nav_links": {"Source on GitHub": "https://github.com/boftlab/boftlab"},
    "page_width": "1200px",
}
html_show_sourcelink = False
html_copy_source = False  # the pages, not the notebooks again
