"""to_peft / from_peft: PEFT loads boftlab's BOFT and OFT adapters with identical outputs, and back."""


import peft
import pytest
import torch
from torch import nn

import boftlab
from boftlab import BOFTConfig, OFTConfig
from boftlab.peft_interop import peft_boft_without_cuda


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(32, 32)
        self.conv = nn.Conv2d(4, 8, 2, padding=1, stride=2)  # fan-in 16
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x, image):
        return self.fc2(torch.relu(self.fc1(x))), self.conv(image)


def inputs():
    return torch.randn(3, 32), torch.randn(2, 4, 6, 6)


def base():
    torch.manual_seed(3)
    return Net()


def perturb(model):
    with torch.no_grad():
        for layer in boftlab.adapter_layers(model).values():
            for p in layer.adapter_parameters().values():
                p.add_(0.3 * torch.randn_like(p))
    return model


def assert_same(a, b, atol=1e-5):
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("n_factors", [1, 2, 3])
def test_boft_export_loads_in_peft_with_identical_outputs(tmp_path, n_factors):
    model = perturb(boftlab.adapt(base(), BOFTConfig(block_size=4, n_factors=n_factors), targets=["fc1", "conv"]))
    x = inputs()
    boftlab.to_peft(model, tmp_path)
    with peft_boft_without_cuda():
        theirs = peft.PeftModel.from_pretrained(base(), tmp_path)
        assert_same(theirs(*x), model(*x))


@pytest.mark.parametrize("neumann_terms", [None, 5])
def test_oft_export_loads_in_peft_oft(tmp_path, neumann_terms):
    config = OFTConfig(block_size=8, neumann_terms=neumann_terms)
    model = perturb(boftlab.adapt(base(), config, targets=["fc1", "fc2"]))
    x = inputs()
    boftlab.to_peft(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(base(), tmp_path)
    assert type(theirs.peft_config["default"]).__name__ == "OFTConfig"
    assert_same(theirs(*x), model(*x))


def test_trainable_head_travels_as_modules_to_save(tmp_path):
    model = perturb(boftlab.adapt(base(), BOFTConfig(block_size=4), targets=["fc1"], trainable=["fc2"]))
    with torch.no_grad():
        model.fc2.weight.add_(1.0)
    x = inputs()
    boftlab.to_peft(model, tmp_path)
    with peft_boft_without_cuda():
        theirs = peft.PeftModel.from_pretrained(base(), tmp_path)
        assert_same(theirs(*x), model(*x))
    back = boftlab.from_peft(base(), tmp_path)
    assert_same(back(*x), model(*x))


@pytest.mark.parametrize("n_factors", [1, 2])
def test_import_peft_boft(tmp_path, n_factors):
    with peft_boft_without_cuda():
        theirs = peft.get_peft_model(
            base(), peft.BOFTConfig(target_modules=["fc1", "conv"], boft_block_size=4, boft_n_butterfly_factor=n_factors, init_weights=False)
        )
        theirs.save_pretrained(tmp_path)
        x = inputs()
        expected = theirs(*x)
    ours = boftlab.from_peft(base(), tmp_path)
    assert_same(ours(*x), expected)
    assert {layer.n_factors for layer in boftlab.adapter_layers(ours).values()} == {n_factors}


def test_import_peft_oft(tmp_path):
    theirs = peft.get_peft_model(base(), peft.OFTConfig(target_modules=["fc1"], oft_block_size=8, r=0, init_weights=False))
    theirs.save_pretrained(tmp_path)
    x = inputs()
    ours = boftlab.from_peft(base(), tmp_path)
    assert_same(ours(*x), theirs(*x))


def test_export_refuses_what_peft_computes_differently(tmp_path):
    model = boftlab.adapt(Net(), BOFTConfig(block_size=4), targets=["fc1"])
    model = boftlab.adapt(model, OFTConfig(block_size=8), targets=["fc2"])
    with pytest.raises(ValueError, match="one config per adapter"):
        boftlab.to_peft(model, tmp_path)
    grouped = nn.Sequential(nn.Conv2d(4, 4, 2, groups=2))
    boftlab.adapt(grouped, BOFTConfig(block_size=4), targets=["0"])
    with pytest.raises(ValueError, match="groups=1"):
        boftlab.to_peft(grouped, tmp_path)


def test_import_refuses_other_peft_types_and_pickles(tmp_path):
    lora = peft.get_peft_model(base(), peft.LoraConfig(target_modules=["fc1"]))
    lora.save_pretrained(tmp_path / "lora")
    with pytest.raises(ValueError, match="this one is 'LORA'"):
        boftlab.from_peft(base(), tmp_path / "lora")
    boft = peft.get_peft_model(base(), peft.BOFTConfig(target_modules=["fc1"], boft_block_size=4, boft_n_butterfly_factor=1))
    boft.save_pretrained(tmp_path / "bin", safe_serialization=False)
    with pytest.raises(ValueError, match="never unpickles"):
        boftlab.from_peft(base(), tmp_path / "bin")


def test_peft_boft_without_cuda_puts_peft_back_even_after_an_error():
    from peft.tuners.boft import layer

    def state():
        return layer.get_fbd_cuda, layer.FastBlockDiag.apply, "apply" in vars(layer.FastBlockDiag)

    before = state()
    with pytest.raises(RuntimeError, match="inside"):
        with peft_boft_without_cuda():
            assert layer.get_fbd_cuda() is True and state() != before
            raise RuntimeError("inside")
    assert state() == before
