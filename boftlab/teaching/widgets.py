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
        png = io.BytesIO()
        figure.savefig(png, format="png", dpi=80)
        plt.close(figure)  # a pyplot figure would otherwise also be shown through the Output widget
        image.value, image.layout.display = png.getvalue(), None

    show.__signature__ = inspect.signature(function)  # the controls come from the figure function's parameters
    panel = widgets.interactive(show, **controls)
    box = widgets.VBox([*panel.children, text, image])
    display(box)
    return box
