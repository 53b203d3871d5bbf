"""Live recovery (``--ft live``) against the uninterrupted run: loss, bound, time lost.

    python benchmarks/live_recovery.py                  # SGD and AdamW, 20 steps, 1@3
    python benchmarks/live_recovery.py --steps 20 --fault 1@5 --rejoin-after 4

Per optimizer, three runs of ``ddp`` at 2 ranks on the tiny model (one after another,
in this process: ranks of a run are processes of their own):

- ``restart``: ``--ft restart`` without a fault (the lab's ddp);
- ``live``: ``--ft live`` without a fault (the reference: its per-replica losses give
  the bound's spread);
- ``fault``: ``--ft live`` with ``--inject-fault`` and ``--rejoin-after``: replica 1
  is killed, replica 0 steps on alone, replica 1 is restarted, heals, rejoins.

Prints, per optimizer, each step's replicas, the two losses, their difference and the
bound (``distlab.report.live_recovery``; SGD only), then the final-step difference,
the live-vs-restart parity, replica 0's time lost around the fault and whether any of
its steps was run twice.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from distlab.cli import run_cli
from distlab.launch.__main__ import main as launch_main
from distlab.report.live_recovery import loss_bound, survivor_time_lost
from distlab.run.files import METRICS_FILE, RANKS_DIR, read_jsonl


def launch(run_dir: Path, optimizer: str, steps: int, *extra: str) -> list[dict]:
    """One ddp x2 run of the tiny model; its ``metrics.jsonl`` lines."""
    args = [
        "--launcher", "local", "--strategy", "ddp", "--nproc", "2", "--model", "tiny",
        "--global-batch", "8", "--steps", str(steps), "--optimizer", optimizer,
        "--track-memory", "off", "--no-wandb", "--quiet", "--no-pictures",
        "--no-final-checkpoint", "--run-dir", str(run_dir), *extra,
    ]  # fmt: skip
    launch_main(args)
    return read_jsonl(run_dir / METRICS_FILE)


def compare(root: Path, optimizer: str, args: argparse.Namespace) -> None:
    """The three runs of one optimizer, and the table."""
    restart = launch(root / f"{optimizer}-restart", optimizer, args.steps)
    live = launch(root / f"{optimizer}-live", optimizer, args.steps, "--ft", "live")
    fault_dir = root / f"{optimizer}-fault"
    fault = launch(
        fault_dir, optimizer, args.steps, "--ft", "live", "--inject-fault", args.fault,
        "--max-failures", "1", "--rejoin-after", str(args.rejoin_after),
    )  # fmt: skip
    bounds = loss_bound(fault, live, 2, 1.0) if optimizer == "sgd" else None
    print(f"\n## {optimizer}: --inject-fault {args.fault} --rejoin-after {args.rejoin_after}\n")
    print("| step | replicas | uninterrupted | live, fault | difference | bound |")
    print("|---:|---:|---:|---:|---:|---:|")
    for i, (ref, got) in enumerate(zip(live, fault, strict=True)):
        bound = f"{bounds[i]:.4f}" if bounds else "-"
        print(
            f"| {got['step']} | {got['replicas']} | {ref['loss']:.4f} | {got['loss']:.4f} "
            f"| {got['loss'] - ref['loss']:+.4f} | {bound} |"
        )
    pairs = zip(live, restart, strict=True)
    parity = max(abs(a["loss"] - b["loss"]) / abs(b["loss"]) for a, b in pairs)
    lost = survivor_time_lost(fault)
    attempts = [line["step"] for line in read_jsonl(fault_dir / RANKS_DIR / "rank0.jsonl")]
    events = read_jsonl(fault_dir / "events.jsonl")
    heals = [e for e in events if e["event"] == "heal"]
    print(f"\nfinal-step difference: {fault[-1]['loss'] - live[-1]['loss']:+.4f}")
    print(f"live vs restart (no fault), largest relative loss difference: {parity:.2e}")
    print(
        f"replica 0's time lost: {lost['lost_s']:.3f} s (median step {lost['median_step_s']:.3f} "
        f"s; per step past the median: {json.dumps(lost['steps'])})"
    )
    print(f"replica 0 ran steps {attempts} (each once: {len(set(attempts)) == len(attempts)})")
    healed = [(e["rank"], e["from_step"], e["step"], round(e["heal_s"], 3)) for e in heals]
    print(f"heals (replica, from step, to step, seconds): {healed}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--fault", default="1@3", help="--inject-fault of the fault run")
    parser.add_argument("--rejoin-after", type=int, default=3)
    parser.add_argument("--out", help="keep the run dirs under this directory")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="distlab-live-") as scratch:
        root = Path(args.out or scratch)
        for optimizer in ("sgd", "adamw"):
            compare(root, optimizer, args)
    return 0


if __name__ == "__main__":
    run_cli(main)
