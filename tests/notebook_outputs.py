"""What an executed notebook shows a student: every figure as an image, each once, widgets that drew, no warnings,
nothing on stderr that the notebook does not expect by name, and "reading the results" text that agrees with the
numbers the same run displayed (``reading_problems``).

``problems(nb, name)`` lists what is wrong with an executed notebook's outputs. notebooks/conftest.py applies it to
every notebook nbmake executes (inside the same test, so CI executes each notebook once), tests/test_wheel.py to
the notebooks it runs from an installed wheel, and tests/test_notebooks.py shows each check can fail.
"""

from __future__ import annotations

import base64
import html.parser
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
    "07_vit_finetuning": (1, 1),
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
    return found + reading_problems(nb, name) + layout_problems(nb)


# --- readings: every sentence tied to a number ------------------------------------------------------------------------
#: notebooks whose "reading the results" text is generated from the run's numbers (boftlab.teaching.reading): each
#: must display at least one reading, and none may write one by hand in a markdown cell
READINGS = ("00_quickstart", "07_vit_finetuning", "08_llm_finetuning", "09_diffusion_finetuning",
            "10_speed_and_memory")
#: a reading is a Markdown output whose first line carries this title
READING_TITLE = "Reading the results"

#: a number as the tables and readings write it: 12,288 · 0.886 · −0.004 · +1.5 · 3.0e-03 (U+2212 is a minus)
NUMBER = re.compile(r"(?<![\w.])[−+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:e[−+-]?\d+)?(?![\w])")
#: an interval as the readings quote it: [−0.004, +0.028]
INTERVAL = re.compile(rf"\[\s*({NUMBER.pattern})\s*,\s*({NUMBER.pattern})\s*\]")
#: words that claim an order between two rows, by the sign of the quoted difference they need; "better"/"worse"
#: need the reading to say which direction of the metric is better
HIGHER = re.compile(r"\b(higher than|above)\b")
LOWER = re.compile(r"\b(lower than|below)\b")
BETTER = re.compile(r"\b(beats?|better than|outperforms?|ahead of)\b")
WORSE = re.compile(r"\b(worse than|behind|trails?)\b")
#: words that claim no order: the interval must include 0
TIE = re.compile(r"\b(cannot (?:be )?(?:tell|told)|cannot rank|inconclusive|indistinguishable|ties?|tied)\b")
NEGATION = re.compile(r"\b(not|no|never)\b|n't\b")
#: a time claim quotes the ratio of this row's time to the reference's: slower needs R > 1, faster R < 1
SLOWER, FASTER = re.compile(r"\bslower\b"), re.compile(r"\bfaster\b")
RATIO = re.compile(rf"({NUMBER.pattern})\s*×")


def value(text: str) -> float:
    """A NUMBER match as a float: thousands separators dropped, U+2212 read as a minus."""
    return float(text.replace(",", "").replace("−", "-"))


def decimals(text: str) -> int:
    mantissa = text.lower().split("e")[0]
    return len(mantissa.split(".")[1]) if "." in mantissa else 0


class _Tables(html.parser.HTMLParser):
    """The rows of every <table> in an HTML output (pandas' DataFrame display), header rows included."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self.cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self.cell is not None and self.rows:
            self.rows[-1].append(" ".join("".join(self.cell).split()))
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)


def markdown_of(out: dict) -> str | None:
    return out.get("data", {}).get("text/markdown") if out.get("output_type") in ("display_data",
                                                                                  "execute_result") else None


def displayed_tables(nb: dict) -> list[list[list[str]]]:
    """Every table the executed notebook displays — Markdown pipe tables and pandas' HTML tables — as rows of cells
    (a table's first row is its header)."""
    tables = []
    for cell in nb["cells"]:
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            text = data.get("text/markdown") or ""
            rows: list[list[str]] = []
            for line in text.splitlines() + [""]:
                if line.strip().startswith("|"):
                    cells = [c.strip() for c in line.strip().strip("|").split("|")]
                    if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                        rows.append(cells)
                elif rows:
                    tables.append(rows)
                    rows = []
            if "<table" in data.get("text/html", ""):
                parser = _Tables()
                parser.feed(data["text/html"])
                tables.append([row for row in parser.rows if row])
    return tables


def readings(nb: dict) -> list[str]:
    """The generated readings the executed notebook displays (Markdown outputs titled ``READING_TITLE``)."""
    found = []
    for cell in nb["cells"]:
        for out in cell.get("outputs", []):
            text = markdown_of(out)
            if text and READING_TITLE in text.strip().splitlines()[0]:
                found.append(text)
    return found


def claims(reading: str) -> list[str]:
    """A reading's claims: its bullets ("* " or "- " lines with their continuation lines) and other paragraphs."""
    units, current = [], []
    for line in reading.strip().splitlines()[1:]:
        if re.match(r"\s*[*-] ", line) or not line.strip():
            if current:
                units.append(" ".join(current))
            current = [re.sub(r"^\s*[*-] ", "", line)] if line.strip() else []
        else:
            current.append(line.strip())
    if current:
        units.append(" ".join(current))
    return [u for u in units if u.strip()]


def _matches(text: str, cell_text: str, percent: bool) -> bool:
    t, k = abs(value(text)), decimals(text)
    for number in NUMBER.findall(cell_text):
        v = abs(value(number))
        if abs(v - t) <= 0.5 * 10 ** -k + 1e-12 or (percent and abs(100 * v - t) <= 0.5 * 10 ** -k + 1e-12):
            return True
    return False


def _has_interval(lo: str, hi: str, cell_text: str) -> bool:
    for a, b in INTERVAL.findall(cell_text):
        if all(abs(value(x) - value(y)) <= 0.5 * 10 ** -decimals(x) + 1e-12 for x, y in ((lo, a), (hi, b))):
            return True
    return False


def claim_problems(claim: str, tables: list[list[list[str]]], better: str | None) -> list[str]:
    """What in one claim of a reading disagrees with the displayed ``tables``: a number no table shows (in the row of
    a method the claim names, when it names one: a row's first cell), an interval no table shows with those signs, an
    order claimed without an interval or against its sign, no order claimed while the interval excludes 0, a time
    claim against its ratio. ``better``: "higher" or "lower", what the reading says is better, if it says."""
    found = []
    rows = [row for table in tables for row in table[1:]]
    headers = [table[0] for table in tables]
    text = re.sub(r"`[^`]*`", " ", claim)  # code spans name things (functions, settings), they quote no result
    text = re.sub(r"\bnotebooks? \d+(?:\s*[–-]\s*\d+)?", " ", text)  # nor do references to other notebooks
    named = []
    for name in sorted({row[0] for row in rows if row and len(row[0]) > 1 and not NUMBER.fullmatch(row[0])},
                       key=len, reverse=True):  # the longest first: "LoRA r=4 (PEFT)" before "LoRA"
        if name in text:
            named.append(name)
            text = text.replace(name, " ")  # a row's name may hold digits (BOFT b=8 m=2): they are no result
    scope = [row for row in rows if row[0] in named] if named else rows
    where = f"the row(s) of {named}" if named else "any table"
    intervals = INTERVAL.findall(text)
    for lo, hi in intervals:
        if not any(_has_interval(lo, hi, c) for row in scope for c in row):
            found.append(f"quotes the interval [{lo}, {hi}], which {where} does not show: {claim!r}")
    bare = INTERVAL.sub(" ", text)
    for match in NUMBER.finditer(bare):
        percent = bare[match.end():match.end() + 2].strip().startswith("%")
        if not any(_matches(match.group(), c, percent) for row in scope + headers for c in row):
            found.append(f"quotes {match.group()}, which {where} does not show: {claim!r}")
    lowered = text.lower()
    negated = bool(NEGATION.search(lowered))
    wants = None  # the sign of the difference the claim's words need
    if HIGHER.search(lowered) or (better and BETTER.search(lowered)):
        wants = +1 if HIGHER.search(lowered) or better == "higher" else -1
    elif LOWER.search(lowered) or (better and WORSE.search(lowered)):
        wants = -1 if LOWER.search(lowered) or better == "higher" else +1
    elif BETTER.search(lowered) or WORSE.search(lowered):
        found.append(f"claims better/worse without saying whether higher or lower is better: {claim!r}")
        return found
    if wants is not None and not intervals:
        found.append(f"claims an order without the 95 % interval that shows it: {claim!r}")
    for lo, hi in intervals:
        lo_v, hi_v = value(lo), value(hi)
        excludes = lo_v > 0 or hi_v < 0
        if wants is not None and not negated and not (lo_v > 0 if wants > 0 else hi_v < 0):
            found.append(f"claims an order that the interval [{lo}, {hi}] does not show: {claim!r}")
        elif wants is not None and negated and (lo_v > 0 if wants > 0 else hi_v < 0):
            found.append(f"denies an order that the interval [{lo}, {hi}] shows: {claim!r}")
        elif TIE.search(lowered) and not negated and excludes:
            found.append(f"calls a tie what the interval [{lo}, {hi}] separates: {claim!r}")
        elif wants is None and not TIE.search(lowered) and excludes:
            found.append(f"quotes an interval that excludes 0 and says neither an order nor a tie: {claim!r}")
    ratios = [value(r) for r in RATIO.findall(text)]
    for word, pattern, wrong in (("slower", SLOWER, lambda r: r <= 1), ("faster", FASTER, lambda r: r >= 1)):
        if pattern.search(lowered) and not negated:
            if not ratios:
                found.append(f"claims a speed without the time ratio (R×) that shows it: {claim!r}")
            elif any(wrong(r) for r in ratios):
                found.append(f"calls a time ratio of {ratios} {word}: {claim!r}")
    return found


def reading_problems(nb: dict, name: str) -> list[str]:
    """Where ``nb``'s readings disagree with the tables it displays (``claim_problems`` for each claim); for the
    notebooks in ``READINGS``, also: no reading displayed, or a reading written by hand in a markdown cell."""
    found = []
    tables = displayed_tables(nb)
    shown = readings(nb)
    for reading in shown:
        better = re.search(r"\b(higher|lower) is better\b", reading, re.I)
        for claim in claims(reading):
            found += claim_problems(claim, tables, better and better.group(1).lower())
    if name in READINGS:
        if not shown:
            found.append(f"{name} displays no generated reading (a Markdown output titled {READING_TITLE!r})")
        for index, cell in enumerate(nb["cells"]):
            if cell["cell_type"] == "markdown" and re.search(rf"^#+ .*{READING_TITLE}", cell["source"], re.M | re.I):
                found.append(f"cell {index} reads the results by hand; generate the reading from the run's numbers")
    return found


# --- layout: tables that render, legends and labels that fit (issue 25) -----------------------------------------------
#: a Markdown table's delimiter row, |---|---| (with optional colons): printed as text, the book shows raw pipes
RAW_TABLE = re.compile(r"^\s*\|(?:\s*:?-{3,}:?\s*\|)+\s*$", re.MULTILINE)


def layout_problems(nb: dict) -> list[str]:
    """Markdown tables a student would see as raw pipe text: a ``|---|`` row in a printed stream, or in a result
    that offers only text/plain (a string returned as a cell's value) — show them with ``display(Markdown(...))``.
    Figures are checked before they become PNGs (``figure_problems``): an executed notebook holds only pixels."""
    found = []
    for index, cell in enumerate(nb["cells"]):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                text = out.get("text", "")
            elif set(out.get("data", {})) == {"text/plain"}:
                text = out["data"]["text/plain"]
            else:
                continue
            text = "".join(text) if isinstance(text, list) else text
            if RAW_TABLE.search(text):
                found.append(f"cell {index} prints a Markdown table as text (a |---| row); display it with "
                             "display(Markdown(...)) so that it renders")
                break
    return found


def figure_problems(fig) -> list[str]:
    """What would make a matplotlib ``fig`` hard to read, found from the drawn artists: a legend in type under 7 pt;
    a legend covering more than a quarter of its axes; two legends overlapping; a text label (an
    annotation) reaching outside its axes or the figure, or overlapping another; a log axis spanning less than a
    decade with fewer than three labelled ticks (matplotlib's default there: one or two, as a×10^k). Empty if none."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.transforms import Bbox

    FigureCanvasAgg(fig).draw()
    renderer = fig.canvas.get_renderer()
    found, boxes = [], []
    figure_box = fig.bbox
    legends = [(ax, ax.get_legend()) for ax in fig.axes if ax.get_legend() is not None]
    legends += [(None, legend) for legend in fig.legends]
    for ax, legend in legends:
        size = min((t.get_fontsize() for t in legend.get_texts()), default=10)
        if size < 7:
            found.append(f"a legend uses {size:g}-point type (at least 7 is readable)")
        box = legend.get_window_extent(renderer)
        inside = Bbox.intersection(box, ax.bbox) if ax is not None else None
        if inside is not None:
            share = (inside.width * inside.height) / (ax.bbox.width * ax.bbox.height)
            if share > 0.25:
                found.append(f"a legend covers {share:.0%} of its panel (at most 25 %: put it outside the axes)")
        if any(box.overlaps(other) for other in boxes):
            found.append("two legends overlap")
        boxes.append(box)
    for ax in fig.axes:
        texts = [t for t in ax.texts if t.get_visible() and t.get_text()]
        extents = [t.get_window_extent(renderer) for t in texts]
        for text, box in zip(texts, extents):
            inside = ax.bbox.x0 - 1 <= box.x0 and box.x1 <= ax.bbox.x1 + 1 and ax.bbox.y0 - 1 <= box.y0 \
                and box.y1 <= ax.bbox.y1 + 1
            if not inside or not (figure_box.x0 <= box.x0 and box.x1 <= figure_box.x1):
                found.append(f"the label {text.get_text()!r} reaches outside its axes")
        for i in range(len(extents)):
            for j in range(i + 1, len(extents)):
                if extents[i].overlaps(extents[j]):
                    found.append(f"the labels {texts[i].get_text()!r} and {texts[j].get_text()!r} overlap")
        for name, axis in (("y", ax.yaxis), ("x", ax.xaxis)):
            low, high = sorted(ax.get_ylim() if name == "y" else ax.get_xlim())
            if axis.get_scale() != "log" or high >= 10 * low:
                continue
            positions = [p for p, t in zip(list(axis.get_majorticklocs()) + list(axis.get_minorticklocs()),
                                           axis.get_majorticklabels() + axis.get_minorticklabels())
                         if t.get_text() and low <= p <= high]
            if len(positions) < 3:
                found.append(f"a log {name} axis spans less than a decade ({low:.3g} to {high:.3g}) and labels "
                             f"{len(positions)} tick(s): use a linear axis, or label the values plotted")
    return found
