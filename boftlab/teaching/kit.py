"""The teacher kit: hand out student notebooks, grade what comes back, make a slide deck per class.

    python -m boftlab.teaching student OUT        # student copies of the course notebooks -> OUT/
    python -m boftlab.teaching grade FOLDER       # FOLDER/<student>/*.ipynb -> FOLDER/grades.csv and a summary line
    python -m boftlab.teaching slides OUT         # one reveal.js deck per class -> OUT/class-<k>.slides.html

Everything reads the notebooks' cell tags, so a notebook joins the kit by tagging its cells (07–10 can be tagged the
same way later):

* ``exercise-template`` — the code cell a student fills in (a function raising ``NotImplementedError``, or ``...``);
* ``exercise-check``    — the cell right after it, ``check("N.k", answer)``: its printed verdict is the grade;
* ``written-answer``    — a markdown cell in which the student answers a written question "Question N.w — …";
* ``model-answer``      — the model answer to that question (instructor version only: ``student`` removes it).

``student`` keeps the notebooks' text and code, and removes outputs, model answers and the "*Solution:*" pointers;
its checking cells ask for the first hint only (``check(..., hints="first")``); every graded cell carries nbgrader's
cell metadata (``grade_id``, ``points``, ``solution``/``grade``/``locked``), so the notebooks also load in nbgrader's
formgrader. The solutions still ship inside the ``boftlab`` package (``boftlab.teaching.solutions``): a student who
looks for them finds them, as with any published course; the kit removes only what the notebooks themselves show.

``grade`` reads each exercise's verdict from the checking cell's output (``--execute`` runs every notebook first, in
its own folder, so the verdicts are this run's and not whatever a submitted file holds). A check cell whose source no
longer calls ``check`` on its exercise is "failed (check cell changed)"; one that never ran is "not attempted".
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
EXECUTED = ROOT / "build" / "executed"

TEMPLATE, CHECK, WRITTEN, MODEL = "exercise-template", "exercise-check", "written-answer", "model-answer"
#: a checking cell: ``check("N.k", answer)`` (the student version adds ``hints="first"``)
CHECK_CALL = re.compile(r'^check\("(?P<id>\d+\.\d+)", (?P<answer>\w+)(?P<rest>[^)\n]*)\)', re.M)
#: a written question's heading in a markdown cell: "### Question N.w — title"
QUESTION = re.compile(r"^#+ Question (?P<id>\d+\.w\d*) — ", re.M)
#: the solution pointer under an exercise heading: a paragraph that starts with "*Solution:*"
SOLUTION_POINTER = re.compile(r"\n*^\*Solution:\*.*?(?=\n\n|\Z)", re.M | re.S)
#: the printed verdict of a checking cell (``exercises.Result``'s repr)
VERDICT = re.compile(r"Exercise (?P<id>\d+\.\d+) — (?P<status>passed|not passed yet)\. (?P<message>.*)", re.S)

#: the three classes of the syllabus (docs/book/syllabus.md): title and notebooks, in teaching order
CLASSES = {
    1: ("LoRA, OFT and butterflies", ("00_quickstart", "01_primer", "02_information_transmission")),
    2: ("How many parameters, how expressive", ("03_parameter_counts", "04_expressivity")),
    3: ("Beyond rotations", ("05_structured_matrices", "06_tensor_core", "07_vit_finetuning")),
}
PASSED, FAILED, NOT_ATTEMPTED = "passed", "failed", "not attempted"
#: what a written-answer cell holds until the student writes in it
ANSWER_PLACEHOLDER = "*Your answer here.*"


def _source(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def _tags(cell: dict) -> list[str]:
    return cell.get("metadata", {}).get("tags", [])


def _grade_id(name: str) -> str:
    """nbgrader's grade_id allows letters, digits, _ and -: "1.3" -> "ex-1-3"."""
    return "ex-" + name.replace(".", "-")


def tagged_exercises(nb: dict) -> list[str]:
    """The exercise ids of ``nb``'s tagged checking cells, in order."""
    return [CHECK_CALL.search(_source(c))["id"] for c in nb["cells"] if CHECK in _tags(c)]


def tagged_questions(nb: dict) -> list[str]:
    """The ids ("N.w1", …) of ``nb``'s written questions: the heading above each ``written-answer`` cell."""
    found, last = [], None
    for cell in nb["cells"]:
        if cell["cell_type"] == "markdown" and (match := QUESTION.search(_source(cell))):
            last = match["id"]
        if WRITTEN in _tags(cell):
            if last is None:
                raise ValueError(f"a written-answer cell ({cell.get('id')}) has no \"### Question N.w — …\" heading "
                                 "above it; tag the answer cell after its question")
            found.append(last)
    return found


def student_notebook(nb: dict) -> dict:
    """A copy of ``nb`` for students: no outputs, no model answers, no solution pointers, checking cells that give
    the first hint only, and nbgrader metadata on every exercise and written-answer cell. Raises ``ValueError`` if
    a tagged cell is not what its tag says (a check cell without ``check("N.k", …)``, a template without a check
    cell after it), naming the cell."""
    nb = copy.deepcopy(nb)
    cells, pending = [], None  # pending: a template cell waiting for its checking cell
    questions = iter(tagged_questions(nb))
    for cell in nb["cells"]:
        tags = _tags(cell)
        if MODEL in tags:
            continue
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
        if cell["cell_type"] == "markdown":
            cell["source"] = SOLUTION_POINTER.sub("", _source(cell))
        if TEMPLATE in tags:
            if pending is not None:
                raise ValueError(f"template cell {pending.get('id')} has no exercise-check cell after it")
            pending = cell
        if CHECK in tags:
            match = CHECK_CALL.search(_source(cell))
            if match is None:
                raise ValueError(f"cell {cell.get('id')} is tagged {CHECK!r} but does not call check(\"N.k\", answer)")
            if pending is None:
                raise ValueError(f"check cell {cell.get('id')} ({match['id']}) has no exercise-template cell before it")
            cell["source"] = CHECK_CALL.sub(lambda m: f'check("{m["id"]}", {m["answer"]}, hints="first")',
                                            _source(cell), count=1)
            name = _grade_id(match["id"])
            pending["metadata"]["nbgrader"] = _nbgrader(f"{name}-answer", solution=True, grade=False)
            cell["metadata"]["nbgrader"] = _nbgrader(f"{name}-check", solution=False, grade=True, locked=True)
            pending = None
        if WRITTEN in tags:
            cell["metadata"]["nbgrader"] = _nbgrader(f"{_grade_id(next(questions))}-answer", solution=True, grade=True)
        cells.append(cell)
    if pending is not None:
        raise ValueError(f"template cell {pending.get('id')} has no exercise-check cell after it")
    nb["cells"] = cells
    nb.setdefault("metadata", {})["boftlab"] = {"version": "student"}
    return nb


def _nbgrader(grade_id: str, solution: bool, grade: bool, locked: bool = False) -> dict:
    cell = {"grade_id": grade_id, "solution": solution, "grade": grade, "locked": locked, "schema_version": 3,
            "task": False}
    if grade:
        cell["points"] = 1
    return cell


def _write(path: Path, nb: dict) -> None:
    """Write ``nb`` to ``path`` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False, encoding="utf-8") as file:
        json.dump(nb, file, ensure_ascii=False, indent=1)
        file.write("\n")
    os.chmod(file.name, 0o644)
    os.replace(file.name, path)


def course_notebooks(notebooks: Path = NOTEBOOKS) -> list[Path]:
    """The notebooks that have exercises or written questions (a tagged cell), in order. Raises ``ValueError`` if
    ``notebooks`` is not a folder (an installed boftlab has no notebooks: pass a checkout's notebooks/)."""
    if not notebooks.is_dir():
        raise ValueError(f"{notebooks} is not a folder of notebooks; pass the course's notebooks folder (a checkout's "
                         "notebooks/) with --notebooks")
    return [path for path in sorted(notebooks.glob("*.ipynb"))
            if any(set(_tags(c)) & {CHECK, WRITTEN} for c in json.loads(path.read_text())["cells"])]


def write_students(out: Path, notebooks: Path = NOTEBOOKS) -> list[Path]:
    """Write the student version of every course notebook into ``out``; the paths written. Nothing is written if
    any notebook's tags are wrong (all are converted first)."""
    converted = {path.name: student_notebook(json.loads(path.read_text())) for path in course_notebooks(notebooks)}
    if not converted:
        raise ValueError(f"no notebook in {notebooks} has a cell tagged {CHECK!r} or {WRITTEN!r}")
    written = []
    for name, nb in converted.items():
        _write(out / name, nb)
        written.append(out / name)
    return written


# --- grading --------------------------------------------------------------------------------------------------------
def _output_text(cell: dict) -> str:
    texts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "error":
            texts.append(f"error: {out.get('ename')}: {out.get('evalue')}")
        elif out.get("output_type") == "stream":
            texts.append(_joined(out.get("text", "")))
        else:
            texts.append(_joined(out.get("data", {}).get("text/plain", "")))
    return "\n".join(texts)


def _joined(text) -> str:
    return "".join(text) if isinstance(text, list) else text


def verdicts(nb: dict) -> dict[str, str]:
    """Exercise id -> passed / failed / not attempted, read from each tagged checking cell's output of the executed
    notebook ``nb``; a written question -> "answered" / not attempted (its answer cell changed or not)."""
    found = {}
    for cell in nb["cells"]:
        if CHECK not in _tags(cell):
            continue
        match = CHECK_CALL.search(_source(cell))
        if match is None:
            # the student rewrote the checking cell: its output proves nothing about the exercise it replaced
            exercise = cell.get("metadata", {}).get("nbgrader", {}).get("grade_id", cell.get("id", "?"))
            found[exercise] = f"{FAILED} (check cell changed)"
            continue
        text = _output_text(cell)
        verdict = VERDICT.search(text)
        if verdict is None or verdict["id"] != match["id"]:
            found[match["id"]] = FAILED if text.startswith("error:") else NOT_ATTEMPTED
        elif verdict["status"] == "passed":
            found[match["id"]] = PASSED
        else:
            found[match["id"]] = NOT_ATTEMPTED if verdict["message"].startswith("Not attempted") else FAILED
    for question, cell in zip(tagged_questions(nb), (c for c in nb["cells"] if WRITTEN in _tags(c))):
        answer = _source(cell).strip()
        found[question] = "answered" if answer and answer != ANSWER_PLACEHOLDER else NOT_ATTEMPTED
    return found


def execute(path: Path, timeout: int = 600) -> dict:
    """``path`` executed in its own folder (nbclient, the python3 kernel), errors allowed: a failing cell is the
    student's failure, the cells after it still run."""
    import nbclient
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    nbclient.NotebookClient(nb, timeout=timeout, allow_errors=True, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}}).execute()
    return json.loads(nbformat.writes(nb))


def grade(folder: Path, run: bool = False, exercises: list[str] | None = None,
          notebooks: Path = NOTEBOOKS) -> tuple[list[dict], str]:
    """Grade every ``folder/<student>/*.ipynb``: one row per student (``student`` and one column per exercise or
    written question, in course order) and a summary line. ``run``: execute each notebook first. ``exercises``: the
    columns (default: every exercise and question of the course ``notebooks``, so one a student never handed in is
    "not attempted")."""
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder")
    students = sorted(p for p in folder.iterdir() if p.is_dir())
    if not students:
        raise ValueError(f"{folder} has no student folders: put each student's notebooks in {folder}/<student>/")
    if exercises is None:
        exercises = []
        for path in course_notebooks(notebooks):
            nb = json.loads(path.read_text())
            exercises += tagged_exercises(nb) + tagged_questions(nb)
    rows = []
    for student in students:
        row = {"student": student.name}
        for path in sorted(student.glob("*.ipynb")):
            nb = execute(path) if run else json.loads(path.read_text())
            row.update(verdicts(nb))
        rows.append({"student": student.name, **{e: row.get(e, NOT_ATTEMPTED) for e in exercises},
                     **{e: v for e, v in row.items() if e not in exercises and e != "student"}})
    cells = [value for row in rows for key, value in row.items() if key != "student"]
    counts = {status: sum(1 for v in cells if v.startswith(status)) for status in (PASSED, "answered", FAILED,
                                                                                    NOT_ATTEMPTED)}
    summary = (f"{len(rows)} student(s) × {len(exercises)} exercise(s)/question(s): {counts[PASSED]} passed, "
               f"{counts['answered']} written answers, {counts[FAILED]} failed, {counts[NOT_ATTEMPTED]} not attempted")
    return rows, summary


def write_grades(rows: list[dict], path: Path) -> None:
    """``rows`` as a CSV (student × exercise), atomically."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False, newline="",
                                     encoding="utf-8") as file:
        writer = csv.DictWriter(file, columns, restval=NOT_ATTEMPTED)
        writer.writeheader()
        writer.writerows(rows)
    os.chmod(file.name, 0o644)
    os.replace(file.name, path)


# --- slides ---------------------------------------------------------------------------------------------------------
def slide_type(cell: dict) -> str:
    """A cell's reveal.js role: its own ``slideshow.slide_type`` metadata if set; otherwise a markdown cell opening
    with a level-1 or -2 heading starts a slide, level 3 a sub-slide; setup code (the Colab install, the profile) and
    model answers are skipped; everything else follows on the current slide."""
    own = cell.get("metadata", {}).get("slideshow", {}).get("slide_type")
    if own:
        return own
    source = _source(cell).lstrip()
    if MODEL in _tags(cell) or (cell["cell_type"] == "code" and ("BOFTLAB_REF" in source or
                                                                 "default_profile()" in source)):
        return "skip"
    if cell["cell_type"] == "markdown" and re.match(r"#{1,2} ", source):
        return "slide"
    if cell["cell_type"] == "markdown" and source.startswith("### "):
        return "subslide"
    return "-"


def class_deck(number: int, notebooks: Path = NOTEBOOKS, executed: Path | None = EXECUTED) -> dict:
    """One notebook holding class ``number``'s notebooks in order (with their run's outputs from ``executed``, or
    without outputs when ``executed`` is None), each cell marked with its ``slide_type``. Raises ``ValueError`` when
    a notebook or its executed copy is missing, naming it and how to make it."""
    if number not in CLASSES:
        raise ValueError(f"there is no class {number}; the classes are {sorted(CLASSES)}")
    title, names = CLASSES[number]
    deck = None
    for name in names:
        source = (executed if executed is not None else notebooks) / f"{name}.ipynb"
        if not source.exists():
            raise ValueError(f"{source} does not exist" + (
                "; run the notebooks' tests first (python -m pytest --nbmake notebooks saves executed copies in "
                f"{EXECUTED}), or make decks without outputs (--without-outputs)" if executed is not None else
                "; pass the course's notebooks folder (a checkout's notebooks/) with --notebooks"))
        nb = json.loads(source.read_text())
        for cell in nb["cells"]:
            cell.setdefault("metadata", {})["slideshow"] = {"slide_type": slide_type(cell)}
        if deck is None:
            deck = nb
            deck["cells"].insert(0, {"cell_type": "markdown", "id": f"class-{number}-title",
                                     "metadata": {"slideshow": {"slide_type": "slide"}},
                                     "source": f"# Class {number}: {title}\n\n" + "\n".join(
                                         f"* {n}" for n in names)})
        else:
            deck["cells"] += nb["cells"]
            for key, value in nb.get("metadata", {}).get("widgets", {}).items():
                deck["metadata"].setdefault("widgets", {}).setdefault(key, {"state": {}})["state"].update(
                    value.get("state", {}))
    return deck


def write_slides(out: Path, notebooks: Path = NOTEBOOKS, executed: Path | None = EXECUTED) -> list[Path]:
    """A reveal.js deck per class, ``out/class-<k>.slides.html`` (nbconvert's slides exporter, reveal.js from its CDN);
    the paths written. Every deck is made before any is written."""
    import nbformat
    from nbconvert import SlidesExporter

    exporter = SlidesExporter()
    decks = {number: class_deck(number, notebooks, executed) for number in CLASSES}
    written = []
    for number, deck in decks.items():
        body, _ = exporter.from_notebook_node(nbformat.reads(json.dumps(deck), as_version=4))
        path = out / f"class-{number}.slides.html"
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=out, suffix=".tmp", delete=False, encoding="utf-8") as file:
            file.write(body)
        os.chmod(file.name, 0o644)
        os.replace(file.name, path)
        written.append(path)
    return written


# --- command line ---------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m boftlab.teaching", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    student = commands.add_parser("student", help="write student notebooks (no solutions, model answers, outputs)")
    student.add_argument("out", type=Path)
    student.add_argument("--notebooks", type=Path, default=NOTEBOOKS, help=f"the course (default {NOTEBOOKS})")
    graded = commands.add_parser("grade", help="grade FOLDER/<student>/*.ipynb into FOLDER/grades.csv")
    graded.add_argument("folder", type=Path)
    graded.add_argument("--execute", action="store_true", help="run every notebook first (else read its outputs)")
    graded.add_argument("--csv", type=Path, help="where to write the table (default FOLDER/grades.csv)")
    graded.add_argument("--notebooks", type=Path, default=NOTEBOOKS, help="the course, for the columns")
    slides = commands.add_parser("slides", help="write a reveal.js deck per class")
    slides.add_argument("out", type=Path)
    slides.add_argument("--executed", type=Path, default=EXECUTED, help=f"executed notebooks (default {EXECUTED})")
    slides.add_argument("--without-outputs", action="store_true", help="decks from the notebooks as committed")
    slides.add_argument("--notebooks", type=Path, default=NOTEBOOKS, help=f"the course (default {NOTEBOOKS})")
    args = parser.parse_args(argv)
    try:
        if args.command == "student":
            for path in write_students(args.out, args.notebooks):
                print(path)
        elif args.command == "grade":
            rows, summary = grade(args.folder, run=args.execute, notebooks=args.notebooks)
            path = args.csv or args.folder / "grades.csv"
            write_grades(rows, path)
            print(f"{path}\n{summary}")
        else:
            for path in write_slides(args.out, args.notebooks, None if args.without_outputs else args.executed):
                print(path)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
