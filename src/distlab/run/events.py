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

from distlab.run.files import EVENTS_FILE, read_jsonl


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
    return read_jsonl(Path(run_dir) / EVENTS_FILE)


def first_fault_since_last_start(events: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The earliest fault recorded after the newest ``start`` (the attempt that failed)."""
    fault = None
    for event in events:
        if event["event"] == "start":
            fault = None
        elif event["event"] == "fault" and fault is None:
            fault = event
    return fault


COLLATERAL = ("Connection closed by peer", "Connection reset by peer", "Read error", "Broken pipe")
"""Errors a rank gets because another rank died (its cause is reported elsewhere)."""


def fault_rank(event: dict[str, Any]) -> int:
    """How telling a fault event is about the cause (lower: more)."""
    if event.get("kind") in ("injected", "hang", "node", "resize"):
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
        # Which cluster node each rank ran on, in the newest attempt (on a distlab cluster).
        "nodes_by_rank": starts[-1].get("nodes") if starts else None,
    }


def describe_fault(event: dict[str, Any]) -> str:
    """A fault event as words."""
    rank = event.get("rank")
    who = f"rank {rank}" if rank is not None else "a rank"
    kind = event.get("kind")
    if kind == "resize":
        return f"capacity for {event.get('ranks')} ranks came back: the run grows (--elastic)"
    if kind == "node":
        return (
            f"{who} took node {event.get('node')} down, with every rank on it, at step "
            f"{event.get('step')} (--inject-fault {event.get('spec')})"
        )
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
