"""``cp``: context parallelism, every rank of a cp group holds a slice of every sequence.

The cp ranks of a group train the same rows of the global batch, but each
runs the model on only 2 T / (2 cp) = T / cp of each sequence's T tokens, so
activations per rank shrink by cp. Only attention mixes tokens: every other
op (embeddings, norms, MLP, LM head, the loss) is position-wise and runs on
the local tokens as it would on all of them.

Load balance. Causal attention costs more for later queries (they see more
keys), so contiguous slices would give the last rank cp times the work of the
first. Each sequence is cut into 2 cp chunks and rank r holds chunks r and
2 cp - 1 - r (head and tail), so every rank has the same attention work. With
cp = 2 and T = 8 (chunks of 2 tokens)::

    positions   0 1 | 2 3 | 4 5 | 6 7
    chunk         0     1     2     3
    rank 0      [0 1]             [6 7]     chunks 0 and 3
    rank 1            [2 3] [4 5]           chunks 1 and 2

The rank's tokens keep their global positions (``GPT.forward(tokens,
positions)``) for the position embedding, and its targets are sliced the same
way.

Attention (``cp_attention.ContextParallelAttention``, installed as each block's
``attn.attention``): the queries stay local; the keys and values of every
layer are all-gathered over the cp group with
``_functional_collectives.all_gather_single_autograd`` (whose backward
reduce-scatters their gradients back to the ranks that computed them),
reordered from rank order into sequence order, and SDPA runs with an explicit
boolean causal mask: a local query at global position i attends to the keys at
positions <= i. It is written by hand because torch's
``torch.distributed.tensor.experimental.context_parallel`` fails on CPU (its
DTensor has no sharding rule for ``_scaled_dot_product_flash_attention_for_cpu``;
``DESIGN.md``). On a GPU torch's version would work (ring attention with
load-balanced shards), but it is not used here: nothing in this lab could test it.

``--cp-attention ring`` (``cp_attention.RingAttention``) passes the keys and values around
the cp group with send/recv instead (cp - 1 steps), for comparing the two
communication patterns; see its docstring.

Gradients. Each rank's loss is the mean over its own tokens; the global
batch's loss is the mean of those over the dp x cp ranks (every rank holds as
many tokens), and so is its gradient: a rank's backward gives the gradient of
its own loss through its own tokens and, via the reduce-scatter, through the
keys and values the other ranks attended to. Averaging the gradients over the
dp x cp ranks (DDP over all of them here; FSDP over them flattened in
``fsdp+cp``) therefore gives exactly ``single``'s gradient, and the reported
loss is the mean over the same ranks.

Memory per rank: the full model state (DDP: 16 N bytes with fp32 AdamW);
activations for T / cp tokens, plus the gathered keys and values of each
layer (SDPA saves them for backward: 2 T d per layer instead of 2 T d / cp).
Communication per step, per layer and micro-batch of B rows: all-gather of K
and V in forward (each B T d elements gathered), reduce-scatter of their
gradients in backward (the same), plus DDP's all-reduce of the 4 N gradient
bytes over dp x cp ranks (``distlab.theory.comm``).

``--cp C`` (default for ``cp``: every rank) must divide ``--nproc``; the
nproc / C groups of C ranks are data-parallel replicas, each training its own
rows of the global batch.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from distlab.config import Config, resolved_seq_len
from distlab.distributed import RankContext
from distlab.errors import DistlabError
from distlab.measure.memory import ModelStateBytes
from distlab.strategies.base import DDP_OPTIONS, ModuleTrainStep, ReplicatedStateStrategy, TrainStep
from distlab.strategies.cp_attention import CP_ATTENTION, held_positions
from distlab.strategies.data_parallel import DataParallel
from distlab.strategies.degrees import cp_dims
from distlab.strategies.parallel_dims import ParallelDims, view
from distlab.strategies.parallelize import parallelize
from distlab.strategies.step_parts import (
    autocast,
    language_model_loss,
    mean_over_group,
    no_sync_unless,
)

CP_OPTIONS = frozenset({"cp", "cp_attention"})
"""Config fields of context parallelism."""


def validate_cp(config: Config, cp: int) -> None:
    """One-line error unless every sequence splits into 2 cp equal chunks and
    ``--cp-attention`` names a kind of attention."""
    if config.cp_attention not in CP_ATTENTION:
        raise DistlabError(
            f"unknown --cp-attention '{config.cp_attention}' "
            f"(choose one of: {', '.join(CP_ATTENTION)})"
        )
    seq_len = resolved_seq_len(config)
    if seq_len % (2 * cp):
        raise DistlabError(
            f"context parallelism over {cp} ranks cuts each sequence into 2 x {cp} = {2 * cp} "
            f"chunks (rank r holds chunks r and {2 * cp - 1} - r), so seq_len must be divisible "
            f"by {2 * cp} (got {seq_len}); change --seq-len or --cp"
        )


class ContextParallelTrainStep(ModuleTrainStep):
    """``ModuleTrainStep`` on this rank's slice of every sequence.

    ``loss_group`` of ``loss_size`` ranks: every rank whose local loss is a share of
    the global batch's (the dp x cp ranks); None for the default group.
    """

    def __init__(
        self,
        *args: Any,
        positions: torch.Tensor,
        loss_group: dist.ProcessGroup | None,
        loss_size: int,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.positions = positions.to(self.ctx.device)
        self.loss_group, self.loss_size = loss_group, loss_size

    def forward_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The mean loss over this rank's tokens of the micro-batch, at their global positions."""
        held = self.positions
        with autocast(self.ctx.device_type, self.config.precision, self.model):
            logits = self.model(inputs[:, held], positions=held)
        return language_model_loss(logits, targets[:, held])

    def mean_loss(self, local: torch.Tensor) -> float:
        """Every rank holds as many tokens: the global mean is the mean over all of them."""
        return mean_over_group(local, self.loss_group, self.loss_size)


class CPStrategy(ReplicatedStateStrategy):
    """Split every sequence over the cp ranks; DDP averages gradients over all ranks."""

    name = "cp"
    summary = (
        "context parallel: each of --cp ranks holds 2 head/tail chunks of every sequence, "
        "K/V all-gathered per layer (--cp-attention ring: passed around the ring); DDP over "
        "all ranks"
    )
    options = CP_OPTIONS | DDP_OPTIONS
    data_parallel = DataParallel.DDP
    """Gradients are all-reduced by DDP, over the dp x cp ranks (``ParallelDims.reducers``)."""
    compile_refusal = (
        "the hand-written context-parallel attention (functional collectives inside each "
        "block) has not been tested under torch.compile"
    )

    def dims(self, config: Config) -> ParallelDims:
        return cp_dims(config)

    def validate(self, config: Config) -> None:
        validate_cp(config, self.dims(config).cp)

    def resident_between_steps(self, config: Config, n_params: int) -> ModelStateBytes:
        """DDP's gradients are views of its buckets, allocated once: 4 B/param all along."""
        return self.predicted_state_bytes(config, n_params)

    def prepare(self, model: nn.Module, ctx: RankContext, config: Config) -> TrainStep:
        dims = self.dims(config)
        mesh = self.build_mesh(config, ctx.device_type)
        ctx.place(model)
        wrapped = parallelize(model, mesh, dims, config, self.data_parallel, ctx.device)
        return ContextParallelTrainStep(
            wrapped,
            ctx,
            config,
            dp_rank=view(mesh, "dp").get_local_rank(),
            dp_size=dims.dp,
            dp_group=view(mesh, "dp").get_group(),
            gradient_sync=partial(no_sync_unless, no_sync=wrapped.no_sync),
            plain_model=model,
            keep_gradients=True,
            positions=held_positions(
                resolved_seq_len(config), dims.cp, mesh["cp"].get_local_rank()
            ),
            loss_group=None,
            loss_size=ctx.world_size,
        )
