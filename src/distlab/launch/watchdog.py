"""A watchdog on step progress: a rank that stops making progress is killed.

Each rank writes ``logs/rankR.heartbeat`` (one JSON object: pid, host, phase,
step, wall time) when it starts, after every step and around every checkpoint
save (``beat``). The launcher's driver process (the local launcher's loop, the
Ray driver's watcher thread) polls the files (``Watchdog.poll``): once a rank
has started stepping (phase ``step`` or ``save``), a heartbeat that has not
changed for ``timeout_s`` (``--timeout-s``, the collective timeout) means the
rank hangs. The driver SIGKILLs that process and records a ``fault`` event of
kind ``hang``; the launcher's usual restart machinery does the rest.

Not covered: a hang before a rank's first step (process-group set-up, model
building, checkpoint loading, a first JIT compile: they have no step to time,
and the process group's own timeout covers the rendezvous), a hang after the
last step, and ranks on another machine than the driver (a Ray cluster: the
driver cannot signal them; the collective timeout of their peers still
applies).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from distlab.run.events import append_event, first_fault_since_last_start, read_events
from distlab.run.heartbeat import heartbeat_file

ARMED = ("step", "save")
"""Phases after which a stalled heartbeat is a hang (the rank has started stepping)."""


@dataclass(frozen=True)
class Hang:
    """A rank the watchdog killed."""

    rank: int
    pid: int
    idle_s: float
    step: int | None
    timeout_s: float

    def message(self) -> str:
        """One line: who hung, for how long, what was done."""
        after = f" after step {self.step}" if self.step is not None else ""
        return (
            f"rank {self.rank} hung: no progress for {self.idle_s:.1f} s{after} "
            f"(--timeout-s {self.timeout_s:g}); the watchdog killed it"
        )


class Watchdog:
    """Polls the ranks' heartbeats; kills (SIGKILL) and reports a rank that stopped progressing."""

    def __init__(self, run_dir: Path, nproc: int, timeout_s: float) -> None:
        self.run_dir = Path(run_dir)
        self.nproc = nproc
        self.timeout_s = timeout_s
        self.host = socket.gethostname()
        self.hangs: list[Hang] = []
        self._seen: dict[int, tuple[str, float]] = {}  # rank -> (content, when it changed)
        self._spent: dict[int, str] = {}  # rank -> heartbeat content at the last kill
        self._remote_warned = False

    def reset(self) -> None:
        """Forget old heartbeats (the local launcher, before it starts a new attempt)."""
        for rank in range(self.nproc):
            heartbeat_file(self.run_dir, rank).unlink(missing_ok=True)
        self._seen.clear()
        self._spent.clear()

    def poll(self) -> Hang | None:
        """Check every rank; kill the stalled one past ``timeout_s`` (a stopped process first,
        else the one stalled longest); return it."""
        now = time.monotonic()
        stalled: list[tuple[float, int, dict]] = []
        for rank in range(self.nproc):
            try:
                content = heartbeat_file(self.run_dir, rank).read_text()
                record = json.loads(content)
            except (OSError, ValueError):
                continue
            seen = self._seen.get(rank)
            if seen is None or seen[0] != content:
                self._seen[rank] = (content, now)
                continue
            idle = now - seen[1]
            if (
                record.get("phase") in ARMED
                and idle > self.timeout_s
                and self._spent.get(rank) != content
                and (record.get("host") != self.host or _alive(record.get("pid")))
            ):
                stalled.append((idle, rank, record))
        if first_fault_since_last_start(read_events(self.run_dir)) is not None:
            # The attempt is failing already (a peer timed out waiting for the hung rank):
            # it is torn down without the watchdog, but a stopped process never exits on
            # its own request, and Ray would wait for it, so it is killed.
            self._kill_stopped()
            return None
        if not stalled:
            return None
        # a stopped process (SIGSTOP) is the hung one; its peers, waiting for it in a
        # collective, stall too and may have idled as long: else the one stalled longest
        idle, rank, record = max(
            stalled, key=lambda item: (_state(item[2].get("pid")) in ("T", "t"), item[0])
        )
        if record.get("host") != self.host:
            if not self._remote_warned:
                self._remote_warned = True
                print(
                    f"distlab: warning: rank {rank} made no progress for {idle:.0f} s, but it "
                    f"runs on {record.get('host')}; the watchdog can only stop local ranks",
                    flush=True,
                )
            return None
        # every rank's current heartbeat is now spent: its peers stall behind the hung
        # rank, and only a new heartbeat (a new attempt) re-arms the watchdog for it
        self._spent = {r: seen[0] for r, seen in self._seen.items()}
        hang = Hang(rank, int(record["pid"]), idle, record.get("step"), self.timeout_s)
        append_event(
            self.run_dir,
            "fault",
            rank=rank,
            kind="hang",
            idle_s=round(idle, 3),
            step=hang.step,
            timeout_s=self.timeout_s,
            pid=hang.pid,
        )
        try:
            os.kill(hang.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.hangs.append(hang)
        return hang

    def _kill_stopped(self) -> None:
        """SIGKILL every local rank whose process is stopped (SIGSTOP, state T)."""
        for rank in range(self.nproc):
            try:
                record = json.loads(heartbeat_file(self.run_dir, rank).read_text())
            except (OSError, ValueError):
                continue
            pid = record.get("pid")
            if record.get("host") == self.host and _state(pid) in ("T", "t"):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def _state(pid: object) -> str | None:
    """The process state letter of a local pid (``R``, ``S``, ``T``, ``Z``...), None if none."""
    if not isinstance(pid, int):
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[0]


def _alive(pid: object) -> bool:
    """Whether a process with this pid exists on this machine and is not a zombie."""
    return _state(pid) not in (None, "Z")
