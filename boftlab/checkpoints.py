"""Resumable training: checkpoint the adapters, optimizer, scheduler, step and random states; resume exactly.

    save_checkpoint(model, path, optimizer, scheduler, step)    one file, written atomically
    state = load_checkpoint(model, path, optimizer, scheduler)  -> Resumed(step, extra); continue from state.step

Every boftlab file function takes ``(model, path, …)``; a call in the old order of these two (``path`` first) is a
ValueError that says so.

A checkpoint is a single safetensors file: every tensor (adapter and trainable-module tensors, optimizer moments,
RNG states) is a safetensors tensor, and everything else (step, scheduler counters, optimizer hyper-parameters,
Python/NumPy RNG states, the adapter config) is JSON in the file's metadata. Nothing is ever unpickled, and the
file is replaced atomically (``boftlab.saving.atomic_write``), so a crash during a save leaves the previous
checkpoint intact. Like an adapter file it carries a SHA-256 of its metadata and tensors (``boftlab.saving``), checked
when loading; model tensors holding a NaN or an infinity are refused when saving and when loading. Format version 2
added the checksum; version-1 checkpoints, written before it, load without one. With fixed seeds, a run resumed from
a checkpoint reproduces the uninterrupted run's losses exactly (tests/test_checkpoints.py).

``model`` is the adapted model (or its DDP / ``torch.compile`` wrapper); resume into a model adapted with the same
configs and targets, and an optimizer built over the same parameters in the same order. Random states are those of
the calling process: under DDP, have every rank save to its own path (``f"ckpt/rank{rank}"``) for an exact resume,
or accept that only rank 0's are kept. FSDP shards parameters and optimizer state: checkpoint it with
``accelerate``'s ``save_state`` / ``torch.distributed.checkpoint`` instead (docs/multi_gpu.md).
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._version import __version__
from .model import adapter_layers, check_unmerged, strip_wrappers
from .saving import (
    adapter_config, adapter_state, atomic_write, check_finite, check_layout, check_model_and_path,
    check_saved_if_trained, common_shape_key, read_safetensors, safetensors_writer, structure, upgrade_config,
)

FORMAT_VERSION = 2
CHECKSUMMED_SINCE = 2  # the first checkpoint format version whose files carry a checksum
CHECKPOINT_NAME = "training_checkpoint.safetensors"
METADATA_KEY = "boftlab_checkpoint"


@dataclass
class Resumed:
    """What ``load_checkpoint`` restored besides the tensors: the step to continue from and the ``extra`` dict."""

    step: int
    extra: dict[str, Any] = field(default_factory=dict)


# --- JSON + tensors: a lossless encoding of state_dict trees ---------------------------------------------------------
def encode(obj: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON-able copy of ``obj`` whose tensors are moved into ``tensors`` under ``key``-derived names.

    Tuples, dicts with non-string keys (optimizer states are keyed by int), NumPy arrays and non-finite floats are
    tagged so that ``decode`` rebuilds them exactly. Anything else (a function, an arbitrary object) is refused.
    A tensor's name is its dotted path, made unique: ``{"a.b": x, "a": {"b": y}}`` or ``{1: x, "1": y}`` give two
    paths ``a.b`` (or ``1``), so the later one is stored as ``a.b#2``; the JSON records each tensor's own name.
    """
    if isinstance(obj, torch.Tensor):
        name, n = key, 1
        while name in tensors:  # another path flattened to the same name: keep both tensors, never one for two
            n += 1
            name = f"{key}#{n}"
        tensors[name] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": name}
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}
    if isinstance(obj, (list, tuple)):
        items = [encode(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else {"__tuple__": items}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode(v, f"{key}.{k}", tensors) for k, v in obj.items()}
        bad = [k for k in obj if not isinstance(k, (str, int))]
        if bad:
            raise ValueError(f"cannot checkpoint {key!r}: dict keys must be str or int, got {bad[0]!r}")
        return {"__items__": [[k, encode(v, f"{key}.{k}", tensors)] for k, v in obj.items()]}
    if type(obj).__module__ == "numpy":
        import numpy as np

        if isinstance(obj, np.ndarray):
            return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
        return encode(obj.item(), key, tensors)  # a NumPy scalar
    raise ValueError(
        f"cannot checkpoint {key!r}: a {type(obj).__name__} is neither a tensor nor JSON data "
        "(schedulers built on lambdas keep only their counters; pass plain numbers/strings in extra)"
    )


def decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of ``encode``."""
    if isinstance(obj, list):
        return [decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__float__" in obj:
        return float(obj["__float__"])
    if "__tuple__" in obj:
        return tuple(decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {k: decode(v, tensors) for k, v in obj["__items__"]}
    if "__ndarray__" in obj:
        import numpy as np

        return np.array(obj["__ndarray__"], dtype=obj["dtype"])
    return {k: decode(v, tensors) for k, v in obj.items()}


# --- what is saved ---------------------------------------------------------------------------------------------------
def optimizer_parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """Per parameter group, the model names of the optimizer's parameters (to check a resume uses the same ones)."""
    names = {id(p): n for n, p in model.named_parameters()}
    groups = []
    for i, group in enumerate(optimizer.param_groups):
        missing = [tuple(p.shape) for p in group["params"] if id(p) not in names]
        if missing:
            raise ValueError(
                f"optimizer param group {i} holds {len(missing)} tensor(s) (shapes {missing[:3]}) that are not "
                "parameters of this model; build the optimizer from model.parameters()"
            )
        groups.append([names[id(p)] for p in group["params"]])
    return groups


def rng_states(tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """This process's Python, NumPy, torch CPU and CUDA generator states."""
    states: dict[str, Any] = {"python": encode(random.getstate(), "rng.python", tensors)}
    try:
        import numpy as np

        states["numpy"] = encode(np.random.get_state(), "rng.numpy", tensors)
    except ImportError:
        pass
    states["torch"] = encode(torch.get_rng_state(), "rng.torch", tensors)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = encode(torch.cuda.get_rng_state_all(), "rng.cuda", tensors)
    return states


def set_rng_states(states: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    random.setstate(decode(states["python"], tensors))
    if "numpy" in states:
        import numpy as np

        np.random.set_state(decode(states["numpy"], tensors))
    torch.set_rng_state(decode(states["torch"], tensors))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(decode(states["cuda"], tensors))


def checkpoint_file(path: str | os.PathLike) -> Path:
    """``path`` itself if it names a ``.safetensors`` file, else ``path/training_checkpoint.safetensors``."""
    path = Path(path)
    return path if path.suffix == ".safetensors" else path / CHECKPOINT_NAME


# --- saving and resuming ---------------------------------------------------------------------------------------------
def save_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    step: int = 0,
    extra: dict[str, Any] | None = None,
    rng: bool = True,
) -> Path:
    """Write adapters + optimizer + scheduler + ``step`` (+ RNG states, + JSON ``extra``) to one file, atomically.

    ``path``: a directory (the file is ``training_checkpoint.safetensors`` inside) or a ``….safetensors`` file.
    Returns the file's path. O(size of the adapters and optimizer state).
    """
    check_model_and_path("save_checkpoint", model, path)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an integer ≥ 0 (the number of optimizer steps done), got {step!r}")
    model = strip_wrappers(model, sharded=False)
    file = checkpoint_file(path)
    if file.exists() and not file.is_file():
        raise ValueError(f"save_checkpoint writes the file {str(file)!r}, but a directory is there")
    tensors: dict[str, torch.Tensor] = {}
    check_finite(adapter_state(model), "save_checkpoint refuses to write a model with")
    check_saved_if_trained(model, "save_checkpoint")
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "boftlab_version": __version__,
        "step": step,
        "adapter": adapter_config(model),  # raises if the model has no adapters
        "model": encode(dict(adapter_state(model)), "model", tensors),
        "optimizer": None,
        "scheduler": None,
        "rng": rng_states(tensors) if rng else None,
        "extra": encode(dict(extra or {}), "extra", tensors),
    }
    if optimizer is not None:
        meta["optimizer"] = {
            "class": type(optimizer).__name__,
            "parameter_names": optimizer_parameter_names(model, optimizer),
            "state": encode(optimizer.state_dict(), "optimizer", tensors),
        }
    if scheduler is not None:
        meta["scheduler"] = {"class": type(scheduler).__name__, "state": encode(scheduler.state_dict(), "scheduler", tensors)}
    text = json.dumps(meta)
    atomic_write(file, safetensors_writer(tensors, {METADATA_KEY: text}))
    return file


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a checkpoint file, validated for format and checksum, its model tensors finite; never
    unpickles."""
    file = checkpoint_file(path)
    if not file.is_file():
        raise ValueError(f"no training checkpoint at {str(path)!r}: expected {str(file)!r}")
    meta, tensors = read_safetensors(file, METADATA_KEY, "training checkpoint", CHECKSUMMED_SINCE)
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if isinstance(version, bool) or version not in range(1, FORMAT_VERSION + 1):
        raise ValueError(
            f"{str(file)!r} has checkpoint format version {version!r}; this boftlab ({__version__}) reads versions "
            f"1..{FORMAT_VERSION}"
        )
    check_layout(file, meta.get("adapter"), "the adapter config in the training checkpoint")
    check_finite({k: v for k, v in tensors.items() if k.startswith("model.")}, f"the checkpoint {str(file)!r} holds")
    return {**meta, "adapter": upgrade_config(meta["adapter"])}, tensors


def _same_adapters(saved: dict[str, Any], current: dict[str, Any]) -> bool:
    """The same configs (runtime options aside, ``saving.structure``), targets and kept-trainable modules."""
    key = common_shape_key(saved, current)
    return json.dumps(structure(saved, key), sort_keys=True) == json.dumps(structure(current, key), sort_keys=True)


def load_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    rng: bool = True,
) -> Resumed:
    """Restore what ``save_checkpoint`` wrote into an adapted ``model`` and a fresh ``optimizer``/``scheduler``.

    Everything is checked first (same adapters and targets, same tensor shapes, same optimizer class over the same
    parameters, scheduler given iff saved): on any mismatch a ``ValueError`` says what differs and nothing changes.
    """
    check_model_and_path("load_checkpoint", model, path)
    meta, tensors = read_checkpoint(path)
    model = strip_wrappers(model, sharded=False)
    if not adapter_layers(model):
        raise ValueError(
            "load_checkpoint resumes into an adapted model: call boftlab.adapt(model, config, targets) with the "
            "checkpoint's config first (it is stored in the checkpoint under 'adapter')"
        )
    if not _same_adapters(meta["adapter"], adapter_config(model)):
        saved = [(g["config"]["family"], sorted(g["targets"])) for g in meta["adapter"]["groups"]]
        raise ValueError(
            f"the checkpoint's adapters {saved} (configs {[g['config'] for g in meta['adapter']['groups']]}) differ "
            "from this model's; adapt the model exactly as in the checkpointed run"
        )
    check_unmerged(model, "load_checkpoint", "copying the checkpoint's adapter values in would leave those weights "
                   "holding the old ones", "resume")
    saved_model = decode(meta["model"], tensors)
    live = adapter_state(model)
    missing, unexpected = sorted(set(live) - set(saved_model)), sorted(set(saved_model) - set(live))
    if missing or unexpected:
        raise ValueError(f"the checkpoint does not fit this model: missing tensors {missing[:10]}, unexpected {unexpected[:10]}")
    wrong = [
        (k, f"{list(v.shape)} {v.dtype}", f"{list(saved_model[k].shape)} {saved_model[k].dtype}")
        for k, v in live.items() if (saved_model[k].shape, saved_model[k].dtype) != (v.shape, v.dtype)
    ]
    if wrong:
        raise ValueError(
            f"tensor shape or dtype mismatch (name, model, checkpoint): {wrong[:5]}; build and cast the model as in "
            "the checkpointed run (a resume copies every value exactly, never rounding it)"
        )
    optimizer_state = _check_optional("optimizer", optimizer, meta["optimizer"])
    if optimizer_state is not None:
        names = optimizer_parameter_names(model, optimizer)
        if optimizer_state["class"] != type(optimizer).__name__ or optimizer_state["parameter_names"] != names:
            raise ValueError(
                f"the checkpoint's optimizer is {optimizer_state['class']} over parameters "
                f"{optimizer_state['parameter_names']}; this one is {type(optimizer).__name__} over {names}. "
                "Build the same optimizer over the same parameters in the same order."
            )
    scheduler_state = _check_optional("scheduler", scheduler, meta["scheduler"])
    if scheduler_state is not None and scheduler_state["class"] != type(scheduler).__name__:
        raise ValueError(
            f"the checkpoint's scheduler is a {scheduler_state['class']}, this one a {type(scheduler).__name__}"
        )
    if rng and meta["rng"] is None:
        raise ValueError("the checkpoint holds no random states (saved with rng=False); resume with rng=False")

    # every check passed: now change things
    with torch.no_grad():
        for key, target in live.items():
            target.copy_(saved_model[key])
    if optimizer_state is not None:
        optimizer.load_state_dict(decode(optimizer_state["state"], tensors))
    if scheduler_state is not None:
        scheduler.load_state_dict(decode(scheduler_state["state"], tensors))
    if rng:
        set_rng_states(meta["rng"], tensors)
    return Resumed(meta["step"], decode(meta["extra"], tensors))


def _check_optional(what: str, given: Any, saved: dict[str, Any] | None) -> dict[str, Any] | None:
    if given is not None and saved is None:
        raise ValueError(f"the checkpoint holds no {what} state, but a {what} was given; pass {what}=None")
    if given is None and saved is not None:
        raise ValueError(
            f"the checkpoint holds a {saved['class']} {what} state; pass the {what} to restore it into "
            "(resuming without it would silently change the run)"
        )
    return saved
