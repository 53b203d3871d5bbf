"""The report's plots: loss per step, throughput and MFU, memory per rank, communication."""

from __future__ import annotations

from pathlib import Path

from distlab.errors import DistlabError
from distlab.measure.memory_timeline import draw_memory_timelines
from distlab.measure.wire import KINDS
from distlab.report.runs import MIB, Run, figures, memory_timelines


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(output, dpi=110)
    _pyplot().close(figure)


def plot_losses(runs: list[Run], output: Path) -> None:
    """Loss vs step of every run in one PNG: its training loss as a line, and its validation
    loss (a run with ``--eval-every``) as markers on a thinner line of the same colour."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.5))
    styles = ["-", "--", ":", "-."]
    markers = ["o", "s", "^", "D"]
    evaluated = False
    for index, run in enumerate(runs):
        steps = [m["step"] for m in run.metrics]
        losses = [m["loss"] for m in run.metrics]
        (line,) = axis.plot(
            steps, losses, styles[index % len(styles)], label=run.label, linewidth=1.6
        )
        validation = [(m["step"], m["val_loss"]) for m in run.metrics if "val_loss" in m]
        if validation:
            evaluated = True
            axis.plot(
                *zip(*validation, strict=True),
                marker=markers[index % len(markers)],
                linestyle=styles[index % len(styles)],
                color=line.get_color(),
                linewidth=0.8,
                markersize=4,
                label=f"{run.label} (validation)",
            )
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss (nats/byte)" if evaluated else "training loss (nats/byte)")
    axis.set_title("training and validation loss per step" if evaluated else "loss per step")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, ncol=2)
    _save(figure, output)


def plot_throughput(runs: list[Run], output: Path) -> None:
    """Tokens/s (bars) and MFU (labels) per run."""
    plt = _pyplot()
    data = [figures(r) for r in runs]
    figure, axis = plt.subplots(figsize=(max(6, 0.6 * len(runs) + 2), 4.5))
    labels = [d["label"] for d in data]
    values = [d["tokens_per_s"] or 0 for d in data]
    bars = axis.bar(range(len(runs)), values, color="tab:blue")
    for bar, d in zip(bars, data, strict=True):
        if d["mfu"] is not None:
            axis.annotate(
                f"{100 * d['mfu']:.1f}%",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=7,
            )
    axis.set_xticks(range(len(runs)), labels, rotation=45, ha="right", fontsize=8)
    axis.set_ylabel("tokens/s (median step)")
    axis.set_title("throughput (labels: MFU)")
    axis.grid(alpha=0.3, axis="y")
    _save(figure, output)


def plot_memory(runs: list[Run], output: Path) -> None:
    """Per rank: peak memory, and model-state bytes measured vs predicted (rank 0)."""
    plt = _pyplot()
    data = [figures(r) for r in runs]
    figure, (left, right) = plt.subplots(1, 2, figsize=(max(10, 1.0 * len(runs) + 4), 4.5))
    width = 0.8
    for index, d in enumerate(data):
        memory = d["peak_memory_by_rank"] or []
        n = max(1, len(memory))
        for rank, value in enumerate(memory):
            x = index - width / 2 + (rank + 0.5) * width / n
            left.bar(x, value / MIB, width=width / n, color=f"C{rank % 10}")
    left.set_xticks(
        range(len(runs)), [d["label"] for d in data], rotation=45, ha="right", fontsize=8
    )
    left.set_ylabel("peak memory per rank (MiB; RSS on CPU)")
    left.set_title("peak memory, one bar per rank")
    left.grid(alpha=0.3, axis="y")
    xs = range(len(runs))
    right.bar([x - 0.2 for x in xs], [d["state_bytes"] / MIB for d in data], 0.4, label="measured")
    right.bar(
        [x + 0.2 for x in xs],
        [(d["state_pred"] or 0) / MIB for d in data],
        0.4,
        label="predicted",
        color="tab:gray",
    )
    right.set_xticks(xs, [d["label"] for d in data], rotation=45, ha="right", fontsize=8)
    right.set_ylabel("params + grads + optimizer state (MiB)")
    right.set_title("model state on rank 0")
    right.grid(alpha=0.3, axis="y")
    right.legend()
    _save(figure, output)


def plot_comm(runs: list[Run], output: Path) -> None:
    """Bytes per step on rank 0 by collective type (stacked), with the prediction beside it."""
    plt = _pyplot()
    data = [figures(r) for r in runs]
    figure, axis = plt.subplots(figsize=(max(7, 0.8 * len(runs) + 3), 4.8))
    xs = list(range(len(runs)))
    for offset, key, hatch in ((-0.2, "comm_kinds", None), (0.2, "comm_kinds_pred", "//")):
        bottoms = [0.0] * len(runs)
        for k_index, kind in enumerate(KINDS):
            values = [d[key].get(kind, 0) / MIB for d in data]
            if not any(values):
                continue
            axis.bar(
                [x + offset for x in xs],
                values,
                0.4,
                bottom=bottoms,
                color=f"C{k_index}",
                hatch=hatch,
                edgecolor="white" if hatch else None,
                label=kind if key == "comm_kinds" else None,
            )
            bottoms = [b + v for b, v in zip(bottoms, values, strict=True)]
    axis.set_xticks(xs, [d["label"] for d in data], rotation=45, ha="right", fontsize=8)
    axis.set_ylabel("payload MiB per step, rank 0")
    axis.set_title("communication per step: measured (left) vs predicted (right, hatched)")
    axis.grid(alpha=0.3, axis="y")
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize=8)
    _save(figure, output)


def run_labels(runs: list[Run]) -> list[str]:
    """Each run's label, with its run dir's name where two runs share one."""
    labels = [run.label for run in runs]
    return [
        f"{label} ({run.path.name})" if labels.count(label) > 1 else label
        for label, run in zip(labels, runs, strict=True)
    ]


def plot_memory_timelines(runs: list[Run], output: Path) -> list[Run]:
    """Every run's per-rank step memory timeline in one PNG: a column per run, a row per rank,
    one y scale. Returns the runs left out (no ``ranks/memory_rank<r>.json``)."""
    columns, left_out = [], []
    for run, label in zip(runs, run_labels(runs), strict=True):
        timelines = memory_timelines(run)
        if timelines:
            columns.append((label, timelines))
        else:
            left_out.append(run)
    if not columns:
        raise DistlabError(
            "no run has a memory timeline (ranks/memory_rank<r>.json: runs from before the "
            "step memory was measured, or from W&B)"
        )
    draw_memory_timelines(columns, output)
    return left_out


PLOTS = {
    "loss": plot_losses,
    "throughput": plot_throughput,
    "memory": plot_memory,
    "comm": plot_comm,
}
