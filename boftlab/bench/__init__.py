"""Benchmarks (not tests): ``python -m boftlab.bench <suite>``.

Every suite builds all its methods in one process and times them round-robin (``round_robin``: each round runs
every method once, so a load change on a shared machine hits all of them alike), reports medians and ratios to
references measured in the same run (PEFT LoRA, PEFT OFT, PEFT BOFT, ...), and the peak memory of one step
(``peak_memory_mib``; ``MEMORY_METHOD`` says how it is measured). Suites live in this package, one module each, and
register themselves in ``SUITES``; their tables, goal verdicts and ratios come from ``boftlab.report``.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

#: suite name -> (one-line description, function(argv) -> markdown report)
SUITES: dict[str, tuple[str, Callable[[list[str]], str]]] = {}
#: seconds of timed rounds per comparison (one round-robin over a set of methods); ``--budget`` sets it
ROUND_BUDGET_S = 20.0


def suite(name: str, description: str):
    """Decorator registering ``fn(argv) -> str`` as ``python -m boftlab.bench name``."""

    def register(fn: Callable[[list[str]], str]) -> Callable[[list[str]], str]:
        SUITES[name] = (description, fn)
        return fn

    return register


@dataclass
class Timing:
    ms: float  # median wall time of one call, milliseconds
    peak_mib: float | None  # peak memory of one call above what was live before it (MEMORY_METHOD), MiB


#: how ``peak_memory_mib`` measures, per device type (the suites print it under their tables)
MEMORY_METHOD = {
    "cuda": "peak MiB: torch.cuda.max_memory_allocated during one step, above what was allocated before it",
    "cpu": "peak MiB: the most memory the step's own tensors hold at once — every storage a torch op creates in the "
           "step, forward and backward, counted from its op until it is freed (boftlab.bench.LiveTensorBytes, a "
           "TorchDispatchMode; it agrees with torch.profiler's allocator events)",
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, repeats: int = 10, warmup: int = 3) -> Timing:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` calls, and its peak CUDA memory. For one
    function alone; comparisons between methods use ``round_robin``."""
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


def round_robin(calls: dict[str, Callable[[], object]], device: torch.device, budget_s: float | None = None,
                min_rounds: int = 3, max_rounds: int = 15) -> dict[str, float]:
    """Median wall milliseconds of every call, timed in rounds that run each call once, in order.

    One untimed warm-up round first (its duration sizes the rest: as many rounds as fit in ``budget_s``, default
    ``ROUND_BUDGET_S``, at least ``min_rounds``, at most ``max_rounds``). Interleaving makes a change of load on a shared machine hit every method
    alike, where timing one method after another would charge it to whichever ran then.
    """
    start = time.perf_counter()
    for fn in calls.values():
        fn()
    synchronize(device)
    budget_s = ROUND_BUDGET_S if budget_s is None else budget_s
    rounds = max(min_rounds, min(max_rounds, int(budget_s / max(time.perf_counter() - start, 1e-9))))
    samples: dict[str, list[float]] = {label: [] for label in calls}
    for _ in range(rounds):
        for label, fn in calls.items():
            start = time.perf_counter()
            fn()
            synchronize(device)
            samples[label].append((time.perf_counter() - start) * 1e3)
    return {label: statistics.median(times) for label, times in samples.items()}


class LiveTensorBytes(TorchDispatchMode):
    """While active, the bytes of CPU tensor storage created by torch ops and not yet freed, and their peak.

    An op's output storage counts when it is new (not one of the op's inputs: views and in-place results add
    nothing); it stops counting once freed (a weak reference to the storage expires; checked before every op, so the
    peak is exact at op granularity). What was allocated before the mode started never counts.
    """

    def __init__(self) -> None:
        super().__init__()
        self.storages: dict[int, tuple[StorageWeakRef, int]] = {}  # data pointer -> (weak reference, bytes)
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for pointer in [p for p, (ref, _) in self.storages.items() if ref.expired()]:
            self.live -= self.storages.pop(pointer)[1]
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu":
                storage = tensor.untyped_storage()
                pointer, size = storage.data_ptr(), storage.nbytes()
                if size and pointer not in inputs and pointer not in self.storages:
                    self.storages[pointer] = (StorageWeakRef(storage), size)
                    self.live += size
                    self.peak = max(self.peak, self.live)
        return out


def peak_memory_mib(fn: Callable[[], object], device: torch.device) -> float:
    """Peak memory of one call of ``fn``, MiB: what it allocates on top of what was live before it
    (``MEMORY_METHOD[device.type]``)."""
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    with LiveTensorBytes() as tracker:
        fn()
    return tracker.peak / 2**20


def measure_methods(calls: dict[str, Callable[[], object]], device: torch.device, budget_s: float | None = None,
                    **rounds: int) -> dict[str, Timing]:
    """``round_robin`` medians (``rounds``: its min_rounds / max_rounds), then each call's ``peak_memory_mib``
    (measured apart: the profiler slows calls)."""
    times = round_robin(calls, device, budget_s, **rounds)
    return {label: Timing(times[label], peak_memory_mib(fn, device)) for label, fn in calls.items()}


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


def load_average() -> str:
    """The 1, 5 and 15 minute load averages (Unix), for judging how busy a shared machine was."""
    with contextlib.suppress(OSError, AttributeError):
        return ", ".join(f"{v:.2f}" for v in os.getloadavg()) + f" (1, 5, 15 min; {os.cpu_count()} cores)"
    return "not available"


@dataclass
class ResultTable:
    """One markdown table of a saved report: its suite, where it was measured, its header and rows."""

    suite: str
    machine: str
    header: list[str]
    rows: list[list[object]]  # numbers as float, "–" as None, everything else as str
    source: str = ""  # the name of the file it was read from: one run


def read_results(path: str | Path) -> list[ResultTable]:
    """The tables of a report written by ``python -m boftlab.bench ... --out path`` (inverse of
    ``report.markdown_table``)."""

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
            table = ResultTable(suite_name, where, cells, [], Path(path).name)
            tables.append(table)
        elif not all(set(c) <= {"-"} for c in cells):
            table.rows.append([value(c) for c in cells])
    return tables


#: the committed reports, one ``--out`` file of ``python -m boftlab.bench`` each (package data: installed with boftlab)
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def result_files() -> list[Path]:
    """The reports in ``RESULTS_DIR`` (``boftlab/bench/results/*.md``), in name order; ``read_results`` reads one."""
    return sorted(RESULTS_DIR.glob("*.md"))
