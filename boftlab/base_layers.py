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
compute what the adapted one does. ``dequantize_bases`` turns such bases into nn.Linear layers first
(``DequantizedLinear``: the dequantized weight, computing in the quantized layer's compute dtype).

bitsandbytes repacks a 4-bit weight for its CPU inference kernel (on CPUs with AVX512-BF16, at an eval-mode forward
whose input needs no gradient): in place and for good, with its absmax rounded to bf16, activations rounded to bf16,
and no backward for the layer's input. ``keep_unpacked`` turns that off on every 4-bit layer of an adapted model, so a
training step after an evaluation still gives every adapter its gradient, and refuses a layer already repacked.

Neither transformers nor bitsandbytes is imported: their layers are recognised by the module and name of the classes
a layer's type derives from, so ``import boftlab`` stays light and works where neither is installed.
"""

from __future__ import annotations

import math
from typing import Sequence

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
    """ValueError for an nn.Linear (subclass) whose weight is not a float (out_features, in_features) matrix: some
    quantization library boftlab does not know, whose packed weight it would misread."""
    if kind(layer) == "linear" and isinstance(layer, nn.Linear):
        weight = layer.weight
        if not weight.is_floating_point() or tuple(weight.shape) != (layer.out_features, layer.in_features):
            raise ValueError(
                f"this {type(layer).__name__} stores its weight as {weight.dtype} of shape {tuple(weight.shape)}, not "
                f"as a float ({layer.out_features}, {layer.in_features}) matrix: a quantized layer boftlab cannot read. "
                f"Quantized layers boftlab adapts: bitsandbytes {', '.join(QUANTIZED_LINEARS)}."
            )


def check_plain_weight(layer: nn.Module) -> None:
    """ValueError for a layer whose weight is recomputed on every call: a parametrization (``torch.nn.utils.parametrize``:
    ``parametrizations.weight_norm``, ``orthogonal``, …) or a forward pre-hook (the legacy ``weight_norm`` and
    ``spectral_norm``, ``torch.nn.utils.prune``, any other). An adapter reads the weight without calling the layer and
    merges into it, so the pre-hook would not run in its forward, and the next recomputation would overwrite a merge
    (the merged model would compute the base model)."""
    from torch.nn.utils import parametrize

    recomputed = []
    if parametrize.is_parametrized(layer):
        recomputed += [f"parametrization {type(p).__name__} of {name!r}"
                       for name, plist in layer.parametrizations.items() for p in plist]
    recomputed += [f"forward pre-hook {type(hook).__name__}" for hook in layer._forward_pre_hooks.values()]
    if recomputed:
        raise ValueError(
            f"this {type(layer).__name__} recomputes its weight or input on every call ({', '.join(recomputed)}): "
            "an adapter reads the weight directly and merges into it, so the hook would not run in its forward, and "
            "the next call would overwrite a merged weight (the merged model would compute the base model). Make the "
            "weight a plain tensor first, then adapt: torch.nn.utils.parametrize.remove_parametrizations(layer, "
            "'weight'), or for the legacy hooks torch.nn.utils.remove_weight_norm(layer) / "
            "remove_spectral_norm(layer), for pruning torch.nn.utils.prune.remove(layer, 'weight') (each keeps the "
            "current weight)."
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


def conv_output_size(conv: nn.Module, spatial: Sequence[int]) -> tuple[int, ...]:
    """The spatial size of ``conv``'s output for an input of spatial size ``spatial`` (Conv1d/2d/3d). O(1).

    padding="same" keeps the size (PyTorch allows it only with stride 1), "valid" is no padding; numbers follow
    ⌊(size + 2·pad − dilation·(k − 1) − 1) / stride⌋ + 1 per spatial mode.
    """
    if conv.padding == "same":
        return tuple(spatial)
    pad = (0,) * len(spatial) if conv.padding == "valid" else conv.padding
    return tuple(
        (size + 2 * p - d * (k - 1) - 1) // s + 1
        for size, p, d, k, s in zip(spatial, pad, conv.dilation, conv.kernel_size, conv.stride)
    )


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
    if isinstance(layer, DequantizedLinear):  # as the quantized layer computed: in its compute dtype
        dtype = layer.compute_dtype or x.dtype
        bias = None if layer.bias is None else layer.bias.to(dtype)
        return F.linear(x.to(dtype), new_weight.to(dtype), bias).to(x.dtype)
    if layer_kind == "linear":
        return F.linear(x, new_weight, layer.bias)
    if layer_kind == "conv":
        return layer._conv_forward(x, new_weight, layer.bias)
    if layer_kind == "embedding":
        return F.embedding(x, new_weight, layer.padding_idx, layer.max_norm, layer.norm_type, layer.scale_grad_by_freq)
    raise ValueError(f"a quantized {type(layer).__name__} runs only its own kernel; its weight cannot be replaced")


# --- the rows an orthogonal adapter rotates (BOFT/OFT) ----------------------------------------------------------------
# BOFT/OFT rotate one axis of W (out × d, a conv's flattened to out × (c/groups·kh·kw)): a linear or conv layer's input
# rows (W' = W·Rᵀ), an Embedding's output rows (each looked-up row e -> e·R). These functions answer, per kind, what
# those rows are and how the base's product continues from them, so the family's layer needs no branch on the kind.
def rotates_outputs(layer: nn.Module) -> bool:
    """Whether an orthogonal adapter rotates ``layer``'s output rows (an Embedding: its looked-up rows are rows of W)
    rather than its input rows (every linear, quantized and conv layer)."""
    return kind(layer) == "embedding"


def rotated_axis(layer: nn.Module) -> tuple[int, str]:
    """(d, its name in messages): the axis of W that the rotation mixes — in_features, in_channels/groups·kh·kw, or
    an Embedding's embedding_dim; in every case the product of ``weight_shape``'s trailing sizes."""
    name = {"conv": "in_channels/groups·kh·kw", "embedding": "embedding_dim"}.get(kind(layer), "in_features")
    return math.prod(weight_shape(layer)[1:]), name


def unfolds_exactly(layer: nn.Module) -> bool:
    """Whether ``input_rows`` reproduces the layer's own reading of its input: False only for a conv whose padding
    F.unfold cannot (padding="same"/"valid" given as a string, or a padding_mode other than "zeros")."""
    return kind(layer) != "conv" or (layer.padding_mode == "zeros" and not isinstance(layer.padding, str))


def check_input(layer: nn.Module, x: torch.Tensor) -> None:
    """ValueError for an input whose channels do not match the layer's fan-in (a linear layer's last axis, a conv's
    channel axis), before any adapter computes with it."""
    linear = kind(layer) != "conv"
    expected = weight_shape(layer)[1] if linear else layer.in_channels
    channels = x.shape[-1] if linear else x.shape[-3] if x.dim() >= 3 else None
    if channels != expected:
        shape = f"(..., {expected})" if linear else f"(batch, {expected}, height, width) or unbatched ({expected}, …)"
        raise ValueError(f"this adapted {type(layer).__name__} expects inputs of shape {shape}, got {tuple(x.shape)}")


def input_rows(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows W multiplies: x (..., in) for a linear layer; a Conv2d's patches (B, groups, L, c/groups·kh·kw),
    L output positions, by F.unfold (an unbatched (C, H, W) input as a batch of one). O(numel of the patches)."""
    if kind(layer) != "conv":
        return x
    patches = F.unfold(x if x.dim() == 4 else x[None], layer.kernel_size, layer.dilation, layer.padding, layer.stride)
    batch, _, length = patches.shape  # (B, C·kh·kw, L)
    return patches.reshape(batch, layer.groups, -1, length).transpose(-1, -2)  # (B, g, L, d)


def rows_times_weight(layer: nn.Module, rows: torch.Tensor, x_shape: Sequence[int],
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """The base's product from (transformed) ``input_rows`` of an input of ``x_shape``: rows · Wᵀ (+ ``bias``),
    (..., out); a conv's (B, out, H', W'), or (out, H', W') unbatched. O(rows · out · d)."""
    weight_2d = weight(layer)
    if kind(layer) != "conv":
        return F.linear(rows, weight_2d, bias)
    batch, groups, length, fan_in = rows.shape
    grouped = weight_2d.reshape(groups, -1, fan_in)  # (g, out/g, d)
    y = torch.einsum("bgld,god->bgol", rows, grouped).reshape(batch, -1, *conv_output_size(layer, x_shape[-2:]))
    y = y if len(x_shape) == 4 else y[0]
    return y if bias is None else y + bias.to(y.dtype).reshape(channel_shape(layer))


def channel_shape(layer: nn.Module) -> tuple[int, ...]:
    """How a per-output-channel vector (bias, scale) broadcasts over the output: (-1,) for a linear layer or an
    Embedding (the last axis), (-1, 1, 1) for a Conv2d (the channel axis before H', W')."""
    return (-1, 1, 1) if kind(layer) == "conv" else (-1,)


# --- embeddings ------------------------------------------------------------------------------------------------------
def renormalises_in_place(layer: nn.Module) -> bool:
    """Whether calling ``layer`` writes into its own weight: an Embedding with ``max_norm`` rescales every looked-up row
    whose norm exceeds it, in place."""
    return kind(layer) == "embedding" and layer.max_norm is not None


def call_frozen(layer: nn.Module, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    """``layer(x)``, except that an Embedding with ``max_norm`` renormalises the looked-up rows of a copy of its
    weight, never the frozen weight itself (the same output). O(num·dim) extra for such an Embedding."""
    if renormalises_in_place(layer):
        return run(layer, x, layer.weight.clone())
    return layer(x, *args, **kwargs)


def with_table_gradient(layer: nn.Embedding, ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``rows`` (..., d) computed for the ids ``ids`` (...), unchanged forward; backward, each row's gradient as
    F.embedding passes it to the table: zero at ``padding_idx``, and divided by how often its id occurs in ``ids``
    with ``scale_grad_by_freq``. A path that adapts the looked-up rows (not the table) calls it, so that its adapter
    gradients are the weight path's, which looks the adapted table up with those flags. O(numel(ids) + num)."""
    if (layer.padding_idx is None and not layer.scale_grad_by_freq) or not rows.requires_grad:
        return rows
    scale = torch.ones(ids.shape, dtype=rows.dtype, device=rows.device)
    if layer.scale_grad_by_freq:
        scale = scale / torch.bincount(ids.reshape(-1), minlength=layer.num_embeddings)[ids]  # 1 / count of each id
    if layer.padding_idx is not None:
        scale = scale.masked_fill(ids == layer.padding_idx, 0)
    return _ScaleGradient.apply(rows, scale[..., None])


class _ScaleGradient(torch.autograd.Function):
    """y = x; ∂L/∂x = scale ⊙ ∂L/∂y (scale broadcast to x)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(scale)
        return x.clone()

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (scale,) = ctx.saved_tensors
        return grad * scale, None


# --- quantized layers ------------------------------------------------------------------------------------------------
def n_parameters(module: nn.Module, trainable: bool = False) -> int:
    """Numbers ``module``'s parameters stand for (only those that require a gradient with ``trainable``): a
    bitsandbytes layer's weight counts its out·in logical weights, not the bytes it is packed into (two 4-bit
    weights per byte), as PEFT counts them — so a 4-bit model reports the sizes of the same model in fp32."""
    logical = {id(m.weight): math.prod(weight_shape(m)) for m in module.modules()
               if isinstance(m, nn.Linear) and kind(m) == "quantized"}
    return sum(logical.get(id(p), p.numel()) for p in module.parameters() if p.requires_grad or not trainable)


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """(out, in) float weight of a bitsandbytes Linear4bit / Linear8bitLt: the values its kernel multiplies by.

    4-bit: ``dequantize_4bit`` with the layer's quant state (CPU and GPU kernels multiply by exactly this matrix).
    8-bit: the int8 rows times their absmax scales / 127 (LLM.int8 on a GPU also rounds the activations to int8,
    outliers aside, so the dequantized layer is the 8-bit one without that second rounding).
    """
    import bitsandbytes as bnb

    check_unpacked(layer)
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


class DequantizedLinear(nn.Linear):
    """An nn.Linear holding a bitsandbytes layer's dequantized weight that computes as that layer did: the input cast
    to ``compute_dtype`` (a Linear4bit's; None: the input's own dtype, as Linear8bitLt computes), x Wᵀ + b there, the
    output cast back to the input's dtype. A plain nn.Linear in the compute dtype would refuse activations of another
    dtype, and one in the activations' dtype would compute at another precision."""

    def __init__(self, in_features: int, out_features: int, bias: bool, compute_dtype: torch.dtype | None,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.compute_dtype = compute_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run(self, x, self.weight)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", compute_dtype={self.compute_dtype}"


def computes_in_own_dtype(layer: nn.Module) -> bool:
    """Whether ``layer`` casts its input to a compute dtype of its own (a bitsandbytes layer, a ``DequantizedLinear``):
    a family then calls it on (transformed) activations rather than multiplying by its weight itself."""
    return kind(layer) == "quantized" or isinstance(layer, DequantizedLinear)


def dequantized_linear(layer: nn.Module, dtype: torch.dtype) -> DequantizedLinear:
    """A frozen ``DequantizedLinear`` holding ``dequantized_weight(layer)`` and the layer's bias in ``dtype``, computing
    in the layer's compute dtype: the same outputs. ValueError (nothing built) for a ``dtype`` that is not a floating
    torch.dtype, or that would round the values the layer computes with. O(out·in)."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(
            f"dtype must be a floating torch.dtype (torch.float32, torch.bfloat16, torch.float16, torch.float64), got "
            f"{dtype!r} ({type(dtype).__name__}): the dequantized weight is stored in it"
        )
    out_features, in_features = weight_shape(layer)
    compute = getattr(layer, "compute_dtype", None)  # a Linear4bit's; Linear8bitLt computes in its input's dtype
    weight = dequantized_weight(layer).reshape(out_features, in_features)
    for name, value in (("weight", weight), ("bias", layer.bias)):
        used = None if value is None else value.to(compute or value.dtype)  # what the layer computes with
        if used is not None and not torch.equal(value.to(dtype).to(used.dtype), used):
            change = (value.to(dtype).to(used.dtype) - used).abs().max().item()
            raise ValueError(
                f"this {type(layer).__name__} ({in_features} -> {out_features}) computes with "
                f"{used.dtype} values of its dequantized {name}, which {dtype} cannot hold exactly (they would move by "
                f"up to {change:.3g}), so the outputs would change. Use dtype={used.dtype}, or a wider float dtype "
                "(torch.float64 holds every one exactly)."
            )
    plain = DequantizedLinear(in_features, out_features, layer.bias is not None, compute, layer.weight.device, dtype)
    with torch.no_grad():
        plain.weight.copy_(weight)
        if layer.bias is not None:
            plain.bias.copy_(layer.bias)
    return plain.requires_grad_(False)


def check_input_dtype(layer: nn.Module, dtype: torch.dtype) -> None:
    """ValueError for activations of ``dtype`` that ``layer``'s own kernel computes wrongly: a bitsandbytes 4-bit
    layer whose kernel would see float64 (its compute_dtype, or the input's where it has none, bitsandbytes' default).
    Measured with 0.50.2 on CPU: fed fewer than 4 rows, its gemv kernel misreads float64 (a 64 -> 32 nf4 layer 0.15 to
    3.5 off the output of its own dequantized weight), where float32 is exact and bf16 / fp16 round."""
    if getattr(getattr(layer, "weight", None), "quant_state", None) is None:
        return
    if (getattr(layer, "compute_dtype", None) or dtype) == torch.float64:
        out_features, in_features = weight_shape(layer)
        raise ValueError(
            f"this {type(layer).__name__} ({in_features} -> {out_features}) stores 4-bit weights and would compute "
            "in float64, which bitsandbytes' 4-bit kernel computes wrongly (on CPU, for fewer than 4 rows, up to 3.5 "
            "off the output of its own dequantized weight): feed it float32, bfloat16 or float16 activations, give it "
            "a compute_dtype (bnb_4bit_compute_dtype), or call boftlab.dequantize_bases(model, torch.float64) first "
            "for a float64 model"
        )


def is_repacked(layer: nn.Module) -> bool:
    """Whether ``layer`` is a bitsandbytes 4-bit layer whose weight was ever repacked for its CPU inference kernel —
    packed now, or unpacked again by bitsandbytes (its ``state_dict()`` does that), which does not restore it: the
    absmax stays rounded to bf16 and, without nested quantization, in a transposed layout (measured with 0.50.2: a
    256 -> 64 layer's weight off by 2.05, its outputs by 17)."""
    if not (isinstance(layer, nn.Linear) and _derives_from(type(layer), "bitsandbytes", QUANTIZED_LINEARS)):
        return False
    quant_state = getattr(layer.weight, "quant_state", None)
    return bool(getattr(quant_state, "packing_format_for_cpu", False)) or hasattr(quant_state, "original_qshape")


def check_unpacked(layer: nn.Module) -> None:
    """ValueError for a 4-bit layer that bitsandbytes repacked for CPU inference (``is_repacked``)."""
    if is_repacked(layer):
        out_features, in_features = weight_shape(layer)
        raise ValueError(
            f"this {type(layer).__name__} ({in_features} -> {out_features}) was repacked by bitsandbytes for CPU "
            "inference: an eval-mode forward without gradients, on a CPU with AVX512-BF16, rewrites a 4-bit weight in "
            "place, rounds its absmax to bf16 and runs a kernel with no gradient for the layer's input (adapters "
            "before it would silently get a wrong gradient); bitsandbytes' own unpacking (at state_dict()) does not "
            "restore the weight. Load the model again and adapt it before evaluating it: boftlab.adapt turns this "
            "repacking off on every 4-bit layer of the model (boftlab.base_layers.keep_unpacked)."
        )


def keep_unpacked(model: nn.Module) -> nn.Module:
    """Turn bitsandbytes' CPU inference repacking off on every 4-bit layer of ``model`` (its
    ``support_avx512bf16_for_cpu`` flag), so eval-mode forwards compute exactly what training forwards do and no
    layer loses its input gradient afterwards; ValueError, changing nothing, if any layer is already repacked.
    O(layers).
    """
    four_bit = [m for m in model.modules() if isinstance(m, nn.Linear) and hasattr(m, "support_avx512bf16_for_cpu")
                and _derives_from(type(m), "bitsandbytes", QUANTIZED_LINEARS)]
    for layer in four_bit:
        check_unpacked(layer)
    for layer in four_bit:
        layer.support_avx512bf16_for_cpu = False
    return model


# --- what the base op costs, for the families that add beside it (SURM, the tensor core) ------------------------------
# SURM and the tensor core add their product beside the base layer's own, or run the base op once with W + ΔW. Their
# cost models need, per kind, how many vectors the base op reads and writes, what that op costs, and how the weight's
# modes are named; these answer it, so that the families' methods hold no branch on the kind for it.
def mode_names(layer: nn.Module) -> tuple[str, ...]:
    """Names of ``weight_shape``'s modes, for messages: (out_features, in_features) for a linear layer,
    (num_embeddings, embedding_dim) for an Embedding, (out_channels, in_channels/groups, kernel sizes…) for a conv."""
    layer_kind = kind(layer)
    if layer_kind == "embedding":
        return ("num_embeddings", "embedding_dim")
    if layer_kind == "conv":
        spatial = {1: ("kernel_size",), 2: ("kernel_h", "kernel_w"), 3: ("kernel_d", "kernel_h", "kernel_w")}
        return ("out_channels", "in_channels/groups") + spatial[len(layer.kernel_size)]
    return ("out_features", "in_features")


def vectors(layer: nn.Module, x_shape: Sequence[int]) -> tuple[int, int]:
    """(n_in, n_out): how many vectors one call on an input of ``x_shape`` reads and writes — the rows of a linear
    layer (both), a conv's input and output positions over the batch (Conv1d/2d/3d, batched or not), an Embedding's
    looked-up ids (both). O(1)."""
    layer_kind = kind(layer)
    if layer_kind == "embedding":
        return math.prod(x_shape), math.prod(x_shape)
    if layer_kind == "conv":
        n_spatial = len(layer.kernel_size)
        batch, spatial = math.prod(x_shape[: -n_spatial - 1]), x_shape[-n_spatial:]
        return batch * math.prod(spatial), batch * math.prod(conv_output_size(layer, spatial))
    rows = math.prod(x_shape) // weight_shape(layer)[1]
    return rows, rows


def base_cost(layer: nn.Module, x_shape: Sequence[int]) -> int:
    """Multiply-adds of one call of the base op on an input of ``x_shape``: each output vector costs the whole weight,
    n_out · Π weight_shape (rows · out · in; a conv's positions · out · in/groups · Π k); 0 for an Embedding, which
    only looks rows up. O(1)."""
    if kind(layer) == "embedding":
        return 0
    return vectors(layer, x_shape)[1] * math.prod(weight_shape(layer))
