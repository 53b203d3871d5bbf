"""The time breakdown of runs side by side (``python -m distlab.compare``).

- ``draw_time_breakdown_bars(runs, out)``: a stacked bar per run of the mean
  over ranks of the last tracked step (``summary.json``'s
  ``time_breakdown_by_rank``), with the overlapped communication outlined
  beside it and the overlap fraction at its end.
- ``time_breakdown_rows`` / ``time_breakdown_markdown`` / ``time_breakdown_table``:
  the same numbers as a table (milliseconds and percent of the wall time).

- ``draw_run_gantt(run_dir)``: one run's Gantt of every rank from its files
  (``distlab.measure.time_gantt``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from rich.table import Table

from distlab.errors import DistlabError
from distlab.measure.time_gantt import CATEGORY_COLOURS, draw_time_gantt, pyplot
from distlab.measure.timeline import CATEGORIES, mean_of_last_steps
from distlab.report.plots import run_labels
from distlab.report.runs import Run
from distlab.report.tables import console_table, markdown_rows
from distlab.run.files import CONFIG_FILE, SUMMARY_FILE, TIME_GANTT_PNG, read_time_ranks

BREAKDOWN_KEY = "time_breakdown_by_rank"
"""The summary's list of every rank's tracked steps, by category."""


def draw_run_gantt(run_dir: Path, out: Path | None = None) -> Path:
    """The Gantt of a run's last time-tracked step on every rank, from its files, into ``out``
    (default ``RUN_DIR/time_rank_gantt.png``); a one-line error when it has none."""
    run_dir = Path(run_dir)
    try:
        records = read_time_ranks(run_dir)
    except ValueError as exc:
        raise DistlabError(str(exc)) from None
    if not any(record.get("steps") for record in records):
        raise DistlabError(f"{run_dir} has no time-tracked step in ranks/ (--track-time)")
    return draw_time_gantt(records, run_title(run_dir), out or run_dir / TIME_GANTT_PNG)


def run_title(run_dir: Path) -> str:
    """``strategy xN`` from the run dir's summary.json, else its config.yaml, else its name."""
    for name, load in ((SUMMARY_FILE, json.loads), (CONFIG_FILE, yaml.safe_load)):
        file = Path(run_dir, name)
        if not file.is_file():
            continue
        try:
            data = load(file.read_text())
        except (ValueError, yaml.YAMLError):
            continue
        if isinstance(data, dict) and "strategy" in data and "nproc" in data:
            return f"{data['strategy']} x{data['nproc']}"
    return Path(run_dir).name


def last_step_breakdown(summary: dict[str, Any]) -> dict[str, Any] | None:
    """A run's time breakdown as the tables and bars show it: the mean over ranks of each
    rank's last tracked step (``distlab.measure.timeline.mean_of_last_steps``)."""
    return mean_of_last_steps(summary.get(BREAKDOWN_KEY))


def has_time_breakdown(summary: dict[str, Any]) -> bool:
    """Whether a run's summary holds the time lab's breakdown."""
    return bool(summary.get(BREAKDOWN_KEY))


def labelled_summaries(runs: list[Run]) -> list[tuple[str, dict[str, Any]]]:
    """``(label, summary)`` of the runs whose summary has the time breakdown, in order."""
    return [
        (label, run.summary)
        for run, label in zip(runs, run_labels(runs), strict=True)
        if has_time_breakdown(run.summary)
    ]


def draw_time_breakdown_bars(runs: list[tuple[str, dict[str, Any]]], out: Path) -> Path:
    """A stacked bar per ``(label, summary)``: the mean over ranks of the last tracked step by
    category (ms), the overlapped communication outlined under it, the overlap fraction at
    its end. Runs without a breakdown are left out; returns ``out``."""
    rows = [(label, b) for label, s in runs if (b := last_step_breakdown(s)) is not None]
    if not rows:
        raise DistlabError(f"no run has {BREAKDOWN_KEY} in its summary")
    from matplotlib.patches import Patch

    plt = pyplot()
    figure, axis = plt.subplots(figsize=(10, 1.6 + 0.7 * len(rows)), layout="constrained")
    right = 0.0
    for index, (_, breakdown) in enumerate(rows):
        y = len(rows) - 1 - index
        left = 0.0
        for category in CATEGORIES:
            width = 1000 * breakdown["by_category"][category]
            axis.barh(y, width, left=left, height=0.45, color=CATEGORY_COLOURS[category], lw=0)
            left += width
        overlapped = 1000 * breakdown["overlapped_comm"]
        axis.barh(y - 0.33, overlapped, height=0.16, fill=False, edgecolor="black", lw=0.9)
        end = max(left, overlapped)
        fraction = breakdown["overlap_fraction"]
        text = f" {left:.1f} ms, " + (
            "no comm" if fraction is None else f"{fraction:.0%} of comm overlapped"
        )
        axis.text(end, y, text, va="center", ha="left", fontsize=8)
        right = max(right, end)
    axis.set_yticks(range(len(rows)), [label for label, _ in reversed(rows)], fontsize=8)
    axis.set_xlim(0, 1.35 * right or 1)
    axis.set_xlabel("ms in the last tracked step (mean over ranks)")
    axis.set_title("where a step's time went, by category", fontsize=10)
    axis.grid(alpha=0.3, axis="x")
    axis.set_axisbelow(True)
    handles: list[Any] = [Patch(color=CATEGORY_COLOURS[c], label=c) for c in CATEGORIES]
    handles.append(Patch(fill=False, edgecolor="black", label="overlapped comm (outlined)"))
    figure.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out


TIME_TITLE = "time of the last tracked step, mean over ranks: ms (% of the step)"
TIME_COLUMNS = [
    ("run", "left"),
    ("step", "right"),
    ("wall ms", "right"),
    *((f"{c} ms (%)", "right") for c in CATEGORIES),
    ("overlapped ms", "right"),
    ("overlap", "right"),
]
"""*overlapped*: collectives in flight while the rank computed (not in the wall time);
*overlap*: overlapped / time collectives were in flight."""


def time_breakdown_rows(runs: list[tuple[str, dict[str, Any]]]) -> list[list[str]]:
    """The time table's cells, one row per ``(label, summary)`` with a breakdown."""
    rows = []
    for label, summary in runs:
        b = last_step_breakdown(summary)
        if b is None:
            continue
        wall = b["wall_s"]
        cells = []
        for category in CATEGORIES:
            seconds = b["by_category"][category]
            share = f"{100 * seconds / wall:.1f}%" if wall > 0 else "-"
            cells.append(f"{1000 * seconds:.2f} ({share})")
        fraction = b["overlap_fraction"]
        rows.append(
            [
                label,
                "/".join(str(s) for s in b["steps"]),
                f"{1000 * wall:.2f}",
                *cells,
                f"{1000 * b['overlapped_comm']:.2f}",
                "-" if fraction is None else f"{fraction:.3f}",
            ]
        )
    return rows


def time_breakdown_markdown(runs: list[tuple[str, dict[str, Any]]]) -> str:
    """The time table as GitHub Markdown."""
    return markdown_rows(TIME_COLUMNS, time_breakdown_rows(runs))


def time_breakdown_table(runs: list[tuple[str, dict[str, Any]]]) -> Table:
    """The time table for the terminal."""
    return console_table(TIME_TITLE, TIME_COLUMNS, time_breakdown_rows(runs))
