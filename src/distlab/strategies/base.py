"""The strategy interface, and the training step shared by module-wrapping strategies.

A strategy turns (model, rank context, config) into a ``TrainStep``: an object
that runs one whole optimizer step on this rank's rows of the global batch and
returns the global batch's mean loss. The train loop only ever talks to a
``TrainStep``; strategies that own forward/backward/step themselves (pipeline
parallelism, DeepSpeed) implement ``TrainStep`` directly, the others wrap the
model and reuse ``ModuleTrainStep``. The pieces every step is made of (autocast,
the loss, micro-batches, the gradient-sync contexts) are ``step_parts``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule

from distlab.checkpoint.layout import checkpoint_step
from distlab.checkpoint.state import load_dcp_state, save_dcp_state, set_schedule_position
from distlab.config import Config, grad_accum_steps
from distlab.distributed import RankContext
from distlab.errors import DistlabError
from distlab.measure.memory import ModelStateBytes, measure_state_bytes
from distlab.measure.step_memory import HeldTensors
from distlab.measure.timeline import phase
from distlab.moe import RoutingTally, auxiliary_loss, moe_layers
from distlab.optim import block_groups, build_optimizer, build_scheduler, clip_gradients
from distlab.strategies.data_parallel import DataParallel
from distlab.strategies.degrees import data_parallel_dims
from distlab.strategies.parallel_dims import ParallelDims
from distlab.strategies.state_bytes import predicted_bytes
from distlab.strategies.step_parts import (
    GradientSync,
    always_sync,
    autocast,
    language_model_loss,
    mean_over_group,
    micro_batches,
)


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step reports."""

    loss: float
    """Mean cross-entropy over every token of the global batch."""
    grad_norm: float
    """Global L2 norm of the gradient before clipping."""
    routing: dict[str, float | list[int]] = field(default_factory=dict)
    """MoE routing statistics of the step (``distlab.moe.RoutingTally.metrics``, plus what
    expert parallelism sent where); empty for a dense model."""
    committed: bool = True
    """Whether the update was applied. False only under live recovery (``--ft live``), when
    the replicas' all-reduce failed: the step is then run again, not recorded."""


class TrainStep(ABC):
    """One prepared optimizer step, plus what checkpointing and reporting need."""

    dp_rank: int
    """This rank's index among the data-parallel replicas (which batch rows it trains)."""
    dp_size: int
    """Number of data-parallel replicas the global batch is split over."""

    @abstractmethod
    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> StepResult:
        """Forward, backward and optimizer step on this rank's rows of the global batch."""

    @abstractmethod
    def evaluate(self, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        """The global batch's mean loss, forward only (no gradient, no update), from this
        rank's rows ``inputs``; the same on every rank."""

    @abstractmethod
    def current_lr(self) -> float:
        """The learning rate the next step will use."""

    @abstractmethod
    def full_model_state_dict(self) -> dict[str, torch.Tensor]:
        """Full, unsharded weights under the plain model's names (complete on rank 0)."""

    @abstractmethod
    def model_state_bytes(self) -> ModelStateBytes:
        """Bytes this rank holds in parameters, gradients and optimizer state."""

    @abstractmethod
    def held_tensors(self) -> HeldTensors:
        """The modules, optimizers and buffers this rank keeps between steps, by category,
        for the step's memory tracker (``distlab.measure.step_memory``)."""

    @abstractmethod
    def save_checkpoint(self, directory: Path) -> None:
        """Write this rank's part of model, optimizer and schedule state into ``directory``."""

    def load_checkpoint(self, directory: Path) -> None:
        """Restore model, optimizer and schedule from a committed checkpoint ``directory``.

        ``directory/meta.json`` holds the step (``distlab.checkpoint.layout.checkpoint_step``).
        A DCP checkpoint may come from another strategy or world size; load it
        resharded (``distlab.checkpoint.state.load_dcp_state`` does that for a model and
        optimizer). Strategies that cannot resume keep this default.
        """
        name = getattr(getattr(self, "config", None), "strategy", type(self).__name__)
        raise DistlabError(
            f"strategy {name} cannot resume yet (its TrainStep does not implement load_checkpoint)"
        )


TP_OPTIONS = frozenset({"tp", "sequence_parallel"})
"""Config fields of tensor parallelism."""
PP_OPTIONS = frozenset({"pp", "schedule", "microbatches"})
"""Config fields of pipeline parallelism."""
FSDP_OPTIONS = frozenset({"reshard_after_forward", "reshard_between_microbatches", "prefetch"})
"""Config fields of FSDP2."""
DDP_OPTIONS = frozenset({"bucket_mb"})
"""Config fields of torch DDP (``distlab.strategies.parallelize.apply_ddp``)."""


class Strategy(ABC):
    """A named way of training the GPT on several ranks."""

    name: str = ""
    summary: str = ""
    options: frozenset[str] = frozenset()
    """The strategy-specific config fields this strategy reads (``tp``, ``offload``, ...).

    A strategy option that another strategy declares and this one does not is
    refused when set away from its default (``distlab.strategies.resolve.validate``), so a
    flag is never silently ignored.
    """

    compile_refusal: str | None = None
    """Why ``--compile`` cannot run under this strategy (a one-line reason), or None if it can
    (its ``prepare`` then applies ``distlab.strategies.regional_compile.apply_compile``)."""

    selective_ac_refusal: str | None = None
    """Why ``--ac selective`` cannot run under this strategy (a one-line reason), or None if it
    can (its ``prepare`` applies ``distlab.strategies.activation_checkpoint.apply_ac``)."""

    trains_moe: bool = False
    """Whether the strategy trains the mixture-of-experts presets (``tiny-moe``, ...); the
    others are refused in one line (``distlab.strategies.resolve.validate``)."""

    def validate(self, config: Config) -> None:  # noqa: B027 - optional hook
        """Raise ``DistlabError`` if the strategy cannot run this config."""

    data_parallel: DataParallel = DataParallel.NONE
    """How the data-parallel replicas share the work (``distlab.strategies.data_parallel``:
    what each flavour splits); the theory (``distlab.theory``) predicts from it."""

    def dims(self, config: Config) -> ParallelDims:
        """The degrees this strategy runs ``config`` with (``distlab.strategies.degrees``;
        default: data parallel on every rank)."""
        return data_parallel_dims(config)

    @property
    def shards_model_state(self) -> bool:
        """Whether the data-parallel ranks shard the model state (``dp_shard``) rather than
        each hold a copy of it (``dp_replicate``)."""
        return not self.data_parallel.replicates_model_state

    def mesh_dims(self, config: Config) -> dict[str, int]:
        """The named degrees this strategy arranges the ranks in (``ParallelDims.named``):
        e.g. ``{"pp": 2, "dp_shard": 2, "cp": 2, "tp": 2}`` for fsdp+cp+tp+pp on 16 ranks."""
        return self.dims(config).named(self.shards_model_state)

    def build_mesh(self, config: Config, device_type: str) -> DeviceMesh:
        """The strategy's device mesh (``ParallelDims.build_mesh``; call on every rank)."""
        return self.dims(config).build_mesh(device_type, self.shards_model_state)

    def data_parallel_size(self, config: Config) -> int:
        """How many data-parallel replicas split the global batch."""
        return self.dims(config).dp

    @abstractmethod
    def prepare(self, model: nn.Module, ctx: RankContext, config: Config) -> TrainStep:
        """Wrap or split ``model`` for this rank and return its training step."""

    @abstractmethod
    def predicted_state_bytes(self, config: Config, n_params: int) -> ModelStateBytes:
        """Theory: bytes of params, grads and optimizer state on one rank (rank 0)."""

    def resident_between_steps(self, config: Config, n_params: int) -> ModelStateBytes:
        """Theory: what rank 0 holds when a step begins; by default no gradients (they are
        dropped after each optimizer step and created again in backward)."""
        state = self.predicted_state_bytes(config, n_params)
        return ModelStateBytes(params=state.params, grads=0, optimizer=state.optimizer)


class ReplicatedStateStrategy(Strategy):
    """A strategy whose every rank holds the full model state (single, ddp)."""

    def predicted_state_bytes(self, config: Config, n_params: int) -> ModelStateBytes:
        return predicted_bytes(n_params, config.optimizer)


class OptimizerTrainStep(TrainStep):
    """A train step that updates ``self.model`` with a torch optimizer and distlab's lr schedule."""

    model: nn.Module

    def _build_optimizer(self, config: Config) -> None:
        """The optimizer over ``self.model``'s (possibly sharded) parameters, and its schedule."""
        self.optimizer = build_optimizer(block_groups(self.model), config)
        self.scheduler = build_scheduler(self.optimizer, config)
        self.last_state_bytes: ModelStateBytes | None = None

    def _record_state_bytes(self) -> None:
        """Call between optimizer step and zero_grad; sizes are fixed after the first step."""
        if self.last_state_bytes is None:
            self.last_state_bytes = self._measure_state_bytes()

    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _measure_state_bytes(self) -> ModelStateBytes:
        return measure_state_bytes(self.model.parameters(), self.optimizer.state)

    def model_state_bytes(self) -> ModelStateBytes:
        return self.last_state_bytes or self._measure_state_bytes()

    def held_tensors(self) -> HeldTensors:
        return HeldTensors(
            modules=[self.model],
            optimizers=[self.optimizer],
            fsdp_root=self.model if isinstance(self.model, FSDPModule) else None,
        )


class ModuleTrainStep(OptimizerTrainStep):
    """Gradient accumulation, clipping, optimizer and schedule around a wrapped model.

    The wrapped model is responsible for reducing gradients across
    data-parallel ranks during backward (DDP's reducer, FSDP's reduce-scatter);
    ``gradient_sync`` lets it skip that on all but the last micro-batch.
    """

    def __init__(
        self,
        model: nn.Module,
        ctx: RankContext,
        config: Config,
        dp_rank: int,
        dp_size: int,
        dp_group: dist.ProcessGroup | None,
        gradient_sync: GradientSync = always_sync,
        plain_model: nn.Module | None = None,
        keep_gradients: bool = False,
    ) -> None:
        self.model = model
        self.keep_gradients = keep_gradients
        """Zero gradients in place instead of dropping them: DDP's gradients are views
        of its communication buckets, which stay allocated either way."""
        self.plain_model = plain_model if plain_model is not None else model
        self.ctx = ctx
        self.config = config
        self.dp_rank, self.dp_size, self.dp_group = dp_rank, dp_size, dp_group
        self.gradient_sync = gradient_sync
        self.accum = grad_accum_steps(config, dp_size)
        self.moe_layers = moe_layers(self.plain_model)
        self._build_optimizer(config)

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> StepResult:
        """Backward of the LM loss plus the MoE balance loss (if any); reports the LM loss."""
        device = self.ctx.device
        loss_sum = torch.zeros((), device=device)
        tally = RoutingTally(self.moe_layers)
        batches = micro_batches(inputs, targets, self.accum)
        for index, (x, y) in enumerate(batches):
            with self.gradient_sync(index == self.accum - 1):
                with phase("forward"):
                    loss = self.forward_loss(
                        x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    )
                    aux = auxiliary_loss(self.moe_layers)
                with phase("backward"):
                    ((loss if aux is None else loss + aux) / self.accum).backward()
            loss_sum += loss.detach()
            tally.add()
        with phase("optimizer"):
            grad_norm = self.clip_gradients()
            committed = self.should_commit(loss_sum / self.accum)
            if committed:
                self.optimizer.step()
                self._record_state_bytes()
            self.model.zero_grad(set_to_none=not self.keep_gradients)
            if committed:
                self.scheduler.step()
        mean_loss = self.mean_loss(loss_sum / self.accum)
        return StepResult(
            loss=mean_loss, grad_norm=grad_norm, routing=self.routing(tally), committed=committed
        )

    def evaluate(self, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        """The language-model loss of the rows in the step's micro-batches, without gradients."""
        device = self.ctx.device
        loss_sum = torch.zeros((), device=device)
        batches = micro_batches(inputs, targets, self.accum)
        with torch.no_grad():
            for x, y in batches:
                loss_sum += self.forward_loss(x.to(device), y.to(device)).float()
        return self.mean_loss(loss_sum / self.accum)

    def should_commit(self, local_loss: torch.Tensor) -> bool:
        """Whether to apply this step's update (``local_loss``: this rank's mean loss).

        Always here; live recovery (``distlab.train.live``) asks torchft, which says no when
        the replicas' all-reduce failed, so that every replica skips the update alike.
        """
        return True

    def routing(self, tally: RoutingTally) -> dict[str, float | list[int]]:
        """The step's routing statistics (``StepResult.routing``)."""
        return tally.metrics()

    def forward_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The language-model loss of one micro-batch on this rank (the MoE balance loss,
        if any, is added to it for the backward)."""
        with autocast(self.ctx.device_type, self.config.precision, self.model):
            logits = self.model(inputs)
        return language_model_loss(logits, targets)

    def mean_loss(self, local: torch.Tensor) -> float:
        """The global batch's mean loss from this rank's: the mean over the data-parallel ranks."""
        return mean_over_group(local, self.dp_group, self.dp_size)

    def clip_gradients(self) -> float:
        """Clip to ``config.grad_clip`` and return the global gradient norm."""
        return clip_gradients(self.model.parameters(), self.config.grad_clip)

    def full_model_state_dict(self) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(self.plain_model, options=options)

    def save_checkpoint(self, directory: Path) -> None:
        """Model and optimizer state through DCP, sharded as they live (the lr is the step's)."""
        save_dcp_state(directory, self.plain_model, self.optimizer)

    def load_checkpoint(self, directory: Path) -> None:
        """Load a DCP checkpoint of any DCP strategy and world size; set the schedule's step."""
        load_dcp_state(directory, self.plain_model, self.optimizer)
        set_schedule_position(self.scheduler, checkpoint_step(directory))
