"""Start-up cost and time to recover, Ray launcher against the local launcher, side by side.

    python benchmarks/startup_and_recovery.py                    # 1 round, ddp x2, tiny
    python benchmarks/startup_and_recovery.py --rounds 3 --out startup.json

Each round runs the same config once per launcher (in alternating order, so
machine noise hits both alike): ``ddp`` on 2 ranks, the tiny model, 30 steps,
a checkpoint every 5 steps and one injected fault (rank 1 is SIGKILLed when 12
steps are done; the group restarts from step_000010). Measured per run:

- ``first step``: from starting the command to the first line of
  ``metrics.jsonl`` (process start, imports, Ray or spawned ranks, process
  group, model, first step), timed from outside;
- ``startup``: ``summary.json``'s ``startup_s``, from the launcher's ``launch``
  event to the ranks being ready to run step 0 (after start-up, before step 0);
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
CONFIG = [
    "--strategy", "ddp", "--nproc", "2", "--model", "tiny", "--global-batch", "8",
    "--steps", "30", "--checkpoint-every", "5", "--max-failures", "1",
    "--inject-fault", "1@12", "--no-wandb", "--quiet",
]  # fmt: skip


def run_once(launcher: str, run_dir: Path) -> dict[str, float]:
    """One run of CONFIG with ``launcher``; its timings in seconds."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    started = time.time()
    proc = subprocess.Popen(
        [sys.executable, "-m", "distlab.launch", *CONFIG, "--launcher", launcher,
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
    return {
        "first_step_s": first_step,
        "startup_s": summary["startup_s"],
        "recovery_s": summary["recovery_s"],
        "restarts": summary["restarts"],
        "total_s": total,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--launchers", nargs="+", default=["local", "ray"])
    parser.add_argument("--out", help="write every run's timings to this JSON file")
    args = parser.parse_args()
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in args.launchers}
    with tempfile.TemporaryDirectory(prefix="distlab-bench-") as work:
        for round_index in range(args.rounds):
            order = args.launchers if round_index % 2 == 0 else args.launchers[::-1]
            for launcher in order:
                result = run_once(launcher, Path(work) / f"{launcher}-{round_index}")
                runs[launcher].append(result)
                print(f"round {round_index + 1} {launcher}: {json.dumps(result)}", flush=True)
    print()
    print(f"ddp x2, tiny model, 30 steps, fault at step 12; median of {args.rounds} round(s)")
    print()
    print("| launcher | launch -> first step (s) | ready to train (s) | recovery (s) | total (s) |")
    print("|---|---|---|---|---|")
    for launcher, results in runs.items():
        cells = [
            statistics.median(r[key] for r in results)
            for key in ("first_step_s", "startup_s", "recovery_s", "total_s")
        ]
        print(f"| {launcher} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps(runs, indent=2) + "\n")


if __name__ == "__main__":
    main()
