"""``python -m distlab.compare RUN_DIR...``: runs side by side, measured against theory.

    python -m distlab.compare runs/*
    python -m distlab.compare runs/ddp-* runs/fsdp-* --plot docs/loss.png
    python -m distlab.compare runs/compare/* --report docs/comparison.md
    python -m distlab.compare --wandb my-entity/distlab --group compare   (online W&B)

Each argument is a run dir or a glob of run dirs (a directory holding
``summary.json`` and ``metrics.jsonl``). The table shows, per run: final loss,
throughput, MFU, peak memory per rank, model-state bytes per rank and
communication bytes per step, each measured one beside its prediction
(``distlab.theory``) and the ratio measured / predicted. ``--report`` also
writes PNG plots (loss vs step, throughput and MFU, memory per rank,
communication per step) next to a Markdown report that embeds them.
"""

from __future__ import annotations

import glob
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from distlab.cli import OneLineErrorParser, run_cli
from distlab.comm import KINDS
from distlab.errors import DistlabError
from distlab.run.files import CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, read_jsonl

MIB = 2**20
NOTES_MARKER = "<!-- notes: written by hand, kept when the report is regenerated -->"


@dataclass
class Run:
    """One finished run read back from its run dir (or from W&B)."""

    path: Path
    summary: dict
    metrics: list[dict]
    config: dict = field(default_factory=dict)
    """The resolved ``config.yaml`` ({} when missing)."""
    rank_metrics: dict[int, list[dict]] = field(default_factory=dict)
    """``ranks/rank<r>.jsonl``: each rank's per-step memory and communication."""

    @property
    def label(self) -> str:
        """``strategy xN``: what ran, on how many ranks."""
        return f"{self.summary['strategy']} x{self.summary['nproc']}"

    @property
    def predicted(self) -> dict[str, Any]:
        """Theory for this run: recomputed from its config when possible, else its summary's."""
        if "_predicted" not in self.__dict__:
            self.__dict__["_predicted"] = self._predict()
        return self.__dict__["_predicted"]

    def _predict(self) -> dict[str, Any]:
        if self.config:
            try:
                from distlab.config import Config
                from distlab.theory import predict

                known = {k: v for k, v in self.config.items() if k in Config.__dataclass_fields__}
                return predict(Config(**known))
            except Exception:  # noqa: BLE001 - old or foreign config: fall back to the summary
                pass
        predicted = dict(self.summary.get("predicted") or {})
        if "model_state_bytes_per_rank" not in predicted:
            state = self.summary.get("predicted_model_state_bytes_per_rank")
            if state:
                predicted["model_state_bytes_per_rank"] = state
        return predicted


def _one_row_per_step(path: Path) -> list[dict]:
    """A JSON-lines file's rows; for a step written twice (a restarted run), the last one wins."""
    rows = {row.get("step", index): row for index, row in enumerate(read_jsonl(path))}
    return [rows[k] for k in sorted(rows, key=lambda k: (isinstance(k, str), k))]


def load_runs(patterns: list[str]) -> list[Run]:
    """Read every run dir the patterns name; one-line error for anything that is not one."""
    paths: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) or [pattern]
        paths += [Path(m) for m in matches]
    runs = []
    for path in paths:
        summary_file, metrics_file = path / SUMMARY_FILE, path / METRICS_FILE
        if not summary_file.is_file() or not metrics_file.is_file():
            raise DistlabError(f"{path} is not a finished run dir (no summary.json/metrics.jsonl)")
        try:
            summary = json.loads(summary_file.read_text())
            metrics = _one_row_per_step(metrics_file)
            config_file = path / CONFIG_FILE
            config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
            ranks = {}
            for rank_file in sorted((path / "ranks").glob("rank*.jsonl")):
                ranks[int(rank_file.stem.removeprefix("rank"))] = _one_row_per_step(rank_file)
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            raise DistlabError(f"{path} has a corrupt summary or metrics file: {exc}") from None
        runs.append(Run(path, summary, metrics, config or {}, ranks))
    if not runs:
        raise DistlabError("no run dirs given")
    return runs


def load_wandb_runs(project: str, group: str | None = None) -> list[Run]:
    """Finished runs of a W&B project (``entity/project``), optionally one group (online only)."""
    from distlab.launch.wandb_run import wandb_mode

    if wandb_mode() != "online":
        raise DistlabError(
            "reading runs from W&B needs an API key (wandb login or WANDB_API_KEY); "
            "offline runs are read from their run dirs"
        )
    import wandb

    filters: dict[str, Any] = {"state": "finished"}
    if group:
        filters["group"] = group
    runs = []
    for remote in wandb.Api().runs(project, filters=filters):
        summary = _unflatten(dict(remote.summary))
        if "strategy" not in summary:
            continue
        metrics = [dict(row) for row in remote.scan_history()]
        metrics = [m for m in metrics if "loss" in m and "step" in m]
        runs.append(Run(Path(remote.name), summary, metrics, dict(remote.config)))
    if not runs:
        raise DistlabError(f"no finished distlab runs in W&B project {project}")
    return runs


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """Undo RunRecorder's ``a/b`` summary flattening."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        if key.startswith("_"):
            continue
        node = out
        parts = key.split("/")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


# --- The figures of one run -----------------------------------------------------------


def ratio(measured: float | None, predicted: float | None) -> float | None:
    """measured / predicted, or None when either is missing (or the prediction is 0)."""
    if measured is None or predicted is None or not predicted:
        return None
    return measured / predicted


def peak_memory_by_rank(run: Run) -> list[int]:
    """Each rank's peak memory (RSS on CPU): from the summary, else the rank files."""
    by_rank = run.summary.get("peak_memory_bytes_by_rank")
    if by_rank:
        return list(by_rank)
    return [rows[-1]["peak_memory_bytes"] for _, rows in sorted(run.rank_metrics.items()) if rows]


def comm_per_step(run: Run) -> dict[str, Any] | None:
    """Rank 0's communication in a typical step, as flat ``kind/bytes`` keys (None: not counted)."""
    if run.summary.get("comm_counted") is False:
        return None
    comm = run.summary.get("comm_per_step")
    if comm:
        return comm
    steps = [m for m in run.metrics if "comm/bytes" in m]
    if not steps:
        return None
    steps = steps[1:] or steps
    ordered = sorted(steps, key=lambda m: m["comm/bytes"])
    row = ordered[(len(ordered) - 1) // 2]
    return {k.removeprefix("comm/"): v for k, v in row.items() if k.startswith("comm/")}


def run_mfu(run: Run) -> float | None:
    """The run's MFU at its median step (summary), else the median of the per-step values."""
    if run.summary.get("mfu") is not None:
        return run.summary["mfu"]
    values = [m["mfu"] for m in run.metrics if m.get("mfu") is not None]
    return statistics.median(values) if values else None


def figures(run: Run) -> dict[str, Any]:
    """Every number of the comparison table for one run (None where not available)."""
    s = run.summary
    predicted = run.predicted
    state_pred = (predicted.get("model_state_bytes_per_rank") or {}).get("total")
    comm = comm_per_step(run)
    comm_pred = predicted.get("comm_per_step")
    memory = peak_memory_by_rank(run)
    comm_bytes = comm.get("bytes") if comm else None
    pred_bytes = comm_pred.get("bytes") if comm_pred else None
    return {
        "label": run.label,
        "strategy": s["strategy"],
        "nproc": s["nproc"],
        "run": run.path.name,
        "final_loss": s.get("final_loss"),
        "tokens_per_s": s.get("tokens_per_s"),
        "mfu": run_mfu(run),
        "peak_memory_max": max(memory) if memory else None,
        "peak_memory_by_rank": memory,
        "state_bytes": s["model_state_bytes_per_rank"]["total"],
        "state_pred": state_pred,
        "state_ratio": ratio(s["model_state_bytes_per_rank"]["total"], state_pred),
        "comm_bytes": comm_bytes,
        "comm_pred": pred_bytes,
        "comm_ratio": ratio(comm_bytes, pred_bytes),
        "wire_bytes": comm.get("wire_bytes") if comm else None,
        "wire_pred": comm_pred.get("wire_bytes") if comm_pred else None,
        "comm_time_s": comm.get("time_s") if comm else None,
        "comm_kinds": {k: comm[f"{k}/bytes"] for k in KINDS if comm and f"{k}/bytes" in comm},
        "comm_kinds_pred": dict(comm_pred.get("kinds", {})) if comm_pred else {},
        "bubble": predicted.get("pipeline_bubble"),
        "median_step_time_s": s.get("median_step_time_s"),
    }


# --- The table ------------------------------------------------------------------------


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


def comparison_table(runs: list[Run]) -> Table:
    """Strategy, world size, loss, throughput, MFU, memory and communication vs theory."""
    table = Table(title="distlab runs: measured vs predicted (rank 0 unless per rank)")
    for name, justify in COLUMNS:
        table.add_column(name, justify=justify)
    for row in table_rows(runs):
        table.add_row(*row)
    return table


def markdown_table(runs: list[Run]) -> str:
    """The comparison table as GitHub Markdown."""
    header = [name for name, _ in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(runs)]
    return "\n".join(lines)


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


# --- Plots ----------------------------------------------------------------------------


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
    """Loss vs step of every run in one PNG."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.5))
    styles = ["-", "--", ":", "-."]
    for index, run in enumerate(runs):
        steps = [m["step"] for m in run.metrics]
        losses = [m["loss"] for m in run.metrics]
        axis.plot(steps, losses, styles[index % len(styles)], label=run.label, linewidth=1.6)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("training loss (nats/byte)")
    axis.set_title("loss per step")
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


PLOTS = {
    "loss": plot_losses,
    "throughput": plot_throughput,
    "memory": plot_memory,
    "comm": plot_comm,
}


def write_report(
    runs: list[Run],
    report: Path,
    title: str = "distlab comparison",
    command: str = "",
    context: str = "",
) -> list[Path]:
    """Write ``report`` (Markdown) and its PNGs (in ``<report stem>_files/``); return the PNGs.

    Whatever an existing report holds from ``NOTES_MARKER`` on is kept (hand-written notes).
    """
    image_dir = report.parent / f"{report.stem}_files"
    images = []
    for name, plot in PLOTS.items():
        path = image_dir / f"{name}.png"
        plot(runs, path)
        images.append(path)
    rel = image_dir.name
    notes = sorted(
        {
            note
            for run in runs
            for note in (run.predicted.get("comm_per_step") or {}).get("notes", [])
        }
    )
    parts = [
        f"# {title}",
        "",
        *([f"Generated by `{command}`.", ""] if command else []),
        *([context, ""] if context else []),
        "Rank 0 unless marked per rank. *pred*: `distlab.theory`'s prediction; *ratio*: "
        "measured / predicted. Communication is the payload of every collective rank 0 took "
        "part in during a typical step (nccl-tests convention: all-reduce = buffer, "
        "all-gather = gathered output, reduce-scatter = input), counted at the process group "
        "(`distlab.comm`); *wire* is what rank 0 sends over TCP by gloo's algorithms (the "
        "counter's estimate, checked against the kernel's TCP counters below); "
        "*comm s* is the time collectives were in flight. Peak memory is each rank's peak RSS "
        "on CPU. MFU uses the matmul-probe peak per core.",
        "",
        markdown_table(runs),
        "",
        f"![loss per step]({rel}/loss.png)",
        "",
        f"![throughput]({rel}/throughput.png)",
        "",
        f"![memory]({rel}/memory.png)",
        "",
        f"![communication per step]({rel}/comm.png)",
        "",
        "## Communication by collective type",
        "",
        comm_breakdown_markdown(runs),
        "",
    ]
    if notes:
        parts += ["Notes from the theory:", "", *[f"- {note}" for note in notes], ""]
    notes_text = ""
    if report.is_file() and NOTES_MARKER in report.read_text():
        notes_text = NOTES_MARKER + report.read_text().split(NOTES_MARKER, 1)[1]
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text("\n".join(parts) + ("\n" + notes_text if notes_text else ""))
    return images


def main(argv: list[str] | None = None) -> int:
    """Print the table; optionally write the loss plot or the full report."""
    parser = OneLineErrorParser(
        prog="python -m distlab.compare", description=__doc__.splitlines()[0]
    )
    parser.add_argument("runs", nargs="*", help="run dirs or globs")
    parser.add_argument("--plot", type=Path, help="write a loss-vs-step PNG here")
    parser.add_argument("--report", type=Path, help="write a Markdown report (+ PNGs) here")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read runs from W&B (online)")
    parser.add_argument("--group", help="with --wandb: only runs of this W&B group")
    args = parser.parse_args(argv)
    if args.wandb:
        runs = load_wandb_runs(args.wandb, args.group)
    elif args.runs:
        runs = load_runs(args.runs)
    else:
        raise DistlabError("give run dirs (or globs), or --wandb ENTITY/PROJECT")
    Console(width=200).print(comparison_table(runs))
    if args.plot:
        plot_losses(runs, args.plot)
        print(f"loss plot: {args.plot}")
    if args.report:
        write_report(runs, args.report)
        print(f"report: {args.report}")
    return 0


if __name__ == "__main__":
    run_cli(main)
