"""What a domain hands the runner and what it hands back: a ``Task`` (the pretrained model, the training loss, the
validation and test metrics, how a step fits the accelerator) and a ``Run`` (what one method's run measured);
``classification_task`` builds the Task of an image classifier."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .data import batch_indices
from .methods import Method


@dataclass
class Run:
    """What one method's run measured."""

    method: Method
    trainable: int = 0  # parameters the optimizer updates (method + kept-trainable modules)
    method_params: int = 0  # of which belong to the method (adapters, or the whole body for full fine-tuning)
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # training loss at every step
    eval_steps: list[int] = field(default_factory=list)
    evals: list[float] = field(default_factory=list)  # task.evaluate (validation) at eval_steps (the first at 0)
    test: float | None = None  # task.test on the trained model, once, at the end (None: not asked for, or no test)
    ms_per_step: float | None = None  # median wall time of one optimizer step
    peak_mib: float | None = None  # peak memory of a training step (MEMORY_METHOD[device type])
    trained: dict[str, torch.Tensor] | None = None  # CPU copies of the trained parameters (``keep_trained``)
    skipped: str | None = None  # why the method did not run or finish: "skipped: …" or "out of memory after …"
    extra: dict[str, Any] = field(default_factory=dict)  # domain-specific artefacts (e.g. sample grids)

    @property
    def before(self) -> float | None:
        return self.evals[0] if self.evals else None

    @property
    def final(self) -> float | None:
        return self.evals[-1] if self.evals else None


@dataclass
class Task:
    """A domain's experiment, as the runner needs it.

    base: the pretrained model (copied for every method; keep it off the accelerator, so that one model is there at a
    time); trainable: modules trained by every method (a new head); loss(model, step) -> scalar training loss of that
    step's batch (same batches for every method); evaluate(model) -> the metric the curves show and learning rates
    are chosen by (a validation split drawn from the training data); test(model) -> the held-out test metric,
    computed once per chosen setting at the end (None: the task has no test split); after(model, run): optional
    hook run once on the final trained model, after its test where it is tested (e.g. on the samples it scored).

    Fitting a GPU: precision: the autocast dtype of every forward pass (``autocast_dtype``; None: fp32);
    gradient_checkpointing: recompute activations in the backward pass (``enable_gradient_checkpointing``);
    activation_bytes: an estimate of one training step's activations, for the memory gate (``training_bytes``);
    setting: what one step processes ("batch 8 × 256 tokens"), for the messages of a skipped method.
    """

    base: nn.Module
    trainable: list[str]
    loss: Callable[[nn.Module, int], torch.Tensor]
    evaluate: Callable[[nn.Module], float]
    steps: int
    eval_every: int
    device: torch.device
    seed: int = 0
    after: Callable[[nn.Module, Run], None] | None = None
    test: Callable[[nn.Module], float] | None = None
    precision: torch.dtype | None = None
    gradient_checkpointing: bool = False
    activation_bytes: int = 0
    setting: str = ""

    def describe_setting(self) -> str:
        """What a training step processes, and how: "batch 8 × 256 tokens, float16 autocast, gradient checkpointing"."""
        precision = f"{str(self.precision).removeprefix('torch.')} autocast" if self.precision else "fp32"
        parts = [self.setting, precision, "gradient checkpointing" if self.gradient_checkpointing else ""]
        return ", ".join(part for part in parts if part)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows of ``logits`` (N, classes) whose arg-max is ``labels`` (N,)."""
    return (logits.argmax(-1) == labels).float().mean().item()


def classification_task(model, forward, train_x, train_y, test_x, test_y, head, s: Any, device: torch.device,
                        validation: tuple[torch.Tensor, torch.Tensor] | None = None, **options: Any) -> Task:
    """Cross-entropy on seeded batches of (train_x, train_y). With ``validation`` = (val_x, val_y): the curves'
    metric is accuracy on it and the test metric accuracy on (test_x, test_y); without, the curves show accuracy on
    (test_x, test_y) and the task has no separate test. ``forward(model, images) -> logits`` hides the model
    family's calling convention; ``head`` is the module every method trains; ``s`` holds steps, batch_size,
    eval_every and seed (a domain's settings); ``options``: the other ``Task`` fields (precision, setting, …)."""

    def loss(m: nn.Module, step: int) -> torch.Tensor:
        idx = batch_indices(len(train_x), s.batch_size, step, s.seed)
        return torch.nn.functional.cross_entropy(forward(m, train_x[idx].to(device)), train_y[idx].to(device))

    def accuracy_on(x: torch.Tensor, y: torch.Tensor) -> Callable[[nn.Module], float]:
        return lambda m: accuracy(torch.cat([forward(m, part.to(device)).cpu() for part in x.split(256)]), y)

    if validation is None:
        return Task(model, [head], loss, accuracy_on(test_x, test_y), s.steps, s.eval_every, device, s.seed,
                    **options)
    return Task(model, [head], loss, accuracy_on(*validation), s.steps, s.eval_every, device, s.seed,
                test=accuracy_on(test_x, test_y), **options)
