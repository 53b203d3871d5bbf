"""The commit protocol: every rank writes into a staging dir, rank 0 commits it durably.

The protocol, step by step, is ``save_checkpoint``'s docstring; its crash
points (``SaveHook``) are what ``--inject-fault RANK@STEP:save-*`` stops.
"""

from __future__ import annotations

import io
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist

from distlab.checkpoint import durable
from distlab.checkpoint.layout import (
    DCP_FORMAT,
    DCP_METADATA_FILE,
    META_FILE,
    RNG_FILE,
    STAGING_PREFIX,
    TRASH_PREFIX,
    checkpoint_dir,
    complete_checkpoints,
)
from distlab.distributed import RankContext


class StateWriter(Protocol):
    """What a save needs of a train step (``TrainStep``): it writes this rank's state."""

    def save_checkpoint(self, directory: Path) -> None:
        """Write this rank's part of model, optimizer and schedule state into ``directory``."""


SaveHook = Callable[[str], None]
"""Called with a stage name (``distlab.fault_spec.SAVE_STAGES``) at each crash point of a save."""


def save_checkpoint(
    train_step: StateWriter,
    run_dir: Path,
    next_step: int,
    ctx: RankContext,
    meta: dict,
    keep: int,
    on_stage: SaveHook | None = None,
) -> Path:
    """Write a checkpoint after ``next_step`` completed steps on every rank, then commit it durably.

    The protocol (every rank calls this; barriers separate the phases):

    1. rank 0 makes ``checkpoints/`` (fsync'ed in the run dir when new) and an
       empty ``.tmp-step_N``;
    2. every rank writes its strategy state (DCP, DeepSpeed's or fairscale's
       files) and its RNG file into ``.tmp-step_N``;
    3. every rank fsyncs every file and directory in ``.tmp-step_N``
       (``durable.fsync_tree``);
    4. rank 0 writes ``meta.json`` (fsync'ed), fsyncs ``.tmp-step_N`` again
       (the new entry), renames it to ``step_N`` and fsyncs ``checkpoints/``:
       from here on ``step_N`` is committed, also across a power loss;
    5. rank 0 rotates: each checkpoint older than the newest ``keep`` is
       renamed to ``.trash-step_K`` (``checkpoints/`` fsync'ed), then deleted.

    If ``step_N`` is already committed (only possible when a run repeats a step
    it had already saved), it is kept and the new copy discarded: the same step
    holds the same state, and a committed checkpoint is never replaced.

    ``on_stage`` is called with the name of each crash point as the save passes
    it (fault injection, ``distlab.train.faults.fire_fault``): ``save`` (this rank's
    strategy state written, RNG file not), ``save-mid-shard`` (its RNG file half
    written), and on rank 0 ``save-before-rename``, ``save-after-rename`` and
    ``save-rotation`` (the first old checkpoint moved to trash, not deleted).
    """
    stage = on_stage or (lambda name: None)
    root = checkpoint_dir(run_dir)
    final = root / f"step_{next_step:06d}"
    staging = root / f"{STAGING_PREFIX}step_{next_step:06d}"
    if ctx.is_main:
        durable.make_dirs(root)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    dist.barrier()
    train_step.save_checkpoint(staging)
    stage("save")
    durable.write_file(
        staging / RNG_FILE.format(rank=ctx.rank),
        _serialize(rng_state(ctx)),
        fsync=False,  # step 3 does it, with the strategy's files
        midway=lambda: stage("save-mid-shard"),
    )
    dist.barrier()
    # Every rank fsyncs all files, not only its own: which rank wrote which file
    # is DCP's and DeepSpeed's business, and on a file system shared by several
    # machines only the machine that wrote a file can flush it. On one machine
    # the repeated fsyncs of clean files cost a few microseconds each.
    durable.fsync_tree(staging)
    dist.barrier()
    if ctx.is_main:
        fmt = DCP_FORMAT if (staging / DCP_METADATA_FILE).is_file() else meta["strategy"]
        full_meta = {
            **meta,
            "next_step": next_step,
            "world_size": ctx.world_size,
            "format": fmt,
            "saved_at": time.time(),
        }
        durable.write_file(staging / META_FILE, json.dumps(full_meta, indent=2).encode())
        commit_checkpoint(staging, final, keep, stage)
    dist.barrier()
    return final


def commit_checkpoint(staging: Path, final: Path, keep: int, stage: SaveHook) -> None:
    """Rank 0's part of a save, once every file in ``staging`` is written and fsync'ed.

    fsync ``staging`` (its entries, ``meta.json`` included), rename it to
    ``final``, fsync the parent, then rotate the old checkpoints out
    (``rotate_checkpoints``). An already committed ``final`` is kept and
    ``staging`` discarded (see ``save_checkpoint``).
    """
    durable.fsync_dir(staging)
    stage("save-before-rename")
    if (final / META_FILE).is_file():
        shutil.rmtree(staging)  # never committed: nothing refers to it
        durable.fsync_dir(final.parent)
    else:
        if final.exists():  # a step dir without meta.json: never committed, safe to drop
            durable.remove_tree(final, final.with_name(TRASH_PREFIX + final.name))
        durable.rename(staging, final)
    stage("save-after-rename")
    rotate_checkpoints(final.parent.parent, keep, stage)


def rotate_checkpoints(run_dir: Path, keep: int, stage: SaveHook | None = None) -> None:
    """Remove all but the newest ``keep`` committed checkpoints, each via a ``.trash-`` name.

    Each old ``step_K`` is renamed to ``.trash-step_K`` and the parent fsync'ed
    before its files are deleted, so a crash never leaves a half-deleted
    ``step_K`` that still has its ``meta.json``. ``stage("save-rotation")`` runs
    after the first one is moved (fault injection).
    """
    for index, old in enumerate(complete_checkpoints(run_dir)[:-keep]):
        hook = (lambda: stage("save-rotation")) if stage is not None and index == 0 else None
        durable.remove_tree(old, old.with_name(TRASH_PREFIX + old.name), after_move=hook)


def _serialize(state: dict[str, torch.Tensor]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def rng_state(ctx: RankContext) -> dict[str, torch.Tensor]:
    """This rank's generator states as tensors."""
    state = {"cpu": torch.get_rng_state()}
    if ctx.device_type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(ctx.device)
    return state
