"""to_peft / from_peft: PEFT loads boftlab's BOFT and OFT adapters with identical outputs, and back."""

import functools
import json

import peft
import pytest
import torch
from torch import nn

import boftlab
from boftlab import BOFTConfig, OFTConfig
from boftlab.bench.peft_patch import peft_boft_without_cuda
import helpers


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


perturb = functools.partial(helpers.perturb, scale=0.3)  # trained-looking adapters


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


class TokenNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.embed = nn.Embedding(40, 32)
        self.fc = nn.Linear(32, 4)

    def forward(self, ids):
        return self.fc(self.embed(ids))


@pytest.mark.parametrize("neumann_terms", [None, 5])
def test_oft_on_an_embedding_round_trips_through_peft(tmp_path, neumann_terms):
    """An Embedding's OFT becomes PEFT's oft_embedding_R: PEFT loads it with our outputs, and from_peft reads it back."""
    model = perturb(boftlab.adapt(TokenNet(), OFTConfig(block_size=8, neumann_terms=neumann_terms), ["embed", "fc"]))
    ids = torch.randint(0, 40, (3, 6))
    boftlab.to_peft(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(TokenNet(), tmp_path)
    assert "oft_embedding_R" in dict(theirs.named_modules())["base_model.model.embed"]._modules
    torch.testing.assert_close(theirs(ids), model(ids), rtol=1e-5, atol=1e-5)
    back = boftlab.from_peft(TokenNet(), tmp_path)
    torch.testing.assert_close(back(ids), model(ids), rtol=0, atol=0)


def test_export_refuses_base_layers_not_verified_against_peft(tmp_path):
    from transformers.pytorch_utils import Conv1D

    cases = ((TokenNet(), BOFTConfig(block_size=8), "embed"), (nn.Sequential(Conv1D(8, 16)), OFTConfig(block_size=8), "0"))
    for model, config, target in cases:
        boftlab.adapt(model, config, targets=[target])
        with pytest.raises(ValueError, match=r"PEFT exchange covers BOFT/OFT on nn.Linear and nn.Conv2d, and OFT "
                                             r"without a scale on nn.Embedding; '(embed|0)' is a (Embedding|Conv1D)"):
            boftlab.to_peft(model, tmp_path)
        assert not (tmp_path / "adapter_model.safetensors").exists()
    # and the other way: a PEFT OFT adapter of a Linear onto a model where that name is GPT-2's Conv1D
    peft.get_peft_model(TokenNet(), peft.OFTConfig(target_modules=["fc"], oft_block_size=8, r=0)).save_pretrained(
        tmp_path / "linear")
    gpt2_like = TokenNet()
    gpt2_like.fc = Conv1D(4, 32)
    with pytest.raises(ValueError, match=r"PEFT exchange covers .*; 'fc' is a Conv1D"):
        boftlab.from_peft(gpt2_like, tmp_path / "linear")
    assert not boftlab.adapter_layers(gpt2_like)


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


# --- exact or refused: what PEFT computes differently ----------------------------------------------------------------
def untouched(model, before):
    assert not boftlab.adapter_layers(model) and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("terms", [1, 2, 3, 4, 6])
def test_import_peft_oft_cayley_neumann(tmp_path, terms):
    """PEFT's n-term series: 1 and 2 terms match no boftlab series (refused); 3 terms is boftlab's 4-term one."""
    theirs = peft.get_peft_model(base(), peft.OFTConfig(target_modules=["fc1", "fc2"], oft_block_size=8, r=0,
                                                        num_cayley_neumann_terms=terms, init_weights=False))
    theirs.save_pretrained(tmp_path)
    x = inputs()
    model = base()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    if terms < 3:
        with pytest.raises(ValueError, match=rf"num_cayley_neumann_terms={terms} computes Q = I.*no boftlab series"):
            boftlab.from_peft(model, tmp_path)
        untouched(model, before)
        return
    ours = boftlab.from_peft(model, tmp_path)
    assert {layer.config.neumann_terms for layer in boftlab.adapter_layers(ours).values()} == {max(terms, 4)}
    assert_same(ours(*x), theirs(*x))


@pytest.mark.parametrize("terms", [2, 3, 4, 5])
def test_export_oft_cayley_neumann(tmp_path, terms):
    model = perturb(boftlab.adapt(base(), OFTConfig(block_size=8, neumann_terms=terms), targets=["fc1", "fc2"]))
    x = inputs()
    if terms < 4:
        with pytest.raises(ValueError, match=rf"neumann_terms={terms}: boftlab's series .* has no PEFT counterpart"):
            boftlab.to_peft(model, tmp_path)
        assert not tmp_path.joinpath("adapter_model.safetensors").exists()
        return
    boftlab.to_peft(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(base(), tmp_path)
    assert theirs.peft_config["default"].num_cayley_neumann_terms == terms
    assert_same(theirs(*x), model(*x))


def test_import_refuses_peft_boft_with_trained_biases(tmp_path):
    with peft_boft_without_cuda():
        config = peft.BOFTConfig(target_modules=["fc1"], boft_block_size=4, boft_n_butterfly_factor=2,
                                 bias="boft_only", init_weights=False)
        theirs = peft.get_peft_model(base(), config)
        with torch.no_grad():
            theirs.base_model.model.fc1.base_layer.bias.add_(1.0)  # what training the biases does
        theirs.save_pretrained(tmp_path)
    model = base()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="trained with bias='boft_only': PEFT trained and saved biases"):
        boftlab.from_peft(model, tmp_path)
    untouched(model, before)


def test_import_refuses_a_boft_file_with_fewer_factors_than_its_config(tmp_path):
    """What PEFT writes on a machine without its CUDA extension: one factor stored, the config still saying 2."""
    import json

    theirs = peft.get_peft_model(base(), peft.BOFTConfig(target_modules=["fc1", "conv"], boft_block_size=4,
                                                         boft_n_butterfly_factor=1, init_weights=False))
    theirs.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "boft_n_butterfly_factor": 2}))
    model = base()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"stores 1 butterfly factor\(s\) for 'conv'.*boft_n_butterfly_factor=2.*CUDA "
                                         r"extension.*set boft_n_butterfly_factor to 1"):
        boftlab.from_peft(model, tmp_path)
    untouched(model, before)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "boft_n_butterfly_factor": 1}))  # the fix
    x = inputs()
    assert_same(boftlab.from_peft(model, tmp_path)(*x), theirs(*x))


class Mixed(nn.Module):
    """Fan-ins 32 and 24: PEFT OFT with oft_block_size=16 keeps 16 on the first and adjusts to 12 on the second."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(32, 24), nn.Linear(24, 4)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def mixed():
    torch.manual_seed(5)
    return Mixed()


def test_import_peft_oft_with_a_block_size_peft_adjusted(tmp_path):
    with pytest.warns(UserWarning, match=r"Adjusted `oft_block_size` to \(12\)"):
        theirs = peft.get_peft_model(mixed(), peft.OFTConfig(target_modules=["fc1", "fc2"], oft_block_size=16, r=0,
                                                             init_weights=False))
    theirs.save_pretrained(tmp_path)
    x = torch.randn(3, 32)
    ours = boftlab.from_peft(mixed(), tmp_path)
    assert {n: layer.block_size for n, layer in boftlab.adapter_layers(ours).items()} == {"fc1": 16, "fc2": 12}
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_export_oft_by_number_of_blocks_on_layers_of_different_widths(tmp_path):
    model = perturb(boftlab.adapt(mixed(), OFTConfig(n_blocks=4), targets=["fc1", "fc2"]))  # b = 8 and 6
    x = torch.randn(3, 32)
    boftlab.to_peft(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(mixed(), tmp_path)
    torch.testing.assert_close(theirs(x), model(x), rtol=1e-5, atol=1e-5)


def peft_conv_oft_error(size):
    """max |PEFT OFT conv − base conv| for PEFT's identity adapter (zero init) on a size × size input."""
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1))
    image = torch.randn(2, 4, size, size)
    expected = conv(image)
    theirs = peft.get_peft_model(conv, peft.OFTConfig(target_modules=["0"], oft_block_size=4, r=0))
    return theirs, (theirs(image) - expected).abs().max().item()


def test_peft_conv_oft_is_refused_both_ways_because_peft_computes_it_wrongly(tmp_path):
    """PEFT's identity conv OFT equals the base conv only with a single patch position (3×3 input, 3×3 kernel)."""
    assert peft_conv_oft_error(3)[1] == 0.0
    theirs, error = peft_conv_oft_error(5)
    assert error > 5.0  # overlapping patches are summed back, not rotated
    theirs.save_pretrained(tmp_path / "theirs")
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"cannot import PEFT OFT on Conv2d \['0'\]. PEFT's OFT on Conv2d is not"):
        boftlab.from_peft(model, tmp_path / "theirs")
    untouched(model, before)
    ours = boftlab.adapt(model, OFTConfig(block_size=4), targets=["0"])
    image = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(ours(image), ours[0].base_layer(image), rtol=0, atol=0)  # boftlab's identity is exact
    with pytest.raises(ValueError, match=r"cannot export OFT on Conv2d '0' as PEFT OFT.*OFTConfig\(scale=True\)"):
        boftlab.to_peft(ours, tmp_path / "ours")


def test_exported_file_is_checksummed_and_a_flipped_bit_is_refused(tmp_path):
    from test_saving import flip_bit

    model = perturb(boftlab.adapt(base(), OFTConfig(block_size=8), targets=["fc1"]))
    boftlab.to_peft(model, tmp_path)
    flip_bit(tmp_path / "adapter_model.safetensors", 7)
    with pytest.raises(ValueError, match="PEFT adapter file .* is corrupted"):
        boftlab.from_peft(base(), tmp_path)


@pytest.mark.parametrize("neumann_terms", [None, 5])
@pytest.mark.parametrize("coft_eps", [6e-5, 10.0], ids=["projected", "inside-the-ball"])
def test_coft_both_ways(tmp_path, neumann_terms, coft_eps):
    config = OFTConfig(block_size=8, coft=True, coft_eps=coft_eps, neumann_terms=neumann_terms)
    model = perturb(boftlab.adapt(base(), config, targets=["fc1", "fc2"]))
    x = inputs()
    boftlab.to_peft(model, tmp_path / "out")
    assert_same(peft.PeftModel.from_pretrained(base(), tmp_path / "out")(*x), model(*x))
    theirs = peft.get_peft_model(base(), peft.OFTConfig(
        target_modules=["fc1"], oft_block_size=8, r=0, coft=True, eps=coft_eps,
        use_cayley_neumann=neumann_terms is not None, num_cayley_neumann_terms=neumann_terms or 5, init_weights=False,
    ))
    theirs.save_pretrained(tmp_path / "in")
    assert_same(boftlab.from_peft(base(), tmp_path / "in")(*x), theirs(*x))


# --- the PEFT versions the exchange is verified against --------------------------------------------------------------
@pytest.mark.parametrize("version", ["0.13.0", "0.17.1", "0.20.0", "0.22.0", "1.0.0"])
def test_export_refuses_a_peft_version_it_was_not_verified_against(tmp_path, monkeypatch, version):
    """PEFT 0.13 loads a BOFT export without error and computes outputs 2.01 away (154 relative): refused, naming
    the range, and nothing is written."""
    model = perturb(boftlab.adapt(base(), BOFTConfig(block_size=4, n_factors=2), targets=["fc1", "conv"]))
    monkeypatch.setattr(peft, "__version__", version)
    with pytest.raises(ValueError, match=rf"the installed PEFT, which would read this export, is PEFT {version}; "
                                         r"boftlab's exchange with PEFT is verified for PEFT >= 0\.21\.0, < 0\.22\.0"):
        boftlab.to_peft(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("version", ["0.15.2", "0.20.0", "0.22.0", None])
def test_import_refuses_a_file_from_a_peft_version_it_was_not_verified_against(tmp_path, version):
    model = perturb(boftlab.adapt(base(), OFTConfig(block_size=4), targets=["fc1"]))
    boftlab.to_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_version"] == peft.__version__  # what PEFT itself records
    config["peft_version"] = version
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    fresh = base()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    recorded = version or r"\(unrecorded: older than PEFT records\)"
    with pytest.raises(ValueError, match=rf"the PEFT that wrote .*adapter_config.json' is PEFT {recorded}; .*pip "
                                         r"install 'peft>=0\.21\.0,<0\.22\.0'"):
        boftlab.from_peft(fresh, tmp_path)
    untouched(fresh, before)


def test_dev_and_local_peft_versions_are_read_by_their_release():
    from boftlab.peft_interop import _release

    assert _release("0.21.2") == _release("0.21.2.dev0@abc123") == _release("0.21.2+local") == (0, 21, 2)
    assert _release("0.22.0rc1") == (0, 22, 0) and _release("garbage") == ()


# --- a PEFT-wrapped model is not a base model ---------------------------------------------------------------------
@pytest.mark.parametrize("targets", [nn.Linear, ["fc1"], ["fc2"]], ids=["Linear", "fc1", "fc2"])
def test_adapt_refuses_a_peft_wrapped_model_naming_the_way_out(targets):
    """adapt on a PEFT LoRA model wrapped PEFT's lora_A / lora_B (and froze them); targets=['fc1'] got a refusal
    that contradicted itself (a 'Linear' said not to be a supported nn.Linear)."""
    theirs = peft.get_peft_model(base(), peft.LoraConfig(target_modules=["fc1"], r=2))
    before = {k: v.clone() for k, v in theirs.state_dict().items()}
    trainable = {n for n, p in theirs.named_parameters() if p.requires_grad}
    with pytest.raises(ValueError, match=r"this model is wrapped by PEFT or holds its layers \('base_model' is a peft LoraModel\).*"
                                         r"merge_and_unload\(\).*unload\(\).*get_base_model\(\) alone still holds.*"
                                         r"boftlab.from_peft"):
        boftlab.adapt(theirs, BOFTConfig(block_size=4), targets=targets)
    untouched(theirs, before)
    assert {n for n, p in theirs.named_parameters() if p.requires_grad} == trainable
    with pytest.raises(ValueError, match=r"holds its layers \('fc1' is a peft Linear\)"):
        boftlab.adapt(theirs.get_base_model(), BOFTConfig(block_size=4), targets=targets)
    plain = theirs.merge_and_unload()  # the way out the message names
    assert sorted(boftlab.adapter_layers(boftlab.adapt(plain, BOFTConfig(block_size=4), targets=["fc1"]))) == ["fc1"]


def test_oft_with_a_scale_and_coft_is_refused_because_peft_boft_has_no_coft(tmp_path):
    """OFTConfig(scale=True) exports as PEFT BOFT, which has no COFT: PEFT's output differed by 1.26 before."""
    model = perturb(boftlab.adapt(base(), OFTConfig(block_size=8, scale=True, coft=True), targets=["fc1"]))
    with pytest.raises(ValueError, match=r"OFTConfig\(scale=True, coft=True\) exports as PEFT BOFT .* no COFT"):
        boftlab.to_peft(model, tmp_path)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("config", [BOFTConfig(block_size=4, dropout=0.1), OFTConfig(block_size=8, dropout=0.1)],
                         ids=["boft", "oft"])
def test_export_refuses_dropout_peft_computes_differently(tmp_path, config):
    model = boftlab.adapt(base(), config, targets=["fc1"])
    with pytest.raises(ValueError, match=r"dropout=0.1: PEFT's (boft_dropout|module_dropout) is another dropout"):
        boftlab.to_peft(model, tmp_path)
    assert not any(tmp_path.iterdir())
    for layer in boftlab.adapter_layers(model).values():  # what the message says to do
        layer.config.dropout = 0.0
    boftlab.to_peft(model, tmp_path)


class PaddedTokenNet(TokenNet):
    def __init__(self):
        super().__init__()
        self.embed.padding_idx = 0  # a trained padding row is not zero (the real MiniLM's has norm 0.77)


def test_oft_on_an_embedding_with_a_nonzero_padding_row_is_refused_both_ways(tmp_path):
    """boftlab keeps the padding row, PEFT rotates it: they differed by 0.058 at [PAD] on MiniLM."""
    ids = torch.tensor([[0, 3, 5]])
    model = perturb(boftlab.adapt(PaddedTokenNet(), OFTConfig(block_size=8), ["embed"]))
    with pytest.raises(ValueError, match=r"padding row \(padding_idx=0\) is not zero .* PEFT's OFT rotates it"):
        boftlab.to_peft(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    theirs = peft.get_peft_model(PaddedTokenNet(), peft.OFTConfig(target_modules=["embed"], oft_block_size=8, r=0,
                                                                   init_weights=False))
    theirs.save_pretrained(tmp_path / "in")
    plain = PaddedTokenNet()
    with pytest.raises(ValueError, match=r"cannot import OFT on Embedding 'embed': its padding row"):
        boftlab.from_peft(plain, tmp_path / "in")
    assert not boftlab.adapter_layers(plain)
    # a zero padding row (as nn.Embedding initialises it) exchanges exactly, padding token included
    zeroed = PaddedTokenNet()
    with torch.no_grad():
        zeroed.embed.weight[0] = 0
        theirs.base_model.model.embed.base_layer.weight[0] = 0
    ours = boftlab.from_peft(zeroed, tmp_path / "in")
    torch.testing.assert_close(ours(ids), theirs(ids), rtol=1e-5, atol=1e-5)


def test_from_peft_onto_a_model_in_eval_mode_builds_its_layers_in_eval_mode(tmp_path):
    theirs = peft.get_peft_model(base(), peft.OFTConfig(target_modules=["fc1"], oft_block_size=8, r=0,
                                                         module_dropout=0.5, init_weights=False))
    theirs.save_pretrained(tmp_path)
    ours = boftlab.from_peft(base().eval(), tmp_path)
    assert not any(m.training for m in ours.modules())
    x = inputs()
    assert_same(ours(*x), ours(*x), atol=0)


def test_from_peft_and_load_adapter_each_name_the_other_for_the_others_files(tmp_path):
    """from_peft on a boftlab directory said "this one is None"; load_adapter on a PEFT directory did not point to
    from_peft."""
    boftlab.save_adapter(perturb(boftlab.adapt(base(), OFTConfig(block_size=8), targets=["fc1"])), tmp_path / "ours")
    with pytest.raises(ValueError, match=r"holds a boftlab adapter .* boftlab.load_adapter\(model, path\)"):
        boftlab.from_peft(base(), tmp_path / "ours")
    peft.get_peft_model(base(), peft.OFTConfig(target_modules=["fc1"], oft_block_size=8, r=0)).save_pretrained(
        tmp_path / "theirs")
    plain = base()
    with pytest.raises(ValueError, match=r"holds a Hugging Face PEFT adapter \(peft_type='OFT'\).* boftlab.from_peft"):
        boftlab.load_adapter(plain, tmp_path / "theirs")
    assert not boftlab.adapter_layers(plain)


@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64])
def test_import_refuses_tensors_that_are_not_real_floats(tmp_path, dtype):
    from safetensors.torch import load_file, save_file

    config = peft.OFTConfig(target_modules=["fc1"], oft_block_size=8, r=0, init_weights=False)
    peft.get_peft_model(base(), config).save_pretrained(tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    save_file({k: v.to(dtype) for k, v in load_file(file).items()}, file)
    plain = base()
    with pytest.raises(ValueError, match=rf"not real floating-point .*'{dtype}'"):
        boftlab.from_peft(plain, tmp_path)
    assert not boftlab.adapter_layers(plain)


# --- SURM circulant <-> PEFT C3A -------------------------------------------------------------------------------------
class SquareNet(nn.Module):
    """Two square layers of different sizes (so the export needs C3A's block_size_pattern), a rectangular one and a
    head."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(32, 32)
        self.down = nn.Linear(32, 16)
        self.fc2 = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.down(torch.relu(self.fc1(x)))))))


def square_net():
    torch.manual_seed(5)
    return SquareNet()


def c3a_reference(layer, kernel):
    """y = base(x) + C(w) x / d_in by PEFT's own C3A functions (peft.tuners.c3a.utils), in the kernel's dtype."""
    from peft.tuners.c3a.utils import BlockCircularConvolution

    return lambda x: layer.base_layer(x) + BlockCircularConvolution.apply(x, kernel) / x.shape[-1]


def test_surm_circulant_export_is_peft_c3a_in_fp64(tmp_path):
    """Each exported layer equals PEFT's C3A math (its BlockCircularConvolution and get_circulant_fast, run in fp64)
    on the exported kernel, forward and merged ΔW. Orientation (C3A stores a first row, SURM a first column), α and
    C3A's 1/d_in are all inside the map."""
    from peft.tuners.c3a.utils import get_circulant_fast
    from safetensors.torch import load_file

    model = perturb(boftlab.adapt(square_net(), boftlab.SURMConfig(structure="circulant", alpha=0.7),
                                  targets=["fc1", "fc2"]).double())
    layers = boftlab.adapter_layers(model)
    assert all(layer.matrix.first_column.dtype == torch.float64 for layer in layers.values())
    boftlab.to_peft(model, tmp_path)
    kernels = load_file(tmp_path / "adapter_model.safetensors")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["block_size"], config["block_size_pattern"]) == ("C3A", 32, {"fc2": 16})
    for name, layer in layers.items():
        kernel = kernels[f"base_model.model.{name}.c3a_kernel"]
        d = layer.base_layer.in_features
        assert kernel.shape == (1, 1, d) and kernel.dtype == torch.float64
        x = torch.randn(5, d, dtype=torch.float64)
        torch.testing.assert_close(layer(x), c3a_reference(layer, kernel)(x), rtol=0, atol=1e-13)
        delta = layer.merged_weights()["weight"] - layer.base_layer.weight
        torch.testing.assert_close(delta, get_circulant_fast(kernel) / d, rtol=0, atol=1e-13)


def test_surm_circulant_export_loads_in_peft_c3a_with_identical_outputs(tmp_path):
    """End to end through PeftModel.from_pretrained; PEFT computes C3A in fp32, so fp32 is where they meet."""
    model = perturb(boftlab.adapt(square_net(), boftlab.SURMConfig(structure="circulant"), targets=["fc1", "fc2"],
                                  trainable=["head"]))
    boftlab.to_peft(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(square_net(), tmp_path)
    x = torch.randn(6, 32)
    torch.testing.assert_close(theirs(x), model(x), rtol=1e-5, atol=1e-6)


def test_peft_c3a_with_one_block_per_layer_imports_as_surm_circulant(tmp_path):
    config = peft.C3AConfig(block_size=32, block_size_pattern={"fc2": 16}, target_modules=["fc1", "fc2"],
                            init_weights="gaussian", modules_to_save=["head"])
    theirs = peft.get_peft_model(square_net(), config)
    with torch.no_grad():
        theirs.base_model.model.head.modules_to_save["default"].weight.mul_(2)  # a trained head travels too
    theirs.save_pretrained(tmp_path)
    ours = boftlab.from_peft(square_net(), tmp_path)
    assert {n: l.config.structure for n, l in boftlab.adapter_layers(ours).items()} == {"fc1": "circulant",
                                                                                         "fc2": "circulant"}
    x = torch.randn(6, 32)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)  # PEFT computes C3A in fp32
    # fp64: each imported layer equals PEFT's C3A math run in fp64 on the stored kernel (d = 32, 16: w/d is exact)
    from safetensors.torch import load_file

    kernels = load_file(tmp_path / "adapter_model.safetensors")
    for name, layer in boftlab.adapter_layers(ours.double()).items():
        x = torch.randn(5, layer.base_layer.in_features, dtype=torch.float64)
        kernel = kernels[f"base_model.model.{name}.c3a_kernel"].double()
        torch.testing.assert_close(layer(x), c3a_reference(layer, kernel)(x), rtol=0, atol=1e-13)


def test_c3a_exchange_refuses_what_one_circulant_cannot_hold(tmp_path):
    rectangular = boftlab.adapt(square_net(), boftlab.SURMConfig(structure="circulant"), targets=["down"])
    with pytest.raises(ValueError, match=r"cannot export 'down' \(32 -> 16\) as PEFT C3A: on a rectangular layer .* "
                                         r"Toeplitz, not circulant"):
        boftlab.to_peft(rectangular, tmp_path / "out")
    adapter_style = boftlab.adapt(square_net(), boftlab.SURMConfig(structure="circulant", mode="adapter"), ["fc1"])
    with pytest.raises(ValueError, match=r"mode='adapter'\) as PEFT C3A"):
        boftlab.to_peft(adapter_style, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    peft.get_peft_model(square_net(), peft.C3AConfig(block_size=8, target_modules=["fc1"])).save_pretrained(
        tmp_path / "blocks")
    plain = square_net()
    with pytest.raises(ValueError, match=r"block size 8 splits the 32 -> 32 layer into 4 × 4 independent circulant "
                                         r"blocks"):
        boftlab.from_peft(plain, tmp_path / "blocks")
    assert not boftlab.adapter_layers(plain)
