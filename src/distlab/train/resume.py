"""Where one attempt of a run starts, and the events that record it.

If the run dir already has a committed checkpoint, this is a restart after a
failure, and the rank continues from the newest one; otherwise, with
``config.resume`` (a checkpoint of another run, resolved by the launcher), it
starts from that one. Either way the strategy loads the state
(``TrainStep.load_checkpoint``), rank 0 cuts ``metrics.jsonl`` back to the
resumed step, and the batches continue from the step: batch(s) depends only on
the seed and s, so no data-loader state is needed.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from distlab.atomic_file import write_text_atomically
from distlab.checkpoint.layout import (
    checkpoint_dir,
    checkpoint_step,
    newest_checkpoint,
    remove_partial_checkpoints,
)
from distlab.checkpoint.state import restore_rng
from distlab.config import Config
from distlab.distributed import RankContext
from distlab.run.events import append_event, first_fault_since_last_start, read_events
from distlab.run.files import METRICS_FILE, read_jsonl
from distlab.strategies.base import TrainStep


@dataclass(frozen=True)
class Resumed:
    """The checkpoint this attempt loaded (None: it starts at step 0) and its step."""

    checkpoint: Path | None
    own: bool
    """Whether the checkpoint is this run's own (a restart), not ``config.resume``."""
    start_step: int


@dataclass(frozen=True)
class Attempt:
    """Which attempt of the run this is (1: the first; rank 0 counts, others say 1)."""

    number: int
    restart: bool
    """Whether an earlier attempt of this run started (and failed)."""


def resume(train_step: TrainStep, ctx: RankContext, config: Config, run_dir: Path) -> Resumed:
    """Load the checkpoint to start from (``resume_point``) into the train step and the RNGs."""
    checkpoint, own = resume_point(ctx, config, run_dir)
    if checkpoint is None:
        return Resumed(None, False, 0)
    train_step.load_checkpoint(checkpoint)
    restore_rng(checkpoint, ctx)
    return Resumed(checkpoint, own, checkpoint_step(checkpoint))


def resume_point(ctx: RankContext, config: Config, run_dir: Path) -> tuple[Path | None, bool]:
    """The checkpoint to start from, and whether it is this run's own; rank 0 decides for all.

    A restart (the run dir already holds a committed checkpoint) continues from
    the newest one; else ``config.resume`` if given; else nothing (step 0).
    """
    choice = torch.zeros(2, dtype=torch.int64)
    if ctx.is_main:
        own = newest_checkpoint(run_dir)
        if own is not None:
            choice[:] = torch.tensor([checkpoint_step(own), 1])
        elif config.resume:
            choice[:] = torch.tensor([checkpoint_step(Path(config.resume)), 2])
    if ctx.world_size > 1:
        on_device = choice.to(ctx.device)  # nccl broadcasts GPU tensors only
        dist.broadcast(on_device, src=0)
        choice = on_device.cpu()
    step, where = choice.tolist()
    if where == 1:
        return checkpoint_dir(run_dir) / f"step_{step:06d}", True
    if where == 2:
        return Path(config.resume), False
    return None, False


def record_start(ctx: RankContext, config: Config, run_dir: Path, resumed: Resumed) -> Attempt:
    """Rank 0: drop partial checkpoints, rewind ``metrics.jsonl``, append the ``start`` event."""
    if not ctx.is_main:
        return Attempt(1, False)
    remove_partial_checkpoints(run_dir)
    number = 1 + sum(e["event"] == "start" for e in read_events(run_dir))
    restart = number > 1
    checkpoint = resumed.checkpoint
    source = checkpoint.parent.parent if checkpoint is not None and not resumed.own else None
    lost_steps = rewind_metrics(run_dir, resumed.start_step, source)
    append_event(
        run_dir,
        "start",
        attempt=number,
        restart=restart,
        from_step=resumed.start_step,
        checkpoint=str(checkpoint) if checkpoint else None,
        lost_steps=lost_steps if restart else 0,
        world_size=ctx.world_size,
        strategy=config.strategy,
        nodes=list(ctx.nodes) if ctx.nodes is not None else None,
    )
    return Attempt(number, restart)


def rewind_metrics(run_dir: Path, start_step: int, source_run_dir: Path | None) -> int:
    """Cut ``metrics.jsonl`` to the steps before ``start_step``; return how many were cut.

    A run resumed from another run's checkpoint starts with that run's lines for
    those steps, so its ``metrics.jsonl`` still has one line per step.
    """
    file = run_dir / METRICS_FILE
    own = read_jsonl(file)
    kept = [m for m in own if m["step"] < start_step]
    lost = len(own) - len(kept)
    if source_run_dir is not None and len(kept) < start_step:
        kept = [m for m in read_jsonl(source_run_dir / METRICS_FILE) if m["step"] < start_step]
    if own or kept:
        write_text_atomically(file, "".join(json.dumps(m) + "\n" for m in kept))
    return lost


def record_resume(run_dir: Path, resumed: Resumed, attempt: Attempt) -> None:
    """Rank 0, after the first resumed step: log the resume and the time since the fault."""
    events = read_events(run_dir)
    fault = first_fault_since_last_start(_before_last_start(events))
    lost = next((e.get("lost_steps", 0) for e in reversed(events) if e["event"] == "start"), 0)
    append_event(
        run_dir,
        "resume",
        attempt=attempt.number,
        restart=attempt.restart,
        from_step=resumed.start_step,
        checkpoint=str(resumed.checkpoint) if resumed.checkpoint else None,
        lost_steps=lost,
        recovery_s=(time.time() - fault["t"]) if attempt.restart and fault else None,
    )


def _before_last_start(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Events up to (not including) the newest ``start``: the failed attempt's faults."""
    last = max((i for i, e in enumerate(events) if e["event"] == "start"), default=len(events))
    return events[:last]
