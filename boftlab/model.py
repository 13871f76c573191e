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


def canonical_name(name: str) -> str:
    """``name`` without the ``_orig_mod`` steps that a ``torch.compile``d submodule adds (``encoder._orig_mod.0`` ->
    ``encoder.0``): the module's name in the uncompiled model, the one every file records. O(len(name))."""
    return ".".join(part for part in name.split(".") if part != "_orig_mod") if "_orig_mod" in name else name


def find_module(model: nn.Module, name: str) -> nn.Module:
    """The module that ``name`` (canonical or not) names in ``model``, stepping into compiled submodules'
    ``_orig_mod`` where the name does not; AttributeError, as ``get_submodule``, if there is none."""
    module = model
    for part in name.split(".") if name else []:
        while part not in module._modules and "_orig_mod" in module._modules:
            module = module._modules["_orig_mod"]
        if part not in module._modules:
            raise AttributeError(f"{type(module).__name__} has no submodule {part!r} (looking up {name!r})")
        module = module._modules[part]
    return module


def canonical_modules(model: nn.Module) -> dict[str, str]:
    """Canonical name -> name in ``model`` for every module; a compiled wrapper and the module it wraps share one
    canonical name, and the wrapper (listed first) keeps it."""
    names: dict[str, str] = {}
    for name, _ in model.named_modules():
        names.setdefault(canonical_name(name), name)
    return names


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
    - a list/tuple whose items are names (exact name or dotted suffix: ``"query"`` matches ``"…attention.query"``;
      inside a ``torch.compile``d submodule, with or without its ``_orig_mod``),
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
            elif isinstance(item, str):  # a compiled submodule's modules also answer to their uncompiled names
                hit = any(n == item or n.endswith("." + item) for n in {name, canonical_name(name)})
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


# --- models and layers an adapter cannot be put on ----------------------------------------------------------------
#: torch.nn modules that read a child layer's ``.weight`` themselves instead of calling the child — always, or on a
#: fast path — so an adapter on that child would be bypassed: never trained, never in the forward, yet folded in by
#: ``merge``. Type -> what it does.
WEIGHT_READERS: dict[type, str] = {
    nn.MultiheadAttention: "passes out_proj.weight to F.multi_head_attention_forward and never calls out_proj",
    nn.TransformerEncoderLayer: (
        "in eval mode without autograd runs a fused fast path (torch._transformer_encoder_layer_fwd) that reads "
        "linear1.weight, linear2.weight and its attention's weights directly, bypassing those layers' forward"
    ),
    **({nn.LinearCrossEntropyLoss: "passes linear.weight to F.linear_cross_entropy and never calls linear"}
       if hasattr(nn, "LinearCrossEntropyLoss") else {}),
}


def check_model(model: nn.Module) -> None:
    """ValueError for a model boftlab must not adapt as a whole: one wrapped by Hugging Face PEFT (boftlab would wrap
    PEFT's own lora_A / lora_B layers and freeze them). O(number of modules)."""
    peft_layers = [(n, m) for n, m in model.named_modules()
                   if base_layers._derives_from(type(m), "peft", ("PeftModel", "BaseTuner", "BaseTunerLayer"))]
    if peft_layers:
        name, module = next(((n, m) for n, m in peft_layers if n), peft_layers[0])
        raise ValueError(
            f"this model is wrapped by PEFT or holds its layers ({name or 'the model'!r} is a peft "
            f"{type(module).__name__}): boftlab would adapt PEFT's own layers (lora_A, lora_B, …) and freeze them. "
            "Give boftlab the plain base model: "
            "peft_model.merge_and_unload() (PEFT's adapters folded in) or peft_model.unload() (dropped) returns it — "
            "peft_model.get_base_model() alone still holds PEFT's layers, which PEFT inserts in place. PEFT BOFT/OFT "
            "adapters saved with save_pretrained import as boftlab adapters: boftlab.from_peft(base_model, directory)."
        )


def check_targets(model: nn.Module, names: list[str]) -> None:
    """ValueError, before anything changes, for a named module that an adapter would not really replace: one on the
    meta device (no values: after ``to_empty`` its adapter would hold uninitialised memory), or one inside a
    ``WEIGHT_READERS`` module (its parent reads the weight without calling it). O(targets · depth)."""
    # parameters and buffers, not state_dict(): a bitsandbytes 4-bit layer's state_dict() rewrites its weight
    meta = [n for n in names if any(t.is_meta for t in (*model.get_submodule(n).parameters(),
                                                        *model.get_submodule(n).buffers()))]
    if meta:
        raise ValueError(
            f"module {meta[0]!r} ({len(meta)} targeted module(s)) is on the meta device: it has shapes but no values, "
            "so its adapter would be created without values too, and after model.to_empty(...) it would hold "
            "uninitialised memory that nothing sets. Materialise the model first — model.to_empty(device=...) and "
            "load the base weights, or from_pretrained(...) — then adapt (or load_adapter)."
        )
    for name in names:
        parts = name.split(".")
        for depth in range(len(parts) - 1, -1, -1):
            parent_name = ".".join(parts[:depth])
            parent = model.get_submodule(parent_name)
            reader = next((t for t in WEIGHT_READERS if isinstance(parent, t)), None)
            if reader is not None:
                where = repr(parent_name) if parent_name else "(the model itself)"
                raise ValueError(
                    f"cannot adapt module {name!r}: its parent {where} is an nn.{reader.__name__}, which "
                    f"{WEIGHT_READERS[reader]}, so an adapter there would not be in the forward: it would get no "
                    "gradient, and merge would fold it in anyway. Leave the layers inside "
                    f"nn.{reader.__name__} out of targets (e.g. a narrower pattern), or build the block from layers "
                    "that call their nn.Linear children (transformers' attention layers do)."
                )


def build_layers(
    model: nn.Module, config: AdapterConfig, names: list[str], bases: dict[str, nn.Module] | None = None
) -> dict[str, AdapterLayer]:
    """Adapter layers for the named modules (or for ``bases[name]`` in their place), built without touching the
    model (errors leave it unchanged); ``check_model`` and ``check_targets`` first, and a ValueError if any 4-bit layer
    of the model was repacked for CPU inference. Each new layer takes the train / eval mode of the module it wraps
    (``make_layer``)."""
    check_model(model)
    for module in model.modules():
        base_layers.check_unpacked(module)
    check_targets(model, names)
    layers = {}
    for name in names:
        module = bases[name] if bases and name in bases else model.get_submodule(name)
        try:
            layers[name] = config.make_layer(module)
        except ValueError as err:
            raise ValueError(f"cannot adapt module {name!r}: {err}") from err
    return layers


def insert_layers(model: nn.Module, layers: dict[str, AdapterLayer]) -> None:
    base_layers.keep_unpacked(model)  # every 4-bit layer, adapted or not: gradients pass through them all
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
        for p in find_module(model, name).parameters():
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

    Refused, with the model unchanged (ValueError naming the module and the way out), wherever an adapter would not
    really take the layer's place: a PEFT-wrapped model (``check_model``); a target on the meta device, or inside a
    module that reads its weight without calling it (``WEIGHT_READERS``: ``check_targets``); a layer whose weight is
    recomputed on every call (weight_norm, spectral_norm, pruning, any parametrization or forward pre-hook:
    ``base_layers.check_plain_weight``); a trainable module that is or holds an adapter; targets that trainable
    swallows whole, or that name a trainable module.
    """
    if not isinstance(config, AdapterConfig):
        raise ValueError(
            f"config must be an adapter config (e.g. boftlab.BOFTConfig(...)), got {type(config).__name__}"
        )
    check_model(model)  # before matching: a PEFT model's targets would be PEFT's own layers
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
        # a class that only shares a supported type's name (PEFT's lora "Linear") is named in full, lest the message
        # say that a Linear is not an nn.Linear
        short = {t.__name__ for t in config.supported_layers()}
        kinds = sorted({cls.__name__ if cls.__name__ not in short else f"{cls.__module__}.{cls.__qualname__}"
                        for cls in (type(model.get_submodule(n)) for n in names)})
        ok = ", ".join(type_name(t) for t in config.supported_layers())
        raise ValueError(
            f"targets={_describe(targets)} matched {len(names)} module(s) of type(s) {kinds}, none of which "
            f"{config.display_name()} supports; supported types: {ok}"
        )
    if isinstance(targets, (str, re.Pattern)) or any(isinstance(t, type) for t in _as_list(targets)):
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
    _check_trainable_holds_no_adapter(model, keep)
    kept = set(keep) | set(getattr(model, TRAINABLE_ATTR, []))
    names = _outside_trainable(model, targets, names, sorted(kept))  # heads stay plain
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


def _check_trainable_holds_no_adapter(model: nn.Module, keep: list[str]) -> None:
    """ValueError if a module to keep trainable is, or holds, an adapter layer (from an earlier ``adapt``): training
    it whole would train that adapter's frozen base weights too, which no adapter file can hold."""
    for name in keep:
        inside = list(adapter_layers(find_module(model, name)))
        if inside:
            where = f"carries a {find_module(model, name).family!r} adapter" if inside == [""] else (
                f"holds {len(inside)} adapted layer(s) ({', '.join(repr(f'{name}.{n}') for n in inside[:3])}"
                f"{', …' if len(inside) > 3 else ''})")
            raise ValueError(
                f"trainable names module {name!r}, which {where} from an earlier adapt: keeping it trainable would "
                "train the adapted layers' frozen base weights too, and save_adapter would write them into a file "
                "that no fresh model loads. An adapter's own parameters are trainable already; to train a module "
                "whole, keep it plain (boftlab.unwrap(model) and adapt again without it in targets)."
            )


def _outside_trainable(model: nn.Module, targets: Target | Sequence[Target], names: list[str],
                       kept: list[str]) -> list[str]:
    """``names`` without the modules inside one kept trainable (a type or pattern sweeps up the head: it stays
    plain). ValueError if that leaves nothing to adapt, or drops a module that ``targets`` names explicitly."""
    def covering(name: str) -> str | None:
        name = canonical_name(name)
        return next((k for k in kept if name == k or name.startswith(k + ".")), None)

    named = [t for t in _as_list(targets) if isinstance(t, str)] if not isinstance(targets, (str, re.Pattern)) else []
    explicit = [n for n in (match_targets(model, named) if named else []) if covering(n)]
    outside = [n for n in names if not covering(n)]
    if explicit or not outside:
        clash = explicit or names
        shown = ", ".join(f"{n!r} (inside {covering(n)!r})" for n in clash[:5]) + (", …" if len(clash) > 5 else "")
        what = (f"names {len(explicit)} module(s) that are also kept trainable" if explicit
                else f"selects {len(names)} module(s), all of them inside modules kept trainable, so adapt would wrap "
                "nothing and train those modules whole")
        raise ValueError(
            f"targets={_describe(targets)} {what}: {shown}; trainable (this call and earlier ones): {kept}. A module "
            "is either adapted or trained whole: leave it out of trainable, or out of targets."
        )
    return outside


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
    """The canonical names (``canonical_name``) of the modules that ``trainable``'s names or dotted suffixes select."""
    if isinstance(trainable, str):
        trainable = [trainable]
    names: list[str] = []
    for item in trainable:
        hits = [c for c in map(canonical_name, _plain_modules(model)) if c and (c == item or c.endswith("." + item))]
        if not hits:
            raise ValueError(
                f"trainable={item!r} matched no module. Modules in this model: {_module_list_hint(model)}"
            )
        names += [n for n in dict.fromkeys(hits) if n not in names]
    return names


# --- reports -------------------------------------------------------------------------------------------------------------
@dataclass
class Summary:
    """Parameter counts of an adapted model (what ``summary`` prints)."""

    total: int
    trainable: int
    adapter: int  # stored in adapter layers
    effective: int  # the adapters' effective parameter count (AdapterLayer.n_effective, the one definition)
    other_trainable: int  # e.g. a classifier head kept trainable
    by_family: dict[str, dict[str, int]] = field(default_factory=dict)  # family -> {"layers", "trainable", ...}
    by_layer_type: dict[str, dict[str, int]] = field(default_factory=dict)  # "boft/Linear" -> {...}

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        lines = [
            f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}",
            f"adapter params: {self.adapter:,} (effective: {self.effective:,}); "
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
    ``print_trainable_parameters``, plus the effective count, ``AdapterLayer.n_effective``)."""
    params = list(model.parameters())
    total = base_layers.n_parameters(model)  # a quantized weight counts out·in, not its packed bytes
    trainable = base_layers.n_parameters(model, trainable=True)
    by_family: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    by_type: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    adapter_ids = set()
    for layer in adapter_layers(model).values():
        row = {
            "layers": 1,
            "trainable": layer.n_trainable(),
            "effective": layer.n_effective(),
            "base": base_layers.n_parameters(layer.base_layer),
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
    for name, layer in layers.items():
        try:
            layer.check_mergeable_in_place()
        except ValueError as err:
            raise ValueError(f"merge: layer {name!r}: {err}") from err
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
    every call — ``boftlab.unmerge(model)`` first, if that is what you want. Under gradient checkpointing, a region
    that ran inside the block is recomputed by the backward with the same adapters bypassed, even after the block has
    ended (``contract.checkpoint_region``): a loss computed inside and back-propagated outside is exact.
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
    ``base_layers.DequantizedLinear`` (an nn.Linear) holding its dequantized weight and its bias in ``dtype``, in
    place; returns ``model``.

    The new layer computes as the quantized one did: its input cast to the Linear4bit's compute dtype (Linear8bitLt:
    the input's own dtype), the output cast back — so a bf16-compute 4-bit layer fed fp32 activations still computes
    in bf16 and returns fp32. ``dtype`` is what the weight is stored (and merged) in: a floating dtype that holds the
    values the layer computes with exactly (the compute dtype or a wider one), else a ValueError before anything
    changes. Afterwards ``merge`` and ``unwrap`` are exact, as on any nn.Linear. The forward changes by what the
    quantized kernel computes beyond x·dequantize(W)ᵀ: for 4-bit, nothing; for 8-bit on a GPU, the int8 rounding of
    the activations. O(out·in) per layer; memory grows to ``dtype``'s size per weight.
    """
    layers = {n: layer for n, layer in adapter_layers(strip_wrappers(model)).items()
              if base_layers.kind(layer.base_layer) == "quantized"}
    if not layers:
        raise ValueError("dequantize_bases: no adapter of this model wraps a quantized (bitsandbytes) layer")
    plain = {}
    for name, layer in layers.items():  # every layer built before any is replaced
        try:
            plain[name] = base_layers.dequantized_linear(layer.base_layer, dtype)
        except ValueError as err:
            raise ValueError(f"dequantize_bases: layer {name!r}: {err}. Nothing was changed.") from err
    for name, layer in layers.items():
        layer.base_layer = plain[name].train(layer.base_layer.training)  # in the mode of the layer it replaces
    return model
