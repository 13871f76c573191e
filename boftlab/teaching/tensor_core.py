"""Notebook 06's figures and experiment for the tensor-core (FLoRA) adapter: what flattening a kernel does, the mode
products step by step, adapter parameters per layer kind against PEFT, and a small transfer task.

The adapter itself is ``boftlab.tensor_core``. The transfer task runs on the reproduction's code
(``boftlab.reproduce``): its digits data and stratified splits (``data``), its pretraining loop
(``pretrained.train_digit_model``) and its fine-tuning loop (``runner.run_methods``: AdamW, warm-up then cosine
decay, the same seed and batches for every method), so notebook 06 measures the way ``python -m boftlab
reproduce`` does. Tested in ``tests/test_teaching_tensor_core.py``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import nn

from ..reproduce.data import digits, stratified_split
from ..reproduce.methods import Method
from ..reproduce.pretrained import train_digit_model
from ..reproduce.task import Task, accuracy, classification_task
from ..tensor_core import TensorCoreConfig, resolve_ranks, tucker_n_params


# --- what flattening does to a kernel, and the mode products ---------------------------------------------------------
def flattened_neighbours(in_channels: int, kernel_size: int, channel: int, row: int, col: int) -> dict[str, int]:
    """Columns of LoRA's flattened out × (in·k·k) matrix that hold tap (channel, row, col) and its kernel neighbours.

    PyTorch flattens W[o, c, i, j] to column c·k² + i·k + j: a horizontal neighbour is 1 column away, a vertical one
    k columns, the same tap of the next channel k² columns. O(1).
    """
    k = kernel_size
    if not (0 <= channel < in_channels and 0 <= row < k and 0 <= col < k):
        raise ValueError(f"tap ({channel}, {row}, {col}) is outside a kernel of {in_channels} channels × {k}×{k}")
    column = lambda c, i, j: c * k * k + i * k + j  # noqa: E731
    found = {"tap": column(channel, row, col)}
    for name, (c, i, j) in {
        "left": (channel, row, col - 1), "right": (channel, row, col + 1), "up": (channel, row - 1, col),
        "down": (channel, row + 1, col), "next channel": (channel + 1, row, col),
    }.items():
        if 0 <= c < in_channels and 0 <= i < k and 0 <= j < k:
            found[name] = column(c, i, j)
    return found


def plot_flattening(in_channels: int = 3, kernel_size: int = 3, channel: int = 1, row: int = 1, col: int = 1) -> Figure:
    """Figure: one output filter (in_channels k×k grids) and the flattened row LoRA factorises, neighbours marked."""
    k = kernel_size
    marks = flattened_neighbours(in_channels, k, channel, row, col)
    colours = {"tap": "tab:red", "left": "tab:blue", "right": "tab:blue", "up": "tab:green", "down": "tab:green",
               "next channel": "tab:purple"}
    fig = Figure(figsize=(10, 3.2), layout="constrained")
    grid = fig.add_gridspec(2, in_channels, height_ratios=[3, 1])
    for c in range(in_channels):
        ax = fig.add_subplot(grid[0, c])
        ax.set_title(f"W[o, {c}, :, :]", fontsize=9)
        ax.set_xticks([]), ax.set_yticks([])
        ax.imshow(torch.zeros(k, k).numpy(), cmap="Greys", vmin=0, vmax=1)
        for name, column in marks.items():
            cc, rest = divmod(column, k * k)
            if cc == c:
                i, j = divmod(rest, k)
                ax.add_patch(_square(j, i, colours[name]))
    ax = fig.add_subplot(grid[1, :])
    ax.imshow(torch.zeros(1, in_channels * k * k).numpy(), cmap="Greys", vmin=0, vmax=1, aspect="auto")
    for name, column in marks.items():
        ax.add_patch(_square(column, 0, colours[name]))
        ax.annotate(name, (column, -0.5), xytext=(column, -0.9), ha="center", fontsize=8, color=colours[name],
                    annotation_clip=False)
    ax.set_yticks([])
    ax.set_xlabel(f"column of the flattened out × (in·k·k) = out × {in_channels * k * k} matrix LoRA factorises")
    return fig


def _square(x: float, y: float, colour: str) -> Rectangle:
    return Rectangle((x - 0.5, y - 0.5), 1, 1, color=colour, alpha=0.8)


def mode_product_steps(shape: Sequence[int], ranks: Sequence[int]) -> list[dict[str, Any]]:
    """The shapes ``tucker_delta`` goes through: G, G ×₁ U₁, …, with each step's factor shape and multiply-adds."""
    steps = [{"label": "G", "shape": tuple(ranks), "factor": None, "flops": 0}]
    current = list(ranks)
    for n, d in enumerate(shape):
        current[n] = d
        flops = math.prod(shape[: n + 1]) * math.prod(ranks[n:])
        steps.append({"label": f"×{n + 1} U{n + 1}", "shape": tuple(current), "factor": (d, ranks[n]), "flops": flops})
    return steps


def plot_mode_products(shape: Sequence[int] = (64, 32, 3, 3), ranks: int | Sequence[int] = (8, 4, 3, 3)) -> Figure:
    """Figure: the tensor after each mode product, one bar per mode (log scale), core ranks blue, full sizes orange."""
    shape = tuple(shape)
    ranks = resolve_ranks(shape, ranks, [f"mode {n + 1}" for n in range(len(shape))], "this")
    steps = mode_product_steps(shape, ranks)
    fig = Figure(figsize=(2.3 * len(steps), 2.8), layout="constrained")
    axes = fig.subplots(1, len(steps), sharex=True)
    top = max(shape)
    for n_step, (ax, step) in enumerate(zip(axes, steps)):
        expanded = [n < n_step for n in range(len(shape))]
        ax.barh(range(len(shape)), step["shape"], color=["tab:orange" if e else "tab:blue" for e in expanded])
        ax.set_xscale("log", base=2)
        ax.set_xlim(0.8, top * 2)
        ax.invert_yaxis()
        ax.set_yticks(range(len(shape)), [f"mode {n + 1}" for n in range(len(shape))] if n_step == 0 else [])
        for n, size in enumerate(step["shape"]):
            ax.text(size * 1.1, n, str(size), va="center", fontsize=8)
        factor = "" if step["factor"] is None else f"U{n_step}: {step['factor'][0]}×{step['factor'][1]}\n"
        ax.set_title(f"{step['label']}\n{factor}{math.prod(step['shape']):,} entries", fontsize=9)
        ax.set_xlabel(f"{step['flops']:,} MACs" if step["flops"] else "core", fontsize=8)
    fig.suptitle(
        f"ΔW {shape} from a core {ranks}: {tucker_n_params(shape, ranks):,} stored numbers "
        f"vs {math.prod(shape):,} in W", fontsize=10,
    )
    return fig


# --- parameter counts against PEFT -----------------------------------------------------------------------------------
def layer_kind(layer: nn.Module) -> str:
    """A short name for a layer's shape class: "Linear", "3×3 conv", "7×7 depthwise conv", "1×1 conv", …"""
    if isinstance(layer, nn.Linear):
        return "Linear"
    kernel = "×".join(map(str, layer.kernel_size))
    depthwise = layer.groups > 1 and layer.groups == layer.in_channels
    return f"{kernel} {'depthwise ' if depthwise else 'grouped ' if layer.groups > 1 else ''}conv"


def parameter_counts(
    model: nn.Module, rank: int, kinds: Sequence[type[nn.Module]] = (nn.Conv2d, nn.Linear)
) -> list[dict[str, Any]]:
    """Adapter parameters per layer kind on ``model``: boftlab tensor-core (ranks=rank) vs PEFT LoRA and LoKr (r=rank).

    PEFT's counts come from injecting PEFT into a copy of the model, one layer kind at a time; a kind PEFT refuses
    (e.g. LoRA on a depthwise conv, unless r is divisible by the groups) is reported as None. Returns rows
    {"layer kind", "layers", "base params", "tensor-core", "PEFT LoRA", "PEFT LoKr"}.
    """
    import copy
    import warnings

    import peft

    by_kind: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, tuple(kinds)):
            by_kind.setdefault(layer_kind(module), []).append(name)
    rows = []
    for kind, names in by_kind.items():
        modules = [model.get_submodule(n) for n in names]
        row: dict[str, Any] = {
            "layer kind": kind, "layers": len(names),
            "base params": sum(m.weight.numel() for m in modules),
            "tensor-core": sum(TensorCoreConfig(ranks=rank).make_layer(m).n_trainable() for m in modules),
        }
        for label, config in (("PEFT LoRA", peft.LoraConfig), ("PEFT LoKr", peft.LoKrConfig)):
            try:
                with warnings.catch_warnings():  # PEFT warns about grouped convs just before it refuses them
                    warnings.filterwarnings("ignore", message="LoRA adapter added to ConvNd layer with groups")
                    injected = peft.inject_adapter_in_model(config(r=rank, target_modules=names), copy.deepcopy(model))
            except ValueError:
                row[label] = None
                continue
            row[label] = sum(p.numel() for n, p in injected.named_parameters() if p.requires_grad)
        rows.append(row)
    return rows


# --- a small transfer task: digits 0–4 -> digits 5–9 -----------------------------------------------------------------
SOURCE_CLASSES = [0, 1, 2, 3, 4]
TARGET_CLASSES = [5, 6, 7, 8, 9]  # relabelled 0–4: the pretrained 5-way head is the starting point downstream
CONVS = ["conv1", "conv2", "conv3"]
TEST_FRACTION = 0.3  # of each class, held out in both tasks
LR = 1e-2  # AdamW's peak learning rate, for pretraining and for every fine-tuning method alike (not tuned per method)
PRETRAIN_WEIGHT_DECAY = 0.01


@dataclass(frozen=True)
class Settings:
    """The transfer task's sizes: pretraining steps on the source task, fine-tuning steps on the downstream task,
    batch size, evaluation interval (steps) and the seed of the splits, initialisation and batch order."""

    pretrain_steps: int
    steps: int
    batch_size: int = 64
    eval_every: int = 10
    seed: int = 0


def small_cnn(n_classes: int = 5, width: int = 16) -> nn.Sequential:
    """A three-conv classifier for 8×8 images: conv1 (1→w), conv2 (w→2w), conv3 (2w→2w, after a 2×2 pool), head."""
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(1, width, 3, padding=1), act1=nn.ReLU(),
        conv2=nn.Conv2d(width, 2 * width, 3, padding=1), act2=nn.ReLU(), pool=nn.MaxPool2d(2),
        conv3=nn.Conv2d(2 * width, 2 * width, 3, padding=1), act3=nn.ReLU(),
        gap=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), head=nn.Linear(2 * width, n_classes),
    ))


def pretrain(s: Settings, width: int = 16) -> tuple[nn.Module, float]:
    """``small_cnn`` trained on digits 0–4 with ``reproduce.pretrained.train_digit_model`` (AdamW, one-cycle to ``LR``,
    ±1-pixel shifts) on 70 % of each class. Returns (model in eval mode, test accuracy on the rest)."""
    images, labels = digits(SOURCE_CLASSES)
    train, test = stratified_split(labels, TEST_FRACTION, s.seed)
    torch.manual_seed(s.seed)
    model = small_cnn(len(SOURCE_CLASSES), width)
    train_digit_model(model, images, labels, train, s.pretrain_steps, s.batch_size, LR, PRETRAIN_WEIGHT_DECAY, s.seed)
    with torch.no_grad():
        return model, accuracy(model(images[test]), labels[test])


def transfer_task(pretrained: nn.Module, s: Settings) -> Task:
    """The downstream task for ``run_methods``: digits 5–9 as labels 0–4, 70 % of each class to train, the rest to
    test; every method starts from a copy of ``pretrained`` (its head included) and trains the head."""
    images, labels = digits(TARGET_CLASSES)
    train, test = stratified_split(labels, TEST_FRACTION, s.seed)
    y = labels - TARGET_CLASSES[0]
    return classification_task(pretrained, lambda m, x: m(x), images[train], y[train], images[test], y[test], "head",
                               s, torch.device("cpu"))


def transfer_methods(lora_rank: int, tensor_core_ranks: int | tuple[int, ...]) -> list[Method]:
    """The four rows compared downstream, the head trainable in each: the head alone, full fine-tuning, PEFT LoRA
    (rank ``lora_rank``, alpha 2·rank) and boftlab's tensor core on the three convs. Every method fine-tunes at
    ``LR``, the learning rate that pretrained the network: one fixed choice, not tuned on this task's test set."""
    return [
        Method("head only", "head", lr=LR),
        Method("full fine-tuning", "full", lr=LR),
        Method(f"LoRA r={lora_rank} (PEFT)", "lora", {"r": lora_rank, "lora_alpha": 2 * lora_rank}, CONVS, LR),
        Method(f"tensor core ranks={tensor_core_ranks}", "tensor_core", {"ranks": tensor_core_ranks}, CONVS, LR),
    ]
