"""Build the boftlab book from the notebooks as the tests executed them — no notebook is executed twice.

    python -m pytest --nbmake ... notebooks   # notebooks/conftest.py saves each executed notebook in build/executed/
    python docs/book/build_book.py            # -> build/book/html/index.html

The build assembles build/book/source/ (this folder's pages, README.md for the landing page, the executed notebooks)
and fails, listing what is wrong, when:
- a notebook in notebooks/ has no executed copy, or its copy's cells differ from the notebook (run the tests again);
- Sphinx warns about anything: a broken link to a page or heading, a missing image, a bad include (``-W``; links
  are checked against the book's own pages, never over the network);
- a page does not show every image its executed notebook holds (a figure lost between the run and the book);
- a page shows a Markdown table as raw pipe text (``|---|``) instead of a table.

On the way in, a progress bar (tqdm.auto's widget) becomes its final text line, and every other widget gets a note
that it is static in the book (it shows what the run drew; the notebook, on Colab or locally, is interactive).
"""

from __future__ import annotations

import base64
import html.parser
import io
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BOOK = Path(__file__).resolve().parent
NOTEBOOKS = ROOT / "notebooks"
EXECUTED = ROOT / "build" / "executed"
OUT = ROOT / "build" / "book"

IMAGE_TYPES = ("image/png", "image/jpeg", "image/svg+xml", "image/gif")
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
#: the note above a cell whose output is an interactive widget (MyST: an admonition)
WIDGET_NOTE = ("```{note}\nThis widget is static in the book: it shows what the run drew. To interact with it, run "
               "the notebook: the rocket button at the top of the page opens it on Colab.\n```")
#: the separator row of a Markdown table, left as text on a page when a table did not render
RAW_TABLE = re.compile(r"\|\s*:?-{3,}:?\s*\|")
#: where a link to a repository file that is not a page of the book points: the file on GitHub
REPOSITORY = "https://github.com/boftlab/boftlab/blob/main/"

#: a Markdown link or image, ``[text](target)`` / ``![alt](target)``, whose target has no scheme and is not an anchor
RELATIVE_LINK = re.compile(r"(?P<bang>!?)\[(?P<text>[^\]]*)\]\((?P<target>(?![a-z][a-z0-9+.-]*:|#)[^)\s]+)\)")


def save_executed(nb, notebook: Path, executed: Path = EXECUTED) -> Path:
    """Write the executed notebook ``nb`` (an nbformat node or dict) as ``executed/<notebook's name>``, atomically."""
    executed.mkdir(parents=True, exist_ok=True)
    target = executed / Path(notebook).name
    with tempfile.NamedTemporaryFile("w", dir=executed, suffix=".tmp", delete=False, encoding="utf-8") as file:
        json.dump(nb, file, ensure_ascii=False, indent=1)
    os.chmod(file.name, 0o644)
    os.replace(file.name, target)
    return target


def discard_executed(notebook: Path, executed: Path = EXECUTED) -> None:
    """Remove ``notebook``'s executed copy (before it runs again: a failed run leaves none behind)."""
    (executed / Path(notebook).name).unlink(missing_ok=True)


def cell_sources(nb: dict) -> list[tuple[str, str]]:
    return [(cell["cell_type"], "".join(cell["source"])) for cell in nb["cells"]]


def stale_or_missing(notebooks: Path = NOTEBOOKS, executed: Path = EXECUTED) -> list[str]:
    """Why the executed copies cannot make the book: one line per notebook without a copy or whose copy's cells are
    not the notebook's cells. Empty when every notebook has its current executed copy."""
    found = []
    for notebook in sorted(notebooks.glob("*.ipynb")):
        copy = executed / notebook.name
        if not copy.exists():
            found.append(f"{notebook.name}: no executed copy in {executed}")
        elif cell_sources(json.loads(copy.read_text())) != cell_sources(json.loads(notebook.read_text())):
            found.append(f"{notebook.name}: the executed copy in {executed} ran different cells (an older version)")
    return found


def repository_links(markdown: str, folder: Path, repository: Path, source: Path) -> str:
    """``markdown`` (a file of ``folder`` in ``repository``) with its relative links to repository files that are not
    pages of the book made to work in the book: an image is copied into ``source`` at the same place (the book
    mirrors the repository's layout), any other file becomes a link to it on GitHub. Links to notebooks, to headings
    and to files that do not exist are left as written, for Sphinx to resolve or report."""

    def rewrite(match: re.Match) -> str:
        target, anchor = match["target"].partition("#")[::2]
        path = (folder / target).resolve()
        if not path.exists() or not path.is_relative_to(repository) or path.suffix == ".ipynb":
            return match[0]
        relative = path.relative_to(repository)
        if match["bang"]:
            (source / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, source / relative)
            return match[0]
        url = REPOSITORY + relative.as_posix() + ("#" + anchor if anchor else "")
        return f"[{match['text']}]({url})"

    return RELATIVE_LINK.sub(rewrite, markdown)


def assemble(source: Path, notebooks: Path = NOTEBOOKS, executed: Path = EXECUTED,
             pages: Path = BOOK, readme: Path = ROOT / "README.md") -> None:
    """Fill ``source`` (emptied first) with the book's pages (``pages``' *.md), README.md and, under notebooks/, the
    executed copy of every notebook in ``notebooks`` as the book shows it (``static_widgets``); links to repository
    files are made to work in the book (``repository_links``; the repository is the folder holding ``readme``)."""
    repository = readme.resolve().parent
    shutil.rmtree(source, ignore_errors=True)
    (source / "notebooks").mkdir(parents=True)
    for page in pages.glob("*.md"):
        shutil.copy(page, source / page.name)
    (source / "README.md").write_text(repository_links(readme.read_text(), repository, repository, source))
    for notebook in sorted(notebooks.glob("*.ipynb")):
        nb = json.loads((executed / notebook.name).read_text())
        for cell in nb["cells"]:
            if cell["cell_type"] == "markdown":
                cell["source"] = repository_links("".join(cell["source"]), notebook.resolve().parent, repository,
                                                  source)
        (source / "notebooks" / notebook.name).write_text(json.dumps(static_widgets(nb), ensure_ascii=False))


def _progress_line(state: dict, model_id: str) -> str | None:
    """The final text line of a tqdm.auto bar (an HBox of [HTML, a progress bar, HTML], as tqdm's notebook widget
    builds it) from the saved widget ``state``, as tqdm prints it in a terminal: ``100%|██████████| 3/3 [00:01<…]``;
    None when ``model_id`` is not such a bar."""
    model = state.get(model_id, {})
    children = [state.get(child.removeprefix("IPY_MODEL_"), {}) for child in model.get("state", {}).get("children", [])]
    kinds = [child.get("model_name") for child in children]
    if model.get("model_name") != "HBoxModel" or kinds not in (["HTMLModel", "FloatProgressModel", "HTMLModel"],
                                                                ["HTMLModel", "IntProgressModel", "HTMLModel"]):
        return None
    left, bar, right = (child["state"] for child in children)
    filled = round(10 * bar.get("value", 0) / bar["max"]) if bar.get("max") else 0
    text = f"{left.get('value', '')}|{'█' * filled}{' ' * (10 - filled)}|{right.get('value', '')}"
    return html.unescape(text).replace("\u2007", " ")


def static_widgets(nb: dict) -> dict:
    """``nb`` (an executed notebook, changed in place and returned) as the book shows it: every tqdm.auto progress
    bar replaced by its final text line, and a ``WIDGET_NOTE`` markdown cell before each cell that shows another
    widget. The widget state saved by the run (the notebook's metadata) gives each bar's final value."""
    state = nb.get("metadata", {}).get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    cells = []
    for cell in nb["cells"]:
        interactive = False
        for index, out in enumerate(cell.get("outputs", [])):
            view = out.get("data", {}).get(WIDGET_VIEW)
            if view is None:
                continue
            line = _progress_line(state, view.get("model_id", ""))
            if line is None:
                interactive = True
            else:
                cell["outputs"][index] = {"output_type": "stream", "name": "stdout", "text": line + "\n"}
        if interactive:
            cells.append({"cell_type": "markdown", "metadata": {}, "source": WIDGET_NOTE,
                          **({"id": f"{cell['id']}-static-note"} if "id" in cell else {})})
        cells.append(cell)
    nb["cells"] = cells
    return nb


def lines(text: str) -> list[str]:
    """``text``'s non-empty lines without terminal colours."""
    return [line for line in re.sub(r"\x1b\[[0-9;]*m", "", text).splitlines() if line.strip()]


def sphinx(source: Path, html_dir: Path, doctrees: Path, conf: Path = BOOK) -> list[str]:
    """Build ``source`` as HTML into ``html_dir`` with a fresh environment, in this process; every warning Sphinx
    reports (all of them: it keeps going), one line each. Empty when the build is clean."""
    from sphinx.application import Sphinx
    from sphinx.errors import SphinxError
    from sphinx.util.docutils import docutils_namespace, patch_docutils

    warnings = io.StringIO()
    try:
        with patch_docutils(conf), docutils_namespace():
            app = Sphinx(source, conf, html_dir, doctrees, "html", status=None, warning=warnings, freshenv=True,
                         warningiserror=True)
            app.build()
    except SphinxError as error:
        return lines(warnings.getvalue()) + [f"sphinx: {error}"]
    found = lines(warnings.getvalue())
    return found or ([] if app.statuscode == 0 else [f"sphinx exited with status {app.statuscode}"])


class _Images(html.parser.HTMLParser):
    """The ``src`` of every <img> in a page."""

    def __init__(self):
        super().__init__()
        self.sources = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs).get("src", ""))


def page_images(page: Path) -> list[bytes]:
    """The images ``page`` shows that are part of the book (a data URI or a file the build wrote; not a remote
    badge), as bytes."""
    parser = _Images()
    parser.feed(page.read_text(encoding="utf-8"))
    found = []
    for src in parser.sources:
        if src.startswith("data:"):
            found.append(base64.b64decode(src.partition(",")[2]))
        elif "://" not in src and (page.parent / src).is_file():
            found.append((page.parent / src).read_bytes())
    return found


def output_images(nb: dict) -> list[bytes]:
    """The images among the executed notebook's outputs, as bytes (one per output: its first image type)."""
    found = []
    for cell in nb["cells"]:
        for out in cell.get("outputs", []):
            kind = next((kind for kind in IMAGE_TYPES if kind in out.get("data", {})), None)
            if kind is not None:
                data = out["data"][kind]
                data = "".join(data) if isinstance(data, list) else data
                found.append(data.encode() if kind == "image/svg+xml" else base64.b64decode(data))
    return found


def missing_figures(source: Path, html_dir: Path) -> list[str]:
    """One line per notebook page that does not show every image its executed notebook's outputs hold."""
    found = []
    for notebook in sorted((source / "notebooks").glob("*.ipynb")):
        page = html_dir / "notebooks" / (notebook.stem + ".html")
        drawn = output_images(json.loads(notebook.read_text()))
        shown = set(page_images(page)) if page.exists() else set()
        lost = sum(1 for image in drawn if image not in shown)
        if lost:
            found.append(f"{page.relative_to(html_dir)} does not show {lost} of the {len(drawn)} image(s) its "
                         "executed notebook holds")
    return found


def raw_tables(html_dir: Path) -> list[str]:
    """One line per page of the built book that shows a Markdown table as text (its ``|---|`` row) — an output or a
    page whose table did not render."""
    found = []
    for page in sorted(html_dir.rglob("*.html")):
        text = page.read_text(encoding="utf-8")
        if RAW_TABLE.search(text):
            found.append(f"{page.relative_to(html_dir)} shows a Markdown table as raw text: "
                         f"{RAW_TABLE.search(text)[0]!r}")
    return found


def build(out: Path = OUT, notebooks: Path = NOTEBOOKS, executed: Path = EXECUTED, pages: Path = BOOK,
          readme: Path = ROOT / "README.md") -> list[str]:
    """Assemble and build the book into ``out``/html; what is wrong, one line each (empty: the book is good)."""
    problems = stale_or_missing(notebooks, executed)
    if problems:
        return problems + ["run the notebooks' tests first: python -m pytest --nbmake --nbmake-timeout=1500 "
                           "-p no:cacheprovider notebooks"]
    source, html_dir = out / "source", out / "html"
    assemble(source, notebooks, executed, pages, readme)
    for folder in (html_dir, out / "doctrees"):
        shutil.rmtree(folder, ignore_errors=True)
    return (sphinx(source, html_dir, out / "doctrees", conf=pages)
            or missing_figures(source, html_dir) + raw_tables(html_dir))


def main() -> int:
    problems = build()
    if problems:
        print("The book was not built:", *problems, sep="\n  ", file=sys.stderr)
        return 1
    print(f"book: {OUT / 'html' / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
