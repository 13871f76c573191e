"""boftlab.base_layers: how the families see the layers they wrap — nn.Linear, transformers' Conv1D, convolutions,
Embedding, and bitsandbytes' quantized Linear4bit / Linear8bitLt (on CPU), with every family on top of them."""

import copy

import bitsandbytes as bnb
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations
from transformers.pytorch_utils import Conv1D as TransformersConv1D

import boftlab
from boftlab import base_layers
from boftlab.base_layers import Conv1D

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
    "weight_norm": (lambda: parametrizations.weight_norm(nn.Linear(16, 8)), r"parametrize \(_WeightNorm\)"),
    "spectral_norm": (lambda: parametrizations.spectral_norm(nn.Linear(16, 8)), r"\(_SpectralNorm\)"),
    "old weight_norm": (lambda: torch.nn.utils.weight_norm(nn.Conv2d(16, 8, 3)), r"pre-hook \(WeightNorm\)"),
    "pruned": (lambda: pruned(nn.Linear(16, 8)), r"pre-hook \(L1Unstructured\).*prune.remove\(layer, 'weight'\)"),
}


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")
@pytest.mark.parametrize("family", ["boft", "surm", "tensor_core"])
@pytest.mark.parametrize("name", COMPUTED_WEIGHTS)
def test_a_weight_computed_at_every_call_is_refused_before_the_model_is_touched(name, family):
    """weight_norm, spectral_norm, pruning: the layer's weight is recomputed before each call, so a merge written
    into it was silently overwritten — the merged model computed the base layer's output (max |merged − adapted|
    0.7 to 2.9 before this check, every family). adapt refuses, naming the cause and how to fold it first."""
    make, cause = COMPUTED_WEIGHTS[name]
    torch.manual_seed(0)
    model = nn.Sequential(make())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = {"boft": boftlab.BOFTConfig(block_size=4), "surm": boftlab.SURMConfig(),
              "tensor_core": boftlab.TensorCoreConfig(ranks=2)}[family]
    with pytest.raises(ValueError, match=rf"weight is not stored but computed from other tensors at every call by .*"
                                         rf"{cause}.*then adapt"):
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


CONFIGS = {
    "boft": boftlab.BOFTConfig(block_size=4, n_factors=2),
    "oft": boftlab.OFTConfig(block_size=8),
    "surm_lora": boftlab.SURMConfig(structure="circulant"),
    "surm_adapter": boftlab.SURMConfig(structure="toeplitz", mode="adapter", activation="identity", bias=False),
    "tensor_core": boftlab.TensorCoreConfig(ranks=4),
}
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
    assert all(type(layer.base_layer) is nn.Linear for layer in boftlab.adapter_layers(model).values())
    # 4-bit: bitsandbytes multiplies by exactly the dequantized weight; 8-bit on CPU too, up to summation order
    dequantized_output = model(x)
    torch.testing.assert_close(dequantized_output, quantized_output, rtol=1e-5, atol=1e-5)
    plain = boftlab.unwrap(model)
    assert not boftlab.adapter_layers(plain) and type(plain.query) is nn.Linear
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
