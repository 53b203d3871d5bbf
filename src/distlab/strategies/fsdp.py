"""``fsdp``: fully sharded data parallelism with FSDP2 (``fully_shard``).

Each transformer block, and then the root model, becomes an FSDP unit whose
parameters, gradients and optimizer state are split evenly (dim 0) across
ranks as DTensors. Before a unit's forward its parameters are all-gathered;
after backward its gradients are reduce-scattered so each rank keeps (and
updates) only its shard.

``reshard_after_forward`` chooses between the ZeRO stages: True frees the
gathered parameters after forward and gathers them again for backward (ZeRO-3:
parameters sharded at rest); False keeps them from forward to backward
(ZeRO-2-like: less communication, more memory during the step).

Memory per rank: 16 / N bytes per parameter with fp32 AdamW (everything sharded).
Communication per step: all-gather of the parameters in forward (and again in
backward when resharding) plus one reduce-scatter of the gradients.

``--precision bf16`` is FSDP2's mixed-precision policy (``mixed_precision``),
not autocast: parameters are gathered and computed in bf16 (half the gathered
bytes and memory), gradients reduced in fp32, the sharded state stays fp32.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from distlab.config import Config
from distlab.distributed import RankContext
from distlab.measure.memory import ModelStateBytes, predicted_bytes
from distlab.strategies.base import FSDP_OPTIONS, ModuleTrainStep, Strategy, TrainStep
from distlab.strategies.regional_compile import apply_compile


def mixed_precision(precision: str) -> MixedPrecisionPolicy:
    """FSDP2's policy for ``--precision``: bf16 compute, fp32 gradient reduction; or all fp32.

    With bf16 each unit casts its fp32 shards to bf16 once, before the
    all-gather (half the gathered bytes), runs its forward and backward on the
    bf16 parameters, and casts the gradients to fp32 before the reduce-scatter,
    so the sharded gradients, the master weights and the optimizer state stay fp32.
    """
    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def apply_fsdp(model: nn.Module, mesh, reshard_after_forward: bool, precision: str) -> FSDPModule:
    """Shard every transformer block, then the root (embeddings, final norm, head).

    The root is never resharded after forward (FSDP2's default for it): backward
    starts with the root's LM head, so freeing its parameters at the end of
    forward would only mean gathering them again at once. ``precision`` picks
    the mixed-precision policy (``mixed_precision``); the train step then runs
    without autocast (``distlab.strategies.base.autocast``).
    """
    policy = mixed_precision(precision)
    for block in model.blocks.values():
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    # None: FSDP2 keeps the root's parameters gathered from forward into backward.
    return fully_shard(
        model,
        mesh=mesh,
        reshard_after_forward=None if reshard_after_forward else False,
        mp_policy=policy,
    )


class FSDPStrategy(Strategy):
    """Shard parameters, gradients and optimizer state across all ranks."""

    name = "fsdp"
    summary = (
        "FSDP2 fully_shard per block: params, grads, optimizer state sharded "
        "(ZeRO-3; ZeRO-2-like with --no-reshard-after-forward)"
    )
    options = FSDP_OPTIONS
    data_parallel = "fsdp"

    def predicted_state_bytes(self, config: Config, n_params: int) -> ModelStateBytes:
        n = config.nproc
        return predicted_bytes(n_params, config.optimizer, params_div=n, grads_div=n, optim_div=n)

    def prepare(self, model: nn.Module, ctx: RankContext, config: Config) -> TrainStep:
        model.to(ctx.device)
        mesh = init_device_mesh(ctx.device_type, (ctx.world_size,), mesh_dim_names=("dp",))
        if config.compile:
            apply_compile(model)  # before fully_shard: its hooks stay outside the graphs
        sharded = apply_fsdp(model, mesh, config.reshard_after_forward, config.precision)

        def gradient_sync(enabled: bool) -> contextlib.AbstractContextManager:
            sharded.set_requires_gradient_sync(enabled)
            return contextlib.nullcontext()

        return ModuleTrainStep(
            sharded,
            ctx,
            config,
            dp_rank=ctx.rank,
            dp_size=ctx.world_size,
            dp_group=mesh.get_group(),
            gradient_sync=gradient_sync,
        )
