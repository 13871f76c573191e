"""boftlab.teaching.widgets: ``interact`` renders a figure function's output without an Output widget."""

import matplotlib

matplotlib.use("Agg")

import ipywidgets as widgets
from matplotlib.figure import Figure

from boftlab.teaching.widgets import interact


def test_interact_renders_the_figure_and_the_printed_text_without_an_output_widget():
    def plot(dim: int, label: str):
        print(f"dim={dim} <{label}>")
        figure = Figure()
        figure.subplots().plot(range(dim))
        return figure

    box = interact(plot, dim=widgets.IntSlider(value=4, min=2, max=8), label=widgets.fixed("x"))
    slider, output, text, image = box.children
    assert image.value[:8] == b"\x89PNG\r\n\x1a\n" and "dim=4 &lt;x&gt;" in text.value
    assert not output.outputs  # nothing went through the Output widget
    first = image.value
    slider.value = 7  # moving a control re-renders
    assert "dim=7" in text.value and image.value != first


def test_the_live_panel_shows_its_leaderboard_as_an_html_table_not_raw_markdown():
    """Notebook 07's leaderboard showed its Markdown pipes in a <pre> (issue 25)."""
    from boftlab.teaching import live
    from boftlab.teaching.widgets import _html_table, live_tuning

    text = live_tuning(live.Leaderboard()).children[3]
    assert text.value.startswith("<table><thead><tr><th>rank</th>") and "|" not in text.value
    assert _html_table("| a | b |\n|---|---|\n| 1 | <2> |") == (
        "<table><thead><tr><th>a</th><th>b</th></tr></thead>"
        "<tbody><tr><td>1</td><td>&lt;2&gt;</td></tr></tbody></table>")
