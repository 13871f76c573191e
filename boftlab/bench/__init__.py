"""Benchmarks (not tests): ``python -m boftlab.bench <suite>``.

Every suite times its methods in one process, one after another, and reports each as a ratio to a reference
measured in the same run (PEFT LoRA, PEFT BOFT, ...), so the numbers compare like with like on whatever machine
runs them. Suites live in this package, one module each, and register themselves in ``SUITES``.
"""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Callable

import torch
from torch import nn

#: suite name -> (one-line description, function(argv) -> markdown report)
SUITES: dict[str, tuple[str, Callable[[list[str]], str]]] = {}


def suite(name: str, description: str):
    """Decorator registering ``fn(argv) -> str`` as ``python -m boftlab.bench name``."""

    def register(fn: Callable[[list[str]], str]) -> Callable[[list[str]], str]:
        SUITES[name] = (description, fn)
        return fn

    return register


@dataclass
class Timing:
    ms: float  # median wall time of one call, milliseconds
    peak_mib: float | None  # peak allocated memory during the calls (CUDA only; None on CPU)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, repeats: int = 10, warmup: int = 3) -> Timing:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` calls, and its peak CUDA memory."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        samples.append((time.perf_counter() - start) * 1e3)
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if device.type == "cuda" else None
    return Timing(statistics.median(samples), peak)


def fwd_bwd(module: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """One training step's compute for a layer: forward, a scalar loss, backward (gradients freed after)."""

    def step() -> None:
        module.zero_grad(set_to_none=True)
        inp = x.detach().requires_grad_(True)
        module(inp).float().square().mean().backward()

    return step


class OneLayer(nn.Module):
    """A module whose one child, ``layer``, is the layer to adapt: PEFT targets modules by name."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def with_peft(config_name: str, module: nn.Module, targets: list[str] | None = None, **options) -> nn.Module:
    """PEFT's ``config_name`` (e.g. "LoraConfig") injected into ``module`` at ``targets`` (module names), or with no
    targets into ``module`` itself, a bare layer. PEFT leaves only its adapters trainable."""
    import peft

    if targets is None:
        module, targets = OneLayer(module), ["layer"]
    return peft.inject_adapter_in_model(getattr(peft, config_name)(target_modules=targets, **options), module)


def machine() -> str:
    """Where a table was measured: device name, thread count, torch version, date."""
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return f"{device}; torch {torch.__version__}; {date.today().isoformat()}"


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return "–" if v is None else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass
class ResultTable:
    """One markdown table of a saved report: its suite, where it was measured, its header and rows."""

    suite: str
    machine: str
    header: list[str]
    rows: list[list[object]]  # numbers as float, "–" as None, everything else as str


def read_results(path: str | Path) -> list[ResultTable]:
    """The tables of a report written by ``python -m boftlab.bench ... --out path`` (inverse of ``markdown_table``)."""

    def value(cell: str) -> object:
        if cell == "–":
            return None
        try:
            return float(cell)
        except ValueError:
            return cell

    tables, suite_name, where, table = [], "", "", None
    for line in Path(path).read_text().splitlines():
        if line.startswith("Measured on: "):
            where = line.removeprefix("Measured on: ").strip()
        elif line.startswith("## "):
            suite_name = line[3:].split(":", 1)[0].strip()
        if not line.startswith("|"):
            table = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if table is None:
            table = ResultTable(suite_name, where, cells, [])
            tables.append(table)
        elif not all(set(c) <= {"-"} for c in cells):
            table.rows.append([value(c) for c in cells])
    return tables
