"""The install files agree: environment.yml's pip section lists exactly pyproject's dependencies + the dev extra
(expanded: dev = boftlab[notebooks] + test tools), and the README's set-up commands are what CI runs."""

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import boftlab

ROOT = Path(__file__).resolve().parents[1]


def requirement_names(requirements):
    return {re.split(r"[<>=!~\[ ]", r, maxsplit=1)[0].lower() for r in requirements}


def pip_section(text):
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "- pip:")
    items = []
    for line in lines[start + 1 :]:
        if not line.startswith("      - "):
            break
        items.append(line.strip()[2:])
    return items


def expand(requirements, extras):
    """``requirements`` with every ``boftlab[extra]`` replaced by that extra's own requirements, recursively."""
    out = []
    for r in requirements:
        match = re.fullmatch(r"boftlab\[(\w+)\]", r)
        out += expand(extras[match.group(1)], extras) if match else [r]
    return out


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert "boftlab[notebooks]" in extras["dev"]  # dev is a superset of notebooks
    declared = project["dependencies"] + expand(extras["dev"], extras)
    listed = [i for i in pip_section((ROOT / "environment.yml").read_text()) if not i.startswith(("-e", "-c"))]
    assert sorted(listed) == sorted(declared)  # same names and the same version bounds
    assert "-e .[dev]" in pip_section((ROOT / "environment.yml").read_text())  # and it installs boftlab itself
    assert "-c constraints.txt" in pip_section((ROOT / "environment.yml").read_text())  # at the lock's versions


def test_readme_commands_are_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    install, test, book = re.findall(r"```bash\n(.*?)```", readme.split("## Set up")[1], re.S)[:3]
    for command in (install, test, book):  # the fourth block, the main job, is run by people, not CI
        for line in command.strip().splitlines():
            assert line.strip() in ci, f"README command not run by .ci/run: {line}"


# --- the version ------------------------------------------------------------------------------------------------------
def test_the_version_is_written_once():
    """boftlab/_version.py holds it and imports nothing; pyproject.toml reads it from there (no number of its own), and
    the modules that write it into files import it from there, not upward from boftlab/__init__.py."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and project["project"]["dynamic"] == ["version"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "boftlab._version.__version__"}
    source = (ROOT / "boftlab" / "_version.py").read_text()
    assert re.findall(r'^__version__ = "([^"]+)"$', source, re.M) == [boftlab.__version__]
    assert not re.search(r"^\s*(import|from) ", source, re.M)
    written = [p.relative_to(ROOT).as_posix() for p in (ROOT / "boftlab").rglob("*.py")
               if re.search(r"^__version__ =", p.read_text(), re.M)]
    assert written == ["boftlab/_version.py"]
    upward = [p.name for p in (ROOT / "boftlab").rglob("*.py") if "from . import __version__" in p.read_text()]
    assert not upward


# --- the core install ------------------------------------------------------------------------------------------------
#: PyPI names whose import name differs by more than "-" -> "_"
IMPORT_NAMES = {"scikit-learn": "sklearn"}

CORE_ONLY = """
import sys
for name in {blocked!r}:
    sys.modules[name] = None  # as if not installed: importing it raises ModuleNotFoundError
import copy, tempfile
import torch
from torch import nn
import boftlab

for family, config_class in boftlab.FAMILIES.items():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    model = boftlab.adapt(copy.deepcopy(base), config_class(), targets=["0", "2"])
    x = torch.randn(3, 16)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    model(x).sum().backward()
    optimizer.step()
    with tempfile.TemporaryDirectory() as directory:
        boftlab.save_adapter(model, directory + "/adapter")
        boftlab.save_checkpoint(model, directory + "/checkpoint", optimizer, step=1)
        boftlab.load_checkpoint(model, directory + "/checkpoint", optimizer)
        torch.testing.assert_close(boftlab.load_adapter(base, directory + "/adapter")(x), model(x))
    expected = model(x)
    torch.testing.assert_close(boftlab.merge(model)(x), expected)
    boftlab.unmerge(model)
    print(family, "ok")
for attempt in ("boftlab.SaveAdapterCallback", "import boftlab.teaching", "import boftlab.reproduce"):
    try:
        exec(attempt)
    except ImportError as err:
        print(attempt, "->", err)
"""


def optional_import_names() -> set[str]:
    """Import names of everything the extras add to the core dependencies."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    optional = requirement_names(expand(extras["dev"], extras)) - requirement_names(project["dependencies"])
    return {IMPORT_NAMES.get(name, name.replace("-", "_")) for name in optional}


def test_the_core_dependencies_run_the_library_and_the_rest_asks_for_the_notebooks_extra():
    blocked = sorted(optional_import_names())
    assert {"matplotlib", "transformers", "sklearn", "peft", "tqdm"} <= set(blocked)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", CORE_ONLY.format(blocked=blocked)], capture_output=True, text=True,
                            cwd=ROOT, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert {f"{family} ok" for family in boftlab.FAMILIES} <= set(lines)  # every family, on the core install
    for attempt in ("boftlab.SaveAdapterCallback", "import boftlab.teaching", "import boftlab.reproduce"):
        message = next(line for line in lines if line.startswith(attempt + " ->"))
        assert 'pip install "boftlab[notebooks]"' in message


# --- package data -----------------------------------------------------------------------------------------------------
def test_what_the_package_reads_ships_in_the_wheel():
    """The ci profile's pretrained models and notebook 09's benchmark reports live inside the package, and every
    one of their files matches pyproject's package-data (so a wheel carries it)."""
    from fnmatch import fnmatch

    from boftlab.bench import RESULTS_DIR, result_files
    from boftlab.reproduce import diffusion, llm, pretrained, results, vit

    package = Path(boftlab.__file__).resolve().parent
    assert pretrained.PRETRAINED_DIR.parent == package and RESULTS_DIR.is_relative_to(package)
    for name in (vit.CHECKPOINT, llm.CHECKPOINT, diffusion.CHECKPOINT, diffusion.CLASSIFIER):
        assert (pretrained.pretrained_dir(name) / "model.safetensors").is_file()
    assert result_files()
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["boftlab"]
    read = [*(p for p in pretrained.PRETRAINED_DIR.rglob("*") if p.is_file()), *result_files(), results.COMMITTED_RESULTS]
    undeclared = [p for p in read
                  if not any(fnmatch(p.relative_to(package).as_posix(), g) for g in patterns)]
    assert not undeclared, f"files boftlab reads that pyproject's package-data leaves out of a wheel: {undeclared}"


# --- the pinned environment -------------------------------------------------------------------------------------------
def lock_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("lock", ROOT / "scripts" / "lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_lock_pins_every_requirement_within_its_declared_bounds():
    from packaging.requirements import Requirement

    lock = lock_module()
    pins = lock.pinned((ROOT / "constraints.txt").read_text())
    for text in lock.requirements():
        requirement = Requirement(text)
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        assert name in pins, f"constraints.txt does not pin {name}"
        version = pins[name].split("==")[1]
        assert requirement.specifier.contains(version, prereleases=True), (text, version)


def test_the_minimums_are_the_declared_lower_bounds():
    minimums = dict(line.split("==") for line in lock_module().minimums())
    assert minimums["torch"] == "2.14.1" and minimums["peft"] == "0.21.2" and minimums["transformers"] == "5.25"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert len(minimums) == sum(">=" in r for r in lock_module().requirements())
    assert project["requires-python"] == ">=3.11"


def test_colab_pins_are_the_locks_versions_and_spare_the_runtime():
    lock = lock_module()
    pins, colab = lock.pinned((ROOT / "constraints.txt").read_text()), lock.pinned(
        (ROOT / "constraints-colab.txt").read_text())
    assert set(colab) == set(lock.COLAB_PINS) and all(pins[name] == line for name, line in colab.items())
    assert not {"torch", "torchvision", "numpy", "ipykernel", "jupyter"} & set(colab)


def test_the_drift_workflow_tests_the_minimums_and_the_newest_releases_weekly():
    workflow = (ROOT / ".github" / "workflows" / "drift.yml").read_text()
    readme = (ROOT / "README.md").read_text()
    test = re.findall(r"```bash\n(.*?)```", readme.split("## Set up")[1], re.S)[1].strip()
    assert "schedule:" in workflow and "cron:" in workflow
    assert "python scripts/lock.py minimums minimums.txt" in workflow and "pip install -c minimums.txt" in workflow
    assert 'pip install --upgrade -e ".[dev]"' in workflow and "constraints.txt" not in workflow.split("steps:")[1]
    assert f"run: {test}" in workflow
