"""Saving and loading adapters: safetensors only (nothing is ever unpickled), atomic writes, strict checks.

An adapter directory holds

    adapter_model.safetensors   the adapters' tensors (and those of modules kept trainable, e.g. a head), with the
                                adapter config embedded in the file's metadata under "boftlab" — one file, written
                                atomically, so weights and config can never disagree;
    adapter_config.json         the same config, pretty-printed for people and tools.

The config records, per group of layers sharing one config: the family and hyper-parameters, the target module
names, their base-layer types and weight shapes; plus the boftlab version and a format version.
Loading validates everything against the model before changing it: on any error the model is left untouched.

Format versions: 1, then 2, where the tensor core's constant multiplier is ``alpha`` (was ``scale``, SURM's name for
the same thing) and its factorised forward is ``path="input"`` (was ``"factorised"``, the contract's one vocabulary).
A version-1 file is read with those two names translated (``upgrade_config``); any other unknown option is refused.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from . import __version__
from .contract import AdapterConfig, AdapterLayer
from .model import TRAINABLE_ATTR, adapter_layers, build_layers, insert_layers, strip_wrappers

FORMAT_VERSION = 2
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
METADATA_KEY = "boftlab"


# --- writing ---------------------------------------------------------------------------------------------------------
def atomic_write(path: Path, write: Any) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it over ``path``.

    The rename is atomic, so an interrupted save (crash, exception, full disk) leaves the old file intact.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def adapter_config(model: nn.Module) -> dict[str, Any]:
    """The JSON-able description of every adapter in ``model`` (what ``save_adapter`` writes)."""
    model = strip_wrappers(model)
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("the model has no boftlab adapters to save; call boftlab.adapt(model, config, targets) first")
    groups: dict[str, dict[str, Any]] = {}
    for name, layer in layers.items():
        config = layer.config.to_dict()
        group = groups.setdefault(json.dumps(config, sort_keys=True), {"config": config, "targets": {}})
        group["targets"][name] = {
            "type": type(layer.base_layer).__name__,
            "weight_shape": list(layer.base_layer.weight.shape) if hasattr(layer.base_layer, "weight") else None,
        }
    return {
        "format_version": FORMAT_VERSION,
        "boftlab_version": __version__,
        "groups": list(groups.values()),
        "trainable": list(getattr(model, TRAINABLE_ATTR, [])),
    }


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{module_name.key: tensor}``, sharing storage with ``model``: every adapter's ``adapter_state`` and the state of
    every module kept trainable — what an adapter file (and a training checkpoint's model part) holds."""
    model = strip_wrappers(model)
    trainable = {name: model.get_submodule(name) for name in getattr(model, TRAINABLE_ATTR, [])}
    return _named_state(adapter_layers(model), trainable)


def _named_state(layers: dict[str, AdapterLayer], trainable: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    state = {}
    for name, layer in layers.items():
        state |= {f"{name}.{k}": v for k, v in layer.adapter_state().items()}
    for name, module in trainable.items():
        state |= {f"{name}.{k}": v for k, v in module.state_dict().items()}
    return state


def save_adapter(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model``'s adapters to the directory ``path`` (created if needed). Returns the weights file's path."""
    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"save_adapter writes a directory, but {str(directory)!r} is an existing file")
    config = adapter_config(model)
    text = json.dumps(config, indent=2)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in adapter_state(model).items()}
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={METADATA_KEY: text}))
    atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text + "\n"))
    return directory / WEIGHTS_NAME


# --- reading ---------------------------------------------------------------------------------------------------------
def read_safetensors(file: Path, key: str, what: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(the JSON stored under metadata ``key``, tensors) of a safetensors ``file`` boftlab wrote as ``what``
    ("adapter", "training checkpoint"); ValueError for an unreadable file, other metadata or bad JSON. Never
    unpickles."""
    try:
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{str(file)!r} is not a readable safetensors file (truncated or corrupted?): {err}") from err
    if key not in metadata:
        raise ValueError(f"{str(file)!r} is a safetensors file but not a boftlab {what} (no {key!r} metadata)")
    try:
        return json.loads(metadata[key]), tensors
    except json.JSONDecodeError as err:
        raise ValueError(f"the {what} metadata inside {str(file)!r} is not valid JSON: {err}") from err


def upgrade_config(config: dict[str, Any]) -> dict[str, Any]:
    """An adapter config (``adapter_config``'s dict) of any readable format version, in the current version's names.

    1 -> 2: tensor_core's ``scale`` is ``alpha``, its ``path="factorised"`` is ``path="input"``. O(number of groups).
    """
    if config.get("format_version") != 1:
        return config
    groups = []
    for group in config["groups"]:
        options = dict(group["config"])
        if options.get("family") == "tensor_core":
            if "scale" in options:
                options["alpha"] = options.pop("scale")
            if options.get("path") == "factorised":
                options["path"] = "input"
        groups.append({**group, "config": options})
    return {**config, "format_version": 2, "groups": groups}


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, tensors) of an adapter directory or weights file, validated for format and in the current format's
    names (``upgrade_config``); never unpickles."""
    file = Path(path)
    if file.is_dir():
        file = file / WEIGHTS_NAME
    if not file.is_file():
        raise ValueError(f"no adapter at {str(path)!r}: expected a directory containing {WEIGHTS_NAME}")
    config, tensors = read_safetensors(file, METADATA_KEY, "adapter")
    version = config.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{str(file)!r} has adapter format version {version!r}, but this boftlab ({__version__}) reads versions "
            f"1..{FORMAT_VERSION}; upgrade boftlab to load it"
        )
    return upgrade_config(config), tensors


def _check_targets(model: nn.Module, group: dict[str, Any]) -> None:
    names = dict(model.named_modules())
    missing = [n for n in group["targets"] if n not in names]
    if missing:
        raise ValueError(
            f"the adapter targets module(s) {missing[:5]} that this model does not have "
            f"({len(missing)} missing) — was it saved for another architecture?"
        )
    for name, info in group["targets"].items():
        module = names[name]
        if isinstance(module, AdapterLayer):
            raise ValueError(f"module {name!r} already carries an adapter; load into a freshly built base model")
        if type(module).__name__ != info["type"]:
            raise ValueError(f"module {name!r} is a {type(module).__name__}, but the adapter was saved for a {info['type']}")
        shape = list(module.weight.shape) if hasattr(module, "weight") else None
        if shape != info["weight_shape"]:
            raise ValueError(
                f"shape mismatch at {name!r}: the adapter was saved for a base weight of shape {info['weight_shape']}, "
                f"this model's is {shape} — another architecture or size?"
            )


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Put the adapters saved at ``path`` on ``model`` (a freshly built base model), in place; returns ``model``.

    Every check runs before the model changes: wrong architecture, missing or extra tensors, a corrupted file, an
    unknown family or a newer format raise ``ValueError`` and leave the model as it was.
    """
    config, tensors = read_adapter(path)
    model = strip_wrappers(model)
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:
        raise ValueError(
            f"the model's parameters are on the meta device (e.g. {meta[0]!r}), so the adapter's values would be "
            "dropped; materialise the base model (load its weights) before load_adapter"
        )
    if adapter_layers(model):
        raise ValueError(
            "the model already has boftlab adapters; load_adapter expects the plain base model "
            "(build it again, or boftlab.unwrap(model) to fold the current adapters in first)"
        )
    layers: dict[str, AdapterLayer] = {}
    for group in config["groups"]:
        adapter_config_ = AdapterConfig.from_dict(group["config"])
        _check_targets(model, group)
        layers |= build_layers(model, adapter_config_, list(group["targets"]))
    trainable = list(config.get("trainable", []))
    modules = {}
    for name in trainable:
        try:
            modules[name] = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the adapter keeps module {name!r} trainable, but this model has no such module") from None
    expected = _named_state(layers, modules)
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError(
            f"the adapter file does not fit this model: missing tensors {missing[:10]}"
            f"{' …' if len(missing) > 10 else ''}; unexpected tensors {extra[:10]}{' …' if len(extra) > 10 else ''}"
        )
    wrong = [(k, list(tensors[k].shape), list(v.shape)) for k, v in expected.items() if tensors[k].shape != v.shape]
    if wrong:
        raise ValueError(f"tensor shape mismatch (name, in file, expected): {wrong[:10]}")
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(tensors[key])  # state_dict() tensors share storage with the parameters
    setattr(model, TRAINABLE_ATTR, trainable)
    insert_layers(model, layers)
    return model
