"""The code base stays ruff-clean (pyflakes, pycodestyle, isort, bugbear, pyupgrade)."""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parent.parent


def test_ruff_clean():
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "src", "tests", "bench"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
