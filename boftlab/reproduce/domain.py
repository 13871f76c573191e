"""A reproduction domain as ``python -m boftlab reproduce`` and notebooks 07–09 use it: its settings, tasks, methods,
metrics and claims per profile, and the runs, protocol runs, reports and figures made from them (``Domain``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from .methods import Method
from .protocol import CLAIMS, FULL, Claim, DomainResults, Protocol, check_claims, paired_against_lora, run_protocol
from .results import Report, plot_curves
from .runner import run_methods
from .task import Run, Task


@dataclass(frozen=True)
class Domain:
    """One reproduction domain as ``python -m boftlab reproduce`` and notebooks 07–09 use it.

    settings_by_profile: profile -> the domain's settings object; tasks: profile -> (settings -> (Task, markdown
    description)); methods: profile -> () -> the methods compared; titles / metrics: profile -> report title / metric
    name; label: short name for figure titles; extra_figures(runs) -> more figures (file stem -> Figure).
    validation_metrics: profile -> name of the curves' metric (``Task.evaluate``), by which rates are chosen;
    validation_higher_is_better: its direction (None: as the test metric's); margins: profile -> the margin of
    practical equivalence δ of the claims, in test-metric units; claims: the papers' claims this domain checks.
    """

    name: str
    label: str
    settings_by_profile: dict[str, Any]
    tasks: dict[str, Callable[[Any], tuple[Task, str]]]
    methods: dict[str, Callable[[], list[Method]]]
    titles: dict[str, str]
    metrics: dict[str, str]
    higher_is_better: bool
    validation_metrics: dict[str, str]
    margins: dict[str, float]
    validation_higher_is_better: bool | None = None
    claims: tuple[Claim, ...] = CLAIMS
    extra_figures: Callable[[list[Run]], dict[str, Any]] | None = None

    def settings(self, profile: str) -> Any:
        """The settings (steps, batch size, ...) of ``profile``; ValueError naming the profiles otherwise."""
        if profile not in self.settings_by_profile:
            raise ValueError(f"profile={profile!r}; valid profiles: {sorted(self.settings_by_profile)}")
        return self.settings_by_profile[profile]

    def make_task(self, profile: str, s: Any = None) -> tuple[Task, str]:
        """(the runner's Task, a markdown paragraph describing it) for ``profile``, with ``s`` or its defaults."""
        default = self.settings(profile)  # validates the name
        return self.tasks[profile](s or default)

    def profile_methods(self, profile: str) -> list[Method]:
        self.settings(profile)  # validates the name
        return self.methods[profile]()

    def report(self, profile: str, runs: list[Run], description: str) -> Report:
        """The results of ``runs`` as a Report, with the learning-curve figure and the domain's other figures."""
        metric = self.metrics[profile]
        figures = {f"{self.name}_curves": plot_curves(runs, metric, self.label)}
        figures |= self.extra_figures(runs) if self.extra_figures else {}
        return Report(self.name, self.titles[profile], description, runs, metric, self.higher_is_better, figures)

    def run_seeds(self, profile: str, seeds: tuple[int, ...], methods: list[Method] | None = None, s: Any = None,
                  progress: bool = True) -> dict[int, list[Run]]:
        """seed -> ``run_methods`` on the task of ``profile`` made with that seed (its split, initialisations and
        batch order); ``seed_table`` summarises them."""
        import dataclasses

        s = s or self.settings(profile)
        methods = methods if methods is not None else self.profile_methods(profile)
        return {seed: run_methods(self.make_task(profile, dataclasses.replace(s, seed=seed))[0], methods, progress)
                for seed in seeds}

    def run(self, profile: str, progress: bool = True, methods: list[Method] | None = None, s: Any = None) -> Report:
        """Run every method once at its declared rate under ``profile``; ``methods`` / ``s`` override the profile's
        defaults. The curves show the validation metric, the table's "after" column too; ``run_protocol`` is the
        comparison the results files report."""
        task, description = self.make_task(profile, s)
        methods = methods if methods is not None else self.profile_methods(profile)
        return self.report(profile, run_methods(task, methods, progress), description)

    def run_protocol(self, profile: str, protocol: Protocol = FULL, progress: bool = True,
                     methods: list[Method] | None = None, s: Any = None) -> DomainResults:
        """Every method of ``profile`` (or ``methods``) under ``protocol`` (``run_protocol``: rates chosen on
        validation, seeds, test at the end), with the paired differences against LoRA and the claims checked."""
        s = s or self.settings(profile)
        methods = methods if methods is not None else self.profile_methods(profile)
        vhigher = self.higher_is_better if self.validation_higher_is_better is None else \
            self.validation_higher_is_better
        results, runs, description = run_protocol(
            lambda seed: self.make_task(profile, dataclasses.replace(s, seed=seed)), methods, protocol,
            self.higher_is_better, vhigher, progress)
        return DomainResults(
            self.name, self.titles[profile], profile, protocol, description, self.metrics[profile],
            self.higher_is_better, self.validation_metrics[profile], vhigher, self.margins[profile], results,
            paired_against_lora(results), check_claims(self.claims, results, self.higher_is_better,
                                                       self.margins[profile]), runs)

    def figures(self, results: DomainResults) -> dict[str, Any]:
        """stem -> Figure: the first seed's training loss and validation curves at each method's chosen rate, and
        the domain's other figures (``extra_figures``). Needs the runs of ``run_protocol`` (loaded results have
        none: their PNGs are beside results.json)."""
        if not results.runs:
            raise ValueError(f"the {self.name} results hold no runs (loaded from results.json?); their figures are the "
                             "PNG files beside it")
        runs = [r for r in results.runs if not r.skipped]
        label = f"{self.label}, seed {results.protocol.seeds[0]}, chosen rates"
        figures = {f"{self.name}_curves": plot_curves(runs, results.validation_metric, label)}
        return figures | (self.extra_figures(runs) if self.extra_figures else {})
