"""One training loop for every method of every domain.

``run_method`` adapts a fresh copy of a task's pretrained model with a method (``methods.prepare``), trains it with
the same loop (AdamW, warm-up then cosine decay, fixed seed and data order, the task's autocast) and records what the
run measured: trainable parameters, the validation metric along the way and the test metric at the end, milliseconds
per optimizer step and peak memory. Nothing is filled in by hand.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from ..bench import LiveTensorBytes
from .memory import enable_gradient_checkpointing, memory_gate, release_memory, resident_bytes
from .methods import Method, MethodUnavailable, count_parameters, prepare
from .task import Run, Task


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype for training on ``device``: bf16 on a GPU that computes in it natively (compute capability
    ≥ 8.0: A100, L4, H100 — ``torch.cuda.is_bf16_supported(including_emulation=False)``), fp16 with loss scaling on
    older ones (a free Colab T4 is sm_75), None (fp32) on a CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16


def fitting(s: Any, device: torch.device) -> dict[str, Any]:
    """The ``Task`` fields a domain's settings ``s`` ask for: autocast in ``autocast_dtype(device)`` if
    ``s.mixed_precision``, gradient checkpointing if ``s.gradient_checkpointing``."""
    return {"precision": autocast_dtype(device) if s.mixed_precision else None,
            "gradient_checkpointing": s.gradient_checkpointing}


class Diverged(RuntimeError):
    """Training left NaN or inf in trainable parameters: every later metric would be the metric of a broken model
    (argmax of NaN logits is class 0; a NaN image becomes a black one that CLIP still scores), so the run stops and
    its row says so."""


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``steps``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_method(task: Task, method: Method, progress: bool = True, test: bool = False,
               keep_trained: bool = False) -> Run:
    """Adapt a fresh copy of ``task.base`` with ``method``, train it, and measure; with ``test``, evaluate
    ``task.test`` on the trained model (once, at the end); with ``keep_trained``, keep CPU copies of the trained
    parameters in ``run.trained``, so ``evaluate_kept`` can test this run later (after a learning rate is chosen).

    A method that cannot run is a row, not an error: a family that cannot be imported, a model that the memory
    estimate says does not fit (``memory_gate``), an out-of-memory error while training (the row says at which
    point, with the setting) and a run that left NaN/inf in its trainable parameters (``Diverged``, found at the next
    evaluation, whose metric would be a broken model's) give a skipped ``Run`` with the reason. The method's model
    and optimizer are freed before this returns, so the next method has the accelerator to itself."""
    run = Run(method)
    torch.manual_seed(task.seed)  # same adapter initialisation stream and data order for every method
    try:
        model = adapted_copy(task, method)
    except MethodUnavailable as err:
        run.skipped = f"skipped: {err}"
        return run
    run.trainable, run.method_params = count_parameters(model, task.trainable)
    run.skipped = memory_gate(task, model)
    if run.skipped is None:
        try:
            train(task, model, run, progress)
            if keep_trained:  # tested (and ``task.after`` run) later, by ``evaluate_kept``
                run.trained = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
            else:
                finish(task, model, run, test)
        except Diverged as err:
            run.skipped = str(err)
        except torch.cuda.OutOfMemoryError as err:  # = torch.OutOfMemoryError
            reason = str(err).split("\n")[0]
            run.skipped = (f"out of memory after {len(run.steps)} of {task.steps} steps "
                           f"({task.describe_setting()}): {reason}")
    del model
    release_memory(task.device)
    return run


def adapted_copy(task: Task, method: Method) -> nn.Module:
    """A fresh copy of ``task.base`` with ``method`` on it (``prepare``), on the CPU; MethodUnavailable if it cannot
    be applied here."""
    base = copy.deepcopy(task.base)
    if task.gradient_checkpointing:
        enable_gradient_checkpointing(base)
    return prepare(base, method, task.trainable)


def finish(task: Task, model: nn.Module, run: Run, test: bool) -> None:
    """On the trained ``model`` (eval mode, no gradients, the task's autocast): with ``test``, ``run.test`` =
    ``task.test(model)``; then ``task.after``, if any."""
    if test and task.test is None:
        raise ValueError("this task has no test split (Task.test is None): its curves' metric is all it measures; "
                         "build it with a validation split (e.g. classification_task(..., validation=...))")
    model.to(task.device).eval()
    with torch.no_grad(), torch.autocast(task.device.type, dtype=task.precision, enabled=task.precision is not None):
        if test:
            run.test = float(task.test(model))
        if task.after is not None:
            task.after(model, run)


def evaluate_kept(task: Task, run: Run) -> None:
    """Test a run made with ``keep_trained``: rebuild its method on a fresh copy of ``task.base``, load the trained
    parameters into it and set ``run.test`` (``finish``); then drop the kept copies."""
    if run.trained is None:
        raise ValueError(f"{run.method.name}: this run kept no trained parameters; run it with keep_trained=True")
    model = adapted_copy(task, run.method)
    params = dict(model.named_parameters())
    if set(run.trained) != {n for n, p in params.items() if p.requires_grad}:
        raise ValueError(f"{run.method.name}: the rebuilt model trains other parameters than the run did")
    with torch.no_grad():
        for name, value in run.trained.items():
            params[name].copy_(value)
    finish(task, model, run, test=True)
    run.trained = None
    del model
    release_memory(task.device)


def train(task: Task, model: nn.Module, run: Run, progress: bool) -> None:
    """Move ``model`` to ``task.device``, train its trainable parameters with AdamW (warm-up + cosine, under
    ``task.precision`` autocast, with loss scaling for fp16) and record into ``run`` what ``Run`` holds."""
    from tqdm.auto import tqdm

    model.to(task.device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=run.method.lr, weight_decay=0.0)
    warmup = max(1, task.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, task.steps, warmup))
    # fp16 needs loss scaling (its range is narrow); bf16 and fp32 do not
    scaler = torch.amp.GradScaler(task.device.type) if task.precision == torch.float16 else None

    def autocast():
        return torch.autocast(task.device.type, dtype=task.precision, enabled=task.precision is not None)

    def evaluate(step: int) -> None:
        broken = [name for name, p in model.named_parameters() if p.requires_grad and not p.isfinite().all()]
        if broken:
            raise Diverged(f"diverged after {step} of {task.steps} steps: {len(broken)} trainable tensors hold NaN or "
                           f"inf (e.g. {broken[0]}); lower the learning rate (lr={run.method.lr:g})")
        model.eval()
        with torch.no_grad(), autocast():
            run.evals.append(float(task.evaluate(model)))
        run.eval_steps.append(step)
        model.train()

    evaluate(0)
    if task.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(task.device)
    times = []
    measured_step = min(1, task.steps - 1)  # the second step: AdamW's states exist, as in every later step
    bar = tqdm(range(task.steps), desc=run.method.name, disable=not progress, leave=False)
    for step in bar:
        _synchronize(task.device)
        tracker = LiveTensorBytes() if step == measured_step and task.device.type == "cpu" else nullcontext()
        if step == measured_step and task.device.type == "cpu":
            resident = resident_bytes(model, optimizer)
        start = time.perf_counter()
        with tracker, autocast():
            loss = task.loss(model, step)
            optimizer.zero_grad(set_to_none=True)
            if scaler is None:
                loss.backward()
                optimizer.step()
                schedule.step()
            else:
                scale = scaler.get_scale()
                scaler.scale(loss).backward()
                scaler.step(optimizer)  # skipped, and the scale lowered, if the gradients overflowed
                scaler.update()
                if scaler.get_scale() >= scale:  # the schedule counts the optimizer steps taken
                    schedule.step()
        if isinstance(tracker, LiveTensorBytes):
            run.peak_mib = (resident + tracker.peak) / 2**20
        _synchronize(task.device)
        times.append((time.perf_counter() - start) * 1e3)
        run.steps.append(step + 1)
        run.losses.append(loss.item())
        if (step + 1) % task.eval_every == 0 or step + 1 == task.steps:
            evaluate(step + 1)
            bar.set_postfix(metric=f"{run.evals[-1]:.3g}")
    if task.device.type == "cuda":
        run.peak_mib = torch.cuda.max_memory_allocated(task.device) / 2**20
    run.ms_per_step = statistics.median(times[min(5, len(times) - 1):])  # skip the first (allocation) steps


def run_methods(task: Task, methods: list[Method], progress: bool = True) -> list[Run]:
    """``run_method`` for each method, in order, one model on the accelerator at a time (tested at the end where the
    task has a test split); a method that cannot run or runs out of memory is reported (printed, and a row of the
    table), not raised."""
    runs = []
    for method in methods:
        run = run_method(task, method, progress, test=task.test is not None)
        if run.skipped and progress:
            print(f"{method.name}: {run.skipped}")
        runs.append(run)
    return runs
