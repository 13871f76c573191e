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
# Markdown outputs (the results tables, boftlab.summary, the leaderboard) rendered as MyST, which has tables;
# myst-nb's default, "commonmark", shows a table as its raw pipe text
nb_render_markdown_format = "myst"
# README.md is included into the pages, not a page of its own
exclude_patterns = ["README.md"]
# "#section" links inside a page and across pages resolve to headings down to level 3 (a missing one is a warning)
myst_heading_anchors = 3
# a notebook's heading levels are its own (an exercise's H3 right under the title); the book fails on what breaks
suppress_warnings = ["myst.header"]
myst_enable_extensions = ["dollarmath", "amsmath", "deflist"]
# a widget renders from its saved state in the reader's browser (no kernel: it shows what the run drew), with the
# embedding script of the installed ipywidgets (myst-nb's default is ipywidgets 7's)
nb_ipywidgets_js = {
    "https://cdnjs.cloudflare.com/ajax/libs/require.js/2.3.4/require.min.js": {"crossorigin": "anonymous"},
    DEFAULT_EMBED_REQUIREJS_URL: {"data-jupyter-widgets-cdn": "https://cdn.jsdelivr.net/npm/", "crossorigin": "anonymous"},
}

# the look of a notebook book (what Jupyter Book uses): every notebook page has a Colab launch button and an .ipynb
# download (the executed notebook, from _sources/: html_copy_source)
html_theme = "sphinx_book_theme"
html_title = "boftlab"
html_theme_options = {
    "repository_url": "https://github.com/boftlab/boftlab",
    "repository_branch": "main",
    "path_to_docs": "",  # the book mirrors the repository's layout: notebooks/NN_name.ipynb
    "use_repository_button": True,
    "use_download_button": True,
    "launch_buttons": {"colab_url": "https://colab.research.google.com", "notebook_interface": "classic"},
    "home_page_in_toc": True,
    "show_toc_level": 2,
}
html_copy_source = True  # the .ipynb download button serves _sources/notebooks/NN_name.ipynb
html_sourcelink_suffix = ""  # ... under its own name, not NN_name.ipynb.txt
