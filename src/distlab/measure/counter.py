"""The per-process tally of collectives, read step by step (``counter().begin_step/end_step``).

Timing: a collective's time is from the call until its work's future
completes (gloo runs it on its own threads); a step's ``time_s`` is the union
of those in-flight intervals, so overlapped collectives are not counted twice.
Send/recv works have no future in gloo, so their time is not measured.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from distlab.measure.wire import KINDS


@dataclass
class KindTotals:
    """Calls, payload and wire bytes of one collective type."""

    calls: int = 0
    bytes: int = 0
    wire_bytes: float = 0.0

    def add(self, other: KindTotals) -> None:
        self.calls += other.calls
        self.bytes += other.bytes
        self.wire_bytes += other.wire_bytes


@dataclass
class CommStats:
    """What one rank sent during one step (or any other window)."""

    kinds: dict[str, KindTotals] = field(default_factory=dict)
    """Totals per collective type, summed over groups."""
    groups: dict[str, dict[str, KindTotals]] = field(default_factory=dict)
    """Totals per process group (its description, e.g. ``default_pg``, ``mesh_dp``) and type."""
    time_s: float | None = None
    """Union of the in-flight intervals of timed collectives (None: nothing timed)."""

    @property
    def calls(self) -> int:
        return sum(t.calls for t in self.kinds.values())

    @property
    def bytes(self) -> int:
        return sum(t.bytes for t in self.kinds.values())

    @property
    def wire_bytes(self) -> float:
        return sum(t.wire_bytes for t in self.kinds.values())

    def to_metrics(self, prefix: str = "comm/") -> dict[str, float]:
        """Flat metric keys: ``comm/bytes``, ``comm/wire_bytes``, ``comm/calls``,
        ``comm/time_s`` and ``comm/<kind>/{calls,bytes}`` for each type used."""
        out: dict[str, float] = {
            f"{prefix}calls": self.calls,
            f"{prefix}bytes": self.bytes,
            f"{prefix}wire_bytes": round(self.wire_bytes),
        }
        if self.time_s is not None:
            out[f"{prefix}time_s"] = self.time_s
        for kind in KINDS:
            totals = self.kinds.get(kind)
            if totals is not None and totals.calls:
                out[f"{prefix}{kind}/calls"] = totals.calls
                out[f"{prefix}{kind}/bytes"] = totals.bytes
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain data (summary.json): totals, per type and per group."""

        def plain(totals: KindTotals) -> dict[str, float]:
            return {
                "calls": totals.calls,
                "bytes": totals.bytes,
                "wire_bytes": round(totals.wire_bytes),
            }

        return {
            "calls": self.calls,
            "bytes": self.bytes,
            "wire_bytes": round(self.wire_bytes),
            "time_s": self.time_s,
            "kinds": {k: plain(v) for k, v in self.kinds.items()},
            "groups": {g: {k: plain(v) for k, v in ks.items()} for g, ks in self.groups.items()},
        }


def on_completion(work: Any, callback: Callable[[], None]) -> bool:
    """Call ``callback`` (on the backend's thread) when ``work`` completes, where the backend
    gives the work a future (gloo's send, recv and reduce-scatter have none); say whether."""
    try:
        future = work.get_future()
    except RuntimeError:  # no future for this work: its completion is not timed
        return False
    future.add_done_callback(lambda _future: callback())
    return True


def interval_union(intervals: Iterable[tuple[float, float]]) -> float:
    """Total length covered by a set of (start, end) intervals."""
    total, current_start, current_end = 0.0, None, None
    for start, end in sorted(intervals):
        if current_end is None or start > current_end:
            if current_end is not None:
                total += current_end - current_start
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    if current_end is not None:
        total += current_end - current_start
    return total


class CommCounter:
    """Process-wide tally of the collectives this rank issued, read step by step."""

    def __init__(self, timing: bool = True) -> None:
        self.timing = timing
        """Attach a completion callback to each work to time it (a few microseconds a call)."""
        self._lock = threading.Lock()
        self._totals: dict[tuple[str, str], KindTotals] = defaultdict(KindTotals)
        self._intervals: list[tuple[float, float]] = []
        self._mark: dict[tuple[str, str], KindTotals] = {}
        self._mark_time = 0.0

    def record(
        self, kind: str, group: str, payload: int, wire: float, work: Any | None = None
    ) -> None:
        """Count one collective; time it through ``work``'s future when there is one."""
        with self._lock:
            totals = self._totals[(kind, group)]
            totals.calls += 1
            totals.bytes += payload
            totals.wire_bytes += wire
        if self.timing and work is not None and kind not in ("send", "recv"):
            start = time.perf_counter()
            on_completion(work, lambda s=start: self._done(s))

    def _done(self, start: float) -> None:
        end = time.perf_counter()
        with self._lock:
            self._intervals.append((start, end))

    def totals(self) -> CommStats:
        """Everything counted since the process started."""
        with self._lock:
            return _stats(dict(self._totals), {}, None)

    def begin_step(self) -> None:
        """Start a measurement window (usually one optimizer step)."""
        with self._lock:
            self._mark = {key: _copy(t) for key, t in self._totals.items()}
            self._intervals = []
            self._mark_time = time.perf_counter()

    def end_step(self) -> CommStats:
        """Totals since ``begin_step`` (calls, bytes, wire bytes, in-flight time)."""
        with self._lock:
            current = dict(self._totals)
            intervals = [(s, e) for s, e in self._intervals if s >= self._mark_time]
            mark = self._mark
        time_s = interval_union(intervals) if self.timing else None
        return _stats(current, mark, time_s)


def _copy(totals: KindTotals) -> KindTotals:
    return KindTotals(totals.calls, totals.bytes, totals.wire_bytes)


def _stats(
    current: dict[tuple[str, str], KindTotals],
    mark: dict[tuple[str, str], KindTotals],
    time_s: float | None,
) -> CommStats:
    stats = CommStats(time_s=time_s)
    for (kind, group), totals in current.items():
        before = mark.get((kind, group), KindTotals())
        delta = KindTotals(
            totals.calls - before.calls,
            totals.bytes - before.bytes,
            totals.wire_bytes - before.wire_bytes,
        )
        if not delta.calls:
            continue
        stats.kinds.setdefault(kind, KindTotals()).add(delta)
        stats.groups.setdefault(group, {}).setdefault(kind, KindTotals()).add(delta)
    return stats


_COUNTER: CommCounter | None = None


def counter() -> CommCounter:
    """This process's counter (created on first use)."""
    global _COUNTER
    if _COUNTER is None:
        _COUNTER = CommCounter()
    return _COUNTER
