"""The planner against published results: the ZeRO paper's model-state memory and the
throughput per GPU of Megatron-LM's weak-scaling runs and Llama 3 405B's pre-training.

    python benchmarks/plan_published.py [--render docs/planner.md]

Every row uses the inputs the paper states (shape, degrees, batch, micro-batch,
recomputation, precision, GPU) and the planner's datasheet device; the paper's figure
stands beside the prediction. Throughput is compared in the paper's own FLOP
convention: Megatron counts hardware FLOPs with recomputation (its formula
96 B s l h^2 (1 + s/6h + V/16lh)), Llama 3 model FLOPs (MFU).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from distlab.plan.published import LLAMA3_405B, MEGATRON_WEAK_SCALING, ZERO_PAPER, PublishedRun
from distlab.plan.replay import replay, zero_paper_state_gb
from distlab.report.markdown import fill_marked_section


def zero_rows() -> list[list[str]]:
    """The ZeRO paper's 7.5B / 64 GPUs model states per stage, paper vs planner."""
    rows = []
    for stage, paper in enumerate(ZERO_PAPER.gb_per_stage):
        predicted = zero_paper_state_gb(stage)
        rows.append(
            [
                f"ZeRO stage {stage}",
                f"{paper:g} GB",
                f"{predicted:.2f} GB",
                f"{predicted / paper:.3f}",
            ]
        )
    return rows


def throughput_row(run: PublishedRun) -> tuple[list[str], float]:
    """Paper vs planner TFLOP/s per GPU for one published run."""
    plan, predicted = replay(run)
    ratio = predicted / run.achieved_tflops_per_gpu
    split = plan.step
    row = [
        run.name,
        f"{run.gpus:,}",
        f"tp {run.tp} pp {run.pp} cp {run.cp} dp {run.dp}",
        f"{run.achieved_tflops_per_gpu:g}",
        f"{predicted:.0f}",
        f"{ratio:.2f}",
        "yes" if abs(ratio - 1) <= 0.25 else "**no**",
        f"{split.compute_s:.2f} / {split.exposed_comm_s:.2f} / {split.bubble_s:.2f}",
        f"{plan.memory.total / 2**30:.0f}",
    ]
    return row, ratio


def markdown(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)])


def report() -> str:
    """Both tables as Markdown."""
    zero = markdown(["", "paper", "planner", "ratio"], zero_rows())
    rows, misses = [], []
    for run in (*MEGATRON_WEAK_SCALING, *LLAMA3_405B):
        row, ratio = throughput_row(run)
        rows.append(row)
        if abs(ratio - 1) > 0.25:
            misses.append(run.name)
    header = [
        "run",
        "GPUs",
        "layout",
        "paper TFLOP/s/GPU",
        "planner",
        "ratio",
        "within 25%",
        "step s: compute / exposed comm / bubble",
        "memory/GPU GiB",
    ]
    summary = f"{len(rows) - len(misses)} of {len(rows)} runs within 25%"
    if misses:
        summary += f"; misses: {', '.join(misses)}"
    return f"{zero}\n\n{markdown(header, rows)}\n\n{summary}.\n"


def main() -> None:
    """Print the tables, or write them between the markers of ``--render``'s file."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--render", type=Path, help="Markdown file with the plan-published markers")
    args = parser.parse_args()
    text = report()
    if args.render is None:
        print(text)
        return
    fill_marked_section(args.render, "plan-published", text.strip())
    print(f"wrote {args.render}")


if __name__ == "__main__":
    main()
