"""boftlab.checkpoints: a run resumed from a checkpoint reproduces the uninterrupted run exactly (fixed seeds, CPU)."""

import dataclasses
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import boftlab
from boftlab import BOFTConfig, OFTConfig
from boftlab.checkpoints import CHECKPOINT_NAME, decode, encode, load_checkpoint, save_checkpoint
from helpers import assert_unchanged, snapshot

N_STEPS, SPLIT = 6, 3


def path_second(built, path):
    """``load_checkpoint``'s (model, path, optimizer, scheduler) from ``build()``'s (model, optimizer, scheduler)."""
    model, *rest = built
    return (model, path, *rest)


def build():
    """A tiny model with two families, a trainable head, BOFT dropout (so the torch RNG matters), Adam + LambdaLR."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    boftlab.adapt(model, BOFTConfig(block_size=4, n_factors=2, dropout=0.25), targets=["0"], trainable=["4"])
    boftlab.adapt(model, OFTConfig(block_size=8, scale=True), targets=["2"])
    return (model, *make_optimizer(model))


def make_optimizer(model):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return optimizer, scheduler


def train(model, optimizer, scheduler, steps):
    """Data and dropout masks come from the global RNGs (torch, Python, NumPy), as in real loops."""
    losses = []
    for _ in range(steps):
        x = torch.randn(8, 16) + float(np.random.rand()) + random.random()
        target = torch.randint(0, 3, (8,))
        loss = nn.functional.cross_entropy(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    return losses


def seed_everything(seed):
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def run_with_resume(tmp_path, restore_optimizer=True):
    seed_everything(1)
    model, optimizer, scheduler = build()
    seed_everything(1)
    first = train(model, optimizer, scheduler, SPLIT)
    save_checkpoint(model, tmp_path, optimizer, scheduler, step=SPLIT, extra={"losses": first})
    del model, optimizer, scheduler  # "the job died"
    seed_everything(12345)  # a new process starts with other random states
    model, optimizer, scheduler = build()
    state = load_checkpoint(model, tmp_path, optimizer, scheduler)
    if not restore_optimizer:  # the control: keep the adapters and RNG, forget Adam's moments and the schedule
        optimizer, scheduler = make_optimizer(model)
    assert state.step == SPLIT
    return state.extra["losses"] + train(model, optimizer, scheduler, N_STEPS - state.step)


def uninterrupted():
    seed_everything(1)
    model, optimizer, scheduler = build()
    seed_everything(1)
    return train(model, optimizer, scheduler, N_STEPS)


def test_resumed_run_reproduces_losses_exactly(tmp_path):
    assert run_with_resume(tmp_path) == uninterrupted()  # bit-for-bit, not approximately


def test_resume_without_optimizer_state_differs(tmp_path):
    """The control showing the exact test can fail: Adam's moments and the LR schedule matter."""
    assert run_with_resume(tmp_path, restore_optimizer=False)[SPLIT:] != uninterrupted()[SPLIT:]



def test_a_trained_parameter_the_checkpoint_would_not_hold_is_refused(tmp_path):
    """Resume is exact only if the checkpoint holds every tensor the optimizer updates: a base weight unfrozen after
    adapt is refused by name, and no file is written."""
    model, optimizer, scheduler = build()
    model[2].base_layer.weight.requires_grad_(True)
    with pytest.raises(ValueError, match=r"save_checkpoint: 1 parameter\(s\) train .*\['2.base_layer.weight'\]"):
        save_checkpoint(model, tmp_path, optimizer, scheduler, step=0)
    assert not any(tmp_path.iterdir())

def test_checkpoint_is_one_safetensors_file_and_never_pickles(tmp_path, monkeypatch):
    model, optimizer, scheduler = build()
    train(model, optimizer, scheduler, 1)
    file = save_checkpoint(model, tmp_path, optimizer, scheduler, step=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME] and file == tmp_path / CHECKPOINT_NAME
    tensors = load_file(file)
    assert {"model.0.skew", "model.4.weight", "rng.torch"} <= set(tensors)
    assert any(k.startswith("optimizer.state.") and k.endswith("exp_avg_sq") for k in tensors)

    def no_pickle(*args, **kwargs):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", no_pickle)
    load_checkpoint(*path_second(build(), tmp_path))


def test_encode_decode_round_trip():
    tensors = {}
    tree = {0: {"step": torch.tensor(3.0), "m": torch.ones(2)}, "betas": (0.9, 0.99), "lr": float("inf"),
            "rng": np.arange(3, dtype=np.uint32), "none": None, "names": ["a", "b"]}
    back = decode(encode(tree, "t", tensors), tensors)
    assert set(back) == set(tree) and back["betas"] == (0.9, 0.99) and back["lr"] == float("inf")
    assert torch.equal(back[0]["m"], torch.ones(2)) and back[0]["step"].item() == 3.0
    assert back["rng"].dtype == np.uint32 and back["rng"].tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match=r"cannot checkpoint 't.f': a function"):
        encode({"f": lambda: 0}, "t", {})


def test_interrupted_checkpoint_keeps_previous(tmp_path, monkeypatch):
    model, optimizer, scheduler = build()
    previous = save_checkpoint(model, tmp_path, optimizer, scheduler, step=0).read_bytes()
    import boftlab.saving as saving

    def crash_half_way(tensors, filename, metadata=None):
        open(filename, "wb").write(previous[:64])
        raise OSError("disk full")

    monkeypatch.setattr(saving, "save_file", crash_half_way)
    train(model, optimizer, scheduler, 1)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(model, tmp_path, optimizer, scheduler, step=1)
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == previous
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_NAME]


def test_mismatched_resume_is_refused_and_changes_nothing(tmp_path):
    model, optimizer, scheduler = build()
    train(model, optimizer, scheduler, 1)
    save_checkpoint(model, tmp_path, optimizer, scheduler, step=1)

    other, other_opt, other_sched = build()
    boftlab.unwrap(other)
    boftlab.adapt(other, BOFTConfig(block_size=8), targets=["0"])
    other_opt = torch.optim.AdamW([p for p in other.parameters() if p.requires_grad])
    before = snapshot(other, other_opt, other_sched)
    with pytest.raises(ValueError, match="differ from this model's"):
        load_checkpoint(other, tmp_path, other_opt, other_sched)
    assert_unchanged(before, snapshot(other, other_opt, other_sched))

    fresh, fresh_opt, fresh_sched = build()
    sgd = torch.optim.SGD([p for p in fresh.parameters() if p.requires_grad], lr=0.1)
    before = snapshot(fresh, fresh_opt, fresh_sched)
    with pytest.raises(ValueError, match=r"optimizer is AdamW over parameters \[\['0.skew'.*this one is SGD"):
        load_checkpoint(fresh, tmp_path, sgd, fresh_sched)
    with pytest.raises(ValueError, match="holds a LambdaLR scheduler state; pass the scheduler"):
        load_checkpoint(fresh, tmp_path, fresh_opt, None)
    assert_unchanged(before, snapshot(fresh, fresh_opt, fresh_sched))


def test_resume_into_a_merged_model_is_refused_and_changes_nothing(tmp_path):
    """Copying a checkpoint's adapter values into merged adapters would leave the base weights holding the old ones."""
    model, optimizer, scheduler = build()
    train(model, optimizer, scheduler, 1)
    save_checkpoint(model, tmp_path, optimizer, scheduler, step=1)
    saved = {k: v.clone() for k, v in boftlab.saving.adapter_state(model).items()}

    other, other_opt, other_sched = build()
    train(other, other_opt, other_sched, 2)
    boftlab.merge(other)
    before = snapshot(other, other_opt, other_sched)
    with pytest.raises(ValueError, match=r"2 adapter\(s\) of this model are merged .* boftlab.unmerge\(model\) first"):
        load_checkpoint(other, tmp_path, other_opt, other_sched)
    assert_unchanged(before, snapshot(other, other_opt, other_sched))

    boftlab.unmerge(other)
    assert load_checkpoint(other, tmp_path, other_opt, other_sched).step == 1
    assert all(torch.equal(v, saved[k]) for k, v in boftlab.saving.adapter_state(other).items())


def test_checkpoint_with_format_1_adapter_names_resumes(tmp_path):
    """A checkpoint embeds its adapter config; one written with format 1's tensor-core names still resumes."""
    import json

    from safetensors import safe_open

    from boftlab.checkpoints import METADATA_KEY
    from boftlab.saving import safetensors_writer

    def adapted():
        torch.manual_seed(0)
        return boftlab.adapt(nn.Sequential(nn.Linear(8, 8)), boftlab.TensorCoreConfig(ranks=2, alpha=0.5), ["0"])

    file = save_checkpoint(adapted(), tmp_path, step=2)
    with safe_open(str(file), framework="pt") as f:
        meta, tensors = json.loads(f.metadata()[METADATA_KEY]), {k: f.get_tensor(k) for k in f.keys()}
    meta["adapter"]["format_version"] = 1
    options = meta["adapter"]["groups"][0]["config"]
    options["scale"] = options.pop("alpha")
    safetensors_writer(tensors, {METADATA_KEY: json.dumps(meta)})(file)
    assert load_checkpoint(adapted(), tmp_path, rng=False).step == 2


def test_non_finite_model_is_not_checkpointed(tmp_path):
    model, optimizer, scheduler = build()
    previous = save_checkpoint(model, tmp_path, optimizer, scheduler, step=0).read_bytes()
    with torch.no_grad():
        model[2].skew[0, 1, 2] = float("nan")
    message = r"save_checkpoint refuses .* non-finite values in 1 tensor\(s\): '2.skew' \(1 NaN"
    with pytest.raises(ValueError, match=message):
        save_checkpoint(model, tmp_path, optimizer, scheduler, step=1)
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == previous


def test_flipped_bit_in_a_checkpoint_is_refused_and_changes_nothing(tmp_path):
    from test_saving import flip_bit

    model, optimizer, scheduler = build()
    train(model, optimizer, scheduler, 1)
    file = save_checkpoint(model, tmp_path, optimizer, scheduler, step=1)
    flip_bit(file, 12345)
    fresh = build()
    before = snapshot(*fresh)
    with pytest.raises(ValueError, match=rf"training checkpoint file '{file}' is corrupted"):
        load_checkpoint(fresh[0], tmp_path, *fresh[1:])
    assert_unchanged(before, snapshot(*fresh))


def test_checkpoint_without_a_checksum(tmp_path):
    """Format 1 predates checksums and resumes without one; a format-2 checkpoint must carry one."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from boftlab.checkpoints import METADATA_KEY

    model, optimizer, scheduler = build()
    file = save_checkpoint(model, tmp_path, optimizer, scheduler, step=4)
    with safe_open(str(file), framework="pt") as f:
        meta, tensors = json.loads(f.metadata()[METADATA_KEY]), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, file, metadata={METADATA_KEY: json.dumps({**meta, "format_version": 1})})
    assert load_checkpoint(*path_second(build(), tmp_path)).step == 4
    save_file(tensors, file, metadata={METADATA_KEY: json.dumps(meta)})
    with pytest.raises(ValueError, match="says format version 2, whose files carry a checksum"):
        load_checkpoint(*path_second(build(), tmp_path))


def test_resume_into_a_model_of_another_dtype_is_refused(tmp_path):
    model, optimizer, scheduler = build()
    model.double()
    save_checkpoint(model, tmp_path, step=1, rng=False)
    fresh = build()
    before = snapshot(*fresh)
    message = r"dtype mismatch .*'0.skew', '\[2, 4, 6\] torch.float32', '\[2, 4, 6\] torch.float64'"
    with pytest.raises(ValueError, match=message):
        load_checkpoint(fresh[0], tmp_path, rng=False)
    assert_unchanged(before, snapshot(*fresh))


@pytest.mark.parametrize("extra", [
    {"ema.loss": torch.tensor(1.0), "ema": {"loss": torch.tensor(2.0)}},
    {1: torch.tensor(1.0), "1": torch.tensor(2.0)},
    {"a": [torch.tensor(1.0)], "a.0": torch.tensor(2.0), "a.0#2": torch.tensor(3.0)},
], ids=["dotted-vs-nested", "int-vs-str", "list-vs-suffix"])
def test_extra_keys_that_flatten_to_one_name_keep_their_own_tensors(tmp_path, extra):
    """Every tensor's dotted path is its name in the file; two paths that read the same once flattened (both reloaded
    as the later value before) each keep their own tensor."""
    model, optimizer, scheduler = build()
    save_checkpoint(model, tmp_path, optimizer, scheduler, step=1, extra=extra)
    back = load_checkpoint(model, tmp_path, optimizer, scheduler).extra

    def leaves(tree, path=()):  # [(path of (key, key type) pairs, value)], in order
        items = tree.items() if isinstance(tree, dict) else enumerate(tree)
        return [leaf for k, v in items for leaf in (leaves(v, (*path, (k, type(k)))) if isinstance(v, (dict, list))
                                                   else [((*path, (k, type(k))), v.item())])]

    assert leaves(back) == leaves(extra)


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(format_version=True), r"checkpoint format version True; this boftlab .* reads versions 1..2"),
    (lambda m: m.update(format_version=0), r"checkpoint format version 0; this boftlab .* reads versions 1..2"),
    (lambda m: m["adapter"].pop("groups"), r"adapter config in the training checkpoint '.*' is malformed: 'groups'"),
    (lambda m: m["adapter"]["groups"][0].update(targets=["0"]), r"malformed: groups\[0\]\['targets'\] must be"),
], ids=["version True", "version 0", "no groups", "targets list"])
def test_malformed_format_1_checkpoint_is_refused_naming_the_file(tmp_path, change, message):
    """A format-1 checkpoint carries no checksum: a malformed one gave a raw KeyError / AttributeError."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from boftlab.checkpoints import METADATA_KEY

    file = save_checkpoint(*path_second(build(), tmp_path), step=4)
    with safe_open(str(file), framework="pt") as f:
        meta, tensors = json.loads(f.metadata()[METADATA_KEY]), {k: f.get_tensor(k) for k in f.keys()}
    meta["format_version"] = 1
    change(meta)
    save_file(tensors, file, metadata={METADATA_KEY: json.dumps(meta)})
    fresh = build()
    before = snapshot(*fresh)
    with pytest.raises(ValueError, match=message):
        load_checkpoint(fresh[0], tmp_path, *fresh[1:])
    assert_unchanged(before, snapshot(*fresh))


def test_resume_ignores_runtime_options(tmp_path):
    """path and kernel choose how a layer computes, not what: a checkpoint resumes into layers with other ones."""
    model, optimizer, scheduler = build()
    save_checkpoint(model, tmp_path, optimizer, scheduler, step=2)
    fresh = build()
    for layer in boftlab.adapter_layers(fresh[0]).values():
        layer.config = dataclasses.replace(layer.config, path="weight")
    assert load_checkpoint(fresh[0], tmp_path, *fresh[1:]).step == 2


@pytest.mark.parametrize("call", ["save_checkpoint", "load_checkpoint", "save_adapter", "load_adapter", "save_merged"])
def test_every_file_function_takes_the_model_first_and_names_the_old_order(tmp_path, call):
    """One argument order, (model, path, ...): the old save_checkpoint(path, model) is a ValueError that says so."""
    model, optimizer, scheduler = build()
    save_checkpoint(model, tmp_path / "c", optimizer, scheduler)
    boftlab.save_adapter(model, tmp_path / "c")
    function = getattr(boftlab, call)
    with pytest.raises(ValueError, match=rf"{call} takes \(model, path, \.\.\.\).*given the path '.*c' first and the "
                                         rf"Sequential second; call {call}\(model, '.*c', \.\.\.\)"):
        function(str(tmp_path / "c"), model)
    with pytest.raises(ValueError, match=rf"{call}\(model, path, \.\.\.\): path must be a str or os.PathLike, got 3"):
        function(model, 3)
    with pytest.raises(ValueError, match=rf"{call}\(model, path, \.\.\.\): model must be an nn.Module, not a dict"):
        function({}, tmp_path / "c")
