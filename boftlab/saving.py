"""Saving and loading adapters: safetensors only (nothing is ever unpickled), atomic writes, checksums, strict checks.

``save_adapter(model, "dir")`` writes a directory holding

    adapter_model.safetensors   the adapters' tensors (and those of modules kept trainable, e.g. a head), with the
                                adapter config embedded in the file's metadata under "boftlab" and a checksum under
                                "boftlab_sha256";
    adapter_config.json         the same config, pretty-printed for people and tools;

``save_adapter(model, "x/adapter.safetensors")`` writes that one file (the config lives inside it). The config records,
per group of layers sharing one config: the family and hyper-parameters, the target module names, their base-layer
types and weight shapes; plus the boftlab version and a format version.

What a file promises. The checksum is a SHA-256 over the embedded config and every tensor's name, dtype, shape and
bytes (``payload_checksum``): a flipped bit anywhere in the payload or the config makes loading raise, naming the file.
Non-finite tensors (NaN/inf, e.g. after a diverged step) are refused when saving and when loading. Each file is
written to a temporary name and renamed over the old one, so a crash leaves the previous save intact; the two files
of a directory are renamed one right after the other (a path that is a symbolic link is written through: the
link's target gets the new file, the link stays), and if they ever disagree (a save interrupted between the two
renames, or a hand-edited ``adapter_config.json``) loading refuses: the embedded config is the one written with the
tensors and covered by the checksum, the JSON is a copy, and which one the user meant is not knowable.
Loading validates everything against the model before changing it: on any error the model is left untouched.
Loading onto a model that already carries adapters of the same structure swaps their weights in place (hot swap).

Format versions: 1; 2, where the tensor core's constant multiplier is ``alpha`` (was ``scale``, SURM's name for the
same thing) and its factorised forward is ``path="input"`` (was ``"factorised"``, the contract's one vocabulary);
3, where every file carries the checksum. Files of versions 1 and 2 were written before checksums and load without
one (their format version says so); a version-3 file without a checksum is refused. A version-1 file is read with
the two names translated (``upgrade_config``); any other unknown option is refused.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from . import base_layers
from ._version import __version__
from .contract import RUNTIME_OPTIONS, AdapterConfig, AdapterLayer
from .model import (
    TRAINABLE_ATTR, adapter_layers, build_layers, canonical_modules, canonical_name, check_unmerged, find_module,
    insert_layers, shared_tensors, strip_wrappers,
)

FORMAT_VERSION = 3
CHECKSUMMED_SINCE = 3  # the first adapter format version whose files carry CHECKSUM_KEY
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
METADATA_KEY = "boftlab"
CHECKSUM_KEY = "boftlab_sha256"


# --- the file format: checksummed safetensors, written atomically -----------------------------------------------------
def payload_checksum(metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 (hex) over every metadata entry but the checksum itself and every tensor's name, dtype, shape and bytes,
    each in sorted order — independent of how safetensors lays the tensors out. O(total bytes)."""
    digest = hashlib.sha256()
    for key in sorted(k for k in metadata if k != CHECKSUM_KEY):
        digest.update(json.dumps(["metadata", key, metadata[key]]).encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(json.dumps(["tensor", name, str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # the length follows from dtype and shape
    return digest.hexdigest()


def check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """ValueError naming every floating-point tensor of ``tensors`` that holds a NaN or an infinity. O(total size)."""
    bad = []
    for name, tensor in tensors.items():
        if tensor.is_floating_point() or tensor.is_complex():
            finite = torch.isfinite(tensor)
            if not bool(finite.all()):
                nan = int(torch.isnan(tensor).sum())
                bad.append(f"{name!r} ({nan} NaN, {int((~finite).sum()) - nan} inf of {tensor.numel()})")
    if bad:
        raise ValueError(
            f"{what} non-finite values in {len(bad)} tensor(s): {', '.join(bad[:10])}{' …' if len(bad) > 10 else ''}. "
            "A NaN or inf usually comes from a diverged step (learning rate too high, fp16 overflow); go back to an "
            "earlier checkpoint or re-initialise those adapters. Nothing was written or changed."
        )


def safetensors_writer(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Callable[[str], None]:
    """A ``write(path)`` for ``atomic_write``: ``tensors`` (on the CPU, contiguous) as a safetensors file with
    ``metadata`` and its ``payload_checksum`` under ``CHECKSUM_KEY``."""
    signed = {**metadata, CHECKSUM_KEY: payload_checksum(metadata, tensors)}
    return lambda path: save_file(tensors, path, metadata=signed)


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it over ``path``.

    The rename is atomic, so an interrupted save (crash, exception, full disk) leaves the old file intact.
    """
    atomic_write_files({path: write})


def atomic_write_files(writes: dict[Path, Callable[[str], None]]) -> None:
    """``atomic_write`` for several files: every ``write`` runs on its temporary file first, then the renames follow
    one another — an error in any write leaves every old file intact and no temporary file behind. A path that is a
    symbolic link is written through: its target is replaced (the temporary file beside the target), the link kept."""
    temporary: dict[Path, str] = {}
    writes = {Path(os.path.realpath(path)) if Path(path).is_symlink() else Path(path): write
              for path, write in writes.items()}
    try:
        for path, write in writes.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, temporary[path] = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            os.close(fd)
            write(temporary[path])
        for path, tmp in temporary.items():
            os.replace(tmp, path)
    except BaseException:
        for tmp in temporary.values():
            if os.path.exists(tmp):
                os.remove(tmp)
        raise


def read_checked(file: Path, what: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of any safetensors ``file``, its checksum verified where it carries one (every file boftlab
    writes does). ValueError for an unreadable file or a checksum that does not match, naming ``what`` and the file.
    Never unpickles. O(file size)."""
    try:
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{str(file)!r} is not a readable safetensors file (truncated or corrupted?): {err}") from err
    stored = metadata.get(CHECKSUM_KEY)
    if stored is not None and stored != payload_checksum(metadata, tensors):
        raise ValueError(
            f"the {what} file {str(file)!r} is corrupted: its tensors or config no longer match the checksum written "
            "with them (a flipped bit on disk or in transfer, or a file edited by hand). Use another copy of it."
        )
    return metadata, tensors


def read_safetensors(
    file: Path, key: str, what: str, checksummed_since: int
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(the JSON stored under metadata ``key``, tensors) of a safetensors ``file`` boftlab wrote as ``what``
    ("adapter", "training checkpoint"), checked by ``read_checked``. ValueError also for other metadata, bad JSON, or
    no checksum in a file whose JSON ``format_version`` is ≥ ``checksummed_since``."""
    metadata, tensors = read_checked(file, what)
    if key not in metadata:
        raise ValueError(f"{str(file)!r} is a safetensors file but not a boftlab {what} (no {key!r} metadata)")
    try:
        document = json.loads(metadata[key])
    except json.JSONDecodeError as err:
        raise ValueError(f"the {what} metadata inside {str(file)!r} is not valid JSON: {err}") from err
    version = document.get("format_version") if isinstance(document, dict) else None
    if CHECKSUM_KEY not in metadata and isinstance(version, int) and version >= checksummed_since:
        raise ValueError(
            f"the {what} file {str(file)!r} says format version {version}, whose files carry a checksum "
            f"({CHECKSUM_KEY!r} metadata), but it has none: it was damaged or not written by boftlab"
        )
    return document, tensors


def check_model_and_path(action: str, model: Any, path: Any) -> None:
    """ValueError unless ``model`` is an nn.Module and ``path`` a str or os.PathLike: every file function takes
    ``(model, path, …)``, and a call in the other order (the old order of ``save_checkpoint`` and ``load_checkpoint``)
    is named as such rather than failing later on an attribute."""
    if isinstance(model, (str, os.PathLike)) and isinstance(path, nn.Module):
        raise ValueError(
            f"{action} takes (model, path, ...), the order of every boftlab file function, but was given the path "
            f"{str(model)!r} first and the {type(path).__name__} second; call {action}(model, {str(model)!r}, ...)"
        )
    if not isinstance(model, nn.Module):
        raise ValueError(f"{action}(model, path, ...): model must be an nn.Module, not a {type(model).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"{action}(model, path, ...): path must be a str or os.PathLike, got {path!r}")


# --- writing adapters ------------------------------------------------------------------------------------------------
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
        group["targets"][canonical_name(name)] = {
            "type": type(layer.base_layer).__name__,
            "weight_shape": list(layer.base_layer.weight.shape) if hasattr(layer.base_layer, "weight") else None,
            "layer_shape": list(base_layers.weight_shape(layer.base_layer)),  # (out, in) even when stored packed
        }
    return {
        "format_version": FORMAT_VERSION,
        "boftlab_version": __version__,
        "groups": list(groups.values()),
        "trainable": [canonical_name(n) for n in getattr(model, TRAINABLE_ATTR, [])],
    }


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{module_name.key: tensor}``, sharing storage with ``model``: every adapter's ``adapter_state`` and the state of
    every module kept trainable — what an adapter file (and a training checkpoint's model part) holds. Names are
    canonical (``canonical_name``): a submodule compiled with torch.compile saves as it would uncompiled."""
    model = strip_wrappers(model)
    trainable = {name: find_module(model, name) for name in getattr(model, TRAINABLE_ATTR, [])}
    return _named_state(adapter_layers(model), trainable)


def _named_state(layers: dict[str, AdapterLayer], trainable: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    state = {}
    for name, layer in layers.items():
        state |= {canonical_name(f"{name}.{k}"): v for k, v in layer.adapter_state().items()}
    for name, module in trainable.items():
        state |= {canonical_name(f"{name}.{k}"): v for k, v in module.state_dict().items()}
    return state


def check_saved_if_trained(model: nn.Module, action: str) -> None:
    """ValueError naming every parameter that trains (requires_grad) but that ``adapter_state`` does not hold — a
    base weight unfrozen after ``adapt``: a file without it would reload another model. O(number of parameters)."""
    model = strip_wrappers(model)
    held = [f"{name}." for name in getattr(model, TRAINABLE_ATTR, [])]  # canonical names, as files record them
    layers = [canonical_name(name) for name in adapter_layers(model)]
    held += [f"{name}." for name in layers]
    frozen_bases = tuple(f"{name}.base_layer." for name in layers)
    missed = [n for n, p in ((canonical_name(n), p) for n, p in model.named_parameters())
              if p.requires_grad and (n.startswith(frozen_bases) or not n.startswith(tuple(held)))]
    if missed:
        raise ValueError(
            f"{action}: {len(missed)} parameter(s) train (requires_grad) but the file holds only the adapters and the "
            f"modules kept trainable at adapt, so they would be lost on reload: {missed[:8]}. Keep their modules "
            "trainable with adapt(..., trainable=[...]) so that they are saved, or freeze them "
            "(p.requires_grad_(False)); nothing was written."
        )


def save_adapter(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model``'s adapters; returns the weights file's path. O(adapter size).

    ``path``: a directory (created if needed) that receives ``adapter_model.safetensors`` and ``adapter_config.json``,
    or a path ending in ``.safetensors``, written as that one file (its config is embedded). Refused, with nothing
    written: a model without adapters, and any adapter or kept-trainable tensor holding a NaN or an infinity.
    """
    check_model_and_path("save_adapter", model, path)
    path = Path(path)
    if path.suffix == ".safetensors":
        if path.is_dir():
            raise ValueError(
                f"save_adapter writes the file {str(path)!r}, but a directory of that name is in the way; remove it "
                "or choose another name"
            )
        file, copy = path, None
    elif path.exists() and not path.is_dir():
        raise ValueError(
            f"save_adapter writes a directory, but {str(path)!r} is an existing file; give a directory, or a path "
            "ending in .safetensors to write a single file"
        )
    else:
        file, copy = path / WEIGHTS_NAME, path / CONFIG_NAME
    config = adapter_config(model)
    check_saved_if_trained(model, "save_adapter")
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in adapter_state(model).items()}
    check_finite(tensors, "save_adapter refuses to write an adapter with")
    text = json.dumps(config, indent=2)
    writes = {file: safetensors_writer(tensors, {METADATA_KEY: text})}
    if copy is not None:
        writes[copy] = lambda tmp: Path(tmp).write_text(text + "\n")
    atomic_write_files(writes)
    return file


# --- the merged export: a plain model, streamed layer by layer --------------------------------------------------------
MERGED_NAME = "model.safetensors"
#: torch dtype -> its name in a safetensors header
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
    **{getattr(torch, name): code for name, code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"),
                                                     ("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64"))
       if hasattr(torch, name)},
}


def merged_plan(model: nn.Module) -> dict[str, tuple[torch.Tensor, Callable[[], torch.Tensor] | None]]:
    """Plain name -> (the model's tensor, None or a function computing what replaces it): every tensor of the model as
    ``unwrap`` would leave it, in its ``state_dict()`` order, each adapter layer's base tensors under the plain layer's
    names, merged when the function is called (one layer's merge kept at a time; a merged layer's base tensors are
    already the merged ones). The adapters' own tensors, merged flags and ``plain_guard`` are left out.

    ValueError, before anything is computed, for a layer that cannot be folded in exactly: a bitsandbytes base (its
    packed weight cannot hold the merged one), a base weight another module shares (the plain model would tie them
    again, to one value). A family that cannot merge is refused when its layer's turn comes. O(number of tensors)."""
    model = strip_wrappers(model)
    layers = {f"{name}.": layer for name, layer in adapter_layers(model).items()}
    if not layers:
        raise ValueError("save_merged: the model has no boftlab adapters; save a plain model with its own "
                         "save_pretrained, or safetensors.torch.save_model")
    for prefix, layer in layers.items():
        if base_layers.kind(layer.base_layer) == "quantized":  # not after dequantize_bases
            raise ValueError(
                f"save_merged: layer {prefix[:-1]!r} has a quantized (bitsandbytes) base, whose packed weight cannot "
                "hold the merged one. Load the adapter onto the 16-bit base model (load_adapter accepts it) and export "
                "that, or boftlab.dequantize_bases(model, torch.bfloat16) first"
            )
    owned = {f"{prefix}base_layer.{attr}": tensor for prefix, layer in layers.items()
             for attr, tensor in layer.base_layer.named_parameters(recurse=False)}
    ties = shared_tensors(model, owned)
    if ties:
        shared = "; ".join(f"{name!r} is the same tensor as {others}" for name, others in ties.items())
        raise ValueError(
            f"save_merged: {shared}: the merged weight would differ from the one tied to it, and a plain model "
            "loading the file ties them again to one value. Nothing was written; adapt a fresh model with "
            "adapt(..., untie=True) to export it merged."
        )
    current: dict[str, dict[str, torch.Tensor]] = {}  # the merged tensors of the one layer being written

    def merged(prefix: str, attr: str, value: torch.Tensor) -> torch.Tensor:
        if prefix not in current:
            current.clear()  # the previous layer's merged tensors are written: free them first
            try:
                current[prefix] = layers[prefix].base_after(merge=True)
            except (ValueError, NotImplementedError) as err:
                raise ValueError(f"save_merged: layer {prefix[:-1]!r} cannot be folded into its base layer: {err}. "
                                 "Nothing was written; save_adapter saves it as it is.") from err
        return current[prefix].get(attr, value)  # a base tensor the merge leaves as it is (a bias) stays

    plan: dict[str, tuple[torch.Tensor, Callable[[], torch.Tensor] | None]] = {}
    for key, value in model.state_dict().items():
        prefix = next((p for p in layers if key.startswith(p)), None)  # adapter layers never nest: at most one
        if prefix is None:
            plan[canonical_name(key)] = (value, None)
        elif key.startswith(f"{prefix}base_layer."):  # the adapter's own tensors, flag and guard are left out
            attr = key.removeprefix(f"{prefix}base_layer.")
            compute = None if layers[prefix].merged else (lambda p=prefix, a=attr, v=value: merged(p, a, v))
            plan[canonical_name(prefix + attr)] = (value, compute)
    return plan


def _streamed_safetensors(plan: dict[str, tuple[torch.Tensor, Callable[[], torch.Tensor] | None]],
                          metadata: dict[str, str]) -> Callable[[str], None]:
    """A ``write(path)`` for ``atomic_write`` that writes ``plan``'s tensors (``merged_plan``) as one safetensors file:
    the header first (a merge keeps each tensor's dtype and shape, so every entry is known before any is computed),
    then the data in header order, each merged tensor computed when its bytes are written and dropped after. Extra
    memory: one layer's merge (and a device tensor's host copy)."""

    def write(path: str) -> None:
        header: dict[str, Any] = {"__metadata__": metadata}
        offset = 0
        for name, (value, _) in plan.items():
            if value.dtype not in SAFETENSORS_DTYPES:
                raise ValueError(f"save_merged: {name!r} is a {value.dtype} tensor, which safetensors cannot store")
            size = value.numel() * value.element_size()
            header[name] = {"dtype": SAFETENSORS_DTYPES[value.dtype], "shape": list(value.shape),
                            "data_offsets": [offset, offset + size]}
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # safetensors pads its header with spaces to a multiple of 8 bytes
        with open(path, "wb") as f:
            f.write(len(text).to_bytes(8, "little"))
            f.write(text)
            for name, (value, merge) in plan.items():
                tensor = value if merge is None else merge()
                if (tensor.dtype, tensor.shape) != (value.dtype, value.shape):
                    raise ValueError(f"save_merged: the merged {name!r} is {tensor.dtype} {list(tensor.shape)}, not "
                                     f"{value.dtype} {list(value.shape)} as the base tensor it replaces")
                if tensor.numel():
                    f.write(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data)
                del tensor  # not held while the next layer's merge is computed

    return write


def save_merged(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model`` as ``unwrap`` would leave it — every adapter folded into its base weights, under the plain
    model's names — as one safetensors file, streamed layer by layer; returns the file's path. ``model`` is not changed.
    O(model size) time; extra memory one layer's merge (its fp64 intermediates included) and one tensor's host copy.

    ``path``: a directory (created if needed) that receives ``model.safetensors`` and, for a transformers model, its
    ``config.json``, so that the plain class's ``from_pretrained(path)`` loads the fine-tuned model exactly; or a path
    ending in ``.safetensors``, written as that one file (``safetensors.torch.load_model`` reads it into the plain
    model). Written atomically: a refusal or a crash leaves any earlier file as it was. Refused (ValueError, nothing
    written): a model without adapters, a layer that cannot be merged (``merge`` says why), a quantized base, a base
    weight shared with another module. The file holds the tensors and ``{"format": "pt"}`` (what transformers checks),
    plus the adapter config under ``"boftlab_merged_from"``; it carries no checksum (its readers are plain loaders).
    """
    check_model_and_path("save_merged", model, path)
    path = Path(path)
    if path.suffix == ".safetensors":
        file, config_file = path, None
    elif path.exists() and not path.is_dir():
        raise ValueError(f"save_merged writes a directory, but {str(path)!r} is an existing file; give a directory, "
                         "or a path ending in .safetensors to write a single file")
    else:
        file, config_file = path / MERGED_NAME, path / "config.json"
    if file.is_dir():
        raise ValueError(f"save_merged writes the file {str(file)!r}, but a directory of that name is in the way")
    plan = merged_plan(model)
    metadata = {"format": "pt", "boftlab_merged_from": json.dumps(adapter_config(model))}
    writes = {file: _streamed_safetensors(plan, metadata)}
    config = getattr(strip_wrappers(model), "config", None)
    if config_file is not None and hasattr(config, "to_json_string"):  # a transformers PretrainedConfig
        config = copy.deepcopy(config)
        config.architectures = [type(strip_wrappers(model)).__name__]  # as PreTrainedModel.save_pretrained records
        text = config.to_json_string(use_diff=True)
        writes[config_file] = lambda tmp: Path(tmp).write_text(text)
    atomic_write_files(writes)
    return file


# --- reading adapters ------------------------------------------------------------------------------------------------
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
    """(config, tensors) of an adapter directory or weights file, its checksum verified, its tensors finite, its
    format readable, and in the current format's names (``upgrade_config``); never unpickles.

    Beside an ``adapter_model.safetensors`` an ``adapter_config.json`` must say the same as the config embedded in the
    weights (module docstring): when they differ the adapter is refused, naming the first differences.
    """
    file = Path(path)
    if file.is_dir():
        file = file / WEIGHTS_NAME
    if not file.is_file():
        raise ValueError(
            f"no adapter at {str(path)!r}: expected a directory containing {WEIGHTS_NAME}, or a .safetensors file"
        )
    _check_not_peft(file)
    config, tensors = read_safetensors(file, METADATA_KEY, "adapter", CHECKSUMMED_SINCE)
    check_layout(file, config)
    if file.name == WEIGHTS_NAME and (file.parent / CONFIG_NAME).is_file():
        _check_config_copy(file, config)
    check_finite(tensors, f"the adapter file {str(file)!r} holds")
    config = upgrade_config(config)
    for i, group in enumerate(config["groups"]):
        try:
            AdapterConfig.from_dict(group["config"])
        except (TypeError, ValueError) as err:
            raise ValueError(f"the adapter file {str(file)!r} holds an invalid config in groups[{i}]: {err}") from err
    return config, tensors


def _check_not_peft(file: Path) -> None:
    """ValueError pointing to ``from_peft`` if ``file`` is the weights of a PEFT adapter directory (its
    ``adapter_config.json`` names a ``peft_type``; boftlab's never does)."""
    copy_file = file.parent / CONFIG_NAME
    if file.name != WEIGHTS_NAME or not copy_file.is_file():
        return
    try:
        copy = json.loads(copy_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return  # _check_config_copy names that problem
    if isinstance(copy, dict) and "peft_type" in copy:
        raise ValueError(
            f"{str(file.parent)!r} holds a Hugging Face PEFT adapter (peft_type={copy['peft_type']!r}), not a boftlab "
            "one: import it with boftlab.from_peft(model, path) (BOFT and OFT adapters)"
        )


def check_layout(file: Path, config: Any, what: str = "the adapter file") -> None:
    """ValueError naming ``file`` and the first thing wrong, unless its embedded config is laid out as
    ``adapter_config`` writes it (every format version has this layout) with a format version 1..FORMAT_VERSION:
    ``{"format_version": int, "groups": [{"config": {"family": str, ...}, "targets": {name: {"type": str,
    "weight_shape": [int, ...] | None, "layer_shape": [int, ...] | None (optional)}}}, ...], "trainable": [str, ...]}``
    with every target in one group only. Files that break it were not written by boftlab, or were edited by hand
    (format ≤ 2 files carry no checksum)."""
    where = f"{what} {str(file)!r}"
    if not isinstance(config, dict):
        raise ValueError(f"{where} is malformed: its embedded config is a {type(config).__name__}, not a JSON object")
    version = config.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        newer = isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION
        raise ValueError(
            f"{where} has adapter format version {version!r}, but this boftlab ({__version__}) reads versions "
            f"1..{FORMAT_VERSION}; "
            + ("upgrade boftlab to load it" if newer else "no boftlab writes that version: the file is damaged or "
               "was not written by boftlab")
        )

    def shape(value: Any) -> bool:
        return value is None or (isinstance(value, list) and all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in value))

    problems = []
    groups = config.get("groups")
    if not isinstance(groups, list) or not groups:
        problems.append(f"'groups' must be a non-empty list of adapter groups, got {groups!r}")
        groups = []
    seen: dict[str, int] = {}
    for i, group in enumerate(groups):
        if not isinstance(group, dict) or not isinstance(group.get("config"), dict) or not isinstance(
                group.get("config", {}).get("family"), str):
            problems.append(f"groups[{i}] must be a dict with a 'config' dict naming its 'family', got {group!r}")
            continue
        targets = group.get("targets")
        if not isinstance(targets, dict) or not targets:
            problems.append(f"groups[{i}]['targets'] must be a non-empty dict of module name -> layer info, got "
                            f"{targets!r}")
            continue
        for name, info in targets.items():
            if not (isinstance(info, dict) and isinstance(info.get("type"), str) and "weight_shape" in info
                    and shape(info["weight_shape"]) and shape(info.get("layer_shape"))):
                problems.append(
                    f"groups[{i}]['targets'][{name!r}] must be {{'type': str, 'weight_shape': [int, ...] or None, "
                    f"optionally 'layer_shape': [int, ...] or None}}, got {info!r}"
                )
            elif name in seen:
                problems.append(f"module {name!r} is a target of groups[{seen[name]}] and groups[{i}] (one adapter "
                                "per layer)")
            seen.setdefault(name, i)
    trainable = config.get("trainable", [])
    if not isinstance(trainable, list) or not all(isinstance(n, str) for n in trainable):
        problems.append(f"'trainable' must be a list of module names, got {trainable!r}")
    if problems:
        raise ValueError(f"{where} is malformed: {'; '.join(problems[:3])}{' …' if len(problems) > 3 else ''}")


def _check_config_copy(file: Path, config: dict[str, Any]) -> None:
    """ValueError unless the ``adapter_config.json`` beside ``file`` holds ``config``, the weights' embedded one."""
    copy_file = file.parent / CONFIG_NAME
    try:
        copy = json.loads(copy_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{str(copy_file)!r} is not valid JSON ({err}); delete it to load {str(file)!r}") from err
    if copy != config:
        differences = _differences(config, copy, "")
        raise ValueError(
            f"{str(copy_file)!r} disagrees with the config embedded in {str(file)!r}: "
            f"{'; '.join(differences[:5])}{' …' if len(differences) > 5 else ''}. boftlab loads the embedded config "
            "(written with the tensors, covered by their checksum), and will not guess which one you meant: to load "
            "the adapter as saved, delete or restore adapter_config.json; to change the adapter, load it, change "
            "the model, and save again"
        )


def _differences(embedded: Any, copy: Any, where: str) -> list[str]:
    """Where two JSON documents differ, as ``"groups[0].config.alpha: 0.5 in the weights, 0.7 in the JSON"``."""
    if isinstance(embedded, dict) and isinstance(copy, dict):
        return [d for k in sorted(set(embedded) | set(copy), key=str)
                for d in _differences(embedded.get(k, "(absent)"), copy.get(k, "(absent)"), f"{where}.{k}".lstrip("."))]
    if isinstance(embedded, list) and isinstance(copy, list) and len(embedded) == len(copy):
        return [d for i, (u, v) in enumerate(zip(embedded, copy)) for d in _differences(u, v, f"{where}[{i}]")]
    if embedded == copy:
        return []
    return [f"{where or 'the whole config'}: {embedded!r} in the weights, {copy!r} in the JSON"]


def _check_targets(model: nn.Module, group: dict[str, Any]) -> None:
    names = {canonical: model.get_submodule(name) for canonical, name in canonical_modules(model).items()}
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
            if _packing_differs(name, module, info):
                continue
            raise ValueError(f"module {name!r} is a {type(module).__name__}, but the adapter was saved for a {info['type']}")
        saved, here = _saved_shape(info), _layer_shape(module, info)
        if here != saved:
            raise ValueError(
                f"shape mismatch at {name!r}: the adapter was saved for a base weight of shape {saved}, "
                f"this model's is {here} — another architecture or size?"
            )


def _saved_shape(info: dict[str, Any]) -> list[int] | None:
    """The saved target's weight shape in PyTorch's layout (``base_layers.weight_shape``: (out, in) even when stored
    packed); files written before boftlab recorded it give the stored shape."""
    return info.get("layer_shape") or info["weight_shape"]


def _layer_shape(module: nn.Module, info: dict[str, Any]) -> list[int] | None:
    """``module``'s weight shape as ``_saved_shape`` reads the file's: by ``base_layers.weight_shape``, never from a
    packed tensor (a 4-bit layer's packed shape is the same for 64 -> 32 and 32 -> 64)."""
    if "layer_shape" not in info:
        return list(module.weight.shape) if hasattr(module, "weight") else None
    try:
        return list(base_layers.weight_shape(module))
    except (AttributeError, ValueError):
        return None


def _packing_differs(name: str, module: nn.Module, info: dict[str, Any]) -> bool:
    """Whether ``module`` is the layer the adapter was saved for, stored another way: an nn.Linear where it was a
    bitsandbytes quantized Linear of the same (out, in) sizes, or the other way round — the QLoRA route (train on a
    4-bit base, load onto the 16-bit model to merge and serve). The adapter's tensors mean the same map on both; what
    differs is the base weight itself (its quantization error), which is the base the user chose. ValueError when the
    types are such a pair but the sizes are not."""
    linear_names = {"Linear", "DequantizedLinear", *base_layers.QUANTIZED_LINEARS}
    if not (info["type"] in linear_names and base_layers.kind(module) in ("linear", "quantized")
            and type(module).__name__ in linear_names and {info["type"], type(module).__name__} != {"Linear"}):
        return False
    saved = info.get("layer_shape") or (info["weight_shape"] if info["type"] == "Linear" else None)
    here = list(base_layers.weight_shape(module))
    if saved is None:
        raise ValueError(
            f"module {name!r} is a {type(module).__name__}, not the {info['type']} the adapter was saved for, and this "
            "file (written before boftlab recorded layer sizes) does not say that layer's (out, in) sizes, so it "
            f"cannot be checked against this one's {here}. Load it onto a {info['type']} base, then save it again"
        )
    if saved != here:
        raise ValueError(
            f"shape mismatch at {name!r}: the adapter was saved for a {info['type']} of (out, in) = {saved}, this "
            f"{type(module).__name__} is {here} — another architecture or size?"
        )
    return True


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Put the adapters saved at ``path`` on ``model``, in place; returns ``model``.

    On a plain base model the adapters are built and inserted. On a model that already carries adapters of the same
    structure — the same families, configs, targets (type and shape) and modules kept trainable — the file's tensors
    are copied into them: a hot swap, with no rebuild, so the parameter objects, and any optimizer built on them,
    stay the same (so does that optimizer's state, e.g. Adam's moments: reset it to train the new adapter afresh).

    Every check runs before the model changes: wrong architecture, adapters of another structure, merged adapters,
    missing or extra tensors, a corrupted file (checksum), non-finite values, an ``adapter_config.json`` that
    disagrees with the weights, an unknown family or a newer format raise ``ValueError`` and leave the model as it
    was. Adapter tensors come back exactly: built afresh, in the dtype they were saved in; swapped, in the model's
    dtype, and a value that dtype cannot hold exactly is refused — as is such a value for a kept-trainable module.
    """
    check_model_and_path("load_adapter", model, path)
    config, tensors = read_adapter(path)
    model = strip_wrappers(model)
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:
        raise ValueError(
            f"the model's parameters are on the meta device (e.g. {meta[0]!r}), so the adapter's values would be "
            "dropped; materialise the base model (load its weights) before load_adapter"
        )
    if adapter_layers(model):
        return _swap(model, config, tensors, str(path))
    layers: dict[str, AdapterLayer] = {}
    for group in config["groups"]:
        adapter_config_ = AdapterConfig.from_dict(group["config"])
        _check_targets(model, group)
        here = canonical_modules(model)  # the file's canonical names -> this model's (a compiled submodule's differ)
        layers |= build_layers(model, adapter_config_, [here[name] for name in group["targets"]])
    trainable = list(config.get("trainable", []))
    modules = {}
    for name in trainable:
        try:
            modules[name] = find_module(model, name)
        except AttributeError:
            raise ValueError(f"the adapter keeps module {name!r} trainable, but this model has no such module") from None
    expected, kept = _named_state(layers, modules), _named_state({}, modules)
    _check_tensors(expected, tensors, kept, str(path))
    with torch.no_grad():
        for name, layer in layers.items():  # boftlab built these: they take the dtype they were saved in
            for key, target in layer.adapter_state().items():
                _restore(layer, key, target, tensors[canonical_name(f"{name}.{key}")])
        for key, target in kept.items():
            target.copy_(tensors[key])  # state_dict() tensors share storage with the parameters
    setattr(model, TRAINABLE_ATTR, trainable)
    insert_layers(model, layers)
    return model


def _check_tensors(expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor],
                   kept: dict[str, torch.Tensor], path: str) -> None:
    """ValueError unless the file's ``tensors`` have exactly the names and shapes of the model's ``expected`` ones,
    and every value of those in ``kept`` (tensors that keep the model's dtype) fits that dtype exactly."""
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError(
            f"the adapter file {path!r} does not fit this model: missing tensors {missing[:10]}"
            f"{' …' if len(missing) > 10 else ''}; unexpected tensors {extra[:10]}{' …' if len(extra) > 10 else ''}"
        )
    wrong = [(k, list(tensors[k].shape), list(v.shape)) for k, v in expected.items() if tensors[k].shape != v.shape]
    if wrong:
        raise ValueError(f"the adapter file {path!r} does not fit this model: tensor shape mismatch (name, in file, "
                         f"expected): {wrong[:10]}")
    def kind(t: torch.Tensor) -> str:
        return "complex" if t.is_complex() else "floating" if t.is_floating_point() else str(t.dtype)

    wrong = [(k, str(tensors[k].dtype), str(v.dtype)) for k, v in expected.items() if kind(tensors[k]) != kind(v)]
    if wrong:
        raise ValueError(
            f"the adapter file {path!r} holds tensors of another kind of dtype than the model's (name, in file, "
            f"expected): {wrong[:10]}: a floating-point tensor loads from any floating-point dtype, an integer or "
            "bool one only from its own; the file is damaged or was not written by boftlab"
        )
    rounded = [  # the model's own modules keep their dtype, so a value they cannot hold exactly is refused
        f"{k!r} ({tensors[k].dtype} in the file, {v.dtype} in the model)"
        for k, v in kept.items()
        if not torch.equal(tensors[k].to(v.dtype).to(tensors[k].dtype), tensors[k])
    ]
    if rounded:
        raise ValueError(
            f"loading would round {', '.join(rounded[:5])}: the adapter {path!r} was saved from a model of another "
            "dtype. Cast the model to the file's dtype (e.g. model.to(torch.float64)) before load_adapter"
        )


def common_shape_key(*configs: dict[str, Any]) -> str:
    """"layer_shape" if every adapter_config records it, else "weight_shape" (a file written before boftlab did)."""
    recorded = all("layer_shape" in info for config in configs for group in config["groups"]
                   for info in group["targets"].values())
    return "layer_shape" if recorded else "weight_shape"


def structure(config: dict[str, Any], shape_key: str = "layer_shape") -> dict[str, Any]:
    """Module name -> (config, base type, base weight shape) of an ``adapter_config``, plus the kept-trainable list:
    what must agree for a file's tensors to mean the same in another model. The configs leave out
    ``RUNTIME_OPTIONS`` (how a layer computes, not what), so a file saved with path="input" swaps into layers running
    path="auto", which keep their own. ``shape_key``: "layer_shape" (``base_layers.weight_shape``, never a packed
    shape), or "weight_shape" (as stored) to compare with a file written before boftlab recorded layer shapes."""
    targets = {
        name: ({k: v for k, v in group["config"].items() if k not in RUNTIME_OPTIONS}, info["type"],
               info.get(shape_key))
        for group in config["groups"] for name, info in group["targets"].items()
    }
    return {"targets": targets, "trainable": sorted(config.get("trainable", []))}


def _swap(model: nn.Module, config: dict[str, Any], tensors: dict[str, torch.Tensor], path: str) -> nn.Module:
    """Hot swap: the file's tensors into adapters of the same structure (``load_adapter``). O(adapter size)."""
    here_config = adapter_config(model)
    shape_key = common_shape_key(here_config, config)
    here, there = structure(here_config, shape_key), structure(config, shape_key)
    mine, theirs = here["targets"], there["targets"]
    differences = [
        f"adapted here only: {sorted(set(mine) - set(theirs))[:5]}" if set(mine) - set(theirs) else "",
        f"in the file only: {sorted(set(theirs) - set(mine))[:5]}" if set(theirs) - set(mine) else "",
        *(f"{name!r}: here {mine[name]}, in the file {theirs[name]}"
          for name in sorted(set(mine) & set(theirs)) if mine[name] != theirs[name]),
        f"kept trainable: here {here['trainable']}, in the file {there['trainable']}"
        if here["trainable"] != there["trainable"] else "",
    ]
    differences = [d for d in differences if d]
    if differences:
        raise ValueError(
            "load_adapter: this model already carries adapters of another structure than the file's, so the file "
            f"cannot be swapped in place ({'; '.join(differences[:5])}). Load it into a freshly built base model, or "
            "boftlab.unwrap(model) first to fold the current adapters in."
        )
    check_unmerged(model, "load_adapter", "swapping would need unmerge, swap, merge, each rounding the base weights",
                   "load_adapter, then boftlab.merge(model) if you mean it")
    expected = adapter_state(model)
    _check_tensors(expected, tensors, expected, path)  # a swap copies into the model's tensors: their dtype holds it
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(tensors[key])  # shares storage with the parameter: the same objects, new values
    return model


def _restore(layer: nn.Module, key: str, target: torch.Tensor, value: torch.Tensor) -> None:
    """Give ``layer``'s tensor ``key`` (``target``, from its state) the saved ``value``, in ``value``'s dtype."""
    if value.dtype == target.dtype:
        target.copy_(value)  # shares storage with the parameter or buffer
        return
    owner_name, _, attr = key.rpartition(".")
    owner = layer.get_submodule(owner_name)
    current = getattr(owner, attr)
    if isinstance(current, nn.Parameter):
        current.data = value.to(current.device)  # the same Parameter object, now in the saved dtype
    else:
        setattr(owner, attr, value.to(current.device))
