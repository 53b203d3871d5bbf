"""``single``: no parallelism. One rank trains the whole global batch: the reference run.

Every other strategy is checked against this one (``python -m distlab.verify``).
"""

from __future__ import annotations

from torch import nn

from distlab.config import Config
from distlab.distributed import RankContext
from distlab.errors import DistlabError
from distlab.strategies.base import ModuleTrainStep, ReplicatedStateStrategy, TrainStep
from distlab.strategies.parallelize import parallelize


class SingleStrategy(ReplicatedStateStrategy):
    """The whole model and the whole batch on one rank."""

    name = "single"
    summary = "one process, no parallelism: the parity reference"
    trains_moe = True

    def validate(self, config: Config) -> None:
        if config.nproc != 1:
            raise DistlabError(
                f"strategy 'single' runs on exactly 1 rank; use --nproc 1 (got {config.nproc})"
            )

    def prepare(self, model: nn.Module, ctx: RankContext, config: Config) -> TrainStep:
        ctx.place(model)
        model = parallelize(model, None, self.dims(config), config, self.data_parallel, ctx.device)
        return ModuleTrainStep(model, ctx, config, dp_rank=0, dp_size=1, dp_group=None)
