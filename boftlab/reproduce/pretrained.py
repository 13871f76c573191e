"""The pretrained models the tasks start from: the ci profile's, shipped as package data (``boftlab/pretrained/``,
written and read as safetensors; ``train_digit_model`` is the loop that made the digit ones), and the colab
profile's hub downloads (``hide_weight_loading_bars``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data import batch_indices, shift_pixels


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


def hide_weight_loading_bars() -> None:
    """Hide transformers' "Loading weights" bars (one per model built) and keep huggingface_hub's download bars,
    which tell a first run how long it waits. For the colab tasks, which load models from the hub."""
    import huggingface_hub
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # this also hides the hub's bars ...
    huggingface_hub.utils.enable_progress_bars()  # ... so they come back
