"""Soak test of fault tolerance: random strategy, world size, victim, step, fault and launcher.

    python benchmarks/soak.py --trials 32                      # writes docs/fault_tolerance.md
    python benchmarks/soak.py --trials 4 --launchers local --no-docs
    python benchmarks/soak.py --trials 50 --modes restart,elastic,live   # the recovery modes

Each trial draws, from its own seeded generator (``--seed``, trial index):

- a registered strategy (each once per round of 13 trials, in a shuffled
  order) and a world size it accepts (single x1; data-parallel strategies, tp
  and pp x2 or x4; the 2D compositions x4);
- a launcher (``local`` and ``ray`` alternate, so both get as many trials);
- a victim rank and a step;
- a fault kind: ``sigkill`` (SIGKILL of the victim's process from outside,
  once the run has recorded that many steps), ``sigstop`` (SIGSTOP from
  outside: a hang, which the collective timeout or the step watchdog turns
  into a failure after ``--timeout-s``), ``save-kill`` (the victim is killed
  while it writes a checkpoint: ``--inject-fault RANK@STEP:save``) or
  ``raise`` (an exception inside the training step:
  ``--inject-fault RANK@STEP:raise``).

The run trains the tiny model for ``STEPS`` steps with a checkpoint every
``CHECKPOINT_EVERY`` and ``--max-failures 1``. A trial passes when the run
finishes, its per-step losses equal those of an uninterrupted run of the same
strategy and world size within 1e-6 (made once per shape, local launcher: the
losses do not depend on the launcher), it redid at most ``CHECKPOINT_EVERY``
steps (``summary.json``'s ``lost_steps``), and no staging (``.tmp-*``) or trash
(``.trash-*``) directory is left in its checkpoints.

With ``--modes``, trials rotate over the recovery modes, each on what it can meet,
on a 2-node cluster (2 CPUs each) this script starts with ``distlab cluster up``:

- ``restart``: the draws above, plus ``node`` (``--inject-fault node:1@STEP``: node 1
  dies with its ranks) for 4-rank data-parallel shapes on Ray; criterion as above;
- ``elastic``: ddp or fsdp at 4 ranks with ``--elastic 2``, a node loss; losses within
  the parity tolerance (1e-5 relative: at 2 ranks the gradient sums add in another order),
  at most ``2 x CHECKPOINT_EVERY`` steps redone (the shrink, and the grow when the node
  is back);
- ``live``: ddp at 2 or 4 replicas with ``--ft live`` and SGD, rank kill or hang of any
  replica, or at 4 replicas on the cluster a node loss (replicas 2 and 3 die). Another
  than replica 0: replica 0 never applies a step twice (a step whose all-reduce a dying
  replica broke is run again: at most one attempt per fault), the survivors' next step
  comes within 2 s of a kill or a node loss, and every loss stays within the bound of
  ``distlab.report.live_recovery`` (plus the parity tolerance) against an uninterrupted
  live run. Replica 0 (whose loss restarts every replica from
  the newest checkpoint): the restart criterion, against the same run.

A node-loss trial also fails when the attempt the fault met held no rank on the lost
node (its ``start`` event records each rank's node): it measured no recovery.

Recovery time is measured from the fault to the end of the first resumed step
(the ``resume`` event rank 0 writes): for an outside signal from the moment
this script sent it, for an injected fault from the victim's ``fault`` event.
The script prints one line per trial, then N/N and the median and worst
recovery per launcher, and (unless ``--no-docs``) writes the table into
docs/fault_tolerance.md between the ``soak`` markers.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from distlab.report.markdown import fill_marked_section
from distlab.run.files import read_pid

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "fault_tolerance.md"
STEPS = 12
CHECKPOINT_EVERY = 3
TIMEOUT_S = 8
LOSS_ATOL = 1e-6
LIVE_RECOVERY_S = 2.0
"""Live mode's goal: the survivors' next step within this of a replica's death (not of a
hang, which the collective timeout or the watchdog must first detect)."""
FAULT_KINDS = ("sigkill", "sigstop", "save-kill", "raise")
MODE_KINDS = {
    "restart": (*FAULT_KINDS, "node"),
    "elastic": ("node",),
    "live": ("sigkill", "sigstop", "node"),
}
"""What each recovery mode meets in a ``--modes`` soak."""
NODE_SHAPES = {"ddp": 4, "fsdp": 4, "zero2": 4, "hsdp": 4}
"""Shapes a node loss takes in restart mode: 2 ranks on each of the cluster's 2 nodes."""
MODE_FLAGS = {
    "restart": [],
    "elastic": ["--elastic", "2", "--global-batch", "12"],
    "live": ["--ft", "live", "--optimizer", "sgd"],
}
"""Each mode's flags (elastic: 12 rows, whole at 4, 3 and 2 ranks)."""
REFERENCE_FLAGS = {**MODE_FLAGS, "elastic": ["--global-batch", "12"]}
"""The uninterrupted runs' flags (local launcher): an elastic run's reference has 4 ranks."""
REVIVE_S = 10
SHAPES = {
    "single": [1],
    "ddp": [2, 4],
    "fsdp": [2, 4],
    "zero1": [2],
    "zero2": [2, 4],
    "zero3": [2, 4],
    "fairscale-oss": [2],
    "fairscale-sdp": [2, 4],
    "tp": [2, 4],
    "pp": [2, 4],
    "fsdp+tp": [4],
    "ddp+pp": [4],
    "fsdp+pp": [4],
}
"""Strategy -> the world sizes a trial may draw (at most 4 ranks: this is a 2-core machine)."""
DEGREES = {"fsdp+tp": ["--tp", "2"], "ddp+pp": ["--pp", "2"], "fsdp+pp": ["--pp", "2"]}
COMMON = [
    "--model", "tiny", "--global-batch", "8", "--steps", str(STEPS),
    "--checkpoint-every", str(CHECKPOINT_EVERY), "--keep-checkpoints", "2",
    "--timeout-s", str(TIMEOUT_S), "--no-wandb", "--quiet",
]  # fmt: skip


@dataclass
class Trial:
    """One drawn trial and what came of it."""

    index: int
    strategy: str
    nproc: int
    launcher: str
    kind: str
    victim: int
    step: int
    passed: bool = False
    recovery_s: float | None = None
    lost_steps: int | None = None
    max_loss_diff: float | None = None
    wall_s: float = 0.0
    reason: str = ""
    mode: str = "restart"


def draw_mode(index: int, seed: int, modes: list[str]) -> Trial:
    """Trial ``index`` of a ``--modes`` soak: the modes in turn, each on a fault it can meet."""
    mode = modes[index % len(modes)]
    rng = random.Random(f"{seed}-mode-{index}")
    kind = rng.choice(MODE_KINDS[mode])
    if mode == "live" and kind == "node":  # replicas 2 and 3 run on node 1 (Ray)
        trial = Trial(index, "ddp", 4, "ray", kind, 1, 0, mode=mode)
    elif mode == "live":
        nproc = rng.choice([2, 4])
        trial = Trial(index, "ddp", nproc, "local", kind, rng.randrange(nproc), 0, mode=mode)
    elif kind == "node":
        strategy = rng.choice(["ddp", "fsdp"] if mode == "elastic" else sorted(NODE_SHAPES))
        trial = Trial(index, strategy, 4, "ray", kind, 1, 0, mode=mode)
    else:  # a rank fault in restart mode: the draw of a soak without modes
        return draw(index, seed, ["local", "ray"])
    trial.step = rng.randrange(1, STEPS - 1)
    return trial


def draw(index: int, seed: int, launchers: list[str]) -> Trial:
    """Trial ``index``: its strategy, world size, victim, step and fault, from its own seed."""
    order = sorted(SHAPES)
    random.Random(f"{seed}-round-{index // len(order)}").shuffle(order)
    strategy = order[index % len(order)]  # every strategy once per round of len(SHAPES) trials
    rng = random.Random(f"{seed}-{index}")
    nproc = rng.choice(SHAPES[strategy])
    kind = rng.choice(FAULT_KINDS)
    if kind == "save-kill":
        step = rng.choice(range(CHECKPOINT_EVERY, STEPS, CHECKPOINT_EVERY))
    else:
        step = rng.randrange(1, STEPS - 1)
    launcher = launchers[index % len(launchers)]
    return Trial(index, strategy, nproc, launcher, kind, rng.randrange(nproc), step)


def shape_args(strategy: str, nproc: int) -> list[str]:
    """The flags that pick a strategy at a world size."""
    return ["--strategy", strategy, "--nproc", str(nproc), *DEGREES.get(strategy, [])]


def launch(args: list[str]) -> subprocess.Popen:
    """Start ``python -m distlab.launch`` with ``args`` (output captured)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}
    return subprocess.Popen(
        [sys.executable, "-m", "distlab.launch", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def losses(run_dir: Path) -> list[float]:
    """Per-step losses of a finished run, checking there is exactly one line per step."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    if [r["step"] for r in rows] != list(range(len(rows))):
        raise ValueError("metrics.jsonl does not hold one line per step")
    return [r["loss"] for r in rows]


def reference(strategy: str, nproc: int, workdir: Path, mode: str = "restart") -> list[dict]:
    """The metrics lines of an uninterrupted run of this shape and mode (made once, reused)."""
    run_dir = workdir / "reference" / f"{strategy}-n{nproc}-{mode}"
    if not (run_dir / "summary.json").is_file():
        shape = [*shape_args(strategy, nproc), *REFERENCE_FLAGS[mode]]
        process = launch([*COMMON, *shape, "--launcher", "local", "--run-dir", str(run_dir)])
        _, err = process.communicate(timeout=900)
        if process.returncode != 0:
            raise RuntimeError(f"reference {strategy} x{nproc} failed: {err.strip()[-300:]}")
    losses(run_dir)  # one line per step
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def recorded_steps(run_dir: Path) -> int:
    """How many lines metrics.jsonl has right now."""
    try:
        return len((run_dir / "metrics.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def events(run_dir: Path) -> list[dict]:
    """The run's events.jsonl."""
    file = run_dir / "events.jsonl"
    lines = file.read_text().splitlines() if file.is_file() else []
    return [json.loads(line) for line in lines if line.strip()]


def signal_when_due(
    run_dir: Path, process: subprocess.Popen, rank: int, step: int, signum: int
) -> float | None:
    """Wait until the run has recorded ``step`` steps, send ``signum`` to ``rank``; return when
    (None if the run ended first)."""
    while process.poll() is None:
        if recorded_steps(run_dir) >= step and (pid := read_pid(run_dir, rank)) is not None:
            sent = time.time()
            os.kill(pid, signum)
            return sent
        time.sleep(0.05)
    return None


def signal_victim(trial: Trial, run_dir: Path, process: subprocess.Popen) -> float | None:
    """The trial's outside fault: SIGKILL or SIGSTOP of its victim at its step."""
    signum = signal.SIGKILL if trial.kind == "sigkill" else signal.SIGSTOP
    return signal_when_due(run_dir, process, trial.victim, trial.step, signum)


def release_victim(trial: Trial, run_dir: Path) -> None:
    """Kill a stopped victim the launcher left behind (it must not outlive its trial)."""
    if trial.kind == "sigstop" and (pid := read_pid(run_dir, trial.victim)) is not None:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_trial(trial: Trial, workdir: Path, address: str | None = None) -> Trial:
    """Run one trial to the end and judge it by its mode's criterion."""
    expected = reference(trial.strategy, trial.nproc, workdir, trial.mode)
    run_dir = workdir / "trials" / f"{trial.index:03d}-{trial.mode}-{trial.strategy}-n{trial.nproc}"
    args = [*COMMON, *shape_args(trial.strategy, trial.nproc), *MODE_FLAGS[trial.mode]]
    # each lost replica's restart counts: a node loss under live restarts two
    restarts = 2 if (trial.mode, trial.kind) == ("live", "node") else 1
    args += ["--launcher", trial.launcher, "--max-failures", str(restarts)]
    args += ["--run-dir", str(run_dir)]
    if trial.launcher == "ray" and address:
        args += ["--ray-address", address]
    if trial.kind == "save-kill":
        args += ["--inject-fault", f"{trial.victim}@{trial.step}:save"]
    elif trial.kind == "raise":
        args += ["--inject-fault", f"{trial.victim}@{trial.step}:raise"]
    elif trial.kind == "node":
        args += ["--inject-fault", f"node:{trial.victim}@{trial.step}"]
    started = time.time()
    process = launch(args)
    fault_at = None
    if trial.kind in ("sigkill", "sigstop"):
        fault_at = signal_victim(trial, run_dir, process)
    try:
        _, err = process.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        process.kill()
        _, err = process.communicate()
    finally:
        release_victim(trial, run_dir)
    trial.wall_s = time.time() - started
    if process.returncode != 0:
        trial.reason = (err.strip().splitlines() or ["exit status"])[-1][:200]
        return trial
    if fault_at is None:
        fault_at = next((e["t"] for e in events(run_dir) if e["event"] == "fault"), None)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    after = [r["time"] for r in rows if fault_at is not None and r["time"] > fault_at]
    if fault_at is None or not after:
        trial.reason = "no fault, or no step after it, recorded (did the fault fire?)"
        return trial
    trial.recovery_s = min(after) - fault_at  # the end of the next step the run recorded
    trial.lost_steps = json.loads((run_dir / "summary.json").read_text())["lost_steps"]
    try:
        got = losses(run_dir)
    except ValueError as exc:  # a step recorded twice or not at all
        trial.reason = str(exc)
        return trial
    if len(got) != len(expected):
        trial.reason = f"{len(got)} steps recorded, {len(expected)} expected"
        return trial
    trial.max_loss_diff = max(abs(a - b["loss"]) for a, b in zip(got, expected, strict=True))
    trial.reason = judge(trial, run_dir, rows, expected)
    trial.passed = not trial.reason
    return trial


def judge(trial: Trial, run_dir: Path, rows: list[dict], expected: list[dict]) -> str:
    """Why the finished trial fails its mode's criterion ("" if it passes)."""
    leftovers = [p.name for p in (run_dir / "checkpoints").glob(".*")]
    if trial.kind == "node" and held_no_rank_on(run_dir, trial.victim):
        return f"no rank ran on node {trial.victim} when it was lost: nothing was recovered"
    if trial.mode == "live" and trial.victim != 0:  # replica 0's loss is a restart
        from distlab.report.live_recovery import loss_bound
        from distlab.report.parity import LOSS_RTOL

        # A replica killed inside a step fails that step's all-reduce: the survivors run it
        # again (never an applied one twice); at most that one attempt per fault.
        attempts = [json.loads(x)["step"] for x in (run_dir / "ranks" / "rank0.jsonl").open()]
        retries = [e for e in events(run_dir) if e["event"] == "step_retry" and e["rank"] == 0]
        if sorted(set(attempts)) != list(range(STEPS)) or len(attempts) - STEPS != len(retries):
            return "replica 0 ran a step twice that was not retried"
        if len(retries) > 1:
            return f"replica 0 retried {len(retries)} steps for one fault"
        if trial.kind != "sigstop" and trial.recovery_s > LIVE_RECOVERY_S:
            return f"the survivors stepped {trial.recovery_s:.1f} s after the fault"
        bounds = loss_bound(rows, expected, trial.nproc, grad_clip=1.0)
        for row, want, bound in zip(rows, expected, bounds, strict=True):
            if abs(row["loss"] - want["loss"]) > bound + LOSS_RTOL * abs(want["loss"]):
                return f"step {row['step']} off by more than its bound {bound:.2e}"
        return ""
    if trial.mode == "elastic":
        from distlab.report.parity import LOSS_RTOL

        pairs = zip(rows, expected, strict=True)
        worst = max(abs(r["loss"] - e["loss"]) / abs(e["loss"]) for r, e in pairs)
        redone_allowed = 2 * CHECKPOINT_EVERY
        if worst > LOSS_RTOL:
            return f"losses differ by {worst:.2e} (relative)"
    else:
        redone_allowed = CHECKPOINT_EVERY
        if trial.max_loss_diff > LOSS_ATOL:
            return f"losses differ by {trial.max_loss_diff:.2e}"
    if trial.lost_steps > redone_allowed:
        return f"{trial.lost_steps} steps redone (at most {redone_allowed})"
    if leftovers:
        return f"left behind: {', '.join(leftovers)}"
    return ""


def held_no_rank_on(run_dir: Path, node: int) -> bool:
    """Whether the attempt that met the node fault had no rank on ``node`` (so the trial
    measured no recovery: an elastic run can start short of ranks). Runs whose start
    events do not record nodes (live replicas) are not judged here."""
    log = events(run_dir)
    fault_at = next((e["t"] for e in log if e["event"] == "fault" and e.get("kind") == "node"), 0)
    starts = [e for e in log if e["event"] == "start" and e["t"] < fault_at and e.get("nodes")]
    return bool(starts) and node not in starts[-1]["nodes"]


def describe(trial: Trial) -> str:
    """One line for the progress display."""
    verdict = "pass" if trial.passed else f"FAIL ({trial.reason})"
    recovery = f"{trial.recovery_s:5.1f} s" if trial.recovery_s is not None else "    -  "
    return (
        f"{trial.index + 1:3d}  {trial.mode:7s} {trial.launcher:5s} {trial.strategy:13s} "
        f"x{trial.nproc}  "
        f"{trial.kind:9s} rank {trial.victim} step {trial.step:2d}  recovery {recovery}  "
        f"redone {trial.lost_steps if trial.lost_steps is not None else '-'}  {verdict}"
    )


def figures(trials: list[Trial], launcher: str) -> tuple[int, int, float | None, float | None]:
    """(passed, count, median recovery, worst recovery) of one launcher's trials."""
    mine = [t for t in trials if t.launcher == launcher]
    times = [t.recovery_s for t in mine if t.passed and t.recovery_s is not None]
    median = statistics.median(times) if times else None
    return sum(t.passed for t in mine), len(mine), median, max(times) if times else None


def report(trials: list[Trial], launchers: list[str], seed: int, modes: list[str]) -> str:
    """The Markdown section written into docs/fault_tolerance.md."""
    passed = sum(t.passed for t in trials)
    command = f"--trials {len(trials)} --seed {seed}"
    command += f" --modes {','.join(modes)}" if modes else ""
    lines = [
        f"`python benchmarks/soak.py {command}`: "
        f"**{passed}/{len(trials)} trials passed** (tiny model, {STEPS} steps, a checkpoint "
        f"every {CHECKPOINT_EVERY}, `--timeout-s {TIMEOUT_S}`, `--max-failures 1`).",
        "",
        "| launcher | trials passed | recovery median | recovery worst |",
        "|---|---|---|---|",
    ]
    for launcher in launchers:
        ok, count, median, worst = figures(trials, launcher)
        fmt = lambda s: f"{s:.1f} s" if s is not None else "-"  # noqa: E731
        lines.append(f"| {launcher} | {ok}/{count} | {fmt(median)} | {fmt(worst)} |")
    if modes:
        lines += ["", "| mode | trials passed | recovery median | recovery worst |"]
        lines += ["|---|---|---|---|"]
        for mode in modes:
            mine = [t for t in trials if t.mode == mode]
            times = [t.recovery_s for t in mine if t.passed and t.recovery_s is not None]
            median = f"{statistics.median(times):.1f} s" if times else "-"
            worst = f"{max(times):.1f} s" if times else "-"
            passed_here = sum(t.passed for t in mine)
            lines.append(f"| {mode} | {passed_here}/{len(mine)} | {median} | {worst} |")
    kinds = list(dict.fromkeys([*FAULT_KINDS, *(t.kind for t in trials)]))
    by_kind = {kind: [t for t in trials if t.kind == kind] for kind in kinds}
    lines += ["", "| fault | trials | recovery median |", "|---|---|---|"]
    for kind, mine in by_kind.items():
        times = [t.recovery_s for t in mine if t.recovery_s is not None]
        median = f"{statistics.median(times):.1f} s" if times else "-"
        lines.append(f"| {kind} | {sum(t.passed for t in mine)}/{len(mine)} | {median} |")
    lines += [
        "",
        "| # | mode | launcher | strategy | ranks | fault | victim | step | recovery | redone "
        "| result |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in trials:
        recovery = f"{t.recovery_s:.1f} s" if t.recovery_s is not None else "-"
        result = "pass" if t.passed else f"FAIL: {t.reason}"
        lines.append(
            f"| {t.index + 1} | {t.mode} | {t.launcher} | {t.strategy} | {t.nproc} | {t.kind} "
            f"| {t.victim} | {t.step} | {recovery} | {t.lost_steps} | {result} |"
        )
    return "\n".join(lines)


def cluster(action: str, state_dir: Path, revive_s: float = REVIVE_S) -> str:
    """``distlab cluster ACTION`` on the soak's own 2-node cluster; its last output line."""
    flags = ["--state-dir", str(state_dir)]
    if action == "up":
        flags += ["--nodes", "2", "--cpus-per-node", "2", "--revive-after", str(revive_s)]
    result = subprocess.run(
        [sys.executable, "-m", "distlab.launch.cluster", action, *flags],
        capture_output=True,
        text=True,
        check=True,
    )
    return (result.stdout.strip().splitlines() or [""])[-1]


def wait_for_nodes(state_dir: Path, timeout_s: float = 120) -> None:
    """Wait until every node of the cluster is up (a node lost by the last run is back)."""
    from distlab.launch.cluster import alive, read_state

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = read_state(state_dir)
        if state is not None and all(alive(node.pid) for node in state.nodes):
            return
        time.sleep(0.5)
    raise RuntimeError(f"the cluster in {state_dir} did not get all its nodes back")


def main() -> int:
    """Run the trials; exit 0 when all pass."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--launchers", default="local,ray", help="comma-separated")
    parser.add_argument("--modes", help="comma-separated recovery modes: restart,elastic,live")
    parser.add_argument("--first", type=int, default=0, help="skip the trials before this index")
    parser.add_argument("--workdir", help="keep the runs here (default: a temporary dir)")
    parser.add_argument("--json", help="also write every trial to this JSON file")
    parser.add_argument("--no-docs", action="store_true", help="do not touch the docs")
    args = parser.parse_args()
    modes = args.modes.split(",") if args.modes else []
    launchers = ["local", "ray"] if modes else args.launchers.split(",")
    indexes = range(args.first, args.trials)  # a soak stopped early goes on where it stopped
    if modes:
        trials = [draw_mode(i, args.seed, modes) for i in indexes]
    else:
        trials = [draw(i, args.seed, launchers) for i in indexes]
    with tempfile.TemporaryDirectory(prefix="distlab-soak-") as tmp:
        workdir = Path(args.workdir or tmp)
        address = cluster("up", workdir / "cluster") if modes else None
        try:
            for trial in trials:
                if address:
                    wait_for_nodes(workdir / "cluster")
                print(describe(run_trial(trial, workdir, address)), flush=True)
        finally:
            if address:
                cluster("down", workdir / "cluster")
    section = report(trials, launchers, args.seed, modes)
    passed = sum(t.passed for t in trials)
    print(f"\n{passed}/{len(trials)} trials passed")
    for launcher in launchers:
        ok, count, median, worst = figures(trials, launcher)
        if median is not None:
            print(f"{launcher}: {ok}/{count}, recovery median {median:.1f} s, worst {worst:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(t) for t in trials], indent=2))
    if not args.no_docs:
        fill_marked_section(DOCS, "soak-modes" if modes else "soak", section)
    return 0 if passed == len(trials) else 1


if __name__ == "__main__":
    sys.exit(main())
