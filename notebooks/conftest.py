"""nbmake executes each notebook; a notebook that passes is saved as executed in build/executed/, from which
docs/book/build_book.py renders the book without executing anything again."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "docs" / "book"))
from build_book import discard_executed, save_executed  # noqa: E402

try:
    from nbmake.nb_run import NotebookRun
except ImportError:  # without nbmake no notebook runs here
    NotebookRun = None

#: notebook path -> the notebook nbmake executed, until its test item has passed
EXECUTED = {}

if NotebookRun is not None:
    execute = NotebookRun.execute

    def execute_and_keep(self):
        result = execute(self)
        EXECUTED[Path(self.filename).resolve()] = result.nb
        return result

    NotebookRun.execute = execute_and_keep


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    discard_executed(item.path)  # a notebook that fails now leaves no older copy for the book
    try:
        outcome = yield  # nbmake executes the notebook (and raises if a cell fails)
    finally:
        nb = EXECUTED.pop(Path(item.path).resolve(), None)
    if nb is not None:
        save_executed(nb, item.path)
    return outcome
