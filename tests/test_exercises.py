"""The exercises of notebooks 01–06: every solution passes its checker, every notebook's blank template does not
(and reads "not attempted yet"), wrong answers and crashing code are reported, never raised."""

import json
import re
from pathlib import Path

import pytest

from boftlab.teaching import exercises, solutions

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
CHECK_CALL = re.compile(r'^check\("(\d+\.\d+)", (\w+)\)', re.M)


def exercise_cells() -> dict[str, tuple[str, str, str, str]]:
    """Exercise id -> (notebook, its heading, its template cell's source, the name the checking cell passes)."""
    found = {}
    for path in sorted(NOTEBOOKS.glob("0[1-6]_*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        sources = ["".join(c["source"]) for c in cells]
        for i, source in enumerate(sources):
            if cells[i]["cell_type"] == "code" and (match := CHECK_CALL.search(source)):
                heading = next(s for s in reversed(sources[:i]) if s.lstrip().startswith("### Exercise"))
                found[match.group(1)] = (path.stem, heading.splitlines()[0], sources[i - 1], match.group(2))
    return found


CELLS = exercise_cells()


def test_at_least_twelve_exercises_across_the_theory_notebooks():
    assert len(exercises.EXERCISES) >= 12
    assert {e.notebook for e in exercises.EXERCISES.values()} == {p.stem for p in NOTEBOOKS.glob("0[1-6]_*.ipynb")}


@pytest.mark.parametrize("exercise", list(exercises.EXERCISES))
def test_each_exercise_has_a_heading_a_template_and_a_checking_cell_in_its_notebook(exercise):
    notebook, heading, template, _ = CELLS[exercise]
    entry = exercises.EXERCISES[exercise]
    assert notebook == entry.notebook
    assert heading.startswith(f"### Exercise {exercise} — {entry.title}")
    assert "NotImplementedError" in template or "..." in template


@pytest.mark.parametrize("exercise", list(exercises.EXERCISES))
def test_the_solution_passes_its_checker(exercise):
    entry = exercises.EXERCISES[exercise]
    solution = getattr(solutions, entry.solution)
    assert solution.__doc__.startswith(f"Exercise {exercise}.")
    result = exercises.check(exercise, solution if entry.answer == "function" else solution())
    assert result.passed, result.message


@pytest.mark.parametrize("exercise", list(exercises.EXERCISES))
def test_the_blank_template_in_the_notebook_does_not_pass(exercise):
    _, _, template, name = CELLS[exercise]
    namespace: dict = {}
    exec(compile(template, f"template {exercise}", "exec"), namespace)
    result = exercises.check(exercise, namespace[name])
    assert not result.passed
    assert result.message.startswith("Not attempted yet")


@pytest.mark.parametrize("exercise", list(exercises.EXERCISES))
def test_a_wrong_answer_fails_with_a_message_and_crashing_code_is_reported(exercise):
    entry = exercises.EXERCISES[exercise]
    wrong = (lambda *args: 0) if entry.answer == "function" else (1, 1)
    result = exercises.check(exercise, wrong)
    assert not result.passed and result.message and not result.message.startswith("Not attempted")

    def crashes(*args):
        raise ZeroDivisionError("boom")

    if entry.answer == "function":
        assert exercises.check(exercise, crashes).message == "Your code raised ZeroDivisionError: boom"


def test_an_unknown_exercise_is_named_not_raised():
    result = exercises.check("9.9", 1)
    assert not result.passed and "1.1" in result.message


def test_the_readme_course_lists_every_exercise_with_its_checker_and_solution():
    section = (NOTEBOOKS.parent / "README.md").read_text().split("## Course")[1].split("\n## ")[0]
    for e in exercises.EXERCISES.values():
        assert f"| {e.id} | {e.title} | [`{e.notebook}`]" in section
        assert f"`{e.checker.__name__}` | `{e.solution}` |" in section
