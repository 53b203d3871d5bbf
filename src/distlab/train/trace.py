"""One training step of any layout at any world size, traced in one process, no ranks started.

``trace_step(config)`` runs the lab's own step for ``config`` (the strategy's
``prepare``, the train loop's batch and rank slice, ``TrainStep.step`` and the
memory tracker every real run uses) as rank 0 of ``config.nproc`` ranks, where

- the process group is PyTorch's fake backend: every collective returns at
  once and moves nothing, so no other rank has to exist;
- every tensor is a ``FakeTensor`` (``FakeTensorMode``): shape, dtype and
  storage without values or memory, so a 7B model at 1,024 ranks costs
  seconds and a few hundred MB.

torch's tracker (``distlab.measure.step_memory``) files each fake storage by
category as in a real run. Two steps run, as in a run: the first creates the
optimizer state; the second, the steady state that a run's summary reports
and ``distlab.theory.memory`` predicts, is measured. At 2 and 4 ranks the
trace gives a real run's measured peak to the byte (``tests/test_trace.py``).

The loss and gradient norm read as NaN (``distlab.values.scalar``); what else
fake ranks change, none of it a byte held, is in ``distlab.train.fake_ranks``.
What cannot be traced is refused in one line (``untraceable``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from distlab.config import Config, model_shape, resolved_seq_len
from distlab.data import global_batch, rank_slice
from distlab.errors import DistlabError
from distlab.measure.step_memory import StepMemory
from distlab.model import build_model
from distlab.strategies import registry
from distlab.train.fake_ranks import adapt_ddp, fake_ranks

DEEPSPEED = "DeepSpeed's engine builds its flat buffers and runs its C++ ops on real memory"
FAIRSCALE = "fairscale's OSS decides whether to clip by reading the gradient norm's value"
REFUSED = {
    "zero1": DEEPSPEED,
    "zero2": DEEPSPEED,
    "zero3": DEEPSPEED,
    "fairscale-oss": FAIRSCALE,
    "fairscale-sdp": FAIRSCALE,
    "ep": "expert parallelism routes tokens by their values (data-dependent shapes)",
}
"""Strategies whose step fake tensors cannot run, and why."""
PIPELINE = (
    "torch.distributed.pipelining checks its peers before the first step by reading a "
    "value they send"
)


def check_traceable(config: Config) -> None:
    """A one-line ``DistlabError`` if ``config``'s step cannot be traced (``untraceable``)."""
    reason = untraceable(config)
    if reason is not None:
        raise DistlabError(f"--trace cannot trace strategy {config.strategy}: {reason}")


def untraceable(config: Config) -> str | None:
    """Why ``config``'s step cannot be traced with fake ranks, or None if it can."""
    if config.strategy in REFUSED:
        return REFUSED[config.strategy]
    if "pp" in registry.get(config.strategy).options:
        return PIPELINE
    if model_shape(config).n_expert:
        return "a mixture-of-experts block routes tokens by their values (data-dependent shapes)"
    if config.compile:
        return (
            "--compile: torch.compile does not compile while a memory tracker runs, so the "
            "trace would measure the eager step; trace without --compile"
        )
    return None


@dataclass(frozen=True)
class TracedStep:
    """Rank 0's memory in the traced steady-state step, as torch's tracker filed it."""

    world_size: int
    memory: StepMemory
    seconds: float
    """Wall time of the whole trace (model, strategy, two steps)."""

    @property
    def by_category(self) -> dict[str, int]:
        """Bytes at the peak, by the lab's category (``step_memory.CATEGORIES``)."""
        return dict(self.memory.peak_by_category)

    @property
    def total(self) -> int:
        """The peak."""
        return self.memory.peak

    @property
    def phase(self) -> str:
        """forward, backward or optimizer: when the peak happened."""
        return self.memory.peak_phase


def trace_step(config: Config) -> TracedStep:
    """Trace two steps of ``config`` as rank 0 of ``config.nproc`` fake ranks; measure the second.

    Raises ``DistlabError`` (one line) for a strategy or flag the trace cannot run.
    """
    check_traceable(config)
    started = time.perf_counter()
    seq = resolved_seq_len(config)
    with fake_ranks(config.nproc) as ctx:
        model = build_model(model_shape(config), config.seed)
        train_step = registry.get(config.strategy).prepare(model, ctx, config)
        adapt_ddp(train_step)
        corpus = torch.zeros(seq + 2, dtype=torch.uint8)  # a fake corpus: no values needed

        def rows(step: int) -> tuple[torch.Tensor, torch.Tensor]:
            batch = global_batch(corpus, config.seed, step, config.global_batch, seq)
            return rank_slice(batch, train_step.dp_rank, train_step.dp_size)

        train_step.step(*rows(0))  # creates the optimizer state
        # imported here: torch's trackers cost 0.7 s to import, which every launch and plan
        # command (they import this module) would otherwise pay, traced or not
        from distlab.measure.step_tracker import StepMemoryTracker

        tracker = StepMemoryTracker(train_step.held_tensors(), ctx.device)
        with tracker:
            train_step.step(*rows(1))
    return TracedStep(config.nproc, tracker.result(), time.perf_counter() - started)
