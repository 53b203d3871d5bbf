"""torch's memory trackers, filing one step's bytes under the lab's categories.

``StepMemoryTracker`` runs a step inside torch's ``MemTracker`` (``FSDPMemTracker``
for FSDP2 models) and returns its ``StepMemory`` (``distlab.measure.step_memory``,
where the categories are described). Kept apart from that module because torch's
trackers import its compiler (0.7 s of CPU a process): only code that tracks a step
imports this one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import wraps
from typing import Any

import torch
from torch import nn
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker, _FSDPRefType
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType
from torch.distributed.fsdp import FSDPModule

from distlab.measure.step_memory import CATEGORIES, HeldTensors, StepMemory, cuda_peaks

LAB_CATEGORY = {
    _MemRefType.PARAM: "params",
    _MemRefType.BUFFER: "params",
    _MemRefType.GRAD: "grads",
    _MemRefType.ACT: "activations",
    _MemRefType.TEMP: "temporaries",
    _MemRefType.OPT: "optimizer",
    _MemRefType.OTH: "other",
    _FSDPRefType.SHARDED_PARAM: "params",
    _FSDPRefType.BUFFER: "params",
    _FSDPRefType.SHARDED_GRAD: "grads",
    _FSDPRefType.UNSHARDED_PARAM: "comm_buffers",
    _FSDPRefType.UNSHARDED_GRAD: "comm_buffers",
    _FSDPRefType.ALL_GATHER: "comm_buffers",
    _FSDPRefType.REDUCE_SCATTER: "comm_buffers",
    _FSDPRefType.ACT: "activations",
    _FSDPRefType.TEMP: "temporaries",
    _FSDPRefType.OPT: "optimizer",
    _FSDPRefType.INP: "other",
}
"""torch's tracker categories (plain and FSDP) to the lab's."""

MAX_TIMELINE_POINTS = 4000
"""Samples kept per step timeline; longer ones are thinned evenly (peak kept)."""


class _PhaseTimeline:
    """Mixin for torch's trackers: note the phase of the peak and sample a timeline."""

    _in_opt: bool
    _mod_tracker: Any
    _curr_mem_snap: dict[torch.device, dict[Any, int]]
    _peak_mem: dict[torch.device, int]

    def _start_timeline(self) -> None:
        self.after_backward = False
        self.samples: list[dict[str, Any]] = []
        self.peak_total = -1
        self.peak_phase = "forward"
        self.peak_split: dict[str, int] = dict.fromkeys(CATEGORIES, 0)
        self.last_total = -1

    def current_phase(self) -> str:
        """forward, backward or optimizer: where the step is now.

        Outside every module after a backward (gradient clipping, the optimizer
        step, zeroing gradients) counts as the optimizer phase; the next module
        forward (another micro-batch) starts a forward phase again.
        """
        if self._in_opt:
            return "optimizer"
        if self._mod_tracker.is_bw:
            self.after_backward = True
            return "backward"
        if len(self._mod_tracker.parents) > 1:
            self.after_backward = False
        return "optimizer" if self.after_backward else "forward"

    def forget_if_next_microbatch(self, module: nn.Module) -> None:
        """Drop an outermost module's stats when its forward runs again in one step.

        The root module runs once per micro-batch (accumulation, pipeline
        schedules); torch's trackers take a second call for a second iteration
        and refuse. Only the per-module statistics are dropped, never a tensor.
        """
        name = self._mod_tracker.get_known_fqn(module)
        tracked = self.memory_tracking  # type: ignore[attr-defined]
        outermost = set(self._mod_tracker.parents) - {name} == {"Global"}
        if module in tracked and outermost and not self._mod_tracker.is_bw:
            del tracked[module]

    def _pre_fw_hook(self, module: nn.Module, inputs: Any) -> None:
        self.forget_if_next_microbatch(module)
        super()._pre_fw_hook(module, inputs)  # type: ignore[misc]

    def _update_peak_stats(self, peak_state: Any) -> None:
        # After every op torch would also update each active module's peak (a loop over
        # every tracked module, with deep copies): the lab reads one peak, the step's, which
        # record_sample keeps. Skipping the per-module peaks makes a tracked step of the
        # tiny model 2x faster and changes no figure the lab reports.
        self.record_sample()

    def record_sample(self) -> None:
        """Add a timeline point if the total changed; remember the largest total's split."""
        split = dict.fromkeys(CATEGORIES, 0)
        total = 0
        for dev_snap in self._curr_mem_snap.values():
            for kind, size in dev_snap.items():
                if kind in LAB_CATEGORY:
                    split[LAB_CATEGORY[kind]] += size
                    total += size
        if total == self.last_total:
            return
        self.last_total = total
        phase = self.current_phase()
        self.samples.append({"phase": phase, **split})
        if total > self.peak_total:
            self.peak_total, self.peak_phase, self.peak_split = total, phase, split


class _PlainTracker(_PhaseTimeline, MemTracker):
    pass


class _FSDPTracker(_PhaseTimeline, FSDPMemTracker):
    def _fsdp_state_pre_forward(self, fsdp_mod: FSDPModule, orig: Callable) -> Callable:
        inner = super()._fsdp_state_pre_forward(fsdp_mod, orig)

        @wraps(inner)
        def next_microbatch_aware(*args: Any, **kwargs: Any) -> Any:
            self.forget_if_next_microbatch(fsdp_mod)
            return inner(*args, **kwargs)

        return next_microbatch_aware


class StepMemoryTracker:
    """Context manager around one training step that measures its memory.

    ::

        tracker = StepMemoryTracker(train_step.held_tensors(), device)
        with tracker:
            train_step.step(inputs, targets)
        step_memory = tracker.result()
    """

    def __init__(self, held: HeldTensors, device: torch.device) -> None:
        self.device = device
        optimizer = held.optimizers[0] if len(held.optimizers) == 1 else None
        if isinstance(held.fsdp_root, FSDPModule):
            self.tracker: _PlainTracker | _FSDPTracker = _FSDPTracker(held.fsdp_root, optimizer)
            kinds = _FSDPRefType
            others = [o for o in held.optimizers if o is not optimizer]
        else:
            self.tracker = _PlainTracker()
            kinds = _MemRefType
            others = list(held.optimizers)
            MemTracker.track_external(self.tracker, *held.modules)
        for opt in others:
            self.tracker._track_optimizer_states(kinds.OPT, opt)
        for category, tensors in held.by_category.items():
            self._file(tensors, _kind(kinds, category))
        if isinstance(held.fsdp_root, FSDPModule):
            self._file_gradients(held.modules, kinds.SHARDED_GRAD)
        self.tracker._start_timeline()

    def _file(self, tensors: Iterable[torch.Tensor], kind: Any) -> None:
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor):
                self.tracker._update_and_maybe_create_winfos(_local(tensor), kind)

    def _file_gradients(self, modules: list[nn.Module], kind: Any) -> None:
        for module in modules:
            self._file((p.grad for p in module.parameters() if p.grad is not None), kind)

    def __enter__(self) -> StepMemoryTracker:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.tracker.__enter__()
        self.tracker.record_sample()
        return self

    def __exit__(self, *exc: object) -> None:
        self.tracker.__exit__(*exc)

    def result(self) -> StepMemory:
        """The step's peak, its split and phase, and the thinned timeline."""
        tracker = self.tracker
        memory = StepMemory(
            peak=max(tracker.peak_total, 0),
            peak_by_category=dict(tracker.peak_split),
            peak_phase=tracker.peak_phase,
            timeline=thin(tracker.samples, MAX_TIMELINE_POINTS),
        )
        if self.device.type == "cuda":
            peaks = cuda_peaks(self.device)
            memory.cuda_peak_allocated = peaks["memory/cuda_peak_allocated"]
            memory.cuda_peak_reserved = peaks["memory/cuda_peak_reserved"]
        return memory


def _kind(kinds: Any, category: str) -> Any:
    """torch's category for a lab category (the first that maps to it)."""
    wanted = {
        "params": ("SHARDED_PARAM", "PARAM"),
        "grads": ("SHARDED_GRAD", "GRAD"),
        "optimizer": ("OPT",),
        "comm_buffers": ("REDUCE_SCATTER", "OTH"),
        "other": ("INP", "OTH"),
    }[category]
    for name in wanted:
        if hasattr(kinds, name):
            return getattr(kinds, name)
    raise KeyError(category)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard; any other tensor itself."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def thin(samples: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """At most ``limit`` samples, evenly spaced, always keeping the largest one."""
    if len(samples) <= limit:
        return samples
    totals = [sum(s[c] for c in CATEGORIES) for s in samples]
    top = max(range(len(samples)), key=totals.__getitem__)
    keep = {round(i * (len(samples) - 1) / (limit - 2)) for i in range(limit - 1)} | {top}
    return [samples[i] for i in sorted(keep)]
