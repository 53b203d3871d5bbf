"""The memory picture of a step: what each rank holds, by category, from sample to sample.

Draws the timelines that ``StepMemoryTracker`` samples (``ranks/memory_rank<r>.json``:
one step of each rank, one sample each time the tracked total changed).
Each rank gets a panel: the categories stacked in ``CATEGORIES`` order, each in
its fixed colour; the forward, backward and optimizer phases shaded behind
them; the peak marked, with its value and phase in the panel's title. The x
axis counts samples, i.e. the tensor allocations and frees of the step, not
time. All panels share the y axis (MiB), so ranks, and runs drawn side by side,
compare at a glance::

    draw_memory_timelines([("fsdp x2", records)], run_dir / "memory_timeline.png")
    draw_memory_timelines([("fsdp x2", fsdp), ("ddp x2", ddp)], Path("both.png"))

One column per run, one row per rank.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distlab.measure.step_memory import CATEGORIES, PHASES

MIB = 2**20

CATEGORY_COLOURS = {
    "params": "#4c72b0",
    "grads": "#dd8452",
    "optimizer": "#55a868",
    "activations": "#c44e52",
    "temporaries": "#8172b3",
    "comm_buffers": "#937860",
    "other": "#8c8c8c",
}
"""One colour per category, the same in every picture."""

PHASE_COLOURS = {"forward": "#e3edf7", "backward": "#fbe9d4", "optimizer": "#dff0d8"}
"""The background of each phase (light, so the stacked areas stay readable)."""

PANEL_WIDTH, PANEL_HEIGHT = 6.5, 2.4
"""Inches per panel: one column per run, one row per rank."""

MIN_LABEL_FRACTION = 0.07
"""A phase band narrower than this share of the panel gets no text label (legend only)."""


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def sample_totals(timeline: list[dict[str, Any]]) -> list[int]:
    """The tracked total of each sample (the sum over categories)."""
    return [sum(sample.get(c, 0) for c in CATEGORIES) for sample in timeline]


def phase_spans(timeline: list[dict[str, Any]]) -> list[tuple[str, int, int]]:
    """Runs of consecutive samples in one phase: ``(phase, first, last + 1)``, in order."""
    spans: list[tuple[str, int, int]] = []
    for index, sample in enumerate(timeline):
        if spans and spans[-1][0] == sample["phase"]:
            spans[-1] = (sample["phase"], spans[-1][1], index + 1)
        else:
            spans.append((sample["phase"], index, index + 1))
    return spans


def _draw_panel(axis: Any, label: str, record: dict[str, Any]) -> None:
    """One rank's timeline: phase bands, stacked categories, the peak."""
    timeline = record.get("timeline") or []
    title = f"{label}, rank {record['rank']}, step {record['step']}: "
    title += f"peak {record['peak'] / MIB:.2f} MiB in {record['peak_phase']}"
    axis.set_title(title, fontsize=9)
    axis.grid(alpha=0.3, axis="y")
    if not timeline:
        axis.text(0.5, 0.5, "no samples", transform=axis.transAxes, ha="center")
        return
    count = len(timeline)
    for phase, first, end in phase_spans(timeline):
        axis.axvspan(first, end, color=PHASE_COLOURS.get(phase, "white"), zorder=0, lw=0)
        if (end - first) / count >= MIN_LABEL_FRACTION:
            axis.text(
                (first + end) / 2,
                0.97,
                phase,
                transform=axis.get_xaxis_transform(),
                ha="center",
                va="top",
                fontsize=7,
                color="#555555",
            )
    xs = [*range(count), count]  # each sample holds until the next one
    layers = [[s.get(c, 0) / MIB for s in timeline] for c in CATEGORIES]
    axis.stackplot(
        xs,
        *[[*layer, layer[-1]] for layer in layers],
        colors=[CATEGORY_COLOURS[c] for c in CATEGORIES],
        step="post",
        lw=0,
        zorder=2,
    )
    totals = sample_totals(timeline)
    top = max(range(count), key=totals.__getitem__)
    axis.axhline(totals[top] / MIB, color="black", lw=0.7, ls="--", zorder=3)
    axis.plot([top + 0.5], [totals[top] / MIB], "v", color="black", ms=6, zorder=4)
    axis.set_xlim(0, count)


def _legend_handles() -> list[Any]:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles: list[Any] = [Patch(color=CATEGORY_COLOURS[c], label=c) for c in CATEGORIES]
    handles += [Patch(color=PHASE_COLOURS[p], label=f"{p} phase") for p in PHASES]
    handles.append(Line2D([], [], color="black", ls="--", marker="v", label="peak"))
    return handles


def draw_memory_timelines(columns: list[tuple[str, list[dict[str, Any]]]], output: Path) -> Path:
    """Draw each run's per-rank timelines (a column per run, a row per rank) into ``output``.

    ``columns``: ``(label, records)`` per run, the records as in
    ``ranks/memory_rank<r>.json``; a run without a rank another has leaves its cell empty.
    """
    plt = _pyplot()
    rows = 1 + max((r["rank"] for _, records in columns for r in records), default=0)
    figure, axes = plt.subplots(
        rows,
        len(columns),
        sharey=True,
        squeeze=False,
        figsize=(PANEL_WIDTH * len(columns), PANEL_HEIGHT * rows + 1.2),
        layout="constrained",
    )
    for column, (label, records) in enumerate(columns):
        by_rank = {record["rank"]: record for record in records}
        for rank in range(rows):
            axis = axes[rank][column]
            if rank in by_rank:
                _draw_panel(axis, label, by_rank[rank])
            else:
                axis.set_title(f"{label}: no rank {rank}", fontsize=9)
                axis.set_xticks([])
            if column == 0:
                axis.set_ylabel("MiB")
            if rank == rows - 1 and rank in by_rank:
                axis.set_xlabel("sample (tensor allocation or free) in the step", fontsize=8)
    peak = max((r["peak"] for _, records in columns for r in records), default=0)
    axes[0][0].set_ylim(0, 1.12 * peak / MIB or 1)  # room above the peak for phase labels
    figure.suptitle("memory held per rank during one training step, by category", fontsize=11)
    handles = _legend_handles()
    ncol = min(len(handles), 4 * len(columns))  # about 4 entries fit a panel's width
    figure.legend(handles=handles, loc="outside lower center", ncol=ncol, fontsize=8)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=110)
    plt.close(figure)
    return output
