"""This process as rank 0 of N ranks that do not exist: the fake process group, fake tensors.

``fake_ranks(N)`` is where ``distlab.train.trace`` runs the lab's step. Inside
it the process group is PyTorch's fake backend (every collective returns at
once and moves nothing) and every tensor made is a ``FakeTensor`` (shape,
dtype and storage, no values, no memory). Tests use it for what needs no real
ranks or numbers.

The lab's code runs unchanged inside; what would fail or crawl there is
adapted here, none of it changing a byte held:

- values, which fake tensors lack: DDP's constructor check that all ranks'
  parameters have equal shapes, which reads them, is skipped (one rank's
  model is every rank's); DDP's all-reduce hook gets back the bucket it
  reduced in place (the fake group's work returns nothing), and its
  second-step bucket rebuild, which reads the order broadcast from rank 0,
  keeps the first order (same sizes) (``adapt_ddp``);
- bookkeeping torch would otherwise make fake: device meshes keep real rank
  tables (``_real_mesh_tables``);
- speed: FSDP2 is handed only the shard views it reads instead of one view
  per rank (``RankChunks``), and DTensor settles a foreach op's strided-shard
  flag once per op instead of once per tensor (``_strided_flag_once_per_op``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp._fully_shard import _fsdp_param as fsdp_param
from torch.distributed.tensor import _sharding_prop as sharding_prop
from torch.distributed.tensor.placement_types import _StridedShard
from torch.nn.parallel import DistributedDataParallel
from torch.nn.parallel import distributed as ddp_module

from distlab.distributed import RankContext
from distlab.errors import DistlabError
from distlab.strategies.base import TrainStep


@contextlib.contextmanager
def fake_ranks(world_size: int) -> Iterator[RankContext]:
    """This process as rank 0 of ``world_size`` fake ranks, every tensor a fake one.

    Inside, ``dist`` collectives return at once (PyTorch's fake backend) and every
    tensor made is a ``FakeTensor``. The group is destroyed on exit.
    """
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers "fake"

    if dist.is_initialized():
        raise DistlabError("a process group is already active in this process; trace elsewhere")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        with (
            FakeTensorMode(),
            _real_mesh_tables(),
            _own_chunks_only(),
            _strided_flag_once_per_op(),
            _ddp_without_shape_check(),
        ):
            yield RankContext(rank=0, world_size=world_size, device=torch.device("cpu"))
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def _real_mesh_tables() -> Iterator[None]:
    """Meshes that torch derives (FSDP2 joins the dp and tp meshes into one) keep real rank
    tables, as ``distlab.distributed.device_mesh`` keeps the lab's own: bookkeeping that
    is read, never traced."""
    init = DeviceMesh.__init__

    def real_tables(self: DeviceMesh, *args: Any, **kwargs: Any) -> None:
        with unset_fake_temporarily():
            init(self, *args, **kwargs)

    DeviceMesh.__init__ = real_tables  # type: ignore[method-assign]
    try:
        yield
    finally:
        DeviceMesh.__init__ = init  # type: ignore[method-assign]


class RankChunks(Sequence[torch.Tensor]):
    """``torch.chunk(tensor, count, dim)`` padded with empty chunks to ``count`` (FSDP2's
    ``_chunk_with_empty``), each chunk made only when read: the same views."""

    def __init__(self, tensor: torch.Tensor, count: int, dim: int) -> None:
        self.tensor, self.count, self.dim = tensor, count, dim
        self.size = tensor.size(dim)
        self.step = -(-self.size // count)  # torch.chunk's chunk size: ceil(size / count)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> torch.Tensor:  # type: ignore[override]
        if not -self.count <= index < self.count:
            raise IndexError(index)
        start = (index % self.count) * self.step
        if self.size == 0:  # torch.chunk gives count empty chunks of an empty dimension
            return self.tensor.narrow(self.dim, 0, 0)
        if start >= self.size:  # past torch.chunk's last chunk: FSDP2 pads with 1-D empties
            return self[0].new_empty(0)
        return self.tensor.narrow(self.dim, start, min(self.step, self.size - start))


@contextlib.contextmanager
def _own_chunks_only() -> Iterator[None]:
    """FSDP2 splits each parameter into one view per rank and keeps its own: at 1,024 fake
    ranks that is some 400,000 fake tensors and minutes. The trace hands FSDP2 the views
    it reads (``RankChunks``), so the same step takes seconds."""
    split = fsdp_param._chunk_with_empty
    fsdp_param._chunk_with_empty = RankChunks
    try:
        yield
    finally:
        fsdp_param._chunk_with_empty = split


@contextlib.contextmanager
def _strided_flag_once_per_op() -> Iterator[None]:
    """torch's DTensor sharding propagation (2.13) settles a foreach op's strided-shard flag
    once per tensor of the op, each time scanning all of the op's arguments: quadratic in
    the parameters (the optimizer's and clipping's foreach ops), most of a 7B trace. The
    trace scans each op's arguments once; the flag, and so every placement, is the same."""
    settle = sharding_prop._propagate_use_strided_shard_flag
    last: list[Any] = [None, ()]  # [op schema, the one spec that settles its flag]

    def once_per_op(op_strategy: Any, op_schema: Any) -> None:
        if last[0] is not op_schema:
            last[:] = [op_schema, _settling_spec(op_schema.args_spec)]
        settle(op_strategy, _ScannedSchema(last[1]))

    sharding_prop._propagate_use_strided_shard_flag = once_per_op
    try:
        yield
    finally:
        sharding_prop._propagate_use_strided_shard_flag = settle


def _settling_spec(specs: tuple[Any, ...]) -> tuple[Any, ...]:
    """One spec that gives ``_propagate_use_strided_shard_flag`` the flag all of ``specs``
    give it (torch's rule: the strided-shard specs' flag, True where they disagree), or
    none where no spec is strided."""
    strided = [s for s in specs if any(isinstance(p, _StridedShard) for p in s.placements)]
    flag = None
    for spec in strided:
        value = spec.use_strided_shard_as_shard_order
        flag = True if flag is not None and flag != value else value
    return tuple(s for s in strided if s.use_strided_shard_as_shard_order == flag)[:1]


@dataclass(frozen=True)
class _ScannedSchema:
    """What ``_propagate_use_strided_shard_flag`` reads of an op schema: its arguments' specs."""

    args_spec: tuple[Any, ...]


@contextlib.contextmanager
def _ddp_without_shape_check() -> Iterator[None]:
    """DDP's constructor compares every rank's parameter shapes by reading them: with one
    rank there is nothing to compare, and fake tensors cannot be read."""
    check = ddp_module._verify_param_shape_across_processes
    ddp_module._verify_param_shape_across_processes = lambda *args, **kwargs: None
    try:
        yield
    finally:
        ddp_module._verify_param_shape_across_processes = check


class _FirstBucketOrder:
    """DDP's reducer, minus the rebuild of its buckets in the second step (see module doc)."""

    def __init__(self, reducer: Any) -> None:
        self._reducer = reducer

    def _rebuild_buckets(self) -> bool:
        return False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reducer, name)


def _reduced_in_place(state, bucket):  # noqa: ANN001 - DDP checks the annotations' values
    """DDP's all-reduce on a fake group: the bucket itself, which the reduction writes into."""
    future: torch.futures.Future = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future


def adapt_ddp(train_step: TrainStep) -> None:
    """Give every DDP module of ``train_step`` the fake group's all-reduce and bucket order."""
    for value in vars(train_step).values():
        if isinstance(value, DistributedDataParallel):
            value.register_comm_hook(None, _reduced_in_place)
            value.reducer = _FirstBucketOrder(value.reducer)
