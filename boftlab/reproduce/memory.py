"""Fitting one accelerator: the memory a training step needs (``training_bytes``, ``transformer_activation_bytes``),
the gate that skips a method that would not fit (``memory_gate``), gradient checkpointing, handing memory back between
methods, and how a step's peak memory is measured on a CPU (``resident_bytes``) and reported (``MEMORY_METHOD_RUN``)."""

from __future__ import annotations

import gc

import torch
from torch import nn

from ..bench import MEMORY_METHOD
from .task import Task


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


def resident_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes a training step starts with on the CPU: the model's parameters and buffers and the optimizer's states
    (a step's own tensors — activations, gradients, temporaries — are ``LiveTensorBytes``')."""
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


#: how the runner measures a training step's peak memory (results tables print it)
MEMORY_METHOD_RUN = (
    "on a GPU, torch.cuda.max_memory_allocated over the whole training; on a CPU, the model's parameters and "
    "buffers and AdamW's states plus the most the second step's own tensors hold at once (" + MEMORY_METHOD["cpu"]
    .removeprefix("peak MiB: the most memory the step's own tensors hold at once — ") + ")"
)
