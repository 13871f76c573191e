"""SURM training-step benchmark: ``python -m boftlab.bench surm [--quick]``.

One frozen nn.Linear(d, d) and 512 tokens; one training step (forward, a scalar loss, backward to the adapter and
the input) for every SURM structure (LoRA-style, W + S, and one adapter-style row), a dense trainable ΔW (full
fine-tuning of the update, d² numbers) and PEFT LoRA r=8, timed round-robin in one process (medians). Ratios are
to PEFT LoRA and to the dense ΔW of the same d. ``--quick``: d ∈ {64, 128}, 32 tokens (a smoke run).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import fwd_bwd, round_robin, suite, with_peft
from ..report import markdown_table
from .methods import LORA_RANK
from ..surm import SURMConfig

FULL = {"dims": (768, 2048, 4096), "tokens": 512, "repeats": 5}
QUICK = {"dims": (64, 128), "tokens": 32, "repeats": 5}


class DenseDelta(nn.Module):
    """y = W x + ΔW x + bias with a trainable dense ΔW (d_out × d_in), zero at init: the update full fine-tuning learns."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base_layer = base
        self.delta = nn.Parameter(torch.zeros_like(base.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + F.linear(x, self.delta)


def methods() -> list[tuple[str, callable]]:
    """(label, build(base) -> module) in table order."""
    surm = [
        ("SURM circulant", SURMConfig(structure="circulant")),
        ("SURM Toeplitz", SURMConfig(structure="toeplitz")),
        ("SURM Kronecker", SURMConfig(structure="kronecker")),
        ("SURM LDR r=1", SURMConfig(structure="ldr", displacement_rank=1)),
        ("SURM LDR r=4", SURMConfig(structure="ldr", displacement_rank=4)),
        ("SURM adapter circulant+GELU", SURMConfig(structure="circulant", mode="adapter")),
    ]
    return [
        (f"PEFT LoRA r={LORA_RANK}", lambda base: with_peft("LoraConfig", base, r=LORA_RANK)),
        ("dense ΔW", DenseDelta),
        *[(label, config.make_layer) for label, config in surm],
    ]


def trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


@suite("surm", "SURM structures vs a dense ΔW and PEFT LoRA r=8: one Linear(d, d) training step, CPU/GPU")
def run(argv: list[str]) -> str:
    sizes = QUICK if "--quick" in argv else FULL
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    header = ["method", "d", "trainable params", "fwd+bwd ms", "× PEFT LoRA r=8", "× dense ΔW"]
    rows = []
    for d in sizes["dims"]:
        torch.manual_seed(0)
        x = torch.randn(sizes["tokens"], d, device=device)
        calls, counts = {}, {}
        for label, build in methods():
            base = nn.Linear(d, d).to(device)
            module = build(base).to(device)
            base.weight.requires_grad_(False)  # frozen, as adapt() leaves it
            base.bias.requires_grad_(False)
            calls[label], counts[label] = fwd_bwd(module, x), trainable(module)
        ms = round_robin(calls, device, min_rounds=sizes["repeats"], max_rounds=sizes["repeats"])
        lora_ms, dense_ms = ms[f"PEFT LoRA r={LORA_RANK}"], ms["dense ΔW"]
        rows += [[label, d, counts[label], t, t / lora_ms, t / dense_ms] for label, t in ms.items()]
    note = (f"{sizes['tokens']} tokens, fp32, {device.type}; median of {sizes['repeats']} round-robin rounds (each "
            f"times every method once) after a warm-up round.")
    return note + "\n\n" + markdown_table(header, rows)
