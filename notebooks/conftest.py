"""nbmake executes each notebook; this checks what the executed copy shows (tests/notebook_outputs.py: every figure
as an image, no warning) as part of the same test, and saves a notebook that passes as executed in build/executed/,
from which docs/book/build_book.py renders the book — so no notebook is executed twice."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from notebook_outputs import problems  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "docs" / "book"))
from build_book import discard_executed, save_executed  # noqa: E402

try:
    from nbmake.nb_result import NotebookError, NotebookResult
    from nbmake.nb_run import NotebookRun
    from nbmake.pytest_items import NotebookFailedException
except ImportError:  # without nbmake no notebook runs here
    NotebookRun = None

#: notebook path -> the notebook nbmake executed, until its test item checks it
EXECUTED = {}

if NotebookRun is not None:
    execute = NotebookRun.execute

    def execute_and_keep(self):
        result = execute(self)
        EXECUTED[Path(self.filename).resolve()] = result.nb
        return result

    NotebookRun.execute = execute_and_keep


def pytest_collection_modifyitems(items):
    """Every notebook nbmake executes is marked ``notebooks`` (``-m "not notebooks"`` leaves them out)."""
    for item in items:
        if item.path.suffix == ".ipynb":
            item.add_marker(pytest.mark.notebooks)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    discard_executed(item.path)  # a notebook that fails now leaves no older copy for the book
    try:
        outcome = yield  # nbmake executes the notebook (and raises if a cell fails)
    finally:
        nb = EXECUTED.pop(Path(item.path).resolve(), None)
    if nb is not None:
        found = problems(nb, item.path.stem)
        if found:
            summary = f"{item.path.name} ran, but its outputs are not what a student should see"
            error = NotebookError(summary=summary, trace="\n".join([summary, *found]), failing_cell_index=0)
            raise NotebookFailedException(NotebookResult(nb=nb, error=error))
        save_executed(nb, item.path)
    return outcome
