"""Counting every collective a rank issues, where it enters gloo: the ``distlab_gloo`` backend.

Counting calls made from distlab's own code would miss most of the traffic:
DDP's reducer (C++), FSDP2's all-gathers and reduce-scatters, DTensor's
functional collectives (C++ ops), the pipeline schedules' send/recv and
DeepSpeed all talk to the ``ProcessGroup`` object directly. So the counter sits
there: ``register_backend()`` registers a c10d backend called
``distlab_gloo`` whose process groups are a Python subclass of
``torch.distributed.ProcessGroup`` (pybind trampoline, so C++ callers reach the
Python methods too). Each collective method records (kind, payload bytes,
estimated bytes on the wire, start time) in the process's ``counter()`` and
hands the call to a plain C++ ``ProcessGroup`` holding a real
``ProcessGroupGloo``, which runs it exactly as ``backend="gloo"`` would.
Sub-groups (device meshes, ``new_group``) get the same backend, so their
traffic is counted too, labelled with the group's description.

Use (one call per rank process, before ``init_process_group``)::

    backend = register_backend()          # "distlab_gloo"
    dist.init_process_group(backend, ...)
    counter().begin_step(); ...step...; stats = counter().end_step()
    stats.to_metrics()  # {"comm/bytes": ..., "comm/all_reduce/bytes": ..., ...}
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.distributed as dist

from distlab.measure import timeline
from distlab.measure.counter import counter, on_completion
from distlab.measure.wire import wire_bytes

BACKEND = "distlab_gloo"
"""Name of the counting backend (gloo underneath) passed to ``init_process_group``."""


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


def _own_split_bytes(tensor: torch.Tensor, input_splits: Sequence[int], rank: int) -> int:
    """Bytes of an unequal all-to-all's input that stay on ``rank`` (its own split).

    With unequal splits (expert parallelism's token dispatch) a rank sends
    every other rank its split directly, so it puts the input less its own split
    on the wire, not the (N-1)/N of equal splits (``wire_bytes``).
    """
    rows = tensor.shape[0] if tensor.dim() else 0
    return input_splits[rank] * (_nbytes(tensor) // rows) if rows else 0


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


class WaitTimedWork(dist.Work):
    """A work gloo gives no future (send, recv, reduce-scatter), as a time-tracked step hands
    it to its caller: the collective counts as done when the caller's ``wait()`` returns,
    and the rank's thread as communicating while it waits.

    Without a future nothing reports the moment gloo finishes it, so the timeline takes
    the end of the wait: the time the rank was blocked in the wait is exact, and the
    collective may have finished before the wait began (its overlap with what the rank
    did meanwhile is an upper bound). Python callers (FSDP2, the pipeline schedules)
    and C++ ones (functional collectives, through the process group's trampoline) both
    reach this ``wait``.
    """

    def __init__(
        self, work: dist.Work, waiting: Callable[[], AbstractContextManager[None]]
    ) -> None:
        super().__init__()
        self._work = work
        self._waiting = waiting

    def wait(self, timeout: Any = None) -> bool:
        with self._waiting():
            return self._work.wait() if timeout is None else self._work.wait(timeout)

    def is_completed(self) -> bool:
        return self._work.is_completed()

    def is_success(self) -> bool:
        return self._work.is_success()

    def exception(self) -> Any:
        return self._work.exception()

    def source_rank(self) -> int:
        return self._work.source_rank()

    def result(self) -> list[torch.Tensor]:
        return self._work.result()

    def synchronize(self) -> None:
        self._work.synchronize()


def _counted(name: str, kind: str, payload_arg: int) -> Callable[..., Any]:
    def method(self: CountingProcessGroup, *args: Any, **kwargs: Any) -> Any:
        payload = _nbytes(args[payload_arg]) if payload_arg >= 0 and args else 0
        step = timeline.active()  # a time-tracked step (--track-time) records the call
        issued = step.issued(kind, self._group_label(), payload) if step is not None else None
        work = getattr(self._delegate, name)(*args, **kwargs)
        returned = work
        if issued is not None:
            step.returned(issued)
            if not on_completion(work, lambda: step.done(issued)):
                returned = WaitTimedWork(work, lambda: step.waiting(issued))
        size = self.size()
        relative = 0
        if kind in _ROOTED:
            relative = (self.rank() - (_root_rank(args, kwargs) or 0)) % size
        wire = wire_bytes(kind, payload, size, relative)
        if name in ("alltoall_base", "all_to_all_single") and len(args) > 3 and args[3]:
            wire = payload - _own_split_bytes(args[1], args[3], self.rank())
        counter().record(kind, self._group_label(), payload, wire, work)
        return returned

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
