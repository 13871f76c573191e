"""Live tuning (notebook 07): fine-tune the ViT ci task with BOFT at a student's (block_size, n_factors), learning
rate and steps, rank the runs by **validation** accuracy against stored baselines — head only, LoRA, OFT, at their
declared (untuned) rates — that the same function computed on the same task, and test the chosen run once.

The task is ``boftlab.reproduce.vit``'s ci task (a pretrained 4-layer timm ViT, digits 0–4 → 5–9, a new head; its
training half split into training and validation images, the other half the test set) and the loop is the runner's
(``run_method``: AdamW, warm-up then cosine decay, seeded batches). Tuning looks at validation accuracy only; the
test set is read once, for the run the student finally chooses (``Leaderboard.test_chosen``), after which the board
takes no more runs — tuning on what the test said would make its number a validation number. ``widgets.live_tuning``
puts controls on these functions; the baselines are package data (``live_baselines.json``) written by
``python -m boftlab.teaching.live``. Tested in ``tests/test_teaching_live.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import nn

from ..butterfly_structure import valid_n_factors
from ..contract import check_integer, check_number
from ..reproduce import vit
from ..reproduce.methods import Method, count_parameters, prepare
from ..reproduce.runner import evaluate_kept, run_method
from .butterfly import density, reachability

#: the layers every live run adapts: each block's attention (qkv, proj) and MLP (fc1, fc2) projections
TARGETS = vit.CI_LINEARS
STEPS = 150  # a live run's default budget (the ci comparison runs 60 to fit CI); the baselines are trained for it
LR = 3e-3  # the declared (untuned) rate of the ci ViT's adapter methods: the baselines train at it
BASELINES_PATH = Path(__file__).with_name("live_baselines.json")


def baseline_methods() -> list[Method]:
    """What a live run is compared with, at the declared rate of notebook 07's ci methods (untuned: the student's
    runs are tuned on validation, these are not): the new head alone, PEFT's LoRA (rank 4, 12 288 parameters) and OFT
    (one factor of 16 × 16 blocks, 9 600)."""
    return [
        Method("head only", "head", lr=LR),
        Method("LoRA r=4 (PEFT)", "lora", {"r": 4, "lora_alpha": 8}, TARGETS, LR),
        Method("OFT b=16", "oft", {"block_size": 16}, TARGETS, LR),
    ]


# --- the valid settings -----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _base() -> nn.Module:
    """The pretrained ci ViT with the new 5-way head, as the task builds it (read-only: callers copy it)."""
    return vit.make_task("ci")[0].base


def fan_ins() -> tuple[int, ...]:
    """The distinct fan-ins d of the adapted layers (R is d × d): (64, 128) — qkv, proj and fc1 read 64 features,
    fc2 reads 128."""
    import re

    return tuple(sorted({m.in_features for name, m in _base().named_modules()
                         if isinstance(m, nn.Linear) and re.fullmatch(TARGETS, name)}))


def valid_pairs() -> list[tuple[int, int]]:
    """Every (block_size, n_factors) that is a butterfly in each adapted layer: b·2^(m−1) divides every fan-in (and
    b is even when m > 1). O(number of pairs)."""
    dims = fan_ins()
    pairs = []
    for block_size in range(2, min(dims) + 1):
        factors = set.intersection(*(set(valid_n_factors(d, block_size)) for d in dims))
        pairs += [(block_size, m) for m in sorted(factors)]
    return pairs


def check_pair(block_size: int, n_factors: int) -> None:
    """ValueError naming the valid pairs (and the nearest ones) unless (block_size, n_factors) is one."""
    block_size, n_factors = check_integer("block_size", block_size), check_integer("n_factors", n_factors)
    pairs = valid_pairs()
    if (block_size, n_factors) not in pairs:
        nearest = sorted(pairs, key=lambda p: (abs(p[0] - block_size) + abs(p[1] - n_factors), p))[:3]
        raise ValueError(
            f"block_size={block_size}, n_factors={n_factors} is not a butterfly in every adapted layer of the ci ViT "
            f"(fan-ins {fan_ins()}: b·2^(m−1) must divide each, b even when m > 1); nearest valid pairs: {nearest}; "
            f"all valid pairs: {pairs}"
        )


@dataclasses.dataclass(frozen=True)
class PairInfo:
    """What a (block_size, n_factors) costs and reaches: the BOFT parameters it trains on the ViT (without the head)
    and the density of R — the fraction of its entries that can be non-zero — at each fan-in."""

    block_size: int
    n_factors: int
    params: int
    densities: dict[int, float]

    def label(self) -> str:
        """"b=8, m=2 · 10,752 params · R 25 % dense (d=64), 12.5 % (d=128)"."""
        dense = ", ".join(f"{100 * v:.3g} %{' dense' if i == 0 else ''} (d={d})"
                          for i, (d, v) in enumerate(self.densities.items()))
        return f"b={self.block_size}, m={self.n_factors} · {self.params:,} params · R {dense}"


@functools.lru_cache(maxsize=None)
def pair_info(block_size: int, n_factors: int) -> PairInfo:
    """The parameter count (by adapting a copy of the ViT) and R's density per fan-in of one valid pair.
    O(m·d²·b) per fan-in for the density."""
    check_pair(block_size, n_factors)
    method = boft_method(block_size, n_factors, LR)
    _, params = count_parameters(prepare(_copy_base(), method, ["head"]), ["head"])
    densities = {d: density(reachability(d, block_size, n_factors)) for d in fan_ins()}
    return PairInfo(block_size, n_factors, params, densities)


def _copy_base() -> nn.Module:
    import copy

    return copy.deepcopy(_base())


def boft_method(block_size: int, n_factors: int, lr: float) -> Method:
    return Method(f"BOFT b={block_size} m={n_factors}", "boft", {"block_size": block_size, "n_factors": n_factors},
                  TARGETS, lr)


# --- one run ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class TuneRun:
    """One live (or baseline) run: its settings, the method's own trainable parameters (the head's 325 are not
    counted), validation accuracy at ``eval_steps`` (the first at step 0), the training loss of every step, wall
    time, and ``test``: its test accuracy once ``Leaderboard.test_chosen`` chose it (None before; never for a
    stored baseline)."""

    name: str
    family: str
    options: dict[str, Any]
    lr: float
    steps: int
    seed: int
    params: int
    eval_steps: list[int]
    validation: list[float]
    losses: list[float]
    seconds: float
    test: float | None = None
    _kept: Any = dataclasses.field(default=None, repr=False, compare=False)  # (task, runner Run): to test it later

    @property
    def final(self) -> float:
        """Validation accuracy after the last step: what the runs are ranked by."""
        return self.validation[-1]

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("_kept", "test")}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TuneRun":
        return cls(**data)


def train(method: Method, steps: int = STEPS, seed: int = 0, progress: bool = True) -> TuneRun:
    """Fine-tune the pretrained ci ViT with ``method`` for ``steps`` AdamW steps on the ci task of ``seed`` (its
    train/validation/test split, head initialisation and batch order), evaluating validation accuracy 10 times; the
    trained parameters are kept (on the CPU, a few thousand numbers) so the run can be tested if it is chosen.
    O(steps) forward and backward passes of batch 64; about 5–10 s for 150 steps on an idle 2-core CPU."""
    if check_integer("steps", steps) < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if check_integer("seed", seed) < 0:
        raise ValueError(f"seed must be an integer ≥ 0, got {seed!r}")
    if not isinstance(progress, bool):
        raise ValueError(f"progress must be True or False, got {progress!r}")
    steps, seed = int(steps), int(seed)
    settings = dataclasses.replace(vit.SETTINGS["ci"], steps=steps, eval_every=max(1, steps // 10), seed=seed)
    task, _ = vit.make_task("ci", settings)
    start = time.perf_counter()
    run = run_method(task, method, progress, keep_trained=True)
    if run.skipped:
        raise RuntimeError(f"{method.name} could not run: {run.skipped}")
    return TuneRun(method.name, method.family, dict(method.options), method.lr, steps, seed, run.method_params,
                   run.eval_steps, run.evals, run.losses, time.perf_counter() - start, _kept=(task, run))


def tune(block_size: int, n_factors: int, lr: float = LR, steps: int = STEPS, seed: int = 0,
         progress: bool = True) -> TuneRun:
    """One live BOFT run on the ci ViT: ``train(BOFT(block_size, n_factors), …)``. ValueError for a pair that is not
    a butterfly in every adapted layer (``valid_pairs``), a learning rate that is not a finite number > 0 (a string
    like '0.003' included), and steps, seed or progress of the wrong type — all before any training."""
    check_pair(block_size, n_factors)
    if check_number("lr", lr) <= 0:
        raise ValueError(f"lr must be a finite number > 0, e.g. {LR}, got {lr!r}")
    return train(boft_method(int(block_size), int(n_factors), float(lr)), steps, seed, progress)


# --- baselines --------------------------------------------------------------------------------------------------------
def compute_baselines(steps: int = STEPS, seed: int = 0, progress: bool = True) -> list[TuneRun]:
    """``train`` for each of ``baseline_methods()``."""
    return [train(method, steps, seed, progress) for method in baseline_methods()]


def write_baselines(path: Path = BASELINES_PATH, progress: bool = True) -> Path:
    """Compute the baselines and write them as JSON (atomically): {"steps", "seed", "runs": [TuneRun, …]}."""
    from ..saving import atomic_write

    runs = compute_baselines(progress=progress)
    data = {"task": "boftlab.reproduce.vit ci", "steps": STEPS, "seed": 0, "runs": [r.to_dict() for r in runs]}
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1) + "\n"))
    return path


def load_baselines(path: Path = BASELINES_PATH) -> list[TuneRun]:
    """The stored baselines (``write_baselines``), in ``baseline_methods()`` order."""
    return [TuneRun.from_dict(r) for r in json.loads(path.read_text())["runs"]]


def evaluate_test(run: TuneRun) -> float:
    """The test accuracy of a run ``train`` made (once: it is kept in ``run.test``). Not for stored baselines —
    they keep no trained parameters, and they are compared on validation only. ``Leaderboard.test_chosen`` is how a
    notebook calls it."""
    if run.test is not None:
        return run.test
    if run._kept is None:
        raise ValueError(f"{run.name} keeps no trained parameters (a stored baseline?): only a run made by train() or "
                         "tune() in this session can be tested")
    task, kept = run._kept
    evaluate_kept(task, kept)
    run.test, run._kept = kept.test, None
    return run.test


# --- the leaderboard and the figure -----------------------------------------------------------------------------------
class Leaderboard:
    """A student's runs, best first: higher final validation accuracy, then fewer parameters, then the earlier run.
    ``test_chosen`` tests the best run once and closes the board."""

    def __init__(self) -> None:
        self.runs: list[TuneRun] = []
        self.chosen: TuneRun | None = None

    def add(self, run: TuneRun) -> int:
        """Record ``run``; return its rank (1 = best). ValueError once the board is closed by its test."""
        if self.chosen is not None:
            raise ValueError(f"this leaderboard is closed: {self.chosen.name} (lr {self.chosen.lr:.1e}) was chosen and "
                             "tested; a run added now would be tuned after seeing the test set. Start a new "
                             "Leaderboard() to keep tuning — and test its choice once, at the end")
        self.runs.append(run)
        return self.ranked().index(run) + 1

    def test_chosen(self) -> TuneRun:
        """Choose the best run by validation (rank 1), compute its test accuracy — once — and close the board to
        further runs. ValueError if there is no run yet; the same run (no second test) if already chosen."""
        if self.chosen is None:
            if not self.runs:
                raise ValueError("no runs to choose from: train one first (tune(...) or the panel's Train button)")
            self.chosen = self.ranked()[0]
            evaluate_test(self.chosen)
        return self.chosen

    def ranked(self) -> list[TuneRun]:
        order = {id(r): i for i, r in enumerate(self.runs)}
        return sorted(self.runs, key=lambda r: (-r.final, r.params, order[id(r)]))

    def markdown(self, baselines: list[TuneRun] = ()) -> str:
        """The ranked runs as a markdown table (validation accuracy; test accuracy only in the chosen run's row,
        once it is tested), then the untuned baselines' rows, also on validation (their seconds are not shown: they
        were measured when the file was written, on whatever machine that was)."""
        from ..report import markdown_table

        header = ["rank", "run", "lr", "steps", "params", "final validation accuracy", "best validation accuracy",
                  "seconds", "test accuracy"]
        rows = [[i, r.name, f"{r.lr:.1e}", r.steps, f"{r.params:,}", f"{r.final:.3f}", f"{max(r.validation):.3f}",
                 f"{r.seconds:.1f}", f"{r.test:.3f} (chosen)" if r is self.chosen else None]
                for i, r in enumerate(self.ranked(), 1)]
        rows += [["baseline (untuned)", r.name, f"{r.lr:.1e}", r.steps, f"{r.params:,}", f"{r.final:.3f}",
                  f"{max(r.validation):.3f}", None, None] for r in baselines]  # stored: another machine's time
        return markdown_table(header, rows)


def plot_runs(runs: list[TuneRun], baselines: list[TuneRun]) -> Figure:
    """Validation accuracy against step: the baselines dashed, the student's runs solid (the last one thick); one
    legend, outside the axes on the right, names every line with its final validation accuracy."""
    fig = Figure(figsize=(8.5, 3.6), layout="constrained")
    ax = fig.subplots()
    for r, style in zip(baselines, ("--", ":", "-.", (0, (5, 1, 1, 1)))):
        ax.plot(r.eval_steps, r.validation, linestyle=style, color="0.45", lw=1.2,
                label=f"baseline {r.name}: {r.final:.3f}")
    for i, r in enumerate(runs):
        last = i == len(runs) - 1
        ax.plot(r.eval_steps, r.validation, marker=".", lw=2.2 if last else 1, alpha=1 if last else 0.5,
                label=f"{r.name}, lr {r.lr:.1e}: {r.final:.3f}")
    ax.set(xlabel="step", ylabel="validation accuracy",
           title="ViT, digits 0–4 → 5–9: your runs against the untuned baselines")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
    return fig

if __name__ == "__main__":
    print(f"wrote {write_baselines()}")
