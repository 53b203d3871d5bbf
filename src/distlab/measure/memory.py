"""Per-rank model-state memory, measured from the tensors a rank actually holds."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.distributed.tensor import DTensor


@dataclass(frozen=True)
class ModelStateBytes:
    """Bytes one rank holds for the model's training state."""

    params: int
    grads: int
    optimizer: int

    @property
    def total(self) -> int:
        """Parameters + gradients + optimizer state."""
        return self.params + self.grads + self.optimizer

    def to_dict(self) -> dict[str, int]:
        """Plain data for metrics and summary.json."""
        return {**asdict(self), "total": self.total}


def measure_state_bytes(
    parameters: Iterable[torch.Tensor], optimizer_state: Mapping[Any, Mapping[str, Any]]
) -> ModelStateBytes:
    """Bytes of the parameters, their gradients and the tensors of an optimizer's state."""
    params = list(parameters)
    return ModelStateBytes(
        params=sum(tensor_bytes(p) for p in params),
        grads=sum(tensor_bytes(p.grad) for p in params if p.grad is not None),
        optimizer=sum(
            tensor_bytes(v)
            for state in optimizer_state.values()
            for v in state.values()
            if isinstance(v, torch.Tensor)
        ),
    )


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes of the part of ``tensor`` stored on this rank (a DTensor's local shard)."""
    if isinstance(tensor, DTensor):
        tensor = tensor.to_local()
    return tensor.numel() * tensor.element_size()


def peak_memory_bytes(device: torch.device) -> int:
    """This process's peak memory so far: max_memory_allocated on a GPU, peak RSS on a CPU.

    Peak RSS (``getrusage``'s ``ru_maxrss``) is the whole process (Python,
    torch, buffers, activations), not only the tensors; it never goes down.
    """
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS: bytes, Linux: KiB
