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

Attention (``ContextParallelAttention``, installed as each block's
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

``--cp-attention ring`` (``RingAttention``) passes the keys and values around
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
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from distlab.config import Config, resolved_seq_len
from distlab.distributed import RankContext
from distlab.errors import DistlabError
from distlab.measure.memory import ModelStateBytes
from distlab.strategies.activation_checkpoint import apply_ac
from distlab.strategies.base import (
    ModuleTrainStep,
    ReplicatedStateStrategy,
    TrainStep,
    autocast,
    language_model_loss,
    mean_over_group,
    no_sync_unless,
)
from distlab.strategies.data_parallel import DataParallel
from distlab.strategies.ddp import apply_ddp
from distlab.strategies.degrees import cp_dims
from distlab.strategies.parallel_dims import ParallelDims, view

try:
    from torch.distributed._functional_collectives import all_gather_single_autograd
except ImportError:  # torch < 2.12 names it all_gather_tensor_autograd (same arguments)
    from torch.distributed._functional_collectives import (
        all_gather_tensor_autograd as all_gather_single_autograd,
    )

CP_OPTIONS = frozenset({"cp", "cp_attention"})
"""Config fields of context parallelism."""


def held_chunks(cp_rank: int, cp: int) -> tuple[int, int]:
    """The two of the 2 cp chunks of every sequence that cp rank ``cp_rank`` holds."""
    return cp_rank, 2 * cp - 1 - cp_rank


def held_positions(seq_len: int, cp: int, cp_rank: int) -> torch.Tensor:
    """Positions of the tokens cp rank ``cp_rank`` holds, in the order it holds them."""
    chunk = seq_len // (2 * cp)
    return torch.cat([torch.arange(c * chunk, (c + 1) * chunk) for c in held_chunks(cp_rank, cp)])


def sequence_order(cp: int) -> list[int]:
    """Where each chunk of the sequence lies in the all-gathered keys (rank 0's two chunks,
    then rank 1's, ...): the gathered chunks to take, in sequence order."""
    gathered = [c for rank in range(cp) for c in held_chunks(rank, cp)]
    return [gathered.index(c) for c in range(2 * cp)]


class ContextParallelAttention:
    """Causal attention of this rank's queries to the keys and values of the whole sequence.

    Called as ``attention(q, k, v)`` with (batch, heads, local tokens, head_dim)
    tensors (the local heads under tensor parallelism), like
    ``distlab.model.causal_attention``.
    """

    def __init__(self, group: dist.ProcessGroup, cp: int, cp_rank: int) -> None:
        self.group, self.cp, self.cp_rank = group, cp, cp_rank
        self.order = sequence_order(cp)
        self.masks: dict[tuple[int, torch.device], torch.Tensor] = {}

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        mask = self.causal_mask(q.shape[2], q.device)
        return F.scaled_dot_product_attention(q, self.gather(k), self.gather(v), attn_mask=mask)

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """All ranks' keys (or values) in sequence order; backward reduce-scatters."""
        gathered = all_gather_single_autograd(local.contiguous(), gather_dim=2, group=self.group)
        chunks = gathered.chunk(2 * self.cp, dim=2)
        return torch.cat([chunks[i] for i in self.order], dim=2)

    def causal_mask(self, local_tokens: int, device: torch.device) -> torch.Tensor:
        """(local tokens, sequence) booleans: True where a local query may attend to a key."""
        key = (local_tokens, device)
        if key not in self.masks:
            seq_len = local_tokens * self.cp
            queries = held_positions(seq_len, self.cp, self.cp_rank).to(device)
            keys = torch.arange(seq_len, device=device)
            self.masks[key] = keys[None, :] <= queries[:, None]
        return self.masks[key]


class RingShift(torch.autograd.Function):
    """Pass a tensor one step around the cp ring: send it to the next rank, receive the
    previous rank's. Backward passes the gradients one step back the other way."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return RingShift.exchange(x, group, 1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return RingShift.exchange(grad, ctx.group, -1), None

    @staticmethod
    def exchange(x: torch.Tensor, group: dist.ProcessGroup, step: int) -> torch.Tensor:
        """Send ``x`` to the rank ``step`` ahead in the ring; return what the rank ``step``
        behind sent."""
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        peer = [dist.get_global_rank(group, (rank + d) % size) for d in (step, -step)]
        x = x.contiguous()
        received = torch.empty_like(x)
        ops = [
            dist.P2POp(dist.isend, x, peer[0], group),
            dist.P2POp(dist.irecv, received, peer[1], group),
        ]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        return received


class RingAttention(ContextParallelAttention):
    """``--cp-attention ring``: the keys and values travel around the cp ring instead.

    In cp - 1 steps every rank passes the block of keys and values it holds to
    the next rank (``RingShift``: send/recv), so after the last step it has
    seen every rank's. Each block's scores q k^T are masked by the global
    positions of its keys; one softmax over all of them, then a weighted sum of
    the value blocks. Backward sends the gradients of the keys and values back
    around the ring, each rank adding its own share: cp - 1 messages of one
    block each, where gloo's reduce-scatter (an all-reduce) sends twice that.
    Written with plain matmuls (SDPA returns no log-sum-exp to merge blocks
    with), so it keeps the softmax output, (heads, local tokens, sequence) per
    row: the lab's comparison of communication, not a memory-saving kernel.
    """

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        local = q.shape[2]
        mask = self.causal_mask(local, q.device)
        # contiguous once: each matmul would otherwise copy (and keep) its own q and k
        q, k = q.contiguous(), k.contiguous()
        scores, values = [], []
        for step in range(self.cp):
            source = (self.cp_rank - step) % self.cp  # whose keys this rank holds now
            keys = held_positions(local * self.cp, self.cp, source).to(q.device)
            block = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
            scores.append(block.masked_fill(~mask[:, keys], float("-inf")))
            values.append(v)
            if step < self.cp - 1:
                k, v = RingShift.apply(k, self.group), RingShift.apply(v, self.group)
        weights = torch.softmax(torch.cat(scores, dim=-1), dim=-1)
        return weights.to(v.dtype) @ torch.cat(values, dim=2)


CP_ATTENTION = {"allgather": ContextParallelAttention, "ring": RingAttention}
"""``--cp-attention``: how a rank gets the keys and values of the rest of the sequence."""


def apply_cp(model: nn.Module, cp_mesh: DeviceMesh, kind: str = "allgather") -> None:
    """Make every block of ``model`` attend over the sequence split across ``cp_mesh``,
    with the ``kind`` of attention (``CP_ATTENTION``)."""
    attention = CP_ATTENTION[kind](cp_mesh.get_group(), cp_mesh.size(), cp_mesh.get_local_rank())
    for block in model.blocks.values():
        block.attn.attention = attention


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
    options = CP_OPTIONS
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
        apply_cp(model, mesh["cp"], config.cp_attention)
        apply_ac(model, config.ac)
        wrapped = apply_ddp(model, ctx.device)  # every rank: dp x cp is the whole world
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
