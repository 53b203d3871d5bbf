"""A Gantt picture of one time-tracked step on every rank (``time_rank_gantt.png``).

Drawn from the ranks' records (``ranks/time_rank<r>.json``, ``distlab.measure.timeline``)
after the run, by the launcher (the ranks never import a plotting library): a lane
per rank with its last tracked step cut into the breakdown's categories and its phase
spans marked, and under it a thin lane of the collectives in flight (issue -> done,
hatched where the end was not seen), so communication running under compute shows
as overlap. Ranks are aligned on their step's wall-clock start (``t0_unix``).

::

    draw_time_gantt(read_time_ranks(run_dir), "fsdp x2", run_dir / "time_rank_gantt.png")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distlab.errors import DistlabError
from distlab.measure.timeline import CATEGORIES, last_step
from distlab.measure.wire import KINDS

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


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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
        order = CATEGORIES.index(category) if category in CATEGORIES else 10
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


def draw_time_gantt(records: list[dict[str, Any]], title: str, out: Path) -> Path:
    """Draw every rank's last tracked step (``records``: each rank's ``{"rank", "steps"}``, as
    in ``ranks/time_rank<r>.json``) as lanes in time into ``out``; return the path.

    Each rank's step lane is cut into its categories, its phase spans (data,
    forward, backward, optimizer) marked on it, the overlapped stretches
    outlined; the thin lane under it holds the collectives from issue to done
    (hatched where one was still in flight at the step's end), one sub-lane per
    concurrent collective. The x axis is milliseconds from the earliest rank's
    step start (``t0_unix``).
    """
    lanes = []
    for record in records:
        step = last_step(record.get("steps") or [])
        if step is not None:
            lanes.append((record["rank"], step))
    if not lanes:
        raise DistlabError("no time-tracked step in ranks/time_rank<r>.json (--track-time)")
    t0 = min(step["t0_unix"] for _, step in lanes)
    plt = pyplot()
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
    axis.set_title(f"{title}, {numbers}: where each rank's time went", fontsize=10)
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
