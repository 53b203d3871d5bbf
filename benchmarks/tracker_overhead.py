"""What torch's memory tracker costs a step: the same run tracked every step and untracked.

    python benchmarks/tracker_overhead.py                  # small model, 20 steps, 3 rounds
    python benchmarks/tracker_overhead.py --model tiny --rounds 5

Runs ``single`` (local launcher, one rank) with ``--track-memory every`` and with
``--track-memory off``, alternating which goes first in each round so machine
noise hits both alike, and prints the median step time of each (steps 1 to the
end, from ``metrics.jsonl``: step 0 allocates the optimizer state) and their
ratio. This is the figure behind ``--track-memory sample``'s default: tracking
the last step of a run (and the second of a long one), not all of them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from distlab.launch.runner import run
from distlab.strategies.resolve import load_config

MODES = ("every", "off")


def step_times(model: str, steps: int, mode: str, run_dir: Path) -> list[float]:
    """Step times (s) of one run with ``--track-memory mode``, step 0 left out."""
    config = load_config(
        None,
        {
            "strategy": "single", "nproc": 1, "model": model, "steps": steps,
            "track_memory": mode, "launcher": "local", "wandb": False, "quiet": True,
            "final_checkpoint": False, "run_dir": str(run_dir),
        },
    )  # fmt: skip
    run(config)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step_time_s"] for line in lines[1:] if line]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory(prefix="distlab-tracker-") as work:
        for round_index in range(args.rounds):
            order = MODES if round_index % 2 == 0 else MODES[::-1]
            for mode in order:
                run_dir = Path(work) / f"{mode}-{round_index}"
                times[mode] += step_times(args.model, args.steps, mode, run_dir)
                print(f"round {round_index + 1} {mode}: done", flush=True)
    every, off = (statistics.median(times[mode]) for mode in MODES)
    print(f"\nsingle, {args.model} model, {args.steps} steps, {args.rounds} round(s) each way\n")
    print("| --track-memory | median step (ms) |")
    print("|---|---:|")
    print(f"| every | {every * 1e3:.0f} |")
    print(f"| off | {off * 1e3:.0f} |")
    print(f"\ntracked / untracked: {every / off:.2f}x")


if __name__ == "__main__":
    main()
