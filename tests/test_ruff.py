"""ruff, configured in pyproject.toml ([tool.ruff]), finds nothing in src, tests and bench.

RUF100 is selected, so every `noqa` comment must name a rule that fires on its line: the suppressions stay
true as the code changes.  ruff comes with the test extra (`pip install -e .[test]`, which ./dev.sh runs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing() -> None:
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "src", "tests", "bench"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "No module named ruff" not in result.stderr, "ruff is missing: pip install -e .[test]"
    assert result.returncode == 0, result.stdout + result.stderr
