"""The teacher kit (boftlab.teaching.kit, ``python -m boftlab.teaching``) on the repository's own notebooks: student
copies without solutions, model answers or outputs and with nbgrader metadata; grading from submitted notebooks
(read, or executed) into a CSV; a reveal.js deck per class."""

import csv
import json
import re
from pathlib import Path

import pytest

from boftlab.teaching import exercises, kit, solutions

ROOT = Path(__file__).resolve().parents[1]
COURSE = kit.course_notebooks()


def cells_tagged(nb: dict, tag: str) -> list[dict]:
    return [c for c in nb["cells"] if tag in c.get("metadata", {}).get("tags", [])]


def source(cell: dict) -> str:
    return "".join(cell["source"])


def test_every_exercise_of_the_checkers_is_tagged_in_its_notebook_and_01_to_06_are_the_course():
    tagged = {}
    for path in COURSE:
        for exercise in kit.tagged_exercises(json.loads(path.read_text())):
            tagged[exercise] = path.stem
    assert tagged == {e.id: e.notebook for e in exercises.EXERCISES.values()}
    assert {p.stem[:2] for p in COURSE} >= {"01", "02", "03", "04", "05", "06", "07", "08", "09", "10"}


@pytest.fixture(scope="module")
def students(tmp_path_factory):
    out = tmp_path_factory.mktemp("students")
    assert kit.main(["student", str(out)]) == 0
    return out


def test_student_notebooks_have_no_outputs_solutions_or_model_answers_and_first_hints_only(students):
    assert sorted(p.name for p in students.iterdir()) == [p.name for p in COURSE]
    for path in COURSE:
        teacher, student = json.loads(path.read_text()), json.loads((students / path.name).read_text())
        kept = [c for c in teacher["cells"] if kit.MODEL not in c.get("metadata", {}).get("tags", [])]
        assert [c["id"] for c in student["cells"]] == [c["id"] for c in kept]
        text = json.dumps(student)
        assert "*Solution:*" not in text and "solutions.show" not in text
        assert not cells_tagged(student, kit.MODEL)
        assert all(c.get("outputs", []) == [] for c in student["cells"])
        for cell in cells_tagged(student, kit.CHECK):
            assert re.search(r'check\("\d+\.\d+", \w+, hints="first"\)', source(cell))
        assert student["metadata"]["boftlab"] == {"version": "student"}


def test_student_notebooks_carry_nbgrader_metadata_on_every_graded_cell(students):
    ids = []
    for path in COURSE:
        nb = json.loads((students / path.name).read_text())
        for tag, solution, grade in ((kit.TEMPLATE, True, False), (kit.CHECK, False, True),
                                     (kit.WRITTEN, True, True)):
            for cell in cells_tagged(nb, tag):
                meta = cell["metadata"]["nbgrader"]
                assert (meta["solution"], meta["grade"], meta["schema_version"]) == (solution, grade, 3)
                assert re.fullmatch(r"[A-Za-z0-9_-]+", meta["grade_id"]) and meta.get("points", 1) == 1
                ids.append(meta["grade_id"])
    assert len(ids) == len(set(ids)) and len(ids) >= 2 * len(exercises.EXERCISES)


def test_a_mistagged_notebook_is_refused_naming_the_cell():
    check = {"cell_type": "code", "id": "c1", "metadata": {"tags": [kit.CHECK]}, "source": "print(1)", "outputs": []}
    with pytest.raises(ValueError, match="c1.*does not call check"):
        kit.student_notebook({"cells": [check], "metadata": {}})
    template = {"cell_type": "code", "id": "t1", "metadata": {"tags": [kit.TEMPLATE]}, "source": "x = ...",
                "outputs": []}
    with pytest.raises(ValueError, match="t1 has no exercise-check"):
        kit.student_notebook({"cells": [template], "metadata": {}})


def answered(nb: dict, answers: dict) -> dict:
    """``nb`` as a student would hand it in after running it: each check cell's output is what ``check`` prints for
    the answer in ``answers`` (exercise -> answer; a missing exercise's cell never ran), a written answer filled."""
    for cell in cells_tagged(nb, kit.CHECK):
        exercise = kit.CHECK_CALL.search(source(cell))["id"]
        if exercise in answers:
            result = exercises.check(exercise, answers[exercise], hints="first")
            cell["outputs"] = [{"output_type": "execute_result", "execution_count": 1, "metadata": {},
                                "data": {"text/plain": repr(result)}}]
    return nb


def test_grade_reads_submitted_notebooks_into_a_csv_of_students_by_exercises(students, tmp_path):
    primer = json.loads((students / "01_primer.ipynb").read_text())
    submissions = {
        "alice": {"1.1": solutions.lora_delta, "1.2": lambda w: w, "1.3": ...},
        "bob": {},
    }
    for name, answers in submissions.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "01_primer.ipynb").write_text(json.dumps(answered(json.loads(json.dumps(primer)), answers)))
    (tmp_path / "carol").mkdir()  # handed in nothing
    assert kit.main(["grade", str(tmp_path)]) == 0
    with open(tmp_path / "grades.csv", newline="") as file:
        rows = {row["student"]: row for row in csv.DictReader(file)}
    assert list(rows) == ["alice", "bob", "carol"]
    assert {k: rows["alice"][k] for k in ("1.1", "1.2", "1.3", "1.4", "6.2")} == {
        "1.1": "passed", "1.2": "failed", "1.3": "not attempted", "1.4": "not attempted", "6.2": "not attempted"}
    assert set(list(rows["bob"].values())[1:]) == {"not attempted"}
    columns = list(rows["alice"])[1:]
    assert set(exercises.EXERCISES) <= set(columns)


def test_grade_summary_counts_and_a_changed_check_cell_is_failed(students, tmp_path):
    nb = answered(json.loads((students / "02_information_transmission.ipynb").read_text()),
                  {"2.1": solutions.butterfly_permutation, "2.2": solutions.outputs_reached})
    check = cells_tagged(nb, kit.CHECK)[1]
    check["source"] = 'print("Exercise 2.2 — passed. trust me")'  # a student who fakes the verdict
    (tmp_path / "dave").mkdir()
    (tmp_path / "dave" / "02.ipynb").write_text(json.dumps(nb))
    rows, summary = kit.grade(tmp_path, exercises=["2.1", "2.2", "2.3"])
    assert rows[0]["2.1"] == "passed" and rows[0]["2.3"] == "not attempted"
    assert rows[0][check["metadata"]["nbgrader"]["grade_id"]] == "failed (check cell changed)"
    assert summary.startswith("1 student(s) × 3 exercise(s)/question(s): 1 passed") and "1 failed" in summary


def test_grade_executes_a_submitted_notebook_when_asked(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the kernel imports this checkout's boftlab
    nb = {"nbformat": 4, "nbformat_minor": 5, "metadata": {"kernelspec": {"name": "python3", "language": "python",
                                                                           "display_name": "Python 3"}},
          "cells": [{"cell_type": "code", "id": "t", "metadata": {"tags": [kit.TEMPLATE]}, "execution_count": None,
                     "outputs": [], "source": "from boftlab.teaching.solutions import tucker_count as mine"},
                    {"cell_type": "code", "id": "c", "metadata": {"tags": [kit.CHECK]}, "execution_count": None,
                     "outputs": [], "source": 'from boftlab.teaching.exercises import check\n\ncheck("6.2", mine)'}]}
    (tmp_path / "erin").mkdir()
    (tmp_path / "erin" / "06.ipynb").write_text(json.dumps(nb))
    rows, _ = kit.grade(tmp_path, run=True, exercises=["6.2"])
    assert rows == [{"student": "erin", "6.2": "passed"}]


def test_grade_refuses_a_folder_without_student_folders(tmp_path, capsys):
    assert kit.main(["grade", str(tmp_path)]) == 2
    assert "no student folders" in capsys.readouterr().err


def test_without_the_course_notebooks_the_kit_says_where_to_point_it(tmp_path, capsys):
    """An installed boftlab has no notebooks/: the commands say so instead of writing nothing."""
    assert kit.main(["student", str(tmp_path / "out"), "--notebooks", str(tmp_path / "none")]) == 2
    assert "--notebooks" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_slide_types_follow_the_headings_and_a_cells_own_metadata_wins():
    md = lambda text, **meta: {"cell_type": "markdown", "source": text, "metadata": meta}  # noqa: E731
    assert kit.slide_type(md("# 01 · Primer")) == "slide" and kit.slide_type(md("## 2. Butterflies")) == "slide"
    assert kit.slide_type(md("### Exercise 1.1 — LoRA")) == "subslide" and kit.slide_type(md("text")) == "-"
    assert kit.slide_type(md("## x", slideshow={"slide_type": "notes"})) == "notes"
    assert kit.slide_type({"cell_type": "code", "source": 'BOFTLAB_REF = "v0"', "metadata": {}}) == "skip"


def test_slides_write_one_reveal_deck_per_class(tmp_path):
    pytest.importorskip("nbconvert")
    assert kit.main(["slides", str(tmp_path), "--without-outputs"]) == 0
    decks = sorted(tmp_path.glob("*.slides.html"))
    assert [p.name for p in decks] == [f"class-{k}.slides.html" for k in kit.CLASSES]
    for number, deck in zip(kit.CLASSES, decks):
        html = deck.read_text()
        title, names = kit.CLASSES[number]
        assert "reveal" in html.lower() and f"Class {number}: {title}" in html
        assert html.count("<section") > 10


def test_slides_without_the_executed_notebooks_are_refused_saying_how_to_make_them(tmp_path, capsys):
    assert kit.main(["slides", str(tmp_path), "--executed", str(tmp_path / "none")]) == 2
    assert "run the notebooks' tests first" in capsys.readouterr().err and not list(tmp_path.glob("*.html"))
