"""Parameter counts: per layer from the adapters themselves, then sums over real architectures built on the ``meta``
device.

A boftlab family's count for a layer is the effective count of a meta-device layer of that shape built by
``config.make_layer`` (``AdapterLayer.n_effective``; no memory, no download), so counts and layers cannot drift apart
and ``layer_count`` agrees with ``summary(model).effective``. *Effective* has one meaning, defined at
``AdapterLayer.n_effective``: the numbers of the method's own parametrisation, as boftlab stores them, with no gauge
subtracted in any method (LoRA's r·(d + n) keeps its r² gauge, the tensor core its per-mode GL(r_n) gauge), so that
methods compare. Convention "peft" counts what PEFT stores instead (OFT/BOFT: full b × b blocks). The closed forms,
tested equal to those counts in tests/test_counts.py, per adapted layer with fan-in d (in_features, or
in_channels/groups·kh·kw) and fan-out n:

    OFT / BOFT, m factors of k = d/b   m·k·b(b−1)/2   free entries of the skew-symmetric blocks ("effective")
      output scale s (BOFT, optional)  + n
    SURM (LoRA-style, S: n × d)        circulant max(n, d) · Toeplitz n + d − 1 · Kronecker m1·n1 + m2·n2 ·
                                       LDR of displacement rank r: 2·r·max(n, d)   (``surm.parameter_count``)
    SURM (adapter-style, S: n × n)     the same with d = n, + n for the adapter bias
    FLoRA / tensor core, ranks r_i     Π r_i + Σ d_i·r_i over the weight's modes (out, in[, kh, kw])
                                       (``tensor_core.tucker_n_params``)

What is not a boftlab layer stays a small closed form here:

    LoRA (PEFT's), rank r              r·(d + n)
    OFT / BOFT as PEFT stores them     m·k·b² (full b × b blocks, convention "peft") + n for the scale
    dense orthogonal matrix            d(d−1)/2
    a trained base bias                + n (``trained_bias``; the BOFT paper's tables count it)

The architectures are built from hand-written configs (values copied from the hub ``config.json`` named in each
``source``) under ``torch.device("meta")``: every module and shape is real, no weight is allocated, nothing is
downloaded.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Callable

import torch
from torch import nn

from . import base_layers
from .butterfly import BOFTLayer
from .contract import FAMILIES, check_integer

CONVENTIONS = ("effective", "peft")


# --- closed forms per layer ------------------------------------------------------------------------------------------
def _size(name: str, value: Any) -> int:
    """``value`` as an int ≥ 1 (a NumPy integer is one), or a ValueError saying what was given."""
    value = check_integer(name, value)
    if value < 1:
        raise ValueError(f"{name} must be an integer ≥ 1 (a layer's size or a rank), got {value}")
    return value


def _switch(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def lora_params(fan_in: int, fan_out: int, rank: int) -> int:
    """LoRA's A (r × d) and B (n × r): r·(d + n). ValueError unless every argument is an integer ≥ 1."""
    return _size("rank", rank) * (_size("fan_in", fan_in) + _size("fan_out", fan_out))


def orthogonal_group_dim(dim: int) -> int:
    """d(d−1)/2: the free parameters of a dense d × d orthogonal matrix (one skew-symmetric matrix)."""
    dim = _size("dim", dim)
    return dim * (dim - 1) // 2


def boft_params(
    fan_in: int,
    fan_out: int,
    block_size: int | None = None,
    n_factors: int = 2,
    scale: bool = True,
    trained_bias: bool = False,
    convention: str = "effective",
    n_blocks: int | None = None,
) -> int:
    """m·k·b(b−1)/2 ("effective") or m·k·b² ("peft") for the blocks, + n for the scale, + n for a trained bias.

    Give ``block_size`` (b) or ``n_blocks`` (k = d/b, how OFT/BOFT's diffusion experiments state it). Counted from a
    meta-device ``BOFTLayer`` (``layer_count``); raises its ValueError (listing valid choices) when (d, b, m) is not
    a butterfly.
    """
    if block_size is None and n_blocks is None:
        raise ValueError("give block_size or n_blocks")
    shape = LayerShape("layer", _size("fan_in", fan_in), _size("fan_out", fan_out), trained_bias, "linear")
    return layer_count(shape, "boft", convention, trained_bias, block_size=block_size, n_blocks=n_blocks,
                       n_factors=n_factors, scale=scale)


def oft_params(
    fan_in: int,
    fan_out: int,
    block_size: int | None = None,
    scale: bool = False,
    trained_bias: bool = False,
    convention: str = "effective",
    n_blocks: int | None = None,
) -> int:
    """OFT is BOFT with one factor: k·b(b−1)/2 (or k·b²), plus optional scale / trained bias vectors."""
    return boft_params(fan_in, fan_out, block_size, 1, scale, trained_bias, convention, n_blocks)


# --- layers of an architecture ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LayerShape:
    """One adaptable layer: its name, fan-in d, fan-out n, whether it has a bias, and its type."""

    name: str
    fan_in: int
    fan_out: int
    has_bias: bool
    kind: str  # "linear" | "conv2d"
    weight_shape: tuple[int, ...] = ()  # (out, in) or (out, in/groups, kh, kw); defaults to (fan_out, fan_in)

    @property
    def modes(self) -> tuple[int, ...]:
        return self.weight_shape or (self.fan_out, self.fan_in)


def layer_shapes(model: nn.Module, targets: list[str] | str) -> list[LayerShape]:
    """The nn.Linear / nn.Conv2d modules whose name ends with one of ``targets`` (or matches the regex string).

    O(number of modules); works on meta tensors. Raises ValueError when nothing matches, listing the suffixes there are.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module (e.g. counts.build('vit-b/16')), got {type(model).__name__}")
    suffixes = isinstance(targets, (list, tuple)) and all(isinstance(t, str) for t in targets)
    if not (isinstance(targets, str) or suffixes):
        raise ValueError(f"targets must be a regex string or a list of module-name suffixes, got {targets!r}")
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        if isinstance(targets, str):
            hit = re.fullmatch(targets, name) is not None
        else:
            hit = any(name == t or name.endswith("." + t) for t in targets)
        if hit:
            kind = "linear" if isinstance(module, nn.Linear) else "conv2d"
            shape = base_layers.weight_shape(module)  # (out, in) of a 4-bit layer too, never its packed shape
            found.append(LayerShape(name, math.prod(shape[1:]), shape[0], module.bias is not None, kind, shape))
    if not found:
        suffixes = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))})
        raise ValueError(f"no nn.Linear/nn.Conv2d matches targets={targets!r}; layer names end with: {suffixes}")
    return found


def methods() -> tuple[str, ...]:
    """What ``layer_count`` counts: PEFT's LoRA, then every boftlab family (``contract.FAMILIES``)."""
    return ("lora", *FAMILIES)


def layer_count(shape: LayerShape, method: str, convention: str = "effective", trained_bias: bool = False,
                **options: Any) -> int:
    """Parameters ``method`` adds to one layer of ``shape``.

    "lora": PEFT's LoRA, ``options`` = {rank}. A boftlab family (``methods()``): ``options`` are its config's
    keyword arguments, and the count is what ``make_layer`` stores on a meta-device layer of this shape; with
    convention="peft" (OFT/BOFT), what PEFT stores instead: full b × b blocks and the scale. ``trained_bias``: + n for
    the base layer's bias, trained as well. O(one meta layer), cached per shape and options.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    if not isinstance(shape, LayerShape):
        raise ValueError(f"shape must be a LayerShape (e.g. from layer_shapes(model, targets)), got {shape!r}")
    _switch("trained_bias", trained_bias)
    for i, size in enumerate(shape.modes):
        _size(f"the layer's weight shape {shape.modes}[{i}]", size)
    if method == "lora":
        if set(options) != {"rank"}:
            raise ValueError(f"method 'lora' takes one option, rank; got {sorted(options)}")
        count = lora_params(shape.fan_in, shape.fan_out, options["rank"])
    elif method in FAMILIES:
        frozen = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in options.items()))
        count = _family_count(shape.modes, method, convention, frozen)
    else:
        raise ValueError(f"unknown method {method!r}; methods: {methods()}")
    return count + (shape.fan_out if trained_bias else 0)


@functools.lru_cache(maxsize=None)
def _family_count(modes: tuple[int, ...], family: str, convention: str, options: tuple) -> int:
    if len(modes) not in (2, 4):
        raise ValueError(f"a layer's weight is (out, in) or (out, in/groups, kh, kw), got {modes}")
    config = FAMILIES[family](**dict(options))
    out, fan_in, *kernel = modes
    base = nn.Linear(fan_in, out, device="meta") if not kernel else nn.Conv2d(fan_in, out, kernel, device="meta")
    with torch.random.fork_rng(devices=[]):  # random initial factors (drawn on the CPU) leave the caller's RNG alone
        layer = config.make_layer(base)
    if convention == "effective":
        return layer.n_effective()  # the one definition of "effective", as summary(model).effective
    if not isinstance(layer, BOFTLayer):
        raise ValueError(f"convention='peft' counts OFT/BOFT's full b × b blocks; {family!r} has no such blocks")
    scale = 0 if layer.scale is None else layer.scale.numel()
    return layer.n_factors * layer.n_blocks * layer.block_size**2 + scale


# --- architectures from configs, on the meta device -----------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Architecture:
    name: str
    source: str  # where the config values come from
    build: Callable[[], nn.Module]
    targets: dict[str, list[str]]  # named target sets, e.g. "all linear" -> module-name suffixes


def _deberta_v3_base() -> nn.Module:
    from transformers import DebertaV2Config, DebertaV2Model

    config = DebertaV2Config(
        vocab_size=128100, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        max_position_embeddings=512, relative_attention=True, position_buckets=256, norm_rel_ebd="layer_norm",
        share_att_key=True, pos_att_type=["p2c", "c2p"], layer_norm_eps=1e-7, max_relative_positions=-1,
        position_biased_input=False, type_vocab_size=0,
    )
    return DebertaV2Model(config)


def _vit_b16() -> nn.Module:
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                       image_size=224, patch_size=16, qkv_bias=True)
    return ViTModel(config, add_pooling_layer=False)


def _dinov2_large() -> nn.Module:
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4,
                          patch_size=14, image_size=518, layerscale_value=1.0, qkv_bias=True)
    return Dinov2Model(config)


def _llama2_7b() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                         rms_norm_eps=1e-5, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


_SD_UNET = dict(
    in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)


def _sd15_unet() -> nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**_SD_UNET, sample_size=64, cross_attention_dim=768, attention_head_dim=8)


def _sd21_unet() -> nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**_SD_UNET, sample_size=96, cross_attention_dim=1024,
                                attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)


_ATTN_QKV = ["to_q", "to_k", "to_v"]
ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in [
        Architecture(
            "deberta-v3-base", "hf.co/microsoft/deberta-v3-base config.json", _deberta_v3_base,
            {"all linear": ["query_proj", "key_proj", "value_proj", "attention.output.dense", "intermediate.dense",
                            "output.dense"],
             "query, value": ["query_proj", "value_proj"]},
        ),
        Architecture(
            "vit-b/16", "hf.co/google/vit-base-patch16-224-in21k config.json (ViT-B/16, 224 px)", _vit_b16,
            {"all linear": ["q_proj", "k_proj", "v_proj", "o_proj", "mlp.fc1", "mlp.fc2"],
             "query, value": ["q_proj", "v_proj"]},
        ),
        Architecture(
            "dinov2-large", "hf.co/facebook/dinov2-large config.json (ViT-L/14, the BOFT paper's VTAB backbone)",
            _dinov2_large,
            {"all linear": ["q_proj", "k_proj", "v_proj", "o_proj", "mlp.fc1", "mlp.fc2"],
             "query, value": ["q_proj", "v_proj"]},
        ),
        Architecture(
            "llama-2-7b", "hf.co/meta-llama/Llama-2-7b-hf config.json", _llama2_7b,
            {"all linear": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
             "query, value": ["q_proj", "v_proj"]},
        ),
        Architecture(
            "sd-1.5-unet", "hf.co/runwayml/stable-diffusion-v1-5 unet/config.json", _sd15_unet,
            {"attention q, k, v": _ATTN_QKV},
        ),
        Architecture(
            "sd-2.1-unet", "hf.co/stabilityai/stable-diffusion-2-1 unet/config.json (the BOFT paper's SD, App. A.5)",
            _sd21_unet,
            {"attention q, k, v": _ATTN_QKV},
        ),
    ]
}


@functools.lru_cache(maxsize=None)
def build(name: str) -> nn.Module:
    """The architecture ``name`` on the meta device (cached): real modules and shapes, no memory, no download."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; known: {sorted(ARCHITECTURES)}")
    with torch.device("meta"):
        return ARCHITECTURES[name].build()


def n_base_params(name: str) -> int:
    """Total parameters of the base architecture."""
    return sum(p.numel() for p in build(name).parameters())


def resolve_targets(name: str, targets: list[str] | str) -> list[str] | str:
    """A named target set of the architecture (e.g. "all linear") or the targets as given."""
    known = ARCHITECTURES[name].targets
    return known[targets] if isinstance(targets, str) and targets in known else targets


def count(name: str, method: str, targets: list[str] | str = "all linear", **hyper: Any) -> int:
    """Σ over the targeted layers of ``name`` of ``layer_count(shape, method, **hyper)``. O(number of modules)."""
    shapes = layer_shapes(build(name), resolve_targets(name, targets))
    return sum(layer_count(s, method, **hyper) for s in shapes)


def count_by_suffix(name: str, method: str, targets: list[str] | str = "all linear", **hyper: Any) -> dict[str, int]:
    """The same sum, split by the layers' name suffix (e.g. query_proj, intermediate.dense)."""
    out: dict[str, int] = {}
    for s in layer_shapes(build(name), resolve_targets(name, targets)):
        key = re.sub(r"^.*\.\d+\.", "", s.name)  # drop everything up to the last block index
        out[key] = out.get(key, 0) + layer_count(s, method, **hyper)
    return out


# --- the papers' tables ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PaperRow:
    """One "# Param" entry of a paper's table and how we reproduce it."""

    where: str  # paper, table, page
    model: str
    method: str
    label: str  # as the paper writes it
    targets: str
    hyper: dict[str, Any]
    reported: str  # as printed, e.g. "0.75M" or "0.12%"
    convention: str  # what is counted to reproduce it
    note: str = ""  # why our number differs from the printed one, where it does

    def ours(self) -> int:
        return count(self.model, self.method, self.targets, **self.hyper)

    def ours_as_reported(self) -> str:
        """Our count in the paper's unit and precision ("M" with the same decimals, or "%" of the base model)."""
        value = self.ours()
        number = self.reported.rstrip("M%")
        decimals = len(number.split(".")[1]) if "." in number else 0
        if self.reported.endswith("%"):
            return f"{100 * value / n_base_params(self.model):.{decimals}f}%"
        return f"{value / 1e6:.{decimals}f}M"

    def matches(self) -> bool:
        return self.ours_as_reported() == self.reported


_BOFT = "BOFT paper (Liu et al., ICLR 2024, arXiv:2311.06243v2)"
_EFF_SB = "skew entries m·k·b(b−1)/2 + scale (n) + bias (n) per layer"
_EFF_SB_SD = ("skew entries m·k·b(b−1)/2 + scale (n) + one more n-vector per layer (to_q/k/v have no bias; the "
              "paper trains PEFT bias='boft_only', App. A.5)")
_EFF = "skew entries m·k·b(b−1)/2 only, as % of all 6,738,415,616 Llama-2-7B parameters"
_LORA = "r·(d + n) per layer"


def _row(
    table: str, model: str, method: str, label: str, targets: str, hyper: dict, reported: str, conv: str, note: str = ""
) -> PaperRow:
    return PaperRow(f"{_BOFT}, {table}", model, method, label, targets, hyper, reported, conv, note)


BOFT_SB = dict(scale=True, trained_bias=True)
PAPER_ROWS: list[PaperRow] = [
    # Table 1 (p. 7): GLUE, DeBERTaV3-base; OFT/BOFT on every linear layer of every block (App. A.1, p. 19).
    _row("Table 1, p. 7", "deberta-v3-base", "lora", "LoRA r=8", "all linear", dict(rank=8), "1.33M", _LORA),
    _row("Table 1, p. 7", "deberta-v3-base", "oft", "OFT b=16", "all linear", dict(block_size=16, **BOFT_SB), "0.79M", _EFF_SB),
    _row("Table 1, p. 7", "deberta-v3-base", "boft", "BOFT m=2, b=8", "all linear",
         dict(block_size=8, n_factors=2, **BOFT_SB), "0.75M", _EFF_SB),
    # Tables 2, 3 (p. 7): Llama-2-7B, % of parameters; LoRA on q, v; OFT/BOFT on all 7 projections (our inference).
    _row("Tables 2-3, p. 7", "llama-2-7b", "lora", "LoRA r=16", "query, value", dict(rank=16), "0.125%",
         _LORA + ", q_proj and v_proj",
         "8,388,608 / 6,738,415,616 = 0.1245%, printed 0.125%: the paper divides by the nominal 6.7B (0.1252%)"),
    _row("Tables 2-3, p. 7", "llama-2-7b", "lora", "LoRA r=32", "query, value", dict(rank=32), "0.25%",
         _LORA + ", q_proj and v_proj"),
    _row("Tables 2-3, p. 7", "llama-2-7b", "oft", "OFT b=16", "all linear", dict(block_size=16, scale=False), "0.13%", _EFF),
    _row("Tables 2-3, p. 7", "llama-2-7b", "boft", "BOFT m=2, b=8", "all linear",
         dict(block_size=8, n_factors=2, scale=False), "0.12%", _EFF),
    # Table 4 (p. 8): VTAB-1K, DINOv2-large; every linear layer of MSA and MLP blocks (App. A.2, p. 19).
    _row("Table 4, p. 8", "dinov2-large", "lora", "LoRA r=4", "all linear", dict(rank=4), "1.77M", _LORA),
    _row("Table 4, p. 8", "dinov2-large", "oft", "OFT b=16", "all linear", dict(block_size=16, **BOFT_SB), "2.10M", _EFF_SB),
    *[
        _row("Table 4, p. 8", "dinov2-large", "boft", f"BOFT m={m}, b={b}", "all linear",
             dict(block_size=b, n_factors=m, **BOFT_SB), reported, _EFF_SB)
        for m, b, reported in [(2, 8, "1.99M"), (4, 4, "1.77M"), (6, 2, "1.11M")]
    ],
    # Table 6 (p. 9) and Table 9 (p. 20): controllable generation, Stable Diffusion 2.1 UNet (App. A.5, p. 20),
    # to_q/to_k/to_v of every attention; r is the NUMBER of blocks there (b = d/r).
    *[
        _row("Table 6, p. 9", "sd-2.1-unet", "lora", f"LoRA r={r}", "attention q, k, v", dict(rank=r), reported, _LORA)
        for r, reported in [(16, "2.52M"), (64, "10.08M"), (128, "20.17M")]
    ],
    *[
        _row("Table 6, p. 9", "sd-2.1-unet", "oft", f"OFT r={r}", "attention q, k, v", dict(n_blocks=r, **BOFT_SB),
             reported, _EFF_SB_SD)
        for r, reported in [(16, "2.71M"), (4, "10.50M"), (2, "20.89M")]
    ],
    *[
        _row("Table 6, p. 9", "sd-2.1-unet", "boft", f"BOFT m={m}, r={r}", "attention q, k, v",
             dict(n_blocks=r, n_factors=m, **BOFT_SB), reported, _EFF_SB_SD)
        for m, r, reported in [(2, 32, "2.66M"), (6, 32, "7.69M"), (5, 16, "12.93M"), (4, 8, "20.76M")]
    ],
]


def paper_table(rows: list[PaperRow] | None = None) -> list[dict[str, Any]]:
    """One dict per paper entry: where it is, the paper's number, ours in its unit, the exact count, both conventions."""
    out = []
    for row in PAPER_ROWS if rows is None else rows:
        peft = None
        if row.method in ("oft", "boft"):
            as_peft = {**row.hyper, "convention": "peft", "trained_bias": False}
            peft = count(row.model, row.method, row.targets, **as_peft)
        out.append({
            "source": "BOFT paper, " + row.where.rsplit("), ", 1)[-1], "model": row.model,
            "method": row.label, "targets": row.targets, "paper": row.reported, "ours": row.ours_as_reported(),
            "exact count": row.ours(), "match": "yes" if row.matches() else "rounding, see note",
            "PEFT stores (b×b blocks, + scale where counted)": peft, "counted": row.convention, "note": row.note,
        })
    return out


def paper_markdown(rows: list[PaperRow] | None = None) -> str:
    """``paper_table`` as the markdown table of the README and docs/parameter_counts.md: counts with thousands
    separators, an empty cell where a column does not apply."""
    from .report import markdown_table

    records = paper_table(rows)
    def cell(value: Any) -> Any:
        if value is None:
            return ""
        return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else value

    return markdown_table(list(records[0]), [[cell(v) for v in record.values()] for record in records])
