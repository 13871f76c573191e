"""The "Reading the results" text of notebooks 00 and 07–10, written from the numbers a run produced — never by hand
— so that a sentence cannot say more than its table: an order between two methods is stated only where the 95 %
interval of their paired difference excludes 0, and every number is quoted as the table prints it.

Each function returns Markdown whose first line is ``TITLE``; ``tests/notebook_outputs.py`` finds these outputs in
every executed notebook and checks each claim against the tables the notebook displayed (a number no table shows, an
order the interval does not support, a tie it separates). Tested in ``tests/test_teaching_reading.py``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from ..reproduce.protocol import DomainResults

#: the first line of every reading (what the notebook check looks for)
TITLE = "#### Reading the results"


def bullets(lines: Sequence[str]) -> str:
    return "\n".join(f"* {line}" for line in lines)


# --- notebooks 07–09: a domain under the protocol ---------------------------------------------------------------------
def domain_reading(committed: "DomainResults", reduced: "DomainResults | None" = None) -> str:
    """What the committed full-protocol results of one domain show against LoRA (each method's paired difference and
    its 95 % interval, as ``committed.markdown()`` prints it), what they show about the papers' claims, and — for a
    ``reduced`` run made in the notebook — why it ranks nothing."""
    ref = committed.reference()
    better = "higher" if committed.higher_is_better else "lower"
    seeds = ", ".join(f"seed {s}" for s in committed.protocol.seeds)
    lines = [f"Test metric: {committed.metric}, {better} is better. The rankings that follow are the committed "
             f"{committed.protocol.name}-protocol run's ({seeds}; each method at its validation-chosen rate), each "
             f"against {ref.name if ref else 'LoRA'} on the same seeds, with a 95 % paired-t interval; a method is "
             "ranked only where that interval excludes 0."]
    if ref is None:
        lines.append("LoRA did not run, so no method is ranked against it.")
    by_kind: dict[str, list[str]] = {"better": [], "worse": [], "not separated": []}
    for p in committed.paired:
        kind = p.ranking(committed.higher_is_better)
        if kind in by_kind:
            by_kind[kind].append(f"{p.a} ({p.interval()})")
    if ref is not None:
        if by_kind["better"]:
            lines.append(f"Beats {ref.name}: {'; '.join(by_kind['better'])}.")
        if by_kind["worse"]:
            lines.append(f"Worse than {ref.name}: {'; '.join(by_kind['worse'])}.")
        if by_kind["not separated"]:
            lines.append(f"Cannot be told apart from {ref.name} on these seeds: {'; '.join(by_kind['not separated'])}.")
    verdicts: dict[str, list[str]] = {}
    for c in committed.claims:
        verdicts.setdefault(c.verdict, []).append(f"“{c.claim}”")
    for verdict, claims in verdicts.items():
        lines.append(f"The papers' claims (claims table): {verdict} — {', '.join(claims)}.")
    at_edge = [m.name for m in committed.methods if m.at_edge]
    if at_edge:
        lines.append(f"Rates chosen at the edge of their grid (⚑): {', '.join(at_edge)} — their best rate may lie "
                     "beyond it, so their rows may understate them.")
    if reduced is not None and len(reduced.protocol.seeds) < 2:
        lines.append(f"This notebook's own run ({reduced.protocol.name} protocol: one seed, at the committed rates) "
                     "has no interval, so it ranks nothing on its own; its table shows what one seed gives here.")
    return f"{TITLE}\n\n{bullets(lines)}\n"


# --- notebook 00: one seed, a paired bootstrap over the test sentences ------------------------------------------------
@dataclass(frozen=True)
class PairedAccuracy:
    """Accuracy of a minus accuracy of b on the same test examples, with a 95 % paired bootstrap interval (resampling
    the examples; it covers which test examples were drawn, not the training seed or the learning rate)."""

    a: str
    b: str
    difference: float
    lo: float
    hi: float

    def interval(self) -> str:
        return f"{self.difference:+.3f} [{self.lo:+.3f}, {self.hi:+.3f}]"

    def separated(self) -> bool:
        return self.lo > 0 or self.hi < 0


def paired_bootstrap(a: str, a_correct: Sequence[bool], b: str, b_correct: Sequence[bool], resamples: int = 2000,
                     seed: int = 0) -> PairedAccuracy:
    """a's accuracy − b's on the same n examples (``*_correct``: per example, right or wrong) and the 2.5 / 97.5 %
    percentiles of that difference over ``resamples`` resamplings of the n examples. O(resamples · n)."""
    if len(a_correct) != len(b_correct) or not a_correct:
        raise ValueError(f"paired accuracies need the same examples for both: {len(a_correct)} vs {len(b_correct)} "
                         "results; give one right/wrong per test example for each")
    diffs = [float(x) - float(y) for x, y in zip(a_correct, b_correct)]
    n, rng = len(diffs), random.Random(seed)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    lo, hi = means[math.floor(0.025 * (resamples - 1))], means[math.ceil(0.975 * (resamples - 1))]
    return PairedAccuracy(a, b, sum(diffs) / n, lo, hi)


def quickstart_reading(adapter: str, comparisons: Sequence[PairedAccuracy], accuracies: dict[str, float],
                       n_test: int) -> str:
    """Notebook 00: what its one-seed comparison credits the ``adapter`` with. ``comparisons``: the adapter against
    each baseline (``paired_bootstrap``), ``accuracies``: row name -> test accuracy as the table shows it (3 decimals),
    ``n_test``: test examples. States the null result plainly where an interval includes 0, and why."""
    lines = ["Higher is better (test accuracy). The interval is a 95 % paired bootstrap over the test sentences: it "
             "says how much the difference could move with another draw of test sentences from the same source. It "
             "does not cover another seed or learning rate: each model trained once, at one untuned rate."]
    separated = [c for c in comparisons if c.separated()]
    for c in comparisons:
        if c.lo > 0:
            lines.append(f"{c.a} beats {c.b}: {c.interval()}.")
        elif c.hi < 0:
            lines.append(f"{c.a} is worse than {c.b}: {c.interval()}.")
        else:
            lines.append(f"{c.a} and {c.b} cannot be told apart on this test set: {c.interval()}.")
    if not separated:
        head = next((name for name in accuracies if "head" in name), None)
        lines.append(
            f"So this run credits {adapter} with nothing: the differences are within what the choice of {n_test} test "
            "sentences alone can move."
            + (f" The {head} model already reaches {accuracies[head]:.3f}: MiniLM's sentence vectors were trained to "
               "place texts on the same topic close together, which is what this task asks, so a new head on the "
               "frozen encoder leaves an adapter little to add." if head else "")
            + " Measuring what the adapter adds needs a task the pretrained features do not already solve, more test "
            "data and several seeds (notebooks 07–09 do this, with learning rates chosen on validation). What this "
            "notebook does show is the workflow, and that the adapter starts exactly at the pretrained model and "
            "merges exactly (next section).")
    return f"{TITLE}\n\n{bullets(lines)}\n"


# --- notebook 10: the live benchmark ----------------------------------------------------------------------------------
def speed_reading(rows: Sequence[dict], reference: str) -> str:
    """Notebook 10's live benchmark in words: at each width d, each method's time per training step and peak memory
    as a multiple of ``reference``'s (``rows``: dicts with "method", "d", "× LoRA" and "memory × LoRA" — the rows of
    ``boftlab.bench.layers.layer_rows`` the notebook displays). Above 1 is slower (or more memory)."""
    lines = ["One median per method and width, this machine, methods interleaved: a multiple says how many times "
             f"{reference}'s time (or peak memory) a training step of the method took. No interval: the multiples "
             "are what this one run measured, and a busy machine moves them."]
    for d in sorted({r["d"] for r in rows}):
        for r in rows:
            if r["d"] != d or r["method"] == reference or r.get("× LoRA") is None:
                continue
            ratio = float(f"{r['× LoRA']:.2f}")  # as quoted
            speed = "slower" if ratio > 1 else "faster" if ratio < 1 else "as fast"
            memory = r.get("memory × LoRA")
            memory = "" if memory is None or memory != memory else f", and {memory:.2f}× its peak memory"
            lines.append(f"At d = {d}, {r['method']} takes {ratio:.2f}× {reference}'s time per step ({speed})"
                         f"{memory}.")
    return f"{TITLE}\n\n{bullets(lines)}\n"


# --- notebook 10: what the committed plots and the live multiples can resolve -----------------------------------------
def frozen_base_reading(tables: Sequence) -> str:
    """Notebook 10's committed benchmark files in words: where a file's frozen base took longer per step than an
    adapter built on the same layer at the same width and tokens, that gap is the file's noise — an adapter's step
    runs the base's matmul and more — and a smaller difference in that file is no evidence. ``tables``: the
    ``bench.read_results`` tables (those without "method" and "ms / step" columns are skipped)."""
    lines, clean = [], []
    for table in tables:
        if not {"method", "ms / step", "d", "tokens"} <= set(table.header):
            continue
        column = {name: i for i, name in enumerate(table.header)}
        widths: dict[tuple, dict[str, float]] = {}
        for row in table.rows:
            widths.setdefault((row[column["d"]], row[column["tokens"]]), {})[row[column["method"]]] = \
                row[column["ms / step"]]
        worst = None  # (gap, d, base ms, adapter, adapter ms, how many adapters)
        for (d, _), times in widths.items():
            base = times.get("frozen base")
            if base is None:
                continue
            below = {name: ms for name, ms in times.items() if name != "frozen base" and ms is not None and ms < base}
            if below:
                name = min(below, key=below.get)
                if worst is None or base / below[name] > worst[0]:
                    worst = (base / below[name], int(d), base, name, below[name], len(below))
        name = f"{table.suite}: {table.source}"
        if worst is None:
            clean.append(name)
            continue
        gap, d, base, adapter, ms, count = worst
        lines.append(f"In {name} the frozen base took {base:.4g} ms per step at d = {d}, {gap:.2f}× {adapter}'s "
                     f"{ms:.4g} ms ({count} adapter(s) on that layer took less). The adapter's step runs the same "
                     "matmul and more, so this gap is the machine's — a busy, shared VM — not the methods': in that "
                     f"file, a difference of up to {gap:.2f}× is within its noise.")
    if clean:
        lines.append("In " + ", ".join(clean) + " the frozen base is the quickest row at every width, as its work "
                     "requires.")
    return "#### Reading the committed plots\n\n" + bullets(lines) + "\n"


def overhead_reading(rows: Sequence[dict], reference: str) -> str:
    """Notebook 10's live multiples across widths: for each method whose multiple of ``reference``'s time shrinks from
    the smallest width to the largest, the two multiples and ``reference``'s own time at each — a multiple that
    shrinks as d grows comes from per-step costs that grow slower than the N·d² matmul. Empty string if none does
    (``rows``: as for ``speed_reading``)."""
    widths = sorted({r["d"] for r in rows})
    if len(widths) < 2:
        return ""
    small, large = widths[0], widths[-1]
    at = {(r["method"], r["d"]): r for r in rows}
    lines = []
    for method in dict.fromkeys(r["method"] for r in rows):
        first, last = at.get((method, small)), at.get((method, large))
        if method == reference or not first or not last or first.get("× LoRA") is None or last.get("× LoRA") is None:
            continue
        if float(f"{last['× LoRA']:.2f}") < float(f"{first['× LoRA']:.2f}"):
            lines.append(f"{method}: {first['× LoRA']:.2f}× {reference}'s time at d = {small}, {last['× LoRA']:.2f}× "
                         f"at d = {large}.")
    if not lines:
        return ""
    base = [at[(reference, d)]["ms / step"] for d in (small, large)]
    return ("#### Why the multiples shrink with d\n\n" + bullets(lines) + "\n\n"
            f"{reference} itself took {base[0]:.3g} ms per step at d = {small} and {base[1]:.3g} ms at d = {large}. A "
            "multiple that shrinks as d grows comes from per-step costs that grow slower than the layer's N·d² matmul "
            "— for BOFT the Cayley solves of its d/b blocks in each factor, the permutations and the extra kernel "
            "launches; for PEFT's BOFT the dense d × d products grow faster, so its multiple need not shrink. At a "
            "step of a millisecond or so those fixed costs weigh as much as the matmul; the committed files at "
            "d ≥ 768 (section 2) show the multiples where the matmul dominates.\n")


# --- notebook 10: the goals a committed benchmark file checked ---------------------------------------------------------
GOAL_HEADER = ["goal", "measured", "target", "result"]


def goals_reading(tables: Sequence) -> str:
    """What the goal tables of committed benchmark files (``bench.read_results``; rows: goal, measured, target,
    result) say, goal by goal: how many are met, and each one missed with its measured value and target as the table
    shows them — read from the tables, never restated by hand. ValueError if ``tables`` holds no goal table."""
    from ..report import cell

    rows = [(t.source, row) for t in tables if list(t.header) == GOAL_HEADER for row in t.rows]
    if not rows:
        raise ValueError(f"no goal table (header {GOAL_HEADER}) among the {len(tables)} tables given")

    missed = [row for _, row in rows if str(row[3]).startswith("missed")]
    sources = ", ".join(dict.fromkeys(f"`{source}`" for source, _ in rows))
    lines = [f"{len(rows) - len(missed)} of {len(rows)} goals checked in {sources} are met."]
    lines += [f"Missed: {row[0]} — {cell(row[1])} against a target {row[2]} ({row[3]})." for row in missed]
    return "#### What the committed overhead run shows\n\n" + bullets(lines) + "\n"
