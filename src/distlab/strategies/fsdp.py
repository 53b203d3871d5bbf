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
(``fully_shard.FsdpMicroBatchSync``):

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

``--precision bf16`` is FSDP2's mixed-precision policy (``fully_shard.mixed_precision``),
not autocast: parameters are gathered and computed in bf16 (half the gathered
bytes and memory), gradients reduced in fp32, the sharded state stays fp32.

``--offload params`` is FSDP2's CPU offload (``fully_shard.offload_policy``): the sharded
parameters, their gradients and so the optimizer state and step live in host
memory; each unit copies its shards to the device for the all-gather and its
reduce-scattered gradient shards back. FSDP2 offloads the three together, so
there is no ``optimizer``-only choice as in ZeRO-Offload.
"""

from __future__ import annotations

from torch import nn

from distlab.config import Config
from distlab.distributed import RankContext
from distlab.measure.memory import ModelStateBytes
from distlab.strategies.base import FSDP_OPTIONS, ModuleTrainStep, Strategy, TrainStep
from distlab.strategies.data_parallel import DataParallel
from distlab.strategies.fully_shard import FsdpMicroBatchSync, validate_offload
from distlab.strategies.parallel_dims import view
from distlab.strategies.parallelize import parallelize
from distlab.strategies.state_bytes import rank0_state_bytes


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
        mesh = self.build_mesh(config, ctx.device_type)
        dims = self.dims(config)
        sharded = parallelize(model, mesh, dims, config, self.data_parallel, ctx.device)
        return ModuleTrainStep(
            sharded,
            ctx,
            config,
            dp_rank=ctx.rank,
            dp_size=ctx.world_size,
            dp_group=view(mesh, "dp").get_group(),
            gradient_sync=FsdpMicroBatchSync(
                sharded, config.reshard_after_forward, config.reshard_between_microbatches
            ),
        )
