"""How an adapter sees the layer it wraps (its *base layer*), whatever that layer stores.

Every family reasons about one weight in PyTorch's layout and one functional call that runs the base layer with
another weight. The functions here answer both for each kind of base layer:

    kind          layers                                  stored weight             the family sees
    "linear"      nn.Linear                               W (out, in)               W (out, in); y = x Wᵀ + b
                  transformers' Conv1D (GPT-2)            Wᵀ (in, out)              its transpose, a view (no copy)
    "quantized"   bitsandbytes Linear4bit, Linear8bitLt   packed nf4/fp4, or int8   shape (out, in) only: opaque
    "conv"        nn.Conv1d / Conv2d / Conv3d             W (out, in/groups, *k)    W as stored
    "embedding"   nn.Embedding                            W (num, dim)              W as stored

A quantized layer is only ever *called*: y ≈ x Wᵀ + b through bitsandbytes' own kernel. Families adapt it on their
input path (BOFT rotates x before it, SURM and the tensor core add their product beside it) and refuse to merge into
it: re-quantizing a merged W' would round it to the quantization grid again, so the merged model would no longer
compute what the adapted one does. ``dequantize_bases`` turns such bases into plain nn.Linear layers first.

Neither transformers nor bitsandbytes is imported: their layers are recognised by the module and name of the classes
a layer's type derives from, so ``import boftlab`` stays light and works where neither is installed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

KINDS = ("linear", "quantized", "conv", "embedding")
#: bitsandbytes layer classes (and their subclasses, e.g. LinearNF4) adapted as opaque quantized linear layers
QUANTIZED_LINEARS = ("Linear4bit", "Linear8bitLt")
CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _derives_from(layer_class: type, package: str, names: tuple[str, ...]) -> bool:
    """Whether ``layer_class`` or a base class of it is one of ``names`` defined in ``package`` (or a submodule).
    Remembered per class (a plain dict, which torch.compile reads as a constant): families ask on every call."""
    key = (layer_class, package, names)
    if key not in _DERIVES_FROM:
        _DERIVES_FROM[key] = any(
            cls.__name__ in names and (cls.__module__ == package or cls.__module__.startswith(package + "."))
            for cls in layer_class.__mro__
        )
    return _DERIVES_FROM[key]


_DERIVES_FROM: dict[tuple[type, str, tuple[str, ...]], bool] = {}


class _MatchedByName(type):
    """Metaclass of stand-in types: ``isinstance(x, Standin)`` checks ``x``'s classes by package and name."""

    package: str

    def __instancecheck__(cls, instance: object) -> bool:
        return isinstance(instance, nn.Module) and _derives_from(type(instance), cls.package, (cls.__name__,))


class Conv1D(metaclass=_MatchedByName):
    """Stands for ``transformers.pytorch_utils.Conv1D`` (GPT-2's linear layer: y = x·W + b, W stored in × out) in
    ``isinstance`` checks and in a config's ``supported_layers()``, without importing transformers."""

    package = "transformers"


#: the layer types every family adapts as a linear map y = x Wᵀ + b (bitsandbytes' layers subclass nn.Linear)
LINEAR_LAYERS: tuple[type, ...] = (nn.Linear, Conv1D)


def type_name(layer_type: type) -> str:
    """How messages name a supported layer type: "nn.Linear", "transformers Conv1D"."""
    if isinstance(layer_type, _MatchedByName):
        return f"{layer_type.package} {layer_type.__name__}"
    return f"nn.{layer_type.__name__}"


def kind(layer: nn.Module) -> str:
    """One of ``KINDS``, decided by the layer's class (cached per class: families ask on every call); ValueError for a
    class none of them describes. ``check_readable`` vets the instance once, when an adapter wraps it."""
    layer_class = type(layer)
    if layer_class not in _KIND_OF_CLASS:
        _KIND_OF_CLASS[layer_class] = _class_kind(layer_class)
    return _KIND_OF_CLASS[layer_class]


_KIND_OF_CLASS: dict[type, str] = {}


def _class_kind(layer_class: type) -> str:
    if issubclass(layer_class, nn.Linear) and _derives_from(layer_class, "bitsandbytes", QUANTIZED_LINEARS):
        return "quantized"
    if issubclass(layer_class, CONVOLUTIONS):
        return "conv"
    if issubclass(layer_class, nn.Embedding):
        return "embedding"
    if issubclass(layer_class, nn.Linear) or _derives_from(layer_class, Conv1D.package, ("Conv1D",)):
        return "linear"
    raise ValueError(f"boftlab has no view of a {layer_class.__name__} (known kinds: {KINDS})")


def check_readable(layer: nn.Module) -> None:
    """ValueError for a layer whose weight or bias is computed at every call from other tensors (weight_norm,
    spectral_norm, pruning, any ``torch.nn.utils.parametrize``): a merge written into it would be overwritten at the
    next call. And for an nn.Linear (subclass) whose weight is not a float (out_features, in_features) matrix: some
    quantization library boftlab does not know, whose packed weight it would misread."""
    from torch.nn.utils import parametrize

    for name in ("weight", "bias"):  # asked without computing it (a spectral_norm would take a power-iteration step)
        stored_here = name in layer._parameters or name in layer._buffers
        if not stored_here and (parametrize.is_parametrized(layer, name) or name in vars(layer)):
            _refuse_computed(layer, name)
    if kind(layer) == "linear" and isinstance(layer, nn.Linear):
        weight = layer.weight
        if not weight.is_floating_point() or tuple(weight.shape) != (layer.out_features, layer.in_features):
            raise ValueError(
                f"this {type(layer).__name__} stores its weight as {weight.dtype} of shape {tuple(weight.shape)}, not "
                f"as a float ({layer.out_features}, {layer.in_features}) matrix: a quantized layer boftlab cannot read. "
                f"Quantized layers boftlab adapts: bitsandbytes {', '.join(QUANTIZED_LINEARS)}."
            )


def _refuse_computed(layer: nn.Module, name: str) -> None:
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(layer, name):
        how = f"torch.nn.utils.parametrize ({', '.join(type(p).__name__ for p in layer.parametrizations[name])})"
        fix = f"torch.nn.utils.parametrize.remove_parametrizations(layer, {name!r})"
    else:  # torch.nn.utils.weight_norm / spectral_norm / prune: a forward pre-hook recomputes it
        how = f"a forward pre-hook ({', '.join(type(h).__name__ for h in layer._forward_pre_hooks.values())})"
        fix = "torch.nn.utils.remove_weight_norm(layer), remove_spectral_norm(layer) or prune.remove(layer, " \
              f"{name!r}), whichever made it"
    raise ValueError(
        f"this {type(layer).__name__}'s {name} is not stored but computed from other tensors at every call by {how}: "
        f"a merged adapter written into it would be overwritten at the next call, silently dropping the adaptation. "
        f"Fold it into a stored {name} first — {fix} — then adapt."
    )


def is_linear(layer: nn.Module) -> bool:
    """Whether ``layer`` computes y = x Wᵀ + b (nn.Linear, transformers Conv1D, a quantized linear layer)."""
    return kind(layer) in ("linear", "quantized")


def weight_shape(layer: nn.Module) -> tuple[int, ...]:
    """The weight's shape in PyTorch's layout for its kind, read from the layer's sizes (never from a packed tensor):
    (out, in) for every linear layer, (out, in/groups, *k) for a conv, (num, dim) for an Embedding."""
    if isinstance(layer, Conv1D):
        return (layer.nf, layer.nx)
    if isinstance(layer, nn.Linear):
        return (layer.out_features, layer.in_features)
    return tuple(layer.weight.shape)


def weight(layer: nn.Module) -> torch.Tensor:
    """The base weight in ``weight_shape``'s layout — a transposed view of a Conv1D's (in, out), sharing its storage.
    ValueError for a quantized layer: its weight exists only packed (``dequantized_weight`` reads it)."""
    if kind(layer) == "quantized":
        out_features, in_features = weight_shape(layer)
        raise ValueError(
            f"this {type(layer).__name__} ({in_features} -> {out_features}) stores its weight quantized, so an "
            "adapter cannot be folded into it exactly: a merged W' would be rounded back onto the quantization grid "
            "and the merged model would compute something else than the adapted one. Keep the adapter unmerged (its "
            "forward needs no dequantization), or call boftlab.dequantize_bases(model, dtype) first: it replaces each "
            "adapted quantized layer by an nn.Linear holding its dequantized weight, into which merge is exact."
        )
    return layer.weight.T if isinstance(layer, Conv1D) else layer.weight


def stored(layer: nn.Module, new_weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{"weight": new_weight}`` in the layer's own storage layout (transposed back for a Conv1D) — what a family's
    ``merged_weights`` returns for the contract to write."""
    if isinstance(layer, Conv1D):
        return {"weight": new_weight.T}
    return {"weight": new_weight.reshape(layer.weight.shape)}


def run(layer: nn.Module, x: torch.Tensor, new_weight: torch.Tensor) -> torch.Tensor:
    """The base layer's own computation with ``new_weight`` (``weight_shape``'s layout) in place of its weight: F.linear
    with its bias; the conv's stride, padding, padding_mode, dilation and groups; F.embedding's padding_idx, max_norm
    (applied to this temporary weight, never the frozen one), norm_type and scale_grad_by_freq. Dense gradients: sparse
    only concerns a frozen base weight."""
    layer_kind = kind(layer)
    if layer_kind == "linear":
        return F.linear(x, new_weight, layer.bias)
    if layer_kind == "conv":
        return layer._conv_forward(x, new_weight, layer.bias)
    if layer_kind == "embedding":
        return F.embedding(x, new_weight, layer.padding_idx, layer.max_norm, layer.norm_type, layer.scale_grad_by_freq)
    raise ValueError(f"a quantized {type(layer).__name__} runs only its own kernel; its weight cannot be replaced")


# --- quantized layers ------------------------------------------------------------------------------------------------
def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """(out, in) float weight of a bitsandbytes Linear4bit / Linear8bitLt: the values its kernel multiplies by.

    4-bit: ``dequantize_4bit`` with the layer's quant state (CPU and GPU kernels multiply by exactly this matrix).
    8-bit: the int8 rows times their absmax scales / 127 (LLM.int8 on a GPU also rounds the activations to int8,
    outliers aside, so the dequantized layer is the 8-bit one without that second rounding).
    """
    import bitsandbytes as bnb

    packed = layer.weight
    if getattr(packed, "quant_state", None) is not None:  # Params4bit, quantized
        return bnb.functional.dequantize_4bit(packed.data, packed.quant_state)
    scales = getattr(packed, "SCB", None)
    if scales is None and getattr(layer, "state", None) is not None:
        scales = layer.state.SCB  # Linear8bitLt moves the scales into its state at the first forward
    if packed.dtype == torch.int8 and scales is not None:
        return bnb.functional.int8_vectorwise_dequant(packed.data, scales)
    if packed.is_floating_point() and tuple(packed.shape) == weight_shape(layer):
        return packed.data  # not quantized yet (bitsandbytes quantizes when the layer moves to a device)
    raise ValueError(
        f"cannot read the weight of this {type(layer).__name__}: {type(packed).__name__} of dtype {packed.dtype}, "
        f"shape {tuple(packed.shape)}, without a 4-bit quant state or 8-bit scales"
    )


def dequantized_linear(layer: nn.Module, dtype: torch.dtype) -> nn.Linear:
    """A frozen nn.Linear in ``dtype`` holding ``dequantized_weight(layer)`` and the layer's bias. O(out·in)."""
    out_features, in_features = weight_shape(layer)
    device = layer.weight.device
    plain = nn.Linear(in_features, out_features, bias=layer.bias is not None, device=device, dtype=dtype)
    with torch.no_grad():
        plain.weight.copy_(dequantized_weight(layer).reshape(out_features, in_features))
        if layer.bias is not None:
            plain.bias.copy_(layer.bias)
    return plain.requires_grad_(False)
