"""A Ray Train callback (run in Ray's controller) that logs worker failures in the run dir."""

from __future__ import annotations

from pathlib import Path

from ray.train import UserCallback

from distlab.run.events import append_event


class FaultRecorder(UserCallback):
    """Appends one ``fault`` event per failed worker to the run's ``events.jsonl``."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        for rank, error in sorted(worker_exceptions.items()):
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            reason = next(
                (line for line in lines if "Error" in line or "died" in line),
                lines[0] if lines else type(error).__name__,
            )
            append_event(
                Path(self.run_dir),
                "fault",
                rank=rank,
                kind="error",
                reason=reason[:300],
                source="ray",
            )
