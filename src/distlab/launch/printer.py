"""The launcher's console: one line per fault and per resume, and progress, from the run dir."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from distlab.run.events import describe_fault, main_fault
from distlab.run.files import EVENTS_FILE, METRICS_FILE, JsonlTail
from distlab.run.recorder import step_status


class EventPrinter:
    """Prints each failed attempt's main fault and each resume as one line.

    Faults are held until no new one has come for ``settle_s`` (or ``flush``):
    a dying rank takes its peers down with it, and the line should name the
    cause, not the collateral connection errors, whichever was logged first.

    With ``progress`` it also prints a line every ``log_every`` steps from
    ``metrics.jsonl`` (for launchers whose ranks' output is not shown, i.e. Ray).
    With ``live`` (``--ft live``) a fault of a replica other than 0 restarts that replica
    alone, and its heal (a ``heal`` event) ends the fault.
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
        live: bool = False,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.max_failures = max_failures
        self.quiet = quiet
        self.progress = progress and not quiet
        self.log_every = log_every
        self.steps = steps
        self.events = JsonlTail(self.run_dir / EVENTS_FILE)
        self.metrics = JsonlTail(self.run_dir / METRICS_FILE, replay=False)
        self.failures = 0
        self.fault_open = False
        self.pending: list[dict[str, Any]] = []
        self.settle_s = settle_s
        self.live = live

    def poll(self) -> None:
        """Print whatever happened since the last poll."""
        for event in self.events.read():
            self._on_event(event)
        self.flush(settle_s=self.settle_s)
        if self.progress:
            for metrics in self.metrics.read():
                step = metrics.get("step", -1)
                if (step + 1) % self.log_every == 0 or step + 1 == self.steps:
                    self._print(f"step {step + 1}/{self.steps}  {step_status(metrics)}")

    def _on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "start":
            self.flush()
            self.fault_open = False
        elif kind == "fault" and not self.fault_open:
            self.pending.append(event)
        elif kind == "resize":  # a shrink, after the fault that lost the capacity
            self.flush()
            self._print(f"distlab: continuing at {event['ranks']} ranks (--elastic)")
        elif kind == "heal":
            self.flush()
            self.fault_open = False
            self._print(
                f"distlab: replica {event['rank']} healed from a live peer: step "
                f"{event['from_step']} -> {event['step']} in {event['heal_s']:.1f} s"
            )
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
        # live: replica 0 lost besides the main fault (the node fault it fired names rank 0
        # as its sender, not as a casualty) restarts every replica, whatever the main fault
        replica_0 = [f for f in self.pending if f.get("rank") == 0 and f.get("kind") != "node"]
        self.pending = []
        self.fault_open = True
        if fault.get("kind") == "resize":  # not a failure: Ray does not count it either
            self._print(
                f"distlab: {describe_fault(fault)}; every rank resumes from the newest checkpoint"
            )
            return
        self.failures += 1
        if self.failures > self.max_failures:
            then = f"no restarts left (--max-failures {self.max_failures})"
        elif self.live and replica_0 and replica_0[0] is not fault:
            then = (
                f"replica 0 was lost too ({describe_fault(replica_0[0])}); restarting all "
                "replicas from the newest checkpoint"
            )
        elif self.live and fault.get("kind") == "node":
            then = (
                "the replicas on other nodes step on; restarting the lost ones alone, to heal "
                "from a live peer"
            )
        elif self.live and fault.get("rank"):
            then = "the other replicas step on; restarting it alone, to heal from a live peer"
        else:
            then = "restarting all ranks from the newest checkpoint"
        self._print(f"distlab: fault {self.failures}: {describe_fault(fault)}; {then}")

    def _print(self, line: str) -> None:
        if self.quiet and not line.startswith("distlab:"):
            return
        print(line, flush=True)
