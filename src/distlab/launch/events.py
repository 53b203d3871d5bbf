"""A run's event log (``events.jsonl``): launches, starts, faults and resumes.

Every process that learns something appends one JSON line: the launcher
(``launch``, and ``fault`` for a rank it saw die), a rank about to kill itself
(an injected ``fault``), Ray's controller (``fault`` for the workers it saw
fail), and rank 0 (``start`` of each attempt once the state is loaded, and
``resume`` once the first resumed step is done). Lines are short and written
with one ``O_APPEND`` write, so writers on one machine never interleave.

From the log come the run's fault figures (``summary.json``): ``restarts``,
``lost_steps`` (recorded steps that had to be redone) and ``recovery_s`` (from
the first fault of an attempt to the end of the first resumed step). The
launchers print each fault and each resume as one line (``EventPrinter``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

EVENTS_FILE = "events.jsonl"


def append_event(run_dir: Path, event: str, **fields: Any) -> dict[str, Any]:
    """Append one event (with the wall time ``t``) to the run's log; return it."""
    record = {"event": event, "t": time.time(), **fields}
    line = (json.dumps(record) + "\n").encode()
    fd = os.open(Path(run_dir) / EVENTS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
    return record


def read_events(run_dir: Path) -> list[dict[str, Any]]:
    """Every complete event line of a run (a torn last line is skipped)."""
    file = Path(run_dir) / EVENTS_FILE
    if not file.is_file():
        return []
    events = []
    for line in file.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events


def first_fault_since_last_start(events: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The earliest fault recorded after the newest ``start`` (the attempt that failed)."""
    fault = None
    for event in events:
        if event["event"] == "start":
            fault = None
        elif event["event"] == "fault" and fault is None:
            fault = event
    return fault


class JsonlTail:
    """The new complete lines of a JSON-lines file, read incrementally by a polling process.

    A torn last line waits for the next read. When the file is replaced or cut
    back (a restart rewinds ``metrics.jsonl``), reading starts over from its
    beginning if ``replay``, else from its current end (lines already shown).
    """

    def __init__(self, file: Path, replay: bool = True) -> None:
        self.file = file
        self.replay = replay
        self.inode: int | None = None
        self.offset = 0

    def read(self) -> list[dict[str, Any]]:
        """Every complete line written since the last read, parsed (unparsable ones skipped)."""
        try:
            stat = self.file.stat()
        except FileNotFoundError:
            return []
        if self.inode is not None and (stat.st_ino != self.inode or stat.st_size < self.offset):
            self.offset = 0 if self.replay else stat.st_size
        self.inode = stat.st_ino
        with self.file.open("rb") as stream:
            stream.seek(self.offset)
            data = stream.read()
        end = data.rfind(b"\n") + 1
        self.offset += end
        records = []
        for line in data[:end].decode(errors="replace").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue  # a line torn by a kill
        return records


COLLATERAL = ("Connection closed by peer", "Connection reset by peer", "Read error", "Broken pipe")
"""Errors a rank gets because another rank died (its cause is reported elsewhere)."""


def fault_rank(event: dict[str, Any]) -> int:
    """How telling a fault event is about the cause (lower: more)."""
    if event.get("kind") in ("injected", "hang"):
        return 0
    if event.get("kind") == "signal":
        return 1
    if any(text in event.get("reason", "") for text in COLLATERAL):
        return 3
    return 2


def main_fault(faults: list[dict[str, Any]]) -> dict[str, Any]:
    """The fault that best explains a failed attempt (the cause, not its collateral)."""
    return min(faults, key=lambda e: (fault_rank(e), e["t"]))


def first_faults(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The main fault of each failed attempt."""
    groups: list[list[dict[str, Any]]] = [[]]
    for event in events:
        if event["event"] == "start":
            groups.append([])
        elif event["event"] == "fault":
            groups[-1].append(event)
    return [main_fault(group) for group in groups if group]


def fault_figures(events: list[dict[str, Any]]) -> dict[str, Any]:
    """Restarts, lost steps and recovery times of a run, from its events."""
    starts = [e for e in events if e["event"] == "start"]
    restarts = [e for e in starts if e.get("restart")]
    resumes = [e for e in events if e["event"] == "resume" and e.get("restart")]
    recoveries = [e["recovery_s"] for e in resumes if e.get("recovery_s") is not None]
    launch = next((e for e in events if e["event"] == "launch"), None)
    first_start = starts[0] if starts else None
    return {
        "restarts": len(restarts),
        "lost_steps": sum(e.get("lost_steps", 0) for e in restarts),
        "recovery_s": round(sum(recoveries), 3),
        "recovery_s_each": [round(r, 3) for r in recoveries],
        "faults": [describe_fault(e) for e in first_faults(events)],
        "startup_s": (round(first_start["t"] - launch["t"], 3) if launch and first_start else None),
    }


def describe_fault(event: dict[str, Any]) -> str:
    """A fault event as words."""
    rank = event.get("rank")
    who = f"rank {rank}" if rank is not None else "a rank"
    kind = event.get("kind")
    if kind == "injected":
        where = "while saving checkpoint" if event.get("during_save") else "at step"
        return (
            f"{who} killed itself {where} {event.get('step')} (--inject-fault {event.get('spec')})"
        )
    if kind == "signal":
        return f"{who} was killed by signal {event.get('signal')}"
    if kind == "hang":
        after = f" after step {event['step']}" if event.get("step") is not None else ""
        return (
            f"{who} hung (no progress for {event.get('idle_s', 0):.1f} s{after}); "
            f"the watchdog killed it (--timeout-s {event.get('timeout_s', 0):g})"
        )
    reason = event.get("reason", "unknown error")
    if "Timed out" in reason or "timed out" in reason:
        reason += " [a collective timed out (--timeout-s): a rank hung or died]"
    return f"{who} failed: {reason}"


class EventPrinter:
    """Prints each failed attempt's main fault and each resume as one line.

    Faults are held until no new one has come for ``settle_s`` (or ``flush``):
    a dying rank takes its peers down with it, and the line should name the
    cause, not the collateral connection errors, whichever was logged first.

    With ``progress`` it also prints a line every ``log_every`` steps from
    ``metrics.jsonl`` (for launchers whose ranks' output is not shown, i.e. Ray).
    """

    def __init__(
        self,
        run_dir: Path,
        max_failures: int,
        quiet: bool = False,
        progress: bool = False,
        log_every: int = 10,
        steps: int = 0,
        settle_s: float = 3.0,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.max_failures = max_failures
        self.quiet = quiet
        self.progress = progress and not quiet
        self.log_every = log_every
        self.steps = steps
        self.events = JsonlTail(self.run_dir / EVENTS_FILE)
        self.metrics = JsonlTail(self.run_dir / "metrics.jsonl", replay=False)
        self.failures = 0
        self.fault_open = False
        self.pending: list[dict[str, Any]] = []
        self.settle_s = settle_s

    def poll(self) -> None:
        """Print whatever happened since the last poll."""
        for event in self.events.read():
            self._on_event(event)
        self.flush(settle_s=self.settle_s)
        if self.progress:
            for metrics in self.metrics.read():
                step = metrics.get("step", -1)
                if (step + 1) % self.log_every == 0 or step + 1 == self.steps:
                    self._print(
                        f"step {step + 1}/{self.steps}  loss {metrics['loss']:.4f}  "
                        f"{metrics['tokens_per_s']:,.0f} tok/s"
                    )

    def _on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "start":
            self.flush()
            self.fault_open = False
        elif kind == "fault" and not self.fault_open:
            self.pending.append(event)
        elif kind == "resume":
            source = event.get("checkpoint") or "the start (no checkpoint yet)"
            if event.get("restart"):
                recovery = event.get("recovery_s")
                took = f"; recovered in {recovery:.1f} s" if recovery is not None else ""
                self._print(
                    f"distlab: resumed at step {event['from_step']} from {source} "
                    f"(attempt {event['attempt']}, steps redone: {event.get('lost_steps', 0)}"
                    f"{took})"
                )
            else:
                self._print(f"distlab: resumed at step {event['from_step']} from {source}")

    def flush(self, settle_s: float = 0.0) -> None:
        """Print the failed attempt's main fault once its faults have settled for ``settle_s``."""
        if not self.pending or time.time() - self.pending[0]["t"] < settle_s:
            return
        fault = main_fault(self.pending)
        self.pending = []
        self.fault_open = True
        self.failures += 1
        then = (
            "restarting all ranks from the newest checkpoint"
            if self.failures <= self.max_failures
            else f"no restarts left (--max-failures {self.max_failures})"
        )
        self._print(f"distlab: fault {self.failures}: {describe_fault(fault)}; {then}")

    def _print(self, line: str) -> None:
        if self.quiet and not line.startswith("distlab:"):
            return
        print(line, flush=True)
