"""Traced against predicted: one step of each layout with fake ranks, beside the theory.

    python benchmarks/trace_table.py                   # everything below (about 15 minutes)
    python benchmarks/trace_table.py --nproc 8 64      # fewer rank counts
    python benchmarks/trace_table.py --skip-real-runs  # only the traces

Three tables, written into the ``memory-trace`` section of ``docs/memory.md``:

1. The trace against real runs: the tiny model under ddp, fsdp, hsdp, tp and
   fsdp+tp at 2 and 4 ranks, run for real (local launcher, 3 steps; torch's
   tracker measures the last) and traced (``distlab.train.trace``): rank 0's
   peak by category from both.
2. At scale: fsdp, hsdp and fsdp+tp at 8, 64 and 1,024 ranks, and tp alone
   at its largest valid degree, for the ``gpt2`` preset and a 7B-class shape
   (32 layers x 4096, 32 heads, vocabulary 32,000, 4,096 tokens); one sequence
   per data-parallel rank, AdamW, fp32. Traced peak against
   ``distlab.theory.memory``'s prediction, the categories that differ most,
   and the seconds each trace took.
3. The planner's pick for 64 GPUs (gpt2, global batch 64, no sequence
   parallelism: the lab's fsdp+tp does not take it), traced in the lab,
   against the plan's memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from distlab.errors import DistlabError
from distlab.launch.runner import run
from distlab.measure.step_memory import CATEGORIES
from distlab.plan.hardware import device_spec
from distlab.plan.memory import lab_config
from distlab.plan.search import search
from distlab.plan.shape import from_preset
from distlab.report.markdown import fill_marked_section
from distlab.strategies import registry
from distlab.strategies.resolve import load_config
from distlab.theory.memory import predict_peak
from distlab.train.trace import trace_step

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20
SEVEN_B = {"layers": 32, "hidden": 4096, "heads": 32, "vocab": 32000, "seq_len": 4096}
MODELS = {"gpt2": {"model": "gpt2"}, "7B shape": SEVEN_B}
TP = {"gpt2": 4, "7B shape": 8}
"""fsdp+tp's tensor-parallel degree: what the heads and vocabulary allow within a node."""
TP_ALONE = {"gpt2": 4, "7B shape": 32}
"""tp's largest valid degree: it must divide the heads (12, 32) and the vocabulary."""
REAL = [
    ("ddp", 2, {}),
    ("fsdp", 2, {}),
    ("fsdp", 4, {}),
    ("hsdp", 4, {}),
    ("tp", 2, {}),
    ("tp", 4, {}),
    ("fsdp+tp", 4, {"tp": 2}),
]


def config_for(strategy: str, nproc: int, fields: dict) -> object:
    """The config of ``strategy`` at ``nproc`` ranks, one sequence per data-parallel rank."""
    probe = load_config(None, {"strategy": strategy, "nproc": nproc, "global_batch": 1024 * 64,
                               **fields})  # fmt: skip
    dp = registry.get(strategy).data_parallel_size(probe)
    return dataclasses.replace(probe, global_batch=dp)


def mib(value: int) -> str:
    return f"{value / MIB:,.1f}"


def largest_gaps(traced: dict[str, int], predicted: dict[str, int]) -> str:
    """The two categories whose traced and predicted bytes differ most, as ``name t / p``."""
    gaps = sorted(CATEGORIES, key=lambda c: -abs(traced[c] - predicted[c]))[:2]
    return ", ".join(
        f"{c} {mib(traced[c])} / {mib(predicted[c])}" for c in gaps if traced[c] != predicted[c]
    )


def real_rows() -> list[str]:
    """Table 1: real runs' measured peaks against their traces."""
    lines = [
        "| strategy | ranks | measured by the run (KiB) | traced (KiB) | equal by category |",
        "|---|---:|---:|---:|---|",
    ]
    with tempfile.TemporaryDirectory(prefix="distlab-trace-") as work:
        for strategy, nproc, fields in REAL:
            config = load_config(None, {
                "strategy": strategy, "nproc": nproc, "model": "tiny", "global_batch": 8,
                "steps": 3, "launcher": "local", "wandb": False, "quiet": True,
                "final_checkpoint": False, "run_dir": f"{work}/{strategy}-{nproc}", **fields,
            })  # fmt: skip
            run_dir = run(config)
            measured = json.loads((run_dir / "summary.json").read_text())["memory_peak_by_rank"][0]
            traced = trace_step(config)
            same = traced.by_category == measured["peak_by_category"]
            print(f"real {strategy} x{nproc}: {measured['peak']} vs {traced.total}", flush=True)
            lines.append(
                f"| {strategy} | {nproc} | {measured['peak'] / 1024:,.1f} | "
                f"{traced.total / 1024:,.1f} | {'yes' if same else 'no'} |"
            )
    return lines


def scale_rows(nprocs: list[int]) -> list[str]:
    """Table 2: traced against predicted at scale."""
    lines = [
        "| model | strategy | ranks | global batch | traced (MiB) | predicted (MiB) | ratio "
        "| largest differences, traced / predicted (MiB) | trace (s) |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for model, shape in MODELS.items():
        cases = [
            (strategy, nproc, {**shape, **extra})
            for nproc in nprocs
            for strategy, extra in (("fsdp", {}), ("hsdp", {}), ("fsdp+tp", {"tp": TP[model]}))
        ]
        cases.append(("tp", TP_ALONE[model], dict(shape)))
        for strategy, nproc, fields in cases:
            try:
                config = config_for(strategy, nproc, fields)
            except DistlabError as exc:
                lines.append(f"| {model} | {strategy} | {nproc} | | not valid: {exc} |")
                continue
            traced = trace_step(config)
            predicted = predict_peak(config)
            ratio = traced.total / predicted.total
            label = strategy + (f" (tp {config.tp})" if strategy == "fsdp+tp" else "")
            print(f"{model} {label} x{nproc}: {ratio:.3f} in {traced.seconds:.1f} s", flush=True)
            lines.append(
                f"| {model} | {label} | {nproc:,} | {config.global_batch} | {mib(traced.total)} | "
                f"{mib(predicted.total)} | {ratio:.3f} | "
                f"{largest_gaps(traced.by_category, predicted.by_category)} | "
                f"{traced.seconds:.1f} |"
            )
    return lines


def planner_rows() -> list[str]:
    """Table 3: the planner's 64-GPU gpt2 pick, traced in the lab, against the plan."""
    shape = from_preset("gpt2")
    device = device_spec("h100-sxm", None, None)
    fixed = {"sequence_parallel": False}
    pick = search(shape, 64, 64, "bf16", device, fixed)[0]
    config = lab_config(shape, pick.layout, 64, "bf16")
    if config is None:
        return [f"The pick ({pick.layout.label()}) is not a layout the lab runs."]
    traced = trace_step(config)
    planned = pick.memory.by_category
    lines = [
        f"Pick: {pick.layout.label()}, bf16 (lab strategy `{config.strategy}`, "
        f"{pick.memory.source}); traced in {traced.seconds:.1f} s.",
        "",
        "| | " + " | ".join(CATEGORIES) + " | total |",
        "|---|" + "---:|" * (len(CATEGORIES) + 1),
        "| planned (MiB) | " + " | ".join(mib(planned[c]) for c in CATEGORIES)
        + f" | {mib(pick.memory.total)} |",
        "| traced (MiB) | " + " | ".join(mib(traced.by_category[c]) for c in CATEGORIES)
        + f" | {mib(traced.total)} |",
        f"| traced / planned | | | | | | | | {traced.total / pick.memory.total:.3f} |",
    ]  # fmt: skip
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", nargs="+", type=int, default=[8, 64, 1024])
    parser.add_argument("--skip-real-runs", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "memory.md")
    args = parser.parse_args(argv)
    command = "python benchmarks/trace_table.py " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    started = time.time()
    real = [] if args.skip_real_runs else real_rows()
    scale = scale_rows(args.nproc)
    planner = planner_rows()
    text = "\n".join(
        [
            "Generated by:",
            "",
            "```",
            command.strip(),
            "```",
            "",
            f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}, this machine's CPU "
            f"({time.time() - started:.0f} s in all).",
            "",
            *(
                [
                    "**The trace against real runs** (tiny model, global batch 8, AdamW, "
                    "fp32): rank 0's peak as the run's tracker measured it in its last "
                    "step, and as the trace files it.",
                    "",
                    *real,
                    "",
                ]
                if real
                else []
            ),
            "**At scale** (one sequence per data-parallel rank, AdamW, fp32): rank 0's "
            "traced peak against the prediction.",
            "",
            *scale,
            "",
            "**The planner's pick for 64 H100s** (`python -m distlab.plan --model gpt2 "
            "--gpus 64 --global-batch 64 --no-sequence-parallel --trace`):",
            "",
            *planner,
        ]
    )
    fill_marked_section(args.out, "memory-trace", text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
