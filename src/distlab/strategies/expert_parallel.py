"""``ep``: expert parallelism for the mixture-of-experts presets (``tiny-moe``, ``small-moe``).

Every rank is a data-parallel rank (it trains its own rows of the global
batch) and holds the dense part of the model whole (embeddings, attention,
norms, routers, head). The E experts of each MoE layer are split over the
``--ep`` ranks of an expert-parallel group: rank i of the group holds experts
i E/ep ... (i+1) E/ep - 1. With ep < nproc there are nproc / ep such groups,
each holding every expert once (rank = replica * ep + i). E = 4, ep = 2::

    rank 0: dense (whole) + experts 0, 1  <--all-to-all-->  rank 1: dense + experts 2, 3

One MoE layer on one rank (``AllToAllDispatch``):

1. route its own tokens (top-k), sort the (token, expert) rows by expert;
2. exchange the per-expert row counts with every rank of the group
   (``all_to_all_single`` of E int64);
3. send every row to the rank holding its expert, receive the rows for its own
   experts (``all_to_all_single_autograd``, unequal splits; backward sends the
   gradients the reverse way);
4. run its experts on the received rows, send the outputs back with a second
   all-to-all, and combine them with the routing weights as a single process does.

Rows arrive ordered by source rank and, within it, by token: the data-parallel
rows of rank r are the r-th block of the global batch, so an expert sees its
rows in the order a single process would, and computes the same outputs.

Gradients. Each rank's loss is the mean over its own rows; the objective is
their mean over the nproc ranks (the balance loss is per sequence, so it
splits the same way: ``distlab.moe``). After the last backward of the step:

- dense gradients: one all-reduce (sum) of all of them flattened, divided by nproc;
- expert gradients: each already sums the contributions of every row of its
  group that chose it (the all-to-all's backward brought them back); with
  ep < nproc they are all-reduced over the nproc / ep ranks holding the same
  experts; then divided by nproc.

The experts are DTensors sharded along dim 0 over the ``ep`` mesh dimension
(replicated over ``replica``), so checkpoints (DCP) and the full state dict
gather them as for any sharded strategy; the forward uses their local shards.
The global gradient norm adds the squared norms of the expert shards over the
ep group (one 4-byte all-reduce).

Memory per rank: the dense parameters whole plus E / ep experts per layer,
each with its gradient and optimizer state (16 bytes per parameter with fp32
AdamW). Communication per step (``distlab.theory.comm``): the dense gradient
all-reduce (4 P_dense) and, per MoE layer and micro-batch, four all-to-alls of
rows of d fp32 (dispatch and combine, forward and backward) plus the count
exchange. What rank 0 sends is fixed by the config (k B T rows, dropless); what it
receives depends on the routing, so the theory takes the routing counts the run
records (``ep/rows_sent``, ``ep/rows_received``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.tensor import DTensor, Replicate, Shard

from distlab.config import Config, model_shape
from distlab.distributed import RankContext
from distlab.errors import DistlabError
from distlab.measure.memory import ModelStateBytes
from distlab.model import GPTConfig
from distlab.moe import Experts, MoE, RoutingTally, moe_layers
from distlab.optim import build_optimizer, build_scheduler
from distlab.strategies.base import ModuleTrainStep, Strategy, TrainStep
from distlab.strategies.data_parallel import DataParallel
from distlab.strategies.degrees import ep_dims
from distlab.strategies.parallel_dims import ParallelDims
from distlab.strategies.state_bytes import predicted_bytes


def expert_parameter_count(shape: GPTConfig) -> int:
    """Elements of all layers' expert MLPs (E (8 d^2 + 5 d) per layer)."""
    d = shape.d_model
    return shape.n_layer * shape.n_expert * (8 * d * d + 5 * d)


class AllToAllDispatch:
    """A ``distlab.moe.Dispatch`` that runs each row on the rank holding its expert."""

    def __init__(self, group: dist.ProcessGroup, ep: int, n_expert: int) -> None:
        self.group, self.ep, self.local = group, ep, n_expert // ep
        self.rows_sent = [0] * ep
        """Rows this rank sent to each rank of its group since the last ``take``."""
        self.rows_received = [0] * ep
        """Rows this rank received from each rank of its group since the last ``take``."""

    def __call__(
        self, rows: torch.Tensor, tokens_per_expert: torch.Tensor, experts: Experts
    ) -> torch.Tensor:
        # from_rank[s, j]: rows rank s sends to this rank's local expert j.
        from_rank = torch.empty_like(tokens_per_expert)
        dist.all_to_all_single(from_rank, tokens_per_expert, group=self.group)
        from_rank = from_rank.view(self.ep, self.local)
        send_sizes = tokens_per_expert.view(self.ep, self.local).sum(dim=1).tolist()
        receive_sizes = from_rank.sum(dim=1).tolist()
        self.rows_sent = [a + b for a, b in zip(self.rows_sent, send_sizes, strict=True)]
        self.rows_received = [a + b for a, b in zip(self.rows_received, receive_sizes, strict=True)]
        received = all_to_all_single_autograd(rows, receive_sizes, send_sizes, self.group)
        # Received rows are grouped by source rank, then expert: regroup them by expert.
        local_expert = torch.arange(self.local, device=rows.device).repeat(self.ep)
        order = torch.argsort(local_expert.repeat_interleave(from_rank.flatten()), stable=True)
        out_sorted = experts(received[order], from_rank.sum(dim=0).tolist())
        out = torch.empty_like(out_sorted).index_copy(0, order, out_sorted)
        return all_to_all_single_autograd(out, send_sizes, receive_sizes, self.group)

    def take(self) -> tuple[list[int], list[int]]:
        """Rows sent to and received from each rank since the last call; resets both."""
        counts = (self.rows_sent, self.rows_received)
        self.rows_sent, self.rows_received = [0] * self.ep, [0] * self.ep
        return counts


def shard_experts(layers: list[MoE], mesh, ep_rank: int, ep: int) -> None:
    """Replace each layer's stacked expert weights by this rank's E / ep experts, as DTensors
    sharded along dim 0 over the mesh's ``ep`` dimension (replicated over ``dp_mod_ep``)."""
    placements = (Replicate(), Shard(0)) if mesh.ndim == 2 else (Shard(0),)
    for layer in layers:
        experts = layer.experts
        for name, param in list(experts.named_parameters()):
            local = param.detach().chunk(ep)[ep_rank].clone()
            dtensor = DTensor.from_local(local, mesh, placements, run_check=False)
            setattr(experts, name, nn.Parameter(dtensor))


class ExpertParallelSync:
    """The ``GradientSync`` of ``ep``: after the step's last backward, average the dense
    gradients over every rank and scale the expert gradients (module docstring)."""

    def __init__(
        self,
        dense: list[nn.Parameter],
        experts: list[nn.Parameter],
        nproc: int,
        replica_group: dist.ProcessGroup | None,
    ) -> None:
        self.dense, self.experts, self.nproc = dense, experts, nproc
        self.replica_group = replica_group

    @contextlib.contextmanager
    def __call__(self, enabled: bool) -> Iterator[None]:
        yield
        if enabled:
            self.reduce()

    def reduce(self) -> None:
        """All-reduce the dense gradients (one flat buffer) and scale the experts'."""
        grads = [p.grad for p in self.dense]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.nproc
        for grad, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            grad.copy_(part.view_as(grad))
        for param in self.experts:
            local = param.grad.to_local()
            if self.replica_group is not None:
                dist.all_reduce(local, group=self.replica_group)
            local /= self.nproc


class ExpertParallelTrainStep(ModuleTrainStep):
    """``ModuleTrainStep`` with the expert-aware gradient norm and the routing counts."""

    def __init__(
        self,
        model: nn.Module,
        ctx: RankContext,
        config: Config,
        sync: ExpertParallelSync,
        ep_group: dist.ProcessGroup,
        dispatches: list[AllToAllDispatch],
    ) -> None:
        self.sync, self.ep_group, self.dispatches = sync, ep_group, dispatches
        super().__init__(
            model,
            ctx,
            config,
            dp_rank=ctx.rank,
            dp_size=ctx.world_size,
            dp_group=None,
            gradient_sync=sync,
        )

    def _build_optimizer(self, config: Config) -> None:
        """Two parameter groups with the same settings: torch's foreach kernels take either
        plain tensors or DTensors in one call, not both."""
        self.optimizer = build_optimizer([self.sync.dense, self.sync.experts], config)
        self.scheduler = build_scheduler(self.optimizer, config)
        self.last_state_bytes = None

    def clip_gradients(self) -> float:
        """Global norm: dense squares here, expert shards' squares summed over the ep group."""
        dense = sum(p.grad.float().pow(2).sum() for p in self.sync.dense)
        experts = sum(p.grad.to_local().float().pow(2).sum() for p in self.sync.experts)
        experts = torch.as_tensor(experts, dtype=torch.float32).clone()
        dist.all_reduce(experts, group=self.ep_group)
        norm = float((dense + experts).sqrt())
        max_norm = self.config.grad_clip
        if max_norm > 0 and norm > max_norm:
            scale = max_norm / (norm + 1e-6)
            for param in (*self.sync.dense, *self.sync.experts):
                param.grad.mul_(scale)
        return norm

    def routing(self, tally: RoutingTally) -> dict[str, float | list[int]]:
        """The step's routing statistics, plus the rows this rank sent to / received from
        each rank of its ep group, summed over layers and micro-batches."""
        sent = [0] * self.dispatches[0].ep
        received = [0] * self.dispatches[0].ep
        for dispatch in self.dispatches:
            s, r = dispatch.take()
            sent = [a + b for a, b in zip(sent, s, strict=True)]
            received = [a + b for a, b in zip(received, r, strict=True)]
        return {**tally.metrics(), "ep/rows_sent": sent, "ep/rows_received": received}


class EPStrategy(Strategy):
    """Experts sharded over --ep ranks, the dense model replicated, every rank data-parallel."""

    name = "ep"
    summary = (
        "expert parallelism (MoE presets): experts split over --ep ranks, tokens sent to "
        "them by all-to-all; dense part replicated, gradients all-reduced"
    )
    options = frozenset({"ep"})
    data_parallel = DataParallel.EP
    trains_moe = True

    def validate(self, config: Config) -> None:
        self.dims(config)
        if config.ac != "none":
            raise DistlabError(
                f"--ac {config.ac} is not supported by strategy 'ep': recomputing a block "
                "would repeat its all-to-alls"
            )

    def dims(self, config: Config) -> ParallelDims:
        return ep_dims(config)

    def predicted_state_bytes(self, config: Config, n_params: int) -> ModelStateBytes:
        """Dense parameters whole, plus E / ep of the experts (with grads, optimizer state)."""
        experts = expert_parameter_count(model_shape(config))
        local = n_params - experts + experts // self.dims(config).ep
        return predicted_bytes(local, config.optimizer)

    def prepare(self, model: nn.Module, ctx: RankContext, config: Config) -> TrainStep:
        ep = self.dims(config).ep
        ctx.place(model)
        mesh = self.build_mesh(config, ctx.device_type)
        ep_mesh = mesh["ep"]
        ep_group, ep_rank = ep_mesh.get_group(), ep_mesh.get_local_rank()
        # The ranks holding the same experts (none but this one when ep = nproc) average
        # their gradients; the experts' DTensors live on (dp_mod_ep, ep), or ep alone.
        replica_group, expert_mesh = None, ep_mesh
        if mesh["dp_mod_ep"].size() > 1:
            replica_group = mesh["dp_mod_ep"].get_group()
            expert_mesh = mesh["dp_mod_ep", "ep"]
        layers = moe_layers(model)
        shard_experts(layers, expert_mesh, ep_rank, ep)
        dispatches = []
        for layer in layers:
            layer.dispatch = AllToAllDispatch(ep_group, ep, layer.n_expert)
            dispatches.append(layer.dispatch)
        expert_ids = {id(p) for layer in layers for p in layer.experts.parameters()}
        params = list(model.parameters())
        sync = ExpertParallelSync(
            dense=[p for p in params if id(p) not in expert_ids],
            experts=[p for p in params if id(p) in expert_ids],
            nproc=ctx.world_size,
            replica_group=replica_group,
        )
        return ExpertParallelTrainStep(model, ctx, config, sync, ep_group, dispatches)
