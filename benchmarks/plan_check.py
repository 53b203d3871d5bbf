"""The planner against measured runs: the lab's comparison cells on this machine, the
single-GPU runs on an H100, and its pick for gpt2 on this machine.

    python benchmarks/plan_check.py [--render docs/planner.md]
        [--runs runs/compare] [--gpu-runs docs/measurements/plan_gpu_h100]
        [--pick-runs runs/plan-gpt2] [--calibration-out FILE]

Leave-one-out: every cell's step time is predicted by a calibration
(``distlab.plan.calibrate.fit``) on the *other* cells, so no cell is predicted by
constants fitted to it. Cells with more than ``MAX_RANKS_PER_CORE`` ranks per core are
predicted but never calibrate (``distlab.plan.calibrate.calibrates``: the
oversubscription the model is fitted for stops there). Memory: rank 0's step peak seen
by torch's memory tracker against the planner's memory per GPU. The pick: ``python -m
distlab.plan`` for gpt2 on this machine (calibrated on all comparison cells, no gpt2
run), against the gpt2 cells measured by ``python -m distlab.sweep
configs/plan_gpt2.yaml``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from distlab.plan.calibrate import (
    calibrates,
    fit,
    predicted_step,
    write_calibration,
)
from distlab.plan.hardware import GPUS, Device, cpu_device
from distlab.plan.memory import memory_per_gpu
from distlab.plan.runs import MeasuredRun, read_run
from distlab.plan.search import lab_command, search_rank_counts
from distlab.report.markdown import fill_marked_section

TIME_TOLERANCE = 0.25
MEMORY_TOLERANCE = 0.10
PICK_TOLERANCE = 0.10


def read_dir(root: Path) -> list[MeasuredRun]:
    """Every finished run under ``root``."""
    return [read_run(d) for d in sorted(root.iterdir()) if (d / "summary.json").is_file()]


def leave_one_out_devices(runs: Sequence[MeasuredRun], base: Device) -> list[Device]:
    """For each run, ``base`` calibrated on the other runs."""
    return [fit([r for j, r in enumerate(runs) if j != i], base) for i in range(len(runs))]


def leave_one_out(runs: Sequence[MeasuredRun], base: Device) -> list[float]:
    """Each run's predicted step time from a calibration on the others."""
    devices = leave_one_out_devices(runs, base)
    return [predicted_step(run, device) for run, device in zip(runs, devices, strict=True)]


def markdown(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)])


def flag(ratio: float, tolerance: float) -> str:
    """A ratio, marked when it misses."""
    return f"{ratio:.2f}" + ("" if abs(ratio - 1) <= tolerance else " **miss**")


def cpu_section(runs: list[MeasuredRun], base: Device) -> str:
    """The comparison cells: step time (leave-one-out) and memory."""
    rows, time_ok, memory_ok = [], 0, 0
    for run, predicted in zip(runs, leave_one_out(runs, base), strict=True):
        ratio = predicted / run.step_time_s
        time_ok += abs(ratio - 1) <= TIME_TOLERANCE
        memory = memory_per_gpu(run.shape, run.layout, run.global_batch, run.precision)
        mem_ratio = (run.peak_memory_bytes or 0) / memory.total
        memory_ok += abs(mem_ratio - 1) <= MEMORY_TOLERANCE
        rows.append(
            [
                run.name + ("" if calibrates(run, base) else " (never calibrates)"),
                run.layout.label(),
                f"{run.step_time_s:.3f}",
                f"{predicted:.3f}",
                flag(ratio, TIME_TOLERANCE),
                f"{(run.peak_memory_bytes or 0) / 2**20:.2f}",
                f"{memory.total / 2**20:.2f}",
                flag(mem_ratio, MEMORY_TOLERANCE),
            ]
        )
    header = [
        "cell",
        "layout",
        "measured step s",
        "predicted",
        "ratio",
        "tracker peak MiB",
        "planner MiB",
        "ratio",
    ]
    return (
        markdown(header, rows)
        + f"\n\nStep time within {TIME_TOLERANCE:.0%}: {time_ok} of {len(rows)} cells; "
        f"memory within {MEMORY_TOLERANCE:.0%}: {memory_ok} of {len(rows)}.\n"
    )


def gpu_section(runs: list[MeasuredRun], base: Device) -> str:
    """Single-GPU runs: the datasheet device's prediction and the leave-one-out one."""
    rows, ok = [], 0
    for run, predicted in zip(runs, leave_one_out(runs, base), strict=True):
        ratio = predicted / run.step_time_s
        ok += abs(ratio - 1) <= TIME_TOLERANCE
        datasheet = predicted_step(run, base)
        rows.append(
            [
                f"{run.name} {run.precision}",
                run.layout.label(),
                f"{run.step_time_s:.4f}",
                f"{datasheet:.4f} ({datasheet / run.step_time_s:.2f})",
                f"{predicted:.4f}",
                flag(ratio, TIME_TOLERANCE),
            ]
        )
    header = ["run", "layout", "measured step s", "datasheet device (ratio)", "calibrated", "ratio"]
    return markdown(header, rows) + f"\n\nCalibrated step time within 25%: {ok} of {len(rows)}.\n"


def pick_section(measured: list[MeasuredRun], calibration: Device) -> str:
    """The planner's ranking for the measured runs' model and batch, beside them."""
    sample = measured[0]
    plans = search_rank_counts(sample.shape, sample.global_batch, sample.precision, calibration, {})
    by_label = {(run.layout.gpus, run.layout.label()): run for run in measured}
    best = max(measured, key=lambda run: run.tokens_per_s)
    rows = []
    for rank, plan in enumerate(plans[:8], 1):
        run = by_label.get((plan.gpus, plan.layout.label()))
        rows.append(
            [
                str(rank),
                f"{plan.gpus} ranks: {plan.layout.label()}",
                f"{plan.tokens_per_s:,.0f}",
                f"{run.tokens_per_s:,.0f}" if run else "not measured",
            ]
        )
    pick = plans[0]
    run = by_label.get((pick.gpus, pick.layout.label()))
    if run is None:
        command = lab_command(sample.shape, pick.layout, sample.global_batch, sample.precision)
        verdict = f"The pick was not measured: run `{command}`."
    else:
        ratio = run.tokens_per_s / best.tokens_per_s
        verdict = (
            f"The pick, {run.name}, measured {run.tokens_per_s:,.0f} tokens/s: {ratio:.2f} of the "
            f"best measured cell ({best.name}, {best.tokens_per_s:,.0f} tokens/s); "
            + ("within" if ratio >= 1 - PICK_TOLERANCE else "**not** within")
            + f" {PICK_TOLERANCE:.0%}."
        )
    cells = [
        [
            run.name,
            run.layout.label(),
            f"{run.tokens_per_s:,.0f}",
            f"{sample.global_batch * sample.shape.seq_len / predicted_step(run, calibration):,.0f}",
        ]
        for run in sorted(measured, key=lambda r: -r.tokens_per_s)
    ]
    return (
        markdown(["#", "planner's ranking", "predicted tokens/s", "measured tokens/s"], rows)
        + f"\n\n{verdict}\n\nEvery measured cell, best first:\n\n"
        + markdown(["cell", "layout", "measured tokens/s", "predicted tokens/s"], cells)
        + "\n"
    )


def main() -> None:
    """Print the sections (or render them into a page) and write the CPU calibration."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/compare"))
    parser.add_argument("--gpu-runs", type=Path, default=Path("docs/measurements/plan_gpu_h100"))
    parser.add_argument("--gpu", default="h100-sxm", choices=tuple(GPUS))
    parser.add_argument("--pick-runs", type=Path, default=Path("runs/plan-gpt2"))
    parser.add_argument("--render", type=Path)
    parser.add_argument("--calibration-out", type=Path)
    args = parser.parse_args()
    base = cpu_device()
    runs = read_dir(args.runs)
    sections = {"plan-check": cpu_section(runs, base)}
    calibration = fit(runs, base)
    if args.calibration_out:
        write_calibration(calibration, args.calibration_out)
        print(f"wrote {args.calibration_out}")
    if args.gpu_runs.is_dir():
        sections["plan-gpu"] = gpu_section(read_dir(args.gpu_runs), GPUS[args.gpu])
    if args.pick_runs.is_dir():
        sections["plan-pick"] = pick_section(read_dir(args.pick_runs), calibration)
    for name, text in sections.items():
        if args.render:
            fill_marked_section(args.render, name, text.strip())
        else:
            print(f"## {name}\n\n{text}")
    if args.render:
        print(f"wrote {args.render}")


if __name__ == "__main__":
    main()
