"""Launching a run (``python -m distlab.launch``): launchers start, watch and restart the ranks.

- ``ray`` (default): Ray Train's TorchTrainer runs one worker per rank on a
  Ray instance started for the run (or the cluster at ``--ray-address``);
  Ray's FailureConfig replaces the worker group after a failure.
- ``local``: one spawned process per rank; the launcher itself restarts them.

Either way a restarted group resumes from the run dir's newest complete
checkpoint, ``events.jsonl`` records each fault and resume, a watchdog on the
ranks' step progress kills a hung rank (``launch.watchdog``), and the
launcher's own process writes the run's one W&B run (``launch.wandb_run``).
"""

from __future__ import annotations

import json
from pathlib import Path

from distlab.config import Config
from distlab.launch.local import launch_local
from distlab.launch.prepare import prepare_run
from distlab.launch.ray_launcher import check_address, launch_ray, resolve_address
from distlab.launch.wandb_run import WandbFeed
from distlab.run.events import append_event
from distlab.run.files import SUMMARY_FILE


def run(config: Config) -> Path:
    """Prepare data and run dir, run every rank with the configured launcher, return the run dir.

    Raises ``DistlabError`` with a one-line reason if the run cannot start or a rank fails
    more often than ``config.max_failures`` allows.
    """
    address = None
    if config.launcher == "ray":
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
    feed = WandbFeed.start(config, run_dir)
    summary = None
    try:
        if config.launcher == "ray":
            launch_ray(config, token_file, run_dir, address, feed)
        else:
            launch_local(config, token_file, run_dir, feed)
        summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    finally:
        if feed is not None:
            feed.finish(summary)
    return run_dir
