"""The adapter contract shared by every boftlab family.

An adapter *wraps* one frozen base layer and answers the same questions whatever its family:

    forward(x)            the adapted layer's output (the base layer's alone once merged)
    merge() / unmerge()   fold the adaptation into the base weight and take it out again, exactly
    n_trainable()         how many numbers the adapter stores and trains
    n_effective()         the effective parameter count: the numbers of the family's parametrisation (e.g. b(b−1)/2
                          per skew-symmetric block, not PEFT's b²), defined once at ``AdapterLayer.n_effective``
    paths()               the exact forward paths it has, in one vocabulary for every family (``PATHS``):
                            "input"     — the adapter acts on the activations in its factored form (BOFT's m
                                          butterfly factors; the tensor core's factorised chain; SURM's FFT
                                          products on a Linear's input or output);
                            "assembled" — small dense pieces of the adapter's matrix are assembled first, then act
                                          on the activations in one product (BOFT: R's diagonal blocks);
                            "weight"    — form the adapted weight, then one call of the base op
    path_costs(...)       multiply-adds of one call on each path; ``choose_path(x)`` takes the config's ``path``,
                          or under "auto" the cheapest (ties go to "weight"), and ``forward`` runs that one

A family is two classes: an ``AdapterConfig`` dataclass (hyper-parameters, which layer types it adapts) and an
``AdapterLayer`` (the math). Injection, reports, saving and loading are written once against this file and never
know which family they handle. A family reads its base layer through ``boftlab.base_layers`` (the weight in PyTorch's
layout, the call that runs the base with another weight), so one layer class covers nn.Linear, transformers'
Conv1D (W stored transposed) and bitsandbytes' quantized layers (W opaque) alike; ``forward`` here bypasses the
adapter inside ``boftlab.disabled(model)``.

Adding a family (``tests/test_toy_family.py`` does exactly this, with a family defined inside the test). Write
``myfamily.py`` with the structured matrix first (pure functions over tensors), then:

* ``MyConfig(AdapterConfig)``, a dataclass with ``family: ClassVar[str] = "myfamily"`` (defining the class registers it
  in ``FAMILIES``), its hyper-parameters checked in ``__post_init__``, a field ``path: str = "auto"`` (checked by
  ``check_path``), ``supported_layers()`` and ``layer_class()``, ``option_space`` (the values each option takes in the
  seeded random round trips of ``tests/test_round_trips.py``) and ``examples`` (a few small configs, the first one
  canonical: ``example_configs()``);
* ``MyLayer(AdapterLayer)`` with its trainable tensors as parameters of its own (zero change at init),
  ``adapted_forward(x, *args, **kwargs)`` that runs ``self.choose_path(x)``, ``paths()``, ``path_costs(...)``
  (and ``check_forced_path`` at the end of ``__init__`` if some layers lack a path), ``delta_weight(dtype)`` if
  W' = W + ΔW (merge and unmerge then come from the contract), or else ``merged_weights()`` / ``unmerged_weights()``
  if it can be folded into the base weight (reading the base through ``base_layers``, so every base kind is handled), and ``n_effective()`` if it stores numbers outside its parametrisation
  (see that method).

Import it from ``boftlab/__init__.py``: nothing else is edited for it to be adapted, saved, loaded, counted and
tested. ``adapt``, ``summary``, ``merge``, saving, loading and ``counts`` handle it, and the cross-cutting tests
(``test_contract``, ``test_round_trips``, ``test_precision``, ``test_compile``, ``test_base_layers``,
``test_real_models``, ``test_cuda``) and ``scripts/train_accelerate.py`` iterate ``FAMILIES`` and build its configs
from its ``examples`` and ``option_space``: a family that declares none fails there by name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import sys
import weakref
from typing import Any, ClassVar, Sequence

import torch
from torch import nn

from . import base_layers
from .base_layers import (  # conv_output_size: families import it from here too
    check_input_dtype, check_plain_weight, check_readable, check_unpacked, conv_output_size, is_repacked,  # noqa: F401
    keep_unpacked, kind, type_name,
)

#: family name -> config class; filled by ``AdapterConfig.__init_subclass__``.
FAMILIES: dict[str, type["AdapterConfig"]] = {}
#: the forward paths a layer may have (module docstring); a config's ``path`` is one of them or "auto".
PATHS = ("input", "assembled", "weight")
#: the key under each adapter layer's prefix in a ``state_dict()`` that records whether its base tensors are merged
MERGED_KEY = "merged"
#: checkpointed regions that ran while ``boftlab.disabled`` bypassed some adapter layers: id(region) -> the ids of those
#: layers (``checkpoint_region``); an entry goes when torch frees the region with its graph
BYPASSED_REGIONS: dict[int, set[int]] = {}
_CHECKPOINT_FILE = sys.modules["torch.utils.checkpoint"].__file__
#: (frame of torch/utils/checkpoint.py, its local holding the region): the region's first run, then its recomputation
_FIRST_RUN = {"forward": "ctx", "_checkpoint_impl": "gen"}  # reentrant Function's ctx; the non-reentrant generator's
_RECOMPUTE = {"backward": "ctx", "unpack_hook": "frame"}  # ... and, in the backward, the same objects


def checkpoint_region() -> tuple[str, object] | None:
    """("first run" | "recompute", region) while torch.utils.checkpoint runs a checkpointed region, or re-runs it during
    a backward; None outside one. ``region`` is torch's own object for it — the reentrant Function's ctx, the
    non-reentrant _CheckpointFrame — the same in both runs, and freed with the graph (at once where no graph is built,
    under torch.no_grad()). Read from the call stack, i.e. from torch's internals: a ValueError names the torch
    version if a frame of torch/utils/checkpoint.py holds none of them. O(stack depth)."""
    seen = []  # the frames of torch/utils/checkpoint.py on the stack, innermost first
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename == _CHECKPOINT_FILE:
            name, local = frame.f_code.co_name, frame.f_locals
            seen.append(name)
            if name in _RECOMPUTE and _RECOMPUTE[name] in local:
                return "recompute", local[_RECOMPUTE[name]]
            if name in _FIRST_RUN and _FIRST_RUN[name] in local:
                region = local["ctx"] if name == "forward" else local["gen"].gi_frame.f_locals.get("new_frame")
                if region is not None:
                    return "first run", region
        frame = frame.f_back
    if not seen:
        return None
    raise ValueError(
        f"an adapter layer runs inside a gradient-checkpointed region inside boftlab.disabled(...), but boftlab cannot "
        f"tell that region in this torch {torch.__version__} (frames {seen} of torch/utils/checkpoint.py), so a "
        "backward after the block could not recompute it bypassed, as it ran. Run the bypassed pass under "
        "torch.no_grad() (a reference pass needs no graph), or without gradient checkpointing."
    )


def _record_bypass(region: object, layer_id: int) -> None:
    """Remember that ``region`` ran with the layer ``layer_id`` bypassed, until torch frees the region."""
    if id(region) not in BYPASSED_REGIONS:
        BYPASSED_REGIONS[id(region)] = set()
        weakref.finalize(region, BYPASSED_REGIONS.pop, id(region), None)
    BYPASSED_REGIONS[id(region)].add(layer_id)


#: config options that choose how a layer computes, never what: every path and kernel gives the same result (to
#: rounding), the same tensors are trained. They are no part of an adapter's structure (hot swap, resuming).
RUNTIME_OPTIONS = ("path", "kernel")


def nearest(value: int, choices: list[int]) -> int:
    """The choice closest to ``value`` (ties go to the smaller one) — for error messages that suggest a fix."""
    return min(choices, key=lambda c: (abs(c - value), c))


def check_integer(name: str, value: Any) -> int:
    """``value`` as an int, or a ValueError unless it is an integer (a bool, a float like 4.0 or a string is not)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    return int(value)


def check_number(name: str, value: Any) -> float:
    """``value`` as a float, or a ValueError unless it is a finite real number (a bool, a string, NaN or ±inf is
    not)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r} ({type(value).__name__})")
    return float(value)


def merge_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype merges and unmerges compute in: fp64 (fp32 on Apple's MPS, which has no fp64), so that the only
    rounding a merge adds is the final one to the weight's own dtype."""
    return torch.float32 if weight.device.type == "mps" else torch.float64


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """A context in which autocast is off on ``device`` — for the small products families keep in their own precision
    under AMP. The meta device has no autocast (a layer on it computes shapes only), and where autocast is off already
    there is nothing to turn off: nothing there (entering torch.autocast costs about as much as a small op)."""
    if device.type == "meta" or not torch.is_autocast_enabled(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


@dataclasses.dataclass
class AdapterConfig:
    """Base class of the families' configs. A subclass sets ``family`` and implements ``supported_layers`` and
    ``layer_class``; ``make_layer`` is the same for every family."""

    family: ClassVar[str] = ""
    #: small representative configs of this family as keyword arguments, the first one canonical: what the
    #: cross-cutting tests, the bench and the runner build when they iterate ``FAMILIES`` (``example_configs``)
    examples: ClassVar[tuple[dict[str, Any], ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("family"):
            FAMILIES[cls.family] = cls

    @classmethod
    def example_configs(cls) -> list["AdapterConfig"]:
        """The family's ``examples`` as configs; ValueError if the family declares none of its own."""
        examples = cls.__dict__.get("examples")
        if not examples:
            raise ValueError(
                f"{cls.__name__} (family {cls.family!r}) declares no examples: give it a class attribute "
                "examples = (dict(...), ...) of small valid configs, the first one canonical."
            )
        return [cls(**options) for options in examples]

    def supported_layers(self) -> tuple[type[nn.Module], ...]:
        """The module types this config adapts (``adapt`` selects targets by them; errors name them)."""
        raise NotImplementedError

    def layer_class(self) -> type["AdapterLayer"]:
        """The ``AdapterLayer`` subclass that ``make_layer`` builds."""
        raise NotImplementedError

    def make_layer(self, base_layer: nn.Module) -> "AdapterLayer":
        """Wrap ``base_layer``; ValueError if its type is not supported or the family cannot fit its shape. The new
        layer takes ``base_layer``'s train / eval mode, so an adapter put on a model in eval mode (``adapt``,
        ``load_adapter``, ``from_peft``) runs without dropout, as the model's mode says."""
        self.check_supported(base_layer)
        layer = self.layer_class()(base_layer, self)
        for name, module in layer.named_modules():  # the adapter's own modules; the base keeps its (mixed) modes
            if name != "base_layer" and not name.startswith("base_layer."):
                module.training = base_layer.training
        return layer

    def display_name(self) -> str:
        """How errors name this config: the class name, plus any option that decides ``supported_layers``."""
        return type(self).__name__

    def check_supported(self, base_layer: nn.Module) -> None:
        supported = self.supported_layers()
        if not isinstance(base_layer, supported):
            names = ", ".join(type_name(t) for t in supported)
            raise ValueError(
                f"{self.display_name()} cannot adapt a {type(base_layer).__name__}; supported layer types: {names}."
            )

    def check_path(self) -> None:
        """ValueError unless the ``path`` option is "auto" or one of ``PATHS`` (whether a given layer has that path
        is checked when the layer is built)."""
        valid = ("auto", *PATHS)
        if self.path not in valid:
            raise ValueError(f"path must be one of {valid}, got {self.path!r}")

    def to_dict(self) -> dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {"family": self.family, **{k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}}

    @staticmethod
    def from_dict(data: dict[str, Any]) -> "AdapterConfig":
        if not isinstance(data, dict):
            raise ValueError(
                f"AdapterConfig.from_dict expects a dict like {{'family': 'boft', 'block_size': 8}}, "
                f"got a {type(data).__name__}: {data!r}"
            )
        data = dict(data)
        family = data.pop("family", None)
        if family not in FAMILIES:
            raise ValueError(f"unknown adapter family {family!r}; known families: {sorted(FAMILIES)}.")
        cls = FAMILIES[family]
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{cls.__name__} has no option(s) {unknown}; its options are {sorted(known)}.")
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**kwargs)


class AdapterLayer(nn.Module):
    """A frozen ``base_layer`` plus a family's trainable tensors.

    Subclasses implement ``adapted_forward`` and, if the adaptation can be folded into the weights, ``delta_weight``
    (W' = W + ΔW) or ``merged_weights`` / ``unmerged_weights``; they register their trainable tensors as parameters
    of their own (anything under ``base_layer`` belongs to the base model).
    """

    def __init__(self, base_layer: nn.Module, config: AdapterConfig) -> None:
        super().__init__()
        check_plain_weight(base_layer)  # e.g. weight_norm, pruning: first, since reading such a weight recomputes it
        check_readable(base_layer)  # e.g. a packed weight of a quantization library boftlab does not know
        self.quantized_base = kind(base_layer) == "quantized"
        if self.quantized_base:
            keep_unpacked(base_layer)  # bitsandbytes' CPU repacking would drop the gradient of the layer's input
        self.base_layer = base_layer
        self.config = config
        self.merged = False
        self.disabled_count = 0  # open ``boftlab.disabled`` contexts that bypass this adapter (they nest)

    # --- the family's part -------------------------------------------------------------------------------------
    def adapted_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The adapted output, computed on ``self.choose_path(x)``."""
        raise NotImplementedError

    def paths(self) -> tuple[str, ...]:
        """The exact forward paths this layer has (a subset of ``PATHS``)."""
        raise NotImplementedError

    def path_costs(self, x_shape: Sequence[int], training: bool, input_requires_grad: bool) -> dict[str, int]:
        """Estimated multiply-adds of one call on an input of ``x_shape``, for each of ``paths()`` (backward
        included when ``training``)."""
        raise NotImplementedError

    def delta_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """ΔW of an *additive* family, whose adapted weight is W' = W + ΔW (SURM's LoRA mode, the tensor core): in
        ``base_layers.weight_shape``'s layout, computed in ``dtype``. A family that defines it gets ``merged_weights``
        and ``unmerged_weights`` from the contract (``shifted_weight``); one that folds in otherwise (BOFT's rotation,
        SURM's adapter mode) overrides those two instead."""
        raise NotImplementedError(f"{type(self).__name__} cannot be merged into its base layer")

    def merged_weights(self) -> dict[str, torch.Tensor]:
        """The base layer's tensors (by attribute name, e.g. ``{"weight": W'}``) with the adaptation folded in, in
        their own dtypes (computed in ``merge_dtype``, rounded once); a ValueError if ``unmerged_weights`` could not
        undo it (e.g. a zero scale), so that every merge can be taken back. Here the additive merge, W + ΔW."""
        return base_layers.stored(self.base_layer, self.shifted_weight(merge_dtype(self.base_layer.weight), +1))

    def unmerged_weights(self) -> dict[str, torch.Tensor]:
        """The inverse of ``merged_weights``: the base tensors recovered from merged ones, exact to the rounding of
        the weight's dtype. Here the additive unmerge, W' − ΔW."""
        return base_layers.stored(self.base_layer, self.shifted_weight(merge_dtype(self.base_layer.weight), -1))

    def n_effective(self) -> int:
        """The *effective* parameter count — the one meaning of the word in boftlab (``summary(model).effective``,
        ``counts.layer_count(..., convention="effective")``, which calls this): the numbers of the method's own
        parametrisation. For OFT/BOFT that is each block's skew-symmetric S, b(b−1)/2 entries (the BOFT paper's
        count; PEFT stores an arbitrary b × b A and uses S = (A − Aᵀ)/2: ``counts``' convention "peft"); for SURM
        the structured matrix's numbers; for the tensor core its core and factors; for LoRA (in ``counts``)
        r·(d + n). No gauge of a parametrisation is subtracted, in any method, so that counts compare: LoRA's
        BA = (BM)(M⁻¹A) and the tensor core's G ×_n M⁻¹, U_n M leave ΔW unchanged, and the dimension of the set of
        updates is smaller (the tensor core's: ``tensor_core.tucker_dimension``). boftlab stores exactly these
        numbers, so this is ``n_trainable()``; a family overrides it only if it stores numbers outside its
        parametrisation."""
        return self.n_trainable()

    # --- shared by all families ---------------------------------------------------------------------------------
    @property
    def family(self) -> str:
        return self.config.family

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's (frozen) weight, for model code that reads ``layer.weight.dtype`` etc., as PEFT allows."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """The adapter's own parameters (not the base layer's), by name relative to this layer."""
        return {n: p for n, p in self.named_parameters() if not n.startswith("base_layer.")}

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """Everything that must be saved to rebuild this adapter: its parameters and persistent buffers (not the
        base layer's tensors, nor the merged flag and the ``plain_guard`` a whole-model ``state_dict`` carries)."""
        state: dict[str, torch.Tensor] = {}
        nn.Module._save_to_state_dict(self, state, "", keep_vars=False)  # its own tensors, without this class's extras
        for name, child in self.named_children():
            if name != "base_layer":
                state |= child.state_dict(prefix=f"{name}.")
        return state

    def n_trainable(self) -> int:
        return sum(p.numel() for p in self.adapter_parameters().values())

    def check_forced_path(self, why_not: dict[str, str]) -> None:
        """ValueError if the config forces a path this layer does not have; ``why_not``: path -> the reason (paths
        the family never has may be left out). Families call it at the end of ``__init__``, so a layer never reaches
        ``forward`` with a path it lacks."""
        path = self.config.path
        if path != "auto" and path not in self.paths():
            reason = why_not.get(path, f"is not a path of {self.config.display_name()}")
            raise ValueError(
                f"path={path!r} {reason}; this {type(self.base_layer).__name__} has the path(s) "
                f"{self.paths()}. Use path='auto'."
            )

    def choose_path(self, x: torch.Tensor) -> str:
        """The path this call takes: the config's, or under "auto" the one of ``paths()`` with the fewest
        multiply-adds (``path_costs``); a tie goes to "weight" (one call of the base op), then to the earlier path of
        ``PATHS``."""
        if self.config.path != "auto":
            return self.config.path
        if len(self.paths()) == 1:
            return self.paths()[0]
        training = torch.is_grad_enabled() and any(p.requires_grad for p in self.adapter_parameters().values())
        costs = self.path_costs(x.shape, training, x.requires_grad)
        # compared one by one, not by min(key=...): under torch.compile with dynamic shapes the costs are symbolic,
        # and each comparison becomes a guard on the input's shape. Ties go to "weight", then to PATHS order.
        best = "weight" if "weight" in costs else min(costs, key=PATHS.index)
        for path in sorted(costs, key=PATHS.index):
            if costs[path] < costs[best]:
                best = path
        return best

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disabled_count and self.merged:
            raise RuntimeError(
                f"this {type(self).__name__} was merged inside boftlab.disabled(...): its base weights now hold the "
                "adapted ones, so it cannot compute the base layer's output; unmerge it, or merge outside the context"
            )
        if self.quantized_base:
            check_input_dtype(self.base_layer, x.dtype)  # float64 into a 4-bit kernel: wrong outputs
            if is_repacked(self.base_layer):
                check_unpacked(self.base_layer)  # repacked behind boftlab's back: its input gradient would be lost
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        if self.disabled_count:
            self._remember_a_checkpointed_bypass()
        if self.disabled_count or (BYPASSED_REGIONS and self._recomputes_a_bypassed_pass()):
            # the base's output, its frozen weight never written (an Embedding's max_norm)
            return base_layers.call_frozen(self.base_layer, x, *args, **kwargs)
        return self.adapted_forward(x, *args, **kwargs)

    def _remember_a_checkpointed_bypass(self) -> None:
        """In a gradient-checkpointed region's first run, record that this layer is bypassed there: the backward
        re-runs the region, maybe after the ``disabled`` block has ended, and ``_recomputes_a_bypassed_pass`` then
        bypasses it again. (Not while torch.compile traces: it cannot read the call stack.)"""
        if not torch.compiler.is_compiling():
            region = checkpoint_region()
            if region and region[0] == "first run":
                _record_bypass(region[1], id(self))

    def _recomputes_a_bypassed_pass(self) -> bool:
        """Whether this call re-runs, during a backward, a checkpointed region that ran with this layer bypassed."""
        if torch.compiler.is_compiling() or torch._C._current_graph_task_id() == -1:
            return False
        region = checkpoint_region()
        return bool(region) and region[0] == "recompute" and id(self) in BYPASSED_REGIONS.get(id(region[1]), ())

    def check_mergeable_in_place(self) -> None:
        """ValueError where a merged base layer would write into its own weights when called, so that unmerge could no
        longer give W back: an Embedding with max_norm renormalises the looked-up rows of W' in place. ``unwrap``
        (which never unmerges) and ``save_merged`` are exact there, and stay allowed."""
        base = self.base_layer
        if base_layers.renormalises_in_place(base):
            raise ValueError(
                f"cannot merge into this Embedding with max_norm={base.max_norm}: once merged, every forward would "
                "renormalise the looked-up rows of the merged table in place (as nn.Embedding does), so unmerge could "
                "no longer recover W. Keep the adapter unmerged (its weight path renormalises a temporary W', never "
                "the frozen W), or boftlab.unwrap(model) to fold it in for good."
            )

    def __getstate__(self) -> dict[str, Any]:
        """Pickle and ``copy.deepcopy`` read the layer here: refused inside ``boftlab.disabled``, whose bypass the
        copy would carry with no context left to end it."""
        if self.disabled_count:
            raise ValueError(
                f"copying this {type(self).__name__} inside boftlab.disabled(...): the copy would compute the base "
                "layer for good, with no context to switch its adapter back on. Make the copy outside the context "
                "(it is then the adapted model, and boftlab.disabled works on it as on the original)."
            )
        return super().__getstate__()

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weights: afterwards ``forward`` costs exactly the base layer's. Every new
        tensor is computed and checked (``base_after``) before any is written. On a whole model use
        ``boftlab.merge``, which also refuses to write into a tensor another module shares."""
        if self.merged:
            raise RuntimeError(f"this {type(self).__name__} is already merged; call unmerge() first")
        self.check_mergeable_in_place()
        self._write_base(self.base_after(merge=True))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weights that ``merge`` changed."""
        if not self.merged:
            raise RuntimeError(f"this {type(self).__name__} is not merged; nothing to unmerge")
        self._write_base(self.base_after(merge=False))
        self.merged = False

    @torch.no_grad()
    def base_after(self, merge: bool) -> dict[str, torch.Tensor]:
        """The base tensors ``merge()`` (or ``unmerge()``, ``merge=False``) would write, computed without writing
        anything: a ValueError if the family cannot do it or if any result holds NaN or ±inf."""
        action = "merge" if merge else "unmerge"
        try:  # a parametrization or pre-hook added after adapt would overwrite what is written
            check_plain_weight(self.base_layer)
        except ValueError as err:
            raise ValueError(f"cannot {action} into the base layer: {err}") from None
        tensors = self.merged_weights() if merge else self.unmerged_weights()
        broken = {name: int((~torch.isfinite(t)).sum()) for name, t in tensors.items() if not torch.isfinite(t).all()}
        if broken:
            adapter = [n for n, p in self.adapter_parameters().items() if not torch.isfinite(p).all()]
            base = [n for n in tensors if not torch.isfinite(getattr(self.base_layer, n)).all()]
            cause = (
                f"the adapter's own tensors {adapter} hold NaN/inf (a diverged training step?); restore them from a "
                "saved adapter or checkpoint" if adapter
                else f"the base layer's {base} already hold NaN/inf" if base
                else f"the result overflows {self.base_layer.weight.dtype}"
            )
            counts = ", ".join(f"{name}: {count} value(s)" for name, count in broken.items())
            raise ValueError(
                f"cannot {action}: the new base tensor(s) would hold NaN/inf ({counts}) — {cause}. Nothing was changed."
            )
        return tensors

    def shifted_weight(self, dtype: torch.dtype, sign: int = +1) -> torch.Tensor:
        """W + sign·ΔW of an additive family (``delta_weight``): ΔW computed and added in ``dtype``, rounded once to
        W's dtype, in ``base_layers.weight``'s layout. The additive merge (+1, in ``merge_dtype``), unmerge (−1) and a
        weight path's W' (+1, in its compute dtype) all use it. ValueError for a quantized base, whose W is packed.
        O(numel(W)) plus forming ΔW."""
        weight = base_layers.weight(self.base_layer)
        return (weight.to(dtype) + sign * self.delta_weight(dtype)).to(weight.dtype)

    def _apply(self, fn: Any, recurse: bool = True) -> "AdapterLayer":
        """``nn.Module._apply`` (``.to``, ``.half``, ``to_empty``, …), refused when it would take this adapter's tensors
        off the meta device: there they have no values, so only uninitialised memory can come out (``to_empty``),
        which nothing would set. Checked on an empty probe before anything moves."""
        if any(t.is_meta for t in self.adapter_state().values()):
            try:
                leaves_meta = not fn(torch.empty(0, device="meta")).is_meta
            except (NotImplementedError, RuntimeError):  # e.g. .to("cpu"): torch's own "Cannot copy out of meta tensor"
                leaves_meta = False
            if leaves_meta:
                raise ValueError(
                    f"this {self.config.display_name()} adapter is on the meta device: it has no values, so "
                    "materialising it (model.to_empty(...)) would give it uninitialised memory that nothing sets. "
                    "Materialise and load the base model without adapters, then adapt (or load_adapter) on it; or "
                    "give the adapted model its values with model.load_state_dict(state, assign=True)."
                )
        return super()._apply(fn, recurse)

    def _write_base(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, value in tensors.items():
            target = getattr(self.base_layer, name)
            target.copy_(value.to(target.dtype))

    # --- a whole-model state_dict: the base tensors, the adapter, the merged flag, and a guard against plain loads ---
    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        """What the module holds — its own tensors here, ``base_layer.*`` from the child — plus the merged flag and
        ``plain_guard``: O(1) per layer, no merge and no copy."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + MERGED_KEY] = torch.tensor(self.merged)
        destination.update({prefix + k: v for k, v in self.plain_guard().items()})

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        """Load a ``state_dict`` with its merged flag: base tensors saved merged load as merged, so the adapter is
        never applied twice. Refused (ValueError, before this layer changes) where the flag, the base tensors and the
        adapter tensors cannot describe one consistent layer. What the state holds under the plain names of tensors it
        also holds as ``base_layer.*`` (``plain_guard``'s empty tensors; merged copies, in states written by
        earlier versions) is dropped."""
        for name in self.base_layer.state_dict():
            if prefix + "base_layer." + name in state_dict:
                state_dict.pop(prefix + name, None)
        key = prefix + MERGED_KEY
        has_flag = key in state_dict
        merged = bool(state_dict[key]) if has_flag else self.merged
        has_base = any(k.startswith(prefix + "base_layer.") for k in state_dict)
        has_adapter = any(prefix + k in state_dict for k in self.adapter_state())
        problem = None
        if has_flag and not has_base and merged != self.merged:
            problem = f"it says merged={merged} but holds no base tensors (the layer is merged={self.merged})"
        elif merged and has_adapter != has_base:
            problem = (
                "it holds merged base tensors without the adapter tensors merged into them" if has_base
                else "it holds adapter tensors for a merged layer, whose base tensors have another adapter folded in"
            )
        elif merged and has_base and not has_flag:
            problem = "it holds base tensors without a merged flag, so it is unknown whether they are merged"
        if problem:
            raise ValueError(
                f"cannot load this state into {prefix[:-1] or 'the adapter layer'!r}: {problem}. Load a whole "
                f"state_dict() of an adapted model (it records each layer's '{MERGED_KEY}' flag), or unmerge first."
            )
        errors = len(error_msgs)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if key in unexpected_keys:
            unexpected_keys.remove(key)
        if not has_flag:
            missing_keys.append(key)
        elif len(error_msgs) == errors:
            self.merged = merged

    # --- state_dict: what a plain model finds under the plain layer's names -----------------------------------------
    def plain_guard(self) -> dict[str, torch.Tensor]:
        """A zero-size tensor under each of the base layer's parameter names (``weight``, ``bias``), in its dtype: the
        names a plain model reads where an adapted model holds ``base_layer.*``.

        Without them a plain model would load an adapted model's state as if the layer were missing: transformers'
        ``from_pretrained`` on what ``save_pretrained`` or a ``Trainer`` checkpoint wrote re-initialises it at random
        behind a warning, and ``load_state_dict(strict=False)`` keeps whatever it held. With them both fail on the shape
        (``size mismatch for ….weight: copying a param with shape torch.Size([0])``). A plain, merged model comes from
        ``boftlab.save_merged`` (a file, streamed layer by layer) or ``boftlab.unwrap``. An adapted model reads
        ``base_layer.*`` and the adapter and drops these. Nothing for sharded tensors (FSDP's sharded state dicts), which
        no plain model loads. O(1): no tensor is read.
        """
        params = dict(self.base_layer.named_parameters())
        dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", ())  # none exist until it is imported
        if any(isinstance(v, dtensor) for v in params.values()):
            return {}
        return {name: torch.empty(0, dtype=v.dtype, device=v.device) for name, v in params.items()}

    def extra_repr(self) -> str:
        return f"family={self.family!r}, merged={self.merged}, n_trainable={self.n_trainable()}"
