"""Where a step's time goes, strategy by strategy: the time lab's tables in docs/time.md.

    python benchmarks/time_breakdown.py                    # small model, 2 and 4 ranks
    python benchmarks/time_breakdown.py --model tiny --nproc 2 --strategies ddp fsdp
    python benchmarks/time_breakdown.py --overhead-only    # what --track-time costs

Each cell is one run (local launcher, ``--track-time sample``, ``--profile``): the
mean over ranks of each rank's last time-tracked step, from distlab's own
timeline (``time_breakdown_by_rank``) and, on the same step, from torch.profiler's
trace (``profiler_time_breakdown_by_rank``), in milliseconds and as a share of
the step. The overhead section runs ``ddp`` on 2 ranks with ``--track-time every``
and ``off`` alternately (so machine noise hits both alike) and compares their
median step times (steps 1 to the end).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from distlab.launch.runner import run
from distlab.measure.timeline import CATEGORIES
from distlab.report.time_plots import last_step_breakdown
from distlab.strategies.resolve import load_config

CELLS = {
    2: [
        ("single", {}), ("ddp", {}), ("fsdp", {}), ("zero2", {}), ("tp", {"tp": 2}),
        ("pp", {"pp": 2}), ("cp", {}),
    ],
    4: [
        ("ddp", {}), ("fsdp", {}), ("hsdp", {"dp_replicate": 2, "dp_shard": 2}),
        ("tp", {"tp": 4}), ("fsdp+tp", {"tp": 2}), ("pp", {"pp": 4}), ("zero3", {}),
    ],
}  # fmt: skip
"""The comparison matrix: every strategy family at 2 and 4 ranks (single once)."""


def one_run(strategy: str, nproc: int, fields: dict, args: Any, run_dir: Path, **extra) -> dict:
    """Run one cell and return its summary."""
    settings = {
        "strategy": strategy, "nproc": 1 if strategy == "single" else nproc,
        "model": args.model, "steps": args.steps, "launcher": "local", "wandb": False,
        "quiet": True, "final_checkpoint": False, "pictures": False, "run_dir": str(run_dir),
        **fields, **extra,
    }  # fmt: skip
    run(load_config(None, settings))
    return json.loads((run_dir / "summary.json").read_text())


def cell_row(label: str, breakdown: dict[str, Any] | None) -> str:
    """A markdown row: wall ms, each category's ms (% of the step), overlapped ms and share."""
    if breakdown is None:
        return f"| {label} | - |" + " - |" * (len(CATEGORIES) + 2)
    wall = breakdown["wall_s"]
    parts = " | ".join(
        f"{1e3 * breakdown['by_category'][c]:.1f} ({breakdown['by_category'][c] / wall:.0%})"
        for c in CATEGORIES
    )
    fraction = breakdown["overlap_fraction"]
    share = "-" if fraction is None else f"{fraction:.2f}"
    overlapped = 1e3 * breakdown["overlapped_comm"]
    return f"| {label} | {1e3 * wall:.1f} | {parts} | {overlapped:.1f} | {share} |"


def profiler_breakdown(summary: dict[str, Any]) -> dict[str, Any] | None:
    """The profiler's breakdown in the shape ``last_step_breakdown`` reads."""
    entries = summary.get("profiler_time_breakdown_by_rank")
    if not entries:
        return None
    return last_step_breakdown({"time_breakdown_by_rank": entries})


def matrix(args: Any, work: Path) -> None:
    header = " | ".join(f"{c} ms (%)" for c in CATEGORIES)
    print(f"\n{args.model} model, {args.steps} steps, mean over ranks of the last tracked step\n")
    print(f"| run | source | wall ms | {header} | overlapped ms | overlap |")
    print("|---|---|---:|" + "---:|" * (len(CATEGORIES) + 2))
    for nproc in args.nproc:
        for strategy, fields in CELLS[nproc]:
            if strategy not in args.strategies or (strategy == "single" and nproc != 2):
                continue
            label = strategy if strategy == "single" else f"{strategy} x{nproc}"
            run_dir = work / f"{strategy}-{nproc}"
            summary = one_run(strategy, nproc, fields, args, run_dir, profile=args.profile)
            print(cell_row(f"{label} | distlab", last_step_breakdown(summary)), flush=True)
            if args.profile:
                print(cell_row(f"{label} | profiler", profiler_breakdown(summary)), flush=True)


def overhead(args: Any, work: Path) -> None:
    times: dict[str, list[float]] = {"every": [], "off": []}
    for round_index in range(args.rounds):
        order = ("every", "off") if round_index % 2 == 0 else ("off", "every")
        for mode in order:
            run_dir = work / f"overhead-{mode}-{round_index}"
            one_run("ddp", 2, {}, args, run_dir, track_time=mode, track_memory="off")
            lines = (run_dir / "metrics.jsonl").read_text().splitlines()
            times[mode] += [json.loads(line)["step_time_s"] for line in lines[1:] if line]
    every, off = (statistics.median(times[m]) for m in ("every", "off"))
    print(f"\nddp x2, {args.model} model, {args.steps} steps, {args.rounds} rounds each way\n")
    print("| --track-time | median step (ms) |")
    print("|---|---:|")
    print(f"| off | {1e3 * off:.2f} |")
    print(f"| every | {1e3 * every:.2f} |")
    print(f"\nratio every/off: {every / off:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--nproc", type=int, nargs="+", default=[2, 4], choices=sorted(CELLS))
    names = sorted({s for cells in CELLS.values() for s, _ in cells})
    parser.add_argument("--strategies", nargs="+", default=names, choices=names)
    parser.add_argument("--no-profile", dest="profile", action="store_false")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--overhead-only", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="distlab-time-") as directory:
        if not args.overhead_only:
            matrix(args, Path(directory))
        overhead(args, Path(directory))


if __name__ == "__main__":
    main()
