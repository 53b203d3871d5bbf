"""The time pictures of a step: where each rank's wall time went, and runs side by side.

Drawn from the time lab's files (issue 23's data contract), never from a live run:

- ``draw_time_gantt(run_dir)``: the last tracked step of every rank
  (``ranks/time_rank<r>.json``), a lane per rank with the step cut into its
  categories, and under it a thin lane of the collectives in flight (issue ->
  done), so communication running under compute shows as overlap. Ranks are
  aligned on their step's start (``t0_unix``).
- ``draw_time_breakdown_bars(runs, out)``: a stacked bar per run of the mean
  over ranks of the last tracked step (``summary.json``'s
  ``time_breakdown_by_rank``), with the overlapped communication outlined
  beside it and the overlap fraction at its end.
- ``time_breakdown_rows`` / ``time_breakdown_markdown`` / ``time_breakdown_table``:
  the same numbers as a table (milliseconds and percent of the wall time).

::

    draw_time_gantt(Path("runs/fsdp-2"))  # -> runs/fsdp-2/time_rank_gantt.png
    draw_time_breakdown_bars([("fsdp x2", summary)], Path("time.png"))
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import yaml
from rich.table import Table

from distlab.errors import DistlabError
from distlab.measure.wire import KINDS
from distlab.report.plots import run_labels
from distlab.report.runs import Run
from distlab.report.tables import console_table, markdown_rows
from distlab.run.files import CONFIG_FILE, RANKS_DIR, SUMMARY_FILE

TIME_CATEGORIES = ("compute", "exposed_comm", "bubble", "data", "optimizer", "host")
"""The parts a step's wall time is cut into (they sum to it), in the order they are stacked."""

TIME_RANK_PREFIX = "time_rank"
"""``ranks/time_rank<r>.json``: rank ``r``'s tracked steps."""

GANTT_PNG = "time_rank_gantt.png"
"""The Gantt picture's default name in the run dir."""

BREAKDOWN_KEY = "time_breakdown_by_rank"
"""The summary's list of every rank's tracked steps, by category."""

CATEGORY_COLOURS = {
    "compute": "#4c72b0",
    "exposed_comm": "#c44e52",
    "bubble": "#bdbdbd",
    "data": "#937860",
    "optimizer": "#55a868",
    "host": "#ccb974",
}
"""One colour per category, the same in every picture (optimizer as in the memory picture)."""

KIND_COLOURS = dict(
    zip(
        KINDS,
        ("#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666"),
        strict=False,
    )
)
"""One colour per collective kind (a palette apart from the categories')."""

OTHER_COLOUR = "#999999"
"""A category or kind this module does not know (a newer file)."""

LANE_PITCH, STEP_LANE, COMM_LANE = 1.0, 0.5, 0.28
"""Per rank, in y units: the lane's pitch, the step lane's height, the comm lane's below it."""


MIN_LABEL_FRACTION = 0.07
"""A phase span narrower than this share of the longest step gets no name on it."""


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_time_ranks(run_dir: Path) -> list[dict[str, Any]]:
    """Every rank's ``ranks/time_rank<r>.json``, in rank order ([] if none)."""
    files = Path(run_dir, RANKS_DIR).glob(f"{TIME_RANK_PREFIX}*.json")
    ranked = []
    for file in files:
        suffix = file.stem.removeprefix(TIME_RANK_PREFIX)
        if suffix.isdigit():
            ranked.append((int(suffix), file))
    records = []
    for _, file in sorted(ranked):
        try:
            records.append(json.loads(file.read_text()))
        except ValueError as exc:
            raise DistlabError(f"{file} is corrupt: {exc}") from None
    return records


def last_step(steps: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The tracked step with the highest number (the last written, if one was written twice)."""
    best = None
    for step in steps:
        if best is None or step["step"] >= best["step"]:
            best = step
    return best


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


def comm_sublanes(comms: list[dict[str, Any]], wall_s: float) -> list[int]:
    """A sub-lane per collective so that none overlaps another in its sub-lane (greedy, in order
    of issue); a collective not done in the step lasts to its end."""
    order = sorted(range(len(comms)), key=lambda i: comms[i]["issue"])
    ends: list[float] = []
    lanes = [0] * len(comms)
    for index in order:
        comm = comms[index]
        end = wall_s if comm.get("done") is None else comm["done"]
        lane = next((n for n, last in enumerate(ends) if last <= comm["issue"]), len(ends))
        if lane == len(ends):
            ends.append(end)
        else:
            ends[lane] = end
        lanes[index] = lane
    return lanes


def _draw_rank(
    axis: Any,
    y: float,
    step: dict[str, Any],
    offset_ms: float,
    legend: dict[str, Any],
    label_ms: float,
) -> None:
    """One rank's step at height ``y``: its segments, its phase spans named on them (where one
    is at least ``label_ms`` wide) and, under them, its collectives.

    Adds what it drew to ``legend`` (label -> ``(order, Patch keywords)``)."""
    wall_s = step["wall_s"]
    outlines = []
    for segment in step.get("segments", []):
        start = offset_ms + 1000 * segment["start"]
        width = 1000 * (segment["end"] - segment["start"])
        category = segment["category"]
        if category == "overlapped":  # comm in flight under work: outlined over the lane
            outlines.append((start, width))
            legend["overlapped (comm under work)"] = (20, {"fill": False, "edgecolor": "black"})
            continue
        colour = CATEGORY_COLOURS.get(category, OTHER_COLOUR)
        axis.barh(y, width, left=start, height=STEP_LANE, color=colour, lw=0)
        order = TIME_CATEGORIES.index(category) if category in TIME_CATEGORIES else 10
        legend[category] = (order, {"color": colour})
    for start, width in outlines:
        axis.barh(y, width, left=start, height=STEP_LANE, fill=False, edgecolor="black", lw=0.8)
    for span in step.get("spans", []):
        name = span["name"].removeprefix("distlab:")
        if name == "step":
            continue
        start, end = (offset_ms + 1000 * span[k] for k in ("start", "end"))
        axis.vlines([start, end], y - STEP_LANE / 2, y + STEP_LANE / 2, color="white", lw=0.8)
        if end - start >= label_ms:
            axis.text((start + end) / 2, y, name, ha="center", va="center", fontsize=7)
    comms = step.get("comms", [])
    lanes = comm_sublanes(comms, wall_s)
    count = max(lanes, default=0) + 1
    top = y - STEP_LANE / 2 - 0.04
    for comm, lane in zip(comms, lanes, strict=True):
        done = comm.get("done")
        end = wall_s if done is None else done
        kind = comm["kind"]
        colour = KIND_COLOURS.get(kind, OTHER_COLOUR)
        axis.barh(
            top - (lane + 0.5) * COMM_LANE / count,
            1000 * (end - comm["issue"]),
            left=offset_ms + 1000 * comm["issue"],
            height=0.9 * COMM_LANE / count,
            color=colour,
            alpha=0.55 if done is None else 1.0,
            hatch="///" if done is None else None,
            edgecolor="black" if done is None else colour,
            lw=0.3,
        )
        order = 30 + (KINDS.index(kind) if kind in KINDS else len(KINDS))
        legend[f"{kind} in flight"] = (order, {"color": colour})
        if done is None:
            patch = {"facecolor": "white", "edgecolor": "black", "hatch": "///"}
            legend["not done at step end"] = (50, patch)


def draw_time_gantt(run_dir: Path, out: Path | None = None) -> Path:
    """Draw every rank's last tracked step as lanes in time into ``out``
    (default ``RUN_DIR/time_rank_gantt.png``); return the path.

    Each rank's step lane is cut into its categories, its phase spans (data,
    forward, backward, optimizer) marked on it, the overlapped stretches
    outlined; the thin lane under it holds the collectives from issue to done
    (hatched where one was still in flight at the step's end), one sub-lane per
    concurrent collective. The x axis is milliseconds from the earliest rank's
    step start (``t0_unix``).
    """
    run_dir = Path(run_dir)
    out = run_dir / GANTT_PNG if out is None else out
    lanes = []
    for record in read_time_ranks(run_dir):
        step = last_step(record.get("steps") or [])
        if step is not None:
            lanes.append((record["rank"], step))
    if not lanes:
        raise DistlabError(
            f"{run_dir} has no tracked step in {RANKS_DIR}/{TIME_RANK_PREFIX}<r>.json"
        )
    t0 = min(step["t0_unix"] for _, step in lanes)
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(11, 1.6 + 0.85 * len(lanes)), layout="constrained")
    legend: dict[str, Any] = {}
    ticks, labels = [], []
    right = max(1000 * (step["t0_unix"] - t0 + step["wall_s"]) for _, step in lanes)
    for index, (rank, step) in enumerate(lanes):
        y = -index * LANE_PITCH
        offset_ms = 1000 * (step["t0_unix"] - t0)
        _draw_rank(axis, y, step, offset_ms, legend, MIN_LABEL_FRACTION * right)
        end = offset_ms + 1000 * step["wall_s"]
        fraction = step.get("overlap_fraction")
        note = f" {1000 * step['wall_s']:.1f} ms"
        if fraction is not None:
            note += f", {fraction:.0%} of comm overlapped"
        axis.text(end, y, note, va="center", ha="left", fontsize=7)
        ticks += [y, y - STEP_LANE / 2 - 0.04 - COMM_LANE / 2]
        labels += [f"rank {rank}", "comms"]
    axis.set_yticks(ticks, labels)
    for label in axis.get_yticklabels()[1::2]:
        label.set_fontsize(7)
        label.set_color("#555555")
    axis.set_xlim(0, 1.25 * right or 1)
    axis.set_ylim(-(len(lanes) - 1) * LANE_PITCH - 0.75, 0.45)
    axis.set_xlabel("ms from the earliest rank's step start")
    axis.grid(alpha=0.3, axis="x")
    axis.set_axisbelow(True)
    steps = sorted({step["step"] for _, step in lanes})
    numbers = "step " + "/".join(str(s) for s in steps)
    axis.set_title(f"{run_title(run_dir)}, {numbers}: where each rank's time went", fontsize=10)
    from matplotlib.patches import Patch

    ordered = sorted(legend.items(), key=lambda item: item[1][0])
    handles = [Patch(label=label, **patch) for label, (_, patch) in ordered]
    figure.legend(
        handles=handles, loc="outside lower center", ncol=min(len(handles), 6), fontsize=8
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out


def last_step_breakdown(summary: dict[str, Any]) -> dict[str, Any] | None:
    """The mean over ranks of each rank's last tracked step in ``time_breakdown_by_rank``,
    in seconds (None if the summary has none).

    ``overlap_fraction`` is the mean overlapped time over the mean time collectives were in
    flight (None if none were)."""
    last: dict[int, dict[str, Any]] = {}
    for entry in summary.get(BREAKDOWN_KEY) or []:
        kept = last.get(entry["rank"])
        if kept is None or entry["step"] >= kept["step"]:
            last[entry["rank"]] = entry
    if not last:
        return None
    entries = list(last.values())

    def mean(values: list[float | None]) -> float:
        return statistics.fmean(v or 0.0 for v in values)

    overlapped = mean([e.get("overlapped_comm") for e in entries])
    comm = mean([e.get("comm_s") for e in entries])
    return {
        "ranks": len(entries),
        "steps": sorted({e["step"] for e in entries}),
        "wall_s": mean([e["wall_s"] for e in entries]),
        "by_category": {
            c: mean([e["by_category"].get(c) for e in entries]) for c in TIME_CATEGORIES
        },
        "overlapped_comm": overlapped,
        "comm_s": comm,
        "overlap_fraction": overlapped / comm if comm > 0 else None,
    }


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

    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(10, 1.6 + 0.7 * len(rows)), layout="constrained")
    right = 0.0
    for index, (_, breakdown) in enumerate(rows):
        y = len(rows) - 1 - index
        left = 0.0
        for category in TIME_CATEGORIES:
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
    handles: list[Any] = [Patch(color=CATEGORY_COLOURS[c], label=c) for c in TIME_CATEGORIES]
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
    *((f"{c} ms (%)", "right") for c in TIME_CATEGORIES),
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
        for category in TIME_CATEGORIES:
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
