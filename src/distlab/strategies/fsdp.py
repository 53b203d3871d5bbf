"""``fsdp``: fully sharded data parallelism with FSDP2 (``fully_shard``).

Each transformer block, and then the root model, becomes an FSDP unit whose
parameters, gradients and optimizer state are split evenly (dim 0) across
ranks as DTensors. Before a unit's forward its parameters are all-gathered;
after backward its gradients are reduce-scattered so each rank keeps (and
updates) only its shard.

``reshard_after_forward`` chooses between the ZeRO stages: True frees the
gathered parameters after forward and gathers them again for backward (ZeRO-3:
parameters sharded at rest); False keeps them from forward to backward
(ZeRO-2-like: less communication, more memory during the step).

Gradient accumulation (``--micro-batch``, A micro-batches per step): the
gradients of every micro-batch accumulate unsharded on each rank and are
reduce-scattered once, in the last backward. What happens to the gathered
parameters between micro-batches is a memory/communication trade
(``FsdpMicroBatchSync``):

- default: they stay gathered from the first micro-batch's backward to the
  last one's, so a step gathers what a one-micro-batch step gathers, whatever
  A. During the step a rank holds the full parameters (4P bytes) besides the
  full accumulated gradients (4P).
- ``--reshard-between-microbatches`` (ZeRO-3's choice): every micro-batch
  gathers again and frees after its backward, so a rank holds only one unit's
  parameters gathered at a time (4P less during the step), for A times the
  all-gather traffic.

Either way the parameters are resharded when the step's last backward ends:
at rest (optimizer step, checkpoints) a rank holds only its shards.

Memory per rank: 16 / N bytes per parameter with fp32 AdamW (everything sharded).
Communication per step: all-gather of the parameters in forward (and again in
backward when resharding), once per step (default) or once per micro-batch
(``--reshard-between-microbatches``), plus one reduce-scatter of the gradients.

``--precision bf16`` is FSDP2's mixed-precision policy (``mixed_precision``),
not autocast: parameters are gathered and computed in bf16 (half the gathered
bytes and memory), gradients reduced in fp32, the sharded state stays fp32.

``--offload params`` is FSDP2's CPU offload (``offload_policy``): the sharded
parameters, their gradients and so the optimizer state and step live in host
memory; each unit copies its shards to the device for the all-gather and its
reduce-scattered gradient shards back. FSDP2 offloads the three together, so
there is no ``optimizer``-only choice as in ZeRO-Offload.
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

from distlab.config import Config
from distlab.distributed import RankContext
from distlab.errors import DistlabError
from distlab.measure.memory import ModelStateBytes
from distlab.strategies.activation_checkpoint import apply_ac
from distlab.strategies.base import FSDP_OPTIONS, ModuleTrainStep, Strategy, TrainStep
from distlab.strategies.data_parallel import DataParallel
from distlab.strategies.parallel_dims import fsdp_mesh, rank0_state_bytes
from distlab.strategies.regional_compile import apply_compile


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


class FSDPStrategy(Strategy):
    """Shard parameters, gradients and optimizer state across all ranks."""

    name = "fsdp"
    summary = (
        "FSDP2 fully_shard per block: params, grads, optimizer state sharded "
        "(ZeRO-3; ZeRO-2-like with --no-reshard-after-forward; --offload params)"
    )
    options = FSDP_OPTIONS | {"offload"}
    """The compositions share ``FSDP_OPTIONS`` but not ``offload``: they refuse it."""
    data_parallel = DataParallel.FSDP
    trains_moe = True

    def validate(self, config: Config) -> None:
        validate_offload(config.offload)

    def predicted_state_bytes(self, config: Config, n_params: int) -> ModelStateBytes:
        """16 N / n with fp32 AdamW, tensor by tensor: rank 0 holds each parameter's first
        ceil(rows / n) rows (FSDP2 pads the last ranks' shards, never rank 0's)."""
        return rank0_state_bytes(config, self.dims(config), self.data_parallel)

    def prepare(self, model: nn.Module, ctx: RankContext, config: Config) -> TrainStep:
        ctx.place(model)
        mesh = fsdp_mesh(self.build_mesh(config, ctx.device_type), self.dims(config))
        apply_ac(model, config.ac)  # before fully_shard, like compile
        if config.compile:
            apply_compile(model)  # before fully_shard: its hooks stay outside the graphs
        sharded = apply_fsdp(
            model,
            mesh,
            config.reshard_after_forward,
            config.precision,
            offload_policy(config.offload, ctx.device_type),
        )
        return ModuleTrainStep(
            sharded,
            ctx,
            config,
            dp_rank=ctx.rank,
            dp_size=ctx.world_size,
            dp_group=mesh.get_group(),
            gradient_sync=FsdpMicroBatchSync(
                sharded, config.reshard_after_forward, config.reshard_between_microbatches
            ),
        )
