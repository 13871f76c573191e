"""The adapter contract shared by every boftlab family.

An adapter *wraps* one frozen base layer and answers the same five questions whatever its family:

    forward(x)            the adapted layer's output (the base layer's alone once merged)
    merge() / unmerge()   fold the adaptation into the base weight and take it out again, exactly
    n_trainable()         how many numbers the adapter stores and trains
    n_effective()         the paper-style count of free parameters (e.g. b(b-1)/2 per skew-symmetric block)

A family is two classes: an ``AdapterConfig`` dataclass (hyper-parameters, which layer types it adapts) and an
``AdapterLayer`` (the math). Injection, reports, saving and loading are written once against this file and never
know which family they handle.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn

#: family name -> config class; filled by ``AdapterConfig.__init_subclass__``.
FAMILIES: dict[str, type["AdapterConfig"]] = {}


def nearest(value: int, choices: list[int]) -> int:
    """The choice closest to ``value`` (ties go to the smaller one) — for error messages that suggest a fix."""
    return min(choices, key=lambda c: (abs(c - value), c))


@dataclasses.dataclass
class AdapterConfig:
    """Base class of the families' configs. A subclass sets ``family`` and implements ``make_layer``."""

    family: ClassVar[str] = ""
    #: the module types ``make_layer`` accepts, for the error raised when a target has another type.
    supported_layers: ClassVar[tuple[type[nn.Module], ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("family"):
            FAMILIES[cls.family] = cls

    def make_layer(self, base_layer: nn.Module) -> "AdapterLayer":
        """Wrap ``base_layer``; raise ``ValueError`` if this config cannot adapt it."""
        raise NotImplementedError

    def display_name(self) -> str:
        """How errors name this config: the class name, plus any option that decides ``supported_layers``."""
        return type(self).__name__

    def check_supported(self, base_layer: nn.Module) -> None:
        if not isinstance(base_layer, self.supported_layers):
            names = ", ".join(f"nn.{t.__name__}" for t in self.supported_layers)
            raise ValueError(
                f"{self.display_name()} cannot adapt a {type(base_layer).__name__}; supported layer types: {names}."
            )

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

    Subclasses implement ``adapted_forward`` and, if the adaptation can be folded into the weights,
    ``merged_weights`` / ``unmerged_weights``; they register their trainable tensors as parameters of their own
    (anything under ``base_layer`` belongs to the base model).
    """

    def __init__(self, base_layer: nn.Module, config: AdapterConfig) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.config = config
        self.merged = False

    # --- the family's part -------------------------------------------------------------------------------------
    def adapted_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise NotImplementedError

    def merged_weights(self) -> dict[str, torch.Tensor]:
        """The base layer's tensors (by attribute name, e.g. ``{"weight": W'}``) with the adaptation folded in."""
        raise NotImplementedError(f"{type(self).__name__} cannot be merged into its base layer")

    def unmerged_weights(self) -> dict[str, torch.Tensor]:
        """The inverse of ``merged_weights``: the base tensors recovered from merged ones."""
        raise NotImplementedError(f"{type(self).__name__} cannot be unmerged")

    def n_effective(self) -> int:
        """Paper-style free-parameter count; equals the stored count unless the family says otherwise."""
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
        """Everything that must be saved to rebuild this adapter: its parameters and persistent buffers."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("base_layer.")}

    def n_trainable(self) -> int:
        return sum(p.numel() for p in self.adapter_parameters().values())

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        return self.adapted_forward(x, *args, **kwargs)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weights: afterwards ``forward`` costs exactly the base layer's."""
        if self.merged:
            raise RuntimeError(f"this {type(self).__name__} is already merged; call unmerge() first")
        self._write_base(self.merged_weights())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weights that ``merge`` changed."""
        if not self.merged:
            raise RuntimeError(f"this {type(self).__name__} is not merged; nothing to unmerge")
        self._write_base(self.unmerged_weights())
        self.merged = False

    def _write_base(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, value in tensors.items():
            target = getattr(self.base_layer, name)
            target.copy_(value.to(target.dtype))

    def extra_repr(self) -> str:
        return f"family={self.family!r}, merged={self.merged}, n_trainable={self.n_trainable()}"
