"""Markdown reports: the tables, goal verdicts and ratios that the bench, the reproduction runner, ``counts`` and the
teaching code print, and where a table was measured. Imports torch only (for ``machine``): whatever writes a report
imports it from here, never from another tool.
"""

from __future__ import annotations

import contextlib
import os
import platform
from datetime import date
from pathlib import Path

import torch


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None (an empty cell) when either is missing or zero — a method not measured."""
    return None if not numerator or not denominator else numerator / denominator


def cell(v: object) -> str:
    """One value as a table shows it: a float to 3 significant digits (a whole number from 1000 on), None as "–"."""
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return "–" if v is None else str(v)


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    """A markdown table, each value as ``cell`` shows it (``boftlab.bench.read_results`` reads it back)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def goals_table(goals: list[tuple[str, float | None, str, float]]) -> str:
    """(goal, measured, "≤" or "≥", bound) rows -> a markdown table saying whether each is met, and by how much
    each miss misses (measured ÷ bound)."""
    rows = []
    for goal, measured, sense, bound in goals:
        if measured is None:
            rows.append([goal, None, f"{sense} {bound:g}", "not measured"])
            continue
        met = measured <= bound if sense == "≤" else measured >= bound
        miss = measured / bound if sense == "≤" else bound / measured
        rows.append([goal, measured, f"{sense} {bound:g}", "met" if met else f"missed by {100 * (miss - 1):.0f} %"])
    return markdown_table(["goal", "measured", "target", "result"], rows)


def cpu_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what ``platform`` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine() -> str:
    """Where a table was measured: device name, thread count, torch version, date."""
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"CPU {cpu_name()} ({os.cpu_count()} cores), {torch.get_num_threads()} threads"
    return f"{device}; torch {torch.__version__}; {date.today().isoformat()}"
