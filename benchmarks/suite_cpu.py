"""Which tests spend the suite's CPU: every process's CPU time, sampled while pytest runs,
charged to the test its worker was running.

    python benchmarks/suite_cpu.py sample cpu.json -- pytest --report-log=suite.jsonl
    python benchmarks/suite_cpu.py report cpu.json suite.jsonl       # (pytest-reportlog)

On 2 cores the suite keeps both cores busy nearly all the time, so its wall time follows
the CPU its tests spend, in whichever process they spend it: the test process itself,
rank processes forked from the rank server, CLI subprocesses, Ray's processes, compilers.
``sample`` runs the command and, once a second, reads each process's CPU time (user and
system, ``/proc/PID/stat``) and the test worker it belongs to (``PYTEST_XDIST_WORKER``
in its environment, which every process a worker starts inherits, Ray's nodes started by
a test included). ``report`` charges each second's CPU to the test that worker was
running then (a process of no worker: to the tests running then, shared equally) and
prints Markdown: the cores' busy share, the CPU by kind of process, by test file and by
test. A process's CPU in its last second before it exits, and a process that lives less
than a second, are not seen: compare the sampled total with ``/proc/stat``'s, printed too.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from suite_time import test_phases

TICK = os.sysconf("SC_CLK_TCK")
WORKER_VARIABLE = b"PYTEST_XDIST_WORKER="


def cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the machine since boot, from ``/proc/stat``."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n")[0].split()[1:9]]
    idle = fields[3] + fields[4]  # idle and iowait
    return (sum(fields) - idle) / TICK, sum(fields) / TICK


def read_process(pid: str) -> tuple[str, float, float] | None:
    """(key, CPU seconds, start seconds after boot) of process ``pid``; None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()  # after the command name, which may hold spaces
    start = int(fields[19]) / TICK
    return f"{pid}:{fields[19]}", (int(fields[11]) + int(fields[12])) / TICK, start


def describe(pid: str) -> dict:
    """A new process's command line and test worker (None outside any worker)."""
    try:
        command = (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return {"command": "", "comm": "", "worker": None}
    worker = next(
        (v[len(WORKER_VARIABLE) :].decode() for v in environ if v.startswith(WORKER_VARIABLE)), None
    )
    return {"command": command[:200], "comm": comm, "worker": worker}


def sample(out: Path, command: list[str], every_s: float = 1.0) -> int:
    """Run ``command``, sampling every process's CPU each ``every_s`` seconds; write ``out``."""
    # a process's start time counts whole clock ticks: one started in this tick is new
    began = int(time.clock_gettime(time.CLOCK_BOOTTIME) * TICK) / TICK
    machine_start = cpu_seconds()
    processes: dict[str, dict] = {}
    child = subprocess.Popen(command)
    while True:
        now = time.time()
        for pid in os.listdir("/proc"):
            if not pid.isdigit() or (read := read_process(pid)) is None:
                continue
            key, cpu, start = read
            process = processes.get(key)
            if process is None:
                # CPU spent before sampling began is not the suite's
                base = cpu if start < began else 0.0
                process = processes[key] = {**describe(pid), "cpu": base, "seconds": []}
            if cpu > process["cpu"]:
                process["seconds"].append([round(now, 2), round(cpu - process["cpu"], 2)])
                process["cpu"] = cpu
        if child.poll() is not None:
            break
        time.sleep(every_s)
    machine_end = cpu_seconds()
    busy = machine_end[0] - machine_start[0]
    record = {
        "every_s": every_s,
        "machine_busy_cpu_s": round(busy, 1),
        "machine_cores_busy": round(busy / (machine_end[1] - machine_start[1]), 3),
        "processes": [p for p in processes.values() if p["seconds"]],
    }
    out.write_text(json.dumps(record))
    return child.returncode


def kind(process: dict) -> str:
    """What a process is, from its command line."""
    command, comm = process["command"], process["comm"]
    if "multiprocessing.forkserver" in command:
        return "rank server and ranks"
    if comm.startswith("ray::") or "/ray/" in command or comm in ("raylet", "gcs_server"):
        return "Ray"
    if "sys.stdin.readline" in command or "pytest" in command:
        return "test process"
    if comm in ("cc1plus", "cc1", "as", "ld", "collect2", "ninja", "c++", "g++"):
        return "compiler"
    if "wandb" in command:
        return "W&B"
    if "python" in command:
        return "other Python"
    return "other"


def tests_by_worker(report_log: Path) -> dict[str | None, tuple[list[float], list[tuple]]]:
    """Per worker (None in a one-process session), its test phases sorted by start:
    (starts, [(start, stop, node id)])."""
    phases: dict[str | None, list[tuple]] = collections.defaultdict(list)
    for record in test_phases(report_log):
        phases[record.get("worker_id")].append((record["start"], record["stop"], record["nodeid"]))
    timelines = {}
    for worker, spans in phases.items():
        spans.sort()
        timelines[worker] = ([span[0] for span in spans], spans)
    return timelines


def test_at(timeline: tuple[list[float], list[tuple]], at: float, every_s: float) -> str | None:
    """The node id of the test phase running at ``at`` (sampled CPU is for the ``every_s``
    seconds before ``at``, so a phase that ended within them still counts), or None."""
    starts, spans = timeline
    index = bisect.bisect_right(starts, at) - 1
    if index >= 0 and spans[index][1] >= at - every_s:
        return spans[index][2]
    return None


def charge(
    processes: list[dict], timelines: dict, every_s: float
) -> tuple[collections.Counter, collections.Counter]:
    """CPU seconds by test node id and by (kind, test file), from samples ``every_s`` apart."""
    by_test: collections.Counter[str] = collections.Counter()
    by_kind: collections.Counter[tuple[str, str]] = collections.Counter()
    for process in processes:
        what = kind(process)
        for at, seconds in process["seconds"]:
            if process["worker"] in timelines:
                tests = [test_at(timelines[process["worker"]], at, every_s)]
            else:  # no worker (or a one-process session): the tests running then
                tests = [test_at(timeline, at, every_s) for timeline in timelines.values()]
            tests = [t for t in tests if t] or ["(between tests)"]
            for test in tests:
                by_test[test] += seconds / len(tests)
                by_kind[what, test.split("::")[0]] += seconds / len(tests)
    return by_test, by_kind


def report(samples: Path, report_log: Path, top: int) -> None:
    record = json.loads(samples.read_text())
    by_test, by_kind = charge(record["processes"], tests_by_worker(report_log), record["every_s"])
    total = sum(by_test.values())
    print(
        f"{total:,.0f} CPU seconds sampled, of {record['machine_busy_cpu_s']:,.0f} that "
        f"/proc/stat counts; the cores were {record['machine_cores_busy']:.0%} busy\n"
    )
    kinds: collections.Counter[str] = collections.Counter()
    files: collections.Counter[str] = collections.Counter()
    for (what, file), seconds in by_kind.items():
        kinds[what] += seconds
        files[file] += seconds
    print("| process | CPU s | share |\n|---|---:|---:|")
    for what, seconds in kinds.most_common():
        print(f"| {what} | {seconds:,.0f} | {seconds / total:.1%} |")
    print("\n| file | CPU s | share | most of it in |\n|---|---:|---:|---|")
    for file, seconds in files.most_common(top):
        main = max((s, w) for (w, f), s in by_kind.items() if f == file)[1]
        print(f"| {file} | {seconds:,.0f} | {seconds / total:.1%} | {main} |")
    print(f"\n| the {top} tests that spend the most CPU | CPU s |\n|---|---:|")
    for test, seconds in by_test.most_common(top):
        print(f"| `{test}` | {seconds:,.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("sample", help="run a command (after --), sampling CPU")
    run.add_argument("out", type=Path)
    run.add_argument("argv", nargs=argparse.REMAINDER)
    read = commands.add_parser("report", help="charge sampled CPU to tests")
    read.add_argument("samples", type=Path)
    read.add_argument("report_log", type=Path)
    read.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    if args.command == "sample":
        argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        if not argv:
            parser.error("sample needs a command after --")
        sys.exit(sample(args.out, argv))
    report(args.samples, args.report_log, args.top)


if __name__ == "__main__":
    main()
