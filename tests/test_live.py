"""Live recovery (``--ft live``): torchft keeps the surviving ddp replicas stepping.

Without a fault a live run is ddp (losses within the parity tolerance, ``LOSS_RTOL``).
With replica 1 killed before step 3, replica 0 never redoes a step, its losses stay
within the bound of ``distlab.report.live_recovery`` (SGD), and replica 1, restarted
alone, heals from replica 0 and rejoins.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from tests.helpers import TINY_LOCAL_RUN, assert_one_line_error, run_main

from distlab.errors import DistlabError
from distlab.launch.printer import EventPrinter
from distlab.report.live_recovery import loss_bound, survivor_time_lost
from distlab.report.parity import LOSS_RTOL
from distlab.run.files import read_jsonl, read_pid
from distlab.strategies.resolve import load_config

RUN = [
    *TINY_LOCAL_RUN, "--strategy", "ddp", "--nproc", "2", "--steps", "12", "--optimizer", "sgd",
    "--track-memory", "off", "--no-final-checkpoint",
]  # fmt: skip
FAULT = ["--ft", "live", "--inject-fault", "1@3", "--max-failures", "1", "--checkpoint-every", "2"]
"""Checkpoints too: replica 0 saves while the others wait for it in the next step's quorum."""


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory):
    """Runs of ``RUN`` with extra flags, each made once on first use: ``runs("live", ...)``.
    ``beside(run_dir, done)`` runs in a thread while the run does (until ``done`` is set)."""
    pytest.importorskip("torchft")
    root = tmp_path_factory.mktemp("live")
    made: dict[str, Path] = {}

    def get(
        name: str, *flags: str, beside: Callable[[Path, threading.Event], None] | None = None
    ) -> Path:
        if name not in made:
            done = threading.Event()
            thread = threading.Thread(target=beside or (lambda *_: None), args=(root / name, done))
            thread.start()
            try:
                result = run_main("distlab.launch", *RUN, *flags, "--run-dir", str(root / name))
            finally:
                done.set()
                thread.join()
            assert result.returncode == 0, result.stderr
            made[name] = root / name
        return made[name]

    return get


@pytest.fixture(scope="module")
def live(runs) -> Path:
    """The live run without a fault. Replica 1 is held (SIGSTOP) for 2 s as it starts, before it
    builds its model: a replica slow to start, as on a busy machine (one CI run's replica built
    its model more than 1 s after the others and was left out of step 0)."""

    def hold(pid: int) -> None:
        os.kill(pid, signal.SIGSTOP)
        time.sleep(2)
        os.kill(pid, signal.SIGCONT)

    return runs("live", "--ft", "live", beside=as_it_starts(1, hold))


def as_it_starts(rank: int, act: Callable[[int], None]) -> Callable[[Path, threading.Event], None]:
    """A ``beside`` for ``runs``: ``act(pid)`` on replica ``rank`` once it has written its pid
    (it is starting to train: its model not built, its first quorum not asked for)."""

    def beside(run_dir: Path, done: threading.Event) -> None:
        while not done.is_set():
            if (pid := read_pid(run_dir, rank)) is not None:
                act(pid)
                return
            time.sleep(0.01)

    return beside


def metrics(run_dir: Path) -> list[dict]:
    lines = read_jsonl(run_dir / "metrics.jsonl")
    assert [m["step"] for m in lines] == list(range(12)), "one line per step"
    return lines


def events(run_dir: Path, kind: str) -> list[dict]:
    return [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == kind]


@pytest.mark.slow
def test_live_without_fault_is_ddp(runs, live: Path) -> None:
    """Every replica steps from step 0, replica 1 too (held as it started: ``live``)."""
    for a, b in zip(metrics(live), metrics(runs("restart")), strict=True):
        assert abs(a["loss"] - b["loss"]) <= LOSS_RTOL * abs(b["loss"]), (a, b)
        assert a["replicas"] == 2 and None not in a["replica_losses"]


def assert_survivor_never_redoes(run_dir: Path) -> None:
    """Replica 0 ran each step once (its own per-step file) and retried none."""
    attempts = [line["step"] for line in read_jsonl(run_dir / "ranks" / "rank0.jsonl")]
    assert attempts == list(range(12)), attempts
    assert not events(run_dir, "step_retry")


def assert_within_bound(run_dir: Path, reference: Path) -> list[dict]:
    live, ref = metrics(run_dir), metrics(reference)
    bounds = loss_bound(live, ref, nproc=2, grad_clip=1.0)
    for got, want, bound in zip(live, ref, bounds, strict=True):
        # the parity tolerance on top: summing over another set of replicas rounds apart
        assert abs(got["loss"] - want["loss"]) <= bound + LOSS_RTOL * abs(want["loss"]), (
            got["step"], got["loss"], want["loss"], bound,
        )  # fmt: skip
    return live


def test_time_lost_is_read_on_the_clock() -> None:
    """Replica 0's time lost counts a failed attempt its committed step's figures leave out:
    step 3 (replicas 4 -> 2) was recorded 40.1 s after step 2, step 5 (back to 4) 0.6 s
    after step 4, against 0.1 s between the other steps."""
    times = [0.0, 0.1, 0.2, 40.3, 40.4, 41.0, 41.1]
    replicas = [4, 4, 4, 2, 2, 4, 4]
    metrics = [
        {"step": step, "time": t, "replicas": k}
        for step, (t, k) in enumerate(zip(times, replicas, strict=True))
    ]
    lost = survivor_time_lost(metrics)
    assert lost["median_step_s"] == pytest.approx(0.1)
    assert lost["steps"] == {3: pytest.approx(40.0), 5: pytest.approx(0.5)}
    assert lost["lost_s"] == pytest.approx(40.5)


@pytest.mark.slow
def test_killed_replica_heals_and_rejoins(runs, live: Path) -> None:
    """Restarted at once: replica 1 heals from replica 0 (at step 3 if it makes the quorum
    replica 0 waits in for the dead one's heartbeat to expire, else a few steps later)."""
    run_dir = runs("fault", *FAULT)
    assert_survivor_never_redoes(run_dir)
    stepped = assert_within_bound(run_dir, live)
    (heal,) = events(run_dir, "heal")
    assert heal["rank"] == 1 and heal["from_step"] == 0 and heal["step"] >= 3
    assert [m["replicas"] for m in stepped[heal["step"] :]] == [2] * (12 - heal["step"])
    (fault,) = [e for e in events(run_dir, "fault") if e["kind"] == "injected"]
    assert (fault["rank"], fault["step"]) == (1, 3)
    assert events(run_dir, "replica_restart")[0]["rank"] == 1
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))[-1] == "step_000012"


@pytest.mark.slow
def test_survivor_steps_alone_within_the_bound(runs, live: Path) -> None:
    """Replica 1 is held back past the end (--rejoin-after 100): replica 0 trains steps 3-11
    alone, on its own rows, within the bound; the held replica ends without stepping."""
    run_dir = runs("alone", *FAULT, "--rejoin-after", "100")
    assert_survivor_never_redoes(run_dir)
    stepped = assert_within_bound(run_dir, live)
    assert [m["replicas"] for m in stepped] == [2, 2, 2] + [1] * 9
    assert all(m["replica_losses"][1] is None for m in stepped[3:])
    assert not events(run_dir, "heal")
    assert read_jsonl(run_dir / "events.jsonl")[-1]["event"] == "finish"


@pytest.mark.slow
def test_lost_replica_0_restarts_every_replica_from_the_checkpoint(runs, live: Path) -> None:
    """Replica 0 writes the run dir: its death restarts all replicas from the newest
    checkpoint (under a fresh Lighthouse), which then train on exactly as before."""
    run_dir = runs("lost0", *FAULT[:2], "--inject-fault", "0@5", *FAULT[4:])
    stepped = metrics(run_dir)
    for got, want in zip(stepped, metrics(live), strict=True):
        assert abs(got["loss"] - want["loss"]) <= LOSS_RTOL * abs(want["loss"]), (got, want)
    restart = [e for e in events(run_dir, "start") if e["restart"]]
    assert [(e["from_step"], e["lost_steps"]) for e in restart] == [(4, 1)]
    assert [(e["rank"], e["step"]) for e in events(run_dir, "heal")] == [(1, 4)]


def stop_when_due(run_dir: Path, rank: int, step: int, done: threading.Event) -> None:
    """SIGSTOP replica ``rank`` once ``step`` steps are recorded (a hang that heartbeats
    no more, to the Lighthouse or the watchdog)."""
    while not done.is_set():
        recorded = (
            (run_dir / "metrics.jsonl").read_bytes().count(b"\n")
            if (run_dir / "metrics.jsonl").is_file()
            else 0
        )
        if recorded >= step and (pid := read_pid(run_dir, rank)) is not None:
            os.kill(pid, signal.SIGSTOP)
            return
        time.sleep(0.02)


@pytest.mark.slow
def test_a_replica_killed_as_it_starts_trains_from_step_0(runs, live: Path) -> None:
    """Replica 1 killed (SIGKILL) as it starts, before the replicas meet for their first
    quorum: replica 0 waits for its restart, which finds its peer at step 0 too and steps
    with it from there (it has nothing to heal, and a peer to step with)."""

    kill = as_it_starts(1, lambda pid: os.kill(pid, signal.SIGKILL))
    run_dir = runs("killed-at-start", "--ft", "live", "--max-failures", "1", beside=kill)
    assert [e["rank"] for e in events(run_dir, "replica_restart")] == [1]
    assert not events(run_dir, "rejoin_skipped") and not events(run_dir, "heal")
    for got, want in zip(metrics(run_dir), metrics(live), strict=True):
        assert got["replicas"] == 2, got
        assert abs(got["loss"] - want["loss"]) <= LOSS_RTOL * abs(want["loss"]), (got, want)


@pytest.mark.slow
@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.alone
def test_stopped_replica_is_killed_and_recovered(tmp_path: Path, rank: int) -> None:
    """A stopped replica stops heartbeating: the watchdog kills it after --timeout-s (the
    run does not wait for it forever), and it is restarted as a dead one is: replica 0 with
    every replica, replica 1 alone, to heal (if the survivor has steps left to join)."""
    pytest.importorskip("torchft")
    run_dir, done = tmp_path / "run", threading.Event()
    stopper = threading.Thread(target=stop_when_due, args=(run_dir, rank, 4, done))
    stopper.start()
    try:
        result = run_main(
            "distlab.launch", *RUN, *FAULT[:2], "--max-failures", "1", "--checkpoint-every",
            "2", "--timeout-s", "3", "--run-dir", str(run_dir),
        )  # fmt: skip
    finally:
        done.set()
        stopper.join()
    assert result.returncode == 0, result.stderr
    (hang,) = events(run_dir, "fault")  # the watchdog's, and no second one for its kill
    assert (hang["kind"], hang["rank"]) == ("hang", rank)
    metrics(run_dir)
    if rank == 0:
        assert [e["restart"] for e in events(run_dir, "start")] == [False, True]
    elif events(run_dir, "finish")[0]["t"] < hang["t"]:
        # Stopped before it joined step 4's quorum: the quorum went on without it, and replica 0
        # trained the 8 steps left (0.4 s) before the watchdog's 3 s were up. Nothing is left
        # to rejoin, so nothing restarts (seen once in a whole suite here).
        assert not events(run_dir, "replica_restart")
    else:  # restarted alone (it heals, unless replica 0 finished the 12 short steps first)
        assert [e["rank"] for e in events(run_dir, "replica_restart")] == [1]
        assert [e["rank"] for e in events(run_dir, "heal")] in ([], [1])


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--ft", "live", "--strategy", "fsdp"], "has no replica dimension"),
        (["--ft", "live", "--strategy", "hsdp", "--nproc", "4"], "hsdp's replicate dimension"),
        (["--ft", "live", "--nproc", "1"], "at least 2 replicas"),
        (["--ft", "live", "--launcher", "ray", "--elastic", "1"], "two recovery modes"),
        (["--ft", "sometimes"], "ft must be one of restart, live"),
        (["--rejoin-after", "2"], "it needs --ft live"),
        (["--ft", "live", "--rejoin-after", "-1"], "rejoin_after must be >= 0"),
        (["--ft", "live", "--inject-fault", "1@4:save"], "only replica 0 saves checkpoints"),
    ],
)
def test_bad_live_input(flags: list[str], fragment: str) -> None:
    values = {"strategy": "ddp", "nproc": 2, "launcher": "local", "steps": 10}
    values["checkpoint_every"] = 2
    args = dict(zip(flags[::2], flags[1::2], strict=True))
    values.update({k[2:].replace("-", "_"): v for k, v in args.items()})
    with pytest.raises(DistlabError, match=fragment.replace("(", r"\(")) as error:
        load_config(None, values)
    assert "\n" not in str(error.value)


def test_bad_live_command_is_one_line_exit_2(tmp_path: Path) -> None:
    result = run_main(
        "distlab.launch", "--ft", "live", "--launcher", "local", "--strategy", "tp",
        "--nproc", "2", "--run-dir", str(tmp_path / "run"),
    )  # fmt: skip
    assert_one_line_error(result, "has no replica dimension")


@pytest.mark.parametrize(
    ("replica_0", "then"),
    [
        (None, "the replicas on other nodes step on; restarting the lost ones alone"),
        ("error", "replica 0 was lost too (rank 0 failed: RuntimeError: broken); restarting all"),
        ("signal", "replica 0 was lost too (rank 0 was killed by signal 9); restarting all"),
    ],
)
def test_a_node_loss_line_says_whether_replica_0_survived(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], replica_0: str | None, then: str
) -> None:
    """Replica 0 fires a node fault and names itself as its sender: the line says the others
    step on unless replica 0 itself was lost in that attempt (then every replica restarts)."""
    node = {"event": "fault", "t": 1.0, "rank": 0, "kind": "node", "node": 1, "step": 10}
    faults = [node, {"event": "fault", "t": 2.0, "rank": 2, "kind": "signal", "signal": 9}]
    if replica_0 == "error":
        faults.append({"event": "fault", "t": 3.0, "rank": 0, "kind": "error"})
        faults[-1]["reason"] = "RuntimeError: broken"
    elif replica_0 == "signal":
        faults.append({"event": "fault", "t": 3.0, "rank": 0, "kind": "signal", "signal": 9})
    (tmp_path / "events.jsonl").write_text("".join(json.dumps(f) + "\n" for f in faults))
    printer = EventPrinter(tmp_path, max_failures=2, live=True)
    printer.poll()
    printer.flush()
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "rank 0 took node 1 down" in out and then in out, out
