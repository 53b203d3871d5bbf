"""Helpers for tests that run distlab's commands as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_command(module: str, *args: str, timeout: float = 300, cwd: Path | None = None):
    """Run ``python -m module args...`` and return the CompletedProcess (text output)."""
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=cwd or ROOT,
    )


def assert_one_line_error(result, fragment: str) -> None:
    """The command failed with exit 2 and one ``distlab: error:`` line mentioning ``fragment``."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("distlab: error:"), lines[0]
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.stdout + result.stderr
