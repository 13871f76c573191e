"""The papers' three domains — ViT, LLM, diffusion — as headless experiments (``python -m boftlab reproduce``) and
as notebooks 07–09, which call the same functions.

Each domain module defines its ci and colab tasks and methods and one ``DOMAIN`` (a ``runner.Domain``) whose
``settings`` / ``make_task`` / ``profile_methods`` / ``report`` / ``run`` / ``run_seeds`` it re-exports;
``reproduce`` runs several and writes ``results.md`` with the PNG figures.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

if importlib.util.find_spec("tqdm") is None:
    raise ImportError(
        "boftlab.reproduce shows its training progress with tqdm, which is not installed (nor are the models' "
        'libraries, likely); install the notebooks extra: pip install "boftlab[notebooks]"'
    )

from ..profiles import PROFILES
from . import diffusion, llm, vit
from .runner import (Domain, Method, Report, Run, check_output_dir, plot_curves, ranking, results_table, run_methods,
                     seed_table, write_results)

DOMAINS = {"vit": vit, "llm": llm, "diffusion": diffusion}


def reproduce(domains: list[str], profile: str, out: str | Path, progress: bool = True,
              command: str | None = None) -> Path:
    """Run ``domains`` (names from ``DOMAINS``) under ``profile``; write ``out/results.md`` and the figures.
    ``command`` is recorded in results.md (default: the equivalent CLI line). Returns the path of results.md."""
    unknown = [d for d in domains if d not in DOMAINS]
    if unknown:
        raise ValueError(f"unknown domain(s) {unknown}; valid domains: {sorted(DOMAINS)}")
    if profile not in PROFILES:
        raise ValueError(f"profile={profile!r}; valid profiles: {PROFILES}")
    check_output_dir(Path(out))  # before any training: a bad --out would otherwise lose the whole run
    reports = [DOMAINS[d].run(profile, progress) for d in domains]
    command = command or f"python -m boftlab reproduce {' '.join(domains)} --profile {profile} --out {out}"
    return write_results(reports, Path(out), profile, command)


__all__ = ["DOMAINS", "Domain", "Method", "Report", "Run", "check_output_dir", "plot_curves", "ranking", "reproduce",
           "results_table", "run_methods", "seed_table", "write_results"]
