"""The hand-written training steps that ``overhead.py`` holds distlab's steps against.

One set-up and one step per family, written against the libraries directly,
doing the work distlab's step does for the figures it reports and nothing else:
forward, cross-entropy, backward, gradient clipping to ``config.grad_clip``
(its global norm read as a float), optimizer step, zero_grad, LR schedule step,
and the loss averaged over the data-parallel ranks (one all-reduce; none when
there is one replica, as in tp and pp). The model, optimizer (AdamW), schedule
and batches are distlab's, so both sides do the same arithmetic.

- ``ddp``: ``DistributedDataParallel(process_group=group)``.
- ``fsdp``: ``fully_shard`` on each block, then the root, over ``group``.
- ``zero2``: ``deepspeed.initialize`` with the config dict distlab generates
  (``deepspeed_config``: the engine's settings are set-up, not step overhead),
  then ``engine(x)``, ``engine.backward``, ``engine.step``,
  ``engine.get_global_grad_norm``. DeepSpeed picks its data-parallel group
  itself (a clone of the world group); the hand-written engine is handed
  ``group`` in that clone's place while it is built.
- ``tp``: distlab's ``apply_tp`` over a mesh on ``group``. The plan (which
  linear is column- or row-parallel, the replicated norms, the embedding's
  gradient hook) is what tensor parallelism is, not overhead of distlab's
  step; writing it again would only duplicate it, and any difference between
  two plans would be measured instead of the step.
- ``pp``: the layers cut in ``pp`` equal stages by hand, one
  ``PipelineStage`` per rank on ``group`` (static shapes, as distlab gives
  them), the schedule class distlab uses for ``config.schedule`` with the same
  number of microbatches, and clipping by the norm summed over stages.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.pipelining import PipelineStage
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from distlab.config import Config, resolved_seq_len
from distlab.model import build_model
from distlab.optim import block_groups, build_optimizer, build_scheduler
from distlab.strategies.deepspeed_config import deepspeed_config
from distlab.strategies.pipeline_schedules import schedule_class
from distlab.strategies.tp_plan import apply_tp

HandStep = Callable[[torch.Tensor, torch.Tensor], tuple[float, float]]
"""(this rank's inputs, targets) -> (mean loss of the global batch, gradient norm)."""


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy over all positions."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def mean_loss(loss: torch.Tensor, group: dist.ProcessGroup, replicas: int) -> float:
    """The loss averaged over the data-parallel replicas (gloo has no AVG)."""
    loss = loss.detach()
    if replicas > 1:
        dist.all_reduce(loss, group=group)
        loss = loss / replicas
    return loss.item()


def norm_value(norm: torch.Tensor) -> float:
    """A gradient norm as a float (a sharded model's norm is a DTensor: reduce it)."""
    return (norm.full_tensor() if isinstance(norm, DTensor) else norm).item()


def hand_mesh(group: dist.ProcessGroup) -> DeviceMesh:
    """A 1-D mesh over ``group``, named after it.

    Meshes over the same ranks with the same dimension names compare equal
    whatever their process groups, and DTensor caches sharding decisions by
    mesh: without its own name, this mesh's collectives could run on another
    equal mesh's group (distlab's, on the counting backend).
    """
    return DeviceMesh.from_group(group, "cpu", mesh_dim_names=(f"hand{group.group_name}",))


@dataclass
class ModuleStep:
    """Forward, backward, clip, AdamW, schedule around a wrapped module (ddp, fsdp, tp)."""

    model: nn.Module
    config: Config
    group: dist.ProcessGroup
    replicas: int

    def __post_init__(self) -> None:
        self.optimizer = build_optimizer(block_groups(self.model), self.config)
        self.scheduler = build_scheduler(self.optimizer, self.config)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        loss = cross_entropy(self.model(x), y)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return mean_loss(loss, self.group, self.replicas), norm_value(norm)


def ddp_step(config: Config, group: dist.ProcessGroup) -> HandStep:
    """DDP over ``group``: gradients all-reduced in buckets during backward."""
    model = build_model(config.model, config.seed)
    model = DistributedDataParallel(model, process_group=group, gradient_as_bucket_view=True)
    return ModuleStep(model, config, group, group.size())


def fsdp_step(config: Config, group: dist.ProcessGroup) -> HandStep:
    """FSDP2 over ``group``: every block a unit, then the root."""
    model = build_model(config.model, config.seed)
    mesh = hand_mesh(group)
    for block in model.blocks.values():
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return ModuleStep(model, config, group, group.size())


def tp_step(config: Config, group: dist.ProcessGroup) -> HandStep:
    """Tensor parallelism over ``group`` with distlab's plan (``apply_tp``)."""
    model = build_model(config.model, config.seed)
    mesh = hand_mesh(group)
    apply_tp(model, mesh, sequence_parallel=False)
    return ModuleStep(model, config, group, replicas=1)


def zero2_step(config: Config, group: dist.ProcessGroup) -> HandStep:
    """A DeepSpeed ZeRO-2 engine over ``group``, with the config dict distlab uses."""
    import deepspeed  # optional: the [deepspeed] extra
    from deepspeed.utils import groups

    model = build_model(config.model, config.seed)
    n_params = sum(p.numel() for p in model.parameters())
    # DeepSpeed's data-parallel group is its cached clone of the world group: use ``group``.
    cached = groups._WORLD_GROUP
    if group is not dist.group.WORLD:
        groups._WORLD_GROUP = group
    try:
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=model.parameters(),
            config=deepspeed_config(config, 2, group.size(), n_params),
            lr_scheduler=lambda optimizer: build_scheduler(optimizer, config),
        )
    finally:
        groups._WORLD_GROUP = cached

    def step(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        loss = cross_entropy(engine(x), y)
        engine.backward(loss)
        engine.step()
        return mean_loss(loss, group, group.size()), float(engine.get_global_grad_norm())

    return step


def pp_step(config: Config, group: dist.ProcessGroup, microbatches: int) -> HandStep:
    """One pipeline stage per rank of ``group``, driven by ``config.schedule``'s class."""
    if config.schedule not in ("gpipe", "1f1b"):
        raise ValueError("the hand-written pipeline runs one stage per rank (gpipe or 1f1b)")
    rank, stages = group.rank(), group.size()
    model = build_model(config.model, config.seed)
    per_stage, uneven = divmod(model.config.n_layer, stages)
    if uneven:
        raise ValueError(f"the hand-written pipeline cuts {model.config.n_layer} layers evenly")
    first, last = rank == 0, rank == stages - 1
    for key in list(model.blocks):
        if int(key) // per_stage != rank:
            del model.blocks[key]
    if not first:
        model.wte = model.wpe = None
    if not last:
        model.ln_f = model.lm_head = None
    rows = config.global_batch // microbatches
    seq, d = resolved_seq_len(config), model.config.d_model
    hidden = torch.empty(rows, seq, d, device="meta", requires_grad=True)
    tokens = torch.empty(rows, seq, dtype=torch.long, device="meta")
    logits = torch.empty(rows, seq, model.config.vocab_size, device="meta", requires_grad=True)
    stage = PipelineStage(
        model,
        rank,
        stages,
        torch.device("cpu"),
        tokens if first else hidden,
        logits if last else hidden,
        group=group,
    )
    schedule = schedule_class(config.schedule)(
        stage, n_microbatches=microbatches, loss_fn=cross_entropy, scale_grads=True
    )
    optimizer = build_optimizer(block_groups(model), config)
    scheduler = build_scheduler(optimizer, config)
    params = list(model.parameters())

    def step(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        losses: list[torch.Tensor] = []
        schedule.step(*((x,) if first else ()), target=y if last else None, losses=losses)
        loss = torch.stack([loss.detach() for loss in losses]).mean() if last else torch.zeros(())
        dist.broadcast(loss, group=group, group_src=stages - 1)
        squared = torch.nn.utils.get_total_norm([p.grad for p in params]).pow(2)
        dist.all_reduce(squared, group=group)
        norm = squared.sqrt()
        torch.nn.utils.clip_grads_with_norm_(params, config.grad_clip, norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        return loss.item(), norm.item()

    return step


def hand_step(
    strategy: str, config: Config, group: dist.ProcessGroup, microbatches: int | None
) -> HandStep:
    """The hand-written step of ``strategy``'s family on ``group`` (all ranks of the run)."""
    if strategy == "pp":
        return pp_step(config, group, microbatches)
    builders = {"ddp": ddp_step, "fsdp": fsdp_step, "tp": tp_step, "zero2": zero2_step}
    if strategy not in builders:
        raise ValueError(f"no hand-written step for {strategy}; choose from {[*builders, 'pp']}")
    return builders[strategy](config, group)


def deepspeed_environment(rank: int, world: int) -> None:
    """What DeepSpeed reads from the environment (distlab's zero strategies set the same)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("LOCAL_RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(world))
