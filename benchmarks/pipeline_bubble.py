"""Measure the pipeline bubble: how long each rank sits idle in a step, per schedule.

    python benchmarks/pipeline_bubble.py                      # every schedule, p = 2, m = 4, 8, 16
    python benchmarks/pipeline_bubble.py --stages 2 4 --microbatches 8 --schedules 1f1b zbv

For each (schedule, pipeline ranks p, microbatches m) it starts p ranks
(gloo, CPU), trains the ``small`` preset with the ``pp`` strategy and
records, on every rank, when each action of the schedule starts and ends
(``record_timeline``: forward F, whole backward B+W, or, in the zero-bubble
schedules, input-gradient backward B and weight-gradient backward W) and
when the schedule's step starts and ends. Per measured step, the window is
from the first rank entering the schedule to the last one leaving it; a
rank's idle fraction is 1 - (time in its actions) / window. Theory
(``distlab.strategies.pipeline_schedules``): each schedule's idle time for
equal stages and free communication, with f = b = w, and again with the
measured F, B and W times.

Writes ``docs/pipeline_bubble.md`` (``--out``) with the measurements, the
theory and the command that produced them (and the raw figures next to it as
``.json``), and one timeline picture per schedule drawn from the events of
the last measured step (``--picture P M``: the run it is taken from) as
``docs/pipeline_timeline_<schedule>.png``; the hand-written discussion after
``NOTES_MARKER`` is kept.
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

from pipeline_timeline import draw_timeline

from distlab.strategies.pipeline_schedules import SCHEDULES, bubble_fraction

ROOT = Path(__file__).resolve().parents[1]
NOTES_MARKER = "<!-- notes: written by hand, kept when the tables are regenerated -->"
ROWS_PER_MICROBATCH = 4
"""Sequences per microbatch: enough work per action that compute, not Python, dominates."""
KINDS = ("F", "B", "W", "BW")
"""Actions: forward, input-gradient backward, weight-gradient backward, whole backward."""


@dataclass(frozen=True)
class StageEvent:
    """One action of one microbatch on one stage (perf_counter seconds)."""

    stage: int
    kind: str
    """``F`` (forward), ``BW`` (whole backward), ``B`` (input gradients), ``W`` (weight
    gradients)."""
    microbatch: int
    start: float
    end: float


def record_timeline(stage: Any, events: list[StageEvent]) -> None:
    """Time every action ``stage`` runs, appending to ``events``."""

    def timed(kind: str, work: Callable) -> Callable:
        def run(chunk_id: int, *args, **kwargs):
            start = time.perf_counter()
            result = work(chunk_id, *args, **kwargs)
            end = time.perf_counter()
            # backward_one_chunk runs the whole backward, or only B in the zero-bubble schedules
            split = kind == "BW" and not kwargs.get("full_backward", True)
            events.append(
                StageEvent(stage.stage_index, "B" if split else kind, chunk_id, start, end)
            )
            return result

        return run

    stage.forward_one_chunk = timed("F", stage.forward_one_chunk)
    stage.backward_one_chunk = timed("BW", stage.backward_one_chunk)
    stage.backward_weight_one_chunk = timed("W", stage.backward_weight_one_chunk)


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
    step = registry.get("pp").prepare(build_model(config.model, config.seed), ctx, config)
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


def measure(
    schedule: str, stages: int, microbatches: int, warmup: int, steps: int
) -> tuple[dict, list[dict]]:
    """Run one configuration on ``stages`` local processes; return its per-rank figures and
    the ranks' raw records (for the picture)."""
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
    return summarise(ranks, steps), ranks


def summarise(ranks: list[dict], steps: int) -> dict:
    """Idle fraction per rank (mean over steps), mean time of each kind of action, step time."""
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
    kinds = sorted({e[1] for rank in ranks for e in rank["events"]}, key=KINDS.index)
    return {
        "idle": [statistics.mean(values) for values in idle],
        "step_ms": 1000 * statistics.median(spans),
        "action_ms": {
            kind: 1000
            * statistics.mean(e[4] - e[3] for rank in ranks for e in rank["events"] if e[1] == kind)
            for kind in kinds
        },
    }


def theory_at_measured_times(
    schedule: str, stages: int, microbatches: int, action_ms: dict
) -> float:
    """The schedule's idle fraction with the measured F, B and W times (a rank's f, b, w are
    its stages' actions for one microbatch; a whole backward counts as b, w = 0)."""
    spec = SCHEDULES[schedule]
    v = spec.stages_per_rank
    f = v * action_ms["F"]
    b = v * action_ms.get("B", action_ms.get("BW", 0.0))
    w = v * action_ms.get("W", 0.0)
    idle = spec.idle(stages, f, b, w)
    return idle / (microbatches * (f + b + w) + idle)


def markdown(results: list[dict], command: str, pictures: list[tuple[str, str, str]]) -> str:
    """The report: one table row per (schedule, p, m), then the timeline pictures."""
    stages = max(r["stages"] for r in results)
    header = "| schedule | idle time (theory) | p | m | theory f=b=w | theory at measured | "
    header += "measured mean | " + " | ".join(f"rank {i}" for i in range(stages))
    header += " | step (ms) | F / B / W / B+W per action (ms) |"
    rule = "|" + "---|" * (header.count("|") - 1)
    rows = []
    for r in results:
        per_stage = [f"{v:.2f}" for v in r["idle"]] + [""] * (stages - r["stages"])
        times = " / ".join(
            f"{r['action_ms'][k]:.1f}" if k in r["action_ms"] else "-" for k in KINDS
        )
        rows.append(
            f"| {r['schedule']} | {SCHEDULES[r['schedule']].formula} | {r['stages']} | "
            f"{r['microbatches']} | {r['theory']:.2f} | {r['theory_measured']:.2f} | "
            f"{statistics.mean(r['idle']):.2f} | "
            + " | ".join(per_stage)
            + f" | {r['step_ms']:.0f} | {times} |"
        )
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    figures = [f"![{name}: {what}]({file})" for name, what, file in pictures]
    return "\n".join(
        [
            "# Pipeline bubble: measured idle time per rank vs. theory",
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
            "A rank's idle fraction is 1 - (time in its actions) / (time from the first rank "
            "entering the schedule's step to the last one leaving it), averaged over the "
            "measured steps. Theory (`distlab.strategies.pipeline_schedules`): the idle time "
            "of the schedule with p ranks, v = 2 stages per rank where it has two, and f, b, "
            "w a rank's forward, input-gradient and weight-gradient time per microbatch; "
            "idle fraction = idle / (m (f + b + w) + idle). *theory f=b=w* takes the three "
            "equal; *theory at measured* puts in the measured mean times of this row's actions "
            "(F, B, W; a whole backward B+W counts as b with w = 0).",
            "",
            header,
            rule,
            *rows,
            "",
            "## Timelines",
            "",
            "One measured step per schedule; a row per rank. F forward, B input gradients, "
            "W weight gradients, B+W a whole backward; hatched: the rank's second stage; the "
            "number is the microbatch; white is idle.",
            "",
            *(line for figure in figures for line in (figure, "")),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, nargs="+", default=[2])
    parser.add_argument("--microbatches", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--schedules", nargs="+", default=list(SCHEDULES))
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument(
        "--picture", type=int, nargs=2, default=[2, 8], metavar=("P", "M"),
        help="draw each schedule's timeline from its run with P ranks and M microbatches",
    )  # fmt: skip
    parser.add_argument("--out", default=str(ROOT / "docs" / "pipeline_bubble.md"))
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    out = Path(args.out)
    results, pictures = [], []
    for stages in args.stages:
        for schedule in args.schedules:
            for m in args.microbatches:
                figures, ranks = measure(schedule, stages, m, args.warmup, args.steps)
                figures.update(
                    schedule=schedule,
                    stages=stages,
                    microbatches=m,
                    theory=bubble_fraction(schedule, stages, m),
                    theory_measured=theory_at_measured_times(
                        schedule, stages, m, figures["action_ms"]
                    ),
                )
                print(
                    f"{schedule:16s} p={stages} m={m:2d}: theory {figures['theory']:.2f} "
                    f"({figures['theory_measured']:.2f} at measured times), idle per rank "
                    f"{', '.join(f'{v:.2f}' for v in figures['idle'])}",
                    flush=True,
                )
                results.append(figures)
                if [stages, m] == args.picture:
                    file = f"pipeline_timeline_{schedule}.png"
                    title = f"{schedule}, p = {stages}, m = {m}"
                    draw_timeline(ranks, args.steps - 1, title, out.parent / file)
                    pictures.append((schedule, f"p = {stages}, m = {m}", file))
    command = "python benchmarks/pipeline_bubble.py " + " ".join(argv or sys.argv[1:])
    notes = out.read_text().partition(NOTES_MARKER) if out.is_file() else ("", "", "")
    out.write_text(markdown(results, command.strip(), pictures) + "\n" + NOTES_MARKER + notes[2])
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
