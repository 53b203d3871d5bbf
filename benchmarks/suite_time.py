"""Where the test suite's time goes: per test and file, and inside the runs the tests make.

    pytest --report-log=suite.jsonl --basetemp=/tmp/suite        # (pytest-reportlog)
    python benchmarks/suite_time.py suite.jsonl --runs /tmp/suite

Reads a pytest report log (one JSON line per test phase, ``pytest-reportlog``) and
prints Markdown: the totals, the time by test file, and the slowest tests. With
``--runs`` it also reads every run dir the suite left under its base temp dir
(``events.jsonl``, ``metrics.jsonl``) and splits the runs' wall time, from the
launcher's ``launch`` event to the ``finish`` event, into

- rank start-up: ``launch`` to rank 0's ``start`` (rank processes and their imports,
  the process group, the model, the strategy's ``prepare``), per attempt;
- training steps: the sum of the steps' ``step_time_s`` (memory-tracked steps included);
- the rest of the run: checkpoints, the summary, the memory picture, restarts' waits.

What a test spends outside its runs (this process's imports, the CLI subprocesses'
imports, Ray's start-up, compiling, tokenising) is the test time left over.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path


def test_phases(report_log: Path) -> list[dict]:
    """The log's test reports: one per test and phase (setup, call, teardown)."""
    records = [json.loads(line) for line in report_log.read_text().splitlines()]
    return [record for record in records if record.get("$report_type") == "TestReport"]


def durations(phases: list[dict]) -> tuple[dict[str, float], set[str], float]:
    """Seconds per test node id (setup, call and teardown together), the ids marked
    ``slow``, and the wall-clock seconds from the first test's start to the last's end."""
    seconds: dict[str, float] = collections.defaultdict(float)
    slow: set[str] = set()
    first, last = float("inf"), 0.0
    for record in phases:
        seconds[record["nodeid"]] += record["duration"]
        first, last = min(first, record["start"]), max(last, record["stop"])
        if "slow" in record["keywords"]:
            slow.add(record["nodeid"])
    return dict(seconds), slow, max(0.0, last - first)


def alone_overlaps(phases: list[dict]) -> tuple[int, list[str]]:
    """How many tests are marked ``alone``, and each other worker's test that ran while one of
    them did (their set-up to tear-down): none, if the workers took turns as they should."""
    spans: dict[str, list[float]] = {}
    for record in phases:
        if "alone" in record["keywords"]:
            span = spans.setdefault(record["nodeid"], [record["start"], record["stop"]])
            span[0], span[1] = min(span[0], record["start"]), max(span[1], record["stop"])
    overlapping = {
        f"{record['nodeid']} during {node}"
        for node, (start, stop) in spans.items()
        for record in phases
        if record["nodeid"] != node and record["start"] < stop and record["stop"] > start
    }
    return len(spans), sorted(overlapping)


def run_split(root: Path) -> dict[str, float]:
    """Summed seconds of every run dir under ``root``: start-up, steps, the rest; and counts."""
    totals: collections.Counter[str] = collections.Counter()
    # pytest links <name>current to the newest <name>N: count each run dir once
    for events_file in sorted({p.resolve() for p in root.rglob("events.jsonl")}):
        events = [json.loads(line) for line in events_file.read_text().splitlines() if line]
        launch = next((e["t"] for e in events if e["event"] == "launch"), None)
        finish = next((e["t"] for e in events if e["event"] == "finish"), None)
        if launch is None or finish is None:
            continue
        starts = [e["t"] for e in events if e["event"] == "start"]
        metrics_file = events_file.parent / "metrics.jsonl"
        steps = 0.0
        if metrics_file.is_file():
            lines = metrics_file.read_text().splitlines()
            steps = sum(json.loads(line)["step_time_s"] for line in lines if line)
        startup = starts[0] - launch if starts else 0.0
        totals["runs"] += 1
        totals["wall"] += finish - launch
        totals["startup"] += startup
        totals["steps"] += steps
        totals["rest"] += max(0.0, finish - launch - startup - steps)
    return dict(totals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report_log", type=Path)
    parser.add_argument("--runs", type=Path, help="the suite's pytest --basetemp dir")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    phases = test_phases(args.report_log)
    seconds, slow, wall = durations(phases)
    total = sum(seconds.values())
    print(f"{len(seconds)} tests, {total / 60:.1f} minutes of test time, {wall / 60:.1f} wall\n")
    slow_seconds = sum(seconds[node] for node in slow)
    print(f"- marked slow: {len(slow)} tests, {slow_seconds / 60:.1f} minutes")
    print(
        f'- the rest (`-m "not slow"`): {len(seconds) - len(slow)} tests, '
        f"{(total - slow_seconds) / 60:.1f} minutes (here; alone they also make the runs "
        "that slow tests made for them)"
    )
    alone, overlapping = alone_overlaps(phases)
    print(f"- marked alone: {alone} tests; other tests that ran beside them: {len(overlapping)}")
    for line in overlapping:
        print(f"  - {line}")
    print()
    by_file: dict[str, list[float]] = collections.defaultdict(list)
    for node, value in seconds.items():
        by_file[node.split("::")[0]].append(value)
    print("| file | tests | seconds | share |")
    print("|---|---:|---:|---:|")
    for file, values in sorted(by_file.items(), key=lambda item: -sum(item[1])):
        print(f"| {file} | {len(values)} | {sum(values):,.0f} | {sum(values) / total:.1%} |")
    print(f"\n| the {args.top} slowest tests | seconds |")
    print("|---|---:|")
    for node, value in sorted(seconds.items(), key=lambda item: -item[1])[: args.top]:
        print(f"| `{node}` | {value:.1f} |")
    if args.runs:
        split = run_split(args.runs)
        runs = split.get("runs", 0)
        print(f"\n{runs} runs under {args.runs}: launch to finish {split.get('wall', 0):,.0f} s\n")
        print("| inside the runs | seconds | per run |")
        print("|---|---:|---:|")
        for key, label in (
            ("startup", "rank start-up (processes, imports, process group, model, prepare)"),
            ("steps", "training steps (memory-tracked ones included)"),
            ("rest", "the rest (checkpoints, summary, picture, restarts)"),
        ):
            value = split.get(key, 0.0)
            print(f"| {label} | {value:,.0f} | {value / max(runs, 1):.1f} |")
        outside = total - split.get("wall", 0.0)
        print(f"| outside the runs (imports, CLI subprocesses, Ray, compiles) | {outside:,.0f} | |")


if __name__ == "__main__":
    main()
