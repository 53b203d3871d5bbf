"""The strategy-agnostic training loop that runs on every rank.

Build the GPT from the seed, let the strategy prepare its training step, then
for each step take this rank's rows of the deterministic global batch, run the
step, and (on rank 0) record the metrics. The loop never asks which strategy
it runs.

``--init-from DIR``: the built model's weights are replaced by a GPT-2 directory's
(``distlab.hf.directory``) before the strategy prepares it.

Resuming: a restart after a failure continues from the run dir's newest
committed checkpoint, else ``config.resume``'s checkpoint is loaded
(``distlab.train.resume``); the batches continue from its step.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from distlab.checkpoint.layout import checkpoint_step
from distlab.checkpoint.save import save_checkpoint
from distlab.config import (
    Config,
    checkpoint_steps,
    model_label,
    model_shape,
    resolved_seq_len,
)
from distlab.data import (
    bits_per_byte,
    global_batch,
    load_tokens,
    rank_slice,
    token_facts,
    validation_batch,
    validation_file,
)
from distlab.distributed import RankContext
from distlab.hf.directory import load_directory
from distlab.measure.timeline import phase
from distlab.model import build_model, count_parameters, flops_per_token
from distlab.run.events import append_event, read_events
from distlab.run.events import fault_figures as event_figures
from distlab.run.files import FINAL_WEIGHTS_FILE, METRICS_FILE, pid_file, read_jsonl
from distlab.run.heartbeat import beat
from distlab.run.recorder import RunRecorder
from distlab.strategies import registry
from distlab.strategies.base import StepResult, TrainStep
from distlab.train.faults import fire_fault, pending_faults
from distlab.train.measurements import RunMeasurements
from distlab.train.resume import record_resume, record_start, resume


def train(
    ctx: RankContext, config: Config, token_file: Path, run_dir: Path
) -> dict[str, Any] | None:
    """Train up to ``config.steps`` steps; return the summary on rank 0 (None elsewhere)."""
    started = time.time()
    write_pid(run_dir, ctx.rank)
    beat(run_dir, ctx.rank, "setup")
    trainer = RankTrainer(ctx, config, token_file, run_dir)
    try:
        for step in range(trainer.resumed.start_step, config.steps):
            trainer.run_step(step)
            trainer.save_checkpoint_if_due(step)
        return trainer.conclude(started)
    except BaseException:
        trainer.close_on_error()
        raise


@dataclass(frozen=True)
class RunTotals:
    """What every rank measured over the run, gathered after the last step."""

    state_bytes: list[dict[str, int]]
    """Every rank's model-state bytes, in rank order (complete on rank 0)."""
    steady_step_times: list[float]
    """This rank's step times without the steps that compiled (``--compile``)."""
    measured: dict[str, Any]
    """``RunMeasurements.finish``'s summary fields ({} on ranks other than 0)."""


class RankTrainer:
    """One rank's training run: its prepared train step and what the steps share."""

    def __init__(
        self,
        ctx: RankContext,
        config: Config,
        token_file: Path,
        run_dir: Path,
        prepare: Callable[[nn.Module], TrainStep] | None = None,
    ) -> None:
        """Build the model and the strategy's train step, resume it, and record the start.

        ``prepare``: makes the train step in place of the strategy's own ``prepare`` (live
        recovery wraps the model with torchft: ``distlab.train.live``).
        """
        self.ctx, self.config, self.run_dir = ctx, config, run_dir
        self.model_config = model_shape(config)
        self.seq_len = resolved_seq_len(config)
        self.tokens = load_tokens(token_file)
        self.val_tokens, self.val_facts = None, {}
        """The held-out documents' tokens and ``token_facts`` (``--eval-every``; else None)."""
        if config.eval_every:
            self.val_tokens = load_tokens(validation_file(token_file))
            self.val_facts = token_facts(validation_file(token_file))
        model = build_model(self.model_config, config.seed)
        if config.init_from:  # before the strategy shards or wraps it: the whole weights
            load_directory(model, Path(config.init_from))
        self.strategy = registry.get(config.strategy)
        if prepare is None:
            self.train_step = self.strategy.prepare(model, ctx, config)
        else:
            self.train_step = prepare(model)
        self.resumed = resume(self.train_step, ctx, config, run_dir)
        self.faults = pending_faults(config, ctx.rank, run_dir)
        self.measure = RunMeasurements(ctx, config, run_dir)
        self.attempt = record_start(ctx, config, run_dir, self.resumed)
        self.tokens_per_step = config.global_batch * self.seq_len
        self.recorder = RunRecorder(config, run_dir) if ctx.is_main else None
        self.checkpoint_meta = {
            "strategy": config.strategy,
            "nproc": config.nproc,
            "model": config.model,
            "seed": config.seed,
            "steps": config.steps,
        }
        self.saved_steps = set(checkpoint_steps(config))

    def fire_fault_at(self, step: int, phase: str = "") -> None:
        """This rank's injected fault at ``step`` (and ``phase``), if one is pending."""
        fire_fault(self.faults, step, phase, self.ctx, self.run_dir)

    def run_step(
        self, step: int, measured: Callable[[float], dict[str, Any]] | None = None
    ) -> bool:
        """Train on this rank's rows of batch ``step``, measure it, and (rank 0) record it.

        ``measured``: called with the step's time after the step, the caller's own metrics
        of it, recorded with it (live recovery: the replicas that stepped and their losses,
        the wait for their quorum, the tokens they trained). Returns whether the update was
        applied (``StepResult.committed``); a step that was not is not recorded.
        """
        config = self.config
        self.fire_fault_at(step)
        lr = self.train_step.current_lr()
        self.measure.begin_step(step, self.train_step.held_tensors())
        with self.measure.timing_step(step) as clock:  # the step includes taking its rows
            with phase("data"):
                batch = global_batch(
                    self.tokens, config.seed, step, config.global_batch, self.seq_len
                )
                rows = self.train_step.dp_rank, self.train_step.dp_size
                inputs, targets = rank_slice(batch, *rows)
            self.fire_fault_at(step, "raise")
            with self.measure.tracking_memory():
                result = self.train_step.step(inputs, targets)
            if self.ctx.device_type == "cuda":
                torch.cuda.synchronize()
            step_time = clock.stop()
        extra = self.measure.end_step(
            step, step_time, self.tokens_per_step, self.train_step.model_state_bytes()
        )
        if result.committed:
            extra.update(measured(step_time) if measured is not None else {})
            extra.update(self.validate(step) if self.validation_due(step) else {})
            self._record_step(step, lr, result, step_time, extra)
        beat(self.run_dir, self.ctx.rank, "step", step)
        return result.committed

    def validation_due(self, step: int) -> bool:
        """Whether the run evaluates after step ``step``: every ``--eval-every``, and the last."""
        every = self.config.eval_every
        return every > 0 and ((step + 1) % every == 0 or step + 1 == self.config.steps)

    def validate(self, step: int) -> dict[str, float]:
        """Every rank, after step ``step``: the mean loss over ``--eval-batches`` validation
        batches (the held-out documents), outside the step's timing; as ``metrics.jsonl``'s
        val_loss and val_bpb."""
        assert self.val_tokens is not None, "validate() needs --eval-every"
        config, rows = self.config, (self.train_step.dp_rank, self.train_step.dp_size)
        losses = []
        for index in range(config.eval_batches):
            batch = validation_batch(self.val_tokens, index, config.global_batch, self.seq_len)
            losses.append(self.train_step.evaluate(*rank_slice(batch, *rows)))
            beat(self.run_dir, self.ctx.rank, "step", step)  # progress: not a hang to the watchdog
        val_loss = sum(losses) / len(losses)  # batches of equally many tokens
        return {"val_loss": val_loss, "val_bpb": bits_per_byte(val_loss, self.val_facts)}

    def _record_step(
        self, step: int, lr: float, result: StepResult, step_time: float, extra: dict[str, Any]
    ) -> None:
        """Rank 0: the step's ``metrics.jsonl`` line; after the first resumed step, the resume."""
        if self.recorder is None:
            return
        self.recorder.log_step(
            {
                "step": step,
                "loss": result.loss,
                "lr": lr,
                "grad_norm": result.grad_norm,
                "step_time_s": step_time,
                "tokens_per_s": self.tokens_per_step / step_time,
                "world_size": self.ctx.world_size,
                "time": time.time(),  # when the step ended: throughput over a run's wall time
                **result.routing,
                **extra,
            },
            start_step=self.resumed.start_step,
        )
        first_step = step == self.resumed.start_step
        if first_step and (self.resumed.checkpoint is not None or self.attempt.restart):
            record_resume(self.run_dir, self.resumed, self.attempt)

    def save_checkpoint_if_due(self, step: int) -> None:
        """After step ``step``: save the checkpoint of ``step + 1`` steps done if one is due."""
        done = step + 1
        if done not in self.saved_steps:
            return
        beat(self.run_dir, self.ctx.rank, "save", step)
        save_checkpoint(
            self.train_step,
            self.run_dir,
            done,
            self.ctx,
            self.checkpoint_meta,
            self.config.keep_checkpoints,
            on_stage=lambda stage: self.fire_fault_at(done, stage),
        )
        beat(self.run_dir, self.ctx.rank, "step", step)

    def conclude(
        self, started: float, figures: dict[str, Any] | None = None
    ) -> dict[str, Any] | None:
        """After the last step (every rank: ``finish``'s collectives): rank 0 writes the summary,
        with ``figures`` added, and the ``finish`` event; returns it (None elsewhere)."""
        totals = self.finish()
        if self.recorder is None:
            return None
        summary = {**self.summary(totals, started), **(figures or {})}
        append_event(self.run_dir, "finish", steps=self.config.steps)
        self.recorder.finish(summary)
        return summary

    def close_on_error(self) -> None:
        """Rank 0: stop the progress display and close ``metrics.jsonl`` after a failure."""
        if self.recorder is not None:
            self.recorder.close_on_error()

    def finish(self) -> RunTotals:
        """After the last step (every rank: collectives): the run's totals; the final weights."""
        beat(self.run_dir, self.ctx.rank, "finish", self.config.steps - 1)
        state_bytes = gather_state_bytes(self.train_step.model_state_bytes().to_dict(), self.ctx)
        steady = self.measure.steady_step_times()  # without the steps that compiled (--compile)
        steady_tokens_per_s = self.tokens_per_step / statistics.median(steady) if steady else None
        measured = self.measure.finish(steady_tokens_per_s)
        if self.config.save_final_weights:
            weights = self.train_step.full_model_state_dict()
            if self.ctx.is_main:
                torch.save(weights, self.run_dir / FINAL_WEIGHTS_FILE)
        return RunTotals(state_bytes, steady, measured)

    def summary(self, totals: RunTotals, started: float) -> dict[str, Any]:
        """Rank 0: ``summary.json``'s figures, from ``metrics.jsonl`` and the run's totals."""
        config, run_dir = self.config, self.run_dir
        metrics = read_jsonl(run_dir / METRICS_FILE)
        median_step = statistics.median(
            totals.steady_step_times or [m["step_time_s"] for m in metrics]
        )
        parameters = count_parameters(self.model_config)
        return {
            "strategy": config.strategy,
            "nproc": config.nproc,
            "dp_size": self.train_step.dp_size,
            "mesh": self.strategy.mesh_dims(config),
            "model": model_label(config),
            "parameters": parameters,
            "steps": config.steps,
            "steps_run": len(metrics),
            "first_loss": metrics[0]["loss"],
            "final_loss": metrics[-1]["loss"],
            **final_validation(metrics),
            "median_step_time_s": median_step,
            "tokens_per_s": self.tokens_per_step / median_step,
            "flops_per_token": flops_per_token(self.model_config, self.seq_len),
            "model_state_bytes_per_rank": totals.state_bytes[0],
            "model_state_bytes_by_rank": totals.state_bytes,
            "predicted_model_state_bytes_per_rank": self.strategy.predicted_state_bytes(
                config, parameters
            ).to_dict(),
            "wall_time_s": time.time() - started,
            "run_dir": str(run_dir),
            **run_fault_figures(run_dir, config),
            **totals.measured,
        }


def final_validation(metrics: list[dict[str, Any]]) -> dict[str, float]:
    """summary.json's validation fields: the last evaluation's ({} if the run had none)."""
    evaluated = [m for m in metrics if "val_loss" in m]
    if not evaluated:
        return {}
    return {"final_val_loss": evaluated[-1]["val_loss"], "final_val_bpb": evaluated[-1]["val_bpb"]}


def gather_state_bytes(local: dict[str, int], ctx: RankContext) -> list[dict[str, int]]:
    """Every rank's model-state bytes, in rank order (complete on rank 0)."""
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, local)
    return gathered


def write_pid(run_dir: Path, rank: int) -> None:
    """``logs/rankR.pid``: this rank's process id, e.g. to kill or stop it from outside."""
    file = pid_file(run_dir, rank)
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(f"{os.getpid()}\n")


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
