"""A pip install runs the notebooks as a checkout does (what the Colab cell's ``%pip install`` amounts to).

Build the wheel, install it with the notebooks extra into a fresh virtual environment outside the checkout, and
execute the quick start and the language-model fine-tuning notebook (the fastest fine-tuning one: 131 s against the
vision transformer's 222 s in .ci/run, 2026-11-29), found by their titles, from a temporary folder, the environment's
``bin`` first on PATH, so that the kernel is the environment's Python. A cell appended to each notebook reports what the
kernel imported; the test asserts it was the wheel: boftlab and every one of its modules from the environment's
site-packages, the ci profile's pretrained models read from there, the checkout nowhere on ``sys.path``.

The environment sees the base interpreter's packages (``--system-site-packages``): torch and the rest of the
notebooks extra are not installed a second time (pip still resolves the extra against them), while boftlab itself
comes from the wheel and shadows the base's editable install of the checkout. It executes notebooks, so it runs
with ``--nbmake`` (as ``.ci/run`` and the README's test command do) and is skipped otherwise.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell

from helpers import notebook_titled
from notebook_outputs import problems

ROOT = Path(__file__).resolve().parents[1]
#: the quick start and the fine-tuning notebook on a language model, found by their titles
NOTEBOOKS = [notebook_titled("Quick start"), notebook_titled("Fine-tuning a language model")]
pytestmark = pytest.mark.notebooks

#: appended to each notebook: what the kernel that ran it imported, as one JSON line
PROBE = """import json, sys
import boftlab
from boftlab.reproduce import pretrained
print("PROBE " + json.dumps({
    "prefix": sys.prefix, "path": sys.path, "boftlab": boftlab.__file__, "pretrained": str(pretrained.PRETRAINED_DIR),
    "modules": sorted(m.__file__ for name, m in list(sys.modules.items())
                      if name.split(".")[0] == "boftlab" and getattr(m, "__file__", None)),
}))"""

#: what a checkout run leaves behind that a wheel must not be built from
NOT_SOURCE = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "out",
                                    ".ipynb_checkpoints")


def run(command: list, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, (f"{' '.join(map(str, command))} failed:\n"
                                    f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def execute(notebook: Path, python: Path, env: dict) -> nbformat.NotebookNode:
    """Execute ``notebook`` in place with nbclient run by ``python`` (cwd: the notebook's folder)."""
    driver = ("import sys, nbformat\nfrom nbclient import NotebookClient\n"
              "nb = nbformat.read(sys.argv[1], 4)\n"
              "NotebookClient(nb, timeout=1500, kernel_name='python3').execute()\n"
              "nbformat.write(nb, sys.argv[1])\n")
    run([str(python), "-c", driver, str(notebook)], cwd=notebook.parent, env=env, timeout=3000)
    return nbformat.read(str(notebook), 4)


@pytest.fixture(scope="module")
def installed(tmp_path_factory, request):
    """(the environment's python, its site-packages, a folder outside the checkout): the wheel built from a copy of
    the checkout's sources and installed with the notebooks extra into a fresh environment."""
    if not request.config.getoption("--nbmake", default=False):
        pytest.skip("executes notebooks from an installed wheel: runs with --nbmake, as .ci/run does")
    tmp = tmp_path_factory.mktemp("wheel")
    assert not tmp.resolve().is_relative_to(ROOT)
    source = tmp / "source"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCE)  # a build leaves build/ behind: never in the checkout
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp / "dist"), str(source)])
    (wheel,) = (tmp / "dist").glob("boftlab-*.whl")
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}  # nothing points at ROOT
    env |= {"PATH": f"{venv / 'bin'}{os.pathsep}{env['PATH']}", "VIRTUAL_ENV": str(venv)}
    # the base's pip, run by the environment's python, installs into the environment
    run([str(python), "-m", "pip", "install", "-q", f"boftlab[notebooks] @ {wheel.as_uri()}"], cwd=tmp, env=env)
    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=tmp,
                    env=env).stdout.strip())
    assert site.is_relative_to(venv) and site != Path(sysconfig.get_path("purelib"))
    return python, site, tmp / "run", env


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_runs_from_the_installed_wheel(installed, notebook):
    python, site, folder, env = installed
    folder.mkdir(exist_ok=True)
    nb = nbformat.read(str(notebook), 4)
    nb.cells.append(new_code_cell(PROBE))
    copy = folder / notebook.name
    nbformat.write(nb, str(copy))
    executed = execute(copy, python, env)

    (line,) = [line for out in executed.cells[-1].outputs if out.get("name") == "stdout"
               for line in out["text"].splitlines() if line.startswith("PROBE ")]
    probe = json.loads(line.removeprefix("PROBE "))
    assert Path(probe["prefix"]) == python.parent.parent  # the kernel was the environment's python
    assert Path(probe["boftlab"]) == site / "boftlab" / "__init__.py"
    assert probe["modules"] and all(Path(f).is_relative_to(site) for f in probe["modules"])  # no module from ROOT
    assert Path(probe["pretrained"]) == site / "boftlab" / "pretrained"
    assert (site / "boftlab" / "pretrained" / "vit_digits04" / "model.safetensors").is_file()
    assert not [p for p in probe["path"] if p and Path(p).resolve().is_relative_to(ROOT)]
    assert problems(executed, notebook.stem) == []  # its figures, no warning
