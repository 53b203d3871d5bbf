"""``pp``: pipeline parallelism with ``torch.distributed.pipelining``.

The GPT is cut by layers into ``S`` stages: stage 0 also holds the embeddings,
the last stage the final LayerNorm and the LM head, and the layers are spread
so that no stage has more than one layer more than another (the first stages
take the extra ones: the last stage already carries the head and the loss).
Each rank keeps only its stages' parts of the model (the others are deleted,
so parameter names stay those of the plain GPT) and wraps each stage in a
``PipelineStage``. A schedule then runs the local batch as ``M`` microbatches:

- ``gpipe``: all forwards, then all backwards (activations of M microbatches live at once).
- ``1f1b``: after a warm-up of (S - stage) forwards, alternate one forward and
  one backward (at most S microbatches of activations live).
- ``interleaved-1f1b``: every rank holds ``VIRTUAL_STAGES`` (2) non-adjacent
  stages (rank r holds stages r and r + pp); the bubble shrinks by that factor
  for the price of twice the point-to-point messages.
- ``looped-bfs``: the same placement, all microbatches of a stage at once.
- ``interleaved-zb``, ``zbv``, ``dualpipev``: zero-bubble schedules that split
  each backward into input gradients and weight gradients and run the latter
  in the bubble; zbv and dualpipev place the 2 stages of a rank in a V (rank r
  holds stages r and 2 pp - 1 - r), so rank 0 also holds the head.

``pipeline_schedules`` says which schedules exist, where their stages go and
their theoretical bubble, (p - 1) / (m + p - 1) of a step for GPipe and 1F1B
(same bubble, less memory for 1F1B); ``benchmarks/pipeline_bubble.py``
measures it. ``pipeline_settings`` resolves M and checks the settings.

Loss and gradients: each microbatch's loss is its mean cross-entropy and the
schedule divides the accumulated gradients by M (``scale_grads``), so the
gradient is that of the mean over the local batch; data parallelism (DDP or
FSDP around each stage) then averages over replicas. The last stage's rank
(pp - 1, or 0 in V placement) has the losses; it broadcasts their mean to
the other ranks of its pipeline so rank 0 (the first stage) can report it.
The gradient norm is summed over stages.

No hang on gloo: the torch 2.13 schedules wait on every send/recv handle
they create before ``step`` returns, stages are given static shapes (no
metadata handshake), and everything else here is a blocking collective.

Memory per rank: its stages' parameters, gradients and optimizer state (about
1/pp of the model). Communication per step: 2 M activation-sized messages
(forward activations, backward gradients) per stage boundary.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from distlab.checkpoint.layout import checkpoint_step
from distlab.checkpoint.state import load_dcp_state, save_dcp_state, set_schedule_position
from distlab.config import Config, resolved_seq_len
from distlab.distributed import RankContext
from distlab.measure.memory import ModelStateBytes
from distlab.measure.timeline import phase, traced_action
from distlab.model import GPT
from distlab.strategies.base import PP_OPTIONS, OptimizerTrainStep, StepResult, Strategy, TrainStep
from distlab.strategies.cp_attention import held_positions
from distlab.strategies.data_parallel import DataParallel
from distlab.strategies.degrees import resolve_dims
from distlab.strategies.parallel_dims import (
    VIRTUAL_STAGES,
    ParallelDims,
    StagePlan,
    rank_stage_plans,
    view,
)
from distlab.strategies.parallelize import parallelize
from distlab.strategies.pipeline_schedules import (
    SCHEDULES,
    forward_program,
    last_stage_rank,
    schedule_class,
)
from distlab.strategies.pipeline_settings import resolve_microbatches, validate_pp
from distlab.strategies.state_bytes import rank0_state_bytes
from distlab.strategies.step_parts import (
    activation_dtype,
    autocast,
    language_model_loss,
    mean_over_group,
)

if TYPE_CHECKING:
    from torch.distributed.pipelining import PipelineStage

# --- The split: this rank's stages as modules -----------------------------------------


def _stage_shell(model: GPT, plan: StagePlan) -> GPT:
    """A GPT holding only ``plan``'s parts, shared (not copied) with ``model``."""
    with torch.device("meta"):
        shell = GPT(model.config)
    shell.wte = model.wte if plan.embeddings else None
    shell.wpe = model.wpe if plan.embeddings else None
    shell.blocks = nn.ModuleDict({str(i): model.blocks[str(i)] for i in plan.layers})
    shell.ln_f = model.ln_f if plan.head else None
    shell.lm_head = model.lm_head if plan.head else None
    return shell


def split_model(model: GPT, plans: list[StagePlan]) -> tuple[GPT, list[GPT]]:
    """Keep in ``model`` only what ``plans`` (this rank's stages) need.

    Returns the trimmed model (all of this rank's parameters, plain GPT names)
    and one module per stage. With one stage per rank that module is the
    trimmed model itself; with several, each stage is a GPT shell sharing the
    trimmed model's submodules.
    """
    owned = {i for plan in plans for i in plan.layers}
    for key in list(model.blocks):
        if int(key) not in owned:
            del model.blocks[key]
    if not any(plan.embeddings for plan in plans):
        model.wte = model.wpe = None
    if not any(plan.head for plan in plans):
        model.ln_f = model.lm_head = None
    if len(plans) == 1:
        return model, [model]
    return model, [_stage_shell(model, plan) for plan in plans]


# --- Gradient clipping across stages --------------------------------------------------


def clip_pipeline_gradients(
    params: list[nn.Parameter], max_norm: float, pp_group: dist.ProcessGroup
) -> float:
    """Global gradient norm over all stages (sum of squares over the pp group); clip to it."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if isinstance(norm, DTensor):  # sharded by tp / fsdp: reduce over that mesh
        norm = norm.full_tensor()
    squared = norm.pow(2)
    dist.all_reduce(squared, op=dist.ReduceOp.SUM, group=pp_group)
    total = squared.sqrt()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return float(total)


# --- The training step ----------------------------------------------------------------

StageWrapper = Callable[[GPT], nn.Module]
"""Applied to each stage module after the split (tensor/data parallelism); returns the
module the PipelineStage runs."""


class PipelineTrainStep(OptimizerTrainStep):
    """One optimizer step driven by a pipeline schedule over this rank's stages."""

    def __init__(
        self,
        model: GPT,
        ctx: RankContext,
        config: Config,
        dims: ParallelDims,
        mesh: DeviceMesh,
        wrap_stage: StageWrapper | None = None,
    ) -> None:
        self.ctx, self.config, self.dims = ctx, config, dims
        self.pp_group = mesh["pp"].get_group()
        self.pp_rank = mesh["pp"].get_local_rank()
        self.dp_rank = view(mesh, "dp").get_local_rank()
        self.dp_size = dims.dp
        # The loss is a mean over the ranks that average gradients (dp, or dp x cp).
        self.loss_group = view(mesh, "dp_cp").get_group() if dims.reducers > 1 else None
        self.positions: torch.Tensor | None = None
        """Context parallelism: positions of the tokens this rank holds (None: all of them)."""
        if dims.cp > 1:
            seq = resolved_seq_len(config)
            cp_rank = mesh["cp"].get_local_rank()
            self.positions = held_positions(seq, dims.cp, cp_rank).to(ctx.device)
        virtual = VIRTUAL_STAGES.get(config.schedule, 1)
        n_stages = dims.pp * virtual
        plans = rank_stage_plans(config, dims.pp, self.pp_rank)
        ctx.place(model)
        self.model, stage_modules = split_model(model, plans)
        if wrap_stage is not None:
            stage_modules = [wrap_stage(module) for module in stage_modules]
        self.has_first = any(plan.embeddings for plan in plans)
        self.has_last = any(plan.head for plan in plans)
        self.loss_rank = last_stage_rank(config.schedule, dims.pp)
        # FSDP stages cast themselves to bf16 (all stages of a run are alike).
        self.stage_module = stage_modules[0]

        self.microbatches = resolve_microbatches(config, dims)
        rows = config.global_batch // dims.dp // self.microbatches
        # imported here, as the registry asks of heavy libraries: torch's pipelining imports
        # its compiler, which a rank of any other strategy would pay for at start-up
        from torch.distributed.pipelining import PipelineStage

        self.stages = [
            PipelineStage(
                module,
                plan.index,
                n_stages,
                ctx.device,
                *self._stage_shapes(plan, rows),
                group=self.pp_group,
            )
            for module, plan in zip(stage_modules, plans, strict=True)
        ]
        for stage, plan in zip(self.stages, plans, strict=True):
            record_actions(stage, plan.index)
        schedule_cls = schedule_class(config.schedule)
        stages = self.stages if virtual > 1 else self.stages[0]
        # Each microbatch's loss is its mean; scale_grads divides the summed
        # gradients by M, giving the gradient of the local batch's mean loss.
        self.schedule = schedule_cls(
            stages,
            n_microbatches=self.microbatches,
            loss_fn=language_model_loss,
            scale_grads=True,
        )
        self._build_optimizer(config)

    def _stage_shapes(self, plan: StagePlan, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Static input/output examples (meta tensors) so stages need no shape handshake.

        Between stages flows the residual stream, (rows, seq, d) as a plain
        tensor (fp32, or bf16 from FSDP stages under bf16: ``activation_dtype``);
        under sequence parallelism each tensor-parallel rank holds seq / tp of it.
        """
        shape = self.model.config
        seq = resolved_seq_len(self.config) // self.dims.cp
        local_seq = seq // self.dims.tp if self.config.sequence_parallel else seq
        dtype = activation_dtype(self.stage_module, self.config.precision)
        hidden = torch.empty(
            rows, local_seq, shape.d_model, dtype=dtype, device="meta", requires_grad=True
        )
        tokens = torch.empty(rows, seq, dtype=torch.long, device="meta")
        logits = torch.empty(rows, seq, shape.vocab_size, device="meta", requires_grad=True)
        return (tokens if plan.embeddings else hidden), (logits if plan.head else hidden)

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> StepResult:
        with (
            phase("forward_backward"),
            autocast(self.ctx.device_type, self.config.precision, self.stage_module),
        ):
            loss = self._run_schedule(self.schedule.step, inputs, targets)
        with phase("optimizer"):
            grad_norm = clip_pipeline_gradients(
                list(self.model.parameters()), self.config.grad_clip, self.pp_group
            )
            self.optimizer.step()
            self._record_state_bytes()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
        mean_loss = mean_over_group(loss, self.loss_group, self.dims.reducers)
        return StepResult(loss=mean_loss, grad_norm=grad_norm)

    def evaluate(self, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        """The schedule's forward-only pass (``eval``: its forwards, none of its backwards)."""
        with (
            torch.no_grad(),
            autocast(self.ctx.device_type, self.config.precision, self.stage_module),
            forward_program(self.schedule),
        ):
            loss = self._run_schedule(self.schedule.eval, inputs, targets)
        return mean_over_group(loss, self.loss_group, self.dims.reducers)

    def _run_schedule(
        self, run: Callable[..., Any], inputs: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        """Feed this rank's rows to the schedule's ``step`` or ``eval``; return this pipeline's
        mean loss over them (on every stage)."""
        device = self.ctx.device
        inputs, targets = inputs.to(device), targets.to(device)
        if self.positions is not None:  # context parallelism: this rank's slice of each sequence
            inputs, targets = inputs[:, self.positions], targets[:, self.positions]
        args, kwargs = (), {}
        if self.has_first:
            args = (inputs,)
            if self.positions is not None:
                # The tokens' global positions, one row per sequence, so the schedule
                # splits them into micro-batches with the rows.
                kwargs["positions"] = self.positions.expand(inputs.shape[0], -1)
        target = targets if self.has_last else None
        losses: list[torch.Tensor] = []
        run(*args, target=target, losses=losses, return_outputs=False, **kwargs)
        if self.has_last:  # equal-sized microbatches: the mean of their means is the batch mean
            loss = torch.stack([loss.detach().float() for loss in losses]).mean()
        else:
            loss = torch.zeros((), device=device)
        # The last stage (pipeline rank pp - 1, or 0 in V placement) has the loss; share it.
        dist.broadcast(loss, group=self.pp_group, group_src=self.loss_rank)
        return loss

    def full_model_state_dict(self) -> dict[str, torch.Tensor]:
        """Stages gather their tp/fsdp shards, then send their weights to the pipeline's rank 0."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        local = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))
        local = {name: tensor.detach().cpu() for name, tensor in local.items()}
        parts: list | None = [None] * self.dims.pp if self.pp_rank == 0 else None
        dist.gather_object(local, parts, group=self.pp_group, group_dst=0)
        if not self.ctx.is_main:
            return {}
        return {name: tensor for part in parts for name, tensor in part.items()}

    def save_checkpoint(self, directory: Path) -> None:
        """This rank's stages' model and optimizer state (plain GPT names) through DCP."""
        save_dcp_state(directory, self.model, self.optimizer)

    def load_checkpoint(self, directory: Path) -> None:
        """Load a DCP checkpoint (any DCP strategy, any world size) into this rank's stages."""
        load_dcp_state(directory, self.model, self.optimizer)
        set_schedule_position(self.scheduler, checkpoint_step(directory))


# --- The strategy ---------------------------------------------------------------------


class PPStrategy(Strategy):
    """Cut the model into stages by layers, one stage (or two, by schedule) per rank."""

    name = "pp"
    summary = (
        "pipeline parallel (torch.distributed.pipelining): layers split into stages; "
        f"--schedule {'|'.join(SCHEDULES)}, --microbatches M"
    )
    options = PP_OPTIONS

    def dims(self, config: Config) -> ParallelDims:
        return resolve_dims(
            config, self.name, data_parallel=False, tensor_parallel=False, pipeline=True
        )

    def validate(self, config: Config) -> None:
        validate_pp(config, self.dims(config))

    def predicted_state_bytes(self, config: Config, n_params: int) -> ModelStateBytes:
        return rank0_state_bytes(config, self.dims(config), DataParallel.NONE)

    def prepare(self, model: nn.Module, ctx: RankContext, config: Config) -> TrainStep:
        dims = self.dims(config)
        mesh = self.build_mesh(config, ctx.device_type)

        def prepare_stage(stage: GPT) -> nn.Module:
            return parallelize(stage, mesh, dims, config, self.data_parallel, ctx.device)

        return PipelineTrainStep(model, ctx, config, dims, mesh, prepare_stage)


def record_actions(stage: PipelineStage, index: int) -> None:
    """Record the stage's forward (F), backward (B) and weight-gradient (W) actions on a
    time-tracked step's timeline (``distlab.measure.timeline``): the schedule calls these
    methods once per micro-batch."""
    for kind, name in (
        ("F", "forward_one_chunk"),
        ("B", "backward_one_chunk"),
        ("W", "backward_weight_one_chunk"),
    ):
        setattr(stage, name, traced_action(kind, index, getattr(stage, name)))
