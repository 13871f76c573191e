"""``python -m boftlab reproduce {vit,llm,diffusion,all} --profile ci|colab --out DIR``

Runs the fine-tuning comparisons of notebooks 07–09 headless under the full protocol (each method's learning rate
chosen from a grid by a validation split, then 3 seeds at that rate, each tested once at the end; paired
differences against LoRA with 95 % intervals; the papers' claims checked), with progress bars, and writes
DIR/results.md (tables, claims, provenance), DIR/results.json (every number) and the PNG figures beside them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from .profiles import PROFILES
    from .reproduce import DOMAINS, check_output_dir, reproduce

    parser = argparse.ArgumentParser(prog="python -m boftlab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    rep = commands.add_parser("reproduce", help="run the ViT / LLM / diffusion comparisons, write results.md + PNGs")
    rep.add_argument("domain", choices=[*DOMAINS, "all"], help="which comparison to run ('all': every domain)")
    rep.add_argument("--profile", choices=PROFILES, default="ci",
                     help="ci: offline, CPU, minutes (default); colab: the papers' hub models on a GPU")
    rep.add_argument("--out", type=Path, default=None, help="output directory (default: out/<profile>)")
    rep.add_argument("--quiet", action="store_true", help="no progress bars")
    rep.add_argument("--jobs", type=int, default=1,
                     help="domains run at once, each in its own process (default 1; same numbers, less wall time)")
    args = parser.parse_args(argv)
    domains = list(DOMAINS) if args.domain == "all" else [args.domain]
    out = args.out if args.out is not None else Path("out") / args.profile
    try:
        check_output_dir(out)  # before minutes of training
    except ValueError as err:
        parser.error(str(err))
    if args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: give 1 or more")
    jobs = f" --jobs {args.jobs}" if args.jobs != 1 else ""
    command = f"python -m boftlab reproduce {args.domain} --profile {args.profile} --out {out}{jobs}"
    path = reproduce(domains, args.profile, out, progress=not args.quiet, command=command, jobs=args.jobs)
    print(path.read_text())
    print(f"wrote {path} and its figures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
