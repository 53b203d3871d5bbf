"""``zero1``, ``zero2``, ``zero3``: DeepSpeed's ZeRO optimizer, optionally offloading to CPU.

DeepSpeed owns the whole training step: ``deepspeed.initialize`` wraps the GPT
in an engine built from a config dict that ``deepspeed_config``
(``distlab.strategies.deepspeed_config``) generates from distlab's ``Config``
(micro-batch, gradient accumulation, optimizer, clipping, precision, ZeRO stage,
offload), and ``engine.backward`` / ``engine.step`` replace ``loss.backward()`` /
``optimizer.step()``.

What each stage shards over the N data-parallel ranks:

- ZeRO-1 shards the optimizer state. Each rank keeps the full parameters and,
  until the end of backward, full gradients; then the gradients are reduced so
  each rank gets the 1/N slice it owns, it updates that slice of the flat
  parameter buffer, and an all-gather shares the updated slices.
- ZeRO-2 also shards the gradients: during backward, full buckets of gradients
  are reduced to the ranks owning their elements, so a rank never holds more
  than one bucket plus its own 1/N slice.
- ZeRO-3 also shards the parameters: each rank keeps 1/N of every parameter and
  all-gathers a layer's parameters just before its forward. By default
  (``stage3_max_reuse_distance``) DeepSpeed keeps them gathered until the
  layer's backward when they will be reused soon, which on the lab's models
  means all of them: one gather per step, the full parameters live during the
  step, sharded at rest.

Memory per rank: ``distlab.strategies.deepspeed_memory`` (DeepSpeed keeps more than the
ZeRO paper counts; each term is predicted there and measured from the engine).

Communication per step, per rank (4P bytes of fp32 gradients or parameters):
the ZeRO paper's ZeRO-1/2 reduce-scatter the gradients and all-gather the
updated parameters, DDP's volume. DeepSpeed all-reduces each gradient bucket
that spans several ranks' slices (``use_multi_rank_bucket_allreduce``, the
default) and then all-gathers the parameters: all-reduce 4P + all-gather 4P,
1.5x DDP. ZeRO-3 all-gathers the parameters (once per step, see above; the
paper's 1.5x DDP assumes a second gather in backward) and reduce-scatters the
gradients (``distlab.theory`` predicts these per collective).

Gradient accumulation (A micro-batches per step, ``--micro-batch``). ZeRO-1
reduces once, at the step's last backward. ZeRO-2/3 partition gradients as
backward produces them, so DeepSpeed's own accumulation reduces each
micro-batch's gradients (A x 4P; ``--zero-reduce per-microbatch``, ZeRO-3's
default). ``--zero-reduce once`` (ZeRO-2's default) runs the micro-batches in
``engine.coalesce_grad_reduction()``: the gradients add up on the parameters,
unsharded (4P per rank, ZeRO-1's gradient memory), and are reduced once at the
block's exit; then ``engine.step``. ZeRO-3 still gathers the parameters in
every micro-batch. DeepSpeed refuses the block for its BF16_Optimizer wrapper,
which it builds only for ZeRO-1 (bf16 without offload), the stage that needs
no block; fp32, bf16 and offload all run it here (see ``docs/strategies/zero.md``).

CPU offload (``--offload optimizer``, all stages; ``--offload params``, ZeRO-3):
the master slice, its gradient slice and the optimizer state (16P/N bytes) live
in CPU memory, and the update runs on the CPU with DeepSpeed's vectorised
``DeepSpeedCPUAdam`` (ZeRO-Offload); ``params`` moves the ZeRO-3 parameter
slices there too. Each step then copies 4P/N of gradients down and 4P/N of
parameters back per rank. On a CPU-only machine offload moves nothing but runs
the same code, so it is tested here.

Optimizers and bf16 are set in the config dict (``distlab.strategies.deepspeed_config``):
torch's own SGD and AdamW (DeepSpeed's CPU Adam under offload), DeepSpeed's own bf16 mode.

The learning-rate schedule is distlab's ``LambdaLR`` (``build_scheduler``)
given to DeepSpeed as a client scheduler: DeepSpeed's ``WarmupCosineLR`` starts
its linear warm-up at 0 rather than lr/warmup and its cosine is one step off,
so it cannot reproduce the schedule the other strategies use.

``--compile`` (zero1, zero2): each block is compiled before ``deepspeed.initialize``
(``regional_compile``); compilation happens in the first forward, after
DeepSpeed has moved the parameters into its flat buffers, which it then updates
in place. ZeRO-3 refuses it (``Zero3Strategy.compile_refusal``).

``--ac`` checkpoints each block before ``deepspeed.initialize`` too
(``activation_checkpoint``; torch's checkpoint, not DeepSpeed's own). Under
ZeRO-3, ``full`` matches ``single`` but ``selective`` trained another model
(weights 1.9e-3 apart after 5 SGD steps on 2 ranks), so ZeRO-3 refuses it
(``Zero3Strategy.selective_ac_refusal``).

When to use it: ZeRO-1/2 when the optimizer state (and gradients) no longer fit
but the parameters do: up to 4-8x less state per rank for DDP-like traffic.
ZeRO-3 when even the parameters do not fit at rest (bound how many stay
gathered with ``stage3_max_live_parameters`` / ``stage3_max_reuse_distance``
when they do not fit during the step either). Offload when GPU memory, not
PCIe bandwidth or CPU time, is the limit.

Checkpoints are DeepSpeed's own (``engine.save_checkpoint``: per-rank optimizer
partitions) and resume with the same stage and world size.

Requires the optional extra ``pip install 'distlab[deepspeed]'``. DeepSpeed
JIT-compiles its C++ ops on first use (about 40 s, then cached).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import warnings
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd import Variable

from distlab.checkpoint.state import set_schedule_position
from distlab.checkpoint.verify import verify_checkpoint
from distlab.config import Config, grad_accum_steps
from distlab.distributed import RankContext
from distlab.errors import DistlabError
from distlab.measure.memory import ModelStateBytes
from distlab.measure.step_memory import HeldTensors
from distlab.measure.timeline import phase
from distlab.optim import build_scheduler
from distlab.strategies.base import StepResult, Strategy, TrainStep
from distlab.strategies.data_parallel import DataParallel
from distlab.strategies.deepspeed_config import deepspeed_config
from distlab.strategies.deepspeed_memory import (
    ZERO_REDUCE_CHOICES,
    bucket_elements,
    held_buffers,
    measure_grad_bytes,
    measure_optimizer_bytes,
    measure_parameter_bytes,
    predicted_zero_bytes,
    zero_reduce_mode,
)
from distlab.strategies.parallelize import parallelize
from distlab.strategies.step_parts import language_model_loss, mean_over_group, micro_batches

OFFLOAD_CHOICES = ("none", "optimizer", "params")
CHECKPOINT_TAG = "deepspeed"
"""Sub-directory (DeepSpeed "tag") of a checkpoint directory that DeepSpeed writes."""


class DeepSpeedTrainStep(TrainStep):
    """One optimizer step through a DeepSpeed engine: forward, engine.backward, engine.step."""

    def __init__(self, engine, ctx: RankContext, config: Config, stage: int) -> None:
        self.engine = engine
        self.ctx = ctx
        self.config = config
        self.stage = stage
        self.dp_rank, self.dp_size = ctx.rank, ctx.world_size
        self.accum = grad_accum_steps(config, self.dp_size)
        self.reduce_once = (
            self.accum > 1 and stage > 1 and zero_reduce_mode(config, stage) == "once"
        )
        """Reduce the accumulated gradients once, after the step's last backward (see above)."""
        if self.reduce_once:
            # Each engine.step() below is an optimizer step: the micro-batches run inside
            # one coalesce_grad_reduction block, where step() may not be called.
            engine.set_gradient_accumulation_boundary(True)
        self.grad_bytes = 0
        """Peak gradient bytes of the last step (DeepSpeed frees gradients inside ``step``)."""

    def _sample_grads_after_autograd(self, grad: torch.Tensor) -> torch.Tensor:
        """Loss hook: count gradients when autograd finishes, before DeepSpeed's final reduction.

        That is the peak for ZeRO-1 (full gradients on every parameter); after
        ``engine.backward`` only the reduced partition is left, which is sampled too.
        """

        def sample() -> None:
            self.grad_bytes = measure_grad_bytes(self.engine)

        Variable._execution_engine.queue_callback(sample)
        return grad

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> StepResult:
        device = self.ctx.device
        loss_sum = torch.zeros((), device=device)
        batches = micro_batches(inputs, targets, self.accum)
        coalesce = self.engine.coalesce_grad_reduction() if self.reduce_once else nullcontext()
        with coalesce:  # reduce_once: one reduction of the summed gradients, at the exit
            for index, (x, y) in enumerate(batches):
                with phase("forward"):
                    # The logits go once the loss is computed (the theory counts them so).
                    logits = self.engine(x.to(device, non_blocking=True))
                    loss = language_model_loss(logits, y.to(device, non_blocking=True))
                    del logits
                last = index == self.accum - 1
                if last:
                    loss.register_hook(self._sample_grads_after_autograd)
                with phase("backward"):
                    self.engine.backward(loss)  # scales by 1 / accum
                loss_sum += loss.detach()
                if not self.reduce_once:
                    self._after_backward(last)
        if self.reduce_once:  # the summed gradients were reduced at the block's exit
            self._after_backward(last=True)
        grad_norm = self.engine.get_global_grad_norm()
        mean_loss = mean_over_group(loss_sum / self.accum, None, self.dp_size)
        return StepResult(loss=mean_loss, grad_norm=float(grad_norm or 0.0))

    def evaluate(self, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        """The engine's forward over the step's micro-batches, without gradients (ZeRO-3
        gathers each block's parameters in its forward as in training)."""
        device = self.ctx.device
        loss_sum = torch.zeros((), device=device)
        batches = micro_batches(inputs, targets, self.accum)
        with torch.no_grad():
            for x, y in batches:
                logits = self.engine(x.to(device))
                loss_sum += language_model_loss(logits, y.to(device)).float()
        return mean_over_group(loss_sum / self.accum, None, self.dp_size)

    def _after_backward(self, last: bool) -> None:
        """Sample the reduced gradients after the last backward; engine.step (a no-op on
        DeepSpeed's earlier micro-batches)."""
        if last:
            self.grad_bytes = max(self.grad_bytes, measure_grad_bytes(self.engine))
        with phase("optimizer"):
            self.engine.step()

    def current_lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def model_state_bytes(self) -> ModelStateBytes:
        return ModelStateBytes(
            params=measure_parameter_bytes(self.engine),
            grads=self.grad_bytes,
            optimizer=measure_optimizer_bytes(self.engine),
        )

    def held_tensors(self) -> HeldTensors:
        return HeldTensors(
            modules=[self.engine.module],
            optimizers=[self.engine.optimizer.optimizer],
            by_category=held_buffers(self.engine),
        )

    def full_model_state_dict(self) -> dict[str, torch.Tensor]:
        """The fp32 master weights, gathered from every rank's slice (bf16 runs compute
        with a bf16 copy of them; every stage, offloaded or not)."""
        from deepspeed.utils import safe_get_full_fp32_param

        return {
            name: safe_get_full_fp32_param(param).detach().cpu().clone()
            for name, param in self.engine.module.named_parameters()
        }

    def save_checkpoint(self, directory: Path) -> None:
        """DeepSpeed's own checkpoint (model, partitioned optimizer state, LR schedule)."""
        self.engine.save_checkpoint(str(directory), tag=CHECKPOINT_TAG)

    def load_checkpoint(self, directory: Path) -> None:
        """Restore what ``save_checkpoint`` wrote: same strategy and world size only.

        (DeepSpeed can convert ZeRO checkpoints between world sizes with its
        "universal checkpoint" tools; this lab does not do that for you.)
        """
        meta = verify_checkpoint(directory)  # every file, before DeepSpeed/torch reads any
        if (meta["format"], meta["world_size"]) != (self.config.strategy, self.dp_size):
            raise DistlabError(
                f"checkpoint {directory} was written by {meta['format']} on "
                f"{meta['world_size']} ranks; a DeepSpeed checkpoint resumes only with the same "
                f"strategy and world size ({self.config.strategy} on {self.dp_size} here)"
            )
        load_path, _ = self.engine.load_checkpoint(str(directory), tag=CHECKPOINT_TAG)
        if load_path is None:
            raise DistlabError(f"checkpoint {directory} holds no DeepSpeed state")
        set_schedule_position(self.engine.lr_scheduler, meta["next_step"])


class DeepSpeedZeroStrategy(Strategy):
    """ZeRO stage ``stage`` through DeepSpeed's engine (subclasses fix the stage)."""

    stage: int = 0
    options = frozenset({"offload", "zero_reduce"})

    def validate(self, config: Config) -> None:
        if importlib.util.find_spec("deepspeed") is None:
            raise DistlabError(
                f"strategy '{self.name}' needs DeepSpeed: pip install 'distlab[deepspeed]'"
            )
        if config.offload not in OFFLOAD_CHOICES:
            raise DistlabError(
                f"offload must be one of {', '.join(OFFLOAD_CHOICES)} (got '{config.offload}')"
            )
        if config.zero_reduce is not None and config.zero_reduce not in ZERO_REDUCE_CHOICES:
            raise DistlabError(
                f"zero_reduce must be one of {', '.join(ZERO_REDUCE_CHOICES)} "
                f"(got '{config.zero_reduce}')"
            )
        if config.offload == "params" and self.stage != 3:
            raise DistlabError(
                f"--offload params needs sharded parameters: use --strategy zero3 "
                f"(or --offload optimizer with {self.name})"
            )

    def predicted_state_bytes(self, config: Config, n_params: int) -> ModelStateBytes:
        """The ZeRO paper's count for this stage plus what DeepSpeed keeps besides (see above)."""
        return predicted_zero_bytes(config, self.stage, n_params)

    def resident_between_steps(self, config: Config, n_params: int) -> ModelStateBytes:
        """Gradient storage DeepSpeed keeps from step to step: ZeRO-3 its partition and
        bucket (without offload's CPU-side slice, made during the step); with optimizer
        offload, ZeRO-1/2 the CPU optimizer's gradient slice and staging buffers (all but
        the bucket); otherwise none."""
        state = self.predicted_state_bytes(config, n_params)
        if self.stage == 3:
            grads = predicted_zero_bytes(replace(config, offload="none"), 3, n_params).grads
        elif config.offload == "optimizer":
            grads = state.grads - 4 * bucket_elements(n_params)
        else:
            grads = 0
        return ModelStateBytes(params=state.params, grads=grads, optimizer=state.optimizer)

    def prepare(self, model: nn.Module, ctx: RankContext, config: Config) -> TrainStep:
        if ctx.device_type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # DeepSpeed reads the rank layout from the environment; the launcher does not set it.
        os.environ.setdefault("RANK", str(ctx.rank))
        os.environ.setdefault("LOCAL_RANK", str(ctx.rank))
        os.environ.setdefault("WORLD_SIZE", str(ctx.world_size))
        import deepspeed

        # DeepSpeed calls torch collectives that torch has deprecated: nothing a user can act on.
        warnings.filterwarnings(
            "ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning
        )
        if config.quiet:
            logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
        ctx.place(model)
        # --ac and --compile only (the engine is DeepSpeed's), before DeepSpeed takes and
        # flattens the parameters; the blocks compile lazily, at their first forward.
        model = parallelize(model, None, self.dims(config), config, self.data_parallel, ctx.device)
        n_params = sum(p.numel() for p in model.parameters())
        ds_config = deepspeed_config(config, self.stage, ctx.world_size, n_params)
        _skip_inference_all_reduce_op()
        deepspeed.init_distributed(dist_backend=dist.get_backend())
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=model.parameters(),
            config=ds_config,
            lr_scheduler=lambda optimizer: build_scheduler(optimizer, config),
        )
        return DeepSpeedTrainStep(engine, ctx, config, self.stage)


def _skip_inference_all_reduce_op() -> None:
    """DeepSpeed's communication backend builds a shared-memory all-reduce op on start: a
    C++ extension compiled on a machine's first DeepSpeed run (60-90 s of g++ here), used
    only by its inference all-reduce, which training never calls. Without the op that
    all-reduce falls back to torch's, so nothing the lab runs changes."""
    # import_module, not `import deepspeed.comm.torch as ...`: that name finds the torch
    # module, which deepspeed.comm re-exports as its attribute `torch`
    backend = importlib.import_module("deepspeed.comm.torch")
    backend.build_shm_op = lambda: None


class Zero1Strategy(DeepSpeedZeroStrategy):
    name = "zero1"
    summary = "DeepSpeed ZeRO-1: optimizer state sharded (optional --offload optimizer)"
    stage = 1
    data_parallel = DataParallel.ZERO1
    options = frozenset({"offload"})  # reduces once per step already: no zero_reduce


class Zero2Strategy(DeepSpeedZeroStrategy):
    name = "zero2"
    summary = "DeepSpeed ZeRO-2: optimizer state and gradients sharded (optional offload)"
    stage = 2
    data_parallel = DataParallel.ZERO2


class Zero3Strategy(DeepSpeedZeroStrategy):
    name = "zero3"
    summary = "DeepSpeed ZeRO-3: params, grads, optimizer state sharded (offload optimizer|params)"
    stage = 3
    data_parallel = DataParallel.ZERO3
    compile_refusal = (
        "ZeRO-3 gathers each layer's parameters in hooks on every Linear inside a block, "
        "and DeepSpeed keeps those hooks out of torch.compile (torch.compiler.disable), "
        "so a block cannot be one graph; use zero1, zero2 or fsdp"
    )
    selective_ac_refusal = (
        "ZeRO-3's per-Linear parameter gather and release does not compose with torch's "
        "selective checkpointing (measured: a 2-rank run trained a different model than single, "
        "weights 2e-3 apart); use --ac full, or zero1, zero2 or fsdp"
    )
