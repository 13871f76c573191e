"""Closed-form parameter counts against the layers that store them, and against the papers' tables."""

import pytest
import torch
from torch import nn

from boftlab import counts
from boftlab.butterfly import BOFTConfig, OFTConfig


@pytest.mark.parametrize("fan_in,fan_out,block_size,n_factors", [(16, 8, 4, 1), (16, 8, 4, 3), (32, 48, 2, 5), (24, 24, 6, 3)])
def test_boft_formula_equals_what_the_layer_stores(fan_in, fan_out, block_size, n_factors):
    for scale in (True, False):
        layer = BOFTConfig(block_size=block_size, n_factors=n_factors, scale=scale).make_layer(nn.Linear(fan_in, fan_out))
        assert counts.boft_params(fan_in, fan_out, block_size, n_factors, scale=scale) == layer.n_trainable()


def test_oft_formula_equals_what_the_layer_stores():
    layer = OFTConfig(block_size=8).make_layer(nn.Linear(32, 10))
    assert counts.oft_params(32, 10, 8) == layer.n_trainable() == 4 * 28


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
@pytest.mark.parametrize("fan_in,fan_out", [(16, 16), (12, 20)])
def test_surm_formula_equals_what_the_layer_stores(hyper, fan_in, fan_out):
    surm = pytest.importorskip("boftlab.surm")
    layer = surm.SURMConfig(**hyper).make_layer(nn.Linear(fan_in, fan_out))
    shape = counts.layer_shapes(nn.Sequential(nn.Linear(fan_in, fan_out)), ["0"])[0]
    assert counts.layer_count(shape, "surm", **hyper) == layer.n_trainable()


@pytest.mark.parametrize("module,ranks", [(nn.Linear(24, 40), 8), (nn.Linear(24, 40), (4, 6)), (nn.Conv2d(8, 16, 3), 4),
                                          (nn.Conv2d(8, 16, 3), (4, 2, 3, 3))])
def test_flora_formula_equals_what_the_layer_stores(module, ranks):
    tensor_core = pytest.importorskip("boftlab.tensor_core")
    layer = tensor_core.TensorCoreConfig(ranks=ranks).make_layer(module)
    shape = counts.layer_shapes(nn.Sequential(module), ["0"])[0]
    assert counts.layer_count(shape, "flora", ranks=ranks) == layer.n_trainable()
