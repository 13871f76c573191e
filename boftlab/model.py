"""Model-level API: put adapters on any ``nn.Module`` (transformers, timm, diffusers, your own), report, merge.

Written once against the adapter contract (``boftlab.contract``): nothing here knows which family it handles.

    adapt(model, config, targets=..., trainable=[...])   wrap the targeted layers, freeze everything else
    summary(model)                                        trainable vs total parameters, per family / layer type
    merge(model) / unmerge(model)                          fold adapters into the base weights and back
    unwrap(model)                                          merge, then put the plain base layers back
    with disabled(model): ...                              every adapter bypassed: the base model's outputs
    dequantize_bases(model, dtype)                         quantized base layers -> plain nn.Linear (merge is exact)

A merge writes into the base layer's tensors, so a tensor that another module shares (tied weights: ``lm_head``
and ``embed_tokens`` in most small LMs) is never adapted unless ``adapt(..., untie=True)`` gives the adapted module
its own copy; ``merge`` and ``unwrap`` check again and refuse to write into a shared tensor. Every merge, unmerge
and unwrap computes and checks all new tensors before it writes any: it happens whole or not at all.
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence, Union

import torch
from torch import nn

from . import base_layers
from .base_layers import type_name
from .contract import AdapterConfig, AdapterLayer

Target = Union[str, re.Pattern, type]
#: attribute on the root module recording the names of modules kept trainable by ``adapt(trainable=...)``
TRAINABLE_ATTR = "_boftlab_trainable"


# --- finding modules ---------------------------------------------------------------------------------------------------
def strip_wrappers(model: nn.Module, sharded: bool = True) -> nn.Module:
    """The model inside DistributedDataParallel / FSDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers,
    so that names never carry a wrapper's prefix. ``sharded=False``: an FSDP wrapper is a ValueError (its parameters
    and optimizer state are sharded, so this process does not hold the whole model)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    while True:
        if isinstance(model, FullyShardedDataParallel) and not sharded:
            raise ValueError(
                "save_checkpoint/load_checkpoint handle full (unsharded) models; an FSDP model's parameters and "
                "optimizer state are sharded — checkpoint it with accelerate's save_state or "
                "torch.distributed.checkpoint (see docs/multi_gpu.md)"
            )
        if isinstance(model, (nn.parallel.DistributedDataParallel, FullyShardedDataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """Every adapter in ``model`` by its module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterLayer)}


def check_unmerged(model: nn.Module, action: str, why: str, then: str) -> None:
    """ValueError when any adapter of ``model`` is merged into its base weight: ``action`` (e.g. "load_adapter") would
    need the unmerged state, ``why`` says what would go wrong, ``then`` what to call after ``boftlab.unmerge``."""
    merged = [name for name, layer in adapter_layers(model).items() if layer.merged]
    if merged:
        raise ValueError(
            f"{action}: {len(merged)} adapter(s) of this model are merged into their base weights (e.g. "
            f"{merged[0]!r}); {why}. Call boftlab.unmerge(model) first, then {then}"
        )


def _plain_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Named modules of the base model, not counting adapter internals (``….base_layer`` and the adapter's own)."""
    found = {}
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue
        if isinstance(module, AdapterLayer):
            inside.append(name)
        found[name] = module
    return found


def _describe(targets: object) -> str:
    return repr(targets) if not isinstance(targets, type) else targets.__name__


def match_targets(model: nn.Module, targets: Target | Sequence[Target]) -> list[str]:
    """Names of the modules ``targets`` selects.

    - a ``str`` or compiled regex: module names that the pattern ``fullmatch``-es;
    - a list/tuple whose items are names (exact name or dotted suffix: ``"query"`` matches ``"…attention.query"``),
      regexes (``re.compile``), or module types (``nn.Linear``): the union of their matches.
    """
    if isinstance(targets, (str, re.Pattern)):
        pattern = re.compile(targets) if isinstance(targets, str) else targets
        items: list[Target] = [pattern]
    elif isinstance(targets, type):
        items = [targets]
    elif isinstance(targets, Iterable):
        items = list(targets)
    else:
        raise ValueError(
            f"targets={targets!r} is not understood; give a regex string, or a list of module names / name suffixes "
            "/ compiled regexes / module types (e.g. ['query', 'value'] or [nn.Conv2d])"
        )
    if not items:
        raise ValueError("targets is empty; give at least one module name, suffix, regex or module type")
    names = []
    for name, module in _plain_modules(model).items():
        if not name:
            continue
        for item in items:
            if isinstance(item, type):
                hit = isinstance(module, item)
            elif isinstance(item, re.Pattern):
                hit = item.fullmatch(name) is not None
            elif isinstance(item, str):
                hit = name == item or name.endswith("." + item)
            else:
                raise ValueError(
                    f"targets item {item!r} is not a module name, suffix, compiled regex or module type"
                )
            if hit:
                names.append(name)
                break
    return names


def _module_list_hint(model: nn.Module, limit: int = 40) -> str:
    names = [n for n in _plain_modules(model) if n]
    shown = ", ".join(f"{n} ({type(model.get_submodule(n)).__name__})" for n in names[:limit])
    more = f", … ({len(names) - limit} more)" if len(names) > limit else ""
    return shown + more


# --- adapting ------------------------------------------------------------------------------------------------------------
def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


# --- shared tensors ----------------------------------------------------------------------------------------------------
def _tensor_holders(model: nn.Module) -> dict[tuple, list[str]]:
    """Storage -> the names ("module.attr") of every parameter and buffer of ``model`` that lives in it; a module
    reachable under several names is listed under each. O(number of tensors)."""
    holders: dict[tuple, list[str]] = defaultdict(list)
    for name, module in model.named_modules(remove_duplicate=False):
        for attr, tensor in (*module._parameters.items(), *module._buffers.items()):
            if tensor is not None and not tensor.is_meta and tensor.numel():
                holders[_storage(tensor)].append(f"{name}.{attr}" if name else attr)
    return holders


def _storage(tensor: torch.Tensor) -> tuple:
    return tensor.device, tensor.untyped_storage().data_ptr()


def shared_tensors(model: nn.Module, owned: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """For each ``"module.attr": tensor`` in ``owned``, the other names in ``model`` whose tensor shares its storage
    (tied weights, or a module registered under two names); only the shared ones are returned."""
    holders = _tensor_holders(model)
    shared = {name: [h for h in holders[_storage(t)] if h != name] for name, t in owned.items() if t.numel()}
    return {name: others for name, others in shared.items() if others}


def _describe_ties(ties: dict[str, list[str]]) -> str:
    shown = [f"{name!r} is the same tensor as {', '.join(map(repr, others))}" for name, others in ties.items()]
    return "; ".join(shown[:5]) + (f"; … ({len(shown) - 5} more)" if len(shown) > 5 else "")


def build_layers(
    model: nn.Module, config: AdapterConfig, names: list[str], bases: dict[str, nn.Module] | None = None
) -> dict[str, AdapterLayer]:
    """Adapter layers for the named modules (or for ``bases[name]`` in their place), built without touching the
    model (errors leave it unchanged)."""
    layers = {}
    for name in names:
        module = bases[name] if bases and name in bases else model.get_submodule(name)
        try:
            layers[name] = config.make_layer(module)
        except ValueError as err:
            raise ValueError(f"cannot adapt module {name!r}: {err}") from err
    return layers


def insert_layers(model: nn.Module, layers: dict[str, AdapterLayer]) -> None:
    for name, layer in layers.items():
        _replace(model, name, layer)
    freeze_base(model)


def freeze_base(model: nn.Module) -> None:
    """Train exactly the adapters' own parameters and the modules recorded by ``adapt(trainable=...)``."""
    keep = getattr(model, TRAINABLE_ATTR, [])
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in adapter_layers(model).values():
        for p in layer.adapter_parameters().values():
            p.requires_grad_(True)
    for name in keep:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)


def adapt(
    model: nn.Module,
    config: AdapterConfig,
    targets: Target | Sequence[Target],
    trainable: Sequence[str] = (),
    untie: bool = False,
) -> nn.Module:
    """Wrap every module ``targets`` selects with ``config``'s adapter; freeze all other parameters. In place.

    ``trainable``: module names (or dotted suffixes) kept fully trainable, e.g. a new classifier head.
    ``untie``: a targeted module whose weight (or bias) another module shares — ``lm_head`` tied to
    ``embed_tokens`` — is refused, since merging would rewrite its partner too; ``untie=True`` adapts a copy of it
    with tensors of its own instead (the partner keeps the original; the two then train and merge independently,
    and a transformers config that says ``tie_word_embeddings=True`` no longer describes the model).
    Call again with another config and other targets to mix families on one model. Returns ``model``.
    """
    if not isinstance(config, AdapterConfig):
        raise ValueError(
            f"config must be an adapter config (e.g. boftlab.BOFTConfig(...)), got {type(config).__name__}"
        )
    names = match_targets(model, targets)
    if not names:
        raise ValueError(
            f"targets={_describe(targets)} matched no module. Modules in this model: {_module_list_hint(model)}"
        )
    adapted = [n for n in names if isinstance(model.get_submodule(n), AdapterLayer)]
    if adapted:
        layer = model.get_submodule(adapted[0])
        raise ValueError(
            f"module {adapted[0]!r} already carries a {layer.family!r} adapter; boftlab puts one adapter per layer "
            "(unwrap(model) first, or choose other targets)"
        )
    supported = [n for n in names if isinstance(model.get_submodule(n), config.supported_layers())]
    if not supported:
        kinds = sorted({type(model.get_submodule(n)).__name__ for n in names})
        ok = ", ".join(type_name(t) for t in config.supported_layers())
        raise ValueError(
            f"targets={_describe(targets)} matched {len(names)} module(s) of type(s) {kinds}, none of which "
            f"{config.display_name()} supports; supported types: {ok}"
        )
    swept = isinstance(targets, (str, re.Pattern)) or any(isinstance(t, type) for t in _as_list(targets))
    if swept:
        # a pattern or a type may sweep up containers (e.g. "encoder.layer.0"): keep the layers inside them. A
        # matched *leaf* layer of a type the family cannot adapt is an error, never silently left out.
        leaves = [n for n in names if n not in supported and next(model.get_submodule(n).children(), None) is None]
        if leaves:
            ok = ", ".join(type_name(t) for t in config.supported_layers())
            shown = ", ".join(f"{n} ({type(model.get_submodule(n)).__name__})" for n in leaves[:8])
            more = f", … ({len(leaves) - 8} more)" if len(leaves) > 8 else ""
            raise ValueError(
                f"targets={_describe(targets)} matched {len(leaves)} layer(s) that {config.display_name()} cannot "
                f"adapt: {shown}{more}; supported types: {ok}. Narrow the pattern to the layers you mean."
            )
        names = supported
    keep = resolve_trainable(model, trainable)
    kept = set(keep) | set(getattr(model, TRAINABLE_ATTR, []))
    in_kept = [n for n in names if any(n == k or n.startswith(k + ".") for k in kept)]
    if in_kept and (not swept or len(in_kept) == len(names)):  # only a head swept up by a pattern or type stays plain
        raise ValueError(
            f"{in_kept[0]!r} is both a target and kept fully trainable (trainable={sorted(kept)}): an adapter trains "
            "its own tensors on a frozen base, a trainable module trains every weight of it; name it in one of them"
        )
    names = [n for n in names if n not in in_kept]
    tied = _tied_targets(model, names)
    if tied and not untie:
        modules = sorted({name for name, _ in tied.values()})
        raise ValueError(
            f"cannot adapt {', '.join(map(repr, modules))}: {_describe_ties({a: o for a, (_, o) in tied.items()})} "
            "(tied weights): merging the adapter would rewrite the other module too. Leave "
            f"{'it' if len(modules) == 1 else 'them'} out of targets, or pass adapt(..., untie=True) to adapt a copy "
            "with tensors of its own (the tie is then broken for good)."
        )
    bases = {name: copy.deepcopy(model.get_submodule(name)) for name, _ in tied.values()}  # untie: own copies
    layers = build_layers(model, config, names, bases)  # may raise: the model is still untouched
    setattr(model, TRAINABLE_ATTR, sorted(set(getattr(model, TRAINABLE_ATTR, [])) | set(keep)))
    insert_layers(model, layers)
    return model


def _tied_targets(model: nn.Module, names: list[str]) -> dict[str, tuple[str, list[str]]]:
    """"module.attr" -> (module, the other holders) for the direct parameters of the named modules that another
    module shares."""
    owned = {f"{name}.{attr}": (name, p) for name in names
             for attr, p in model.get_submodule(name)._parameters.items() if p is not None and not p.is_meta}
    ties = shared_tensors(model, {key: p for key, (_, p) in owned.items()})
    return {key: (owned[key][0], others) for key, others in ties.items()}


def _as_list(targets: object) -> list:
    return list(targets) if isinstance(targets, (list, tuple, set)) else [targets]


def resolve_trainable(model: nn.Module, trainable: Sequence[str]) -> list[str]:
    if isinstance(trainable, str):
        trainable = [trainable]
    names = []
    for item in trainable:
        hits = [n for n in _plain_modules(model) if n and (n == item or n.endswith("." + item))]
        if not hits:
            raise ValueError(
                f"trainable={item!r} matched no module. Modules in this model: {_module_list_hint(model)}"
            )
        names += hits
    return names


# --- reports -------------------------------------------------------------------------------------------------------------
@dataclass
class Summary:
    """Parameter counts of an adapted model (what ``summary`` prints)."""

    total: int
    trainable: int
    adapter: int  # stored in adapter layers
    effective: int  # paper-style free parameters of the adapters
    other_trainable: int  # e.g. a classifier head kept trainable
    by_family: dict[str, dict[str, int]] = field(default_factory=dict)  # family -> {"layers", "trainable", ...}
    by_layer_type: dict[str, dict[str, int]] = field(default_factory=dict)  # "boft/Linear" -> {...}

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        lines = [
            f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}",
            f"adapter params: {self.adapter:,} (paper-style effective: {self.effective:,}); "
            f"other trainable: {self.other_trainable:,}",
            "",
            "| family / layer type | layers | adapter params | effective | base params adapted |",
            "|---|---|---|---|---|",
        ]
        for key, row in sorted(self.by_layer_type.items()):
            lines.append(
                f"| {key} | {row['layers']} | {row['trainable']:,} | {row['effective']:,} | {row['base']:,} |"
            )
        return "\n".join(lines)

    def _repr_markdown_(self) -> str:
        head, _, table = str(self).partition("\n\n")
        return head.replace("\n", "<br>") + "\n\n" + table


def summary(model: nn.Module, print_it: bool = False) -> Summary:
    """Trainable vs total parameters, per family and per adapted layer type (like PEFT's
    ``print_trainable_parameters``, plus the paper-style effective count)."""
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    by_family: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    by_type: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    adapter_ids = set()
    for layer in adapter_layers(model).values():
        row = {
            "layers": 1,
            "trainable": layer.n_trainable(),
            "effective": layer.n_effective(),
            "base": sum(p.numel() for p in layer.base_layer.parameters()),
        }
        for table, key in ((by_family, layer.family), (by_type, f"{layer.family}/{type(layer.base_layer).__name__}")):
            for k, v in row.items():
                table[key][k] += v
        adapter_ids |= {id(p) for p in layer.adapter_parameters().values()}
    adapter = sum(r["trainable"] for r in by_family.values())
    effective = sum(r["effective"] for r in by_family.values())
    other = sum(p.numel() for p in params if p.requires_grad and id(p) not in adapter_ids)
    result = Summary(
        total, trainable, adapter, effective, other,
        {k: dict(v) for k, v in by_family.items()}, {k: dict(v) for k, v in by_type.items()},
    )
    if print_it:
        print(result)
    return result


# --- merging -----------------------------------------------------------------------------------------------------------
def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weights (zero added latency); ``unmerge`` undoes it, exactly to the rounding
    of each weight's dtype. All or nothing: a ValueError (an adapter holding NaN/inf, a zero output scale, a
    non-linear SURM adapter, a shared base tensor) leaves every layer as it was."""
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("merge: the model has no boftlab adapters")
    already = [n for n, layer in layers.items() if layer.merged]
    if already:
        raise ValueError(f"merge: already merged ({len(already)} layers, e.g. {already[0]!r}); call unmerge first")
    _write_all(model, _plan(model, layers, merge=True), merged=True)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Take merged adapters back out of the base weights (all or nothing, as ``merge``)."""
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("unmerge: the model has no boftlab adapters")
    not_merged = [n for n, layer in layers.items() if not layer.merged]
    if not_merged:
        raise ValueError(f"unmerge: {len(not_merged)} layers are not merged (e.g. {not_merged[0]!r})")
    _write_all(model, _plan(model, layers, merge=False), merged=False)
    return model


def _plan(model: nn.Module, layers: dict[str, AdapterLayer], merge: bool) -> dict[str, dict[str, torch.Tensor]]:
    """Every layer's new base tensors, computed and checked before anything is written: ValueError naming the layer
    if one cannot be merged (or unmerged), or if it would write into a tensor another module shares."""
    action = "merge" if merge else "unmerge"
    plans = {}
    for name, layer in layers.items():
        try:
            plans[name] = layer.base_after(merge)
        except ValueError as err:
            raise ValueError(f"{action}: layer {name!r}: {err}") from err
    owned = {f"{name}.base_layer.{attr}": getattr(layer.base_layer, attr)
             for name, layer in layers.items() for attr in plans[name]}
    ties = shared_tensors(model, owned)
    if ties:
        raise ValueError(
            f"{action}: {_describe_ties(ties)}: writing the {action}d weight would change the other module too. "
            "Nothing was changed; keep the adapter unmerged (its forward is exact), or adapt a fresh model with "
            "adapt(..., untie=True)."
        )
    return plans


@torch.no_grad()
def _write_all(model: nn.Module, plans: dict[str, dict[str, torch.Tensor]], merged: bool) -> None:
    """Write every layer's planned base tensors (``_plan``)."""
    layers = adapter_layers(model)
    for name, tensors in plans.items():
        layers[name]._write_base(tensors)
        layers[name].merged = merged


def unwrap(model: nn.Module) -> nn.Module:
    """Merge the adapters and put the plain base layers back: a model with the original module types. All or
    nothing: every merge is computed and checked (as in ``merge``) before any layer is changed."""
    layers = adapter_layers(model)
    _write_all(model, _plan(model, {n: layer for n, layer in layers.items() if not layer.merged}, merge=True), True)
    for name, layer in layers.items():
        _replace(model, name, layer.base_layer)
    if hasattr(model, TRAINABLE_ATTR):
        delattr(model, TRAINABLE_ATTR)
    return model


# --- switching adapters off ------------------------------------------------------------------------------------------
@contextlib.contextmanager
def disabled(model: nn.Module, targets: Target | Sequence[Target] | None = None) -> Iterator[nn.Module]:
    """``with boftlab.disabled(model): ...`` — inside, every adapter (or those in the modules ``targets`` selects, as
    in ``adapt``) is bypassed: each adapted layer returns exactly its base layer's output. The base model without a
    second copy of it, e.g. a DPO reference model or a before/after comparison. Yields ``model``.

    Nestable and exception-safe: each layer counts the open contexts that bypass it and is back on when the last
    one exits, however it exits. Not thread-safe: the switch lives on the layers, so another thread running the same
    model meanwhile sees the adapters off too. A merged adapter is refused (ValueError, nothing changed): its base
    weights hold the adapted ones, and unmerging behind your back would round-trip them through floating point on
    every call — ``boftlab.unmerge(model)`` first, if that is what you want.
    """
    model = strip_wrappers(model)
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("disabled: the model has no boftlab adapters to switch off")
    if targets is not None:
        chosen = match_targets(model, targets)
        layers = {n: layer for n, layer in layers.items() if any(n == c or n.startswith(c + ".") for c in chosen)}
        if not layers:
            raise ValueError(
                f"disabled: targets={_describe(targets)} selects no adapted layer; adapted layers: "
                f"{sorted(adapter_layers(model))}"
            )
    merged = [n for n, layer in layers.items() if layer.merged]
    if merged:
        raise ValueError(
            f"disabled: {len(merged)} adapter(s) are merged into their base weights (e.g. {merged[0]!r}), so the base "
            "layers no longer compute the base model; call boftlab.unmerge(model) first (disabled never unmerges "
            "for you: each unmerge/merge round trip rounds the base weights)"
        )
    for layer in layers.values():
        layer.disabled_count += 1
    try:
        yield model
    finally:
        for layer in layers.values():
            layer.disabled_count -= 1


# --- quantized base layers ---------------------------------------------------------------------------------------------
def dequantize_bases(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Replace the quantized base layer (bitsandbytes Linear4bit / Linear8bitLt) of every adapter by a frozen
    nn.Linear in ``dtype`` holding its dequantized weight and its bias, in place; returns ``model``.

    ``dtype`` is that of the activations reaching these layers (the model's compute dtype, e.g. torch.bfloat16).
    Afterwards ``merge`` and ``unwrap`` are exact, as on any nn.Linear. The forward changes by what the quantized
    kernel computes beyond x·dequantize(W)ᵀ: for 4-bit, nothing; for 8-bit on a GPU, the int8 rounding of the
    activations. O(out·in) per layer; memory grows to ``dtype``'s size per weight.
    """
    layers = {n: layer for n, layer in adapter_layers(strip_wrappers(model)).items()
              if base_layers.kind(layer.base_layer) == "quantized"}
    if not layers:
        raise ValueError("dequantize_bases: no adapter of this model wraps a quantized (bitsandbytes) layer")
    plain = {name: base_layers.dequantized_linear(layer.base_layer, dtype) for name, layer in layers.items()}
    for name, layer in layers.items():
        layer.base_layer = plain[name]
    return model
