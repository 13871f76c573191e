"""The notebooks as committed (stripped, ids, the pinned Colab install cell, the profile cell, run times that say
what was measured and what is an estimate) and the checks applied to their executed outputs."""

import base64
import re
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook, new_output

from boftlab._version import __version__
from notebook_outputs import FIGURES, problems

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
VERSION = __version__  # boftlab/_version.py, which pyproject.toml reads (tests/test_packaging.py)

#: every notebook's first code cell: on Colab, install the release these notebooks belong to, with the notebooks extra
INSTALL_CELL = (
    f'BOFTLAB_REF = "v{VERSION}"  # the release these notebooks belong to: pyproject.toml\'s version, as a git tag\n'
    'import sys\n'
    'if "google.colab" in sys.modules:  # Colab: that release, everything the notebooks import, at its pinned versions\n'
    '    %pip install -q "boftlab[notebooks] @ git+https://github.com/boftlab/boftlab@{BOFTLAB_REF}" \\\n'
    '        -c "https://raw.githubusercontent.com/boftlab/boftlab/{BOFTLAB_REF}/constraints-colab.txt"'
)


def read(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(str(path), as_version=4)


def code_cells(nb: nbformat.NotebookNode) -> list:
    return [c for c in nb.cells if c.cell_type == "code"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_stripped_with_valid_unique_cell_ids(path):
    nb = read(path)
    nbformat.validate(nb)  # nbformat ≥ 4.5: every cell has an id (no MissingIDFieldWarning when it runs)
    ids = [c.get("id") for c in nb.cells]
    assert all(ids) and len(set(ids)) == len(ids)
    assert all(c.outputs == [] and c.execution_count is None for c in code_cells(nb))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_first_code_cell_installs_this_release_with_the_notebooks_extra(path):
    assert code_cells(read(path))[0].source == INSTALL_CELL


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_header_has_its_badge_and_run_times_measured_or_labelled_estimates(path):
    """The first cell links Colab to this notebook and states its CPU time (measured) and its colab profile's time —
    labelled an estimate until someone measures it — or that it needs no GPU."""
    header = " ".join(read(path).cells[0].source.split())
    assert f"colab.research.google.com/github/boftlab/boftlab/blob/main/notebooks/{path.name}" in header
    assert re.search(r"\d+ s on a 2-core CPU \(.*measured", header)
    colab = header[header.index("colab profile"):] if "colab profile" in header else ""
    assert re.search(r"\bestimate\b|\bmeasured\b", colab) or "nothing here needs a GPU" in header


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_second_code_cell_reads_the_profile(path):
    assert "PROFILE = default_profile()" in code_cells(read(path))[1].source


def test_every_figure_count_names_a_notebook():
    assert set(FIGURES) <= {p.stem for p in NOTEBOOKS}


# --- the checks on executed outputs (notebooks/conftest.py runs them on every notebook nbmake executes) ---------------
PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n one figure").decode()
OTHER_PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n another figure").decode()


def executed(*cells_outputs) -> nbformat.NotebookNode:
    """A notebook whose cells show ``cells_outputs``, then a generated reading that claims nothing (07–09 must
    display one: tests/test_notebook_text.py)."""
    reading = new_output("display_data", data={"text/markdown": "#### Reading the results\n* nothing to read."})
    nb = new_notebook(cells=[new_code_cell("...") for _ in [*cells_outputs, [reading]]])
    for cell, outputs in zip(nb.cells, [*cells_outputs, [reading]]):
        cell.outputs = outputs
    return nb


def image(data=PNG):
    return new_output("display_data", data={"image/png": data, "text/plain": "<Figure size 1000x360 with 2 Axes>"})


def test_a_notebook_showing_its_figures_and_no_warning_passes():
    assert problems(executed([image()], [new_output("stream", name="stdout", text="accuracy 0.9\n")]),
                    "08_llm_finetuning") == []


def test_a_figure_that_never_shows_is_found():
    text_only = new_output("execute_result", data={"text/plain": "<Figure size 1000x360 with 2 Axes>"},
                           execution_count=1)
    (found,) = problems(executed([text_only]), "08_llm_finetuning")
    assert "shows 0 image(s); it draws 1 figure(s)" in found


@pytest.mark.parametrize("text", [
    "/tmp/ipykernel_1/1.py:3: FutureWarning: `is_gradient_checkpointing` is deprecated\n  warnings.warn(\n",
    "UserWarning: Detected call of `lr_scheduler.step()` before `optimizer.step()`\n",
    "WARNING:root:something a student would have to ignore\n",
])
def test_a_warning_in_an_output_stream_is_found(text):
    nb = executed([image(), image(OTHER_PNG)], [new_output("stream", name="stderr", text=text)])
    (found,) = problems(nb, "09_diffusion_finetuning")
    assert found.startswith("cell 1 prints a warning: ")


def test_any_stderr_a_notebook_does_not_expect_by_name_is_found(monkeypatch):
    """bitsandbytes' hub-kernel lookup wrote two lines with no "Warning" in them into 9 of 11 notebooks."""
    import notebook_outputs

    text = "Failed to load CPU gemm_4bit_forward from kernels-community: Version 1 of 'kernels-community/quant…\n"
    nb = executed([image()], [new_output("stream", name="stderr", text=text)])
    (found,) = problems(nb, "08_llm_finetuning")
    assert found == f"cell 1 writes to stderr: {text.strip()}"
    assert problems(executed([image()], [new_output("stream", name="stdout", text=text)]), "08_llm_finetuning") == []
    monkeypatch.setitem(notebook_outputs.EXPECTED_STDERR, "08_llm_finetuning", (("^Failed to load CPU", "test"),))
    assert problems(nb, "08_llm_finetuning") == []
    assert problems(nb, "07_vit_finetuning") != []  # expected by name: only where it is named


def test_the_ci_profile_silences_the_hub_kernel_lookup_at_its_loggers(monkeypatch):
    import logging

    from boftlab import profiles

    for name in profiles.HUB_KERNEL_LOGGERS:
        monkeypatch.setattr(logging.getLogger(name), "level", logging.NOTSET)
    monkeypatch.setenv("BOFTLAB_PROFILE", "ci")
    assert profiles.default_profile() == "ci"
    assert all(logging.getLogger(n).getEffectiveLevel() == logging.ERROR for n in profiles.HUB_KERNEL_LOGGERS)
    assert logging.getLogger("bitsandbytes.backends.cpu.ops").getEffectiveLevel() == logging.ERROR


def test_the_same_figure_shown_twice_is_found():
    """A pyplot figure displayed explicitly and flushed again by the inline backend: one cell, two equal images."""
    (found,) = problems(executed([image(), image()]), "09_diffusion_finetuning")
    assert found == "cell 0 shows the same image 2 times"


def widget_state(*states) -> dict:
    return {"widgets": {"application/vnd.jupyter.widget-state+json": {
        "state": {f"model{i}": state for i, state in enumerate(states)}, "version_major": 2, "version_minor": 0}}}


def test_a_widget_that_drew_nothing_or_failed_is_found():
    """A widget's callback runs in the kernel, out of nbmake's sight: its error lands in the widget's Output area."""
    drew = {"model_name": "ImageModel", "state": {}, "buffers": [{"path": ["value"], "data": PNG}]}
    failed = {"model_name": "OutputModel", "state": {"outputs": [
        {"output_type": "error", "ename": "ValueError", "evalue": "block_size=3 must be even", "traceback": []}]}}
    empty = {"model_name": "ImageModel", "state": {}, "buffers": []}
    nb = executed(*[[image(PNG if i % 2 else OTHER_PNG)] for i in range(3)])
    nb.metadata = widget_state(drew)
    assert problems(nb, "04_expressivity") == []
    nb.metadata = widget_state(empty, failed)
    assert problems(nb, "04_expressivity") == [
        "a widget's output shows: ValueError: block_size=3 must be even",
        "04_expressivity's widgets show 0 image(s); 1 expected"]


def test_a_new_notebook_that_draws_must_show_a_figure():
    """A notebook FIGURES does not list yet (a new one): one image at least if its code draws, none if it does not."""
    drawing = executed([])
    drawing.cells = [new_code_cell("%matplotlib inline\nimport matplotlib"), new_code_cell("plot_butterfly(16, 4, 2)")]
    assert problems(drawing, "11_new_notebook") == [
        "11_new_notebook shows 0 image(s); it draws 1 figure(s) — display each one (display(fig), or the Figure as "
        "the cell's last expression)"]
    drawing.cells[1].outputs = [image()]
    assert problems(drawing, "11_new_notebook") == []
    drawing.cells.pop()  # only the %matplotlib line: nothing drawn, nothing to show
    assert problems(drawing, "11_new_notebook") == []


# --- layout (issue 25): raw Markdown tables, legends and labels -------------------------------------------------------
def test_a_markdown_table_printed_as_text_is_found_and_a_displayed_one_is_not():
    from notebook_outputs import layout_problems

    table = "| method | accuracy |\n|---|---|\n| LoRA | 0.9 |\n"
    printed = executed([image()], [new_output("stream", name="stdout", text="summary\n" + table)])
    assert layout_problems(printed) == ["cell 1 prints a Markdown table as text (a |---| row); display it with "
                                        "display(Markdown(...)) so that it renders"]
    returned = executed([image()], [new_output("execute_result", data={"text/plain": repr(table)})])
    returned.cells[1].outputs[0]["data"]["text/plain"] = table
    assert layout_problems(returned) != []
    displayed = executed([image()], [new_output("display_data", data={"text/markdown": table, "text/plain": "<Md>"})])
    assert layout_problems(displayed) == []
    assert problems(printed, "08_llm_finetuning") == layout_problems(printed)  # part of every notebook's check


def test_legends_and_labels_that_do_not_fit_are_found():
    from matplotlib.figure import Figure

    from notebook_outputs import figure_problems

    fig = Figure(figsize=(4, 3))
    ax = fig.subplots()
    for i in range(3):
        ax.plot([0, 150], [0.5, 0.8 + 0.01 * i], label=f"method {i}")
        ax.annotate(f"baseline {i}", (150, 0.8 + 0.01 * i), xytext=(3, 0), textcoords="offset points")
    ax.legend(fontsize=6)
    found = figure_problems(fig)
    assert "a legend uses 6-point type (at least 7 is readable)" in found
    assert "the label 'baseline 0' reaches outside its axes" in found
    assert "the labels 'baseline 0' and 'baseline 1' overlap" in found
    big = Figure(figsize=(3, 2))
    ax = big.subplots()
    for i in range(8):
        ax.plot([0, 1], [i, i], label=f"a long method name {i}")
    ax.legend(fontsize=9)
    assert any(p.startswith("a legend covers") for p in figure_problems(big))
    log = Figure()
    ax = log.subplots()
    ax.plot([1, 2], [3.7, 5.1])
    ax.set_yscale("log")
    (found,) = figure_problems(log)
    assert found.startswith("a log y axis spans less than a decade (3.") and "labels 2 tick(s)" in found
    ax.set_yticks([3.7, 4.4, 5.1], labels=["3.7", "4.4", "5.1"])
    assert figure_problems(log) == []
