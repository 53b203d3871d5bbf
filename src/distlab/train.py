"""The strategy-agnostic training loop that runs on every rank.

Build the GPT from the seed, let the strategy prepare its training step, then
for each step take this rank's rows of the deterministic global batch, run the
step, and (on rank 0) record the metrics. The loop never asks which strategy
it runs.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from distlab.checkpoint import save_checkpoint
from distlab.config import Config, resolved_seq_len
from distlab.data import global_batch, load_tokens, rank_slice
from distlab.distributed import RankContext
from distlab.model import PRESETS, build_model, count_parameters, flops_per_token
from distlab.runlog import RunRecorder
from distlab.strategies import registry


def train(
    ctx: RankContext, config: Config, token_file: Path, run_dir: Path
) -> dict[str, Any] | None:
    """Train for ``config.steps`` steps; return the summary on rank 0 (None elsewhere)."""
    started = time.time()
    model_config = PRESETS[config.model]
    seq_len = resolved_seq_len(config)
    tokens = load_tokens(token_file)
    model = build_model(config.model, config.seed)
    strategy = registry.describe(config.strategy)
    train_step = strategy.prepare(model, ctx, config)
    tokens_per_step = config.global_batch * seq_len
    parameters = count_parameters(model_config)
    recorder = (
        RunRecorder(config, run_dir, {"parameters": parameters, "dp_size": train_step.dp_size})
        if ctx.is_main
        else None
    )
    meta = {"strategy": config.strategy, "nproc": config.nproc, "model": config.model}
    losses: list[float] = []
    step_times: list[float] = []
    try:
        for step in range(config.steps):
            batch = global_batch(tokens, config.seed, step, config.global_batch, seq_len)
            inputs, targets = rank_slice(batch, train_step.dp_rank, train_step.dp_size)
            lr = train_step.current_lr()
            tic = time.perf_counter()
            result = train_step.step(inputs, targets)
            if ctx.device_type == "cuda":
                torch.cuda.synchronize()
            step_time = time.perf_counter() - tic
            losses.append(result.loss)
            step_times.append(step_time)
            if recorder is not None:
                recorder.log_step(
                    {
                        "step": step,
                        "loss": result.loss,
                        "lr": lr,
                        "grad_norm": result.grad_norm,
                        "step_time_s": step_time,
                        "tokens_per_s": tokens_per_step / step_time,
                    },
                    start_step=0,
                )
            due = config.checkpoint_every and (step + 1) % config.checkpoint_every == 0
            if due or step + 1 == config.steps:
                save_checkpoint(train_step, run_dir, step + 1, ctx, meta, config.keep_checkpoints)
        state_bytes = gather_state_bytes(train_step.model_state_bytes().to_dict(), ctx)
        if config.save_final_weights:
            weights = train_step.full_model_state_dict()
            if ctx.is_main:
                torch.save(weights, run_dir / "final_weights.pt")
    except BaseException:
        if recorder is not None:
            recorder.close_on_error()
        raise
    if recorder is None:
        return None
    median_step = statistics.median(step_times)
    summary = {
        "strategy": config.strategy,
        "nproc": config.nproc,
        "dp_size": train_step.dp_size,
        "model": config.model,
        "parameters": parameters,
        "steps": config.steps,
        "steps_run": len(losses),
        "first_loss": losses[0],
        "final_loss": losses[-1],
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
    }
    recorder.finish(summary)
    return summary


def gather_state_bytes(local: dict[str, int], ctx: RankContext) -> list[dict[str, int]]:
    """Every rank's model-state bytes, in rank order (complete on rank 0)."""
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, local)
    return gathered
