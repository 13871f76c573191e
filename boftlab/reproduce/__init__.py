"""The papers' three domains — ViT, LLM, diffusion — as headless experiments (``python -m boftlab reproduce``) and
as notebooks 07–09, which call the same functions.

Each domain module defines its ci and colab tasks and methods and one ``DOMAIN`` (a ``runner.Domain``) whose
``settings`` / ``make_task`` / ``profile_methods`` / ``report`` / ``run`` / ``run_seeds`` / ``run_protocol`` /
``figures`` it re-exports; ``reproduce`` runs several under a ``Protocol`` and writes ``results.md``,
``results.json`` and the PNG figures; ``load_results`` reads results.json back.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..profiles import PROFILES
from . import diffusion, llm, vit
from .runner import (COMMITTED_RESULTS, FULL, Claim, ClaimRow, Domain, DomainResults, Method, MethodResult, Paired,
                     Protocol, Report, Results, Run, check_output_dir, load_results, plot_curves, provenance, ranking,
                     reduced_protocol, results_table, run_methods, seed_table, verdict, write_results)

DOMAINS = {"vit": vit, "llm": llm, "diffusion": diffusion}


def _run_domain(name: str, profile: str, protocol: Protocol, progress: bool) -> DomainResults:
    return DOMAINS[name].run_protocol(profile, protocol, progress)


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


__all__ = ["COMMITTED_RESULTS", "DOMAINS", "FULL", "Claim", "ClaimRow", "Domain", "DomainResults", "Method",
           "MethodResult", "Paired", "Protocol", "Report", "Results", "Run", "check_output_dir", "load_results",
           "plot_curves", "provenance", "ranking", "reduced_protocol", "reproduce", "results_table", "run_methods",
           "seed_table", "verdict", "write_results"]
