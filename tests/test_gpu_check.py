"""scripts/gpu_check.sh, prepared for a GPU, checked where there is none: it parses, the CUDA tests it runs are
collected and skip cleanly, and without a device it stops after its environment stage with a clear message."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
NO_GPU = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}


def cuda_tests() -> list[str]:
    """The test files the script's CUDA stage runs (its CUDA_TESTS=(...) line)."""
    match = re.search(r"^CUDA_TESTS=\(([^)]*)\)", SCRIPT.read_text(), re.MULTILINE)
    assert match, "gpu_check.sh must list its test files in one CUDA_TESTS=(...) line"
    return match.group(1).split()


def pytest_run(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
    return subprocess.run(command, cwd=ROOT, env=NO_GPU, capture_output=True, text=True, timeout=600)


def test_script_parses_and_is_executable():
    assert os.access(SCRIPT, os.X_OK)
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_stage_limits_fit_in_eight_minutes():
    limits = re.search(r"^LIMIT_ENV=(\d+) LIMIT_TESTS=(\d+) LIMIT_BENCH=(\d+) LIMIT_NOTEBOOK=(\d+)$",
                       SCRIPT.read_text(), re.MULTILINE)
    notebooks = re.search(r"^for notebook in (.*); do$", SCRIPT.read_text(), re.MULTILINE).group(1).split()
    assert limits and notebooks
    env, tests, bench, per_notebook = (int(v) for v in limits.groups())
    assert env + tests + bench + len(notebooks) * per_notebook <= 8 * 60


def test_cuda_tests_are_collected():
    files = cuda_tests()
    assert files and all((ROOT / f).is_file() for f in files)
    result = pytest_run("--collect-only", *files)
    collected = re.search(r"(\d+) tests? collected", result.stdout)
    assert result.returncode == 0 and collected and int(collected.group(1)) > 100, result.stdout[-3000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_cuda_only_tests_skip_cleanly_without_a_gpu():
    result = pytest_run("-rs", "tests/test_cuda.py")
    summary = result.stdout.strip().splitlines()[-1]
    assert result.returncode == 0 and re.fullmatch(r"1 passed, \d+ skipped in .*", summary), result.stdout[-3000:]
    assert "needs a CUDA GPU (scripts/gpu_check.sh runs these on one)" in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_script_stops_without_a_gpu(tmp_path):
    result = subprocess.run(["bash", str(SCRIPT)], env={**NO_GPU, "OUT": str(tmp_path)}, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "no CUDA device is visible to torch" in (tmp_path / "environment.log").read_text()
    assert (tmp_path / "summary.txt").read_text().startswith("environment: exit 1")
