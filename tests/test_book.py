"""The book (docs/book/build_book.py) renders executed notebooks without running them, and refuses to build when a
link is broken, a figure is lost, or a notebook's executed copy is missing or stale. Tiny fixture notebooks; the last
test builds the real pages and README around the repository's notebooks as committed (no outputs)."""

import base64
import copy
import io
import json
import shutil
import sys
from pathlib import Path

import pytest
from matplotlib.figure import Figure

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs" / "book"))
import build_book  # noqa: E402

# myst-parser reaches Sphinx 9's deprecated ``app`` attributes (its own business, due in Sphinx 11)
# (and sphinx-book-theme Sphinx 9's ``app`` attribute of transforms)
pytestmark = [pytest.mark.filterwarnings("ignore::PendingDeprecationWarning:myst_parser.*"),
              pytest.mark.filterwarnings("ignore::PendingDeprecationWarning:sphinx_book_theme.*")]

README = """# tinylab

A two-notebook course.

| family | what |
|---|---|
| tiny | small |

## Set up

pip install tinylab

## Notebooks

| notebook | what it shows |
|---|---|
| [`a_draws`](notebooks/a_draws.ipynb) | a figure |
| [`b_prints`](notebooks/b_prints.ipynb) | a number |

## Course

Learn [a](notebooks/a_draws.ipynb), then [b](notebooks/b_prints.ipynb).

**A plan for three classes** (one class here)

## Fine-tuning results

none
"""


def png(color: str = "blue") -> str:
    figure = Figure(figsize=(1, 1))
    figure.add_subplot().plot([0, 1], [1, 0], color=color)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=20)
    return base64.b64encode(buffer.getvalue()).decode()


def notebook(cells: list[dict]) -> dict:
    for index, cell in enumerate(cells):
        cell["id"] = f"cell-{index}"
    return {"nbformat": 4, "nbformat_minor": 5, "cells": cells,
            "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}}}


def markdown(text: str) -> dict:
    return {"cell_type": "markdown", "metadata": {}, "source": text}


def code(text: str, outputs=(), tags=()) -> dict:
    return {"cell_type": "code", "metadata": {"tags": list(tags)}, "source": text, "execution_count": None,
            "outputs": list(outputs)}


def executed(nb: dict, outputs: dict[int, list]) -> dict:
    """``nb`` as a run would leave it: ``outputs`` by cell index."""
    nb = copy.deepcopy(nb)
    for index, out in outputs.items():
        nb["cells"][index]["outputs"] = out
    return nb


IMAGE = {"output_type": "display_data", "metadata": {}, "data": {"image/png": png(), "text/plain": "<Figure>"}}
NUMBER = {"output_type": "stream", "name": "stdout", "text": "42\n"}


def needs_sphinx():
    pytest.importorskip("myst_nb", reason="the book's tools come with the dev extra: pip install -e '.[dev]'")


@pytest.fixture
def course(tmp_path):
    """A course of two notebooks (a draws a figure, b prints), executed, with the book's real conf.py and landing
page (its other pages name the real notebooks: stand-ins here)."""
    needs_sphinx()
    notebooks, runs, pages = tmp_path / "notebooks", tmp_path / "executed", tmp_path / "pages"
    for folder in (notebooks, runs, pages):
        folder.mkdir()
    for name in ("conf.py", "index.md"):
        shutil.copy(build_book.BOOK / name, pages / name)
    for page in build_book.BOOK.glob("*.md"):  # the course pages, which link the real notebooks: one line each here
        if page.name != "index.md":
            (pages / page.name).write_text(f"# {page.stem}\n\nSee [a](notebooks/a_draws.ipynb).\n")
    (tmp_path / "README.md").write_text(README)
    course = {
        "a_draws": (notebook([markdown("# A draws\n\nNext: [b](b_prints.ipynb), its [number](b_prints.ipynb#b-prints)."),
                              code("draw()")]), {1: [IMAGE]}),
        "b_prints": (notebook([markdown("# B prints"), code("print(42)")]), {1: [NUMBER]}),
    }
    for name, (nb, outputs) in course.items():
        write(notebooks / f"{name}.ipynb", nb)
        write(runs / f"{name}.ipynb", executed(nb, outputs))
    return tmp_path


def write(path: Path, nb: dict) -> None:
    path.write_text(json.dumps(nb))


def build(course: Path) -> list[str]:
    return build_book.build(out=course / "book", notebooks=course / "notebooks", executed=course / "executed",
                            pages=course / "pages", readme=course / "README.md")


def edit(course: Path, name: str, change) -> None:
    """Apply ``change`` to notebook ``name`` and to its executed copy alike (as if it had been run again)."""
    for folder in ("notebooks", "executed"):
        path = course / folder / f"{name}.ipynb"
        nb = json.loads(path.read_text())
        change(nb)
        write(path, nb)


def test_the_book_renders_the_executed_notebooks_and_lists_each_one(course):
    assert build(course) == []
    html = course / "book" / "html"
    shown = build_book.page_images(html / "notebooks" / "a_draws.html")
    assert base64.b64decode(IMAGE["data"]["image/png"]) in shown  # the run's figure, not re-executed
    assert "42" in (html / "notebooks" / "b_prints.html").read_text()
    index = (html / "index.html").read_text()
    assert "A two-notebook course." in index and 'href="notebooks/a_draws.html"' in index


def test_every_notebook_page_has_a_colab_button_and_an_ipynb_download_and_the_course_comes_first(course):
    assert build(course) == []
    html = course / "book" / "html"
    for name in ("a_draws", "b_prints"):
        page = (html / "notebooks" / f"{name}.html").read_text()
        assert f"https://colab.research.google.com/github/boftlab/boftlab/blob/main/notebooks/{name}.ipynb" in page
        assert f"_sources/notebooks/{name}.ipynb" in page
        assert json.loads((html / "_sources" / "notebooks" / f"{name}.ipynb").read_text())["cells"]
    index = (html / "index.html").read_text()
    assert "Learn" in index and "pip install tinylab" not in index  # the course, not the set-up
    for page in ("syllabus", "glossary", "teacher"):
        assert f'href="{page}.html"' in index


def test_markdown_tables_in_outputs_render_and_a_raw_table_fails_the_build(course):
    table = {"output_type": "execute_result", "execution_count": 1, "metadata": {},
             "data": {"text/markdown": "| method | accuracy |\n|---|---|\n| BOFT | 0.9 |", "text/plain": "table"}}
    edit(course, "b_prints", lambda nb: nb["cells"][1].update(outputs=[table]))
    assert build(course) == []
    page = (course / "book" / "html" / "notebooks" / "b_prints.html").read_text()
    assert "<table" in page and "BOFT" in page and not build_book.RAW_TABLE.search(page)
    printed = {"output_type": "stream", "name": "stdout", "text": "| method | accuracy |\n|---|---|\n| BOFT | 0.9 |\n"}
    edit(course, "b_prints", lambda nb: nb["cells"][1].update(outputs=[printed]))  # printed: a <pre> of pipes
    assert build(course) == ["notebooks/b_prints.html shows a Markdown table as raw text: '|---|'"]


def tqdm_bar(model: str, value: float, total: float) -> tuple[dict, dict]:
    """A tqdm.auto bar as a run saves it: the output (a widget view) and its models' saved state."""
    state = {
        f"{model}-left": {"model_name": "HTMLModel", "state": {"value": f"{100 * value / total:.0f}%"}},
        f"{model}-bar": {"model_name": "FloatProgressModel", "state": {"value": value, "max": total}},
        f"{model}-right": {"model_name": "HTMLModel",
                           "state": {"value": f"\u2007{value:.0f}/{total:.0f}\u2007[00:01&lt;00:00]"}},
        model: {"model_name": "HBoxModel", "state": {"children": [f"IPY_MODEL_{model}-{part}"
                                                                   for part in ("left", "bar", "right")]}},
    }
    output = {"output_type": "display_data", "metadata": {},
              "data": {build_book.WIDGET_VIEW: {"model_id": model, "version_major": 2, "version_minor": 0},
                       "text/plain": "  0%|          | 0/3 [00:00<?, ?it/s]"}}
    return output, state


def test_progress_bars_become_their_final_text_line_and_other_widgets_get_a_static_note():
    bar, state = tqdm_bar("m1", 3, 3)
    slider = {"output_type": "display_data", "metadata": {}, "data": {build_book.WIDGET_VIEW: {"model_id": "s"}}}
    state["s"] = {"model_name": "VBoxModel", "state": {"children": []}}
    nb = notebook([code("for _ in tqdm(range(3)): pass", [bar]), code("interact(f, x=1)", [slider])])
    nb["metadata"]["widgets"] = {build_book.WIDGET_STATE: {"state": state}}
    shown = build_book.static_widgets(nb)
    assert shown["cells"][0]["outputs"] == [{"output_type": "stream", "name": "stdout",
                                             "text": "100%|██████████| 3/3 [00:01<00:00]\n"}]
    assert [c["cell_type"] for c in shown["cells"]] == ["code", "markdown", "code"]
    assert "static in the book" in shown["cells"][1]["source"] and shown["cells"][2]["outputs"] == [slider]
    half, state = tqdm_bar("m2", 1, 4)
    nb = notebook([code("x", [half])])
    nb["metadata"]["widgets"] = {build_book.WIDGET_STATE: {"state": state}}
    assert build_book.static_widgets(nb)["cells"][0]["outputs"][0]["text"] == "25%|██        | 1/4 [00:01<00:00]\n"


def test_a_new_notebook_appears_in_the_table_of_contents_without_editing_it(course):
    nb = notebook([markdown("# C is new"), code("1")])
    write(course / "notebooks" / "c_new.ipynb", nb)
    write(course / "executed" / "c_new.ipynb", nb)
    assert build(course) == []
    assert 'href="notebooks/c_new.html"' in (course / "book" / "html" / "index.html").read_text()


@pytest.mark.parametrize("name, text, named", [
    ("a_draws", "Next: [c](c_missing.ipynb).", "c_missing.ipynb"),  # a notebook not in the book
    ("a_draws", "See [b](b_prints.ipynb#no-such-part).", "no-such-part"),  # a heading b does not have
    ("b_prints", "![the plot](plot.png)", "plot.png"),  # an image that is not there
    ("b_prints", "See [it](../boftlab/gone.py).", "gone.py"),  # a repository file that does not exist
], ids=["notebook", "heading", "image", "repository-file"])
def test_a_broken_link_or_image_in_a_notebook_fails_the_build(course, name, text, named):
    title = {"a_draws": "# A draws", "b_prints": "# B prints"}[name]
    edit(course, name, lambda nb: nb["cells"][0].update(source=f"{title}\n\n{text}"))
    problems = build(course)
    assert any(named in line and f"{name}.ipynb" in line for line in problems), problems


def test_a_link_in_the_landing_page_to_a_notebook_not_in_the_book_fails_the_build(course):
    (course / "notebooks" / "b_prints.ipynb").unlink()
    (course / "executed" / "b_prints.ipynb").unlink()
    edit(course, "a_draws", lambda nb: nb["cells"][0].update(source="# A draws"))
    problems = build(course)
    assert any("README.md" in line and "b_prints.ipynb" in line for line in problems), problems


def test_a_figure_the_run_drew_but_the_page_does_not_show_fails_the_build(course):
    edit(course, "a_draws", lambda nb: nb["cells"][1]["metadata"].update(tags=["remove-output"]))
    assert build(course) == ["notebooks/a_draws.html does not show 1 of the 1 image(s) its executed notebook holds"]


def test_a_page_that_shows_another_image_instead_of_the_runs_figure_fails_the_build(course):
    (course / "notebooks" / "other.png").write_bytes(base64.b64decode(png(color="red")))
    edit(course, "a_draws", lambda nb: (nb["cells"][0].update(source="# A draws\n\n![another](other.png)"),
                                        nb["cells"][1]["metadata"].update(tags=["remove-output"])))
    problems = build(course)
    assert problems == ["notebooks/a_draws.html does not show 1 of the 1 image(s) its executed notebook holds"]


def test_links_to_repository_files_point_to_github_and_their_images_are_copied(course):
    (course / "boftlab").mkdir()
    (course / "boftlab" / "solutions.py").write_text("answer = 42\n")
    (course / "docs").mkdir()
    (course / "docs" / "curves.png").write_bytes(base64.b64decode(png(color="red")))
    edit(course, "b_prints", lambda nb: nb["cells"][0].update(
        source="# B prints\n\nSee [the solutions](../boftlab/solutions.py#L1) and ![curves](../docs/curves.png)."))
    assert build(course) == []
    page = course / "book" / "html" / "notebooks" / "b_prints.html"
    assert f'href="{build_book.REPOSITORY}boftlab/solutions.py#L1"' in page.read_text()
    assert (course / "docs" / "curves.png").read_bytes() in build_book.page_images(page)


def test_a_notebook_without_an_executed_copy_is_not_built(course):
    (course / "executed" / "b_prints.ipynb").unlink()
    problems = build(course)
    assert problems[0].startswith("b_prints.ipynb: no executed copy")
    assert not (course / "book").exists()  # nothing half-built


def test_a_stale_executed_copy_is_not_built(course):
    path = course / "notebooks" / "b_prints.ipynb"
    nb = json.loads(path.read_text())
    nb["cells"][1]["source"] = "print(43)"
    write(path, nb)
    assert build(course)[0].startswith("b_prints.ipynb: the executed copy")


def test_saving_an_executed_notebook_is_atomic_and_discarding_it_removes_it(tmp_path):
    nb = notebook([code("1", [NUMBER])])
    saved = build_book.save_executed(nb, Path("notebooks/x.ipynb"), executed=tmp_path)
    assert json.loads(saved.read_text()) == nb and [p.name for p in tmp_path.iterdir()] == ["x.ipynb"]
    build_book.discard_executed(Path("notebooks/x.ipynb"), executed=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_the_real_pages_build_around_the_repositorys_notebooks(tmp_path):
    """The landing page's README sections exist, every README link to a notebook and every link between notebooks
    resolves: the book's own pages and README with the notebooks as committed (outputs are added by a test run)."""
    needs_sphinx()
    problems = build_book.build(out=tmp_path / "book", executed=build_book.NOTEBOOKS)
    assert problems == []
    index = (tmp_path / "book" / "html" / "index.html").read_text()
    for path in build_book.NOTEBOOKS.glob("*.ipynb"):
        assert f'href="notebooks/{path.stem}.html"' in index


def test_the_workflow_runs_ci_and_publishes_what_the_build_writes():
    workflow = (ROOT / ".github" / "workflows" / "book.yml").read_text()
    assert "run: .ci/run" in workflow and "python docs/book/build_book.py" in (ROOT / ".ci" / "run").read_text()
    assert f"path: {(build_book.OUT / 'html').relative_to(ROOT).as_posix()}\n" in workflow
    assert "actions/upload-pages-artifact@" in workflow and "actions/deploy-pages@" in workflow
