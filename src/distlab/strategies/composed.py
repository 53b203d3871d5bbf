"""Compositions: data x context x tensor x pipeline parallelism on the one device mesh.

The parallelisms are applied in the only order that works:

1. pipeline split: each rank keeps its stages' layers (``pipeline_parallel``);
2. ``parallelize`` on each stage: tensor parallelism over the mesh's ``tp``
   dimension (``tp_plan.apply_tp``): parameters become DTensors on the tp mesh;
   context parallelism over the ``cp`` dimension (``cp_attention.apply_cp``:
   each block's attention gathers the keys and values of its local heads);
   then ``--ac`` checkpoints each block (``activation_checkpoint``) and
   ``--compile`` compiles it (``regional_compile``);
3. still in ``parallelize``, data parallelism around each stage over the
   data-parallel ranks, or with context parallelism over them and ``cp``
   flattened into one (the mesh's ``dp_shard_cp`` / ``dp_cp`` views; the cp ranks
   of a replica compute gradients of the same rows, which must be averaged
   like the replicas', and FSDP then shards the state over all dp x cp ranks,
   as torchtitan does): FSDP2 ``fully_shard`` (which shards the tp DTensors
   further, "2D") or DDP.

Data parallelism comes last because it must see the final parameters (FSDP
shards whatever tensors the module holds, DDP registers hooks on them), and
the pipeline comes first because the other two act on a stage's module.

Example: ``--strategy fsdp+tp+pp --dp 2 --tp 2 --pp 2 --nproc 8``: ranks 0-3
hold stage 0 and 4-7 stage 1; within a stage, ranks {0,1} and {2,3} are
tensor-parallel pairs and {0,2}, {1,3} FSDP pairs. ``--strategy fsdp+cp --dp 2
--cp 2 --nproc 4``: ranks {0,1} and {2,3} split the sequences of their replica's
rows, and FSDP shards the model state over all four.
"""

from __future__ import annotations

from torch import nn

from distlab.config import Config, resolved_seq_len
from distlab.distributed import RankContext
from distlab.errors import DistlabError
from distlab.measure.memory import ModelStateBytes
from distlab.model import GPT
from distlab.strategies.base import (
    DDP_OPTIONS,
    FSDP_OPTIONS,
    PP_OPTIONS,
    TP_OPTIONS,
    ModuleTrainStep,
    Strategy,
    TrainStep,
)
from distlab.strategies.context_parallel import (
    CP_OPTIONS,
    ContextParallelTrainStep,
    CPStrategy,
    validate_cp,
)
from distlab.strategies.cp_attention import held_positions
from distlab.strategies.data_parallel import DataParallel
from distlab.strategies.degrees import resolve_dims
from distlab.strategies.fully_shard import FsdpMicroBatchSync
from distlab.strategies.parallel_dims import ParallelDims, view
from distlab.strategies.parallelize import parallelize
from distlab.strategies.pipeline_parallel import PipelineTrainStep
from distlab.strategies.pipeline_schedules import schedule_spec
from distlab.strategies.pipeline_settings import validate_pp
from distlab.strategies.state_bytes import rank0_state_bytes
from distlab.strategies.tensor_parallel import validate_tp

PIPELINE_DDP_BUCKET_VIEWS = False
"""Whether ``ddp+pp``'s DDP makes the gradients views into its buckets, as every other
DDP of the lab does (``apply_ddp``). It does not, and the theory models what that costs
(``distlab.theory.parameter_bytes.ddp_pipeline_buckets`` reads this flag): the stage's
gradients accumulate over the micro-batches as tensors of their own, and the last
micro-batch's backward copies them into the buckets, a second copy until the step ends.
Bucket views train the same losses bitwise and reach the same peak on the tiny model
(measured), but keep the gradients in DDP's buckets between steps: turning them on is a
change of ddp+pp's memory model and its measured timeline, not of this file alone."""


class ComposedStrategy(Strategy):
    """Data parallelism (``data_parallel``) combined with tp and/or pp on one mesh."""

    data_parallel = DataParallel.FSDP
    """FSDP or DDP: how replicas along the mesh's dp dimension share the work."""
    tensor_parallel = False
    pipeline = False
    context_parallel = False

    @property
    def options(self) -> frozenset[str]:  # type: ignore[override]
        """``dp``, plus the fields of each parallelism this composition includes (its data
        parallelism's too: FSDP2's or DDP's)."""
        fields = {"dp"}
        if self.context_parallel:
            fields |= CP_OPTIONS
        if self.tensor_parallel:
            fields |= TP_OPTIONS
        if self.pipeline:
            fields |= PP_OPTIONS
        if self.data_parallel is DataParallel.FSDP:
            fields |= FSDP_OPTIONS
        if self.data_parallel is DataParallel.DDP:
            fields |= DDP_OPTIONS
        return frozenset(fields)

    def dims(self, config: Config) -> ParallelDims:
        return resolve_dims(
            config, self.name, True, self.tensor_parallel, self.pipeline, self.context_parallel
        )

    def validate(self, config: Config) -> None:
        dims = self.dims(config)
        if self.context_parallel:
            validate_cp(config, dims.cp)
        if self.tensor_parallel:
            validate_tp(config, dims.tp)
        if self.pipeline:
            validate_pp(config, dims)
            if (
                self.data_parallel is DataParallel.DDP
                and schedule_spec(config.schedule).split_backward
            ):
                # DDP all-reduces from hooks of a full backward; the weight-gradient
                # actions of these schedules would leave the replicas' gradients unaveraged.
                raise DistlabError(
                    f"{self.name} cannot run --schedule {config.schedule}: it splits the "
                    "backward into input and weight gradients, which DDP does not average; "
                    "use fsdp+pp or another schedule"
                )

    def predicted_state_bytes(self, config: Config, n_params: int) -> ModelStateBytes:
        return rank0_state_bytes(config, self.dims(config), self.data_parallel)

    def prepare(self, model: nn.Module, ctx: RankContext, config: Config) -> TrainStep:
        dims = self.dims(config)
        mesh = self.build_mesh(config, ctx.device_type)
        if self.pipeline:

            def wrap_stage(stage: GPT) -> nn.Module:
                wrapped = parallelize(
                    stage,
                    mesh,
                    dims,
                    config,
                    self.data_parallel,
                    ctx.device,
                    PIPELINE_DDP_BUCKET_VIEWS,
                )
                if (
                    self.data_parallel is DataParallel.FSDP
                    and not config.reshard_between_microbatches
                ):
                    # The schedule keeps parameters gathered after each backward and reshards
                    # them once, after the last; keeping them after forward too means the
                    # stage gathers once per step, not once per microbatch.
                    wrapped.set_reshard_after_forward(False)
                return wrapped

            return PipelineTrainStep(model, ctx, config, dims, mesh, wrap_stage)
        ctx.place(model)
        wrapped = parallelize(model, mesh, dims, config, self.data_parallel, ctx.device)
        settings = {
            "dp_rank": view(mesh, "dp").get_local_rank(),
            "dp_size": dims.dp,
            "dp_group": view(mesh, "dp").get_group(),
            "gradient_sync": FsdpMicroBatchSync(
                wrapped, config.reshard_after_forward, config.reshard_between_microbatches
            ),
            "plain_model": model,
        }
        if dims.cp == 1:
            return ModuleTrainStep(wrapped, ctx, config, **settings)
        cp_rank = mesh["cp"].get_local_rank()
        return ContextParallelTrainStep(
            wrapped,
            ctx,
            config,
            **settings,
            positions=held_positions(resolved_seq_len(config), dims.cp, cp_rank),
            loss_group=view(mesh, "dp_cp").get_group(),
            loss_size=dims.reducers,
        )


class FSDPTPStrategy(ComposedStrategy):
    name = "fsdp+tp"
    summary = "2D: tensor parallel within --tp ranks, FSDP2 over the --dp replicas"
    tensor_parallel = True


class DDPPPStrategy(ComposedStrategy):
    name = "ddp+pp"
    summary = "2D: pipeline of --pp stages, each stage replicated by DDP over --dp ranks"
    data_parallel = DataParallel.DDP
    pipeline = True


class FSDPPPStrategy(ComposedStrategy):
    name = "fsdp+pp"
    summary = "2D: pipeline of --pp stages, each stage sharded by FSDP2 over --dp ranks"
    pipeline = True


class FSDPCPStrategy(ComposedStrategy):
    """FSDP2 over the dp x cp ranks flattened; every sequence split over the --cp ranks."""

    name = "fsdp+cp"
    summary = (
        "2D: context parallel within --cp ranks (sequences split), FSDP2 over all --dp x --cp ranks"
    )
    context_parallel = True
    compile_refusal = CPStrategy.compile_refusal


class FSDPTPPPStrategy(ComposedStrategy):
    name = "fsdp+tp+pp"
    summary = "3D: pipeline stages, tensor parallel inside each, FSDP2 over --dp replicas"
    tensor_parallel = True
    pipeline = True


class FSDPCPTPStrategy(ComposedStrategy):
    """Tensor parallel inside, context parallel across tp groups, FSDP2 over dp x cp."""

    name = "fsdp+cp+tp"
    summary = (
        "3D: tensor parallel within --tp ranks, every sequence split over --cp tp groups "
        "(K/V of the local heads gathered), FSDP2 over --dp x --cp"
    )
    tensor_parallel = True
    context_parallel = True
    compile_refusal = CPStrategy.compile_refusal


class FSDPCPPPStrategy(ComposedStrategy):
    """Pipeline stages; inside each, sequences split over --cp ranks; FSDP2 over dp x cp."""

    name = "fsdp+cp+pp"
    summary = (
        "3D: pipeline of --pp stages, every sequence split over --cp ranks within a stage, "
        "FSDP2 over --dp x --cp"
    )
    context_parallel = True
    pipeline = True
    compile_refusal = CPStrategy.compile_refusal


class FSDPCPTPPPStrategy(ComposedStrategy):
    """All four on one (pp, dp, cp, tp) mesh: the 4D showcase."""

    name = "fsdp+cp+tp+pp"
    summary = (
        "4D: pipeline stages; inside each, tensor parallel within --tp ranks and sequences "
        "split over --cp tp groups; FSDP2 over --dp x --cp"
    )
    tensor_parallel = True
    context_parallel = True
    pipeline = True
    compile_refusal = CPStrategy.compile_refusal
