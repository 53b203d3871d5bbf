"""The time breakdown of one training step, read from a torch.profiler trace alone.

The time lab's second measurement, independent of distlab's own timers:
``profiling_step`` records one step with torch.profiler and exports its Chrome
trace; ``profiler_breakdown`` reads the trace back and splits the step's wall
time into the lab's ``CATEGORIES`` (compute, exposed_comm, bubble, data,
optimizer, host), plus the communication that overlapped work::

    with profiling_step(run_dir / "profile" / f"rank{rank}.json"):
        train_step()
    breakdown = profiler_breakdown(run_dir / "profile" / f"rank{rank}.json")

What a CPU trace holds (gloo, torch 2.13, read off 2-rank DDP, FSDP2 and
send/recv pipeline runs):

* the phase spans ``distlab:step``, ``distlab:data``, ``distlab:forward``, ... on the
  rank's main thread (record_function spans, category ``user_annotation``);
* every collective twice: the op that issues it, on the calling thread
  (``c10d::allreduce_``, ``c10d::_allgather_base_``, ``c10d::_reduce_scatter_base_``,
  ...), and ``gloo:all_reduce``, ``gloo:all_gather``, ``gloo:broadcast``, ... with the
  collective's duration, on one of gloo's worker threads (a reduce-scatter runs
  as ``gloo:all_reduce``); the worker's span ends once the work's future has
  completed;
* point-to-point ops on the calling thread: ``c10d::send`` / ``c10d::recv_``, then
  ``gloo:send`` / ``gloo:recv`` until the work completes (an ``isend``'s: when it
  is waited for);
* no event for ``Work.wait()``, hence none where DDP's reducer waits for its
  buckets at the end of backward, nor where FSDP2 waits for its all-gathers and
  reduce-scatters (synchronous on a CPU): a wait shows only as a stretch in which
  the main thread runs no op. Functional collectives do record theirs
  (``_c10d_functional::wait_tensor``).

The definitions, in that light:

in flight
    A collective is in flight from the start of the ``c10d::`` op that issues it
    to the end of its worker span. Its wait in the queue ends at the first worker
    span starting after the issue (gloo's workers take works in order), so no
    pairing of issues and spans is needed. A point-to-point op is in flight
    from its ``c10d::`` op to the end of its ``gloo:send`` / ``gloo:recv`` span.
    On a GPU the NCCL kernels (``nccl`` in the name; ``SendRecv`` ones are
    point-to-point) are the communication: that path is written from NCCL's
    kernel names, not tried on a GPU trace (this lab's machine has none).
computing
    The main thread computes at an instant when the innermost of its events
    open then is an op (``aten::...``, a DDP reducer copy, ...). The spans that
    only wrap other work do not count: record_function spans (the phases,
    ``FSDP::...``, ``Optimizer.step``, ...) and the autograd engine's
    ``autograd::engine::evaluate_function: X`` with the node ``X`` inside it
    (FSDP2's backward hooks, which gather and reduce, run there).
blocked
    With communication in flight, the main thread is blocked (a) inside a
    communication op (``c10d::...``, ``_c10d_functional::...``: issuing,
    waiting, a send or recv that waits for its peer; a CUDA synchronization),
    or (b) in any stretch of at least ``MIN_WAIT_S`` in which it runs no op.
    Issuing counts because on an oversubscribed CPU the main thread stalls
    there: waking gloo's worker costs it its core, and traces show
    ``c10d::allreduce_`` lasting as long as the all-reduce, or longer. Shorter
    stretches without ops are the interpreter's and the autograd engine's own
    time between ops (median 5-10 us, 99th percentile 70-160 us in DDP's and a
    single rank's traces whether or not anything is in flight) and stay with
    their phase: counting them would book milliseconds of DDP's backward, with
    its all-reduces in flight throughout, as exposed.
exposed_comm / bubble
    Blocked while a collective is in flight is exposed communication. In a
    pipeline step (one with a ``distlab:forward_backward`` span) point-to-point
    ops are not collectives: blocked while only they are in flight is the
    bubble, waiting for a peer's activation or gradient. Elsewhere
    point-to-point ops (context parallelism's ring) are communication.
overlapped_comm, comm_s
    ``comm_s`` is the union of the collectives' in-flight time in the step;
    ``overlapped_comm`` its part during which the main thread was not blocked.
    So ``exposed_comm + overlapped_comm == comm_s``.
the rest
    Time not blocked goes to its phase: ``data`` over ``optimizer`` over
    ``compute`` (forward, backward, forward_backward), and ``host`` outside
    every phase span. The six categories partition the ``distlab:step`` span, so
    they add up to ``wall_s``.

Known bias: gloo's worker closes its span after completing the work's future,
and on an oversubscribed CPU it can lose its core in between (seen: 5 ms after
the main thread had gone on), so the trace shows the collective in flight for
longer than it was. That inflates ``comm_s`` and ``overlapped_comm``, not
``exposed_comm``.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from distlab.measure.timeline import CATEGORIES, SPAN_PREFIX
from distlab.measure.timeline import PHASE_CATEGORY as PHASES

STEP_SPAN = SPAN_PREFIX + "step"
PHASE_CATEGORY = {SPAN_PREFIX + phase: category for phase, category in PHASES.items()}
"""The phase spans and the category their unblocked time goes to."""
PIPELINE_SPAN = SPAN_PREFIX + "forward_backward"

MIN_WAIT_S = 100e-6
"""The shortest stretch without an op, while communication is in flight, read as a wait."""

COMM_OP_PREFIXES = ("c10d::", "_c10d_functional::")
"""Ops that issue, wait for or run communication on the calling thread."""
SYNC_OPS = frozenset({"cudaStreamSynchronize", "cudaEventSynchronize", "cudaDeviceSynchronize"})
"""CUDA runtime calls in which the host waits for the device."""
P2P_OPS = frozenset({"c10d::send", "c10d::recv_", "c10d::recv_any_source_"})
P2P_SPANS = frozenset({"gloo:send", "gloo:recv"})
EVALUATE_FUNCTION = "autograd::engine::evaluate_function: "

Interval = tuple[float, float]


@contextmanager
def profiling_step(path: Path) -> Iterator[profile]:
    """Profile the block (one training step) and export its Chrome trace to ``path``.

    CPU activity, and CUDA's when a GPU is present; no shapes, stacks or memory,
    to keep the profiler's own cost small.
    """
    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        yield prof
    path.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(path))


def profiler_breakdown(trace: dict[str, Any] | Path) -> dict[str, Any]:
    """The time categories of the trace's ``distlab:step`` (the last, if several), in seconds.

    ``{"wall_s", "by_category": {category: s}, "overlapped_comm", "comm_s",
    "overlap_fraction"}``; the module's docstring defines each.
    """
    if isinstance(trace, Path):
        trace = json.loads(trace.read_text())
    # The host's span: on a GPU the profiler copies each record_function span onto the device's
    # timeline too (category gpu_user_annotation).
    steps = [
        e
        for e in trace["traceEvents"]
        if e.get("ph") == "X" and e["name"] == STEP_SPAN and e.get("cat") == "user_annotation"
    ]
    if not steps:
        raise ValueError(f"no {STEP_SPAN!r} span in the trace")
    step = max(steps, key=lambda e: e["ts"])
    # Times from the step's start: traces count microseconds since boot, where a double's
    # resolution (about 1 ns) would leave a closure error of 1e-8 of the step.
    origin, wall = step["ts"], step["dur"]
    events = [{**e, "ts": e["ts"] - origin} for e in trace["traceEvents"] if e.get("ph") == "X"]
    window = [(0.0, wall)]
    thread = (step["pid"], step["tid"])
    main = [
        e
        for e in events
        if (e["pid"], e["tid"]) == thread and e["ts"] < wall and e["ts"] + e["dur"] > 0
    ]
    running, in_comm_ops = _running_and_in_comm_ops(main)

    collectives, p2p = _in_flight(events, thread)
    communicating = _intersect(window, _union(collectives + p2p))
    quiet = _subtract(window, _union(running + in_comm_ops))
    long_quiet = [(a, b) for a, b in _intersect(quiet, communicating) if b - a >= MIN_WAIT_S * 1e6]
    blocked = _intersect(_union(in_comm_ops + long_quiet), communicating)

    phases: dict[str, list[Interval]] = {cat: [] for cat in ("data", "optimizer", "compute")}
    for e in main:
        if e["name"] in PHASE_CATEGORY:
            phases[PHASE_CATEGORY[e["name"]]].append((e["ts"], e["ts"] + e["dur"]))
    pipeline = any(e["name"] == PIPELINE_SPAN for e in main)
    timed = _intersect(window, _union(collectives if pipeline else collectives + p2p))

    micros = {
        "exposed_comm": _length(_intersect(blocked, timed)),
        "bubble": _length(_subtract(blocked, timed)),
    }
    rest = _subtract(window, blocked)
    for category in ("data", "optimizer", "compute"):
        spans = _union(phases[category])
        micros[category] = _length(_intersect(rest, spans))
        rest = _subtract(rest, spans)
    micros["host"] = _length(rest)
    comm_s = _length(timed) / 1e6
    overlapped = _length(_subtract(timed, blocked)) / 1e6
    return {
        "wall_s": wall / 1e6,
        "by_category": {cat: micros[cat] / 1e6 for cat in CATEGORIES},
        "overlapped_comm": overlapped,
        "comm_s": comm_s,
        "overlap_fraction": overlapped / comm_s if comm_s > 0 else None,
    }


def _running_and_in_comm_ops(
    main: list[dict[str, Any]],
) -> tuple[list[Interval], list[Interval]]:
    """When the innermost open event of the main thread is an op that computes, and when
    it is a communication op."""
    running: list[Interval] = []
    in_comm_ops: list[Interval] = []
    # Each open event: [end, where its own time goes (None: a wrapper), innermost since, name].
    stack: list[list[Any]] = []

    def own(kind: list[Interval] | None, start: float, end: float) -> None:
        if kind is not None and end > start:
            kind.append((start, end))

    def close_until(time: float) -> None:
        while stack and stack[-1][0] <= time:
            end, kind, since, _ = stack.pop()
            own(kind, since, end)
            if stack:
                stack[-1][2] = end

    for e in sorted(main, key=lambda e: (e["ts"], -e["dur"])):
        start = e["ts"]
        close_until(start)
        end = min(start + e["dur"], stack[-1][0]) if stack else start + e["dur"]
        parent_name = stack[-1][3] if stack else ""
        if stack:
            own(stack[-1][1], stack[-1][2], start)
        name = e["name"]
        if name.startswith(COMM_OP_PREFIXES) or name in SYNC_OPS:
            kind = in_comm_ops
        elif (
            e.get("cat") == "user_annotation"
            or name.startswith(EVALUATE_FUNCTION)
            or parent_name == EVALUATE_FUNCTION + name
        ):
            kind = None
        else:
            kind = running
        stack.append([end, kind, start, name])
    close_until(float("inf"))
    return running, in_comm_ops


def _in_flight(
    events: list[dict[str, Any]], thread: tuple[Any, Any]
) -> tuple[list[Interval], list[Interval]]:
    """The in-flight intervals of the collectives and of the point-to-point ops."""
    collectives: list[Interval] = []
    p2p: list[Interval] = []
    issues: list[float] = []
    for e in events:
        name, start, end = e["name"], e["ts"], e["ts"] + e["dur"]
        on_main = (e["pid"], e["tid"]) == thread
        if name in P2P_SPANS or (on_main and name in P2P_OPS):
            p2p.append((start, end))
        elif on_main and name.startswith("c10d::"):
            issues.append(start)
        elif name.startswith("gloo:") and not on_main:
            collectives.append((start, end))
        elif e.get("cat") == "kernel" and "nccl" in name.lower():
            (p2p if "SendRecv" in name else collectives).append((start, end))
    # Each collective starts running at the first worker span (or NCCL kernel) that starts
    # after its issue: gloo's workers take works in order, NCCL kernels run in stream order.
    starts = sorted(a for a, _ in collectives)
    for issue in issues:
        k = bisect.bisect_left(starts, issue)
        if k < len(starts):
            collectives.append((issue, starts[k]))
    return collectives, p2p


def _union(intervals: Iterable[Interval]) -> list[Interval]:
    merged: list[Interval] = []
    for a, b in sorted(intervals):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        elif b > a:
            merged.append((a, b))
    return merged


def _intersect(xs: list[Interval], ys: list[Interval]) -> list[Interval]:
    """Intersection of two unions (sorted, disjoint)."""
    out: list[Interval] = []
    i = j = 0
    while i < len(xs) and j < len(ys):
        a, b = max(xs[i][0], ys[j][0]), min(xs[i][1], ys[j][1])
        if b > a:
            out.append((a, b))
        if xs[i][1] < ys[j][1]:
            i += 1
        else:
            j += 1
    return out


def _subtract(xs: list[Interval], ys: list[Interval]) -> list[Interval]:
    """``xs`` minus ``ys``, both unions (sorted, disjoint)."""
    out: list[Interval] = []
    j = 0
    for a, b in xs:
        while j < len(ys) and ys[j][1] <= a:
            j += 1
        k = j
        while k < len(ys) and ys[k][0] < b:
            if ys[k][0] > a:
                out.append((a, ys[k][0]))
            a = max(a, ys[k][1])
            k += 1
        if b > a:
            out.append((a, b))
    return out


def _length(intervals: list[Interval]) -> float:
    return sum(b - a for a, b in intervals)
