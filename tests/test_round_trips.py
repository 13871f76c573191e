"""Randomized round trips: every family × random configurations, layer types, dtypes and faults, through merge →
unmerge, save → load, a whole-model state_dict (unmerged and merged) and pickle. Each is exact — bit for bit, or for
merge → unmerge to the bound the weight's dtype allows — or a ValueError that leaves the model exactly as it was.

The merge → unmerge bound, from the unit roundoff u = eps/2 of the weight's dtype (merges compute in fp64 and round
once; ``contract.merge_dtype``):

* additive families (SURM mode="lora", tensor core): W' = fl(W + ΔW), W_rec = fl(W' − ΔW), so entrywise
  |W_rec − W| ≤ u·(|W| + |W'|);
* BOFT / OFT, W' = fl(diag(s)·W·Rᵀ): per row ‖W_rec,i − W_i‖ ≤ (1 + κ(R))·u·‖W_i‖;
* SURM mode="adapter" (identity), W' = fl(M·W) with M = I + α·S: per column ‖W_rec,:j − W_:j‖ ≤ (1 + κ(M))·u·‖W_:j‖,
  and for the bias, bias' = fl(M·bias + b): ‖bias_rec − bias‖ ≤ u·((1 + κ(M))·‖bias‖ + ‖M⁻¹‖·‖b‖);

plus what the fp64 arithmetic itself adds (``FP64_SLACK``, a few ulps of fp64 times κ).
"""

from __future__ import annotations

import copy
import functools
import pickle
import random

import bitsandbytes as bnb
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D as TransformersConv1D

import boftlab
from boftlab import base_layers
from boftlab.base_layers import Conv1D
from boftlab.contract import FAMILIES, MERGED_KEY
from helpers import assert_unchanged, perturb, snapshot

N_CASES = 48
DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def quantized(bits: int, bias: bool) -> nn.Module:
    """A bitsandbytes Linear4bit (nf4) or Linear8bitLt, 64 -> 32, quantized on CPU. bitsandbytes' CPU 4-bit kernel
    repacks the weight in blocks of 32 rows × 64 inputs (its quantization block), so these sizes are the smallest it
    runs; 64 = 16·4 fits every block size that fits 16."""
    plain = nn.Linear(64, 32, bias=bias)
    if bits == 4:
        layer = bnb.nn.Linear4bit(64, 32, bias=bias, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(plain.weight.data, requires_grad=False, quant_type="nf4")
    else:
        layer = bnb.nn.Linear8bitLt(64, 32, bias=bias, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(plain.weight.data, requires_grad=False, has_fp16_weights=False)
    if bias:
        layer.bias = nn.Parameter(plain.bias.data, requires_grad=False)
    return layer.to("cpu")  # bitsandbytes quantizes the weight when the layer moves to a device


#: one base layer and one input per layer type — every type of every kind in ``base_layers`` (fan-in 16, or 64 for the
#: quantized ones, so every block size a family declares can fit); which of them a config adapts is its own
#: ``supported_layers()``
LAYERS = {
    nn.Linear: (lambda bias: nn.Linear(16, 12, bias=bias), lambda: torch.randn(3, 16)),
    Conv1D: (lambda bias: TransformersConv1D(12, 16), lambda: torch.randn(3, 16)),  # GPT-2's: always a bias
    bnb.nn.Linear4bit: (lambda bias: quantized(4, bias), lambda: torch.randn(3, 64)),
    bnb.nn.Linear8bitLt: (lambda bias: quantized(8, bias), lambda: torch.randn(3, 64)),
    nn.Conv1d: (lambda bias: nn.Conv1d(8, 6, 2, bias=bias), lambda: torch.randn(2, 8, 5)),
    nn.Conv2d: (lambda bias: nn.Conv2d(4, 6, 2, padding=1, bias=bias), lambda: torch.randn(2, 4, 4, 4)),
    nn.Conv3d: (lambda bias: nn.Conv3d(2, 6, 2, bias=bias), lambda: torch.randn(2, 2, 3, 3, 3)),
    nn.Embedding: (lambda bias: nn.Embedding(20, 16, padding_idx=3), lambda: torch.randint(0, 20, (3, 5))),
}
FP64_SLACK = 256 * torch.finfo(torch.float64).eps


def option_space(family: str) -> dict[str, tuple]:
    """The values each option of ``family`` takes here: what its config class declares next to itself."""
    space = FAMILIES[family].__dict__.get("option_space")
    if not space:
        raise ValueError(
            f"family {family!r} ({FAMILIES[family].__name__}) declares no option_space, so the round trips cannot draw "
            "its configs: give its config class option_space: ClassVar[dict[str, tuple]] = dict(option=(values, "
            "...), ...) in its own module, as BOFTConfig does"
        )
    return space


@functools.cache
def probe(layer_type: type[nn.Module]) -> nn.Module:
    """One layer of ``layer_type`` to ask families about (wrapping it in a throwaway adapter changes nothing else)."""
    return LAYERS[layer_type][0](True)


def supported_kinds(family: str) -> list[type[nn.Module]]:
    """The layer types of ``LAYERS`` that ``family``'s default config adapts (asked of the family)."""
    supported = FAMILIES[family]().supported_layers()
    return [t for t in LAYERS if isinstance(probe(t), supported)]


def input_dtypes(layer_type: type[nn.Module]) -> list[torch.dtype]:
    """The dtypes of ``DTYPES`` the base layer's own kernel computes (asked of ``base_layers``: a 4-bit layer refuses
    float64)."""
    dtypes = []
    for dtype in DTYPES:
        try:
            base_layers.check_input_dtype(probe(layer_type), dtype)
        except ValueError:
            continue
        dtypes.append(dtype)
    return dtypes


def random_config(rng: random.Random, family: str, layer_type: type[nn.Module]):
    """A random config of ``family`` that adapts a ``layer_type``: each option of its ``option_space`` in turn takes
    a random value, unless the config or the layer refuses that value with what was drawn before (then it keeps its
    default)."""
    cls, options = FAMILIES[family], {}
    for name, values in option_space(family).items():
        value = rng.choice(values)
        try:
            cls(**options, **{name: value}).make_layer(probe(layer_type))
        except ValueError:
            continue
        options[name] = value
    return cls(**options)


class Net(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def draw(seed: int) -> dict:
    """One random case: config, layer type, dtype, and perhaps a fault that must make merge refuse."""
    rng = random.Random(seed)
    family = sorted(FAMILIES)[seed % len(FAMILIES)]  # every family equally often
    kinds = supported_kinds(family)
    kind = kinds[(seed // len(FAMILIES)) % len(kinds)]  # every layer type the family supports in turn
    config = random_config(rng, family, kind)
    faults = ["nan", "inf"]
    if getattr(config, "scale", False):
        faults.append("zero_scale")
    return dict(seed=seed, config=config, kind=kind, dtype=rng.choice(input_dtypes(kind)), base_bias=rng.random() < 0.8,
                cast_adapter=rng.random() < 0.3, train_mode_merge=rng.random() < 0.3,
                fault=rng.choice(faults) if rng.random() < 0.25 else None)


def build(case: dict, adapted: bool = True) -> tuple[Net, torch.Tensor]:
    """The case's model (same base weights every call) and input; adapted with trained-looking adapter values."""
    torch.manual_seed(case["seed"])
    make_layer, make_input = LAYERS[case["kind"]]
    model, x = Net(make_layer(case["base_bias"]).to(case["dtype"])), make_input()
    if x.is_floating_point():
        x = x.to(case["dtype"])
    if not adapted:
        return model, x
    boftlab.adapt(model, case["config"], targets=["layer"])
    if case["cast_adapter"]:
        model.to(case["dtype"])
    layer = perturb(model.layer, scale=0.2)
    with torch.no_grad():
        if case["fault"] in ("nan", "inf"):
            p = next(iter(layer.adapter_parameters().values()))
            p[(0,) * p.dim()] = float(case["fault"])
        elif case["fault"] == "zero_scale":
            layer.scale[1] = 0.0
    return model.eval(), x


def must_refuse_merge(case: dict) -> bool:
    config = case["config"]
    if case["fault"] or base_layers.kind(LAYERS[case["kind"]][0](True)) == "quantized":
        return True  # a quantized base is never written (base_layers.weight)
    if config.family == "surm" and config.mode == "adapter":
        return config.activation != "identity" or (config.bias and not case["base_bias"])
    return False


def assert_same_output(model: nn.Module, other: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        torch.testing.assert_close(other(x), model(x), rtol=0, atol=0, equal_nan=True)


def unmerge_bounds(layer, before: dict[str, torch.Tensor], merged: dict[str, torch.Tensor]):
    """name -> (error after merge → unmerge, its bound), in fp64, from the module docstring."""
    u = torch.finfo(before["weight"].dtype).eps / 2
    # in the layout the family reasons in (a Conv1D stores Wᵀ)
    logical = (lambda w: w.T) if isinstance(layer.base_layer, Conv1D) else (lambda w: w)  # noqa: E731
    W, Wm = logical(before["weight"]).double(), logical(merged["weight"]).double()
    W_rec = base_layers.weight(layer.base_layer).double()
    family = layer.config.family
    if family in ("boft", "oft"):
        blocks = layer.cayley_blocks().double()
        R = layer.rotate(torch.eye(layer.fan_in, dtype=torch.float64), blocks=blocks)
        if isinstance(layer.base_layer, nn.Embedding) and layer.scale is not None:
            R = R * layer.scale.double()  # an Embedding's rows become e·R·diag(s): the scale acts within each row
        kappa = torch.linalg.cond(R).item()
        rows = W.reshape(W.shape[0], -1)
        error = (W_rec - W).reshape(rows.shape).norm(dim=1)
        return {"weight": (error, ((1 + kappa) * u * 1.001 + FP64_SLACK * kappa) * rows.norm(dim=1))}
    if family == "surm" and layer.config.mode == "adapter":
        mixing = layer._mixing(torch.float64)
        kappa, inverse_norm = torch.linalg.cond(mixing).item(), torch.linalg.matrix_norm(torch.linalg.inv(mixing), 2).item()
        slack = (1 + kappa) * u * 1.001 + FP64_SLACK * kappa
        bounds = {"weight": ((W_rec - W).norm(dim=0), slack * W.norm(dim=0))}
        if "bias" in before:
            bias, bias_rec = before["bias"].double(), layer.base_layer.bias.double()
            extra = 0.0 if layer.adapter_bias is None else inverse_norm * layer.adapter_bias.double().norm().item()
            bounds["bias"] = ((bias_rec - bias).norm(), slack * bias.norm() + (u * 1.001 + FP64_SLACK) * extra)
        return bounds
    return {"weight": ((W_rec - W).abs(), (u * 1.001 + FP64_SLACK) * (W.abs() + Wm.abs()))}


CASES = [draw(seed) for seed in range(N_CASES)]


def test_layers_hold_every_kind_and_every_layer_type_a_family_adapts():
    """A new kind in base_layers, or a layer type a family starts to support, fails here until it has a builder."""
    assert {base_layers.kind(make_layer(True)) for make_layer, _ in LAYERS.values()} == set(base_layers.KINDS)
    declared = {*base_layers.LINEAR_LAYERS, *base_layers.CONVOLUTIONS, nn.Embedding}
    assert declared <= set(LAYERS)
    assert {t.__name__ for t in LAYERS if base_layers.kind(LAYERS[t][0](True)) == "quantized"} == set(
        base_layers.QUANTIZED_LINEARS)
    for family, cls in FAMILIES.items():
        configs = [cls(), *cls.example_configs()]  # the examples cover the options that change supported_layers()
        assert {t for config in configs for t in config.supported_layers()} <= set(LAYERS), family


def test_a_family_without_an_option_space_fails_the_draw_loudly(monkeypatch):
    """Not a SURM config in its place, as before: an unknown family cannot be drawn until it declares its options."""

    class Undeclared(boftlab.OFTConfig):  # no family name of its own: registers nothing
        pass

    monkeypatch.setitem(FAMILIES, "undeclared", Undeclared)
    seed = sorted(FAMILIES).index("undeclared")
    with pytest.raises(ValueError, match=r"family 'undeclared' \(Undeclared\) declares no option_space"):
        draw(seed)


def case_id(case: dict) -> str:
    options = ",".join(f"{k}={v}" for k, v in case["config"].to_dict().items() if k not in ("family", "path", "kernel")
                       and v is not None)
    fault = f"-{case['fault']}" if case["fault"] else ""
    return f"{case['seed']}-{case['config'].family}({options})-{case['kind'].__name__}-{str(case['dtype'])[6:]}{fault}"


def test_the_draw_covers_every_family_layer_type_dtype_and_fault():
    assert {c["config"].family for c in CASES} == set(FAMILIES)
    assert {c["kind"] for c in CASES} == set(LAYERS) and {c["dtype"] for c in CASES} == set(DTYPES)
    for family in FAMILIES:  # every family on every layer type it adapts, every option at two values at least
        drawn = [c for c in CASES if c["config"].family == family]
        assert {c["kind"] for c in drawn} == set(supported_kinds(family)), family
        for name in option_space(family):
            assert len({repr(getattr(c["config"], name)) for c in drawn}) >= 2, (family, name)
    assert {c["fault"] for c in CASES} == {None, "nan", "inf", "zero_scale"}
    assert any(must_refuse_merge(c) for c in CASES if not c["fault"])  # a non-linear or bias-less SURM adapter
    assert any(c["config"].family == "boft" and c["config"].neumann_terms for c in CASES if not c["fault"])


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_merge_then_unmerge(case):
    model, x = build(case)
    before = snapshot(model)
    model.train(case["train_mode_merge"])
    if must_refuse_merge(case):
        with pytest.raises(ValueError, match="cannot merge|cannot be folded"):
            boftlab.merge(model)
        assert_unchanged(before, snapshot(model))
        return
    with torch.no_grad():
        expected = model.eval()(x)
    original = {k: v.clone() for k, v in model.layer.base_layer.state_dict().items()}
    boftlab.merge(model.train(case["train_mode_merge"]))
    merged = {k: v.clone() for k, v in model.layer.base_layer.state_dict().items()}
    # the merged layer computes what the adapted one does, to the precision of the weight or of the adapter's own
    # tensors (fp32 unless cast), whichever is coarser
    eps = max(torch.finfo(t.dtype).eps for t in [*merged.values(), *model.layer.adapter_parameters().values()])
    with torch.no_grad():
        scale = expected.abs().max().item()
        torch.testing.assert_close(model.eval()(x), expected, rtol=64 * eps, atol=64 * eps * scale)
    boftlab.unmerge(model)
    for name, (error, bound) in unmerge_bounds(model.layer, original, merged).items():
        assert (error <= bound).all(), f"{name}: error/bound up to {(error / bound).max().item():.3g}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_save_then_load(case, tmp_path):
    model, x = build(case)
    try:
        boftlab.save_adapter(model, tmp_path / "adapter")
    except ValueError:  # a non-finite adapter may be refused at save time: then no file is left behind
        assert case["fault"] in ("nan", "inf") and not (tmp_path / "adapter" / "adapter_model.safetensors").exists()
        return
    loaded = boftlab.load_adapter(build(case, adapted=False)[0], tmp_path / "adapter").eval()
    assert loaded.layer.config == model.layer.config
    assert_same_output(model, loaded, x)


def base_state_refused(case: dict) -> str | None:
    """Why the plain base layer cannot load its own ``state_dict()``, or None. bitsandbytes' Linear4bit cannot: its
    quant state travels as extra keys (``weight.absmax``, …) that only transformers' loader reads."""
    make_layer = LAYERS[case["kind"]][0]
    try:
        make_layer(case["base_bias"]).load_state_dict(make_layer(case["base_bias"]).state_dict())
    except RuntimeError as err:
        return str(err).splitlines()[-1].strip()
    return None


@pytest.mark.parametrize("merge", [False, True], ids=["unmerged", "merged"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_whole_model_state_dict(case, merge):
    refused = base_state_refused(case)
    if refused:
        pytest.skip(f"the plain {case['kind'].__name__} cannot load its own state_dict ({refused[:80]})")
    model, x = build(case)
    if merge:
        if must_refuse_merge(case):
            return  # refused: test_merge_then_unmerge checks that it changes nothing
        boftlab.merge(model)
    state = model.state_dict()
    assert state[f"layer.{MERGED_KEY}"].item() is merge
    fresh = build(case)[0]
    with torch.no_grad():
        for p in fresh.layer.adapter_parameters().values():
            p.add_(1.0)  # other adapter values: the load must replace them all
    fresh.load_state_dict(state)
    assert fresh.layer.merged is merge
    assert_unchanged(snapshot(model), snapshot(fresh))
    assert_same_output(model, fresh, x)
    if merge:
        boftlab.unmerge(model), boftlab.unmerge(fresh)
        assert_unchanged(snapshot(model), snapshot(fresh))


@pytest.mark.parametrize("merge", [False, True], ids=["unmerged", "merged"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_pickle(case, merge):
    model, x = build(case)
    if merge and not must_refuse_merge(case):
        boftlab.merge(model)
    restored = pickle.loads(pickle.dumps(model))
    assert_unchanged(snapshot(model), snapshot(restored))
    assert_same_output(model, restored, x)
    assert_same_output(model, copy.deepcopy(model), x)
