"""Conv2d training-step benchmark: ``python -m boftlab.bench conv [--quick] [--batch N] [--repeats N]``.

One nn.Conv2d(c, c, 3, padding=1) on (batch, c, size, size) maps — the issue's setting is c = 256, 32×32, batch 16 —
one training step (forward, a scalar loss, backward to the adapter and the input), timed for every method in one
process:

* the frozen base conv (the floor: forward + input gradient);
* PEFT LoRA on the conv (a k×k conv to r channels, then a 1×1 conv back);
* PEFT LoHa and LoKr with ``use_effective_conv2d`` (a Tucker-style r × r × k × k core; ΔW assembled, then a second
  full conv);
* the FLoRA authors' scheme, implemented here as the baseline: y = conv(x, W) + conv(x, α·ΔW), ΔW assembled from
  the Tucker factors — two full convolutions;
* boftlab's tensor-core layer: ``auto`` (the path its FLOP estimate picks) and both paths forced.

Every rank is 8 (the FLoRA / tensor-core ranks are (8, 8, 3, 3)); all methods are timed round-robin, and the ratio
columns compare with the frozen conv and with PEFT LoRA measured in the same run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import MEMORY_METHOD, fwd_bwd, measure_methods, suite, with_peft
from .. import base_layers
from ..report import machine, markdown_table
from ..tensor_core import TensorCoreConfig, orthonormal_columns, resolve_ranks, tucker_delta

RANK = 8


class TwoConvFLoRA(nn.Module):
    """The authors' forward, as the baseline: y = conv(x, W) + conv(x, α · G ×₁ U₁ ⋯ ×₄ U₄), two full convs.

    Same parameters and initialisation as ``TensorCoreLayer``; only the forward differs.
    """

    def __init__(self, base: nn.Conv2d, ranks: int, alpha: float = 1.0) -> None:
        super().__init__()
        self.base, self.alpha = base, alpha
        shape = tuple(base.weight.shape)
        ranks_per_mode = resolve_ranks(shape, ranks, base_layers.mode_names(base), "Conv2d")
        factory = {"dtype": torch.float32, "device": base.weight.device}
        self.core = nn.Parameter(torch.zeros(ranks_per_mode, **factory))
        self.factors = nn.ParameterList(
            [nn.Parameter(orthonormal_columns(d, r, **factory)) for d, r in zip(shape, ranks_per_mode)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base
        delta = tucker_delta(self.core, list(self.factors), self.alpha).to(x.dtype)
        return base(x) + F.conv2d(x, delta, None, base.stride, base.padding, base.dilation, base.groups)


def _boftlab(path: str):
    def build(base: nn.Conv2d) -> nn.Module:
        return TensorCoreConfig(ranks=RANK, path=path).make_layer(base)

    return build


def _trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


METHODS = [
    ("frozen base conv", lambda base: base),
    (f"PEFT LoRA r={RANK}", lambda base: with_peft("LoraConfig", base, r=RANK)),
    (f"PEFT LoHa r={RANK} (effective conv)",
     lambda base: with_peft("LoHaConfig", base, r=RANK, use_effective_conv2d=True)),
    (f"PEFT LoKr r={RANK} (effective conv)",
     lambda base: with_peft("LoKrConfig", base, r=RANK, use_effective_conv2d=True)),
    (f"FLoRA two-conv scheme r={RANK}", lambda base: TwoConvFLoRA(base, RANK)),
    (f"boftlab tensor-core r={RANK} (auto)", _boftlab("auto")),
    (f"boftlab tensor-core r={RANK} (weight path)", _boftlab("weight")),
    (f"boftlab tensor-core r={RANK} (input path: factorised chain)", _boftlab("input")),
]


def _option(argv: list[str], name: str, default: int) -> int:
    if name not in argv:
        return default
    index = argv.index(name)
    if index + 1 >= len(argv) or not argv[index + 1].isdigit():
        raise ValueError(f"{name} needs a positive integer after it, got {argv[index + 1:index + 2]}")
    return int(argv[index + 1])


@suite("conv", "one Conv2d 3×3 training step: frozen, PEFT LoRA/LoHa/LoKr, FLoRA two-conv scheme, boftlab tensor-core")
def conv(argv: list[str]) -> str:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    quick = "--quick" in argv
    channels, size = (64, 16) if quick else (256, 32)
    batch = _option(argv, "--batch", 4 if quick else 16)
    repeats = _option(argv, "--repeats", 10)
    torch.manual_seed(0)
    base = nn.Conv2d(channels, channels, 3, padding=1).to(device).requires_grad_(False)
    x = torch.randn(batch, channels, size, size, device=device)
    calls, params = {}, {}
    for label, build in METHODS:
        module = build(base).to(device)
        if label.endswith("(auto)"):
            with torch.enable_grad():
                chosen = module.choose_path(x.detach().requires_grad_(True))
            label = label.replace("(auto)", f"(auto → {chosen})")
        calls[label], params[label] = fwd_bwd(module, x), _trainable(module)
    timings = measure_methods(calls, device, min_rounds=repeats, max_rounds=repeats)
    frozen, lora = timings["frozen base conv"].ms, timings[f"PEFT LoRA r={RANK}"].ms
    two_conv = next(t.ms for label, t in timings.items() if label.startswith("FLoRA two-conv"))
    rows = [[label, params[label], t.ms, t.ms / frozen, t.ms / lora, two_conv / t.ms, t.peak_mib]
            for label, t in timings.items()]
    setting = (
        f"Conv2d({channels}, {channels}, 3, padding=1), input ({batch}, {channels}, {size}, {size}), float32, "
        f"{device.type}; median of {repeats} rounds (each round times every method once) after a warm-up round. "
        f"Measured on: {machine()}. {MEMORY_METHOD[device.type]}."
    )
    header = ["method", "trainable params", "ms / step", "× frozen", "× PEFT LoRA", "two-conv ÷ this", "peak MiB"]
    return setting + "\n\n" + markdown_table(header, rows)
