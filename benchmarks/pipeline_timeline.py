"""Draw one measured pipeline step: a row per rank, a box per forward / backward action.

``pipeline_bubble.py`` records, on every rank, when each action of the
schedule started and ended; this draws one step of those events. Colours:
F forward, B input-gradient backward, W weight-gradient backward (the
zero-bubble schedules run B and W apart), B+W a whole backward (the other
schedules). The number in a box is the microbatch; boxes of a rank's second
stage (interleaved, looped and V schedules) are hatched. White is idle:
waiting for a neighbour, communication, and the schedule's own bookkeeping.
"""

from __future__ import annotations

from pathlib import Path

COLOURS = {"F": "#4c72b0", "B": "#dd8452", "W": "#55a868", "BW": "#c44e52"}
NAMES = {"F": "F forward", "B": "B input grads", "W": "W weight grads", "BW": "B+W whole backward"}
MIN_LABEL_WIDTH = 0.025
"""Boxes narrower than this fraction of the step carry no microbatch number."""


def draw_timeline(ranks: list[dict], step: int, title: str, output: Path) -> Path:
    """Draw measured step ``step`` of ``ranks`` (``run_rank``'s records) into ``output`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    start = min(rank["windows"][step][0] for rank in ranks)
    span = 1000 * (max(rank["windows"][step][1] for rank in ranks) - start)
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(ranks) + 1.1), dpi=80)
    kinds = set()
    for row, rank in enumerate(ranks):
        lo, hi = rank["windows"][step]
        first_stage = min(event[0] for event in rank["events"])
        for stage, kind, microbatch, begin, end in rank["events"]:
            if not lo <= begin < hi:
                continue
            kinds.add(kind)
            left, width = 1000 * (begin - start), 1000 * (end - begin)
            ax.barh(
                row,
                width,
                left=left,
                height=0.8,
                color=COLOURS[kind],
                edgecolor="white",
                linewidth=0.4,
                hatch="///" if stage != first_stage else None,
            )
            if width >= MIN_LABEL_WIDTH * span:
                ax.text(left + width / 2, row, str(microbatch), ha="center", va="center",
                        fontsize=7, color="white")  # fmt: skip
    ax.set_yticks(range(len(ranks)), [f"rank {r}" for r in range(len(ranks))])
    ax.invert_yaxis()
    ax.set_xlim(0, span)
    ax.set_xlabel("ms since the first rank entered the step")
    ax.set_title(title, fontsize=10)
    handles = [Patch(color=COLOURS[k], label=NAMES[k]) for k in COLOURS if k in kinds]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.25 - 0.1 / len(ranks)),
              ncol=len(handles), fontsize=8, frameon=False)  # fmt: skip
    fig.savefig(output, bbox_inches="tight")
    plt.close(fig)
    return output
