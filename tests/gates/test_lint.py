"""The gates as a test: tools/lint.sh (import-linter, ruff, mypy --strict) must
report zero findings (docs/architecture.md, "Gates").

It is a test so that the host pytest run, which ./run-tests runs and every
engineer runs before landing, holds to the gates.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_lint_gates_report_zero_findings() -> None:
    venv = Path(sys.executable).parent.parent
    proc = subprocess.run(
        ["bash", str(ROOT / "tools" / "lint.sh")],
        cwd=ROOT, env={**os.environ, "QKDGATE_VENV": str(venv)},
        capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-20000:] + proc.stderr[-5000:]
