"""FSDP2 (``fully_shard``) applied to the GPT, and its per-micro-batch settings.

``apply_fsdp`` shards every transformer block, then the root, over a mesh
(``parallel_dims.fsdp_mesh``: 1-D for fsdp, 2-D for hsdp) with the mixed-precision policy
of ``--precision`` and the offload policy of ``--offload``; ``FsdpMicroBatchSync`` tells
FSDP2 what to keep gathered and when to reduce-scatter across the micro-batches of a
step; ``set_prefetch`` sets how many blocks ahead each unit gathers (``--prefetch``). Used by
``fsdp``, ``hsdp`` and the fsdp compositions through ``parallelize``.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)

from distlab.errors import DistlabError


def mixed_precision(precision: str) -> MixedPrecisionPolicy:
    """FSDP2's policy for ``--precision``: bf16 compute, fp32 gradient reduction; or all fp32.

    With bf16 each unit casts its fp32 shards to bf16 once, before the
    all-gather (half the gathered bytes), runs its forward and backward on the
    bf16 parameters, and casts the gradients to fp32 before the reduce-scatter,
    so the sharded gradients, the master weights and the optimizer state stay fp32.
    """
    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


OFFLOAD_CHOICES = ("none", "params")
"""What ``--offload`` may say to fsdp: nothing, or the sharded state to host memory."""


def offload_policy(offload: str, device_type: str) -> OffloadPolicy:
    """FSDP2's policy for ``--offload``: ``CPUOffloadPolicy`` for ``params``, else none.

    Pinned host memory lets the copies to and from a GPU run asynchronously;
    a CPU-only build cannot pin (``CPUOffloadPolicy()`` fails there), so on CPU
    the shards stay in ordinary memory and the copies are no-ops.
    """
    if offload == "params":
        return CPUOffloadPolicy(pin_memory=device_type == "cuda")
    return OffloadPolicy()


def validate_offload(offload: str) -> None:
    """One-line error unless ``offload`` is a choice FSDP2 has."""
    if offload == "optimizer":
        raise DistlabError(
            "--offload optimizer is not available with fsdp: FSDP2 offloads parameters, "
            "gradients and optimizer state together; use --offload params"
        )
    if offload not in OFFLOAD_CHOICES:
        raise DistlabError(
            f"offload must be one of {', '.join(OFFLOAD_CHOICES)} for fsdp (got '{offload}')"
        )


def apply_fsdp(
    model: nn.Module,
    mesh,
    reshard_after_forward: bool,
    precision: str,
    offload: OffloadPolicy | None = None,
) -> FSDPModule:
    """Shard every transformer block, then the root (embeddings, final norm, head).

    The root is never resharded after forward (FSDP2's default for it): backward
    starts with the root's LM head, so freeing its parameters at the end of
    forward would only mean gathering them again at once. ``precision`` picks
    the mixed-precision policy (``mixed_precision``); the train step then runs
    without autocast (``distlab.strategies.base.autocast``). ``offload``: FSDP2's
    offload policy (``offload_policy``; default none).
    """
    policy = mixed_precision(precision)
    offload = offload or OffloadPolicy()
    for block in model.blocks.values():
        fully_shard(
            block,
            mesh=mesh,
            reshard_after_forward=reshard_after_forward,
            mp_policy=policy,
            offload_policy=offload,
        )
    # None: FSDP2 keeps the root's parameters gathered from forward into backward.
    return fully_shard(
        model,
        mesh=mesh,
        reshard_after_forward=None if reshard_after_forward else False,
        mp_policy=policy,
        offload_policy=offload,
    )


def set_prefetch(root: FSDPModule, depth: int, asynchronous: bool) -> None:
    """Make every unit of ``apply_fsdp``'s model gather the ``depth`` blocks ahead of it
    (``--prefetch``), through FSDP2's ``set_modules_to_forward_prefetch`` and
    ``set_modules_to_backward_prefetch``.

    Forward: the root (whose embeddings run first) issues the all-gathers of blocks
    0..depth-1, block i those of blocks i+1..i+depth, before it computes. Backward, blocks
    in reverse: the root (whose LM head runs first) issues the last ``depth`` blocks',
    block k those of k-1..k-depth. A unit with nothing to prefetch keeps FSDP2's default:
    none in forward, the block next in backward order in backward (an empty list is
    FSDP2's "default"; it has no switch to turn backward prefetching off, so
    ``--prefetch 0`` still gathers one block ahead in backward).

    ``asynchronous`` (on a CPU): FSDP2's unshard then issues its all-gathers with
    ``async_op=True`` and waits for each only when its block starts (FSDP2's
    ``_set_unshard_async_op``). By default FSDP2 issues them with ``async_op=False``,
    relying on its CUDA all-gather stream for overlap; on gloo that all-gather blocks the
    rank where it is issued, so prefetching alone would only move each wait earlier.
    """
    blocks = list(root.blocks.values())
    root.set_modules_to_forward_prefetch(blocks[:depth])
    root.set_modules_to_backward_prefetch(blocks[::-1][:depth])
    for index, block in enumerate(blocks):
        block.set_modules_to_forward_prefetch(blocks[index + 1 : index + 1 + depth])
        block.set_modules_to_backward_prefetch(blocks[max(index - depth, 0) : index][::-1])
    if asynchronous:
        root._set_unshard_async_op(True)


def backward_prefetch_depth(prefetch: int | None) -> int:
    """How many blocks FSDP2 gathers ahead of the one in backward: ``--prefetch``, and at
    least FSDP2's default of one (``set_prefetch``: ``--prefetch 0`` keeps that one)."""
    return max(1, prefetch or 0)


class FsdpMicroBatchSync:
    """FSDP2's settings for each micro-batch of an optimizer step (a ``GradientSync``).

    Called before each micro-batch with whether it is the step's last. Every
    micro-batch but the last skips the reduce-scatter
    (``set_requires_gradient_sync(False)``: gradients accumulate unsharded). By
    default, also measured with ``distlab.measure``'s counter:

    - first micro-batch: parameters kept after backward
      (``set_reshard_after_backward(False)``); forward frees the blocks as
      configured (``reshard_after_forward``), so this micro-batch gathers what a
      one-micro-batch step gathers;
    - middle micro-batches: also kept after forward
      (``set_reshard_after_forward(False)`` on the blocks), so they gather nothing;
    - last micro-batch: kept after forward, resharded after backward, gradients
      reduce-scattered: the step ends sharded, as without accumulation.

    With one micro-batch per step it is first and last: FSDP's defaults.
    ``reshard_between_microbatches`` keeps FSDP's defaults for every micro-batch
    (gather again each time) and only skips the early reduce-scatters.
    """

    def __init__(
        self, model: FSDPModule, reshard_after_forward: bool, reshard_between_microbatches: bool
    ) -> None:
        self.model = model
        self.keep = not reshard_between_microbatches
        # apply_fsdp's units that free their parameters after forward: the blocks (not the root).
        self.resharding = (
            [unit for unit in model.modules() if isinstance(unit, FSDPModule) and unit is not model]
            if reshard_after_forward
            else []
        )
        self.first = True

    def __call__(self, last: bool) -> contextlib.AbstractContextManager:
        self.model.set_requires_gradient_sync(last)
        if self.keep:
            self.model.set_reshard_after_backward(last)
            for unit in self.resharding:
                unit.set_reshard_after_forward(self.first, recurse=False)
        self.first = last
        return contextlib.nullcontext()
