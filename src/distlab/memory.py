"""Per-rank model-state memory, measured from the tensors a rank actually holds."""

from __future__ import annotations

from dataclasses import asdict, dataclass

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


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes of the part of ``tensor`` stored on this rank (a DTensor's local shard)."""
    if isinstance(tensor, DTensor):
        tensor = tensor.to_local()
    return tensor.numel() * tensor.element_size()
