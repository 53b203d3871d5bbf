"""Recovery modes side by side: restart, elastic, live; a rank kill, a hang, a node loss.

    python benchmarks/recovery_modes.py                 # table and picture into docs/
    python benchmarks/recovery_modes.py --cells restart-node-hsdp,live-sigkill-ddp --no-docs

Every cell trains the tiny model at 4 ranks (global batch 12, so that 2 and 3 ranks
split it too) for ``STEPS`` steps with a checkpoint every ``CHECKPOINT_EVERY``, and
meets one fault before step ``FAULT_STEP``:

- ``node``: ``--inject-fault node:1@STEP``, node 1 of a 2-node cluster (2 CPUs each,
  started here with ``distlab cluster up``, lost nodes back after ``REVIVE_S``) dies
  with both its ranks (Ray launcher);
- ``sigkill``: ``--inject-fault 1@STEP``, rank 1 is SIGKILLed;
- ``sigstop``: rank 1 is SIGSTOPped from outside once the run has recorded STEP steps
  (a hang: the watchdog or the collective timeout, ``--timeout-s``, ends it).

Modes: ``restart`` (Ray, the default), ``elastic`` (Ray, ``--elastic 2``) and ``live``
(``--ft live``: ddp replicas under torchft; on the cluster for a node loss, else on the
local launcher). Each cell reports,
from the run's own records (``events.jsonl``, ``metrics.jsonl``, ``summary.json``):

- recovery: from the fault (its event, or the moment this script sent the signal) to
  the end of the next step the run records;
- redone: steps recorded twice (``lost_steps``);
- degraded tokens/s: the median throughput of the steps run short of ranks (elastic:
  at fewer ranks; live: with fewer replicas), next to the median of the full ones;
- loss difference: the largest |loss - the uninterrupted run's| over the steps
  (references: the local launcher, the same flags, no fault).

The picture plots tokens/s over each run's wall time, the fault marked.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from soak import cluster, events, launch, losses, signal_when_due, wait_for_nodes

from distlab.report.markdown import fill_marked_section
from distlab.run.files import read_pid

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "fault_tolerance.md"
PICTURE = ROOT / "docs" / "recovery_modes.png"
GAP_S = 1.5
"""Steps further apart than this are drawn unconnected: the run was down in between."""
STEPS, CHECKPOINT_EVERY, FAULT_STEP, TIMEOUT_S, REVIVE_S = 80, 10, 15, 8, 30
COMMON = [
    "--model", "tiny", "--nproc", "4", "--global-batch", "12", "--steps", str(STEPS),
    "--checkpoint-every", str(CHECKPOINT_EVERY), "--timeout-s", str(TIMEOUT_S),
    "--max-failures", "2", "--track-memory", "off", "--no-wandb", "--quiet", "--no-pictures",
]  # fmt: skip
MODE_FLAGS = {"restart": [], "elastic": ["--elastic", "2"], "live": ["--ft", "live"]}
CELLS = [
    "restart-node-ddp", "restart-node-fsdp", "restart-node-hsdp",
    "restart-sigkill-ddp", "restart-sigstop-ddp",
    "elastic-node-ddp", "elastic-node-fsdp",
    "live-node-ddp", "live-sigkill-ddp", "live-sigstop-ddp",
]  # fmt: skip
"""mode-fault-strategy; elastic takes ddp and fsdp, live ddp only."""


@dataclass
class Cell:
    """One mode x fault x strategy run and its figures."""

    mode: str
    fault: str
    strategy: str
    recovery_s: float | None = None
    redone: int | None = None
    degraded_tokens_per_s: float | None = None
    full_tokens_per_s: float | None = None
    max_loss_diff: float | None = None
    error: str = ""
    fault_at: float | None = None
    launched_at: float = 0.0
    run_dir: Path | None = None

    @property
    def name(self) -> str:
        return f"{self.mode}-{self.fault}-{self.strategy}"


def on_cluster(cell: Cell) -> bool:
    """Whether the cell runs on the cluster (Ray launcher): all but live's rank faults, which
    run on the local launcher (its replicas are processes of this machine)."""
    return cell.mode != "live" or cell.fault == "node"


def reference(strategy: str, workdir: Path) -> list[float]:
    """The uninterrupted run's losses (local launcher; made once per strategy)."""
    run_dir = workdir / f"reference-{strategy}"
    if not (run_dir / "summary.json").is_file():
        process = launch([*COMMON, "--strategy", strategy, "--launcher", "local", "--run-dir",
                          str(run_dir)])  # fmt: skip
        _, err = process.communicate(timeout=600)
        if process.returncode:
            raise RuntimeError(f"reference {strategy}: {err.strip()[-300:]}")
    return losses(run_dir)


def run_cell(cell: Cell, workdir: Path, address: str) -> Cell:
    """Run one cell and read its figures from the run's records."""
    expected = reference(cell.strategy, workdir)
    cell.run_dir = workdir / cell.name
    shutil.rmtree(cell.run_dir, ignore_errors=True)  # a cell run again starts afresh
    args = [*COMMON, *MODE_FLAGS[cell.mode], "--strategy", cell.strategy]
    args += ["--run-dir", str(cell.run_dir)]
    on_ray = on_cluster(cell)
    args += ["--launcher", "ray", "--ray-address", address] if on_ray else ["--launcher", "local"]
    if cell.fault == "node":
        args += ["--inject-fault", f"node:1@{FAULT_STEP}"]
    elif cell.fault == "sigkill":
        args += ["--inject-fault", f"1@{FAULT_STEP}"]
    cell.launched_at = time.time()
    process = launch(args)
    sent = None
    if cell.fault == "sigstop":  # rank 1 hangs once FAULT_STEP steps are recorded
        sent = signal_when_due(cell.run_dir, process, 1, FAULT_STEP, signal.SIGSTOP)
    try:
        _, err = process.communicate(timeout=900)
    finally:
        # a stopped rank must not outlive its cell
        if sent is not None and (pid := read_pid(cell.run_dir, 1)) is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    if process.returncode:
        cell.error = (err.strip().splitlines() or ["failed"])[-1][:200]
        return cell
    log = events(cell.run_dir)
    cell.fault_at = sent or next((e["t"] for e in log if e["event"] == "fault"), None)
    rows = [json.loads(line) for line in (cell.run_dir / "metrics.jsonl").read_text().splitlines()]
    after = [r["time"] for r in rows if cell.fault_at is not None and r["time"] > cell.fault_at]
    cell.recovery_s = min(after) - cell.fault_at if after else None
    cell.redone = json.loads((cell.run_dir / "summary.json").read_text())["lost_steps"]
    short = [r for r in rows if ranks_of(r) < 4]
    full = [r for r in rows if ranks_of(r) == 4]
    cell.degraded_tokens_per_s = median([r["tokens_per_s"] for r in short])
    cell.full_tokens_per_s = median([r["tokens_per_s"] for r in full])
    got = losses(cell.run_dir)
    cell.max_loss_diff = max(abs(a - b) for a, b in zip(got, expected, strict=True))
    return cell


def ranks_of(row: dict) -> int:
    """How many ranks (or live replicas) trained a step."""
    return row.get("replicas") or row["world_size"]


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def table(cells: list[Cell]) -> str:
    """The Markdown table written into docs/fault_tolerance.md."""
    fmt = lambda v, spec: format(v, spec) if v is not None else "-"  # noqa: E731
    lines = [
        f"`python benchmarks/recovery_modes.py`: tiny model, 4 ranks, global batch 12, {STEPS} "
        f"steps, a checkpoint every {CHECKPOINT_EVERY}, the fault before step {FAULT_STEP}; "
        f"2 nodes x 2 CPUs, a lost node back after {REVIVE_S} s.",
        "",
        "| mode | fault | strategy | recovery | redone | tokens/s degraded (full) "
        "| max loss diff | result |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for c in cells:
        lines.append(
            f"| {c.mode} | {c.fault} | {c.strategy} | {fmt(c.recovery_s, '.1f')} s | "
            f"{fmt(c.redone, 'd')} | {fmt(c.degraded_tokens_per_s, ',.0f')} "
            f"({fmt(c.full_tokens_per_s, ',.0f')}) | {fmt(c.max_loss_diff, '.1e')} | "
            f"{c.error or 'finished'} |"
        )
    return "\n".join(lines)


def draw(cells: list[Cell], path: Path) -> None:
    """tokens/s over wall time, one panel per mode, each fault marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(c.mode for c in cells))
    fig, axes = plt.subplots(len(modes), 1, figsize=(9, 2.6 * len(modes)), squeeze=False)
    for ax, mode in zip(axes[:, 0], modes, strict=True):
        for c in (c for c in cells if c.mode == mode and c.run_dir and not c.error):
            rows = [json.loads(x) for x in (c.run_dir / "metrics.jsonl").read_text().splitlines()]
            rows.sort(key=lambda r: r["time"])
            start = c.fault_at or c.launched_at
            times, rates = [], []
            for before, row in zip([None, *rows], rows, strict=False):
                if before is not None and row["time"] - before["time"] > GAP_S:
                    times.append(float("nan"))  # no line across an outage
                    rates.append(float("nan"))
                times.append(row["time"] - start)
                rates.append(row["tokens_per_s"])
            ax.plot(times, rates, marker="o", markersize=2, label=f"{c.fault}, {c.strategy}")
        ax.axvline(0, color="black", linestyle="--", linewidth=1)
        ax.set_title(f"{mode}: tokens/s by step end, seconds from the fault (dashed)")
        ax.set_ylabel("tokens/s")
        ax.legend(fontsize=7, loc="upper left")
    axes[-1, 0].set_xlabel("seconds from the fault")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def remembered(workdir: Path, cells: list[Cell]) -> list[Cell]:
    """These cells merged into the ones an earlier call ran in ``workdir`` (``cells.json``),
    in ``CELLS`` order: rerunning one cell (``--cells``) keeps the others' figures."""
    file = workdir / "cells.json"
    known = {c["mode"] + "-" + c["fault"] + "-" + c["strategy"]: c for c in
             (json.loads(file.read_text()) if file.is_file() else [])}  # fmt: skip
    for cell in cells:
        known[cell.name] = {**asdict(cell), "run_dir": str(cell.run_dir)}
    file.write_text(json.dumps(list(known.values()), indent=1))
    merged = [Cell(**{**c, "run_dir": Path(c["run_dir"])}) for c in known.values()]
    order = {name: i for i, name in enumerate(CELLS)}
    return sorted(merged, key=lambda c: order.get(c.name, len(order)))


def main() -> int:
    """Run the cells; exit 0 if every one finished."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", default=",".join(CELLS), help="comma-separated names")
    parser.add_argument("--workdir", help="keep the runs here (default: a temporary dir)")
    parser.add_argument("--no-docs", action="store_true", help="do not touch the docs")
    args = parser.parse_args()
    cells = [Cell(*name.split("-")) for name in args.cells.split(",")]
    with tempfile.TemporaryDirectory(prefix="distlab-recovery-") as tmp:
        workdir = Path(args.workdir or tmp)
        state_dir = workdir / "cluster"
        address = cluster("up", state_dir, REVIVE_S) if any(map(on_cluster, cells)) else ""
        try:
            for cell in cells:
                if on_cluster(cell):
                    wait_for_nodes(state_dir)
                run_cell(cell, workdir, address)
                print(table([cell]).splitlines()[-1], flush=True)
        finally:
            if address:
                cluster("down", state_dir)
        cells = remembered(workdir, cells)
        if not args.no_docs:
            fill_marked_section(DOCS, "recovery-modes", table(cells))
            draw(cells, PICTURE)
    return 0 if not any(c.error for c in cells) else 1


if __name__ == "__main__":
    sys.exit(main())
