"""``fairscale-oss`` and ``fairscale-sdp``: fairscale's sharded optimizer (ZeRO-1/2 style).

fairscale's ``OSS`` ("optimizer state sharding") wraps an ordinary torch
optimizer. It assigns every parameter *tensor* to one rank, greedily to the
rank with the fewest elements so far, and each rank builds the wrapped
optimizer (here distlab's AdamW or SGD) over its own tensors only, so it keeps
only their optimizer state. After each rank's update, every rank broadcasts the
tensors it owns so all replicas hold the new weights again.

- ``fairscale-oss`` (ZeRO-1): OSS under PyTorch DDP. DDP all-reduces the full
  gradients, as without sharding; only the optimizer state is split.
  Memory per rank (fp32 AdamW): 4 P params + 4 P grads + 8 P/N optimizer state.
  Communication per step: the all-reduce of the gradients (2 (N-1)/N x 4P bytes
  sent per rank) plus the parameter broadcasts ((N-1)/N x 4P): 1.5x DDP, the
  price of pairing a ZeRO-1 optimizer with an all-reduce that does not know
  that each rank needs only its own gradients.
- ``fairscale-sdp`` (ZeRO-2): OSS under ``ShardedDataParallel``, which replaces
  the all-reduce with one ``reduce`` per gradient to the rank that owns the
  tensor; the other ranks drop that gradient as soon as it is sent.
  Memory per rank: 4 P params + 4 P/N grads + 8 P/N optimizer state.
  Communication per step: reduces plus broadcasts, about DDP's volume.

The shares are P/N only on average: OSS shards whole tensors, so a rank can
hold up to one tensor more than P/N. ``predicted_state_bytes`` replays OSS's
greedy assignment on the model's shapes and predicts rank 0's actual share.
Parameters are not copied: OSS makes each rank's tensors views into one flat
buffer, the buffer it broadcasts. ShardedDataParallel is run with
``reduce_buffer_size=0``: its reduce buckets (default 8M elements) are kept per
destination rank on every rank and would hold the full gradients again,
undoing the gradient sharding for small models.

Gradient clipping uses ``OSS.clip_grad_norm``, which computes the norm over the
owned gradients and sums the squares across ranks, because under
ShardedDataParallel no rank holds all gradients.

Checkpoints: rank 0 saves the full weights and the optimizer state
consolidated from all shards (tensors and plain values only, readable with
``torch.load(weights_only=True)``); loading hands each rank its own shard of
it, whatever partition wrote it.

``--compile``: each block is compiled before OSS and the wrapper see the model
(``regional_compile``); both act on parameters and gradients, outside the blocks.

When to use it: to learn how optimizer and gradient sharding work in a few
hundred readable lines (``fairscale/optim/oss.py``,
``fairscale/nn/data_parallel/sharded_ddp.py``). fairscale is no longer
developed: prefer FSDP2 (``fsdp``) or DeepSpeed (``zero1``-``zero3``) for real
work. fairscale's ``FullyShardedDataParallel`` (ZeRO-3) and ``Pipe`` require
CUDA and are therefore not offered as distlab strategies; use ``fsdp`` (FSDP2)
and ``pp`` instead, which run on CPU too.

Requires the optional extra ``pip install 'distlab[fairscale]'``.
"""

from __future__ import annotations

import importlib.util
import inspect
from functools import partial
from pathlib import Path

import torch
from torch import nn

from distlab.checkpoint.state import set_schedule_position
from distlab.checkpoint.verify import verify_checkpoint
from distlab.config import Config
from distlab.distributed import RankContext
from distlab.errors import DistlabError
from distlab.measure.memory import ModelStateBytes, measure_state_bytes
from distlab.measure.step_memory import HeldTensors
from distlab.optim import build_optimizer, build_scheduler
from distlab.strategies.base import DDP_OPTIONS, ModuleTrainStep, Strategy, TrainStep
from distlab.strategies.data_parallel import DataParallel
from distlab.strategies.parallel_dims import parameter_sizes
from distlab.strategies.parallelize import apply_ddp, parallelize
from distlab.strategies.state_bytes import optimizer_bytes_per_param
from distlab.strategies.step_parts import no_sync_unless

MODEL_FILE = "model.pt"
OPTIMIZER_FILE = "optimizer.pt"


def oss_owners(sizes: list[int], world_size: int) -> list[int]:
    """The rank owning each tensor under OSS: tensors in order, each to the least-loaded rank."""
    loads = [0] * world_size
    owners = []
    for size in sizes:
        owner = loads.index(min(loads))
        loads[owner] += size
        owners.append(owner)
    return owners


def oss_partition(sizes: list[int], world_size: int) -> list[int]:
    """Elements each rank owns under OSS (``oss_owners``)."""
    loads = [0] * world_size
    for size, owner in zip(sizes, oss_owners(sizes, world_size), strict=True):
        loads[owner] += size
    return loads


def build_oss(params, config: Config):
    """fairscale OSS around the optimizer distlab builds everywhere (same class, same settings)."""
    from fairscale.optim import OSS

    template = build_optimizer([[nn.Parameter(torch.zeros(1))]], config)
    accepted = inspect.signature(type(template)).parameters
    settings = {k: v for k, v in template.defaults.items() if k in accepted}
    return OSS(params, optim=type(template), **settings)


class OSSTrainStep(ModuleTrainStep):
    """``ModuleTrainStep`` with an OSS optimizer: sharded clipping, state and checkpoint."""

    def __init__(self, model: nn.Module, ctx: RankContext, config: Config, optimizer, **kwargs):
        super().__init__(
            model, ctx, config, dp_rank=ctx.rank, dp_size=ctx.world_size, dp_group=None, **kwargs
        )
        # Replace the plain optimizer ModuleTrainStep built (it holds no state yet).
        self.optimizer = optimizer
        self.scheduler = build_scheduler(optimizer, config)

    def clip_gradients(self) -> float:
        """OSS computes the global norm from every rank's shard of the gradients."""
        max_norm = self.config.grad_clip if self.config.grad_clip > 0 else float("inf")
        return float(self.optimizer.clip_grad_norm(max_norm))

    def _measure_state_bytes(self) -> ModelStateBytes:
        # optimizer.optim is the wrapped optimizer: it holds only this rank's shard.
        return measure_state_bytes(self.plain_model.parameters(), self.optimizer.optim.state)

    def held_tensors(self) -> HeldTensors:
        return HeldTensors(modules=[self.plain_model], optimizers=[self.optimizer.optim])

    def save_checkpoint(self, directory: Path) -> None:
        """Rank 0 writes the weights and the optimizer state consolidated from every shard.

        Only tensors and plain values go in, so ``torch.load(..., weights_only=True)``
        reads them back, and the full optimizer state can be re-sharded at any world
        size. The learning rate is not saved: it follows from the step (``meta.json``).
        """
        self.optimizer.consolidate_state_dict(recipient_rank=0)
        if self.ctx.is_main:
            weights = {k: v.detach().cpu() for k, v in self.plain_model.state_dict().items()}
            torch.save(weights, directory / MODEL_FILE)
            torch.save(self.optimizer.state_dict(), directory / OPTIMIZER_FILE)
        self.optimizer._all_states = []  # drop rank 0's consolidated copy

    def load_checkpoint(self, directory: Path) -> None:
        """Restore ``save_checkpoint``'s files on every rank (each keeps its own shard)."""
        meta = verify_checkpoint(directory)  # every file, before torch reads any
        if not (directory / OPTIMIZER_FILE).is_file():
            raise DistlabError(
                f"checkpoint {directory} was written by {meta['format']}, not by fairscale; "
                "resume it with the strategy that wrote it"
            )
        device = self.ctx.device
        weights = torch.load(directory / MODEL_FILE, map_location=device, weights_only=True)
        with torch.no_grad():
            for name, tensor in self.plain_model.state_dict().items():
                tensor.copy_(weights[name])  # in place: parameters are views of OSS's buffers
        state = torch.load(directory / OPTIMIZER_FILE, map_location=device, weights_only=True)
        self.optimizer.load_state_dict(state)  # keeps only this rank's shard
        set_schedule_position(self.scheduler, meta["next_step"])


class FairscaleStrategy(Strategy):
    """Shared validation and prediction; the flavour's ``shards_gradients`` picks DDP
    (fairscale-oss) or ShardedDataParallel (fairscale-sdp)."""

    def validate(self, config: Config) -> None:
        if importlib.util.find_spec("fairscale") is None:
            raise DistlabError(
                f"strategy '{self.name}' needs fairscale: pip install 'distlab[fairscale]'"
            )

    def predicted_state_bytes(self, config: Config, n_params: int) -> ModelStateBytes:
        """Rank 0's share under OSS's greedy tensor assignment (about P/N each)."""
        owned = oss_partition(parameter_sizes(config), config.nproc)[0]
        return ModelStateBytes(
            params=4 * n_params,
            grads=4 * owned if self.data_parallel.shards_gradients else 4 * n_params,
            optimizer=optimizer_bytes_per_param(config.optimizer) * owned,
        )

    def prepare(self, model: nn.Module, ctx: RankContext, config: Config) -> TrainStep:
        ctx.place(model)
        # --ac and --compile only (parallelize leaves OSS's flavours to this method), before
        # OSS and the wrapper take the parameters.
        model = parallelize(model, None, self.dims(config), config, self.data_parallel, ctx.device)
        optimizer = build_oss(model.parameters(), config)
        if self.data_parallel.shards_gradients:
            from fairscale.nn.data_parallel import ShardedDataParallel

            wrapped = ShardedDataParallel(model, optimizer, reduce_buffer_size=0)
        else:
            wrapped = apply_ddp(model, ctx.device, bucket_mb=config.bucket_mb)
        return OSSTrainStep(
            wrapped,
            ctx,
            config,
            optimizer,
            gradient_sync=partial(no_sync_unless, no_sync=wrapped.no_sync),
            plain_model=model,
            # DDP's gradients are its buckets
            keep_gradients=not self.data_parallel.shards_gradients,
        )


class FairscaleOSSStrategy(FairscaleStrategy):
    name = "fairscale-oss"
    summary = "fairscale OSS + DDP: optimizer state sharded by tensor (ZeRO-1)"
    options = DDP_OPTIONS
    """ShardedDataParallel (fairscale-sdp) has no DDP buckets: it refuses ``--bucket-mb``."""
    data_parallel = DataParallel.FAIRSCALE_OSS

    def resident_between_steps(self, config: Config, n_params: int) -> ModelStateBytes:
        """DDP's gradient buckets (full gradients) stay allocated from step to step."""
        return self.predicted_state_bytes(config, n_params)


class FairscaleSDPStrategy(FairscaleStrategy):
    name = "fairscale-sdp"
    summary = "fairscale OSS + ShardedDataParallel: optimizer state and grads sharded (ZeRO-2)"
    data_parallel = DataParallel.FAIRSCALE_SDP
