"""Parameter-sized bytes of a step beyond the model state, by moment.

FSDP's gathered units (a block's, the root's), DDP's second gradient copy inside a
pipeline, the optimizer's temporaries and the gradients it steps on: what
``theory.memory.predict_peak`` adds to the model state at each candidate moment.
"""

from __future__ import annotations

import math

from distlab.config import Config, model_shape
from distlab.measure.memory import ModelStateBytes
from distlab.model import count_parameters
from distlab.strategies.composed import PIPELINE_DDP_BUCKET_VIEWS
from distlab.strategies.data_parallel import DataParallel
from distlab.strategies.parallel_dims import (
    fsdp_gathered_shapes,
    numel,
    rank0_shapes,
)
from distlab.theory.rank_layout import FP32, RankLayout, compute_bytes

ROOT_PARAMETERS = ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias", "lm_head.weight")
"""Parameters outside the blocks: FSDP's root unit, gathered for the whole step."""


def ddp_pipeline_buckets(layout: RankLayout, state: ModelStateBytes) -> int:
    """DDP inside a pipeline skips its all-reduce until the last micro-batch, whose
    backward copies the accumulated gradients into DDP's buckets: a second copy of the
    stage's gradients, alive from then to the end of the step."""
    copies = (
        layout.data_parallel is DataParallel.DDP and layout.pp > 1 and not PIPELINE_DDP_BUCKET_VIEWS
    )
    return state.grads if copies else 0


def block_elements(config: Config, layout: RankLayout, gathered: bool = False) -> list[int]:
    """Rank 0's parameter elements of each of its blocks (tensor-parallel local);
    ``gathered``: as FSDP2 gathers them (``fsdp_gathered_shapes``)."""
    shapes = _local_shapes(config, layout, gathered)
    per_block: dict[str, int] = {}
    for name, shape in shapes.items():
        if name.startswith("blocks."):
            index = name.split(".")[1]
            per_block[index] = per_block.get(index, 0) + math.prod(shape)
    return [per_block[i] for i in sorted(per_block, key=int)]


def root_elements(
    config: Config, layout: RankLayout, head_only: bool = False, gathered: bool = False
) -> int:
    """Rank 0's elements outside the blocks (only the final norm and head: ``head_only``);
    ``gathered``: as FSDP2 gathers them (``fsdp_gathered_shapes``)."""
    shapes = _local_shapes(config, layout, gathered)
    names = ROOT_PARAMETERS[2:] if head_only else ROOT_PARAMETERS
    return numel({name: shape for name, shape in shapes.items() if name in names})


def _local_shapes(config: Config, layout: RankLayout, gathered: bool) -> dict[str, tuple[int, ...]]:
    """Rank 0's tensor-parallel local parameter shapes of its stage(s), padded as FSDP2
    gathers them if ``gathered``."""
    shapes = rank0_shapes(config, layout)
    return fsdp_gathered_shapes(shapes, layout.shard) if gathered else shapes


def gathered_bytes(config: Config, layout: RankLayout) -> dict[str, int]:
    """Parameters gathered for the step, by the category the tracker files them in.

    FSDP (``comm_buffers``): the root unit (embeddings, final norm, head) stays
    gathered all step; inside a pipeline every unit of the stage stays gathered
    across the micro-batches, and its unsharded gradients accumulate until the
    one reduce-scatter at the end (twice the stage's parameters). ZeRO-3
    (``params``): DeepSpeed keeps every gathered parameter until its backward
    (``stage3_max_reuse_distance``), so at the start of backward all of them.
    """
    e = compute_bytes(config, layout)
    shapes = rank0_shapes(config, layout)
    if layout.data_parallel is DataParallel.FSDP and layout.pp > 1:
        padded = numel(fsdp_gathered_shapes(shapes, layout.shard))
        return {"params": 0, "comm_buffers": e * (padded + numel(shapes))}
    if layout.data_parallel is DataParallel.FSDP:
        return {"params": 0, "comm_buffers": e * root_elements(config, layout, gathered=True)}
    if layout.data_parallel is DataParallel.ZERO3:
        return {"params": e * numel(shapes), "comm_buffers": 0}
    return {"params": 0, "comm_buffers": 0}


def optimizer_temporaries(config: Config, layout: RankLayout, state: ModelStateBytes) -> int:
    """AdamW's foreach step allocates one fp32 buffer the size of the group it updates.

    distlab's optimizer has one group per block and one for the rest
    (``optim.block_groups``), stepped one after the other: the largest of them. Where
    the state is sharded, the optimizer slice (one group): AdamW keeps 8 B per updated
    element (DeepSpeed 12, with its fp32 master slice).
    """
    if config.optimizer != "adamw":
        return 0
    if layout.data_parallel.deepspeed:
        return state.optimizer // 3
    if layout.data_parallel.fairscale:
        return state.optimizer // 2
    groups = [*block_elements(config, layout), root_elements(config, layout)]
    return state.params * max(groups) // sum(groups)


def optimizer_step_grads(config: Config, layout: RankLayout, state: ModelStateBytes) -> int:
    """Gradients alive during the optimizer step: the rank's own, except under DeepSpeed,
    whose inner optimizer reads the fp32 gradient of its slice (4 P / N) after the
    reduction has freed the rest."""
    if layout.data_parallel.deepspeed:
        return FP32 * count_parameters(model_shape(config)) // layout.dp
    return state.grads
