"""Single-layer training-step benchmarks: ``python -m boftlab.bench linear layers [--full]``.

One nn.Linear(d, d), one training step (forward, a scalar loss, backward to the adapter and the input), every method
built in one process and timed round-robin (``round_robin``). PEFT's BOFT multiplies dense d × d matrices
(O(m·d³) per step); boftlab's BOFT never forms them: it rotates the activations by R's assembled diagonal blocks
(O(N·d·w)), by its m factors (O(N·d·b·m); on CUDA the fused kernel), or rotates the weight — whichever its cost model
picks, shown in brackets.

On CPU PEFT's BOFT silently drops to one factor (its ``fbd_cuda`` extension cannot build), so m > 1 is timed with
``boftlab.bench.peft_patch.peft_boft_without_cuda`` (block-diagonal assembly by ``torch.block_diag``) and labelled so.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from . import MEMORY_METHOD, Timing, fwd_bwd, measure_methods, round_robin, suite
from .methods import BLOCK_SIZE, REFERENCES, Method, boft, family, reference
from ..butterfly import BOFTLayer
from ..butterfly_structure import butterfly_apply, butterfly_apply_reshaped, gather_schedule
from ..contract import FAMILIES
from ..kernels import butterfly_apply_fused, triton_available
from ..report import goals_table, markdown_table, ratio


# --- building the layers -------------------------------------------------------------------------------------------
def _frozen(base: nn.Linear, targets: None = None) -> nn.Module:
    return base


def method_names() -> tuple[str, ...]:
    """What ``method_list`` accepts: "frozen" (the base layer alone), PEFT's ``REFERENCES``, "boft" / "boft_fused"
    (boftlab BOFT b=8 at each of ``factors``), and every family of ``FAMILIES``."""
    return ("frozen", *REFERENCES, "boft", "boft_fused", *(f for f in FAMILIES if f != "boft"))


def method_list(names: list[str], factors: tuple[int, ...] = (2,), device: torch.device | None = None) -> list[Method]:
    """The methods to time, in table order (``method_names``; "boft_fused" only on CUDA with Triton). Keys: the name,
    ``boft-m{m}`` / ``boft_fused-m{m}`` for boftlab BOFT."""
    methods = []
    for name in names:
        if name == "frozen":
            methods.append(Method(name, "frozen base", _frozen))
        elif name in REFERENCES:
            methods.append(reference(name))
        elif name in ("boft", "boft_fused"):
            fused = name == "boft_fused"
            if fused and not (device is not None and device.type == "cuda" and triton_available()):
                continue
            methods += [boft(m, fused) for m in factors]
        elif name in FAMILIES:
            methods.append(family(name))
        else:
            raise ValueError(f"unknown method {name!r}; valid: {method_names()}")
    return methods


def chosen_path(module: nn.Module, x: torch.Tensor) -> str:
    """" [path]" for a boftlab BOFT layer under path="auto" (the path a training step takes), else ""."""
    if not isinstance(module, BOFTLayer) or module.config.path != "auto":
        return ""
    with torch.enable_grad():
        return f" [{module.choose_path(x.detach().requires_grad_(True))}]"


# --- timing --------------------------------------------------------------------------------------------------------
@dataclass
class Measured:
    """One method on one (d, tokens): its key, its label as printed, and its timing."""

    key: str
    label: str
    timing: Timing


@dataclass
class LayerCalls:
    """Every method's training step on nn.Linear(d, d): by label, its step, its method key, its trainable count."""

    calls: dict[str, Callable[[], None]]
    keys: dict[str, str]
    trainable: dict[str, int]


@contextlib.contextmanager
def layer_calls(methods: list[Method], dim: int, tokens: int, device: torch.device,
                dtype: torch.dtype) -> Iterator[LayerCalls]:
    """One training step of every method on one frozen nn.Linear(dim, dim) with (tokens, dim) inputs; every method's
    context stays entered while the steps are used."""
    torch.manual_seed(0)
    base = nn.Linear(dim, dim).to(device=device, dtype=dtype).requires_grad_(False)
    x = torch.randn(tokens, dim, device=device, dtype=dtype)
    with contextlib.ExitStack() as contexts:
        found = LayerCalls({}, {}, {})
        for method in methods:
            note = contexts.enter_context(method.context(device)) if method.context else None
            module = method.apply(base, None).to(device)  # adapter parameters in whatever dtype each library chooses
            label = method.label + (f" ({note})" if isinstance(note, str) else "") + chosen_path(module, x)
            found.calls[label], found.keys[label] = fwd_bwd(module, x), method.key
            found.trainable[label] = sum(p.numel() for p in module.parameters() if p.requires_grad)
        yield found
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_layers(methods: list[Method], dim: int, tokens: int, device: torch.device, dtype: torch.dtype,
                   budget_s: float | None = None) -> list[Measured]:
    """One training step of every method on nn.Linear(dim, dim) with (tokens, dim) inputs, timed round-robin."""
    with layer_calls(methods, dim, tokens, device, dtype) as found:
        timings = measure_methods(found.calls, device, budget_s)
    return [Measured(found.keys[label], label, timing) for label, timing in timings.items()]


HEADER = ["d", "tokens", "method", "ms / step", "× LoRA", "× PEFT OFT", "PEFT BOFT ÷ this", "peak MiB",
          "memory × LoRA"]


def layer_rows(dims: list[int], tokens_list: list[int], methods: list[Method], device: torch.device,
               dtype: torch.dtype, budget_s: float | None = None
               ) -> tuple[list[list[object]], dict[tuple[int, int, str], Timing]]:
    """Table rows (``HEADER``) and the timings by (d, tokens, method key); ``budget_s`` per (d, tokens)."""
    rows, results = [], {}
    for dim in dims:
        for tokens in tokens_list:
            measured = measure_layers(methods, dim, tokens, device, dtype, budget_s)
            by_key = {m.key: m.timing for m in measured}
            lora, peft_oft, peft_boft = by_key.get("lora"), by_key.get("peft_oft"), by_key.get("peft_boft")
            for m in measured:
                t = m.timing
                results[(dim, tokens, m.key)] = t
                rows.append([dim, tokens, m.label, t.ms, ratio(t.ms, lora and lora.ms),
                             ratio(t.ms, peft_oft and peft_oft.ms), ratio(peft_boft and peft_boft.ms, t.ms),
                             t.peak_mib, ratio(t.peak_mib, lora and lora.peak_mib)])
    return rows, results


def _setting(device: torch.device) -> tuple[torch.dtype, str]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return dtype, f"device {device.type}, dtype {str(dtype).removeprefix('torch.')}, nn.Linear(d, d) with bias"


def layer_goals(results: dict[tuple[int, int, str], Timing], dims: list[int], tokens: int, boft: str = "boft-m2") -> str:
    """The issue's single-layer goals, checked on this run's numbers (``boft``: the BOFT m=2 b=8 method key)."""
    def against(dim: int, key: str, reference: str, memory: bool = False) -> float | None:
        mine, theirs = results.get((dim, tokens, key)), results.get((dim, tokens, reference))
        if mine is None or theirs is None:
            return None
        return ratio(mine.peak_mib, theirs.peak_mib) if memory else mine.ms / theirs.ms

    goals = []
    for dim in dims:
        goals += [(f"d={dim}: BOFT m=2 ÷ PEFT OFT (time)", against(dim, boft, "peft_oft"), "≤", 1.15),
                  (f"d={dim}: BOFT m=2 ÷ PEFT LoRA (time)", against(dim, boft, "lora"), "≤", 1.25),
                  (f"d={dim}: boftlab OFT ÷ PEFT OFT (time)", against(dim, "oft", "peft_oft"), "≤", 1.0),
                  (f"d={dim}: BOFT m=2 ÷ PEFT LoRA (peak memory)", against(dim, boft, "lora", memory=True), "≤", 1.1)]
    speedup = against(2048, "peft_boft", boft)
    if speedup is not None:
        goals.append(("d=2048: PEFT BOFT m=2 ÷ BOFT m=2 (time)", speedup, "≥", 20.0))
    return f"Goals (issue 15), on this run's {tokens}-token numbers:\n\n" + goals_table(goals)


# --- suites --------------------------------------------------------------------------------------------------------
@suite("linear", "one nn.Linear training step (fwd+bwd): PEFT LoRA/OFT/BOFT vs boftlab OFT/BOFT, d ∈ {768, 2048, 4096}")
def linear(argv: list[str]) -> str:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype, setting = _setting(device)
    tokens, dims = 512, [768, 2048, 4096]
    methods = method_list(["frozen", "lora", "peft_oft", "peft_boft", "oft", "boft"], factors=(1, 2, 4))
    rows, results = layer_rows(dims, [tokens], methods, device, dtype)
    note = (f"{setting}, {tokens} tokens; per d, all methods timed round-robin, median of the rounds; [path]: the "
            f"path boftlab's auto choice takes. {MEMORY_METHOD[device.type]}.")
    return "\n\n".join([note, markdown_table(HEADER, rows), layer_goals(results, dims, tokens)])


@suite("layers", "single-layer training step and peak memory for every method; reduced grid on CPU (--full for all)")
def layers(argv: list[str]) -> str:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype, setting = _setting(device)
    full = "--full" in argv or device.type == "cuda"
    dims, tokens_list = ([1024, 4096, 8192], [512, 8192]) if full else ([768, 2048, 4096], [512])
    grid = "full grid" if full else "reduced CPU grid (d ∈ {768, 2048, 4096}, 512 tokens; --full for the issue's grid)"
    methods = method_list(list(method_names()), factors=(2,), device=device)
    notes = [f"{setting}; {grid}; per (d, tokens), all methods timed round-robin. {MEMORY_METHOD[device.type]}."]
    if not any("fused" in m.label for m in methods):
        notes.append("Fused-kernel rows need CUDA and Triton; this run has " + device.type + ".")
    rows, results = layer_rows(dims, tokens_list, methods, device, dtype)
    parts = [" ".join(notes), markdown_table(HEADER, rows),
             layer_goals(results, [d for d in dims if (d, 512, "lora") in results], 512)]
    if device.type == "cuda" and triton_available():
        parts += ["BOFT's rotation alone, forward, bf16 activations (tokens × d), b=8: the fused kernel, the PyTorch "
                  "factored form and the assembled form:", kernel_bandwidth(dims, tokens_list)]
    return "\n\n".join(p for p in parts if p)


def kernel_bandwidth(dims: list[int], tokens_list: list[int], factors: tuple[int, ...] = (1, 2, 4)) -> str:
    """Achieved GB/s of the fused forward vs the bytes-moved bound (read + write the activations once), with the
    PyTorch factored form and the assembled form (R's diagonal blocks assembled once as the layer assembles them,
    ``ButterflyRotation.diagonal_blocks``, then one block-diagonal product) timed round-robin beside it.

    The bound's bandwidth is measured in the same run with ``torch`` copying the same tensor (read + write), and the
    spec peak from the device properties is shown next to it.
    """
    from ..butterfly import ButterflyRotation
    from ..butterfly_structure import block_diagonal_apply

    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    spec = 2 * props.memory_clock_rate * 1e3 * props.memory_bus_width / 8 / 1e9  # GB/s, double data rate
    rows = []
    for dim in dims:
        for tokens in tokens_list:
            x = torch.randn(tokens, dim, device=device, dtype=torch.bfloat16)
            moved = 2 * x.numel() * x.element_size()
            for m in factors:
                blocks = torch.linalg.qr(torch.randn(m, dim // BLOCK_SIZE, BLOCK_SIZE, BLOCK_SIZE, device=device))[0]
                rotation = ButterflyRotation(dim, BLOCK_SIZE, m, device=device)
                width = rotation.width
                with torch.no_grad():
                    ms = round_robin({
                        "copy": lambda: torch.empty_like(x).copy_(x),
                        "fused": lambda: butterfly_apply_fused(x, blocks.to(x.dtype)),
                        "torch": lambda: butterfly_apply_reshaped(x, blocks.to(x.dtype)),
                        "assembled": lambda: block_diagonal_apply(x, rotation.diagonal_blocks(blocks).to(x.dtype)),
                    }, device, budget_s=2.0, max_rounds=50)
                rows.append([dim, tokens, m, width, ms["fused"], ms["torch"], ms["assembled"],
                             moved / ms["fused"] / 1e6, moved / ms["copy"] / 1e6, 100 * ms["copy"] / ms["fused"], spec])
    header = ["d", "tokens", "m", "w", "fused ms", "torch factored ms", "assembled ms", "fused GB/s", "copy GB/s",
              "% of bound (copy)", "spec GB/s"]
    return markdown_table(header, rows)


@suite("butterfly_costs", "cost per row element of a factor of the PyTorch factored form and of a block-diagonal "
                          "product of width w, in dense-matmul multiply-adds: butterfly.FACTOR_COST / PRODUCT_COST")
def butterfly_costs(argv: list[str]) -> str:
    """A training step's rotation (forward, then backward to the rows and the blocks: three products), fp32, 512 rows,
    against one dense (512 × d) @ (d × d) matmul timed round-robin with it: cost = d · (t / 3) / t_matmul multiply-adds
    per row element and product — the unit of the cost model, which triples every rotation in training. Factored:
    ``butterfly_apply_reshaped``, per factor (the gathered reference ``butterfly_apply`` beside it); assembled:
    ``block_diagonal_apply`` at width w."""
    from ..butterfly import FACTOR_COST, PRODUCT_COST
    from ..butterfly_structure import block_diagonal_apply

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokens, factored_rows, product_rows = 512, [], []

    def training(apply: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
                 weights: torch.Tensor) -> Callable[[], None]:
        def step() -> None:
            apply(x.detach().requires_grad_(True), weights.detach().requires_grad_(True)).sum().backward()

        return step

    for dim in (768, 2048):
        x = torch.randn(tokens, dim, device=device)
        dense = torch.randn(dim, dim, device=device)
        calls, shapes = {"matmul": lambda: x @ dense}, []
        for block_size, n_factors in ((8, 1), (16, 1), (8, 2), (8, 4), (16, 2), (4, 3)):
            blocks = torch.linalg.qr(torch.randn(n_factors, dim // block_size, block_size, block_size))[0].to(device)
            gathers = [None if g is None else g.to(device) for g in gather_schedule(dim, block_size, n_factors, False)]
            calls[f"reshaped {block_size} {n_factors}"] = training(butterfly_apply_reshaped, x, blocks)
            calls[f"gathered {block_size} {n_factors}"] = training(
                lambda rows, b, g=gathers: butterfly_apply(rows, b, g), x, blocks)
            shapes.append((block_size, n_factors))
        widths = [w for w in (8, 16, 32, 64, 128, 256) if dim % w == 0]
        for width in widths:
            calls[f"product {width}"] = training(block_diagonal_apply, x, torch.randn(dim // width, width, width))
        ms = round_robin(calls, device, budget_s=20.0)
        cost = {label: dim * t / 3 / ms["matmul"] for label, t in ms.items()}
        for b, m in shapes:
            factored_rows.append([dim, b, m, ms[f"reshaped {b} {m}"], cost[f"reshaped {b} {m}"] / m,
                                  cost[f"gathered {b} {m}"] / m, max(b, FACTOR_COST)])
        product_rows += [[dim, w, ms[f"product {w}"], cost[f"product {w}"], max(w, PRODUCT_COST)] for w in widths]
    note = (f"{device.type}, fp32, {tokens} rows, forward + backward (÷ 3), round-robin with the dense matmul; cost "
            f"per row element and product in matmul multiply-adds. Cost model: a factor max(b, FACTOR_COST="
            f"{FACTOR_COST}), a block-diagonal product of width w max(w, PRODUCT_COST={PRODUCT_COST}).")
    factored = markdown_table(["d", "b", "m", "training ms", "per factor", "per factor (gathered reference)",
                               "cost model"], factored_rows)
    products = markdown_table(["d", "w", "training ms", "per product", "cost model"], product_rows)
    return "\n\n".join([note, factored, products])
