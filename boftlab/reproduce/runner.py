"""What the three reproduction domains share: the methods, one training loop, the table and the figures.

A domain (``vit``, ``llm``, ``diffusion``) supplies a pretrained model, a loss on a training batch and a held-out
metric. This module adapts a fresh copy of the model with each method, trains it with the same loop (AdamW, warm-up
then cosine decay, fixed seed and data order), and records what the run measured: trainable parameters, the metric
before and after, milliseconds per optimizer step and peak accelerator memory. Nothing is filled in by hand.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import math
import statistics
import tempfile
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..base_layers import keep_unpacked, kind
from ..bench import MEMORY_METHOD, LiveTensorBytes
from ..contract import FAMILIES

#: the references a method can name besides boftlab's families (``contract.FAMILIES``)
REFERENCES = ("head", "full", "lora")


def method_families() -> tuple[str, ...]:
    """What ``Method.family`` can be: the references, then every boftlab family."""
    return (*REFERENCES, *FAMILIES)


@dataclass(frozen=True)
class Method:
    """One row of a results table.

    family: "head" (only the modules kept trainable), "full" (every parameter), "lora" (PEFT ``LoraConfig``) or a
    boftlab family (``contract.FAMILIES``); options: that config's keyword arguments; targets: the layers it adapts
    (a regex that ``fullmatch``-es module names, or a list of names / suffixes / module types); lr: AdamW's peak
    learning rate.
    """

    name: str
    family: str
    options: dict[str, Any] = field(default_factory=dict)
    targets: Any = None
    lr: float = 1e-3

    def __post_init__(self) -> None:
        if self.family not in method_families():
            raise ValueError(
                f"Method {self.name!r}: unknown family {self.family!r}; valid families: {method_families()}"
            )
        if self.family not in ("head", "full") and self.targets is None:
            raise ValueError(f"Method {self.name!r}: family {self.family!r} needs targets (the layers to adapt)")


def adapter_methods(targets: Any, lr: float, lora_rank: int, oft_block_size: int, flora_ranks: int,
                    lora_alpha: int | None = None, orthogonal_lr: float | None = None,
                    flora_targets: Any = None, flora_name: str = "FLoRA (tensor core)") -> list[Method]:
    """The seven adapter rows every domain compares, on the same ``targets``: PEFT LoRA (rank ``lora_rank``, alpha
    ``lora_alpha`` or 2·rank), OFT (``oft_block_size``), BOFT b=8 m=2 and b=4 m=4, SURM circulant and Kronecker
    (LoRA-style), FLoRA (``flora_ranks`` per mode; ``flora_targets`` if it adapts more layers). ``lr`` is AdamW's
    peak learning rate, ``orthogonal_lr`` OFT's and BOFT's where it differs."""
    rotation_lr = lr if orthogonal_lr is None else orthogonal_lr
    alpha = 2 * lora_rank if lora_alpha is None else lora_alpha
    return [
        Method(f"LoRA r={lora_rank} (PEFT)", "lora", {"r": lora_rank, "lora_alpha": alpha}, targets, lr),
        Method(f"OFT b={oft_block_size}", "oft", {"block_size": oft_block_size}, targets, rotation_lr),
        Method("BOFT b=8 m=2", "boft", {"block_size": 8, "n_factors": 2}, targets, rotation_lr),
        Method("BOFT b=4 m=4", "boft", {"block_size": 4, "n_factors": 4}, targets, rotation_lr),
        Method("SURM circulant", "surm", {"structure": "circulant", "mode": "lora"}, targets, lr),
        Method("SURM Kronecker", "surm", {"structure": "kronecker", "mode": "lora"}, targets, lr),
        Method(flora_name, "tensor_core", {"ranks": flora_ranks}, flora_targets or targets, lr),
    ]


class MethodUnavailable(RuntimeError):
    """A method this run cannot apply — it needs a package this installation lacks (PEFT, for LoRA), or it would train
    weights the model stores quantized (full fine-tuning of a 4-bit model); the run lists it as skipped."""


class Diverged(RuntimeError):
    """Training left NaN or inf in trainable parameters: every later metric would be the metric of a broken model
    (argmax of NaN logits is class 0; a NaN image becomes a black one that CLIP still scores), so the run stops and
    its row says so."""


def prepare(model: nn.Module, method: Method, trainable: list[str]) -> nn.Module:
    """Put ``method`` on ``model`` (in place, or PEFT's wrapper around it); only the method's parameters and the
    ``trainable`` modules (e.g. a new head) require gradients afterwards."""
    if method.family == "full" and quantized_layers(model):
        raise MethodUnavailable(
            f"full fine-tuning trains every weight, and {len(quantized_layers(model))} layers of this model store "
            "theirs quantized (bitsandbytes), which no optimizer can update; load the model in 16 bits to train it "
            "fully")
    keep_unpacked(model)  # every method: a 4-bit layer repacked at an evaluation would drop its input gradient
    if method.family in ("head", "full"):
        for name, p in model.named_parameters():
            p.requires_grad_(method.family == "full" or any(_in_module(name, t) for t in trainable))
        return model
    if method.family == "lora":
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as err:
            raise MethodUnavailable(f"PEFT is not importable here ({err}); pip install peft") from err

        config = LoraConfig(target_modules=method.targets, modules_to_save=list(trainable) or None, **method.options)
        with warnings.catch_warnings():  # PEFT reads an attribute transformers ≥ 5.24 deprecates: not ours to fix
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
            return get_peft_model(model, config)
    from ..model import adapt

    return adapt(model, FAMILIES[method.family](**method.options), targets=method.targets, trainable=trainable)


def quantized_layers(model: nn.Module) -> list[str]:
    """Names of ``model``'s bitsandbytes quantized linear layers (Linear4bit / Linear8bitLt)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and kind(m) == "quantized"]


def _in_module(param_name: str, module_name: str) -> bool:
    return param_name.startswith(module_name + ".") or f".{module_name}." in f".{param_name}"


def count_parameters(model: nn.Module, trainable: list[str]) -> tuple[int, int]:
    """(trainable parameters, of which outside the ``trainable`` modules — i.e. the method's own)."""
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    kept = sum(
        p.numel()
        for name, p in model.named_parameters()
        if p.requires_grad and any(_in_module(name, t) for t in trainable)
    )
    return total, total - kept


# --- the ci profile's pretrained models -------------------------------------------------------------------------------
#: the ci profile's pretrained models, one directory each: package data (``boftlab/pretrained/<name>/``), so a pip
#: install and a checkout read the same files; ``data/scripts/`` in the repository makes them
PRETRAINED_DIR = Path(__file__).resolve().parents[1] / "pretrained"


def pretrained_dir(name: str) -> Path:
    """``boftlab/pretrained/<name>``: a pretrained model the ci profile starts from (not a resumable training state)."""
    path = PRETRAINED_DIR / name
    if not (path / "model.safetensors").is_file():
        shipped = sorted(p.parent.name for p in PRETRAINED_DIR.glob("*/model.safetensors"))
        raise FileNotFoundError(
            f"no pretrained model {name!r} at {path}; this installation ships {shipped or 'none'}. The ci profile's "
            "models are package data of boftlab (a pip install and a checkout both have them); the repository's "
            "data/scripts/ has the scripts that make them"
        )
    return path


def save_pretrained(name: str, state: dict[str, torch.Tensor], config: dict[str, Any], dtype=torch.float32) -> Path:
    """Write a pretrained model to ``boftlab/pretrained/<name>/model.safetensors`` (tensors cast to ``dtype``) and
    ``config.json`` (``data/scripts/`` make the ci profile's)."""
    import json

    from safetensors.torch import save_file

    path = PRETRAINED_DIR / name
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to(dtype).contiguous() for k, v in state.items()}, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path


def load_pretrained(name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict in float32, config) of a pretrained model written by ``save_pretrained``."""
    import json

    from safetensors.torch import load_file

    path = pretrained_dir(name)
    state = {k: v.float() for k, v in load_file(path / "model.safetensors").items()}
    return state, json.loads((path / "config.json").read_text())


def digits(classes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8×8 handwritten digits of ``classes``: images (N, 1, 8, 8) in [0, 1], labels (N,)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    keep = torch.isin(torch.as_tensor(data.target), torch.tensor(classes))
    images = torch.as_tensor(data.images, dtype=torch.float32)[keep] / 16.0
    return images[:, None], torch.as_tensor(data.target)[keep]


def stratified_split(labels: torch.Tensor, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, test indices), each class split in the same proportion with a seeded permutation."""
    gen = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in labels.unique():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_test = round(len(idx) * test_fraction)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Indices of ``step``'s batch: epochs of seeded random permutations of range(n), so every method sees the
    same batches in the same order."""
    per_epoch = max(1, n // batch_size)
    epoch, i = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return order[i * batch_size:(i + 1) * batch_size]


def shift_pixels(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random translation by up to one pixel in each direction (zero padding): (N, 1, 8, 8) -> same."""
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1))
    dy, dx = torch.randint(0, 3, (2,), generator=gen).tolist()
    return padded[..., dy:dy + 8, dx:dx + 8]


def train_digit_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor, train: torch.Tensor, steps: int,
                      batch_size: int, lr: float, weight_decay: float, seed: int) -> None:
    """The loop that made the ci profile's digit checkpoints (``data/scripts/pretrain_vit.py``,
    ``train_digit_classifier.py``): AdamW with a one-cycle schedule, cross-entropy on seeded batches of
    ``x[train]`` shifted by up to one pixel. Trains ``model`` in place and leaves it in eval mode."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = train[batch_indices(len(train), batch_size, step, seed)]
        loss = torch.nn.functional.cross_entropy(model(shift_pixels(x[idx], gen)), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 250 == 0:
            print(f"step {step}: loss {loss.item():.4f}", flush=True)
    model.eval()


# --- training ---------------------------------------------------------------------------------------------------------
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


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``steps``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- fitting one accelerator ------------------------------------------------------------------------------------------
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


def transformer_activation_bytes(batch: int, tokens: int, hidden: int, layers: int, mlp: int, heads: int,
                                 vocab: int = 0, checkpointed: bool = True) -> int:
    """A rough estimate of a transformer's activation memory in one training step under fp16/bf16 autocast, for the
    memory gate. Per token, a block keeps ≈ (16·hidden + 6·mlp)·2 bytes (autocast copies, attention and MLP
    intermediates) and 4·heads·tokens bytes of attention weights; with gradient checkpointing only each block's
    fp32 input stays (4·hidden bytes) and one block is recomputed at a time. ``vocab`` adds the logits: fp16, their
    fp32 copy, the log-softmax and its gradient, 14 bytes each. An estimate: an out-of-memory error is still caught."""
    block = (16 * hidden + 6 * mlp) * 2 + 4 * heads * tokens
    kept = 4 * hidden * layers + block if checkpointed else block * layers
    return batch * tokens * (kept + 14 * vocab)


def hide_weight_loading_bars() -> None:
    """Hide transformers' "Loading weights" bars (one per model built) and keep huggingface_hub's download bars,
    which tell a first run how long it waits. For the colab tasks, which load models from the hub."""
    import huggingface_hub
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # this also hides the hub's bars ...
    huggingface_hub.utils.enable_progress_bars()  # ... so they come back


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute activations in the backward pass instead of storing them, through the model's own switch:
    transformers (``activation_checkpointing_enable``, before transformers 5.24 ``gradient_checkpointing_enable``;
    non-reentrant, so a frozen base passes gradients to adapters), diffusers (``enable_gradient_checkpointing``) or
    timm (``set_grad_checkpointing``). Any other model raises: a switch that silently did nothing would leave the
    memory estimate wrong."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(model, "enable_gradient_checkpointing"):
        model.enable_gradient_checkpointing()
    elif hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(True)
    else:
        raise ValueError(
            f"a {type(model).__name__} has no gradient-checkpointing switch (transformers' "
            "gradient_checkpointing_enable, diffusers' enable_gradient_checkpointing, timm's set_grad_checkpointing); "
            "run it with gradient_checkpointing=False"
        )


def training_bytes(model: nn.Module, activation_bytes: int = 0) -> int:
    """Estimated accelerator memory to train ``model`` with AdamW: every parameter's weights, plus a gradient and
    AdamW's two moments for each trainable one (all in the parameter's dtype), plus ``activation_bytes``.
    O(number of parameter tensors)."""
    return activation_bytes + sum(p.numel() * p.element_size() * (4 if p.requires_grad else 1)
                                  for p in model.parameters())


def free_memory(device: torch.device) -> int | None:
    """Bytes free on ``device`` for the next model (``torch.cuda.mem_get_info``, after emptying the cache); None on a
    CPU, where no memory gate applies."""
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info(device)[0]


def memory_gate(task: Task, model: nn.Module) -> str | None:
    """Why ``model`` cannot train on ``task.device`` by the estimate ``training_bytes`` (a skipped row's text), or None
    if it fits — or if the device reports no free memory (a CPU)."""
    free = free_memory(task.device)
    # what is already on the GPU (a 4-bit model is quantized there as it loads) is not needed a second time
    resident = sum(p.numel() * p.element_size() for p in model.parameters() if p.is_cuda)
    need = training_bytes(model, task.activation_bytes) - resident
    if free is None or need <= free:
        return None
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return (f"skipped: needs ≈ {need / 2**30:.1f} GiB (weights; gradients and AdamW states of {trainable:,} "
            f"trainable parameters; ≈ {task.activation_bytes / 2**30:.1f} GiB activations for "
            f"{task.describe_setting()}), {free / 2**30:.1f} GiB free on {task.device}")


def release_memory(device: torch.device) -> None:
    """Collect what the last method left (its model, optimizer states and, after an error, the frames that held
    its activations) and hand the cached blocks back, so the next method starts from an empty accelerator."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- running the methods ----------------------------------------------------------------------------------------------
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


def resident_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes a training step starts with on the CPU: the model's parameters and buffers and the optimizer's states
    (a step's own tensors — activations, gradients, temporaries — are ``LiveTensorBytes``')."""
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


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


# --- reporting --------------------------------------------------------------------------------------------------------
def results_table(runs: list[Run], metric: str) -> str:
    """Markdown table: method, trainable parameters, the metric before → after, ms per step, peak memory."""
    from boftlab.bench import markdown_table

    header = ["method", "trainable params", "of which method", f"{metric} before", f"{metric} after",
              "ms / step", "peak memory (MiB)"]
    rows = []
    for r in runs:
        if r.skipped:
            rows.append([r.method.name, r.skipped, None, None, None, None, None])
            continue
        rows.append([r.method.name, f"{r.trainable:,}", f"{r.method_params:,}", r.before, r.final,
                     r.ms_per_step, r.peak_mib])
    return markdown_table(header, rows)


def ranking(runs: list[Run], metric: str, higher_is_better: bool = True) -> str:
    """One markdown sentence: the methods that ran, ordered by their final metric (best first), with the values."""
    done = sorted((r for r in runs if not r.skipped), key=lambda r: r.final, reverse=higher_is_better)
    if not done:
        return "No method ran."
    order = "; ".join(f"{r.method.name} {r.final:.3g}" for r in done)
    skipped = [r.method.name for r in runs if r.skipped]
    note = f" Skipped: {', '.join(skipped)}." if skipped else ""
    better = "higher" if higher_is_better else "lower"
    return f"Final {metric} ({better} is better), best first: {order}.{note}"


def plot_curves(runs: list[Run], metric: str, title: str, smooth: int = 10):
    """Figure with two panels: training loss (running mean over ``smooth`` steps) and the held-out metric.

    A ``matplotlib.figure.Figure``, not a pyplot figure: nothing is left open, and a notebook shows it where it
    displays it (``display(fig)``, or the cell's last expression) — once."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.6))
    ax_loss, ax_metric = fig.subplots(1, 2)
    for r in runs:
        if r.skipped:
            continue
        losses = torch.tensor(r.losses)
        kernel = min(smooth, len(losses))
        smoothed = torch.nn.functional.avg_pool1d(losses[None, None], kernel, 1).flatten() if kernel else losses
        ax_loss.plot(r.steps[kernel - 1:], smoothed.tolist(), label=r.method.name, lw=1.2)
        ax_metric.plot(r.eval_steps, r.evals, marker=".", label=r.method.name, lw=1.2)
    ax_loss.set(xlabel="step", ylabel=f"training loss (mean of {smooth} steps)", title=f"{title}: training loss")
    ax_metric.set(xlabel="step", ylabel=metric, title=f"{title}: {metric}")
    ax_loss.set_yscale("log")
    ax_metric.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


@dataclass
class Report:
    """One domain's section of results.md: prose, the table, and figures (file stem -> matplotlib Figure)."""

    domain: str
    title: str
    description: str
    runs: list[Run]
    metric: str
    higher_is_better: bool = True
    figures: dict[str, Any] = field(default_factory=dict)

    def table_markdown(self) -> str:
        """The results table, the ranking sentence and (on CPU) the note on peak memory."""
        lines = [results_table(self.runs, self.metric), "", ranking(self.runs, self.metric, self.higher_is_better)]
        if all(r.peak_mib is None for r in self.runs if not r.skipped):
            lines += ["", "Peak memory is measured with `torch.cuda.max_memory_allocated`; this run was on CPU, "
                      "where it is not measured (–)."]
        return "\n".join(lines) + "\n"

    def markdown(self, figure_dir: str = ".") -> str:
        """This domain's section of results.md: title, description, table, ranking and links to the figures."""
        lines = [f"## {self.title}", "", self.description, "", self.table_markdown()]
        lines += [f"![{stem}]({figure_dir}/{stem}.png)" for stem in self.figures]
        return "\n".join(lines) + "\n"


def check_output_dir(out: Path) -> None:
    """ValueError unless ``write_results`` can write into ``out``: an existing directory, or a new one whose nearest
    existing ancestor is a directory this process can write in (tried by creating and deleting a temporary file
    there), and ``out/results.md`` not a directory. Changes nothing on disk; called before any training, so a bad
    ``--out`` costs seconds, not a run."""
    if out.exists() and not out.is_dir():
        raise ValueError(
            f"--out {str(out)!r} is an existing file; the results are a directory (results.md and the PNG figures). "
            "Give a new or existing directory, e.g. --out out/ci"
        )
    if (out / "results.md").is_dir():
        raise ValueError(f"{str(out / 'results.md')!r} is a directory, so results.md cannot be written there; "
                         "remove it or give another --out")
    existing = out
    while not existing.exists():  # the directory that creating ``out`` would write into
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"--out {str(out)!r} cannot be created: {str(existing)!r} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise ValueError(
            f"--out {str(out)!r} is not writable: creating a file in {str(existing)!r} fails ({err.strerror}). "
            "Give a directory you can write to"
        ) from err


# --- seeds ------------------------------------------------------------------------------------------------------------
def seed_table(runs_by_seed: dict[int, list[Run]], metric: str, higher_is_better: bool = True) -> str:
    """Markdown table of each method's final metric on every seed and its mean ± standard deviation (n − 1), best
    mean first, then one sentence naming the neighbours in that order whose means differ by less than the larger of
    their two standard deviations — rankings the seeds cannot tell apart. ``runs_by_seed``: seed -> the runs of the
    same methods in the same order (``run_methods``)."""
    from boftlab.bench import markdown_table

    seeds = sorted(runs_by_seed)
    if len(seeds) < 2:
        raise ValueError(f"a spread needs at least two seeds, got {seeds}")
    names = [r.method.name for r in runs_by_seed[seeds[0]]]
    if any([r.method.name for r in runs_by_seed[s]] != names for s in seeds):
        raise ValueError(f"every seed must run the same methods in the same order; seed {seeds[0]} ran {names}")
    rows = []
    for i, name in enumerate(names):
        runs = [runs_by_seed[s][i] for s in seeds]
        if any(r.skipped for r in runs):
            rows.append((name, None, None, [r.final for r in runs], runs[0].method_params))
            continue
        finals = [r.final for r in runs]
        std = statistics.stdev(finals) if len(finals) > 1 else 0.0
        rows.append((name, statistics.fmean(finals), std, finals, runs[0].method_params))
    done = sorted((r for r in rows if r[1] is not None), key=lambda r: r[1], reverse=higher_is_better)
    header = ["method", "params of the method", *(f"seed {s}" for s in seeds), f"{metric}: mean ± std"]
    table = [[name, f"{params:,}", *finals, f"{mean:.3g} ± {std:.2g}"] for name, mean, std, finals, params in done]
    table += [[name, f"{params:,}", *finals, "skipped"] for name, mean, _, finals, params in rows if mean is None]
    ties = [f"{a[0]} / {b[0]}" for a, b in zip(done, done[1:]) if abs(a[1] - b[1]) < max(a[2], b[2])]
    note = (f"Within one standard deviation of the next in this order (not separated by {len(seeds)} seeds): "
            f"{'; '.join(ties)}." if ties else f"Every neighbour in this order is separated by more than one standard "
            f"deviation over {len(seeds)} seeds.")
    return markdown_table(header, table) + "\n\n" + note + "\n"


# --- the protocol: learning rates chosen on validation, seeds, paired intervals, claims -------------------------------
#: every method's learning-rate grid: its declared rate (``Method.lr``) times these; the same rule for every method
LR_FACTORS = (1 / 3, 1.0, 3.0)
#: while the best rate is at an edge of the grid, one more ×3 step beyond that edge, at most this many times
LR_EXTENSIONS = 1


@dataclass(frozen=True)
class Protocol:
    """How a domain's methods are compared.

    name: "full" or "reduced"; seeds: the seeds every method runs (a seed fixes the data split, the
    initialisation and the batch order, so runs of different methods on one seed are paired); the learning rate is
    chosen on the first seed's validation metric (at the last step), then the other seeds run at that rate.
    lr_factors / lr_extensions: the grid rule (``LR_FACTORS``, ``LR_EXTENSIONS``); lrs: method name -> a fixed rate
    (a one-point grid, read from committed results: the reduced protocol).
    """

    name: str
    seeds: tuple[int, ...]
    lr_factors: tuple[float, ...] = LR_FACTORS
    lr_extensions: int = LR_EXTENSIONS
    lrs: dict[str, float] | None = None

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ValueError(f"Protocol {self.name!r}: seeds={self.seeds}; give at least one seed, e.g. (0, 1, 2)")
        if self.lrs is None and len(self.lr_factors) < 3:
            raise ValueError(f"Protocol {self.name!r}: lr_factors={self.lr_factors}; a grid needs ≥ 3 rates, e.g. "
                             f"{LR_FACTORS}")

    def describe(self) -> str:
        """One sentence: seeds and the learning-rate rule."""
        seeds = ", ".join(map(str, self.seeds))
        if self.lrs is not None:
            return (f"{self.name} protocol: seed(s) {seeds}; each method at the learning rate the committed "
                    "full-protocol results chose for it (no grid search here)")
        factors = ", ".join(f"{f:.3g}" for f in self.lr_factors)
        extension = (f"while the best is at an edge, one more ×3 step beyond it, at most {self.lr_extensions} times; "
                     if self.lr_extensions else "")
        return (f"{self.name} protocol: each method's learning rate chosen from its declared rate × ({factors}) by the "
                f"validation metric at the last step on seed {self.seeds[0]} ({extension}a choice at the edge of "
                f"the rates tried is flagged); then seeds {seeds} at that rate, each tested once at the end")


#: the committed ci results: 3 seeds, rates from the 3-point grid, extended by up to two ×3 steps past an edge (at the
#: ci profile's short runs the best rate was at the top edge for 23 of 25 methods without them)
FULL = Protocol("full", seeds=(0, 1, 2), lr_extensions=2)


def reduced_protocol(committed: "DomainResults", seed: int = 0) -> Protocol:
    """One seed at the rates ``committed`` (full-protocol results, ``load_results``) chose: what a notebook runs
    inside CI's budget. Its numbers are labelled "reduced protocol" wherever they are printed."""
    lrs = {m.name: m.lr for m in committed.methods if m.lr is not None}
    return Protocol("reduced", seeds=(seed,), lrs=lrs)


def t_quantile(p: float, dof: int) -> float:
    """Student's t quantile (scipy.stats.t.ppf; scipy comes with scikit-learn, a dependency of the ci profile)."""
    from scipy.stats import t

    return float(t.ppf(p, dof))


@dataclass
class Paired:
    """The paired difference a − b of one metric over the same seeds (same split, initialisation and batches): mean
    and a 95 % paired-t interval (n − 1 degrees of freedom); ``lo``/``hi`` None with one seed (no interval)."""

    a: str
    b: str
    diffs: list[float]
    mean: float
    lo: float | None
    hi: float | None

    @classmethod
    def of(cls, a: str, b: str, a_values: list[float], b_values: list[float]) -> "Paired":
        if len(a_values) != len(b_values) or not a_values:
            raise ValueError(f"paired difference {a} − {b}: {len(a_values)} vs {len(b_values)} values; give one value "
                             "per seed for both, on the same seeds")
        diffs = [x - y for x, y in zip(a_values, b_values)]
        mean = statistics.fmean(diffs)
        if len(diffs) < 2:
            return cls(a, b, diffs, mean, None, None)
        half = t_quantile(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
        return cls(a, b, diffs, mean, mean - half, mean + half)

    def interval(self) -> str:
        if self.lo is None:
            return f"{self.mean:+.3g} (one seed: no interval)"
        return f"{self.mean:+.3g} [{self.lo:+.3g}, {self.hi:+.3g}]"

    def ranking(self, higher_is_better: bool) -> str:
        """"better" / "worse" (a than b) where the interval excludes 0, else "not separated"."""
        if self.lo is None:
            return "no interval (one seed)"
        if self.lo > 0 or self.hi < 0:
            return "better" if (self.lo > 0) == higher_is_better else "worse"
        return "not separated"


#: what a claim's kind asks of the interval of the advantage of a over b (oriented so that > 0 means a is better);
#: δ is the domain's margin of practical equivalence, in units of its test metric
CLAIM_KINDS = {
    "better": "a beats b: supported if the interval lies above 0, contradicted if it lies below 0",
    "at least": "a is at least as good as b: supported if the interval lies above −δ, contradicted if below −δ",
    "matches": "a matches b: supported if the interval lies within ±δ, contradicted if it lies wholly outside",
}


def verdict(kind: str, lo: float | None, hi: float | None, margin: float) -> str:
    """supported / contradicted / inconclusive at this scale, from the 95 % interval [lo, hi] of a's advantage over
    b (see ``CLAIM_KINDS``); "no interval (one seed)" without one."""
    if kind not in CLAIM_KINDS:
        raise ValueError(f"claim kind {kind!r}; valid kinds: {sorted(CLAIM_KINDS)}")
    if lo is None or hi is None:
        return "no interval (one seed)"
    if kind == "better":
        supported, contradicted = lo > 0, hi < 0
    elif kind == "at least":
        supported, contradicted = lo > -margin, hi < -margin
    else:
        supported, contradicted = -margin < lo and hi < margin, lo > margin or hi < -margin
    return "supported" if supported else "contradicted" if contradicted else "inconclusive at this scale"


@dataclass(frozen=True)
class Claim:
    """A claim of the papers, as a comparison this run can check: method a against method b (each picked by family
    and option values, e.g. ("boft", {"n_factors": 2})), of ``kind`` (``CLAIM_KINDS``)."""

    text: str
    source: str
    a: tuple[str, dict[str, Any]]
    b: tuple[str, dict[str, Any]]
    kind: str

    def pick(self, methods: list["MethodResult"], which: tuple[str, dict[str, Any]]) -> "MethodResult | None":
        family, options = which
        return next((m for m in methods if m.family == family
                     and all(m.options.get(k) == v for k, v in options.items())), None)


#: the claims every domain checks (a domain adds its own)
CLAIMS = (
    Claim("BOFT (b=8, m=2) is at least as good as OFT at about equal parameters", "BOFT paper (Liu et al., 2024)",
          ("boft", {"block_size": 8, "n_factors": 2}), ("oft", {}), "at least"),
    Claim("SURM circulant matches LoRA with far fewer parameters", "SURM paper",
          ("surm", {"structure": "circulant"}), ("lora", {}), "matches"),
    Claim("C3A (circulant) vs SURM circulant at about equal parameters: they match", "C3A paper; SURM paper",
          ("c3a", {}), ("surm", {"structure": "circulant"}), "matches"),
    Claim("LoRA matches full fine-tuning", "LoRA paper (Hu et al., 2021)", ("lora", {}), ("full", {}), "matches"),
)
#: the conv-heavy domain's extra claim (diffusion: a UNet of 3×3 convolutions)
FLORA_CLAIM = Claim("FLoRA is at least as good as LoRA on a conv-heavy model", "FLoRA paper (Si et al., 2024)",
                    ("tensor_core", {}), ("lora", {}), "at least")


@dataclass
class ClaimRow:
    """A claim checked: the evidence (the paired difference a − b in the test metric and its 95 % interval), the
    margin δ, and the verdict computed from them (``verdict``)."""

    claim: str
    source: str
    kind: str
    a: str | None
    b: str | None
    evidence: Paired | None
    margin: float
    verdict: str


@dataclass
class MethodResult:
    """One method under a protocol: its learning-rate grid and the validation metric of each rate on the selection
    seed, the chosen rate (and whether it sits at an edge of the grid), and at that rate, per seed: the validation
    curve, the training losses and the test metric; the step time (median over seeds) and the peak memory of a
    training step (the largest over seeds)."""

    name: str
    family: str
    options: dict[str, Any]
    trainable: int | None = None
    method_params: int | None = None
    grid: list[float] = field(default_factory=list)
    grid_validation: list[float | None] = field(default_factory=list)  # last-step validation per rate; None: failed
    grid_notes: list[str | None] = field(default_factory=list)  # why a rate failed (diverged, out of memory)
    lr: float | None = None
    at_edge: str | None = None  # "lowest" / "highest": the chosen rate is at that edge of the grid tried
    seeds: list[int] = field(default_factory=list)
    test: list[float] = field(default_factory=list)  # at the chosen rate, per seed
    validation_before: float | None = None
    eval_steps: list[int] = field(default_factory=list)
    validation: list[list[float]] = field(default_factory=list)  # per seed, at eval_steps
    losses: list[list[float]] = field(default_factory=list)  # per seed, every step
    ms_per_step: float | None = None
    peak_mib: float | None = None
    skipped: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # JSON-able domain details of the first seed's test

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.test) if self.test else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.test) if len(self.test) > 1 else None


@dataclass
class DomainResults:
    """One domain under one protocol: every method's ``MethodResult``, the paired differences against LoRA and the
    claims checked. ``runs`` (not saved) keeps the first seed's ``Run`` per method for figures."""

    domain: str
    title: str
    profile: str
    protocol: Protocol
    description: str
    metric: str
    higher_is_better: bool
    validation_metric: str
    validation_higher_is_better: bool
    margin: float
    methods: list[MethodResult]
    paired: list[Paired] = field(default_factory=list)
    claims: list[ClaimRow] = field(default_factory=list)
    runs: list[Run] = field(default_factory=list, repr=False)

    def method(self, name: str) -> MethodResult:
        """The method called ``name``; ValueError naming the methods otherwise."""
        found = next((m for m in self.methods if m.name == name), None)
        if found is None:
            raise ValueError(f"no method {name!r} in the {self.domain} results; methods: "
                             f"{[m.name for m in self.methods]}")
        return found

    def reference(self) -> MethodResult | None:
        """The paired differences' reference: the LoRA method."""
        return next((m for m in self.methods if m.family == "lora" and not m.skipped), None)

    def markdown(self) -> str:
        """This domain's section of results.md: the protocol, the results table (test metric, paired differences
        against LoRA, chosen rates, memory), and the claims table."""
        from boftlab.bench import markdown_table

        n = len(self.protocol.seeds)
        better = "higher" if self.higher_is_better else "lower"
        vbetter = "higher" if self.validation_higher_is_better else "lower"
        ref = self.reference()
        paired = {p.a: p for p in self.paired}
        header = ["method", "params of the method", f"learning rate: grid → {self.validation_metric}",
                  "chosen rate", *(f"seed {s}" for s in self.protocol.seeds), f"{self.metric}: mean ± std",
                  f"− {ref.name if ref else 'LoRA'}: mean [95 % CI]", "vs LoRA", "ms / step", "peak MiB / step"]
        rows = []
        for m in self.methods:
            grid = ", ".join(f"{lr:.3g}: {note or f'{v:.4g}'}" for lr, v, note in
                             zip(m.grid, m.grid_validation, m.grid_notes))
            chosen = None if m.lr is None else f"{m.lr:.3g}" + (f" ⚑ {m.at_edge} of grid" if m.at_edge else "")
            spread = None if m.mean is None else (f"{m.mean:.4g} ± {m.std:.2g}" if m.std is not None else
                                                  f"{m.mean:.4g}")
            seeds = [*m.test, *([None] * (n - len(m.test)))]
            p = paired.get(m.name)
            vs = ("reference" if ref is not None and m.name == ref.name else
                  p.ranking(self.higher_is_better) if p else None)
            params = None if m.method_params is None else f"{m.method_params:,}"
            rows.append([m.name + (f" — {m.skipped}" if m.skipped else ""), params, grid, chosen, *seeds, spread,
                         p.interval() if p else None, vs, m.ms_per_step, m.peak_mib])
        lines = [f"## {self.title}", "", self.description, "",
                 f"Protocol: {self.protocol.describe()}. Test metric: {self.metric} ({better} is better); learning "
                 f"rates chosen by {self.validation_metric} ({vbetter} is better). A rate marked ⚑ is the edge of "
                 "the grid tried: the best rate may lie beyond it. \"vs LoRA\": the paired difference (same seeds: "
                 "same split, initialisation and batches) and its 95 % paired-t interval (n − 1 degrees of "
                 "freedom); a method is called better or worse only where that interval excludes 0.", "",
                 markdown_table(header, rows), "",
                 f"Peak MiB / step: {MEMORY_METHOD_RUN}. ms / step: median over the steps of every seed's run.", ""]
        lines += [f"### What the papers claim, what this run shows ({self.title})", "",
                  f"Verdicts are computed from the 95 % interval of the paired difference in {self.metric} "
                  f"(oriented so that > 0 favours the first method), with δ = {self.margin:g} as the margin of "
                  f"practical equivalence: {'; '.join(CLAIM_KINDS.values())}.", ""]
        claim_rows = [[c.claim, c.source, c.kind, f"{c.a} − {c.b}: {c.evidence.interval()}" if c.evidence else None,
                       c.verdict] for c in self.claims]
        lines += [markdown_table(["claim", "source", "rule", "evidence (test metric)", "verdict"], claim_rows), ""]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Every field but ``runs``, as plain JSON types (``from_dict`` inverts it)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "runs"}
        data["protocol"] = dataclasses.asdict(self.protocol)
        data["methods"] = [dataclasses.asdict(m) for m in self.methods]
        data["paired"] = [dataclasses.asdict(p) for p in self.paired]
        data["claims"] = [dataclasses.asdict(c) for c in self.claims]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DomainResults":
        """The DomainResults ``to_dict`` wrote (without runs)."""
        protocol = data["protocol"]
        claims = [ClaimRow(**{**c, "evidence": Paired(**c["evidence"]) if c["evidence"] else None})
                  for c in data["claims"]]
        return cls(**{**data, "protocol": Protocol(**{**protocol, "seeds": tuple(protocol["seeds"]),
                                                      "lr_factors": tuple(protocol["lr_factors"])}),
                      "methods": [MethodResult(**m) for m in data["methods"]],
                      "paired": [Paired(**p) for p in data["paired"]], "claims": claims})


#: how the runner measures a training step's peak memory (results tables print it)
MEMORY_METHOD_RUN = (
    "on a GPU, torch.cuda.max_memory_allocated over the whole training; on a CPU, the model's parameters and "
    "buffers and AdamW's states plus the most the second step's own tensors hold at once (" + MEMORY_METHOD["cpu"]
    .removeprefix("peak MiB: the most memory the step's own tensors hold at once — ") + ")"
)


def _grid(method: Method, protocol: Protocol) -> list[float]:
    if protocol.lrs is None:
        return sorted(float(f"{method.lr * f:.3g}") for f in protocol.lr_factors)
    if method.name not in protocol.lrs:
        raise ValueError(f"the {protocol.name} protocol has no learning rate for {method.name!r}; it has rates for "
                         f"{sorted(protocol.lrs)} (from the committed results); rerun the full protocol to add it")
    return [protocol.lrs[method.name]]


def choose_lr(task: Task, method: Method, protocol: Protocol, higher_is_better: bool,
              progress: bool = True) -> tuple[MethodResult, Run]:
    """Train ``method`` at every rate of its grid (``Protocol``) on ``task`` and pick the rate whose validation
    metric (``task.evaluate``, last step) is best — ties go to the lower rate; never ``task.test``. The chosen run is
    then tested once (``evaluate_kept``). Returns the method's result so far (grid, choice, first seed) and that run.
    A method that cannot be applied at all (a missing package, the memory gate) is tried once."""
    grid = _grid(method, protocol)
    runs: dict[float, Run] = {}

    def best() -> float | None:
        done = [lr for lr in sorted(runs) if not runs[lr].skipped]
        if not done:
            return None
        sign = 1 if higher_is_better else -1
        return max(done, key=lambda lr: (sign * runs[lr].final, -lr))

    def attempt(lr: float) -> None:
        runs[lr] = run_method(task, dataclasses.replace(method, lr=lr), progress, keep_trained=True)
        leader = best()
        for other, run in runs.items():  # keep the trained copy of the best run only
            if other != leader:
                run.trained = None

    attempt(grid[0])
    if runs[grid[0]].skipped and runs[grid[0]].skipped.startswith("skipped:"):  # not a matter of the rate
        return MethodResult(method.name, method.family, dict(method.options), skipped=runs[grid[0]].skipped), \
            runs[grid[0]]
    for lr in grid[1:]:
        attempt(lr)
    for _ in range(protocol.lr_extensions if protocol.lrs is None else 0):
        leader = best()
        if leader is None or leader not in (grid[0], grid[-1]):
            break
        new = float(f"{leader / 3:.3g}") if leader == grid[0] else float(f"{leader * 3:.3g}")
        grid = [new, *grid] if leader == grid[0] else [*grid, new]
        attempt(new)
    chosen = best()
    result = MethodResult(method.name, method.family, dict(method.options), grid=grid,
                          grid_validation=[None if runs[lr].skipped else runs[lr].final for lr in grid],
                          grid_notes=[runs[lr].skipped for lr in grid])
    if chosen is None:
        result.skipped = f"no rate of its grid finished ({runs[grid[0]].skipped})"
        return result, runs[grid[0]]
    result.lr = chosen
    if len(grid) > 1 and chosen in (grid[0], grid[-1]):
        result.at_edge = "lowest" if chosen == grid[0] else "highest"
    run = runs[chosen]
    evaluate_kept(task, run)
    result.trainable, result.method_params = run.trainable, run.method_params
    result.validation_before, result.eval_steps = run.before, run.eval_steps
    return result, run


def _record(result: MethodResult, seed: int, run: Run) -> None:
    """Add one seed's run at the chosen rate to ``result``."""
    if run.skipped:
        result.skipped = f"seed {seed}: {run.skipped}"
        return
    result.seeds.append(seed)
    result.test.append(run.test)
    result.validation.append(run.evals)
    result.losses.append(run.losses)


def run_protocol(make_task: Callable[[int], tuple[Task, str]], methods: list[Method], protocol: Protocol,
                 higher_is_better: bool, validation_higher_is_better: bool,
                 progress: bool = True) -> tuple[list[MethodResult], list[Run], str]:
    """Every method under ``protocol``: the rate chosen on the first seed (``choose_lr``), then every other seed at
    that rate, tested at the end. ``make_task(seed) -> (Task, description)``. Returns the results, the first seed's
    chosen runs (for figures) and the task's description."""
    from tqdm.auto import tqdm

    first, *others = protocol.seeds
    task, description = make_task(first)
    if task.test is None:
        raise ValueError("the protocol needs a task with a validation and a test split (Task.test is None)")
    results, first_runs, times, peaks = [], [], {}, {}
    for method in tqdm(methods, desc=f"rates on seed {first}", disable=not progress, leave=False):
        result, run = choose_lr(task, method, protocol, validation_higher_is_better, progress)
        results.append(result)
        first_runs.append(run)
        if result.lr is not None:
            _record(result, first, run)
            result.extra = {k: v for k, v in run.extra.items() if isinstance(v, (int, float, str, list))}
            times[method.name], peaks[method.name] = [run.ms_per_step], [run.peak_mib]
    del task
    for seed in others:
        task, _ = make_task(seed)
        for method, result in zip(methods, tqdm(results, desc=f"seed {seed}", disable=not progress, leave=False)):
            if result.lr is None or result.skipped:
                continue
            run = run_method(task, dataclasses.replace(method, lr=result.lr), progress, test=True)
            _record(result, seed, run)
            times[method.name].append(run.ms_per_step)
            peaks[method.name].append(run.peak_mib)
        del task
    for result in results:
        if result.name in times:
            result.ms_per_step = statistics.median(t for t in times[result.name] if t is not None)
            measured = [p for p in peaks[result.name] if p is not None]
            result.peak_mib = max(measured) if measured else None
    return results, first_runs, description


def paired_against_lora(methods: list[MethodResult]) -> list[Paired]:
    """Each method's paired difference (test metric, method − LoRA) over the seeds both ran; none without LoRA."""
    ref = next((m for m in methods if m.family == "lora" and not m.skipped), None)
    if ref is None:
        return []
    return [Paired.of(m.name, ref.name, m.test, ref.test) for m in methods
            if m is not ref and not m.skipped and m.seeds == ref.seeds]


def check_claims(claims: tuple[Claim, ...], methods: list[MethodResult], higher_is_better: bool,
                 margin: float) -> list[ClaimRow]:
    """Each claim's row: the paired difference of its two methods and the verdict from its interval (``verdict``),
    or "not measured" naming the method this run lacks."""
    rows = []
    for claim in claims:
        a, b = claim.pick(methods, claim.a), claim.pick(methods, claim.b)
        missing = [f"{fam} {opts or ''}".strip() for m, (fam, opts) in ((a, claim.a), (b, claim.b))
                   if m is None or m.skipped or not m.test]
        if missing:
            rows.append(ClaimRow(claim.text, claim.source, claim.kind, a and a.name, b and b.name, None, margin,
                                 f"not measured: no finished {' / '.join(missing)} method in this run"))
            continue
        if a.seeds != b.seeds:
            raise ValueError(f"claim {claim.text!r}: {a.name} ran seeds {a.seeds}, {b.name} {b.seeds}; a paired "
                             "difference needs the same seeds")
        evidence = Paired.of(a.name, b.name, a.test, b.test)
        lo, hi = (evidence.lo, evidence.hi) if higher_is_better else (
            None if evidence.hi is None else -evidence.hi, None if evidence.lo is None else -evidence.lo)
        rows.append(ClaimRow(claim.text, claim.source, claim.kind, a.name, b.name, evidence, margin,
                             verdict(claim.kind, lo, hi, margin)))
    return rows


# --- results files: results.md (tables), results.json (every number), provenance --------------------------------------
#: the repository root, where a checkout has ``.git``, ``constraints.txt`` and ``docs/results/``
REPOSITORY = Path(__file__).resolve().parents[2]
#: the committed full-protocol results of the ci profile, as package data (a wheel and Colab's install from git have
#: them): a byte-for-byte copy of docs/results/ci/results.json, which the README quotes (a test keeps them equal)
COMMITTED_RESULTS = Path(__file__).resolve().parent / "results" / "ci.json"


def provenance(command: str, protocol: Protocol) -> dict[str, Any]:
    """Where and how a results file was made: the commit (``git rev-parse HEAD``, and whether tracked files had
    uncommitted changes) or a statement that this is not a git checkout, the command, the protocol (seeds, grid),
    the machine, threads and load average, and the environment lock (``constraints.txt`` and its sha256)."""
    import hashlib
    import os
    import platform
    import subprocess

    from boftlab.bench import load_average, machine

    if (REPOSITORY / ".git").exists():
        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", str(REPOSITORY), *args], capture_output=True, text=True,
                                  check=True).stdout.strip()

        changed = git("status", "--porcelain", "--untracked-files=no").splitlines()
        commit = git("rev-parse", "HEAD") + (f" (with uncommitted changes to {len(changed)} tracked files)"
                                             if changed else "")
    else:
        commit = f"not a git checkout ({REPOSITORY} has no .git): an installed package"
    lock = REPOSITORY / "constraints.txt"
    constraints = (f"constraints.txt sha256 {hashlib.sha256(lock.read_bytes()).hexdigest()}" if lock.is_file() else
                   "no constraints.txt beside the package (an installed package): environment not locked")
    import torch as _torch

    return {"commit": commit, "command": command, "protocol": protocol.describe(), "seeds": list(protocol.seeds),
            "lr_grid": ("fixed rates from the committed results" if protocol.lrs is not None else
                        f"declared rate × {list(round(f, 4) for f in protocol.lr_factors)}, "
                        f"+ up to {protocol.lr_extensions} ×3 extension(s) past an edge"),
            "machine": machine(), "threads": _torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset"),
            "load_average_start": load_average(), "python": platform.python_version(),
            "environment_lock": constraints, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


@dataclass
class Results:
    """A protocol run of one or more domains: provenance (``provenance``) and domain name -> ``DomainResults``."""

    provenance: dict[str, Any]
    domains: dict[str, DomainResults]

    def markdown(self) -> str:
        p = self.provenance
        lines = ["# boftlab reproduction results", "",
                 f"Command: `{p['command']}`", "",
                 "| provenance | |", "|---|---|", *(f"| {k} | {v} |" for k, v in p.items() if k != "command"), "",
                 "Every number below was produced by this run. Learning rates were chosen on a validation split drawn "
                 "from the training data; the test metric was computed once per seed, at the end, at the chosen "
                 "rate. results.json beside this file holds every number (`boftlab.reproduce.load_results`).", ""]
        for d in self.domains.values():
            lines.append(d.markdown())
            lines += [f"![{stem}](./{stem}.png)" for stem in figure_stems(d)] + [""]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"provenance": self.provenance, "domains": {k: d.to_dict() for k, d in self.domains.items()}}


def figure_stems(d: DomainResults) -> list[str]:
    """The PNGs written for domain ``d``: its validation curves, and the diffusion domain's sample grid."""
    return [f"{d.domain}_curves", *(["diffusion_samples"] if d.domain == "diffusion" and d.profile == "ci" else [])]


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    tmp.replace(path)


def write_results(results: Results, out: Path, figures: dict[str, Any] | None = None) -> Path:
    """Write ``out/results.md``, ``out/results.json`` (every number) and ``figures`` (stem -> Figure) as
    ``out/<stem>.png``, each atomically (a temporary file, then a rename); return the markdown's path."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    for stem, fig in (figures or {}).items():
        _atomic_write(out / f"{stem}.png", lambda tmp, fig=fig: fig.savefig(tmp, dpi=90, format="png"))
    _atomic_write(out / "results.json",
                  lambda tmp: tmp.write_text(json.dumps(results.to_dict(), indent=1, allow_nan=False) + "\n"))
    path = out / "results.md"
    _atomic_write(path, lambda tmp: tmp.write_text(results.markdown()))
    return path


def load_results(path: str | Path = COMMITTED_RESULTS) -> Results:
    """The ``Results`` in a results.json (default: the committed ci results, ``COMMITTED_RESULTS``, package data), as
    written by ``write_results``; plain JSON, nothing unpickled."""
    import json

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no results at {path}; `python -m boftlab reproduce all --profile ci --out docs/results/ci` writes "
            "results.json there, and boftlab/reproduce/results/ci.json (package data) is the committed copy of it")
    data = json.loads(path.read_text())
    return Results(data["provenance"], {k: DomainResults.from_dict(d) for k, d in data["domains"].items()})


# --- a domain, as the CLI and the notebooks use it --------------------------------------------------------------------
@dataclass(frozen=True)
class Domain:
    """One reproduction domain as ``python -m boftlab reproduce`` and notebooks 07–09 use it.

    settings_by_profile: profile -> the domain's settings object; tasks: profile -> (settings -> (Task, markdown
    description)); methods: profile -> () -> the methods compared; titles / metrics: profile -> report title / metric
    name; label: short name for figure titles; extra_figures(runs) -> more figures (file stem -> Figure).
    validation_metrics: profile -> name of the curves' metric (``Task.evaluate``), by which rates are chosen;
    validation_higher_is_better: its direction (None: as the test metric's); margins: profile -> the margin of
    practical equivalence δ of the claims, in test-metric units; claims: the papers' claims this domain checks.
    """

    name: str
    label: str
    settings_by_profile: dict[str, Any]
    tasks: dict[str, Callable[[Any], tuple[Task, str]]]
    methods: dict[str, Callable[[], list[Method]]]
    titles: dict[str, str]
    metrics: dict[str, str]
    higher_is_better: bool
    validation_metrics: dict[str, str]
    margins: dict[str, float]
    validation_higher_is_better: bool | None = None
    claims: tuple[Claim, ...] = CLAIMS
    extra_figures: Callable[[list[Run]], dict[str, Any]] | None = None

    def settings(self, profile: str) -> Any:
        """The settings (steps, batch size, ...) of ``profile``; ValueError naming the profiles otherwise."""
        if profile not in self.settings_by_profile:
            raise ValueError(f"profile={profile!r}; valid profiles: {sorted(self.settings_by_profile)}")
        return self.settings_by_profile[profile]

    def make_task(self, profile: str, s: Any = None) -> tuple[Task, str]:
        """(the runner's Task, a markdown paragraph describing it) for ``profile``, with ``s`` or its defaults."""
        default = self.settings(profile)  # validates the name
        return self.tasks[profile](s or default)

    def profile_methods(self, profile: str) -> list[Method]:
        self.settings(profile)  # validates the name
        return self.methods[profile]()

    def report(self, profile: str, runs: list[Run], description: str) -> Report:
        """The results of ``runs`` as a Report, with the learning-curve figure and the domain's other figures."""
        metric = self.metrics[profile]
        figures = {f"{self.name}_curves": plot_curves(runs, metric, self.label)}
        figures |= self.extra_figures(runs) if self.extra_figures else {}
        return Report(self.name, self.titles[profile], description, runs, metric, self.higher_is_better, figures)

    def run_seeds(self, profile: str, seeds: tuple[int, ...], methods: list[Method] | None = None, s: Any = None,
                  progress: bool = True) -> dict[int, list[Run]]:
        """seed -> ``run_methods`` on the task of ``profile`` made with that seed (its split, initialisations and
        batch order); ``seed_table`` summarises them."""
        s = s or self.settings(profile)
        methods = methods if methods is not None else self.profile_methods(profile)
        return {seed: run_methods(self.make_task(profile, dataclasses.replace(s, seed=seed))[0], methods, progress)
                for seed in seeds}

    def run(self, profile: str, progress: bool = True, methods: list[Method] | None = None, s: Any = None) -> Report:
        """Run every method once at its declared rate under ``profile``; ``methods`` / ``s`` override the profile's
        defaults. The curves show the validation metric, the table's "after" column too; ``run_protocol`` is the
        comparison the results files report."""
        task, description = self.make_task(profile, s)
        methods = methods if methods is not None else self.profile_methods(profile)
        return self.report(profile, run_methods(task, methods, progress), description)

    def run_protocol(self, profile: str, protocol: Protocol = FULL, progress: bool = True,
                     methods: list[Method] | None = None, s: Any = None) -> DomainResults:
        """Every method of ``profile`` (or ``methods``) under ``protocol`` (``run_protocol``: rates chosen on
        validation, seeds, test at the end), with the paired differences against LoRA and the claims checked."""
        s = s or self.settings(profile)
        methods = methods if methods is not None else self.profile_methods(profile)
        vhigher = self.higher_is_better if self.validation_higher_is_better is None else \
            self.validation_higher_is_better
        results, runs, description = run_protocol(
            lambda seed: self.make_task(profile, dataclasses.replace(s, seed=seed)), methods, protocol,
            self.higher_is_better, vhigher, progress)
        return DomainResults(
            self.name, self.titles[profile], profile, protocol, description, self.metrics[profile],
            self.higher_is_better, self.validation_metrics[profile], vhigher, self.margins[profile], results,
            paired_against_lora(results), check_claims(self.claims, results, self.higher_is_better,
                                                       self.margins[profile]), runs)

    def figures(self, results: DomainResults) -> dict[str, Any]:
        """stem -> Figure: the first seed's training loss and validation curves at each method's chosen rate, and
        the domain's other figures (``extra_figures``). Needs the runs of ``run_protocol`` (loaded results have
        none: their PNGs are beside results.json)."""
        if not results.runs:
            raise ValueError(f"the {self.name} results hold no runs (loaded from results.json?); their figures are the "
                             "PNG files beside it")
        runs = [r for r in results.runs if not r.skipped]
        label = f"{self.label}, seed {results.protocol.seeds[0]}, chosen rates"
        figures = {f"{self.name}_curves": plot_curves(runs, results.validation_metric, label)}
        return figures | (self.extra_figures(runs) if self.extra_figures else {})
