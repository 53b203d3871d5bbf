"""What rank 0 records about a run: config.yaml, metrics.jsonl, summary.json, progress.

W&B is written by the launcher's driver process (``distlab.launch.wandb_run``),
which outlives restarts, so rank code never needs W&B.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from distlab.config import Config
from distlab.run.files import CONFIG_FILE, METRICS_FILE, SUMMARY_FILE


class RunRecorder:
    """Writes config.yaml, metrics.jsonl and summary.json; shows progress."""

    def __init__(self, config: Config, run_dir: Path) -> None:
        self.config = config
        self.run_dir = run_dir
        self.console = Console(file=sys.stdout)
        (run_dir / CONFIG_FILE).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        self.metrics_file = (run_dir / METRICS_FILE).open("a", buffering=1)
        self.progress: Progress | None = None
        self.task = None
        if self.console.is_terminal and not config.quiet:
            self.progress = Progress(
                TextColumn(f"[bold]{config.strategy}[/] x{config.nproc}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self.task = self.progress.add_task("train", total=config.steps, status="")
            self.progress.start()

    def log_step(self, metrics: dict[str, Any], start_step: int) -> None:
        """Record one optimizer step's metrics and advance the progress display."""
        self.metrics_file.write(json.dumps(metrics) + "\n")
        step = metrics["step"]
        status = step_status(metrics)
        if self.progress is not None:
            self.progress.update(self.task, completed=step + 1, status=status)
        elif not self.config.quiet and (
            (step + 1) % self.config.log_every == 0 or step == start_step
        ):
            print(f"step {step + 1}/{self.config.steps}  {status}", flush=True)

    def finish(self, summary: dict[str, Any]) -> None:
        """Write summary.json and print the end-of-run summary."""
        if self.progress is not None:
            self.progress.stop()
        self.metrics_file.close()
        (self.run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        if not self.config.quiet:
            self.console.print(summary_table(summary))

    def close_on_error(self) -> None:
        """Stop the display after a failed run."""
        if self.progress is not None:
            self.progress.stop()
        self.metrics_file.close()


def mesh_text(mesh: dict[str, int]) -> str:
    """``pp 2 x dp_shard 2 x cp 2 x tp 2``; ``ep`` (within the data-parallel ranks) apart."""
    ep = mesh.get("ep")
    text = " x ".join(f"{name} {degree}" for name, degree in mesh.items() if name != "ep")
    text = text or "1 rank"
    return f"{text}, experts split over ep {ep} of them" if ep else text


def step_status(metrics: dict[str, Any]) -> str:
    """A step's loss and throughput, and the seconds it spent compiling if any (--compile)."""
    status = f"loss {metrics['loss']:.4f}  {metrics['tokens_per_s']:,.0f} tok/s"
    if "val_loss" in metrics:
        status += f"  val_loss {metrics['val_loss']:.4f}"
    if metrics.get("compile_s"):
        status += f"  (compiling: {metrics['compile_s']:.1f} s)"
    return status


def compile_row(summary: dict[str, Any]) -> tuple[str, str]:
    """The summary's compile row: time, steps, cache use; the throughput row leaves it out."""
    cache = summary["compile_cache"]
    steps = ", ".join(str(s) for s in summary["compile_steps"]) or "none"
    return (
        "compile",
        f"{summary['compile_s']:.1f} s, slowest rank (in step {steps}; graphs loaded from "
        f"cache {cache['hits']}, compiled {cache['misses']}); not in throughput",
    )


def summary_table(summary: dict[str, Any]) -> Table:
    """The end-of-run summary as a two-column table."""
    table = Table(
        title=f"distlab run: {summary['strategy']} x{summary['nproc']}", show_header=False
    )
    table.add_column(style="bold")
    table.add_column()
    memory = summary["model_state_bytes_per_rank"]
    rows = [
        ("model", f"{summary['model']} ({summary['parameters']:,} parameters)"),
        ("steps", f"{summary['steps_run']} (of {summary['steps']})"),
        ("loss", f"{summary['first_loss']:.4f} -> {summary['final_loss']:.4f}"),
        (
            "throughput",
            f"{summary['tokens_per_s']:,.0f} tokens/s "
            f"(median step {summary['median_step_time_s'] * 1e3:.1f} ms)",
        ),
        (
            "state inventory / rank",
            f"{mib(memory['total'])} MiB (params {mib(memory['params'])}, "
            f"grads {mib(memory['grads'])}, optimizer {mib(memory['optimizer'])})",
        ),
        ("wall time", f"{summary['wall_time_s']:.1f} s"),
        ("run dir", summary["run_dir"]),
    ]
    if "mesh" in summary:  # (runs before it was recorded lack it)
        rows.insert(1, ("mesh", mesh_text(summary["mesh"])))
    peak = step_memory_row(summary)
    if peak is not None:
        rows.insert(4, peak)
    if "compile_s" in summary:
        rows.insert(4, compile_row(summary))
    time_row = step_time_row(summary)
    if time_row is not None:
        rows.insert(4, time_row)
    if "final_val_loss" in summary:  # --eval-every: the last evaluation's, after the loss
        after_loss = [name for name, _ in rows].index("loss") + 1
        validation = (
            f"loss {summary['final_val_loss']:.4f}, "
            f"{summary['final_val_bpb']:.3f} bits/byte (held-out documents)"
        )
        rows.insert(after_loss, ("validation", validation))
    for name, value in rows:
        table.add_row(name, value)
    return table


def step_time_row(summary: dict[str, Any]) -> tuple[str, str] | None:
    """Where rank 0's last time-tracked step went: its categories over 1% of it, and the
    communication hidden under its work (``--track-time``)."""
    steps = [e for e in summary.get("time_breakdown_by_rank") or [] if e["rank"] == 0]
    if not steps:
        return None
    last = steps[-1]
    wall = last["wall_s"]
    parts = sorted(last["by_category"].items(), key=lambda item: -item[1])
    text = ", ".join(f"{name} {share / wall:.0%}" for name, share in parts if share > 0.01 * wall)
    if last["comm_s"]:
        text += f"; {last['overlap_fraction']:.0%} of its communication overlapped"
    return (f"time, rank 0 step {last['step']}", f"{wall * 1e3:.1f} ms: {text}")


def step_memory_row(summary: dict[str, Any]) -> tuple[str, str] | None:
    """Rank 0's tracked peak of the last step, its largest category, and the prediction."""
    ranks = summary.get("memory_peak_by_rank") or [None]
    peak = ranks[0]
    if peak is None:
        return None
    top = max(peak["peak_by_category"], key=peak["peak_by_category"].get)
    text = (
        f"{mib(peak['peak'])} MiB in {peak['peak_phase']} ({top} "
        f"{mib(peak['peak_by_category'][top])})"
    )
    predicted = (summary.get("predicted") or {}).get("memory_peak")
    if predicted:
        text += f"; predicted {mib(predicted['total'])}"
    return ("memory peak / rank", text)


def mib(num_bytes: int) -> str:
    """Bytes as MiB with two decimals."""
    return f"{num_bytes / 2**20:.2f}"
