"""Live recovery when a replica dies inside a step: how long do the survivors wait?

    python benchmarks/live_kill_mid_step.py                  # 12 trials, 3 replicas
    python benchmarks/live_kill_mid_step.py --trials 20 --nproc 4

Each trial starts ``--ft live`` ddp on the local launcher (tiny model, SGD, small
gradient buckets so that a step holds several all-reduces) and, once replica 0 has
recorded ``KILL_AFTER`` steps, SIGKILLs the last replica from outside at a random
moment: usually inside a step's all-reduces, unlike ``--inject-fault``, which fires
between steps. The replica is held back (``--rejoin-after``) so that the survivors run
on alone. Per trial it prints each survivor's longest step attempt (``ranks/rankR.jsonl``)
and replica 0's time lost on the clock (``distlab.report.live_recovery.survivor_time_lost``),
then how many trials kept every survivor within the live goal of 2 s.

Why: a survivor whose all-reduce failed on the dead peer used to keep its connections
open, so a survivor still waiting on a message from it waited out ``--timeout-s`` (60 s).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

from soak import launch, recorded_steps

from distlab.report.live_recovery import survivor_time_lost
from distlab.run.files import METRICS_FILE, RANKS_DIR, pid_file, read_jsonl

STEPS, KILL_AFTER, GOAL_S = 80, 20, 2.0


def trial(run_dir: Path, nproc: int) -> str:
    """One run with the last replica killed mid-run, as a line: "ok" (within the goal),
    "SLOW" or "FAILED" (and why), then each survivor's longest step attempt and replica
    0's time lost."""
    launcher = launch([
        "--launcher", "local", "--model", "tiny", "--strategy", "ddp", "--nproc", str(nproc),
        "--global-batch", "12", "--steps", str(STEPS), "--optimizer", "sgd", "--ft", "live",
        "--max-failures", "1", "--rejoin-after", str(10 * STEPS), "--bucket-mb", "0.05",
        "--track-memory", "off", "--no-final-checkpoint", "--no-wandb", "--quiet",
        "--no-pictures", "--run-dir", str(run_dir),
    ])  # fmt: skip
    while recorded_steps(run_dir) < KILL_AFTER:
        if launcher.poll() is not None:
            raise SystemExit(f"the run ended before step {KILL_AFTER}: {launcher.stderr.read()}")
        time.sleep(0.01)
    time.sleep(random.uniform(0, 0.1))  # somewhere in the next step or two
    victim = nproc - 1
    os.kill(int(pid_file(run_dir, victim).read_text()), signal.SIGKILL)
    _, stderr = launcher.communicate()
    longest = [
        max(line["step_time_s"] for line in read_jsonl(run_dir / RANKS_DIR / f"rank{r}.jsonl"))
        for r in range(victim)
    ]
    attempts = "longest attempt per survivor (s) " + ", ".join(f"{s:.2f}" for s in longest)
    if launcher.returncode != 0:
        return f"FAILED ({attempts}): {stderr.strip().splitlines()[-1]}"
    lost = survivor_time_lost(read_jsonl(run_dir / METRICS_FILE))["lost_s"]
    within = max(longest) < GOAL_S and lost < GOAL_S
    return f"{'ok' if within else 'SLOW'}: {attempts}; replica 0 lost {lost:.2f} s"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--nproc", type=int, default=3, help="replicas (3 or 4: 12 rows split)")
    parser.add_argument("--out", help="keep the run dirs under this directory")
    args = parser.parse_args()
    within = 0
    with tempfile.TemporaryDirectory(prefix="distlab-kill-mid-step-") as scratch:
        for index in range(args.trials):
            line = trial(Path(args.out or scratch) / f"trial{index}", args.nproc)
            within += line.startswith("ok")
            print(f"trial {index} {line}", flush=True)
    print(f"{within}/{args.trials} trials: every survivor's wait under {GOAL_S:g} s")
    return 0 if within == args.trials else 1


if __name__ == "__main__":
    sys.exit(main())
