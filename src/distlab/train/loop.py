"""The strategy-agnostic training loop that runs on every rank.

Build the GPT from the seed, let the strategy prepare its training step, then
for each step take this rank's rows of the deterministic global batch, run the
step, and (on rank 0) record the metrics. The loop never asks which strategy
it runs.

Resuming: if the run dir already has a committed checkpoint, this is a restart
after a failure, and the loop continues from the newest one; otherwise, with
``config.resume`` (a checkpoint of another run, resolved by the launcher), it
starts from that one. Either way the strategy loads the state
(``TrainStep.load_checkpoint``), rank 0 cuts ``metrics.jsonl`` back to the
resumed step, and the batches continue from the step: batch(s) depends only on
the seed and s, so no data-loader state is needed.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from distlab.checkpoint.layout import (
    checkpoint_dir,
    checkpoint_step,
    newest_checkpoint,
    remove_partial_checkpoints,
)
from distlab.checkpoint.save import save_checkpoint
from distlab.checkpoint.state import restore_rng
from distlab.config import (
    Config,
    checkpoint_steps,
    model_label,
    model_shape,
    resolved_seq_len,
)
from distlab.data import global_batch, load_tokens, rank_slice
from distlab.distributed import RankContext
from distlab.fault_spec import FaultSpec
from distlab.model import build_model, count_parameters, flops_per_token
from distlab.run.events import append_event, first_fault_since_last_start, read_events
from distlab.run.events import fault_figures as event_figures
from distlab.run.files import FINAL_WEIGHTS_FILE, LOGS_DIR, METRICS_FILE, read_jsonl
from distlab.run.heartbeat import beat
from distlab.run.recorder import RunRecorder
from distlab.strategies import registry
from distlab.train.faults import fire_fault, pending_faults
from distlab.train.measurements import RunMeasurements


def train(
    ctx: RankContext, config: Config, token_file: Path, run_dir: Path
) -> dict[str, Any] | None:
    """Train up to ``config.steps`` steps; return the summary on rank 0 (None elsewhere)."""
    started = time.time()
    write_pid(run_dir, ctx.rank)
    beat(run_dir, ctx.rank, "setup")
    model_config = model_shape(config)
    seq_len = resolved_seq_len(config)
    tokens = load_tokens(token_file)
    model = build_model(model_config, config.seed)
    strategy = registry.get(config.strategy)
    train_step = strategy.prepare(model, ctx, config)

    checkpoint, own = resume_point(ctx, config, run_dir)
    start_step = 0
    if checkpoint is not None:
        train_step.load_checkpoint(checkpoint)
        restore_rng(checkpoint, ctx)
        start_step = checkpoint_step(checkpoint)
    faults = pending_faults(config, ctx.rank, run_dir)
    measure = RunMeasurements(ctx, config, run_dir)

    attempt, restart = 1, False
    if ctx.is_main:
        remove_partial_checkpoints(run_dir)
        attempt = 1 + sum(e["event"] == "start" for e in read_events(run_dir))
        restart = attempt > 1
        source = checkpoint.parent.parent if checkpoint is not None and not own else None
        lost_steps = rewind_metrics(run_dir, start_step, source)
        append_event(
            run_dir,
            "start",
            attempt=attempt,
            restart=restart,
            from_step=start_step,
            checkpoint=str(checkpoint) if checkpoint else None,
            lost_steps=lost_steps if restart else 0,
            world_size=ctx.world_size,
            strategy=config.strategy,
        )
    tokens_per_step = config.global_batch * seq_len
    parameters = count_parameters(model_config)
    recorder = RunRecorder(config, run_dir) if ctx.is_main else None
    meta = {
        "strategy": config.strategy,
        "nproc": config.nproc,
        "model": config.model,
        "seed": config.seed,
        "steps": config.steps,
    }
    saved_steps = set(checkpoint_steps(config))
    try:
        for step in range(start_step, config.steps):
            fire_fault(faults, FaultSpec(ctx.rank, step), ctx, run_dir)
            batch = global_batch(tokens, config.seed, step, config.global_batch, seq_len)
            inputs, targets = rank_slice(batch, train_step.dp_rank, train_step.dp_size)
            fire_fault(faults, FaultSpec(ctx.rank, step, "raise"), ctx, run_dir)
            lr = train_step.current_lr()
            measure.begin_step(step, train_step.held_tensors())
            with measure.tracking_memory():
                tic = time.perf_counter()
                result = train_step.step(inputs, targets)
                if ctx.device_type == "cuda":
                    torch.cuda.synchronize()
                step_time = time.perf_counter() - tic
            extra = measure.end_step(
                step, step_time, tokens_per_step, train_step.model_state_bytes()
            )
            if recorder is not None:
                recorder.log_step(
                    {
                        "step": step,
                        "loss": result.loss,
                        "lr": lr,
                        "grad_norm": result.grad_norm,
                        "step_time_s": step_time,
                        "tokens_per_s": tokens_per_step / step_time,
                        **result.routing,
                        **extra,
                    },
                    start_step=start_step,
                )
                if step == start_step and (checkpoint is not None or restart):
                    record_resume(run_dir, attempt, start_step, checkpoint, restart)
            beat(run_dir, ctx.rank, "step", step)
            done = step + 1
            if done in saved_steps:
                beat(run_dir, ctx.rank, "save", step)
                save_checkpoint(
                    train_step,
                    run_dir,
                    done,
                    ctx,
                    meta,
                    config.keep_checkpoints,
                    on_stage=lambda stage, done=done: fire_fault(
                        faults, FaultSpec(ctx.rank, done, stage), ctx, run_dir
                    ),
                )
                beat(run_dir, ctx.rank, "step", step)
        beat(run_dir, ctx.rank, "finish", config.steps - 1)
        state_bytes = gather_state_bytes(train_step.model_state_bytes().to_dict(), ctx)
        steady = measure.steady_step_times()  # without the steps that compiled (--compile)
        measured = measure.finish(tokens_per_step / statistics.median(steady) if steady else None)
        if config.save_final_weights:
            weights = train_step.full_model_state_dict()
            if ctx.is_main:
                torch.save(weights, run_dir / FINAL_WEIGHTS_FILE)
    except BaseException:
        if recorder is not None:
            recorder.close_on_error()
        raise
    if recorder is None:
        return None
    metrics = read_jsonl(run_dir / METRICS_FILE)
    median_step = statistics.median(steady or [m["step_time_s"] for m in metrics])
    summary = {
        "strategy": config.strategy,
        "nproc": config.nproc,
        "dp_size": train_step.dp_size,
        "mesh": strategy.mesh_dims(config),
        "model": model_label(config),
        "parameters": parameters,
        "steps": config.steps,
        "steps_run": len(metrics),
        "first_loss": metrics[0]["loss"],
        "final_loss": metrics[-1]["loss"],
        "median_step_time_s": median_step,
        "tokens_per_s": tokens_per_step / median_step,
        "flops_per_token": flops_per_token(model_config, seq_len),
        "model_state_bytes_per_rank": state_bytes[0],
        "model_state_bytes_by_rank": state_bytes,
        "predicted_model_state_bytes_per_rank": strategy.predicted_state_bytes(
            config, parameters
        ).to_dict(),
        "wall_time_s": time.time() - started,
        "run_dir": str(run_dir),
        **run_fault_figures(run_dir, config),
        **measured,
    }
    append_event(run_dir, "finish", steps=config.steps)
    recorder.finish(summary)
    return summary


def gather_state_bytes(local: dict[str, int], ctx: RankContext) -> list[dict[str, int]]:
    """Every rank's model-state bytes, in rank order (complete on rank 0)."""
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, local)
    return gathered


def write_pid(run_dir: Path, rank: int) -> None:
    """``logs/rankR.pid``: this rank's process id, e.g. to kill or stop it from outside."""
    log_dir = run_dir / LOGS_DIR
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / f"rank{rank}.pid").write_text(f"{os.getpid()}\n")


# --- Resuming -------------------------------------------------------------------------


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
        temporary = file.with_suffix(".jsonl.tmp")
        temporary.write_text("".join(json.dumps(m) + "\n" for m in kept))
        os.replace(temporary, file)
    return lost


def record_resume(
    run_dir: Path, attempt: int, start_step: int, checkpoint: Path | None, restart: bool
) -> None:
    """Rank 0, after the first resumed step: log the resume and the time since the fault."""
    events = read_events(run_dir)
    fault = first_fault_since_last_start(_before_last_start(events))
    lost = next((e.get("lost_steps", 0) for e in reversed(events) if e["event"] == "start"), 0)
    append_event(
        run_dir,
        "resume",
        attempt=attempt,
        restart=restart,
        from_step=start_step,
        checkpoint=str(checkpoint) if checkpoint else None,
        lost_steps=lost,
        recovery_s=(time.time() - fault["t"]) if restart and fault else None,
    )


def _before_last_start(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Events up to (not including) the newest ``start``: the failed attempt's faults."""
    last = max((i for i, e in enumerate(events) if e["event"] == "start"), default=len(events))
    return events[:last]


def run_fault_figures(run_dir: Path, config: Config) -> dict[str, Any]:
    """summary.json's fault-tolerance fields."""
    events = read_events(run_dir)
    figures = event_figures(events)
    launch = next((e for e in events if e["event"] == "launch"), None)
    figures["run_wall_time_s"] = round(time.time() - launch["t"], 3) if launch else None
    if config.resume:
        figures["resumed_from"] = {
            "checkpoint": config.resume,
            "step": checkpoint_step(Path(config.resume)),
        }
    return figures
