"""adapt / summary / merge / unmerge / unwrap on plain PyTorch models."""

import copy
import functools
import pickle
import re

import pytest
import torch
from torch import nn

import boftlab
from boftlab import BOFTConfig, OFTConfig
from boftlab.butterfly import BOFTLayer
import helpers


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.query = nn.Linear(16, 16)
        self.value = nn.Linear(16, 16)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)  # fan-in 36
        self.norm = nn.LayerNorm(16)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        for block in self.blocks:
            x = block.norm(x + block.value(torch.tanh(block.query(x))))
        return self.head(x)


perturb = functools.partial(helpers.perturb, scale=0.2)  # trained-looking adapters


def test_targets_by_suffix_regex_and_type():
    assert boftlab.model.match_targets(Net(), ["query"]) == ["blocks.0.query", "blocks.1.query"]
    assert boftlab.model.match_targets(Net(), r"blocks\.1\.(query|value)") == ["blocks.1.query", "blocks.1.value"]
    assert boftlab.model.match_targets(Net(), [nn.Conv2d]) == ["blocks.0.conv", "blocks.1.conv"]
    assert boftlab.model.match_targets(Net(), [re.compile(r".*0\.value"), "head"]) == ["blocks.0.value", "head"]


def test_adapt_freezes_everything_but_adapters_and_trainable_modules():
    model = boftlab.adapt(Net(), BOFTConfig(block_size=4), targets=["query", "value"], trainable=["head"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        f"blocks.{i}.{t}.{p}" for i in (0, 1) for t in ("query", "value") for p in ("skew", "scale")
    } | {"head.weight", "head.bias"}
    assert isinstance(model.blocks[0].query, BOFTLayer)


def test_adapt_is_identity_at_init():
    model = Net()
    x = torch.randn(5, 16)
    before = model(x)
    boftlab.adapt(model, BOFTConfig(block_size=4, n_factors=3), targets=[nn.Linear])
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-6)


def test_type_targets_skip_trainable_head():
    model = boftlab.adapt(Net(), OFTConfig(block_size=4), targets=[nn.Linear], trainable=["head"])
    assert isinstance(model.head, nn.Linear) and model.head.weight.requires_grad


@pytest.mark.parametrize("targets, trainable, named", [
    (["head", "query"], ["head"], "head"),  # the head named in both: it was silently left plain and fully trained
    (["query"], ["blocks.0"], "blocks.0.query"),  # inside a module kept trainable
    (r"blocks\.0\.(query|value)", ["blocks.0"], "blocks.0.query"),  # a pattern whose every match is kept trainable
])
def test_a_target_that_is_also_kept_trainable_is_refused_not_dropped(targets, trainable, named):
    """A module named as a target and kept fully trainable was silently left out of the targets: adapt returned
    without an adapter on it (with the last case, without any adapter). Only a pattern or a type that sweeps up a
    head keeps it plain (test_type_targets_skip_trainable_head)."""
    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"kept trainable.*{re.escape(repr(named))} \(inside .*A module is either "
                                         r"adapted or trained whole"):
        boftlab.adapt(model, OFTConfig(block_size=4), targets=targets, trainable=trainable)
    assert not boftlab.adapter_layers(model) and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_two_families_on_one_model():
    model = Net()
    boftlab.adapt(model, BOFTConfig(block_size=4, n_factors=2), targets=["query"])
    boftlab.adapt(model, OFTConfig(block_size=8), targets=["value"], trainable=["head"])
    families = {n: layer.family for n, layer in boftlab.adapter_layers(model).items()}
    assert families == {"blocks.0.query": "boft", "blocks.1.query": "boft", "blocks.0.value": "oft", "blocks.1.value": "oft"}
    # the second call kept the first call's adapters trainable
    assert all(p.requires_grad for p in model.blocks[0].query.adapter_parameters().values())


def test_summary_counts():
    model = boftlab.adapt(Net(), BOFTConfig(block_size=4, n_factors=2), targets=["query"], trainable=["head"])
    s = boftlab.summary(model)
    per_layer = 2 * 4 * 6 + 16  # m·k·b(b−1)/2 skew entries + the output scale
    assert s.adapter == 2 * per_layer and s.effective == 2 * per_layer
    assert s.other_trainable == 16 * 3 + 3
    assert s.trainable == s.adapter + s.other_trainable
    assert s.total == sum(p.numel() for p in model.parameters())
    assert s.by_layer_type == {"boft/Linear": {"layers": 2, "trainable": 2 * per_layer, "effective": 2 * per_layer, "base": 2 * 272}}
    assert f"trainable%: {100 * s.trainable / s.total:.4f}" in str(s)


def test_merge_unmerge_unwrap_model():
    model = boftlab.adapt(Net(), BOFTConfig(block_size=4), targets=["query", "value"])
    model = perturb(boftlab.adapt(model, OFTConfig(block_size=6, scale=True), targets=["conv"]))
    x = torch.randn(4, 16)
    adapted = model(x)
    boftlab.merge(model)
    torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="already merged"):
        boftlab.merge(model)
    boftlab.unmerge(model)
    torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-5)
    plain = boftlab.unwrap(model)
    assert not boftlab.adapter_layers(plain) and type(plain.blocks[0].query) is nn.Linear
    torch.testing.assert_close(plain(x), adapted, rtol=1e-5, atol=1e-5)


def test_targets_matching_nothing_lists_modules():
    with pytest.raises(ValueError, match=r"matched no module.*blocks\.0\.query \(Linear\)"):
        boftlab.adapt(Net(), BOFTConfig(), targets=["attention"])


def test_targets_of_unsupported_type_name_supported_types():
    with pytest.raises(ValueError, match=r"\['LayerNorm'\].*supported types: nn.Linear, transformers Conv1D, nn.Conv2d, nn.Embedding$"):
        boftlab.adapt(Net(), BOFTConfig(block_size=4), targets=["norm"])


def test_pattern_sweeping_up_an_unsupported_layer_is_refused_not_skipped():
    model = Net()
    with pytest.raises(ValueError, match=r"cannot adapt: blocks\.0\.norm \(LayerNorm\), blocks\.1\.norm .*Narrow"):
        boftlab.adapt(model, BOFTConfig(block_size=4), targets=r"blocks\.\d+\.(query|norm)")
    assert not boftlab.adapter_layers(model)
    # containers swept up by a pattern are fine: the layers inside them are what it means
    adapted = boftlab.adapt(Net(), BOFTConfig(block_size=4), targets=r"blocks\.\d+(\.query)?")
    assert sorted(boftlab.adapter_layers(adapted)) == ["blocks.0.query", "blocks.1.query"]


def test_failed_adapt_leaves_model_untouched():
    model = Net()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="cannot adapt module 'blocks.0.conv'"):
        boftlab.adapt(model, BOFTConfig(block_size=8), targets=["query", "conv"])
    assert not boftlab.adapter_layers(model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def test_adapting_an_adapted_layer_is_refused():
    model = boftlab.adapt(Net(), BOFTConfig(block_size=4), targets=["query"])
    with pytest.raises(ValueError, match="already carries a 'boft' adapter"):
        boftlab.adapt(model, OFTConfig(block_size=4), targets=["blocks.0.query"])


def test_bad_config_and_trainable():
    with pytest.raises(ValueError, match="config must be an adapter config"):
        boftlab.adapt(Net(), {"block_size": 4}, targets=["query"])
    with pytest.raises(ValueError, match="trainable='classifier' matched no module"):
        boftlab.adapt(Net(), BOFTConfig(block_size=4), targets=["query"], trainable=["classifier"])


# --- tied weights ------------------------------------------------------------------------------------------------------
class TiedLM(nn.Module):
    """An embedding and an output layer that share one weight tensor, as in most small LMs (tie_word_embeddings)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(40, 16)
        self.body = nn.Linear(16, 16)
        self.lm_head = nn.Linear(16, 40, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        return self.lm_head(torch.tanh(self.body(self.embed(ids))))


def test_adapting_a_tied_weight_is_refused_naming_the_tie_and_the_fixes():
    model = TiedLM()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    message = (r"cannot adapt 'lm_head': 'lm_head.weight' is the same tensor as 'embed.weight' \(tied weights\): "
               r"merging the adapter would rewrite the other module too. Leave it out of targets, or pass "
               r"adapt\(\.\.\., untie=True\)")
    with pytest.raises(ValueError, match=message):
        boftlab.adapt(model, BOFTConfig(block_size=4), targets=nn.Linear)  # a type sweeps the tied head in
    assert not boftlab.adapter_layers(model) and model.lm_head.weight is model.embed.weight
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    boftlab.adapt(model, BOFTConfig(block_size=4), targets=["body"])  # the untied layers adapt as before


def test_untie_adapts_a_copy_that_merges_without_touching_its_partner():
    model = TiedLM()
    ids = torch.randint(0, 40, (3, 7))
    embed = model.embed.weight.detach().clone()
    boftlab.adapt(model, BOFTConfig(block_size=4), targets=nn.Linear, untie=True)
    head = model.lm_head.base_layer
    assert head.weight is not model.embed.weight and torch.equal(head.weight, embed)  # its own copy, same values
    assert not head.weight.requires_grad and not model.embed.weight.requires_grad
    perturb(model)
    adapted = model(ids)
    boftlab.merge(model)
    assert torch.equal(model.embed.weight, embed) and not torch.equal(head.weight, embed)
    torch.testing.assert_close(model(ids), adapted, rtol=1e-5, atol=1e-5)
    plain = boftlab.unwrap(boftlab.unmerge(model))
    assert torch.equal(plain.embed.weight, embed)
    torch.testing.assert_close(plain(ids), adapted, rtol=1e-5, atol=1e-5)


def test_merge_and_unwrap_never_write_into_a_shared_tensor():
    """Tied after adapting (behind adapt's back): merge and unwrap refuse, and nothing changes."""
    model = perturb(boftlab.adapt(TiedLM(), BOFTConfig(block_size=4), targets=["body"]))
    model.embed.weight = model.body.base_layer.weight  # a (16, 16) table sharing the adapted layer's weight
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for call in (boftlab.merge, boftlab.unwrap):
        with pytest.raises(ValueError, match=r"'body.base_layer.weight' is the same tensor as 'embed.weight'.*"
                                             r"Nothing was changed"):
            call(model)
        assert isinstance(model.body, BOFTLayer) and not model.body.merged
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# --- disabled ---------------------------------------------------------------------------------------------------------
def mixed_model():
    """(a model with BOFT, SURM and tensor-core adapters moved off their initial values, a copy of its base)."""
    torch.manual_seed(0)
    base = Net()
    model = boftlab.adapt(copy.deepcopy(base), BOFTConfig(block_size=4), targets=["query"])
    boftlab.adapt(model, boftlab.SURMConfig(structure="circulant"), targets=["blocks.0.value"])
    boftlab.adapt(model, boftlab.TensorCoreConfig(ranks=3), targets=["blocks.1.value"])
    return perturb(model), base


def test_disabled_computes_the_base_model_and_restores_the_adapters():
    model, base = mixed_model()
    x = torch.randn(5, 16)
    adapted = model(x)
    assert not torch.allclose(adapted, base(x))
    with boftlab.disabled(model) as inside:
        assert inside is model
        assert torch.equal(model(x), base(x))
    assert torch.equal(model(x), adapted)


def test_disabled_nests_and_survives_exceptions():
    model, base = mixed_model()
    x = torch.randn(5, 16)
    adapted = model(x)
    with boftlab.disabled(model):
        with boftlab.disabled(model):
            assert torch.equal(model(x), base(x))
        assert torch.equal(model(x), base(x))  # the outer context still holds
    assert torch.equal(model(x), adapted)
    with pytest.raises(KeyError):
        with boftlab.disabled(model):
            raise KeyError("a failing step")
    assert torch.equal(model(x), adapted)
    assert all(layer.disabled_count == 0 for layer in boftlab.adapter_layers(model).values())


def test_disabled_on_a_subset_bypasses_only_those_adapters():
    model, _ = mixed_model()
    x = torch.randn(5, 16)
    with boftlab.disabled(model, targets=["query"]):
        for block in model.blocks:
            assert torch.equal(block.query(x), block.query.base_layer(x))
            assert not torch.allclose(block.value(x), block.value.base_layer(x))
    with pytest.raises(ValueError, match=r"targets=\['norm'\] selects no adapted layer; adapted layers: \["):
        with boftlab.disabled(model, targets=["norm"]):
            pass


def test_disabled_reference_pass_gives_the_adapters_no_gradient():
    """The DPO pattern: the policy's loss and a reference pass through the same model with the adapters off."""
    model, base = mixed_model()
    x = torch.randn(5, 16)
    with boftlab.disabled(model):
        reference = model(x)
    assert not reference.requires_grad  # no adapter took part; the base is frozen
    (model(x) - reference).square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_made_inside_disabled_is_refused_not_left_switched_off(how):
    """A copy made inside the context carried the bypass with it and had no context to end it: it computed the base
    model for good while claiming to be the adapted one (max |copy − adapted| 0.57 after the context closed). The copy
    is refused, naming where to make it; outside the context it is the adapted model."""
    model, _ = mixed_model()
    x = torch.randn(5, 16)
    adapted = model(x)
    copy_of = {"deepcopy": copy.deepcopy, "pickle": lambda m: pickle.loads(pickle.dumps(m))}[how]
    with boftlab.disabled(model, targets=["blocks.0.value"]):
        with pytest.raises(ValueError, match=r"copying this SURMLayer inside boftlab.disabled\(\.\.\.\): the copy would "
                                             r"compute the base layer for good.*copy outside the context"):
            copy_of(model)
    assert torch.equal(copy_of(model)(x), adapted)

def test_disabled_refuses_a_merged_model_and_a_merge_inside_it():
    model, _ = mixed_model()
    x = torch.randn(5, 16)
    boftlab.merge(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"disabled: 4 adapter\(s\) are merged .*call boftlab.unmerge\(model\) first"):
        with boftlab.disabled(model):
            pass
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(layer.disabled_count == 0 for layer in boftlab.adapter_layers(model).values())
    boftlab.unmerge(model)
    with boftlab.disabled(model):
        boftlab.merge(model)
        with pytest.raises(RuntimeError, match="was merged inside boftlab.disabled"):
            model(x)


# --- layers an adapter would not really replace --------------------------------------------------------------------
def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, state):
    return not boftlab.adapter_layers(model) and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


RECOMPUTED_WEIGHTS = {
    "weight_norm": lambda layer: nn.utils.parametrizations.weight_norm(layer),
    "orthogonal": lambda layer: nn.utils.parametrizations.orthogonal(layer),
    "legacy_weight_norm": lambda layer: nn.utils.weight_norm(layer),
    "spectral_norm": lambda layer: nn.utils.spectral_norm(layer),
    "prune": lambda layer: nn.utils.prune.l1_unstructured(layer, "weight", amount=0.3),
    "any_pre_hook": lambda layer: layer.register_forward_pre_hook(lambda module, args: (2 * args[0],)),
}


@pytest.mark.parametrize("recompute", RECOMPUTED_WEIGHTS.values(), ids=RECOMPUTED_WEIGHTS.keys())
def test_a_weight_recomputed_on_every_call_is_refused(recompute):
    """weight_norm, spectral_norm, pruning, any parametrization or pre-hook: the layer recomputes its weight (or input)
    on every call, which the adapter's forward and merge would bypass — the merged model computed the base model."""
    import torch.nn.utils.prune  # noqa: F401  (torch.nn.utils does not import it)

    model = Net()
    recompute(model.blocks[0].query)
    state = _state(model)
    with pytest.raises(ValueError, match=r"cannot adapt module 'blocks.0.query': this \w*Linear recomputes its weight "
                                         r"or input on every call .*remove_parametrizations.*prune.remove"):
        boftlab.adapt(model, BOFTConfig(block_size=4), targets=nn.Linear)
    assert _unchanged(model, state)


def test_a_weight_made_plain_again_adapts_and_merges_exactly():
    model = Net()
    nn.utils.parametrizations.weight_norm(model.blocks[0].query)
    nn.utils.parametrize.remove_parametrizations(model.blocks[0].query, "weight")
    perturb(boftlab.adapt(model, BOFTConfig(block_size=4), targets=["query"]))
    x = torch.randn(4, 16)
    adapted = model(x)
    torch.testing.assert_close(boftlab.unwrap(model)(x), adapted, rtol=1e-5, atol=1e-5)


def encoder_layer():
    torch.manual_seed(0)
    return nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)


class Scorer(nn.Module):
    """A hidden layer into torch's LinearCrossEntropyLoss, which reads ``loss.linear.weight`` itself."""

    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(16, 16)
        self.loss = nn.LinearCrossEntropyLoss(16, 5)


@pytest.mark.parametrize("build,targets,message", [
    (encoder_layer, nn.Linear, r"'self_attn.out_proj': its parent 'self_attn' is an nn.MultiheadAttention, which "
                               r"passes out_proj.weight to F.multi_head_attention_forward and never calls out_proj"),
    (encoder_layer, ["linear1", "linear2"], r"'linear1': its parent \(the model itself\) is an nn.TransformerEncoderLayer, "
                                            r"which in eval mode without autograd runs a fused fast path"),
    (lambda: nn.MultiheadAttention(16, 2), ["out_proj"], "nn.MultiheadAttention"),
    (lambda: nn.TransformerDecoderLayer(16, 2, 32), r".*\.out_proj", "nn.MultiheadAttention"),
    (lambda: nn.Transformer(16, 2, 1, 1, 32), ["linear1"], "nn.TransformerEncoderLayer"),
    (Scorer, nn.Linear, r"'loss.linear': its parent 'loss' is an nn.LinearCrossEntropyLoss"),
], ids=["encoder_layer_out_proj", "encoder_layer_fast_path", "attention", "decoder_layer", "transformer", "loss"])
def test_a_layer_whose_parent_reads_its_weight_directly_is_refused(build, targets, message):
    """MultiheadAttention never calls out_proj, TransformerEncoderLayer's fast path never calls linear1/linear2: an
    adapter there got no gradient, the eval forward bypassed it, and merge folded it in anyway."""
    model = build()
    state = _state(model)
    with pytest.raises(ValueError, match=r"cannot adapt module .*" + message + r".*Leave the layers inside"):
        boftlab.adapt(model, BOFTConfig(block_size=4), targets=targets)
    assert _unchanged(model, state)


def test_a_meta_model_is_refused_at_adapt():
    with torch.device("meta"):
        model = Net()
    with pytest.raises(ValueError, match=r"module 'blocks.0.query' \(2 targeted module\(s\)\) is on the meta device.*"
                                         r"to_empty\(device=\.\.\.\) and load the base weights.*then adapt"):
        boftlab.adapt(model, BOFTConfig(block_size=4), targets=["query"])
    assert not boftlab.adapter_layers(model) and all(p.is_meta for p in model.parameters())


def test_keeping_an_adapted_module_trainable_is_refused():
    """A second adapt with trainable=[an adapted layer] trained its frozen base weights; save_adapter wrote them and no
    fresh model loaded the file."""
    model = boftlab.adapt(Net(), BOFTConfig(block_size=4), targets=["query"])
    with pytest.raises(ValueError, match=r"trainable names module 'blocks.0.query', which carries a 'boft' adapter"):
        boftlab.adapt(model, OFTConfig(block_size=4), targets=["value"], trainable=["blocks.0.query"])
    with pytest.raises(ValueError, match=r"trainable names module 'blocks', which holds 2 adapted layer\(s\) "
                                         r"\('blocks.0.query', 'blocks.1.query'\)"):
        boftlab.adapt(model, OFTConfig(block_size=4), targets=["head"], trainable=["blocks"])
    assert sorted(boftlab.adapter_layers(model)) == ["blocks.0.query", "blocks.1.query"]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"blocks.{i}.query.{p}" for i in (0, 1) for p in ("skew", "scale")}


def test_trainable_swallowing_every_target_is_refused():
    """targets=nn.Linear with every Linear inside a trainable module returned 0 adapters and trained everything."""
    model = Net()
    with pytest.raises(ValueError, match=r"targets=Linear selects 5 module\(s\), all of them inside modules kept "
                                         r"trainable, so adapt would wrap nothing.*'blocks.0.query' \(inside 'blocks'\)"):
        boftlab.adapt(model, BOFTConfig(block_size=4), targets=nn.Linear, trainable=["blocks", "head"])
    assert not boftlab.adapter_layers(model) and not hasattr(model, boftlab.model.TRAINABLE_ATTR)


def test_a_target_named_explicitly_and_kept_trainable_is_refused():
    model = Net()
    with pytest.raises(ValueError, match=r"targets=\['query', 'head'\] names 1 module\(s\) that are also kept "
                                         r"trainable: 'head' \(inside 'head'\)"):
        boftlab.adapt(model, BOFTConfig(block_size=4), targets=["query", "head"], trainable=["head"])
    assert not boftlab.adapter_layers(model)
    # a sweep by type or pattern still leaves the head plain, as documented
    boftlab.adapt(model, BOFTConfig(block_size=4), targets=[nn.Linear], trainable=["head"])
    assert type(model.head) is nn.Linear and len(boftlab.adapter_layers(model)) == 4


def test_to_empty_on_an_adapted_model_moved_to_meta_is_refused():
    """The other way to a meta adapter: adapt, .to("meta"), to_empty gave the adapters uninitialised memory."""
    model = perturb(boftlab.adapt(Net(), BOFTConfig(block_size=4), targets=["query"]))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 16)
    expected = model(x)
    model.to("meta")
    with pytest.raises(ValueError, match=r"this BOFTConfig adapter is on the meta device: it has no values, so "
                                         r"materialising it \(model.to_empty\(\.\.\.\)\) would give it uninitialised"):
        model.to_empty(device="cpu")
    assert all(p.is_meta for p in model.blocks[0].query.parameters())
    model.load_state_dict(state, assign=True)  # the way to give it values
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_merge_refuses_a_base_weight_recomputed_since_adapt():
    """A parametrization added to the base layer after adapt would overwrite the merged weight on the next call."""
    model = perturb(boftlab.adapt(Net(), BOFTConfig(block_size=4), targets=["query"]))
    nn.utils.parametrizations.weight_norm(model.blocks[1].query.base_layer)
    state = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("query.weight")}
    with pytest.raises(ValueError, match=r"merge: layer 'blocks.1.query': cannot merge into the base layer: "
                                         r"this ParametrizedLinear recomputes its weight"):
        boftlab.merge(model)
    assert not any(layer.merged for layer in boftlab.adapter_layers(model).values())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_an_unsupported_class_named_like_a_supported_one_is_named_in_full():
    """PEFT's lora Linear was refused as "type(s) ['Linear'], none of which BOFTConfig supports; supported types:
    nn.Linear" — a message that contradicts itself."""
    class Linear(nn.Module):  # not an nn.Linear
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(16, 16))

    model = Net()
    model.head = Linear()
    with pytest.raises(ValueError, match=r"of type\(s\) \['(tests\.)?test_model\.test_an_unsupported_class_named_"
                                         r"like_a_supported_one_is_named_in_full\.<locals>\.Linear'\], none of which"):
        boftlab.adapt(model, BOFTConfig(block_size=4), targets=["head"])


class Checkpointed(nn.Module):
    """``inner`` run under torch.utils.checkpoint: its forward is recomputed during the backward."""

    def __init__(self, inner: nn.Module, reentrant: bool) -> None:
        super().__init__()
        self.inner, self.reentrant = inner, reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.utils.checkpoint.checkpoint(self.inner, x, use_reentrant=self.reentrant)


@pytest.mark.parametrize("after_the_block", [False, True], ids=["backward_inside", "backward_after"])
@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_disabled_under_gradient_checkpointing_recomputes_the_bypassed_pass_bypassed(reentrant, after_the_block):
    """A checkpointed region re-runs its forward during the backward, maybe after the disabled block has switched the
    adapters back on: that recomputation bypasses them too, as the pass it recomputes did. Before, a backward after
    the block gave the adapters gradients from a pass they took no part in (reentrant) or a CheckpointError
    (non-reentrant). The same model's adapted pass in the same backward still trains them, exactly."""
    adapted, base = mixed_model()
    model = Checkpointed(adapted, reentrant)
    x = torch.randn(5, 16, requires_grad=True)
    with boftlab.disabled(model):
        reference = model(x).square().sum()
        if not after_the_block:
            reference.backward()
    if after_the_block:
        reference.backward()
    assert all(p.grad is None for p in model.parameters())  # not one adapter took part
    y = x.detach().requires_grad_()
    Checkpointed(base, reentrant)(y).square().sum().backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=0, atol=0)  # the base model's own gradient

    policy, plain = Checkpointed(mixed_model()[0], reentrant), mixed_model()[0]  # equal adapters
    with boftlab.disabled(policy):  # the DPO pattern: a bypassed pass, an adapted pass, one backward after the block
        reference = policy(x).sum()
    (policy(x).sum() - reference).backward()
    plain(x).sum().backward()  # the adapted pass alone, not checkpointed: the bypassed pass adds nothing
    grads, expected = (dict(m.named_parameters()) for m in (policy.inner, plain))
    assert all(p.grad is not None for n, p in grads.items() if p.requires_grad)
    for name, p in grads.items():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, expected[name].grad, rtol=1e-6, atol=1e-7)
    kept = len(boftlab.contract.BYPASSED_REGIONS)
    with boftlab.disabled(model), torch.no_grad():  # no graph: nothing to recompute, nothing kept
        torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)
    assert len(boftlab.contract.BYPASSED_REGIONS) == kept


@pytest.mark.parametrize("mode", [False, True], ids=["eval", "train"])
def test_new_adapter_layers_follow_the_mode_of_the_module_they_wrap(mode):
    """adapt on a model in eval mode builds layers in eval mode: dropout stays off at inference."""
    model = Net().train(mode)
    boftlab.adapt(model, BOFTConfig(block_size=4, dropout=0.5), targets=["query"])
    layers = boftlab.adapter_layers(model)
    assert {layer.training for layer in layers.values()} == {mode}
    assert all(m.training == mode for m in model.modules())
    if not mode:
        perturb(model)
        x = torch.randn(4, 16)
        assert torch.equal(model(x), model(x))  # no dropout: the same output twice


def test_dequantize_bases_keeps_the_models_eval_mode():
    pytest.importorskip("bitsandbytes")
    from test_base_layers import QuantizedNet

    model = boftlab.adapt(QuantizedNet(4), BOFTConfig(block_size=4), targets=["query", "value"]).eval()
    boftlab.dequantize_bases(model, torch.float32)
    assert not any(m.training for m in model.modules())
