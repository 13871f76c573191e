"""The protocol behind the results files: each method's learning rate chosen on a validation split from a grid, the
seeds at that rate, each tested once at the end; paired differences against LoRA with 95 % intervals, and the papers'
claims with verdicts computed from them (``MethodResult``, ``DomainResults``)."""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable

from .memory import MEMORY_METHOD_RUN
from .methods import Method
from .runner import evaluate_kept, run_method
from .task import Run, Task


#: every method's learning-rate grid: its declared rate (``Method.lr``) times these; the same rule for every method
LR_FACTORS = (1 / 3, 1.0, 3.0)
#: while the best rate is at an edge of the grid, one more ×3 step beyond that edge, at most this many times
LR_EXTENSIONS = 1


@dataclass(frozen=True)
class Protocol:
    """How a domain's methods are compared.

    name: "full" or "reduced"; seeds: the seeds every method runs (a seed fixes the data split, the
    initialisation and the batch order, so runs of different methods on one seed are paired); the learning rate is
    chosen on the first seed's validation metric (at the last step), then the other seeds run at that rate.
    lr_factors / lr_extensions: the grid rule (``LR_FACTORS``, ``LR_EXTENSIONS``); lrs: method name -> a fixed rate
    (a one-point grid, read from committed results: the reduced protocol); skipped: method name -> why the committed
    results skipped it (the reduced protocol expects the same skip, and refuses to train such a method at a rate the
    committed results never chose).
    """

    name: str
    seeds: tuple[int, ...]
    lr_factors: tuple[float, ...] = LR_FACTORS
    lr_extensions: int = LR_EXTENSIONS
    lrs: dict[str, float] | None = None
    skipped: dict[str, str] | None = None

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ValueError(f"Protocol {self.name!r}: seeds={self.seeds}; give at least one seed, e.g. (0, 1, 2)")
        if self.lrs is None and len(self.lr_factors) < 3:
            raise ValueError(f"Protocol {self.name!r}: lr_factors={self.lr_factors}; a grid needs ≥ 3 rates, e.g. "
                             f"{LR_FACTORS}")

    def describe(self) -> str:
        """One sentence: seeds and the learning-rate rule."""
        seeds = ", ".join(map(str, self.seeds))
        if self.lrs is not None:
            return (f"{self.name} protocol: seed(s) {seeds}; each method at the learning rate the committed "
                    "full-protocol results chose for it (no grid search here)")
        factors = ", ".join(f"{f:.3g}" for f in self.lr_factors)
        extension = (f"while the best is at an edge, one more ×3 step beyond it, at most {self.lr_extensions} times; "
                     if self.lr_extensions else "")
        return (f"{self.name} protocol: each method's learning rate chosen from its declared rate × ({factors}) by the "
                f"validation metric at the last step on seed {self.seeds[0]} ({extension}a choice at the edge of "
                f"the rates tried is flagged); then seeds {seeds} at that rate, each tested once at the end")


#: the committed ci results: 3 seeds, rates from the 3-point grid, extended by up to two ×3 steps past an edge (at the
#: ci profile's short runs the best rate was at the top edge for 23 of 25 methods without them)
FULL = Protocol("full", seeds=(0, 1, 2), lr_extensions=2)


def reduced_protocol(committed: "DomainResults", seed: int = 0) -> Protocol:
    """One seed at the rates ``committed`` (full-protocol results, ``load_results``) chose: what a notebook runs
    inside CI's budget. Its numbers are labelled "reduced protocol" wherever they are printed."""
    lrs = {m.name: m.lr for m in committed.methods if m.lr is not None}
    skipped = {m.name: m.skipped for m in committed.methods if m.lr is None and m.skipped}
    return Protocol("reduced", seeds=(seed,), lrs=lrs, skipped=skipped)


def t_quantile(p: float, dof: int) -> float:
    """Student's t quantile (scipy.stats.t.ppf; scipy comes with scikit-learn, a dependency of the ci profile)."""
    from scipy.stats import t

    return float(t.ppf(p, dof))


@dataclass
class Paired:
    """The paired difference a − b of one metric over the same seeds (same split, initialisation and batches): mean
    and a 95 % paired-t interval (n − 1 degrees of freedom); ``lo``/``hi`` None with one seed (no interval)."""

    a: str
    b: str
    diffs: list[float]
    mean: float
    lo: float | None
    hi: float | None

    @classmethod
    def of(cls, a: str, b: str, a_values: list[float], b_values: list[float]) -> "Paired":
        if len(a_values) != len(b_values) or not a_values:
            raise ValueError(f"paired difference {a} − {b}: {len(a_values)} vs {len(b_values)} values; give one value "
                             "per seed for both, on the same seeds")
        diffs = [x - y for x, y in zip(a_values, b_values)]
        mean = statistics.fmean(diffs)
        if len(diffs) < 2:
            return cls(a, b, diffs, mean, None, None)
        half = t_quantile(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
        return cls(a, b, diffs, mean, mean - half, mean + half)

    def interval(self) -> str:
        if self.lo is None:
            return f"{self.mean:+.3g} (one seed: no interval)"
        return f"{self.mean:+.3g} [{self.lo:+.3g}, {self.hi:+.3g}]"

    def ranking(self, higher_is_better: bool) -> str:
        """"better" / "worse" (a than b) where the interval excludes 0, else "not separated"."""
        if self.lo is None:
            return "no interval (one seed)"
        if self.lo > 0 or self.hi < 0:
            return "better" if (self.lo > 0) == higher_is_better else "worse"
        return "not separated"


#: what a claim's kind asks of the interval of the advantage of a over b (oriented so that > 0 means a is better);
#: δ is the domain's margin of practical equivalence, in units of its test metric
CLAIM_KINDS = {
    "better": "a beats b: supported if the interval lies above 0, contradicted if it lies below 0",
    "at least": "a is at least as good as b: supported if the interval lies above −δ, contradicted if below −δ",
    "matches": "a matches b: supported if the interval lies within ±δ, contradicted if it lies wholly outside",
}


def verdict(kind: str, lo: float | None, hi: float | None, margin: float) -> str:
    """supported / contradicted / inconclusive at this scale, from the 95 % interval [lo, hi] of a's advantage over
    b (see ``CLAIM_KINDS``); "no interval (one seed)" without one."""
    if kind not in CLAIM_KINDS:
        raise ValueError(f"claim kind {kind!r}; valid kinds: {sorted(CLAIM_KINDS)}")
    if lo is None or hi is None:
        return "no interval (one seed)"
    if kind == "better":
        supported, contradicted = lo > 0, hi < 0
    elif kind == "at least":
        supported, contradicted = lo > -margin, hi < -margin
    else:
        supported, contradicted = -margin < lo and hi < margin, lo > margin or hi < -margin
    return "supported" if supported else "contradicted" if contradicted else "inconclusive at this scale"


@dataclass(frozen=True)
class Claim:
    """A claim of the papers, as a comparison this run can check: method a against method b (each picked by family
    and option values, e.g. ("boft", {"n_factors": 2})), of ``kind`` (``CLAIM_KINDS``)."""

    text: str
    source: str
    a: tuple[str, dict[str, Any]]
    b: tuple[str, dict[str, Any]]
    kind: str

    def pick(self, methods: list["MethodResult"], which: tuple[str, dict[str, Any]]) -> "MethodResult | None":
        family, options = which
        return next((m for m in methods if m.family == family
                     and all(m.options.get(k) == v for k, v in options.items())), None)


#: the claims every domain checks (a domain adds its own)
CLAIMS = (
    Claim("BOFT (b=8, m=2) is at least as good as OFT at about equal parameters", "BOFT paper (Liu et al., 2024)",
          ("boft", {"block_size": 8, "n_factors": 2}), ("oft", {}), "at least"),
    Claim("SURM circulant matches LoRA with far fewer parameters", "SURM paper",
          ("surm", {"structure": "circulant"}), ("lora", {}), "matches"),
    Claim("C3A (circulant) vs SURM circulant at about equal parameters: they match", "C3A paper; SURM paper",
          ("c3a", {}), ("surm", {"structure": "circulant"}), "matches"),
    Claim("LoRA matches full fine-tuning", "LoRA paper (Hu et al., 2021)", ("lora", {}), ("full", {}), "matches"),
)
#: the conv-heavy domain's extra claim (diffusion: a UNet of 3×3 convolutions)
FLORA_CLAIM = Claim("FLoRA is at least as good as LoRA on a conv-heavy model", "FLoRA paper (Si et al., 2024)",
                    ("tensor_core", {}), ("lora", {}), "at least")


@dataclass
class ClaimRow:
    """A claim checked: the evidence (the paired difference a − b in the test metric and its 95 % interval), the
    margin δ, and the verdict computed from them (``verdict``)."""

    claim: str
    source: str
    kind: str
    a: str | None
    b: str | None
    evidence: Paired | None
    margin: float
    verdict: str


@dataclass
class MethodResult:
    """One method under a protocol: its learning-rate grid and the validation metric of each rate on the selection
    seed, the chosen rate (and whether it sits at an edge of the grid), and at that rate, per seed: the validation
    curve, the training losses and the test metric; the step time (median over seeds) and the peak memory of a
    training step (the largest over seeds)."""

    name: str
    family: str
    options: dict[str, Any]
    trainable: int | None = None
    method_params: int | None = None
    grid: list[float] = field(default_factory=list)
    grid_validation: list[float | None] = field(default_factory=list)  # last-step validation per rate; None: failed
    grid_notes: list[str | None] = field(default_factory=list)  # why a rate failed (diverged, out of memory)
    lr: float | None = None
    at_edge: str | None = None  # "lowest" / "highest": the chosen rate is at that edge of the grid tried
    seeds: list[int] = field(default_factory=list)
    test: list[float] = field(default_factory=list)  # at the chosen rate, per seed
    validation_before: float | None = None
    eval_steps: list[int] = field(default_factory=list)
    validation: list[list[float]] = field(default_factory=list)  # per seed, at eval_steps
    losses: list[list[float]] = field(default_factory=list)  # per seed, every step
    ms_per_step: float | None = None
    peak_mib: float | None = None
    skipped: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # JSON-able domain details of the first seed's test

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.test) if self.test else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.test) if len(self.test) > 1 else None


@dataclass
class DomainResults:
    """One domain under one protocol: every method's ``MethodResult``, the paired differences against LoRA and the
    claims checked. ``runs`` (not saved) keeps the first seed's ``Run`` per method for figures."""

    domain: str
    title: str
    profile: str
    protocol: Protocol
    description: str
    metric: str
    higher_is_better: bool
    validation_metric: str
    validation_higher_is_better: bool
    margin: float
    methods: list[MethodResult]
    paired: list[Paired] = field(default_factory=list)
    claims: list[ClaimRow] = field(default_factory=list)
    runs: list[Run] = field(default_factory=list, repr=False)

    def method(self, name: str) -> MethodResult:
        """The method called ``name``; ValueError naming the methods otherwise."""
        found = next((m for m in self.methods if m.name == name), None)
        if found is None:
            raise ValueError(f"no method {name!r} in the {self.domain} results; methods: "
                             f"{[m.name for m in self.methods]}")
        return found

    def reference(self) -> MethodResult | None:
        """The paired differences' reference: the LoRA method."""
        return next((m for m in self.methods if m.family == "lora" and not m.skipped), None)

    def markdown(self) -> str:
        """This domain's section of results.md: the protocol, the results table (test metric, paired differences
        against LoRA, chosen rates, memory), and the claims table."""
        from ..report import markdown_table

        n = len(self.protocol.seeds)
        better = "higher" if self.higher_is_better else "lower"
        vbetter = "higher" if self.validation_higher_is_better else "lower"
        ref = self.reference()
        paired = {p.a: p for p in self.paired}
        header = ["method", "params of the method", f"learning rate: grid → {self.validation_metric}",
                  "chosen rate", *(f"seed {s}" for s in self.protocol.seeds), f"{self.metric}: mean ± std",
                  f"− {ref.name if ref else 'LoRA'}: mean [95 % CI]", "vs LoRA", "ms / step", "peak MiB / step"]
        rows = []
        for m in self.methods:
            grid = ", ".join(f"{lr:.3g}: {note or f'{v:.4g}'}" for lr, v, note in
                             zip(m.grid, m.grid_validation, m.grid_notes))
            chosen = None if m.lr is None else f"{m.lr:.3g}" + (f" ⚑ {m.at_edge} of grid" if m.at_edge else "")
            spread = None if m.mean is None else (f"{m.mean:.4g} ± {m.std:.2g}" if m.std is not None else
                                                  f"{m.mean:.4g}")
            seeds = [*m.test, *([None] * (n - len(m.test)))]
            p = paired.get(m.name)
            vs = ("reference" if ref is not None and m.name == ref.name else
                  p.ranking(self.higher_is_better) if p else None)
            params = None if m.method_params is None else f"{m.method_params:,}"
            rows.append([m.name + (f" — {m.skipped}" if m.skipped else ""), params, grid, chosen, *seeds, spread,
                         p.interval() if p else None, vs, m.ms_per_step, m.peak_mib])
        lines = [f"## {self.title}", "", self.description, "",
                 f"Protocol: {self.protocol.describe()}. Test metric: {self.metric} ({better} is better); learning "
                 f"rates chosen by {self.validation_metric} ({vbetter} is better). A rate marked ⚑ is the edge of "
                 "the grid tried: the best rate may lie beyond it. \"vs LoRA\": the paired difference (same seeds: "
                 "same split, initialisation and batches) and its 95 % paired-t interval (n − 1 degrees of "
                 "freedom); a method is called better or worse only where that interval excludes 0.", "",
                 markdown_table(header, rows), "",
                 f"Peak MiB / step: {MEMORY_METHOD_RUN}. ms / step: median over the steps of every seed's run.", ""]
        lines += [f"### What the papers claim, what this run shows ({self.title})", "",
                  f"Verdicts are computed from the 95 % interval of the paired difference in {self.metric} "
                  f"(oriented so that > 0 favours the first method), with δ = {self.margin:g} as the margin of "
                  f"practical equivalence: {'; '.join(CLAIM_KINDS.values())}.", ""]
        claim_rows = [[c.claim, c.source, c.kind, f"{c.a} − {c.b}: {c.evidence.interval()}" if c.evidence else None,
                       c.verdict] for c in self.claims]
        lines += [markdown_table(["claim", "source", "rule", "evidence (test metric)", "verdict"], claim_rows), ""]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        import dataclasses

        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "runs"}
        data["protocol"] = dataclasses.asdict(self.protocol)
        data["methods"] = [dataclasses.asdict(m) for m in self.methods]
        data["paired"] = [dataclasses.asdict(p) for p in self.paired]
        data["claims"] = [dataclasses.asdict(c) for c in self.claims]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DomainResults":
        protocol = data["protocol"]
        claims = [ClaimRow(**{**c, "evidence": Paired(**c["evidence"]) if c["evidence"] else None})
                  for c in data["claims"]]
        return cls(**{**data, "protocol": Protocol(**{**protocol, "seeds": tuple(protocol["seeds"]),
                                                      "lr_factors": tuple(protocol["lr_factors"])}),
                      "methods": [MethodResult(**m) for m in data["methods"]],
                      "paired": [Paired(**p) for p in data["paired"]], "claims": claims})


def _grid(method: Method, protocol: Protocol) -> list[float]:
    if protocol.lrs is None:
        return sorted(float(f"{method.lr * f:.3g}") for f in protocol.lr_factors)
    if method.name not in protocol.lrs and method.name in (protocol.skipped or {}):
        return [method.lr]  # skipped in the committed results: expected to be skipped again (choose_lr checks)
    if method.name not in protocol.lrs:
        raise ValueError(f"the {protocol.name} protocol has no learning rate for {method.name!r}; it has rates for "
                         f"{sorted(protocol.lrs)} (from the committed results); rerun the full protocol to add it")
    return [protocol.lrs[method.name]]


def choose_lr(task: Task, method: Method, protocol: Protocol, higher_is_better: bool,
              progress: bool = True) -> tuple[MethodResult, Run]:
    """Train ``method`` at every rate of its grid (``Protocol``) on ``task`` and pick the rate whose validation
    metric (``task.evaluate``, last step) is best — ties go to the lower rate; never ``task.test``. The chosen run is
    then tested once (``evaluate_kept``). Returns the method's result so far (grid, choice, first seed) and that run.
    A method that cannot be applied at all (a missing package, the memory gate) is tried once."""
    grid = _grid(method, protocol)
    runs: dict[float, Run] = {}

    def best() -> float | None:
        done = [lr for lr in sorted(runs) if not runs[lr].skipped]
        if not done:
            return None
        sign = 1 if higher_is_better else -1
        return max(done, key=lambda lr: (sign * runs[lr].final, -lr))

    def attempt(lr: float) -> None:
        runs[lr] = run_method(task, dataclasses.replace(method, lr=lr), progress, keep_trained=True)
        leader = best()
        for other, run in runs.items():  # keep the trained copy of the best run only
            if other != leader:
                run.trained = None

    attempt(grid[0])
    if method.name in (protocol.skipped or {}) and method.name not in (protocol.lrs or {}) and \
            not runs[grid[0]].skipped:
        raise ValueError(
            f"{method.name!r} ran here, but the committed results skipped it ({protocol.skipped[method.name]}), so "
            f"the {protocol.name} protocol has no chosen rate for it; rerun the full protocol in this environment")
    if runs[grid[0]].skipped and runs[grid[0]].skipped.startswith("skipped:"):  # not a matter of the rate
        return MethodResult(method.name, method.family, dict(method.options), skipped=runs[grid[0]].skipped), \
            runs[grid[0]]
    for lr in grid[1:]:
        attempt(lr)
    for _ in range(protocol.lr_extensions if protocol.lrs is None else 0):
        leader = best()
        if leader is None or leader not in (grid[0], grid[-1]):
            break
        new = float(f"{leader / 3:.3g}") if leader == grid[0] else float(f"{leader * 3:.3g}")
        grid = [new, *grid] if leader == grid[0] else [*grid, new]
        attempt(new)
    chosen = best()
    result = MethodResult(method.name, method.family, dict(method.options), grid=grid,
                          grid_validation=[None if runs[lr].skipped else runs[lr].final for lr in grid],
                          grid_notes=[runs[lr].skipped for lr in grid])
    if chosen is None:
        result.skipped = f"no rate of its grid finished ({runs[grid[0]].skipped})"
        return result, runs[grid[0]]
    result.lr = chosen
    if len(grid) > 1 and chosen in (grid[0], grid[-1]):
        result.at_edge = "lowest" if chosen == grid[0] else "highest"
    run = runs[chosen]
    evaluate_kept(task, run)
    result.trainable, result.method_params = run.trainable, run.method_params
    result.validation_before, result.eval_steps = run.before, run.eval_steps
    return result, run


def _record(result: MethodResult, seed: int, run: Run) -> None:
    """Add one seed's run at the chosen rate to ``result``."""
    if run.skipped:
        result.skipped = f"seed {seed}: {run.skipped}"
        return
    result.seeds.append(seed)
    result.test.append(run.test)
    result.validation.append(run.evals)
    result.losses.append(run.losses)


def run_protocol(make_task: Callable[[int], tuple[Task, str]], methods: list[Method], protocol: Protocol,
                 higher_is_better: bool, validation_higher_is_better: bool,
                 progress: bool = True) -> tuple[list[MethodResult], list[Run], str]:
    """Every method under ``protocol``: the rate chosen on the first seed (``choose_lr``), then every other seed at
    that rate, tested at the end. ``make_task(seed) -> (Task, description)``. Returns the results, the first seed's
    chosen runs (for figures) and the task's description."""
    from tqdm.auto import tqdm

    first, *others = protocol.seeds
    task, description = make_task(first)
    if task.test is None:
        raise ValueError("the protocol needs a task with a validation and a test split (Task.test is None)")
    results, first_runs, times, peaks = [], [], {}, {}
    for method in tqdm(methods, desc=f"rates on seed {first}", disable=not progress, leave=False):
        result, run = choose_lr(task, method, protocol, validation_higher_is_better, progress)
        results.append(result)
        first_runs.append(run)
        if result.lr is not None:
            _record(result, first, run)
            result.extra = {k: v for k, v in run.extra.items() if isinstance(v, (int, float, str, list))}
            times[method.name], peaks[method.name] = [run.ms_per_step], [run.peak_mib]
    del task
    for seed in others:
        task, _ = make_task(seed)
        for method, result in zip(methods, tqdm(results, desc=f"seed {seed}", disable=not progress, leave=False)):
            if result.lr is None or result.skipped:
                continue
            run = run_method(task, dataclasses.replace(method, lr=result.lr), progress, test=True)
            _record(result, seed, run)
            times[method.name].append(run.ms_per_step)
            peaks[method.name].append(run.peak_mib)
        del task
    for result in results:
        if result.name in times:
            result.ms_per_step = statistics.median(t for t in times[result.name] if t is not None)
            measured = [p for p in peaks[result.name] if p is not None]
            result.peak_mib = max(measured) if measured else None
    return results, first_runs, description


def paired_against_lora(methods: list[MethodResult]) -> list[Paired]:
    """Each method's paired difference (test metric, method − LoRA) over the seeds both ran; none without LoRA."""
    ref = next((m for m in methods if m.family == "lora" and not m.skipped), None)
    if ref is None:
        return []
    return [Paired.of(m.name, ref.name, m.test, ref.test) for m in methods
            if m is not ref and not m.skipped and m.seeds == ref.seeds]


def check_claims(claims: tuple[Claim, ...], methods: list[MethodResult], higher_is_better: bool,
                 margin: float) -> list[ClaimRow]:
    """Each claim's row: the paired difference of its two methods and the verdict from its interval (``verdict``),
    or "not measured" naming the method this run lacks."""
    rows = []
    for claim in claims:
        a, b = claim.pick(methods, claim.a), claim.pick(methods, claim.b)
        missing = [f"{fam} {opts or ''}".strip() for m, (fam, opts) in ((a, claim.a), (b, claim.b))
                   if m is None or m.skipped or not m.test]
        if missing:
            rows.append(ClaimRow(claim.text, claim.source, claim.kind, a and a.name, b and b.name, None, margin,
                                 f"not measured: no finished {' / '.join(missing)} method in this run"))
            continue
        if a.seeds != b.seeds:
            raise ValueError(f"claim {claim.text!r}: {a.name} ran seeds {a.seeds}, {b.name} {b.seeds}; a paired "
                             "difference needs the same seeds")
        evidence = Paired.of(a.name, b.name, a.test, b.test)
        lo, hi = (evidence.lo, evidence.hi) if higher_is_better else (
            None if evidence.hi is None else -evidence.hi, None if evidence.lo is None else -evidence.lo)
        rows.append(ClaimRow(claim.text, claim.source, claim.kind, a.name, b.name, evidence, margin,
                             verdict(claim.kind, lo, hi, margin)))
    return rows
