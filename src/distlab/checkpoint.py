"""Atomic, rotating checkpoints inside a run dir.

A checkpoint is written by every rank into ``checkpoints/.tmp-step_NNNNNN`` and
renamed to ``checkpoints/step_NNNNNN`` by rank 0 only after every rank has
finished writing, so a crash during a save leaves the previous checkpoint
intact. ``meta.json`` inside records the next step to run and the run's shape.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch.distributed as dist

from distlab.distributed import RankContext
from distlab.strategies.base import TrainStep

META_FILE = "meta.json"


def checkpoint_dir(run_dir: Path) -> Path:
    """Where a run's checkpoints live."""
    return run_dir / "checkpoints"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Committed checkpoints of a run, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / META_FILE).is_file())


def save_checkpoint(
    train_step: TrainStep, run_dir: Path, next_step: int, ctx: RankContext, meta: dict, keep: int
) -> Path:
    """Write a checkpoint after step ``next_step - 1`` on every rank, then commit it."""
    root = checkpoint_dir(run_dir)
    final = root / f"step_{next_step:06d}"
    staging = root / f".tmp-step_{next_step:06d}"
    if ctx.is_main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    dist.barrier()
    train_step.save_checkpoint(staging)
    dist.barrier()
    if ctx.is_main:
        (staging / META_FILE).write_text(json.dumps({**meta, "next_step": next_step}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
        for old in complete_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final
