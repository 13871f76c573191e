"""The adapter contract itself: every family in FAMILIES, on every layer type it supports, answers the same questions
the same way — identity at init, merge/unmerge, the path protocol, save/load, summary, and the unsupported-layer error.

The configs are the families' own ``examples`` (declared next to each config class): a new family is covered as soon as
it registers, and a family that declares no examples fails at collection. ``tests/test_toy_family.py`` runs these same
functions on a family defined inside a test."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

import boftlab
from boftlab.base_layers import Conv1D, type_name
from boftlab.contract import FAMILIES, MERGED_KEY, PATHS, AdapterConfig
from helpers import LAYERS, canonical_configs, config_id, family_examples, perturb

#: (family, config): every example every registered family declares
CASES = family_examples()

def cases_by_layer(cases=None):
    for family, config in cases or CASES:
        for kind in config.supported_layers():
            yield pytest.param(config, kind, id=f"{config_id(config)}-{kind.__name__}")


def build(config: AdapterConfig, kind: type[nn.Module]):
    """(adapted layer in float64, its base layer, an input)."""
    torch.manual_seed(0)
    make_base, make_input = LAYERS[kind]
    base = make_base().double()
    x = make_input()
    return config.make_layer(base).double(), base, (x.double() if x.is_floating_point() else x)


def test_every_registered_family_is_covered_by_its_own_examples(monkeypatch):
    """Every family in FAMILIES has examples of its own class here; one that declares none is refused by name (it would
    fail the collection of every module that iterates FAMILIES, never be skipped)."""
    assert {family for family, _ in CASES} == set(FAMILIES)
    assert all(type(c) is FAMILIES[family] for family, c in CASES)

    class Undeclared(boftlab.OFTConfig):  # a subclass does not inherit its parent's examples
        pass

    monkeypatch.setitem(FAMILIES, "undeclared", Undeclared)
    with pytest.raises(ValueError, match=r"Undeclared \(family 'oft'\) declares no examples"):
        family_examples()


@pytest.mark.parametrize("config,kind", list(cases_by_layer()))
def test_identity_at_init(config, kind):
    layer, base, x = build(config, kind)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=1e-12)
    assert layer.n_trainable() > 0 and all(p.requires_grad for p in layer.adapter_parameters().values())


@pytest.mark.parametrize("config,kind", list(cases_by_layer()))
def test_merge_unmerge_round_trip(config, kind):
    layer, base, x = build(config, kind)
    perturb(layer)
    original = {k: v.detach().clone() for k, v in base.state_dict().items()}
    adapted = layer(x)
    assert not torch.allclose(adapted, base(x))  # the perturbed adapter changes the output
    layer.merge()
    assert layer.merged and not torch.equal(base.weight, original["weight"])
    torch.testing.assert_close(layer(x), adapted, rtol=1e-9, atol=1e-9)  # now the base layer alone
    torch.testing.assert_close(base(x), adapted, rtol=1e-9, atol=1e-9)
    layer.unmerge()
    for name, value in base.state_dict().items():
        torch.testing.assert_close(value, original[name], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(layer(x), adapted, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("config,kind", list(cases_by_layer()))
def test_merge_refuses_a_non_finite_adapter_and_leaves_the_base(config, kind, value):
    """One bad training step leaves NaN/inf in an adapter: merge refuses instead of writing it into the base."""
    layer, base, x = build(config, kind)
    perturb(layer)
    with torch.no_grad():
        for p in layer.adapter_parameters().values():
            p[(0,) * p.dim()] = value
    original = {k: v.detach().clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match=r"cannot merge: the new base tensor\(s\) would hold NaN/inf .*the adapter's "
                                         r"own tensors \[.+\] hold NaN/inf.*Nothing was changed"):
        layer.merge()
    assert not layer.merged
    assert all(torch.equal(v, original[k]) for k, v in base.state_dict().items())


@pytest.mark.parametrize("config,kind", list(cases_by_layer()))
def test_path_protocol(config, kind):
    """paths() in the contract's vocabulary; path_costs answers for exactly those; auto takes one of them; forcing any
    of them gives the same output."""
    layer, base, x = build(config, kind)
    perturb(layer)
    paths = layer.paths()
    assert paths and set(paths) <= set(PATHS)
    for training, needs_grad in ((False, False), (True, False), (True, True)):
        costs = layer.path_costs(x.shape, training, needs_grad)
        assert set(costs) == set(paths) and all(isinstance(c, int) and c > 0 for c in costs.values())
    assert layer.choose_path(x) in paths
    expected = layer(x)
    for path in paths:
        forced = type(config).from_dict({**config.to_dict(), "path": path})
        other = forced.make_layer(base).double()
        other.load_state_dict(layer.state_dict())
        assert other.choose_path(x) == path
        torch.testing.assert_close(other(x), expected, rtol=1e-9, atol=1e-9)
    for path in set(PATHS) - set(paths):
        message = rf"path='{path}' .*has the path\(s\) {re.escape(repr(paths))}\. Use path='auto'"
        with pytest.raises(ValueError, match=message):
            type(config).from_dict({**config.to_dict(), "path": path}).make_layer(base)


@pytest.mark.parametrize("config,kind", list(cases_by_layer()))
def test_forward_on_the_meta_device_gives_the_shape(config, kind):
    """A layer on the meta device (a model analysed without memory, as boftlab.counts does) computes shapes only, on
    every path, in train and eval mode; BOFT/OFT raised "unsupported scalarType" (autocast has no meta device)."""
    layer, base, x = build(config, kind)
    for path in layer.paths():
        forced = type(config).from_dict({**config.to_dict(), "path": path}).make_layer(copy.deepcopy(base))
        expected = forced(x).shape
        forced.to("meta")
        for training in (True, False):
            y = forced.train(training)(x.to("meta"))
            assert y.is_meta and y.shape == expected


def other_shapes(kind: type[nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
    """Inputs the base layer accepts besides a batch: unbatched (one row, one id, a conv input without its batch dim)
    and more leading dims."""
    if kind in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        return [x[0]]
    if kind is nn.Embedding:
        return [x[0, 0], x[1, 1], torch.stack([x, x.flip(0)])]  # a padding id, another id, (2, 3, 5)
    return [x[0], torch.stack([x, x.flip(0)]).unsqueeze(0)]  # (d,), (1, 2, 3, d)


@pytest.mark.parametrize("config,kind", list(cases_by_layer()))
def test_every_path_accepts_every_input_shape_the_base_layer_accepts(config, kind):
    """Unbatched inputs (a conv's (C, H, W), a Linear's (d,), one id) and any leading dims reach every path and give,
    on each, the base's output shape and the batched result."""
    layer, base, x = build(config, kind)
    perturb(layer)
    for path in layer.paths():
        forced = type(config).from_dict({**config.to_dict(), "path": path}).make_layer(base).double()
        forced.load_state_dict(layer.state_dict())
        for other in other_shapes(kind, x):
            out = forced(other)
            assert out.shape == base(other).shape
            torch.testing.assert_close(out, forced(other[None])[0], rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(out, layer(other), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("config,kind", [c for c in cases_by_layer() if c.values[1] is nn.Embedding])
def test_scale_grad_by_freq_gives_every_path_the_weight_paths_gradients(config, kind):
    """An Embedding with scale_grad_by_freq divides the gradient of a looked-up row by its id's count in the batch.
    The weight path looks the adapted table up with that flag (a plain Embedding holding the merged table); every
    other path gives the same adapter gradients, so the automatic path choice never changes them."""
    torch.manual_seed(0)
    base = nn.Embedding(20, 16, padding_idx=3, scale_grad_by_freq=True).double()
    ids = torch.tensor([[1, 1, 1, 2, 3], [2, 5, 3, 1, 7]])
    reference = config.make_layer(base).double()
    perturb(reference)
    upstream = torch.randn(2, 5, 16, dtype=torch.float64)
    grads = {}
    for path in reference.paths():
        layer = type(config).from_dict({**config.to_dict(), "path": path}).make_layer(base).double()
        layer.load_state_dict(reference.state_dict())
        (layer(ids) * upstream).sum().backward()
        grads[path] = {n: p.grad for n, p in layer.adapter_parameters().items()}
    assert len(grads) > 1
    for path, found in grads.items():
        for name, grad in found.items():
            torch.testing.assert_close(grad, grads["weight"][name], rtol=1e-9, atol=1e-12, msg=f"{path}: {name}")


class Net(nn.Module):
    def __init__(self, kind: type[nn.Module]) -> None:
        super().__init__()
        self.layer = LAYERS[kind][0]()
        self.head = nn.LazyLinear(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(x).flatten(1))


def net(kind: type[nn.Module]) -> tuple[Net, torch.Tensor]:
    torch.manual_seed(0)
    model = Net(kind)
    x = LAYERS[kind][1]()
    model(x)  # materialise the head
    return model, x


@pytest.mark.parametrize("config,kind", list(cases_by_layer()))
def test_save_load_and_summary(config, kind, tmp_path):
    model, x = net(kind)
    fresh = copy.deepcopy(model)
    boftlab.adapt(model, config, targets=["layer"], trainable=["head"])
    perturb(model.layer)
    expected = model(x)
    boftlab.save_adapter(model, tmp_path)
    loaded = boftlab.load_adapter(fresh, tmp_path)
    layer = boftlab.adapter_layers(loaded)["layer"]
    assert layer.family == config.family and layer.config == config
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)

    report = boftlab.summary(loaded)
    key = f"{config.family}/{kind.__name__}"
    assert report.by_family[config.family] == report.by_layer_type[key]
    assert report.by_family[config.family]["layers"] == 1
    assert report.adapter == report.by_family[config.family]["trainable"] == layer.n_trainable()
    assert report.effective == layer.n_effective()
    assert report.other_trainable == sum(p.numel() for p in loaded.head.parameters())
    assert f"| {key} | 1 | {layer.n_trainable():,} |" in str(report)


def quantized_base(bits: int):
    """A bitsandbytes 4-bit (set to repack as on an AVX512-BF16 CPU, whatever this CPU is) or 8-bit Linear 64 -> 64."""
    from test_base_layers import as_on_an_avx512_bf16_cpu, quantized

    return as_on_an_avx512_bf16_cpu(quantized(nn.Linear(64, 64), bits))


#: every base kind: the float layer types of LAYERS, and the quantized ones (a family that adapts nn.Linear adapts them)
BASES = {kind.__name__: (kind, *LAYERS[kind]) for kind in LAYERS} | {
    f"{bits}bit": (nn.Linear, lambda bits=bits: quantized_base(bits), lambda: torch.randn(3, 64)) for bits in (4, 8)}


def cases_by_base(cases=None):
    for family, config in cases or CASES:
        for name, (kind, _, _) in BASES.items():
            if kind in config.supported_layers():
                yield pytest.param(config, name, id=f"{config_id(config)}-{name}")


@pytest.mark.parametrize("config,base", list(cases_by_base()))
def test_a_training_step_after_an_evaluation_gives_every_trainable_tensor_its_gradient(config, base):
    """eval() and a forward without gradients (a validation pass), then a training step: every trainable tensor gets a
    non-zero gradient, the same as without the evaluation (bitsandbytes' CPU repacking once dropped it)."""
    grads = {}
    for evaluate_first in (False, True):
        torch.manual_seed(0)
        _, make_base, make_input = BASES[base]
        model = nn.Sequential(make_base(), nn.Flatten(1), nn.LazyLinear(2))
        x = make_input()
        model(x)  # materialise the head
        boftlab.adapt(model, config, targets=["0"], trainable=["2"])
        perturb(model[0])
        if evaluate_first:
            model.eval()
            with torch.no_grad():
                model(x)
            model.train()
        model(x).square().sum().backward()
        grads[evaluate_first] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads[True] and all(g is not None and g.abs().sum() > 0 for g in grads[True].values()), grads[True]
    for n, g in grads[False].items():
        torch.testing.assert_close(grads[True][n], g, rtol=0, atol=0)


@pytest.mark.parametrize("family,config", CASES, ids=[config_id(c) for _, c in CASES])
def test_unsupported_layer_is_refused_naming_the_supported_types(family, config):
    names = ", ".join(type_name(t) for t in config.supported_layers())
    with pytest.raises(ValueError, match=rf"{re.escape(config.display_name())} cannot adapt a LayerNorm; supported "
                                         rf"layer types: {names}\."):
        config.make_layer(nn.LayerNorm(16))
    model = nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16))
    with pytest.raises(ValueError, match=rf"none of which {re.escape(config.display_name())} supports; supported types: "
                                         rf"{re.escape(names)}$"):
        boftlab.adapt(model, config, targets=["1"])
    assert not boftlab.adapter_layers(model)  # nothing changed


@pytest.mark.parametrize("family,config", CASES, ids=[config_id(c) for _, c in CASES])
def test_config_round_trips_through_its_dict(family, config):
    data = config.to_dict()
    assert data["family"] == family and AdapterConfig.from_dict(data) == config


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
@pytest.mark.parametrize("config,kind", list(cases_by_layer()))
def test_whole_model_state_dict_round_trip(config, kind, merged):
    """A whole-model ``state_dict()`` (base weights included) loads into a freshly adapted model exactly, merged or
    not: the state records each layer's merged flag, so merged base weights never get the adapter applied twice.
    Adapter files are unaffected: ``adapter_state`` holds no flag."""
    model, x = net(kind)
    fresh = copy.deepcopy(model)
    boftlab.adapt(model, config, targets=["layer"], trainable=["head"])
    perturb(model.layer)
    if merged:
        boftlab.merge(model)
    expected = model(x)
    state = model.state_dict()
    assert state[f"layer.{MERGED_KEY}"].item() is merged and MERGED_KEY not in model.layer.adapter_state()
    boftlab.adapt(fresh, config, targets=["layer"], trainable=["head"])
    fresh.load_state_dict(state)
    assert fresh.layer.merged is merged
    torch.testing.assert_close(fresh(x), expected, rtol=0, atol=0)
    if merged:
        boftlab.unmerge(fresh), boftlab.unmerge(model)
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
        assert torch.equal(fresh.layer.base_layer.weight, model.layer.base_layer.weight)


def test_state_dict_without_merged_flags_is_missing_keys():
    """A strict load of a state_dict with base weights but no merged flag (not from this boftlab) names the keys."""
    model, x = net(nn.Linear)
    boftlab.adapt(model, canonical_configs()["boft"], targets=["layer"])
    state = {k: v for k, v in model.state_dict().items() if not k.endswith(f".{MERGED_KEY}")}
    with pytest.raises(RuntimeError, match=rf'Missing key\(s\) in state_dict: "layer.{MERGED_KEY}"'):
        model.load_state_dict(state)


@pytest.mark.parametrize("config,kind", list(cases_by_layer()))
def test_state_dict_holds_what_the_model_holds_and_a_plain_load_fails(config, kind, tmp_path):
    """state_dict() is the base tensors, the adapter's and the merged flag, sharing storage with the model (no merge, no
    copy), plus an empty tensor under each plain name: a plain model's load fails on its shape instead of keeping its
    own weight or re-initialising it. An adapted model loads it back (strict) and drops the guard; save_merged gives
    the plain model exactly what ``unwrap`` leaves."""
    model, x = net(kind)
    plain, again = copy.deepcopy(model), copy.deepcopy(model)
    boftlab.adapt(model, config, targets=["layer"], trainable=["head"])
    perturb(model.layer)
    state = model.state_dict()
    held = {f"layer.{k}": v for k, v in model.layer.named_parameters()}
    assert all(state[k].data_ptr() == v.data_ptr() for k, v in held.items())  # the model's own storage
    guard = {k: v for k, v in state.items() if k.startswith("layer.") and k not in held and k != f"layer.{MERGED_KEY}"}
    assert guard.keys() == {f"layer.{k}" for k, _ in model.layer.base_layer.named_parameters()}
    assert all(v.shape == (0,) for v in guard.values())
    message = r"size mismatch for layer.weight: copying a param with shape torch.Size\(\[0\]\)"
    with pytest.raises(RuntimeError, match=message):
        plain.load_state_dict(state, strict=False)
    boftlab.adapt(again, config, targets=["layer"], trainable=["head"])
    again.load_state_dict(state)
    torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)
    assert state.keys() == again.state_dict().keys()
    try:
        unwrapped = boftlab.unwrap(copy.deepcopy(model))
    except ValueError:  # a family or config that cannot merge: the export refuses too
        with pytest.raises(ValueError, match="save_merged: layer 'layer' cannot be folded into its base layer"):
            boftlab.save_merged(model, tmp_path / "m.safetensors")
        assert not (tmp_path / "m.safetensors").exists()
        return
    from safetensors.torch import load_model

    boftlab.save_merged(model, tmp_path / "m.safetensors")
    load_model(plain, tmp_path / "m.safetensors")  # strict: every name of the plain model, nothing else
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in unwrapped.state_dict().items())


def test_a_state_dict_with_merged_plain_copies_still_loads_into_an_adapted_model():
    """States written before the guard held the merged base tensors under the plain names too: an adapted model
    drops them, as it drops the guard."""
    model, x = net(nn.Linear)
    boftlab.adapt(model, canonical_configs()["boft"], targets=["layer"])
    perturb(model.layer)
    state = model.state_dict() | {"layer.weight": model.layer.merged_weights()["weight"], "layer.bias": model.layer.bias}
    again = copy.deepcopy(model)
    perturb(again.layer)
    again.load_state_dict(state)
    torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)


def test_state_dict_merges_nothing():
    """state_dict() never calls the family's merge: its cost is the module's, not d² per layer."""
    model, x = net(nn.Linear)
    boftlab.adapt(model, canonical_configs()["boft"], targets=["layer"])

    def refuse():
        raise AssertionError("state_dict() merged a layer")

    model.layer.merged_weights = refuse
    model.state_dict()


def _numpy_options():
    np = pytest.importorskip("numpy")
    from boftlab import BOFTConfig, OFTConfig, SURMConfig, TensorCoreConfig

    yield BOFTConfig, dict(block_size=np.int64(4), n_factors=np.int32(2), dropout=np.float64(0.1),
                           coft_eps=np.float32(0.5), neumann_terms=np.int64(5))
    yield OFTConfig, dict(n_blocks=np.int64(4), dropout=np.float32(0.25))
    yield SURMConfig, dict(structure="ldr", displacement_rank=np.int64(2), alpha=np.float64(0.5))
    yield SURMConfig, dict(structure="kronecker", kronecker_shape=(np.int64(2), np.int64(4)))
    yield TensorCoreConfig, dict(ranks=np.int64(4), alpha=np.float32(2.0))  # ranks=np.int64(4) was refused
    yield TensorCoreConfig, dict(ranks=(np.int64(4), np.int16(2)))


@pytest.mark.parametrize("config_class, options", list(_numpy_options()))
def test_every_config_accepts_numpy_integer_and_float_scalars_as_python_numbers(config_class, options):
    import json

    config = config_class(**options)
    def python(v):
        return tuple(map(python, v)) if isinstance(v, tuple) else v.item() if hasattr(v, "item") else v

    plain = config_class(**{k: python(v) for k, v in options.items()})
    assert config == plain
    assert json.loads(json.dumps(config.to_dict())) == plain.to_dict()  # saved as plain JSON numbers


# --- the additive merge: a family that defines delta_weight() gets merge and unmerge from the contract ---------------
class DenseDeltaConfig(AdapterConfig):  # family stays "": not registered in FAMILIES, so no other test sees it
    path = "auto"

    def supported_layers(self) -> tuple[type[nn.Module], ...]:
        return (nn.Linear, Conv1D, nn.Conv2d, nn.Embedding)

    def layer_class(self) -> type[boftlab.AdapterLayer]:
        return DenseDeltaLayer


class DenseDeltaLayer(boftlab.AdapterLayer):
    """W' = W + D with D a dense trainable tensor: the smallest additive family, defining no merge of its own."""

    def __init__(self, base_layer: nn.Module, config: AdapterConfig) -> None:
        super().__init__(base_layer, config)
        self.delta = nn.Parameter(torch.zeros(boftlab.base_layers.weight_shape(base_layer), dtype=torch.float64))

    def paths(self) -> tuple[str, ...]:
        return ("weight",)

    def delta_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.delta.to(dtype or self.delta.dtype)

    def adapted_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return boftlab.base_layers.run(self.base_layer, x, self.shifted_weight(self.delta.dtype))


@pytest.mark.parametrize("kind", [nn.Linear, Conv1D, nn.Conv2d, nn.Embedding], ids=type_name)
def test_an_additive_family_merges_and_unmerges_through_the_contract(kind):
    make_base, make_input = LAYERS[kind]
    torch.manual_seed(0)
    base, x = make_base().double(), make_input()
    x = x if kind is nn.Embedding else x.double()
    weight = base.weight.detach().clone()
    layer = DenseDeltaConfig().make_layer(base)
    with torch.no_grad():
        layer.delta.normal_()
    expected = layer(x)
    layer.merge()  # W + D in fp64, in the layer's own storage layout (a Conv1D's transposed)
    stored_delta = layer.delta.detach().T if kind is Conv1D else layer.delta.detach()
    assert torch.equal(base.weight, weight + stored_delta)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)
    layer.unmerge()
    torch.testing.assert_close(base.weight, weight, rtol=0, atol=1e-15)


def test_a_family_with_neither_delta_weight_nor_a_merge_of_its_own_refuses_to_merge_and_changes_nothing():
    class NoMergeLayer(DenseDeltaLayer):
        delta_weight = boftlab.AdapterLayer.delta_weight

    base = nn.Linear(16, 12)
    weight = base.weight.detach().clone()
    layer = NoMergeLayer(base, DenseDeltaConfig())
    with pytest.raises(NotImplementedError, match="NoMergeLayer cannot be merged into its base layer"):
        layer.merge()
    assert torch.equal(base.weight, weight) and not layer.merged
