"""``--compile``'s CPU speed-up: eager against compiled steady-state step time, in pairs.

    python benchmarks/compile_speedup.py                       # single x1, fsdp x2; small model
    python benchmarks/compile_speedup.py --rounds 3 --steps 20 --cold --out compile.json

Every run is a real ``python -m distlab.launch`` run (the local launcher, no
W&B, one thread per rank), started in this process through
``distlab.launch.runner.run``. Each round runs, for every case (strategy x ranks), an
eager and a compiled run back to back, the order alternating from round to
round (eager first in even rounds), so that a slow phase of a shared machine
falls on both runs of a pair.

Per run, from its ``summary.json``: the steady-state median step time (for a
compiled run, over the steps in which nothing was compiled), ``compile_s``
(dynamo's own accounting of the time spent compiling, slowest rank) and how
many graphs AOTAutograd loaded from its cache or compiled, and the run's wall
time (rank 0, from building the model to the summary). Reported per case:
the median over rounds of each variant's step time, and the speed-up as the
median over rounds of eager / compiled within a round (paired), of the median
steps and of the 20th-percentile steps (the steps least slowed by other jobs). ``--cold``
empties distlab's inductor cache first, so the first compiled run of each case
compiles from scratch (cold) and the later ones load it (warm).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from distlab.config import cache_dir  # noqa: E402
from distlab.launch.runner import run  # noqa: E402
from distlab.run.files import METRICS_FILE, SUMMARY_FILE, read_jsonl  # noqa: E402
from distlab.strategies.regional_compile import INDUCTOR_CACHE  # noqa: E402
from distlab.strategies.resolve import load_config  # noqa: E402

CASES = (("single", 1), ("fsdp", 2))


def one_run(strategy: str, nproc: int, compiled: bool, args, workdir: Path) -> dict[str, Any]:
    """Run one case eager or compiled; return the figures of its summary.json."""
    name = f"{strategy}-n{nproc}-{'compiled' if compiled else 'eager'}"
    run_dir = workdir / name
    shutil.rmtree(run_dir, ignore_errors=True)
    config = load_config(
        None,
        {
            "strategy": strategy,
            "nproc": nproc,
            "model": args.model,
            "global_batch": args.global_batch,
            "steps": args.steps,
            "compile": compiled,
            "launcher": "local",
            "wandb": False,
            "quiet": True,
            "run_dir": str(run_dir),
        },
    )
    summary = json.loads((run(config) / SUMMARY_FILE).read_text())
    steady = sorted(
        m["step_time_s"] for m in read_jsonl(run_dir / METRICS_FILE) if not m.get("compile_s")
    )
    return {
        "median_step_s": summary["median_step_time_s"],
        "p20_step_s": steady[len(steady) // 5],
        "tokens_per_s": summary["tokens_per_s"],
        "compile_s": summary.get("compile_s"),
        "compile_cache": summary.get("compile_cache"),
        "steady_state_steps": summary.get("steady_state_steps", summary["steps_run"]),
        "wall_time_s": summary["wall_time_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20, help="steps per run")
    parser.add_argument("--rounds", type=int, default=3, help="eager/compiled pairs per case")
    parser.add_argument("--cold", action="store_true", help="empty the inductor cache first")
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args()
    if args.cold:
        shutil.rmtree(cache_dir() / INDUCTOR_CACHE, ignore_errors=True)
    runs: dict[str, list[dict[str, dict[str, Any]]]] = {}
    with tempfile.TemporaryDirectory(prefix="distlab-compile-") as tmp:
        for r in range(args.rounds):
            for strategy, nproc in CASES:
                pair = {}
                for compiled in (False, True) if r % 2 == 0 else (True, False):
                    variant = "compiled" if compiled else "eager"
                    pair[variant] = one_run(strategy, nproc, compiled, args, Path(tmp))
                runs.setdefault(f"{strategy} x{nproc}", []).append(pair)
    print(
        f"{args.model} model, global batch {args.global_batch}, {args.steps} steps per run, "
        f"{args.rounds} eager/compiled pairs per case (order alternating)"
    )
    print(
        f"{'case':10s} {'eager ms':>9s} {'compiled ms':>12s} {'speed-up':>9s} {'(p20)':>6s}  "
        "compile_s per compiled run (cache hits/misses; run wall time)"
    )
    report: dict[str, Any] = {"settings": vars(args) | {"out": str(args.out)}, "cases": {}}
    for case, pairs in runs.items():
        eager = statistics.median(p["eager"]["median_step_s"] for p in pairs)
        compiled = statistics.median(p["compiled"]["median_step_s"] for p in pairs)
        speedup, speedup_p20 = (
            statistics.median(p["eager"][key] / p["compiled"][key] for p in pairs)
            for key in ("median_step_s", "p20_step_s")
        )
        compiles = ", ".join(
            f"{p['compiled']['compile_s']:.1f} s ({p['compiled']['compile_cache']['hits']}/"
            f"{p['compiled']['compile_cache']['misses']}; run {p['compiled']['wall_time_s']:.0f} s)"
            for p in pairs
        )
        print(
            f"{case:10s} {eager * 1e3:9.1f} {compiled * 1e3:12.1f} {speedup:8.2f}x "
            f"{speedup_p20:5.2f}x  {compiles}"
        )
        report["cases"][case] = {
            "eager_median_step_s": eager,
            "compiled_median_step_s": compiled,
            "speedup_paired": speedup,
            "speedup_paired_p20": speedup_p20,
            "runs": pairs,
        }
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
