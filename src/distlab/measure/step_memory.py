"""Every byte one rank holds during a training step, measured by torch's own memory trackers.

This is distlab's *measured* memory: independent of the lab's theory. Each step
runs inside torch's ``MemTracker`` (``FSDPMemTracker`` for FSDP2 models), a
``TorchDispatchMode`` that sees every tensor the step creates, on CPU as on a
GPU, and files its storage (once, however many views share it) under a
category. The lab folds torch's categories into its own:

==============  ==========================================================
params          parameters and buffers as the rank keeps them (FSDP: its
                shards; DeepSpeed: its flat parameter buffers)
grads           gradients (FSDP: the sharded ones; DeepSpeed: gradient
                partitions and reduction buckets)
optimizer       optimizer state (DeepSpeed: also the fp32 master slice), and
                anything the optimizer step allocates
activations     tensors created in forward (saved for backward, or alive
                across a module boundary)
temporaries     tensors created in backward and freed within it
comm_buffers    FSDP's gathered parameters, unsharded gradients, and its
                all-gather and reduce-scatter buffers
other           anything else registered before the step (the batch)
==============  ==========================================================

``StepMemory`` holds the result of one step: the peak total and its split by
category at that moment, the phase (forward, backward, optimizer) in which it
happened, and a timeline of the current bytes by category, one sample each
time the total changes, for the memory picture.

This module holds the categories and the results; the trackers that measure a
step are in ``distlab.measure.step_tracker``, imported only where a step is
tracked (torch's trackers import its compiler: 0.7 s of CPU in every process
that imports them, a rank restarted by a fault among them).

On CUDA the caching allocator keeps its own count: ``cuda_peak_allocated`` and
``cuda_peak_reserved`` (``torch.cuda.memory_stats`` since the step began) come
with every step as a second, coarser measurement.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

CATEGORIES = (
    "params",
    "grads",
    "optimizer",
    "activations",
    "temporaries",
    "comm_buffers",
    "other",
)
"""The lab's memory categories, in the order tables and pictures show them."""

PHASES = ("forward", "backward", "optimizer")
"""The parts of a step a peak is attributed to."""


@dataclass
class HeldTensors:
    """What a train step holds between steps, for the tracker to file before it starts.

    ``modules``: models whose parameters, buffers and gradients are tracked;
    ``optimizers``: torch optimizers whose state is tracked; ``fsdp_root``: the
    outermost FSDP2 module, when the model is FSDP-sharded (switches to
    ``FSDPMemTracker``); ``by_category``: further tensors a library keeps
    outside those (DeepSpeed's flat buffers), keyed by lab category.
    """

    modules: list[nn.Module] = field(default_factory=list)
    optimizers: list[torch.optim.Optimizer] = field(default_factory=list)
    fsdp_root: nn.Module | None = None
    by_category: dict[str, list[torch.Tensor]] = field(default_factory=dict)


@dataclass
class StepMemory:
    """One rank's measured memory of one step."""

    peak: int
    peak_by_category: dict[str, int]
    peak_phase: str
    timeline: list[dict[str, Any]]
    cuda_peak_allocated: int | None = None
    cuda_peak_reserved: int | None = None

    def to_metrics(self) -> dict[str, Any]:
        """Flat metrics: ``memory/peak``, ``memory/peak/<category>``, ``memory/peak_phase``."""
        metrics: dict[str, Any] = {"memory/peak": self.peak, "memory/peak_phase": self.peak_phase}
        metrics.update({f"memory/peak/{k}": v for k, v in self.peak_by_category.items()})
        if self.cuda_peak_allocated is not None:
            metrics["memory/cuda_peak_allocated"] = self.cuda_peak_allocated
            metrics["memory/cuda_peak_reserved"] = self.cuda_peak_reserved
        return metrics


def cuda_peaks(device: torch.device) -> dict[str, int]:
    """The caching allocator's peak allocated and reserved bytes since its last reset."""
    stats = torch.cuda.memory_stats(device)
    return {
        "memory/cuda_peak_allocated": int(stats.get("allocated_bytes.all.peak", 0)),
        "memory/cuda_peak_reserved": int(stats.get("reserved_bytes.all.peak", 0)),
    }
