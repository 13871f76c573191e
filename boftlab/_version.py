"""boftlab's version, written once: ``boftlab.__version__``, the version saving.py and checkpoints.py write into every
file, and the package's own (pyproject.toml reads it: ``[tool.setuptools.dynamic]``). A leaf: it imports nothing."""

__version__ = "0.1.0"
