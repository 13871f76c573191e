"""ATen ops per training step: ``python -m boftlab.bench ops``.

In eager mode every ATen op pays the dispatcher (argument parsing, dispatch keys, autograd bookkeeping), on a GPU as
on a CPU, before any arithmetic; on a GPU each op that computes also launches a kernel. This suite counts, with a
``TorchDispatchMode`` (``OpCounter``), the ops one training step of an adapted ``nn.Linear(d, d)`` dispatches —
forward, then backward from a given output gradient to the adapter's parameters and the input — all of them, and
separately those that compute (launch a kernel): every op except the ones in ``NO_KERNEL_OPS``, which only make a new
tensor header over existing storage (views) or allocate without writing. A warm-up step runs first, outside the
count, so one-off work (caches, lazy initialisation) is not counted. The counts are deterministic for a given torch
and PEFT version: tests may assert them, never times.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from typing import Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from . import suite
from ..report import goals_table, markdown_table
from .methods import all_methods

#: ATen ops (overload packets) that launch no kernel: views and aliases (a new header over the same storage) and bare
#: allocations (memory, nothing written)
NO_KERNEL_OPS = frozenset({
    "view", "_unsafe_view", "_reshape_alias", "reshape", "view_as", "permute", "transpose", "t", "expand",
    "expand_as", "as_strided", "slice", "select", "unsqueeze", "squeeze", "alias", "detach", "narrow", "split",
    "split_with_sizes", "unbind", "chunk", "diagonal", "unfold", "view_as_real", "view_as_complex", "real", "imag",
    "conj", "_conj", "_neg_view", "lift_fresh", "empty", "empty_like", "empty_strided", "new_empty",
    "new_empty_strided",
})


class OpCounter(TorchDispatchMode):
    """While active, counts every ATen op dispatched, by overload packet name (``aten.mm.default`` -> "mm")."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        """Every op dispatched."""
        return sum(self.ops.values())

    @property
    def kernels(self) -> int:
        """The ops that compute: all but ``NO_KERNEL_OPS``."""
        return sum(n for op, n in self.ops.items() if op not in NO_KERNEL_OPS)


def count_ops(fn: Callable[[], object], warmup: int = 1) -> OpCounter:
    """The ops of one call of ``fn``, after ``warmup`` uncounted calls."""
    for _ in range(warmup):
        fn()
    with OpCounter() as counter:
        fn()
    return counter


def layer_step(module: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """Forward of ``module`` on ``x``, backward from a fixed output gradient to its trainable parameters and to the
    input (gradients freed first): the adapted layer's own ops, without a loss's."""
    with torch.no_grad():
        grad = torch.ones_like(module(x))

    def step() -> None:
        module.zero_grad(set_to_none=True)
        module(x.detach().requires_grad_(True)).backward(grad)

    return step


GOAL_KEYS = ("lora", "peft_oft", "oft", "boft-m2")


def op_rows(dim: int, rows: int, device: torch.device) -> tuple[list[list[object]], dict[str, OpCounter]]:
    """[method, all ops, kernel ops, views + allocations, × PEFT OFT (all), × PEFT OFT (kernels)] for every method of
    ``all_methods`` on nn.Linear(dim, dim) with (rows, dim) inputs, and the counters by method key."""
    torch.manual_seed(0)
    base = nn.Linear(dim, dim).to(device).requires_grad_(False)
    x = torch.randn(rows, dim, device=device)
    counted: dict[str, tuple[str, OpCounter]] = {}
    for method in all_methods(device):
        context = method.context(device) if method.context else contextlib.nullcontext()
        with context:
            counted[method.key] = (method.label, count_ops(layer_step(method.apply(base, None).to(device), x)))
    peft_oft = counted["peft_oft"][1]
    table = [[label, c.total, c.kernels, c.total - c.kernels, c.total / peft_oft.total, c.kernels / peft_oft.kernels]
             for label, c in counted.values()]
    return table, {key: c for key, (_, c) in counted.items()}


def op_goals(by_key: dict[str, OpCounter]) -> str:
    """The issue's op goals: boftlab OFT ≤ PEFT OFT, BOFT m=2 ≤ 1.5× PEFT OFT, all ops and kernel ops."""
    def ratio(key: str, kernels: bool) -> float | None:
        if key not in by_key or "peft_oft" not in by_key:
            return None
        mine, theirs = by_key[key], by_key["peft_oft"]
        return mine.kernels / theirs.kernels if kernels else mine.total / theirs.total

    return goals_table([
        ("boftlab OFT ÷ PEFT OFT (all ops)", ratio("oft", False), "≤", 1.0),
        ("boftlab OFT ÷ PEFT OFT (kernel ops)", ratio("oft", True), "≤", 1.0),
        ("BOFT m=2 ÷ PEFT OFT (all ops)", ratio("boft-m2", False), "≤", 1.5),
        ("BOFT m=2 ÷ PEFT OFT (kernel ops)", ratio("boft-m2", True), "≤", 1.5),
    ])


def top_ops(counter: OpCounter, n: int = 8) -> str:
    return ", ".join(f"{op} {k}" for op, k in counter.ops.most_common(n))


@suite("ops", "ATen ops dispatched per training step (fwd+bwd) of one adapted nn.Linear, all and kernel-launching")
def ops(argv: list[str]) -> str:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dim, rows = 256, 128
    table, by_key = op_rows(dim, rows, device)
    note = (f"nn.Linear({dim}, {dim}), {rows} rows, fp32, {device.type}: one forward, then backward from a fixed "
            f"output gradient to the adapter and the input (no loss), counted by boftlab.bench.ops.OpCounter after one "
            f"warm-up step. Kernel ops: all ops but the views and bare allocations "
            f"{', '.join(sorted(NO_KERNEL_OPS))}.")
    header = ["method", "ops / step", "kernel ops", "views + allocations", "ops × PEFT OFT", "kernel ops × PEFT OFT"]
    mix = markdown_table(["method", "most frequent ops"], [[k, top_ops(c)] for k, c in by_key.items()])
    return "\n\n".join([note, markdown_table(header, table), "Goals (issue 28):", op_goals(by_key),
                        "The most frequent ops of each method (by key):", mix])
