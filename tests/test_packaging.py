"""The install files agree: environment.yml's pip section lists exactly pyproject's dependencies + dev extras."""

import re
import tomllib
from pathlib import Path

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


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + project["optional-dependencies"]["dev"]
    listed = [i for i in pip_section((ROOT / "environment.yml").read_text()) if not i.startswith("-e")]
    assert sorted(listed) == sorted(declared)  # same names and the same version bounds
    assert "-e .[dev]" in pip_section((ROOT / "environment.yml").read_text())  # and it installs boftlab itself


def test_readme_commands_are_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    install, test = re.findall(r"```bash\n(.*?)```", readme.split("## Set up")[1], re.S)[:2]
    for command in (install, test):  # the third block, the main job, is run by people, not CI
        for line in command.strip().splitlines():
            assert line.strip() in ci, f"README command not run by .ci/run: {line}"
