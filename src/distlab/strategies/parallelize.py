"""The one way a strategy parallelizes its model: ``parallelize`` applies, in this order,

1. tensor parallelism (``tp_plan.apply_tp``) over the mesh's ``tp`` dimension;
2. context parallelism (``cp_attention.apply_cp``) over ``cp``;
3. activation checkpointing (``--ac``, ``activation_checkpoint.apply_ac``): after tp and
   cp, so a recomputed block runs their DTensor / collective forward again;
4. ``--compile`` (``regional_compile.apply_compile``), block by block: after the above, so
   their hooks are traced into the graphs, and before FSDP or DDP, whose hooks stay
   outside them;
5. data parallelism, by the strategy's flavour: FSDP2 over ``dp_shard_cp``
   (``fully_shard.apply_fsdp``, ``--prefetch`` by ``fully_shard.set_prefetch``) or DDP over
   ``dp_cp`` (``apply_ddp``, ``--bucket-mb``).

A step a strategy does not use is skipped (degree 1, ``--ac none``, no ``--compile``, a
flavour that is neither FSDP nor DDP), so a single-dimension strategy is this path with one
dimension: ``tp`` is step 1, ``fsdp`` step 5, ``single`` none. Flavours whose library wraps
the model itself (DeepSpeed's engine, fairscale's OSS) get steps 3 and 4 here and wrap
the result in their own ``prepare``.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.nn.parallel import DistributedDataParallel

from distlab.config import Config
from distlab.strategies.activation_checkpoint import apply_ac
from distlab.strategies.cp_attention import apply_cp
from distlab.strategies.data_parallel import DataParallel
from distlab.strategies.fully_shard import apply_fsdp, offload_policy, set_prefetch
from distlab.strategies.parallel_dims import ParallelDims, fsdp_mesh, view
from distlab.strategies.regional_compile import apply_compile
from distlab.strategies.tp_plan import apply_tp


def parallelize(
    model: nn.Module,
    mesh: DeviceMesh | None,
    dims: ParallelDims,
    config: Config,
    data_parallel: DataParallel,
    device: torch.device,
    ddp_bucket_views: bool = True,
) -> nn.Module:
    """Apply tp, cp, ``--ac``, ``--compile`` and FSDP or DDP to ``model`` (a whole model or a
    pipeline stage, already on ``device``) in the order above; returns the module to train
    (the FSDP module, the DDP wrapper, or ``model`` itself). ``mesh`` may be None for a
    strategy whose library keeps its own groups (DeepSpeed, fairscale) or that has one rank:
    it then uses no degree above 1 and neither FSDP nor DDP, so no step reads the mesh."""
    needs_mesh = (
        dims.tp > 1 or dims.cp > 1 or data_parallel in (DataParallel.FSDP, DataParallel.DDP)
    )
    assert mesh is not None or not needs_mesh, "parallelize needs the strategy's mesh"
    if dims.tp > 1:
        apply_tp(model, mesh["tp"], config.sequence_parallel)
        # The LM head's logits are DTensor.to_local() views; FSDP2 warns that an
        # in-place op on them would skip its pre-backward hook. Only the loss reads them.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view")
    if dims.cp > 1:
        apply_cp(model, mesh["cp"], config.cp_attention)
    apply_ac(model, config.ac)
    if config.compile:
        apply_compile(model)
    if data_parallel is DataParallel.FSDP:
        offload = offload_policy(config.offload, device.type)
        shards = fsdp_mesh(mesh, dims)
        if dims.tp > 1:
            # made on every rank (it is a process group); DTensor then sums the gradient
            # norm over it in one all-reduce, not one per dimension (``MESH_VIEWS``)
            view(mesh, "dp_shard_cp_tp")
        sharded = apply_fsdp(model, shards, config.reshard_after_forward, config.precision, offload)
        if config.prefetch is not None:
            set_prefetch(sharded, config.prefetch, asynchronous=device.type == "cpu")
        return sharded
    if data_parallel is DataParallel.DDP:
        group = view(mesh, "dp_cp").get_group()
        return apply_ddp(model, device, group, ddp_bucket_views, config.bucket_mb)
    return model


def apply_ddp(
    module: nn.Module,
    device: torch.device,
    group: dist.ProcessGroup | None = None,
    bucket_views: bool = True,
    bucket_mb: float | None = None,
) -> DistributedDataParallel:
    """Wrap ``module`` in DDP over ``group`` (default: every rank), its gradient buckets of
    ``bucket_mb`` MiB (``--bucket-mb``; None: torch's 25 MiB, the first bucket 1 MiB).

    ``bucket_views``: the gradients are views into DDP's all-reduce buckets
    (``gradient_as_bucket_view``), so the buckets cost no second copy of them; they
    stay allocated between steps, so the train step zeroes them rather than dropping
    them. Only a pipeline's DDP turns this off (``composed.PIPELINE_DDP_BUCKET_VIEWS``
    says why).
    """
    device_ids = [device.index] if device.type == "cuda" else None  # a one-device module
    return DistributedDataParallel(
        module,
        device_ids=device_ids,
        process_group=group,
        gradient_as_bucket_view=bucket_views,
        bucket_cap_mb=bucket_mb,
    )
