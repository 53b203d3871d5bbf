"""Where one step's seconds go on one rank: phase spans, collectives, and the rank's CPU clock.

A tracked step records three things, all cheap enough to leave the step as it is
(a few microseconds per event, measured in docs/time.md):

- **phase spans** on the thread that runs the step (``phase("forward")``: data,
  forward, backward, forward_backward for pipeline schedules, optimizer), and a
  pipeline schedule's actions inside it (F, B, W of each micro-batch and stage);
- **every collective** from the counting process group (``distlab.measure.process_group``):
  its issue time, and its completion from the work's future (gloo runs it on its
  own threads; send/recv works have no future, so their completion is unknown);
- **the step thread's CPU clock** (``pthread_getcpuclockid``, exact, readable from any
  thread) and its run-queue wait (``/proc/self/task/<tid>/schedstat``), read at every
  event, so between two events the thread's wall time splits into running, waiting
  for a core (contention) and blocked.

``StepTimeline.breakdown`` cuts the step at every event and files each piece:
inside a communication call (issuing a collective, or waiting for one gloo gives
no future) the thread communicates, on a core or not: ``exposed_comm``; blocked
while a collective is in flight is ``exposed_comm`` too, except inside a
pipeline schedule's ``forward_backward`` when only sends and receives are pending:
the rank waits for a peer's activation or gradient, which is the ``bubble``;
blocked with nothing in flight is the phase's own category; running (or
waiting for a core) is the phase's category: ``compute`` in forward/backward,
``optimizer``, ``data``, and ``host`` outside every phase. The six categories
partition the step, so they add up to its wall time; ``overlapped_comm`` is the
time a collective was in flight while the thread ran (hidden under compute), not
part of the sum. On a GPU the thread's CPU clock does not see kernels: there the
breakdown describes the host thread only (the profiler's, ``--profile``, sees
the kernels).
"""

from __future__ import annotations

import contextlib
import functools
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from torch.profiler import record_function

from distlab.measure.counter import interval_union

CATEGORIES = ("compute", "exposed_comm", "bubble", "data", "optimizer", "host")
"""What a step's wall time is split into (they add up to it)."""

PHASES = ("data", "forward", "backward", "forward_backward", "optimizer")
"""The phase spans a step records (``StepTimeline.phase``)."""

PHASE_CATEGORY = {
    "data": "data",
    "forward": "compute",
    "backward": "compute",
    "forward_backward": "compute",
    "optimizer": "optimizer",
}

POINT_TO_POINT = ("send", "recv")
"""Collectives a pipeline schedule waits on for a peer's activation or gradient."""

SPAN_PREFIX = "distlab:"
"""The phases' names as torch.profiler ``record_function`` spans (``distlab:forward``), and
the whole step's (``distlab:step``), under ``--profile``."""


class ThreadClock:
    """The CPU time and run-queue wait of one thread, readable from any thread."""

    def __init__(self) -> None:
        self.cpu_clock: int | None = time.pthread_getcpuclockid(threading.get_ident())
        try:
            self.schedstat: int | None = os.open(
                f"/proc/self/task/{threading.get_native_id()}/schedstat", os.O_RDONLY
            )
        except OSError:  # not Linux: no run-queue figure, contention counts as blocked
            self.schedstat = None

    def read(self) -> tuple[int, int]:
        """(CPU nanoseconds, run-queue wait nanoseconds) of the thread so far."""
        cpu = time.clock_gettime_ns(self.cpu_clock)
        if self.schedstat is None:
            return cpu, 0
        return cpu, int(os.pread(self.schedstat, 64, 0).split()[1])

    def close(self) -> None:
        """Stop reading the thread (``cpu_clock`` becomes None)."""
        self.cpu_clock = None
        if self.schedstat is not None:
            os.close(self.schedstat)
            self.schedstat = None


@dataclass
class Collective:
    """One collective of the step: issue and completion relative to the step's start."""

    kind: str
    group: str
    bytes: int
    issue: float
    done: float | None = None
    """None while in flight, and for a work without a future that nobody waited for in the
    step (a send whose completion the schedule never waits for)."""
    completion: str = "future"
    """How ``done`` was seen: the work's future fired (``future``), or, for a work gloo gives
    no future (send, recv, reduce-scatter), the rank's wait for it returned (``wait``)."""


@dataclass
class StepTimeline:
    """One rank's record of one step, filled while the step runs (``begin`` ... ``end``)."""

    step: int
    profiled: bool = False
    """Also mark each phase as a torch.profiler ``record_function`` span (``--profile``)."""
    clock: ThreadClock = field(default_factory=ThreadClock)
    t0: float = 0.0
    t0_unix: float = 0.0
    wall_s: float = 0.0
    marks: list[tuple[float, int, int]] = field(default_factory=list)
    """(time since the step's start, thread CPU ns, run-queue ns) at every event."""
    spans: list[tuple[str, float, float]] = field(default_factory=list)
    comms: list[Collective] = field(default_factory=list)
    actions: list[tuple[str, int, int, float, float]] = field(default_factory=list)
    """A pipeline schedule's actions: (F, B or W, stage, micro-batch, start, end)."""
    calls: list[tuple[float, float, bool]] = field(default_factory=list)
    """(start, end, send/recv) of the times the rank's thread was inside a communication
    call: issuing a collective, or waiting for one without a future."""
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def begin(self) -> None:
        cpu, queued = self.clock.read()
        self.t0_unix = time.time()
        self.t0 = time.perf_counter()
        self.marks.append((0.0, cpu, queued))

    def end(self) -> float:
        """End the step (once; later calls change nothing) and return its wall time."""
        if self.clock.cpu_clock is not None:
            self.wall_s = self._mark()
            self.clock.close()
        return self.wall_s

    def _mark(self) -> float:
        """Record the thread's clocks now (any thread may call it); return the time."""
        cpu, queued = self.clock.read()
        now = time.perf_counter() - self.t0
        with self._lock:
            self.marks.append((now, cpu, queued))
        return now

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """A phase span of the step (one of ``PHASES``)."""
        span = record_function(SPAN_PREFIX + name) if self.profiled else contextlib.nullcontext()
        start = self._mark()
        try:
            with span:
                yield
        finally:
            self.spans.append((name, start, self._mark()))

    @contextlib.contextmanager
    def action(self, kind: str, stage: int, microbatch: int) -> Iterator[None]:
        """A pipeline action inside ``forward_backward``: forward (F), backward (B) or weight
        gradient (W) of one micro-batch on one stage (shown in the trace, not a category)."""
        start = self._mark()
        try:
            yield
        finally:
            self.actions.append((kind, stage, microbatch, start, self._mark()))

    def issued(self, kind: str, group: str, payload: int) -> Collective:
        """A collective was just issued; the caller reports its completion with ``done``."""
        collective = Collective(kind, group, payload, self._mark())
        with self._lock:
            self.comms.append(collective)
        return collective

    def returned(self, collective: Collective) -> None:
        """The call that issued the collective returned (the rank's thread was in it)."""
        self.calls.append((collective.issue, self._mark(), collective.kind in POINT_TO_POINT))

    @contextlib.contextmanager
    def waiting(self, collective: Collective) -> Iterator[None]:
        """The rank's thread waits for the collective (a work without a future, ``wait()``)."""
        start = self._mark()
        try:
            yield
        finally:
            self.calls.append((start, self._mark(), collective.kind in POINT_TO_POINT))
            if collective.done is None:  # its completion: the end of the first wait
                collective.completion = "wait"
                collective.done = self.calls[-1][1]

    def done(self, collective: Collective) -> None:
        """The collective completed (its work's future fired: on the backend's thread)."""
        collective.done = self._mark()

    def breakdown(self) -> dict[str, Any]:
        """The step's wall time by category, the overlapped communication, and the pieces."""
        with self._lock:  # a completion reported after the step ended is not in its time
            marks = sorted(mark for mark in self.marks if mark[0] <= self.wall_s)
        timed = [(c.issue, c.done, c.kind in POINT_TO_POINT) for c in self.comms if c.done]
        by_category = dict.fromkeys(CATEGORIES, 0.0)
        overlapped = contention = 0.0
        segments: list[dict[str, Any]] = []
        for (start, cpu0, queue0), (end, cpu1, queue1) in zip(marks, marks[1:], strict=False):
            wall = end - start
            if wall <= 0:
                continue
            running = min(wall, max(0.0, (cpu1 - cpu0) / 1e9))
            queued = min(wall - running, max(0.0, (queue1 - queue0) / 1e9))
            blocked = wall - running - queued
            middle = (start + end) / 2
            phase = self._phase_at(middle)
            own = PHASE_CATEGORY.get(phase, "host") if phase else "host"
            flying = {p2p for issue, done, p2p in timed if issue <= start and end <= done}
            in_flight = bool(flying)
            inside = {p2p for a, b, p2p in self.calls if a <= start and end <= b}
            if flying == {True} and phase == "forward_backward":
                waiting = "bubble"  # only a pipeline's send/recv pending: waiting for a peer
            elif in_flight or inside:
                waiting = "exposed_comm"
            else:
                waiting = own
            if inside:  # in a communication call, on a core or not, the rank communicates
                own = "bubble" if inside == {True} and phase == "forward_backward" else waiting
            elif in_flight:
                overlapped += running + queued
            by_category[own] += running + queued
            by_category[waiting] += blocked
            contention += queued
            segments.append(_segment(start, start + running + queued, own, in_flight))
            segments.append(_segment(start + running + queued, end, waiting, in_flight))
        comm_s = interval_union([(issue, done) for issue, done, _ in timed])
        return {
            "step": self.step,
            "t0_unix": self.t0_unix,
            "wall_s": self.wall_s,
            "by_category": by_category,
            "overlapped_comm": overlapped,
            "comm_s": comm_s,
            "overlap_fraction": overlapped / comm_s if comm_s > 0 else None,
            "cpu_contention_s": contention,
            "spans": [{"name": n, "start": s, "end": e} for n, s, e in self.spans],
            "comms": [vars(c) for c in self.comms],
            "actions": [
                {"kind": k, "stage": st, "microbatch": mb, "start": a, "end": b}
                for k, st, mb, a, b in self.actions
            ],
            "segments": [s for s in segments if s["end"] > s["start"]],
        }

    def _phase_at(self, moment: float) -> str | None:
        """The innermost phase open at ``moment`` (phases do not nest; None: outside all)."""
        for name, start, end in self.spans:
            if start <= moment <= end:
                return name
        return None


def _segment(start: float, end: float, category: str, comm: bool) -> dict[str, Any]:
    return {"start": start, "end": end, "category": category, "comm_in_flight": comm}


def last_step(steps: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The tracked step with the highest number (the later one if a step was recorded twice,
    as after a restart); None if there is none."""
    best = None
    for step in steps:
        if best is None or step["step"] >= best["step"]:
            best = step
    return best


def mean_of_last_steps(entries: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    """The mean over ranks of each rank's last tracked step in a summary's
    ``time_breakdown_by_rank``, in seconds (None if it has none): ``ranks``, ``steps``,
    ``wall_s``, ``by_category`` (a category an entry lacks counts as zero),
    ``overlapped_comm``, ``comm_s``, ``overlap_fraction``, the mean overlapped time over
    the mean time collectives were in flight (None if none were), and
    ``cpu_contention_s``, the time the rank's thread waited for a core (inside the
    categories, not beside them)."""
    by_rank: dict[int, list[dict[str, Any]]] = {}
    for entry in entries or []:
        by_rank.setdefault(entry["rank"], []).append(entry)
    last = [last_step(steps) for steps in by_rank.values()]
    if not last:
        return None

    def mean(values: list[float | None]) -> float:
        return statistics.fmean(v or 0.0 for v in values)

    overlapped = mean([e.get("overlapped_comm") for e in last])
    comm = mean([e.get("comm_s") for e in last])
    return {
        "ranks": len(last),
        "steps": sorted({e["step"] for e in last}),
        "wall_s": mean([e["wall_s"] for e in last]),
        "by_category": {c: mean([e["by_category"].get(c) for e in last]) for c in CATEGORIES},
        "overlapped_comm": overlapped,
        "comm_s": comm,
        "overlap_fraction": overlapped / comm if comm > 0 else None,
        "cpu_contention_s": mean([e.get("cpu_contention_s") for e in last]),
    }


_ACTIVE: StepTimeline | None = None


def active() -> StepTimeline | None:
    """The step timeline being recorded in this process, if a tracked step runs."""
    return _ACTIVE


def set_active(timeline: StepTimeline | None) -> None:
    global _ACTIVE
    _ACTIVE = timeline


def traced_action(kind: str, stage: int, run: Callable[..., Any]) -> Callable[..., Any]:
    """``run`` (a pipeline stage's ``forward_one_chunk``, ``backward_one_chunk`` or
    ``backward_weight_one_chunk``, whose first argument is the micro-batch) recorded as an
    action of the running step when it is tracked."""

    @functools.wraps(run)
    def recorded(microbatch: int, *args: Any, **kwargs: Any) -> Any:
        timeline = _ACTIVE
        if timeline is None:
            return run(microbatch, *args, **kwargs)
        with timeline.action(kind, stage, microbatch):
            return run(microbatch, *args, **kwargs)

    return recorded


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """A phase span of the running step if it is tracked (``--track-time``); else nothing."""
    timeline = _ACTIVE
    if timeline is None:
        yield
        return
    with timeline.phase(name):
        yield
