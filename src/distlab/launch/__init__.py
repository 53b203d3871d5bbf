"""Launching a run (``python -m distlab.launch``): launchers start, watch and restart the ranks.

- ``ray`` (default): Ray Train's TorchTrainer runs one worker per rank on a
  Ray instance started for the run (or the cluster at ``--ray-address``);
  Ray's FailureConfig replaces the worker group after a failure.
- ``local``: one spawned process per rank; the launcher itself restarts them.

Either way a restarted group resumes from the run dir's newest complete
checkpoint, and ``events.jsonl`` records each fault and resume.
"""

from __future__ import annotations

from pathlib import Path

from distlab.config import Config


def run(config: Config) -> Path:
    """Prepare data and run dir, run every rank with the configured launcher, return the run dir.

    Raises ``DistlabError`` with a one-line reason if the run cannot start or a rank fails
    more often than ``config.max_failures`` allows.
    """
    from distlab.launch.events import append_event
    from distlab.launch.prepare import prepare_run

    address = None
    if config.launcher == "ray":
        from distlab.launch.ray_launcher import check_address, resolve_address

        address = resolve_address(config)
        if address:
            check_address(address)
    config, token_file, run_dir = prepare_run(config)
    append_event(
        run_dir,
        "launch",
        launcher=config.launcher,
        strategy=config.strategy,
        nproc=config.nproc,
        resume=config.resume,
        ray_address=address,
    )
    if config.launcher == "ray":
        from distlab.launch.ray_launcher import launch_ray

        launch_ray(config, token_file, run_dir, address)
    else:
        from distlab.launch.local import launch_local

        launch_local(config, token_file, run_dir)
    return run_dir
