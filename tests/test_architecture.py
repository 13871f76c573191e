"""The package's layers and the test suite's own architecture: every import in boftlab/ points down the layers the
README's Architecture section draws, the core's tests load no plotting library, every marker is registered (and
``--strict-markers`` refuses a misspelt one), and notebooks are found by their titles."""

import ast
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from helpers import NOTEBOOKS, notebook_title, notebook_titled

ROOT = Path(__file__).resolve().parents[1]
#: the tests of boftlab's core: one module per library module (tests mirror the library), teaching code aside
CORE_TESTS = sorted(f"tests/test_{path.stem}.py" for path in (ROOT / "boftlab").glob("*.py")
                    if (ROOT / "tests" / f"test_{path.stem}.py").is_file())
PLOTTING = ("matplotlib", "seaborn", "plotly", "bokeh", "ipywidgets")

#: boftlab's layers, bottom up (the README's Architecture section): a module imports only from its own layer and the
#: ones below. A subpackage counts as one module; "boftlab" is the package's __init__ (the public names).
LAYERS = (
    ("leaves", {"_version", "base_layers", "butterfly_structure", "kernels", "profiles", "report"}),
    ("contract", {"contract"}),
    ("families", {"butterfly", "surm", "tensor_core"}),
    ("api", {"model", "saving", "checkpoints", "hf_trainer", "peft_interop", "counts"}),
    ("package", {"boftlab"}),
    ("tools", {"bench", "reproduce", "teaching", "__main__"}),
)
#: upward imports allowed: none (the version lives in _version, the report helpers in report), so none comes back unseen
UPWARD: set[tuple[str, str]] = set()


def imports(path: Path) -> set[str]:
    """The boftlab modules ``path`` imports (at the top or inside a function), each as its unit: the first name
    under boftlab (a module or a subpackage), or "boftlab" for the package itself."""
    module = path.relative_to(ROOT).with_suffix("").parts  # ("boftlab", "bench", "layers")
    package = module[:-1]  # what a relative import starts from (for an __init__, its own package)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1]
            targets = [(*base, *node.module.split("."))] if node.module else [(*base, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "boftlab":
            targets = [tuple(node.module.split("."))]
        elif isinstance(node, ast.Import):
            targets = [tuple(a.name.split(".")) for a in node.names if a.name.split(".")[0] == "boftlab"]
        else:
            continue
        for target in targets:
            unit = target[1] if len(target) > 1 else "boftlab"
            found.add("boftlab" if unit == "__version__" else unit)
    return found


def unit(path: Path) -> str:
    parts = path.relative_to(ROOT / "boftlab").with_suffix("").parts
    return "boftlab" if parts == ("__init__",) else parts[0]


def test_every_import_in_the_package_points_down_its_layers():
    layer_of = {name: i for i, (_, names) in enumerate(LAYERS) for name in names}
    files = sorted((ROOT / "boftlab").rglob("*.py"))
    units = {unit(path) for path in files}
    assert units == set(layer_of), f"modules in no layer: {sorted(units - set(layer_of))} (add them to LAYERS)"
    upward = {(unit(path), target) for path in files for target in imports(path)
              if target in layer_of and layer_of[target] > layer_of[unit(path)]}
    new, gone = sorted(upward - UPWARD), sorted(UPWARD - upward)
    assert upward == UPWARD, f"new upward imports: {new}; gone (drop them from UPWARD): {gone}"

#: boftlab.reproduce's modules by concern, bottom up: each imports only the ones before it; the domains (vit, llm,
#: diffusion) and the package's __init__ sit above them all
REPRODUCE = ("methods", "data", "pretrained", "task", "memory", "runner", "protocol", "results", "domain")


def test_the_reproduction_modules_import_one_way():
    package = ROOT / "boftlab" / "reproduce"
    found = {path.stem for path in package.glob("*.py")} - {"__init__", "vit", "llm", "diffusion"}
    assert found == set(REPRODUCE), f"modules of boftlab.reproduce in no place: {sorted(found - set(REPRODUCE))}"
    for i, name in enumerate(REPRODUCE):
        targets = set()
        for node in ast.walk(ast.parse((package / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                targets |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("boftlab.reproduce"):
                targets.add(node.module.split(".")[2] if node.module.count(".") > 1 else "__init__")
        later = sorted(targets - set(REPRODUCE[:i]))
        assert not later, f"boftlab/reproduce/{name}.py imports {later}, which sit above it ({REPRODUCE})"


#: runs pytest in this process with the arguments given, then reports which plotting libraries it loaded
PROBE = f"""import json, sys
import pytest
code = pytest.main(sys.argv[1:])
loaded = sorted({{name.split(".")[0] for name in sys.modules}} & {set(PLOTTING)!r})
print("PROBE " + json.dumps({{"code": int(code), "loaded": loaded}}))
"""


@pytest.mark.slow  # collects every core test module in a fresh interpreter: 30-60 s on a loaded 2-core CPU
def test_the_core_tests_load_no_plotting_library():
    """conftest.py, helpers.py and every core test module imported (collected), and the contract's identity tests run:
    no plotting library is loaded — a core test that needs one belongs with the teaching tests."""
    assert "tests/test_contract.py" in CORE_TESTS and "tests/test_butterfly.py" in CORE_TESTS
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("MPLBACKEND", None)
    command = [sys.executable, "-c", PROBE, "-q", "-p", "no:cacheprovider", *CORE_TESTS, "-k", "test_identity_at_init"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("PROBE ")]
    report = json.loads(line.removeprefix("PROBE "))
    assert report["code"] == 0, result.stdout[-3000:]
    assert report["loaded"] == [], f"core tests loaded {report['loaded']}"


@pytest.mark.slow  # a pytest in a fresh interpreter: 5-15 s on a loaded 2-core CPU
def test_the_markers_are_registered_and_strict(tmp_path):
    """slow, gpu and notebooks are declared in pyproject.toml; with --strict-markers a misspelt one fails the run at
    collection instead of silently selecting nothing."""
    options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "--strict-markers" in options["addopts"].split()
    assert {line.split(":")[0] for line in options["markers"]} == {"slow", "gpu", "notebooks"}
    test = tmp_path / "test_misspelt.py"
    test.write_text("import pytest\n\n\n@pytest.mark.slwo\ndef test_nothing():\n    pass\n")
    command = [sys.executable, "-m", "pytest", "--co", "-q", "-p", "no:cacheprovider",
               "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(tmp_path), str(test)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode != 0 and "'slwo' not found in `markers` configuration option" in result.stdout


def test_every_notebook_is_found_by_its_title():
    """A test names a notebook by its title (its first heading, without the number), never by its file name, so
    renumbering the course breaks no test; a title that matches none or several is refused, listing them all."""
    paths = sorted(NOTEBOOKS.glob("*.ipynb"))
    assert len(paths) >= 10
    for path in paths:
        assert notebook_titled(notebook_title(path)) == path
    assert notebook_titled("Quick start").name.endswith("quickstart.ipynb")
    with pytest.raises(ValueError, match=r"^3 notebooks have a title beginning with 'Fine-tuning a ' \(one is needed\)"
                                         r": .*vit_finetuning.ipynb: 'Fine-tuning a vision transformer"):
        notebook_titled("Fine-tuning a ")
    with pytest.raises(ValueError, match=r"^0 notebooks have a title beginning with 'Origami'"):
        notebook_titled("Origami")
