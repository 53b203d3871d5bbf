"""The pieces every strategy's training step is made of: bf16 casting (autocast, the
dtype of the activations a stage hands on), the language-model loss, micro-batches,
a mean over a process group, and the contexts in which backward reduces gradients or not.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import FSDPModule

from distlab.values import scalar


def casts_itself(module: nn.Module) -> bool:
    """Whether ``module`` runs its forward in its own compute dtype: an FSDP2 module.

    ``apply_fsdp`` gives FSDP2 the mixed-precision policy of ``--precision``, so
    an FSDP module casts its parameters (and inputs) itself and needs no autocast.
    """
    return isinstance(module, FSDPModule)


def autocast(
    device_type: str, precision: str, module: nn.Module
) -> contextlib.AbstractContextManager:
    """bf16 autocast when asked for, unless ``module`` casts itself; else a no-op context.

    Autocast keeps parameters fp32 and runs matmuls in bf16 (norms, softmax and
    the residual stream stay fp32); it serves every strategy but FSDP, whose
    ``MixedPrecisionPolicy`` runs the whole forward in bf16 instead.
    """
    if precision == "bf16" and not casts_itself(module):
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def activation_dtype(module: nn.Module, precision: str) -> torch.dtype:
    """The dtype of the residual stream ``module`` hands on (what a pipeline stage sends).

    bf16 under FSDP2's bf16 policy (parameters and so every op in bf16); fp32
    otherwise: autocast casts only matmul outputs to bf16, and adding them to
    the fp32 residual stream promotes back to fp32.
    """
    return torch.bfloat16 if precision == "bf16" and casts_itself(module) else torch.float32


def language_model_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy over all positions, computed in fp32.

    The logits are bf16 under bf16 precision (autocast's LM-head matmul, or
    FSDP's bf16 parameters); the cast keeps the softmax and the mean in fp32.
    """
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def micro_batches(
    inputs: torch.Tensor, targets: torch.Tensor, count: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's rows in ``count`` equal micro-batches (gradient accumulation's)."""
    return zip(inputs.chunk(count), targets.chunk(count), strict=True)


def mean_over_group(value: torch.Tensor, group: dist.ProcessGroup | None, size: int) -> float:
    """Average a scalar over a process group (gloo has no AVG, so SUM / size)."""
    if size > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM, group=group)
        value /= size
    return scalar(value)


GradientSync = Callable[[bool], contextlib.AbstractContextManager]
"""``sync(enabled)``: a context in which backward does (or skips) gradient reduction."""


def always_sync(enabled: bool) -> contextlib.AbstractContextManager:
    """For models with nothing to synchronise."""
    return contextlib.nullcontext()


@contextlib.contextmanager
def no_sync_unless(
    enabled: bool, no_sync: Callable[[], contextlib.AbstractContextManager]
) -> Iterator[None]:
    """Enter ``no_sync()`` unless ``enabled`` (helper for DDP-style wrappers)."""
    if enabled:
        yield
    else:
        with no_sync():
            yield
