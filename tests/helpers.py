"""What several test modules share: the configs every registered family declares, a trained-looking adapter, a
snapshot of everything a refused call must leave as it was, and notebooks found by their title.

Imported by name (``from helpers import perturb``): pytest puts ``tests/`` on ``sys.path`` for the modules in it.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D as TransformersConv1D

import boftlab
from boftlab.base_layers import Conv1D
from boftlab.contract import FAMILIES, AdapterConfig
from boftlab.model import TRAINABLE_ATTR

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


# --- the families' own examples ---------------------------------------------------------------------------------------
def family_examples() -> list[tuple[str, AdapterConfig]]:
    """(family, config) for every example of every family registered in ``FAMILIES`` (``examples``, declared next to
    the family's config): a family that declares none raises its ValueError here — at collection, where it is
    parametrised — so it fails loudly instead of going untested."""
    return [(family, config) for family, cls in FAMILIES.items() for config in cls.example_configs()]


def named_examples() -> dict[str, AdapterConfig]:
    """Every example of every registered family by a short name: the family's for its canonical (first) example,
    then ``family-2``, ``family-3``, … (e.g. "boft", "surm", "surm-2", "surm-3", "tensor_core")."""
    named = {}
    for family, cls in FAMILIES.items():
        for i, config in enumerate(cls.example_configs(), 1):
            named[family if i == 1 else f"{family}-{i}"] = config
    return named


def canonical_configs() -> dict[str, AdapterConfig]:
    """family -> its canonical (first) example config, for every registered family."""
    return {family: cls.example_configs()[0] for family, cls in FAMILIES.items()}


def config_id(config: AdapterConfig) -> str:
    """A test id: the family and every option set (``BOFTConfig-boft-block_size=4,n_factors=2,...``)."""
    options = ",".join(f"{k}={v}" for k, v in config.to_dict().items() if k != "family" and v is not None)
    return f"{config.display_name()}-{config.family}-{options}"


#: one base layer and one input per layer type a family may adapt (the float kinds of ``boftlab.base_layers``), with
#: fan-ins that every family's examples fit
LAYERS = {
    nn.Linear: (lambda: nn.Linear(16, 12), lambda: torch.randn(3, 16)),
    Conv1D: (lambda: TransformersConv1D(12, 16), lambda: torch.randn(3, 16)),  # GPT-2's: nf=12 outputs, nx=16 inputs
    nn.Conv1d: (lambda: nn.Conv1d(8, 6, 3, padding=1), lambda: torch.randn(2, 8, 9)),
    nn.Conv2d: (lambda: nn.Conv2d(8, 6, 3, padding=1), lambda: torch.randn(2, 8, 5, 5)),
    nn.Conv3d: (lambda: nn.Conv3d(4, 6, 2), lambda: torch.randn(2, 4, 3, 3, 3)),
    nn.Embedding: (lambda: nn.Embedding(20, 16, padding_idx=3), lambda: torch.randint(0, 20, (3, 5)).fill_diagonal_(3)),
}


# --- a trained-looking adapter ----------------------------------------------------------------------------------------
def perturb(module: nn.Module, scale: float = 0.1) -> nn.Module:
    """Move every adapter tensor of every adapter layer in ``module`` (a model, or one adapter layer) by
    scale · N(0, 1) away from its initial value, as training would; returns ``module``."""
    with torch.no_grad():
        for layer in boftlab.adapter_layers(module).values():
            for p in layer.adapter_parameters().values():
                p.add_(scale * torch.randn_like(p))
    return module


# --- a refused call changes nothing -----------------------------------------------------------------------------------
def snapshot(model: nn.Module, *others: Any) -> dict[str, Any]:
    """Everything a refused call must leave as it was: the module tree (names and types), every tensor of
    ``model.state_dict()``, which parameters train, each adapter's merged flag, the modules kept trainable — and the
    ``state_dict()`` of each of ``others`` (an optimizer, a scheduler). Compare two with ``assert_unchanged``."""
    return dict(
        modules=[(n, type(m).__name__) for n, m in model.named_modules()],
        tensors={k: v.detach().clone() for k, v in model.state_dict().items()},
        trainable={n: p.requires_grad for n, p in model.named_parameters()},
        merged={n: layer.merged for n, layer in boftlab.adapter_layers(model).items()},
        kept=list(getattr(model, TRAINABLE_ATTR, [])),
        others=[copy.deepcopy(other.state_dict()) for other in others],
    )


def assert_unchanged(before: dict[str, Any], after: dict[str, Any]) -> None:
    """``after`` is ``before``: every entry of ``snapshot`` equal, tensors bit for bit (NaN where NaN was)."""
    assert before.keys() == after.keys()
    for entry, value in before.items():
        assert same(value, after[entry]), f"{entry} changed"


def same(a: Any, b: Any) -> bool:
    """Equal, recursively through dicts, lists and tuples; tensors bit for bit, in the same dtype, with NaN equal to
    NaN (a NaN the model already held must still be there); meta tensors by shape and dtype (they hold no values)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(v, b[k]) for k, v in a.items())
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(u, v) for u, v in zip(a, b))
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.dtype != b.dtype or a.shape != b.shape:
            return False
        if a.is_meta or b.is_meta:
            return a.is_meta and b.is_meta
        if a.is_floating_point() or a.is_complex():  # NaN where NaN was, every other value (±inf too) equal
            nan = a.isnan()
            return torch.equal(nan, b.isnan()) and torch.equal(a.masked_fill(nan, 0), b.masked_fill(nan, 0))
        return torch.equal(a, b)
    return a == b


# --- notebooks by title -----------------------------------------------------------------------------------------------
#: a notebook's title: its first Markdown heading, after the "NN · " the file name also carries
TITLE = re.compile(r"^#\s+(?:\d+\s*·\s*)?(?P<title>.+)$", re.M)


def notebook_title(path: Path) -> str:
    """The first Markdown heading of the notebook at ``path``, without its number ("Quick start: BOFT on ...")."""
    for cell in json.loads(path.read_text())["cells"]:
        if cell["cell_type"] == "markdown" and (match := TITLE.search("".join(cell["source"]))):
            return match.group("title").strip()
    raise ValueError(f"{path.name} has no Markdown heading, so it cannot be found by its title")


def notebook_titled(start: str) -> Path:
    """The one notebook in ``notebooks/`` whose title begins with ``start``; ValueError naming every title if none
    or several do (a renumbered notebook is still found, a renamed one fails loudly)."""
    titles = {path: notebook_title(path) for path in sorted(NOTEBOOKS.glob("*.ipynb"))}
    found = [path for path, title in titles.items() if title.startswith(start)]
    if len(found) != 1:
        listing = "; ".join(f"{p.name}: {t!r}" for p, t in titles.items())
        raise ValueError(f"{len(found)} notebooks have a title beginning with {start!r} (one is needed): {listing}")
    return found[0]
