"""``python -m distlab.sweep SWEEP.yaml``: run a matrix of strategies x world sizes, then report.

    python -m distlab.sweep configs/compare.yaml
    python -m distlab.sweep configs/compare.yaml --only ddp,fsdp --steps 5

A sweep file holds::

    name: compare                  # also the W&B group of every run
    runs_root: runs/compare        # cell run dirs: <runs_root>/<strategy>-n<nproc>[-k=v...]
    report: docs/comparison.md     # Markdown report; PNGs in docs/comparison_files/
    docs_dir: docs/strategies      # optional: refresh the measured tables of these pages
    timeout_s: 900                 # per cell
    base: {model: small, steps: 20, ...}      # Config fields shared by all cells
    matrix: {strategy: [ddp, fsdp], nproc: [2, 4]}   # every combination ...
    cells: [{strategy: single, nproc: 1}, {strategy: fsdp+tp, nproc: 4, tp: 2}]  # ... plus these

Each cell runs as ``python -m distlab.launch --config <cell yaml>`` in a
subprocess, so a cell that fails (or hangs past ``timeout_s``) is reported and
the sweep goes on. Combinations the config rejects (``single`` on 2 ranks, tp
over more ranks than heads) are listed as skipped. A cell whose run dir already
holds a finished run is reused: rerun the command to complete a sweep that was
interrupted (``--fresh`` reruns everything).
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from distlab.cli import OneLineErrorParser, run_cli
from distlab.config_reading import read_yaml_mapping
from distlab.errors import DistlabError
from distlab.launch.wandb_run import wandb_mode
from distlab.report.markdown import NOTES_MARKER, write_report
from distlab.report.runs import load_runs
from distlab.report.tables import COLUMNS, comparison_table, markdown_table, table_rows
from distlab.run.files import SUMMARY_FILE
from distlab.strategies.resolve import load_config

SWEEP_KEYS = {"name", "runs_root", "report", "docs_dir", "timeout_s", "base", "matrix", "cells"}
MARKER = "<!-- measured:"
MARKER_END = "<!-- /measured -->"


@dataclass
class Cell:
    """One run of the sweep."""

    overrides: dict[str, Any]
    name: str
    status: str = "pending"
    """pending, skipped (invalid config), done, reused, failed."""
    reason: str = ""
    seconds: float = 0.0
    run_dir: Path | None = None


@dataclass
class Sweep:
    """A parsed sweep file."""

    name: str
    runs_root: Path
    report: Path | None
    docs_dir: Path | None
    timeout_s: float
    base: dict[str, Any]
    cells: list[Cell] = field(default_factory=list)


def cell_name(overrides: dict[str, Any]) -> str:
    """``strategy-n<nproc>`` plus any other override, e.g. ``fsdp+tp-n4-tp2``."""
    extra = "".join(
        f"-{k}{v}" for k, v in sorted(overrides.items()) if k not in ("strategy", "nproc")
    )
    return f"{overrides['strategy']}-n{overrides.get('nproc', 1)}{extra}".replace("/", "_")


def load_sweep(path: str, root: Path | None = None) -> Sweep:
    """Parse a sweep file; paths in it are relative to ``root`` (default: the current dir)."""
    file = Path(path)
    if not file.is_file():
        raise DistlabError(f"sweep file not found: {path}")
    data = read_yaml_mapping(file, f"sweep file {path}")
    unknown = sorted(set(data) - SWEEP_KEYS)
    if unknown:
        raise DistlabError(
            f"unknown sweep key '{unknown[0]}' in {path} (valid: {', '.join(sorted(SWEEP_KEYS))})"
        )
    root = root or Path.cwd()
    name = str(data.get("name") or file.stem)
    base = dict(data.get("base") or {})
    base.setdefault("wandb_group", name)
    overrides: list[dict[str, Any]] = []
    matrix = data.get("matrix") or {}
    if matrix:
        keys = sorted(matrix, key=lambda k: (k != "strategy", k != "nproc"))  # strategy outermost
        values = [matrix[k] if isinstance(matrix[k], list) else [matrix[k]] for k in keys]
        overrides += [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*values)]
    overrides += [dict(c) for c in data.get("cells") or []]
    if not overrides:
        raise DistlabError(f"sweep file {path} has no cells (give matrix: or cells:)")
    cells, seen = [], set()
    for cell in overrides:
        if "strategy" not in cell:
            raise DistlabError(f"a cell of {path} has no strategy: {cell}")
        cell.setdefault("nproc", 1)
        label = cell_name(cell)
        if label not in seen:
            seen.add(label)
            cells.append(Cell(cell, label))

    def rooted(value: Any) -> Path | None:
        return None if value is None else root / str(value)

    return Sweep(
        name=name,
        runs_root=rooted(data.get("runs_root", f"runs/{name}")),
        report=rooted(data.get("report")),
        docs_dir=rooted(data.get("docs_dir")),
        timeout_s=float(data.get("timeout_s", 900)),
        base=base,
        cells=cells,
    )


def _cell_config(sweep: Sweep, cell: Cell) -> dict[str, Any]:
    values = {**sweep.base, **cell.overrides}
    values["run_dir"] = str(sweep.runs_root / cell.name)
    values.setdefault("wandb_name", f"{sweep.name}-{cell.name}")
    values.setdefault("quiet", True)
    return values


def validate_cells(sweep: Sweep) -> None:
    """Mark the cells whose config is invalid as skipped (with the reason)."""
    for cell in sweep.cells:
        values = _cell_config(sweep, cell)
        values.pop("run_dir")
        try:
            load_config(None, values)
        except DistlabError as exc:
            cell.status, cell.reason = "skipped", str(exc)


def run_cell(sweep: Sweep, cell: Cell, log_dir: Path) -> None:
    """Run one cell in a subprocess; record done/reused/failed and why."""
    run_dir = sweep.runs_root / cell.name
    cell.run_dir = run_dir
    if (run_dir / SUMMARY_FILE).is_file():
        cell.status = "reused"
        return
    if run_dir.exists():
        shutil.rmtree(run_dir)  # an unfinished run of an earlier sweep: start over
    values = _cell_config(sweep, cell)
    config_file = log_dir / f"{cell.name}.yaml"
    config_file.write_text(yaml.safe_dump(values, sort_keys=False))
    log_file = log_dir / f"{cell.name}.log"
    tic = time.monotonic()
    command = [sys.executable, "-m", "distlab.launch", "--config", str(config_file)]
    if values.get("launcher") == "local":
        # Also as a flag, which the launcher reads before it imports torch: its rank server
        # then imports on another core meanwhile (distlab.launch.spawn.start_early).
        command += ["--launcher", "local"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log_file.open("w") as log:
        try:
            result = subprocess.run(
                command, stdout=log, stderr=subprocess.STDOUT, timeout=sweep.timeout_s, env=env
            )
            code = result.returncode
        except subprocess.TimeoutExpired:
            code = None
    cell.seconds = time.monotonic() - tic
    if code == 0 and (run_dir / SUMMARY_FILE).is_file():
        cell.status = "done"
        return
    cell.status = "failed"
    if code is None:
        cell.reason = f"timed out after {sweep.timeout_s:.0f} s (log: {log_file})"
        return
    lines = [ln for ln in log_file.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("distlab: error:")]
    last = (errors or lines or [f"exit status {code}"])[-1]
    cell.reason = f"{last.removeprefix('distlab: error: ')[:300]} (log: {log_file})"


def run_sweep(sweep: Sweep, console: Console, fresh: bool = False) -> list[Cell]:
    """Run every valid cell, one at a time, showing progress; return the cells."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    validate_cells(sweep)
    log_dir = sweep.runs_root / "_sweep"
    log_dir.mkdir(parents=True, exist_ok=True)
    todo = [c for c in sweep.cells if c.status == "pending"]
    for cell in sweep.cells:
        if cell.status == "skipped":
            console.print(f"[yellow]skip[/] {cell.name}: {cell.reason}")
    if fresh:
        for cell in todo:
            shutil.rmtree(sweep.runs_root / cell.name, ignore_errors=True)
    with Progress(
        TextColumn("[bold]sweep {task.fields[sweep]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[cell]}"),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task("sweep", total=len(todo), sweep=sweep.name, cell="")
        for cell in todo:
            progress.update(task, cell=cell.name)
            run_cell(sweep, cell, log_dir)
            progress.advance(task)
            style = {"done": "green", "reused": "cyan", "failed": "red"}[cell.status]
            detail = f"{cell.seconds:.0f} s" if cell.status == "done" else cell.reason
            progress.console.print(f"[{style}]{cell.status}[/] {cell.name}  {detail}")
    return sweep.cells


def finished_runs(cells: list[Cell]) -> list[Path]:
    return [c.run_dir for c in cells if c.status in ("done", "reused") and c.run_dir]


def write_outputs(sweep: Sweep, cells: list[Cell], command: str, console: Console) -> None:
    """Comparison table, report with plots, strategy pages' measured tables, W&B report run."""
    paths = finished_runs(cells)
    if not paths:
        return
    runs = load_runs([str(p) for p in paths])
    console.print(comparison_table(runs))
    images: list[Path] = []
    if sweep.report is not None:
        shared = ", ".join(f"{k}: {v}" for k, v in sweep.base.items() if k != "wandb_group")
        context = f"Every cell: {shared}; W&B group `{sweep.base['wandb_group']}`."
        images = write_report(runs, sweep.report, f"distlab sweep '{sweep.name}'", command, context)
        failed = [c for c in cells if c.status in ("failed", "skipped")]
        if failed:
            lines = ["", "## Cells that did not run", ""]
            lines += [f"- `{c.name}` ({c.status}): {c.reason}" for c in failed]
            text = sweep.report.read_text()
            head, marker, notes = text.partition(NOTES_MARKER)
            sweep.report.write_text(
                head.rstrip("\n") + "\n" + "\n".join(lines) + "\n\n" + marker + notes
            )
        console.print(f"report: {sweep.report}")
    if sweep.docs_dir is not None:
        updated = update_strategy_pages(sweep.docs_dir, runs, command, markdown_table)
        for page in updated:
            console.print(f"updated measured table: {page}")
    if sweep.base.get("wandb", True):
        log_wandb_report(sweep, runs, images)


def update_strategy_pages(docs_dir: Path, runs, command: str, table_fn) -> list[Path]:
    """Refill each ``<!-- measured: NAME... -->`` ... ``<!-- /measured -->`` block in docs_dir."""
    updated = []
    for page in sorted(docs_dir.glob("*.md")):
        text = page.read_text()
        if MARKER not in text:
            continue
        out, rest = [], text
        while MARKER in rest:
            head, _, tail = rest.partition(MARKER)
            spec, _, tail = tail.partition("-->")
            _, _, after = tail.partition(MARKER_END)
            names = spec.split()
            chosen = [r for r in runs if r.summary["strategy"] in names]
            block = table_fn(chosen) if chosen else "(no run of these strategies in the sweep)"
            out.append(
                f"{head}{MARKER} {' '.join(names)} -->\n\nMeasured by `{command}`:\n\n"
                f"{block}\n\n{MARKER_END}"
            )
            rest = after
        new = "".join(out) + rest
        if new != text:
            page.write_text(new)
            updated.append(page)
    return updated


def log_wandb_report(sweep: Sweep, runs, images: list[Path]) -> None:
    """One W&B run in the sweep's group holding the comparison table and the plots."""
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        import wandb

    except ImportError:
        return
    run = wandb.init(
        project=sweep.base.get("wandb_project", "distlab"),
        group=sweep.base["wandb_group"],
        name=f"{sweep.name}-report",
        job_type="report",
        dir=str(sweep.runs_root / "_sweep"),
        mode=wandb_mode(),
        reinit="finish_previous",
    )
    headers = []
    for name, _ in COLUMNS:  # W&B needs unique column names
        headers.append(name if name not in headers else f"{headers[-1]} {name}")
    run.log({"comparison": wandb.Table(columns=headers, data=table_rows(runs))})
    for image in images:
        run.log({f"plots/{image.stem}": wandb.Image(str(image))})
    run.finish()


def main(argv: list[str] | None = None) -> int:
    """Run the sweep, print the table, write the report; exit 1 only if no cell finished."""
    parser = OneLineErrorParser(prog="python -m distlab.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("sweep", help="sweep YAML file (e.g. configs/compare.yaml)")
    parser.add_argument("--only", help="comma-separated strategies to run (others are left out)")
    parser.add_argument("--steps", type=int, help="override the steps of every cell")
    parser.add_argument("--runs-root", type=Path, help="override runs_root")
    parser.add_argument("--report", type=Path, help="override report")
    parser.add_argument("--no-docs", action="store_true", help="do not touch the strategy pages")
    parser.add_argument("--fresh", action="store_true", help="rerun cells that already finished")
    args = parser.parse_args(argv)
    sweep = load_sweep(args.sweep)
    if args.only:
        wanted = set(args.only.split(","))
        sweep.cells = [c for c in sweep.cells if c.overrides["strategy"] in wanted]
    if args.steps:
        sweep.base["steps"] = args.steps
    if args.runs_root:
        sweep.runs_root = args.runs_root
    if args.report:
        sweep.report = args.report
    if args.no_docs:
        sweep.docs_dir = None
    console = Console(width=200)
    command = "python -m distlab.sweep " + " ".join(argv if argv is not None else sys.argv[1:])
    cells = run_sweep(sweep, console, fresh=args.fresh)
    write_outputs(sweep, cells, command, console)
    counts = {s: sum(c.status == s for c in cells) for s in ("done", "reused", "failed", "skipped")}
    console.print(", ".join(f"{n} {s}" for s, n in counts.items() if n))
    for cell in cells:
        if cell.status == "failed":
            console.print(f"[red]failed[/] {cell.name}: {cell.reason}")
    return 0 if finished_runs(cells) else 1


if __name__ == "__main__":
    run_cli(main)
