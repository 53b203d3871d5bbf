"""The comparison table, measured beside predicted, for the terminal and for Markdown."""

from __future__ import annotations

import math

from rich.table import Table

from distlab.measure.step_memory import CATEGORIES
from distlab.measure.wire import KINDS
from distlab.report.runs import MIB, Run, figures, ratio


def _num(value: float | None, fmt: str = "{:,.0f}") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt.format(value)


def _mib(value: float | None) -> str:
    return _num(None if value is None else value / MIB, "{:.2f}")


def _kib(value: float | None) -> str:
    return _num(None if value is None else value / 1024, "{:,.1f}")


def _ratio(value: float | None) -> str:
    return _num(value, "{:.3f}")


COLUMNS = [
    ("run", "left"),
    ("final loss", "right"),
    ("val loss", "right"),
    ("tokens/s", "right"),
    ("MFU %", "right"),
    ("peak mem/rank MiB", "right"),
    ("state/rank MiB", "right"),
    ("pred", "right"),
    ("ratio", "right"),
    ("comm/step KiB", "right"),
    ("pred", "right"),
    ("ratio", "right"),
    ("wire KiB", "right"),
    ("comm s", "right"),
    ("bubble", "right"),
]


def table_rows(runs: list[Run]) -> list[list[str]]:
    """The comparison table's cells, one row per run."""
    rows = []
    for run in runs:
        f = figures(run)
        memory = f["peak_memory_by_rank"]
        rows.append(
            [
                f["label"],
                _num(f["final_loss"], "{:.4f}"),
                _num(f["final_val_loss"], "{:.4f}"),
                _num(f["tokens_per_s"]),
                _num(None if f["mfu"] is None else 100 * f["mfu"], "{:.2f}"),
                " / ".join(_mib(m) for m in memory) if memory else "-",
                _mib(f["state_bytes"]),
                _mib(f["state_pred"]),
                _ratio(f["state_ratio"]),
                _kib(f["comm_bytes"]),
                _kib(f["comm_pred"]),
                _ratio(f["comm_ratio"]),
                _kib(f["wire_bytes"]),
                _num(f["comm_time_s"], "{:.3f}"),
                _num(f["bubble"], "{:.3f}"),
            ]
        )
    return rows


def console_table(title: str, columns: list[tuple[str, str]], rows: list[list[str]]) -> Table:
    """A rich table of ``rows`` under ``columns`` ((name, justify) pairs)."""
    table = Table(title=title)
    for name, justify in columns:
        table.add_column(name, justify=justify)
    for row in rows:
        table.add_row(*row)
    return table


def markdown_rows(columns: list[tuple[str, str]], rows: list[list[str]]) -> str:
    """``rows`` under ``columns`` as a GitHub Markdown table."""
    header = [name for name, _ in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def comparison_table(runs: list[Run]) -> Table:
    """Strategy, world size, loss, throughput, MFU, memory and communication vs theory."""
    title = "distlab runs: measured vs predicted (rank 0 unless per rank)"
    return console_table(title, COLUMNS, table_rows(runs))


def markdown_table(runs: list[Run]) -> str:
    """The comparison table as GitHub Markdown."""
    return markdown_rows(COLUMNS, table_rows(runs))


def comm_breakdown_markdown(runs: list[Run]) -> str:
    """Per collective type: measured and predicted payload bytes per step (rank 0)."""
    lines = [
        "| run | collective | measured bytes/step | predicted | ratio |",
        "|---|---|---|---|---|",
    ]
    for run in runs:
        f = figures(run)
        for kind in KINDS:
            measured, predicted = f["comm_kinds"].get(kind), f["comm_kinds_pred"].get(kind)
            if measured is None and predicted is None:
                continue
            lines.append(
                f"| {f['label']} | {kind} | {_num(measured)} | {_num(predicted)} | "
                f"{_ratio(ratio(measured, predicted))} |"
            )
    return "\n".join(lines)


MEMORY_TITLE = "step memory of rank 0 at its peak, MiB: measured by category vs predicted"
MEMORY_COLUMNS = [
    ("run", "left"),
    ("phase", "left"),
    *((category, "right") for category in CATEGORIES),
    ("peak", "right"),
    ("max rank", "right"),
    ("pred", "right"),
    ("pred phase", "left"),
    ("ratio", "right"),
]
"""*max rank*: the largest peak of any rank (pipeline stages differ); *ratio*: rank 0's
peak / predicted."""


def memory_table_rows(runs: list[Run]) -> list[list[str]]:
    """The step-memory table's cells, one row per run ("-" where not measured or predicted)."""
    rows = []
    for run in runs:
        f = figures(run)
        measured, predicted = f["step_memory"] or {}, f["step_memory_pred"] or {}
        split = measured.get("peak_by_category", {})
        rows.append(
            [
                f["label"],
                measured.get("peak_phase", "-"),
                *(_mib(split.get(category)) for category in CATEGORIES),
                _mib(measured.get("peak")),
                _mib(f["step_memory_max"]),
                _mib(predicted.get("total")),
                predicted.get("phase", "-"),
                _ratio(f["step_memory_ratio"]),
            ]
        )
    return rows


def has_step_memory(runs: list[Run]) -> bool:
    """Whether any run measured its step memory (a prediction alone compares nothing)."""
    return any(f["step_memory"] for f in map(figures, runs))


def memory_table(runs: list[Run]) -> Table:
    """Rank 0's step-memory peak by category and phase, beside the theory's peak."""
    return console_table(MEMORY_TITLE, MEMORY_COLUMNS, memory_table_rows(runs))


def memory_markdown_table(runs: list[Run]) -> str:
    """The step-memory table as GitHub Markdown."""
    return markdown_rows(MEMORY_COLUMNS, memory_table_rows(runs))


def memory_breakdown_markdown(runs: list[Run]) -> str:
    """Per category: rank 0's measured bytes at its peak, the predicted ones, and the ratio."""
    lines = [
        "| run | category | measured bytes | predicted | ratio |",
        "|---|---|---|---|---|",
    ]
    for run in runs:
        f = figures(run)
        if not f["step_memory_pred"]:
            continue
        measured = (f["step_memory"] or {}).get("peak_by_category", {})
        predicted = f["step_memory_pred"].get("by_category", {})
        for category in CATEGORIES:
            m, p = measured.get(category), predicted.get(category)
            lines.append(
                f"| {f['label']} | {category} | {_num(m)} | {_num(p)} | {_ratio(ratio(m, p))} |"
            )
    return "\n".join(lines)


ROUTING_TITLE = "MoE routing (rank 0's rows; tokens = (token, expert) pairs summed over layers)"
ROUTING_COLUMNS = [
    ("run", "left"),
    ("aux loss (last)", "right"),
    ("tokens per expert (last step)", "left"),
    ("imbalance mean", "right"),
    ("imbalance max", "right"),
    ("dropped", "right"),
]
"""*imbalance*: the busiest expert's tokens over the mean (1 = balanced), per step;
*dropped*: tokens over all steps that no expert ran (0: the layer is dropless)."""


def has_routing(runs: list[Run]) -> bool:
    """Whether any run trained a mixture-of-experts model (and so recorded its routing)."""
    return any("moe_aux_loss" in figures(run) for run in runs)


def routing_table_rows(runs: list[Run]) -> list[list[str]]:
    """The routing table's cells, one row per MoE run."""
    rows = []
    for run in runs:
        f = figures(run)
        if "moe_aux_loss" not in f:
            continue
        rows.append(
            [
                f["label"],
                _num(f["moe_aux_loss"], "{:.4f}"),
                " ".join(str(n) for n in f["moe_tokens_per_expert"]),
                _num(f["moe_imbalance_mean"], "{:.3f}"),
                _num(f["moe_imbalance_max"], "{:.3f}"),
                _num(f["moe_dropped_tokens"]),
            ]
        )
    return rows


def routing_table(runs: list[Run]) -> Table:
    """The MoE runs' routing: balance loss, tokens per expert, imbalance, dropped tokens."""
    return console_table(ROUTING_TITLE, ROUTING_COLUMNS, routing_table_rows(runs))
