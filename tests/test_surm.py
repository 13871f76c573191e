"""SURM: FFT products == dense references, displacement rank, parameter counts, identity at init, gradients,
merging in both modes, half precision, bad configs, boftlab.adapt on a tiny BERT, and LoRA-style
SURM on Conv1d/2d/3d."""

import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import boftlab
from boftlab import SURMConfig
from boftlab.surm import (
    ACTIVATIONS,
    STRUCTURES,
    StructuredMatrix,
    circulant,
    circulant_matvec,
    displacement,
    displacement_rank,
    kronecker_matvec,
    ldr,
    ldr_block,
    ldr_generators,
    ldr_matvec,
    parameter_count,
    shift_matrix,
    skew_circulant,
    skew_circulant_matvec,
    toeplitz,
    toeplitz_matvec,
)

F64 = torch.float64
SIZES = [1, 2, 3, 5, 7, 12, 16, 31, 64, 100, 127]
SHAPES = [(8, 8), (7, 7), (12, 12), (15, 15), (6, 10), (10, 6), (3, 12), (12, 3), (9, 4), (16, 24)]


def randomize(module: nn.Module, std: float = 0.5) -> nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)
    return module


def structured(structure, d_out, d_in, **kw):
    if structure == "ldr":
        kw.setdefault("displacement_rank", min(2, max(d_out, d_in)))
    if structure == "kronecker" and d_out == d_in == 7:
        kw.setdefault("kronecker_shape", (7, 1))  # 7 is prime: the default shape saves nothing and is refused
    return randomize(StructuredMatrix(structure, d_out, d_in, **kw).to(F64))


def config_for(structure, **kw):
    return SURMConfig(structure=structure, **({"displacement_rank": 2} if structure == "ldr" else {}), **kw)


def surm_linear(structure, d_in=12, d_out=12, mode="lora", randomize_adapter=True, base_bias=True, **kw):
    base = nn.Linear(d_in, d_out, bias=base_bias).to(F64)
    layer = config_for(structure, mode=mode, **kw).make_layer(base).to(F64)
    if randomize_adapter:
        randomize(layer)  # every parameter, the base layer's too: a generic random layer
    return layer


# --- fast products == dense references ----------------------------------------------------------------------------
@pytest.mark.parametrize("n", SIZES)
def test_circulant_and_skew_circulant_fft_equal_dense(n):
    c, x = torch.randn(n, dtype=F64), torch.randn(4, n, dtype=F64)
    assert torch.allclose(circulant_matvec(c, x), x @ circulant(c).T, atol=1e-10, rtol=0)
    assert torch.allclose(skew_circulant_matvec(c, x), x @ skew_circulant(c).T, atol=1e-10, rtol=0)


def test_dense_references_follow_the_definitions():
    c = torch.arange(1.0, 5.0, dtype=F64)  # [1, 2, 3, 4]
    assert circulant(c).tolist() == [[1, 4, 3, 2], [2, 1, 4, 3], [3, 2, 1, 4], [4, 3, 2, 1]]
    assert skew_circulant(c).tolist() == [[1, -4, -3, -2], [2, 1, -4, -3], [3, 2, 1, -4], [4, 3, 2, 1]]
    t = torch.arange(1.0, 5.0, dtype=F64)  # 2 × 3 Toeplitz: t[0] top-right, t[2] main diagonal
    assert toeplitz(t, 2, 3).tolist() == [[3, 2, 1], [4, 3, 2]]


@pytest.mark.parametrize("d_out,d_in", SHAPES + [(1, 1), (1, 9), (9, 1)])
def test_toeplitz_fft_equals_dense(d_out, d_in):
    t, x = torch.randn(d_out + d_in - 1, dtype=F64), torch.randn(3, d_in, dtype=F64)
    assert torch.allclose(toeplitz_matvec(t, x, d_out), x @ toeplitz(t, d_out, d_in).T, atol=1e-10, rtol=0)


@pytest.mark.parametrize("a_shape,b_shape", [((2, 3), (4, 5)), ((1, 1), (3, 3)), ((3, 2), (3, 5)), ((7, 7), (1, 1))])
def test_kronecker_reshape_matmul_equals_kron(a_shape, b_shape):
    a, b = torch.randn(a_shape, dtype=F64), torch.randn(b_shape, dtype=F64)
    x = torch.randn(2, 3, a_shape[1] * b_shape[1], dtype=F64)
    assert torch.allclose(kronecker_matvec(a, b, x), x @ torch.kron(a, b).T, atol=1e-10, rtol=0)


@pytest.mark.parametrize("n,r", [(1, 1), (5, 2), (12, 3), (31, 4), (64, 1)])
def test_ldr_fft_equals_dense(n, r):
    g, h, x = torch.randn(r, n, dtype=F64), torch.randn(r, n, dtype=F64), torch.randn(3, n, dtype=F64)
    assert torch.allclose(ldr_matvec(g, h, x), x @ ldr(g, h).T, atol=1e-10, rtol=0)


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("d_out,d_in", SHAPES)
def test_structured_matrix_fast_path_equals_dense(structure, d_out, d_in):
    matrix = structured(structure, d_out, d_in)
    x = torch.randn(2, 5, d_in, dtype=F64)
    dense = matrix.dense()
    assert dense.shape == (d_out, d_in)
    assert torch.allclose(matrix(x), x @ dense.T, atol=1e-10, rtol=0)


def test_rectangular_circulant_is_the_crop_of_the_square_one():
    matrix = structured("circulant", 5, 9)
    assert torch.equal(matrix.dense(), circulant(matrix.first_column)[:5, :9])
    assert torch.allclose(matrix.dense()[0], torch.cat([matrix.first_column[:1], matrix.first_column[1:].flip(0)]))


@pytest.mark.parametrize("d_out,d_in", SHAPES + [(1, 9), (9, 1), (64, 576)])
def test_blocks_equal_the_crops_of_the_squares(d_out, d_in):
    n = max(d_out, d_in)
    c = torch.randn(n, dtype=F64)
    assert torch.equal(circulant(c, d_out, d_in), circulant(c)[:d_out, :d_in])
    assert torch.equal(skew_circulant(c, d_out, d_in), skew_circulant(c)[:d_out, :d_in])
    for r in (1, 3):
        g, h = torch.randn(min(r, n), n, dtype=F64), torch.randn(min(r, n), n, dtype=F64)
        assert torch.allclose(ldr_block(g, h, d_out, d_in), ldr(g, h)[:d_out, :d_in], atol=1e-10, rtol=0)


class LargestTensor(TorchDispatchMode):
    """Records the most elements of any tensor an operation produces while active (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.largest = max([self.largest, *sizes])
        return out


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("d_out,d_in", [(4, 400), (400, 4)])
def test_dense_never_forms_the_square(structure, d_out, d_in):
    matrix = structured(structure, d_out, d_in)  # ldr: r = 2
    with LargestTensor() as record:
        matrix.dense().square().sum().backward()
    # at most r = 2 times the short side times the skew-circulant FFT's length 2n, times 2 for complex numbers (the
    # irfft's backward); the square would be n² = 160 000
    assert record.largest <= 2 * 2 * 2 * d_out * d_in


# --- displacement rank --------------------------------------------------------------------------------------------
def test_displacement_is_the_sylvester_operator():
    n = 9
    m = torch.randn(n, n, dtype=F64)
    expected = shift_matrix(n, 1.0) @ m - m @ shift_matrix(n, -1.0)
    assert torch.allclose(displacement(m), expected, atol=1e-12)


def test_displacement_ranks_of_the_classes():
    n = 16
    assert displacement_rank(circulant(torch.randn(n, dtype=F64))) == 1
    assert displacement_rank(toeplitz(torch.randn(2 * n - 1, dtype=F64), n, n)) == 2
    for r in (1, 3, 7):
        assert displacement_rank(ldr(torch.randn(r, n, dtype=F64), torch.randn(r, n, dtype=F64))) == r
    assert displacement_rank(torch.randn(n, n, dtype=F64)) == n


def test_displacement_of_one_ldr_term_is_rank_one_outer_product():
    n = 10
    g, h = torch.randn(n, dtype=F64), torch.randn(n, dtype=F64)
    term = circulant(g) @ skew_circulant(h)
    assert torch.allclose(displacement(term), 2 * torch.outer(g, h.flip(0)), atol=1e-12)


def test_every_matrix_is_ldr_with_full_displacement_rank():
    m = torch.randn(11, 11, dtype=F64)
    g, h = ldr_generators(m, 11)
    assert torch.allclose(ldr(g, h), m, atol=1e-10)


def test_ldr_generators_give_the_truncated_displacement():
    m = torch.randn(12, 12, dtype=F64)
    g, h = ldr_generators(m, 3)
    u, s, vh = torch.linalg.svd(displacement(m))
    assert torch.allclose(displacement(ldr(g, h)), (u[:, :3] * s[:3]) @ vh[:3], atol=1e-10)


def test_circulant_and_toeplitz_are_full_rank_with_linear_parameters():
    n = 64
    assert torch.linalg.matrix_rank(circulant(torch.randn(n, dtype=F64))) == n
    assert torch.linalg.matrix_rank(toeplitz(torch.randn(2 * n - 1, dtype=F64), n, n)) == n
    assert torch.linalg.matrix_rank(ldr(torch.randn(1, n, dtype=F64), torch.randn(1, n, dtype=F64))) == n


# --- parameter counts -----------------------------------------------------------------------------------------------
def test_parameter_count_formulas_on_paper_sizes():
    assert parameter_count("circulant", 768, 768) == 768
    assert parameter_count("toeplitz", 768, 768) == 2 * 768 - 1
    assert parameter_count("ldr", 768, 768, displacement_rank=4) == 2 * 4 * 768
    assert parameter_count("kronecker", 768, 768) == 24 * 24 + 32 * 32  # A 24×24 ⊗ B 32×32 (√768 ≈ 27.7)
    assert parameter_count("circulant", 3072, 768) == 3072
    assert parameter_count("toeplitz", 3072, 768) == 3072 + 768 - 1
    assert parameter_count("ldr", 768, 3072, displacement_rank=2) == 2 * 2 * 3072
    assert parameter_count("kronecker", 3072, 768, kronecker_shape=(64, 32)) == 64 * 32 + 48 * 24
    assert parameter_count("low_rank", 768, 768, rank=8) == 8 * 1536


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("d_out,d_in", [(12, 12), (6, 10), (10, 6)])
def test_layer_parameter_counts_match_formulas(structure, d_out, d_in):
    lora = surm_linear(structure, d_in, d_out)
    expected = parameter_count(structure, d_out, d_in, **({"displacement_rank": 2} if structure == "ldr" else {}))
    assert lora.n_trainable() == expected
    adapter = surm_linear(structure, d_in, d_out, mode="adapter")  # S is d_out × d_out, plus a bias of d_out
    square = parameter_count(structure, d_out, d_out, **({"displacement_rank": 2} if structure == "ldr" else {}))
    assert adapter.n_trainable() == square + d_out
    assert surm_linear(structure, d_in, d_out, mode="adapter", bias=False).n_trainable() == square


# --- identity at init, gradients -------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["lora", "adapter"])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_identity_at_init_with_nonzero_gradient(structure, mode):
    layer = surm_linear(structure, 10, 6, mode=mode, randomize_adapter=False)
    x = torch.randn(4, 10, dtype=F64)
    y = layer(x)
    assert torch.equal(y, layer.base_layer(x))
    y.square().sum().backward()
    zero_started = {"circulant": "first_column", "toeplitz": "diagonals", "kronecker": "factor_b",
                    "ldr": "circulant_columns"}[structure]
    param = getattr(layer.matrix, zero_started)
    assert torch.count_nonzero(param.detach()) == 0
    assert param.grad.abs().max() > 1e-6


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_every_adapter_activation_keeps_identity_and_gradient_at_zero(activation):
    zero = torch.zeros(3, requires_grad=True)
    out = ACTIVATIONS[activation](zero)
    assert torch.equal(out, torch.zeros(3))
    out.sum().backward()
    assert (zero.grad > 0).all()


@pytest.mark.parametrize("mode", ["lora", "adapter"])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_gradcheck(structure, mode):
    layer = surm_linear(structure, 6, 4, mode=mode, activation="tanh" if mode == "adapter" else None)
    x = torch.randn(3, 6, dtype=F64, requires_grad=True)
    names, params = zip(*layer.adapter_parameters().items())

    def f(x, *values):
        return torch.func.functional_call(layer, dict(zip(names, values)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params), fast_mode=True)


# --- merging -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("d_out,d_in", [(8, 8), (5, 9), (9, 5)])
def test_lora_merge_equals_unmerged_and_unmerge_restores(structure, d_out, d_in):
    layer = surm_linear(structure, d_in, d_out)
    x = torch.randn(7, d_in, dtype=F64)
    weight = layer.base_layer.weight.detach().clone()
    y = layer(x)
    assert torch.allclose(layer.base_layer.weight + layer.matrix.dense(), weight + layer.delta_weight())
    layer.merge()
    assert torch.allclose(layer(x), y, atol=1e-10)
    layer.unmerge()
    assert torch.allclose(layer.base_layer.weight, weight, atol=1e-12)
    assert torch.allclose(layer(x), y, atol=1e-12)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_identity_adapter_merges_exactly(structure):
    layer = surm_linear(structure, 9, 8, mode="adapter", activation="identity", alpha=0.3)
    x = torch.randn(5, 9, dtype=F64)
    weight, bias = layer.base_layer.weight.detach().clone(), layer.base_layer.bias.detach().clone()
    y = layer(x)
    layer.merge()
    assert torch.allclose(layer(x), y, atol=1e-10)
    layer.unmerge()
    assert torch.allclose(layer.base_layer.weight, weight, atol=1e-10)
    assert torch.allclose(layer.base_layer.bias, bias, atol=1e-10)


@pytest.mark.parametrize("activation", ["identity", "gelu", "tanh", "silu"])
def test_adapter_layers_pickle_with_every_activation(activation):
    """Activations are named functions, so an adapted model pickles (copy.deepcopy, torch.save, multiprocessing)."""
    layer = surm_linear("circulant", 8, 8, mode="adapter", activation=activation)
    x = torch.randn(3, 8, dtype=F64)
    restored = pickle.loads(pickle.dumps(layer))
    assert restored.activation is layer.activation
    torch.testing.assert_close(restored(x), layer(x), rtol=0, atol=0)


def test_nonlinear_adapter_refuses_to_merge():
    layer = surm_linear("circulant", 8, 8, mode="adapter", activation="gelu")
    with pytest.raises(ValueError, match="activation='identity'"):
        layer.merge()
    assert not layer.merged


def test_adapter_bias_needs_a_base_bias_to_merge():
    layer = surm_linear("toeplitz", 8, 8, mode="adapter", activation="identity", base_bias=False)
    with pytest.raises(ValueError, match="bias=False"):
        layer.merge()
    no_bias = surm_linear("toeplitz", 8, 8, mode="adapter", activation="identity", base_bias=False, bias=False)
    x = torch.randn(3, 8, dtype=F64)
    y = no_bias(x)
    no_bias.merge()
    assert torch.allclose(no_bias(x), y, atol=1e-10)


# --- half precision --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_half_precision_inputs(structure, dtype):
    matrix = structured(structure, 24, 16).float()
    x = torch.randn(4, 16)
    y = matrix(x.to(dtype))
    assert y.dtype == dtype
    reference = x.double() @ matrix.dense().double().T
    tolerance = {torch.float16: 1e-2, torch.bfloat16: 4e-2}[dtype] * reference.abs().max()
    assert (y.double() - reference).abs().max() < tolerance
    base = nn.Linear(16, 24).to(dtype)
    for mode in ("lora", "adapter"):
        layer = config_for(structure, mode=mode).make_layer(base)
        randomize(layer.matrix, 0.05)
        out = layer(x.to(dtype))
        assert out.dtype == dtype and torch.isfinite(out).all()
        out.float().sum().backward()
        assert torch.isfinite(next(iter(layer.matrix.parameters())).grad).all()
        layer.base_layer.zero_grad()


# --- configs ---------------------------------------------------------------------------------------------------------
def test_config_round_trip():
    for config in (SURMConfig(structure="kronecker", kronecker_shape=(2, 3), alpha=0.5),
                   SURMConfig(structure="ldr", displacement_rank=3, mode="adapter", activation="tanh", bias=False)):
        data = config.to_dict()
        assert data["family"] == "surm"
        assert boftlab.AdapterConfig.from_dict(data) == config


def test_config_defaults_per_mode():
    assert SURMConfig(structure="ldr").displacement_rank == 1
    adapter = SURMConfig(mode="adapter")
    assert (adapter.activation, adapter.bias) == ("gelu", True)
    assert (SURMConfig().activation, SURMConfig().bias) == (None, None)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"structure": "hankel"}, "valid structures: .*circulant.*toeplitz.*kronecker.*ldr"),
        ({"mode": "prefix"}, "valid modes: .*lora.*adapter"),
        ({"structure": "ldr", "displacement_rank": 0}, "displacement_rank must be an integer ≥ 1"),
        ({"structure": "circulant", "displacement_rank": 2}, "only applies to structure='ldr'"),
        ({"structure": "toeplitz", "kronecker_shape": (2, 2)}, "only applies to structure='kronecker'"),
        ({"mode": "adapter", "activation": "relu"}, "relu'\\(0\\) = 0.*valid: .*gelu"),
        ({"mode": "adapter", "activation": "sigmoid"}, "valid: .*identity"),
        ({"mode": "lora", "activation": "gelu"}, "belong to mode='adapter'"),
    ],
)
def test_bad_configs_name_the_valid_choices(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SURMConfig(**kwargs)


def test_displacement_rank_above_size_is_rejected_at_make_layer():
    with pytest.raises(ValueError, match=r"displacement_rank=13 .* n=12: it must be an integer in 1..12.*nearest valid: 12"):
        SURMConfig(structure="ldr", displacement_rank=13).make_layer(nn.Linear(12, 8))
    SURMConfig(structure="ldr", displacement_rank=12).make_layer(nn.Linear(12, 8))  # r = n is the largest valid


def test_impossible_kronecker_factors_are_rejected():
    with pytest.raises(ValueError, match=r"valid: \[1, 2, 3, 4, 6, 12\].*valid: \[1, 2, 4, 8\].*nearest valid kronecker_shape: \(4, 2\)"):
        SURMConfig(structure="kronecker", kronecker_shape=(5, 3)).make_layer(nn.Linear(8, 12))
    with pytest.raises(ValueError, match=r"A 1 × 1, stores 50 numbers, no fewer than the dense matrix \(49\).*divisors of 7: \[1, 7\]"):
        SURMConfig(structure="kronecker").make_layer(nn.Linear(7, 7))


def test_unsupported_layer_type():
    with pytest.raises(ValueError, match=r"cannot adapt a Embedding; supported layer types: nn.Linear, transformers "
                                         r"Conv1D, nn.Conv1d, nn.Conv2d, nn.Conv3d\."):
        SURMConfig().make_layer(nn.Embedding(10, 4))
    with pytest.raises(ValueError, match=r"cannot adapt a ConvTranspose2d; supported layer types: nn.Linear,"):
        SURMConfig().make_layer(nn.ConvTranspose2d(3, 3, 3))
    with pytest.raises(ValueError, match=r"cannot adapt a Embedding; supported layer types: nn.Linear, transformers "
                                         r"Conv1D\.$"):
        SURMConfig(mode="adapter").make_layer(nn.Embedding(10, 4))


# --- through boftlab.adapt on a tiny BERT ---------------------------------------------------------------------------
def tiny_bert():
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=24, max_position_embeddings=16)
    return BertModel(config).eval().double()


@pytest.mark.parametrize("structure", STRUCTURES)
def test_adapt_tiny_bert_lora_style(structure):
    model = tiny_bert()
    ids = torch.randint(0, 50, (2, 7))
    before = model(ids).last_hidden_state
    boftlab.adapt(model, config_for(structure, alpha=0.5), targets=["query", "value", "intermediate.dense"])
    layers = boftlab.adapter_layers(model)
    assert len(layers) == 6
    assert torch.equal(model(ids).last_hidden_state, before)
    for layer in layers.values():
        randomize(layer.matrix, 0.1)
    after = model(ids).last_hidden_state
    assert not torch.allclose(after, before)
    boftlab.merge(model)
    assert torch.allclose(model(ids).last_hidden_state, after, atol=1e-10)
    boftlab.unmerge(model)
    assert torch.allclose(model(ids).last_hidden_state, after, atol=1e-10)
    count = boftlab.summary(model).adapter
    r = {"displacement_rank": 2} if structure == "ldr" else {}
    assert count == 2 * (2 * parameter_count(structure, 16, 16, **r) + parameter_count(structure, 24, 16, **r))


def test_adapt_tiny_bert_adapter_style_after_attention_and_ffn_outputs(tmp_path):
    torch.manual_seed(1)
    model = tiny_bert()
    ids = torch.randint(0, 50, (2, 7))
    before = model(ids).last_hidden_state
    config = SURMConfig(structure="circulant", mode="adapter")
    boftlab.adapt(model, config, targets=["attention.output.dense", "output.dense"])
    names = sorted(boftlab.adapter_layers(model))
    assert names == [f"encoder.layer.{i}.{m}" for i in range(2) for m in ("attention.output.dense", "output.dense")]
    assert torch.equal(model(ids).last_hidden_state, before)
    assert boftlab.summary(model).trainable == 4 * (16 + 16)  # circulant c and bias b per adapter, hidden size 16
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    direction = torch.randn_like(before)  # (not ‖output‖²: LayerNorm makes that constant)
    (model(ids).last_hidden_state * direction).sum().backward()
    optimizer.step()
    trained = model(ids).last_hidden_state
    assert not torch.allclose(trained, before)
    with pytest.raises(ValueError, match="activation='identity'"):
        boftlab.merge(model)
    boftlab.save_adapter(model, tmp_path / "surm")
    torch.manual_seed(1)
    fresh = boftlab.load_adapter(tiny_bert(), tmp_path / "surm")  # same seed -> same base weights
    assert torch.allclose(fresh(ids).last_hidden_state, trained, atol=1e-12)


# --- convolutions (mode="lora") ---------------------------------------------------------------------------------------
CONVS = {  # (base conv, input shape)
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, padding=1), (2, 4, 9)),
    "conv2d": (lambda: nn.Conv2d(3, 5, 3), (2, 3, 7, 6)),
    "conv3d_non_cubic_kernel": (lambda: nn.Conv3d(2, 4, (2, 3, 2)), (2, 2, 4, 5, 4)),
    "conv2d_grouped": (lambda: nn.Conv2d(6, 4, 3, padding=1, groups=2), (2, 6, 5, 5)),
    "conv2d_strided_padded_dilated": (lambda: nn.Conv2d(3, 6, 3, stride=2, padding=2, dilation=2), (2, 3, 9, 8)),
    "conv2d_non_square_kernel": (lambda: nn.Conv2d(4, 6, (1, 3), padding=(0, 1)), (2, 4, 5, 6)),
    "conv2d_reflect": (lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), (2, 3, 6, 6)),
    "conv1d_depthwise_circular": (lambda: nn.Conv1d(4, 4, 5, padding=2, groups=4, padding_mode="circular"), (2, 4, 8)),
    "conv3d_strided_reflect": (lambda: nn.Conv3d(2, 3, 3, stride=(1, 2, 2), padding=1, padding_mode="reflect"),
                               (1, 2, 4, 5, 5)),
}
R = {"displacement_rank": 2}


def surm_conv(structure, case, alpha=0.7):
    """A SURM-adapted conv in fp64 with every parameter (base and adapter) random, and an input for it."""
    make, shape = CONVS[case]
    torch.manual_seed(0)
    layer = randomize(config_for(structure, alpha=alpha).make_layer(make().to(F64)).to(F64))
    return layer, torch.randn(shape, dtype=F64)


def conv_reference(base, x, weight):
    """The base conv's map with another kernel, written with torch.nn.functional (not the layer's own call)."""
    conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[weight.dim()]
    padding = base.padding
    if base.padding_mode != "zeros":  # pad explicitly, then convolve without padding
        pad = [p for p in reversed(base.padding) for _ in range(2)]  # F.pad: last dimension first
        x, padding = F.pad(x, pad, mode=base.padding_mode), 0
    return conv(x, weight, base.bias, base.stride, padding, base.dilation, base.groups)


def flat_shape(conv):
    """(d_out, d_in) = (out, in/groups·prod(kernel_size))."""
    return conv.out_channels, conv.weight[0].numel()


@pytest.mark.parametrize("case", CONVS)
@pytest.mark.parametrize("structure", STRUCTURES)
def test_conv_output_is_the_conv_with_w_plus_alpha_s(structure, case):
    layer, x = surm_conv(structure, case)
    base = layer.base_layer
    assert layer.matrix.dense().shape == flat_shape(base)
    weight = base.weight + 0.7 * layer.matrix.dense().reshape(base.weight.shape)
    expected = conv_reference(base, x, weight)
    assert torch.allclose(layer(x), expected, atol=1e-10, rtol=0)
    assert not torch.allclose(expected, conv_reference(base, x, base.weight), atol=1e-3)  # S really contributes


@pytest.mark.parametrize("structure", STRUCTURES)
def test_conv_s_is_the_linear_s_applied_to_unfolded_patches(structure):
    """Independent of ``dense()``: the conv's change is α·S (the FFT path) applied to each (c, kh, kw) patch."""
    layer, x = surm_conv(structure, "conv2d_strided_padded_dilated")
    base = layer.base_layer
    patches = F.unfold(x, base.kernel_size, base.dilation, base.padding, base.stride)  # (B, in·kh·kw, L), channel-major
    delta = 0.7 * layer.matrix(patches.transpose(1, 2)).transpose(1, 2)  # (B, out, L)
    out = layer(x) - base(x)  # (B, out, h', w')
    assert torch.allclose(out.flatten(2), delta, atol=1e-10, rtol=0)


@pytest.mark.parametrize("case", CONVS)
@pytest.mark.parametrize("structure", STRUCTURES)
def test_conv_merge_equals_adapted_and_unmerge_restores(structure, case):
    layer, x = surm_conv(structure, case)
    weight = layer.base_layer.weight.detach().clone()
    y = layer(x)
    layer.merge()
    assert torch.allclose(layer.base_layer(x), y, atol=1e-10, rtol=0)  # the plain conv, merged kernel
    layer.unmerge()
    assert torch.allclose(layer.base_layer.weight, weight, atol=1e-12, rtol=0)


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("case", ["conv2d_grouped", "conv1d_depthwise_circular"])
def test_conv_gradcheck(structure, case):
    layer, x = surm_conv(structure, case)
    x.requires_grad_(True)
    names, params = zip(*layer.adapter_parameters().items())

    def f(x, *values):
        return torch.func.functional_call(layer, dict(zip(names, values)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params), fast_mode=True)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_conv_identity_at_init_with_nonzero_gradient(structure):
    base = nn.Conv2d(3, 4, 3, padding=1).to(F64)
    layer = config_for(structure).make_layer(base)
    x = torch.randn(2, 3, 5, 5, dtype=F64)
    y = layer(x)
    assert torch.allclose(y, base(x), atol=1e-14, rtol=0)
    y.square().sum().backward()
    assert max(p.grad.abs().max() for p in layer.adapter_parameters().values()) > 1e-6


@pytest.mark.parametrize("case", CONVS)
@pytest.mark.parametrize("structure", STRUCTURES)
def test_conv_parameter_count(structure, case):
    from boftlab import counts

    layer, _ = surm_conv(structure, case)
    d_out, d_in = flat_shape(layer.base_layer)
    expected = parameter_count(structure, d_out, d_in, **(R if structure == "ldr" else {}))
    assert layer.n_trainable() == layer.n_effective() == expected
    if isinstance(layer.base_layer, nn.Conv2d):  # counts.layer_shapes reads nn.Linear and nn.Conv2d
        shape = counts.layer_shapes(nn.Sequential(layer.base_layer), ["0"])[0]
        assert counts.layer_count(shape, "surm", structure=structure, **(R if structure == "ldr" else {})) == expected


@pytest.mark.parametrize("conv", [nn.Conv1d(4, 4, 3), nn.Conv2d(4, 4, 3), nn.Conv3d(4, 4, 3)],
                         ids=lambda c: type(c).__name__)
def test_adapter_mode_on_a_conv_names_what_is_supported(conv):
    message = (rf"SURMConfig\(mode='adapter'\) adapts linear layers only, not a {type(conv).__name__}"
               r".*mode='lora'.*adapts nn.Linear, transformers Conv1D, nn.Conv1d, nn.Conv2d and nn.Conv3d")
    with pytest.raises(ValueError, match=message):
        SURMConfig(mode="adapter").make_layer(conv)


def test_adapter_mode_on_a_conv_is_refused_before_the_model_changes():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"none of which SURMConfig\(mode='adapter'\) supports; supported types: "
                                         r"nn.Linear, transformers Conv1D$"):
        boftlab.adapt(model, SURMConfig(mode="adapter"), targets=["0"])
    assert type(model[0]) is nn.Conv2d and all(p.requires_grad for p in model.parameters())


def test_conv_half_precision_base():
    base = nn.Conv2d(4, 6, 3, padding=1).to(torch.bfloat16)
    layer = config_for("ldr").make_layer(base)
    randomize(layer.matrix, 0.05)
    x = torch.randn(2, 4, 5, 5)
    out = layer(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    reference = conv_reference(base.double(), x.double(), base.weight.double() + layer.delta_weight().double())
    assert (out.double() - reference).abs().max() < 4e-2 * reference.abs().max()
    out.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.matrix.parameters())


def test_adapt_a_conv_net_merge_save_and_load(tmp_path):
    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.GELU(), nn.Conv1d(8, 8, 1), nn.Linear(6, 6)).double()

    def run(model, x):  # (B, 1, 6, 6) -> conv2d -> (B, 8, 6, 6) -> (B, 8, 36) -> conv1d -> linear on chunks of 6
        h = model[1](model[0](x)).flatten(2)
        return model[3](model[2](h).unflatten(2, (6, 6)))

    model, x = net(), torch.randn(2, 1, 6, 6, dtype=F64)
    before = run(model, x)
    boftlab.adapt(model, SURMConfig(structure="kronecker", alpha=0.5), targets=["0", "2", "3"])
    assert sorted(boftlab.adapter_layers(model)) == ["0", "2", "3"]
    assert torch.equal(run(model, x), before)
    for layer in boftlab.adapter_layers(model).values():
        randomize(layer.matrix, 0.1)
    after = run(model, x)
    assert not torch.allclose(after, before)
    expected = sum(parameter_count("kronecker", o, i) for o, i in [(8, 9), (8, 8), (6, 6)])
    assert boftlab.summary(model).adapter == boftlab.summary(model).trainable == expected
    boftlab.save_adapter(model, tmp_path / "surm_conv")
    boftlab.merge(model)
    assert torch.allclose(run(model, x), after, atol=1e-12)
    assert torch.allclose(run(boftlab.load_adapter(net(), tmp_path / "surm_conv"), x), after, atol=1e-12)


# --- paths (the contract's vocabulary: each SURM layer has exactly one) ----------------------------------------------
def test_each_layer_has_its_one_path_and_refuses_the_other():
    linear, conv = nn.Linear(8, 6), nn.Conv2d(2, 3, 3)
    assert SURMConfig().make_layer(linear).paths() == ("input",)  # S x by FFT products, S never formed
    assert SURMConfig().make_layer(conv).paths() == ("weight",)  # S formed at the kernel's size, one conv
    assert SURMConfig(mode="adapter").make_layer(linear).paths() == ("input",)  # acts on the output h
    with pytest.raises(ValueError, match=r"path='weight' is not a SURM path on a Linear.*\('input',\)"):
        SURMConfig(path="weight").make_layer(linear)
    with pytest.raises(ValueError, match=r"path='input' is not a SURM path on a convolution"):
        SURMConfig(path="input").make_layer(conv)
    with pytest.raises(ValueError, match=r"path='weight' is not a path of a SURM adapter"):
        SURMConfig(mode="adapter", path="weight").make_layer(linear)
    with pytest.raises(ValueError, match=r"path must be one of \('auto', 'input', 'assembled', 'weight'\), got 'fft'"):
        SURMConfig(path="fft")


def test_forcing_the_path_a_layer_has_changes_nothing():
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    auto = SURMConfig(structure="toeplitz").make_layer(nn.Linear(8, 6))
    forced = SURMConfig(structure="toeplitz", path="input").make_layer(auto.base_layer)
    with torch.no_grad():
        auto.matrix.diagonals.normal_()
        forced.matrix.diagonals.copy_(auto.matrix.diagonals)
    assert auto.choose_path(x) == forced.choose_path(x) == "input"
    assert torch.equal(auto(x), forced(x))


def test_path_costs_count_the_base_product_and_the_structured_one():
    layer = SURMConfig(structure="circulant").make_layer(nn.Linear(8, 6))
    per_row = 2 * 8 * 3 + 8  # two real FFTs of length n = 8 (8·log2 8 each) and the pointwise product
    assert layer.matrix.product_cost() == per_row
    assert layer.path_costs((4, 8), training=False, input_requires_grad=False) == {"input": 4 * 6 * 8 + 4 * per_row}
    assert layer.path_costs((4, 8), training=True, input_requires_grad=True) == {"input": 2 * 4 * 6 * 8 + 3 * 4 * per_row}
    conv = SURMConfig(structure="toeplitz").make_layer(nn.Conv2d(2, 3, 3, padding=1))
    base = 5 * 4 * 4 * 3 * 18  # batch 5, 4×4 output positions, 3 × (2·3·3) kernel
    assert conv.path_costs((5, 2, 4, 4), training=False, input_requires_grad=False) == {"weight": base + 3 * 18}
