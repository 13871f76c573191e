"""The papers' three domains — ViT, LLM, diffusion — as headless experiments (``python -m boftlab reproduce``) and
as notebooks 07–09, which call the same functions.

Each domain module defines its ci and colab tasks and methods and one ``DOMAIN`` (a ``domain.Domain``) whose
``settings`` / ``make_task`` / ``profile_methods`` / ``report`` / ``run`` / ``run_seeds`` / ``run_protocol`` /
``figures`` it re-exports; ``reproduce`` runs several under a ``Protocol`` and writes ``results.md``,
``results.json`` and the PNG figures; ``load_results`` reads results.json back.

The modules, by concern, bottom up (each imports only the ones before it): ``methods`` (what is compared and
``prepare``), ``data`` (digits, splits, batch orders), ``pretrained`` (the models the tasks start from), ``task``
(``Task`` and ``Run``), ``memory`` (fitting one accelerator), ``runner`` (the training loop), ``protocol`` (rates
chosen on validation, seeds, paired intervals, claims), ``results`` (tables, figures, results files) and ``domain``.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

if importlib.util.find_spec("tqdm") is None:
    raise ImportError(
        "boftlab.reproduce shows its training progress with tqdm, which is not installed (nor are the models' "
        'libraries, likely); install the notebooks extra: pip install "boftlab[notebooks]"'
    )

from ..profiles import PROFILES
from . import diffusion, llm, vit
from .domain import Domain
from .methods import Method
from .protocol import (FULL, Claim, ClaimRow, DomainResults, MethodResult, Paired, Protocol, check_claims,
                       paired_against_lora, reduced_protocol, verdict)
from .results import (COMMITTED_RESULTS, Report, Results, check_output_dir, load_results, plot_curves, provenance,
                      ranking, results_table, seed_table, write_results)
from .runner import run_methods
from .task import Run

DOMAINS = {"vit": vit, "llm": llm, "diffusion": diffusion}


def _run_domain(name: str, profile: str, protocol: Protocol, progress: bool) -> DomainResults:
    return DOMAINS[name].run_protocol(profile, protocol, progress)


def add_methods(domains: list[str], names: list[str], profile: str, out: str | Path, progress: bool = True,
                command: str | None = None) -> Path:
    """Run only the methods called ``names`` (of each domain's ``profile`` rows) under the full protocol and add them
    to the results already in ``out/results.json``, which must have been made under that same protocol and profile:
    the new methods share its seeds (so their paired differences against LoRA pair the same batches and inits), the
    paired differences and the claims are recomputed over every method, and the provenance records the addition (its
    command, commit and machine). The figures are left as they were (they show the original run's methods). Refused,
    before any training, for a method already there, a name no domain row has, or results of another protocol."""
    import dataclasses

    out = Path(out)
    results = load_results(out / "results.json")
    if results.provenance.get("protocol") != FULL.describe():
        raise ValueError(
            f"the results in {out} were made under {results.provenance.get('protocol')!r}, not the full protocol "
            f"({FULL.describe()!r}): methods added now would not be comparable; rerun every method instead")
    plans = {}
    for name in domains:
        if name not in results.domains:
            raise ValueError(f"{out}/results.json has no {name!r} domain (it has {sorted(results.domains)})")
        committed = results.domains[name]
        if committed.profile != profile:
            raise ValueError(f"the {name} results are of the {committed.profile!r} profile, not {profile!r}")
        rows = {m.name: m for m in DOMAINS[name].profile_methods(profile)}
        unknown = [n for n in names if n not in rows]
        present = [n for n in names if n in {m.name for m in committed.methods}]
        if unknown or present:
            raise ValueError(f"cannot add {names} to the {name} results: "
                             + (f"no {profile} row is called {unknown} (rows: {sorted(rows)})" if unknown else
                                f"{present} are already there (rerun everything to replace them)"))
        plans[name] = [rows[n] for n in names]
    about = provenance(command or f"python -m boftlab reproduce {' '.join(domains)} --profile {profile} --out {out} "
                                  f"--add {' '.join(repr(n) for n in names)}", FULL)
    for name, methods in plans.items():
        committed, domain = results.domains[name], DOMAINS[name].DOMAIN
        added = domain.run_protocol(profile, FULL, progress, methods=methods)
        order = [m.name for m in DOMAINS[name].profile_methods(profile)]
        combined = sorted(committed.methods + added.methods,
                          key=lambda m: order.index(m.name) if m.name in order else len(order))
        results.domains[name] = dataclasses.replace(
            committed, methods=combined, paired=paired_against_lora(combined),
            claims=check_claims(domain.claims, combined, committed.higher_is_better, committed.margin), runs=[])
    from boftlab.bench import load_average

    about |= {"added_methods": names, "domains": domains, "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "load_average_end": load_average()}
    results.provenance.setdefault("additions", []).append(about)
    return write_results(results, out)


def reproduce(domains: list[str], profile: str, out: str | Path, progress: bool = True,
              command: str | None = None, protocol: Protocol = FULL, jobs: int = 1) -> Path:
    """Run ``domains`` (names from ``DOMAINS``) under ``profile`` and ``protocol``; write ``out/results.md``,
    ``out/results.json`` and the figures. ``command`` is recorded in the provenance (default: the equivalent CLI
    line). ``jobs`` > 1 runs that many domains at once, each in its own process (the numbers are the same: every
    run is seeded; only the wall time and the ms / step under the shared load change). Returns the path of
    results.md."""
    if jobs < 1:
        raise ValueError(f"jobs={jobs}; give 1 (one domain after another) or more (domains in parallel processes)")
    unknown = [d for d in domains if d not in DOMAINS]
    if unknown:
        raise ValueError(f"unknown domain(s) {unknown}; valid domains: {sorted(DOMAINS)}")
    if profile not in PROFILES:
        raise ValueError(f"profile={profile!r}; valid profiles: {PROFILES}")
    out = Path(out)
    check_output_dir(out)  # before any training: a bad --out would otherwise lose the whole run
    command = command or f"python -m boftlab reproduce {' '.join(domains)} --profile {profile} --out {out}"
    about = provenance(command, protocol)
    start = time.perf_counter()
    if jobs == 1:
        results = {name: _run_domain(name, profile, protocol, progress) for name in domains}
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {name: pool.submit(_run_domain, name, profile, protocol, progress) for name in domains}
            results = {name: future.result() for name, future in futures.items()}
    figures = {}
    for name in domains:
        figures |= DOMAINS[name].figures(results[name])
    from boftlab.bench import load_average

    about |= {"parallel_domains": jobs, "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "wall_time_min": round((time.perf_counter() - start)
                                                                                         / 60, 1),
              "load_average_end": load_average()}
    return write_results(Results(about, results), out, figures)


__all__ = ["COMMITTED_RESULTS", "DOMAINS", "FULL", "add_methods", "Claim", "ClaimRow", "Domain", "DomainResults", "Method",
           "MethodResult", "Paired", "Protocol", "Report", "Results", "Run", "check_output_dir", "load_results",
           "plot_curves", "provenance", "ranking", "reduced_protocol", "reproduce", "results_table", "run_methods",
           "seed_table", "verdict", "write_results"]
