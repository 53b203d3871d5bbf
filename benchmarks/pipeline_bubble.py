"""Measure the pipeline bubble: how long each stage sits idle in a GPipe / 1F1B step.

    python benchmarks/pipeline_bubble.py                      # 4 stages, m = 4, 8, 16
    python benchmarks/pipeline_bubble.py --stages 2 4 --microbatches 4 8 16

For each (schedule, stages p, microbatches m) it starts p ranks (gloo, CPU),
trains the ``small`` preset with the ``pp`` strategy and records, on every
rank, when each forward and backward of a microbatch starts and ends
(``record_timeline``, wrapped around each stage's forward and backward chunks)
and when the schedule's step starts and ends. Per measured step, the window
is from the first rank entering the schedule to the last one leaving it; a
stage's idle fraction is
1 - (its forward + backward time) / window. Theory for equal stages and free
communication: (p - 1) / (m + p - 1), for GPipe and 1F1B alike.

Writes ``docs/pipeline_bubble.md`` (``--out``) with the measurements, the
theory and the command that produced them (and the raw figures next to it as
``.json``); the hand-written discussion after ``NOTES_MARKER`` is kept.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
NOTES_MARKER = "<!-- notes: written by hand, kept when the tables are regenerated -->"
ROWS_PER_MICROBATCH = 4
"""Sequences per microbatch: enough work per action that compute, not Python, dominates."""


@dataclass(frozen=True)
class StageEvent:
    """One forward or backward of one microbatch on one stage (perf_counter seconds)."""

    stage: int
    kind: str
    """``F`` (forward) or ``B`` (backward)."""
    microbatch: int
    start: float
    end: float


def record_timeline(stage: Any, events: list[StageEvent]) -> None:
    """Time every forward/backward chunk ``stage`` runs, appending to ``events``."""

    def timed(kind: str, work: Callable) -> Callable:
        def run(chunk_id: int, *args, **kwargs):
            start = time.perf_counter()
            result = work(chunk_id, *args, **kwargs)
            events.append(StageEvent(stage.stage_index, kind, chunk_id, start, time.perf_counter()))
            return result

        return run

    stage.forward_one_chunk = timed("F", stage.forward_one_chunk)
    stage.backward_one_chunk = timed("B", stage.backward_one_chunk)


def run_rank(rank: int, world: int, init_method: str, settings: dict, out: str) -> None:
    """One pipeline rank: train a few steps, time every chunk, send the timings to rank 0."""
    import torch.distributed as dist

    from distlab.config import resolved_seq_len
    from distlab.data import global_batch, load_tokens, prepare_tokens
    from distlab.distributed import init_rank, shutdown
    from distlab.model import build_model
    from distlab.strategies import registry
    from distlab.strategies.resolve import load_config

    config = load_config(None, settings["config"])
    ctx = init_rank(rank, world, init_method, config)
    tokens = load_tokens(prepare_tokens(None))
    step = registry.describe("pp").prepare(build_model(config.model, config.seed), ctx, config)
    events: list[StageEvent] = []
    for stage in step.stages:
        record_timeline(stage, events)
    windows: list[tuple[float, float]] = []
    run_schedule = step.schedule.step

    def timed_schedule(*args, **kwargs):
        start = time.perf_counter()
        result = run_schedule(*args, **kwargs)
        windows.append((start, time.perf_counter()))
        return result

    step.schedule.step = timed_schedule
    warmup, measured = settings["warmup"], settings["steps"]
    for index in range(warmup + measured):
        if index == warmup:
            events.clear()
            windows.clear()
        inputs, targets = global_batch(
            tokens, config.seed, index, config.global_batch, resolved_seq_len(config)
        )
        step.step(inputs, targets)
    record = {
        "windows": windows,
        "events": [(e.stage, e.kind, e.microbatch, e.start, e.end) for e in events],
    }
    gathered: list | None = [None] * world if rank == 0 else None
    dist.gather_object(record, gathered, dst=0)
    if rank == 0:
        Path(out).write_text(json.dumps(gathered))
    shutdown()


def measure(schedule: str, stages: int, microbatches: int, warmup: int, steps: int) -> dict:
    """Run one configuration on ``stages`` local processes; return its per-stage figures."""
    from distlab.distributed import free_port

    settings = {
        "config": {
            "strategy": "pp",
            "nproc": stages,
            "pp": stages,
            "model": "small",
            "schedule": schedule,
            "microbatches": microbatches,
            "global_batch": microbatches * ROWS_PER_MICROBATCH,
            "device": "cpu",
            "launcher": "local",
            "wandb": False,
        },
        "warmup": warmup,
        "steps": steps,
    }
    context = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "timeline.json")
        init_method = f"tcp://127.0.0.1:{free_port()}"
        procs = [
            context.Process(target=run_rank, args=(r, stages, init_method, settings, out))
            for r in range(stages)
        ]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
        if any(proc.exitcode != 0 for proc in procs):
            raise SystemExit(f"a rank failed ({schedule}, p={stages}, m={microbatches})")
        ranks = json.loads(Path(out).read_text())
    return summarise(ranks, steps)


def summarise(ranks: list[dict], steps: int) -> dict:
    """Idle fraction per stage (mean over steps), mean forward/backward time, step time."""
    idle = [[] for _ in ranks]
    spans = []
    for s in range(steps):
        start = min(rank["windows"][s][0] for rank in ranks)
        end = max(rank["windows"][s][1] for rank in ranks)
        spans.append(end - start)
        for r, rank in enumerate(ranks):
            lo, hi = rank["windows"][s]
            busy = sum(e[4] - e[3] for e in rank["events"] if lo <= e[3] < hi)
            idle[r].append(1 - busy / (end - start))
    chunk = {
        kind: statistics.mean(e[4] - e[3] for rank in ranks for e in rank["events"] if e[1] == kind)
        for kind in ("F", "B")
    }
    return {
        "idle": [statistics.mean(values) for values in idle],
        "step_ms": 1000 * statistics.median(spans),
        "forward_ms": 1000 * chunk["F"],
        "backward_ms": 1000 * chunk["B"],
    }


def markdown(results: list[dict], command: str) -> str:
    """The report: one table row per (schedule, p, m)."""
    stages = max(r["stages"] for r in results)
    header = "| schedule | p | m | theory (p-1)/(m+p-1) | measured mean | "
    header += " | ".join(f"stage {i}" for i in range(stages))
    header += " | step (ms) | F / B per microbatch (ms) |"
    rule = "|" + "---|" * (header.count("|") - 1)
    rows = []
    for r in results:
        per_stage = [f"{v:.2f}" for v in r["idle"]] + [""] * (stages - r["stages"])
        rows.append(
            f"| {r['schedule']} | {r['stages']} | {r['microbatches']} | {r['theory']:.2f} | "
            f"{statistics.mean(r['idle']):.2f} | "
            + " | ".join(per_stage)
            + f" | {r['step_ms']:.0f} | {r['forward_ms']:.1f} / {r['backward_ms']:.1f} |"
        )
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return "\n".join(
        [
            "# Pipeline bubble: measured idle time per stage vs. theory",
            "",
            "Produced by:",
            "",
            "```",
            command,
            "```",
            "",
            f"Model `small` (8 layers, d 128, 128-token sequences), {ROWS_PER_MICROBATCH} "
            "sequences per microbatch, fp32, gloo on CPU, one thread per rank, "
            f"{os.cpu_count()} CPU cores (load average at the end: {load}).",
            "A stage's idle fraction is 1 - (time in its forward and backward chunks) / "
            "(time from the first stage entering the schedule's step to the last one "
            "leaving it), averaged over the measured steps. Theory: (p - 1) / (m + p - 1).",
            "",
            header,
            rule,
            *rows,
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, nargs="+", default=[4])
    parser.add_argument("--microbatches", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--schedules", nargs="+", default=["gpipe", "1f1b"])
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "docs" / "pipeline_bubble.md"))
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from distlab.strategies.pipeline_parallel import bubble_fraction

    results = []
    for stages in args.stages:
        for schedule in args.schedules:
            for m in args.microbatches:
                figures = measure(schedule, stages, m, args.warmup, args.steps)
                figures.update(
                    schedule=schedule,
                    stages=stages,
                    microbatches=m,
                    theory=bubble_fraction(stages, m),
                )
                print(
                    f"{schedule:6s} p={stages} m={m:2d}: theory {figures['theory']:.2f}, "
                    f"idle per stage {', '.join(f'{v:.2f}' for v in figures['idle'])}",
                    flush=True,
                )
                results.append(figures)
    command = "python benchmarks/pipeline_bubble.py " + " ".join(argv or sys.argv[1:])
    out = Path(args.out)
    notes = out.read_text().partition(NOTES_MARKER) if out.is_file() else ("", "", "")
    out.write_text(markdown(results, command.strip()) + "\n" + NOTES_MARKER + notes[2])
    (Path(args.out).with_suffix(".json")).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
