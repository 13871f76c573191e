"""Interoperability with Hugging Face PEFT's BOFT and OFT adapters (exact, both directions).

Parameter maps (boftlab stores each block's skew-symmetric S by its b(b−1)/2 upper entries ``skew``):

    PEFT BOFT  boft_R (m, k, b, b) = A, any matrix; PEFT uses S = (A − Aᵀ)/2 and Q = (I − S)(I + S)⁻¹ — as we do.
               boft_s: the output scale, shaped (out, 1) for Linear and (1, out) for Conv2d.
    PEFT OFT   oft_R.weight (k, b(b−1)/2) = upper entries of S_peft, S_peft = U − Uᵀ; no scale.
               exact Cayley: Q = (I − S)(I + S)⁻¹ as ours, so S_peft = S.
               Cayley–Neumann: PEFT sums I + 2S + 2S² + …, the series of (I + S)(I − S)⁻¹, so S_peft = −S.

PEFT computes the conv rotation with ``kernel_size[0]``², ``padding[0]`` and ``stride[0]`` and no dilation or
groups, so only convolutions where that is exact are exported; anything else raises ``ValueError``.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .butterfly import BOFTConfig, BOFTLayer, OFTConfig, skew_entries, skew_symmetric
from .model import TRAINABLE_ATTR, resolve_trainable, adapt, adapter_layers
from .saving import atomic_write

PEFT_PREFIX = "base_model.model."


@contextlib.contextmanager
def peft_boft_without_cuda() -> Iterator[None]:
    """Let PEFT's BOFT run m > 1 factors on a machine without its CUDA extension.

    PEFT silently falls back to one factor when ``fbd_cuda`` does not build (any CPU machine); inside this
    context its block-diagonal assembly is done by ``torch.block_diag`` instead, so PEFT computes the real BOFT.
    """

    def block_diagonal(blocks: torch.Tensor) -> torch.Tensor:  # (m, k, b, b) -> (m, k·b, k·b)
        return torch.stack([torch.block_diag(*factor) for factor in blocks])

    from peft.tuners.boft import layer

    block_diag_class = layer.FastBlockDiag
    get_fbd_cuda = layer.get_fbd_cuda
    own_apply = block_diag_class.__dict__.get("apply")  # None: ``apply`` is inherited from autograd.Function
    layer.get_fbd_cuda = lambda: True
    block_diag_class.apply = staticmethod(block_diagonal)
    try:
        yield
    finally:
        layer.get_fbd_cuda = get_fbd_cuda
        if own_apply is None:
            del block_diag_class.apply
        else:
            block_diag_class.apply = own_apply


def _single_config(model: nn.Module) -> tuple[BOFTConfig, dict[str, BOFTLayer]]:
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("the model has no boftlab adapters to export")
    others = sorted({layer.family for layer in layers.values()} - {"boft", "oft"})
    if others:
        raise ValueError(f"PEFT export covers the 'boft' and 'oft' families only; this model also has {others}")
    configs = {json.dumps(layer.config.to_dict(), sort_keys=True) for layer in layers.values()}
    if len(configs) > 1:
        raise ValueError(
            "PEFT keeps one config per adapter, but this model's BOFT/OFT layers use "
            f"{len(configs)} different configs; export them one group at a time"
        )
    config = next(iter(layers.values())).config
    if config.coft and config.family == "boft":
        raise ValueError("PEFT BOFT has no COFT constraint; export a coft=True adapter as OFTConfig(scale=False)")
    return config, layers


def _check_conv(name: str, conv: nn.Conv2d) -> None:
    kh, kw = conv.kernel_size
    uniform = lambda pair: len(set(pair)) == 1  # noqa: E731
    if (
        kh != kw or conv.groups != 1 or conv.dilation != (1, 1) or isinstance(conv.padding, str)
        or not uniform(conv.padding) or not uniform(conv.stride) or conv.padding_mode != "zeros"
    ):
        raise ValueError(
            f"PEFT's BOFT computes Conv2d {name!r} inexactly (kernel {conv.kernel_size}, stride {conv.stride}, "
            f"padding {conv.padding}, dilation {conv.dilation}, groups {conv.groups}, padding_mode "
            f"{conv.padding_mode!r}); PEFT supports square kernels, equal stride/padding, no dilation, groups=1, "
            "zero padding. boftlab itself handles this layer; only the export is refused."
        )


def to_peft(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``model``'s BOFT/OFT adapters as a PEFT adapter directory that ``PeftModel.from_pretrained`` loads
    with identical outputs. OFT without an output scale becomes PEFT OFT (Linear only); everything else PEFT BOFT."""
    import peft

    config, layers = _single_config(model)
    as_peft_oft = config.family == "oft" and not config.scale
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        base, key = layer.base_layer, PEFT_PREFIX + name
        if isinstance(base, nn.Conv2d):
            if as_peft_oft:
                raise ValueError(
                    f"PEFT OFT rotates Conv2d inputs patch-wise, which is not the same map as rotating the kernel; "
                    f"export OFT on conv layers (here {name!r}) with OFTConfig(scale=True), which maps to PEFT BOFT"
                )
            _check_conv(name, base)
        if as_peft_oft:
            sign = -1.0 if config.neumann_terms is not None else 1.0
            tensors[f"{key}.oft_R.weight"] = sign * layer.skew.detach()[0]
        else:
            scale = layer.scale.detach() if layer.scale is not None else torch.ones(layer.out_features)
            tensors[f"{key}.boft_R"] = skew_symmetric(layer.skew.detach(), layer.block_size)
            tensors[f"{key}.boft_s"] = scale[:, None] if isinstance(base, nn.Linear) else scale[None, :]
    trainable = list(getattr(model, TRAINABLE_ATTR, []))
    for name in trainable:
        tensors |= {f"{PEFT_PREFIX}{name}.{k}": v for k, v in model.get_submodule(name).state_dict().items()}
    common = dict(target_modules=sorted(layers), modules_to_save=trainable or None)
    if as_peft_oft:
        peft_config = peft.OFTConfig(
            r=0, oft_block_size=layer.block_size, module_dropout=config.dropout, coft=config.coft,
            eps=config.coft_eps, use_cayley_neumann=config.neumann_terms is not None,
            num_cayley_neumann_terms=config.neumann_terms or 5, **common,
        )
    else:
        if config.neumann_terms is not None:
            raise ValueError("PEFT BOFT uses the exact Cayley transform; export an adapter with neumann_terms=None")
        peft_config = peft.BOFTConfig(
            boft_block_size=config.block_size or 0, boft_block_num=config.n_blocks or 0,
            boft_n_butterfly_factor=config.n_factors, boft_dropout=config.dropout, **common,
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to("cpu").contiguous().clone() for k, v in tensors.items()}
    atomic_write(directory / "adapter_model.safetensors", lambda tmp: save_file(tensors, tmp, {"format": "pt"}))
    peft_config.save_pretrained(str(directory))
    return directory


def from_peft(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Put a PEFT BOFT or OFT adapter (a ``save_pretrained`` directory, safetensors) on ``model`` as boftlab
    adapters with the same outputs. In place; returns ``model``."""
    directory = Path(directory)
    config_file, weights_file = directory / "adapter_config.json", directory / "adapter_model.safetensors"
    if not config_file.is_file():
        raise ValueError(f"no PEFT adapter at {str(directory)!r}: adapter_config.json is missing")
    if not weights_file.is_file():
        raise ValueError(
            f"{str(directory)!r} has no adapter_model.safetensors; boftlab never unpickles adapter_model.bin — "
            "re-save the PEFT adapter with safe_serialization=True"
        )
    peft_config = json.loads(config_file.read_text())
    kind = peft_config.get("peft_type")
    tensors = load_file(str(weights_file))
    marker = {"BOFT": ".boft_R", "OFT": ".oft_R.weight"}.get(kind)
    if marker is None:
        raise ValueError(f"from_peft reads PEFT BOFT and OFT adapters; this one is {kind!r}")
    names = sorted(k[len(PEFT_PREFIX) : -len(marker)] for k in tensors if k.endswith(marker))
    if kind == "BOFT":
        config: BOFTConfig = BOFTConfig(
            block_size=peft_config["boft_block_size"] or None, n_blocks=peft_config["boft_block_num"] or None,
            n_factors=peft_config["boft_n_butterfly_factor"], dropout=peft_config.get("boft_dropout", 0.0),
        )
    else:
        if peft_config.get("block_share"):
            raise ValueError("PEFT OFT with block_share=True has no boftlab equivalent (one block shared by all)")
        neumann = peft_config.get("use_cayley_neumann", False)
        config = OFTConfig(
            block_size=peft_config["oft_block_size"] or None, n_blocks=peft_config["r"] or None,
            dropout=peft_config.get("module_dropout", 0.0), coft=peft_config.get("coft", False),
            coft_eps=peft_config.get("eps", 6e-5),
            neumann_terms=peft_config.get("num_cayley_neumann_terms", 5) if neumann else None,
        )
    trainable = resolve_trainable(model, list(peft_config.get("modules_to_save") or []))  # suffixes -> names
    suffixes = [".boft_R", ".boft_s"] if kind == "BOFT" else [".oft_R.weight"]
    needed = [PEFT_PREFIX + n + s for n in names for s in suffixes]
    needed += [f"{PEFT_PREFIX}{n}.{k}" for n in trainable for k in model.get_submodule(n).state_dict()]
    missing = [k for k in needed if k not in tensors]
    if not names or missing:
        raise ValueError(f"the PEFT adapter at {str(directory)!r} is incomplete: missing tensors {missing[:10]}")
    adapt(model, config, targets=names, trainable=trainable)
    layers = adapter_layers(model)
    with torch.no_grad():
        for name in names:
            layer, key = layers[name], PEFT_PREFIX + name
            if kind == "BOFT":
                a = tensors[f"{key}.boft_R"].float()
                layer.skew.copy_(skew_entries(0.5 * (a - a.transpose(-1, -2))))
                layer.scale.copy_(tensors[f"{key}.boft_s"].reshape(-1))
            else:
                sign = -1.0 if config.neumann_terms is not None else 1.0
                layer.skew.copy_(sign * tensors[f"{key}.oft_R.weight"][None])
        for name in getattr(model, TRAINABLE_ATTR, []):
            module = model.get_submodule(name)
            for k, v in module.state_dict().items():
                v.copy_(tensors[f"{PEFT_PREFIX}{name}.{k}"])
    return model
