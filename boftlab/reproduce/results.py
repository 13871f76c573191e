"""What the runs report: a single-rate table, ranking and learning curves of runs (``Report``, ``seed_table``), and
the results files of a protocol run — results.md, results.json (every number, with its ``provenance``) and the
figures, written atomically (``write_results``) and read back (``load_results``)."""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .protocol import DomainResults, Protocol
from .task import Run


def results_table(runs: list[Run], metric: str) -> str:
    """Markdown table: method, trainable parameters, the metric before → after, ms per step, peak memory."""
    from ..report import markdown_table

    header = ["method", "trainable params", "of which method", f"{metric} before", f"{metric} after",
              "ms / step", "peak memory (MiB)"]
    rows = []
    for r in runs:
        if r.skipped:
            rows.append([r.method.name, r.skipped, None, None, None, None, None])
            continue
        rows.append([r.method.name, f"{r.trainable:,}", f"{r.method_params:,}", r.before, r.final,
                     r.ms_per_step, r.peak_mib])
    return markdown_table(header, rows)


def ranking(runs: list[Run], metric: str, higher_is_better: bool = True) -> str:
    """One markdown sentence: the methods that ran, ordered by their final metric (best first), with the values."""
    done = sorted((r for r in runs if not r.skipped), key=lambda r: r.final, reverse=higher_is_better)
    if not done:
        return "No method ran."
    order = "; ".join(f"{r.method.name} {r.final:.3g}" for r in done)
    skipped = [r.method.name for r in runs if r.skipped]
    note = f" Skipped: {', '.join(skipped)}." if skipped else ""
    better = "higher" if higher_is_better else "lower"
    return f"Final {metric} ({better} is better), best first: {order}.{note}"


def plot_curves(runs: list[Run], metric: str, title: str, smooth: int = 10):
    """Figure with two panels: training loss (running mean over ``smooth`` steps) and the held-out metric.

    A ``matplotlib.figure.Figure``, not a pyplot figure: nothing is left open, and a notebook shows it where it
    displays it (``display(fig)``, or the cell's last expression) — once."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.6))
    ax_loss, ax_metric = fig.subplots(1, 2)
    plotted = []  # every smoothed loss drawn
    for r in runs:
        if r.skipped:
            continue
        losses = torch.tensor(r.losses)
        kernel = min(smooth, len(losses))
        smoothed = torch.nn.functional.avg_pool1d(losses[None, None], kernel, 1).flatten() if kernel else losses
        ax_loss.plot(r.steps[kernel - 1:], smoothed.tolist(), label=r.method.name, lw=1.2)
        plotted += smoothed.tolist()
        ax_metric.plot(r.eval_steps, r.evals, marker=".", label=r.method.name, lw=1.2)
    ax_loss.set(xlabel="step", ylabel=f"training loss (mean of {smooth} steps)", title=f"{title}: training loss")
    ax_metric.set(xlabel="step", ylabel=metric, title=f"{title}: {metric}")
    if plotted and min(plotted) > 0 and max(plotted) / min(plotted) > 10:  # log only where the losses span a decade:
        ax_loss.set_yscale("log")  # (within one, a log axis labels one or two ticks)
    ax_metric.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


@dataclass
class Report:
    """One domain's section of results.md: prose, the table, and figures (file stem -> matplotlib Figure)."""

    domain: str
    title: str
    description: str
    runs: list[Run]
    metric: str
    higher_is_better: bool = True
    figures: dict[str, Any] = field(default_factory=dict)

    def table_markdown(self) -> str:
        """The results table, the ranking sentence and (on CPU) the note on peak memory."""
        lines = [results_table(self.runs, self.metric), "", ranking(self.runs, self.metric, self.higher_is_better)]
        if all(r.peak_mib is None for r in self.runs if not r.skipped):
            lines += ["", "Peak memory is measured with `torch.cuda.max_memory_allocated`; this run was on CPU, "
                      "where it is not measured (–)."]
        return "\n".join(lines) + "\n"

    def markdown(self, figure_dir: str = ".") -> str:
        """This domain's section of results.md: title, description, table, ranking and links to the figures."""
        lines = [f"## {self.title}", "", self.description, "", self.table_markdown()]
        lines += [f"![{stem}]({figure_dir}/{stem}.png)" for stem in self.figures]
        return "\n".join(lines) + "\n"


def seed_table(runs_by_seed: dict[int, list[Run]], metric: str, higher_is_better: bool = True) -> str:
    """Markdown table of each method's final metric on every seed and its mean ± standard deviation (n − 1), best
    mean first, then one sentence naming the neighbours in that order whose means differ by less than the larger of
    their two standard deviations — rankings the seeds cannot tell apart. ``runs_by_seed``: seed -> the runs of the
    same methods in the same order (``run_methods``)."""
    from ..report import markdown_table

    seeds = sorted(runs_by_seed)
    if len(seeds) < 2:
        raise ValueError(f"a spread needs at least two seeds, got {seeds}")
    names = [r.method.name for r in runs_by_seed[seeds[0]]]
    if any([r.method.name for r in runs_by_seed[s]] != names for s in seeds):
        raise ValueError(f"every seed must run the same methods in the same order; seed {seeds[0]} ran {names}")
    rows = []
    for i, name in enumerate(names):
        runs = [runs_by_seed[s][i] for s in seeds]
        if any(r.skipped for r in runs):
            rows.append((name, None, None, [r.final for r in runs], runs[0].method_params))
            continue
        finals = [r.final for r in runs]
        std = statistics.stdev(finals) if len(finals) > 1 else 0.0
        rows.append((name, statistics.fmean(finals), std, finals, runs[0].method_params))
    done = sorted((r for r in rows if r[1] is not None), key=lambda r: r[1], reverse=higher_is_better)
    header = ["method", "params of the method", *(f"seed {s}" for s in seeds), f"{metric}: mean ± std"]
    table = [[name, f"{params:,}", *finals, f"{mean:.3g} ± {std:.2g}"] for name, mean, std, finals, params in done]
    table += [[name, f"{params:,}", *finals, "skipped"] for name, mean, _, finals, params in rows if mean is None]
    ties = [f"{a[0]} / {b[0]}" for a, b in zip(done, done[1:]) if abs(a[1] - b[1]) < max(a[2], b[2])]
    note = (f"Within one standard deviation of the next in this order (not separated by {len(seeds)} seeds): "
            f"{'; '.join(ties)}." if ties else f"Every neighbour in this order is separated by more than one standard "
            f"deviation over {len(seeds)} seeds.")
    return markdown_table(header, table) + "\n\n" + note + "\n"


def check_output_dir(out: Path) -> None:
    """ValueError unless ``write_results`` can write into ``out``: an existing directory, or a new one whose nearest
    existing ancestor is a directory this process can write in (tried by creating and deleting a temporary file
    there), and ``out/results.md`` not a directory. Changes nothing on disk; called before any training, so a bad
    ``--out`` costs seconds, not a run."""
    if out.exists() and not out.is_dir():
        raise ValueError(
            f"--out {str(out)!r} is an existing file; the results are a directory (results.md and the PNG figures). "
            "Give a new or existing directory, e.g. --out out/ci"
        )
    if (out / "results.md").is_dir():
        raise ValueError(f"{str(out / 'results.md')!r} is a directory, so results.md cannot be written there; "
                         "remove it or give another --out")
    existing = out
    while not existing.exists():  # the directory that creating ``out`` would write into
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"--out {str(out)!r} cannot be created: {str(existing)!r} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise ValueError(
            f"--out {str(out)!r} is not writable: creating a file in {str(existing)!r} fails ({err.strerror}). "
            "Give a directory you can write to"
        ) from err


#: the repository root, where a checkout has ``.git``, ``constraints.txt`` and ``docs/results/``
REPOSITORY = Path(__file__).resolve().parents[2]
#: the committed full-protocol results of the ci profile, as package data (a wheel and Colab's install from git have
#: them): a byte-for-byte copy of docs/results/ci/results.json, which the README quotes (a test keeps them equal)
COMMITTED_RESULTS = Path(__file__).resolve().parent / "results" / "ci.json"


def provenance(command: str, protocol: Protocol) -> dict[str, Any]:
    """Where and how a results file was made: the commit (``git rev-parse HEAD``, and whether tracked files had
    uncommitted changes) or a statement that this is not a git checkout, the command, the protocol (seeds, grid),
    the machine, threads and load average, and the environment lock (``constraints.txt`` and its sha256)."""
    import hashlib
    import os
    import platform
    import subprocess

    from ..bench import load_average
    from ..report import machine

    if (REPOSITORY / ".git").exists():
        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", str(REPOSITORY), *args], capture_output=True, text=True,
                                  check=True).stdout.strip()

        changed = git("status", "--porcelain", "--untracked-files=no").splitlines()
        commit = git("rev-parse", "HEAD") + (f" (with uncommitted changes to {len(changed)} tracked files)"
                                             if changed else "")
    else:
        commit = f"not a git checkout ({REPOSITORY} has no .git): an installed package"
    lock = REPOSITORY / "constraints.txt"
    constraints = (f"constraints.txt sha256 {hashlib.sha256(lock.read_bytes()).hexdigest()}" if lock.is_file() else
                   "no constraints.txt beside the package (an installed package): environment not locked")
    import torch as _torch

    return {"commit": commit, "command": command, "protocol": protocol.describe(), "seeds": list(protocol.seeds),
            "lr_grid": ("fixed rates from the committed results" if protocol.lrs is not None else
                        f"declared rate × {list(round(f, 4) for f in protocol.lr_factors)}, "
                        f"+ up to {protocol.lr_extensions} ×3 extension(s) past an edge"),
            "machine": machine(), "threads": _torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset"),
            "load_average_start": load_average(), "python": platform.python_version(),
            "environment_lock": constraints, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


@dataclass
class Results:
    """A protocol run of one or more domains: provenance (``provenance``) and domain name -> ``DomainResults``."""

    provenance: dict[str, Any]
    domains: dict[str, DomainResults]

    def markdown(self) -> str:
        p = self.provenance
        lines = ["# boftlab reproduction results", "",
                 f"Command: `{p['command']}`", "",
                 "| provenance | |", "|---|---|", *(f"| {k} | {v} |" for k, v in p.items() if k != "command"), "",
                 "Every number below was produced by this run. Learning rates were chosen on a validation split drawn "
                 "from the training data; the test metric was computed once per seed, at the end, at the chosen "
                 "rate. results.json beside this file holds every number (`boftlab.reproduce.load_results`).", ""]
        for d in self.domains.values():
            lines.append(d.markdown())
            lines += [f"![{stem}](./{stem}.png)" for stem in figure_stems(d)] + [""]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"provenance": self.provenance, "domains": {k: d.to_dict() for k, d in self.domains.items()}}


def figure_stems(d: DomainResults) -> list[str]:
    """The PNGs written for domain ``d``: its validation curves, and the diffusion domain's sample grid."""
    return [f"{d.domain}_curves", *(["diffusion_samples"] if d.domain == "diffusion" and d.profile == "ci" else [])]


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    tmp.replace(path)


def write_results(results: Results, out: Path, figures: dict[str, Any] | None = None) -> Path:
    """Write ``out/results.md``, ``out/results.json`` (every number) and ``figures`` (stem -> Figure) as
    ``out/<stem>.png``, each atomically (a temporary file, then a rename); return the markdown's path."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    for stem, fig in (figures or {}).items():
        _atomic_write(out / f"{stem}.png", lambda tmp, fig=fig: fig.savefig(tmp, dpi=90, format="png"))
    _atomic_write(out / "results.json",
                  lambda tmp: tmp.write_text(json.dumps(results.to_dict(), indent=1, allow_nan=False) + "\n"))
    path = out / "results.md"
    _atomic_write(path, lambda tmp: tmp.write_text(results.markdown()))
    return path


def load_results(path: str | Path = COMMITTED_RESULTS) -> Results:
    """The ``Results`` in a results.json (default: the committed ci results, ``COMMITTED_RESULTS``, package data), as
    written by ``write_results``; plain JSON, nothing unpickled."""
    import json

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no results at {path}; `python -m boftlab reproduce all --profile ci --out docs/results/ci` writes "
            "results.json there, and boftlab/reproduce/results/ci.json (package data) is the committed copy of it")
    data = json.loads(path.read_text())
    return Results(data["provenance"], {k: DomainResults.from_dict(d) for k, d in data["domains"].items()})
