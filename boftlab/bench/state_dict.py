"""What saving costs: ``python -m boftlab.bench state_dict merged_export [--quick]``.

``state_dict``: one ``model.state_dict()`` call — what every ``Trainer`` checkpoint, ``accelerate.save_state`` or EMA
pays — on a Llama config (the issue's: hidden 1024, 4 layers, transformers' defaults for the rest; random weights),
for the plain model, PEFT LoRA and boftlab BOFT, adapters on all seven projections and on q/v only; all timed
round-robin in one process (medians). Bytes are the state's tensors (``numel × element size``) over the plain model's;
peak MiB is what the call allocates (``MEMORY_METHOD``). ``merged_export``: ``boftlab.save_merged`` of the BOFT model
(all seven projections) to a temporary directory — its time and peak memory, next to one layer's merge alone.
``--quick``: hidden 256 (a smoke run).
"""

from __future__ import annotations

import copy
import tempfile
import torch
from torch import nn

from . import MEMORY_METHOD, measure_methods, peak_memory_mib, round_robin, suite, with_peft
from .methods import BLOCK_SIZE, LORA_RANK
from .. import model as boftlab_model
from ..report import markdown_table, ratio
from ..butterfly import BOFTConfig

ALL_SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QV = ["q_proj", "v_proj"]
#: the issue's model: LlamaConfig's defaults (vocab 32000, MLP 11008, 32 heads) at hidden 1024 with 4 layers
ISSUE_LLAMA = dict(hidden_size=1024, num_hidden_layers=4)
QUICK_LLAMA = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4, vocab_size=1000)


def build_llama(options: dict, device: torch.device) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**options))
    return model.to(torch.bfloat16 if device.type == "cuda" else torch.float32).eval()


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(v.numel() * v.element_size() for v in state.values())


def methods(base: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """label -> (which targets, its own copy of ``base``): plain, then LoRA and BOFT on all seven projections and on
    q/v."""
    found = {"plain model": ("–", copy.deepcopy(base))}
    for name, targets in (("all seven", ALL_SEVEN), ("q/v", QV)):
        lora = with_peft("LoraConfig", copy.deepcopy(base), targets, r=LORA_RANK)
        boft = boftlab_model.adapt(copy.deepcopy(base), BOFTConfig(block_size=BLOCK_SIZE, n_factors=2), targets)
        found[f"PEFT LoRA r={LORA_RANK}, {name}"] = (name, lora)
        found[f"boftlab BOFT m=2 b={BLOCK_SIZE}, {name}"] = (name, boft)
    return found


def _options(argv: list[str]) -> tuple[dict, torch.device]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return (QUICK_LLAMA if "--quick" in argv else ISSUE_LLAMA), device


def _describe(options: dict, device: torch.device) -> str:
    dtype = "bf16" if device.type == "cuda" else "fp32"
    return (f"LlamaForCausalLM, LlamaConfig({options}) otherwise transformers' defaults, random weights, "
            f"{device.type}, {dtype}")


@suite("state_dict", "one state_dict() call: bytes and time against the plain model and PEFT LoRA")
def run_state_dict(argv: list[str]) -> str:
    options, device = _options(argv)
    models = methods(build_llama(options, device))
    plain_bytes = state_bytes(models["plain model"][1].state_dict())
    timings = measure_methods({label: model.state_dict for label, (_, model) in models.items()}, device)
    lora = {targets: timings[label].ms for label, (targets, _) in models.items() if label.startswith("PEFT LoRA")}
    rows = []
    for label, (targets, model) in models.items():
        state = model.state_dict()
        rows.append([label, len(state), state_bytes(state) / 2**20, state_bytes(state) / plain_bytes,
                     timings[label].ms, ratio(timings[label].ms, lora.get(targets)), timings[label].peak_mib])
        del state
    header = ["model", "tensors", "state MiB", "× plain bytes", "ms / call", "× LoRA time (same targets)",
              "peak MiB of the call"]
    return (f"{_describe(options, device)}; state_dict() timed round-robin over all models (medians). "
            f"{MEMORY_METHOD[device.type]}.\n\n{markdown_table(header, rows)}\n")


@suite("merged_export", "boftlab.save_merged: time and peak memory of the streamed merged export")
def run_merged_export(argv: list[str]) -> str:
    from ..saving import save_merged

    options, device = _options(argv)
    model = boftlab_model.adapt(build_llama(options, device), BOFTConfig(block_size=BLOCK_SIZE, n_factors=2), ALL_SEVEN)
    layers = boftlab_model.adapter_layers(model)
    first_block = {name: layer for name, layer in layers.items() if ".layers.0." in name}  # every shape, once
    one_merge = {name: peak_memory_mib(lambda layer=layer: layer.base_after(merge=True), device)
                 for name, layer in first_block.items()}
    largest = max(one_merge, key=one_merge.get)
    weight = layers[largest].base_layer.weight
    adapted_mib = sum(layer.base_layer.weight.numel() * layer.base_layer.weight.element_size()
                      for layer in layers.values()) / 2**20
    with tempfile.TemporaryDirectory() as directory:
        export = lambda: save_merged(model, directory)  # noqa: E731
        ms = round_robin({"save_merged": export}, device, min_rounds=3, max_rounds=5)["save_merged"]
        peak = peak_memory_mib(export, device)
    rows = [["save_merged (all seven projections)", ms, peak, one_merge[largest],
             weight.numel() * weight.element_size() / 2**20, adapted_mib]]
    header = ["call", "ms", "peak MiB", f"peak MiB of the costliest single merge ({largest})",
              "that layer's weight MiB", "all adapted weights MiB"]
    return (f"{_describe(options, device)}; BOFT m=2 b={BLOCK_SIZE} on {ALL_SEVEN}. The export computes one layer's "
            f"merge at a time: its peak is that of the costliest layer's merge (fp64 intermediates), not of "
            f"all adapted weights. {MEMORY_METHOD[device.type]}.\n\n{markdown_table(header, rows)}\n")
