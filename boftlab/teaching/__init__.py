"""Teaching code for the notebooks: figures, the widget helper and small demo experiments, kept apart from the
adapters (the family files hold the structured matrix and its layer only).

One module per subject, each loaded when imported (``from boftlab.teaching import surm``) or first touched
(``boftlab.teaching.surm``):

* ``primer``       — LoRA and OFT on a real weight, angles between neurons, the Cayley transform (notebook 01);
* ``butterfly``    — butterfly patterns, reachability, parameter budgets (notebooks 02, 03);
* ``expressivity`` — fitting rotations with BOFT/OFT at equal budgets (notebook 04);
* ``surm``         — best structured approximations and their figures (notebook 05);
* ``tensor_core``  — flattening and mode-product figures, parameter counts vs PEFT, the digits transfer task (notebook 06);
* ``live``         — live BOFT tuning on the ci ViT against stored baselines, and a leaderboard (notebook 07);
* ``widgets``      — ``interact``: sliders on any of the figure functions above; ``live_tuning``: the panel of notebook 07;
* ``exercises``    — the checkers of the exercises in notebooks 01–06 (``check("N.k", answer)``);
* ``solutions``    — their solutions, one function per exercise (``solutions.show("1.3")`` prints one);
* ``kit``          — the teacher kit: student notebooks, grading, slides (``python -m boftlab.teaching``).

They need the ``notebooks`` extra (matplotlib, ipywidgets, scikit-learn, peft, …): ``pip install "boftlab[notebooks]"``.
"""

import importlib
import importlib.util
from typing import Any

_MISSING = [name for name in ("matplotlib", "tqdm") if importlib.util.find_spec(name) is None]
if _MISSING:
    raise ImportError(
        f"boftlab.teaching draws with matplotlib and shows progress with tqdm; {' and '.join(_MISSING)} not "
        'installed. Install the notebooks extra: pip install "boftlab[notebooks]"'
    )

MODULES = ("primer", "butterfly", "expressivity", "live", "surm", "tensor_core", "widgets", "exercises", "solutions",
           "kit")


def __getattr__(name: str) -> Any:
    if name in MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'boftlab.teaching' has no attribute {name!r}; its modules: {MODULES}")
