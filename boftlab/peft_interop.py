"""Interoperability with Hugging Face PEFT's BOFT, OFT and C3A adapters, both directions: exact, or refused.

Parameter maps (boftlab stores each block's skew-symmetric S by its b(b−1)/2 upper entries ``skew``):

    PEFT BOFT  boft_R (m, k, b, b) = A, any matrix; PEFT uses S = (A − Aᵀ)/2 and Q = (I − S)(I + S)⁻¹ — as we do.
               boft_s: the output scale, shaped (out, 1) for Linear and (1, out) for Conv2d.
    PEFT OFT   oft_R.weight (k, b(b−1)/2) = upper entries of S_peft, S_peft = U − Uᵀ; no scale. On an nn.Embedding
               the same tensor is oft_embedding_R.weight (PEFT rotates the looked-up rows, as boftlab does).
               exact Cayley: Q = (I − S)(I + S)⁻¹ as ours, so S_peft = S.
               Cayley–Neumann, n terms: PEFT sums I + 2S_p + 2S_p² + … + 2S_p^(n−2) + S_p^(n−1) for n ≥ 4, and
               boftlab's (I − S)·Σ_{j≤n−2} (−S)^j expands to the same with S_p = −S. PEFT's n = 3 sums
               I + 2S_p + 2S_p² + S_p³, boftlab's 4 terms (imported as neumann_terms=4); PEFT's n = 2 (I + 2S_p) and
               n = 1 (I), and boftlab's n = 2, 3 (I + S_p, I + 2S_p + S_p²) have no counterpart and are refused.

Refused, because the other side computes something else (a ``ValueError`` says why; model and files untouched):

* PEFT OFT on Conv2d, both ways. PEFT 0.21 rotates the input's unfolded patches and puts them back with ``F.fold``,
  which *sums* overlapping patches, so even the identity rotation multiplies every input pixel by the number of
  patches covering it: PEFT's conv OFT differs from the base conv as soon as its stride-1, unpadded unfold has more
  than one patch position (identity adapter, 3×3 kernel: exact on a 3×3 input, far off on 5×5, as
  tests/test_peft_interop.py measures). boftlab's conv OFT rotates each patch's fan-in vector, i.e. the kernel, and
  is exact: export it with OFTConfig(scale=True), which PEFT computes exactly as BOFT.
* ``bias`` other than "none": PEFT trained and saved the biases; boftlab adapters keep the base bias frozen.
* a BOFT file with fewer factors than its config's ``boft_n_butterfly_factor``: PEFT trains one factor whenever its
  CUDA extension is missing, whatever the config says; set the config to what the file holds to import that.
* ``block_share``; COFT or a Cayley–Neumann series on anything exported as PEFT BOFT (BOFT, and OFT with a scale);
  convolutions PEFT computes inexactly (``_check_conv``).
* ``dropout`` > 0 on export: PEFT's multiplicative dropout replaces exactly int(p·k) blocks (BOFT: of one random
  factor), boftlab each block independently with probability p — the same eval-mode outputs, another training.
* OFT on an Embedding whose padding row is not zero, both ways: boftlab keeps that row, PEFT rotates it.
* base layers whose exchange is not verified against PEFT, both ways (``_check_exchangeable``): transformers'
  Conv1D, quantized layers, and an Embedding except under PEFT OFT.

* a PEFT version outside ``PEFT_VERSIONS``, both ways (``check_peft_version``): PEFT's OFT changed its computation in
  0.16 and 0.18, and a file exchanged with another version loads without error and computes something else (measured:
  a BOFT export loaded into PEFT 0.13 was 2.01 off, 154 relative). The range is what boftlab's tests run against.

An ``oft_block_size`` (or ``r``) that PEFT adjusted to fit a layer is read from that layer's stored tensor, as PEFT
itself recomputes it when loading.

SURM circulant ↔ PEFT C3A. PEFT's C3A (``peft.C3AConfig(block_size=b)``, nn.Linear only) adds ΔW = C(w) / d_in,
C(w) block-circulant: (d_out/b) × (d_in/b) blocks, each b × b circulant, stored as ``c3a_kernel`` (d_out/b, d_in/b, b)
with the *first row* of each block, C[i, j] = w[(j − i) mod b], applied by FFTs in fp32 whatever the model's dtype.
SURM's LoRA-style circulant adds ΔW = α·C with C[i, j] = c[(i − j) mod n], the *first column* c, one circulant over
the whole layer. On a square nn.Linear (d_out = d_in = d) with one C3A block (b = d) the two are the same map:

    w[j] = α·d·c[(−j) mod d],      c[k] = w[(−k) mod d] / (α·d)      (imported with α = 1)

Everywhere else the conversion is refused, saying why: a rectangular layer (SURM crops one max(d_out, d_in)-square
circulant, whose b × b blocks are Toeplitz, not circulant, so no C3A block size computes it), a C3A block smaller
than the layer (many independent circulant blocks, which one circulant cannot hold), SURM's other structures and
adapter mode, and any base layer but a plain nn.Linear. A C3A export also needs every adapter of the model to be SURM
circulant (PEFT keeps one adapter type per file); C3A's ``bias`` other than "none" is refused as for BOFT/OFT.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import base_layers
from .butterfly import BOFTConfig, BOFTLayer, OFTConfig, resolve_block_size, skew_entries, skew_symmetric
from .contract import AdapterConfig, AdapterLayer
from .model import (
    TRAINABLE_ATTR, adapter_layers, build_layers, canonical_modules, canonical_name, find_module, insert_layers,
    resolve_trainable,
)
from .surm import SURMConfig
from .saving import atomic_write_files, check_finite, read_checked, safetensors_writer

PEFT_PREFIX = "base_model.model."
#: the PEFT releases whose BOFT and OFT boftlab's exchange is verified against (tests/test_peft_interop.py runs them):
#: from the first, up to but excluding the second
PEFT_VERSIONS = ("0.21.0", "0.22.0")
PEFT_WEIGHTS_NAME, PEFT_CONFIG_NAME = "adapter_model.safetensors", "adapter_config.json"


CONV_OFT_REFUSAL = (
    "PEFT's OFT on Conv2d is not the map it claims: it rotates the input's unfolded patches and folds them back by "
    "summing overlapping patches, so even an identity adapter scales each input pixel by the number of patches "
    "covering it (it equals the base conv only when the input has a single patch position). boftlab's conv OFT "
    "rotates the kernel and is exact, but no boftlab adapter reproduces PEFT's map"
)


# --- boftlab -> PEFT -------------------------------------------------------------------------------------------------
def _single_config(model: nn.Module) -> tuple[BOFTConfig, dict[str, BOFTLayer]]:
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("the model has no boftlab adapters to export")
    others = sorted({layer.family for layer in layers.values()} - {"boft", "oft"})
    if others:
        raise ValueError(
            "PEFT export covers BOFT/OFT (as PEFT BOFT or OFT) and SURM circulant (as PEFT C3A), one kind per export; "
            f"this model has the families {sorted({layer.family for layer in layers.values()})}")
    configs = {json.dumps(layer.config.to_dict(), sort_keys=True) for layer in layers.values()}
    if len(configs) > 1:
        raise ValueError(
            "PEFT keeps one config per adapter, but this model's BOFT/OFT layers use "
            f"{len(configs)} different configs; export them one group at a time"
        )
    config = next(iter(layers.values())).config
    _check_options_export(config)
    return config, layers


def _check_options_export(config: BOFTConfig) -> None:
    """ValueError for every option of ``config`` PEFT cannot represent exactly (``_check_neumann_export`` checks
    ``neumann_terms``). block_size, n_blocks, n_factors and scale map onto PEFT's own options; path and kernel only
    choose how boftlab computes the same result, so PEFT needs no counterpart."""
    as_peft_oft = config.family == "oft" and not config.scale
    if config.coft and not as_peft_oft:
        raise ValueError(
            f"{type(config).__name__}(scale={config.scale}, coft=True) exports as PEFT BOFT (PEFT OFT has no output "
            "scale), and PEFT BOFT has no COFT constraint, so PEFT would compute the unconstrained rotation. Only "
            "OFTConfig(scale=False, coft=True) exports with COFT (as PEFT OFT's coft)"
        )
    if config.dropout:
        peft_option = "module_dropout" if as_peft_oft else "boft_dropout"
        raise ValueError(
            f"dropout={config.dropout}: PEFT's {peft_option} is another dropout (it replaces exactly "
            f"int(p·k) of the k blocks by the identity{'' if as_peft_oft else ', in one random factor'}, where "
            "boftlab drops each block of each factor independently with probability p), so training the exported "
            "adapter in PEFT would not continue this training. The outputs in eval mode are the same: to export for "
            "inference or for training without dropout, set `layer.config.dropout = 0.0` on every layer of "
            "boftlab.adapter_layers(model) first"
        )


def _check_exchangeable(name: str, base: nn.Module, peft_oft: bool) -> None:
    """ValueError unless PEFT computes ``base``'s adapter as boftlab does: a plain nn.Linear, an nn.Conv2d, or an
    nn.Embedding under PEFT OFT (convolutions are checked further by the caller)."""
    kind = base_layers.kind(base)
    if not (type(base) is nn.Linear or kind == "conv" or (kind == "embedding" and peft_oft)):
        raise ValueError(
            f"PEFT exchange covers BOFT/OFT on nn.Linear and nn.Conv2d, and OFT without a scale on nn.Embedding; "
            f"{name!r} is a {type(base).__name__} (boftlab adapts it, but the exchange is not verified against PEFT, "
            "so it is refused)"
        )


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


def _check_padding_row(name: str, embedding: nn.Embedding, action: str) -> None:
    """ValueError if ``embedding``'s padding row is not zero: boftlab keeps that row the base's, PEFT's OFT rotates
    it (``F.embedding`` of the rotated table), so the two agree at the padding token only while the row is zero."""
    if embedding.padding_idx is None or not embedding.weight[embedding.padding_idx].any():
        return
    row = embedding.weight[embedding.padding_idx]
    raise ValueError(
        f"cannot {action} OFT on Embedding {name!r}: its padding row (padding_idx={embedding.padding_idx}) is not "
        f"zero (norm {float(row.detach().float().norm()):.3g}). boftlab keeps the padding row the base's, PEFT's OFT "
        "rotates it, so the two differ at every padding token. Exchange adapters of this embedding through "
        "boftlab.save_adapter / load_adapter, or leave the embedding out of the targets"
    )


def _check_neumann_export(config: BOFTConfig, as_peft_oft: bool) -> None:
    if config.neumann_terms is None:
        return
    if not as_peft_oft:
        raise ValueError("PEFT BOFT uses the exact Cayley transform; export an adapter with neumann_terms=None")
    if config.neumann_terms < 4:
        series = {2: "I − S", 3: "I − 2S + S²"}[config.neumann_terms]
        raise ValueError(
            f"neumann_terms={config.neumann_terms}: boftlab's series {series} has no PEFT counterpart (PEFT's n-term "
            "series with S_peft = −S is I + 2S_peft + … + 2S_peft^(n−2) + S_peft^(n−1), its 2-term one I + 2S_peft); "
            "export an adapter trained with neumann_terms ≥ 4, or None for the exact Cayley transform"
        )


def to_peft(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``model``'s BOFT/OFT adapters, or its SURM circulant adapters, as a PEFT adapter directory that
    ``PeftModel.from_pretrained`` loads with identical outputs. OFT without an output scale becomes PEFT OFT (Linear
    only), other BOFT/OFT PEFT BOFT, SURM circulant on square nn.Linear layers PEFT C3A (one block per layer).
    What PEFT would compute differently is refused (module docstring). Both files are written atomically, the weights
    with boftlab's checksum in their metadata (PEFT ignores it)."""
    import peft

    check_peft_version(peft.__version__, "the installed PEFT, which would read this export,")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"to_peft writes a directory, but {str(directory)!r} is an existing file")
    if {layer.family for layer in adapter_layers(model).values()} == {"surm"}:
        return _write_peft(model, directory, *_c3a_export(model))
    config, layers = _single_config(model)
    as_peft_oft = config.family == "oft" and not config.scale
    _check_neumann_export(config, as_peft_oft)
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        base, key = layer.base_layer, PEFT_PREFIX + canonical_name(name)
        _check_exchangeable(name, base, as_peft_oft)
        if isinstance(base, nn.Conv2d):
            if as_peft_oft:
                raise ValueError(
                    f"cannot export OFT on Conv2d {name!r} as PEFT OFT. {CONV_OFT_REFUSAL}. Export OFT on conv layers "
                    "with OFTConfig(scale=True), which maps to PEFT BOFT (exact)"
                )
            _check_conv(name, base)
        if isinstance(base, nn.Embedding):
            _check_padding_row(name, base, "export")
        if as_peft_oft:
            sign = -1.0 if config.neumann_terms is not None else 1.0
            rotation = "oft_embedding_R" if isinstance(base, nn.Embedding) else "oft_R"
            tensors[f"{key}.{rotation}.weight"] = sign * layer.skew.detach()[0]
        else:
            scale = layer.scale.detach() if layer.scale is not None else torch.ones(layer.out_features)
            tensors[f"{key}.boft_R"] = skew_symmetric(layer.skew.detach(), layer.block_size)
            tensors[f"{key}.boft_s"] = scale[:, None] if isinstance(base, nn.Linear) else scale[None, :]
    common = dict(target_modules=sorted(map(canonical_name, layers)),
                  modules_to_save=list(getattr(model, TRAINABLE_ATTR, [])) or None)
    if as_peft_oft:
        peft_config = peft.OFTConfig(
            r=config.n_blocks or 0, oft_block_size=config.block_size or 0, module_dropout=config.dropout,
            coft=config.coft, eps=config.coft_eps, use_cayley_neumann=config.neumann_terms is not None,
            num_cayley_neumann_terms=config.neumann_terms or 5, **common,
        )
    else:
        peft_config = peft.BOFTConfig(
            boft_block_size=config.block_size or 0, boft_block_num=config.n_blocks or 0,
            boft_n_butterfly_factor=config.n_factors, boft_dropout=config.dropout, **common,
        )
    return _write_peft(model, directory, peft_config, tensors)


def _write_peft(model: nn.Module, directory: Path, peft_config: Any, tensors: dict[str, torch.Tensor]) -> Path:
    """Write ``peft_config`` and ``tensors`` with the state of the model's trainable modules (which ``peft_config``
    lists as ``modules_to_save``) as a PEFT adapter directory, both files atomically."""
    for name in getattr(model, TRAINABLE_ATTR, []):
        state = find_module(model, name).state_dict()
        tensors |= {canonical_name(f"{PEFT_PREFIX}{name}.{k}"): v for k, v in state.items()}
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    check_finite(tensors, "to_peft refuses to write an adapter with")
    options = {k: sorted(v) if isinstance(v, set) else v for k, v in peft_config.to_dict().items()}
    text = json.dumps(options, indent=2, sort_keys=True)
    atomic_write_files({
        directory / PEFT_WEIGHTS_NAME: safetensors_writer(tensors, {"format": "pt"}),
        directory / PEFT_CONFIG_NAME: lambda tmp: Path(tmp).write_text(text),
    })
    return directory


# --- SURM circulant <-> PEFT C3A -------------------------------------------------------------------------------------
def reversed_cyclic(v: torch.Tensor) -> torch.Tensor:
    """v[(−k) mod n] along the last axis: (..., n) -> (..., n). A circulant's first row from its first column and back
    (an involution)."""
    return torch.roll(torch.flip(v, [-1]), 1, -1)


def c3a_block_size(model: nn.Module, targets: Any = None) -> int:
    """PEFT C3A's ``block_size`` for ``targets`` of ``model`` (PEFT's matching: a regex, or names / dotted suffixes),
    or for ``model`` itself, one nn.Linear, when ``targets`` is None: the greatest common divisor of every targeted
    layer's in and out features, as PEFT's documentation advises. On square layers of one size d it is d, one circulant
    block per layer: d parameters, as many as SURM's circulant."""
    import peft
    from peft.tuners.tuners_utils import check_target_module_exists

    if targets is None:
        linears = [model]
    else:
        matcher = peft.C3AConfig(target_modules=targets)
        linears = [m for name, m in model.named_modules() if name and check_target_module_exists(matcher, name)]
    wrong = sorted({type(m).__name__ for m in linears if type(m) is not nn.Linear})
    if not linears or wrong:
        raise ValueError(
            "PEFT's C3A adapts plain nn.Linear layers only (no convolutions, no quantized layers); "
            f"targets={targets!r} " + (f"select {wrong}" if wrong else "select no layer")
            + " — choose targets that select nn.Linear layers"
        )
    return math.gcd(*(n for m in linears for n in (m.in_features, m.out_features)))


def _check_c3a_import(name: str, module: nn.Module, kernel: torch.Tensor) -> None:
    """ValueError unless ``kernel`` is one C3A block covering the square nn.Linear ``module``: the only C3A that a
    SURM circulant computes (module docstring)."""
    if type(module) is not nn.Linear:
        raise ValueError(f"the PEFT C3A adapter targets {name!r}, a {type(module).__name__}; C3A adapts nn.Linear only")
    d_out, d_in = module.out_features, module.in_features
    if kernel.dim() != 3 or (kernel.shape[0] * kernel.shape[2], kernel.shape[1] * kernel.shape[2]) != (d_out, d_in):
        raise ValueError(
            f"the PEFT C3A adapter's c3a_kernel for {name!r} has shape {list(kernel.shape)}, which is no C3A layout "
            f"(d_out/b, d_in/b, b) for this layer ({d_in} -> {d_out}); was it saved for another model?"
        )
    if kernel.shape[:2] != (1, 1):
        m, n, b = kernel.shape
        raise ValueError(
            f"cannot import PEFT C3A on {name!r} as SURM circulant: its block size {b} splits the {d_in} -> {d_out} "
            f"layer into {m} × {n} independent circulant blocks, and SURM's circulant is one circulant over the whole "
            "layer (cropped to its shape), which cannot hold them. Only C3A with one block per layer (block_size = "
            "in_features = out_features) imports exactly"
        )


def _c3a_export(model: nn.Module) -> tuple[Any, dict[str, torch.Tensor]]:
    """PEFT's C3AConfig and ``c3a_kernel`` tensors computing what ``model``'s adapters (all SURM) compute, or a
    ValueError saying which layer cannot be exported and why (module docstring)."""
    import peft

    tensors, sizes = {}, {}
    for name, layer in adapter_layers(model).items():
        config, base = layer.config, layer.base_layer
        if config.mode != "lora" or config.structure != "circulant":
            raise ValueError(
                f"cannot export {name!r} (SURM {config.structure!r}, mode={config.mode!r}) as PEFT C3A: C3A adds a "
                "block-circulant ΔW to the weight, the map of SURMConfig(structure='circulant', mode='lora') only"
            )
        if type(base) is not nn.Linear:
            raise ValueError(
                f"cannot export {name!r} as PEFT C3A: C3A adapts nn.Linear only, and {name!r} is a "
                f"{type(base).__name__} (boftlab adapts it; only the export is refused)"
            )
        if base.out_features != base.in_features:
            raise ValueError(
                f"cannot export {name!r} ({base.in_features} -> {base.out_features}) as PEFT C3A: on a rectangular "
                "layer SURM's circulant is the top-left crop of one max(d_out, d_in)-square circulant, whose b × b "
                "blocks are Toeplitz, not circulant, so no C3A block size computes it. Only square nn.Linear layers "
                "exchange (one C3A block of size d)"
            )
        d = base.in_features
        column = layer.matrix.first_column.detach()
        kernel = config.alpha * d * reversed_cyclic(column.double())  # the first row of α·C, times d_in
        tensors[f"{PEFT_PREFIX}{canonical_name(name)}.c3a_kernel"] = kernel.to(column.dtype).reshape(1, 1, d)
        sizes[canonical_name(name)] = d
    block_size = max(set(sizes.values()), key=list(sizes.values()).count)
    pattern = {re.escape(n): d for n, d in sizes.items() if d != block_size}
    for name, d in sizes.items():  # PEFT's own rule for which pattern key sets a layer's block size (c3a/model.py)
        key = next((k for k in pattern if re.match(rf".*\.{k}$", name)), name)
        if pattern.get(key, block_size) != d:
            raise ValueError(
                f"cannot export as PEFT C3A: PEFT would give {name!r} (size {d}) the block size of pattern {key!r} "
                f"({pattern.get(key, block_size)}); export layers of different sizes whose names do not end alike "
                "one group at a time"
            )
    config = peft.C3AConfig(block_size=block_size, block_size_pattern=pattern, target_modules=sorted(sizes),
                            modules_to_save=list(getattr(model, TRAINABLE_ATTR, [])) or None)
    return config, tensors


def _release(version: str) -> tuple[int, ...]:
    """(0, 21, 2) for "0.21.2", "0.21.2.dev0@abc", "0.21.2+local" or "0.21.2rc1": the numeric release part."""
    if not version[:1].isdigit():
        return ()
    return tuple(int(n) for n in re.match(r"\d+(?:\.\d+)*", version).group().split("."))


def check_peft_version(version: str | None, what: str) -> None:
    """ValueError unless ``version`` lies in ``PEFT_VERSIONS``; ``what`` says whose version it is."""
    low, high = PEFT_VERSIONS
    if version is None or not (_release(low) <= _release(str(version)) < _release(high)):
        raise ValueError(
            f"{what} is PEFT {version or '(unrecorded: older than PEFT records)'}; boftlab's exchange with PEFT is "
            f"verified for PEFT >= {low}, < {high} only — PEFT's OFT changed its computation in 0.16 and 0.18, so an "
            f"adapter exchanged with another version would load and compute something else. Use "
            f"pip install 'peft>={low},<{high}' (the version in boftlab's constraints.txt)."
        )


# --- PEFT -> boftlab -------------------------------------------------------------------------------------------------
def _config_from_peft(peft_config: dict[str, Any], kind: str) -> AdapterConfig:
    """The boftlab config a PEFT ``adapter_config.json`` describes, or a ValueError for what boftlab cannot
    reproduce exactly (module docstring)."""
    bias = peft_config.get("bias", "none")
    if bias != "none":
        raise ValueError(
            f"the PEFT adapter was trained with bias={bias!r}: PEFT trained and saved biases of the base model, while "
            "boftlab adapters keep the base layer's bias frozen and do not store it, so the import would drop them "
            "and change the outputs. Import adapters trained with bias='none'"
        )
    if kind == "C3A":
        return SURMConfig(structure="circulant")  # α = 1: each layer's 1/d_in goes into its first column
    if kind == "BOFT":
        return BOFTConfig(
            block_size=peft_config["boft_block_size"] or None, n_blocks=peft_config["boft_block_num"] or None,
            n_factors=peft_config["boft_n_butterfly_factor"], dropout=peft_config.get("boft_dropout", 0.0),
        )
    if peft_config.get("block_share"):
        raise ValueError("PEFT OFT with block_share=True has no boftlab equivalent (one block shared by all)")
    neumann = peft_config.get("num_cayley_neumann_terms", 5) if peft_config.get("use_cayley_neumann", False) else None
    if neumann is not None and neumann < 3:
        series = "I" if neumann < 2 else "I + 2S"
        raise ValueError(
            f"PEFT OFT with num_cayley_neumann_terms={neumann} computes Q = {series}, which is no boftlab series "
            "(boftlab's n-term one is I + 2S + … + 2S^(n−2) + S^(n−1), n ≥ 2, with PEFT's S); "
            "retrain with num_cayley_neumann_terms ≥ 3 or use_cayley_neumann=False"
        )
    return OFTConfig(
        block_size=peft_config["oft_block_size"] or None, n_blocks=peft_config["r"] or None,
        dropout=peft_config.get("module_dropout", 0.0), coft=peft_config.get("coft", False),
        coft_eps=peft_config.get("eps", 6e-5), neumann_terms=None if neumann is None else max(neumann, 4),
    )


def _layer_config(config: BOFTConfig, name: str, module: nn.Module, stored: torch.Tensor) -> BOFTConfig:
    """The config for one layer given its stored ``boft_R`` (m, k, b, b) or ``oft_R.weight`` (k, b(b−1)/2)."""
    fan_in = math.prod(base_layers.weight_shape(module)[1:])  # by the layer's sizes: a 4-bit weight is packed
    if config.family == "boft":
        m, k, b = (stored.shape[:3] if stored.dim() == 4 else (None, None, None))
    else:
        k = stored.shape[0] if stored.dim() == 2 else None
        b = (1 + math.isqrt(1 + 8 * stored.shape[-1])) // 2 if stored.dim() == 2 else None
        m = 1
    if b is None or k * b != fan_in or stored.shape[-1] != (b if config.family == "boft" else b * (b - 1) // 2):
        raise ValueError(
            f"the PEFT adapter's tensor for {name!r} has shape {list(stored.shape)}, which is no {config.family} "
            f"layout for this layer's fan-in {fan_in}; was it saved for another model?"
        )
    if m != config.n_factors:
        raise ValueError(
            f"the PEFT BOFT adapter stores {m} butterfly factor(s) for {name!r} (boft_R of shape "
            f"{list(stored.shape)}), but its adapter_config.json says boft_n_butterfly_factor={config.n_factors}: "
            "PEFT trains a single factor whenever its CUDA extension (fbd_cuda) is missing, whatever the config "
            "says, and a PEFT with the extension cannot load this file. To import what was trained, set "
            f"boft_n_butterfly_factor to {m} in adapter_config.json"
        )
    try:
        wanted = resolve_block_size(fan_in, config.block_size, config.n_blocks, config.n_factors, "fan-in")
    except ValueError:
        wanted = None
    if wanted == b:
        return config
    if config.family == "boft":
        raise ValueError(
            f"the PEFT BOFT adapter stores blocks of size {b} for {name!r}, but its config gives {wanted} for this "
            "layer; PEFT could not load this file either — was it saved for another model?"
        )
    return dataclasses.replace(config, block_size=b, n_blocks=None)  # PEFT adjusted oft_block_size / r to fit


def from_peft(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Put a PEFT BOFT, OFT or C3A adapter (a ``save_pretrained`` directory, safetensors) on ``model`` as boftlab
    adapters with the same outputs (C3A as SURM circulant), or raise ``ValueError`` for what boftlab cannot reproduce
    (module docstring) and leave ``model`` untouched. In place; returns ``model``."""
    directory = Path(directory)
    config_file, weights_file = directory / PEFT_CONFIG_NAME, directory / PEFT_WEIGHTS_NAME
    if not config_file.is_file():
        raise ValueError(f"no PEFT adapter at {str(directory)!r}: adapter_config.json is missing")
    if not weights_file.is_file():
        raise ValueError(
            f"{str(directory)!r} has no adapter_model.safetensors; boftlab never unpickles adapter_model.bin — "
            "re-save the PEFT adapter with safe_serialization=True"
        )
    try:
        peft_config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{str(config_file)!r} is not valid JSON ({err}), so it is no PEFT adapter config") from err
    kind = peft_config.get("peft_type") if isinstance(peft_config, dict) else None
    markers = {"BOFT": (".boft_R",), "OFT": (".oft_R.weight", ".oft_embedding_R.weight"),
               "C3A": (".c3a_kernel",)}.get(kind)
    if markers is None and kind is None and isinstance(peft_config, dict) and "groups" in peft_config:
        raise ValueError(
            f"{str(directory)!r} holds a boftlab adapter (written by boftlab.save_adapter), not a PEFT one: load it "
            "with boftlab.load_adapter(model, path)"
        )
    if markers is None:
        raise ValueError(
            f"from_peft reads PEFT BOFT, OFT and C3A adapters; this one is {kind!r}"
            + ("" if kind is not None else " (its adapter_config.json names no peft_type)")
        )
    check_peft_version(peft_config.get("peft_version"), f"the PEFT that wrote {str(config_file)!r}")
    config = _config_from_peft(peft_config, kind)
    _, tensors = read_checked(weights_file, "PEFT adapter")
    rotations = {k[len(PEFT_PREFIX) : -len(m)]: k for k in tensors for m in markers if k.endswith(m)}  # name -> key
    names = sorted(rotations)
    here = canonical_modules(model)  # PEFT's names are canonical; a compiled submodule's differ here
    modules = {canonical: model.get_submodule(name) for canonical, name in here.items()}
    unknown = [n for n in names if n not in modules]
    if unknown:
        raise ValueError(f"the PEFT adapter targets module(s) {unknown[:5]} that this model does not have")
    for name in names:
        if kind == "C3A":
            _check_c3a_import(name, modules[name], tensors[rotations[name]])
            continue
        _check_exchangeable(name, modules[name], kind == "OFT")
        if isinstance(modules[name], nn.Embedding):
            _check_padding_row(name, modules[name], "import")
    convs = [n for n in names if kind == "OFT" and isinstance(modules[n], nn.Conv2d)]
    if convs:
        raise ValueError(f"cannot import PEFT OFT on Conv2d {convs[:5]}. {CONV_OFT_REFUSAL}")
    trainable = resolve_trainable(model, list(peft_config.get("modules_to_save") or []))  # suffixes -> names
    needed = ([PEFT_PREFIX + n + s for n in names for s in (".boft_R", ".boft_s")] if kind == "BOFT"
              else [rotations[n] for n in names])
    needed += [canonical_name(f"{PEFT_PREFIX}{n}.{k}") for n in trainable for k in find_module(model, n).state_dict()]
    missing = [k for k in needed if k not in tensors]
    if not names or missing:
        raise ValueError(f"the PEFT adapter at {str(directory)!r} is incomplete: missing tensors {missing[:10]}")
    check_finite({k: tensors[k] for k in needed}, f"the PEFT adapter {str(weights_file)!r} holds")
    not_real = [(k, str(tensors[k].dtype)) for k in needed
                if tensors[k].is_complex() or not tensors[k].is_floating_point()]
    if not_real:
        raise ValueError(
            f"the PEFT adapter {str(weights_file)!r} holds tensors that are not real floating-point (name, dtype): "
            f"{not_real[:5]}; PEFT writes its adapter parameters as floats — the file is damaged or not PEFT's"
        )

    layers: dict[str, AdapterLayer] = {}
    for name in names:
        stored = tensors[rotations[name]]
        layer_config = config if kind == "C3A" else _layer_config(config, name, modules[name], stored)
        layers |= build_layers(model, layer_config, [here[name]])
    values = {}  # every value checked against its target's shape before anything changes
    for name, layer in layers.items():
        key = PEFT_PREFIX + canonical_name(name)
        if kind == "BOFT":
            a = tensors[f"{key}.boft_R"].float()
            values[layer.skew] = skew_entries(0.5 * (a - a.transpose(-1, -2)))
            values[layer.scale] = tensors[f"{key}.boft_s"].reshape(-1)
        elif kind == "C3A":  # ΔW = C(w)/d_in, first row w -> SURM's first column c, α = 1
            kernel = tensors[rotations[name]].double().reshape(-1)
            values[layer.matrix.first_column] = reversed_cyclic(kernel) / kernel.numel()
        else:
            sign = -1.0 if config.neumann_terms is not None else 1.0
            values[layer.skew] = sign * tensors[rotations[name]][None]
    for name in trainable:
        values |= {v: tensors[canonical_name(f"{PEFT_PREFIX}{name}.{k}")]
                   for k, v in find_module(model, name).state_dict().items()}
    wrong = [(list(v.shape), list(target.shape)) for target, v in values.items() if v.shape != target.shape]
    if wrong:
        raise ValueError(f"the PEFT adapter's tensors do not fit this model (stored, expected): {wrong[:5]}")

    with torch.no_grad():
        for target, value in values.items():
            target.copy_(value)  # state_dict() tensors share storage with the parameters
    setattr(model, TRAINABLE_ATTR, sorted(set(getattr(model, TRAINABLE_ATTR, [])) | set(trainable)))
    insert_layers(model, layers)
    return model
