"""Context parallelism's attention: each rank holds 2 chunks of every sequence and
gathers the others' keys and values.

``apply_cp`` swaps every block's attention for one of ``CP_ATTENTION``: ``allgather``
(all-gather K and V over the cp group in each layer) or ``ring`` (pass them around the
ring, one neighbour's chunk at a time). ``held_chunks``/``held_positions`` say which
tokens a rank holds: the sequence is cut into 2 cp chunks and rank r holds chunks r and
2 cp - 1 - r, so that causal attention costs every rank the same.

Hand-written rather than torch's ``context_parallel`` (``torch.distributed.tensor.
experimental``): that one runs only on CUDA's scaled-dot-product kernels, and distlab's
context parallelism must run, and be tested, on CPU over gloo.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

try:
    from torch.distributed._functional_collectives import all_gather_single_autograd
except ImportError:  # torch < 2.12 names it all_gather_tensor_autograd (same arguments)
    from torch.distributed._functional_collectives import (
        all_gather_tensor_autograd as all_gather_single_autograd,
    )


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
