"""The exercises of notebooks 01–10: every solution passes its checker, every notebook's blank template does not
(and reads "not attempted yet"), wrong answers and crashing code are reported, never raised."""

import inspect
import json
import re
from pathlib import Path

import pytest
import torch

from boftlab.teaching import exercises, solutions

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
CHECK_CALL = re.compile(r'^check\("(\d+\.\d+)", (\w+)\)', re.M)
#: the notebooks with exercises: 01–10 (00 is a demo)
COURSE = [p for p in sorted(NOTEBOOKS.glob("[01][0-9]_*.ipynb")) if not p.name.startswith("00_")]


def exercise_cells() -> dict[str, tuple[str, str, str, str]]:
    """Exercise id -> (notebook, its heading, its template cell's source, the name the checking cell passes)."""
    found = {}
    for path in COURSE:
        cells = json.loads(path.read_text())["cells"]
        sources = ["".join(c["source"]) for c in cells]
        for i, source in enumerate(sources):
            if cells[i]["cell_type"] == "code" and (match := CHECK_CALL.search(source)):
                heading = next(s for s in reversed(sources[:i]) if s.lstrip().startswith("### Exercise"))
                found[match.group(1)] = (path.stem, heading.splitlines()[0], sources[i - 1], match.group(2))
    return found


CELLS = exercise_cells()


def test_at_least_twenty_exercises_one_or_more_in_every_course_notebook():
    assert len(exercises.EXERCISES) >= 20
    assert {e.notebook for e in exercises.EXERCISES.values()} == {p.stem for p in COURSE}


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
        message = exercises.check(exercise, crashes).message
        assert message.startswith("Your code raised ZeroDivisionError: boom (in crashes, line ")
        assert 'raise ZeroDivisionError("boom")' in message and "Hint " in message  # where, and a hint


def test_hints_go_from_a_nudge_to_more_on_later_tries_and_the_student_version_gives_the_first_only():
    exercises.TRIES.clear()
    ladder = exercises.HINTS["1.3"]
    wrong = lambda skew: skew  # noqa: E731
    said = [exercises.check("1.3", wrong).message for _ in range(len(ladder) + 1)]
    for step, message in enumerate(said[:len(ladder)], start=1):
        assert f"Hint {step} of {len(ladder)}: {ladder[step - 1]}" in message
    assert f"Hint {len(ladder)} of {len(ladder)}" in said[-1]  # the last hint stays
    assert f"Hint 1 of {len(ladder)}: {ladder[0]}" in exercises.check("1.3", wrong, hints="first").message
    assert "Hint" not in exercises.check("1.3", ...).message  # not attempted: no hint, no try counted
    assert "Hint" not in exercises.check("1.3", solutions.cayley).message
    with pytest.raises(ValueError, match="'all'.*'first'"):
        exercises.check("1.3", wrong, hints="some")


@pytest.mark.parametrize("exercise", list(exercises.EXERCISES))
def test_every_exercise_has_graded_hints_that_never_give_the_code(exercise):
    """The hints for 1.3 and 5.2 printed the solution's code on the first wrong try."""
    ladder = exercises.HINTS[exercise]
    assert len(ladder) >= 2 and len(set(ladder)) == len(ladder)
    source = inspect.getsource(getattr(solutions, exercises.EXERCISES[exercise].solution))
    body = [line.strip() for line in source.split('"""')[-1].splitlines() if len(line.strip()) > 12]
    for hint in ladder:
        assert not re.search(r"\btorch\.[\w.]+\(", hint), hint  # no call written out
        assert not any(line in hint for line in body), hint


def test_every_solution_is_shown_by_its_exercise_id(capsys):
    for exercise, entry in exercises.EXERCISES.items():
        solutions.show(exercise)
        assert f"def {entry.solution}(" in capsys.readouterr().out
    with pytest.raises(ValueError, match="9.9.*1.1"):
        solutions.show("9.9")


def test_the_notebooks_point_to_solutions_show_which_works_in_every_notebook():
    """``solutions.X??`` failed in 02–06, where only 01 imported ``solutions``."""
    for exercise, (notebook, _, _, _) in CELLS.items():
        text = (NOTEBOOKS / f"{notebook}.ipynb").read_text()
        assert f'boftlab.teaching.solutions.show(\\"{exercise}\\")' in text


def test_an_unknown_exercise_is_named_not_raised():
    result = exercises.check("9.9", 1)
    assert not result.passed and "1.1" in result.message


def test_the_readme_course_lists_every_exercise_with_its_checker_and_solution():
    section = (NOTEBOOKS.parent / "README.md").read_text().split("## Course")[1].split("\n## ")[0]
    for e in exercises.EXERCISES.values():
        assert f"| {e.id} | {e.title} | [`{e.notebook}`]" in section
        assert f"`{e.checker.__name__}` | `{e.solution}` |" in section


def _solution(exercise):
    entry = exercises.EXERCISES[exercise]
    solution = getattr(solutions, entry.solution)
    return solution if entry.answer == "function" else solution()


@pytest.mark.parametrize("exercise, answer", [
    ("4.1", lambda rotation: float("nan")),
    ("4.1", lambda rotation: torch.tensor(float("inf"))),
    ("1.3", lambda skew: torch.full_like(skew, float("nan"))),
    ("5.2", lambda c, x: solutions.circulant_matvec(c, x) + 1e3j),
    ("5.2", lambda c, x: torch.fft.ifft(torch.fft.fft(c) * torch.fft.fft(x))),  # right up to rounding, but complex
    ("5.1", lambda m: solutions.displacement(m).numpy() * float("nan")),
    ("1.4", float("nan")),
    ("1.4", 5 + 0j),
    ("3.2", True),
], ids=["4.1-nan", "4.1-inf-tensor", "1.3-nan", "5.2-garbage-imaginary", "5.2-complex", "5.1-nan-numpy",
        "1.4-nan", "1.4-complex", "3.2-bool"])
def test_non_finite_and_complex_answers_fail(exercise, answer):
    """4.1 passed an answer returning NaN (|NaN − x| > tol is False); 5.2 passed a complex result whatever its
    imaginary part (.double() drops it)."""
    result = exercises.check(exercise, answer)
    assert not result.passed, result.message
    assert re.search(r"NaN|finite|complex|should be", result.message), result.message


def _right_answers_in_other_types():
    np = pytest.importorskip("numpy")
    yield "1.4", np.int64(solutions.neumann_terms()), "NumPy int64"
    yield "1.4", torch.tensor(solutions.neumann_terms()), "0-d tensor"
    yield "1.4", [solutions.neumann_terms()], "a list"
    yield "2.1", lambda d, b, i: solutions.butterfly_permutation(d, b, i).tolist(), "a list"
    yield "2.1", lambda d, b, i: solutions.butterfly_permutation(d, b, i).numpy(), "NumPy ndarray"
    yield "2.2", lambda d, b, m: np.int64(solutions.outputs_reached(d, b, m)), "NumPy int64"
    yield "2.3", list(solutions.dense_butterfly_384()), "a list"
    yield "3.1", lambda *case: torch.tensor(solutions.boft_layer_count(*case)), "0-d tensor"
    yield "3.2", np.int64(solutions.vit_lora_count()), "NumPy int64"
    yield "3.3", tuple(np.int64(v) for v in solutions.budget_choice()), "NumPy int64"
    yield "4.1", lambda rotation: torch.tensor(solutions.identity_error(rotation)), "0-d tensor"
    yield "4.1", lambda rotation: np.float64(solutions.identity_error(rotation)), "NumPy float64"
    yield "5.2", lambda c, x: solutions.circulant_matvec(c, x).numpy(), "NumPy ndarray"
    yield "6.2", lambda shape, ranks: [solutions.tucker_count(shape, ranks)], "a list"


@pytest.mark.parametrize("exercise, answer, said", list(_right_answers_in_other_types()))
def test_right_answers_as_numpy_scalars_tensors_or_lists_pass_and_say_they_were_converted(exercise, answer, said):
    """1.4, 2.1 and 4.1 refused right answers given as a NumPy int, a list or a 0-d tensor, printing an "expected"
    value identical to the answer."""
    result = exercises.check(exercise, answer)
    assert result.passed, result.message
    assert "Read your answer as" in result.message and said in result.message, result.message
    assert "Read your answer as" not in exercises.check(exercise, _solution(exercise)).message
