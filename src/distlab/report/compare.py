"""``python -m distlab.compare RUN_DIR...``: runs side by side, measured against theory.

    python -m distlab.compare runs/*
    python -m distlab.compare runs/ddp-* runs/fsdp-* --plot docs/loss.png
    python -m distlab.compare runs/compare/* --report docs/comparison.md
    python -m distlab.compare --wandb my-entity/distlab --group compare   (online W&B)

Each argument is a run dir or a glob of run dirs (a directory holding
``summary.json`` and ``metrics.jsonl``). The table shows, per run: final loss,
throughput, MFU, peak memory per rank, model-state bytes per rank and
communication bytes per step, each measured one beside its prediction
(``distlab.theory``) and the ratio measured / predicted. ``--report`` also
writes PNG plots (loss vs step, throughput and MFU, memory per rank,
communication per step) next to a Markdown report that embeds them.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from distlab.cli import OneLineErrorParser
from distlab.errors import DistlabError
from distlab.report.markdown import write_report
from distlab.report.plots import plot_losses
from distlab.report.runs import load_runs, load_wandb_runs
from distlab.report.tables import comparison_table


def main(argv: list[str] | None = None) -> int:
    """Print the table; optionally write the loss plot or the full report."""
    parser = OneLineErrorParser(
        prog="python -m distlab.compare", description=__doc__.splitlines()[0]
    )
    parser.add_argument("runs", nargs="*", help="run dirs or globs")
    parser.add_argument("--plot", type=Path, help="write a loss-vs-step PNG here")
    parser.add_argument("--report", type=Path, help="write a Markdown report (+ PNGs) here")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read runs from W&B (online)")
    parser.add_argument("--group", help="with --wandb: only runs of this W&B group")
    args = parser.parse_args(argv)
    if args.wandb:
        runs = load_wandb_runs(args.wandb, args.group)
    elif args.runs:
        runs = load_runs(args.runs)
    else:
        raise DistlabError("give run dirs (or globs), or --wandb ENTITY/PROJECT")
    Console(width=200).print(comparison_table(runs))
    if args.plot:
        plot_losses(runs, args.plot)
        print(f"loss plot: {args.plot}")
    if args.report:
        write_report(runs, args.report)
        print(f"report: {args.report}")
    return 0
