"""The notebooks' one widget helper: ``interact`` puts sliders on a plain figure function.

The figure functions themselves live in the other ``boftlab.teaching`` modules and are tested without widgets; this
module only connects them to ipywidgets. Tested in ``tests/test_teaching_widgets.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def interact(function: Callable[..., Figure | None], **controls: Any) -> Any:  # -> widgets.VBox
    """``ipywidgets.interact`` for the figure functions: same controls (sliders, lists, ``widgets.fixed`` …), but
    the returned Figure is rendered to PNG into a ``widgets.Image`` and what the function prints into a ``<pre>``
    block, instead of both going through an ``Output`` widget — rich outputs captured by an Output widget can
    deadlock headless notebook runners (jupyter/nbclient#312, jupyter/nbconvert#2029), and CI runs every notebook.
    Displays and returns a ``widgets.VBox``: the controls, the (normally empty) Output widget where errors appear,
    the printed text and the figure.
    """
    import contextlib
    import html
    import inspect
    import io

    import ipywidgets as widgets
    import matplotlib.pyplot as plt
    from IPython.display import display

    image, text = widgets.Image(format="png"), widgets.HTML()

    def show(**kwargs: Any) -> None:
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            figure = function(**kwargs)
        text.value = f"<pre>{html.escape(printed.getvalue())}</pre>" if printed.getvalue() else ""
        if figure is None:
            image.layout.display = "none"
            return
        image.value, image.layout.display = _png(figure), None
        plt.close(figure)  # a pyplot figure would otherwise also be shown through the Output widget

    show.__signature__ = inspect.signature(function)  # the controls come from the figure function's parameters
    panel = widgets.interactive(show, **controls)
    box = widgets.VBox([*panel.children, text, image])
    display(box)
    return box


def live_tuning(leaderboard: Any = None, block_size: int = 8, n_factors: int = 2) -> Any:  # -> widgets.VBox
    """Notebook 07's live tuning panel: a menu of the valid (block_size, n_factors) pairs (each with its parameter
    count and the density of R), learning rate, steps and a Train button. A click calls ``live.tune`` and adds the
    run to ``leaderboard`` (a ``live.Leaderboard``; a new one if None), ranked by validation accuracy; the figure
    (``live.plot_runs``: validation curves over the stored baselines') and the leaderboard are rendered into an Image
    and an HTML widget, as ``interact`` does. "Test my choice" tests the best run once (``test_chosen``) and ends
    the tuning: both buttons are disabled after it.
    Only the training's tqdm bar goes through an Output widget, and only on a click — something a headless runner
    never does, so the nbclient deadlock (see ``interact``) cannot happen. Displays and returns the ``VBox``."""
    import html

    import ipywidgets as widgets
    from IPython.display import display

    from . import live

    board = live.Leaderboard() if leaderboard is None else leaderboard
    baselines = live.load_baselines()
    pairs = widgets.Dropdown(options=[(live.pair_info(b, m).label(), (b, m)) for b, m in live.valid_pairs()],
                             value=(block_size, n_factors), description="(b, m)", layout={"width": "620px"})
    lr = widgets.FloatLogSlider(value=live.LR, base=10, min=-4, max=-1.5, step=0.25, description="lr",
                                readout_format=".1e")
    steps = widgets.IntSlider(value=live.STEPS, min=30, max=300, step=30, description="steps")
    button = widgets.Button(description="Train", button_style="primary", icon="play")
    choose = widgets.Button(description="Test my choice", icon="check",
                            tooltip="test the best run by validation, once; no training after it")
    bar, text, image = widgets.Output(), widgets.HTML(), widgets.Image(format="png")

    def render(message: str = "") -> None:
        shown = f"<p>{html.escape(message.strip())}</p>" if message.strip() else ""
        text.value = shown + _html_table(board.markdown(baselines))
        image.value = _png(live.plot_runs(board.runs, baselines))

    def train(_: Any) -> None:
        button.disabled = True
        try:
            bar.clear_output()
            with bar:
                run = live.tune(*pairs.value, lr=lr.value, steps=steps.value)
            rank = board.add(run)
            render(f"{run.name}, lr {run.lr:.1e}, {run.steps} steps: validation accuracy {run.final:.3f} "
                   f"in {run.seconds:.1f} s — rank {rank} of {len(board.runs)}\n\n")
        finally:
            button.disabled = board.chosen is not None

    def test(_: Any) -> None:
        if not board.runs:
            render("Train a run first: the test set is read once, for the run you finally choose.\n\n")
            return
        chosen = board.test_chosen()
        button.disabled = choose.disabled = True
        render(f"Chosen by validation: {chosen.name}, lr {chosen.lr:.1e}, {chosen.steps} steps — test accuracy "
               f"{chosen.test:.3f} (validation {chosen.final:.3f}). The test set has now been read: tuning further "
               "on this board is closed.\n\n")

    button.on_click(train)
    choose.on_click(test)
    render()
    box = widgets.VBox([pairs, widgets.HBox([lr, steps, button, choose]), bar, text, image])
    display(box)
    return box


def _html_table(markdown: str) -> str:
    """A Markdown table (``| a | b |``, its ``|---|`` row, the rows) as an HTML <table>, escaped: an HTML widget
    shows Markdown as raw pipes (the leaderboard did, in a <pre>)."""
    import html

    lines = [line.strip().strip("|").split("|") for line in markdown.strip().splitlines()]
    header, rows = lines[0], lines[2:]

    def row(cells: list[str], tag: str) -> str:
        return "<tr>" + "".join(f"<{tag}>{html.escape(c.strip())}</{tag}>" for c in cells) + "</tr>"

    return ("<table><thead>" + row(header, "th") + "</thead><tbody>" + "".join(row(r, "td") for r in rows)
            + "</tbody></table>")


def _png(figure: Any) -> bytes:
    """The figure as PNG bytes, for a ``widgets.Image`` (how both panels show figures without an Output widget)."""
    import io

    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=80)
    return png.getvalue()
