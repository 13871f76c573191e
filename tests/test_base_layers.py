"""boftlab.base_layers: how the families see the layers they wrap — nn.Linear, transformers' Conv1D, convolutions,
Embedding, and bitsandbytes' quantized Linear4bit / Linear8bitLt (on CPU), with every family on top of them."""

import copy
import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations
from transformers.pytorch_utils import Conv1D as TransformersConv1D

import boftlab
from boftlab import base_layers
from boftlab.base_layers import Conv1D
from helpers import canonical_configs, named_examples

# --- the view ---------------------------------------------------------------------------------------------------------
LAYERS = {
    "linear": lambda: nn.Linear(6, 4),
    "conv1d_transformers": lambda: TransformersConv1D(4, 6),  # nf=4 outputs, nx=6 inputs: weight stored (6, 4)
    "conv": lambda: nn.Conv2d(3, 4, 2, stride=2, padding=1),
    "embedding": lambda: nn.Embedding(7, 5, padding_idx=2),
}
INPUTS = {
    "linear": lambda: torch.randn(3, 6), "conv1d_transformers": lambda: torch.randn(2, 3, 6),
    "conv": lambda: torch.randn(2, 3, 5, 5), "embedding": lambda: torch.tensor([[0, 2, 6], [2, 1, 1]]),
}


@pytest.mark.parametrize("name", LAYERS)
def test_run_with_the_own_weight_is_the_layer_itself(name):
    layer, x = LAYERS[name](), INPUTS[name]()
    torch.testing.assert_close(base_layers.run(layer, x, base_layers.weight(layer)), layer(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", LAYERS)
def test_stored_inverts_the_view_and_shapes_come_from_the_sizes(name):
    layer = LAYERS[name]()
    view = base_layers.weight(layer)
    assert tuple(view.shape) == base_layers.weight_shape(layer)
    assert torch.equal(base_layers.stored(layer, view)["weight"], layer.weight)


def test_conv1d_is_seen_as_the_linear_map_it_computes():
    layer = TransformersConv1D(4, 6)
    assert isinstance(layer, Conv1D) and not isinstance(nn.Linear(2, 2), Conv1D)
    assert base_layers.kind(layer) == "linear" and base_layers.weight_shape(layer) == (4, 6)
    view = base_layers.weight(layer)
    assert view.data_ptr() == layer.weight.data_ptr()  # a transposed view, no copy
    linear = nn.Linear(6, 4)
    with torch.no_grad():
        linear.weight.copy_(view)
        linear.bias.copy_(layer.bias)
    x = torch.randn(5, 6)
    torch.testing.assert_close(linear(x), layer(x), rtol=1e-6, atol=1e-6)


def test_type_names_in_messages():
    assert [base_layers.type_name(t) for t in (nn.Linear, Conv1D, nn.Embedding)] == [
        "nn.Linear", "transformers Conv1D", "nn.Embedding"]


def test_an_unknown_quantized_linear_is_refused_not_misread():
    class PackedLinear(nn.Linear):  # some other library's packing: two int4 per byte, shape (out·in/2, 1)
        def __init__(self):
            super().__init__(8, 4)
            self.weight = nn.Parameter(torch.zeros(16, 1, dtype=torch.uint8), requires_grad=False)

    with pytest.raises(ValueError, match=r"stores its weight as torch.uint8 of shape \(16, 1\), not as a float "
                                         r"\(4, 8\) matrix.*bitsandbytes Linear4bit, Linear8bitLt"):
        boftlab.BOFTConfig(block_size=4).make_layer(PackedLinear())



def pruned(layer: nn.Module) -> nn.Module:
    from torch.nn.utils import prune

    prune.l1_unstructured(layer, "weight", 0.3)
    return layer


COMPUTED_WEIGHTS = {  # layers whose weight is recomputed from other tensors at every call
    "weight_norm": (lambda: parametrizations.weight_norm(nn.Linear(16, 8)), r"parametrization _WeightNorm of 'weight'"),
    "spectral_norm": (lambda: parametrizations.spectral_norm(nn.Linear(16, 8)), r"parametrization _SpectralNorm"),
    "old weight_norm": (lambda: torch.nn.utils.weight_norm(nn.Conv2d(16, 8, 3)), r"forward pre-hook WeightNorm"),
    "pruned": (lambda: pruned(nn.Linear(16, 8)), r"forward pre-hook L1Unstructured"),
}


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")
@pytest.mark.parametrize("family", list(canonical_configs()))
@pytest.mark.parametrize("name", COMPUTED_WEIGHTS)
def test_a_weight_computed_at_every_call_is_refused_before_the_model_is_touched(name, family):
    """weight_norm, spectral_norm, pruning: the layer's weight is recomputed before each call, so a merge written
    into it was silently overwritten — the merged model computed the base layer's output (max |merged − adapted|
    0.7 to 2.9 before this check, every family). adapt refuses, naming the cause and how to fold it first."""
    make, cause = COMPUTED_WEIGHTS[name]
    torch.manual_seed(0)
    model = nn.Sequential(make())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = canonical_configs()[family]
    with pytest.raises(ValueError, match=rf"recomputes its weight or input on every call \(.*{cause}.*then adapt: "
                                         r".*prune.remove\(layer, 'weight'\)"):
        boftlab.adapt(model, config, targets=[type(model[0])])
    assert type(model[0]).__name__ in ("ParametrizedLinear", "Linear", "Conv2d")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

# --- bitsandbytes layers on CPU ---------------------------------------------------------------------------------------
def quantized(linear: nn.Linear, bits: int, compute_dtype: torch.dtype = torch.float32) -> nn.Module:
    """``linear`` as a bitsandbytes Linear4bit (nf4) or Linear8bitLt, quantized on CPU."""
    bias = linear.bias is not None
    if bits == 4:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=compute_dtype,
                                  quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4")
    else:
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(linear.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    if bias:
        layer.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return layer.to("cpu")  # bitsandbytes quantizes the weight when the layer moves to a device


class QuantizedNet(nn.Module):
    """Two quantized projections (one without bias) and a plain head, like a QLoRA model's attention block."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.query = quantized(nn.Linear(32, 32), bits)
        self.value = quantized(nn.Linear(32, 16, bias=False), bits)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.value(torch.tanh(self.query(x)))))


#: every example of every registered family that adapts an nn.Linear (and so the quantized linear layers), by name:
#: "boft", "surm" (its canonical example, a circulant), "surm-2", … SURM's adapter mode without its own bias: ``value``
#: has none to absorb it when the tests below merge.
CONFIGS = {name: dataclasses.replace(config, bias=False) if getattr(config, "mode", None) == "adapter" else config
           for name, config in named_examples().items() if nn.Linear in config.supported_layers()}
CASES = [pytest.param(name, bits, id=f"{name}-{bits}bit") for name in CONFIGS for bits in (4, 8)]


def adapted(name: str, bits: int) -> QuantizedNet:
    return boftlab.adapt(QuantizedNet(bits), CONFIGS[name], targets=["query", "value"])


def train(model: nn.Module, x: torch.Tensor, steps: int = 3) -> None:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(steps):
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("name,bits", CASES)
def test_quantized_base_is_read_by_its_sizes_and_equals_the_base_at_init_bit_for_bit(name, bits):
    model = QuantizedNet(bits)
    x = torch.randn(5, 32)
    before = model(x)
    boftlab.adapt(model, CONFIGS[name], targets=["query", "value"])
    layer = model.query
    assert base_layers.kind(layer.base_layer) == "quantized"
    assert "input" in layer.paths() and "weight" not in layer.paths()  # activations only: a packed weight is not rotated
    assert torch.equal(model(x), before)


@pytest.mark.parametrize("name,bits", CASES)
def test_training_on_a_quantized_base_moves_only_the_adapters(name, bits):
    model = adapted(name, bits)
    x = torch.randn(5, 32)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if ".base_layer." in k or k.startswith("head.")}
    adapters = {k: v.clone() for k, v in boftlab.saving.adapter_state(model).items()}
    before = model(x).detach()
    train(model, x)
    assert all(torch.equal(v, frozen[k]) for k, v in model.state_dict().items() if k in frozen)
    assert all(p.requires_grad == (".base_layer." not in n and not n.startswith("head."))
               for n, p in model.named_parameters())
    assert all(not torch.equal(v, adapters[k]) for k, v in boftlab.saving.adapter_state(model).items()
               if k.endswith(("skew", "first_column", "diagonals", "core")))
    assert (model(x) - before).abs().max() > 1e-3


@pytest.mark.parametrize("name,bits", CASES)
def test_quantized_save_load_round_trip(name, bits, tmp_path):
    model = adapted(name, bits)
    x = torch.randn(5, 32)
    train(model, x)
    boftlab.save_adapter(model, tmp_path)
    reloaded = boftlab.load_adapter(QuantizedNet(bits), tmp_path)
    assert torch.equal(reloaded(x), model(x))


@pytest.mark.parametrize("name,bits", CASES)
def test_merging_into_a_quantized_base_is_refused_and_changes_nothing(name, bits):
    model = adapted(name, bits)
    train(model, torch.randn(5, 32))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for call in (boftlab.merge, boftlab.unwrap):
        with pytest.raises(ValueError, match=r"stores its weight quantized, so an adapter cannot be folded into it "
                                             r"exactly.*boftlab.dequantize_bases\(model, dtype\)"):
            call(model)
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
        assert not any(layer.merged for layer in boftlab.adapter_layers(model).values())


@pytest.mark.parametrize("name,bits", CASES)
def test_dequantize_bases_then_merge_is_exact(name, bits):
    model = adapted(name, bits)
    x = torch.randn(5, 32)
    train(model, x)
    quantized_output = model(x)
    boftlab.dequantize_bases(model, torch.float32)
    # an nn.Linear that computes in the quantized layer's compute dtype (here float32, as the activations)
    assert all(type(layer.base_layer) is base_layers.DequantizedLinear and isinstance(layer.base_layer, nn.Linear)
               for layer in boftlab.adapter_layers(model).values())
    # 4-bit: bitsandbytes multiplies by exactly the dequantized weight; 8-bit on CPU too, up to summation order
    dequantized_output = model(x)
    torch.testing.assert_close(dequantized_output, quantized_output, rtol=1e-5, atol=1e-5)
    plain = boftlab.unwrap(model)
    assert not boftlab.adapter_layers(plain) and type(plain.query) is base_layers.DequantizedLinear
    torch.testing.assert_close(plain(x), dequantized_output, rtol=1e-5, atol=1e-5)


def test_dequantized_weight_is_what_the_kernel_multiplies_by():
    torch.manual_seed(0)
    linear = nn.Linear(32, 16)
    x = torch.randn(4, 32)
    for bits in (4, 8):
        layer = quantized(linear, bits)
        weight = base_layers.dequantized_weight(layer)
        assert weight.shape == (16, 32) and 0 < (weight - linear.weight).abs().max() < 0.1  # quantization error
        torch.testing.assert_close(layer(x), nn.functional.linear(x, weight, layer.bias), rtol=1e-6, atol=1e-6)


def test_bf16_compute_on_a_4bit_base():
    model = QuantizedNet(4)
    model.query = quantized(nn.Linear(32, 32), 4, compute_dtype=torch.bfloat16)
    x = torch.randn(5, 32, dtype=torch.bfloat16)
    before = model.query(x)
    layer = boftlab.BOFTConfig(block_size=4).make_layer(model.query)
    assert torch.equal(layer(x), before)  # bit-equal at init in bf16 too
    with torch.no_grad():
        layer.skew.add_(0.1)
        layer.scale.mul_(1.5)
    assert layer(x).dtype == torch.bfloat16 and not torch.equal(layer(x), before)


def test_forcing_the_weight_path_on_a_quantized_base_is_refused():
    base = QuantizedNet(4).query
    for config, paths in ((boftlab.BOFTConfig(block_size=4, path="weight"), r"\('input', 'assembled'\)"),
                          (boftlab.TensorCoreConfig(path="weight"), r"\('input',\)")):
        with pytest.raises(ValueError, match=r"path='weight' needs the base weight, which this quantized layer stores "
                                             r"packed \(bitsandbytes\); this Linear4bit has the path\(s\) " + paths):
            config.make_layer(base)


@pytest.mark.parametrize("bits", [4, 8])
def test_both_activation_paths_on_a_quantized_base_give_the_same_output(bits):
    """BOFT on a packed base rotates the activations either factor by factor ("input") or by R's assembled diagonal
    blocks ("assembled"); the two are the same R, so outputs and adapter gradients agree to float rounding."""
    torch.manual_seed(0)
    base = QuantizedNet(bits).query
    layers = {path: boftlab.BOFTConfig(block_size=4, n_factors=2, path=path).make_layer(base)
              for path in ("input", "assembled")}
    with torch.no_grad():
        skew = torch.randn_like(layers["input"].skew) * 0.1
        for layer in layers.values():
            layer.skew.copy_(skew)
    x = torch.randn(5, 32)
    outputs = {path: layer(x) for path, layer in layers.items()}
    for out in outputs.values():
        out.square().sum().backward()
    torch.testing.assert_close(outputs["assembled"], outputs["input"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layers["assembled"].skew.grad, layers["input"].skew.grad, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(outputs["input"], base(x))  # the rotation is on the path


def test_dequantize_bases_without_quantized_layers_is_refused():
    model = boftlab.adapt(nn.Sequential(nn.Linear(8, 8)), boftlab.OFTConfig(block_size=4), targets=["0"])
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"no adapter of this model wraps a quantized \(bitsandbytes\) layer"):
        boftlab.dequantize_bases(model, torch.float32)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


class PlainNet(QuantizedNet):
    """QuantizedNet's layers unquantized: the 16/32-bit model a QLoRA adapter is loaded onto to merge and serve."""

    def __init__(self, query_out: int = 32) -> None:
        nn.Module.__init__(self)
        torch.manual_seed(0)
        self.query = nn.Linear(32, query_out)
        self.value = nn.Linear(query_out, 16, bias=False)
        self.head = nn.Linear(16, 3)


def with_adapter_values(model: nn.Module, name: str, values: dict[str, torch.Tensor]) -> nn.Module:
    """``model`` adapted with CONFIGS[name], its adapter tensors set to ``values`` (same names)."""
    boftlab.adapt(model, CONFIGS[name], targets=["query", "value"])
    missing, unexpected = model.load_state_dict(values, strict=False)
    assert not unexpected
    return model


@pytest.mark.parametrize("name,bits", CASES)
def test_an_adapter_trained_on_a_quantized_base_loads_onto_the_unquantized_model_and_back(name, bits, tmp_path):
    """The QLoRA route: train on the 4/8-bit base, load the file onto the plain model (to merge and serve), and the
    other way round. The adapter is the same map on both bases: each loaded model equals that base adapted with the
    file's values, bit for bit; only the base weights differ (by their quantization error)."""
    x = torch.randn(5, 32)
    trained_on_quantized = adapted(name, bits)
    train(trained_on_quantized, x)
    values = boftlab.saving.adapter_state(trained_on_quantized)
    boftlab.save_adapter(trained_on_quantized, tmp_path / "q")
    loaded = boftlab.load_adapter(PlainNet(), tmp_path / "q")
    assert type(loaded.query.base_layer) is nn.Linear
    assert torch.equal(loaded(x), with_adapter_values(PlainNet(), name, values)(x))

    boftlab.save_adapter(loaded, tmp_path / "plain")
    back = boftlab.load_adapter(QuantizedNet(bits), tmp_path / "plain")
    assert base_layers.kind(back.query.base_layer) == "quantized"
    assert torch.equal(back(x), trained_on_quantized(x))


def test_a_quantized_adapter_is_refused_on_a_plain_layer_of_other_sizes(tmp_path):
    boftlab.save_adapter(adapted("tensor_core", 4), tmp_path)
    model = PlainNet(query_out=48)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"shape mismatch at 'query': the adapter was saved for a Linear4bit of "
                                         r"\(out, in\) = \[32, 32\], this Linear is \[48, 32\]"):
        boftlab.load_adapter(model, tmp_path)
    assert not any(isinstance(m, boftlab.AdapterLayer) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_4bit_adapter_is_refused_on_a_4bit_layer_of_transposed_sizes(tmp_path):
    """A 64 -> 32 and a 32 -> 64 Linear4bit store the same packed (1024, 1) tensor: the sizes are compared by
    ``base_layers.weight_shape``, as between plain nn.Linear layers, never by the packed shape."""
    def net(d_in: int, d_out: int) -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(quantized(nn.Linear(d_in, d_out), 4))

    for config in (CONFIGS["surm"], CONFIGS["tensor_core"]):  # a circulant's tensors fit both (n = 64)
        boftlab.save_adapter(boftlab.adapt(net(64, 32), config, targets=["0"]), tmp_path / config.family)
        model = net(32, 64)
        assert model[0].weight.shape == net(64, 32)[0].weight.shape  # packed: the same
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ValueError, match=r"shape mismatch at '0': the adapter was saved for a base weight of "
                                             r"shape \[32, 64\], this model's is \[64, 32\]"):
            boftlab.load_adapter(model, tmp_path / config.family)
        assert not boftlab.adapter_layers(model)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        swap = boftlab.adapt(net(32, 64), config, targets=["0"])
        with pytest.raises(ValueError, match=r"another structure.*'0': here .*\[64, 32\]\), in the file .*\[32, 64\]"):
            boftlab.load_adapter(swap, tmp_path / config.family)


def test_layer_shapes_reads_a_4bit_layer_by_its_sizes():
    model = nn.Sequential(quantized(nn.Linear(64, 32), 4))
    (shape,) = boftlab.counts.layer_shapes(model, ["0"])
    assert (shape.fan_in, shape.fan_out, shape.weight_shape) == (64, 32, (32, 64))


@pytest.mark.parametrize("bits", [4, 8])
def test_summary_counts_the_logical_weights_of_a_quantized_layer(bits):
    """bitsandbytes packs two 4-bit weights per byte; summary counts out·in per quantized weight (as PEFT does), so a
    quantized model reports what the same model in fp32 does."""
    quantized_summary = boftlab.summary(adapted("tensor_core", bits))
    plain_summary = boftlab.summary(boftlab.adapt(PlainNet(), CONFIGS["tensor_core"], targets=["query", "value"]))
    assert quantized_summary.total == plain_summary.total == sum(p.numel() for p in PlainNet().parameters()) + \
        plain_summary.adapter
    assert quantized_summary.percent == plain_summary.percent
    assert quantized_summary.by_layer_type["tensor_core/" + ("Linear4bit" if bits == 4 else "Linear8bitLt")]["base"] \
        == plain_summary.by_layer_type["tensor_core/Linear"]["base"] == 32 * 32 + 32 + 16 * 32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_dequantize_bases_computes_as_the_bf16_compute_4bit_layer_did_on_fp32_activations(name, dtype):
    """A Linear4bit with compute_dtype=bf16 fed fp32 activations computes in bf16 and returns fp32. The dequantized
    layer does the same, whatever dtype stores its weight (bf16 used to raise a raw dtype error at the next forward,
    fp32 to compute in fp32 and move the outputs by 7e-4): the base layer's outputs are bit for bit the same, and
    the adapted model's on the same paths too."""
    torch.manual_seed(0)
    model = QuantizedNet(4)
    model.query = quantized(nn.Linear(32, 32), 4, compute_dtype=torch.bfloat16)
    model.value = quantized(nn.Linear(32, 16, bias=False), 4, compute_dtype=torch.bfloat16)
    config = CONFIGS[name]
    boftlab.adapt(model, type(config).from_dict({**config.to_dict(), "path": "input"}), targets=["query", "value"])
    train(model, torch.randn(5, 32))
    x = torch.randn(5, 32)
    base_before, before = model.query.base_layer(x), model(x)
    boftlab.dequantize_bases(model, dtype)
    base = model.query.base_layer
    assert isinstance(base, nn.Linear) and base.weight.dtype == dtype and base.compute_dtype == torch.bfloat16
    assert torch.equal(base(x), base_before) and base(x).dtype == torch.float32
    assert torch.equal(model(x), before)


def test_dequantize_bases_refuses_what_is_not_a_float_dtype_and_a_dtype_that_rounds_the_weight():
    model = adapted("tensor_core", 4)  # compute_dtype=float32
    x = torch.randn(5, 32)
    before, state = model(x), {k: v.clone() for k, v in model.state_dict().items()}
    for dtype in ("float32", torch.int8, None):
        with pytest.raises(ValueError, match=r"dtype must be a floating torch.dtype \(torch.float32, .*\), got "
                                             + re.escape(repr(dtype))):
            boftlab.dequantize_bases(model, dtype)
    with pytest.raises(ValueError, match=r"layer 'query': this Linear4bit \(32 -> 32\) computes with torch.float32 "
                                         r"values of its dequantized weight, which torch.bfloat16 cannot hold exactly "
                                         r"\(they would move by up to .*\), so the outputs would change. Use "
                                         r"dtype=torch.float32.*Nothing was changed"):
        boftlab.dequantize_bases(model, torch.bfloat16)
    assert all(base_layers.kind(layer.base_layer) == "quantized" for layer in boftlab.adapter_layers(model).values())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()) and torch.equal(model(x), before)


def test_an_adapter_on_a_dequantized_base_loads_onto_the_plain_and_the_quantized_model(tmp_path):
    """After dequantize_bases the adapter is still the QLoRA route's: its file loads onto the plain nn.Linear model and
    onto the 4-bit one, the same map on each."""
    model = adapted("tensor_core", 4)
    train(model, torch.randn(5, 32))
    values = boftlab.saving.adapter_state(model)
    boftlab.save_adapter(boftlab.dequantize_bases(model, torch.float32), tmp_path)
    x = torch.randn(5, 32)
    plain = boftlab.load_adapter(PlainNet(), tmp_path)
    assert torch.equal(plain(x), with_adapter_values(PlainNet(), "tensor_core", values)(x))
    quantized_again = boftlab.load_adapter(QuantizedNet(4), tmp_path)
    assert torch.equal(quantized_again(x), with_adapter_values(QuantizedNet(4), "tensor_core", values)(x))


# --- bitsandbytes' CPU repacking (on AVX512-BF16 CPUs, at an eval-mode forward without gradients) ----------------------
def as_on_an_avx512_bf16_cpu(model: nn.Module) -> nn.Module:
    """Every 4-bit layer of ``model`` set to repack as bitsandbytes does on a CPU with AVX512-BF16, whatever this CPU
    is (bitsandbytes reads the flag at each forward)."""
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = True
    return model


class Wide4bitNet(QuantizedNet):
    """QuantizedNet at the sizes bitsandbytes' CPU repacking handles (in ≥ its 64-value blocks, out a multiple of 32)."""

    def __init__(self) -> None:
        nn.Module.__init__(self)
        torch.manual_seed(0)
        self.query = quantized(nn.Linear(64, 64), 4)
        self.value = quantized(nn.Linear(64, 32, bias=False), 4)
        self.head = nn.Linear(32, 3)


def repack(layer: nn.Module) -> None:
    """What bitsandbytes' eval-mode forward does to a 4-bit weight on such a CPU, done with its own function."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu(layer.weight.data,
                                                                                 layer.weight.quant_state)


@pytest.mark.parametrize("name", CONFIGS)
def test_an_evaluation_never_costs_a_gradient_through_4bit_layers(name):
    """Eval mode + a forward without gradients, then a training step: every trainable tensor gets the gradient it
    gets without the evaluation — also through ``value``, a 4-bit layer no adapter wraps (bitsandbytes' repacked
    kernel has no backward for its input, so the adapter on ``query`` before it would silently lose its gradient)."""
    x = torch.randn(5, 64)
    grads = {}
    for evaluate_first in (False, True):
        model = as_on_an_avx512_bf16_cpu(Wide4bitNet())
        boftlab.adapt(model, CONFIGS[name], targets=["query"], trainable=["head"])
        with torch.no_grad():
            for p in model.query.adapter_parameters().values():
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
        if evaluate_first:
            model.eval()
            with torch.no_grad():
                evaluated = model(x)
            model.train()
            assert torch.equal(evaluated, model(x))  # eval computes what training computes (no bf16 kernel)
        model(x).square().mean().backward()
        grads[evaluate_first] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        assert not any(base_layers.is_repacked(m) for m in model.modules())
    assert all(g is not None and g.abs().sum() > 0 for g in grads[True].values())
    for n, g in grads[False].items():
        assert torch.equal(grads[True][n], g), n


def test_a_4bit_layer_already_repacked_is_refused_before_anything_changes(tmp_path):
    boftlab.save_adapter(boftlab.adapt(Wide4bitNet(), CONFIGS["oft"], targets=["value"]), tmp_path)
    message = r"was repacked by bitsandbytes for CPU inference.*adapt it before evaluating it"
    for call in (lambda m: boftlab.adapt(m, CONFIGS["oft"], targets=["value"]),  # query, not a target, is repacked
                 lambda m: boftlab.load_adapter(m, tmp_path)):
        for unpacked_by_state_dict in (False, True):
            model = Wide4bitNet()
            repack(model.query)
            packed = model.query.weight.data.clone()
            if unpacked_by_state_dict:  # bitsandbytes' state_dict() unpacks it, inexactly: still refused
                model.state_dict()
                assert not model.query.weight.quant_state.packing_format_for_cpu
                packed = model.query.weight.data.clone()
            before = {k: v.clone() for k, v in model.named_parameters()}
            with pytest.raises(ValueError, match=message):
                call(model)
            assert not boftlab.adapter_layers(model) and torch.equal(model.query.weight.data, packed)
            assert all(torch.equal(v, before[k]) for k, v in model.named_parameters())


def test_a_layer_repacked_behind_boftlab_is_refused_at_the_next_call():
    model = boftlab.adapt(Wide4bitNet(), CONFIGS["boft"], targets=["query", "value"])
    repack(model.query.base_layer)
    with pytest.raises(ValueError, match=r"Linear4bit \(64 -> 64\) was repacked by bitsandbytes for CPU inference"):
        model(torch.randn(5, 64))
    with pytest.raises(ValueError, match=r"was repacked by bitsandbytes"):  # its packed weight would be misread
        boftlab.dequantize_bases(model, torch.float32)
    assert base_layers.kind(model.query.base_layer) == "quantized"


@pytest.mark.slow  # a fresh interpreter with bitsandbytes: 44 s on a loaded 2-core CPU
def test_the_repacking_guards_hold_on_a_cpu_without_avx512_bf16_too():
    """The guards above run here as on a CPU with AVX512-BF16 (the repacking forced, or done with bitsandbytes' own
    function); this runs them again as bitsandbytes runs where the CPU lacks it, so no CPU flag decides a pass."""
    tests = Path(__file__).parent
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "bnb_without_avx512_bf16",
               str(tests / "test_base_layers.py"), str(tests / "test_contract.py"),
               "-k", "repacked or evaluation and not without_avx512"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(tests)})
    summary = result.stdout.strip().splitlines()[-1]
    assert result.returncode == 0 and " passed" in summary and "failed" not in summary, result.stdout[-3000:]


def test_float64_into_a_4bit_kernel_is_refused():
    """bitsandbytes 0.50's 4-bit kernel computes float64 wrongly (on CPU, for fewer than 4 rows, up to 3.5 off the
    output of its own dequantized weight; float32 is exact): a 4-bit base without a compute dtype (bitsandbytes'
    default) fed float64 activations is refused; with a float32 compute dtype the kernel never sees float64, and the input is accepted."""
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(64, 32, quant_type="nf4")  # compute_dtype None: the kernel computes in the input's dtype
    layer.weight = bnb.nn.Params4bit(torch.randn(32, 64), requires_grad=False, quant_type="nf4")
    layer = layer.to("cpu")
    x = torch.randn(3, 64, dtype=torch.float64)  # fewer than 4 rows: bitsandbytes' gemv kernel
    reference = nn.functional.linear(x, base_layers.dequantized_weight(layer).double(), layer.bias.double())
    with torch.no_grad():
        assert (layer(x) - reference).abs().max() > 0.5  # bitsandbytes itself
    adapter = boftlab.TensorCoreConfig(ranks=4).make_layer(layer)
    with pytest.raises(ValueError, match=r"Linear4bit \(64 -> 32\) stores 4-bit weights and would compute in float64, "
                                         r"which bitsandbytes' 4-bit kernel computes wrongly.*dequantize_bases"):
        adapter(x)
    torch.testing.assert_close(adapter(x.float()), layer(x.float()))  # float32: accepted, exact at init
    layer.compute_dtype = torch.float32  # as bnb_4bit_compute_dtype sets it: the kernel sees float32
    torch.testing.assert_close(adapter(x), nn.functional.linear(x.float(), base_layers.dequantized_weight(layer),
                                                                layer.bias).double())


# --- what the base op costs (the additive families' cost models) ------------------------------------------------------
COSTED = {
    "linear": (lambda: nn.Linear(6, 4), (2, 3, 6)),
    "conv1d_transformers": (lambda: TransformersConv1D(4, 6), (2, 3, 6)),
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, stride=2), (2, 4, 11)),
    "conv2d grouped, padded": (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), (2, 4, 5, 7)),
    "conv2d unbatched, dilated": (lambda: nn.Conv2d(3, 4, 2, dilation=2), (3, 6, 6)),
    "conv3d same": (lambda: nn.Conv3d(2, 3, 3, padding="same"), (1, 2, 4, 4, 4)),
    "embedding": (lambda: nn.Embedding(7, 5), (2, 3)),
}


@pytest.mark.parametrize("name", COSTED)
def test_base_cost_is_what_torch_counts_and_vectors_are_the_output_rows(name):
    """``base_cost`` equals torch's own FLOP counter (multiply-adds = FLOPs / 2) for one call; ``vectors``' n_out is the
    number of output vectors (output numel / out) and n_in the input's (input numel / its channels)."""
    from torch.utils.flop_counter import FlopCounterMode

    make, x_shape = COSTED[name]
    layer = make()
    x = torch.randint(0, 7, x_shape) if name == "embedding" else torch.randn(x_shape)
    with FlopCounterMode(display=False) as counter:
        y = layer(x)
    assert base_layers.base_cost(layer, x_shape) == counter.get_total_flops() // 2
    n_in, n_out = base_layers.vectors(layer, x_shape)
    if name == "embedding":  # one row read and written per id
        assert (n_in, n_out) == (x.numel(), x.numel())
    else:
        in_channels = x_shape[-1] if base_layers.is_linear(layer) else x_shape[-len(layer.kernel_size) - 1]
        assert (n_in, n_out) == (x.numel() // in_channels, y.numel() // base_layers.weight_shape(layer)[0])


def test_mode_names_name_each_mode_of_the_weight():
    assert base_layers.mode_names(nn.Linear(6, 4)) == ("out_features", "in_features")
    assert base_layers.mode_names(TransformersConv1D(4, 6)) == ("out_features", "in_features")
    assert base_layers.mode_names(nn.Embedding(7, 5)) == ("num_embeddings", "embedding_dim")
    assert base_layers.mode_names(nn.Conv3d(2, 3, 3)) == (
        "out_channels", "in_channels/groups", "kernel_d", "kernel_h", "kernel_w")
