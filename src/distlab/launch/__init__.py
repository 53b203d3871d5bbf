"""Launching a run (``python -m distlab.launch``): launchers start and watch the ranks."""

from __future__ import annotations

from pathlib import Path

from distlab.config import Config


def run(config: Config) -> Path:
    """Prepare data and run dir, run every rank with the configured launcher, return the run dir.

    Raises ``DistlabError`` with a one-line reason if the run cannot start or a rank fails.
    """
    from distlab.launch.local import launch_local
    from distlab.launch.prepare import prepare_run

    token_file, run_dir = prepare_run(config)
    launch_local(config, token_file, run_dir)
    return run_dir
