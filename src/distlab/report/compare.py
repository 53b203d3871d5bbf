"""``python -m distlab.compare RUN_DIR...``: runs side by side, measured against theory.

    python -m distlab.compare runs/*
    python -m distlab.compare runs/ddp-* runs/fsdp-* --plot docs/loss.png
    python -m distlab.compare runs/compare/* --report docs/comparison.md
    python -m distlab.compare runs/fsdp-2 runs/pp-2 --memory-timeline memory.png
    python -m distlab.compare runs/ddp-2 runs/fsdp-2 --time-breakdown time.png
    python -m distlab.compare --wandb my-entity/distlab --group compare   (online W&B)

Each argument is a run dir or a glob of run dirs (a directory holding
``summary.json`` and ``metrics.jsonl``). The table shows, per run: final loss,
throughput, MFU, peak memory per rank, model-state bytes per rank and
communication bytes per step, each measured one beside its prediction
(``distlab.theory``) and the ratio measured / predicted. A second table shows
the step memory torch's tracker measured on rank 0, by category, at its peak,
beside the predicted peak. For mixture-of-experts runs a third table shows the
routing: balance loss, tokens per expert, load imbalance, dropped tokens
(``distlab.moe``). Runs whose summary has the time lab's
``time_breakdown_by_rank`` get a table of where their last tracked step's time
went (compute, exposed communication, bubble, data, optimizer, host, and the
communication overlapped with compute), mean over ranks; the others are left
out of it. ``--time-breakdown OUT.png`` draws it as a stacked bar per run
(``distlab.report.time_plots``). ``--memory-timeline OUT.png`` draws every run's
per-rank memory timeline of one step side by side (a column per run, a row per
rank, one y scale). ``--report`` also writes PNG plots (loss vs step,
throughput and MFU, memory per rank, communication per step) next to a
Markdown report that embeds them and each run's ``memory_timeline.png``.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from distlab.cli import OneLineErrorParser
from distlab.errors import DistlabError
from distlab.report.markdown import write_report
from distlab.report.plots import plot_losses, plot_memory_timelines
from distlab.report.runs import load_runs, load_wandb_runs
from distlab.report.tables import (
    comparison_table,
    has_routing,
    has_step_memory,
    memory_table,
    routing_table,
)
from distlab.report.time_plots import (
    draw_time_breakdown_bars,
    labelled_summaries,
    time_breakdown_table,
)


def main(argv: list[str] | None = None) -> int:
    """Print the table; optionally write the loss plot or the full report."""
    parser = OneLineErrorParser(
        prog="python -m distlab.compare", description=__doc__.splitlines()[0]
    )
    parser.add_argument("runs", nargs="*", help="run dirs or globs")
    parser.add_argument("--plot", type=Path, help="write a loss-vs-step PNG here")
    parser.add_argument("--report", type=Path, help="write a Markdown report (+ PNGs) here")
    parser.add_argument(
        "--memory-timeline",
        type=Path,
        metavar="OUT.png",
        help="draw the runs' per-rank memory timelines of one step side by side into this PNG",
    )
    parser.add_argument(
        "--time-breakdown",
        type=Path,
        metavar="OUT.png",
        help="draw the runs' step time by category (time_breakdown_by_rank) into this PNG",
    )
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read runs from W&B (online)")
    parser.add_argument("--group", help="with --wandb: only runs of this W&B group")
    args = parser.parse_args(argv)
    if args.wandb:
        runs = load_wandb_runs(args.wandb, args.group)
    elif args.runs:
        runs = load_runs(args.runs)
    else:
        raise DistlabError("give run dirs (or globs), or --wandb ENTITY/PROJECT")
    console = Console(width=200)
    console.print(comparison_table(runs))
    if has_step_memory(runs):
        console.print(memory_table(runs))
    if has_routing(runs):
        console.print(routing_table(runs))
    timed = labelled_summaries(runs)
    if timed:
        console.print(time_breakdown_table(timed))
    if args.memory_timeline:
        left_out = plot_memory_timelines(runs, args.memory_timeline)
        print(f"memory timelines: {args.memory_timeline}")
        for run in left_out:
            print(f"  left out {run.path}: no ranks/memory_rank<r>.json")
    if args.time_breakdown:
        if timed:
            draw_time_breakdown_bars(timed, args.time_breakdown)
            print(f"time breakdown: {args.time_breakdown}")
        else:
            print("time breakdown: no run has time_breakdown_by_rank, nothing drawn")
    if args.plot:
        plot_losses(runs, args.plot)
        print(f"loss plot: {args.plot}")
    if args.report:
        write_report(runs, args.report)
        print(f"report: {args.report}")
    return 0
