"""The lab's runs as the planner sees them: each run's model, layout and precision, and
what it measured (step time, communication time, peak memory by category, and where a
time-tracked step's time went by the run's own timeline)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from distlab.config import grad_accum_steps
from distlab.config_reading import build_config, read_config_values
from distlab.errors import DistlabError
from distlab.measure.timeline import mean_of_last_steps
from distlab.plan.layout import Layout
from distlab.plan.shape import ModelShape, from_preset
from distlab.strategies import registry
from distlab.theory.rank_layout import microbatches, rank_layout


@dataclass(frozen=True)
class MeasuredRun:
    """One finished lab run: what it ran and what it measured."""

    name: str
    shape: ModelShape
    layout: Layout
    global_batch: int
    precision: str
    step_time_s: float
    """Median step time (the run's own timer)."""
    comm_time_s: float
    """Seconds collectives were in flight in a typical step (rank 0, the comm counter)."""
    comm_calls: int
    comm_wire_bytes: int
    tokens_per_s: float
    peak_memory_bytes: int | None
    """Rank 0's step peak seen by torch's memory tracker."""
    time_by_category: dict[str, float] | None = None
    """Seconds of the last time-tracked step by the time lab's category (``CATEGORIES``),
    mean over ranks of each rank's last tracked step (``time_breakdown_by_rank``); None
    for runs from before the time lab or with ``--track-time off``."""
    tracked_step_s: float | None = None
    """Wall time of that step, mean over the same ranks (the categories add up to it)."""


def read_run(run_dir: Path) -> MeasuredRun:
    """The run in ``run_dir`` (its config.yaml and summary.json)."""
    summary_file = run_dir / "summary.json"
    if not summary_file.is_file():
        raise DistlabError(f"{run_dir}: not a finished run (no summary.json)")
    try:
        summary = json.loads(summary_file.read_text())
    except ValueError as exc:
        raise DistlabError(f"{summary_file}: not JSON ({exc})") from None
    if not isinstance(summary, dict):
        raise DistlabError(f"{summary_file}: not a run summary (a JSON object)")
    config = build_config(read_config_values(run_dir / "config.yaml"))
    lab = rank_layout(config)
    if lab is None:
        raise DistlabError(
            f"{run_dir}: strategy {config.strategy} has no layout the planner models"
        )
    strategy = registry.get(config.strategy)
    dims = strategy.dims(config)
    m = microbatches(config, lab) if dims.pp > 1 else grad_accum_steps(config, dims.dp * dims.cp)
    layout = Layout(
        dp=dims.dp,
        tp=dims.tp,
        pp=dims.pp,
        cp=dims.cp,
        ep=dims.ep,
        zero=strategy.data_parallel.zero_stage,
        ac=config.ac,
        microbatches=m,
        schedule=config.schedule,
        replicas=dims.replicate,
        strategy=config.strategy,
    )
    comm = summary.get("comm_per_step") or {}
    peaks = summary.get("memory_peak_by_rank") or [None]
    name = f"{config.strategy} x{config.nproc}" + (
        "" if config.model == "small" else f" {config.model}"
    )
    try:
        measured = (float(summary["median_step_time_s"]), float(summary["tokens_per_s"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise DistlabError(f"{summary_file}: no step time and throughput ({exc!r})") from None
    try:
        tracked = mean_of_last_steps(summary.get("time_breakdown_by_rank"))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise DistlabError(f"{summary_file}: unreadable time_breakdown_by_rank ({exc!r})") from None
    return MeasuredRun(
        name=name,
        shape=from_preset(config.model, config.seq_len),
        layout=layout,
        global_batch=config.global_batch,
        precision=config.precision,
        step_time_s=measured[0],
        comm_time_s=float(comm.get("time_s", 0.0)),
        comm_calls=int(comm.get("calls", 0)),
        comm_wire_bytes=int(comm.get("wire_bytes", 0)),
        tokens_per_s=measured[1],
        peak_memory_bytes=peaks[0]["peak"] if peaks[0] else None,
        time_by_category=tracked["by_category"] if tracked else None,
        tracked_step_s=tracked["wall_s"] if tracked else None,
    )


def read_runs(run_dirs: list[Path]) -> list[MeasuredRun]:
    """The finished runs among ``run_dirs`` (a glob like ``runs/compare/*`` also matches a
    sweep's log folder: directories without a summary.json are skipped and counted);
    a one-line error if none is a run."""
    finished = [path for path in run_dirs if (path / "summary.json").is_file()]
    if not finished:
        given = ", ".join(str(path) for path in run_dirs[:3]) or "nothing"
        raise DistlabError(
            f"--calibrate: no finished run (a directory with summary.json) in {given}"
        )
    skipped = len(run_dirs) - len(finished)
    if skipped:
        sys.stderr.write(f"skipped {skipped} directories without summary.json\n")
    return [read_run(path) for path in finished]
