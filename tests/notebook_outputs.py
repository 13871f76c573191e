"""What an executed notebook shows a student: every figure as an image, each once, widgets that drew, no warnings and
nothing on stderr that the notebook does not expect by name.

``problems(nb, name)`` lists what is wrong with an executed notebook's outputs. notebooks/conftest.py applies it to
every notebook nbmake executes (inside the same test, so CI executes each notebook once), tests/test_wheel.py to
the notebooks it runs from an installed wheel, and tests/test_notebooks.py shows each check can fail.
"""

from __future__ import annotations

import base64
import re

#: (images among the outputs, images in widgets) each notebook's ci run shows at least: one per figure it draws. A
#: notebook not listed here must show at least one image if its code draws (``draws``), none otherwise.
FIGURES = {
    "00_quickstart": (1, 0),
    "02_information_transmission": (7, 2),
    "03_parameter_counts": (0, 1),
    "04_expressivity": (3, 1),
    "05_structured_matrices": (3, 1),
    "06_tensor_core": (3, 1),
    "07_vit_finetuning": (1, 0),
    "08_llm_finetuning": (1, 0),
    "09_diffusion_finetuning": (2, 0),
    "10_speed_and_memory": (1, 0),
}
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"

#: notebook -> (regex, why) of each stderr text it expects; any other stderr stream is a problem. Empty: no notebook
#: writes to stderr (bitsandbytes' hub-kernel lookup is silenced at its loggers, boftlab.profiles.offline_kernels)
EXPECTED_STDERR: dict[str, tuple[tuple[str, str], ...]] = {}

#: what a warning looks like in an output stream: "FutureWarning: …", "UserWarning: …", "WARNING:root:…"
WARNING = re.compile(r"\w*Warning\b|^WARNING\b", re.MULTILINE)


#: what drawing looks like in a notebook's code: pyplot, a Figure, or a function that returns one (plot_…)
DRAWS = re.compile(r"\bplt\.|\bFigure\(|\bplot_\w+\(")


def draws(nb: dict) -> bool:
    """Whether any code cell of ``nb`` draws a figure (``DRAWS``)."""
    return any(cell["cell_type"] == "code" and DRAWS.search(cell["source"]) for cell in nb["cells"])


def images(cell: dict) -> list[bytes]:
    """The PNG images among ``cell``'s outputs (display_data and execute_result)."""
    return [base64.b64decode(out["data"]["image/png"]) for out in cell.get("outputs", [])
            if "image/png" in out.get("data", {})]


def widget_states(nb: dict) -> list[dict]:
    """The saved state of every widget the executed notebook displayed (nbclient stores it in the metadata)."""
    return list(nb.get("metadata", {}).get("widgets", {}).get(WIDGET_STATE, {}).get("state", {}).values())


def warning_in(outputs: list[dict]) -> str | None:
    """The first output stream's text that carries a warning (or an error's name), if any."""
    for out in outputs:
        if out.get("output_type") == "error":
            return f"{out['ename']}: {out['evalue']}"
        if out.get("output_type") == "stream" and WARNING.search(out.get("text", "")):
            return out["text"].strip()
    return None


def unexpected_stderr(outputs: list[dict], name: str) -> str | None:
    """The first stderr stream's text among ``outputs`` that notebook ``name`` does not expect (``EXPECTED_STDERR``)."""
    for out in outputs:
        text = out.get("text", "")
        if out.get("output_type") == "stream" and out.get("name") == "stderr" and not any(
                re.search(pattern, text) for pattern, _ in EXPECTED_STDERR.get(name, ())):
            return text.strip()
    return None


def problems(nb: dict, name: str) -> list[str]:
    """What a student would see wrong in the executed notebook ``nb`` (``name``: its file stem): a warning in an
    output stream; any other stderr text the notebook does not expect by name (``EXPECTED_STDERR``); an image shown
    twice by one cell (a pyplot figure displayed and then flushed again); fewer images than the notebook's figures
    (``FIGURES``, or one if it ``draws``: a figure drawn but never displayed, e.g. under ``MPLBACKEND=Agg``); a widget
    that drew no image, or whose Output area holds an error or a warning (a widget's callback fails there, out of the
    runner's sight). Empty if none."""
    found = []
    shown = 0
    for index, cell in enumerate(nb["cells"]):
        warning = warning_in([out for out in cell.get("outputs", []) if out.get("output_type") == "stream"])
        stderr = unexpected_stderr(cell.get("outputs", []), name)
        if warning:
            found.append(f"cell {index} prints a warning: {warning[:300]}")
        elif stderr:
            found.append(f"cell {index} writes to stderr: {stderr[:300]}")
        pictures = images(cell)
        shown += len(pictures)
        if len(set(pictures)) < len(pictures):
            found.append(f"cell {index} shows the same image {len(pictures) - len(set(pictures)) + 1} times")
    drawn = sum(1 for state in widget_states(nb) if state.get("model_name") == "ImageModel"
                and any(buffer.get("data") for buffer in state.get("buffers", [])))
    for state in widget_states(nb):
        outputs = state.get("state", {}).get("outputs", []) if state.get("model_name") == "OutputModel" else []
        warning = warning_in(outputs)
        if warning:
            found.append(f"a widget's output shows: {warning[:300]}")
    expected_images, expected_widgets = FIGURES.get(name, (int(draws(nb)), 0))
    if shown < expected_images:
        found.append(f"{name} shows {shown} image(s); it draws {expected_images} figure(s) — display each one "
                     "(display(fig), or the Figure as the cell's last expression)")
    if drawn < expected_widgets:
        found.append(f"{name}'s widgets show {drawn} image(s); {expected_widgets} expected")
    return found
