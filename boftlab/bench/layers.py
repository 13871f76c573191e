"""Single-layer training-step benchmarks: ``python -m boftlab.bench linear layers [--full]``.

One nn.Linear(d, d), one training step (forward, a scalar loss, backward to the adapter and the input), timed for
every method in the same process. PEFT's BOFT multiplies dense d × d matrices (O(m·d³) per step); boftlab's BOFT
never forms them (O(N·d·b·m)), and on CUDA its fused kernel reads and writes the activations once.

On CPU PEFT's BOFT silently drops to one factor (its ``fbd_cuda`` extension cannot build), so m > 1 is timed with
``boftlab.peft_interop.peft_boft_without_cuda`` (block-diagonal assembly by ``torch.block_diag``) and labelled so.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from . import Timing, fwd_bwd, markdown_table, suite, synchronize, time_call, with_peft
from ..butterfly import BOFTConfig, OFTConfig
from ..butterfly_structure import butterfly_apply, gather_schedule
from ..kernels import butterfly_apply_fused

BLOCK_SIZE = 8
LORA_RANK = 8


# --- building the layers -------------------------------------------------------------------------------------------
@contextlib.contextmanager
def peft_boft_context(device: torch.device) -> Iterator[str]:
    """PEFT's real m-factor BOFT: its CUDA extension if it builds, else the torch.block_diag patch. Yields a label."""
    from peft.tuners.boft import layer

    if device.type == "cuda" and layer.get_fbd_cuda() is not None:
        yield "fbd_cuda"
        return
    from ..peft_interop import peft_boft_without_cuda

    with peft_boft_without_cuda():
        yield "block_diag patch"


@dataclass
class LayerMethod:
    """One row of the single-layer tables: how to build the adapted layer from the frozen base, and a context to
    build and time it in (e.g. PEFT's BOFT without its CUDA extension)."""

    label: str
    build: Callable[[nn.Linear], nn.Module]
    context: Callable[[torch.device], contextlib.AbstractContextManager] | None = None


def _frozen(base: nn.Linear) -> nn.Module:
    return base


def method_list(names: list[str], factors: tuple[int, ...] = (2,),
                device: torch.device | None = None) -> list[LayerMethod]:
    """The methods to time, in table order; names from ``METHODS`` (optional families skipped when absent)."""
    methods = []
    for name in names:
        if name == "frozen":
            methods.append(LayerMethod("frozen base", _frozen))
        elif name == "lora":
            methods.append(LayerMethod(f"PEFT LoRA r={LORA_RANK}", lambda b: with_peft("LoraConfig", b, r=LORA_RANK)))
        elif name == "peft_oft":
            methods.append(LayerMethod(f"PEFT OFT b={BLOCK_SIZE}",
                                       lambda b: with_peft("OFTConfig", b, oft_block_size=BLOCK_SIZE)))
        elif name == "peft_boft":
            methods.append(LayerMethod(
                f"PEFT BOFT m=2 b={BLOCK_SIZE}",
                lambda b: with_peft("BOFTConfig", b, boft_block_size=BLOCK_SIZE, boft_n_butterfly_factor=2),
                peft_boft_context,
            ))
        elif name == "oft":
            methods.append(LayerMethod(f"boftlab OFT b={BLOCK_SIZE}", OFTConfig(block_size=BLOCK_SIZE).make_layer))
        elif name in ("boft", "boft_fused"):
            fused = name == "boft_fused"
            if fused and not (device is not None and device.type == "cuda" and _triton_available()):
                continue
            for m in factors:
                label = f"boftlab BOFT m={m} b={BLOCK_SIZE}" + (" (fused kernel)" if fused else "")
                config = BOFTConfig(block_size=BLOCK_SIZE, n_factors=m, kernel="auto" if fused else "torch")
                methods.append(LayerMethod(label, config.make_layer))
        elif name == "surm":
            try:
                from ..surm import SURMConfig
            except ImportError:
                continue
            methods.append(LayerMethod("boftlab SURM circulant", SURMConfig(structure="circulant").make_layer))
        elif name == "tensor_core":
            try:
                from ..tensor_core import TensorCoreConfig
            except ImportError:
                continue
            methods.append(LayerMethod("boftlab tensor-core r=8", TensorCoreConfig(ranks=8).make_layer))
        else:
            raise ValueError(f"unknown method {name!r}; valid: {METHODS}")
    return methods


METHODS = ("frozen", "lora", "peft_oft", "peft_boft", "oft", "boft", "boft_fused", "surm", "tensor_core")


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# --- timing --------------------------------------------------------------------------------------------------------
def measure(step: Callable[[], None], device: torch.device, budget_s: float = 3.0) -> Timing:
    """``time_call`` with as many repeats (1…10) as fit in ``budget_s`` after one untimed warm-up call."""
    start = time.perf_counter()
    step()
    synchronize(device)
    once = time.perf_counter() - start
    repeats = max(1, min(10, int(budget_s / max(once, 1e-6))))
    return time_call(step, device, repeats=repeats, warmup=1 if repeats > 2 else 0)


def time_layer(method: LayerMethod, dim: int, tokens: int, device: torch.device,
               dtype: torch.dtype) -> tuple[str, Timing]:
    """(label, timing) of one training step of ``method`` on nn.Linear(dim, dim) with (tokens, dim) inputs."""
    torch.manual_seed(0)
    base = nn.Linear(dim, dim).to(device=device, dtype=dtype).requires_grad_(False)
    x = torch.randn(tokens, dim, device=device, dtype=dtype)
    with (method.context(device) if method.context else contextlib.nullcontext()) as note:
        module = method.build(base).to(device)  # adapter parameters in whatever dtype each library chooses
        timing = measure(fwd_bwd(module, x), device)
    label = method.label + (f" ({note})" if isinstance(note, str) else "")
    del module
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return label, timing


def layer_rows(dims: list[int], tokens_list: list[int], methods: list[LayerMethod], device: torch.device,
               dtype: torch.dtype) -> tuple[list[list[object]], dict[tuple[int, int, str], float]]:
    """Table rows (see ``HEADER``) and the raw ms by (d, tokens, label)."""
    rows, times = [], {}
    for dim in dims:
        for tokens in tokens_list:
            measured = [time_layer(m, dim, tokens, device, dtype) for m in methods]
            lora = next((t for label, t in measured if label.startswith("PEFT LoRA")), None)
            peft_boft = next((t for label, t in measured if label.startswith("PEFT BOFT")), None)
            for label, timing in measured:
                times[(dim, tokens, label)] = timing.ms
                memory = None if lora is None or not lora.peak_mib else timing.peak_mib / lora.peak_mib
                rows.append([dim, tokens, label, timing.ms, None if lora is None else timing.ms / lora.ms,
                             None if peft_boft is None else peft_boft.ms / timing.ms, timing.peak_mib, memory])
    return rows, times


HEADER = ["d", "tokens", "method", "ms / step", "× LoRA", "PEFT BOFT ÷ this", "peak MiB", "memory × LoRA"]


def _setting(device: torch.device) -> tuple[torch.dtype, str]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return dtype, f"device {device.type}, dtype {str(dtype).removeprefix('torch.')}, nn.Linear(d, d) with bias"


def goals(times: dict[tuple[int, int, str], float], tokens: int) -> str:
    """The issue's goals, checked on this run's numbers."""
    lines = []
    find = lambda dim, prefix: next((v for (d, n, label), v in times.items()  # noqa: E731
                                     if d == dim and n == tokens and label.startswith(prefix)), None)
    ours = f"boftlab BOFT m=2 b={BLOCK_SIZE}"
    for dim, wanted in ((2048, 10), (4096, 30)):
        peft_boft, peft_oft, lora = find(dim, "PEFT BOFT"), find(dim, "PEFT OFT"), find(dim, "PEFT LoRA")
        for label in (ours, ours + " (fused kernel)"):
            mine = times.get((dim, tokens, label))
            if mine and peft_boft and peft_oft and lora:
                lines.append(f"- d={dim}, {label}: {peft_boft / mine:.1f}× faster than PEFT BOFT (goal ≥ {wanted}×), "
                             f"{mine / peft_oft:.2f}× PEFT OFT (goal ≤ 1.3×), {mine / lora:.2f}× LoRA")
    return "\n".join(lines)


# --- suites --------------------------------------------------------------------------------------------------------
@suite("linear", "one nn.Linear training step (fwd+bwd): PEFT LoRA/OFT/BOFT vs boftlab OFT/BOFT, d ∈ {768, 2048, 4096}")
def linear(argv: list[str]) -> str:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype, setting = _setting(device)
    tokens = 512
    methods = method_list(["frozen", "lora", "peft_oft", "peft_boft", "oft", "boft"], factors=(1, 2, 4))
    rows, times = layer_rows([768, 2048, 4096], [tokens], methods, device, dtype)
    memory = "peak MiB: CUDA allocator peak above the inputs; – on CPU (not measured)."
    return "\n\n".join([f"{setting}, {tokens} tokens. {memory}", markdown_table(HEADER, rows), goals(times, tokens)])


@suite("layers", "single-layer training step and peak memory for every method; reduced grid on CPU (--full for all)")
def layers(argv: list[str]) -> str:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype, setting = _setting(device)
    full = "--full" in argv or device.type == "cuda"
    dims, tokens_list = ([1024, 4096, 8192], [512, 8192]) if full else ([768, 2048, 4096], [512])
    grid = "full grid" if full else "reduced CPU grid (d ∈ {768, 2048, 4096}, 512 tokens; --full for the issue's grid)"
    names = ["frozen", "lora", "peft_oft", "peft_boft", "oft", "boft", "boft_fused", "surm", "tensor_core"]
    methods = method_list(names, factors=(2,), device=device)
    missing = [f for f, n in (("SURM", "surm"), ("tensor-core", "tensor_core")) if not _importable(n)]
    notes = [f"{setting}; {grid}."]
    if missing:
        notes.append(f"Skipped (module not importable): {', '.join(missing)}.")
    if not any("fused" in m.label for m in methods):
        notes.append("Fused-kernel rows need CUDA and Triton; this run has " + device.type + ".")
    rows, times = layer_rows(dims, tokens_list, methods, device, dtype)
    parts = [" ".join(notes), markdown_table(HEADER, rows), goals(times, 512)]
    if device.type == "cuda" and _triton_available():
        parts += ["Fused kernel, forward only, bf16 activations (tokens × d), b=8:", kernel_bandwidth(dims, tokens_list)]
    return "\n\n".join(p for p in parts if p)


def _importable(module: str) -> bool:
    try:
        __import__(f"boftlab.{module}")
    except ImportError:
        return False
    return True


def kernel_bandwidth(dims: list[int], tokens_list: list[int], factors: tuple[int, ...] = (1, 2, 4)) -> str:
    """Achieved GB/s of the fused forward vs the bytes-moved bound (read + write the activations once).

    The bound's bandwidth is measured in the same run with ``torch`` copying the same tensor (read + write), and the
    spec peak from the device properties is shown next to it.
    """
    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    spec = 2 * props.memory_clock_rate * 1e3 * props.memory_bus_width / 8 / 1e9  # GB/s, double data rate
    rows = []
    for dim in dims:
        for tokens in tokens_list:
            x = torch.randn(tokens, dim, device=device, dtype=torch.bfloat16)
            moved = 2 * x.numel() * x.element_size()
            copy_ms = time_call(lambda: torch.empty_like(x).copy_(x), device, repeats=20).ms
            for m in factors:
                blocks = torch.linalg.qr(torch.randn(m, dim // BLOCK_SIZE, BLOCK_SIZE, BLOCK_SIZE, device=device))[0]
                gathers = [None if g is None else g.to(device) for g in gather_schedule(dim, BLOCK_SIZE, m, False)]
                with torch.no_grad():
                    fused_ms = time_call(lambda: butterfly_apply_fused(x, blocks), device, repeats=20).ms
                    torch_ms = time_call(lambda: butterfly_apply(x, blocks.to(x.dtype), gathers), device, repeats=20).ms
                gbps = moved / fused_ms / 1e6
                rows.append([dim, tokens, m, fused_ms, torch_ms, torch_ms / fused_ms, gbps, moved / copy_ms / 1e6,
                             100 * copy_ms / fused_ms, spec])
    header = ["d", "tokens", "m", "fused ms", "torch ms", "speed-up", "fused GB/s", "copy GB/s",
              "% of bound (copy)", "spec GB/s"]
    return markdown_table(header, rows)


@suite("butterfly_costs", "cost per row element of a butterfly factor and an index gather, in dense-matmul "
                          "multiply-adds: the measurement behind butterfly.FACTOR_COST / GATHER_COST")
def butterfly_costs(argv: list[str]) -> str:
    """Forward ``butterfly_apply`` (PyTorch path, fp32) on 512 rows, against one dense (512 × d) @ (d × d) matmul
    timed in the same run: cost = d · t_butterfly / t_matmul multiply-adds per row element. m = 1 has no gathers (a factor
    alone); for m > 1 the per-factor column is factors and gathers together. The last column is the cost model."""
    from ..butterfly import FACTOR_COST, GATHER_COST

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokens, rows = 512, []
    for dim in (768, 2048):
        x = torch.randn(tokens, dim, device=device)
        dense = torch.randn(dim, dim, device=device)
        with torch.no_grad():
            matmul_ms = time_call(lambda: x @ dense, device, repeats=10).ms
            for block_size, n_factors in ((8, 1), (16, 1), (8, 2), (8, 4), (16, 2)):
                gauss = torch.randn(n_factors, dim // block_size, block_size, block_size)
                blocks = torch.linalg.qr(gauss)[0].to(device)  # (m, k, b, b) orthogonal
                gathers = [None if g is None else g.to(device)
                           for g in gather_schedule(dim, block_size, n_factors, False)]
                ms = time_call(lambda: butterfly_apply(x, blocks, gathers), device, repeats=10).ms
                cost = dim * ms / matmul_ms
                n_gathers = sum(g is not None for g in gathers)
                model = n_factors * max(block_size, FACTOR_COST) + n_gathers * GATHER_COST
                rows.append([dim, block_size, n_factors, n_gathers, ms, matmul_ms, cost, cost / n_factors, model])
    header = ["d", "b", "m", "gathers", "butterfly ms", "matmul ms", "cost / element", "per factor", "cost model"]
    note = (f"{device.type}, fp32, {tokens} rows, forward only, median of 10 calls; cost model: "
            f"m·max(b, FACTOR_COST={FACTOR_COST}) + gathers·GATHER_COST={GATHER_COST}.")
    return note + "\n\n" + markdown_table(header, rows)
