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
