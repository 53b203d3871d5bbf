"""``ddp``: data parallelism with PyTorch's DistributedDataParallel.

Every rank holds a full replica of the model and optimizer state and trains its
own rows of the global batch. During backward, DDP's reducer all-reduces the
gradients in buckets (averaging them over ranks), overlapping communication
with the rest of backward, so every replica applies the same update.

Memory per rank: the full model state (16 bytes/parameter with fp32 AdamW);
``apply_ddp`` makes the gradients views into DDP's communication buckets, so the
buckets cost no extra copy. ``apply_ddp`` is every DDP of the lab: ``cp``, OSS's
ZeRO-1 and ``ddp+pp`` wrap their modules with it too.
Communication per step: one all-reduce of all gradients (a ring all-reduce
sends 2 (N-1)/N of the gradient bytes per rank), in one call per bucket:
``--bucket-mb`` sets the bucket size (torch's default 25 MiB, the first bucket 1 MiB).
A bucket's all-reduce starts as soon as backward has made all of its gradients, so
smaller buckets start reducing earlier in backward, in more, smaller calls.
"""

from __future__ import annotations

from functools import partial

from torch import nn

from distlab.config import Config
from distlab.distributed import RankContext
from distlab.measure.memory import ModelStateBytes
from distlab.strategies.base import DDP_OPTIONS, ModuleTrainStep, ReplicatedStateStrategy, TrainStep
from distlab.strategies.data_parallel import DataParallel
from distlab.strategies.parallelize import parallelize
from distlab.strategies.step_parts import no_sync_unless


class DDPStrategy(ReplicatedStateStrategy):
    """Replicate the model; all-reduce gradients during backward."""

    name = "ddp"
    summary = "DistributedDataParallel: full replica per rank, gradient all-reduce"
    options = DDP_OPTIONS
    data_parallel = DataParallel.DDP
    trains_moe = True

    def resident_between_steps(self, config: Config, n_params: int) -> ModelStateBytes:
        """DDP's gradients are views of its buckets, allocated once: 4 B/param all along."""
        return self.predicted_state_bytes(config, n_params)

    def prepare(self, model: nn.Module, ctx: RankContext, config: Config) -> TrainStep:
        ctx.place(model)
        mesh = self.build_mesh(config, ctx.device_type)
        wrapped = parallelize(
            model, mesh, self.dims(config), config, self.data_parallel, ctx.device
        )
        return ModuleTrainStep(
            wrapped,
            ctx,
            config,
            dp_rank=ctx.rank,
            dp_size=ctx.world_size,
            dp_group=None,
            gradient_sync=partial(no_sync_unless, no_sync=wrapped.no_sync),
            plain_model=model,
            keep_gradients=True,
        )
