"""``python -m distlab.compare RUN_DIR...``: runs side by side, as a table and a loss plot.

    python -m distlab.compare runs/*
    python -m distlab.compare runs/ddp-* runs/fsdp-* --plot docs/loss.png

Each argument is a run dir or a glob of run dirs (a directory holding
``summary.json`` and ``metrics.jsonl``).
"""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from distlab.cli import OneLineErrorParser, run_cli
from distlab.errors import DistlabError


@dataclass
class Run:
    """One finished run read back from its run dir."""

    path: Path
    summary: dict
    metrics: list[dict]

    @property
    def label(self) -> str:
        """``strategy xN``: what ran, on how many ranks."""
        return f"{self.summary['strategy']} x{self.summary['nproc']}"


def load_runs(patterns: list[str]) -> list[Run]:
    """Read every run dir the patterns name; one-line error for anything that is not one."""
    paths: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) or [pattern]
        paths += [Path(m) for m in matches]
    runs = []
    for path in paths:
        summary_file, metrics_file = path / "summary.json", path / "metrics.jsonl"
        if not summary_file.is_file() or not metrics_file.is_file():
            raise DistlabError(f"{path} is not a finished run dir (no summary.json/metrics.jsonl)")
        try:
            summary = json.loads(summary_file.read_text())
            metrics = [json.loads(line) for line in metrics_file.read_text().splitlines() if line]
        except json.JSONDecodeError as exc:
            raise DistlabError(f"{path} has a corrupt summary or metrics file: {exc}") from None
        runs.append(Run(path, summary, metrics))
    if not runs:
        raise DistlabError("no run dirs given")
    return runs


def comparison_table(runs: list[Run]) -> Table:
    """Strategy, world size, losses, throughput and model state per rank."""
    table = Table(title="distlab runs")
    for column in ("run", "run dir", "first loss", "final loss", "tokens/s", "state/rank MiB"):
        table.add_column(column, justify="left" if column.startswith("run") else "right")
    for run in runs:
        s = run.summary
        table.add_row(
            run.label,
            run.path.name,
            f"{s['first_loss']:.4f}",
            f"{s['final_loss']:.4f}",
            f"{s['tokens_per_s']:,.0f}",
            f"{s['model_state_bytes_per_rank']['total'] / 2**20:.2f}",
        )
    return table


def plot_losses(runs: list[Run], output: Path) -> None:
    """Loss vs step of every run in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    axis.legend()
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    """Print the table and optionally write the loss plot."""
    parser = OneLineErrorParser(
        prog="python -m distlab.compare", description=__doc__.splitlines()[0]
    )
    parser.add_argument("runs", nargs="+", help="run dirs or globs")
    parser.add_argument("--plot", type=Path, help="write a loss-vs-step PNG here")
    args = parser.parse_args(argv)
    runs = load_runs(args.runs)
    Console().print(comparison_table(runs))
    if args.plot:
        plot_losses(runs, args.plot)
        print(f"loss plot: {args.plot}")
    return 0


if __name__ == "__main__":
    run_cli(main)
