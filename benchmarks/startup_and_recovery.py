"""Start-up cost and time to recover, Ray launcher against the local launcher, side by side.

    python benchmarks/startup_and_recovery.py                      # 1 round, 1 2 4 ranks
    python benchmarks/startup_and_recovery.py --rounds 3 --nproc 2 --out startup.json

Each round runs the same config once per launcher and rank count (launchers in
alternating order, so machine noise hits both alike): ``ddp`` on N ranks, the
tiny model, 30 steps, a checkpoint every 5 steps and one injected fault (the
last rank is SIGKILLed when 12 steps are done; the group restarts from
step_000010). Measured per run, from the command's start, all from outside or
from the run's own ``events.jsonl``:

- ``first step``: to the first line of ``metrics.jsonl`` (the whole start-up
  and step 0), timed from outside; split into
- ``to launch``: to the launcher's ``launch`` event (this process's imports,
  the config, the data, the run dir);
- ``ranks ready``: ``launch`` to rank 0's ``start`` event (summary.json's
  ``startup_s``: rank processes, their imports, process group, model, strategy);
- ``step 0``: ``start`` to the first metrics line;
- ``recovery``: ``summary.json``'s ``recovery_s``, from the fault (the kill)
  to the end of the first resumed step: detection, stopping the group, new
  ranks, process group, model, loading the checkpoint, one step;
- ``total``: the whole command.

Prints a Markdown table of the medians; ``--out`` also writes every run as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ("first_step_s", "to_launch_s", "startup_s", "step0_s", "recovery_s", "total_s")


def config(nproc: int) -> list[str]:
    """The benchmark's launch flags at ``nproc`` ranks."""
    return [
        "--strategy", "ddp", "--nproc", str(nproc), "--model", "tiny", "--global-batch", "8",
        "--steps", "30", "--checkpoint-every", "5", "--max-failures", "1",
        "--inject-fault", f"{nproc - 1}@12", "--no-wandb", "--quiet",
    ]  # fmt: skip


def run_once(launcher: str, nproc: int, run_dir: Path) -> dict[str, float]:
    """One run of ``config(nproc)`` with ``launcher``; its timings in seconds."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    started = time.time()
    proc = subprocess.Popen(
        [sys.executable, "-m", "distlab.launch", *config(nproc), "--launcher", launcher,
         "--run-dir", str(run_dir)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    metrics = run_dir / "metrics.jsonl"
    first_step = None
    while proc.poll() is None:
        if first_step is None and metrics.is_file() and metrics.stat().st_size > 0:
            first_step = time.time() - started
        time.sleep(0.02)
    total = time.time() - started
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{launcher} run failed:\n{stdout}\n{stderr}")
    summary = json.loads((run_dir / "summary.json").read_text())
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    launch = next(e["t"] for e in events if e["event"] == "launch")
    start = next(e["t"] for e in events if e["event"] == "start")
    return {
        "first_step_s": first_step,
        "to_launch_s": launch - started,
        "startup_s": summary["startup_s"],
        "step0_s": started + first_step - start,
        "recovery_s": summary["recovery_s"],
        "restarts": summary["restarts"],
        "total_s": total,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--nproc", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--launchers", nargs="+", default=["local", "ray"])
    parser.add_argument("--out", help="write every run's timings to this JSON file")
    args = parser.parse_args()
    runs: dict[str, list[dict[str, float]]] = {
        f"{launcher} x{n}": [] for n in args.nproc for launcher in args.launchers
    }
    with tempfile.TemporaryDirectory(prefix="distlab-bench-") as work:
        for round_index in range(args.rounds):
            order = args.launchers if round_index % 2 == 0 else args.launchers[::-1]
            for nproc in args.nproc:
                for launcher in order:
                    key = f"{launcher} x{nproc}"
                    result = run_once(launcher, nproc, Path(work) / f"{key}-{round_index}")
                    runs[key].append(result)
                    print(f"round {round_index + 1} {key}: {json.dumps(result)}", flush=True)
    print()
    print(f"ddp, tiny model, 30 steps, fault at step 12; median of {args.rounds} round(s)")
    print()
    print(
        "| launcher | ranks | first step (s) | to launch | ranks ready | step 0 "
        "| recovery (s) | total (s) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for key, results in runs.items():
        launcher, ranks = key.split(" x")
        cells = [statistics.median(r[name] for r in results) for name in FIGURES]
        print(f"| {launcher} | {ranks} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps(runs, indent=2) + "\n")


if __name__ == "__main__":
    main()
