"""Python numbers from one-element tensors, for what a step reports (loss, gradient norm).

A traced step (``distlab.train.trace``) runs on fake tensors: shapes and
storages without values. Reading a value from one raises; ``scalar`` returns
NaN instead, so the same step code serves real runs and traces.
"""

from __future__ import annotations

import math

import torch
from torch._subclasses.fake_tensor import FakeTensor


def scalar(value: torch.Tensor) -> float:
    """``float(value)``; NaN for a fake tensor, which has no value to read."""
    if isinstance(value, FakeTensor):
        return math.nan
    return float(value)
