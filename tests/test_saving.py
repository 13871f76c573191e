"""save_adapter / load_adapter: exact round trips, strict validation that leaves the model untouched, atomicity."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import boftlab
from boftlab import BOFTConfig, OFTConfig
from boftlab.saving import CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME, read_adapter, safetensors_writer
from helpers import assert_unchanged, snapshot


class Net(nn.Module):
    def __init__(self, width=16):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))
        self.conv = nn.Conv2d(2, 4, 2)
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        return self.head(self.encoder(x))


def trained(model):
    with torch.no_grad():
        for layer in boftlab.adapter_layers(model).values():
            for p in layer.adapter_parameters().values():
                p.add_(0.3 * torch.randn_like(p))
        model.head.weight.add_(1.0)
    return model


def adapted_net():
    torch.manual_seed(1)
    model = boftlab.adapt(Net(), BOFTConfig(block_size=4, n_factors=2), targets=["encoder.0", "encoder.2"], trainable=["head"])
    return trained(boftlab.adapt(model, OFTConfig(block_size=4), targets=["conv"]))


def fresh_net():
    torch.manual_seed(1)
    return Net()


def test_round_trip_reproduces_outputs(tmp_path):
    model = adapted_net()
    x = torch.randn(5, 16)
    boftlab.save_adapter(model, tmp_path / "a")
    loaded = boftlab.load_adapter(fresh_net(), tmp_path / "a")
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=1e-6)
    assert {n: l.family for n, l in boftlab.adapter_layers(loaded).items()} == {
        "encoder.0": "boft", "encoder.2": "boft", "conv": "oft"
    }
    assert loaded.head.weight.requires_grad and not loaded.encoder[0].base_layer.weight.requires_grad



@pytest.mark.parametrize("unfrozen", ["encoder.0.base_layer.weight", "conv.base_layer.bias"])
def test_a_trained_parameter_the_file_would_not_hold_is_refused(tmp_path, unfrozen):
    """A base weight the user unfroze after adapt trains, but an adapter file holds only the adapters and the
    modules kept trainable: it was silently dropped (in a probe, reloaded vs trained 0.03 max abs). Refused, naming it and
    what to do; nothing is written."""
    model = adapted_net()
    model.get_parameter(unfrozen).requires_grad_(True)
    with pytest.raises(ValueError, match=rf"save_adapter: 1 parameter\(s\) train .* would be lost on reload: "
                                         rf"\['{unfrozen}'\].*adapt\(\.\.\., trainable=.*requires_grad_\(False\)"):
        boftlab.save_adapter(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    model.get_parameter(unfrozen).requires_grad_(False)
    boftlab.save_adapter(model, tmp_path / "a")

def test_saved_files(tmp_path):
    boftlab.save_adapter(adapted_net(), tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["format_version"] == FORMAT_VERSION == 3 and config["boftlab_version"] == boftlab.__version__
    groups = {g["config"]["family"]: g for g in config["groups"]}
    assert groups["boft"]["config"]["block_size"] == 4 and groups["boft"]["config"]["n_factors"] == 2
    assert groups["boft"]["targets"]["encoder.0"] == {"type": "Linear", "weight_shape": [16, 16], "layer_shape": [16, 16]}
    assert config["trainable"] == ["head"]
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    assert set(tensors) == {
        "encoder.0.skew", "encoder.0.scale", "encoder.2.skew", "encoder.2.scale", "conv.skew", "head.weight", "head.bias"
    }
    assert read_adapter(tmp_path)[0] == config  # the JSON file and the weights' embedded config agree


def test_shape_mismatch_is_refused_and_model_untouched(tmp_path):
    boftlab.save_adapter(adapted_net(), tmp_path)
    other = Net(width=32)
    before = snapshot(other)
    with pytest.raises(ValueError, match=r"shape mismatch at 'encoder.0'.*\[16, 16\].*\[32, 32\]"):
        boftlab.load_adapter(other, tmp_path)
    assert_unchanged(before, snapshot(other))


def rewrite(path, change_tensors=None, change_config=None, checksum=True):
    """Rewrite a saved adapter directory with changed tensors or config, both files consistent (and the weights
    checksummed unless ``checksum=False``): what a buggy or foreign writer could produce."""
    config, tensors = read_adapter(path)
    if change_tensors:
        change_tensors(tensors)
    if change_config:
        change_config(config)
    metadata = {"boftlab": json.dumps(config)}
    if checksum:
        safetensors_writer(tensors, metadata)(path / WEIGHTS_NAME)
    else:
        save_file(tensors, path / WEIGHTS_NAME, metadata=metadata)
    (path / CONFIG_NAME).write_text(json.dumps(config))


@pytest.mark.parametrize(
    "change_tensors,change_config,message",
    [
        (lambda t: t.pop("encoder.2.skew"), None, r"missing tensors \['encoder.2.skew'\]"),
        (lambda t: t.update(extra=torch.zeros(1)), None, r"unexpected tensors \['extra'\]"),
        (lambda t: t.update({"conv.skew": torch.zeros(2, 2)}), None, "tensor shape mismatch"),
        (None, lambda c: c["groups"][0]["config"].update(family="dora"), r"unknown adapter family 'dora'.*\['boft', 'oft'"),
        (None, lambda c: c.update(format_version=99), "format version 99.*reads versions 1..3"),
        (None, lambda c: c["groups"][0]["config"].update(rank=3), r"has no option\(s\) \['rank'\]"),
        (None, lambda c: c["groups"][0]["targets"].update({"decoder.0": {"type": "Linear", "weight_shape": [16, 16]}}),
         r"does not have"),
    ],
)
def test_bad_files_are_refused_and_model_untouched(tmp_path, change_tensors, change_config, message):
    boftlab.save_adapter(adapted_net(), tmp_path)
    rewrite(tmp_path, change_tensors, change_config)
    model = fresh_net()
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        boftlab.load_adapter(model, tmp_path)
    assert_unchanged(before, snapshot(model))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupted_file_is_refused(tmp_path, damage):
    boftlab.save_adapter(adapted_net(), tmp_path)
    weights = tmp_path / WEIGHTS_NAME
    data = weights.read_bytes()
    weights.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x80\x04not safetensors" * 10, "empty": b""}[damage])
    model = fresh_net()
    before = snapshot(model)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        boftlab.load_adapter(model, tmp_path)
    assert_unchanged(before, snapshot(model))


def test_pickle_is_never_loaded(tmp_path, monkeypatch):
    boftlab.save_adapter(adapted_net(), tmp_path)

    def no_pickle(*args, **kwargs):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", no_pickle)
    boftlab.load_adapter(fresh_net(), tmp_path)


def test_missing_directory_and_non_adapter_file(tmp_path):
    with pytest.raises(ValueError, match="no adapter at"):
        boftlab.load_adapter(fresh_net(), tmp_path / "nothing")
    save_file({"w": torch.zeros(2)}, tmp_path / WEIGHTS_NAME)
    with pytest.raises(ValueError, match="not a boftlab adapter"):
        boftlab.load_adapter(fresh_net(), tmp_path)


def test_hot_swap_copies_weights_into_the_same_parameter_objects(tmp_path):
    """load_adapter onto adapters of the same structure swaps their values in place: outputs become the file's, no
    module or parameter is replaced, and an optimizer built before the swap trains the swapped-in adapter."""
    x = torch.randn(5, 16)
    first, second = adapted_net(), trained(adapted_net())  # same structure, other values
    boftlab.save_adapter(first, tmp_path / "first")
    boftlab.save_adapter(second, tmp_path / "second")
    expected_first, expected_second = first(x), second(x)
    assert not torch.allclose(expected_first, expected_second)

    model = second
    modules, params = list(model.modules()), list(model.parameters())
    optimizer = torch.optim.SGD([p for p in params if p.requires_grad], lr=0.1)
    assert boftlab.load_adapter(model, tmp_path / "first") is model
    assert list(model.modules()) == modules and all(a is b for a, b in zip(model.parameters(), params))
    torch.testing.assert_close(model(x), expected_first, rtol=0, atol=0)

    loaded = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model(x).square().mean().backward()
    optimizer.step()
    for name, p in model.named_parameters():
        if p.requires_grad:  # the old optimizer updated the swapped-in values: SGD moved them by −lr·grad
            # the conv's adapter is not on the forward's path; SGD's update is one fused add (single rounding)
            expected = loaded[name] if p.grad is None else loaded[name].add(p.grad, alpha=-0.1)
            torch.testing.assert_close(p.detach(), expected, rtol=0, atol=0)
    assert not torch.allclose(model.encoder[0].skew, loaded["encoder.0.skew"])

    boftlab.load_adapter(model, tmp_path / "second")  # and back
    torch.testing.assert_close(model(x), expected_second, rtol=0, atol=0)


def test_hot_swap_copies_exactly_or_refuses_a_value_the_models_dtype_would_round(tmp_path):
    """A swap keeps the model's tensors, hence their dtype: float32 values go into a float64 model exactly; float64
    values a float32 model cannot hold are refused, with nothing changed."""
    boftlab.save_adapter(adapted_net(), tmp_path / "fp32")
    wide = adapted_net().double()
    boftlab.load_adapter(wide, tmp_path / "fp32")
    assert wide.encoder[0].skew.dtype == torch.float64
    assert torch.equal(wide.encoder[0].skew, adapted_net().encoder[0].skew.double())
    with torch.no_grad():
        wide.encoder[0].skew.add_(1e-12)  # not a float32 number any more
    boftlab.save_adapter(wide, tmp_path / "fp64")
    model = adapted_net()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"loading would round 'encoder.0.skew' \(torch.float64 in the file, "
                                         r"torch.float32 in the model\)"):
        boftlab.load_adapter(model, tmp_path / "fp64")
    assert_unchanged(before, snapshot(model))


@pytest.mark.parametrize(
    "other,message",
    [
        (lambda: boftlab.adapt(fresh_net(), BOFTConfig(block_size=8, n_factors=2), ["encoder.0", "encoder.2"],
                               trainable=["head"]),
         r"'encoder.0': here \(\{'family': 'boft', 'block_size': 4.*in the file \(\{'family': 'boft', 'block_size': 8"),
        (lambda: boftlab.adapt(fresh_net(), BOFTConfig(block_size=4, n_factors=2), ["encoder.0"], trainable=["head"]),
         r"adapted here only: \['conv', 'encoder.2'\]"),
        (lambda: boftlab.adapt(fresh_net(), OFTConfig(block_size=4), ["encoder.0", "encoder.2", "conv"],
                               trainable=["head"]),
         r"'encoder.0': here \(\{'family': 'boft'.*in the file \(\{'family': 'oft'"),
    ],
    ids=["other_block_size", "fewer_targets", "other_family"],
)
def test_hot_swap_of_another_structure_is_refused_and_changes_nothing(other, message, tmp_path):
    boftlab.save_adapter(other(), tmp_path)
    model = adapted_net()
    before = snapshot(model)
    with pytest.raises(ValueError, match="already carries adapters of another structure than the file's.*" + message):
        boftlab.load_adapter(model, tmp_path)
    assert_unchanged(before, snapshot(model))


def test_interrupted_save_keeps_previous_adapter(tmp_path, monkeypatch):
    model = adapted_net()
    boftlab.save_adapter(model, tmp_path)
    previous = (tmp_path / WEIGHTS_NAME).read_bytes()
    import boftlab.saving as saving

    def crash_half_way(tensors, filename, metadata=None):
        Path(filename).write_bytes(previous[:100])  # a partial write ...
        raise OSError("disk full")  # ... then the failure

    monkeypatch.setattr(saving, "save_file", crash_half_way)
    with torch.no_grad():
        model.encoder[0].skew.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        boftlab.save_adapter(model, tmp_path)
    assert (tmp_path / WEIGHTS_NAME).read_bytes() == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]  # no temp files left
    boftlab.load_adapter(fresh_net(), tmp_path)


def test_save_without_adapters_and_onto_a_file(tmp_path):
    with pytest.raises(ValueError, match="no boftlab adapters"):
        boftlab.save_adapter(Net(), tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="existing file"):
        boftlab.save_adapter(adapted_net(), tmp_path / "file")


def tensor_core_base():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))


def tensor_core_net():
    net = boftlab.adapt(tensor_core_base(), boftlab.TensorCoreConfig(ranks=2, alpha=0.5, path="input"), targets=["0"])
    with torch.no_grad():
        net[0].core.normal_()
    return net


def test_format_1_file_loads_with_the_old_tensor_core_option_names(tmp_path):
    """Format 1 called the tensor core's alpha "scale" and its input path "factorised": both are translated."""
    net, x = tensor_core_net(), torch.randn(3, 8)
    boftlab.save_adapter(net, tmp_path)

    def as_format_1(config):
        options = config["groups"][0]["config"]
        options["scale"], options["path"] = options.pop("alpha"), "factorised"
        config["format_version"] = 1

    rewrite(tmp_path, change_config=as_format_1)
    loaded = boftlab.load_adapter(tensor_core_base(), tmp_path)
    layer = boftlab.adapter_layers(loaded)["0"]
    assert (layer.config.alpha, layer.config.path) == (0.5, "input")
    torch.testing.assert_close(loaded(x), net(x), rtol=0, atol=0)
    assert read_adapter(tmp_path)[0]["format_version"] == 2


def test_format_2_file_with_an_old_option_name_is_refused(tmp_path):
    boftlab.save_adapter(tensor_core_net(), tmp_path)
    rename = lambda c: c["groups"][0]["config"].update(scale=c["groups"][0]["config"].pop("alpha"))  # noqa: E731
    rewrite(tmp_path, change_config=rename)
    model = tensor_core_base()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"TensorCoreConfig has no option\(s\) \['scale'\]; its options are .*'alpha'"):
        boftlab.load_adapter(model, tmp_path)
    assert_unchanged(before, snapshot(model))


# --- what a file promises: finite values, a checksum, one config, the path the user named -----------------------------
def assert_load_refused(path, message, model=None):
    """load_adapter(model, path) raises a ValueError matching ``message``; ``model`` (default: fresh) is unchanged."""
    model = fresh_net() if model is None else model
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        boftlab.load_adapter(model, path)
    assert_unchanged(before, snapshot(model))


def poisoned(value):
    model = adapted_net()
    with torch.no_grad():
        model.encoder[2].skew[0, 0, 1] = value
        model.head.weight[1, 2] = float("inf")
    return model


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_adapter_is_not_saved(tmp_path, value):
    boftlab.save_adapter(adapted_net(), tmp_path)
    previous = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    message = r"non-finite values in 2 tensor\(s\): 'encoder.2.skew' .*'head.weight' \(0 NaN, 1 inf"
    with pytest.raises(ValueError, match=message):
        boftlab.save_adapter(poisoned(value), tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == previous  # the previous adapter, untouched
    with pytest.raises(ValueError, match="non-finite"):
        boftlab.save_adapter(poisoned(value), tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_non_finite_file_written_without_checks_is_not_loaded(tmp_path):
    boftlab.save_adapter(adapted_net(), tmp_path)
    rewrite(tmp_path, change_tensors=lambda t: t["conv.skew"].view(-1)[3].fill_(float("nan")))
    assert_load_refused(tmp_path, r"adapter file .* holds non-finite values in 1 tensor\(s\): 'conv.skew' \(1 NaN")


def flip_bit(file, offset_in_data):
    """Flip the lowest bit of one byte of the tensor data section (after the 8-byte length and the JSON header)."""
    data = bytearray(file.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    data[start + offset_in_data % (len(data) - start)] ^= 0x01
    file.write_bytes(bytes(data))


@pytest.mark.parametrize("offset", [0, 101, -1])
def test_flipped_bit_in_the_tensor_data_is_refused(tmp_path, offset):
    boftlab.save_adapter(adapted_net(), tmp_path)
    flip_bit(tmp_path / WEIGHTS_NAME, offset)
    assert_load_refused(tmp_path, rf"adapter file '{tmp_path / WEIGHTS_NAME}' is corrupted.*checksum")


def test_flipped_bit_in_the_embedded_config_is_refused(tmp_path):
    """'n_factors\\": 2' -> 'n_factors\\": 3': a valid config, a wrong adapter — caught by the checksum."""
    boftlab.save_adapter(adapted_net(), tmp_path)
    data = bytearray((tmp_path / WEIGHTS_NAME).read_bytes())
    at = data.index(b'n_factors\\": 2') + len(b'n_factors\\": ')
    data[at] ^= 0x01  # '2' (0x32) -> '3' (0x33)
    (tmp_path / WEIGHTS_NAME).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="is corrupted"):
        boftlab.load_adapter(fresh_net(), tmp_path)


def test_files_without_a_checksum(tmp_path):
    """Format 2 predates checksums and loads without one; a format-3 file must carry one."""
    model, x = adapted_net(), torch.randn(5, 16)
    boftlab.save_adapter(model, tmp_path)
    rewrite(tmp_path, change_config=lambda c: c.update(format_version=2), checksum=False)
    torch.testing.assert_close(boftlab.load_adapter(fresh_net(), tmp_path)(x), model(x), rtol=0, atol=1e-6)
    rewrite(tmp_path, change_config=lambda c: c.update(format_version=3), checksum=False)
    with pytest.raises(ValueError, match="says format version 3, whose files carry a checksum .* but it has none"):
        boftlab.load_adapter(fresh_net(), tmp_path)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda c: c["groups"][0]["config"].update(n_factors=1),
         r"groups\[0\].config.n_factors: 2 in the weights, 1 in the JSON"),
        (lambda c: c.update(trainable=[]), r"trainable: \['head'\] in the weights, \[\] in the JSON"),
        (lambda c: c["groups"].pop(), r"groups: \[.*\] in the weights"),
    ],
)
def test_config_json_that_disagrees_with_the_weights_is_refused(tmp_path, edit, message):
    model, x = adapted_net(), torch.randn(5, 16)
    boftlab.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    edit(config)
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    assert_load_refused(tmp_path, rf"adapter_config.json' disagrees with the config embedded in .*{message}")
    assert_load_refused(tmp_path / WEIGHTS_NAME, "disagrees")  # the weights file named directly: the JSON is beside it
    (tmp_path / CONFIG_NAME).unlink()  # the weights file alone is complete
    torch.testing.assert_close(boftlab.load_adapter(fresh_net(), tmp_path)(x), model(x), rtol=0, atol=1e-6)


def test_config_json_that_is_not_json_is_refused(tmp_path):
    boftlab.save_adapter(adapted_net(), tmp_path)
    (tmp_path / CONFIG_NAME).write_text('{"format_version": 3,')
    with pytest.raises(ValueError, match="adapter_config.json' is not valid JSON"):
        boftlab.load_adapter(fresh_net(), tmp_path)


def test_save_to_a_safetensors_path_writes_that_file(tmp_path):
    model, x = adapted_net(), torch.randn(5, 16)
    file = boftlab.save_adapter(model, tmp_path / "run" / "adapter.safetensors")
    assert file == tmp_path / "run" / "adapter.safetensors" and file.is_file()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["adapter.safetensors"]
    torch.testing.assert_close(boftlab.load_adapter(fresh_net(), file)(x), model(x), rtol=0, atol=1e-6)
    (tmp_path / "taken.safetensors").mkdir()
    with pytest.raises(ValueError, match="writes the file .*taken.safetensors', but a directory of that name is in"):
        boftlab.save_adapter(model, tmp_path / "taken.safetensors")
    assert list((tmp_path / "taken.safetensors").iterdir()) == []


def test_save_interrupted_between_the_two_files_keeps_both(tmp_path, monkeypatch):
    """The JSON copy's write fails after the weights were written to their temporary file: neither file changes."""
    model = adapted_net()
    boftlab.save_adapter(model, tmp_path)
    previous = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def full_disk(self, text):
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", full_disk)
    with torch.no_grad():
        model.encoder[0].skew.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        boftlab.save_adapter(model, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == previous


def test_adapter_tensors_come_back_in_the_dtype_they_were_saved_in(tmp_path):
    """An adapted model cast to float64 saves float64 adapters; they load back as float64, not rounded to float32."""
    model, x = adapted_net().double(), torch.randn(5, 16, dtype=torch.float64)
    boftlab.save_adapter(model, tmp_path)
    loaded = boftlab.load_adapter(fresh_net().double(), tmp_path)
    assert loaded.encoder[0].skew.dtype == torch.float64 and isinstance(loaded.encoder[0].skew, nn.Parameter)
    assert loaded.encoder[0].skew.requires_grad
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_kept_module_the_model_dtype_would_round_is_refused(tmp_path):
    model = adapted_net().double()
    with torch.no_grad():
        model.head.weight.add_(1e-3 * torch.randn_like(model.head.weight))  # values float32 cannot hold
    boftlab.save_adapter(model, tmp_path)
    assert_load_refused(tmp_path, r"loading would round 'head.weight' \(torch.float64 in the file, torch.float32 in")
    boftlab.save_adapter(adapted_net(), tmp_path / "fp32")  # float32 values fit a float64 model exactly
    loaded = boftlab.load_adapter(fresh_net().double(), tmp_path / "fp32")
    assert loaded.head.weight.dtype == torch.float64 and torch.equal(loaded.head.weight, adapted_net().head.weight)


# --- a torch.compile'd submodule: files hold the uncompiled names -----------------------------------------------
class Encoded(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16))
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.encoder(x))


def encoded(compiled):
    torch.manual_seed(0)
    model = Encoded()
    if compiled:
        model.encoder = torch.compile(model.encoder)  # names inside become encoder._orig_mod.*
    return model


def perturbed(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # the adapters and the module kept trainable
                p.add_(0.3 * torch.randn_like(p))
    return model


def uncompiled(model):
    """The same modules (and tensors) with the compile wrapper taken off, to compute outputs without compiling."""
    model.encoder = getattr(model.encoder, "_orig_mod", model.encoder)
    return model


@pytest.mark.parametrize("saved_compiled", [True, False], ids=["saved_compiled", "saved_plain"])
def test_a_compiled_submodule_saves_and_loads_under_its_uncompiled_names(tmp_path, saved_compiled):
    """Names carried '_orig_mod.' (encoder._orig_mod.0.skew), which no uncompiled model loaded — nor the other way."""
    model = perturbed(boftlab.adapt(encoded(saved_compiled), BOFTConfig(block_size=4), targets=nn.Linear,
                                    trainable=["2"]))  # encoder's last Linear, found by suffix inside the compiled part
    assert getattr(model, boftlab.model.TRAINABLE_ATTR) == ["encoder.2"]  # canonical, as files record it
    boftlab.save_adapter(model, tmp_path / "a")
    names = set(load_file(tmp_path / "a" / WEIGHTS_NAME))
    assert names == {"encoder.0.skew", "encoder.0.scale", "head.skew", "head.scale", "encoder.2.weight", "encoder.2.bias"}
    assert set(json.loads((tmp_path / "a" / CONFIG_NAME).read_text())["groups"][0]["targets"]) == {"encoder.0", "head"}
    loaded = boftlab.load_adapter(encoded(not saved_compiled), tmp_path / "a")
    assert sorted(map(boftlab.model.canonical_name, boftlab.adapter_layers(loaded))) == ["encoder.0", "head"]
    assert {boftlab.model.canonical_name(n) for n, p in loaded.named_parameters() if p.requires_grad} == (
        names | {"encoder.2.weight", "encoder.2.bias"})
    x = torch.randn(4, 16)
    expected = uncompiled(model)(x)
    torch.testing.assert_close(uncompiled(loaded)(x), expected, rtol=0, atol=0)


def test_hot_swap_checkpoint_and_peft_export_use_the_uncompiled_names(tmp_path):
    from boftlab.checkpoints import load_checkpoint, save_checkpoint

    model = perturbed(boftlab.adapt(encoded(True), BOFTConfig(block_size=4), targets=["encoder.0", "head"]))
    boftlab.save_adapter(model, tmp_path / "a")
    plain = boftlab.adapt(encoded(False), BOFTConfig(block_size=4), targets=["encoder.0", "head"])
    boftlab.load_adapter(plain, tmp_path / "a")  # hot swap into adapters of the same structure, uncompiled
    save_checkpoint(model, tmp_path / "c", step=3)
    again = boftlab.adapt(encoded(False), BOFTConfig(block_size=4), targets=["encoder.0", "head"])
    assert load_checkpoint(again, tmp_path / "c").step == 3
    x = torch.randn(4, 16)
    expected = uncompiled(model)(x)
    torch.testing.assert_close(plain(x), expected, rtol=0, atol=0)
    torch.testing.assert_close(again(x), expected, rtol=0, atol=0)
    boftlab.to_peft(model, tmp_path / "p")
    assert {k.split(".boft_")[0] for k in load_file(tmp_path / "p" / "adapter_model.safetensors")} == {
        "base_model.model.encoder.0", "base_model.model.head"}


def test_load_adapter_onto_a_model_in_eval_mode_builds_its_layers_in_eval_mode(tmp_path):
    torch.manual_seed(1)
    model = boftlab.adapt(Net(), BOFTConfig(block_size=4, dropout=0.5), targets=["encoder.0", "encoder.2"])
    boftlab.save_adapter(trained(model), tmp_path)
    plain = fresh_net().eval()
    boftlab.load_adapter(plain, tmp_path)
    assert not any(m.training for m in plain.modules())
    x = torch.randn(5, 16)
    assert torch.equal(plain(x), plain(x))  # dropout off, as the model's mode says
    training = boftlab.load_adapter(fresh_net().train(), tmp_path)
    assert all(m.training for m in training.modules())


MALFORMED = {  # name: (change to the embedded config, what the error says)
    "version 0": (lambda c: c.update(format_version=0), r"format version 0, .* reads versions 1..3; no boftlab writes"),
    "version -1": (lambda c: c.update(format_version=-1), r"format version -1, .* no boftlab writes"),
    "version True": (lambda c: c.update(format_version=True), r"format version True, .* no boftlab writes"),
    "version 4": (lambda c: c.update(format_version=4), r"format version 4, (.* upgrade|whose files carry)"),
    "no groups": (lambda c: c.pop("groups"), r"'groups' must be a non-empty list of adapter groups, got None"),
    "no config": (lambda c: c["groups"][0].pop("config"), r"groups\[0\] must be a dict with a 'config' dict"),
    "no family": (lambda c: c["groups"][0]["config"].pop("family"), r"'config' dict naming its 'family'"),
    "targets list": (lambda c: c["groups"][0].update(targets=["conv"]), r"groups\[0\]\['targets'\] must be a non-emp"),
    "info str": (lambda c: c["groups"][1]["targets"].update(conv="Conv2d"), r"\['conv'\] must be \{'type'"),
    "no type": (lambda c: c["groups"][1]["targets"]["conv"].pop("type"), r"\['conv'\] must be \{'type'"),
    "no shape": (lambda c: c["groups"][1]["targets"]["conv"].pop("weight_shape"), r"\['conv'\] must be \{'type'"),
    "twice": (lambda c: c["groups"].append(c["groups"][0]), r"is a target of groups\[0\] and groups\[2\]"),
    "trainable str": (lambda c: c.update(trainable="head"), r"'trainable' must be a list of module names, got 'head'"),
    "bad option": (lambda c: c["groups"][0]["config"].update(block_size="4"), r"invalid config in groups\[0\]: block_"),
}


@pytest.mark.parametrize("version", [1, 2, 3])
@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_adapter_files_of_every_format_version_are_refused_naming_the_file(tmp_path, case, version):
    """Format ≤ 2 files (no checksum) with a malformed config gave a raw KeyError / AttributeError / TypeError, and
    format_version 0 loaded."""
    change, message = MALFORMED[case]
    boftlab.save_adapter(adapted_net(), tmp_path)
    (tmp_path / CONFIG_NAME).unlink()

    def malform(config):
        config["format_version"] = version
        change(config)

    rewrite(tmp_path, change_config=malform, checksum=version >= 3)
    model = fresh_net()
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"the adapter file '.*{WEIGHTS_NAME}' .*{message}"):
        boftlab.load_adapter(model, tmp_path)
    assert_unchanged(before, snapshot(model))


def test_hot_swap_ignores_runtime_options_which_are_no_part_of_the_structure(tmp_path):
    """A file saved with path="input" (or kernel="torch") was refused as "another structure"; the swap keeps the
    model's own runtime options, which compute the same."""
    other = boftlab.adapt(fresh_net(), BOFTConfig(block_size=4, n_factors=2, path="input", kernel="torch"),
                          ["encoder.0", "encoder.2"], trainable=["head"])
    other = trained(boftlab.adapt(other, OFTConfig(block_size=4, path="weight"), ["conv"]))
    boftlab.save_adapter(other, tmp_path)
    model = adapted_net()
    skew = model.encoder[0].skew
    boftlab.load_adapter(model, tmp_path)
    assert model.encoder[0].skew is skew and torch.equal(skew, other.encoder[0].skew)
    assert model.encoder[0].config.path == "auto"  # the model's own
    x = torch.randn(5, 16)
    torch.testing.assert_close(model(x), other(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout", ["file", "directory"])
def test_saving_onto_a_symlink_writes_through_it_and_keeps_the_link(tmp_path, layout):
    """save_adapter onto a symlink replaced the link by a file, leaving its target with the old adapter."""
    target_dir, link_dir = tmp_path / "store", tmp_path / "links"
    target_dir.mkdir(), link_dir.mkdir()
    first = adapted_net()
    if layout == "file":
        target, link = target_dir / "a.safetensors", link_dir / "a.safetensors"
        boftlab.save_adapter(first, target)
        link.symlink_to(target)
        save_to = link
    else:
        boftlab.save_adapter(first, target_dir)
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            (link_dir / name).symlink_to(target_dir / name)
        target, link, save_to = target_dir / WEIGHTS_NAME, link_dir / WEIGHTS_NAME, link_dir
    second = trained(adapted_net())
    boftlab.save_adapter(second, save_to)
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert not [p for p in target.parent.iterdir() if p.name.endswith(".tmp")]
    for path in (save_to, target if layout == "file" else target_dir):
        loaded = boftlab.load_adapter(fresh_net(), path)
        assert all(torch.equal(v, second.state_dict()[k]) for k, v in boftlab.saving.adapter_state(loaded).items())


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_adapter_tensors_of_a_non_float_dtype_are_refused_naming_the_file(tmp_path, dtype):
    """A format-2 file (no checksum) with integer, bool or complex adapter tensors: a raw RuntimeError while loading
    (int, bool), or a silently dropped imaginary part (complex)."""
    boftlab.save_adapter(adapted_net(), tmp_path)
    (tmp_path / CONFIG_NAME).unlink()

    def cast(tensors):
        tensors["encoder.0.skew"] = tensors["encoder.0.skew"].to(dtype)

    rewrite(tmp_path, cast, lambda c: c.update(format_version=2), checksum=False)
    model = fresh_net()
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"the adapter file '.*' holds tensors of another kind of dtype .*"
                                         rf"\('encoder.0.skew', '{dtype}', 'torch.float32'\)"):
        boftlab.load_adapter(model, tmp_path)
    assert_unchanged(before, snapshot(model))


# --- save_merged: the plain model, streamed layer by layer -----------------------------------------------------------
def test_save_merged_writes_what_unwrap_leaves_and_changes_nothing(tmp_path):
    from safetensors.torch import load_model

    model = adapted_net()
    before = snapshot(model)
    file = boftlab.save_merged(model, tmp_path / "merged.safetensors")
    assert all(torch.equal(v, before["tensors"][k]) for k, v in model.state_dict().items()) and boftlab.adapter_layers(model)
    plain = fresh_net()
    load_model(plain, file)  # strict: exactly the plain model's names
    unwrapped = boftlab.unwrap(adapted_net())
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in unwrapped.state_dict().items())
    with safe_open(str(file), "pt") as f:
        assert f.metadata()["format"] == "pt"
        assert json.loads(f.metadata()["boftlab_merged_from"]) == boftlab.saving.adapter_config(model)


def test_save_merged_of_a_merged_model_and_in_training_mode_is_the_same_file(tmp_path):
    """A merged layer's base weights are the merged ones; the export of a model in training mode is the eval-mode
    merge (BOFT's multiplicative dropout never enters it)."""
    model = boftlab.adapt(fresh_net(), BOFTConfig(block_size=4, dropout=0.5), targets=["encoder.0"])
    trained(model).eval()
    boftlab.save_merged(model, tmp_path / "eval.safetensors")
    boftlab.save_merged(model.train(), tmp_path / "train.safetensors")
    boftlab.save_merged(boftlab.merge(model), tmp_path / "merged.safetensors")
    files = [(tmp_path / f"{name}.safetensors").read_bytes() for name in ("eval", "train", "merged")]
    assert files[0] == files[1] == files[2]


def test_save_merged_holds_one_layers_merge_at_a_time(tmp_path):
    """The peak memory of the export is that of one layer's merge, whatever the number of layers: each layer's merged
    weight is computed when written and freed before the next one."""
    from boftlab.bench import LiveTensorBytes

    torch.manual_seed(0)
    model = boftlab.adapt(nn.Sequential(*[nn.Linear(64, 64, bias=False) for _ in range(6)]), BOFTConfig(block_size=4),
                          targets=[str(i) for i in range(6)])
    with LiveTensorBytes() as one_layer:
        model[0].base_after(merge=True)
    with LiveTensorBytes() as export:
        boftlab.save_merged(model, tmp_path / "m.safetensors")
    assert 0 < export.peak <= one_layer.peak


def test_save_merged_directory_and_refusals(tmp_path):
    model = adapted_net()
    assert boftlab.save_merged(model, tmp_path / "d") == tmp_path / "d" / "model.safetensors"
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["model.safetensors"]  # no transformers config here
    with pytest.raises(ValueError, match="save_merged: the model has no boftlab adapters"):
        boftlab.save_merged(fresh_net(), tmp_path / "e")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="save_merged writes a directory, but .* is an existing file"):
        boftlab.save_merged(model, tmp_path / "file")
    (tmp_path / "x.safetensors").mkdir()
    with pytest.raises(ValueError, match="a directory of that name is in the way"):
        boftlab.save_merged(model, tmp_path / "x.safetensors")


def test_save_merged_refuses_a_base_weight_another_module_shares(tmp_path):
    model = boftlab.adapt(fresh_net(), BOFTConfig(block_size=4), targets=["encoder.0"])
    model.encoder[2].weight = model.encoder[0].base_layer.weight  # tied after adapt
    with pytest.raises(ValueError, match=r"'encoder.0.base_layer.weight' is the same tensor as \['encoder.2.weight'\]"):
        boftlab.save_merged(model, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


def test_a_failed_save_merged_keeps_the_previous_file(tmp_path):
    """Written atomically: a layer that cannot be merged half-way through leaves the earlier export as it was."""
    model = adapted_net()
    file = boftlab.save_merged(model, tmp_path / "m.safetensors")
    previous = file.read_bytes()
    with torch.no_grad():
        model.conv.skew.fill_(float("nan"))  # the last layer written: the others are on disk by then
    with pytest.raises(ValueError, match="save_merged: layer 'conv' cannot be folded .*NaN"):
        boftlab.save_merged(model, file)
    assert file.read_bytes() == previous and sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_save_merged_refuses_a_quantized_base_and_exports_it_dequantized(tmp_path):
    """A 4-bit base cannot hold a merged weight: refused with the way out, dequantize_bases, after which the export is
    what unwrap leaves."""
    pytest.importorskip("bitsandbytes")
    from test_base_layers import adapted as quantized_adapted

    model = quantized_adapted("boft", 4)
    with pytest.raises(ValueError, match=r"save_merged: layer 'query' has a quantized \(bitsandbytes\) base.*"
                                         r"dequantize_bases"):
        boftlab.save_merged(model, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()
    boftlab.dequantize_bases(model, torch.float32)
    boftlab.save_merged(model, tmp_path / "m.safetensors")
    expected = boftlab.unwrap(model).state_dict()
    assert load_file(tmp_path / "m.safetensors").keys() == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in load_file(tmp_path / "m.safetensors").items())
