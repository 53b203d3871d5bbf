"""The planner against the lab's own runs (docs/comparison.md's cells) on this machine.

    python benchmarks/plan_check.py [--runs runs/compare] [--render docs/planner.md]
        [--calibration-out docs/measurements/plan_calibration_cpu.json]

Two-fold cross-validation: the cells are split into two halves (each strategy measured at
2 and 4 ranks has one size in each half; the others alternate), the CPU is calibrated on
one half (``distlab.plan.calibrate.fit``) and every cell of the other half is predicted,
so each cell's predicted step time comes from a calibration that never saw it. Memory is
rank 0's step peak seen by torch's memory tracker against the planner's memory per GPU
(for these layouts the lab theory). A calibration on all cells is written for the
planner's CPU plans (``--calibration``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from distlab.plan.calibrate import fit, predicted_step, write_calibration
from distlab.plan.hardware import cpu_device
from distlab.plan.memory import memory_per_gpu
from distlab.plan.runs import MeasuredRun, read_run

MARK_BEGIN = "<!-- plan-check:begin -->"
MARK_END = "<!-- plan-check:end -->"
TIME_TOLERANCE = 0.25
MEMORY_TOLERANCE = 0.10
MAX_RANKS_PER_CORE = 2


def folds(runs: list[MeasuredRun]) -> tuple[list[MeasuredRun], list[MeasuredRun]]:
    """Split ``runs``: of each strategy's sizes alternately one per half, the rest alternating."""
    first, second = [], []
    by_strategy: dict[str, list[MeasuredRun]] = {}
    for run in runs:
        by_strategy.setdefault(run.name.split(" x")[0] + run.shape.name, []).append(run)
    singles = 0
    for index, group in enumerate(by_strategy.values()):
        if len(group) == 1:
            (first if singles % 2 == 0 else second).extend(group)
            singles += 1
            continue
        for turn, run in enumerate(sorted(group, key=lambda r: r.layout.gpus)):
            (first if (turn + index) % 2 == 0 else second).append(run)
    return first, second


def calibratable(run: MeasuredRun, cores: int) -> bool:
    """Whether a cell may calibrate: at most ``MAX_RANKS_PER_CORE`` ranks per core (the
    oversubscription the model is fitted for; beyond it cells are only predicted)."""
    return run.layout.gpus <= MAX_RANKS_PER_CORE * cores


def check(runs: list[MeasuredRun]) -> tuple[list[list[str]], int, int]:
    """Rows of the table, and how many cells are within the time and memory tolerances."""
    half_a, half_b = folds(runs)
    cores = cpu_device().cores
    fitted_a = fit([r for r in half_a if calibratable(r, cores)], cpu_device())
    fitted_b = fit([r for r in half_b if calibratable(r, cores)], cpu_device())
    rows, time_ok, memory_ok = [], 0, 0
    for run in runs:
        device, fold = (fitted_b, "B") if run in half_a else (fitted_a, "A")
        if not calibratable(run, cores):
            fold += " (predicted only)"
        predicted = predicted_step(run, device)
        ratio = predicted / run.step_time_s
        time_ok += abs(ratio - 1) <= TIME_TOLERANCE
        memory = memory_per_gpu(run.shape, run.layout, run.global_batch, run.precision)
        mem_ratio = run.peak_memory_bytes / memory.total if run.peak_memory_bytes else None
        memory_ok += mem_ratio is not None and abs(mem_ratio - 1) <= MEMORY_TOLERANCE
        rows.append(
            [
                run.name,
                run.layout.label(),
                fold,
                f"{run.step_time_s:.3f}",
                f"{predicted:.3f}",
                f"{ratio:.2f}" + ("" if abs(ratio - 1) <= TIME_TOLERANCE else " **miss**"),
                f"{(run.peak_memory_bytes or 0) / 2**20:.2f}",
                f"{memory.total / 2**20:.2f}",
                f"{mem_ratio:.3f}" if mem_ratio else "-",
            ]
        )
    return rows, time_ok, memory_ok


def report(runs: list[MeasuredRun]) -> str:
    """The table as Markdown, with its summary line."""
    rows, time_ok, memory_ok = check(runs)
    header = [
        "cell",
        "layout",
        "calibrated on",
        "measured step s",
        "predicted",
        "ratio",
        "tracker peak MiB",
        "planner MiB",
        "ratio",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return (
        "\n".join(lines)
        + f"\n\nStep time within {TIME_TOLERANCE:.0%}: {time_ok} of {len(rows)} cells; "
        f"memory within {MEMORY_TOLERANCE:.0%}: {memory_ok} of {len(rows)}.\n"
    )


def main() -> None:
    """Print the table (or render it into a page) and write the all-cells calibration."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/compare"))
    parser.add_argument("--render", type=Path)
    parser.add_argument("--calibration-out", type=Path)
    args = parser.parse_args()
    runs = [read_run(d) for d in sorted(args.runs.iterdir()) if (d / "summary.json").is_file()]
    text = report(runs)
    if args.calibration_out:
        cores = cpu_device().cores
        fitted = fit([r for r in runs if calibratable(r, cores)], cpu_device())
        write_calibration(fitted, args.calibration_out)
        print(f"wrote {args.calibration_out}")
    if args.render is None:
        print(text)
        return
    page = args.render.read_text()
    start, end = page.index(MARK_BEGIN) + len(MARK_BEGIN), page.index(MARK_END)
    args.render.write_text(page[:start] + "\n" + text + page[end:])
    print(f"wrote {args.render}")


if __name__ == "__main__":
    main()
