"""``python -m boftlab.bench [suite ...] [--threads N] [--budget S] [--out FILE]`` — run benchmark suites, print markdown
tables."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import shlex
import sys
from pathlib import Path

import torch

from .. import bench
from . import SUITES, load_average
from ..report import machine


def main(argv: list[str] | None = None) -> None:
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__package__}.{info.name}")  # each module registers its suites
    parser = argparse.ArgumentParser(prog="python -m boftlab.bench", description=__doc__)
    parser.add_argument("suites", nargs="*", help=f"suites to run (default: all): {sorted(SUITES)}")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (on a shared CPU, 1 avoids spinning "
                                                    "against other processes)")
    parser.add_argument("--budget", type=float, help="seconds of timed rounds per comparison (default "
                                                     "20; fewer rounds, noisier medians)")
    parser.add_argument("--out", type=Path, help="also write the report to this markdown file")
    args, rest = parser.parse_known_args(argv)
    names = args.suites or sorted(SUITES)
    unknown = sorted(set(names) - set(SUITES))
    if unknown:
        parser.error(f"unknown suite(s) {unknown}; available: {sorted(SUITES)}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.budget is not None:
        bench.ROUND_BUDGET_S = args.budget
    command = shlex.join(["python", "-m", "boftlab.bench", *(sys.argv[1:] if argv is None else argv)])
    report = [f"# boftlab benchmarks\n\nMeasured on: {machine()}\n\nCommand: `{command}`\n\n"
              f"Load average at the start: {load_average()}\n"]
    print(report[0], flush=True)
    for name in names:
        description, run = SUITES[name]
        section = f"## {name}: {description}\n\n{run(rest)}\n"
        print(section, flush=True)
        report.append(section)
    report.append(f"Load average at the end: {load_average()}\n")
    print(report[-1], flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(report))


if __name__ == "__main__":
    main()
