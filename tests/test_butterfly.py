"""BOFT / OFT: the butterfly structure, orthogonality, the three exact paths, merging, PEFT equality, bad input."""

import math

import pytest
import torch
from torch import nn

from boftlab import BOFTConfig, OFTConfig
from boftlab.butterfly import FACTOR_COST, PRODUCT_COST, cayley, skew_entries, skew_symmetric, upper_index
from boftlab.butterfly_structure import butterfly_permutation, valid_block_sizes, valid_n_factors
from boftlab.bench.peft_patch import peft_boft_without_cuda

SHAPES = [(16, 2, 1), (16, 2, 4), (16, 4, 3), (24, 4, 2), (12, 3, 1), (32, 8, 3), (64, 8, 4), (48, 6, 2)]


def randomize(layer, std=0.3):
    with torch.no_grad():
        layer.skew.normal_(0, std)
        if layer.scale is not None:
            layer.scale.normal_(1, 0.2)
    return layer


def boft_linear(d, b, m, out=5, dtype=torch.float64, **kw):
    base = nn.Linear(d, out).to(dtype)
    return randomize(BOFTConfig(block_size=b, n_factors=m, **kw).make_layer(base).to(dtype))


# --- structure -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("d,b", [(16, 2), (32, 4), (64, 8)])
def test_log2_plus_one_factors_make_R_dense(d, b):
    m_dense = int(math.log2(d // b)) + 1
    assert valid_n_factors(d, b)[-1] == m_dense
    for m in range(1, m_dense + 1):
        density = (boft_linear(d, b, m).rotation().abs() > 1e-12).double().mean().item()
        expected = min(1.0, b * 2 ** (m - 1) / d)  # each factor doubles the mixed span
        assert density == pytest.approx(expected), (m, density)


def test_parameter_count_formula():
    layer = boft_linear(64, 8, 3, out=10)
    k = 64 // 8
    assert layer.n_trainable() == 3 * k * 8 * 7 // 2 + 10


# --- orthogonality ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("d,b,m", SHAPES)
def test_R_is_orthogonal_fp32(d, b, m):
    layer = boft_linear(d, b, m, dtype=torch.float32)
    R = layer.rotation()
    assert R.dtype == torch.float32
    assert (R.T @ R - torch.eye(d)).abs().max() <= 1e-5


def test_cayley_neumann_approaches_exact():
    skew = skew_symmetric(0.05 * torch.randn(4, 6, dtype=torch.float64), 4)
    exact = cayley(skew)
    errors = [(cayley(skew, n) - exact).abs().max().item() for n in (2, 3, 5, 8)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-5


def test_skew_entries_round_trip():
    vec = torch.randn(3, 5, 10)
    assert torch.equal(skew_entries(skew_symmetric(vec, 5)), vec)
    assert torch.equal(skew_symmetric(vec, 5, upper_index(5)), skew_symmetric(vec, 5))  # the layer's kept index


def test_rotation_indices_are_rebuilt_not_saved():
    """The rotation's index tensors move with the layer but stay out of state_dict (persistent=False): saved files
    hold only skew and scale, as before the rotation became a module."""
    layer = boft_linear(64, 8, 2)
    assert set(layer.adapter_state()) == {"skew", "scale"}
    assert {n for n, _ in layer.named_buffers()} == {"butterfly.upper_index", "butterfly.assembly_index"}
    assert not any(n.startswith("butterfly.") for n in layer.state_dict())
    layer = layer.double()
    assert layer.butterfly.assembly_index.dtype == torch.long and layer.skew.dtype == torch.float64
    x = torch.randn(3, 64, dtype=torch.float64)
    expected, state = layer(x), {k: v.clone() for k, v in layer.state_dict().items()}
    layer.to_empty(device="cpu")  # uninitialised memory everywhere; the indices are rebuilt, the rest loaded
    layer.load_state_dict(state)
    assert torch.equal(layer(x), expected)
    wide = boft_linear(256, 2, 8)  # L = 256 > MAX_GATHER_WIDTH: the tiled identity, no index kept
    assert not wide.butterfly.gathers and wide.butterfly.assembly_index is None


# --- the three exact paths -------------------------------------------------------------------------------------------
PATHS = ["input", "assembled", "weight"]


def formula_rotation(layer):
    """R = B_m ⋯ B_1 read literally: B_i = P_i · blockdiag(Q_i1 … Q_ik) · P_iᵀ with dense permutation matrices and
    torch.block_diag (P[j, perm[j]] = 1) — shares nothing with the layer's ways of applying R. Tests only."""
    blocks = layer.orthogonal_blocks()
    d, b = layer.fan_in, layer.block_size
    eye = torch.eye(d, dtype=blocks.dtype)
    rotation = eye
    for i in range(layer.n_factors):
        permutation = eye[butterfly_permutation(d, b, i)]
        rotation = permutation @ torch.block_diag(*blocks[i]) @ permutation.T @ rotation
    return rotation


def dense_reference(layer, x):
    """y = diag(s) W Rᵀ x + bias with the dense R of ``formula_rotation`` (tests only)."""
    R = formula_rotation(layer)
    base = layer.base_layer
    w = base.weight.reshape(layer.out_features, -1) @ R.T
    if layer.scale is not None:
        w = w * layer.scale[:, None]
    if isinstance(base, nn.Linear):
        return nn.functional.linear(x, w, base.bias)
    return base._conv_forward(x, w.reshape(base.weight.shape), base.bias)


def every_family(dims):
    """Every valid (d, b, m) for these fan-ins: m = 1 (OFT), the dense m, odd b, odd k = d/b, odd d/L."""
    return [(d, b, m) for d in dims for b in range(2, d + 1) for m in valid_n_factors(d, b)
            if b in valid_block_sizes(d, m)]


def outputs_and_gradients(layer, x):
    """The output and the gradients of a generic scalar loss w.r.t. x and every adapter parameter."""
    x = x.detach().requires_grad_(True)
    params = [x, *layer.adapter_parameters().values()]
    y = layer(x)
    return y, torch.autograd.grad((y * torch.linspace(-1, 2, y.numel(), dtype=y.dtype).reshape(y.shape)).sum(), params)


def assert_equal_to_dense(layer, x, atol):
    y, grads = outputs_and_gradients(layer, x)
    params = [x.detach().requires_grad_(True), *layer.adapter_parameters().values()]
    reference = dense_reference(layer, params[0])
    weights = torch.linspace(-1, 2, reference.numel(), dtype=reference.dtype).reshape(reference.shape)
    expected = torch.autograd.grad((reference * weights).sum(), params)
    torch.testing.assert_close(y, reference, rtol=0, atol=atol)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=atol)


FAMILY_GRID = every_family((12, 16, 24, 32, 48, 64, 96))


def test_family_grid_covers_the_edge_cases():
    spans = {(d, b, m): b * 2 ** (m - 1) for d, b, m in FAMILY_GRID}
    assert len(FAMILY_GRID) == 118
    assert any(m == 1 for _, _, m in FAMILY_GRID) and any(L == d for (d, _, _), L in spans.items() if _ > 1)
    assert (12, 3, 1) in FAMILY_GRID and (48, 16, 1) in FAMILY_GRID  # odd b; odd k = d/b
    assert (48, 8, 2) in FAMILY_GRID and (96, 4, 4) in FAMILY_GRID  # d/L = 3 chunks
    assert (96, 6, 5) in FAMILY_GRID and spans[(96, 6, 5)] == 96  # the dense m


@pytest.mark.parametrize("d,b,m", FAMILY_GRID, ids=[f"d{d}-b{b}-m{m}" for d, b, m in FAMILY_GRID])
def test_every_family_every_path_equals_dense_fp64(d, b, m, one_thread):
    """Forward and gradients (x, skew, scale) of each path equal the formula's dense R, fp64, to 1e-12."""
    layer = boft_linear(d, b, m)
    x = torch.randn(2, 3, d, dtype=torch.float64)
    torch.testing.assert_close(layer.rotation(), formula_rotation(layer), rtol=0, atol=1e-12)
    for path in PATHS:
        layer.config.path = path
        assert layer.choose_path(x) == path
        assert_equal_to_dense(layer, x, atol=1e-12)


@pytest.mark.parametrize("d,b,m", SHAPES)
@pytest.mark.parametrize("path", PATHS)
def test_linear_paths_equal_dense(d, b, m, path):
    layer = boft_linear(d, b, m, path=path)
    x = torch.randn(3, 7, d, dtype=torch.float64)
    torch.testing.assert_close(layer(x), dense_reference(layer, x), rtol=0, atol=1e-12)


CONVS = [
    dict(in_channels=4, out_channels=6, kernel_size=2),  # d = 16
    dict(in_channels=8, out_channels=5, kernel_size=(2, 1), stride=2, padding=1, dilation=(2, 1)),  # d = 16
    dict(in_channels=8, out_channels=8, kernel_size=2, groups=2, padding=(1, 0)),  # d = 16 per group
    dict(in_channels=4, out_channels=4, kernel_size=3, groups=4, padding=1, bias=False),  # depthwise, d = 9
    dict(in_channels=6, out_channels=4, kernel_size=(2, 2), stride=(1, 2), dilation=2, groups=2),  # d = 12
    dict(in_channels=12, out_channels=6, kernel_size=2, stride=3, padding=(0, 2)),  # d = 48
]


@pytest.mark.parametrize("conv_kwargs", CONVS)
@pytest.mark.parametrize("path", PATHS)
def test_conv2d_paths_equal_dense(conv_kwargs, path):
    conv = nn.Conv2d(**conv_kwargs).double()
    d = conv.weight[0].numel()
    b, m = {9: (3, 1), 12: (2, 2)}.get(d, (2, 3))
    layer = randomize(BOFTConfig(block_size=b, n_factors=m, path=path).make_layer(conv).double())
    x = torch.randn(2, conv_kwargs["in_channels"], 7, 6, dtype=torch.float64)
    torch.testing.assert_close(layer(x), dense_reference(layer, x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("conv_kwargs", CONVS, ids=[f"conv{i}" for i in range(len(CONVS))])
def test_conv2d_every_family_every_path_equals_dense_fp64(conv_kwargs, one_thread):
    """Forward and gradients of every path, for every valid (b, m) of the conv's fan-in."""
    conv = nn.Conv2d(**conv_kwargs).double()
    x = torch.randn(2, conv_kwargs["in_channels"], 7, 6, dtype=torch.float64)
    for d, b, m in every_family([conv.weight[0].numel()]):
        layer = randomize(BOFTConfig(block_size=b, n_factors=m).make_layer(conv).double())
        for path in PATHS:
            layer.config.path = path
            assert_equal_to_dense(layer, x, atol=1e-12)


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_auto_choice_changes_speed_not_results(dtype, atol, kind):
    """Whatever path auto takes, outputs and gradients equal every forced path's (fp64 exactly, fp32 to rounding)."""
    torch.manual_seed(0)
    module = nn.Linear(32, 24) if kind == "linear" else nn.Conv2d(8, 6, 2, padding=1)
    x = torch.randn(5, 32) if kind == "linear" else torch.randn(2, 8, 5, 5)
    layer = randomize(BOFTConfig(block_size=4, n_factors=2).make_layer(module.to(dtype)).to(dtype))
    auto = outputs_and_gradients(layer, x.to(dtype))
    for path in PATHS:
        layer.config.path = path
        forced = outputs_and_gradients(layer, x.to(dtype))
        torch.testing.assert_close(forced[0], auto[0], rtol=0, atol=atol)
        for got, want in zip(forced[1], auto[1]):
            torch.testing.assert_close(got, want, rtol=0, atol=atol)


def test_auto_path_follows_the_cost_model():
    layer = boft_linear(64, 8, 2, out=8192)  # L = 16 = the assembled width w, gathered
    factored = 2 * max(8, FACTOR_COST)  # m = 2 factors, at least FACTOR_COST each, per row element
    assembly = 2 * 64 * 16 + 16 * 64 * max(16, PRODUCT_COST)  # gather m factors' blocks, one product of them
    assert layer.rotation_costs(16, torch.float64) == {
        "factored": 16 * 64 * factored, "assembled": assembly + 16 * 64 * max(16, PRODUCT_COST)}
    assert layer.path_costs((16, 64), training=False, input_requires_grad=False) == {
        "input": 16 * 64 * factored + 16 * 8192 * 64,
        "assembled": assembly + 16 * 64 * max(16, PRODUCT_COST) + 16 * 8192 * 64,
        "weight": assembly + 8192 * 64 * max(16, PRODUCT_COST) + 16 * 8192 * 64}
    with torch.no_grad():  # inference: rotate whichever is smaller, activations or weight rows
        assert layer.choose_path(torch.zeros(2, 64)) == "input"  # assembling costs more than 2 rows' factors
        assert layer.choose_path(torch.zeros(16, 64)) == "assembled"
        assert layer.choose_path(torch.zeros(4096, 64)) == "assembled"
        assert layer.choose_path(torch.zeros(16384, 64)) == "weight"
    # training a very wide layer whose input needs a gradient: rotating activations avoids forming dW'
    assert layer.choose_path(torch.zeros(4096, 64, requires_grad=True)) == "assembled"
    # ... unless its input needs no gradient (a first layer): then dW' replaces the backward through W, and rotating
    # its 1024 weight rows costs less than rotating 4096 activation rows
    narrower = boft_linear(64, 8, 2, out=1024)
    assert narrower.choose_path(torch.zeros(4096, 64, requires_grad=True)) == "assembled"
    assert narrower.choose_path(torch.zeros(4096, 64)) == "weight"
    # a wide span L: assembling L × L blocks costs more than the factors themselves, so the factored path stays
    dense = boft_linear(1024, 8, 8, out=1024)  # L = 1024 = d: R is dense
    assert dense.choose_path(torch.zeros(512, 1024, requires_grad=True)) == "input"


def test_padding_same_conv_uses_weight_path_and_refuses_forced_input_path():
    conv = nn.Conv2d(4, 4, 3, padding="same")
    layer = BOFTConfig(block_size=6, n_factors=2).make_layer(conv)
    x = torch.randn(1, 4, 5, 5)
    torch.testing.assert_close(layer(x), conv(x))
    assert layer.paths() == ("weight",) and layer.choose_path(x) == "weight"
    with pytest.raises(ValueError, match="path='input'"):
        BOFTConfig(block_size=6, n_factors=2, path="input").make_layer(conv)


# --- identity, merging, gradients, dtypes ---------------------------------------------------------------------------
@pytest.mark.parametrize("config", [BOFTConfig(block_size=4, n_factors=3), OFTConfig(block_size=8)])
def test_identity_at_init(config):
    base = nn.Linear(32, 8)
    layer = config.make_layer(base)
    x = torch.randn(4, 32)
    assert torch.equal(layer.rotation(), torch.eye(32))
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=1e-6)
    layer(x).square().sum().backward()
    assert layer.skew.grad.abs().sum() > 0  # training starts: gradients reach the skew parameters


@pytest.mark.parametrize("module", [nn.Linear(32, 12), nn.Conv2d(8, 6, 2, padding=1)])
def test_merge_unmerge_round_trip_fp32(module):
    layer = randomize(BOFTConfig(block_size=4, n_factors=2).make_layer(module))
    x = torch.randn(3, 32) if isinstance(module, nn.Linear) else torch.randn(2, 8, 5, 5)
    original = module.weight.detach().clone()
    unmerged = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(module.weight, original, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


def test_gradcheck_float64():
    layer = boft_linear(8, 2, 3, out=3)
    x = torch.randn(2, 8, dtype=torch.float64, requires_grad=True)
    skew, scale = layer.skew, layer.scale
    for path in ("input", "weight"):
        layer.config.path = path
        assert torch.autograd.gradcheck(lambda x: layer(x), (x,))
        # gradient w.r.t. the adapter parameters, by finite differences on a scalar loss
        loss = lambda: layer(x).square().sum()  # noqa: E731
        layer.zero_grad()
        loss().backward()
        for p in (skew, scale):
            i = (0,) * p.dim()
            with torch.no_grad():
                p[i] += 1e-6
                up = loss().item()
                p[i] -= 2e-6
                down = loss().item()
                p[i] += 1e-6
            assert p.grad[i].item() == pytest.approx((up - down) / 2e-6, rel=1e-5, abs=1e-8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype):
    base = nn.Linear(32, 16).to(dtype)
    layer = randomize(BOFTConfig(block_size=4, n_factors=2).make_layer(base), std=0.1)
    x = torch.randn(4, 32).to(dtype)
    y = layer(x)
    assert y.dtype == dtype
    assert layer.orthogonal_blocks().dtype == torch.float32  # the Cayley solve runs in fp32
    ref = dense_reference(boft_as_float(layer), x.float())
    torch.testing.assert_close(y.float(), ref, rtol=0.05, atol=0.05)
    y.float().sum().backward()
    assert torch.isfinite(layer.skew.grad).all()


def boft_as_float(layer):
    layer.base_layer.float()
    return layer


def test_dropout_replaces_blocks_with_identity_only_in_training():
    layer = boft_linear(32, 4, 2, dropout=0.5)
    layer.train()
    blocks = layer.orthogonal_blocks()
    eye = torch.eye(4, dtype=blocks.dtype)
    identity = (blocks - eye).abs().amax(dim=(-1, -2)) == 0
    assert 0 < identity.sum() < identity.numel()
    layer.eval()
    assert not ((layer.orthogonal_blocks() - eye).abs().amax(dim=(-1, -2)) == 0).any()


def test_coft_keeps_blocks_near_identity():
    layer = boft_linear(16, 4, 1, coft=True, coft_eps=1e-3, scale=False)
    radius = 1e-3 / math.sqrt(4)
    q = layer.orthogonal_blocks()
    # Q = (I-S)(I+S)^-1 ≈ I - 2S: the constrained skew part bounds the deviation from I
    assert ((q - torch.eye(4, dtype=q.dtype)).flatten(-2).norm(dim=-1) <= 2 * radius * 1.01).all()


# --- merging: exact to the weight's own rounding ------------------------------------------------------------------
def dense_rotation(layer):
    """R (fp64, d × d) from the blocks merge folds in — the eval-mode blocks, no dropout."""
    training = layer.training
    layer.eval()
    blocks = layer.orthogonal_blocks().double()
    layer.train(training)
    return layer.rotate(torch.eye(layer.fan_in, dtype=torch.float64), blocks=blocks)


def unmerge_error_bound(layer, weight):
    """Per-row bound on ‖W_rec − W‖ after merge → unmerge, from the weight's unit roundoff u = eps/2.

    The merge rounds diag(s)·W·Rᵀ once to the weight's dtype (|δ_i| ≤ u·|s_i|·‖W_i‖·‖R‖), unmerge multiplies by
    R⁻ᵀ/s_i in fp64 (‖δ_i R⁻ᵀ‖/|s_i| ≤ u·κ(R)·‖W_i‖) and rounds once more (≤ u·‖W_i‖). What fp64 adds — 2m
    products of length b on each side, amplified by κ(R) — is the second term.
    """
    R = dense_rotation(layer)
    kappa = torch.linalg.cond(R).item()
    u = torch.finfo(weight.dtype).eps / 2
    fp64 = 4 * layer.n_factors * layer.block_size * kappa * torch.finfo(torch.float64).eps
    rows = weight.double().reshape(weight.shape[0], -1).norm(dim=1)
    return ((1 + kappa) * u * 1.001 + fp64) * rows


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("neumann_terms", [None, 2, 3, 5])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_unmerge_is_exact_to_the_weight_dtype(kind, neumann_terms, dtype):
    """W' = diag(s)·W·Rᵀ with a truncated Cayley–Neumann series (R not orthogonal) comes back as W to the rounding
    of W's dtype: Rᵀ is not R⁻¹ there, so unmerge inverts every block."""
    torch.manual_seed(1)
    base = nn.Linear(32, 12) if kind == "linear" else nn.Conv2d(8, 6, 2, padding=1)
    layer = BOFTConfig(block_size=4, n_factors=3, neumann_terms=neumann_terms).make_layer(base.to(dtype))
    with torch.no_grad():
        layer.skew.normal_(0, 0.3)
        layer.scale.uniform_(0.5, 2).mul_(torch.randint(0, 2, layer.scale.shape) * 2 - 1)  # either sign
    R = dense_rotation(layer)
    defect = (R.T @ R - torch.eye(32, dtype=R.dtype)).abs().max().item()
    assert defect < 1e-5 if neumann_terms is None else defect > 5e-2  # the series really is not orthogonal
    original = base.weight.detach().clone()
    layer.merge()
    assert not torch.equal(base.weight, original)
    layer.unmerge()
    error = (base.weight.double() - original.double()).reshape(original.shape[0], -1).norm(dim=1)
    assert (error <= unmerge_error_bound(layer, original)).all(), (error / original.double().norm()).max()


def test_merge_folds_in_the_eval_blocks_even_in_training_mode():
    """Multiplicative dropout perturbs training steps only: a merge in train() mode folds in the eval-mode R, and
    unmerge undoes exactly that one."""
    layer = boft_linear(32, 4, 2, dropout=0.5).float()
    x = torch.randn(3, 32)
    layer.eval()
    expected = layer(x)
    original = layer.base_layer.weight.detach().clone()
    layer.train()
    layer.merge()
    torch.testing.assert_close(layer.base_layer(x), expected, rtol=1e-6, atol=1e-6)
    layer.unmerge()
    assert ((layer.base_layer.weight - original).norm(dim=1) <= unmerge_error_bound(layer, original)).all()


def test_merge_refuses_a_zero_scale_and_leaves_the_weight():
    layer = boft_linear(16, 4, 2)
    with torch.no_grad():
        layer.scale[3] = 0.0
    original = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match=r"output scale.* exactly 0 .*row 3.*unmerge could not recover"):
        layer.merge()
    assert not layer.merged and torch.equal(layer.base_layer.weight, original)


# --- equality with PEFT on identical parameters ----------------------------------------------------------------------
def copy_into_peft(peft_layer, layer):
    with torch.no_grad():
        peft_layer.boft_R["default"].copy_(skew_symmetric(layer.skew, layer.block_size))
        s = peft_layer.boft_s["default"]
        s.copy_(layer.scale.reshape(s.shape))


@pytest.mark.parametrize("m", [1, 2, 3])
@pytest.mark.parametrize("b", [2, 4])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_equal_to_peft_boft(m, b, kind):
    import peft

    module = nn.Linear(32, 10) if kind == "linear" else nn.Conv2d(8, 6, 2, stride=1, padding=1)
    x = torch.randn(3, 32) if kind == "linear" else torch.randn(2, 8, 5, 5)
    host = nn.Sequential(module)
    with peft_boft_without_cuda():
        peft_model = peft.get_peft_model(
            host, peft.BOFTConfig(target_modules=["0"], boft_block_size=b, boft_n_butterfly_factor=m)
        )
        peft_layer = peft_model.base_model.model[0]
        assert peft_layer.boft_R["default"].shape[0] == m  # PEFT really runs m factors
        layer = randomize(BOFTConfig(block_size=b, n_factors=m).make_layer(peft_layer.base_layer))
        copy_into_peft(peft_layer, layer)
        theirs = peft_layer(x)
    torch.testing.assert_close(layer(x), theirs, rtol=1e-5, atol=1e-5)


# --- nn.Embedding: the output rows rotated, as PEFT's OFT does ---------------------------------------------------------
@pytest.mark.parametrize("neumann_terms", [None, 5])
def test_embedding_equals_peft_oft_embedding(neumann_terms):
    """PEFT 0.21's OFT on an Embedding rotates each looked-up row, e ↦ e · blockdiag(Q), and merges W ↦ W · R."""
    import peft

    ids = torch.randint(0, 30, (4, 7))
    host = nn.Sequential(nn.Embedding(30, 16))
    peft_config = peft.OFTConfig(target_modules=["0"], r=0, oft_block_size=4, use_cayley_neumann=neumann_terms is not None,
                                 num_cayley_neumann_terms=neumann_terms or 5)
    peft_layer = peft.get_peft_model(host, peft_config).base_model.model[0]
    layer = randomize(OFTConfig(block_size=4, neumann_terms=neumann_terms).make_layer(peft_layer.base_layer))
    sign = -1.0 if neumann_terms else 1.0  # PEFT's Cayley–Neumann series is that of −S (boftlab.peft_interop)
    with torch.no_grad():
        peft_layer.oft_embedding_R["default"].weight.copy_(sign * layer.skew[0])
    torch.testing.assert_close(layer(ids), peft_layer(ids), rtol=1e-6, atol=1e-6)
    expected_table = peft_layer.base_layer.weight @ peft_layer.get_delta_weight("default")
    torch.testing.assert_close(layer.merged_weights()["weight"], expected_table, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("path", ["input", "weight"])
def test_embedding_keeps_the_padding_row_and_merges_exactly(path):
    base = nn.Embedding(12, 8, padding_idx=5)
    with torch.no_grad():
        base.weight[5] = torch.randn(8)  # a pretrained model's padding row need not be zero
    layer = randomize(BOFTConfig(block_size=2, n_factors=3, path=path).make_layer(base), std=0.5)
    ids = torch.tensor([[5, 0, 5, 11], [3, 5, 1, 2]])
    out = layer(ids)
    torch.testing.assert_close(out[ids == 5], base.weight[5].expand(3, 8), rtol=0, atol=0)
    rotated = base(ids[ids != 5]) @ layer.rotation() * layer.scale  # every other row: e · R · diag(s)
    torch.testing.assert_close(out[ids != 5], rotated, rtol=1e-5, atol=1e-6)
    original = base.weight.detach().clone()
    layer.merge()
    torch.testing.assert_close(base(ids), out, rtol=1e-6, atol=1e-6)
    assert torch.equal(base.weight[5], original[5])
    layer.unmerge()
    torch.testing.assert_close(base.weight, original, rtol=1e-5, atol=1e-6)


def test_embedding_padding_row_gets_no_change_from_training():
    base = nn.Embedding(10, 8, padding_idx=0)
    layer = BOFTConfig(block_size=4).make_layer(base)
    optimizer = torch.optim.SGD(layer.adapter_parameters().values(), lr=1.0)
    ids = torch.tensor([[0, 1, 2, 0, 9]])
    layer(ids).square().sum().backward()
    optimizer.step()
    out = layer(ids)
    assert torch.equal(out[0, 0], base.weight[0]) and not torch.allclose(out[0, 1], base.weight[1])


def test_embedding_with_max_norm_is_refused():
    with pytest.raises(ValueError, match=r"cannot adapt an Embedding with max_norm=1.0: it renormalises every "
                                         r"looked-up row in place.*TensorCoreConfig"):
        OFTConfig(block_size=4).make_layer(nn.Embedding(10, 8, max_norm=1.0))


# --- bad input: every invalid combination names the valid choices ------------------------------------------------------
BAD = [
    (dict(block_size=5, n_factors=1), nn.Linear(16, 4), r"block_size=5 .*Valid block_size for n_factors=1: \[2, 4, 8, 16\]"),
    (dict(block_size=3, n_factors=2), nn.Linear(12, 4), r"must be even.*Valid block_size for n_factors=2: \[2, 6\]"),
    (dict(block_size=4, n_factors=4), nn.Linear(16, 4), r"valid n_factors for block_size=4: \[1, 2, 3\]"),
    (dict(block_size=32, n_factors=1), nn.Linear(16, 4), r"nearest valid block_size: 16"),
    (dict(n_blocks=5, n_factors=1), nn.Linear(16, 4), r"n_blocks=5 does not divide in_features=16.*\[1, 2, 4, 8\]"),
    (dict(block_size=4, n_factors=3), nn.Conv2d(3, 4, 3), r"in_channels/groups·kh·kw=27"),
]


@pytest.mark.parametrize("kwargs,module,message", BAD)
def test_bad_combinations_raise_with_valid_choices(kwargs, module, message):
    with pytest.raises(ValueError, match=message):
        BOFTConfig(**kwargs).make_layer(module)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(block_size=4, n_blocks=2), "not both"),
        (dict(block_size=1), "block_size must be ≥ 2"),
        (dict(n_factors=0), "n_factors must be an integer ≥ 1"),
        (dict(dropout=1.0), r"\[0, 1\)"),
        (dict(neumann_terms=1), "neumann_terms"),
        (dict(path="fast"), r"\('auto', 'input', 'assembled', 'weight'\)"),
    ],
)
def test_bad_config_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BOFTConfig(**kwargs)


def test_oft_has_one_factor():
    with pytest.raises(ValueError, match="use BOFTConfig"):
        OFTConfig(n_factors=2)


def test_unsupported_layer_names_supported_types():
    with pytest.raises(ValueError, match=r"supported layer types: nn.Linear, transformers Conv1D, nn.Conv2d, "
                                         r"nn.Embedding\."):
        BOFTConfig().make_layer(nn.LayerNorm(16))
