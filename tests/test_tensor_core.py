"""Tests for boftlab.tensor_core: the Tucker algebra, the FLoRA layer on every supported layer type, and models."""

from __future__ import annotations

import copy
import math
import string

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import boftlab
from boftlab.tensor_core import (
    TensorCoreConfig,
    TensorCoreLayer,
    mode_product,
    orthonormal_columns,
    resolve_ranks,
    tucker_delta,
    tucker_dimension,
    tucker_flops,
    tucker_n_params,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # these shapes are tiny (tests/conftest.py)


# name -> (base layer factory, input factory); float64 so comparisons are tight
LAYERS = {
    "linear": (lambda: nn.Linear(12, 10), lambda: torch.randn(3, 5, 12)),
    "conv1d": (lambda: nn.Conv1d(6, 8, 5, stride=2, padding=2), lambda: torch.randn(2, 6, 17)),
    "conv2d": (lambda: nn.Conv2d(6, 8, 3, padding=1, dilation=1), lambda: torch.randn(2, 6, 9, 9)),
    "conv2d_strided_reflect": (
        lambda: nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=1, dilation=(1, 2), padding_mode="reflect"),
        lambda: torch.randn(2, 4, 9, 8),
    ),
    "conv2d_same": (lambda: nn.Conv2d(4, 6, 3, padding="same", bias=False), lambda: torch.randn(2, 4, 7, 7)),
    "conv2d_grouped": (lambda: nn.Conv2d(8, 12, 3, padding=1, groups=4), lambda: torch.randn(2, 8, 7, 7)),
    "conv2d_depthwise": (lambda: nn.Conv2d(6, 6, 7, padding=3, groups=6), lambda: torch.randn(2, 6, 9, 9)),
    "conv3d": (lambda: nn.Conv3d(3, 5, (3, 2, 3), padding=(1, 0, 1)), lambda: torch.randn(2, 3, 5, 4, 5)),
    "embedding": (lambda: nn.Embedding(20, 7, padding_idx=3), lambda: torch.tensor([[0, 3, 5, 19], [7, 7, 3, 1]])),
}
RANKS = {"linear": (4, 3), "conv1d": (3, 4, 2), "embedding": (5, 3)}  # others: ranks=3 (min(3, size) per mode)


def make(name: str, path: str = "auto", randomise: bool = True) -> tuple[TensorCoreLayer, torch.Tensor]:
    torch.manual_seed(0)
    build, inputs = LAYERS[name]
    base = build().double()
    layer = TensorCoreConfig(ranks=RANKS.get(name, 3), alpha=0.7, path=path).make_layer(base).double()
    if randomise:  # a trained-looking core (the init one is zero)
        with torch.no_grad():
            layer.core.normal_()
    x = inputs()
    return layer, (x.double() if x.is_floating_point() else x)


def dense_reference(layer: TensorCoreLayer) -> torch.Tensor:
    """α · G ×₁ U₁ ⋯ ×_N U_N written as one einsum: 'abc,ia,jb,kc->ijk'."""
    n = layer.core.dim()
    small, big = string.ascii_lowercase[:n], string.ascii_lowercase[n : 2 * n]
    spec = small + "," + ",".join(big[i] + small[i] for i in range(n)) + "->" + big
    return layer.config.alpha * torch.einsum(spec, layer.core, *layer.factors)


def reference_forward(layer: TensorCoreLayer, x: torch.Tensor) -> torch.Tensor:
    """The base layer run with its weight replaced by W + ΔW (einsum reference)."""
    base = layer.base_layer
    original = base.weight.detach().clone()
    with torch.no_grad():
        base.weight.add_(dense_reference(layer))
        y = base(x)
        base.weight.copy_(original)
    return y


# --- the Tucker algebra --------------------------------------------------------------------------------------------
def test_mode_product_matches_einsum():
    t, m = torch.randn(3, 4, 5, dtype=torch.float64), torch.randn(7, 4, dtype=torch.float64)
    torch.testing.assert_close(mode_product(t, m, 1), torch.einsum("ajc,bj->abc", t, m))


def test_mode_product_rejects_mismatched_matrix():
    with pytest.raises(ValueError, match=r"must be \(d, 4\)"):
        mode_product(torch.randn(3, 4), torch.randn(5, 3), 1)


def test_tucker_delta_matches_einsum_and_counts_flops():
    core = torch.randn(2, 3, 4, dtype=torch.float64)
    factors = [torch.randn(d, r, dtype=torch.float64) for d, r in zip((5, 6, 7), core.shape)]
    expected = 2.0 * torch.einsum("abc,ia,jb,kc->ijk", core, *factors)
    torch.testing.assert_close(tucker_delta(core, factors, 2.0), expected)
    assert tucker_flops((5, 6, 7), (2, 3, 4)) == 5 * 24 + 30 * 12 + 210 * 4


def test_parameter_count_formula():
    # Conv2d 64 -> 32, 3x3, ranks (8, 4, 3, 2): core 8·4·3·2 + factors 32·8 + 64·4 + 3·3 + 3·2
    conv = nn.Conv2d(64, 32, 3)
    layer = TensorCoreConfig(ranks=(8, 4, 3, 2)).make_layer(conv)
    assert layer.n_trainable() == 192 + 256 + 256 + 9 + 6 == tucker_n_params((32, 64, 3, 3), (8, 4, 3, 2))
    for name in LAYERS:
        layer, _ = make(name)
        factors = sum(d * r for d, r in zip(layer.weight_shape, layer.ranks))
        assert layer.n_trainable() == math.prod(layer.ranks) + factors


@pytest.mark.parametrize("shape,ranks", [((5, 4, 3), (3, 2, 2)), ((6, 5), (2, 2)), ((4, 3, 3), (4, 1, 1))])
def test_effective_count_is_the_jacobian_rank(shape, ranks):
    """tucker_dimension == rank of the Jacobian of (G, U₁…U_N) -> ΔW at a random point (the local dimension)."""
    torch.manual_seed(1)
    core = torch.randn(ranks, dtype=torch.float64)
    factors = [torch.randn(d, r, dtype=torch.float64) for d, r in zip(shape, ranks)]

    def delta(*params):
        return tucker_delta(params[0], params[1:]).reshape(-1)

    jac = torch.autograd.functional.jacobian(delta, (core, *factors))
    jac = torch.cat([j.reshape(j.shape[0], -1) for j in jac], dim=1)
    assert torch.linalg.matrix_rank(jac).item() == tucker_dimension(shape, ranks)
    assert tucker_dimension(shape, ranks) < tucker_n_params(shape, ranks)


# --- ranks ------------------------------------------------------------------------------------------------------------
def test_scalar_rank_means_min_of_rank_and_mode_size_on_a_depthwise_conv():
    depthwise = nn.Conv2d(96, 96, 7, padding=3, groups=96)  # ConvNeXt's, weight (96, 1, 7, 7)
    assert TensorCoreConfig(ranks=8).make_layer(depthwise).ranks == (8, 1, 7, 7)


def test_rank_above_mode_size_raises_with_valid_ranges():
    depthwise = nn.Conv2d(96, 96, 7, groups=96)
    with pytest.raises(ValueError) as err:
        TensorCoreConfig(ranks=(8, 8, 3, 3)).make_layer(depthwise)
    message = str(err.value)
    assert "ranks[1]=8 for in_channels/groups=1" in message
    assert "in_channels/groups 1..1" in message and "out_channels 1..96" in message
    assert "nearest valid: ranks=(8, 1, 3, 3)" in message


def test_wrong_number_of_ranks_raises_naming_the_modes():
    modes = r"4 modes \(out_channels, in_channels/groups, kernel_h, kernel_w\)"
    with pytest.raises(ValueError, match=r"has 2 entries .* " + modes):
        TensorCoreConfig(ranks=(4, 4)).make_layer(nn.Conv2d(8, 8, 3))
    with pytest.raises(ValueError, match=r"give 3 ranks, e.g. ranks=\(8, 2, 5\)"):
        resolve_ranks((8, 2, 5), (1, 1), ("out_channels", "in_channels/groups", "kernel_size"), "Conv1d")


def test_unsupported_layer_raises_listing_supported_types():
    with pytest.raises(ValueError, match=r"ConvTranspose2d.*nn.Linear, transformers Conv1D, nn.Conv1d, nn.Conv2d, "
                                         r"nn.Conv3d, nn.Embedding"):
        TensorCoreConfig().make_layer(nn.ConvTranspose2d(4, 4, 3))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"ranks": 0}, "ranks must be"),
        ({"ranks": (2, 0)}, "ranks must be"),
        ({"ranks": 2.5}, "ranks must be"),
        ({"alpha": 0}, "alpha=0"),
        ({"alpha": float("nan")}, "finite"),
        ({"path": "fast"}, r"path must be one of \('auto', 'input', 'assembled', 'weight'\)"),
    ],
)
def test_bad_config_values_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TensorCoreConfig(**kwargs)


def test_input_path_refuses_embedding_with_max_norm():
    with pytest.raises(ValueError, match="max_norm"):
        TensorCoreConfig(path="input").make_layer(nn.Embedding(10, 4, max_norm=1.0))


def test_config_round_trips_through_dict():
    config = TensorCoreConfig(ranks=(4, 2, 3, 3), alpha=2.0, path="weight")
    data = config.to_dict()
    assert data == {"family": "tensor_core", "ranks": [4, 2, 3, 3], "alpha": 2.0, "path": "weight"}
    assert boftlab.AdapterConfig.from_dict(data) == config


# --- the layer --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(LAYERS))
def test_delta_weight_equals_dense_einsum_reference(name):
    layer, _ = make(name)
    torch.testing.assert_close(layer.delta_weight(), dense_reference(layer), rtol=1e-12, atol=1e-12)
    assert layer.delta_weight().shape == layer.base_layer.weight.shape


@pytest.mark.parametrize("path", ["weight", "input"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_forward_equals_base_with_dense_updated_weight(name, path):
    layer, x = make(name, path)
    torch.testing.assert_close(layer(x), reference_forward(layer, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("path", ["weight", "input"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_identity_at_init(name, path):
    layer, x = make(name, path, randomise=False)
    assert torch.equal(layer(x), layer.base_layer(x))
    assert torch.count_nonzero(layer.delta_weight()) == 0


@pytest.mark.parametrize("path", ["weight", "input"])
@pytest.mark.parametrize("name", ["linear", "conv2d_grouped", "embedding"])
def test_step_zero_gradients_reach_the_core_then_every_factor(name, path):
    layer, x = make(name, path, randomise=False)
    layer(x).square().sum().backward()
    assert layer.core.grad.abs().sum() > 0  # the projected weight gradient
    assert all(f.grad.abs().sum() == 0 for f in layer.factors)  # ∂L/∂U_n carries the (zero) core
    with torch.no_grad():
        layer.core -= 0.1 * layer.core.grad
    layer.zero_grad()
    layer(x).square().sum().backward()
    assert all(f.grad.abs().sum() > 0 for f in layer.factors)


def test_init_factors_have_orthonormal_columns_so_delta_norm_is_alpha_times_core_norm():
    layer, _ = make("conv2d")
    for factor in layer.factors:
        torch.testing.assert_close(factor.T @ factor, torch.eye(factor.shape[1], dtype=torch.float64))
    torch.testing.assert_close(layer.delta_weight().norm(), layer.config.alpha * layer.core.norm())


def test_orthonormal_columns_draw_from_the_given_generator_else_from_the_global_one():
    drawn = orthonormal_columns(7, 3, torch.float64, None, torch.Generator().manual_seed(4))
    torch.testing.assert_close(drawn.T @ drawn, torch.eye(3, dtype=torch.float64))
    assert torch.equal(orthonormal_columns(7, 3, torch.float64, None, torch.Generator().manual_seed(4)), drawn)
    torch.manual_seed(4)
    assert torch.equal(orthonormal_columns(7, 3, torch.float64, None), drawn)  # the same stream as a seeded generator



def test_factors_are_stored_row_major_so_a_loaded_adapter_computes_bit_for_bit(tmp_path):
    """QR returns Q column-major; a saved adapter loads back row-major, and the same values in the other layout round
    differently in a matmul (1e-16 in fp64 on a Conv1D, found by test_round_trips): the factors start contiguous."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(7)
    model = nn.Sequential(Conv1D(12, 16)).double()
    boftlab.adapt(model, boftlab.TensorCoreConfig(ranks=2, alpha=-0.8), targets=["0"])
    assert all(p.is_contiguous() for p in model[0].adapter_parameters().values())
    with torch.no_grad():
        for p in model[0].adapter_parameters().values():
            p.add_(0.2 * torch.randn_like(p))
    boftlab.save_adapter(model, tmp_path / "adapter")
    torch.manual_seed(7)
    loaded = boftlab.load_adapter(nn.Sequential(Conv1D(12, 16)).double(), tmp_path / "adapter")
    x = torch.randn(64, 16, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))

# small shapes: gradcheck differentiates numerically in every input entry
GRADCHECK = {
    "linear": (lambda: nn.Linear(5, 4), (2, 5), (3, 2)),
    "conv1d": (lambda: nn.Conv1d(3, 4, 3, stride=2, padding=1), (1, 3, 6), (2, 2, 3)),
    "conv2d_grouped_reflect": (
        lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2, padding_mode="reflect"), (1, 4, 4, 4), (3, 2, 2, 3)
    ),
    "conv2d_depthwise": (lambda: nn.Conv2d(3, 3, 3, groups=3, stride=2), (1, 3, 5, 5), 2),
    "conv3d": (lambda: nn.Conv3d(2, 3, 2, padding=1), (1, 2, 3, 2, 3), 2),
}


@pytest.mark.parametrize("path", ["weight", "input"])
@pytest.mark.parametrize("name", [*GRADCHECK, "embedding"])
def test_gradcheck(name, path):
    torch.manual_seed(0)
    if name == "embedding":
        layer, x = make(name, path)
        x = x[x != layer.base_layer.padding_idx]  # padding_idx blocks its row's gradient by design: leave it out
    else:
        build, shape, ranks = GRADCHECK[name]
        layer = TensorCoreConfig(ranks=ranks, alpha=0.7, path=path).make_layer(build().double()).double()
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    layer.base_layer.requires_grad_(False)
    names = list(layer.adapter_parameters())
    values = [torch.randn_like(p, requires_grad=True) for p in layer.adapter_parameters().values()]

    def fn(*args):
        inp, params = (args[0], args[1:]) if x.is_floating_point() else (x, args)
        return torch.func.functional_call(layer, dict(zip(names, params)), (inp,))

    assert torch.autograd.gradcheck(fn, (x, *values) if x.is_floating_point() else tuple(values))


@pytest.mark.parametrize("name", list(LAYERS))
def test_merged_forward_equals_unmerged_and_unmerge_restores_weight(name):
    layer, x = make(name)
    original = layer.base_layer.weight.detach().clone()
    expected = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.base_layer.weight, original + dense_reference(layer))
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, original, rtol=1e-12, atol=1e-12)


def test_embedding_padding_row_stays_the_base_row_after_training():
    layer, x = make("embedding", randomise=False)
    opt = torch.optim.SGD(layer.adapter_parameters().values(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        layer(x).sin().sum().backward()
        opt.step()
    delta = layer.delta_weight()
    assert delta.abs().sum() > 0
    assert torch.count_nonzero(delta[layer.base_layer.padding_idx]) == 0


def test_embedding_with_max_norm_renormalises_the_adapted_rows_and_leaves_base_weight():
    torch.manual_seed(0)
    base = nn.Embedding(10, 4, max_norm=0.5).double()
    layer = TensorCoreConfig(ranks=2).make_layer(base).double()
    with torch.no_grad():
        layer.core.normal_()
    frozen = base.weight.detach().clone()
    x = torch.tensor([1, 2, 2, 9])
    expected = F.embedding(x, frozen + dense_reference(layer), max_norm=0.5)
    torch.testing.assert_close(layer(x), expected)
    assert torch.equal(base.weight, frozen)
    assert layer(x).norm(dim=-1).max() <= 0.5 + 1e-6


def test_bfloat16_base_keeps_its_dtype_and_float32_adapter():
    base = nn.Conv2d(4, 4, 3).to(torch.bfloat16)
    for path in ("weight", "input"):
        layer = TensorCoreConfig(ranks=2, path=path).make_layer(base)
        assert layer(torch.randn(1, 4, 6, 6, dtype=torch.bfloat16)).dtype == torch.bfloat16
        assert layer.core.dtype == torch.float32


# --- choosing the path ----------------------------------------------------------------------------------------------
def test_auto_path_follows_the_flop_estimate():
    wide = TensorCoreConfig(ranks=8).make_layer(nn.Conv2d(256, 256, 3, padding=1))
    x = torch.randn(16, 256, 32, 32, requires_grad=True)
    costs = wide.path_costs(x.shape, training=True, input_requires_grad=True)
    assert costs["input"] < costs["weight"]  # the chain avoids the weight-gradient conv
    assert wide.choose_path(x) == "input"
    with torch.no_grad():  # inference: assembling ΔW once is cheaper than the chain over 16·32·32 positions
        assert wide.choose_path(x) == "weight"
    depthwise = TensorCoreConfig(ranks=8).make_layer(nn.Conv2d(96, 96, 7, padding=3, groups=96))
    y = torch.randn(16, 96, 32, 32, requires_grad=True)
    assert depthwise.choose_path(y) == "weight"  # the chain's middle conv is r_out times the depthwise conv
    embedding = TensorCoreConfig(ranks=8).make_layer(nn.Embedding(30000, 64))
    assert embedding.choose_path(torch.zeros(4, 16, dtype=torch.long)) == "input"  # never assemble a vocab-sized ΔW
    with_max_norm = TensorCoreConfig(ranks=8).make_layer(nn.Embedding(300, 64, max_norm=1.0))
    assert with_max_norm.paths() == ("weight",) and with_max_norm.choose_path(torch.zeros(4, dtype=torch.long)) == "weight"


def test_path_costs_count_the_base_conv():
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1)
    layer = TensorCoreConfig(ranks=(2, 2, 3, 3)).make_layer(conv)
    base = 4 * 8 * 8 * 16 * 8 * 9  # batch 4, 16×16 -> 8×8 output, out 16, in 8, 3×3
    weight_cost = layer.path_costs((4, 8, 16, 16), training=False, input_requires_grad=False)["weight"]
    assert weight_cost == base + tucker_flops((16, 8, 3, 3), (2, 2, 3, 3))


# --- in models ------------------------------------------------------------------------------------------------------
def _train_step_changes_output(model: nn.Module, forward) -> None:
    """One Adam step moves the output; merged and unmerged models then agree."""
    before = forward(model).detach()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    forward(model).square().mean().backward()
    opt.step()
    with torch.no_grad():
        after = forward(model)
        assert not torch.allclose(before, after)
        boftlab.merge(model)
        torch.testing.assert_close(forward(model), after, rtol=1e-4, atol=1e-4)
        boftlab.unmerge(model)
        torch.testing.assert_close(forward(model), after, rtol=1e-4, atol=1e-4)


def test_timm_convnext_depthwise_and_pointwise_layers():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("convnext_atto", pretrained=False, num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    reference = model(x)
    boftlab.adapt(model, TensorCoreConfig(ranks=4), targets=[nn.Conv2d, nn.Linear], trainable=["head.fc"])
    layers = boftlab.adapter_layers(model)
    depthwise = [l for l in layers.values() if isinstance(l.base_layer, nn.Conv2d) and l.base_layer.groups > 1]
    assert depthwise and all(l.ranks == (4, 1, 4, 4) for l in depthwise)
    assert torch.equal(model(x), reference)
    _train_step_changes_output(model, lambda m: m(x))


def test_diffusers_unet2d_small_config():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 500])
    reference = model(x, t).sample
    boftlab.adapt(model, TensorCoreConfig(ranks=3, alpha=2.0), targets=[nn.Conv2d, nn.Linear])
    summary = boftlab.summary(model)
    assert summary.by_family["tensor_core"]["layers"] > 10 and summary.trainable == summary.adapter
    assert torch.equal(model(x, t).sample, reference)
    _train_step_changes_output(model, lambda m: m(x, t).sample)


def test_save_and_load_adapter_round_trip(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3, groups=4), nn.Flatten(), nn.Linear(64, 2))
    x = torch.randn(2, 3, 8, 8)
    fresh = copy.deepcopy(net)
    boftlab.adapt(net, TensorCoreConfig(ranks=(3, 2, 3, 3)), targets=["0"])
    boftlab.adapt(net, TensorCoreConfig(ranks=2, path="input"), targets=["2"])
    with torch.no_grad():
        for layer in boftlab.adapter_layers(net).values():
            layer.core.normal_()
    expected = net(x)
    boftlab.save_adapter(net, tmp_path / "adapter")
    boftlab.load_adapter(fresh, tmp_path / "adapter")
    assert boftlab.adapter_layers(fresh)["2"].ranks == (2, 2, 2, 2)
    torch.testing.assert_close(fresh(x), expected)


@pytest.mark.parametrize("path", ["weight", "input"])
@pytest.mark.parametrize("name", ["linear", "conv2d_grouped", "conv3d"])
def test_autocast_bfloat16_output_is_close_to_float32(name, path):
    layer, x = make(name, path)
    layer, x = layer.float(), x.float()
    full = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = layer(x)
        assert layer.delta_weight().dtype == torch.float32  # assembled outside autocast
    assert (half.float() - full).abs().max() <= 0.05 * full.abs().max()


def test_merge_into_an_embedding_with_max_norm_is_refused_unwrap_is_exact_and_disabled_leaves_the_table():
    """A merged Embedding(max_norm) would renormalise rows of W + ΔW in place at every forward, and unmerge could not
    give W back (merge, forward, unmerge left W changed for good): merge is refused; unwrap (never unmerged) folds
    it in exactly; the base's output inside disabled() renormalises a copy, never the frozen table."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4, max_norm=0.5))
    boftlab.adapt(model, TensorCoreConfig(ranks=2), targets=["0"])
    layer = model[0]
    with torch.no_grad():
        layer.base_layer.weight.mul_(3)  # rows longer than max_norm
        layer.core.normal_()
    x = torch.tensor([1, 2, 2, 9])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    adapted = model(x)
    for merge in (boftlab.merge, lambda m: m[0].merge()):
        with pytest.raises(ValueError, match=r"cannot merge into this Embedding with max_norm=0.5: once merged, every "
                                             r"forward would renormalise .*in place.*boftlab.unwrap\(model\)"):
            merge(model)
        assert not layer.merged and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with boftlab.disabled(model):
        base_output = model(x)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # the frozen table untouched
    torch.testing.assert_close(base_output, F.embedding(x, state["0.base_layer.weight"].clone(), max_norm=0.5))
    plain = boftlab.unwrap(model)
    assert type(plain[0]) is nn.Embedding
    torch.testing.assert_close(plain(x), adapted)


def test_a_bf16_adapter_on_an_fp32_layer_is_not_rounded_to_bf16_on_the_weight_path():
    """ΔW of a bf16 adapter is formed in the wider of the two dtypes: the weight path agrees with the input path (which
    computes in the activations' fp32) to fp32 rounding, not to bf16's."""
    torch.manual_seed(0)
    base = nn.Linear(64, 32)
    layers = {path: TensorCoreConfig(ranks=8, path=path).make_layer(base) for path in ("input", "weight")}
    core = torch.randn_like(layers["input"].core)
    for layer in layers.values():
        layer.core.data = core.clone()
        for mine, theirs in zip(layer.factors, layers["input"].factors):
            mine.data = theirs.data.clone()
        for p in layer.adapter_parameters().values():
            p.data = p.data.to(torch.bfloat16)  # the adapter alone in bf16, the base stays fp32
    x = torch.randn(8, 64)
    delta = {path: layer(x) - base(x) for path, layer in layers.items()}
    assert layers["weight"].core.dtype == torch.bfloat16 and delta["weight"].dtype == torch.float32
    assert (delta["weight"] - delta["input"]).abs().max() <= 1e-5 * delta["input"].abs().max()
