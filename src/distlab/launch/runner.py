"""``run(config)``: check, prepare and launch one run with its launcher; ``probe_peak`` for
``--micro-batch auto`` (``distlab.launch`` says what the launchers do)."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

from distlab.config import Config
from distlab.errors import DistlabError
from distlab.launch.local import launch_local
from distlab.launch.micro_batch import PROBE_STEPS, resolve_micro_batch
from distlab.launch.prepare import prepare_run
from distlab.launch.ray_connect import join_cluster, leave_cluster, resolve_address
from distlab.launch.ray_launcher import launch_ray
from distlab.launch.wandb_run import WandbFeed
from distlab.run.events import append_event, read_events
from distlab.run.files import SUMMARY_FILE
from distlab.train.measurements import draw_pictures


def run(config: Config) -> Path:
    """Prepare data and run dir, run every rank with the configured launcher, return the run dir.

    Raises ``DistlabError`` with a one-line reason if the run cannot start or a rank fails
    more often than ``config.max_failures`` allows.
    """
    config = resolve_micro_batch(config, probe_peak, say=_say(config))
    address = None
    if config.launcher == "ray":
        address = resolve_address(config)
        join_cluster(config, address)
    try:
        config, token_file, run_dir = prepare_run(config)
    except BaseException:
        if address:
            leave_cluster()
        raise
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
        if config.ft == "live":
            # torchft reads RUST_LOG when first imported; at info it logs every quorum
            os.environ.setdefault("RUST_LOG", "warn")
        if config.launcher == "ray" and config.ft == "live":
            from distlab.launch.ray_live import launch_ray_live  # torchft: an optional extra

            launch_ray_live(config, token_file, run_dir, address, feed)
        elif config.launcher == "ray":
            launch_ray(config, token_file, run_dir, address, feed)
        elif config.ft == "live":
            from distlab.launch.live import launch_live  # torchft: an optional extra

            launch_live(config, token_file, run_dir, feed)
        else:
            launch_local(config, token_file, run_dir, feed)
        summary = json.loads((run_dir / SUMMARY_FILE).read_text())
        if config.pictures:
            draw_pictures(run_dir, f"{config.strategy} x{config.nproc}")
    finally:
        if feed is not None:
            feed.finish(summary)
    return run_dir


def probe_peak(config: Config) -> int | None:
    """Train ``PROBE_STEPS`` steps of ``config`` in a throw-away run dir (local launcher);
    the largest peak memory over its ranks, or None if a rank ran out of memory."""
    with tempfile.TemporaryDirectory(prefix="distlab-probe-") as directory:
        probe = dataclasses.replace(
            config,
            steps=PROBE_STEPS,
            warmup_steps=min(config.warmup_steps, PROBE_STEPS),
            run_dir=str(Path(directory) / "run"),
            launcher="local",
            wandb=False,
            quiet=True,
            checkpoint_every=0,
            final_checkpoint=False,
            save_final_weights=False,
            pictures=False,
            max_failures=0,
            ft="restart",  # a probe measures memory: the same per rank without torchft
            inject_fault=None,
            resume=None,
        )
        try:
            run_dir = run(probe)
        except DistlabError as exc:
            # The first failure reported may be a peer's lost connection: look at every fault.
            reasons = [str(exc)] + [
                str(e.get("reason", "")) for e in read_events(Path(probe.run_dir))
            ]
            if any("out of memory" in reason.lower() for reason in reasons):
                return None
            raise DistlabError(f"--micro-batch auto: a probe run failed: {exc}") from None
        summary = json.loads((run_dir / SUMMARY_FILE).read_text())
        return max(summary["peak_memory_bytes_by_rank"])


def _say(config: Config):
    """Print a launcher line unless ``--quiet``."""

    def say(line: str) -> None:
        if not config.quiet:
            print(line, flush=True)

    return say
