"""save_adapter / load_adapter: exact round trips, strict validation that leaves the model untouched, atomicity."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import boftlab
from boftlab import BOFTConfig, OFTConfig
from boftlab.saving import CONFIG_NAME, WEIGHTS_NAME, read_adapter


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


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model, before):
    assert not boftlab.adapter_layers(model)
    assert {k: v for k, v in model.state_dict().items()}.keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


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


def test_saved_files(tmp_path):
    boftlab.save_adapter(adapted_net(), tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["format_version"] == 2 and config["boftlab_version"] == boftlab.__version__
    groups = {g["config"]["family"]: g for g in config["groups"]}
    assert groups["boft"]["config"]["block_size"] == 4 and groups["boft"]["config"]["n_factors"] == 2
    assert groups["boft"]["targets"]["encoder.0"] == {"type": "Linear", "weight_shape": [16, 16]}
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
    assert_untouched(other, before)


def rewrite(path, change_tensors=None, change_config=None):
    weights = path / WEIGHTS_NAME
    config, tensors = read_adapter(path)
    if change_tensors:
        change_tensors(tensors)
    if change_config:
        change_config(config)
    save_file(tensors, weights, metadata={"boftlab": json.dumps(config)})


@pytest.mark.parametrize(
    "change_tensors,change_config,message",
    [
        (lambda t: t.pop("encoder.2.skew"), None, r"missing tensors \['encoder.2.skew'\]"),
        (lambda t: t.update(extra=torch.zeros(1)), None, r"unexpected tensors \['extra'\]"),
        (lambda t: t.update({"conv.skew": torch.zeros(2, 2)}), None, "tensor shape mismatch"),
        (None, lambda c: c["groups"][0]["config"].update(family="dora"), r"unknown adapter family 'dora'.*\['boft', 'oft'"),
        (None, lambda c: c.update(format_version=99), "format version 99.*reads versions 1..2"),
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
    assert_untouched(model, before)


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
    assert_untouched(model, before)


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


def test_loading_into_an_adapted_model_is_refused(tmp_path):
    boftlab.save_adapter(adapted_net(), tmp_path)
    with pytest.raises(ValueError, match="already has boftlab adapters"):
        boftlab.load_adapter(adapted_net(), tmp_path)


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
    assert_untouched(model, before)
