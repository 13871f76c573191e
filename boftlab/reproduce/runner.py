"""What the three reproduction domains share: the methods, one training loop, the table and the figures.

A domain (``vit``, ``llm``, ``diffusion``) supplies a pretrained model, a loss on a training batch and a held-out
metric. This module adapts a fresh copy of the model with each method, trains it with the same loop (AdamW, warm-up
then cosine decay, fixed seed and data order), and records what the run measured: trainable parameters, the metric
before and after, milliseconds per optimizer step and peak accelerator memory. Nothing is filled in by hand.
"""

from __future__ import annotations

import copy
import gc
import math
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..base_layers import keep_unpacked, kind
from ..contract import FAMILIES

#: the references a method can name besides boftlab's families (``contract.FAMILIES``)
REFERENCES = ("head", "full", "lora", "c3a")
#: PEFT C3A's learning rate, fixed for now: PEFT's documentation calls 1e-1 "a good starting point" for C3A
C3A_LR = 1e-1


def method_families() -> tuple[str, ...]:
    """What ``Method.family`` can be: the references, then every boftlab family."""
    return (*REFERENCES, *FAMILIES)


@dataclass(frozen=True)
class Method:
    """One row of a results table.

    family: "head" (only the modules kept trainable), "full" (every parameter), "lora" / "c3a" (PEFT ``LoraConfig`` /
    ``C3AConfig``, its block size by default ``peft_interop.c3a_block_size`` of the targets) or a
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
    """The eight adapter rows every domain compares, on the same ``targets``: PEFT LoRA (rank ``lora_rank``, alpha
    ``lora_alpha`` or 2·rank), OFT (``oft_block_size``), BOFT b=8 m=2 and b=4 m=4, SURM circulant and Kronecker
    (LoRA-style), FLoRA (``flora_ranks`` per mode; ``flora_targets`` if it adapts more layers), PEFT C3A (block size
    the gcd of the targeted layers' sizes: SURM circulant's parameter count where one size divides the other; lr
    ``C3A_LR``). ``lr`` is AdamW's peak learning rate, ``orthogonal_lr`` OFT's and BOFT's where it differs."""
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
        Method("C3A (PEFT)", "c3a", {}, targets, C3A_LR),
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
    if method.family in ("lora", "c3a"):
        try:
            from peft import C3AConfig, LoraConfig, get_peft_model
        except ImportError as err:
            raise MethodUnavailable(f"PEFT is not importable here ({err}); pip install peft") from err

        options = dict(target_modules=method.targets, modules_to_save=list(trainable) or None, **method.options)
        if method.family == "c3a" and "block_size" not in options:
            from ..peft_interop import c3a_block_size

            try:
                options["block_size"] = c3a_block_size(model, method.targets)
            except ValueError as err:  # C3A adapts plain nn.Linear layers only
                raise MethodUnavailable(str(err)) from err
        config = (LoraConfig if method.family == "lora" else C3AConfig)(**options)
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
    evals: list[float] = field(default_factory=list)  # held-out metric at eval_steps (the first at step 0)
    ms_per_step: float | None = None  # median wall time of one optimizer step
    peak_mib: float | None = None  # peak CUDA memory allocated while training; None on CPU
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
    step's batch (same batches for every method); evaluate(model) -> held-out metric; after(model, run): optional
    hook run on the trained model (e.g. sampling).

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
                        **options: Any) -> Task:
    """Cross-entropy on seeded batches of (train_x, train_y); held-out metric = accuracy on (test_x, test_y).
    ``forward(model, images) -> logits`` hides the model family's calling convention; ``head`` is the module every
    method trains; ``s`` holds steps, batch_size, eval_every and seed (a domain's settings); ``options``: the
    other ``Task`` fields (precision, setting, …)."""

    def loss(m: nn.Module, step: int) -> torch.Tensor:
        idx = batch_indices(len(train_x), s.batch_size, step, s.seed)
        return torch.nn.functional.cross_entropy(forward(m, train_x[idx].to(device)), train_y[idx].to(device))

    def evaluate(m: nn.Module) -> float:
        logits = torch.cat([forward(m, x.to(device)).cpu() for x in test_x.split(256)])
        return accuracy(logits, test_y)

    return Task(model, [head], loss, evaluate, s.steps, s.eval_every, device, s.seed, **options)


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
def run_method(task: Task, method: Method, progress: bool = True) -> Run:
    """Adapt a fresh copy of ``task.base`` with ``method``, train it, and measure.

    A method that cannot run is a row, not an error: a family that cannot be imported, a model that the memory
    estimate says does not fit (``memory_gate``), an out-of-memory error while training (the row says at which
    point, with the setting) and a run that left NaN/inf in its trainable parameters (``Diverged``, found at the next
    evaluation, whose metric would be a broken model's) give a skipped ``Run`` with the reason. The method's model
    and optimizer are freed before this returns, so the next method has the accelerator to itself."""
    run = Run(method)
    torch.manual_seed(task.seed)  # same adapter initialisation stream and data order for every method
    base = copy.deepcopy(task.base)
    if task.gradient_checkpointing:
        enable_gradient_checkpointing(base)
    try:
        model = prepare(base, method, task.trainable)
    except MethodUnavailable as err:
        run.skipped = f"skipped: {err}"
        return run
    del base
    run.trainable, run.method_params = count_parameters(model, task.trainable)
    run.skipped = memory_gate(task, model)
    if run.skipped is None:
        try:
            train(task, model, run, progress)
        except Diverged as err:
            run.skipped = str(err)
        except torch.cuda.OutOfMemoryError as err:  # = torch.OutOfMemoryError
            reason = str(err).split("\n")[0]
            run.skipped = (f"out of memory after {len(run.steps)} of {task.steps} steps "
                           f"({task.describe_setting()}): {reason}")
    del model
    release_memory(task.device)
    return run


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
    bar = tqdm(range(task.steps), desc=run.method.name, disable=not progress, leave=False)
    for step in bar:
        _synchronize(task.device)
        start = time.perf_counter()
        with autocast():
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
    if task.after is not None:
        model.eval()
        with torch.no_grad(), autocast():
            task.after(model, run)


def run_methods(task: Task, methods: list[Method], progress: bool = True) -> list[Run]:
    """``run_method`` for each method, in order, one model on the accelerator at a time; a method that cannot run or
    runs out of memory is reported (printed, and a row of the table), not raised."""
    runs = []
    for method in methods:
        run = run_method(task, method, progress)
        if run.skipped and progress:
            print(f"{method.name}: {run.skipped}")
        runs.append(run)
    return runs


# --- reporting --------------------------------------------------------------------------------------------------------
def results_table(runs: list[Run], metric: str) -> str:
    """Markdown table: method, trainable parameters, the metric before → after, ms per step, peak memory."""
    from ..report import markdown_table

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


@dataclass(frozen=True)
class Domain:
    """One reproduction domain as ``python -m boftlab reproduce`` and notebooks 07–09 use it.

    settings_by_profile: profile -> the domain's settings object; tasks: profile -> (settings -> (Task, markdown
    description)); methods: profile -> () -> the methods compared; titles / metrics: profile -> report title / metric
    name; label: short name for figure titles; extra_figures(runs) -> more figures (file stem -> Figure).
    """

    name: str
    label: str
    settings_by_profile: dict[str, Any]
    tasks: dict[str, Callable[[Any], tuple[Task, str]]]
    methods: dict[str, Callable[[], list[Method]]]
    titles: dict[str, str]
    metrics: dict[str, str]
    higher_is_better: bool
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
        import dataclasses

        s = s or self.settings(profile)
        methods = methods if methods is not None else self.profile_methods(profile)
        return {seed: run_methods(self.make_task(profile, dataclasses.replace(s, seed=seed))[0], methods, progress)
                for seed in seeds}

    def run(self, profile: str, progress: bool = True, methods: list[Method] | None = None, s: Any = None) -> Report:
        """Run the comparison under ``profile``; ``methods`` / ``s`` override the profile's defaults."""
        task, description = self.make_task(profile, s)
        methods = methods if methods is not None else self.profile_methods(profile)
        return self.report(profile, run_methods(task, methods, progress), description)


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


def write_results(reports: list[Report], out: Path, profile: str, command: str) -> Path:
    """Write ``out/results.md`` and every report's figures as ``out/<stem>.png``; return the markdown's path."""
    from ..report import machine

    out.mkdir(parents=True, exist_ok=True)
    parts = [
        "# boftlab reproduction results", "",
        f"Profile `{profile}`; measured on: {machine()}.", "",
        f"Command: `{command}`", "",
        "Every number below was produced by this run; learning rates are fixed per family in "
        "`boftlab/reproduce/` (not tuned on the held-out data).", "",
    ]
    for report in reports:
        parts.append(report.markdown())
        for stem, fig in report.figures.items():
            fig.savefig(out / f"{stem}.png", dpi=90)
    path = out / "results.md"
    path.write_text("\n".join(parts))
    return path


# --- seeds ------------------------------------------------------------------------------------------------------------
def seed_table(runs_by_seed: dict[int, list[Run]], metric: str, higher_is_better: bool = True) -> str:
    """Markdown table of each method's final metric on every seed and its mean ± standard deviation (n − 1), best
    mean first, then one sentence naming the neighbours in that order whose means differ by less than the larger of
    their two standard deviations — rankings the seeds cannot tell apart. ``runs_by_seed``: seed -> the runs of the
    same methods in the same order (``run_methods``)."""
    from ..report import markdown_table

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
