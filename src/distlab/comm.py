"""Communication accounting: every collective a rank issues, counted where it enters gloo.

Counting calls made from distlab's own code would miss most of the traffic:
DDP's reducer (C++), FSDP2's all-gathers and reduce-scatters, DTensor's
functional collectives (C++ ops), the pipeline schedules' send/recv and
DeepSpeed all talk to the ``ProcessGroup`` object directly. So the counter sits
there: ``register_backend()`` registers a c10d backend called
``distlab_gloo`` whose process groups are a Python subclass of
``torch.distributed.ProcessGroup`` (pybind trampoline, so C++ callers reach the
Python methods too). Each collective method records (kind, payload bytes,
estimated bytes on the wire, start time) and hands the call to a plain C++
``ProcessGroup`` holding a real ``ProcessGroupGloo``, which runs it exactly as
``backend="gloo"`` would. Sub-groups (device meshes, ``new_group``) get the same
backend, so their traffic is counted too, labelled with the group's description.

Payload bytes follow the nccl-tests convention, the size of the whole buffer:
all-reduce and broadcast: the tensor; all-gather: the gathered output;
reduce-scatter: the (unreduced) input; send/recv: the message. Wire bytes are
what this rank sends over TCP under gloo's algorithms (``wire_bytes``), checked
against the kernel's per-socket byte counters (``tcp_bytes_sent``) in
``tests/test_comm.py``.

Timing: a collective's time is from the call until its work's future
completes (gloo runs it on its own threads); a step's ``time_s`` is the union
of those in-flight intervals, so overlapped collectives are not counted twice.
Send/recv works have no future in gloo, so their time is not measured.

Use (one call per rank process, before ``init_process_group``)::

    backend = comm.register_backend()          # "distlab_gloo"
    dist.init_process_group(backend, ...)
    counter = comm.counter()
    counter.begin_step(); ...step...; stats = counter.end_step()
    stats.to_metrics()  # {"comm/bytes": ..., "comm/all_reduce/bytes": ..., ...}
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

BACKEND = "distlab_gloo"
"""Name of the counting backend (gloo underneath) passed to ``init_process_group``."""

KINDS = (
    "all_reduce",
    "all_gather",
    "reduce_scatter",
    "broadcast",
    "send",
    "recv",
    "all_to_all",
    "reduce",
    "gather",
    "scatter",
    "barrier",
)
"""Collective types, in the order tables show them."""


# --- What goes over the wire --------------------------------------------------------


def wire_bytes(kind: str, payload: int, group_size: int, relative_rank: int = 0) -> float:
    """Bytes this rank sends for one collective under gloo's algorithms (group of N).

    Measured with the kernel's TCP counters (``tests/test_comm.py``; 2 and 4
    ranks, within 0.1 %): all-reduce is a ring (reduce-scatter then
    all-gather), 2 (N-1)/N of the buffer per rank; all-gather is a ring,
    (N-1)/N of the gathered output. gloo's reduce-scatter is an all-reduce of
    the whole input followed by a local slice, so it sends 2 (N-1)/N of the
    input, twice what a ring reduce-scatter (NCCL) sends. Broadcast is a
    binomial tree: a rank sends the buffer once per child, and the ranks
    together send it N-1 times. ``relative_rank`` is (rank - root) mod N for
    rooted collectives.
    """
    n = group_size
    if n <= 1:
        return 0.0
    if kind in ("all_reduce", "reduce_scatter"):
        return 2.0 * (n - 1) / n * payload
    if kind in ("all_gather", "all_to_all"):
        return (n - 1) / n * payload
    if kind == "broadcast":
        return float(payload * binomial_children(relative_rank, n))
    if kind == "send":
        return float(payload)
    if kind in ("reduce", "gather"):
        return 0.0 if relative_rank == 0 else float(payload)
    if kind == "scatter":
        return float(payload * (n - 1)) if relative_rank == 0 else 0.0
    return 0.0


def binomial_children(relative_rank: int, n: int) -> int:
    """Children of a rank in a binomial broadcast tree over n ranks rooted at 0.

    Rank r receives in the round given by its highest bit and then sends to
    r + 2^k for every later round k while that rank exists.
    """
    k = relative_rank.bit_length()
    children = 0
    while relative_rank + (1 << k) < n:
        children += 1
        k += 1
    return children


# --- Per-step totals ------------------------------------------------------------------


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
            try:
                future = work.get_future()
            except RuntimeError:  # backend without futures for this work
                return
            future.add_done_callback(lambda _f, s=start: self._done(s))

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


# --- The counting process group -------------------------------------------------------


def _nbytes(tensors: Any) -> int:
    """Bytes of a tensor, or of every tensor in (nested) lists of them."""
    if isinstance(tensors, torch.Tensor):
        return tensors.numel() * tensors.element_size()
    if isinstance(tensors, (list, tuple)):
        return sum(_nbytes(t) for t in tensors)
    return 0


def _root_rank(args: Sequence[Any], kwargs: dict[str, Any]) -> int | None:
    opts = args[1] if len(args) > 1 else kwargs.get("opts")
    return getattr(opts, "rootRank", None)


# method name -> (kind, which positional argument holds the payload)
_METHODS: dict[str, tuple[str, int]] = {
    "allreduce": ("all_reduce", 0),
    "allreduce_coalesced": ("all_reduce", 0),
    "broadcast": ("broadcast", 0),
    "reduce": ("reduce", 0),
    "allgather": ("all_gather", 0),
    "allgather_coalesced": ("all_gather", 0),
    "allgather_into_tensor_coalesced": ("all_gather", 0),
    "_allgather_base": ("all_gather", 0),
    "all_gather_single": ("all_gather", 0),
    "all_gather_single_coalesced": ("all_gather", 0),
    "reduce_scatter": ("reduce_scatter", 1),
    "_reduce_scatter_base": ("reduce_scatter", 1),
    "reduce_scatter_single": ("reduce_scatter", 1),
    "reduce_scatter_tensor_coalesced": ("reduce_scatter", 1),
    "reduce_scatter_single_coalesced": ("reduce_scatter", 1),
    "alltoall": ("all_to_all", 1),
    "alltoall_base": ("all_to_all", 1),
    "all_to_all_single": ("all_to_all", 1),
    "gather": ("gather", 1),
    "scatter": ("scatter", 0),
    "send": ("send", 0),
    "recv": ("recv", 0),
    "recv_anysource": ("recv", 0),
    "barrier": ("barrier", -1),
}


_ROOTED = ("broadcast", "reduce", "gather", "scatter")


class CountingProcessGroup(dist.ProcessGroup):
    """A process group that counts every collective, then runs it on a real gloo backend.

    It is a Python subclass of ``ProcessGroup`` (so DDP's reducer, functional
    collectives and every other C++ caller land in the Python methods), and it
    forwards each call to ``self._delegate``: a plain C++ ``ProcessGroup``
    whose only backend is the ``ProcessGroupGloo`` created here, so the call
    runs exactly as it would in a ``backend="gloo"`` group. The gloo backend is
    also registered on this group, for callers that ask for the backend itself.
    """

    def __init__(self, store: Any, rank: int, size: int, timeout: Any) -> None:
        super().__init__(rank, size)
        gloo = dist.ProcessGroupGloo(store, rank, size, timeout)
        cpu, kind = torch.device("cpu"), dist.ProcessGroup.BackendType.GLOO
        self._register_backend(cpu, kind, gloo)
        delegate = dist.ProcessGroup(rank, size)
        delegate._register_backend(cpu, kind, gloo)
        delegate._set_default_backend(kind)
        self._gloo = gloo
        self._delegate = delegate
        self._label: str | None = None

    def getBackendName(self) -> str:  # noqa: N802 - the C++ virtual's name
        return "gloo"

    def _group_label(self) -> str:
        if self._label is None:
            desc = getattr(self, "group_desc", "") or ""
            label = desc if desc and desc != "undefined" else (self.group_name or "group")
            self._label = f"{label}[{self.size()}]"
        return self._label


def _counted(name: str, kind: str, payload_arg: int) -> Callable[..., Any]:
    def method(self: CountingProcessGroup, *args: Any, **kwargs: Any) -> Any:
        work = getattr(self._delegate, name)(*args, **kwargs)
        payload = _nbytes(args[payload_arg]) if payload_arg >= 0 and args else 0
        size = self.size()
        relative = 0
        if kind in _ROOTED:
            relative = (self.rank() - (_root_rank(args, kwargs) or 0)) % size
        wire = wire_bytes(kind, payload, size, relative)
        counter().record(kind, self._group_label(), payload, wire, work)
        return work

    method.__name__ = name
    return method


for _name, (_kind, _arg) in _METHODS.items():
    setattr(CountingProcessGroup, _name, _counted(_name, _kind, _arg))


def _create(store: Any, rank: int, size: int, timeout: Any) -> CountingProcessGroup:
    return CountingProcessGroup(store, rank, size, timeout)


def register_backend() -> str:
    """Make ``distlab_gloo`` available to ``init_process_group`` in this process; return it."""
    if BACKEND.upper() not in dist.Backend._plugins:
        dist.Backend.register_backend(BACKEND, _create, devices=["cpu"])
    return BACKEND


def is_counting(group: Any = None) -> bool:
    """Whether collectives on ``group`` (default: the world) are being counted."""
    if not dist.is_available() or not dist.is_initialized():
        return False
    group = group or dist.group.WORLD
    return isinstance(group, CountingProcessGroup)


def backend_for(device_type: str, count: bool = True) -> str:
    """The backend ``init_process_group`` should use: counted gloo on CPU, else gloo/nccl."""
    if device_type == "cuda":
        return "nccl"
    return register_backend() if count else "gloo"


# --- An independent check: the kernel's TCP byte counters -------------------------------

_SS_FIELDS = re.compile(r"(bytes_acked|bytes_received|bytes_sent):(\d+)")
_SS_PID = re.compile(r"pid=(\d+)")


@dataclass(frozen=True)
class TcpBytes:
    """Bytes the kernel counted on one process's TCP sockets to 127.0.0.1."""

    sent: int
    """Acknowledged bytes sent (``bytes_acked``: excludes retransmissions)."""
    received: int
    sockets: int

    def __sub__(self, other: TcpBytes) -> TcpBytes:
        return TcpBytes(self.sent - other.sent, self.received - other.received, self.sockets)


def tcp_bytes(pid: int, exclude_ports: Iterable[int] = ()) -> TcpBytes:
    """Per-socket counters from ``ss -tinp`` summed over ``pid``'s loopback TCP sockets.

    ``exclude_ports`` leaves out connections to or from those ports (the
    rendezvous store, for instance), so only gloo's pair connections remain.
    """
    output = subprocess.run(
        ["ss", "-tinpH", "state", "established"], capture_output=True, text=True, check=True
    ).stdout
    return parse_ss(output, pid, exclude_ports)


def parse_ss(output: str, pid: int, exclude_ports: Iterable[int] = ()) -> TcpBytes:
    """Sum ``bytes_acked``/``bytes_received`` of ``pid``'s 127.0.0.1 sockets in ``ss -tinpH``.

    Each socket is a line with the addresses and ``users:((...,pid=N,...))``
    followed by an indented line of counters.
    """
    excluded = {str(p) for p in exclude_ports}
    sent = received = sockets = 0
    lines = output.splitlines()
    for index, line in enumerate(lines):
        if line.startswith(("\t", " ")) or index + 1 >= len(lines):
            continue
        if pid not in {int(p) for p in _SS_PID.findall(line)} or "127.0.0.1" not in line:
            continue
        ports = {addr.rsplit(":", 1)[-1] for addr in line.split() if addr.count(":") == 1}
        if ports & excluded:
            continue
        fields = dict(_SS_FIELDS.findall(lines[index + 1]))
        sent += int(fields.get("bytes_acked", 0))
        received += int(fields.get("bytes_received", 0))
        sockets += 1
    return TcpBytes(sent, received, sockets)
