"""Knobs that move communication between exposed and overlapped: the table of docs/time.md.

    python benchmarks/time_knobs.py                        # small model, 2 ranks, 2 rounds
    python benchmarks/time_knobs.py --only ddp fsdp --rounds 1
    python benchmarks/time_knobs.py --keep DIR      # keep the runs; --render DIR: table again

Each configuration runs ``--rounds`` times (local launcher, ``--track-time sample``), the
rounds in alternating order (the list, then the list reversed, ...) so the machine's
drift hits every configuration alike. A cell is the mean over ranks of each rank's last
time-tracked step (``time_breakdown_by_rank``), one value per round, in round order:
the step's wall time, its compute, exposed communication and bubble (the rest of the
step, data, optimizer and host, is left out), the communication that ran under work
(overlapped), the share of the time collectives were in flight that was overlapped, the
time the ranks' threads waited for a core (counted inside the categories: on a machine
with fewer cores than ranks and gloo threads, or a shared one, this is where the noise
shows), and the collectives rank 0 issued per step (``comm_per_step``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from distlab.launch.runner import run
from distlab.report.time_plots import last_step_breakdown
from distlab.strategies.resolve import load_config

KNOBS: list[tuple[str, str, dict[str, Any]]] = [
    ("ddp (torch's default: 1 MiB, then 25 MiB)", "ddp", {}),
    ("ddp --bucket-mb 25", "ddp", {"bucket_mb": 25}),
    ("ddp --bucket-mb 1", "ddp", {"bucket_mb": 1}),
    ("ddp --bucket-mb 0.25", "ddp", {"bucket_mb": 0.25}),
    ("ddp --bucket-mb 0.05", "ddp", {"bucket_mb": 0.05}),
    ("fsdp (FSDP2's defaults)", "fsdp", {}),
    ("fsdp --prefetch 0", "fsdp", {"prefetch": 0}),
    ("fsdp --prefetch 1", "fsdp", {"prefetch": 1}),
    ("fsdp --prefetch 2", "fsdp", {"prefetch": 2}),
    ("fsdp --prefetch 0 --no-reshard-after-forward", "fsdp",
     {"prefetch": 0, "reshard_after_forward": False}),
    ("fsdp --prefetch 1 --no-reshard-after-forward", "fsdp",
     {"prefetch": 1, "reshard_after_forward": False}),
    ("fsdp --prefetch 2 --no-reshard-after-forward", "fsdp",
     {"prefetch": 2, "reshard_after_forward": False}),
    ("tp --tp 2", "tp", {"tp": 2}),
    ("tp --tp 2 --sequence-parallel", "tp", {"tp": 2, "sequence_parallel": True}),
    ("pp --pp 2 --schedule gpipe", "pp", {"pp": 2, "schedule": "gpipe"}),
    ("pp --pp 2 --schedule 1f1b", "pp", {"pp": 2, "schedule": "1f1b"}),
    ("pp --pp 2 --schedule interleaved-1f1b", "pp", {"pp": 2, "schedule": "interleaved-1f1b"}),
]  # fmt: skip
"""(label, strategy, options): every knob at the settings the table compares."""

COLUMNS = ("wall ms", "compute ms", "exposed comm ms", "bubble ms", "overlapped ms",
           "overlap", "core wait ms", "collectives")  # fmt: skip


def one_run(strategy: str, fields: dict[str, Any], args: Any, run_dir: Path) -> dict[str, Any]:
    """Run one configuration and return its summary."""
    settings = {
        "strategy": strategy, "nproc": args.nproc, "model": args.model, "steps": args.steps,
        "launcher": "local", "wandb": False, "quiet": True, "final_checkpoint": False,
        "pictures": False, "run_dir": str(run_dir), **fields,
    }  # fmt: skip
    run(load_config(None, settings))
    return json.loads((run_dir / "summary.json").read_text())


def cells(summary: dict[str, Any]) -> list[str]:
    """One round's value of each column (``COLUMNS``)."""
    breakdown = last_step_breakdown(summary)
    if breakdown is None:
        return ["-"] * len(COLUMNS)
    ms = [1e3 * breakdown["wall_s"]]
    ms += [1e3 * breakdown["by_category"][c] for c in ("compute", "exposed_comm", "bubble")]
    ms.append(1e3 * breakdown["overlapped_comm"])
    fraction = breakdown["overlap_fraction"]
    calls = (summary.get("comm_per_step") or {}).get("calls")
    return [
        *(f"{value:.0f}" for value in ms),
        "-" if fraction is None else f"{fraction:.2f}",
        f"{1e3 * breakdown['cpu_contention_s']:.0f}",
        "-" if calls is None else str(calls),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    strategies = sorted({strategy for _, strategy, _ in KNOBS})
    parser.add_argument("--only", nargs="+", default=strategies, choices=strategies)
    parser.add_argument("--keep", metavar="DIR", help="keep the run dirs under DIR")
    parser.add_argument("--render", metavar="DIR", help="print the table of runs kept in DIR")
    args = parser.parse_args()
    knobs = [knob for knob in KNOBS if knob[1] in args.only]
    results: dict[str, list[list[str]]] = {label: [] for label, _, _ in knobs}
    with tempfile.TemporaryDirectory(prefix="distlab-knobs-") as directory:
        work = Path(args.render or args.keep or directory)
        for round_index in range(args.rounds):
            order = [(KNOBS.index(knob), knob) for knob in knobs]
            for index, (label, strategy, fields) in order if round_index % 2 == 0 else order[::-1]:
                run_dir = work / f"round{round_index + 1}-knob{index:02d}"
                if args.render:
                    summary = json.loads((run_dir / "summary.json").read_text())
                else:
                    summary = one_run(strategy, fields, args, run_dir)
                results[label].append(cells(summary))
    rounds = " / ".join(f"round {r + 1}" for r in range(args.rounds))
    print(
        f"\n{args.model} model, {args.nproc} ranks, {args.steps} steps; mean over ranks of "
        f"the last tracked step; each cell: {rounds}\n"
    )
    print(f"| run | {' | '.join(COLUMNS)} |")
    print("|---|" + "---:|" * len(COLUMNS))
    for label, _, _ in knobs:
        per_column = zip(*results[label], strict=True)
        print(f"| {label} | " + " | ".join(" / ".join(values) for values in per_column) + " |")


if __name__ == "__main__":
    main()
