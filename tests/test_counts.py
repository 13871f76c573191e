"""Parameter counts: the closed forms equal what the layers store (counts.layer_count builds the layers), and the
papers' tables."""

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from boftlab import counts
from boftlab.butterfly import BOFTConfig, OFTConfig

ROOT = Path(__file__).resolve().parents[1]


# --- the closed forms of the module docstring, for many shapes --------------------------------------------------------
def boft_closed_form(fan_in, fan_out, block_size, n_factors, scale, convention="effective"):
    """m·k·b(b−1)/2 ("effective") or m·k·b² ("peft"), + n for the output scale."""
    per_block = block_size * (block_size - 1) // 2 if convention == "effective" else block_size**2
    return n_factors * (fan_in // block_size) * per_block + (fan_out if scale else 0)


def surm_closed_form(structure, d_out, d_in, displacement_rank=1, kronecker_shape=None):
    """circulant max(n, d), Toeplitz n + d − 1, Kronecker m1·n1 + m2·n2, LDR 2·r·max(n, d)."""
    if structure == "circulant":
        return max(d_out, d_in)
    if structure == "toeplitz":
        return d_out + d_in - 1
    if structure == "ldr":
        return 2 * displacement_rank * max(d_out, d_in)
    m1, n1 = kronecker_shape
    return m1 * n1 + (d_out // m1) * (d_in // n1)


def tucker_closed_form(modes, ranks):
    """Π r_i + Σ d_i·r_i, with one int r meaning min(r, d_i) on every mode."""
    ranks = [min(ranks, d) for d in modes] if isinstance(ranks, int) else ranks
    return math.prod(ranks) + sum(d * r for d, r in zip(modes, ranks))


BOFT_SHAPES = [(16, 8, 4, 1), (16, 8, 4, 3), (32, 48, 2, 5), (24, 24, 6, 3), (768, 768, 8, 2), (768, 3072, 16, 1),
               (3072, 768, 4, 4), (1024, 1024, 2, 6), (36, 6, 6, 2)]


@pytest.mark.parametrize("fan_in,fan_out,block_size,n_factors", BOFT_SHAPES)
def test_boft_formula_equals_what_the_layer_stores(fan_in, fan_out, block_size, n_factors):
    shape = counts.LayerShape("x", fan_in, fan_out, True, "linear")
    for scale in (True, False):
        layer = BOFTConfig(block_size=block_size, n_factors=n_factors, scale=scale).make_layer(nn.Linear(fan_in, fan_out))
        expected = boft_closed_form(fan_in, fan_out, block_size, n_factors, scale)
        assert counts.boft_params(fan_in, fan_out, block_size, n_factors, scale=scale) == layer.n_trainable() == expected
        assert counts.layer_count(shape, "boft", block_size=block_size, n_factors=n_factors, scale=scale) == expected
        peft = boft_closed_form(fan_in, fan_out, block_size, n_factors, scale, "peft")
        assert counts.layer_count(shape, "boft", "peft", block_size=block_size, n_factors=n_factors, scale=scale) == peft
        assert counts.layer_count(shape, "boft", trained_bias=True, block_size=block_size, n_factors=n_factors,
                                  scale=scale) == expected + fan_out


def test_oft_formula_equals_what_the_layer_stores():
    layer = OFTConfig(block_size=8).make_layer(nn.Linear(32, 10))
    assert counts.oft_params(32, 10, 8) == layer.n_trainable() == 4 * 28 == boft_closed_form(32, 10, 8, 1, False)


def test_boft_formula_on_conv_fan_in():
    conv = nn.Conv2d(4, 6, 3)  # fan-in 4·3·3 = 36
    layer = BOFTConfig(block_size=6, n_factors=2).make_layer(conv)
    shape = counts.LayerShape("conv", 36, 6, True, "conv2d")
    assert counts.layer_count(shape, "boft", block_size=6, n_factors=2) == layer.n_trainable()


def test_peft_convention_counts_full_blocks():
    # PEFT stores boft_R (m, k, b, b) and boft_s (n): m·k·b² + n
    assert counts.boft_params(768, 768, 8, 2, convention="peft") == 2 * 96 * 64 + 768
    assert counts.boft_params(768, 768, 8, 2) == 2 * 96 * 28 + 768


def test_lora_and_dense_orthogonal():
    assert counts.lora_params(768, 3072, 8) == 8 * 3840
    assert counts.orthogonal_group_dim(4) == 6  # the paper's d = 4 example: 12 off-diagonal edges, 6 free


def test_invalid_hyper_parameters_raise_with_choices():
    with pytest.raises(ValueError, match="Valid block_size"):
        counts.boft_params(768, 768, 7, 2)
    with pytest.raises(ValueError, match="convention"):
        counts.boft_params(768, 768, 8, 2, convention="paper")
    with pytest.raises(ValueError, match="unknown architecture"):
        counts.build("bert-huge")
    shape = counts.LayerShape("x", 16, 16, False, "linear")
    with pytest.raises(ValueError, match=r"unknown method 'flora'; methods: \('lora', .*'tensor_core'"):
        counts.layer_count(shape, "flora", ranks=8)
    with pytest.raises(ValueError, match="convention='peft' counts OFT/BOFT's full b × b blocks"):
        counts.layer_count(shape, "surm", "peft")


def test_counting_leaves_the_random_state_alone():
    """Tensor-core and Kronecker layers draw random initial factors; counting them must not move the caller's RNG."""
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    counts.layer_count(counts.LayerShape("x", 40, 24, False, "linear"), "tensor_core", ranks=(5, 3))
    counts.layer_count(counts.LayerShape("x", 40, 24, False, "linear"), "surm", structure="kronecker")
    assert torch.equal(torch.rand(3), expected)


def test_meta_architectures_have_the_published_sizes():
    assert counts.n_base_params("llama-2-7b") == 6_738_415_616
    assert counts.n_base_params("deberta-v3-base") == 183_831_552  # + classifier head = the paper's "184M"
    assert all(p.is_meta for p in counts.build("llama-2-7b").parameters())


def test_layer_shapes_find_every_targeted_linear():
    shapes = counts.layer_shapes(counts.build("deberta-v3-base"), counts.resolve_targets("deberta-v3-base", "all linear"))
    assert len(shapes) == 12 * 6
    assert sum(s.fan_in for s in shapes) == 12 * (5 * 768 + 3072)
    with pytest.raises(ValueError, match="layer names end with"):
        counts.layer_shapes(counts.build("deberta-v3-base"), ["to_q"])


def test_count_equals_layers_injected_into_a_real_small_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
    shapes = counts.layer_shapes(model, ["0", "2"])
    expected = sum(BOFTConfig(block_size=4, n_factors=2).make_layer(m).n_trainable() for m in (model[0], model[2]))
    assert sum(counts.layer_count(s, "boft", block_size=4, n_factors=2) for s in shapes) == expected


@pytest.mark.parametrize("row", [r for r in counts.PAPER_ROWS if r.model in ("deberta-v3-base", "llama-2-7b", "dinov2-large")],
                         ids=lambda r: f"{r.model}:{r.label}")
def test_paper_numbers_are_reproduced(row):
    assert row.matches() or row.note, f"{row.label}: ours {row.ours_as_reported()} vs paper {row.reported}"


def test_the_one_explained_difference_is_only_rounding():
    row = next(r for r in counts.PAPER_ROWS if r.label == "LoRA r=16" and r.model == "llama-2-7b")
    assert not row.matches() and f"{100 * row.ours() / 6.7e9:.3f}%" == row.reported


def test_stable_diffusion_rows_are_reproduced():
    rows = [r for r in counts.PAPER_ROWS if r.model == "sd-2.1-unet"]
    assert len(rows) == 10 and all(r.matches() for r in rows)


@pytest.mark.parametrize("hyper", [dict(structure="circulant"), dict(structure="toeplitz"), dict(structure="kronecker"),
                                   dict(structure="ldr", displacement_rank=3),
                                   dict(structure="circulant", mode="adapter"), dict(structure="ldr", displacement_rank=2, mode="adapter")])
@pytest.mark.parametrize("fan_in,fan_out", [(16, 16), (12, 20), (768, 3072), (3072, 768)])
def test_surm_formula_equals_what_the_layer_stores(hyper, fan_in, fan_out):
    from boftlab.surm import default_kronecker_shape

    layer = counts.FAMILIES["surm"](**hyper).make_layer(nn.Linear(fan_in, fan_out))
    shape = counts.layer_shapes(nn.Sequential(nn.Linear(fan_in, fan_out)), ["0"])[0]
    adapter = hyper.get("mode") == "adapter"
    d_in = fan_out if adapter else fan_in  # the adapter acts on the layer's output
    options = {k: v for k, v in hyper.items() if k == "displacement_rank"}
    if hyper["structure"] == "kronecker":
        options["kronecker_shape"] = default_kronecker_shape(fan_out, d_in)
    expected = surm_closed_form(hyper["structure"], fan_out, d_in, **options) + (fan_out if adapter else 0)
    assert counts.layer_count(shape, "surm", **hyper) == layer.n_trainable() == expected


@pytest.mark.parametrize("module,ranks", [(nn.Linear(24, 40), 8), (nn.Linear(24, 40), (4, 6)), (nn.Conv2d(8, 16, 3), 4),
                                          (nn.Conv2d(8, 16, 3), (4, 2, 3, 3)), (nn.Linear(768, 3072), 16),
                                          (nn.Conv2d(64, 64, 3, groups=64), 8), (nn.Conv2d(3, 96, 7), (8, 3, 7, 7))])
def test_tensor_core_formula_equals_what_the_layer_stores(module, ranks):
    layer = counts.FAMILIES["tensor_core"](ranks=ranks).make_layer(module)
    shape = counts.layer_shapes(nn.Sequential(module), ["0"])[0]
    expected = tucker_closed_form(tuple(module.weight.shape), ranks)
    assert counts.layer_count(shape, "tensor_core", ranks=ranks) == layer.n_trainable() == expected


def test_the_papers_table_in_the_readme_and_docs_is_generated():
    """README.md and docs/parameter_counts.md show ``paper_markdown()`` exactly (regenerate both if a count changes)."""
    table = counts.paper_markdown()
    assert table in (ROOT / "README.md").read_text() and table in (ROOT / "docs" / "parameter_counts.md").read_text()


@pytest.mark.parametrize("call, message", [
    (lambda: counts.boft_params(0, 8, 4), r"fan_in must be an integer ≥ 1 .*got 0"),  # was "math domain error"
    (lambda: counts.boft_params(-8, 8, 4), r"fan_in must be an integer ≥ 1 .*got -8"),  # was a raw RuntimeError
    (lambda: counts.oft_params(8, -8, 4), r"fan_out must be an integer ≥ 1 .*got -8"),
    (lambda: counts.oft_params(8.0, 8, 4), r"fan_in must be an integer, got 8.0 \(float\)"),
    (lambda: counts.lora_params(8, 8, 2.5), r"rank must be an integer, got 2.5"),  # counted 40.0
    (lambda: counts.lora_params(8, 8, float("nan")), r"rank must be an integer, got nan"),  # counted nan
    (lambda: counts.lora_params(-8, 8, 2), r"fan_in must be an integer ≥ 1"),
    (lambda: counts.orthogonal_group_dim(-3), r"dim must be an integer ≥ 1 .*got -3"),  # counted 6
    (lambda: counts.boft_params(8, 8, 4, trained_bias="yes"), r"trained_bias must be True or False, got 'yes'"),
    (lambda: counts.count("vit-b/16", "lora", rank=2.5), r"rank must be an integer, got 2.5"),
    (lambda: counts.layer_count((8, 8), "lora", rank=2), r"shape must be a LayerShape"),
    (lambda: counts.layer_shapes(counts.build("vit-b/16"), 7), r"targets must be a regex string or a list"),
])
def test_every_public_function_refuses_bad_arguments_with_what_was_given(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_numpy_integers_count_like_ints():
    np = pytest.importorskip("numpy")
    assert counts.boft_params(np.int64(64), np.int32(64), np.int64(8)) == counts.boft_params(64, 64, 8)
    assert counts.lora_params(np.int64(64), 64, np.int16(4)) == counts.lora_params(64, 64, 4)


# --- one meaning of "effective": counts and summary agree for every family ------------------------------------------
@pytest.mark.parametrize("family", sorted(counts.FAMILIES))
@pytest.mark.parametrize("make_base", [lambda: nn.Linear(64, 32), lambda: nn.Linear(32, 64),
                                       lambda: nn.Conv2d(8, 16, 3), lambda: nn.Conv2d(16, 8, 1)],
                         ids=["linear 64->32", "linear 32->64", "conv 8->16 3x3", "conv 16->8 1x1"])
def test_layer_count_is_what_summary_calls_effective(family, make_base):
    """For each example config of each family: ``layer_count`` (convention "effective") equals
    ``summary(...).effective`` of a model holding that one adapted layer — or both refuse the shape."""
    from boftlab import summary

    for config in counts.FAMILIES[family].example_configs():
        options = {k: v for k, v in config.to_dict().items() if k != "family"}
        base = make_base()
        shape = counts.layer_shapes(nn.Sequential(base), ["0"])[0]
        try:
            layer = config.make_layer(base)
        except ValueError:
            with pytest.raises(ValueError):
                counts.layer_count(shape, family, **options)
            continue
        assert counts.layer_count(shape, family, **options) == summary(nn.Sequential(layer)).effective


def test_every_family_example_is_counted_on_a_linear_layer():
    """The canonical example of every family fits a 64 -> 32 Linear, so the test above compares numbers, not only
    refusals."""
    for cls in counts.FAMILIES.values():
        config = cls.example_configs()[0]
        options = {k: v for k, v in config.to_dict().items() if k != "family"}
        shape = counts.LayerShape("x", 64, 32, True, "linear")
        assert counts.layer_count(shape, cls.family, **options) == config.make_layer(nn.Linear(64, 32)).n_effective()


def test_tensor_core_effective_count_is_its_stored_parameters():
    """The issue's case: a 64 -> 32 tensor-core layer at ranks=4 stores 4·4 + 32·4 + 64·4 = 400 numbers, and both
    counts and summary call that its effective count (the gauge-free dimension, 368, is ``tucker_dimension``)."""
    from boftlab import summary
    from boftlab.tensor_core import tucker_dimension

    layer = counts.FAMILIES["tensor_core"](ranks=4).make_layer(nn.Linear(64, 32))
    shape = counts.LayerShape("x", 64, 32, True, "linear")
    assert counts.layer_count(shape, "tensor_core", ranks=4) == summary(nn.Sequential(layer)).effective == 400
    assert layer.n_trainable() == 400 and tucker_dimension((32, 64), (4, 4)) == 368
