"""Communication per optimizer step against the number of micro-batches, for every strategy.

    python benchmarks/accumulation_comm.py              # writes docs/accumulation.md's table
    python benchmarks/accumulation_comm.py --no-docs    # print it only

Runs each strategy on the counting gloo backend (``distlab.report.comm_check``,
tiny model, CPU) with A = 1, 2 and 4 micro-batches per rank and step
(``--micro-batch``; a pipeline's microbatches are its accumulation and there
are at least as many as stages, so pipelines run M = 2, 4 and 8). The plain
strategies run on 2 ranks, the compositions on 4 (2 data-parallel ranks x 2
tensor or pipeline ranks), in one job per rank count. Steps 0 and 1 are
warm-up (DDP's bucket rebuild, DeepSpeed's module trace, lazy initialisation);
step 2 is measured. Each row gives rank 0's payload bytes in that step per
collective type, as the counter saw them, beside
``distlab.theory.comm.predict_comm``'s total and the ratio.

The table goes between the ``accumulation`` markers of ``docs/accumulation.md``;
the hand-written explanation around it is kept. A strategy whose library is
missing gets a row saying so.
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distlab.measure.wire import KINDS
from distlab.report.comm_check import check, summarize
from distlab.report.markdown import fill_marked_section

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "accumulation.md"
COUNTS = (1, 2, 4)
PIPELINE_COUNTS = (2, 4, 8)
STEPS, WARMUP = 3, 2


@dataclass(frozen=True)
class Variant:
    """One strategy setting, measured at each micro-batch count."""

    label: str
    fields: dict[str, Any]
    nproc: int = 2
    needs: str | None = None

    @property
    def counts(self) -> tuple[int, ...]:
        return PIPELINE_COUNTS if self.fields.get("pp", 1) > 1 else COUNTS


REGATHER = {"reshard_between_microbatches": True}
VARIANTS = [
    Variant("ddp", {"strategy": "ddp"}),
    Variant("fsdp", {"strategy": "fsdp"}),
    Variant(
        "fsdp --no-reshard-after-forward", {"strategy": "fsdp", "reshard_after_forward": False}
    ),
    Variant("fsdp --reshard-between-microbatches", {"strategy": "fsdp", **REGATHER}),
    Variant("zero1", {"strategy": "zero1"}, needs="deepspeed"),
    Variant("zero2", {"strategy": "zero2"}, needs="deepspeed"),
    Variant(
        "zero2 --zero-reduce per-microbatch",
        {"strategy": "zero2", "zero_reduce": "per-microbatch"},
        needs="deepspeed",
    ),
    Variant("zero3", {"strategy": "zero3"}, needs="deepspeed"),
    Variant(
        "zero3 --zero-reduce once", {"strategy": "zero3", "zero_reduce": "once"}, needs="deepspeed"
    ),
    Variant("fairscale-oss", {"strategy": "fairscale-oss"}, needs="fairscale"),
    Variant("fairscale-sdp", {"strategy": "fairscale-sdp"}, needs="fairscale"),
    Variant("tp", {"strategy": "tp", "tp": 2}),
    Variant("pp", {"strategy": "pp", "pp": 2}),
    Variant("fsdp+tp", {"strategy": "fsdp+tp", "tp": 2}, nproc=4),
    Variant(
        "fsdp+tp --reshard-between-microbatches",
        {"strategy": "fsdp+tp", "tp": 2, **REGATHER},
        nproc=4,
    ),
    Variant("ddp+pp", {"strategy": "ddp+pp", "pp": 2}, nproc=4),
    Variant("fsdp+pp", {"strategy": "fsdp+pp", "pp": 2}, nproc=4),
    Variant(
        "fsdp+pp --reshard-between-microbatches",
        {"strategy": "fsdp+pp", "pp": 2, **REGATHER},
        nproc=4,
    ),
]


def cells(variant: Variant) -> list[dict[str, Any]]:
    """comm_check cells at each count: a local batch of max(counts) rows, split evenly."""
    local = max(variant.counts)
    dp = 1 if variant.fields["strategy"] in ("tp", "pp") else 2
    base = {"model": "tiny", "global_batch": dp * local, **variant.fields}
    return [{**base, "micro_batch": local // count} for count in variant.counts]


def measure(variants: list[Variant]) -> dict[str, list[tuple[int, dict[str, Any]]]]:
    """Per variant label: (micro-batch count, summarised row) for each count; one job per nproc."""
    rows: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for nproc in sorted({v.nproc for v in variants}):
        group = [v for v in variants if v.nproc == nproc]
        job = [cell for v in group for cell in cells(v)]
        print(f"measuring {len(job)} runs on {nproc} ranks ...", file=sys.stderr, flush=True)
        summary = iter(summarize(job, check(job, nproc, STEPS, warmup=WARMUP), nproc))
        for variant in group:
            rows[variant.label] = [(count, next(summary)) for count in variant.counts]
    return rows


def table(variants: list[Variant], rows: dict[str, list[tuple[int, dict[str, Any]]]]) -> str:
    """Markdown: one line per (variant, count), bytes per step per collective type."""
    kinds = [k for k in KINDS if any(k in r["kinds"] for v in rows.values() for _, r in v)]
    head = ["strategy", "ranks", "micro-batches", *kinds, "counted", "theory", "ratio"]
    lines = [head, ["---"] * len(head)]
    for variant in variants:
        if variant.label not in rows:
            missing = [f"not run: needs {variant.needs}"] + [""] * (len(head) - 4)
            lines.append([variant.label, str(variant.nproc), "-", *missing])
            continue
        for count, row in rows[variant.label]:
            by_kind = [f"{row['kinds'][k]:,.0f}" if k in row["kinds"] else "" for k in kinds]
            lines.append(
                [
                    variant.label,
                    str(variant.nproc),
                    str(count),
                    *by_kind,
                    f"{row['counted_bytes']:,.0f}",
                    f"{row['predicted_bytes']:,.0f}",
                    f"{row['counted_over_predicted']:.3f}",
                ]
            )
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def section(text: str) -> str:
    """The generated part of the docs: how it was made, then the table."""
    command = "python benchmarks/accumulation_comm.py"
    return (
        f"Made by `{command}` (torch {torch.__version__}, gloo, {platform.machine()} CPU): "
        f"rank 0's payload bytes in one steady-state step, tiny model, "
        f"{max(COUNTS)} rows per data-parallel rank ({max(PIPELINE_COUNTS)} for pipelines), "
        "counted by `distlab.measure` and predicted by `distlab.theory.comm`.\n\n"
        f"{text}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-docs", action="store_true", help="print the table only")
    args = parser.parse_args()
    runnable = [v for v in VARIANTS if v.needs is None or importlib.util.find_spec(v.needs)]
    text = section(table(VARIANTS, measure(runnable)))
    print(text)
    if not args.no_docs:
        fill_marked_section(DOCS, "accumulation", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
