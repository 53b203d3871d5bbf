"""The planner's step time by category next to the time lab's, cell by cell.

    python benchmarks/time_predicted.py                             # run the matrix (minutes)
    python benchmarks/time_predicted.py --runs runs/time-predicted  # read those runs again

The cells are benchmarks/time_breakdown.py's comparison matrix (every strategy family
at 2 and 4 ranks, single once; small model, local launcher), run with ``--track-time
sample`` into ``--out`` (kept, so ``--runs`` can read them again). Measured: the run's
own timeline, the mean over ranks of each rank's last tracked step
(``time_breakdown_by_rank``, ``distlab.plan.runs.MeasuredRun.time_by_category``).
Predicted: ``distlab.plan.step_time.predicted_breakdown`` on this machine's CPU device
calibrated on the *other* cells (leave-one-out, benchmarks/plan_check.py's
``leave_one_out_devices``: links to the measured communication time, the rest to the
median step time; the split is never fitted). The planner does not model ``data`` and
``host`` (predicted zero).

A (cell, category) pair is within the goal when the prediction is within 25% of the
measurement, or, for a category under 5% of the measured step, within 5% of the step.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path

from plan_check import leave_one_out_devices, markdown
from time_breakdown import CELLS, one_run

from distlab.measure.timeline import CATEGORIES, POINT_TO_POINT
from distlab.plan.calibrate import fit
from distlab.plan.hardware import Device, cpu_device
from distlab.plan.runs import MeasuredRun, read_run
from distlab.plan.step_time import UNMODELLED_CATEGORIES, predicted_breakdown
from distlab.run.files import read_time_ranks

TOLERANCE = 0.25
"""A category's prediction within this fraction of its measurement is within the goal."""
SMALL_SHARE = 0.05
"""Categories under this share of the measured step compare in absolute time: within
this share of the step."""
GOAL_SHARE = 0.80
"""The share of (cell, category) pairs the goal asks to be within."""


def cells(nprocs: Sequence[int]) -> list[tuple[str, int, dict]]:
    """(strategy, ranks, extra settings) of every cell of the matrix, ``single`` once."""
    out = []
    for nproc in nprocs:
        for strategy, fields in CELLS[nproc]:
            if strategy != "single" or nproc == min(nprocs):
                out.append((strategy, nproc, fields))
    return out


def run_dir(root: Path, strategy: str, nproc: int) -> Path:
    """A cell's run directory (as benchmarks/time_breakdown.py names them)."""
    return root / f"{strategy}-{nproc}"


def run_matrix(args: argparse.Namespace) -> None:
    """Run every cell into ``args.out`` (``--track-time sample``, no profiler)."""
    for strategy, nproc, fields in cells(args.nproc):
        directory = run_dir(args.out, strategy, nproc)
        ranks = 1 if strategy == "single" else nproc
        print(f"running {strategy} x{ranks} into {directory}", flush=True)
        one_run(strategy, nproc, fields, args, directory, track_time="sample")


def within_goal(measured: float, predicted: float, step: float) -> bool:
    """Whether a category's prediction meets the goal (module docstring)."""
    if measured < SMALL_SHARE * step:
        return abs(predicted - measured) <= SMALL_SHARE * step
    return abs(predicted - measured) <= TOLERANCE * measured


def compare(
    runs: Sequence[MeasuredRun], devices: Sequence[Device]
) -> list[tuple[MeasuredRun, dict[str, float]]]:
    """Each run beside its leave-one-out predicted breakdown."""
    return [
        (run, predicted_breakdown(run.shape, run.layout, run.global_batch, run.precision, device))
        for run, device in zip(runs, devices, strict=True)
    ]


def ms(seconds: float) -> str:
    return f"{1e3 * seconds:.1f}"


def pair_table(
    pairs: list[tuple[MeasuredRun, dict[str, float]]], queued: dict[str, float]
) -> tuple[str, list[dict]]:
    """The markdown table of every (cell, category) and each pair's figures; ``queued``:
    each cell's run-queue wait as a share of its tracked step."""
    rows, records = [], []
    for run, predicted in pairs:
        measured, step = run.time_by_category or {}, run.tracked_step_s or 0.0
        total = sum(predicted.values())
        rows.append(
            [
                run.name,
                "**step**",
                ms(step),
                ms(total),
                f"{total / step:.2f}",
                f"median step {ms(run.step_time_s)} ms; waited for a core "
                f"{queued.get(run.name, 0.0):.0%}",
            ]
        )
        for category in CATEGORIES:
            m, p = measured[category], predicted[category]
            ok = within_goal(m, p, step)
            small = m < SMALL_SHARE * step
            records.append(
                {"cell": run.name, "category": category, "measured": m, "predicted": p,
                 "step": step, "total": total, "within": ok, "small": small}
            )  # fmt: skip
            note = " (not modelled)" if category in UNMODELLED_CATEGORIES else ""
            rows.append(
                [
                    run.name,
                    category + note,
                    ms(m) + f" ({m / step:.0%})",
                    ms(p),
                    f"{p / m:.2f}" if m > 0 else "-",
                    ("yes" if ok else "**no**") + (" (abs)" if small else ""),
                ]
            )
    header = ["cell", "category", "measured ms (% of step)", "predicted ms", "ratio", "within goal"]
    return markdown(header, rows), records


def share(records: list[dict], keep=lambda r: True) -> str:
    kept = [r for r in records if keep(r)]
    within = sum(r["within"] for r in kept)
    return f"{within} of {len(kept)} ({within / len(kept):.1%})" if kept else "none"


def summary(records: list[dict]) -> str:
    """The share within the goal: all pairs, the modelled categories, the pairs where either
    side is 5% of the step or more, by category, and with the predicted split scaled to the
    measured step (the split alone)."""
    modelled = [r for r in records if r["category"] not in UNMODELLED_CATEGORIES]
    needed = math.ceil(GOAL_SHARE * len(records))
    met = sum(r["within"] for r in records) >= needed
    lines = [
        f"- all (cell, category) pairs: {share(records)}; the goal, {GOAL_SHARE:.0%}, needs "
        f"{needed}: " + ("met" if met else "**not met**"),
        f"- the four modelled categories: {share(modelled)}",
        "- pairs where measured or predicted is at least 5% of the step: "
        + share(
            records,
            lambda r: max(r["measured"], r["predicted"]) >= SMALL_SHARE * r["step"],
        ),
    ]
    lines += [
        f"- {category}: " + share(records, lambda r, c=category: r["category"] == c)
        for category in CATEGORIES
    ]
    scaled = [
        {**r, "within": within_goal(r["measured"], r["predicted"] * r["step"] / r["total"],
                                    r["step"])}
        for r in records
    ]  # fmt: skip
    lines.append(
        "- the split alone (predicted categories scaled so they add up to the measured "
        f"step): {share(scaled)}; the four modelled categories "
        + share(scaled, lambda r: r["category"] not in UNMODELLED_CATEGORIES)
    )
    return "\n".join(lines)


def run_queue_share(directory: Path) -> float:
    """The run-queue wait (ranks ready to run, waiting for a core) of the last tracked step
    as a share of its wall time, mean over ranks: how contended the cores were."""
    entries = json.loads((directory / "summary.json").read_text())["time_breakdown_by_rank"]
    last: dict[int, dict] = {}
    for entry in entries:
        if entry["rank"] not in last or entry["step"] >= last[entry["rank"]]["step"]:
            last[entry["rank"]] = entry
    return sum(e.get("cpu_contention_s", 0.0) / e["wall_s"] for e in last.values()) / len(last)


def last_steps(directory: Path) -> list[dict]:
    """Each rank's last time-tracked step from its timeline file (``ranks/time_rank<r>.json``)."""
    return [record["steps"][-1] for record in read_time_ranks(directory) if record["steps"]]


def arrival_wait(steps: list[dict]) -> float | None:
    """Seconds a rank waited, mean over ranks, for the last member of each collective to issue
    it (the issue times of the same collective on every rank, same host clock): the part of a
    collective's time that is a peer arriving late, not the wire. Send/recv are left out; None
    where a group's name does not say its members (the disjoint groups of a mesh dimension
    share a name)."""
    issues: list[dict[str, list[float]]] = []
    for step in steps:
        groups: dict[str, list[float]] = {}
        for c in step["comms"]:
            if c["kind"] not in POINT_TO_POINT:
                groups.setdefault(c["group"], []).append(step["t0_unix"] + c["issue"])
        issues.append(groups)
    waited = 0.0
    for name in set().union(*issues):
        members = [groups[name] for groups in issues if name in groups]
        size = name.rpartition("[")[2].rstrip("]")  # the counting group's name: "<label>[<size>]"
        if not size.isdigit() or int(size) != len(members) or len({len(m) for m in members}) != 1:
            return None
        for same in zip(*members, strict=True):
            waited += sum(max(same) - issued for issued in same)
    return waited / len(steps)


def comm_table(runs: Sequence[MeasuredRun], directories: dict[str, Path]) -> str:
    """Each cell's measured exposed communication beside what the link is fitted to."""
    rows = []
    for run in runs:
        steps = last_steps(directories[run.name])
        if len(steps) < 2:
            continue
        wait = arrival_wait(steps)
        in_flight = sum(s["comm_s"] for s in steps) / len(steps)
        overlapped = sum(s["overlapped_comm"] for s in steps) / len(steps)
        rows.append(
            [
                run.name,
                ms((run.time_by_category or {})["exposed_comm"]),
                "-" if wait is None else ms(wait),
                ms(in_flight),
                ms(overlapped),
                ms(run.comm_time_s),
            ]
        )
    header = [
        "cell",
        "exposed_comm ms",
        "waiting for the last rank to issue ms",
        "in flight ms (timeline)",
        "overlapped ms",
        "comm counter ms (the link's fit)",
    ]
    return markdown(header, rows)


def read_cells(
    root: Path, nprocs: Sequence[int]
) -> tuple[list[MeasuredRun], dict[str, float], dict[str, Path]]:
    """The matrix's finished runs under ``root``, in the matrix's order, each one's run-queue
    share (``run_queue_share``) and directory by name."""
    found, queued, directories = [], {}, {}
    for strategy, nproc, _ in cells(nprocs):
        directory = run_dir(root, strategy, nproc)
        if (directory / "summary.json").is_file():
            run = read_run(directory)
            if run.time_by_category is None:
                print(f"{directory}: no time_breakdown_by_rank, left out")
                continue
            found.append(run)
            queued[run.name] = run_queue_share(directory)
            directories[run.name] = directory
        else:
            print(f"{directory}: no finished run, left out")
    return found, queued, directories


def constants(device: Device) -> str:
    """The fitted constants the split depends on, one line."""
    link = device.intra_node
    return (
        f"matmul efficiency {device.matmul_efficiency:.2f} of {device.peak('fp32') / 1e9:.0f} "
        f"GFLOP/s, elementwise {device.elementwise_rate() / 1e9:.2f} GB/s, host per layer "
        f"{1e3 * device.layer_overhead_s:.2f} ms, link {link.latency * 1e6:.0f} us + "
        f"{link.bandwidth / 1e9:.2f} GB/s, oversubscription exponent "
        f"{device.oversubscription_exponent:.2f}, engines "
        + ", ".join(f"{k} {1e3 * v:.0f} ms" for k, v in sorted(device.engine_overhead_s.items()))
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, help="read the runs here instead of running them")
    parser.add_argument("--out", type=Path, default=Path("runs/time-predicted"))
    parser.add_argument("--model", default="small")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--nproc", type=int, nargs="+", default=[2, 4], choices=sorted(CELLS))
    args = parser.parse_args()
    if args.runs is None:
        run_matrix(args)
    root = args.runs or args.out
    runs, queued, directories = read_cells(root, args.nproc)
    if len(runs) < 3:
        raise SystemExit(f"{root}: {len(runs)} cells with a time breakdown; need 3 or more")
    devices = leave_one_out_devices(runs, cpu_device())
    table, records = pair_table(compare(runs, devices), queued)
    print(f"\n{len(runs)} cells from {root}, leave-one-out\n")
    print(table)
    print("\nWithin the goal (25%, or 5% of the step for a category under 5% of it):\n")
    print(summary(records))
    print("\nExposed communication, mean over ranks of the tracked step:\n")
    print(comm_table(runs, directories))
    print(f"\nCalibrated on all {len(runs)} cells: {constants(fit(runs, cpu_device()))}")


if __name__ == "__main__":
    main()
