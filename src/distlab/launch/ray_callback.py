"""Ray Train callbacks (run in Ray's controller) that log worker failures and resizes in the
run dir."""

from __future__ import annotations

from pathlib import Path

from ray.train import UserCallback
from ray.train.v2._internal.execution.callback import ControllerCallback
from ray.train.v2._internal.execution.controller.state import ResizingState, SchedulingState

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


class ResizeRecorder(ControllerCallback):
    """Appends a ``resize`` event each time an elastic run changes its world size.

    Growing a healthy run (capacity came back) stops every rank, as a fault
    would: that is logged as a ``fault`` of kind ``resize``, so the ranks'
    errors while Ray tears the group down count as its collateral, not as
    failures. A shrink follows a fault and is logged as a plain ``resize``.
    Ray offers resize hooks only on its controller's (internal) callback class.
    """

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir
        self.running = False
        """Whether the decision about to run resizes a running group (Ray passed through its
        ResizingState: Running -> Resizing -> Scheduling), not one a failure stopped."""
        self.ranks: int | None = None
        """The size of the last group Ray started (None before the first)."""

    def after_controller_state_update(self, previous_state, current_state) -> None:
        if isinstance(current_state, SchedulingState):
            self.running = isinstance(previous_state, ResizingState)

    def before_controller_execute_resize_decision(self, resize_decision) -> None:
        previous, ranks = self.ranks, resize_decision.num_workers
        self.ranks = ranks
        if previous in (None, ranks):  # the first group, or a retry at the same size
            return
        if self.running:
            append_event(Path(self.run_dir), "fault", rank=None, kind="resize", ranks=ranks)
        else:
            append_event(Path(self.run_dir), "resize", ranks=ranks)
