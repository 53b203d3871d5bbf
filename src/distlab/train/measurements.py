"""What every step measures beyond the loss, and the theory beside it (the train loop's hook).

``RunMeasurements`` is created on every rank after ``strategy.prepare``; the
train loop brackets each step with ``begin_step`` / ``end_step``, runs the step
inside ``tracking_memory``, and calls ``finish`` (a collective: every rank) after
the last step::

    measure = RunMeasurements(ctx, config, run_dir)
    for step in ...:
        measure.begin_step(step, train_step.held_tensors())
        with measure.tracking_memory():
            result = train_step.step(inputs, targets)
        metrics.update(measure.end_step(step, step_time, tokens_per_step,
                                        train_step.model_state_bytes()))
    summary.update(measure.finish(tokens_per_s))       # {} on ranks other than 0

Per step, rank 0's metrics gain ``mfu``, ``peak_memory_bytes`` and the
``comm/*`` keys of its own collectives; every rank appends the same figures for
itself to ``ranks/rank<r>.jsonl`` in the run dir (no collective needed).
``finish`` gathers each rank's peak memory and typical step communication
once, and adds the predictions of ``distlab.theory``. Every rank writes the
memory timeline of one step (``ranks/memory_rank<r>.json``) and the timelines
of its time-tracked steps (``ranks/time_rank<r>.json``; rank 0 merges them into
``trace.json``); the launcher draws them into ``memory_timeline.png`` and
``time_rank_gantt.png`` when the ranks are done (``draw_pictures``; the ranks
never import a plotting library): a picture that fails to draw costs a one-line
warning, never the finished run.

With ``--compile`` each step also records ``compile_s``, the seconds this rank
spent compiling in it (``distlab.measure.compile_time``: step 0's forward and
backward, nothing after unless something recompiles). The steady-state step
time (``steady_step_times``, behind the run's ``tokens_per_s`` and MFU) leaves
out the steps in which rank 0 compiled; ``finish`` adds ``compile_s`` (the
slowest rank's total), per rank, and the steps in which any rank compiled.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.profiler import record_function

from distlab import theory
from distlab.config import Config, model_shape, resolved_seq_len
from distlab.distributed import RankContext
from distlab.errors import first_line
from distlab.measure import mfu
from distlab.measure.compile_time import compile_cache_counts, compile_seconds
from distlab.measure.counter import counter
from distlab.measure.memory import ModelStateBytes, peak_memory_bytes
from distlab.measure.memory_timeline import draw_memory_timelines
from distlab.measure.process_group import is_counting
from distlab.measure.profiler_time import STEP_SPAN, profiler_breakdown, profiling_step
from distlab.measure.step_memory import HeldTensors, StepMemory, cuda_peaks
from distlab.measure.time_gantt import draw_time_gantt
from distlab.measure.timeline import StepTimeline, set_active
from distlab.model import flops_per_token
from distlab.run.chrome_trace import write_chrome_trace
from distlab.run.files import (
    MEMORY_TIMELINE_PNG,
    RANKS_DIR,
    TIME_GANTT_PNG,
    memory_rank_file,
    profile_file,
    read_memory_ranks,
    read_time_ranks,
    time_rank_file,
)
from distlab.train.sampling import tracks_memory, tracks_time

if TYPE_CHECKING:
    from distlab.measure.step_tracker import StepMemoryTracker


@dataclass
class StepClock:
    """A step's wall time, from its start to ``stop()``. On a time-tracked step these are the
    timeline's own start and end, so the step time is the window its categories split."""

    timeline: StepTimeline | None = None
    span: record_function | None = None
    """The profiler's ``distlab:step`` span (``--profile``), open inside the timeline's window."""
    start: float = field(default_factory=time.perf_counter)

    def stop(self) -> float:
        """Seconds since the step started (a later call changes nothing)."""
        if self.timeline is None:
            return time.perf_counter() - self.start
        if self.span is not None:
            # Closed right before the timeline ends, as it opened right after the timeline began:
            # the two clocks then time the same step but for a few microseconds at each end.
            self.span.__exit__(None, None, None)
            self.span = None
        return self.timeline.end()


class RunMeasurements:
    """Per-step MFU, peak memory and communication of one rank; run totals and theory."""

    def __init__(self, ctx: RankContext, config: Config, run_dir: Path) -> None:
        self.ctx = ctx
        self.config = config
        self.counter = counter() if is_counting() else None
        self.flops_per_token = flops_per_token(model_shape(config), resolved_seq_len(config))
        self.peak: mfu.PeakFlops | None = None
        self.ranks = mfu.effective_ranks(ctx.device_type, ctx.world_size, config.threads_per_rank)
        if ctx.is_main:
            self.peak = mfu.peak_flops(ctx.device, config.precision, config.threads_per_rank)
        self.run_dir = Path(run_dir)
        rank_dir = self.run_dir / RANKS_DIR
        rank_dir.mkdir(parents=True, exist_ok=True)
        self.rank_file_path = rank_dir / f"rank{ctx.rank}.jsonl"
        self.rank_file = self.rank_file_path.open("a", buffering=1)
        self.steps: list[dict[str, Any]] = []
        self.compiled_before_step = 0.0
        self.step_memory: StepMemory | None = None
        self.tracker: StepMemoryTracker | None = None
        self.peak_step: tuple[int, StepMemory] | None = None
        """(index in ``steps``, memory) of the last step: the steady state (optimizer
        state allocated, buckets built), the one theory predicts."""
        self.step_time: dict[str, Any] | None = None
        self.time_steps: list[dict[str, Any]] = []
        """The time-tracked steps' timelines and breakdowns (``--track-time``)."""
        self.profiled_steps: list[dict[str, Any]] = []
        """The same steps' breakdowns from torch.profiler's traces (``--profile``)."""

    def begin_step(self, step: int, held: HeldTensors) -> None:
        """Start counting this step's collectives (and its compile time with --compile);
        prepare the memory tracker if this step is tracked."""
        if self.counter is not None:
            self.counter.begin_step()
        if self.config.compile:
            self.compiled_before_step = compile_seconds()
        if tracks_memory(self.config, step, len(self.steps)):
            # imported here, by the first tracked step: torch's trackers cost a rank 0.7 s
            # of CPU to import, which a resumed rank would otherwise pay before its first step
            from distlab.measure.step_tracker import StepMemoryTracker

            self.tracker = StepMemoryTracker(held, self.ctx.device)
        elif self.ctx.device_type == "cuda":  # the allocator's count still comes per step
            torch.cuda.reset_peak_memory_stats(self.ctx.device)

    @contextmanager
    def tracking_memory(self) -> Iterator[None]:
        """Around the step itself: torch's memory tracker sees every tensor it creates."""
        if self.tracker is None:  # an untracked step (--track-memory)
            yield
            return
        with self.tracker:
            yield
        self.step_memory = self.tracker.result()
        self.tracker = None
        self.peak_step = (len(self.steps), self.step_memory)

    @contextmanager
    def timing_step(self, step: int) -> Iterator[StepClock]:
        """Around the whole step, data included: its clock, and where its time goes if it is
        sampled (``--track-time``; ``distlab.measure.timeline``)."""
        if not tracks_time(self.config, step, len(self.steps)):
            yield StepClock()
            return
        record = StepTimeline(step, profiled=self.config.profile)
        trace = profile_file(self.run_dir, self.ctx.rank)
        with profiling_step(trace) if self.config.profile else nullcontext():
            set_active(record)  # the counting process group reports each collective to it
            record.begin()
            clock = StepClock(record, record_function(STEP_SPAN) if self.config.profile else None)
            if clock.span is not None:
                clock.span.__enter__()
            try:
                yield clock
            finally:
                clock.stop()
                set_active(None)
        self.step_time = record.breakdown()
        if self.config.profile:  # the same step, from the profiler's trace alone
            self.profiled_steps.append({"step": step, **profiler_breakdown(trace)})

    def end_step(
        self,
        step: int,
        step_time: float,
        tokens_per_step: int,
        state_bytes: ModelStateBytes | None = None,
    ) -> dict[str, Any]:
        """Extra metrics of this step (rank 0 logs them); also in ``ranks/rank<r>.jsonl``."""
        line: dict[str, Any] = {
            "step": step,
            "step_time_s": step_time,
            "peak_memory_bytes": peak_memory_bytes(self.ctx.device),
        }
        if self.step_memory is not None:
            line.update(self.step_memory.to_metrics())
            line["memory_tracked"] = True
            self.step_memory = None
        elif self.ctx.device_type == "cuda":
            line.update(cuda_peaks(self.ctx.device))
        if state_bytes is not None:
            line.update({f"model_state/{k}": v for k, v in state_bytes.to_dict().items()})
        if self.config.compile:
            line["compile_s"] = compile_seconds() - self.compiled_before_step
        if self.step_time is not None:
            breakdown = self.step_time
            self.step_time = None
            breakdown["step_time_s"] = step_time
            self.time_steps.append(breakdown)
            line.update({f"time/{k}": v for k, v in breakdown["by_category"].items()})
            line["time/overlapped_comm"] = breakdown["overlapped_comm"]
            if breakdown["overlap_fraction"] is not None:  # None: nothing communicated
                line["time/overlap_fraction"] = breakdown["overlap_fraction"]
        if self.counter is not None:
            stats = self.counter.end_step()
            line.update(stats.to_metrics())
            line["comm/by_group"] = {
                group: {kind: totals.bytes for kind, totals in kinds.items()}
                for group, kinds in stats.groups.items()
            }
        self.rank_file.write(json.dumps(line) + "\n")
        self.steps.append(line)
        metrics = {
            k: v for k, v in line.items() if k not in ("step", "step_time_s", "comm/by_group")
        }
        if self.peak is not None:
            metrics["mfu"] = mfu.mfu(
                self.flops_per_token, tokens_per_step / step_time, self.peak.flops, self.ranks
            )
        return metrics

    def steady_step_times(self) -> list[float]:
        """Step times of the steps in which this rank compiled nothing and no memory tracker
        ran (relaxed in that order when no step qualifies)."""
        plain = [s for s in self.steps if not s.get("compile_s")] or self.steps
        untracked = [s for s in plain if not s.get("memory_tracked")] or plain
        return [s["step_time_s"] for s in untracked]

    def typical_step(self) -> dict[str, Any]:
        """This rank's step with the median communication volume, first step excluded."""
        steps = self.steps[1:] or self.steps
        if not steps:
            return {}
        ordered = sorted(steps, key=lambda s: (s.get("comm/bytes", 0), s["step_time_s"]))
        return ordered[(len(ordered) - 1) // 2]

    def write_memory_timeline(self) -> dict[str, Any] | None:
        """Write ``ranks/memory_rank<r>.json`` (the last step's timeline); return its peak."""
        if self.peak_step is None:
            return None
        index, memory = self.peak_step
        record = {
            "rank": self.ctx.rank,
            "step": self.steps[index]["step"],
            "peak": memory.peak,
            "peak_phase": memory.peak_phase,
            "peak_by_category": memory.peak_by_category,
            "cuda_peak_allocated": memory.cuda_peak_allocated,
            "cuda_peak_reserved": memory.cuda_peak_reserved,
        }
        path = memory_rank_file(self.run_dir, self.ctx.rank)
        path.write_text(json.dumps({**record, "timeline": memory.timeline}))
        return record

    def write_time_timeline(self) -> dict[str, Any]:
        """Write ``ranks/time_rank<r>.json`` (every time-tracked step's timeline) and return it."""
        record = {"rank": self.ctx.rank, "steps": self.time_steps}
        if self.time_steps:
            time_rank_file(self.run_dir, self.ctx.rank).write_text(json.dumps(record))
        return record

    def finish(self, tokens_per_s: float | None = None) -> dict[str, Any]:
        """Gather every rank's figures (collective); rank 0 gets the summary additions."""
        self.rank_file.close()
        typical = self.typical_step()
        local = {
            "memory": self.write_memory_timeline(),
            "time": self.write_time_timeline(),
            "profiled": self.profiled_steps,
            "peak_memory_bytes": peak_memory_bytes(self.ctx.device),
            "comm_per_step": {
                k.removeprefix("comm/"): v for k, v in typical.items() if k.startswith("comm/")
            },
        }
        if self.config.compile:
            local["compile_s"] = compile_seconds()
            local["compile_steps"] = [s["step"] for s in self.steps if s["compile_s"]]
        gathered: list[Any] = [None] * self.ctx.world_size
        if dist.is_initialized() and self.ctx.world_size > 1:
            dist.all_gather_object(gathered, local)
        else:
            gathered = [local]
        if not self.ctx.is_main:
            return {}
        summary: dict[str, Any] = {
            "peak_memory_bytes_by_rank": [g["peak_memory_bytes"] for g in gathered],
            "memory_peak_by_rank": [g["memory"] for g in gathered],
            "comm_counted": self.counter is not None,
            "comm_per_step": gathered[0]["comm_per_step"] if self.counter is not None else None,
            "comm_step": typical.get("step") if self.counter is not None else None,
            "comm_per_step_by_rank": (
                [g["comm_per_step"] for g in gathered] if self.counter is not None else None
            ),
            "time_breakdown_by_rank": [
                {"rank": g["time"]["rank"], **{k: step[k] for k in BREAKDOWN_FIELDS}}
                for g in gathered
                for step in g["time"]["steps"]
            ],
            "profiler_time_breakdown_by_rank": [
                {"rank": rank, **step} for rank, g in enumerate(gathered) for step in g["profiled"]
            ],
            "peak_flops_per_rank": self.peak.flops if self.peak else None,
            "peak_flops_source": self.peak.source if self.peak else None,
            "effective_ranks": self.ranks,
        }
        write_chrome_trace(self.run_dir, [g["time"] for g in gathered])
        if self.config.compile:
            summary.update(
                compile_s=max(g["compile_s"] for g in gathered),
                compile_s_by_rank=[g["compile_s"] for g in gathered],
                compile_steps=sorted({s for g in gathered for s in g["compile_steps"]}),
                compile_cache=compile_cache_counts(),
                steady_state_steps=len([s for s in self.steps if not s["compile_s"]]),
            )
        if tokens_per_s is not None and self.peak is not None:
            summary["mfu"] = mfu.mfu(
                self.flops_per_token, tokens_per_s, self.peak.flops, self.ranks
            )
        try:
            summary["predicted"] = theory.predict(self.config)
        except Exception as exc:  # noqa: BLE001 - a theory gap must not fail a finished run
            summary["predicted"] = {"error": f"{type(exc).__name__}: {exc}"}
        return summary


BREAKDOWN_FIELDS = (
    "step",
    "wall_s",
    "step_time_s",
    "by_category",
    "overlapped_comm",
    "comm_s",
    "overlap_fraction",
    "cpu_contention_s",
)
"""A time-tracked step's figures in the summary (its timeline stays in the rank's file)."""


def draw_pictures(run_dir: Path, label: str) -> list[Path]:
    """Draw the run's pictures from its ranks' files: ``memory_timeline.png`` where a step was
    memory-tracked, ``time_rank_gantt.png`` where one was time-tracked; return those drawn.
    A picture that fails to draw costs a one-line warning, never the finished run."""
    pictures = (
        (MEMORY_TIMELINE_PNG, read_memory_ranks, _memory_picture),
        (TIME_GANTT_PNG, read_time_ranks, _time_picture),
    )
    drawn = []
    for name, read, draw in pictures:
        try:
            records = read(run_dir)
            if records:
                drawn.append(draw(records, label, Path(run_dir) / name))
        except Exception as exc:  # noqa: BLE001 - a picture must not fail a finished run
            print(f"distlab: warning: no {name}: {first_line(exc)}", flush=True)
    return drawn


def _memory_picture(records: list[dict[str, Any]], label: str, out: Path) -> Path:
    return draw_memory_timelines([(label, records)], out)


def _time_picture(records: list[dict[str, Any]], label: str, out: Path) -> Path:
    return draw_time_gantt(records, label, out)
