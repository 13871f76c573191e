"""The bad-input catalogue: wrong values across the public API, each answered by a clear error (what was given, what
is valid) or handled correctly — and the model exactly as it was afterwards.
"""

import pickle

import pytest
import torch
from torch import nn

import boftlab
from boftlab import AdapterConfig, BOFTConfig, OFTConfig
from boftlab.model import TRAINABLE_ATTR
from boftlab.saving import WEIGHTS_NAME
from boftlab.checkpoints import load_checkpoint, save_checkpoint
from helpers import assert_unchanged, perturb, snapshot


def case(name, *values):
    return pytest.param(*values, id=name)


def surm(**kwargs):
    return boftlab.SURMConfig(**kwargs)


def tensor_core(**kwargs):
    return boftlab.TensorCoreConfig(**kwargs)


# --- 1. configs: refused when built, before any model is involved -----------------------------------------------------
CONFIG_CASES = [
    case("block_size_1", lambda: BOFTConfig(block_size=1), r"block_size must be ≥ 2.*got 1"),
    case("block_size_and_n_blocks", lambda: BOFTConfig(block_size=4, n_blocks=4), "block_size or n_blocks, not both"),
    case("n_factors_0", lambda: BOFTConfig(n_factors=0), r"n_factors must be an integer ≥ 1.*got 0"),
    case("n_factors_float", lambda: BOFTConfig(n_factors=2.0), r"n_factors must be an integer.*got 2.0"),
    case("dropout_1", lambda: BOFTConfig(dropout=1.0), r"dropout is a probability in \[0, 1\), got 1.0"),
    case("neumann_terms_1", lambda: BOFTConfig(neumann_terms=1), r"neumann_terms must be None.*≥ 2, got 1"),
    case("path_unknown", lambda: BOFTConfig(path="fast"), r"path must be one of \('auto', 'input', 'assembled', 'weight'\)"),
    case("oft_two_factors", lambda: OFTConfig(n_factors=2), "OFT has exactly one factor.*use BOFTConfig"),
    case("surm_structure", lambda: surm(structure="fourier"), r"unknown structure 'fourier'; valid structures"),
    case("surm_mode", lambda: surm(mode="prefix"), r"unknown mode 'prefix'; valid modes: \('lora', 'adapter'\)"),
    case("surm_rank_without_ldr", lambda: surm(displacement_rank=2), "only applies to structure='ldr'"),
    case("surm_relu", lambda: surm(mode="adapter", activation="relu"), r"unknown activation 'relu'.*; valid"),
    case("tensor_core_rank_0", lambda: tensor_core(ranks=0), r"ranks must be an int ≥ 1.*got 0"),
    case("tensor_core_alpha_0", lambda: tensor_core(alpha=0), "alpha=0 makes ΔW and every adapter gradient zero"),
    case("from_dict_family", lambda: AdapterConfig.from_dict({"family": "dora"}), r"unknown adapter family 'dora'"),
    case("from_dict_option", lambda: AdapterConfig.from_dict({"family": "boft", "rank": 4}),
         r"BOFTConfig has no option\(s\) \['rank'\]; its options are \['block_size'"),
    case("block_size_str", lambda: BOFTConfig(block_size="4"), r"block_size must be an integer.*'4'"),
    case("block_size_float", lambda: BOFTConfig(block_size=4.0), r"block_size must be an integer.*4.0"),
    case("from_dict_not_a_dict", lambda: AdapterConfig.from_dict("boft"), r"expects a dict.*got a str"),
    # every family's numeric options: finite numbers of the right type, refused when the config is built
    case("surm_alpha_nan", lambda: surm(alpha=float("nan")), r"alpha must be a finite number, got nan \(float\)"),
    case("surm_alpha_inf", lambda: surm(alpha=float("inf")), r"alpha must be a finite number, got inf"),
    case("surm_alpha_str", lambda: surm(alpha="1"), r"alpha must be a finite number, got '1' \(str\)"),
    case("surm_alpha_bool", lambda: surm(alpha=True), r"alpha must be a finite number, got True \(bool\)"),
    case("surm_alpha_0", lambda: surm(alpha=0), "alpha=0 makes α·S and every adapter gradient zero"),
    case("surm_rank_bool", lambda: surm(structure="ldr", displacement_rank=True), r"displacement_rank must be an integer"),
    case("surm_rank_float", lambda: surm(structure="ldr", displacement_rank=2.0), r"displacement_rank must be an integer"),
    case("surm_kronecker_shape_float", lambda: surm(structure="kronecker", kronecker_shape=(2.5, 3)),
         r"kronecker_shape entries must be an integer, got 2.5"),
    case("surm_kronecker_shape_int", lambda: surm(structure="kronecker", kronecker_shape=4), r"kronecker_shape is the shape"),
    case("surm_bias_str", lambda: surm(mode="adapter", bias="no"), r"bias must be True or False, got 'no'"),
    case("surm_activation_list", lambda: surm(mode="adapter", activation=["gelu"]), r"unknown activation \['gelu'\]"),
    case("boft_coft_eps_nan", lambda: BOFTConfig(coft_eps=float("nan")), r"coft_eps must be a finite number, got nan"),
    case("boft_coft_eps_inf", lambda: BOFTConfig(coft_eps=float("inf")), r"coft_eps must be a finite number, got inf"),
    case("boft_dropout_nan", lambda: BOFTConfig(dropout=float("nan")), r"dropout must be a finite number, got nan"),
    case("boft_dropout_str", lambda: BOFTConfig(dropout="0.1"), r"dropout must be a finite number, got '0.1'"),
    case("boft_scale_str", lambda: BOFTConfig(scale="yes"), r"scale must be True or False, got 'yes'"),
    case("boft_neumann_float", lambda: BOFTConfig(neumann_terms=3.0), r"neumann_terms must be an integer, got 3.0"),
    case("tensor_core_alpha_nan", lambda: tensor_core(alpha=float("nan")), r"alpha must be a finite number, got nan"),
    case("tensor_core_alpha_str", lambda: tensor_core(alpha="1"), r"alpha must be a finite number, got '1' \(str\)"),
]


@pytest.mark.parametrize("make,message", CONFIG_CASES)
def test_bad_config(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# --- 2. calls on a model: a clear error and the model unchanged --------------------------------------------------------
class Net(nn.Module):
    def __init__(self, width=16):
        super().__init__()
        self.query = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        self.conv = nn.Conv2d(3, 4, 3)  # fan-in 27: no even block size fits
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        return self.head(self.norm(self.value(torch.tanh(self.query(x)))))


def plain():
    torch.manual_seed(0)
    return Net()


def adapted(config=None):
    model = boftlab.adapt(plain(), config or BOFTConfig(block_size=4), targets=["query", "value"], trainable=["head"])
    return perturb(model, scale=0.2)


def merged():
    return boftlab.merge(adapted())


def saved(tmp_path, model=None):
    boftlab.save_adapter(model or adapted(), tmp_path / "adapter")
    return tmp_path / "adapter"


def with_zero_scale(model=None):
    model = model or adapted()
    with torch.no_grad():
        model.value.scale[0] = 0.0
    return model


def with_non_finite(value):
    model = adapted()
    with torch.no_grad():
        model.value.skew[0, 0, 0] = value
    return model


def with_shared_weight(model=None):
    """``value`` uses ``query``'s weight tensor (tied weights)."""
    model = model or plain()
    model.value.weight = model.query.weight
    return model


def with_alias():
    """``query`` is also registered as ``alias``: one module under two names."""
    model = plain()
    model.alias = model.query
    return model


def adapted_then_tied():
    model = adapted()
    model.value.base_layer.weight = model.query.base_layer.weight  # tied after adapting, behind boftlab's back
    return model


def boft_then_unmergeable_surm():
    model = boftlab.adapt(plain(), BOFTConfig(block_size=4), targets=["query"])
    return boftlab.adapt(model, surm(mode="adapter", activation="gelu"), targets=["value"])


def with_weight_norm():
    model = plain()
    nn.utils.parametrizations.weight_norm(model.value)
    return model


def write_pickle(tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / WEIGHTS_NAME).write_bytes(pickle.dumps({"query.skew": [0.0] * 4}))
    return tmp_path / "p"


MODEL_CASES = [
    # adapt: configs that do not fit, targets that select nothing or the wrong thing
    case("block_size_does_not_fit_layer", plain, lambda m, t: boftlab.adapt(m, BOFTConfig(block_size=6), ["query"]),
         r"cannot adapt module 'query': block_size=6 .*Valid block_size for n_factors=2: \[2, 4, 8\].*nearest valid"),
    case("too_many_factors_for_layer", plain, lambda m, t: boftlab.adapt(m, BOFTConfig(block_size=4, n_factors=4), ["query"]),
         r"block_size=4 with n_factors=4 does not fit in_features=16.*valid n_factors for block_size=4: \[1, 2, 3\]"),
    case("one_bad_target_among_good", plain, lambda m, t: boftlab.adapt(m, BOFTConfig(block_size=4), ["query", "conv"]),
         r"cannot adapt module 'conv'.*in_channels/groups·kh·kw=27"),
    case("tensor_core_rank_too_big", plain, lambda m, t: boftlab.adapt(m, tensor_core(ranks=(4, 40)), ["query"]),
         r"ranks\[1\]=40 .*Valid ranks per mode"),
    case("surm_adapter_mode_on_conv", plain, lambda m, t: boftlab.adapt(m, surm(mode="adapter"), ["conv"]),
         r"none of which SURMConfig\(mode='adapter'\) supports; supported types: nn.Linear, transformers Conv1D$"),
    case("surm_on_layer_norm", plain, lambda m, t: boftlab.adapt(m, surm(), ["norm"]),
         r"\['LayerNorm'\], none of which SURMConfig\(mode='lora'\) supports; supported types: nn.Linear, transformers Conv1D, "
         r"nn.Conv1d, nn.Conv2d, nn.Conv3d$"),
    case("config_is_a_dict", plain, lambda m, t: boftlab.adapt(m, {"block_size": 4}, ["query"]), r"config must be an adapter config.*got dict"),
    case("targets_match_nothing", plain, lambda m, t: boftlab.adapt(m, BOFTConfig(), ["attention"]),
         r"targets=\['attention'\] matched no module. Modules in this model: query \(Linear\)"),
    case("targets_unsupported_type", plain, lambda m, t: boftlab.adapt(m, BOFTConfig(block_size=4), ["norm"]),
         r"\['LayerNorm'\], none of which BOFTConfig supports; supported types: nn.Linear, transformers Conv1D, "
         r"nn.Conv2d, nn.Embedding$"),
    case("targets_not_understood", plain, lambda m, t: boftlab.adapt(m, BOFTConfig(), 42), r"targets=42 is not understood"),
    case("targets_empty", plain, lambda m, t: boftlab.adapt(m, BOFTConfig(), []), "targets is empty"),
    case("targets_item_none", plain, lambda m, t: boftlab.adapt(m, BOFTConfig(), ["query", None]),
         "targets item None is not a module name, suffix, compiled regex or module type"),
    case("trainable_unknown", plain, lambda m, t: boftlab.adapt(m, BOFTConfig(block_size=4), ["query"], trainable=["classifier"]),
         r"trainable='classifier' matched no module"),
    case("adapt_adapted_layer", adapted, lambda m, t: boftlab.adapt(m, OFTConfig(block_size=4), ["query"]),
         "module 'query' already carries a 'boft' adapter"),
    case("adapt_weight_norm_layer", with_weight_norm, lambda m, t: boftlab.adapt(m, BOFTConfig(block_size=4), ["value"]),
         r"cannot adapt module 'value': this ParametrizedLinear recomputes its weight or input on every call "
         r"\(parametrization _WeightNorm of 'weight'\)"),
    case("adapt_inside_multihead_attention", lambda: nn.TransformerEncoderLayer(16, 2, 32),
         lambda m, t: boftlab.adapt(m, BOFTConfig(block_size=4), [nn.Linear]),
         r"'self_attn.out_proj': its parent 'self_attn' is an nn.MultiheadAttention, which passes out_proj.weight"),
    case("adapt_meta_model", lambda: Net().to("meta"), lambda m, t: boftlab.adapt(m, BOFTConfig(block_size=4), ["query"]),
         r"module 'query' \(1 targeted module\(s\)\) is on the meta device"),
    case("trainable_holds_an_adapter", adapted,
         lambda m, t: boftlab.adapt(m, surm(), ["conv"], trainable=["query"]),
         r"trainable names module 'query', which carries a 'boft' adapter from an earlier adapt"),
    case("targets_all_inside_trainable", plain,
         lambda m, t: boftlab.adapt(m, BOFTConfig(block_size=4), nn.Linear, trainable=["query", "value", "head"]),
         r"targets=Linear selects 3 module\(s\), all of them inside modules kept trainable, so adapt would wrap nothing"),
    case("target_kept_trainable_by_an_earlier_call", adapted,
         lambda m, t: boftlab.adapt(m, surm(), ["head"]),
         r"targets=\['head'\] names 1 module\(s\) that are also kept trainable: 'head' \(inside 'head'\)"),
    # merge / unmerge
    case("merge_twice", merged, lambda m, t: boftlab.merge(m), r"merge: already merged \(2 layers"),
    case("unmerge_unmerged", adapted, lambda m, t: boftlab.unmerge(m), "unmerge: 2 layers are not merged"),
    case("merge_without_adapters", plain, lambda m, t: boftlab.merge(m), "merge: the model has no boftlab adapters"),
    case("merge_with_zero_scale", with_zero_scale, lambda m, t: boftlab.merge(m),
         r"merge: layer 'value': cannot merge: the output scale is exactly 0 at 1 row\(s\) \(e.g. row 0\).*unmerge could not recover"),
    case("unmerge_with_zero_scale", lambda: with_zero_scale(merged()), lambda m, t: boftlab.unmerge(m),
         r"cannot unmerge: the output scale is exactly 0"),
    case("merge_unmergeable_second_layer", boft_then_unmergeable_surm, lambda m, t: boftlab.merge(m),
         r"cannot merge an adapter with activation='gelu'"),
    case("merge_nan_adapter", lambda: with_non_finite(float("nan")), lambda m, t: boftlab.merge(m),
         r"layer 'value': cannot merge: the new base tensor\(s\) would hold NaN/inf \(weight: \d+ value\(s\)\) — the "
         r"adapter's own tensors \['skew'\] hold NaN/inf.*Nothing was changed"),
    case("merge_inf_adapter", lambda: with_non_finite(float("inf")), lambda m, t: boftlab.merge(m), r"\['skew'\] hold NaN/inf"),
    case("unwrap_nan_adapter", lambda: with_non_finite(float("nan")), lambda m, t: boftlab.unwrap(m), r"\['skew'\] hold NaN/inf"),
    case("unwrap_unmergeable_second_layer", boft_then_unmergeable_surm, lambda m, t: boftlab.unwrap(m),
         r"cannot merge an adapter with activation='gelu'"),
    case("unwrap_with_zero_scale", with_zero_scale, lambda m, t: boftlab.unwrap(m), "the output scale is exactly 0"),
    # tied weights: never adapted unless untied, never merged into
    case("adapt_tied_weight", with_shared_weight, lambda m, t: boftlab.adapt(m, BOFTConfig(block_size=4), ["query"]),
         r"cannot adapt 'query': 'query.weight' is the same tensor as 'value.weight' \(tied weights\).*Leave it out of "
         r"targets, or pass adapt\(\.\.\., untie=True\)"),
    case("adapt_module_under_two_names", with_alias, lambda m, t: boftlab.adapt(m, BOFTConfig(block_size=4), ["query"]),
         r"'query.weight' is the same tensor as 'alias.weight'"),
    case("merge_into_shared_weight", adapted_then_tied, lambda m, t: boftlab.merge(m),
         r"merge: 'query.base_layer.weight' is the same tensor as 'value.base_layer.weight'.*Nothing was changed"),
    case("unwrap_into_shared_weight", adapted_then_tied, lambda m, t: boftlab.unwrap(m), r"same tensor as"),
    # a whole-model state_dict carries each layer's merged flag; what cannot be one consistent layer is refused
    case("state_dict_adapter_tensors_into_merged_model", merged,
         lambda m, t: m.load_state_dict(boftlab.saving.adapter_state(adapted()), strict=False),
         r"cannot load this state into 'query': it holds adapter tensors for a merged layer"),
    case("state_dict_merged_flag_without_base_weights", adapted,
         lambda m, t: m.load_state_dict({k: v for k, v in merged().state_dict().items() if "base_layer" not in k}, strict=False),
         r"it says merged=True but holds no base tensors"),
    # saving and loading
    case("save_without_adapters", plain, lambda m, t: boftlab.save_adapter(m, t / "a"), "no boftlab adapters to save"),
    case("save_onto_a_file", adapted, lambda m, t: boftlab.save_adapter(m, (t / "f").write_text("x") and t / "f"),
         "save_adapter writes a directory, but .* is an existing file"),
    case("load_missing_path", plain, lambda m, t: boftlab.load_adapter(m, t / "nothing"), "no adapter at .*nothing"),
    case("load_pickle_file", plain, lambda m, t: boftlab.load_adapter(m, write_pickle(t)), "not a readable safetensors file"),
    case("load_other_family_into_adapted_model", adapted,
         lambda m, t: boftlab.load_adapter(m, saved(t, adapted(OFTConfig(block_size=4)))),
         r"already carries adapters of another structure than the file's.*'query': here \(\{'family': 'boft'"),
    case("load_other_targets_into_adapted_model", adapted,
         lambda m, t: boftlab.load_adapter(m, saved(t, boftlab.adapt(plain(), BOFTConfig(block_size=4), ["query"]))),
         r"another structure than the file's, so the file cannot be swapped in place "
         r"\(adapted here only: \['value'\]; kept trainable: here \['head'\], "
         r"in the file \[\]\)"),
    case("load_into_merged_model", merged, lambda m, t: boftlab.load_adapter(m, saved(t)),
         r"load_adapter: 2 adapter\(s\) of this model are merged .*boftlab.unmerge\(model\) first, then load_adapter"),
    case("load_other_width", lambda: Net(width=32), lambda m, t: boftlab.load_adapter(m, saved(t)),
         r"shape mismatch at 'query'.*\[16, 16\].*\[32, 32\]"),
    case("load_into_meta_model", lambda: Net().to("meta"), lambda m, t: boftlab.load_adapter(m, saved(t)),
         "meta"),
    # forward
    case("input_wrong_width", adapted, lambda m, t: m(torch.randn(5, 15)), r"\(\.\.\., 16\).*\(5, 15\)"),
    # resumable training
    case("checkpoint_into_plain_model", plain, lambda m, t: load_checkpoint(m, save_checkpoint(adapted(), t)),
         "load_checkpoint resumes into an adapted model"),
    case("checkpoint_negative_step", adapted, lambda m, t: save_checkpoint(m, t, step=-1), r"step must be an integer ≥ 0.*-1"),
    # PEFT export
    case("to_peft_other_family", lambda: adapted(tensor_core(ranks=2)), lambda m, t: boftlab.to_peft(m, t / "peft"),
         r"PEFT export covers BOFT/OFT .* and SURM circulant \(as PEFT C3A\), one kind per export; this model has "
         r"the families \['tensor_core'\]"),
    case("to_peft_surm_not_circulant", lambda: adapted(surm(structure="toeplitz")),
         lambda m, t: boftlab.to_peft(m, t / "peft"),
         r"cannot export 'query' \(SURM 'toeplitz', mode='lora'\) as PEFT C3A: "
         r".*SURMConfig\(structure='circulant', mode='lora'\)"),
]


@pytest.mark.parametrize("build,call,message", MODEL_CASES)
def test_bad_call_leaves_model_unchanged(build, call, message, tmp_path):
    model = build()
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        call(model, tmp_path)
    assert_unchanged(before, snapshot(model))


# --- 3. unusual but valid: handled correctly -------------------------------------------------------------------------
def test_wrong_dtype_input_fails_like_the_base_layer():
    """A float64 batch into a float32 model: the adapted model raises the base layer's own dtype error."""
    x = torch.randn(4, 16, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="dtype") as base_error:
        plain()(x)
    model = adapted()
    before = snapshot(model)
    with pytest.raises(base_error.type, match="dtype"):
        model(x)
    assert_unchanged(before, snapshot(model))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_model_cast_after_adapting(dtype):
    """.to(dtype) after adapt: adapter tensors follow the model and the adapted model still starts at the identity."""
    model = plain()
    x = torch.randn(4, 16)
    boftlab.adapt(model, BOFTConfig(block_size=4), targets=["query", "value"])
    model.to(dtype)
    reference = plain().to(dtype)
    assert all(p.dtype == dtype for p in model.parameters())
    atol = 1e-12 if dtype == torch.float64 else 2e-2
    torch.testing.assert_close(model(x.to(dtype)), reference(x.to(dtype)), rtol=0, atol=atol)


def test_trainable_given_as_a_string():
    model = boftlab.adapt(plain(), BOFTConfig(block_size=4), targets=["query"], trainable="head")
    assert model.head.weight.requires_grad and getattr(model, TRAINABLE_ATTR) == ["head"]


def test_save_while_merged_reloads_the_adapter_not_the_merge(tmp_path):
    model = adapted()
    x = torch.randn(4, 16)
    expected = model(x)
    boftlab.merge(model)
    boftlab.save_adapter(model, tmp_path)
    reloaded = boftlab.load_adapter(plain(), tmp_path)  # onto the original base weights
    assert not any(layer.merged for layer in boftlab.adapter_layers(reloaded).values())
    torch.testing.assert_close(reloaded(x), expected, rtol=0, atol=1e-5)


def test_unwrap_twice_is_harmless():
    model = boftlab.unwrap(adapted())
    before = snapshot(model)
    assert boftlab.unwrap(model) is model
    assert_unchanged(before, snapshot(model))
