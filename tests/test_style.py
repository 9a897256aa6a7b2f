"""The linter and the formatter configured in pyproject.toml (ruff, line length 120) hold for the whole code base."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def _ruff(*args):
    if (
        shutil.which("ruff") is None
        and subprocess.run([sys.executable, "-m", "ruff", "--version"], capture_output=True).returncode != 0
    ):
        pytest.skip("ruff is not installed (pip install -e '.[dev]')")
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args, "mtl", "tests", "benchmarks"], cwd=ROOT, capture_output=True, text=True
    )


def test_ruff_finds_nothing():
    done = _ruff("check")
    assert done.returncode == 0, done.stdout[-3000:]


def test_the_code_is_formatted():
    done = _ruff("format", "--check")
    assert done.returncode == 0, done.stdout[-3000:]
