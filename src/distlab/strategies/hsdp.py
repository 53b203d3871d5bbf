"""``hsdp``: hybrid sharded data parallelism, FSDP2 on a 2-D (replicate, shard) mesh.

The R x S ranks (``--dp-replicate R --dp-shard S``, R S = ``--nproc``) form
R replica groups of S ranks each. Inside a group the model is sharded exactly
as under ``fsdp`` (ZeRO-3: parameters, gradients and optimizer state split
along dim 0 over the S ranks); every group holds the same shards, so across
groups the model is replicated as under ``ddp``. With R = 2, S = 2 (rank =
r S + s)::

                  shard 0    shard 1
    replica 0     rank 0     rank 1      <- one full copy, split in two
    replica 1     rank 2     rank 3      <- the same copy, split the same way
                    |          |
                 all-reduce  all-reduce  (gradient shards, across replicas)

Every rank trains its own rows of the global batch (R S data-parallel ranks).
One step, per FSDP unit (each transformer block, then the root):

- all-gather the parameters within the shard group (S ranks), in forward and,
  resharding after forward, again in backward, as ``fsdp`` does;
- reduce-scatter the gradients within the shard group: each rank gets the sum
  of its group's gradients for its 1/S shard;
- all-reduce that shard across the R ranks holding the same shard, so it sums
  over every rank of the run; FSDP2 divides by R S, the mean.

Memory per rank: 16 N / S bytes for N parameters with fp32 AdamW (4 params +
4 grads + 8 optimizer state, split S ways), not 16 N / (R S): adding replica
groups buys throughput, not memory.
Communication per step: all-gather + reduce-scatter of 4 N over S ranks (as
``fsdp`` on S ranks) plus an all-reduce of the 4 N / S gradient shard over R
ranks (``distlab.theory.comm``).

When to use it: when the model state fits in S ranks' memory but the run has
more ranks than that, and the links between groups are slower than within a
group (several nodes: S = the GPUs of one node, R = the nodes). The chatty
per-unit all-gathers and reduce-scatters then stay on the fast intra-node
links, and only one all-reduce of 1/S of the gradients per unit crosses nodes,
where ``fsdp`` over all R S ranks would gather every parameter across them.

Everything else is ``fsdp``'s: ``fully_shard.apply_fsdp`` (given the 2-D mesh, FSDP2's
``fully_shard`` shards over its last dimension and replicates over the first),
``FsdpMicroBatchSync`` for gradient accumulation, the bf16 mixed-precision
policy, ``--no-reshard-after-forward``, ``--ac`` and ``--compile``.

Defaults: ``--dp-shard S`` alone takes R = nproc / S and ``--dp-replicate R``
alone S = nproc / R; with neither, R = 2 when ``--nproc`` is even and at least
4 (the smallest real hybrid), else R = 1 (S = nproc: plain ``fsdp``).
"""

from __future__ import annotations

from torch import nn

from distlab.config import Config
from distlab.distributed import RankContext
from distlab.measure.memory import ModelStateBytes
from distlab.strategies.base import FSDP_OPTIONS, ModuleTrainStep, Strategy, TrainStep
from distlab.strategies.data_parallel import DataParallel
from distlab.strategies.degrees import hsdp_dims
from distlab.strategies.fully_shard import FsdpMicroBatchSync
from distlab.strategies.parallel_dims import ParallelDims
from distlab.strategies.parallelize import parallelize
from distlab.strategies.state_bytes import rank0_state_bytes


class HSDPStrategy(Strategy):
    """FSDP within each group of S ranks, DDP-style replication across the R groups."""

    name = "hsdp"
    summary = (
        "hybrid FSDP2: ZeRO-3 within --dp-shard ranks, replicated over --dp-replicate "
        "groups (gradient shards all-reduced across them)"
    )
    options = FSDP_OPTIONS | {"dp_replicate", "dp_shard"}
    data_parallel = DataParallel.FSDP
    """Modelled as fsdp over the shard degree (``ParallelDims.shard``), plus the replicas'
    all-reduce (``distlab.theory.comm``)."""

    def dims(self, config: Config) -> ParallelDims:
        return hsdp_dims(config)

    def predicted_state_bytes(self, config: Config, n_params: int) -> ModelStateBytes:
        """16 N / S with fp32 AdamW, tensor by tensor as under fsdp (``rank0_state_bytes``)."""
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
            dp_rank=ctx.rank,  # every rank trains its own rows: R S data-parallel ranks
            dp_size=ctx.world_size,
            dp_group=None,  # the loss is averaged over all of them
            gradient_sync=FsdpMicroBatchSync(
                sharded, config.reshard_after_forward, config.reshard_between_microbatches
            ),
        )
